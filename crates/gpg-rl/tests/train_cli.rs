//! `gpg-rl train` end to end on a tiny model: logs, checkpoints, the final model, and exact
//! resumption after SIGKILL.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{assert_ok, bin, failed_stderr};

/// Runs `gpg-rl train --config recipe extra…` to completion.
fn train(recipe: &Path, extra: &[&str]) -> std::process::Output {
    bin()
        .arg("train")
        .arg("--config")
        .arg(recipe)
        .args(extra)
        .output()
        .unwrap()
}

fn init_model(dir: &Path) {
    let status = bin()
        .args([
            "init",
            "--hidden",
            "32",
            "--layers",
            "2",
            "--heads",
            "4",
            "--kv-heads",
            "2",
        ])
        .args([
            "--intermediate",
            "64",
            "--vocab",
            "320",
            "--max-positions",
            "256",
            "--corpus",
            "synthetic",
        ])
        .arg("--out")
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success());
}

fn recipe(model: &Path, out: &Path, steps: u64) -> String {
    format!(
        r#"
model = {model:?}
output_dir = {out:?}
steps = {steps}
seed = 3
[data]
train = "synthetic"
[data.fields]
apply_chat_template = false
[data.synthetic]
level = 1
n_train = 200
n_heldout = 8
[rollout]
prompts_per_step = 4
num_generations = 4
max_new_tokens = 12
[algorithm]
loss = {{ name = "gpg" }}
[optim]
lr = 1e-3
[[reward.functions]]
name = "accuracy"
[[reward.functions]]
name = "boxed_format"
weight = 0.5
[[reward.functions]]
name = "length"
weight = 0.01
[eval]
every = 2
data = "synthetic"
[logging]
save_every = 1
keep_checkpoints = 10
progress = false
"#
    )
}

fn metrics_without_times(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let obj = v.as_object_mut().unwrap();
            obj.retain(|k, _| !k.starts_with("time_"));
            v
        })
        .collect()
}

#[test]
fn train_writes_logs_checkpoints_and_resumes_exactly_after_sigkill() {
    resumes_exactly_after_sigkill("", "", "model.safetensors", &[]);
}

/// Difficulty-weighted prompt sampling (an epoch of 2 steps, so 6 epochs): the records and the
/// drawn order ride in the checkpoint and the resumed run draws the same prompts.
#[test]
fn weighted_sampling_resumes_exactly_after_sigkill() {
    resumes_exactly_after_sigkill(
        "",
        "",
        "model.safetensors",
        &[
            ("n_train = 200", "n_train = 8"),
            ("[data]\n", "[data]\nsample_strategy = \"medium\"\n"),
        ],
    );
}

/// LoRA (with adapter dropout): checkpoints and final/ hold the adapter in PEFT format, not
/// the base model, and a resumed run ends with the same adapter bit for bit.
#[test]
fn lora_train_writes_peft_adapters_and_resumes_exactly_after_sigkill() {
    resumes_exactly_after_sigkill(
        "",
        "[lora]\nrank = 4\nalpha = 8\ndropout = 0.1\n",
        "adapter_model.safetensors",
        &[],
    );
}

/// In bf16 the checkpoint's model file is bf16 (the model's own dtype) and its f32 master
/// weights ride in the trainer buffers: the resumed run still matches bit for bit (with the
/// first layer recomputed, the second keeping its activations).
#[test]
fn bf16_train_resumes_exactly_after_sigkill() {
    resumes_exactly_after_sigkill(
        "precision = \"bf16\"\ngradient_checkpointing = true\ngradient_checkpointing_layers = 1\n",
        "",
        "model.safetensors",
        &[],
    );
}

