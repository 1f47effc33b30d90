//! Micro-benchmark of every op at the engine-benchmark shape (16 sequences × 256 tokens,
//! hidden 256, 4 query / 2 kv heads of 64, intermediate 1024, vocabulary 4096). Ignored by
//! default; run with
//! `cargo test --release -p gpg ops::bench -- --ignored --nocapture`.

use super::test_util::{rand_vec, rng, tensor};
use super::*;
use std::time::Instant;

/// Median milliseconds of `reps` runs of `f` after one warm-up run.
fn time_ms<R>(reps: usize, mut f: impl FnMut() -> R) -> f64 {
    std::hint::black_box(f());
    let mut runs: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            std::hint::black_box(f());
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[reps / 2]
}

#[test]
#[ignore = "micro-benchmark; run explicitly with --ignored --nocapture"]
fn ops_micro_benchmark() {
    let (n_seq, len) = (16usize, 256usize);
    let t = n_seq * len;
    let (hid, nh, nkv, hd, inter, vocab) =
        (256usize, 4usize, 2usize, 64usize, 1024usize, 4096usize);
    let reps = 7;
    let mut g = rng(99);
    let seqs = VarLen::from_lens(&vec![len; n_seq]);
    let positions: Vec<u32> = (0..t).map(|i| (i % len) as u32).collect();
    let threads = rayon::current_num_threads();
    println!("ops micro-benchmark: T={t} H={hid} nh={nh} nkv={nkv} hd={hd} I={inter} V={vocab}, {threads} rayon threads, median of {reps}");

    let x = tensor(&rand_vec(&mut g, t * hid, 1.0), &[t, hid]);
    let w = tensor(&rand_vec(&mut g, hid, 1.0), &[hid]);
    let (y, rstd) = rms_norm(&x, &w, 1e-6).unwrap();
    let f = time_ms(reps, || rms_norm(&x, &w, 1e-6).unwrap());
    let b = time_ms(reps, || rms_norm_backward(&y, &x, &w, &rstd).unwrap());
    println!("rms_norm        fwd {f:8.3} ms   bwd {b:8.3} ms");

    let rope = Rope::new(hd, 1_000_000.0, 4096);
    let q = tensor(&rand_vec(&mut g, t * nh * hd, 1.0), &[t, nh, hd]);
    let f = time_ms(reps, || rope.forward(&q, &positions).unwrap());
    let b = time_ms(reps, || rope.backward(&q, &positions).unwrap());
    println!("rope (q)        fwd {f:8.3} ms   bwd {b:8.3} ms");

    let gate = tensor(&rand_vec(&mut g, t * inter, 3.0), &[t, inter]);
    let up = tensor(&rand_vec(&mut g, t * inter, 1.0), &[t, inter]);
    let f = time_ms(reps, || swiglu(&gate, &up).unwrap());
    let b = time_ms(reps, || swiglu_backward(&gate, &gate, &up).unwrap());
    println!("swiglu          fwd {f:8.3} ms   bwd {b:8.3} ms");

    let k = tensor(&rand_vec(&mut g, t * nkv * hd, 1.0), &[t, nkv, hd]);
    let v = tensor(&rand_vec(&mut g, t * nkv * hd, 1.0), &[t, nkv, hd]);
    let (out, lse) = attention(&q, &k, &v, &seqs).unwrap();
    let f = time_ms(reps, || attention(&q, &k, &v, &seqs).unwrap());
    let b = time_ms(reps, || {
        attention_backward(&out, &q, &k, &v, &out, &lse, &seqs).unwrap()
    });
    println!("attention       fwd {f:8.3} ms   bwd {b:8.3} ms");

    let h = tensor(&rand_vec(&mut g, t * hid, 1.0), &[t, hid]);
    let wv = tensor(&rand_vec(&mut g, vocab * hid, 0.1), &[vocab, hid]);
    let targets: Vec<u32> = (0..t).map(|i| (i * 31 % vocab) as u32).collect();
    let head = lm_head_logprobs(&h, &wv, &targets, 1.0).unwrap();
    let gr = vec![-1.0 / t as f32; t];
    let f = time_ms(reps, || lm_head_logprobs(&h, &wv, &targets, 1.0).unwrap());
    let b = time_ms(reps, || {
        lm_head_backward(&h, &wv, &targets, &head.lse, &gr, 1.0).unwrap()
    });
    println!("lm_head         fwd {f:8.3} ms   bwd {b:8.3} ms");

    // The logits product alone, through candle's matmul and through the gemm wrapper.
    let rows = (LM_HEAD_CHUNK_LOGITS / vocab).min(t);
    let hc = h.narrow(0, 0, rows).unwrap();
    let wt = wv.t().unwrap();
    let c = time_ms(reps, || hc.matmul(&wt).unwrap());
    let (hs, hl) = hc.storage_and_layout();
    let (ws, wl) = wv.storage_and_layout();
    let hsl = tensor_io::cpu_slice("bench", "h", &hs, hl).unwrap();
    let wsl = tensor_io::cpu_slice("bench", "w", &ws, wl).unwrap();
    let mut z = vec![0.0f32; rows * vocab];
    let d = time_ms(reps, || {
        cpu::matmul::gemm(
            cpu::matmul::MatMut::row_major(&mut z, rows, vocab),
            cpu::matmul::MatRef::row_major(hsl, rows, hid),
            cpu::matmul::MatRef::row_major(wsl, vocab, hid).t(),
            false,
            1.0,
            cpu::matmul::Threads::All,
        )
    });
    println!("logits {rows}x{vocab}x{hid}: candle matmul {c:8.3} ms, gemm wrapper {d:8.3} ms");
}

