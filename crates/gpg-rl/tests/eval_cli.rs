//! `gpg-rl eval` end to end on a tiny random model written in the test.
//!
//! The model's output head is restricted to digit tokens, so its completions hold numbers that
//! the answer extractor finds; golds taken from its own greedy answers must then count as
//! correct.

mod common;

use std::path::{Path, PathBuf};

use common::{gpg_rl, ok_stdout, read_jsonl};

use gpg::candle_core::{Device, Tensor};
use gpg::model::{Qwen2, Qwen2Config};
use gpg::tokenizer::train_byte_level_bpe;
use serde_json::Value;

/// Writes a tiny Qwen2 model whose head gives non-zero logits only to digit tokens.
fn write_model(dir: &Path) {
    let corpus: Vec<String> = (0..40u32)
        .map(|a| {
            format!(
                "Compute {a}+{a}= {}. The answer is \\boxed{{{}}}.",
                2 * a,
                2 * a
            )
        })
        .collect();
    let tokenizer = train_byte_level_bpe(&corpus, 300).unwrap();
    let config: Qwen2Config = serde_json::from_value(serde_json::json!({
        "vocab_size": tokenizer.vocab_size(),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false,
    }))
    .unwrap();
    let mut model = Qwen2::random(config, 0.5, 3, &Device::Cpu).unwrap();
    let head = model.weights.lm_head.as_mut().unwrap();
    let mut rows = head.to_vec2::<f32>().unwrap();
    for (id, row) in rows.iter_mut().enumerate() {
        let text = tokenizer.decode(&[id as u32], false).unwrap();
        let numeric =
            !text.trim().is_empty() && text.chars().all(|c| c.is_ascii_digit() || c == ' ');
        let scale = if numeric { 3.0 } else { 0.0 };
        row.iter_mut().for_each(|w| *w *= scale);
    }
    let shape = head.shape().clone();
    *head = Tensor::from_vec(rows.concat(), shape, &Device::Cpu).unwrap();
    model.save_pretrained(dir).unwrap();
    tokenizer.save_pretrained(dir).unwrap();
}

/// A benchmark file with `golds.len()` problems.
fn write_benchmark(path: &Path, golds: &[String]) {
    let lines: Vec<String> = golds
        .iter()
        .enumerate()
        .map(|(i, gold)| {
            serde_json::json!({"id": format!("p{i}"), "problem": format!("Compute {i}+{}=", 2 * i + 1), "answer": gold})
                .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

struct Setup {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    root: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_model(&model);
    let root = tmp.path().to_path_buf();
    Setup {
        _tmp: tmp,
        model,
        root,
    }
}

#[test]
fn golds_from_greedy_answers_are_counted_correct() {
    let s = setup();
    let model = s.model.to_str().unwrap();
    let bench = s.root.join("tiny.jsonl");
    let none = "-12345".to_string();
    write_benchmark(&bench, &vec![none.clone(); 6]);
    let out1 = s.root.join("first.jsonl");
    let greedy = [
        "--temperature",
        "0",
        "--max-new-tokens",
        "16",
        "--batch-prompts",
        "4",
        "--json",
        "--quiet",
    ];
    let mut args = vec![
        "eval",
        "--model",
        model,
        "--benchmark",
        bench.to_str().unwrap(),
    ];
    args.extend(greedy);
    args.extend(["--output", out1.to_str().unwrap()]);
    let summary: Value = serde_json::from_str(ok_stdout(&gpg_rl(&args)).trim()).unwrap();
    assert_eq!(summary["n_items"], 6);
    assert_eq!(summary["samples"], 1);
    assert_eq!(summary["pass_at_1"], 0.0);
    assert_eq!(summary["temperature"], 0.0);

    let first = read_jsonl(&out1);
    assert_eq!(first.len(), 6);
    let golds: Vec<String> = first
        .iter()
        .map(|item| match &item["samples"][0]["extracted"] {
            Value::String(answer) => answer.clone(),
            _ => none.clone(),
        })
        .collect();
    let answered = golds.iter().filter(|g| **g != none).count();
    assert!(answered >= 2, "only {answered} greedy answers: {first:?}");

    let bench2 = s.root.join("tiny2.jsonl");
    write_benchmark(&bench2, &golds);
    let out2 = s.root.join("second.jsonl");
    let mut args = vec![
        "eval",
        "--model",
        model,
        "--benchmark",
        bench2.to_str().unwrap(),
    ];
    args.extend(greedy);
    args.extend(["--output", out2.to_str().unwrap()]);
    let summary: Value = serde_json::from_str(ok_stdout(&gpg_rl(&args)).trim()).unwrap();
    let second = read_jsonl(&out2);
    for ((a, b), gold) in first.iter().zip(&second).zip(&golds) {
        assert_eq!(a["samples"][0]["text"], b["samples"][0]["text"]);
        assert_eq!(b["gold"], gold.as_str());
        assert_eq!(b["samples"][0]["correct"], *gold != none, "{b}");
    }
    let share = answered as f64 / 6.0;
    assert!((summary["pass_at_1"].as_f64().unwrap() - share).abs() < 1e-12);
    assert!((summary["pass_at_k"].as_f64().unwrap() - share).abs() < 1e-12);
}

#[test]
fn samples_give_pass_at_1_and_pass_at_k_and_a_default_output() {
    let s = setup();
    let model = s.model.to_str().unwrap();
    let bench = s.root.join("arith.jsonl");
    write_benchmark(
        &bench,
        &(0..6).map(|i| (3 * i + 1).to_string()).collect::<Vec<_>>(),
    );
    let out = gpg_rl(&[
        "eval",
        "--model",
        model,
        "--benchmark",
        bench.to_str().unwrap(),
        "-k",
        "3",
        "--temperature",
        "1.0",
        "--top-p",
        "1.0",
        "--seed",
        "3",
        "--limit",
        "4",
        "--batch-prompts",
        "3",
        "--max-new-tokens",
        "12",
    ]);
    let text = ok_stdout(&out);
    assert!(
        text.contains("arith (4 problems, 3 samples each)"),
        "{text}"
    );
    assert!(
        text.contains("pass@1 ") && text.contains("pass@3 "),
        "{text}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("eval: 3/4 problems") && stderr.contains("eval: 4/4 problems"),
        "{stderr}"
    );

    // Default output: <model>/eval-<benchmark>.jsonl, and no partial file left.
    let path = s.model.join("eval-arith.jsonl");
    assert!(text.contains(path.to_str().unwrap()), "{text}");
    assert!(!s.model.join("eval-arith.jsonl.partial").exists());
    let items = read_jsonl(&path);
    assert_eq!(items.len(), 4);
    let mut pass1 = 0.0;
    let mut passk = 0.0;
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["id"], format!("p{i}"));
        let samples = item["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 3);
        let c = samples.iter().filter(|s| s["correct"] == true).count();
        assert_eq!(item["n_correct"], c);
        for s in samples {
            let correct =
                mathverify::is_correct(item["gold"].as_str().unwrap(), s["text"].as_str().unwrap());
            assert_eq!(s["correct"], correct);
            assert!(s["completion_tokens"].as_u64().unwrap() <= 12);
        }
        pass1 += c as f64 / 3.0;
        passk += (c > 0) as u8 as f64;
        assert!(item["prompt"]
            .as_str()
            .unwrap()
            .starts_with("<|im_start|>system\nPlease reason step by step"));
    }
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} line in {text}"))
            .to_string()
    };
    assert!(
        line("pass@1 ").contains(&format!("{:.4}", pass1 / 4.0)),
        "{text}"
    );
    assert!(
        line("pass@3 ").contains(&format!("{:.4}", passk / 4.0)),
        "{text}"
    );

    // --no-chat --no-system: the bare problem as raw text.
    let out = gpg_rl(&[
        "eval",
        "--model",
        model,
        "--benchmark",
        bench.to_str().unwrap(),
        "--limit",
        "1",
        "--max-new-tokens",
        "4",
        "--no-chat",
        "--no-system",
        "--quiet",
        "--output",
        s.root.join("raw.jsonl").to_str().unwrap(),
    ]);
    ok_stdout(&out);
    let raw = read_jsonl(&s.root.join("raw.jsonl"));
    assert_eq!(raw[0]["prompt"], "Compute 0+1=");
}

