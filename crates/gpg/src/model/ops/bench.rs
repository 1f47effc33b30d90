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
