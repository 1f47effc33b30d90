#!/usr/bin/env python3
"""PyTorch/transformers peer of gpg-rl's training-step benchmark.

    python bench/compare/torch_train_step.py --model DIR [--threads 2] [--steps 5]
        [--dtype f32|bf16] [--bf16-mode autocast|pure]

One step = forward + backward + AdamW update of every parameter, on a batch of B rows × L
tokens (default 16 × 256) whose last C tokens (default 192) are the completion. The loss has
the form gpg-rl's engine computes,

    loss = Σ_rows Σ_{t in completion} g_t · log π(o_t | o_<t),

with GPG-shaped weights g_t = −Â_row / N_completion_tokens (Â_row ~ N(0, 1)), so the work
matches: logits are computed only at the C positions that predict completion tokens
(`logits_to_keep`), as TRL does. Token ids are random (fixed seed), no padding.
Warm-up steps are run and discarded, then the median wall time of --steps steps is printed as
one JSON line: {"train_step_s", "peak_rss_mb", ...}. "step_cpu_s" is the median CPU time (all
threads) of the process per step: on a shared machine it is less disturbed by other load than
wall time. Peak RSS is the process's maximum resident set (VmHWM), torch's own footprint
included (see "rss_after_load_mb").

Precision (--dtype, printed as "dtype" and "bf16_mode"):
  f32                      float32 weights, activations, gradients and AdamW state (default)
  bf16 --bf16-mode autocast  float32 weights and AdamW (mixed precision): the forward runs
                           under torch.autocast("cpu", dtype=torch.bfloat16), so matrix
                           products take bf16 inputs; backward follows the autocast graph
  bf16 --bf16-mode pure    the model loaded in bfloat16; forward, backward, gradients and
                           torch.optim.AdamW (state and update) all in bf16
In every mode the log-softmax over the vocabulary is computed in float32 (logits.float()).
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


def completion_logprobs(model, input_ids: torch.Tensor, completion_len: int) -> torch.Tensor:
    """log π(o_t | o_<t) for the last `completion_len` tokens of every row: [B, C]."""
    out = model(input_ids=input_ids, logits_to_keep=completion_len + 1, use_cache=False)
    logits = out.logits[:, :-1, :].float()  # positions L-C-1 .. L-2 predict tokens L-C .. L-1
    targets = input_ids[:, -completion_len:]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF model directory (make_bench_model.py)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--completion-len", type=int, default=192)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa or eager")
    ap.add_argument(
        "--dtype", default="f32", choices=["f32", "bf16", "float32", "bfloat16"], help="precision"
    )
    ap.add_argument(
        "--bf16-mode",
        default="autocast",
        choices=["autocast", "pure"],
        help="with --dtype bf16: f32 weights under autocast, or the whole model and AdamW in bf16",
    )
    args = ap.parse_args()
    if not 0 < args.completion_len < args.seq_len:
        ap.error("--completion-len must be in (0, --seq-len)")
    args.dtype = {"float32": "f32", "bfloat16": "bf16"}.get(args.dtype, args.dtype)
    bf16_mode = args.bf16_mode if args.dtype == "bf16" else None
    weight_dtype = torch.bfloat16 if bf16_mode == "pure" else torch.float32

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = Qwen2ForCausalLM.from_pretrained(
        args.model, dtype=weight_dtype, attn_implementation=args.attn
    ).to(device)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    rss_after_load = rss_mb()

    matmul_dtype = [None]  # output dtype of one MLP projection, seen by a forward hook

    def record_dtype(_module, _inputs, output):
        matmul_dtype[0] = str(output.dtype).replace("torch.", "")

    model.model.layers[0].mlp.down_proj.register_forward_hook(record_dtype)

    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen).to(device)
    advantages = torch.randn(args.batch, generator=gen)
    n_tokens = args.batch * args.completion_len
    weights = (-advantages / n_tokens).unsqueeze(1).expand(-1, args.completion_len).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> tuple[float, float, float]:
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if bf16_mode == "autocast":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logp = completion_logprobs(model, input_ids, args.completion_len)
        else:
            logp = completion_logprobs(model, input_ids, args.completion_len)
        loss = (weights * logp).sum()
        loss.backward()
        optimizer.step()
        sync()
        return time.perf_counter() - t0, time.process_time() - c0, float(loss.detach())

    for _ in range(args.warmup):
        step()
    times, cpu_times, losses = [], [], []
    for _ in range(args.steps):
        dt, cpu, loss = step()
        times.append(dt)
        cpu_times.append(cpu)
        losses.append(loss)

    result = {
        "train_step_s": round(statistics.median(times), 4),
        "peak_rss_mb": round(rss_mb(), 1),
        "rss_after_load_mb": round(rss_after_load, 1),
        "step_times_s": [round(t, 4) for t in times],
        "step_cpu_s": round(statistics.median(cpu_times), 4),
        "tokens_per_step": args.batch * args.seq_len,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "completion_len": args.completion_len,
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": args.device,
        "attn": args.attn,
        "dtype": args.dtype,
        "bf16_mode": bf16_mode,
        "weight_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "matmul_dtype": matmul_dtype[0],
        "parameters": sum(p.numel() for p in model.parameters()),
        "first_loss": losses[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
