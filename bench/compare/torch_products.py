"""PyTorch peer of `gpg-rl bench products`: the three matrix products of a linear layer
(y = x·Wᵀ, dx = dy·W, dW = dyᵀ·x) on the shapes given, best wall-clock time of --reps runs
after one warm-up, printed as one JSON object on the last line.

--dtype bf16 multiplies bf16 tensors (oneDNN; AMX on Intel Sapphire Rapids and later),
--dtype f32 f32 tensors. Usage:
    python torch_products.py --threads 2 --reps 5 --dtype bf16 --case fwd:2048:896:4864 ...
(--case KIND:ROWS:IN:OUT, KIND one of fwd, dx, dw). --clock process measures the process's CPU
time (every thread) instead of wall-clock time, as `gpg-rl bench products --cpu-time` does.
"""

import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--case", action="append", default=[])
    ap.add_argument("--clock", choices=["wall", "process"], default="wall")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    results = []
    for case in args.case:
        kind, rows, inp, out = case.split(":")
        rows, inp, out = int(rows), int(inp), int(out)
        w = (torch.rand(out, inp, generator=gen) * 0.1 - 0.05).to(dtype)
        x = (torch.rand(rows, inp, generator=gen) * 2 - 1).to(dtype)
        dy = (torch.rand(rows, out, generator=gen) * 2 - 1).to(dtype)
        if kind == "fwd":
            run = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
        elif kind == "dx":
            run = lambda: torch.mm(dy, w)  # noqa: E731
        elif kind == "dw":
            run = lambda: torch.mm(dy.t(), x)  # noqa: E731
        else:
            raise SystemExit(f"--case {case}: kind must be fwd, dx or dw")
        with torch.no_grad():
            run()
            best = float("inf")
            for _ in range(args.reps):
                t0 = clock()
                run()
                best = min(best, clock() - t0)
        results.append({"case": case, "ms": best * 1e3})
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "dtype": args.dtype,
                "clock": args.clock,
                "onednn_isa": str(torch.backends.cpu.get_cpu_capability()),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
