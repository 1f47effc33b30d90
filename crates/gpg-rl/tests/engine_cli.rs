//! `gpg-rl generate`, `logprobs` and `init` from the command line, against the transformers
//! fixtures (tests/fixtures/qwen2), and clear errors for broken checkpoints.

mod common;

use gpg::candle_core::{Device, Tensor};
use std::path::PathBuf;

use common::{assert_ok, bin, parse_jsonl};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/qwen2")
        .join(name)
}

#[test]
fn greedy_generate_reproduces_transformers() {
    let dir = fixture("untied_bf16");
    let cases = parse_jsonl(&std::fs::read_to_string(dir.join("expected_greedy.jsonl")).unwrap());
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
        "--format",
        "json",
    ]);
    let out = cmd.output().unwrap();
    assert_ok(&out);
    let got = parse_jsonl(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(got.len(), cases.len());
    for (g, c) in got.iter().zip(&cases) {
        assert_eq!(g["token_ids"], c["new_token_ids"]);
        assert!(g["text"].is_string());
    }
}

#[test]
fn logprobs_match_transformers() {
    let dir = fixture("tied_f32");
    let cases = parse_jsonl(&std::fs::read_to_string(dir.join("expected_logprobs.jsonl")).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    let lines: Vec<String> = cases
        .iter()
        .map(|c| {
            serde_json::json!({"prompt": c["prompt"], "completion": c["completion"]}).to_string()
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
    assert_ok(&out);
    let got = parse_jsonl(&String::from_utf8(out.stdout).unwrap());
    for (g, c) in got.iter().zip(&cases) {
        assert_eq!(g["completion_ids"], c["completion_ids"]);
        for (a, b) in g["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(c["logprobs"].as_array().unwrap())
        {
            assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-4);
        }
    }
}

/// Copies a fixture model into a temporary directory to break it.
fn copy_model(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    tmp
}

fn generate_error(dir: &std::path::Path) -> String {
    let out = bin()
        .arg("generate")
        .arg("--model")
        .arg(dir)
        .args(["--prompt", "hi", "--max-new-tokens", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(out.status.code(), Some(1), "no panic: a clean error exit");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn broken_checkpoints_give_clear_errors() {
    // Truncated safetensors.
    let tmp = copy_model("tied_f32");
    let weights = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = generate_error(tmp.path());
    assert!(err.contains("model.safetensors"), "{err}");

    // Config that does not match the weights (shape error names the tensor).
    let tmp = copy_model("tied_f32");
    let config = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 130");
    std::fs::write(&config, text).unwrap();
    let err = generate_error(tmp.path());
    assert!(
        err.contains("mlp.gate_proj.weight") && err.contains("shape"),
        "{err}"
    );

    // A missing shard of a sharded checkpoint.
    let tmp = copy_model("untied_bf16");
    std::fs::remove_file(tmp.path().join("model-00002-of-00003.safetensors")).unwrap();
    let err = generate_error(tmp.path());
    assert!(err.contains("model-00002-of-00003.safetensors"), "{err}");

    // Not a model directory at all.
    let tmp = tempfile::tempdir().unwrap();
    let err = generate_error(tmp.path());
    assert!(err.contains("config.json"), "{err}");

    // One NaN in the embedding: refused at load, naming the tensor and the file, in both
    // precisions (it used to train on silently, every completion collapsing to one token).
    let tmp = copy_model("tied_f32");
    let weights = tmp.path().join("model.safetensors");
    let mut tensors = gpg::candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let embed = &tensors["model.embed_tokens.weight"];
    let mut values = embed.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values[77] = f32::NAN;
    let poisoned = Tensor::from_vec(values, embed.dims(), &Device::Cpu).unwrap();
    tensors.insert("model.embed_tokens.weight".into(), poisoned);
    gpg::candle_core::safetensors::save(&tensors, &weights).unwrap();
    for precision in ["f32", "bf16"] {
        let out = bin()
            .arg("generate")
            .arg("--model")
            .arg(tmp.path())
            .args([
                "--prompt",
                "hi",
                "--max-new-tokens",
                "2",
                "--precision",
                precision,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "no panic: a clean error exit");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("model.embed_tokens.weight")
                && err.contains("model.safetensors")
                && err.contains("non-finite")
                && err.contains("index 77"),
            "{err}"
        );
    }
}

#[test]
fn cuda_device_is_refused_with_a_clear_error() {
    let out = bin()
        .arg("generate")
        .arg("--model")
        .arg(fixture("tied_f32"))
        .args(["--prompt", "hi", "--device", "cuda:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cuda:0") && err.contains("cpu"), "{err}");
}

/// A CUDA device in every command that takes one: without the `cuda` feature the error says to
/// rebuild with it; with the feature on a machine without a driver it names the library looked
/// for. Never a panic.
#[test]
fn cuda_device_errors_say_what_to_do() {
    let model = fixture("tied_f32");
    let tmp = tempfile::tempdir().unwrap();
    let bench = tmp.path().join("bench.jsonl");
    std::fs::write(
        &bench,
        "{\"id\": \"p0\", \"problem\": \"1+1=\", \"answer\": \"2\"}\n",
    )
    .unwrap();
    let bench = bench.to_str().unwrap();
    let runs: [&[&str]; 3] = [
        &["generate", "--prompt", "hi", "--device", "cuda"],
        &[
            "eval",
            "--benchmark",
            bench,
            "--no-output",
            "--device",
            "cuda:1",
        ],
        &["logprobs", "--input", "/dev/null", "--device", "cuda"],
    ];
    for args in runs {
        let out = bin()
            .arg(args[0])
            .arg("--model")
            .arg(&model)
            .args(&args[1..])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        #[cfg(not(feature = "cuda"))]
        assert!(err.contains("--features cuda"), "{args:?}: {err}");
        #[cfg(feature = "cuda")]
        assert!(
            err.contains("looked for") || err.contains("CPU only"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn init_writes_a_loadable_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let ok = bin()
        .args([
            "init",
            "--hidden",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--intermediate",
            "64",
            "--vocab",
            "300",
            "--dtype",
            "bf16",
        ])
        .arg("--out")
        .arg(&dir)
        .status()
        .unwrap();
    assert!(ok.success());
    let out = bin()
        .arg("generate")
        .arg("--model")
        .arg(&dir)
        .args([
            "--prompt",
            "1+1=",
            "--max-new-tokens",
            "4",
            "--format",
            "json",
            "-n",
            "2",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(
        parse_jsonl(&String::from_utf8(out.stdout).unwrap()).len(),
        2
    );
}

#[test]
fn generation_stops_at_a_stop_string() {
    let dir = fixture("untied_bf16");
    let out = bin()
        .arg("generate")
        .arg("--model")
        .arg(&dir)
        .args([
            "--prompt",
            "Question: What is 3 + 5?",
            "--temperature",
            "0",
            "--max-new-tokens",
            "16",
        ])
        .args(["--ignore-eos", "--stop", " tim", "--format", "json"])
        .output()
        .unwrap();
    assert_ok(&out);
    let got = &parse_jsonl(&String::from_utf8(out.stdout).unwrap())[0];
    assert_eq!(got["finish_reason"], "stop");
    assert!(
        got["text"].as_str().unwrap().ends_with(" tim"),
        "{}",
        got["text"]
    );
    assert!(got["token_ids"].as_array().unwrap().len() < 16);
}

/// `bench trainer` without a peer: writes its model and prompts, runs real GPG steps with the
/// `length` reward (which varies within groups, so the update is not skipped) and reports them.
#[test]
fn bench_trainer_runs_real_gpg_steps() {
    let out = bin()
        .args([
            "bench",
            "trainer",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--prompts-per-step",
            "2",
            "--num-generations",
            "4",
            "--max-new-tokens",
            "8",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("gpg-rl: step"), "{stdout}");
    // Two steps logged, each with a finite gradient norm.
    let steps: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("gpg-rl step"))
        .collect();
    assert_eq!(steps.len(), 2, "{stderr}");
    assert!(steps
        .iter()
        .all(|l| l.contains("grad norm") && !l.contains("NaN")));
}

fn lora_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/lora")
        .join(name)
}

/// `logprobs --adapter` (the adapter path) equals `logprobs` of the model `merge` wrote, and
/// the merged model differs from the base; `generate --adapter` runs; bad adapters and an
/// existing output directory are refused.
#[test]
fn adapter_flag_and_merge_agree() {
    let base = fixture("tied_f32");
    let adapter = lora_fixture("pattern");
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"The answer is\", \"completion\": \" the number 42.\"}\n{\"prompt\": \"First, add\", \"completion\": \" the two numbers.\"}\n",
    )
    .unwrap();
    let logprobs = |model: &PathBuf, adapter: Option<&PathBuf>| -> Vec<f64> {
        let mut cmd = bin();
        cmd.arg("logprobs")
            .arg("--model")
            .arg(model)
            .arg("--input")
            .arg(&input);
        if let Some(a) = adapter {
            cmd.arg("--adapter").arg(a);
        }
        let out = cmd.output().unwrap();
        assert_ok(&out);
        parse_jsonl(&String::from_utf8(out.stdout).unwrap())
            .iter()
            .flat_map(|l| l["logprobs"].as_array().unwrap().clone())
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let with_adapter = logprobs(&base, Some(&adapter));
    let merged_dir = tmp.path().join("merged");
    let out = bin()
        .arg("merge")
        .arg("--model")
        .arg(&base)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(&merged_dir)
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(merged_dir.join("tokenizer.json").is_file());
    let merged = logprobs(&merged_dir, None);
    let plain = logprobs(&base, None);
    assert_eq!(with_adapter.len(), merged.len());
    let worst = with_adapter
        .iter()
        .zip(&merged)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-4, "adapter vs merged: {worst}");
    let moved = plain
        .iter()
        .zip(&merged)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(moved > 1e-2);
    // The merged directory is a plain model: loading it with an adapter of its own still works,
    // and merging into an existing directory is refused.
    let out = bin()
        .arg("merge")
        .arg("--model")
        .arg(&base)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(&merged_dir)
        .output()
        .unwrap();
    assert!(common::failed_stderr(&out).contains("already exists"));
    let out = bin()
        .arg("generate")
        .arg("--model")
        .arg(&base)
        .arg("--adapter")
        .arg(&adapter)
        .args([
            "--prompt",
            "The answer is",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    // A DoRA adapter is refused, naming the field and the file.
    let dora = tmp.path().join("dora");
    std::fs::create_dir(&dora).unwrap();
    std::fs::copy(
        adapter.join("adapter_model.safetensors"),
        dora.join("adapter_model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(adapter.join("adapter_config.json"))
        .unwrap()
        .replace("\"use_dora\": false", "\"use_dora\": true");
    std::fs::write(dora.join("adapter_config.json"), config).unwrap();
    let out = bin()
        .arg("logprobs")
        .arg("--model")
        .arg(&base)
        .arg("--input")
        .arg(&input)
        .arg("--adapter")
        .arg(&dora)
        .output()
        .unwrap();
    let err = common::failed_stderr(&out);
    assert!(
        err.contains("use_dora") && err.contains("adapter_config.json"),
        "{err}"
    );
}
