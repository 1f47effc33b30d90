"""gpg_rl.generate / logprobs / eval on the demo model: the CLI's results."""

import json
import subprocess
from pathlib import Path

import pytest

import gpg_rl
from test_train import CLI, DEMO_MODEL, REPO


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


def test_chat_template_kwargs_reach_generate_and_eval(tmp_path):
    """Qwen3's template closes an empty think block when `enable_thinking` is false."""
    qwen3 = REPO / "tests" / "fixtures" / "qwen3" / "tiny"
    plain = gpg_rl.generate(qwen3, "What is 6 * 7?", chat=True, max_new_tokens=2,
                            temperature=0.0)[0]["prompt_ids"]
    closed = gpg_rl.generate(qwen3, "What is 6 * 7?", chat=True, max_new_tokens=2,
                             temperature=0.0,
                             chat_template_kwargs={"enable_thinking": False})[0]["prompt_ids"]
    assert len(closed) > len(plain) and closed[:len(plain)] == plain
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"problem": "What is 2+3?", "answer": "5"}) + "\n")
    gpg_rl.eval(qwen3, str(bench), max_new_tokens=2, output=tmp_path / "r.jsonl", quiet=True,
                chat_template_kwargs={"enable_thinking": False})
    prompt = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])["prompt"]
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with pytest.raises(ValueError, match="chat_template_kwargs: .*not an array"):
        gpg_rl.generate(qwen3, "x", chat=True, chat_template_kwargs="[1]")
    with pytest.raises(ValueError, match="chat_template_kwargs: not valid JSON"):
        gpg_rl.eval(qwen3, str(bench), chat_template_kwargs="{bad")
    with pytest.raises(TypeError, match="chat_template_kwargs must be a dict"):
        gpg_rl.generate(qwen3, "x", chat=True, chat_template_kwargs=[("enable_thinking", False)])
    with pytest.raises(ValueError, match="needs chat=True"):
        gpg_rl.generate(qwen3, "x", chat_template_kwargs={"enable_thinking": False})