/// `top_level` keys go before the recipe, `tables` after it, `edits` replace text in it;
/// `weights` is the file of checkpoints and final/ that training rewrites.
fn resumes_exactly_after_sigkill(
    top_level: &str,
    tables: &str,
    weights: &str,
    edits: &[(&str, &str)],
) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    init_model(&model);
    let recipe = |model: &Path, out: &Path, steps: u64| {
        let mut text = recipe(model, out, steps);
        for (from, to) in edits {
            assert!(text.contains(from), "recipe lacks {from:?}");
            text = text.replacen(from, to, 1);
        }
        format!("{top_level}{text}{tables}")
    };

    // An uninterrupted run of 12 steps.
    let full = tmp.path().join("full");
    let full_recipe = tmp.path().join("full.toml");
    std::fs::write(&full_recipe, recipe(&model, &full, 12)).unwrap();
    let out = train(&full_recipe, &[]);
    assert_ok(&out);
    let metrics = metrics_without_times(&full.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 12);
    for key in [
        "reward",
        "reward_std",
        "inverse_alpha",
        "identical_groups",
        "easy_groups",
        "hard_groups",
        "resample_rounds",
        "learning_rate",
        "loss",
        "grad_norm",
        "tokens_seen",
        "num_tokens",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "rewards/accuracy/mean",
        "rewards/accuracy/std",
    ] {
        assert!(metrics[0].get(key).is_some(), "metrics lack {key}");
    }
    // Resuming is only tested for real if the weights moved.
    let applied = metrics.iter().filter(|m| m["skipped"].is_null()).count();
    assert!(applied >= 3, "only {applied} of 12 steps updated the model");
    assert!(metrics[1]["eval_pass_at_1"].is_number());
    assert!(full.join("config.toml").is_file());
    assert!(full.join("final").join(weights).is_file());
    if weights == "adapter_model.safetensors" {
        // Only the adapter is written, never a copy of the frozen base.
        assert!(!full.join("final/model.safetensors").exists());
        assert!(!full.join("checkpoint-12/model.safetensors").exists());
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(full.join("final/adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["peft_type"], "LORA");
        assert_eq!(config["task_type"], "CAUSAL_LM");
        assert_eq!(config["r"], 4);
        assert_eq!(config["bias"], "none");
        assert_eq!(config["target_modules"].as_array().unwrap().len(), 7);
        assert!(config["base_model_name_or_path"]
            .as_str()
            .unwrap()
            .ends_with("model"));
        let tensors = gpg::candle_core::safetensors::load(
            full.join("final/adapter_model.safetensors"),
            &gpg::candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(tensors.len(), 2 * 7 * 2);
        let b = &tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
        let moved: f32 = b.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(moved > 0.0, "lora_B never left zero");
    }
    assert!(std::fs::read_dir(full.join("tensorboard")).unwrap().count() == 1);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(full.join("checkpoint-3/trainer_state.json")).unwrap(),
    )
    .unwrap();
    let weighting = &state["sampler"]["weighting"];
    if edits.is_empty() {
        assert!(weighting.is_null(), "{state}");
    } else {
        // Mid-epoch 1: the records of epoch 0 (and this epoch's first step) are kept.
        assert_eq!(weighting["strategy"], "medium", "{state}");
        assert!(
            !weighting["recorded"].as_object().unwrap().is_empty(),
            "{state}"
        );
    }

    // The same run killed with SIGKILL once checkpoint-2 exists, then resumed.
    let cut = tmp.path().join("cut");
    let cut_recipe = tmp.path().join("cut.toml");
    std::fs::write(&cut_recipe, recipe(&model, &cut, 12)).unwrap();
    let mut child = bin()
        .arg("train")
        .arg("--config")
        .arg(&cut_recipe)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !cut.join("checkpoint-2").is_dir() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint-2 appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // It really was cut halfway: the run had not finished.
    assert!(
        !cut.join("final").exists(),
        "the run finished before it could be killed"
    );
    assert!(!cut.join("checkpoint-12").exists());
    // No half-written checkpoint is ever visible under its final name.
    for entry in std::fs::read_dir(&cut).unwrap() {
        let p: PathBuf = entry.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("checkpoint-")
            && !p.to_str().unwrap().ends_with(".tmp")
        {
            assert!(p.join("trainer_state.json").is_file() && p.join(weights).is_file());
        }
    }
    let out = train(&cut_recipe, &["--resume"]);
    assert_ok(&out);
    assert_eq!(metrics_without_times(&cut.join("metrics.jsonl")), metrics);
    let a = std::fs::read(full.join("final").join(weights)).unwrap();
    let b = std::fs::read(cut.join("final").join(weights)).unwrap();
    assert!(a == b, "resumed run ended with different weights");

    // Starting over in a used folder without --resume is refused.
    let out = train(&full_recipe, &[]);
    assert!(failed_stderr(&out).contains("--resume"));
}

#[test]
fn bad_recipes_fail_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("r.toml");
    std::fs::write(&recipe, "model = \"x\"\nsteps = 1\nbogus = 3\n").unwrap();
    let out = train(&recipe, &[]);
    let err = failed_stderr(&out);
    assert!(err.contains("r.toml"), "{err}");

    let model = tmp.path().join("model");
    init_model(&model);
    let text = recipe_text_with_data(
        &model,
        &tmp.path().join("out"),
        &tmp.path().join("data.jsonl"),
    );
    std::fs::write(
        tmp.path().join("data.jsonl"),
        "{\"problem\": \"1+1\", \"answer\": \"2\"}\n{not json\n",
    )
    .unwrap();
    std::fs::write(&recipe, &text).unwrap();
    let out = train(&recipe, &[]);
    let err = failed_stderr(&out);
    assert!(err.contains("data.jsonl") && err.contains('2'), "{err}");

    // Recomputing more layers than the model has, or without gradient checkpointing.
    std::fs::write(
        tmp.path().join("data.jsonl"),
        "{\"problem\": \"1+1\", \"answer\": \"2\"}\n",
    )
    .unwrap();
    for (extra, want) in [
        (
            "gradient_checkpointing = true\ngradient_checkpointing_layers = 3\n",
            "gradient_checkpointing_layers = 3, but",
        ),
        (
            "gradient_checkpointing_layers = 1\n",
            "set gradient_checkpointing = true",
        ),
    ] {
        std::fs::write(&recipe, format!("{extra}{text}")).unwrap();
        let err = failed_stderr(&train(&recipe, &[]));
        assert!(err.contains(want), "{err}");
    }
}

