//! Timing and throughput of `is_correct` on benchmark gold answers against perturbed
//! predictions.
//!
//! Usage: `cargo run --release -p mathverify --example throughput -- [FILE.jsonl ...]`
//! Without arguments it reads the vendored `data/benchmarks/{math500,gsm8k}/test.jsonl` and,
//! when `GPG_RL_DATA` is set, `{aime24,amc23,minerva_math,olympiadbench}/test.jsonl` there.
//!
//! For every gold g it builds eight predictions (boxed g; a digit changed; g+1; −g; a long
//! reasoning text ending in "The final answer is $g$. I hope it is correct."; "answer: g";
//! two adjacent boxes; g inside <answer> tags), times each `is_correct(g, pred)` call and
//! prints: per benchmark the share of golds whose boxed copy verifies and the share of
//! perturbed copies rejected; the worst time of one call; the throughput for 10,000 pairs on
//! one thread and on all threads.

use std::path::{Path, PathBuf};
use std::time::Instant;

fn last_boxed(text: &str) -> Option<String> {
    let start = text.rfind("\\boxed{")?;
    let rest = &text[start + 6..];
    let mut depth = 0usize;
    for (i, c) in rest.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(rest[1..i].trim().to_string());
                }
            }
            _ => {}
        }
    }
    None
}

/// The gold answers of a benchmark file (same field rules as gpg's benchmark loader).
fn golds(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let g = if let Some(fa) = v.get("final_answer").and_then(|x| x.as_array()) {
            fa.iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        } else if let Some(a) = v.get("answer") {
            match a {
                serde_json::Value::String(s) => match s.rfind("#### ") {
                    Some(p) => s[p + 5..].trim().to_string(),
                    None => s.trim_end_matches(".0").to_string(),
                },
                other => other.to_string().trim_end_matches(".0").to_string(),
            }
        } else if let Some(s) = v
            .get("solution")
            .and_then(|x| x.as_str())
            .and_then(last_boxed)
        {
            s
        } else {
            continue;
        };
        out.push(g);
    }
    out
}

fn bump_first_digit(s: &str) -> Option<String> {
    let pos = s.find(|c: char| c.is_ascii_digit())?;
    let d = s.as_bytes()[pos] - b'0';
    let nd = (d + 1) % 10;
    Some(format!("{}{}{}", &s[..pos], nd, &s[pos + 1..]))
}

const REASONING: &str = "We first note that $x = 3$ satisfies $x^2 - 9 = 0$, and that 12 apples cost \\$4.50 in total. \
Substituting, \\[ y = \\frac{2}{3} x + 1 = 3 \\] and the remaining 7 cases give 1,250 outcomes. ";

/// (prediction, should be correct)
fn predictions(gold: &str) -> Vec<(String, bool)> {
    let g = gold.trim().trim_matches('$').to_string();
    let mut v = vec![(format!("So the answer is $\\boxed{{{g}}}$."), true)];
    if let Some(b) = bump_first_digit(&g) {
        v.push((format!("So the answer is $\\boxed{{{b}}}$."), false));
    }
    v.push((format!("\\boxed{{{g}+1}}"), false));
    if g != "0" {
        v.push((format!("\\boxed{{-({g})}}"), false));
    }
    v.push((
        format!(
            "{}Final Answer: The final answer is ${g}$. I hope it is correct.",
            REASONING.repeat(12)
        ),
        true,
    ));
    v.push((format!("answer: ${g}$"), true));
    v.push((format!("\\boxed{{{g}}}\\boxed{{{g}}}"), true));
    v.push((format!("<answer>{g}</answer>"), true));
    v
}

