//! The CLI on Qwen3 and Llama 3 checkpoints (tests/fixtures/qwen3/tiny, tests/fixtures/llama3/tiny,
//! made by transformers): `generate` reproduces transformers' greedy tokens, `logprobs` its
//! log-probs; `train` (full and LoRA, through each family's chat template; Qwen3 with
//! `enable_thinking = false`) writes a checkpoint of the same family that `generate`, `eval`
//! and `logprobs` (`--adapter`) load.

mod common;

use std::path::{Path, PathBuf};

use common::{bin, gpg_rl, ok_stdout, parse_jsonl, read_jsonl};
use serde_json::Value;

const FAMILIES: [(&str, &str); 2] = [("qwen3", "qwen3"), ("llama3", "llama")];

fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(family)
        .join("tiny")
}

#[test]
fn generate_and_logprobs_reproduce_transformers() {
    for (family, _) in FAMILIES {
        let dir = fixture(family);
        let cases = read_jsonl(&dir.join("expected_greedy.jsonl"));
        let mut cmd = bin();
        cmd.arg("generate").arg("--model").arg(&dir);
        for c in &cases {
            cmd.args(["--prompt", c["prompt"].as_str().unwrap()]);
        }
        cmd.args([
            "--temperature",
            "0",
            "--max-new-tokens",
            "16",
            "--ignore-eos",
        ]);
        cmd.args(["--format", "json"]);
        let got = parse_jsonl(&ok_stdout(&cmd.output().unwrap()));
        assert_eq!(got.len(), cases.len());
        for (g, c) in got.iter().zip(&cases) {
            assert_eq!(g["token_ids"], c["new_token_ids"], "{family}");
        }

        let cases = read_jsonl(&dir.join("expected_logprobs.jsonl"));
        let tmp = tempfile::tempdir().unwrap();
        let input = tmp.path().join("in.jsonl");
        let lines: Vec<String> = cases
            .iter()
            .map(|c| {
                serde_json::json!({"prompt": c["prompt"], "completion": c["completion"]})
                    .to_string()
            })
            .collect();
        std::fs::write(&input, lines.join("\n")).unwrap();
        let out = bin()
            .arg("logprobs")
            .arg("--model")
            .arg(&dir)
            .arg("--input")
            .arg(&input)
            .output()
            .unwrap();
        let got = parse_jsonl(&ok_stdout(&out));
        assert_eq!(got.len(), cases.len());
        for (g, c) in got.iter().zip(&cases) {
            for (a, b) in g["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .zip(c["logprobs"].as_array().unwrap())
            {
                assert!(
                    (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-4,
                    "{family}"
                );
            }
        }
    }
}

fn recipe(model: &Path, out: &Path, family: &str, lora: bool) -> String {
    let kwargs = if family == "qwen3" {
        "chat_template_kwargs = { enable_thinking = false }\n"
    } else {
        ""
    };
    let lora = if lora {
        "[lora]\nrank = 4\nalpha = 8\n"
    } else {
        ""
    };
    format!(
        r#"
model = {model:?}
output_dir = {out:?}
steps = 2
seed = 3
[data]
train = "synthetic"
{kwargs}[data.fields]
system_prompt = "Put the final answer in \\boxed{{}}."
[data.synthetic]
level = 1
n_train = 50
n_heldout = 4
[rollout]
prompts_per_step = 2
num_generations = 4
max_new_tokens = 8
[algorithm]
loss = {{ name = "gpg" }}
[optim]
lr = 1e-3
[[reward.functions]]
name = "accuracy"
[[reward.functions]]
name = "length"
weight = 0.01
[logging]
save_every = 1
progress = false
{lora}"#
    )
}

#[test]
fn train_full_and_lora_then_generate_eval_and_logprobs() {
    for (family, model_type) in FAMILIES {
        let base = fixture(family);
        let tmp = tempfile::tempdir().unwrap();
        // Full fine-tuning: the final model is a checkpoint of the same family.
        let out = tmp.path().join("full");
        let path = tmp.path().join("full.toml");
        std::fs::write(&path, recipe(&base, &out, family, false)).unwrap();
        ok_stdout(&gpg_rl(&["train", "--config", path.to_str().unwrap()]));
        let metrics = read_jsonl(&out.join("metrics.jsonl"));
        assert_eq!(metrics.len(), 2, "{family}");
        assert!(
            metrics.iter().all(|m| m["loss"].is_number()),
            "{family}: {metrics:?}"
        );
        let final_dir = out.join("final");
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(final_dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], model_type);
        let before = std::fs::read(base.join("model.safetensors")).unwrap();
        let after = std::fs::read(final_dir.join("model.safetensors")).unwrap();
        assert_ne!(
            before, after,
            "{family}: training left the weights unchanged"
        );
        let text = ok_stdout(&gpg_rl(&[
            "generate",
            "--model",
            final_dir.to_str().unwrap(),
            "--prompt",
            "The answer is",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
            "--format",
            "json",
        ]));
        assert_eq!(parse_jsonl(&text).len(), 1);
        // eval on a small benchmark, through the chat template.
        let bench = tmp.path().join("bench.jsonl");
        std::fs::write(
            &bench,
            "{\"problem\": \"What is 2+3?\", \"answer\": \"5\"}\n{\"problem\": \"What is 4+4?\", \"answer\": \"8\"}\n",
        )
        .unwrap();
        let summary = ok_stdout(&gpg_rl(&[
            "eval",
            "--model",
            final_dir.to_str().unwrap(),
            "--benchmark",
            bench.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
            "--json",
            "--quiet",
        ]));
        let summary: Value = serde_json::from_str(summary.trim()).unwrap();
        assert_eq!(summary["n_items"], 2, "{family}");

        // LoRA: a PEFT adapter that `logprobs --adapter` runs on the base model.
        let out = tmp.path().join("lora");
        let path = tmp.path().join("lora.toml");
        std::fs::write(&path, recipe(&base, &out, family, true)).unwrap();
        ok_stdout(&gpg_rl(&["train", "--config", path.to_str().unwrap()]));
        let adapter = out.join("final");
        assert!(
            adapter.join("adapter_model.safetensors").is_file(),
            "{family}"
        );
        let input = tmp.path().join("in.jsonl");
        std::fs::write(
            &input,
            "{\"prompt\": \"The answer is\", \"completion\": \" 42.\"}\n",
        )
        .unwrap();
        let run = |adapter: Option<&Path>| -> Vec<f64> {
            let mut cmd = bin();
            cmd.arg("logprobs")
                .arg("--model")
                .arg(&base)
                .arg("--input")
                .arg(&input);
            if let Some(a) = adapter {
                cmd.arg("--adapter").arg(a);
            }
            parse_jsonl(&ok_stdout(&cmd.output().unwrap()))[0]["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        };
        let (plain, adapted) = (run(None), run(Some(&adapter)));
        assert_eq!(plain.len(), adapted.len());
        assert!(
            plain
                .iter()
                .zip(&adapted)
                .any(|(a, b)| (a - b).abs() > 1e-6),
            "{family}: the trained adapter changes nothing"
        );
    }
}
