//! The CLI on Qwen3 and Llama 3 checkpoints (tests/fixtures/qwen3/tiny, tests/fixtures/llama3/tiny,
//! made by transformers): `generate` reproduces transformers' greedy tokens, `logprobs` its
//! log-probs; `train` (full and LoRA, through each family's chat template; Qwen3 with
//! `enable_thinking = false`) writes a checkpoint of the same family that `generate`, `eval`
//! and `logprobs` (`--adapter`) load.

mod common;

use std::path::{Path, PathBuf};

use common::{bin, failed_stderr, gpg_rl, ok_stdout, parse_jsonl, read_jsonl};
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

/// The id of an added token of a fixture's tokenizer.json.
fn added_token_id(dir: &Path, content: &str) -> u64 {
    let tokenizer: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    tokenizer["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["content"] == content)
        .unwrap_or_else(|| panic!("{content} is not an added token"))["id"]
        .as_u64()
        .unwrap()
}

/// `generate --chat --format json` on the Qwen3 fixture with optional chat-template kwargs:
/// the prompt token ids.
fn qwen3_chat_prompt_ids(kwargs: Option<&str>) -> Vec<u64> {
    let dir = fixture("qwen3");
    let mut cmd = bin();
    cmd.arg("generate").arg("--model").arg(&dir).args([
        "--chat",
        "--system",
        "Think step by step and put the final answer in \\boxed{}.",
        "--prompt",
        "What is 6 * 7?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "2",
        "--format",
        "json",
    ]);
    if let Some(k) = kwargs {
        cmd.args(["--chat-template-kwargs", k]);
    }
    let got = parse_jsonl(&ok_stdout(&cmd.output().unwrap()));
    got[0]["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

#[test]
fn chat_template_kwargs_reach_generate_and_eval() {
    let dir = fixture("qwen3");
    let (think, end_think) = (
        added_token_id(&dir, "<think>"),
        added_token_id(&dir, "</think>"),
    );
    // Qwen3's template: `enable_thinking: false` closes an empty think block after the
    // generation prompt; unset or true renders the plain generation prompt.
    let plain = qwen3_chat_prompt_ids(None);
    assert_eq!(
        qwen3_chat_prompt_ids(Some(r#"{"enable_thinking": true}"#)),
        plain
    );
    let closed = qwen3_chat_prompt_ids(Some(r#"{"enable_thinking": false}"#));
    assert!(
        closed.len() > plain.len() && closed.starts_with(&plain),
        "{plain:?} {closed:?}"
    );
    let tail = &closed[plain.len()..];
    assert_eq!(tail.first(), Some(&think), "{tail:?}");
    assert!(tail.contains(&end_think), "{tail:?}");
    assert!(!plain.contains(&think));

    // eval renders its problems with the kwargs too (the per-item file holds the prompt).
    let tmp = tempfile::tempdir().unwrap();
    let bench = tmp.path().join("bench.jsonl");
    std::fs::write(
        &bench,
        "{\"problem\": \"What is 2+3?\", \"answer\": \"5\"}\n",
    )
    .unwrap();
    let eval_prompt = |kwargs: Option<&str>| -> String {
        let output = tmp.path().join("items.jsonl");
        let mut cmd = bin();
        cmd.arg("eval")
            .arg("--model")
            .arg(&dir)
            .arg("--benchmark")
            .arg(&bench);
        cmd.args([
            "--temperature",
            "0",
            "--max-new-tokens",
            "2",
            "--json",
            "--quiet",
        ]);
        cmd.arg("--output").arg(&output);
        if let Some(k) = kwargs {
            cmd.args(["--chat-template-kwargs", k]);
        }
        ok_stdout(&cmd.output().unwrap());
        read_jsonl(&output)[0]["prompt"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let plain = eval_prompt(None);
    assert!(plain.ends_with("<|im_start|>assistant\n"), "{plain:?}");
    let closed = eval_prompt(Some(r#"{"enable_thinking": false}"#));
    assert_eq!(closed, format!("{plain}<think>\n\n</think>\n\n"));
}

#[test]
fn bad_chat_template_kwargs_are_refused_naming_the_flag() {
    let dir = fixture("qwen3");
    let model = dir.to_str().unwrap();
    for (kwargs, says) in [
        ("{enable_thinking: false}", "not valid JSON"),
        ("[1, 2]", "not an array"),
        ("\"enable_thinking\"", "not a string"),
    ] {
        for command in [
            vec!["generate", "--model", model, "--chat", "--prompt", "Hi"],
            vec!["eval", "--model", model, "--benchmark", "gsm8k"],
        ] {
            let mut args = command.clone();
            args.extend(["--chat-template-kwargs", kwargs]);
            let out = gpg_rl(&args);
            assert_eq!(out.status.code(), Some(2), "{args:?}");
            let err = failed_stderr(&out);
            assert!(
                err.contains("--chat-template-kwargs") && err.contains(says),
                "{args:?}: {err}"
            );
        }
    }
    // The kwargs go to the chat template: generate without --chat is refused.
    let err = failed_stderr(&gpg_rl(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "Hi",
        "--chat-template-kwargs",
        "{}",
    ]));
    assert!(err.contains("--chat"), "{err}");
    // logprobs renders no template for a text model: refused, naming the flag.
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, "{\"prompt\": \"a\", \"completion\": \" b\"}\n").unwrap();
    let err = failed_stderr(&gpg_rl(&[
        "logprobs",
        "--model",
        model,
        "--input",
        input.to_str().unwrap(),
        "--chat-template-kwargs",
        r#"{"enable_thinking": false}"#,
    ]));
    assert!(
        err.contains("--chat-template-kwargs") && err.contains("text model"),
        "{err}"
    );
}

/// recipes/gpg-qwen3-0.6b.toml and recipes/gpg-llama3.2-1b.toml as shipped, on the tiny fixture
/// of their family (`--model`), with a small batch and a stand-in dataset: two GPG steps run
/// end to end (bf16, gradient checkpointing, β_th resampling, medium-weighted sampling, the
/// held-out evaluation, the recipe's chat-template kwargs), write metrics and save weights.
/// (A length reward is added: the tiny models solve nothing.)
#[test]
fn family_recipes_train_on_the_tiny_fixtures() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cases = [
        (
            "gpg-qwen3-0.6b.toml",
            "qwen3",
            "qwen3",
            "enable_thinking = false",
        ),
        (
            "gpg-llama3.2-1b.toml",
            "llama3",
            "llama",
            "date_string = \"26 Jul 2024\"",
        ),
    ];
    for (recipe, family, model_type, kwarg) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("train.jsonl");
        let lines: Vec<String> = (1..=8)
            .map(|i| {
                serde_json::json!({"problem": format!("What is {i}+{i}?"), "answer": (2 * i).to_string()})
                    .to_string()
            })
            .collect();
        std::fs::write(&data, lines.join("\n")).unwrap();
        let out = tmp.path().join("run");
        let set = |key: &str, value: String| ["--set".to_string(), format!("{key}={value}")];
        let mut args: Vec<String> = vec![
            "train".into(),
            "--config".into(),
            repo.join("recipes").join(recipe).display().to_string(),
            "--model".into(),
            fixture(family).display().to_string(),
            "--output-dir".into(),
            out.display().to_string(),
            "--steps".into(),
            "2".into(),
            "--quiet".into(),
        ];
        for (key, value) in [
            ("data.train", format!("{:?}", data.display().to_string())),
            ("data.max_prompt_tokens", "128".into()),
            ("eval.data", format!("{:?}", data.display().to_string())),
            ("eval.limit", "2".into()),
            ("eval.max_new_tokens", "8".into()),
            ("rollout.prompts_per_step", "2".into()),
            ("rollout.num_generations", "4".into()),
            ("rollout.max_new_tokens", "8".into()),
            ("algorithm.resample.max_rounds", "2".into()),
            ("logging.save_every", "1".into()),
            // The tiny model solves nothing: a small length reward gives groups differing
            // rewards, so that each step computes and applies a gradient.
            (
                "reward.functions",
                r#"[{name = "accuracy"}, {name = "length", weight = 0.01}]"#.into(),
            ),
        ] {
            args.extend(set(key, value));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok_stdout(&gpg_rl(&args));

        // The recipe's settings reached the run (config.toml is the resolved recipe).
        let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
        for line in [
            "precision = \"bf16\"",
            "sample_strategy = \"medium\"",
            kwarg,
        ] {
            assert!(config.contains(line), "{recipe}: {line} not in\n{config}");
        }

        let metrics = read_jsonl(&out.join("metrics.jsonl"));
        assert_eq!(metrics.len(), 2, "{recipe}");
        for m in &metrics {
            assert!(
                m["loss"].is_number() && m["reward"].is_number(),
                "{recipe}: {m}"
            );
            // An update ran (not skipped for want of differing rewards).
            assert!(m["grad_norm"].as_f64().unwrap() > 0.0, "{recipe}: {m}");
            assert!(m["valid_groups"].as_u64().unwrap() > 0, "{recipe}: {m}");
        }
        assert!(
            out.join("eval.jsonl").is_file(),
            "{recipe}: no held-out evaluation"
        );
        for dir in [out.join("checkpoint-2"), out.join("final")] {
            let config: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(config["model_type"], model_type, "{}", dir.display());
            assert!(dir.join("model.safetensors").is_file(), "{}", dir.display());
        }
        // The saved model loads and samples through its chat template.
        let text = ok_stdout(&gpg_rl(&[
            "generate",
            "--model",
            out.join("final").to_str().unwrap(),
            "--chat",
            "--prompt",
            "What is 1+1?",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
            "--format",
            "json",
        ]));
        assert_eq!(parse_jsonl(&text).len(), 1, "{recipe}");
    }
}

/// `gpg-rl init --family qwen3|llama` writes a random model of that architecture (QK-norm
/// weights for Qwen3, no biases for either) that loads and samples.
#[test]
fn init_writes_each_family() {
    let tmp = tempfile::tempdir().unwrap();
    for (family, model_type) in [("qwen2", "qwen2"), ("qwen3", "qwen3"), ("llama", "llama")] {
        let dir = tmp.path().join(family);
        let mut cmd = bin();
        cmd.args([
            "init", "--family", family, "--hidden", "32", "--layers", "1",
        ]);
        cmd.args(["--heads", "2", "--kv-heads", "1", "--intermediate", "64"]);
        cmd.args(["--vocab", "300"]).arg("--out").arg(&dir);
        ok_stdout(&cmd.output().unwrap());
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], model_type);
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let names: Vec<String> = tensors.names().into_iter().cloned().collect();
        let has = |part: &str| names.iter().any(|n| n.contains(part));
        assert_eq!(
            has("self_attn.q_norm.weight"),
            family == "qwen3",
            "{family}: {names:?}"
        );
        assert_eq!(
            has("self_attn.k_norm.weight"),
            family == "qwen3",
            "{family}"
        );
        assert_eq!(has(".bias"), family == "qwen2", "{family}: {names:?}");
        let text = ok_stdout(&gpg_rl(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--chat",
            "--prompt",
            "1+1=",
            "--max-new-tokens",
            "3",
            "--format",
            "json",
        ]));
        assert_eq!(parse_jsonl(&text).len(), 1, "{family}");
    }
    let err = failed_stderr(&gpg_rl(&["init", "--family", "mistral", "--out", "x"]));
    assert!(err.contains("--family"), "{err}");
}
