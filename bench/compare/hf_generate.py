#!/usr/bin/env python3
"""transformers `generate` peer of gpg-rl's sampling benchmark.

    python bench/compare/hf_generate.py --model DIR [--threads 2] [--runs 3] [--dtype f32|bf16]

Samples a batch of B prompts (default 16) of P random tokens each (default 32, no padding) for
exactly N new tokens each (default 128): do_sample=True, temperature 1.0, no top-k / top-p
filtering, EOS ignored (min_new_tokens = max_new_tokens = N), KV cache on. One warm-up run is
discarded, then --runs timed runs; prints one JSON line {"tokens_per_s", "peak_rss_mb", ...}
where tokens_per_s = B·N / median wall time of a run. "run_cpu_s" is the median CPU time (all
threads) of a run, less disturbed by other load on a shared machine than wall time. Peak RSS is
VmHWM of the process, torch's own footprint included (see "rss_after_load_mb").
--dtype bf16 (or bfloat16) loads the weights in bfloat16, so the whole forward (and the KV
cache) runs in bf16; transformers' generate casts the last position's logits to float32 before
the logits processors and the sampling softmax. "dtype" in the JSON line says which.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers
from transformers import Qwen2ForCausalLM

from peak_rss import rss_mb  # bench/compare/peak_rss.py


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF model directory (make_bench_model.py)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--runs", type=int, default=3, help="timed runs (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "f32", "bf16"],
        help="weights and compute dtype (bf16 = the model loaded in bfloat16)",
    )
    ap.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa or eager")
    args = ap.parse_args()
    args.dtype = {"f32": "float32", "bf16": "bfloat16"}.get(args.dtype, args.dtype)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = Qwen2ForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, args.dtype), attn_implementation=args.attn
    ).to(device)
    model.eval()
    rss_after_load = rss_mb()

    gen = torch.Generator().manual_seed(args.seed)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    # Prompt ids: ordinary tokens only (no special tokens, which sit at the top of the vocab).
    n_ordinary = min(model.config.vocab_size, min(eos_ids, default=model.config.vocab_size))
    prompts = torch.randint(0, n_ordinary, (args.batch, args.prompt_len), generator=gen).to(device)
    attention_mask = torch.ones_like(prompts)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(seed: int) -> tuple[float, float]:
        torch.manual_seed(seed)
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=prompts,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=args.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=min(eos_ids) if eos_ids else 0,
                use_cache=True,
            )
        sync()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        if out.shape != (args.batch, args.prompt_len + args.new_tokens):
            raise RuntimeError(f"generate returned shape {tuple(out.shape)}")
        return dt, cpu

    for i in range(args.warmup):
        run(args.seed + 1000 + i)
    measured = [run(args.seed + i) for i in range(args.runs)]
    times = [t for t, _ in measured]
    new_tokens = args.batch * args.new_tokens
    result = {
        "tokens_per_s": round(new_tokens / statistics.median(times), 1),
        "peak_rss_mb": round(rss_mb(), 1),
        "rss_after_load_mb": round(rss_after_load, 1),
        "run_times_s": [round(t, 4) for t in times],
        "run_cpu_s": round(statistics.median(c for _, c in measured), 4),
        "new_tokens_per_run": new_tokens,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "temperature": args.temperature,
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": args.device,
        "dtype": args.dtype,
        "attn": args.attn,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