fn recipe_text_with_data(model: &Path, out: &Path, data: &Path) -> String {
    recipe(model, out, 1).replace(
        "train = \"synthetic\"",
        &format!("train = {:?}", data.display().to_string()),
    )
}

#[test]
fn grpo_with_kl_and_dr_grpo_run_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    init_model(&model);
    for (name, extra) in [
        (
            "grpo",
            vec!["algorithm.loss.beta=0.04", "algorithm.num_iterations=2"],
        ),
        ("dr-grpo", vec!["algorithm.loss.max_completion_length=12"]),
    ] {
        let out_dir = tmp.path().join(name);
        let recipe_path = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&recipe_path, recipe(&model, &out_dir, 2)).unwrap();
        let mut cmd = bin();
        cmd.arg("train").arg("--config").arg(&recipe_path);
        cmd.args(["--set", &format!("algorithm.loss.name={name}")]);
        for e in &extra {
            cmd.args(["--set", e]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let metrics = metrics_without_times(&out_dir.join("metrics.jsonl"));
        assert_eq!(metrics.len(), 2);
        assert!(
            metrics[1]["clip_ratio/region_mean"].is_number(),
            "{name}: {}",
            metrics[1]
        );
        if name == "grpo" {
            assert!(metrics[1]["kl"].is_number(), "{}", metrics[1]);
        }
    }
}

/// GRPO with a KL penalty and LoRA: the reference is the base with the adapter disabled. At
/// the first step the adapter is still zero (B = 0), so the policy equals the reference and the
/// KL is exactly 0; later it is not.
#[test]
fn lora_grpo_kl_reference_is_the_base_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    init_model(&model);
    let out_dir = tmp.path().join("run");
    let text = recipe(&model, &out_dir, 4)
        .replace(
            "loss = { name = \"gpg\" }",
            "loss = { name = \"grpo\", beta = 0.5 }",
        )
        .replace("lr = 1e-3", "lr = 2e-2");
    let path = tmp.path().join("r.toml");
    std::fs::write(&path, text).unwrap();
    let out = train(&path, &["--set", "lora.rank=2", "--set", "lora.alpha=4"]);
    assert_ok(&out);
    let metrics = metrics_without_times(&out_dir.join("metrics.jsonl"));
    let kl: Vec<f64> = metrics
        .iter()
        .filter(|m| m["skipped"].is_null())
        .map(|m| m["kl"].as_f64().unwrap())
        .collect();
    assert!(kl.len() >= 2, "too few applied steps: {metrics:?}");
    assert_eq!(kl[0], 0.0);
    assert!(kl[1..].iter().any(|&k| k > 0.0), "{kl:?}");
    let config = std::fs::read_to_string(out_dir.join("config.toml")).unwrap();
    assert!(
        config.contains("[lora]") && config.contains("rank = 2"),
        "{config}"
    );
}

