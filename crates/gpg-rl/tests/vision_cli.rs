//! `gpg-rl generate --chat --image` on the tiny Qwen2-VL / Qwen2.5-VL fixtures against what
//! transformers' processor and `generate` give for the same chat (cli_case.json, made by
//! tests/fixtures/qwen2_vl/make_model_fixtures.py).

mod common;

use std::path::PathBuf;

use common::{bin, failed_stderr, ok_stdout, parse_jsonl};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2_vl")
}

#[test]
fn generate_with_images_matches_transformers() {
    for name in ["tiny_qwen2_vl", "tiny_qwen2_5_vl"] {
        let dir = fixtures().join(name);
        let case: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cli_case.json")).unwrap())
                .unwrap();
        let mut cmd = bin();
        cmd.arg("generate").arg("--model").arg(&dir).arg("--chat");
        for im in case["images"].as_array().unwrap() {
            cmd.arg("--image")
                .arg(fixtures().join("images").join(im.as_str().unwrap()));
        }
        cmd.args(["--prompt", case["prompt"].as_str().unwrap()]);
        cmd.args([
            "--temperature",
            "0",
            "--max-new-tokens",
            "5",
            "--ignore-eos",
            "--format",
            "json",
        ]);
        let out = cmd.output().unwrap();
        let lines = parse_jsonl(&ok_stdout(&out));
        assert_eq!(lines.len(), 1);
        assert_eq!(
            lines[0]["prompt_ids"], case["prompt_ids"],
            "{name}: prompt ids"
        );
        assert_eq!(
            lines[0]["token_ids"], case["greedy_ids"],
            "{name}: greedy tokens"
        );
    }
}

#[test]
fn image_errors_are_clear() {
    let dir = fixtures().join("tiny_qwen2_vl");
    let out = bin()
        .args(["generate", "--model"])
        .arg(&dir)
        .args(["--chat", "--prompt", "w1", "--image", "/nonexistent.png"])
        .output()
        .unwrap();
    let err = failed_stderr(&out);
    assert!(err.contains("/nonexistent.png"), "{err}");
    let out = bin()
        .args(["generate", "--model"])
        .arg(&dir)
        .args(["--prompt", "w1", "--image"])
        .arg(fixtures().join("images/tiny_9x13.png"))
        .output()
        .unwrap();
    let err = failed_stderr(&out);
    assert!(err.contains("--chat"), "{err}");
}

#[test]
fn logprobs_of_message_lines_with_images_match_transformers() {
    for name in ["tiny_qwen2_vl", "tiny_qwen2_5_vl"] {
        let dir = fixtures().join(name);
        let case: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cli_case.json")).unwrap())
                .unwrap();
        // The line's image path is relative to the JSONL file: ../images/NAME.png.
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("lines")).unwrap();
        std::fs::create_dir_all(tmp.path().join("images")).unwrap();
        std::fs::copy(
            fixtures().join("images/rgba_61x45.png"),
            tmp.path().join("images/rgba_61x45.png"),
        )
        .unwrap();
        let input = tmp.path().join("lines/in.jsonl");
        let text_line = serde_json::json!({"prompt": "w1 w2", "completion": "w3"});
        std::fs::write(
            &input,
            format!("{}\n{}\n", case["logprobs_line"], text_line),
        )
        .unwrap();
        let out = bin()
            .args(["logprobs", "--model"])
            .arg(&dir)
            .arg("--input")
            .arg(&input)
            .output()
            .unwrap();
        let lines = parse_jsonl(&ok_stdout(&out));
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["completion_ids"], case["logprobs_completion_ids"]);
        let got: Vec<f64> = lines[0]["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let want: Vec<f64> = case["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "{name}: {g} vs {w}");
        }
        assert_eq!(lines[1]["logprobs"].as_array().unwrap().len(), 1);
    }
}

