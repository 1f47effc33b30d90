//! Checks of the CUDA backend (feature `cuda`).
//!
//! * `every_kernel_compiles_with_nvrtc_for_sm_90` runs wherever libnvrtc.so.13 loads (CI
//!   installs pip's nvidia-cuda-nvrtc wheel; a GPU is not needed) and skips, saying why,
//!   elsewhere.
//! * `gpu_*` compare every op's CUDA forward and backward with the CPU kernel on random inputs
//!   (f32: max error ≤ 1e-5 of the largest reference magnitude; bf16: within bf16's precision).
//!   They need a GPU and skip, printing the reason, without one; `bench/gpu/check-a.sh` runs them
//!   on the device machine.

use std::sync::Arc;

use candle_core::DType;

use super::ops as dev;
use super::plan;
use super::sources::ALL;
use super::{compile_for_arch, nvrtc_available, Gpu};
use crate::model::ops::test_util::{rand_vec, rng, tensor, values};
use crate::model::ops::{self as cpu_ops, Rope, VarLen};

/// The device, or None (the test then passes, printing why) without one; with
/// GPG_RL_REQUIRE_GPU=1 (bench/gpu/check-a.sh) a missing device fails the test instead.
fn gpu() -> Option<Arc<Gpu>> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) if std::env::var_os("GPG_RL_REQUIRE_GPU").is_some() => {
            panic!("GPG_RL_REQUIRE_GPU is set but no GPU opened: {e:#}")
        }
        Err(e) => {
            eprintln!("skipped (no GPU): {e:#}");
            None
        }
    }
}

/// max |got − want| ≤ rtol · max |want| + atol.
#[track_caller]
fn close(got: &[f32], want: &[f32], rtol: f32, atol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0.0f32, |m, w| m.max(w.abs()));
    let (mut worst, mut at) = (0.0f32, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (g - w).abs();
        if e > worst || e.is_nan() {
            worst = e;
            at = i;
        }
    }
    assert!(
        worst <= rtol * scale + atol,
        "{what}: max error {worst} at {at} (got {}, want {}), scale {scale}",
        got[at],
        want[at]
    );
}

#[test]
fn every_kernel_compiles_with_nvrtc_for_sm_90() {
    if !nvrtc_available() {
        eprintln!(
            "skipped: libnvrtc.so.13 not found on the library path (install pip's \
             nvidia-cuda-nvrtc==13.0.88 and put nvidia/cu13/lib on LD_LIBRARY_PATH, as .ci/run \
             does)"
        );
        return;
    }
    for m in ALL {
        let image = compile_for_arch(m, "sm_90").unwrap_or_else(|e| panic!("{e:#}"));
        // A CUBIN: an ELF image whose symbol table names every kernel.
        assert!(
            image.starts_with(b"\x7fELF"),
            "{}: not an ELF CUBIN",
            m.name
        );
        for k in m.kernels {
            assert!(
                image.windows(k.len()).any(|w| w == k.as_bytes()),
                "kernel {k} missing from the CUBIN of {}",
                m.name
            );
        }
        // Cached per process: the second call returns the same image.
        let again = compile_for_arch(m, "sm_90").unwrap();
        assert!(Arc::ptr_eq(&image, &again), "{}: compiled twice", m.name);
    }
}

#[test]
fn opening_a_device_without_a_driver_is_a_clear_error() {
    // On a machine with a GPU this opens it; elsewhere the error names the library looked for.
    match Gpu::open(0) {
        Ok(g) => eprintln!("opened {}", g.description()),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(
                msg.contains("cuda:0") && msg.contains("looked for"),
                "{msg}"
            );
            assert!(msg.contains("libcuda.so") || msg.contains("lib"), "{msg}");
        }
    }
}

