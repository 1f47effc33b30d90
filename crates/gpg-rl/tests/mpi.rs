//! `mpirun -np 2 gpg-rl train` against one process on the same global batch (issue 12's
//! acceptance test over MPI; the thread-group version is crates/gpg/tests/data_parallel.rs).
//! Built only with `--features mpi`; run by tests/mpi/run.sh (and .ci/run), which installs
//! OpenMPI first. As root OpenMPI needs `--allow-run-as-root`; on 2 cores `--oversubscribe`.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `train` on the shrunk demo recipe (B = 5 prompts × 4 completions, β_th resampling).
fn train_args(out: &Path, steps: u64) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "train".into(),
        "--config".into(),
        repo().join("recipes/demo.toml").display().to_string(),
        "--model".into(),
        repo().join("demo/model").display().to_string(),
        "--output-dir".into(),
        out.display().to_string(),
        "--steps".into(),
        steps.to_string(),
        "--quiet".into(),
    ];
    for s in [
        "rollout.prompts_per_step=5",
        "rollout.num_generations=4",
        "rollout.max_new_tokens=24",
        "data.synthetic.n_train=64",
        "data.synthetic.n_heldout=8",
        "eval.every=2",
        "logging.save_every=2",
        "distributed.weight_check_every=1",
    ] {
        a.push("--set".into());
        a.push(s.into());
    }
    a
}

fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &np.to_string(),
    ])
    .arg(env!("CARGO_BIN_EXE_gpg-rl"))
    .env("RAYON_NUM_THREADS", "1");
    c
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn f32_tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let v = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}

#[test]
fn two_mpi_ranks_match_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    let status = Command::new(env!("CARGO_BIN_EXE_gpg-rl"))
        .args(train_args(&one, 4))
        .env("RAYON_NUM_THREADS", "2")
        .status()
        .unwrap();
    assert!(status.success());
    let out = mpirun(2).args(train_args(&two, 4)).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("data-parallel run: 2 ranks over mpi"),
        "{stderr}"
    );
    let (m1, m2) = (metrics(&one), metrics(&two));
    assert_eq!(m1.len(), 4);
    assert_eq!(m1.len(), m2.len());
    for (a, b) in m1.iter().zip(&m2) {
        for key in [
            "reward",
            "reward_std",
            "rewards/accuracy/mean",
            "groups",
            "valid_groups",
            "identical_groups",
            "inverse_alpha",
            "resample_rounds",
            "tokens",
            "tokens_seen",
            "completions/max_length",
            "completions/mean_length",
            "num_tokens",
            "epoch",
            "eval_pass_at_1",
            "skipped",
        ] {
            assert_eq!(a[key], b[key], "step {}: {key}", a["step"]);
        }
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!(
            (la - lb).abs() <= 1e-5 * la.abs().max(1e-12),
            "loss {la} vs {lb}"
        );
        assert!(b["time_comm_s"].as_f64().unwrap() > 0.0);
    }
    // Final weights: ‖Δ‖/‖W‖ ≤ 1e-5 over the model and per tensor, except the key biases
    // (zero gradient in exact arithmetic: see crates/gpg/tests/data_parallel.rs).
    let w1 = f32_tensors(&one.join("final/model.safetensors"));
    let w2 = f32_tensors(&two.join("final/model.safetensors"));
    let flat =
        |w: &[(String, Vec<f32>)]| -> Vec<f32> { w.iter().flat_map(|(_, v)| v.clone()).collect() };
    assert!(rel_l2(&flat(&w1), &flat(&w2)) <= 1e-5);
    for ((name, a), (_, b)) in w1.iter().zip(&w2) {
        let bound = if name.ends_with("k_proj.bias") {
            1e-3
        } else {
            1e-5
        };
        assert!(rel_l2(a, b) <= bound, "{name}: {:e}", rel_l2(a, b));
    }

    // Resume the 2-rank run from its checkpoint-2 with one process: it continues identically.
    let three = dir.path().join("resumed");
    std::fs::create_dir_all(&three).unwrap();
    let status = Command::new("cp")
        .arg("-r")
        .arg(two.join("checkpoint-2"))
        .arg(&three)
        .status()
        .unwrap();
    assert!(status.success());
    let first_two: Vec<String> = std::fs::read_to_string(two.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .take(2)
        .map(String::from)
        .collect();
    std::fs::write(three.join("metrics.jsonl"), first_two.join("\n") + "\n").unwrap();
    let mut args = train_args(&three, 4);
    args.push("--resume".into());
    let status = Command::new(env!("CARGO_BIN_EXE_gpg-rl"))
        .args(args)
        .status()
        .unwrap();
    assert!(status.success());
    let m3 = metrics(&three);
    assert_eq!(m3[3]["reward"], m2[3]["reward"]);
    assert_eq!(m3[3]["tokens"], m2[3]["tokens"]);
}

