#!/usr/bin/env python3
"""easy-vqa (PyPI `easy-vqa` 1.0, MIT) as gpg-rl datasets.

    pip install easy-vqa==1.0
    python examples/easy_vqa/make_data.py --out data/easy_vqa

easy-vqa ships 64×64 PNG shapes (circle / rectangle / triangle in 8 colours) with questions
such as "what color is the shape?" or "is there a blue shape in the image?" and 13 one-word
answers. This script reads the installed package's files (its own `get_*` functions) and
writes, under --out:

* images/{train,test}/<id>.png: the package's PNGs, copied, so the dataset stands alone;
* train.jsonl: one image question per line, `{"id", "question", "image", "answer"}` (image
  paths relative to the file): what `gpg-rl train` samples prompts from;
* sft.jsonl: the same questions as Hugging Face chats ending with the assistant's answer,
  `{"messages": [{"role": "user", "content": [{"type": "image", ...}, {"type": "text", ...}]},
  {"role": "assistant", "content": ANSWER}]}`: what `gpg-rl sft` trains on;
* heldout.jsonl: --heldout questions of the package's test split (its own images, never seen
  in training), in the train.jsonl format: what `gpg-rl eval --benchmark` and the recipes'
  [eval] read.

By default only the open questions are kept (what colour / what shape: 11 answers, 26% of the
questions): three quarters of easy-vqa are yes/no questions ("is there a red shape?") whose
answer is mostly "no", which a model answers at 83% without looking at the image; a tiny
model trained from scratch on the full mix settles on that text-only answer for a long time
and never learns to look within the demo's budget. --yes-no keeps them.

The question text gets an instruction suffix ("Answer with one word.") so the task is stated in
the prompt. Deterministic: the held-out subset is a seeded shuffle of the test questions.
Tested with python 3.11, easy-vqa 1.0.
"""

import argparse
import json
import random
import shutil
from pathlib import Path

import easy_vqa

SUFFIX = " Answer with one word."


def is_open(question):
    """The open questions ("what color is the shape?", "what is the red shape?", "what shape is
    in the image?"), answered by a colour or a shape; the others are yes/no questions."""
    return question.startswith("what")


def write_split(out, split, questions, answers, image_ids, paths, select):
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in select:
        image_id = image_ids[i]
        rel = f"images/{split}/{image_id}.png"
        if not (out / rel).exists():
            shutil.copyfile(paths[image_id], out / rel)
        rows.append({"id": f"{split}-{i}", "question": questions[i] + SUFFIX, "image": rel, "answer": answers[i]})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--heldout", type=int, default=500, help="test questions in heldout.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--yes-no", action="store_true",
                    help="keep the yes/no questions too (by default only the open ones: see below)")
    args = ap.parse_args()
    keep = (lambda q: True) if args.yes_no else is_open
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    tq, ta, ti = easy_vqa.get_train_questions()
    train_ids = [i for i in range(len(tq)) if keep(tq[i])]
    train = write_split(out, "train", tq, ta, ti, easy_vqa.get_train_image_paths(), train_ids)
    with open(out / "train.jsonl", "w") as f:
        for r in train:
            f.write(json.dumps(r) + "\n")
    with open(out / "sft.jsonl", "w") as f:
        for r in train:
            chat = [
                {"role": "user", "content": [{"type": "image", "image": r["image"]}, {"type": "text", "text": r["question"]}]},
                {"role": "assistant", "content": r["answer"]},
            ]
            f.write(json.dumps({"messages": chat}) + "\n")

    eq, ea, ei = easy_vqa.get_test_questions()
    order = [i for i in range(len(eq)) if keep(eq[i])]
    random.Random(args.seed).shuffle(order)
    heldout = write_split(out, "test", eq, ea, ei, easy_vqa.get_test_image_paths(), order[: args.heldout])
    with open(out / "heldout.jsonl", "w") as f:
        for r in heldout:
            f.write(json.dumps(r) + "\n")
    answers = sorted({r["answer"] for r in train})
    print(f"{out}: {len(train)} training questions on {len({r['image'] for r in train})} images, "
          f"{len(heldout)} held-out questions; {len(answers)} answers: {', '.join(answers)}")


if __name__ == "__main__":
    main()