#[test]
fn gpu_rms_norm_forward_and_backward_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let (rows, h) = (37, 320);
    let mut r = rng(1);
    let x = rand_vec(&mut r, rows * h, 2.0);
    let w = rand_vec(&mut r, h, 1.0);
    let dy = rand_vec(&mut r, rows * h, 1.0);
    let (xt, wt) = (tensor(&x, &[rows, h]), tensor(&w, &[h]));
    let (y_ref, rstd_ref) = cpu_ops::rms_norm(&xt, &wt, 1e-6).unwrap();
    let (dx_ref, dw_ref) =
        cpu_ops::rms_norm_backward(&tensor(&dy, &[rows, h]), &xt, &wt, &rstd_ref).unwrap();
    let (xd, wd, dyd) = (
        dev::upload(&g, &x).unwrap(),
        dev::upload(&g, &w).unwrap(),
        dev::upload(&g, &dy).unwrap(),
    );
    let mut y = dev::zeros::<f32>(&g, rows * h).unwrap();
    let mut rstd = dev::zeros::<f32>(&g, rows).unwrap();
    dev::rms_norm(&g, &xd, &wd, 1e-6, rows, h, &mut y, &mut rstd).unwrap();
    let (dx, dw) = dev::rms_norm_backward(&g, &xd, &wd, &rstd, &dyd, rows, h).unwrap();
    close(
        &dev::download(&g, &y).unwrap(),
        &values(&y_ref),
        1e-5,
        0.0,
        "y",
    );
    close(
        &dev::download(&g, &rstd).unwrap(),
        &values(&rstd_ref),
        1e-5,
        0.0,
        "rstd",
    );
    close(
        &dev::download(&g, &dx).unwrap(),
        &values(&dx_ref),
        1e-5,
        0.0,
        "dx",
    );
    close(
        &dev::download(&g, &dw).unwrap(),
        &values(&dw_ref),
        1e-5,
        0.0,
        "dw",
    );
    // bf16 activations: within bf16's precision (8 bits of mantissa).
    let to_bf = |v: &[f32]| -> Vec<u16> {
        v.iter()
            .map(|&a| half::bf16::from_f32(a).to_bits())
            .collect()
    };
    let from_bf = |v: Vec<u16>| -> Vec<f32> {
        v.into_iter()
            .map(|b| half::bf16::from_bits(b).to_f32())
            .collect()
    };
    let xb = dev::upload(&g, &to_bf(&x)).unwrap();
    let mut yb = dev::zeros::<u16>(&g, rows * h).unwrap();
    dev::rms_norm(&g, &xb, &wd, 1e-6, rows, h, &mut yb, &mut rstd).unwrap();
    close(
        &from_bf(dev::download(&g, &yb).unwrap()),
        &values(&y_ref),
        1.6e-2,
        0.0,
        "y bf16",
    );
}

#[test]
fn gpu_rope_swiglu_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let (t, heads, hd) = (9, 3, 64);
    let mut r = rng(2);
    let x = rand_vec(&mut r, t * heads * hd, 1.0);
    let positions: Vec<u32> = (0..t as u32).map(|p| p * 7 % 50).collect();
    let rope = Rope::new(hd, 1e6, 64);
    let xt = tensor(&x, &[t, heads, hd]);
    let fwd_ref = values(&rope.forward(&xt, &positions).unwrap());
    let bwd_ref = values(&rope.backward(&xt, &positions).unwrap());
    let tables = dev::RopeTables::new(&g, &rope).unwrap();
    let pos = dev::upload_u32(&g, &positions).unwrap();
    let mut xd = dev::upload(&g, &x).unwrap();
    dev::rope(&g, &tables, &mut xd, &pos, t, heads, false).unwrap();
    close(
        &dev::download(&g, &xd).unwrap(),
        &fwd_ref,
        1e-5,
        0.0,
        "rope fwd",
    );
    let mut xd = dev::upload(&g, &x).unwrap();
    dev::rope(&g, &tables, &mut xd, &pos, t, heads, true).unwrap();
    close(
        &dev::download(&g, &xd).unwrap(),
        &bwd_ref,
        1e-5,
        0.0,
        "rope bwd",
    );

    let n = 5000;
    let (ga, ua, dh) = (
        rand_vec(&mut r, n, 4.0),
        rand_vec(&mut r, n, 2.0),
        rand_vec(&mut r, n, 1.0),
    );
    let (gt, ut) = (tensor(&ga, &[50, n / 50]), tensor(&ua, &[50, n / 50]));
    let h_ref = values(&cpu_ops::swiglu(&gt, &ut).unwrap());
    let (dg_ref, du_ref) = cpu_ops::swiglu_backward(&tensor(&dh, &[50, n / 50]), &gt, &ut).unwrap();
    let (gd, ud, dhd) = (
        dev::upload(&g, &ga).unwrap(),
        dev::upload(&g, &ua).unwrap(),
        dev::upload(&g, &dh).unwrap(),
    );
    let mut hd_ = dev::zeros::<f32>(&g, n).unwrap();
    dev::swiglu(&g, &gd, &ud, &mut hd_, n).unwrap();
    let (dg, du) = dev::swiglu_backward(&g, &gd, &ud, &dhd, n).unwrap();
    close(
        &dev::download(&g, &hd_).unwrap(),
        &h_ref,
        1e-5,
        0.0,
        "swiglu",
    );
    close(
        &dev::download(&g, &dg).unwrap(),
        &values(&dg_ref),
        1e-5,
        0.0,
        "swiglu dg",
    );
    close(
        &dev::download(&g, &du).unwrap(),
        &values(&du_ref),
        1e-5,
        0.0,
        "swiglu du",
    );
}

