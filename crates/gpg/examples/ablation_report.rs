//! The report of the small-scale GPG ablation (bench/ablation/run.sh, docs/ablation.md).
//!
//! ```text
//! cargo run --release -p gpg --example ablation_report -- RUN_DIR [--variants FILE]
//! ```
//!
//! Reads `RUN_DIR/<variant>/seed<k>/{metrics.jsonl,eval.jsonl}` for every variant listed in
//! the variants file (default bench/ablation/variants.tsv: the first column of each line that
//! is not a comment), prints a markdown report (held-out pass@1 mean ± sd over seeds, share of
//! invalid groups, mean α, time and tokens per step, the paired comparison of every variant
//! with GRPO over seeds, and whether the paper's ordering held) and writes it to
//! `RUN_DIR/ablation.md`, with the curves (mean over seeds, band = ± one sd) in
//! `RUN_DIR/ablation-curves.png`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use gpg::train::metrics::{read_metrics, StepMetrics};
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("../../../assets/DejaVuSans.ttf");

/// The paper's rows (Qwen2.5-Math-7B, average pass@1 of five benchmarks), by variant name.
const PAPER: [(&str, &str, f64); 6] = [
    (
        "grpo",
        "GRPO (std adv., clip 0.2, k3 KL β 0.04, per-seq.)",
        43.7,
    ),
    ("dr-grpo", "Dr.GRPO", 43.7),
    ("gpg-f1-a1", "GPG F_norm=1, α=1", 43.9),
    ("gpg-fstd-a1", "GPG F_norm=std, α=1", 45.3),
    ("gpg-alpha", "GPG F_norm=1, α=B/(B−M)", 47.8),
    ("gpg-alpha-bth", "GPG α=B/(B−M), β_th=0.6", 48.3),
];
/// The paper's ordering, worst first.
const PAPER_ORDER: [&str; 5] = [
    "grpo",
    "gpg-f1-a1",
    "gpg-fstd-a1",
    "gpg-alpha",
    "gpg-alpha-bth",
];
const BASELINE: &str = "grpo";
const FULL_GPG: &str = "gpg-alpha-bth";

/// One training run (one variant, one seed).
struct Run {
    seed: String,
    metrics: Vec<StepMetrics>,
    /// Held-out pass@1 by step; step 0 is before training.
    eval: Vec<(u64, f64)>,
}

impl Run {
    fn load(dir: &Path, seed: String) -> Result<Self> {
        let metrics = read_metrics(&dir.join("metrics.jsonl"))?;
        if metrics.is_empty() {
            bail!("{}: metrics.jsonl has no step", dir.display());
        }
        let path = dir.join("eval.jsonl");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let mut eval = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: malformed line", path.display(), i + 1))?;
            let step = v.get("step").and_then(|s| s.as_u64());
            let pass = v.get("pass_at_1").and_then(|s| s.as_f64());
            match (step, pass) {
                (Some(s), Some(p)) => eval.push((s, p)),
                _ => bail!(
                    "{}:{}: expected `step` and `pass_at_1`",
                    path.display(),
                    i + 1
                ),
            }
        }
        for m in &metrics {
            if let Some(p) = m.eval_pass_at_1 {
                eval.push((m.step, p));
            }
        }
        eval.sort_by_key(|e| e.0);
        eval.dedup_by_key(|e| e.0);
        Ok(Self {
            seed,
            metrics,
            eval,
        })
    }

    fn last_step(&self) -> u64 {
        self.metrics.last().map_or(0, |m| m.step)
    }

    /// Held-out pass@1 after the last step.
    fn final_pass(&self) -> Result<f64> {
        match self.eval.last() {
            Some(&(s, p)) if s == self.last_step() => Ok(p),
            _ => bail!(
                "seed {}: no held-out evaluation after the last step",
                self.seed
            ),
        }
    }

    fn mean_of(&self, f: impl Fn(&StepMetrics) -> Option<f64>) -> f64 {
        mean(&self.metrics.iter().filter_map(f).collect::<Vec<_>>())
    }
}

