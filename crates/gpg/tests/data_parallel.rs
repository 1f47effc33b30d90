//! Data-parallel training over the in-process thread group against one process, on the same
//! global batch (the acceptance test of issue 12; tests/mpi/run.sh is the MPI version).
//!
//! Expected: identical per-step reward, group counts, inverse_alpha and token counts (the
//! completions do not depend on the number of ranks); loss within 1e-5 relative; final weights
//! within 1e-5 relative (per tensor, ‖Δ‖/‖W‖) — the ranks' gradient sums are added in another
//! order than one process's, nothing else differs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gpg::train::collective::{Collective, ThreadGroup};
use gpg::train::metrics::{read_metrics, StepMetrics};
use gpg::train::{TrainConfig, Trainer};

/// A model's parameters by HF name.
type Weights = Vec<(String, Vec<f32>)>;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The demo recipe, shrunk: `steps` steps of B prompts × 4 completions of ≤ 24 tokens.
fn recipe(out: &Path, b: usize, steps: u64, extra: &[&str]) -> TrainConfig {
    let base = TrainConfig::from_toml_file(&repo().join("recipes/demo.toml")).unwrap();
    let mut set: Vec<String> = vec![
        format!(
            "model={:?}",
            repo().join("demo/model").display().to_string()
        ),
        format!("output_dir={:?}", out.display().to_string()),
        format!("steps={steps}"),
        format!("rollout.prompts_per_step={b}"),
        "rollout.num_generations=4".into(),
        "rollout.max_new_tokens=24".into(),
        "data.synthetic.n_train=64".into(),
        "data.synthetic.n_heldout=8".into(),
        "eval.every=2".into(),
        "logging.save_every=2".into(),
        "logging.progress=false".into(),
        "logging.log_completions=3".into(),
        "distributed.weight_check_every=1".into(),
    ];
    set.extend(extra.iter().map(|s| s.to_string()));
    base.with_overrides(&set).unwrap()
}

/// Runs `config` on `world` ranks (threads), `resume` or not; returns rank 0's metrics and
/// every rank's final weights.
fn run(config: &TrainConfig, world: usize, resume: bool) -> (Vec<StepMetrics>, Vec<Weights>) {
    let members = ThreadGroup::members(world, Duration::from_secs(120));
    let handles: Vec<_> = members
        .into_iter()
        .map(|m| {
            let config = config.clone();
            std::thread::spawn(move || -> anyhow::Result<Weights> {
                let collective: Arc<dyn Collective> = Arc::new(m);
                let mut t = Trainer::with_collective(config, resume, collective)?;
                t.train(None)?;
                weights(&t)
            })
        })
        .collect();
    let finals: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    let metrics = read_metrics(&config.output_dir.join("metrics.jsonl")).unwrap();
    (metrics, finals)
}

/// The model's weights, then (with LoRA) every A and B of its adapter.
fn weights(t: &Trainer) -> anyhow::Result<Weights> {
    let mut out: Weights = t
        .model
        .text()
        .weights
        .named()
        .into_iter()
        .map(|(n, w)| Ok((n, w.flatten_all()?.to_vec1::<f32>()?)))
        .collect::<anyhow::Result<_>>()?;
    if let Some(v) = t.model.vision() {
        for (n, w) in v.visual.named() {
            out.push((format!("visual.{n}"), w.flatten_all()?.to_vec1::<f32>()?));
        }
    }
    if let Some(adapter) = t.model.text().adapter() {
        for (module, pair) in adapter.modules() {
            out.push((
                format!("{module}.lora_A"),
                pair.a.flatten_all()?.to_vec1::<f32>()?,
            ));
            out.push((
                format!("{module}.lora_B"),
                pair.b.flatten_all()?.to_vec1::<f32>()?,
            ));
        }
    }
    Ok(out)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}