#[test]
fn gpu_attention_forward_backward_and_decode_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let (nh, nkv, hd) = (4, 2, 64);
    let lens = [5usize, 1, 70];
    let seqs = VarLen::from_lens(&lens);
    let t: usize = lens.iter().sum();
    let mut r = rng(3);
    let q = rand_vec(&mut r, t * nh * hd, 1.0);
    let k = rand_vec(&mut r, t * nkv * hd, 1.0);
    let v = rand_vec(&mut r, t * nkv * hd, 1.0);
    let dout = rand_vec(&mut r, t * nh * hd, 1.0);
    let (qt, kt, vt) = (
        tensor(&q, &[t, nh, hd]),
        tensor(&k, &[t, nkv, hd]),
        tensor(&v, &[t, nkv, hd]),
    );
    let (out_ref, lse_ref) = cpu_ops::attention(&qt, &kt, &vt, &seqs).unwrap();
    let (dq_ref, dk_ref, dv_ref) = cpu_ops::attention_backward(
        &tensor(&dout, &[t, nh, hd]),
        &qt,
        &kt,
        &vt,
        &out_ref,
        &lse_ref,
        &seqs,
    )
    .unwrap();
    let (start, end) = plan::sequence_bounds(&seqs.offsets);
    let d = dev::AttentionDims {
        tokens: t,
        heads: nh,
        kv_heads: nkv,
        head_dim: hd,
    };
    let (qd, kd, vd, dod) = (
        dev::upload(&g, &q).unwrap(),
        dev::upload(&g, &k).unwrap(),
        dev::upload(&g, &v).unwrap(),
        dev::upload(&g, &dout).unwrap(),
    );
    let (sd, ed) = (
        dev::upload_u32(&g, &start).unwrap(),
        dev::upload_u32(&g, &end).unwrap(),
    );
    let (out, lse) = dev::attention(&g, &qd, &kd, &vd, &sd, d).unwrap();
    close(
        &dev::download(&g, &out).unwrap(),
        &values(&out_ref),
        1e-5,
        0.0,
        "attention out",
    );
    close(
        &dev::download(&g, &lse).unwrap(),
        &values(&lse_ref),
        1e-5,
        0.0,
        "attention lse",
    );
    let (dq, dk, dv) =
        dev::attention_backward(&g, &qd, &kd, &vd, &out, &lse, &dod, &sd, &ed, d).unwrap();
    close(
        &dev::download(&g, &dq).unwrap(),
        &values(&dq_ref),
        1e-5,
        0.0,
        "dq",
    );
    close(
        &dev::download(&g, &dk).unwrap(),
        &values(&dk_ref),
        1e-5,
        0.0,
        "dk",
    );
    close(
        &dev::download(&g, &dv).unwrap(),
        &values(&dv_ref),
        1e-5,
        0.0,
        "dv",
    );

    // Decoding: the last token of the 70-token sequence against its cache in blocks equals the
    // varlen forward's last row.
    let len = 70;
    let kvd = nkv * hd;
    let mut tables = plan::BlockTables::new(8);
    tables.push(0, len).unwrap();
    let mut pools = dev::KvPools {
        k: dev::zeros(&g, 8 * plan::KV_BLOCK * kvd).unwrap(),
        v: dev::zeros(&g, 8 * plan::KV_BLOCK * kvd).unwrap(),
    };
    let o = seqs.offsets[2];
    for p in 0..len {
        let (table, mb) = tables.table();
        let table = dev::upload_u32(&g, &table).unwrap();
        let before = dev::upload_u32(&g, tables.lens()).unwrap();
        let kn = dev::upload(&g, &k[(o + p) * kvd..(o + p + 1) * kvd]).unwrap();
        let vn = dev::upload(&g, &v[(o + p) * kvd..(o + p + 1) * kvd]).unwrap();
        dev::kv_append(&g, &kn, &vn, &table, &before, 1, mb, kvd, &mut pools).unwrap();
        tables.advance().unwrap();
    }
    let (table, mb) = tables.table();
    let table = dev::upload_u32(&g, &table).unwrap();
    let lens_d = dev::upload_u32(&g, tables.lens()).unwrap();
    let qlast = dev::upload(&g, &q[(t - 1) * nh * hd..]).unwrap();
    let mut att = dev::zeros::<f32>(&g, nh * hd).unwrap();
    let dd = dev::AttentionDims { tokens: 1, ..d };
    dev::attention_decode(&g, &qlast, &pools, &table, &lens_d, 1, mb, dd, &mut att).unwrap();
    close(
        &dev::download(&g, &att).unwrap(),
        &values(&out_ref)[(t - 1) * nh * hd..],
        1e-5,
        0.0,
        "decode",
    );
}

