#!/usr/bin/env python3
"""TRL GRPOTrainer, configured as GPG, as the peer of `gpg-rl train` (whole RL optimizer steps).

    python bench/compare/trl_grpo_step.py --model DIR --data PROMPTS.jsonl [--threads 2]
        [--steps 10] [--warmup 1] [--seed 0] [--bf16 [--bf16-mode autocast|pure]]

One optimizer step = sample 8 completions for each of 4 prompts (32 completions, at most 64 new
tokens, temperature 1.0, no top-k / top-p), score them with the `length` reward, group-mean
advantages, one forward + backward of the policy on the 32 prompt+completion rows, gradient
clipping and an AdamW update. PROMPTS.jsonl holds one JSON object per line with a "prompt"
string (other fields are kept and ignored); prompts are plain text, no chat template.

Reward (TRL's quick-start reward, the same as gpg-rl's built-in `length` reward):
r = -abs(len(completion_text) - 20), completion_text = the completion decoded with special
tokens skipped (TRL's batch_decode(..., skip_special_tokens=True)), len = Unicode characters.

GPG mode, as GRPOConfig fields (TRL 1.16.0, read from trl/trainer/grpo_config.py and
grpo_trainer.py):

    beta=0.0                      no KL term, no reference model loaded
    num_iterations=1              one update per generation batch: the importance ratio is
                                  exp(logp - logp.detach()) = 1, so the clipped surrogate has the
                                  gradient of -Â·∇log π; epsilon clipping never triggers
    scale_rewards="none"          Â = r - mean(r of the group), no std division
    loss_type="dapo"              Σ over all completion tokens of the batch / number of those
                                  tokens (EOS included, padding excluded)
    num_generations=8, per_device_train_batch_size=32, gradient_accumulation_steps=1
                                  (TRL counts the batch in completions, not prompts: 32 = 4 prompts
                                  × 8; generation_batch_size then defaults to 32 and
                                  steps_per_generation to 1, so each optimizer step generates once
                                  and no separate "old logprobs" forward is run)
    max_completion_length=64, temperature=1.0, top_p=1.0, top_k=0 (0 = disabled in TRL 1.16),
    min_p=None, repetition_penalty=1.0, use_vllm=False (model.generate with KV cache)
    learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch"
    (betas 0.9/0.999, eps 1e-8, weight_decay 0.0), max_grad_norm=1.0
    use_cpu=True, bf16=False (unless --bf16), fp16=False (TRL's config defaults bf16 to True when fp16 is
    unset), gradient_checkpointing=False (TRL's config defaults it to True; --grad-ckpt turns it
    on), report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1,
    dataloader_num_workers=0, disable_tqdm=True, seed=--seed, max_steps=--warmup + --steps

What differs from a plain description of "GPG in TRL" (TRL 1.16.0 / transformers 5.23.0):
- There is no max_prompt_length in GRPOConfig 1.16: prompts are never truncated. They are
  tokenized without padding (this tokenizer adds no special tokens) and then left-padded by
  TRL with the pad token (<|endoftext|>) for generate and for the training forward.
- Sampling settings do not come from generation_config.json: TRL builds its own
  GenerationConfig (max_new_tokens, do_sample=True, temperature, top_p, top_k, min_p,
  repetition_penalty, pad / bos / eos ids) and passes it to generate. Its EOS ids are the
  tokenizer's eos plus the model generation_config's eos_token_id; transformers' generate then
  fills only the fields TRL left None (here: none that matter, the bench model's
  generation_config.json holds only the bos / eos / pad ids, all <|endoftext|>). Generation
  stops at EOS; the EOS token is part of the completion and of the loss. top_k=0 means no
  top-k filter in transformers 5.23 too.
- The training forward uses TRL's "fused LM head" (add_fused_lm_head): log-probs computed in
  vocabulary chunks without materialising full logits. On CPU (no Triton) it scores every
  position of the prompt+completion rows and masks the prompt ones afterwards, rather than only
  the completion positions; entropies are computed too (for the `entropy` metric).
- The loss value TRL logs is the surrogate's value Σ(-Â·ratio)/N_tokens with ratio ≡ 1, i.e.
  Σ(-Â)/N_tokens: exactly 0 whenever all 32 completions have the same length, and not
  Σ -Â·log π. Its gradient is the GPG one; check grad_norm for the update.

Timing: a TrainerCallback takes wall (perf_counter) and CPU (process_time, all threads) time
from on_step_begin to on_step_end; in transformers 5.23's Trainer this window holds
training_step -> GRPOTrainer._prepare_inputs -> _generate_and_score_completions (tokenise,
generate, decode, reward, advantages) -> compute_loss -> backward, then gradient clipping,
optimizer.step and zero_grad. Outside it: fetching the 32 raw dataset rows, and logging.
Generation time is the wall time inside model.generate (wrapped on the model instance; TRL
calls unwrapped_model.generate, the same object on a single CPU process). The first --warmup
steps are discarded; medians of the rest are reported.

bf16 (--bf16): GRPOConfig(bf16=True) with use_cpu=True, which transformers 5.23 accepts on CPU
(its bf16 check only refuses bf16 without a bf16 GPU when use_cpu is off). Accelerate then
runs the model's forward under torch.autocast("cpu", dtype=torch.bfloat16) (mixed precision:
f32 master weights, gradients and AdamW state; matrix products in bf16) — generate included,
since accelerate wraps model.forward. `--bf16-mode pure` also loads the model in bfloat16, so
weights, gradients and AdamW state are bf16 too. A forward hook on layer 0's down_proj records
the dtype its output actually has in the sampling and in the training forward
("observed_matmul_dtypes" in the JSON line), which shows whether bf16 was really used.

Prints one short line per step on stderr and one JSON line at the end on stdout:
{"step_s", "step_times_s", "generate_s", "step_cpu_s", "completion_tokens_per_step",
"reward_mean", "reward_std_within_group", "grad_norm", "max_abs_weight_change", "peak_rss_mb",
"rss_after_load_mb", ...}. "max_abs_weight_change" is the largest change of one weight matrix
(layer 0 down_proj) over the whole run, a check that AdamW really updated the model.
"completion_tokens_per_step" is TRL's logged completions/mean_length × 32 (EOS included);
"reward_std_within_group" is the mean over the 4 groups of the sample std (n-1) of the 8
rewards, per step (nonzero when the groups are not degenerate).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
import transformers

from peak_rss import rss_mb  # bench/compare/peak_rss.py


def length_reward(completions: list[str], **_kwargs) -> list[float]:
    """TRL's quick-start reward and gpg-rl's `length` reward: -|chars - 20|."""
    return [-float(abs(len(c) - 20)) for c in completions]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF model directory (make_bench_model.py)")
    ap.add_argument("--data", required=True, help="JSONL file with a 'prompt' field per line")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="optimizer steps run and discarded")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8, help="num_generations")
    ap.add_argument("--max-completion-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa or eager")
    ap.add_argument(
        "--grad-ckpt", action="store_true", help="gradient checkpointing (TRL's default; off here)"
    )
    ap.add_argument("--bf16", action="store_true", help="GRPOConfig bf16=True (CPU autocast)")
    ap.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="train a LoRA adapter (GRPOTrainer(peft_config=LoraConfig(r=R, lora_alpha=--lora-alpha, "
        "all seven projections, lora_dropout 0, task_type CAUSAL_LM))) instead of the whole model",
    )
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument(
        "--bf16-mode",
        default="autocast",
        choices=["autocast", "pure"],
        help="with --bf16: f32 weights under autocast, or the model loaded in bf16 as well",
    )
    args = ap.parse_args()
    bf16_mode = args.bf16_mode if args.bf16 else None
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")

    omp_wait_policy = os.environ.get("OMP_WAIT_POLICY")
    if omp_wait_policy is None:
        print(
            "warning: OMP_WAIT_POLICY is not set; on a loaded machine spinning OpenMP threads can "
            "make 2 threads much slower than 1 (set OMP_WAIT_POLICY=PASSIVE, see README.md)",
            file=sys.stderr,
        )
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    # Imported after the thread settings; quiet the libraries' info logs and progress bars.
    import datasets
    import trl
    from transformers import AutoTokenizer, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    rows = []
    with open(args.data, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if not isinstance(row.get("prompt"), str):
                    ap.error(f"{args.data}: every line needs a string 'prompt' field")
                rows.append(row)
    max_steps = args.warmup + args.steps
    if len(rows) < args.prompts_per_step:
        ap.error(f"{args.data}: needs at least {args.prompts_per_step} prompts")
    train_dataset = datasets.Dataset.from_list(rows)

    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM.from_pretrained(
        args.model,
        dtype=torch.bfloat16 if bf16_mode == "pure" else torch.float32,
        attn_implementation=args.attn,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    rss_after_load = rss_mb()
    # One weight matrix (1 MB) kept to show that the optimizer really moved the weights.
    probe = model.model.layers[0].mlp.down_proj.weight
    probe_before = probe.detach().clone()

    batch = args.prompts_per_step * args.group_size
    config_fields = dict(
        beta=0.0,
        num_iterations=1,
        scale_rewards="none",
        loss_type="dapo",
        num_generations=args.group_size,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_completion_length=args.max_completion_len,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        use_vllm=False,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=max_steps,
        use_cpu=True,
        bf16=args.bf16,
        fp16=False,
        gradient_checkpointing=args.grad_ckpt,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
    )

    step_wall: list[float] = []
    step_cpu: list[float] = []
    step_gen: list[float] = []
    step_logs: list[dict] = []
    step_group_std: list[float] = []
    step_threads: list[int] = []
    gen_acc = [0.0, 0]  # seconds inside model.generate and number of calls, this step

    original_generate = model.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        try:
            return original_generate(*a, **kw)
        finally:
            gen_acc[0] += time.perf_counter() - t0
            gen_acc[1] += 1

    model.generate = timed_generate

    # The dtype layer 0's down_proj really computes in, per phase (sampling / training forward).
    phase = ["train"]
    observed_dtypes: dict[str, set[str]] = {"generate": set(), "train": set()}

    def record_dtype(_module, _inputs, output):
        observed_dtypes[phase[0]].add(str(output.dtype).replace("torch.", ""))

    model.model.layers[0].mlp.down_proj.register_forward_hook(record_dtype)

    def phased_generate(*a, **kw):
        phase[0] = "generate"
        try:
            return timed_generate(*a, **kw)
        finally:
            phase[0] = "train"

    model.generate = phased_generate

    def reward_fn(prompts, completions, **kwargs):
        rewards = length_reward(completions)
        g = args.group_size
        stds = []
        for i in range(0, len(rewards), g):
            if len(set(prompts[i : i + g])) != 1:
                raise RuntimeError("completions of one group do not share a prompt")
            stds.append(statistics.stdev(rewards[i : i + g]))
        step_group_std.append(statistics.fmean(stds))
        return rewards

    reward_fn.__name__ = "length"

    class StepTimer(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kw):
            torch.set_num_threads(args.threads)  # in case anything reset it

        def on_step_begin(self, targs, state, control, **kw):
            gen_acc[0], gen_acc[1] = 0.0, 0
            self.c0, self.t0 = time.process_time(), time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            step_wall.append(time.perf_counter() - self.t0)
            step_cpu.append(time.process_time() - self.c0)
            step_gen.append(gen_acc[0])
            step_threads.append(torch.get_num_threads())
            if gen_acc[1] != 1:
                raise RuntimeError(f"expected one generate call per step, got {gen_acc[1]}")

        def on_log(self, targs, state, control, logs=None, **kw):
            if not logs or "grad_norm" not in logs:
                return  # the final train summary
            step_logs.append(dict(logs))
            n = len(step_logs)
            tag = "warmup" if n <= args.warmup else "step"
            print(
                f"{tag} {n}/{max_steps}: {step_wall[n - 1]:.3f} s wall "
                f"(generate {step_gen[n - 1]:.3f} s, cpu {step_cpu[n - 1]:.3f} s), "
                f"completion tokens {logs.get('completions/mean_length', 0.0) * batch:.0f}, "
                f"reward {logs.get('reward', float('nan')):.2f} "
                f"(group std {step_group_std[n - 1]:.2f}), loss {logs.get('loss', 0.0):.4g}, "
                f"grad_norm {logs.get('grad_norm', 0.0):.4g}",
                file=sys.stderr,
                flush=True,
            )

    peft_config = None
    if args.lora_rank > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.0,
            target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
            ],
            task_type="CAUSAL_LM",
        )
    with tempfile.TemporaryDirectory(prefix="trl-grpo-bench-") as out_dir:
        config = GRPOConfig(output_dir=out_dir, **config_fields)
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward_fn,
            args=config,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=[StepTimer()],
            peft_config=peft_config,
        )
        if peft_config is not None:
            # The base is frozen: the change to check is the adapter's (lora_B starts at 0).
            probe = trainer.model.base_model.model.model.layers[0].mlp.down_proj.lora_B["default"].weight
            probe_before = probe.detach().clone()
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        trainer.train()

    if len(step_wall) != max_steps or len(step_logs) != max_steps:
        raise RuntimeError(
            f"ran {len(step_wall)} steps / {len(step_logs)} logs, wanted {max_steps}"
        )
    w = args.warmup
    timed = slice(w, None)
    logs = step_logs[timed]
    grad_norms = [lg["grad_norm"] for lg in step_logs]
    if not all(g > 0 for g in grad_norms):
        raise RuntimeError(f"zero gradient norm in some step: {grad_norms}")
    completion_tokens = [lg["completions/mean_length"] * batch for lg in logs]
    weight_change = float((probe.detach() - probe_before).abs().max())
    if not weight_change > 0:
        raise RuntimeError("the weights did not change")

    def rnd(xs, k=4):
        return [round(x, k) for x in xs]

    result = {
        "step_s": round(statistics.median(step_wall[timed]), 4),
        "step_times_s": rnd(step_wall[timed]),
        "generate_s": round(statistics.median(step_gen[timed]), 4),
        "generate_times_s": rnd(step_gen[timed]),
        "step_cpu_s": round(statistics.median(step_cpu[timed]), 4),
        "completion_tokens_per_step": round(statistics.median(completion_tokens), 1),
        "completion_tokens": rnd(completion_tokens, 1),
        "reward_mean": rnd([lg["reward"] for lg in logs], 3),
        "reward_std_within_group": rnd(step_group_std[timed], 3),
        "reward_std_batch": rnd([lg["reward_std"] for lg in logs], 3),
        "frac_reward_zero_std": rnd([lg["frac_reward_zero_std"] for lg in logs], 3),
        "loss": [lg["loss"] for lg in logs],
        "grad_norm": rnd([lg["grad_norm"] for lg in logs], 6),
        "max_abs_weight_change": weight_change,
        "trl_step_time_s": rnd([lg["step_time"] for lg in logs]),
        "peak_rss_mb": round(rss_mb(), 1),
        "rss_after_load_mb": round(rss_after_load, 1),
        "dtype": "bf16" if args.bf16 else "float32",
        "bf16_mode": bf16_mode,
        "weight_dtype": str(probe.dtype).replace("torch.", ""),
        "observed_matmul_dtypes": {k: sorted(v) for k, v in observed_dtypes.items()},
        "warmup_step_s": rnd(step_wall[:w]),
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "torch_threads_in_steps": sorted(set(step_threads)),
        "omp_wait_policy": omp_wait_policy,
        "prompts": len(rows),
        "parameters": sum(p.numel() for p in model.parameters()),
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha if args.lora_rank > 0 else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "config": {
            **{k: v for k, v in config_fields.items() if k not in ("max_steps",)},
            "prompts_per_step": args.prompts_per_step,
            "completions_per_step": batch,
            "generation_batch_size": config.generation_batch_size,
            "steps_per_generation": config.steps_per_generation,
            "attn": args.attn,
            "dtype": "bf16" if args.bf16 else "float32",
            "bf16_mode": bf16_mode,
            "reward": "length: -abs(len(completion_text) - 20)",
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
