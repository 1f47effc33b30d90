"""gpg_rl.generate / logprobs / eval on the demo model: the CLI's results."""

import json
import subprocess
from pathlib import Path

import pytest

import gpg_rl
from test_train import CLI, DEMO_MODEL


def test_generate_equals_the_cli():
    out = gpg_rl.generate(DEMO_MODEL, ["Compute 2+3.", "Compute 4*5."], n=2,
                          max_new_tokens=12, temperature=1.0, seed=7)
    assert [(o["prompt_index"], o["sample_index"]) for o in out] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    if not CLI.is_file():
        pytest.skip(f"{CLI} not built")
    cli = subprocess.run(
        [str(CLI), "generate", "--model", str(DEMO_MODEL), "--prompt", "Compute 2+3.",
         "--prompt", "Compute 4*5.", "-n", "2", "--max-new-tokens", "12", "--temperature",
         "1.0", "--seed", "7", "--format", "json"],
        check=True, capture_output=True, text=True,
    ).stdout
    assert [json.loads(line) for line in cli.splitlines()] == out


def test_logprobs_match_generate_and_the_cli(tmp_path):
    gen = gpg_rl.generate(DEMO_MODEL, "Compute 2+3.", max_new_tokens=8, temperature=0.0)[0]
    records = [{"prompt": "Compute 2+3.", "completion": gen["text"], "id": 1}]
    scored = gpg_rl.logprobs(DEMO_MODEL, records)
    assert scored[0]["id"] == 1 and len(scored[0]["logprobs"]) == len(scored[0]["completion_ids"])
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(records[0]) + "\n")
    assert gpg_rl.logprobs(DEMO_MODEL, path) == scored
    with pytest.raises(gpg_rl.GpgError, match="records\\[0\\]: field `completion` is missing"):
        gpg_rl.logprobs(DEMO_MODEL, [{"prompt": "x"}])


def test_eval_summary(tmp_path):
    bench = tmp_path / "tiny.jsonl"
    bench.write_text("".join(json.dumps({"problem": f"Compute {a}+{a}.", "answer": str(2 * a)}) + "\n"
                             for a in range(1, 4)))
    summary = gpg_rl.eval(DEMO_MODEL, str(bench), max_new_tokens=16, output=tmp_path / "r.jsonl",
                          chat=False, system=False, quiet=True)
    assert summary["n_items"] == 3 and 0.0 <= summary["pass_at_1"] <= 1.0
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 3