/// The decoding step's pieces at batch 16: the few-rows products (fused qkv, o, gate/up,
/// down, head) and single-query attention over 128 cached positions.
#[test]
#[ignore = "micro-benchmark; run explicitly with --ignored --nocapture"]
fn decode_micro_benchmark() {
    use super::cpu::rows_matmul::matmul_wt;
    let rows = 16usize;
    let reps = 51;
    let mut g = rng(7);
    println!("decode micro-benchmark: {rows} rows, median of {reps}");
    let mut total = 0.0;
    for (name, k, n, times) in [
        ("qkv", 256usize, 512usize, 4usize),
        ("o", 256, 256, 4),
        ("gate_up", 256, 2048, 4),
        ("down", 1024, 256, 4),
        ("head", 256, 4096, 1),
    ] {
        let x = rand_vec(&mut g, rows * k, 1.0);
        let w = rand_vec(&mut g, n * k, 1.0);
        let mut y = vec![0.0f32; rows * n];
        let ms = time_ms(reps, || matmul_wt(&x, &w, None, rows, k, n, &mut y, false));
        let gflops = 2.0 * (rows * k * n) as f64 / ms / 1e6;
        total += ms * times as f64;
        println!("matmul {name:8} K={k:5} N={n:5}: {ms:7.4} ms  {gflops:6.1} GFLOP/s  (x{times})");
    }
    let (nh, nkv, hd) = (4usize, 2usize, 64usize);
    for len in [128usize, 512] {
        let cap = len.next_multiple_of(DecodeCache::BLOCK);
        let q = rand_vec(&mut g, nh * hd, 1.0);
        let kt = rand_vec(&mut g, cap * nkv * hd, 1.0);
        let vc = rand_vec(&mut g, len * nkv * hd, 1.0);
        let mut out = vec![0.0f32; nh * hd];
        let mut scores = Vec::new();
        let cache = DecodeCache {
            kt: &kt,
            cap,
            v: &vc,
            len,
        };
        let ms = time_ms(reps, || {
            attention_decode(&q, cache, nh, nkv, hd, &mut scores, &mut out)
        });
        let gflops = (4 * nh * len * hd) as f64 / ms / 1e6;
        println!("attention_decode one row, len {len}: {ms:7.4} ms  {gflops:6.1} GFLOP/s");
        if len == 128 {
            total += ms * (rows * 4) as f64 / rayon::current_num_threads() as f64;
        }
    }
    println!("sum per step: {total:.3} ms");
}

