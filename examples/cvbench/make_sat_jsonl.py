#!/usr/bin/env python3
"""SAT (the GPG reference's CV-Bench training set) and CV-Bench as gpg-rl image-question JSONL.

    python examples/cvbench/make_sat_jsonl.py --sat /data/SAT --out data/sat/train.jsonl
    python examples/cvbench/make_sat_jsonl.py --cvbench CV-Bench/test.jsonl --images CV-Bench \
        --out data/cvbench/test.jsonl

SAT: the reference reads SAT_train_15000.json, a list of {"images": [path], "messages":
[{"content": question}, {"content": answer}]}, and asks every question with the instruction
"{Question}  Output the thinking process in <think> </think> and final answer (option) in
<answer> </answer> tags." and scores against "<answer>{answer}</answer>". This writes one line
per example: {"id", "question": the instructed question, "image": absolute path, "answer":
"<answer>…</answer>"}, which `gpg-rl train` and `gpg-rl eval --benchmark` read.

CV-Bench (nyu-visionx/CV-Bench test.jsonl: "prompt" holds the question with its options,
"answer" the option such as "(A)", "filename" the image): the same instruction and answer form.
"""

import argparse
import json
from pathlib import Path

TEMPLATE = "{Question}  Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> tags."


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sat", type=Path, help="folder with SAT_train_15000.json and its images")
    ap.add_argument("--cvbench", type=Path, help="CV-Bench test.jsonl")
    ap.add_argument("--images", type=Path, help="CV-Bench's image folder (filename is relative to it)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = []
    if args.sat:
        for i, ex in enumerate(json.load(open(args.sat / "SAT_train_15000.json"))):
            question = ex["messages"][0]["content"].replace("<image>", "")
            rows.append({"id": f"sat-{i}", "question": TEMPLATE.format(Question=question),
                         "image": str((args.sat / ex["images"][0]).resolve()),
                         "answer": "<answer>" + ex["messages"][1]["content"] + "</answer>"})
    elif args.cvbench:
        base = args.images or args.cvbench.parent
        for i, line in enumerate(open(args.cvbench)):
            ex = json.loads(line)
            rows.append({"id": str(ex.get("idx", i)), "question": TEMPLATE.format(Question=ex["prompt"]),
                         "image": str((base / ex["filename"]).resolve()),
                         "answer": "<answer>" + ex["answer"] + "</answer>"})
    else:
        ap.error("give --sat or --cvbench")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"{args.out}: {len(rows)} image questions")


if __name__ == "__main__":
    main()