#[test]
fn eval_on_image_questions_scores_by_visual_accuracy() {
    let name = "tiny_qwen2_vl";
    let dir = fixtures().join(name);
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cli_case.json")).unwrap()).unwrap();
    // The greedy completion of the CLI case (its tokens match transformers', tested above).
    let mut cmd = bin();
    cmd.arg("generate").arg("--model").arg(&dir).arg("--chat");
    for im in case["images"].as_array().unwrap() {
        cmd.arg("--image")
            .arg(fixtures().join("images").join(im.as_str().unwrap()));
    }
    cmd.args(["--prompt", case["prompt"].as_str().unwrap()]);
    cmd.args([
        "--temperature",
        "0",
        "--max-new-tokens",
        "5",
        "--format",
        "json",
    ]);
    let text = parse_jsonl(&ok_stdout(&cmd.output().unwrap()))[0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    // The same question twice (images relative to the file), once with that text as the gold
    // answer, once with another: pass@1 = 0.5.
    let tmp = tempfile::tempdir().unwrap();
    let images: Vec<String> = case["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            fixtures()
                .join("images")
                .join(v.as_str().unwrap())
                .display()
                .to_string()
        })
        .collect();
    let q = case["prompt"].as_str().unwrap();
    let lines = [
        serde_json::json!({"id": "right", "question": q, "images": images, "answer": text}),
        serde_json::json!({"id": "wrong", "question": q, "images": images, "answer": "w1"}),
    ];
    let data = tmp.path().join("vqa.jsonl");
    std::fs::write(&data, format!("{}\n{}\n", lines[0], lines[1])).unwrap();
    let results = tmp.path().join("results.jsonl");
    let out = bin()
        .args(["eval", "--model"])
        .arg(&dir)
        .arg("--benchmark")
        .arg(&data)
        .args([
            "--temperature",
            "0",
            "--max-new-tokens",
            "5",
            "--json",
            "--quiet",
            "--output",
        ])
        .arg(&results)
        .output()
        .unwrap();
    let summary = &parse_jsonl(&ok_stdout(&out))[0];
    assert_eq!(summary["n_items"], 2);
    assert_eq!(summary["pass_at_1"], 0.5, "{summary}");
    let items = common::read_jsonl(&results);
    assert_eq!(items[0]["id"], "right");
    assert_eq!(items[0]["samples"][0]["correct"], true);
    assert_eq!(items[1]["samples"][0]["correct"], false);
    // A line without an answer is an error naming file and line.
    std::fs::write(&data, format!("{}\n{{\"question\": \"w1\"}}\n", lines[0])).unwrap();
    let out = bin()
        .args(["eval", "--model"])
        .arg(&dir)
        .arg("--benchmark")
        .arg(&data)
        .output()
        .unwrap();
    let err = failed_stderr(&out);
    assert!(
        err.contains("vqa.jsonl:2") && err.contains("answer"),
        "{err}"
    );
}

/// A folder with an image-question dataset for the tiny fixtures (their "words" are w0 … w99):
/// train.jsonl (a `question` + `image` line, an `images` line, a `messages` line, a text-only
/// line) and sft.jsonl (chats ending with the assistant's answer), images beside them.
fn image_dataset(dir: &std::path::Path) {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    for f in ["rgb_37x23.png", "tiny_9x13.png", "grey_17x90.png"] {
        std::fs::copy(fixtures().join("images").join(f), dir.join("img").join(f)).unwrap();
    }
    let user = |image: &str, text: &str| {
        serde_json::json!({"role": "user", "content": [
            {"type": "image", "image": image}, {"type": "text", "text": text}]})
    };
    let train = [
        serde_json::json!({"id": "a", "question": "w5 w7", "image": "img/rgb_37x23.png", "answer": "w4"}),
        serde_json::json!({"id": "b", "question": "w9", "images": ["img/tiny_9x13.png", "img/grey_17x90.png"], "answer": "w8"}),
        serde_json::json!({"id": "c", "messages": [user("img/grey_17x90.png", "w3 w2")], "answer": "w15"}),
        serde_json::json!({"id": "d", "question": "w11 w12", "answer": "w16"}),
    ];
    let lines: Vec<String> = train.iter().map(|l| l.to_string()).collect();
    std::fs::write(dir.join("train.jsonl"), lines.join("\n") + "\n").unwrap();
    let sft = [
        serde_json::json!({"messages": [user("img/rgb_37x23.png", "w5 w7"), {"role": "assistant", "content": "w4"}]}),
        serde_json::json!({"messages": [user("img/tiny_9x13.png", "w9"), {"role": "assistant", "content": "w8 w8"}]}),
        serde_json::json!({"messages": [user("img/grey_17x90.png", "w3 w2"), {"role": "assistant", "content": "w15"}]}),
    ];
    let lines: Vec<String> = sft.iter().map(|l| l.to_string()).collect();
    std::fs::write(dir.join("sft.jsonl"), lines.join("\n") + "\n").unwrap();
}