fn assert_same_run(one: &[StepMetrics], many: &[StepMetrics]) {
    assert_eq!(one.len(), many.len());
    for (a, b) in one.iter().zip(many) {
        let s = a.step;
        assert_eq!(a.reward, b.reward, "step {s}: reward");
        assert_eq!(a.rewards, b.rewards, "step {s}: per-function rewards");
        assert_eq!(a.groups, b.groups, "step {s}");
        assert_eq!(a.valid_groups, b.valid_groups, "step {s}: valid groups");
        assert_eq!(a.identical_groups, b.identical_groups, "step {s}");
        assert_eq!(a.inverse_alpha, b.inverse_alpha, "step {s}: inverse_alpha");
        assert_eq!(a.resample_rounds, b.resample_rounds, "step {s}");
        assert_eq!(a.tokens, b.tokens, "step {s}: tokens");
        assert_eq!(a.tokens_seen, b.tokens_seen, "step {s}");
        assert_eq!(a.completion_length_max, b.completion_length_max, "step {s}");
        assert_eq!(a.skipped, b.skipped, "step {s}");
        assert_eq!(a.eval_pass_at_1, b.eval_pass_at_1, "step {s}: eval");
        let rel = (a.loss - b.loss).abs() / a.loss.abs().max(1e-12);
        assert!(
            rel <= 1e-5,
            "step {s}: loss {} vs {} (rel {rel:e})",
            a.loss,
            b.loss
        );
        let rel = (a.grad_norm - b.grad_norm).abs() / a.grad_norm.abs().max(1e-12);
        assert!(
            rel <= 1e-5,
            "step {s}: grad_norm {} vs {}",
            a.grad_norm,
            b.grad_norm
        );
        assert!((a.entropy - b.entropy).abs() <= 1e-5 * a.entropy.abs().max(1e-12));
    }
}

fn assert_same_weights(one: &[(String, Vec<f32>)], finals: &[Weights]) {
    for rank in finals {
        // Every rank holds bit-identical replicas (checked each step by the digest too).
        assert_eq!(rank, &finals[0]);
    }
    // Over the whole model: ‖Δ‖/‖W‖ ≤ 1e-5.
    let flat =
        |w: &[(String, Vec<f32>)]| -> Vec<f32> { w.iter().flat_map(|(_, v)| v.clone()).collect() };
    let rel = rel_l2(&flat(one), &flat(&finals[0]));
    assert!(rel <= 1e-5, "whole model: relative difference {rel:e}");
    // Per tensor, the same bound, except the key biases: their gradient is zero in exact
    // arithmetic (softmax ignores the constant q·b_k that a key bias adds to every score of a
    // query), so what the engine computes for them is rounding noise, which AdamW divides by
    // its own RMS into lr-sized steps; the order of the ranks' sums changes that noise.
    for ((name, a), (_, b)) in one.iter().zip(&finals[0]) {
        let rel = rel_l2(a, b);
        let bound = if name.ends_with("k_proj.bias") {
            1e-3
        } else {
            1e-5
        };
        assert!(rel <= bound, "{name}: relative difference {rel:e}");
    }
}

