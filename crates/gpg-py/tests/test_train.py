"""gpg_rl.train with Python reward functions: the same run as the CLI with the same reward as an
external command, and the errors a reward function can cause. The demo model, a few steps."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import gpg_rl

REPO = Path(__file__).resolve().parents[3]
DEMO_MODEL = REPO / "demo" / "model"
CLI = Path(os.environ.get("GPG_RL_BIN", REPO / "target" / "release" / "gpg-rl"))

# The reward, once as a Python function and once as an external command (same arithmetic).
REWARD_SOURCE = """
def score(completion, answer):
    return (len(completion) % 7) / 7.0 + (1.0 if answer and answer in completion else 0.0)
"""
namespace = {}
exec(REWARD_SOURCE, namespace)
score = namespace["score"]


def length_mod7(prompts, completions, answer, **kwargs):
    assert len(prompts) == len(completions) == len(answer) == len(kwargs["completion_lengths"])
    return [score(c, a) for c, a in zip(completions, answer)]


EXTERNAL = REWARD_SOURCE + """
import json, sys
for line in sys.stdin:
    item = json.loads(line)
    print(score(item["completion"], item["answer"]))
"""


def recipe(output_dir, steps=3, save_every=1):
    return {
        "model": str(DEMO_MODEL),
        "output_dir": str(output_dir),
        "steps": steps,
        "seed": 0,
        "data": {
            "train": "synthetic",
            "max_prompt_tokens": 64,
            "fields": {"apply_chat_template": False},
            "synthetic": {"level": 2, "seed": 1234, "n_train": 200, "n_heldout": 10},
        },
        "rollout": {
            "prompts_per_step": 4,
            "num_generations": 4,
            "max_new_tokens": 24,
            "temperature": 1.0,
        },
        "algorithm": {"loss": {"name": "gpg"}},
        "optim": {"lr": 2e-4},
        "reward": {"functions": [{"name": "accuracy"}]},
        "logging": {"save_every": save_every, "keep_checkpoints": 5, "log_completions": 2},
    }


def without_times(metrics):
    return [{k: v for k, v in m.items() if not k.startswith("time_")} for m in metrics]


def read_metrics(run):
    with open(run / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_python_reward_equals_the_cli_with_an_external_reward(tmp_path):
    if not CLI.is_file():
        pytest.skip(f"{CLI} not built (cargo build --release, or set GPG_RL_BIN)")
    py_run = tmp_path / "py"
    out = gpg_rl.train(recipe(py_run), reward_funcs=[length_mod7], quiet=True)
    assert out["step"] == 3 and len(out["metrics"]) == 3
    assert (py_run / "final" / "model.safetensors").is_file()
    assert (py_run / "curves.png").is_file()
    assert all("rewards/length_mod7/mean" in m for m in out["metrics"])

    script = tmp_path / "score.py"
    script.write_text(EXTERNAL)
    cli_run = tmp_path / "cli"
    reward = (
        'reward.functions=[{name="external", options={command=['
        + json.dumps(sys.executable) + ", " + json.dumps(str(script))
        + '], name="length_mod7"}}]'
    )
    subprocess.run(
        [str(CLI), "train", "--quiet", "--config", str(py_run / "config.toml"),
         "--set", f"output_dir={json.dumps(str(cli_run))}", "--set", reward],
        check=True,
    )
    assert without_times(read_metrics(cli_run)) == without_times(out["metrics"])


def test_a_raising_reward_names_itself_and_the_step_and_keeps_checkpoints(tmp_path):
    calls = []

    def flaky(prompts, completions, **kwargs):
        calls.append(len(completions))
        if len(calls) == 2:
            raise ValueError("judge unavailable")
        return [0.0 if i % 2 else 1.0 for i in range(len(completions))]

    run = tmp_path / "run"
    cfg = recipe(run)
    cfg["algorithm"]["resample"] = {"min_valid_share": 0.0, "max_rounds": 1}
    with pytest.raises(gpg_rl.RewardFunctionError) as info:
        gpg_rl.train(cfg, reward_funcs=[flaky], quiet=True)
    message = str(info.value)
    assert "flaky" in message and "training step 2" in message and "judge unavailable" in message
    assert isinstance(info.value.__cause__, ValueError)
    assert (run / "checkpoint-1").is_dir() and not (run / "checkpoint-2").exists()
    # The run continues from the intact checkpoint.
    out = gpg_rl.train(cfg, reward_funcs=[flaky], resume=True, quiet=True)
    assert out["start_step"] == 1 and out["step"] == 3


@pytest.mark.parametrize(
    "bad, needle",
    [
        (lambda prompts, completions, **kw: [1.0] * (len(completions) - 1), "scores for a batch"),
        (lambda prompts, completions, **kw: [float("nan")] * len(completions), "NaN"),
        (lambda prompts, completions, **kw: ["x"] * len(completions), "str"),
    ],
)
def test_malformed_returns_are_refused(tmp_path, bad, needle):
    with pytest.raises(gpg_rl.RewardFunctionError) as info:
        gpg_rl.train(recipe(tmp_path / "run", steps=1), reward_funcs=[bad], quiet=True)
    assert needle in str(info.value) and "<lambda>" in str(info.value)


def test_dataset_columns_reach_python_rewards_as_keyword_lists(tmp_path):
    data = tmp_path / "train.jsonl"
    rows = []
    for i in range(12):
        row = {"question": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1), "level": i % 3}
        if i % 2 == 0:
            row["meta"] = {"source": f"s{i}", "tags": ["even"]}
        rows.append(row)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_prompt = {r["question"]: r for r in rows}
    seen = []

    def by_level(prompts, completions, answer, level, meta, **kwargs):
        assert "question" not in kwargs  # the prompt field is `prompts`
        assert len(level) == len(meta) == len(completions)
        for p, a, lv, m in zip(prompts, answer, level, meta):
            row = by_prompt[p]
            assert (a, lv, m) == (row["answer"], row["level"], row.get("meta"))
            seen.append(lv)
        return [float(lv) for lv in level]

    cfg = recipe(tmp_path / "run", steps=2)
    cfg["algorithm"]["resample"] = {"min_valid_share": 0.0, "max_rounds": 1}
    cfg["data"] = {"train": str(data), "max_prompt_tokens": 64,
                   "fields": {"apply_chat_template": False}}
    out = gpg_rl.train(cfg, reward_funcs=[by_level], quiet=True)
    assert out["step"] == 2 and len(seen) == 2 * 4 * 4
    assert all(isinstance(lv, int) for lv in seen)


def checkpoints(run):
    found = [p for p in run.iterdir() if p.name.startswith("checkpoint-")
             and not p.name.endswith(".tmp")]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def test_ctrl_c_stops_a_run_of_builtin_rewards_between_steps(tmp_path):
    run = tmp_path / "run"
    cfg = recipe(run, steps=10_000)
    cfg["logging"]["keep_checkpoints"] = 2

    def interrupt_after_a_checkpoint():
        deadline = time.monotonic() + 120
        while not (run / "checkpoint-2").is_dir() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Thread(target=interrupt_after_a_checkpoint)
    timer.start()
    with pytest.raises(KeyboardInterrupt) as info:
        gpg_rl.train(cfg, quiet=True)  # the recipe's built-in reward only: no Python call
    timer.join()
    assert "Ctrl-C" in str(info.value)
    # Stopped between steps or rounds: no half-written checkpoint, no final model, and the
    # metrics end at the newest checkpoint's step.
    assert not (run / "final").exists()
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())
    newest = checkpoints(run)[-1]
    step = int(newest.name.split("-")[1])
    assert 2 <= step < 10_000
    assert len(read_metrics(run)) == step
    # Python's own handler is back.
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    # The newest checkpoint is whole: the run resumes from it.
    out = gpg_rl.train(cfg, resume=True, steps=step + 1, quiet=True)
    assert out["start_step"] == step and out["step"] == step + 1


def test_ctrl_c_stops_the_run(tmp_path):
    def interrupting(prompts, completions, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return [0.0] * len(completions)

    with pytest.raises(KeyboardInterrupt):
        gpg_rl.train(recipe(tmp_path / "run"), reward_funcs=[interrupting], quiet=True)


def test_builtin_names_weights_and_overrides(tmp_path):
    out = gpg_rl.train(
        recipe(tmp_path / "run", steps=1),
        reward_funcs=["accuracy", length_mod7],
        reward_weights=[1.0, 0.5],
        overrides={"rollout.max_new_tokens": 16},
        quiet=True,
    )
    assert {k for k in out["metrics"][0] if k.endswith("/mean") and k.startswith("rewards/")} == {
        "rewards/accuracy/mean",
        "rewards/length_mod7/mean",
    }
    text = (tmp_path / "run" / "config.toml").read_text()
    assert "in_process" in text and "max_new_tokens = 16" in text
    with pytest.raises(ValueError):
        gpg_rl.train(recipe(tmp_path / "x"), reward_funcs=[length_mod7], reward_weights=[1, 2])
    with pytest.raises(gpg_rl.GpgError) as info:
        gpg_rl.train(recipe(tmp_path / "y"), reward_funcs=["acuracy"], quiet=True)
    assert "acuracy" in str(info.value)