#[test]
fn gpu_lm_head_embedding_and_products_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let (rows, hidden, vocab) = (11, 96, 1000);
    let mut r = rng(4);
    let h = rand_vec(&mut r, rows * hidden, 1.0);
    let w = rand_vec(&mut r, vocab * hidden, 0.3);
    let targets: Vec<u32> = (0..rows as u32).map(|i| i * 89 % vocab as u32).collect();
    let (ht, wt) = (tensor(&h, &[rows, hidden]), tensor(&w, &[vocab, hidden]));
    let want = cpu_ops::lm_head_logprobs(&ht, &wt, &targets, 0.8).unwrap();
    let (hd_, wd, td) = (
        dev::upload(&g, &h).unwrap(),
        dev::upload(&g, &w).unwrap(),
        dev::upload_u32(&g, &targets).unwrap(),
    );
    // A budget of 3 chunks (and a ragged last one).
    let got =
        dev::lm_head::<f32>(&g, &hd_, &wd, &td, rows, hidden, vocab, 0.8, rows * 350).unwrap();
    close(
        &dev::download(&g, &got.logprobs).unwrap(),
        &want.logprobs,
        1e-5,
        1e-5,
        "logprobs",
    );
    close(
        &dev::download(&g, &got.entropy).unwrap(),
        &want.entropy,
        1e-5,
        1e-5,
        "entropy",
    );
    close(
        &dev::download(&g, &got.lse).unwrap(),
        &want.lse,
        1e-5,
        0.0,
        "lse",
    );

    // y = x·Wᵀ and its two backward products against f64 references.
    let (m, n, kk) = (7, 13, 96);
    let x = rand_vec(&mut r, m * kk, 1.0);
    let wm = rand_vec(&mut r, n * kk, 1.0);
    let dy = rand_vec(&mut r, m * n, 1.0);
    let mut y_ref = vec![0f32; m * n];
    let mut dx_ref = vec![0f32; m * kk];
    let mut dw_ref = vec![0f32; n * kk];
    for i in 0..m {
        for j in 0..n {
            y_ref[i * n + j] = (0..kk)
                .map(|c| x[i * kk + c] as f64 * wm[j * kk + c] as f64)
                .sum::<f64>() as f32;
        }
        for c in 0..kk {
            dx_ref[i * kk + c] = (0..n)
                .map(|j| dy[i * n + j] as f64 * wm[j * kk + c] as f64)
                .sum::<f64>() as f32;
        }
    }
    for j in 0..n {
        for c in 0..kk {
            dw_ref[j * kk + c] = (0..m)
                .map(|i| dy[i * n + j] as f64 * x[i * kk + c] as f64)
                .sum::<f64>() as f32;
        }
    }
    let (xd, wmd, dyd) = (
        dev::upload(&g, &x).unwrap(),
        dev::upload(&g, &wm).unwrap(),
        dev::upload(&g, &dy).unwrap(),
    );
    let mut y = dev::zeros::<f32>(&g, m * n).unwrap();
    dev::gemm_x_wt::<f32>(&g, &xd, &wmd, &mut y, m, n, kk, 1.0, 0.0).unwrap();
    let mut dx = dev::zeros::<f32>(&g, m * kk).unwrap();
    dev::gemm_dy_w::<f32>(&g, &dyd, &wmd, &mut dx, m, n, kk, 1.0, 0.0).unwrap();
    let mut dw = dev::zeros::<f32>(&g, n * kk).unwrap();
    dev::gemm_dyt_x::<f32>(&g, &dyd, &xd, &mut dw, m, n, kk, 1.0, 0.0).unwrap();
    close(&dev::download(&g, &y).unwrap(), &y_ref, 1e-5, 0.0, "x·Wᵀ");
    close(&dev::download(&g, &dx).unwrap(), &dx_ref, 1e-5, 0.0, "dy·W");
    close(
        &dev::download(&g, &dw).unwrap(),
        &dw_ref,
        1e-5,
        0.0,
        "dyᵀ·x",
    );

    // Embedding gather and the deterministic scatter-add.
    let ids = [3u32, 7, 3, 0, 7, 7];
    let table = rand_vec(&mut r, 10 * hidden, 1.0);
    let tabd = dev::upload(&g, &table).unwrap();
    let idd = dev::upload_u32(&g, &ids).unwrap();
    let mut x = dev::zeros::<f32>(&g, ids.len() * hidden).unwrap();
    dev::embedding(&g, &tabd, &idd, ids.len(), hidden, &mut x).unwrap();
    let gathered: Vec<f32> = ids
        .iter()
        .flat_map(|&i| table[i as usize * hidden..(i as usize + 1) * hidden].to_vec())
        .collect();
    assert_eq!(dev::download(&g, &x).unwrap(), gathered);
    let dxv = rand_vec(&mut r, ids.len() * hidden, 1.0);
    let dxd = dev::upload(&g, &dxv).unwrap();
    let mut dtab = dev::zeros::<f32>(&g, 10 * hidden).unwrap();
    let groups = plan::group_by_id(&ids, 10).unwrap();
    dev::embedding_backward(&g, &dxd, &groups, hidden, &mut dtab).unwrap();
    let mut want = vec![0f32; 10 * hidden];
    for (t, &i) in ids.iter().enumerate() {
        for j in 0..hidden {
            want[i as usize * hidden + j] += dxv[t * hidden + j];
        }
    }
    close(
        &dev::download(&g, &dtab).unwrap(),
        &want,
        1e-6,
        0.0,
        "scatter-add",
    );
}