fn invalid_share(m: &StepMetrics) -> Option<f64> {
    (m.groups > 0).then(|| m.identical_groups as f64 / m.groups as f64)
}
fn alpha(m: &StepMetrics) -> Option<f64> {
    (m.inverse_alpha > 0.0).then(|| 1.0 / m.inverse_alpha)
}
fn accuracy(m: &StepMetrics) -> Option<f64> {
    Some(m.rewards.get("accuracy").unwrap_or(m.reward))
}
fn step_seconds(m: &StepMetrics) -> Option<f64> {
    Some(m.time_rollout_s + m.time_reward_s + m.time_update_s)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Sample standard deviation (n − 1); 0 for a single value.
fn sd(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// Two-sided 5% critical value of Student's t with `df` degrees of freedom.
fn t_critical(df: usize) -> f64 {
    const T: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    T.get(df.wrapping_sub(1)).copied().unwrap_or(1.96)
}

struct Variant {
    name: String,
    label: String,
    paper: Option<f64>,
    runs: Vec<Run>,
}

impl Variant {
    fn finals(&self) -> Result<Vec<f64>> {
        self.runs
            .iter()
            .map(|r| r.final_pass().map(|p| 100.0 * p))
            .collect::<Result<_>>()
            .with_context(|| format!("variant {}", self.name))
    }

    fn over_seeds(&self, f: impl Fn(&Run) -> f64) -> Vec<f64> {
        self.runs.iter().map(f).collect()
    }

    fn final_mean(&self) -> Result<f64> {
        Ok(mean(&self.finals()?))
    }
}

fn variant_names(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the variants", path.display()))?;
    let names: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split('\t').next().map(|n| n.trim().to_string()))
        .collect();
    if names.is_empty() {
        bail!("{}: no variant listed", path.display());
    }
    Ok(names)
}

fn load_variants(run_dir: &Path, names: &[String]) -> Result<Vec<Variant>> {
    let mut variants = Vec::new();
    for name in names {
        let dir = run_dir.join(name);
        if !dir.is_dir() {
            eprintln!("{}: missing, variant {name} left out", dir.display());
            continue;
        }
        let mut seeds: Vec<(u64, PathBuf)> = Vec::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("{}: cannot list", dir.display()))?
        {
            let path = entry?.path();
            let seed = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("seed"))
                .and_then(|s| s.parse::<u64>().ok());
            if let (Some(seed), true) = (seed, path.join("metrics.jsonl").is_file()) {
                seeds.push((seed, path));
            }
        }
        seeds.sort();
        let runs = seeds
            .into_iter()
            .map(|(seed, path)| Run::load(&path, seed.to_string()))
            .collect::<Result<Vec<_>>>()?;
        if runs.is_empty() {
            eprintln!("{}: no seed<k> run, variant {name} left out", dir.display());
            continue;
        }
        let (label, paper) = PAPER
            .iter()
            .find(|p| p.0 == name)
            .map_or((name.clone(), None), |p| (p.1.to_string(), Some(p.2)));
        variants.push(Variant {
            name: name.clone(),
            label,
            paper,
            runs,
        });
    }
    if variants.is_empty() {
        bail!("{}: no variant run found", run_dir.display());
    }
    Ok(variants)
}

fn pm(v: &[f64], digits: usize) -> String {
    if v.len() < 2 {
        format!("{:.*}", digits, mean(v))
    } else {
        format!("{:.*} ± {:.*}", digits, mean(v), digits, sd(v))
    }
}

