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