#[test]
fn gpu_adamw_and_grad_norm_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let n = 3000;
    let mut r = rng(5);
    let p0 = rand_vec(&mut r, n, 1.0);
    let grad = rand_vec(&mut r, n, 0.1);
    let mut cpu = crate::optim::AdamW::new(crate::optim::AdamWConfig::default()).unwrap();
    let mut p_ref = p0.clone();
    let mut pd = dev::upload(&g, &p0).unwrap();
    let gd = dev::upload(&g, &grad).unwrap();
    let mut md = dev::zeros::<f32>(&g, n).unwrap();
    let mut vd = dev::zeros::<f32>(&g, n).unwrap();
    let cfg = crate::optim::AdamWConfig::default();
    for step in 1..=3u64 {
        cpu.update(
            1e-3,
            crate::optim::ParamGrad {
                name: "p",
                param: &mut p_ref,
                grad: &grad,
                weight_decay: true,
            },
        )
        .unwrap();
        let bc1 = 1.0 - cfg.beta1.powi(step as i32);
        let bc2 = 1.0 - cfg.beta2.powi(step as i32);
        let s = dev::AdamWScalars {
            grad_scale: 1.0,
            decay: (1.0 - 1e-3f32 as f64 * cfg.weight_decay) as f32,
            one_minus_beta1: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            step_size: (1e-3f32 as f64 / bc1) as f32,
            bias_correction2_sqrt: bc2.sqrt() as f32,
            eps: cfg.eps as f32,
        };
        dev::adamw(&g, &mut pd, &gd, &mut md, &mut vd, n, s, None).unwrap();
    }
    close(
        &dev::download(&g, &pd).unwrap(),
        &p_ref,
        1e-6,
        1e-7,
        "adamw",
    );
    let norm = dev::global_grad_norm(&g, &[(&gd, n), (&gd, n)]).unwrap();
    let want = (2.0 * grad.iter().map(|&x| x as f64 * x as f64).sum::<f64>()).sqrt();
    assert!((norm - want).abs() <= 1e-9 * want, "{norm} vs {want}");
}