#[test]
fn three_ranks_with_an_all_identical_rank_and_an_empty_rank_match_one_process() {
    // Two prompts, one whose gold answer no completion can match (all-zero rewards: an
    // identical group); B = 2 on 3 ranks: one rank holds the identical group, rank 2 none.
    let dir = tempfile::tempdir().unwrap();
    let base = gpg::train::TrainConfig::from_toml_file(&repo().join("recipes/demo.toml")).unwrap();
    let split = base.data.synthetic.generate().unwrap();
    let data = dir.path().join("two.jsonl");
    let lines: Vec<String> = split
        .train
        .iter()
        .take(2)
        .enumerate()
        .map(|(i, p)| {
            let answer = if i == 0 {
                "-987654321"
            } else {
                p.answer.as_str()
            };
            serde_json::json!({"problem": p.question, "answer": answer}).to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    // The demo recipe without its [eval] section (it evaluates on the synthetic task).
    let demo = std::fs::read_to_string(repo().join("recipes/demo.toml")).unwrap();
    let (head, tail) = demo.split_once("[eval]").unwrap();
    let recipe = dir.path().join("recipe.toml");
    std::fs::write(
        &recipe,
        format!("{head}{}", &tail[tail.find("[logging]").unwrap()..]),
    )
    .unwrap();
    let args = |out: &Path| {
        let mut a: Vec<String> = vec![
            "train".into(),
            "--config".into(),
            recipe.display().to_string(),
            "--model".into(),
            repo().join("demo/model").display().to_string(),
            "--output-dir".into(),
            out.display().to_string(),
            "--steps".into(),
            "3".into(),
            "--quiet".into(),
        ];
        for s in [
            format!("data.train={:?}", data.display().to_string()),
            "rollout.prompts_per_step=2".into(),
            "rollout.num_generations=8".into(),
            "rollout.max_new_tokens=24".into(),
            "algorithm.resample.min_valid_share=0.0".into(),
            "distributed.weight_check_every=1".into(),
        ] {
            a.push("--set".into());
            a.push(s);
        }
        a
    };
    let (one, three) = (dir.path().join("one"), dir.path().join("three"));
    let status = Command::new(env!("CARGO_BIN_EXE_gpg-rl"))
        .args(args(&one))
        .status()
        .unwrap();
    assert!(status.success());
    let out = mpirun(3).args(args(&three)).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (m1, m3) = (metrics(&one), metrics(&three));
    assert_eq!(m1.len(), 3);
    for (a, b) in m1.iter().zip(&m3) {
        assert!(a["identical_groups"].as_u64().unwrap() >= 1);
        for key in [
            "reward",
            "valid_groups",
            "inverse_alpha",
            "tokens",
            "skipped",
        ] {
            assert_eq!(a[key], b[key], "step {}: {key}", a["step"]);
        }
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!(
            (la - lb).abs() <= 1e-5 * la.abs().max(1e-12),
            "loss {la} vs {lb}"
        );
    }
}

#[test]
fn an_error_on_rank_0_ends_every_rank() {
    // --resume on an empty run folder: rank 0's error, shared with rank 1; the job ends.
    let dir = tempfile::tempdir().unwrap();
    let mut args = train_args(&dir.path().join("empty"), 2);
    args.push("--resume".into());
    let t0 = Instant::now();
    let out = mpirun(2).args(args).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--resume given but the run folder holds no checkpoint"),
        "{stderr}"
    );
    assert!(t0.elapsed() < Duration::from_secs(60));
}

#[test]
fn a_killed_rank_ends_the_job_within_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut child = mpirun(2)
        .args(train_args(&out, 200))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first step, then SIGKILL one rank (a child process of mpirun).
    let t0 = Instant::now();
    while !out.join("metrics.jsonl").is_file()
        || std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .is_empty()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no step after 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let ranks = children_of(child.id());
    assert!(!ranks.is_empty());
    let victim = *ranks.iter().max().unwrap();
    // SAFETY: plain kill(2) of a process this test started (through mpirun).
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let killed = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success());
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "the job still runs 60 s after a rank was killed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "job ended {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
}

/// Process ids whose parent is `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let ppid: u32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if ppid == pid {
            out.push(p);
        }
    }
    out
}
