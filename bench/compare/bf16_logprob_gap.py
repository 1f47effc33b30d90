#!/usr/bin/env python3
"""How far bf16 log-probs move from the f32 reference: transformers' bf16 against gpg-rl's.

    PY=/work/venv/bin/python
    $PY bench/compare/bf16_logprob_gap.py make --model DIR --out CASES.jsonl [--n 8]
    gpg-rl logprobs --model DIR --input CASES.jsonl --precision f32  > OURS_F32.jsonl
    gpg-rl logprobs --model DIR --input CASES.jsonl --precision bf16 > OURS_BF16.jsonl
    $PY bench/compare/bf16_logprob_gap.py compare CASES.jsonl OURS_F32.jsonl OURS_BF16.jsonl

`make` writes N {"prompt", "completion"} pairs of ordinary text (seeded), with transformers'
f32 log-probs (`hf_f32`, the reference) and bf16 log-probs (`hf_bf16`: the model loaded with
dtype=torch.bfloat16, eager attention) of the completion tokens, tokenized as gpg-rl logprobs
tokenizes them (prompt and completion separately, no special tokens). `compare` prints the
worst and mean |logp − reference| of transformers bf16, gpg-rl f32 and gpg-rl bf16 as one JSON
line.
"""

import argparse
import json
import random
import sys

WORDS = (
    "the of and to in is that for it as with was on be by this are from or at an which "
    "number answer step first then total each sum product compute value equal two three "
    "four five six seven eight nine ten hundred result therefore so we find"
).split()


def make(args):
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    cases = []
    for _ in range(args.n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(24)).capitalize() + "."
        completion = " " + " ".join(rng.choice(WORDS) for _ in range(40)) + "."
        cases.append((prompt, completion))
    out = []
    for dtype_name, dtype in [("hf_f32", torch.float32), ("hf_bf16", torch.bfloat16)]:
        model = Qwen2ForCausalLM.from_pretrained(
            args.model, dtype=dtype, attn_implementation="eager"
        ).eval()
        for i, (p, c) in enumerate(cases):
            p_ids = tok.encode(p, add_special_tokens=False)
            c_ids = tok.encode(c, add_special_tokens=False)
            ids = torch.tensor([p_ids + c_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].float()
            lp = torch.log_softmax(logits[len(p_ids) - 1 : len(p_ids) - 1 + len(c_ids)], -1)
            vals = lp.gather(1, torch.tensor(c_ids).unsqueeze(1)).squeeze(1).tolist()
            if len(out) <= i:
                out.append({"prompt": p, "completion": c, "completion_ids": c_ids})
            out[i][dtype_name] = vals
        del model
    with open(args.out, "w") as f:
        for row in out:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(out)} cases to {args.out}", file=sys.stderr)


def compare(args):
    cases = [json.loads(l) for l in open(args.cases)]
    ours = {
        "gpg_rl_f32": [json.loads(l) for l in open(args.ours_f32)],
        "gpg_rl_bf16": [json.loads(l) for l in open(args.ours_bf16)],
    }
    gaps = {"hf_bf16": [], "gpg_rl_f32": [], "gpg_rl_bf16": []}
    for i, c in enumerate(cases):
        ref = c["hf_f32"]
        gaps["hf_bf16"] += [abs(a - b) for a, b in zip(c["hf_bf16"], ref)]
        for k, rows in ours.items():
            if rows[i]["completion_ids"] != c["completion_ids"]:
                sys.exit(f"case {i}: gpg-rl tokenized the completion differently")
            gaps[k] += [abs(a - b) for a, b in zip(rows[i]["logprobs"], ref)]
    print(
        json.dumps(
            {
                k: {"worst": max(v), "mean": sum(v) / len(v), "tokens": len(v)}
                for k, v in gaps.items()
            }
        )
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--model", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--n", type=int, default=8)
    m.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("compare")
    c.add_argument("cases")
    c.add_argument("ours_f32")
    c.add_argument("ours_bf16")
    args = ap.parse_args()
    make(args) if args.cmd == "make" else compare(args)


if __name__ == "__main__":
    main()