#[test]
fn gpu_sampling_matches_the_cpu_sampler() {
    let Some(g) = gpu() else { return };
    let (rows, vocab) = (4, 3000);
    let mut r = rng(6);
    let logits = rand_vec(&mut r, rows * vocab, 6.0);
    use crate::sampling::{SamplingParams, TokenSampler};
    for (temperature, top_p, top_k) in [(0.0, 1.0, 0), (1.0, 1.0, 0), (0.7, 0.9, 0), (1.0, 1.0, 20)]
    {
        let params = SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: 9,
            ..Default::default()
        };
        let mut cpu: Vec<TokenSampler> = (0..rows)
            .map(|i| TokenSampler::new(&params, i as u64, 0))
            .collect();
        let mut gpu_s = cpu.clone();
        let want: Vec<(u32, f32)> = cpu
            .iter_mut()
            .zip(logits.chunks(vocab))
            .map(|(s, l)| s.sample(&mut l.to_vec()))
            .collect();
        let u: Vec<f64> = gpu_s.iter_mut().map(|s| s.next_uniform(vocab)).collect();
        let mut ld = dev::upload(&g, &logits).unwrap();
        let drawn = dev::sample(&g, &mut ld, rows, vocab, temperature, top_k, top_p, &u).unwrap();
        let mut ld2 = dev::upload(&g, &logits).unwrap();
        let again = dev::sample(&g, &mut ld2, rows, vocab, temperature, top_k, top_p, &u).unwrap();
        assert_eq!(
            again.tokens, drawn.tokens,
            "GPU sampling is not deterministic"
        );
        assert_eq!(
            again.logprobs, drawn.logprobs,
            "GPU sampling is not deterministic"
        );
        for (row, (tok, lp)) in want.iter().enumerate() {
            assert_eq!(drawn.status[row], 0);
            // The CPU walks a truncated set by descending weight, the GPU by vocabulary order:
            // the same u may pick another token of the kept set there; the log-prob of the
            // token the GPU picked is still exact.
            let picked = drawn.tokens[row] as usize;
            let l = &logits[row * vocab..(row + 1) * vocab];
            let tt = if temperature == 0.0 { 1.0 } else { temperature };
            let m = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b / tt));
            let lse = m + l
                .iter()
                .map(|&x| ((x / tt - m) as f64).exp())
                .sum::<f64>()
                .ln() as f32;
            assert!(
                (drawn.logprobs[row] - (l[picked] / tt - lse)).abs() < 1e-4,
                "row {row}"
            );
            if temperature == 0.0 || (top_k == 0 && top_p == 1.0) {
                assert_eq!(drawn.tokens[row], *tok, "row {row}: T {temperature}");
                assert!((drawn.logprobs[row] - lp).abs() < 1e-4);
            }
        }
    }
    // Non-finite logits are reported per row.
    let mut bad = logits.clone();
    bad[vocab + 5] = f32::NAN;
    let mut ld = dev::upload(&g, &bad).unwrap();
    let drawn = dev::sample(&g, &mut ld, rows, vocab, 1.0, 0, 1.0, &[0.5; 4]).unwrap();
    assert_eq!(drawn.status, vec![0, 1, 0, 0]);
}

