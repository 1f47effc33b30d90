//! `gpg-rl bench products`: the rate of the engine's matrix products (the three products of
//! each linear layer of a Qwen2 shape at T tokens) with bf16 weights, and f32 ones, beside
//! PyTorch on the same shapes in the same run (bench/compare/torch_products.py).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use gpg::model::ops::{self, ProductCase};

#[derive(Args)]
pub struct ProductsArgs {
    /// Tokens (rows of the activations).
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Hidden size (default: Qwen2.5-0.5B's).
    #[arg(long, default_value_t = 896)]
    pub hidden: usize,
    /// Key/value projection width (kv heads × head dim).
    #[arg(long, default_value_t = 128)]
    pub kv: usize,
    /// Intermediate (MLP) size.
    #[arg(long, default_value_t = 4864)]
    pub intermediate: usize,
    /// Timed runs per product (after one warm-up); the best is reported.
    #[arg(long, default_value_t = 5,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub reps: usize,
    /// Also time the products with f32 weights (the f32 GEMM).
    #[arg(long)]
    pub f32: bool,
    /// Python interpreter with torch: also run torch_products.py (bf16 tensors, and f32 ones
    /// with --f32) with as many threads as the rayon pool and print the ratios.
    #[arg(long)]
    pub peer_python: Option<PathBuf>,
    /// Measure process CPU time (all threads) instead of wall-clock time, on both sides: on a
    /// machine shared with other work it is barely moved by their load. Use it with one rayon
    /// thread (RAYON_NUM_THREADS=1), where it is each product's own work.
    #[arg(long)]
    pub cpu_time: bool,
}

/// Runs the torch peer on `cases`; milliseconds per case.
fn torch_ms(
    py: &std::path::Path,
    cases: &[ProductCase],
    dtype: &str,
    reps: usize,
    cpu_time: bool,
) -> Result<Vec<f64>> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--threads".into(),
        rayon::current_num_threads().to_string().into(),
        "--reps".into(),
        reps.to_string().into(),
        "--dtype".into(),
        dtype.into(),
        "--clock".into(),
        if cpu_time { "process" } else { "wall" }.into(),
    ];
    for c in cases {
        args.push("--case".into());
        args.push(format!("{}:{}:{}:{}", c.kind.key(), c.rows, c.inp, c.out).into());
    }
    let v = super::bench::run_script(py, "torch_products.py", &args)?;
    eprintln!(
        "peer: torch {} ({}, {} threads, CPU capability {})",
        v["torch"].as_str().unwrap_or("?"),
        dtype,
        v["threads"],
        v["onednn_isa"].as_str().unwrap_or("?")
    );
    let res = v["results"]
        .as_array()
        .context("torch_products.py: no `results` array")?;
    anyhow::ensure!(
        res.len() == cases.len(),
        "torch_products.py: {} results for {} cases",
        res.len(),
        cases.len()
    );
    res.iter()
        .map(|r| {
            r["ms"]
                .as_f64()
                .context("torch_products.py: result without `ms`")
        })
        .collect()
}

pub fn run(args: &ProductsArgs) -> Result<()> {
    anyhow::ensure!(
        args.tokens > 0 && args.hidden > 0 && args.kv > 0 && args.intermediate > 0,
        "--tokens, --hidden, --kv and --intermediate must be positive"
    );
    let cases = ops::layer_products(args.tokens, args.hidden, args.kv, args.intermediate);
    println!(
        "bf16 matrix products: T={} hidden={} kv={} intermediate={}, {} rayon threads, best of {}",
        args.tokens,
        args.hidden,
        args.kv,
        args.intermediate,
        rayon::current_num_threads(),
        args.reps
    );
    let clock = if args.cpu_time {
        ops::Clock::ProcessCpu
    } else {
        ops::Clock::Wall
    };
    println!(
        "times: {}",
        if args.cpu_time {
            "process CPU time (both sides)"
        } else {
            "wall clock"
        }
    );
    println!(
        "kernels: {}; bf16 products: {}",
        ops::isa_name(),
        ops::bf16_gemm_name()
    );
    let peer_bf16 = match &args.peer_python {
        Some(py) => Some(torch_ms(py, &cases, "bf16", args.reps, args.cpu_time)?),
        None => None,
    };
    let peer_f32 = match (&args.peer_python, args.f32) {
        (Some(py), true) => Some(torch_ms(py, &cases, "f32", args.reps, args.cpu_time)?),
        _ => None,
    };
    let gf = |c: &ProductCase, ms: f64| c.flops() / (ms * 1e-3) / 1e9;
    print!(
        "{:8} {:6} {:>18} {:>10} {:>10}",
        "layer", "kind", "m×k×n", "bf16 ms", "GFLOP/s"
    );
    if peer_bf16.is_some() {
        print!(" {:>11} {:>9}", "torch bf16", "ratio");
    }
    if args.f32 {
        print!(" {:>9}", "f32 GF/s");
        if peer_f32.is_some() {
            print!(" {:>10} {:>9}", "torch f32", "ratio");
        }
    }
    println!();
    let (mut ours, mut theirs) = (0.0, 0.0);
    for (i, c) in cases.iter().enumerate() {
        let ms = ops::time_product(c, true, args.reps, clock);
        let (m, k, n) = match c.kind {
            ops::ProductKind::Forward => (c.rows, c.inp, c.out),
            ops::ProductKind::InputGrad => (c.rows, c.out, c.inp),
            ops::ProductKind::WeightGrad => (c.out, c.rows, c.inp),
        };
        print!(
            "{:8} {:6} {:>18} {:>10.2} {:>10.0}",
            c.layer,
            c.kind.as_str(),
            format!("{m}×{k}×{n}"),
            ms,
            gf(c, ms)
        );
        ours += ms;
        if let Some(p) = &peer_bf16 {
            theirs += p[i];
            print!(" {:>11.0} {:>8.2}×", gf(c, p[i]), p[i] / ms);
        }
        if args.f32 {
            let ms32 = ops::time_product(c, false, args.reps, clock);
            print!(" {:>9.0}", gf(c, ms32));
            if let Some(p) = &peer_f32 {
                print!(" {:>10.0} {:>8.2}×", gf(c, p[i]), p[i] / ms32);
            }
        }
        println!();
    }
    let flops: f64 = cases.iter().map(ProductCase::flops).sum();
    print!(
        "all {} products: gpg-rl bf16 {:.1} ms ({:.0} GFLOP/s)",
        cases.len(),
        ours,
        flops / (ours * 1e-3) / 1e9
    );
    if peer_bf16.is_some() {
        print!(
            ", torch bf16 {:.1} ms ({:.0} GFLOP/s): torch/gpg-rl time {:.2}×",
            theirs,
            flops / (theirs * 1e-3) / 1e9,
            theirs / ours
        );
    }
    println!();
    Ok(())
}
