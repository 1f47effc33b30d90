#!/usr/bin/env python3
"""Compares two `gpg-rl train` run folders (metrics.jsonl, final/model.safetensors).

Used by bench/gpu/train_gpu_vs_cpu.sh: the same recipe on cpu and on cuda, and a resumed run
against an uninterrupted one. Needs only numpy (f32 checkpoints; the safetensors file is read
by hand).

Tolerances (default mode, two devices):
  * the sampled completions must be the same: per step `tokens`, `completions/mean_length`,
    `completions/max_length`, `reward`, `valid_groups` equal (the GPU sampler draws from the
    same seeded uniforms as the CPU; only a logit difference that moves a draw across a CDF
    boundary changes a token, and then the runs are not comparable: reported as such);
  * loss, grad_norm, entropy per step: |a - b| <= 1e-3 * max(|a|, |b|) + 1e-6;
  * final weights, per tensor: ||a - b||_2 <= 1e-3 * ||b||_2.
With --exact (same device, resumed vs uninterrupted): every metric but the timings and every
weight bit for bit.
"""
import argparse
import json
import struct
import sys

import numpy as np


def metrics(run):
    rows = []
    with open(f"{run}/metrics.jsonl") as f:
        for line in f:
            m = json.loads(line)
            rows.append({k: v for k, v in m.items() if not k.startswith("time_")})
    return rows


def tensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] != "F32":
            sys.exit(f"{path}: {name} is {t['dtype']}; this check compares f32 runs")
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(t["shape"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--exact", action="store_true")
    ap.add_argument("--rtol-metrics", type=float, default=1e-3)
    ap.add_argument("--rtol-weights", type=float, default=1e-3)
    args = ap.parse_args()
    ma, mb = metrics(args.a), metrics(args.b)
    ok = True
    if len(ma) != len(mb):
        print(f"FAILED: {len(ma)} vs {len(mb)} steps")
        return 1
    same_samples = ["tokens", "completions/mean_length", "completions/max_length", "reward",
                    "valid_groups"]
    close = ["loss", "grad_norm", "entropy"]
    for x, y in zip(ma, mb):
        step = x["step"]
        if args.exact:
            if x != y:
                diff = {k: (x.get(k), y.get(k)) for k in set(x) | set(y) if x.get(k) != y.get(k)}
                print(f"FAILED: step {step} differs: {diff}")
                ok = False
            continue
        diverged = {k: (x[k], y[k]) for k in same_samples if x[k] != y[k]}
        if diverged:
            print(f"FAILED: step {step}: the sampled completions differ {diverged} (a logit "
                  "difference moved a draw; the rest of the runs is not comparable)")
            return 1
        line = []
        for k in close:
            a, b = x[k], y[k]
            err = abs(a - b)
            tol = args.rtol_metrics * max(abs(a), abs(b)) + 1e-6
            line.append(f"{k} {a:.6g} vs {b:.6g} (|diff| {err:.2e})")
            if not err <= tol:
                print(f"FAILED: step {step}: {k} {a} vs {b}: |diff| {err:.3e} > {tol:.3e}")
                ok = False
        print(f"step {step}: same completions ({x['tokens']} tokens, reward {x['reward']:.4f}); "
              + "; ".join(line))
    ta = tensors(f"{args.a}/final/model.safetensors")
    tb = tensors(f"{args.b}/final/model.safetensors")
    if set(ta) != set(tb):
        print(f"FAILED: tensor names differ: {sorted(set(ta) ^ set(tb))}")
        return 1
    worst = (0.0, "")
    for name in sorted(ta):
        a, b = ta[name].astype(np.float64), tb[name].astype(np.float64)
        if args.exact:
            if not np.array_equal(ta[name].view(np.uint32), tb[name].view(np.uint32)):
                print(f"FAILED: {name} differs (max |diff| {np.abs(a - b).max():.3e})")
                ok = False
            continue
        rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
        worst = max(worst, (rel, name))
        if not rel <= args.rtol_weights:
            print(f"FAILED: {name}: relative L2 difference {rel:.3e} > {args.rtol_weights}")
            ok = False
    if args.exact:
        print(f"{len(ta)} tensors bit for bit equal" if ok else "weights differ")
    else:
        print(f"final weights: largest relative L2 difference {worst[0]:.3e} ({worst[1]}), "
              f"tolerance {args.rtol_weights}")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