fn main() {
    let mut files: Vec<(String, PathBuf)> = std::env::args()
        .skip(1)
        .map(|p| (p.clone(), PathBuf::from(p)))
        .collect();
    if files.is_empty() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/benchmarks");
        for n in ["math500", "gsm8k"] {
            files.push((n.into(), root.join(n).join("test.jsonl")));
        }
        if let Some(d) = std::env::var_os("GPG_RL_DATA") {
            for n in ["aime24", "amc23", "minerva_math", "olympiadbench"] {
                files.push((n.into(), PathBuf::from(&d).join(n).join("test.jsonl")));
            }
        }
    }
    let mut pairs: Vec<(String, String, bool)> = Vec::new();
    let mut worst = (0f64, String::new(), String::new());
    let mut worst_raw = 0f64;
    println!("| benchmark | golds | boxed copy verifies | perturbed copies rejected | anchored copies verify |");
    println!("|---|---:|---:|---:|---:|");
    for (name, path) in &files {
        let gs = golds(path);
        if gs.is_empty() {
            println!("| {name} | not available | | | |");
            continue;
        }
        let (mut boxed_ok, mut neg_ok, mut neg_n, mut pos_ok, mut pos_n) = (0, 0, 0, 0, 0);
        for g in &gs {
            for (k, (p, should)) in predictions(g).into_iter().enumerate() {
                // the time of one call: the fastest of three runs (the others may include
                // preemption by other processes on a shared machine); the slowest raw run too
                let mut ms = f64::INFINITY;
                let mut got = false;
                for _ in 0..3 {
                    let t0 = Instant::now();
                    got = mathverify::is_correct(g, &p);
                    let t = t0.elapsed().as_secs_f64() * 1e3;
                    ms = ms.min(t);
                    worst_raw = worst_raw.max(t);
                }
                if ms > worst.0 {
                    worst = (ms, g.clone(), p.chars().take(120).collect());
                }
                if got != should && std::env::var_os("MV_VERBOSE").is_some() {
                    println!(
                        "  mismatch ({name}) expected {should}: gold {g:?} pred {:?}",
                        p.chars().take(200).collect::<String>()
                    );
                }
                if k == 0 {
                    boxed_ok += got as usize;
                } else if should {
                    pos_n += 1;
                    pos_ok += got as usize;
                } else {
                    neg_n += 1;
                    neg_ok += (!got) as usize;
                }
                pairs.push((g.clone(), p, should));
            }
        }
        let pct = |a: usize, b: usize| 100.0 * a as f64 / b.max(1) as f64;
        println!(
            "| {name} | {} | {:.1}% | {:.1}% | {:.1}% |",
            gs.len(),
            pct(boxed_ok, gs.len()),
            pct(neg_ok, neg_n),
            pct(pos_ok, pos_n)
        );
    }
    // adversarial inputs: long texts, many spans, big sets, deep nesting
    let many_envs = "We have $x_1 = 3$ and \\(y\\) then 12, 13 and answer: $z$ so ".repeat(2000);
    let long_set = format!(
        "\\boxed{{\\{{{}\\}}}}",
        (1..=300)
            .map(|k| format!("\\frac{{{k}}}{{7}}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let long_set_rev = format!(
        "\\boxed{{\\{{{}\\}}}}",
        (1..=300)
            .rev()
            .map(|k| format!("\\frac{{{}}}{{7}}", k))
            .collect::<Vec<_>>()
            .join(",")
    );
    let tuples = format!(
        "\\boxed{{{}}}",
        (1..=60)
            .map(|k| format!("({k},{},{})", k + 1, k * 2))
            .collect::<Vec<_>>()
            .join(",")
    );
    let deep = format!("\\boxed{{{}x{}}}", "(".repeat(60), ")".repeat(60));
    let too_deep = format!("\\boxed{{{}x{}}}", "(".repeat(1000), ")".repeat(1000));
    let powers = "\\boxed{2^{3^{4^{5^{6^{7}}}}} + 100000! + \\binom{100000}{50000}}".to_string();
    let adversarial: Vec<(&str, String, String)> = vec![
        (
            "100k-char text, 8000 spans",
            "3".to_string(),
            many_envs.clone(),
        ),
        (
            "300-element sets (over the limits: false)",
            long_set.clone(),
            long_set_rev.clone(),
        ),
        ("60 tuples", tuples.clone(), tuples.clone()),
        ("60 nested parentheses", "x".to_string(), deep.clone()),
        (
            "1000 nested parentheses (over the limit: false)",
            "x".to_string(),
            too_deep.clone(),
        ),
        ("huge powers/factorials", "1".to_string(), powers.clone()),
        ("unclosed boxes", "1".to_string(), "\\boxed{".repeat(5000)),
        ("dollar signs", "1".to_string(), "$".repeat(50_000)),
    ];
    println!("\n| adversarial input | result | time (fastest of 3) |\n|---|---|---:|");
    for (label, g, p) in &adversarial {
        let mut best = f64::INFINITY;
        let mut got = false;
        for _ in 0..3 {
            let t0 = Instant::now();
            got = mathverify::is_correct(g, p);
            best = best.min(t0.elapsed().as_secs_f64() * 1e3);
        }
        println!("| {label} | {got} | {best:.3} ms |");
    }
    if pairs.is_empty() {
        eprintln!("no benchmark files found");
        std::process::exit(1);
    }
    println!(
        "\npairs timed: {}; worst single call (fastest of 3 runs): {:.3} ms (gold {:?}, pred {:?}…); slowest raw run: {:.3} ms",
        pairs.len(),
        worst.0,
        worst.1,
        worst.2,
        worst_raw
    );
    let n = 10_000usize;
    let batch: Vec<&(String, String, bool)> = pairs.iter().cycle().take(n).collect();
    let t0 = Instant::now();
    let mut correct = 0usize;
    for (g, p, _) in &batch {
        correct += mathverify::is_correct(g, p) as usize;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "throughput, 1 thread: {n} pairs in {:.3} s = {:.0} pairs/s ({correct} correct)",
        secs,
        n as f64 / secs
    );
    let threads = std::thread::available_parallelism()
        .map(|x| x.get())
        .unwrap_or(1);
    let t0 = Instant::now();
    let chunk = n.div_ceil(threads);
    let total: usize = std::thread::scope(|s| {
        let handles: Vec<_> = batch
            .chunks(chunk)
            .map(|c| {
                s.spawn(move || {
                    c.iter()
                        .filter(|(g, p, _)| mathverify::is_correct(g, p))
                        .count()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let secs = t0.elapsed().as_secs_f64();
    println!("throughput, {threads} threads: {n} pairs in {:.3} s = {:.0} pairs/s ({total} correct, same as 1 thread: {})", secs, n as f64 / secs, total == correct);
}