fn report(variants: &[Variant]) -> Result<String> {
    let mut md = String::new();
    let seeds = variants.iter().map(|v| v.runs.len()).max().unwrap_or(0);
    let steps = variants
        .iter()
        .flat_map(|v| v.runs.iter().map(Run::last_step))
        .max()
        .unwrap_or(0);
    writeln!(
        md,
        "Held-out pass@1 after {steps} steps, mean ± sd over {seeds} seed(s); the other \
         columns are means over steps, then over seeds.\n"
    )?;
    writeln!(
        md,
        "| variant | paper (7B) | held-out pass@1 % | per seed | before | invalid groups % \
         (all-correct / all-wrong) | mean α | rounds/step | s/step (rollout + update) | \
         tokens/step |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
    for v in variants {
        let finals = v.finals()?;
        let before = v.over_seeds(|r| r.eval.first().map_or(f64::NAN, |e| 100.0 * e.1));
        let invalid = v.over_seeds(|r| 100.0 * r.mean_of(invalid_share));
        let easy = v.over_seeds(|r| {
            100.0 * r.mean_of(|m| (m.groups > 0).then(|| m.easy_groups as f64 / m.groups as f64))
        });
        let hard = v.over_seeds(|r| {
            100.0 * r.mean_of(|m| (m.groups > 0).then(|| m.hard_groups as f64 / m.groups as f64))
        });
        let alphas = v.over_seeds(|r| r.mean_of(alpha));
        let rounds = v.over_seeds(|r| r.mean_of(|m| Some(m.resample_rounds as f64)));
        let secs = v.over_seeds(|r| r.mean_of(step_seconds));
        let rollout = v.over_seeds(|r| r.mean_of(|m| Some(m.time_rollout_s)));
        let update = v.over_seeds(|r| r.mean_of(|m| Some(m.time_update_s)));
        let tokens = v.over_seeds(|r| r.mean_of(|m| Some(m.tokens as f64)));
        let per_seed: Vec<String> = finals.iter().map(|f| format!("{f:.1}")).collect();
        writeln!(
            md,
            "| {} | {} | **{}** | {} | {:.1} | {:.1} ({:.1} / {:.1}) | {:.2} | {:.2} | {:.2} \
             ({:.2} + {:.2}) | {:.0} |",
            v.label,
            v.paper.map_or("–".into(), |p| format!("{p:.1}")),
            pm(&finals, 1),
            per_seed.join(", "),
            mean(&before),
            mean(&invalid),
            mean(&easy),
            mean(&hard),
            mean(&alphas),
            mean(&rounds),
            mean(&secs),
            mean(&rollout),
            mean(&update),
            mean(&tokens),
        )?;
    }

    writeln!(
        md,
        "\n\"Invalid\" groups have G identical rewards (M of the B groups; in the β_th run, \
         of the assembled batch). α = B/(B−M) is logged for every variant but scales the \
         loss only in the two `α` rows. s/step excludes the held-out evaluations; \
         tokens/step are the completion tokens of the update.\n"
    )?;

    // Paired comparison with GRPO, seed by seed.
    if let Some(base) = variants.iter().find(|v| v.name == BASELINE) {
        let base_finals: Vec<(String, f64)> = base
            .runs
            .iter()
            .map(|r| r.final_pass().map(|p| (r.seed.clone(), 100.0 * p)))
            .collect::<Result<_>>()?;
        writeln!(
            md,
            "Paired comparison with GRPO (same seed: same data order and sampling seeds), \
             held-out pass@1 difference in points:\n"
        )?;
        writeln!(
            md,
            "| variant − GRPO | per seed | mean ± sd | wins | paired t (df) | 5% two-sided |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|")?;
        for v in variants.iter().filter(|v| v.name != BASELINE) {
            let mut diffs = Vec::new();
            for r in &v.runs {
                if let Some((_, b)) = base_finals.iter().find(|(s, _)| *s == r.seed) {
                    diffs.push(100.0 * r.final_pass()? - b);
                }
            }
            if diffs.is_empty() {
                continue;
            }
            let n = diffs.len();
            let (t, verdict) = if n >= 2 && sd(&diffs) > 0.0 {
                let t = mean(&diffs) / (sd(&diffs) / (n as f64).sqrt());
                let crit = t_critical(n - 1);
                (
                    format!("{t:.2} ({})", n - 1),
                    if t.abs() > crit {
                        format!("significant (\\|t\\| > {crit:.2})")
                    } else {
                        format!("not significant (\\|t\\| ≤ {crit:.2})")
                    },
                )
            } else {
                ("–".into(), "needs ≥ 2 seeds".into())
            };
            let name = if v.name == FULL_GPG {
                format!("**{}**", v.label)
            } else {
                v.label.clone()
            };
            let per_seed: Vec<String> = diffs.iter().map(|d| format!("{d:+.1}")).collect();
            writeln!(
                md,
                "| {name} | {} | {:+.1} ± {:.1} | {}/{n} | {t} | {verdict} |",
                per_seed.join(", "),
                mean(&diffs),
                sd(&diffs),
                diffs.iter().filter(|d| **d > 0.0).count(),
            )?;
        }
        writeln!(md)?;
    }

    // The paper's ordering.
    let ordered: Vec<&Variant> = PAPER_ORDER
        .iter()
        .filter_map(|n| variants.iter().find(|v| v.name == *n))
        .collect();
    if ordered.len() == PAPER_ORDER.len() {
        let mut chain = String::new();
        let mut inversions = Vec::new();
        for (i, v) in ordered.iter().enumerate() {
            let m = v.final_mean()?;
            if i > 0 {
                let prev = ordered[i - 1].final_mean()?;
                chain.push_str(if m > prev { " < " } else { " ≥ " });
                if m <= prev {
                    inversions.push(format!("{} ≥ {}", ordered[i - 1].name, v.name));
                }
            }
            write!(chain, "{} {m:.1}", v.name)?;
        }
        writeln!(
            md,
            "Paper's ordering GRPO < F_norm=1,α=1 < F_norm=std,α=1 < α < α+β_th on the means: \
             {chain} → **{}**{}.",
            if inversions.is_empty() {
                "held"
            } else {
                "did not hold"
            },
            if inversions.is_empty() {
                String::new()
            } else {
                format!(" (inverted: {})", inversions.join(", "))
            }
        )?;
    } else {
        writeln!(
            md,
            "Paper's ordering: not checked (needs all of {}).",
            PAPER_ORDER.join(", ")
        )?;
    }
    Ok(md)
}

/// Mean ± sd over seeds of a per-step series (centred moving average over `window` steps).
fn band(v: &Variant, f: &dyn Fn(&StepMetrics) -> Option<f64>, window: usize) -> Vec<[f64; 3]> {
    let series: Vec<Vec<(u64, f64)>> = v
        .runs
        .iter()
        .map(|r| {
            let raw: Vec<(u64, f64)> = r
                .metrics
                .iter()
                .filter_map(|m| f(m).map(|y| (m.step, y)))
                .collect();
            let h = window / 2;
            (0..raw.len())
                .map(|i| {
                    let lo = i.saturating_sub(h);
                    let hi = (i + h + 1).min(raw.len());
                    let ys: Vec<f64> = raw[lo..hi].iter().map(|p| p.1).collect();
                    (raw[i].0, mean(&ys))
                })
                .collect()
        })
        .collect();
    points_over_seeds(&series)
}

/// [x, mean, sd] at each x that every seed has.
fn points_over_seeds(series: &[Vec<(u64, f64)>]) -> Vec<[f64; 3]> {
    let Some(first) = series.first() else {
        return Vec::new();
    };
    first
        .iter()
        .filter_map(|&(x, _)| {
            let ys: Vec<f64> = series
                .iter()
                .filter_map(|s| s.iter().find(|p| p.0 == x).map(|p| p.1))
                .collect();
            (ys.len() == series.len()).then(|| [x as f64, mean(&ys), sd(&ys)])
        })
        .collect()
}

const COLORS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(0, 0, 0),
];