/// A GPG recipe on the dataset of [`image_dataset`]; the `length` reward makes every group's
/// rewards differ, so each step has a gradient.
fn vl_recipe(model: &std::path::Path, data: &std::path::Path, out: &std::path::Path) -> String {
    format!(
        r#"model = {model:?}
output_dir = {out:?}
steps = 3
seed = 0
{{extra}}
[data]
train = {train:?}
[rollout]
prompts_per_step = 2
num_generations = 4
max_new_tokens = 4
temperature = 1.0
[algorithm]
loss = {{ name = "gpg" }}
micro_batch_tokens = 64
[optim]
lr = 1e-2
[[reward.functions]]
name = "length"
weight = 0.1
[[reward.functions]]
name = "visual_accuracy"
[eval]
every = 2
data = {train:?}
samples = 2
[logging]
save_every = 1
keep_checkpoints = 5
progress = false
"#,
        model = model.display().to_string(),
        out = out.display().to_string(),
        train = data.join("train.jsonl").display().to_string(),
    )
}

fn safetensors(path: &std::path::Path) -> std::collections::HashMap<String, Vec<f32>> {
    gpg::candle_core::safetensors::load(path, &gpg::candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn train_on_image_questions_checkpoints_in_its_layout_and_resumes_exactly() {
    for name in ["tiny_qwen2_vl", "tiny_qwen2_5_vl"] {
        let model = fixtures().join(name);
        let tmp = tempfile::tempdir().unwrap();
        image_dataset(tmp.path());
        let train = |out: &str, extra: &str, args: &[&str]| {
            let recipe = tmp.path().join(format!("{out}.toml"));
            let text =
                vl_recipe(&model, tmp.path(), &tmp.path().join(out)).replace("{extra}", extra);
            std::fs::write(&recipe, text).unwrap();
            let out = bin()
                .args(["train", "--config"])
                .arg(&recipe)
                .args(args)
                .output()
                .unwrap();
            ok_stdout(&out)
        };
        // Uninterrupted: 3 steps; interrupted: 2 steps, then --resume to 3.
        let stdout = train("full", "", &[]);
        assert!(stdout.contains("held-out pass@1 after"), "{stdout}");
        train("split", "", &["--steps", "2"]);
        train("split", "", &["--resume"]);
        let full = tmp.path().join("full");
        let split = tmp.path().join("split");
        assert_eq!(
            std::fs::read(full.join("final/model.safetensors")).unwrap(),
            std::fs::read(split.join("final/model.safetensors")).unwrap(),
            "{name}: resumed run differs from the uninterrupted one"
        );
        let metrics = common::read_jsonl(&full.join("metrics.jsonl"));
        assert_eq!(metrics.len(), 3);
        assert!(
            metrics.iter().all(|m| m["skipped"].is_null()),
            "{name}: every step updates: {metrics:?}"
        );
        // The checkpoint is a model directory in the layout the model came in.
        let ckpt = full.join("checkpoint-3");
        for f in ["config.json", "preprocessor_config.json"] {
            let json = |p: PathBuf| -> serde_json::Value {
                serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
            };
            assert!(
                json(ckpt.join(f)) == json(model.join(f)),
                "{name}: {f} differs from the model's"
            );
        }
        let start = safetensors(&model.join("model.safetensors"));
        let trained = safetensors(&ckpt.join("model.safetensors"));
        let mut names: Vec<&String> = start.keys().collect();
        names.sort();
        let mut trained_names: Vec<&String> = trained.keys().collect();
        trained_names.sort();
        assert_eq!(names, trained_names, "{name}: tensor names");
        let tower_moved = start
            .iter()
            .filter(|(k, _)| k.contains("visual."))
            .all(|(k, v)| trained[k] != *v);
        assert!(tower_moved, "{name}: every tower tensor is trained");
        // freeze_vision = true: the tower is written back unchanged.
        train("frozen", "freeze_vision = true", &["--steps", "2"]);
        let frozen = safetensors(&tmp.path().join("frozen/final/model.safetensors"));
        for (k, v) in &start {
            assert_eq!(
                frozen[k] == *v,
                k.contains("visual."),
                "{name}: {k} with freeze_vision"
            );
        }
    }
}

#[test]
fn sft_on_image_chats_lowers_the_loss_and_writes_a_model_eval_loads() {
    let tmp = tempfile::tempdir().unwrap();
    image_dataset(tmp.path());
    let out_dir = tmp.path().join("sft-out");
    let recipe = tmp.path().join("sft.toml");
    std::fs::write(
        &recipe,
        format!(
            "model = {:?}\noutput_dir = {:?}\ndata = {:?}\neval_data = {:?}\nsteps = 12\n\
             batch_size = 3\nseed = 0\nlr = 1e-2\neval_every = 6\neval_max_new_tokens = 3\n",
            fixtures().join("tiny_qwen2_vl").display().to_string(),
            out_dir.display().to_string(),
            tmp.path().join("sft.jsonl").display().to_string(),
            tmp.path().join("train.jsonl").display().to_string(),
        ),
    )
    .unwrap();
    let out = bin()
        .args(["sft", "--config"])
        .arg(&recipe)
        .output()
        .unwrap();
    let stdout = ok_stdout(&out);
    assert!(stdout.contains("held-out pass@1"), "{stdout}");
    let log = common::read_jsonl(&out_dir.join("sft_metrics.jsonl"));
    assert_eq!(log.len(), 12);
    let loss = |i: usize| log[i]["loss"].as_f64().unwrap();
    assert!(loss(11) < 0.5 * loss(0), "loss {} -> {}", loss(0), loss(11));
    assert!(log[5]["heldout_greedy_accuracy"].is_number());
    // The written model is a Qwen2-VL directory the other commands load.
    let out = bin()
        .args(["eval", "--model"])
        .arg(&out_dir)
        .arg("--benchmark")
        .arg(tmp.path().join("train.jsonl"))
        .args(["--temperature", "0", "--max-new-tokens", "3"])
        .output()
        .unwrap();
    ok_stdout(&out);
}

#[test]
fn vl_training_refuses_what_it_does_not_support_and_says_what_to_do() {
    let model = fixtures().join("tiny_qwen2_vl");
    let tmp = tempfile::tempdir().unwrap();
    image_dataset(tmp.path());
    let recipe = tmp.path().join("r.toml");
    let base = vl_recipe(&model, tmp.path(), &tmp.path().join("run")).replace("{extra}", "");
    for (text, needle) in [
        (base.clone() + "[lora]\nrank = 4\nalpha = 8\n", "LoRA"),
        (
            base.replacen("seed = 0\n", "seed = 0\ndevice = \"cuda\"\n", 1),
            "device = \"cpu\"",
        ),
    ] {
        std::fs::write(&recipe, text).unwrap();
        let err = failed_stderr(
            &bin()
                .args(["train", "--config"])
                .arg(&recipe)
                .output()
                .unwrap(),
        );
        assert!(
            err.contains("vision-language") && err.contains(needle),
            "{err}"
        );
    }
    // freeze_vision on a text model, and a text dataset field the image loader does not read.
    let text_model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../demo/model");
    std::fs::write(
        &recipe,
        vl_recipe(&text_model, tmp.path(), &tmp.path().join("run2"))
            .replace("{extra}", "freeze_vision = true"),
    )
    .unwrap();
    let err = failed_stderr(
        &bin()
            .args(["train", "--config"])
            .arg(&recipe)
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("freeze_vision") && err.contains("text model"),
        "{err}"
    );
    std::fs::write(
        &recipe,
        base.replace(
            "[rollout]",
            "[data.fields]\nprompt_field = \"q\"\n[rollout]",
        ),
    )
    .unwrap();
    let err = failed_stderr(
        &bin()
            .args(["train", "--config"])
            .arg(&recipe)
            .output()
            .unwrap(),
    );
    assert!(err.contains("data.fields.prompt_field"), "{err}");
}