#[test]
fn gpu_decoder_matches_the_cpu_decoder() {
    use crate::model::decoding::DecodeEngine;
    let Some(g) = gpu() else { return };
    for precision in [crate::model::Precision::F32, crate::model::Precision::Bf16] {
        let config: crate::model::Qwen2Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 300, "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": true
        }))
        .unwrap();
        let mut model =
            crate::model::Qwen2::random(config, 0.3, 11, &candle_core::Device::Cpu).unwrap();
        if precision == crate::model::Precision::Bf16 {
            model = model.to_precision(precision).unwrap();
        }
        // Row 0 from a CPU prefill pushed with its cache; rows 1, 2 from each engine's own
        // prefill of two prompts (the GPU's packed varlen forward).
        let prompt: Vec<u32> = vec![5, 17, 42, 7, 99];
        let seqs = VarLen::from_lens(&[prompt.len()]);
        let positions: Vec<u32> = (0..prompt.len() as u32).collect();
        let (h_last, kv) = model.prefill(&prompt, &seqs, &positions).unwrap();
        let logits0 = model
            .logits(&h_last)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let kv: Vec<(Vec<f32>, Vec<f32>)> = kv
            .into_iter()
            .map(|(k, v)| (values(&k), values(&v)))
            .collect();
        let kv_refs: Vec<(&[f32], &[f32])> = kv
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        let cuda = crate::model::cuda_decode::CudaDecoder::new(g.clone(), &model).unwrap();
        let mut a = DecodeEngine::new_batch(&model, 3, 20).unwrap();
        let mut b = cuda.new_batch(3, 20).unwrap();
        let prompts = [vec![3u32, 1, 4, 1, 5], vec![9u32, 2, 6]];
        for batch in [&mut a, &mut b] {
            batch.push_row(&kv_refs, 20, &logits0[0]).unwrap();
            batch.push_prompts(&prompts[..1], 1, 12).unwrap();
            batch.push_prompts(&prompts[1..], 1, 12).unwrap();
        }
        // Determinism: a second GPU batch fed the same gives the same bits.
        let mut b2 = cuda.new_batch(3, 20).unwrap();
        b2.push_row(&kv_refs, 20, &logits0[0]).unwrap();
        b2.push_prompts(&prompts[..1], 1, 12).unwrap();
        b2.push_prompts(&prompts[1..], 1, 12).unwrap();
        assert_eq!(
            b2.logits().unwrap(),
            b.logits().unwrap(),
            "{precision}: the GPU prefill is not deterministic"
        );
        let tol0 = if precision == crate::model::Precision::F32 {
            1e-4
        } else {
            3e-2
        };
        close(
            &b.logits().unwrap(),
            &a.logits().unwrap(),
            tol0,
            0.0,
            &format!("{precision} prefill"),
        );
        let tol = if precision == crate::model::Precision::F32 {
            1e-4
        } else {
            3e-2
        };
        for step in 0..6u32 {
            let rows = a.rows();
            let tokens = &[step * 13 % 300, step * 29 % 300, step * 31 % 300][3 - rows..];
            let pos = &[5 + step, 5 + step, 3 + step][3 - rows..];
            a.step(tokens, pos).unwrap();
            b.step(tokens, pos).unwrap();
            close(
                &b.logits().unwrap(),
                &a.logits().unwrap(),
                tol,
                0.0,
                &format!("{precision} step {step}"),
            );
            if step == 3 {
                a.retain(&[false, true, true]).unwrap();
                b.retain(&[false, true, true]).unwrap();
            }
        }
    }
}