fn plot(variants: &[Variant], path: &Path) -> Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("cannot load the embedded font"))?;
    let err = |e: &dyn std::fmt::Display| anyhow!("{}: cannot draw: {e}", path.display());
    let root = BitMapBackend::new(path, (1400, 960)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let last = variants
        .iter()
        .flat_map(|v| v.runs.iter().map(Run::last_step))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let window = 5;
    type Series<'a> = &'a dyn Fn(&Variant) -> Vec<[f64; 3]>;
    let heldout = |v: &Variant| {
        let s: Vec<Vec<(u64, f64)>> = v
            .runs
            .iter()
            .map(|r| r.eval.iter().map(|&(x, y)| (x, 100.0 * y)).collect())
            .collect();
        points_over_seeds(&s)
    };
    let train = |v: &Variant| band(v, &|m| accuracy(m).map(|a| 100.0 * a), window);
    let invalid = |v: &Variant| band(v, &|m| invalid_share(m).map(|s| 100.0 * s), window);
    let alphas = |v: &Variant| band(v, &alpha, window);
    let panels: [(&str, &str, Series); 4] = [
        ("held-out pass@1 (%)", "held-out pass@1", &heldout),
        (
            "training accuracy (%), all samples, 5-step mean",
            "training accuracy",
            &train,
        ),
        (
            "invalid (identical-reward) groups (%), 5-step mean",
            "invalid groups",
            &invalid,
        ),
        ("α = B/(B−M), 5-step mean", "alpha", &alphas),
    ];
    let areas = root.split_evenly((2, 2));
    for (k, (area, (title, _, series))) in areas.iter().zip(panels.iter()).enumerate() {
        let data: Vec<Vec<[f64; 3]>> = variants.iter().map(series).collect();
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for p in data.iter().flatten() {
            lo = lo.min(p[1] - p[2]);
            hi = hi.max(p[1] + p[2]);
        }
        if !lo.is_finite() || !hi.is_finite() {
            continue;
        }
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(area)
            .caption(*title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..last, (lo - pad)..(hi + pad))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (v, pts)) in variants.iter().zip(&data).enumerate() {
            let color = COLORS[i % COLORS.len()];
            if pts.iter().any(|p| p[2] > 0.0) {
                let mut poly: Vec<(f64, f64)> = pts.iter().map(|p| (p[0], p[1] + p[2])).collect();
                poly.extend(pts.iter().rev().map(|p| (p[0], p[1] - p[2])));
                chart
                    .draw_series(std::iter::once(Polygon::new(
                        poly,
                        color.mix(0.12).filled(),
                    )))
                    .map_err(|e| err(&e))?;
            }
            let line: Vec<(f64, f64)> = pts.iter().map(|p| (p[0], p[1])).collect();
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(v.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        if k == 0 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut run_dir: Option<PathBuf> = None;
    let mut variants_file = PathBuf::from("bench/ablation/variants.tsv");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--variants" => {
                variants_file = args
                    .next()
                    .map(PathBuf::from)
                    .context("--variants needs a file")?
            }
            "-h" | "--help" => {
                println!("usage: ablation_report RUN_DIR [--variants FILE]");
                return Ok(());
            }
            other if run_dir.is_none() && !other.starts_with('-') => {
                run_dir = Some(PathBuf::from(other))
            }
            other => bail!(
                "unexpected argument {other:?} (usage: ablation_report RUN_DIR [--variants FILE])"
            ),
        }
    }
    let run_dir = run_dir.context("usage: ablation_report RUN_DIR [--variants FILE]")?;
    let names = variant_names(&variants_file)?;
    let variants = load_variants(&run_dir, &names)?;
    let md = report(&variants)?;
    let md_path = run_dir.join("ablation.md");
    std::fs::write(&md_path, &md)
        .with_context(|| format!("{}: cannot write", md_path.display()))?;
    let png = run_dir.join("ablation-curves.png");
    plot(&variants, &png)?;
    print!("{md}");
    println!("\n(written to {} and {})", md_path.display(), png.display());
    Ok(())
}
