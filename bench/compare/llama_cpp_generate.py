#!/usr/bin/env python3
"""llama.cpp (llama-cpp-python, low-level API) peer of gpg-rl's sampling benchmark.

    python bench/compare/llama_cpp_generate.py --model MODEL.gguf [--batch 32] \
        [--prompt-len 16] [--new-tokens 32] [--threads 2] [--runs 3]

MODEL.gguf comes from to_gguf.py. Prompts: a batch of B rows of P random ordinary token ids
(ids below the lowest EOS/special id, torch.randint with a seeded generator, the scheme
hf_generate.py uses, so the same --seed gives the same prompts as hf_generate.py; torch runs in
a child process and is not loaded here). Each row is
its own sequence (seq id = row) in one llama_context with B sequences and a KV cache of
B·(P+N) cells; per run:

    prefill: one llama_decode of all B·P prompt tokens (logits only at each row's last token)
    then N-1 times: one llama_decode of B tokens (one per row, its own seq id and position)

Sampling: temperature T (default 1.0) multinomial over the full vocabulary (no top-k /
top-p), done in numpy on the logits llama.cpp returns (exp in float32, float64 cumulative sum, inverse-CDF draw from
a seeded numpy Generator; its time is reported as "sample_s"), EOS ignored: exactly N new tokens per row. `--greedy` takes the
argmax instead. The sampling time is part of the measured time. The KV cache is cleared
between runs. One warm-up run is discarded, then --runs timed runs; prints one JSON line:
tokens_per_s = B·N / median wall time of a run (prefill included), "run_cpu_s" the median
process CPU time of a run (all threads), "peak_rss_mb" VmHWM of the process (peak_rss.py).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from peak_rss import rss_mb  # bench/compare/peak_rss.py


def random_prompts(batch: int, prompt_len: int, n_ordinary: int, seed: int) -> list[list[int]]:
    """hf_generate.py's prompt ids: torch.randint(0, n_ordinary) from Generator(seed). Made in
    a child process, so that torch's ~0.6 GB never counts in this process's peak RSS."""
    code = (
        "import json, sys, torch\n"
        "b, p, n, s = map(int, sys.argv[1:])\n"
        "g = torch.Generator().manual_seed(s)\n"
        "print(json.dumps(torch.randint(0, n, (b, p), generator=g).tolist()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(batch), str(prompt_len), str(n_ordinary), str(seed)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="GGUF file (to_gguf.py)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    ap.add_argument("--threads", type=int, default=2, help="n_threads and n_threads_batch")
    ap.add_argument("--runs", type=int, default=3, help="timed runs (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="keep llama.cpp's log output")
    args = ap.parse_args()
    if args.batch < 1 or args.prompt_len < 1 or args.new_tokens < 1 or args.runs < 1:
        ap.error("--batch, --prompt-len, --new-tokens and --runs must be positive")
    if not os.path.isfile(args.model):
        ap.error(f"--model {args.model}: no such file (make it with to_gguf.py)")

    import llama_cpp as L

    if not args.verbose:
        # Silence llama.cpp's loader / context logs (they go to stderr).
        @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
        def _quiet(level, text, user_data):
            pass

        L.llama_log_set(_quiet, ctypes.c_void_p(0))
        main._log_cb = _quiet  # keep the callback alive

    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = L.llama_model_load_from_file(args.model.encode(), mparams)
    if not model:
        raise SystemExit(f"llama.cpp could not load {args.model}")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    eos = L.llama_vocab_eos(vocab)
    # Ordinary ids: below the first special token (the EOS id in Qwen2 vocabularies).
    n_ordinary = min(n_vocab, eos) if eos >= 0 else n_vocab

    B, P, N = args.batch, args.prompt_len, args.new_tokens
    cparams = L.llama_context_default_params()
    n_ctx = B * (P + N)
    cparams.n_ctx = ((n_ctx + 255) // 256) * 256
    cparams.n_batch = max(B * P, B)
    cparams.n_ubatch = max(B * P, B)
    cparams.n_seq_max = B
    cparams.n_threads = args.threads
    cparams.n_threads_batch = args.threads
    cparams.no_perf = True
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise SystemExit("llama.cpp could not create the context (n_ctx / n_seq_max too large?)")
    mem = L.llama_get_memory(ctx)
    rss_after_load = rss_mb()

    prompts = random_prompts(B, P, n_ordinary, args.seed)
    batch = L.llama_batch_init(B * P, 0, 1)

    def fill(tokens: list[int], positions: list[int], seqs: list[int], want_logits: list[bool]):
        for i, (t, p, s, w) in enumerate(zip(tokens, positions, seqs, want_logits)):
            batch.token[i] = t
            batch.pos[i] = p
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = s
            batch.logits[i] = 1 if w else 0
        batch.n_tokens = len(tokens)

    def decode() -> np.ndarray:
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        ptr = L.llama_get_logits(ctx)
        return np.ctypeslib.as_array(ptr, shape=(B, n_vocab))  # one row per flagged token

    sample_acc = [0.0]

    def sample(logits: np.ndarray, rng: np.random.Generator) -> list[int]:
        t0 = time.perf_counter()
        try:
            return _sample(logits, rng)
        finally:
            sample_acc[0] += time.perf_counter() - t0

    def _sample(logits: np.ndarray, rng: np.random.Generator) -> list[int]:
        if args.greedy:
            return logits.argmax(axis=1).tolist()
        z = logits * np.float32(1.0 / args.temperature)
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        cdf = np.cumsum(z, axis=1, dtype=np.float64)
        u = rng.random(B) * cdf[:, -1]
        return [int(np.searchsorted(cdf[r], u[r], side="right")) for r in range(B)]

    def run(seed: int) -> tuple[float, float, float, list[list[int]]]:
        L.llama_memory_clear(mem, True)
        sample_acc[0] = 0.0
        rng = np.random.default_rng(seed)
        out: list[list[int]] = [[] for _ in range(B)]
        c0, t0 = time.process_time(), time.perf_counter()
        fill(
            [t for row in prompts for t in row],
            [p for _ in range(B) for p in range(P)],
            [r for r in range(B) for _ in range(P)],
            [p == P - 1 for _ in range(B) for p in range(P)],
        )
        next_ids = sample(decode(), rng)
        for step in range(N):
            for r in range(B):
                out[r].append(next_ids[r])
            if step == N - 1:
                break
            fill(next_ids, [P + step] * B, list(range(B)), [True] * B)
            next_ids = sample(decode(), rng)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return dt, cpu, sample_acc[0], out

    for i in range(args.warmup):
        run(args.seed + 1000 + i)
    measured = [run(args.seed + i) for i in range(args.runs)]
    times = [m[0] for m in measured]
    sample_out = measured[0][3]
    if any(len(row) != N for row in sample_out):
        raise RuntimeError("a row did not get exactly --new-tokens tokens")
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)

    file_type = None
    try:
        import gguf

        reader = gguf.GGUFReader(args.model)
        field = reader.get_field("general.file_type")
        if field is not None:
            file_type = {0: "f32", 1: "f16", 32: "bf16"}.get(int(field.contents()), None)
    except Exception:  # the dtype is informative only
        pass

    result = {
        "tokens_per_s": round(B * N / statistics.median(times), 1),
        "peak_rss_mb": round(rss_mb(), 1),
        "rss_after_load_mb": round(rss_after_load, 1),
        "run_times_s": [round(t, 4) for t in times],
        "run_cpu_s": round(statistics.median(m[1] for m in measured), 4),
        "sample_s": round(statistics.median(m[2] for m in measured), 4),
        "new_tokens_per_run": B * N,
        "batch": B,
        "prompt_len": P,
        "new_tokens": N,
        "sampling": "greedy" if args.greedy else f"multinomial T={args.temperature}",
        "threads": args.threads,
        "n_ctx": cparams.n_ctx,
        "dtype": file_type,
        "model": os.path.abspath(args.model),
        "first_row_tokens": sample_out[0][:8],
        "llama_cpp_python": importlib.metadata.version("llama_cpp_python"),
        "system_info": L.llama_print_system_info().decode(errors="replace").strip(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