#[test]
fn bad_input_is_a_clear_error() {
    let s = setup();
    let model = s.model.to_str().unwrap();
    let fails_with = |args: &[&str], expected: &str| {
        let out = gpg_rl(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    };
    fails_with(
        &["eval", "--model", model, "--benchmark", "no-such-benchmark"],
        "neither a benchmark name",
    );
    let malformed = s.root.join("bad.jsonl");
    std::fs::write(
        &malformed,
        "{\"problem\": \"p\", \"answer\": \"1\"}\n{not json\n",
    )
    .unwrap();
    fails_with(
        &[
            "eval",
            "--model",
            model,
            "--benchmark",
            malformed.to_str().unwrap(),
        ],
        "bad.jsonl:2: invalid JSON",
    );
    let no_answer = s.root.join("noanswer.jsonl");
    std::fs::write(&no_answer, "{\"problem\": \"p\"}\n").unwrap();
    fails_with(
        &[
            "eval",
            "--model",
            model,
            "--benchmark",
            no_answer.to_str().unwrap(),
        ],
        "missing field: answer",
    );
    let good = s.root.join("good.jsonl");
    write_benchmark(&good, &["1".to_string()]);
    let good = good.to_str().unwrap();
    let not_model = s.root.to_str().unwrap();
    fails_with(
        &["eval", "--model", not_model, "--benchmark", good],
        "config.json",
    );
    fails_with(
        &[
            "eval",
            "--model",
            model,
            "--benchmark",
            good,
            "--output",
            "/nonexistent-dir/r.jsonl",
        ],
        "cannot create the results file",
    );
    fails_with(
        &[
            "eval",
            "--model",
            model,
            "--benchmark",
            good,
            "--max-new-tokens",
            "600",
        ],
        "exceeds the model's 512 positions",
    );
    // A failure before any result leaves no file behind.
    assert!(!s.model.join("eval-good.jsonl.partial").exists());
    assert!(!s.model.join("eval-good.jsonl").exists());
    fails_with(
        &["eval", "--model", model, "--benchmark", good, "-k", "0"],
        "samples",
    );
}