/// Fastest of `reps` runs of `f` after one warm-up run, in milliseconds. The benchmarks of
/// the bf16 kernels report the best run rather than the median: they were measured on a
/// 2-core machine shared with other jobs, where the median mostly measures the other jobs.
fn best_ms<R>(reps: usize, mut f: impl FnMut() -> R) -> f64 {
    std::hint::black_box(f());
    (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            std::hint::black_box(f());
            t0.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

/// Mixed-precision GEMM (bf16 operands, f32 sums) against the f32 `gemm` crate on the 0.5B
/// model's training products (T = 2048 tokens, hidden 896, q 896, k/v 128, intermediate
/// 4864). Run with `cargo test --release -p gpg -- --ignored bench_ --nocapture`.
#[test]
#[ignore = "micro-benchmark; run explicitly with --ignored --nocapture"]
fn bench_gemm_mixed() {
    use super::cpu::gemm_bf16::{gemm_mixed_kernel, kernel_for, Kernel, Operand};
    use super::cpu::isa::isa;
    use super::cpu::matmul::{gemm, MatMut, MatRef, MatRefBf16, Threads};
    use half::bf16;
    let (t, hid, inter) = (2048usize, 896usize, 4864usize);
    let reps = 7;
    let mut g = rng(5);
    println!(
        "gemm_mixed vs f32 gemm: T={t}, {} rayon threads, best of {reps}; kernels: {}",
        rayon::current_num_threads(),
        isa_name()
    );
    // (name, m, k, n, kind): kind 0 = forward x·Wᵀ (W [n, k]), 1 = input grad dy·W (W [k, n]),
    // 2 = weight grad dyᵀ·x accumulated (dy [k, m], x [k, n]).
    let shapes = [
        ("fwd q     x·Wqᵀ", t, hid, hid, 0),
        ("fwd k/v   x·Wkᵀ", t, hid, 128, 0),
        ("fwd gate  x·Wgᵀ", t, hid, inter, 0),
        ("fwd down  h·Wdᵀ", t, inter, hid, 0),
        ("dx  gate  dy·Wg", t, inter, hid, 1),
        ("dx  down  dy·Wd", t, hid, inter, 1),
        ("dW  gate  dyᵀ·x", inter, t, hid, 2),
        ("dW  down  dyᵀ·h", hid, t, inter, 2),
    ];
    // The kernel gemm_mixed picks, then the others this CPU can run.
    let mut kernels = vec![kernel_for(isa())];
    for kern in [Kernel::Dot, Kernel::WideFma, Kernel::Avx2] {
        if kern.isa_supported() && !kernels.contains(&kern) {
            kernels.push(kern);
        }
    }
    println!(
        "{:18} {:>16} {:>10} {}   (GFLOP/s; speedup = chosen kernel vs f32 gemm)",
        "product",
        "m×k×n",
        "f32 gemm",
        kernels
            .iter()
            .map(|k| format!("{:>10}", format!("{k:?}")))
            .collect::<String>()
    );
    for (name, m, k, n, kind) in shapes {
        // Storage: a is [m, k] (or [k, m] for kind 2), b is [n, k] for kind 0 else [k, n].
        let a = rand_vec(&mut g, m * k, 1.0);
        let b = rand_vec(&mut g, k * n, 0.05);
        let bh: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
        let a_ref = || match kind {
            2 => MatRef::row_major(&a, k, m).t(),
            _ => MatRef::row_major(&a, m, k),
        };
        let b_ref = || match kind {
            0 => MatRef::row_major(&b, n, k).t(),
            _ => MatRef::row_major(&b, k, n),
        };
        // The weight operand is bf16 for the forward and input-gradient products; the
        // weight gradient multiplies two f32 activations (rounded while packing).
        let b_op = || -> Operand {
            match kind {
                0 => MatRefBf16::row_major(&bh, n, k).t().into(),
                1 => MatRefBf16::row_major(&bh, k, n).into(),
                _ => b_ref().into(),
            }
        };
        let acc = kind == 2;
        let mut c = vec![0.0f32; m * n];
        let f32_ms = best_ms(reps, || {
            gemm(
                MatMut::row_major(&mut c, m, n),
                a_ref(),
                b_ref(),
                acc,
                1.0,
                Threads::All,
            )
        });
        let mut times = Vec::new();
        for &kern in &kernels {
            times.push(best_ms(reps, || {
                gemm_mixed_kernel(
                    kern,
                    MatMut::row_major(&mut c, m, n),
                    a_ref().into(),
                    b_op(),
                    acc,
                    1.0,
                    Threads::All,
                )
            }));
        }
        let gf = |ms: f64| 2.0 * (m * k * n) as f64 / ms / 1e6;
        println!(
            "{name:18} {:>16} {:>10.1} {}   {:.2}x ({:.1} ms vs {:.1} ms)",
            format!("{m}×{k}×{n}"),
            gf(f32_ms),
            times
                .iter()
                .map(|&ms| format!("{:>10.1}", gf(ms)))
                .collect::<String>(),
            f32_ms / times[0],
            f32_ms,
            times[0]
        );
    }
    // The bulk conversions, for scale.
    let v = rand_vec(&mut g, t * inter, 1.0);
    let mut h = vec![bf16::ZERO; v.len()];
    let mut back = vec![0.0f32; v.len()];
    let to = best_ms(reps, || super::cpu::bf16::f32_to_bf16(&v, &mut h));
    let from = best_ms(reps, || super::cpu::bf16::bf16_to_f32(&h, &mut back));
    let gb = |ms: f64| (v.len() * 6) as f64 / ms / 1e6;
    println!(
        "bulk conversion of {}M values (one thread): f32→bf16 {to:.2} ms ({:.1} GB/s), bf16→f32 {from:.2} ms ({:.1} GB/s)",
        v.len() / 1_000_000,
        gb(to),
        gb(from)
    );
}

/// Decode products of the 0.5B model (rows = sequences being sampled): f32 `matmul_wt` on
/// AVX2 and AVX-512, and `matmul_wt_bf16`. GB/s counts the weight bytes streamed.
#[test]
#[ignore = "micro-benchmark; run explicitly with --ignored --nocapture"]
fn bench_decode_rows_matmul() {
    use super::cpu::isa::Isa;
    use super::cpu::rows_matmul::{matmul_wt_bf16_with, matmul_wt_with};
    use half::bf16;
    let mut g = rng(11);
    println!(
        "decode rows_matmul: {} rayon threads; kernels: {}",
        rayon::current_num_threads(),
        isa_name()
    );
    let mut paths = vec![
        ("f32 avx2", Isa::Avx2, false),
        ("bf16 avx2", Isa::Avx2, true),
    ];
    if Isa::Avx512Bf16.supported() {
        paths.insert(1, ("f32 avx512", Isa::Avx512Bf16, false));
        paths.push(("bf16 avx512", Isa::Avx512Bf16, true));
    }
    if !Isa::Avx2.supported() {
        println!("skipped: no AVX2");
        return;
    }
    for (name, n, k) in [
        ("qkv", 1152usize, 896usize),
        ("o", 896, 896),
        ("gate_up", 9728, 896),
        ("down", 896, 4864),
        ("head", 151_936, 896),
    ] {
        let w = rand_vec(&mut g, n * k, 0.05);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        for rows in [1usize, 16, 32] {
            let x = rand_vec(&mut g, rows * k, 1.0);
            let mut y = vec![0.0f32; rows * n];
            let reps = if n > 100_000 { 5 } else { 31 };
            let mut line = format!("{name:8} N={n:6} K={k:5} rows={rows:2}:");
            for &(label, isa, half) in &paths {
                let ms = best_ms(reps, || {
                    if half {
                        matmul_wt_bf16_with(isa, &x, &wb, None, rows, k, n, &mut y, false)
                    } else {
                        matmul_wt_with(isa, &x, &w, None, rows, k, n, &mut y, false)
                    }
                });
                let gflops = 2.0 * (rows * k * n) as f64 / ms / 1e6;
                let gbs = (n * k * if half { 2 } else { 4 }) as f64 / ms / 1e6;
                line += &format!("  {label} {ms:7.3} ms {gflops:6.1} GF/s {gbs:5.1} GB/s |");
            }
            println!("{line}");
        }
    }
}

/// One thread, one cache-resident block: the micro-kernel's throughput alone (and the f32
/// gemm's on the same block), to separate kernel speed from packing and memory effects.
#[test]
#[ignore = "micro-benchmark; run explicitly with --ignored --nocapture"]
fn bench_gemm_mixed_one_block() {
    use super::cpu::gemm_bf16::{gemm_mixed_with, MC, NC};
    use super::cpu::isa::isa;
    use super::cpu::matmul::{gemm, MatMut, MatRef, Threads};
    let (m, k, n) = (MC, 512usize, NC);
    let mut g = rng(3);
    let a = rand_vec(&mut g, m * k, 1.0);
    let b = rand_vec(&mut g, k * n, 1.0);
    let mut c = vec![0.0f32; m * n];
    let reps = 21;
    let f = best_ms(reps, || {
        gemm(
            MatMut::row_major(&mut c, m, n),
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&b, k, n),
            false,
            1.0,
            Threads::One,
        )
    });
    let x = best_ms(reps, || {
        gemm_mixed_with(
            isa(),
            MatMut::row_major(&mut c, m, n),
            MatRef::row_major(&a, m, k).into(),
            MatRef::row_major(&b, k, n).into(),
            false,
            1.0,
            Threads::One,
        )
    });
    let gf = |ms: f64| 2.0 * (m * k * n) as f64 / ms / 1e6;
    println!(
        "one block {m}×{k}×{n}, one thread: f32 gemm {:.1} GFLOP/s, gemm_mixed ({}) {:.1} GFLOP/s",
        gf(f),
        isa_name(),
        gf(x)
    );
}

/// Process CPU time of the fastest of `reps` runs of `f` after a warm-up, divided by the rayon
/// threads, in milliseconds: on a machine shared with other jobs this measures the kernel
/// rather than the time slices the scheduler gave it (idle rayon threads spin briefly and
/// count too, so it errs on the slow side).
fn best_cpu_ms<R>(reps: usize, mut f: impl FnMut() -> R) -> f64 {
    fn cpu_s() -> f64 {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid out-pointer to a timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
        t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
    }
    std::hint::black_box(f());
    let threads = rayon::current_num_threads() as f64;
    (0..reps)
        .map(|_| {
            let t0 = cpu_s();
            std::hint::black_box(f());
            (cpu_s() - t0) * 1e3 / threads
        })
        .fold(f64::INFINITY, f64::min)
}

/// The decode products at the sampling batch of `bench trainer` (32 rows), f32 (AVX2 and
/// AVX-512 tiles) and bf16 (AVX2, `vdpbf16ps`, W widened in registers) side by side, best of `reps` in CPU time per thread ([`best_cpu_ms`]), with
/// the weight bytes streamed per second. The small weights stay in the cache between runs
/// here, where decoding streams them from memory.
#[test]
#[ignore = "micro-benchmark; run explicitly with --ignored --nocapture"]
fn bench_decode_32_rows() {
    use super::cpu::isa::Isa;
    use super::cpu::rows_matmul::{matmul_wt_bf16_path, matmul_wt_with, Bf16Decode};
    use half::bf16;
    if !Isa::Avx2.supported() {
        println!("skipped: no AVX2");
        return;
    }
    let mut g = rng(13);
    let rows = 32usize;
    let mut paths = vec![("avx2", Isa::Avx2)];
    if Isa::Avx512Bf16.supported() {
        paths.push(("avx512", Isa::Avx512Bf16));
    }
    println!(
        "decode f32, {rows} rows, {} rayon threads",
        rayon::current_num_threads()
    );
    for (name, n, k) in [
        ("q", 896usize, 896usize),
        ("gate", 4864, 896),
        ("down", 896, 4864),
        ("head", 151_936, 896),
    ] {
        let w = rand_vec(&mut g, n * k, 0.05);
        let x = rand_vec(&mut g, rows * k, 1.0);
        let mut y = vec![0.0f32; rows * n];
        let reps = if n > 100_000 { 7 } else { 61 };
        let mut line = format!("{name:5} N={n:6} K={k:5}: f32");
        for &(label, isa) in &paths {
            let ms = best_cpu_ms(reps, || {
                matmul_wt_with(isa, &x, &w, None, rows, k, n, &mut y, false)
            });
            let gflops = 2.0 * (rows * k * n) as f64 / ms / 1e6;
            let gbs = (n * k * 4) as f64 / ms / 1e6;
            line += &format!("  {label} {ms:7.3} ms {gflops:6.1} GF/s {gbs:5.1} GB/s |");
        }
        println!("{line}");
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut line = format!("{name:5} N={n:6} K={k:5}: bf16");
        let mut bf16_paths = vec![("avx2", Bf16Decode::Avx2)];
        if Isa::Avx512Bf16.supported() {
            bf16_paths.push(("vdpbf16ps", Bf16Decode::Dot));
            bf16_paths.push(("widened fma", Bf16Decode::WideFma));
        }
        for (label, path) in bf16_paths {
            let ms = best_cpu_ms(reps, || {
                matmul_wt_bf16_path(path, &x, &wb, None, rows, k, n, &mut y, false)
            });
            let gflops = 2.0 * (rows * k * n) as f64 / ms / 1e6;
            let gbs = (n * k * 2) as f64 / ms / 1e6;
            line += &format!("  {label} {ms:7.3} ms {gflops:6.1} GF/s {gbs:5.1} GB/s |");
        }
        println!("{line}");
    }
}

/// The f32 GEMM (the `gemm` crate, AVX-512 where the CPU has it) on the 0.5B update's
/// products at T = 2048 tokens and the output head's chunk (4096 vocabulary entries), in CPU
/// time per thread ([`best_cpu_ms`]), beside one cache-resident block on one thread: how far
/// the whole products fall short of the micro-kernel.
#[test]
#[ignore = "micro-benchmark; run explicitly with --ignored --nocapture"]
fn bench_update_gemm_f32() {
    use super::cpu::matmul::{gemm, MatMut, MatRef, Threads};
    let (t, hid, inter, chunk) = (2048usize, 896usize, 4864usize, 4096usize);
    let mut g = rng(17);
    // (name, m, k, n, kind): 0 = x·Wᵀ (W [n, k]), 1 = dy·W (W [k, n]), 2 = dyᵀ·x accumulated.
    let shapes = [
        ("one block, 1 thread", 192, 512, 4096, 3),
        ("fwd q     x·Wqᵀ", t, hid, hid, 0),
        ("fwd k/v   x·Wkᵀ", t, hid, 128, 0),
        ("fwd gate  x·Wgᵀ", t, hid, inter, 0),
        ("fwd down  h·Wdᵀ", t, inter, hid, 0),
        ("dx  gate  dy·Wg", t, inter, hid, 1),
        ("dx  down  dy·Wd", t, hid, inter, 1),
        ("dW  gate  dyᵀ·x", inter, t, hid, 2),
        ("dW  down  dyᵀ·h", hid, t, inter, 2),
        ("head fwd  h·Wᵀ", t, hid, chunk, 0),
        ("head dh   dz·W", t, chunk, hid, 1),
        ("head dW   dzᵀ·h", chunk, t, hid, 2),
    ];
    println!(
        "f32 gemm, {} rayon threads, CPU ms per thread (best of 7)",
        rayon::current_num_threads()
    );
    for (name, m, k, n, kind) in shapes {
        let a = rand_vec(&mut g, m * k, 1.0);
        let b = rand_vec(&mut g, k * n, 0.05);
        let mut c = vec![0.0f32; m * n];
        let a_ref = || match kind {
            2 => MatRef::row_major(&a, k, m).t(),
            _ => MatRef::row_major(&a, m, k),
        };
        let b_ref = || match kind {
            0 => MatRef::row_major(&b, n, k).t(),
            _ => MatRef::row_major(&b, k, n),
        };
        let threads = if kind == 3 {
            Threads::One
        } else {
            Threads::All
        };
        let mut run = || {
            gemm(
                MatMut::row_major(&mut c, m, n),
                a_ref(),
                b_ref(),
                kind == 2,
                1.0,
                threads,
            )
        };
        let (cpu, wall) = if kind == 3 {
            let w = best_ms(7, &mut run);
            (w, w)
        } else {
            (best_cpu_ms(7, &mut run), best_ms(7, &mut run))
        };
        let gf = |ms: f64| 2.0 * (m * k * n) as f64 / ms / 1e6;
        let per_thread = if kind == 3 {
            1.0
        } else {
            rayon::current_num_threads() as f64
        };
        println!(
            "{name:20} {:>16} {cpu:8.2} ms CPU/thread {:7.1} GF/s per thread·{per_thread}  (wall {wall:8.2} ms)",
            format!("{m}×{k}×{n}"),
            gf(cpu) / per_thread * per_thread,
        );
    }
}

/// The output head of `bench trainer`'s update (2,048 scored rows, hidden 896, Qwen2's
/// 151,936-entry vocabulary, f32): forward then backward (the logits formed twice) against
/// `lm_head_forward_backward` (formed once), alternated three times so that a drift of the
/// machine's speed hits both; wall time per call.
#[test]
#[ignore = "micro-benchmark; run explicitly with --ignored --nocapture"]
fn bench_head_paths() {
    use crate::model::ops::{
        lm_head_backward_into, lm_head_forward_backward, lm_head_logprobs, LM_HEAD_CHUNK_LOGITS,
        LM_HEAD_FUSED_LOGITS,
    };
    let (n, hid, v) = (2048usize, 896usize, 151_936usize);
    let mut g = rng(23);
    let h = tensor(&rand_vec(&mut g, n * hid, 1.0), &[n, hid]);
    let w = tensor(&rand_vec(&mut g, v * hid, 0.05), &[v, hid]);
    let targets: Vec<u32> = (0..n).map(|i| (i * 7919 % v) as u32).collect();
    let weights: Vec<f32> = (0..n).map(|i| ((i % 5) as f32 - 2.0) * 1e-3).collect();
    let mut dw = vec![0.0f32; v * hid];
    for round in 0..3 {
        let t0 = std::time::Instant::now();
        let fwd = lm_head_logprobs(&h, &w, &targets, 1.0).unwrap();
        let t1 = t0.elapsed().as_secs_f64();
        lm_head_backward_into(
            &h,
            &w,
            &targets,
            &fwd.lse,
            &weights,
            1.0,
            LM_HEAD_CHUNK_LOGITS,
            &mut dw,
        )
        .unwrap();
        let two = t0.elapsed().as_secs_f64();
        print!(
            "round {round}: forward {t1:.2} s + backward {:.2} s = {two:.2} s; one pass",
            two - t1
        );
        for budget in [
            LM_HEAD_FUSED_LOGITS / 2,
            LM_HEAD_FUSED_LOGITS,
            LM_HEAD_FUSED_LOGITS * 2,
        ] {
            let t0 = std::time::Instant::now();
            lm_head_forward_backward(&h, &w, &targets, &weights, 1.0, budget, Some(&mut dw))
                .unwrap();
            print!(
                " {:.2} s ({} rows a block)",
                t0.elapsed().as_secs_f64(),
                budget / v
            );
        }
        println!();
    }
}