#[test]
fn two_ranks_match_one_process_and_resume_at_another_world_size() {
    let dir = tempfile::tempdir().unwrap();
    // B = 5: shares of 3 and 2 groups; β_th resampling as in the demo (max 3 rounds).
    let one = recipe(&dir.path().join("one"), 5, 4, &[]);
    let two = recipe(&dir.path().join("two"), 5, 4, &[]);
    let (m1, w1) = run(&one, 1, false);
    let (m2, w2) = run(&two, 2, false);
    assert!(m1
        .iter()
        .any(|m| m.resample_rounds > 1 || m.valid_groups < m.groups));
    assert!(m1.iter().all(|m| m.time_comm_s == 0.0));
    assert!(m2.iter().all(|m| m.time_comm_s > 0.0));
    assert_same_run(&m1, &m2);
    assert_same_weights(&w1[0], &w2);
    // The completions log has rank 1's completions too when rank 0's share is too small.
    let logged = std::fs::read_to_string(two.output_dir.join("completions.jsonl")).unwrap();
    assert_eq!(logged.lines().count(), 3 * 4);
    // Rank 0 alone wrote the run folder, with verifiable checkpoints.
    assert!(two
        .output_dir
        .join("checkpoint-4/checkpoint_manifest.json")
        .is_file());

    // Resume the 2-rank run's checkpoint-2 at world 3 and at world 1: both continue as the
    // uninterrupted run did.
    for world in [3, 1] {
        let out = dir.path().join(format!("resume{world}"));
        std::fs::create_dir_all(&out).unwrap();
        copy_dir(
            &two.output_dir.join("checkpoint-2"),
            &out.join("checkpoint-2"),
        );
        let lines: Vec<String> = std::fs::read_to_string(two.output_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .take(2)
            .map(String::from)
            .collect();
        std::fs::write(out.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
        let cfg = recipe(&out, 5, 4, &[]);
        let (m, w) = run(&cfg, world, true);
        assert_same_run(&m1, &m);
        assert_same_weights(&w1[0], &w);
    }
}

#[test]
fn a_rank_with_only_identical_groups_and_a_rank_with_no_tokens() {
    // Two prompts, one whose gold answer no completion can match (its group is all-zero
    // rewards: identical) and one the model solves sometimes; B = 2 at world 3: every step one
    // rank holds the identical group, one the other, and rank 2 has no group at all.
    let dir = tempfile::tempdir().unwrap();
    let base = recipe(&dir.path().join("x"), 2, 1, &[]);
    let split = base.data.synthetic.generate().unwrap();
    let data = dir.path().join("two.jsonl");
    let mut lines = Vec::new();
    for (i, p) in split.train.iter().take(2).enumerate() {
        let answer = if i == 0 {
            "-987654321".to_string()
        } else {
            p.answer.clone()
        };
        lines.push(serde_json::json!({"problem": p.question, "answer": answer}).to_string());
    }
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let extra = [
        format!("data.train={:?}", data.display().to_string()),
        "rollout.num_generations=8".to_string(),
        "algorithm.resample.min_valid_share=0.0".to_string(),
        "eval.data=\"synthetic\"".to_string(),
    ];
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    // eval.data = synthetic needs data.train = synthetic: drop the periodic evaluation.
    let strip = |mut c: TrainConfig| {
        c.eval = None;
        c
    };
    let one = strip(recipe(&dir.path().join("one"), 2, 3, &extra));
    let three = strip(recipe(&dir.path().join("three"), 2, 3, &extra));
    let (m1, w1) = run(&one, 1, false);
    let (m3, w3) = run(&three, 3, false);
    assert!(m1.iter().all(|m| m.identical_groups >= 1), "{m1:?}");
    assert_same_run(&m1, &m3);
    assert_same_weights(&w1[0], &w3);
}

/// Runs `body(rank, collective)` on 2 thread ranks; returns their results.
fn on_two_ranks(
    body: impl Fn(Arc<dyn Collective>) -> Result<(), String> + Send + Sync + 'static,
) -> Vec<Result<(), String>> {
    let body = Arc::new(body);
    let handles: Vec<_> = ThreadGroup::members(2, Duration::from_secs(60))
        .into_iter()
        .map(|m| {
            let body = body.clone();
            std::thread::spawn(move || body(Arc::new(m)))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn a_rank_that_fails_ends_the_others_with_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = recipe(&dir.path().join("run"), 2, 3, &["eval.every=100"]);
    // Rank 1 fails after its first step (as the CLI does on an error, it aborts the group);
    // rank 0 is then waiting in step 2's first reduction and must fail, naming rank 1's error.
    let t0 = std::time::Instant::now();
    let c = cfg.clone();
    let out = on_two_ranks(move |collective| {
        let mut t = Trainer::with_collective(c.clone(), false, collective.clone())
            .map_err(|e| format!("{e:#}"))?;
        let result = if collective.rank() == 1 {
            t.train(Some(1))
                .and_then(|_| Err(anyhow::anyhow!("simulated failure: out of memory")))
        } else {
            t.train(None)
        };
        if let Err(e) = &result {
            collective.abort(&format!("{e:#}"));
        }
        result.map_err(|e| format!("{e:#}"))
    });
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert!(out[1].as_ref().unwrap_err().contains("simulated failure"));
    let e0 = out[0].as_ref().unwrap_err();
    assert!(
        e0.contains("rank 1 aborted: simulated failure: out of memory"),
        "{e0}"
    );

    // Ranks started with different recipes fail at once, both, saying so.
    let c = recipe(&dir.path().join("run2"), 2, 3, &[]);
    let out = on_two_ranks(move |collective| {
        let mut config = c.clone();
        if collective.rank() == 1 {
            config.optim.lr *= 2.0;
        }
        Trainer::with_collective(config, false, collective)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    });
    for r in out {
        assert!(r
            .unwrap_err()
            .contains("the recipe (after --set overrides) differs between ranks"));
    }
}

#[test]
fn resume_skips_a_truncated_newest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = recipe(&dir.path().join("run"), 2, 4, &["eval.every=100"]);
    let (full, _) = run(&cfg, 1, false);
    // Keep checkpoints 2 and 4 (keep_checkpoints = 2); truncate checkpoint-4's weights.
    let c4 = cfg.output_dir.join("checkpoint-4/model.safetensors");
    let bytes = std::fs::read(&c4).unwrap();
    std::fs::write(&c4, &bytes[..bytes.len() / 2]).unwrap();
    let mut t = Trainer::new(cfg.clone(), true).unwrap();
    assert_eq!(t.step, 2, "resumed from checkpoint-2");
    t.train(None).unwrap();
    let resumed = read_metrics(&cfg.output_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(resumed.len(), 4);
    assert_eq!(resumed[3].reward, full[3].reward);
    assert_eq!(resumed[3].loss, full[3].loss);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn lora_on_two_ranks_matches_one_process_and_resumes() {
    // The adapter is broadcast from rank 0 at start (also from a checkpoint only rank 0
    // reads) and its A/B gradients are all-reduced: the same run as one process.
    let dir = tempfile::tempdir().unwrap();
    let lora = ["lora.rank=4", "lora.alpha=8", "optim.lr=2e-3"];
    let one = recipe(&dir.path().join("one"), 4, 4, &lora);
    let two = recipe(&dir.path().join("two"), 4, 4, &lora);
    let (m1, w1) = run(&one, 1, false);
    let (m2, w2) = run(&two, 2, false);
    assert_same_run(&m1, &m2);
    assert_same_weights(&w1[0], &w2);
    // The adapter moved (B starts at zero).
    let trained_b = w1[0]
        .iter()
        .find(|(n, _)| n.ends_with("q_proj.lora_B"))
        .unwrap();
    assert!(trained_b.1.iter().any(|&x| x != 0.0));
    // Resume the 2-rank run's checkpoint-2 on 2 ranks: continues as the uninterrupted run.
    let out = dir.path().join("resume");
    std::fs::create_dir_all(&out).unwrap();
    copy_dir(
        &two.output_dir.join("checkpoint-2"),
        &out.join("checkpoint-2"),
    );
    let lines: Vec<String> = std::fs::read_to_string(two.output_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .take(2)
        .map(String::from)
        .collect();
    std::fs::write(out.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    let cfg = recipe(&out, 4, 4, &lora);
    let (m, w) = run(&cfg, 2, true);
    assert_same_run(&m1, &m);
    assert_same_weights(&w1[0], &w);
}

/// A Qwen2-VL run (the tiny fixture, the tower trained) on an image-question dataset: 2 ranks
/// compute what one process does, the tower's weights and gradients included.
#[test]
fn a_vision_language_run_on_two_ranks_matches_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = repo().join("tests/fixtures/qwen2_vl");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let images = ["rgb_37x23.png", "tiny_9x13.png", "grey_17x90.png"];
    for f in images {
        std::fs::copy(fixtures.join("images").join(f), data.join(f)).unwrap();
    }
    let mut lines = String::new();
    for (i, q) in ["w5 w7", "w9", "w3 w2", "w11", "w12 w13"]
        .iter()
        .enumerate()
    {
        let line = serde_json::json!({"question": q, "image": images[i % 3], "answer": "w4"});
        lines += &format!("{line}\n");
    }
    std::fs::write(data.join("train.jsonl"), lines).unwrap();
    let config = |out: &str| {
        TrainConfig::from_toml_str(&format!(
            r#"model = {model:?}
output_dir = {out:?}
steps = 3
seed = 0
[data]
train = {train:?}
[rollout]
prompts_per_step = 5
num_generations = 4
max_new_tokens = 4
temperature = 1.0
[algorithm]
loss = {{ name = "gpg" }}
micro_batch_tokens = 96
[optim]
lr = 1e-3
schedule = {{ kind = "constant" }}
[[reward.functions]]
name = "length"
weight = 0.1
[logging]
save_every = 0
progress = false
[distributed]
weight_check_every = 1
"#,
            model = fixtures.join("tiny_qwen2_vl").display().to_string(),
            out = dir.path().join(out).display().to_string(),
            train = data.join("train.jsonl").display().to_string(),
        ))
        .unwrap()
    };
    let (m1, w1) = run(&config("one"), 1, false);
    let (m2, w2) = run(&config("two"), 2, false);
    assert!(m1.iter().all(|m| m.skipped.is_none()), "every step updates");
    // The same completions and rewards; the loss is a sum of terms of both signs that nearly
    // cancel (group-centred advantages), so it is compared in absolute terms at the scale of
    // its terms (|A|·|log p| ~ 0.1).
    assert_eq!(m1.len(), m2.len());
    for (a, b) in m1.iter().zip(&m2) {
        let s = a.step;
        assert_eq!(a.rewards, b.rewards, "step {s}: rewards");
        assert_eq!(
            (a.valid_groups, a.tokens, a.completion_length_max),
            (b.valid_groups, b.tokens, b.completion_length_max),
            "step {s}"
        );
        assert!(
            (a.loss - b.loss).abs() <= 1e-6,
            "step {s}: loss {} vs {}",
            a.loss,
            b.loss
        );
        let rel = (a.grad_norm - b.grad_norm).abs() / a.grad_norm;
        assert!(
            rel <= 1e-4,
            "step {s}: grad_norm {} vs {}",
            a.grad_norm,
            b.grad_norm
        );
    }
    assert!(w1[0].iter().any(|(n, _)| n.starts_with("visual.")));
    assert_same_weights(&w1[0], &w2);
}