/// Qwen3 (QK-norm, head_dim ≠ hidden/heads) and Llama 3 (scaled RoPE, all optional biases) on
/// the GPU: the train step's log-probs and every gradient (QK-norm weights included) against
/// the CPU engine, and the GPU decoder's prefill and steps against the CPU decoder (f32).
#[test]
fn gpu_qwen3_and_llama_match_the_cpu_engine_and_decoder() {
    use crate::model::decoding::DecodeEngine;
    use crate::model::{Activations, Qwen2, TrainBatch};
    let Some(g) = gpu() else { return };
    for extra in [
        serde_json::json!({"model_type": "qwen3", "head_dim": 64}),
        serde_json::json!({"model_type": "llama", "attention_bias": true, "mlp_bias": true,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    ] {
        let mut v = serde_json::json!({
            "vocab_size": 300, "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": false
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let config: crate::model::Qwen2Config = serde_json::from_value(v).unwrap();
        let model = Qwen2::random(config, 0.3, 17, &candle_core::Device::Cpu).unwrap();
        let what = extra.to_string();
        let (p0, c0) = ([1u32, 2, 3], [4u32, 5, 6, 7, 200]);
        let (p1, c1) = ([9u32], [10u32, 11, 299]);
        let batch = TrainBatch::new(&[(&p0[..], &c0[..]), (&p1[..], &c1[..])]).unwrap();
        let gt = rand_vec(&mut rng(3), batch.targets.len(), 1.0);
        let (lp, cache) = model
            .forward_train_with(&batch, 1.0, Activations::All)
            .unwrap();
        let cpu_grads = model.backward(&batch, cache, &gt).unwrap();
        let mut step = crate::model::cuda_train::CudaTrainStep::new(g.clone(), &model).unwrap();
        let (lpg, cg) = step.forward(&batch, 1.0).unwrap();
        close(
            &lpg.logprobs,
            &lp.logprobs,
            1e-5,
            1e-5,
            &format!("{what}: logprobs"),
        );
        step.backward(&batch, cg, &gt).unwrap();
        let gpu_grads = step.gradients().unwrap();
        let cpu_grads = cpu_grads.named();
        assert_eq!(cpu_grads.len(), gpu_grads.len(), "{what}");
        for ((name, want), (gname, got)) in cpu_grads.iter().zip(&gpu_grads) {
            assert_eq!(name, gname);
            let num: f64 = want
                .iter()
                .zip(got)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let den: f64 = want.iter().map(|a| (*a as f64).powi(2)).sum();
            let rel = (num / den.max(1e-30)).sqrt();
            assert!(
                rel <= 1e-4,
                "{what}: gradient of {name}: relative L2 error {rel}"
            );
        }
        let cuda = crate::model::cuda_decode::CudaDecoder::new(g.clone(), &model).unwrap();
        let mut a = DecodeEngine::new_batch(&model, 2, 20).unwrap();
        let mut b = cuda.new_batch(2, 20).unwrap();
        let prompts = [vec![3u32, 1, 4, 1, 5], vec![9u32, 2, 6]];
        for batch in [&mut a, &mut b] {
            batch.push_prompts(&prompts, 1, 12).unwrap();
        }
        close(
            &b.logits().unwrap(),
            &a.logits().unwrap(),
            1e-4,
            0.0,
            &format!("{what}: prefill"),
        );
        for s in 0..4u32 {
            let tokens = [s * 13 % 300, s * 29 % 300];
            let pos = [5 + s, 3 + s];
            a.step(&tokens, &pos).unwrap();
            b.step(&tokens, &pos).unwrap();
            close(
                &b.logits().unwrap(),
                &a.logits().unwrap(),
                1e-4,
                0.0,
                &format!("{what}: step {s}"),
            );
        }
    }
}

/// The forward-only copy (the KL reference of a GPU run) gives the train step's log-probs bit
/// for bit, f32 and bf16, and refuses a backward.
#[test]
fn gpu_frozen_copy_forward_equals_the_train_steps() {
    use crate::model::{Activations, Precision, Qwen2, TrainBatch};
    let Some(g) = gpu() else { return };
    for precision in [Precision::F32, Precision::Bf16] {
        let config: crate::model::Qwen2Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 300, "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": false
        }))
        .unwrap();
        let mut model = Qwen2::random(config, 0.3, 17, &candle_core::Device::Cpu).unwrap();
        if precision == Precision::Bf16 {
            model = model.to_precision(precision).unwrap();
        }
        let batch = TrainBatch::new(&[(&[1u32, 2, 3][..], &[4u32, 5, 6, 7][..])]).unwrap();
        let step = crate::model::cuda_train::CudaTrainStep::new(g.clone(), &model).unwrap();
        let mut frozen =
            crate::model::cuda_train::CudaTrainStep::frozen(g.clone(), &model).unwrap();
        let (a, _) = step
            .forward_with(&batch, 0.9, Activations::LayerInputs)
            .unwrap();
        let (b, cache) = frozen
            .forward_with(&batch, 0.9, Activations::LayerInputs)
            .unwrap();
        assert_eq!(a.logprobs, b.logprobs, "{precision}");
        assert_eq!(a.entropy, b.entropy, "{precision}");
        let gt = vec![1.0f32; batch.targets.len()];
        assert!(frozen.backward(&batch, cache, &gt).is_err());
    }
}