/// `gpg-rl sft` with `[lora]` writes a PEFT adapter (not the model) that `--adapter` runs.
#[test]
fn sft_with_lora_writes_a_peft_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    init_model(&model);
    let out_dir = tmp.path().join("sft");
    let recipe = format!(
        r#"
model = {model:?}
output_dir = {out_dir:?}
steps = 3
batch_size = 4
seed = 0
lr = 1e-2
data = "synthetic"
eval_max_new_tokens = 8
[synthetic]
level = 1
n_train = 40
n_heldout = 4
[lora]
rank = 2
alpha = 4
target_modules = ["q_proj", "v_proj"]
"#
    );
    let path = tmp.path().join("sft.toml");
    std::fs::write(&path, recipe).unwrap();
    let out = bin()
        .arg("sft")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(out_dir.join("adapter_config.json").is_file());
    assert!(!out_dir.join("model.safetensors").exists());
    let tensors = gpg::candle_core::safetensors::load(
        out_dir.join("adapter_model.safetensors"),
        &gpg::candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(tensors.len(), 2 * 2 * 2, "q and v of 2 layers, A and B");
    let out = bin()
        .arg("generate")
        .arg("--model")
        .arg(&model)
        .arg("--adapter")
        .arg(&out_dir)
        .args(["--prompt", "Compute 1+2.", "--max-new-tokens", "4"])
        .output()
        .unwrap();
    assert_ok(&out);
}

/// `train` and `sft` on a CUDA device, on a machine without a GPU (CI) or a build without the
/// `cuda` feature: a clear error and exit status 1, never a panic. Without the feature the error
/// says how to rebuild; with it, it names the library looked for (libcuda), and what the GPU
/// path does not support (LoRA) is refused before the device is even opened.
#[test]
fn cuda_device_in_train_and_sft_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    init_model(&model);
    let path = tmp.path().join("r.toml");
    std::fs::write(&path, recipe(&model, &tmp.path().join("out"), 1)).unwrap();
    let check = |out: std::process::Output, on_gpu_build: &str| {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        #[cfg(not(feature = "cuda"))]
        {
            let _ = on_gpu_build;
            assert!(err.contains("--features cuda"), "{err}");
        }
        #[cfg(feature = "cuda")]
        assert!(err.contains(on_gpu_build), "{err}");
    };
    check(train(&path, &["--set", "device=\"cuda\""]), "libcuda");
    check(
        train(
            &path,
            &[
                "--set",
                "device=\"cuda:1\"",
                "--set",
                "lora.rank=2",
                "--set",
                "lora.alpha=4",
            ],
        ),
        "LoRA",
    );
    let sft = tmp.path().join("sft.toml");
    let out_dir = tmp.path().join("sft");
    std::fs::write(
        &sft,
        format!(
            "model = {model:?}\noutput_dir = {out_dir:?}\nsteps = 1\nbatch_size = 2\nseed = 0\n\
             lr = 1e-3\ndata = \"synthetic\"\ndevice = \"cuda\"\n"
        ),
    )
    .unwrap();
    check(
        bin().arg("sft").arg("--config").arg(&sft).output().unwrap(),
        "libcuda",
    );
    check(
        bin()
            .arg("sft")
            .arg("--config")
            .arg(&sft)
            .args(["--device", "cuda:0"])
            .output()
            .unwrap(),
        "libcuda",
    );
    assert!(
        !out_dir.exists(),
        "nothing is written before the device opens"
    );
}
