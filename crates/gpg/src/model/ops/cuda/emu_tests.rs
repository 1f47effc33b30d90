//! Every CUDA kernel executed on the CPU by the emulator (`emu.rs`) and compared with the CPU
//! ops (`model/ops/cpu`, through the public ops) or f64 references, in the default build and
//! test suite: no GPU, no `cuda` feature. Launch geometry comes from `plan` (the GPU path's
//! functions), arguments are pushed in `ops.rs`'s order, outputs start as NaN where the GPU
//! path may leave them unzeroed, and every test runs in both thread/block orders
//! ([`in_both_orders`]: identical bits, or a race is reported). Tolerances are the GPU tests'
//! (`tests.rs`): f32 within 1e-5 of the largest reference value, bf16 within its precision.
//! cuBLAS products are computed on the host (f64 sums) where an op needs one.

use super::emu::{emu, in_both_orders, Args, DevBuf, Emu};
use super::plan::{self, Launch, ATTENTION_WARPS, KV_BLOCK};
use super::sources::ALL;
use crate::model::ops::test_util::{rand_vec, rng, tensor, values};
use crate::model::ops::{self as cpu_ops, Rope, VarLen};

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
            if e.is_nan() {
                break;
            }
        }
    }
    assert!(
        worst <= rtol * scale + atol,
        "{what}: max error {worst} at {at} (got {}, want {}), scale {scale}",
        got[at],
        want[at]
    );
}

fn to_bf(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&a| half::bf16::from_f32(a).to_bits())
        .collect()
}

fn from_bf(v: &[u16]) -> Vec<f32> {
    v.iter()
        .map(|&b| half::bf16::from_bits(b).to_f32())
        .collect()
}

fn elementwise(n: usize) -> Option<Launch> {
    Launch::elementwise(n).unwrap()
}

/// Every kernel of every module is launched by name somewhere in this file.
#[test]
fn every_kernel_is_executed_by_a_test() {
    let text = include_str!("emu_tests.rs");
    let mut count = 0;
    for m in ALL {
        for k in m.kernels {
            assert!(
                text.contains(&format!("\"{k}\",")) || text.contains(&format!("\"{k}\"")),
                "kernel {k} of {}.cu is not executed by the emulator tests",
                m.name
            );
            count += 1;
        }
    }
    assert_eq!(count, 34, "kernels in sources::ALL");
}

// ---------------------------------------------------------------- RMSNorm

#[allow(clippy::too_many_arguments)]
fn rms_norm_kernels<T: Copy>(
    e: &Emu,
    (fwd, bwd): (&str, &str),
    x: &[T],
    w: &[f32],
    dy: &[T],
    rows: usize,
    h: usize,
) -> (Vec<T>, Vec<f32>, Vec<T>, Vec<f32>) {
    let (xd, wd, dyd) = (
        DevBuf::from_slice(x),
        DevBuf::from_slice(w),
        DevBuf::from_slice(dy),
    );
    let y = DevBuf::<T>::poisoned(rows * h);
    let rstd = DevBuf::<f32>::poisoned(rows);
    let args = Args::new()
        .buf(&xd)
        .buf(&wd)
        .f32(1e-6)
        .i32(h as i32)
        .buf(&y)
        .buf(&rstd);
    e.run(fwd, plan::row_launch(rows).unwrap(), &args);
    // Backward as ops::rms_norm_backward: per-part dx and dw partials, then sum_parts.
    let (parts, per, launch) = plan::rms_norm_backward_launch(rows).unwrap();
    let dx = DevBuf::<T>::poisoned(rows * h);
    let partial = DevBuf::<f32>::poisoned(parts * h);
    let dw = DevBuf::<f32>::poisoned(h);
    let args = Args::new()
        .buf(&xd)
        .buf(&wd)
        .buf(&rstd)
        .buf(&dyd)
        .i32(h as i32)
        .i32(rows as i32)
        .i32(per as i32)
        .buf(&dx)
        .buf(&partial);
    e.run(bwd, launch, &args);
    let args = Args::new()
        .buf(&partial)
        .i32(parts as i32)
        .i32(h as i32)
        .buf(&dw);
    e.run("sum_parts", elementwise(h), &args);
    (y.to_vec(), rstd.to_vec(), dx.to_vec(), dw.to_vec())
}

#[test]
fn emulated_rms_norm_matches_the_cpu() {
    let Some(e) = emu() else { return };
    // 600 rows: more than RMS_NORM_DW_PARTS, so parts hold several rows (and a ragged last).
    for (rows, h) in [(37, 320), (600, 96)] {
        let mut r = rng(1);
        let x = rand_vec(&mut r, rows * h, 2.0);
        let w = rand_vec(&mut r, h, 1.0);
        let dy = rand_vec(&mut r, rows * h, 1.0);
        let (xt, wt) = (tensor(&x, &[rows, h]), tensor(&w, &[h]));
        let (y_ref, rstd_ref) = cpu_ops::rms_norm(&xt, &wt, 1e-6).unwrap();
        let (dx_ref, dw_ref) =
            cpu_ops::rms_norm_backward(&tensor(&dy, &[rows, h]), &xt, &wt, &rstd_ref).unwrap();
        let got = in_both_orders("rms_norm f32", || {
            let (y, rstd, dx, dw) = rms_norm_kernels(
                e,
                ("rms_norm_fwd_f32", "rms_norm_bwd_f32"),
                &x,
                &w,
                &dy,
                rows,
                h,
            );
            vec![y, rstd, dx, dw]
        });
        close(&got[0], &values(&y_ref), 1e-5, 0.0, "y");
        close(&got[1], &values(&rstd_ref), 1e-5, 0.0, "rstd");
        close(&got[2], &values(&dx_ref), 1e-5, 0.0, "dx");
        close(&got[3], &values(&dw_ref), 1e-5, 0.0, "dw");
        // bf16 activations: within bf16's precision.
        let (xb, dyb) = (to_bf(&x), to_bf(&dy));
        let got = in_both_orders("rms_norm bf16", || {
            let (y, rstd, dx, dw) = rms_norm_kernels(
                e,
                ("rms_norm_fwd_bf16", "rms_norm_bwd_bf16"),
                &xb,
                &w,
                &dyb,
                rows,
                h,
            );
            vec![from_bf(&y), rstd, from_bf(&dx), dw]
        });
        close(&got[0], &values(&y_ref), 1.6e-2, 0.0, "y bf16");
        close(&got[2], &values(&dx_ref), 3e-2, 0.0, "dx bf16");
        close(&got[3], &values(&dw_ref), 3e-2, 0.0, "dw bf16");
    }
    // No rows: nothing is launched (a block would read row 0 of an empty buffer).
    assert!(plan::row_launch(0).unwrap().is_none());
}

// ---------------------------------------------------------------- RoPE, SwiGLU

#[test]
fn emulated_rope_and_swiglu_match_the_cpu() {
    let Some(e) = emu() else { return };
    let (t, heads, hd) = (9, 3, 64);
    let mut r = rng(2);
    let x = rand_vec(&mut r, t * heads * hd, 1.0);
    let positions: Vec<u32> = (0..t as u32).map(|p| p * 7 % 50).collect();
    let rope = Rope::new(hd, 1e6, 64);
    let xt = tensor(&x, &[t, heads, hd]);
    let fwd_ref = values(&rope.forward(&xt, &positions).unwrap());
    let bwd_ref = values(&rope.backward(&xt, &positions).unwrap());
    let (cos, sin) = rope.tables();
    let (cd, sd, pd) = (
        DevBuf::from_slice(cos),
        DevBuf::from_slice(sin),
        DevBuf::from_slice(&positions),
    );
    let launch = elementwise(t * heads * hd / 2);
    let run = |kernel: &str, xd: &DevBuf<f32>, sign: f32| {
        let args = Args::new()
            .buf(xd)
            .buf(&pd)
            .buf(&cd)
            .buf(&sd)
            .i32(t as i32)
            .i32(heads as i32)
            .i32(hd as i32)
            .f32(sign);
        e.run(kernel, launch, &args);
    };
    let got = in_both_orders("rope", || {
        let (a, b) = (DevBuf::from_slice(&x), DevBuf::from_slice(&x));
        run("rope_f32", &a, 1.0);
        run("rope_f32", &b, -1.0);
        vec![a.to_vec(), b.to_vec()]
    });
    close(&got[0], &fwd_ref, 1e-5, 0.0, "rope fwd");
    close(&got[1], &bwd_ref, 1e-5, 0.0, "rope bwd");
    let got = in_both_orders("rope bf16", || {
        let xb = DevBuf::from_slice(&to_bf(&x));
        let args = Args::new()
            .buf(&xb)
            .buf(&pd)
            .buf(&cd)
            .buf(&sd)
            .i32(t as i32)
            .i32(heads as i32)
            .i32(hd as i32)
            .f32(1.0);
        e.run("rope_bf16", launch, &args);
        vec![from_bf(&xb.to_vec())]
    });
    close(&got[0], &fwd_ref, 1.6e-2, 0.0, "rope bf16");

    let n = 5000;
    let (ga, ua, dh) = (
        rand_vec(&mut r, n, 4.0),
        rand_vec(&mut r, n, 2.0),
        rand_vec(&mut r, n, 1.0),
    );
    let (gt, ut) = (tensor(&ga, &[50, n / 50]), tensor(&ua, &[50, n / 50]));
    let h_ref = values(&cpu_ops::swiglu(&gt, &ut).unwrap());
    let (dg_ref, du_ref) = cpu_ops::swiglu_backward(&tensor(&dh, &[50, n / 50]), &gt, &ut).unwrap();
    let got = in_both_orders("swiglu", || {
        let (gd, ud, dhd) = (
            DevBuf::from_slice(&ga),
            DevBuf::from_slice(&ua),
            DevBuf::from_slice(&dh),
        );
        let h = DevBuf::<f32>::poisoned(n);
        let args = Args::new().buf(&gd).buf(&ud).buf(&h).u64(n as u64);
        e.run("swiglu_fwd_f32", elementwise(n), &args);
        let (dg, du) = (DevBuf::<f32>::poisoned(n), DevBuf::<f32>::poisoned(n));
        let args = Args::new()
            .buf(&gd)
            .buf(&ud)
            .buf(&dhd)
            .buf(&dg)
            .buf(&du)
            .u64(n as u64);
        e.run("swiglu_bwd_f32", elementwise(n), &args);
        vec![h.to_vec(), dg.to_vec(), du.to_vec()]
    });
    close(&got[0], &h_ref, 1e-5, 0.0, "swiglu");
    close(&got[1], &values(&dg_ref), 1e-5, 0.0, "swiglu dg");
    close(&got[2], &values(&du_ref), 1e-5, 0.0, "swiglu du");
    let got = in_both_orders("swiglu bf16", || {
        let (gd, ud, dhd) = (
            DevBuf::from_slice(&to_bf(&ga)),
            DevBuf::from_slice(&to_bf(&ua)),
            DevBuf::from_slice(&to_bf(&dh)),
        );
        let h = DevBuf::<u16>::poisoned(n);
        let args = Args::new().buf(&gd).buf(&ud).buf(&h).u64(n as u64);
        e.run("swiglu_fwd_bf16", elementwise(n), &args);
        let (dg, du) = (DevBuf::<u16>::poisoned(n), DevBuf::<u16>::poisoned(n));
        let args = Args::new()
            .buf(&gd)
            .buf(&ud)
            .buf(&dhd)
            .buf(&dg)
            .buf(&du)
            .u64(n as u64);
        e.run("swiglu_bwd_bf16", elementwise(n), &args);
        vec![
            from_bf(&h.to_vec()),
            from_bf(&dg.to_vec()),
            from_bf(&du.to_vec()),
        ]
    });
    close(&got[0], &h_ref, 3e-2, 0.0, "swiglu bf16");
    close(&got[1], &values(&dg_ref), 3e-2, 0.0, "swiglu dg bf16");
    close(&got[2], &values(&du_ref), 3e-2, 0.0, "swiglu du bf16");
}

// ---------------------------------------------------------------- attention

#[test]
fn emulated_attention_forward_backward_and_decode_match_the_cpu() {
    let Some(e) = emu() else { return };
    for (nh, nkv, hd, lens) in [
        (4usize, 2usize, 64usize, vec![5usize, 1, 70]),
        (2, 1, 128, vec![33, 3]),
    ] {
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
        let scale = 1.0 / (hd as f32).sqrt();
        let what = format!("attention nh {nh} nkv {nkv} hd {hd}");
        let got = in_both_orders(&what, || {
            let (qd, kd, vd, dod) = (
                DevBuf::from_slice(&q),
                DevBuf::from_slice(&k),
                DevBuf::from_slice(&v),
                DevBuf::from_slice(&dout),
            );
            let (sd, ed) = (DevBuf::from_slice(&start), DevBuf::from_slice(&end));
            let out = DevBuf::<f32>::poisoned(t * nh * hd);
            let lse = DevBuf::<f32>::poisoned(t * nh);
            fn dims(
                a: Args<'_>,
                t: usize,
                nh: usize,
                nkv: usize,
                hd: usize,
                scale: f32,
            ) -> Args<'_> {
                a.i32(t as i32)
                    .i32(nh as i32)
                    .i32(nkv as i32)
                    .i32(hd as i32)
                    .f32(scale)
            }
            let args = dims(
                Args::new().buf(&qd).buf(&kd).buf(&vd).buf(&sd),
                t,
                nh,
                nkv,
                hd,
                scale,
            )
            .buf(&out)
            .buf(&lse);
            e.run(
                "attention_fwd",
                plan::attention_launch(t, nh, 1, hd).unwrap(),
                &args,
            );
            let dvec = DevBuf::<f32>::poisoned(t * nh);
            let args = Args::new()
                .buf(&dod)
                .buf(&out)
                .i32((t * nh) as i32)
                .i32(hd as i32)
                .buf(&dvec);
            e.run(
                "attention_bwd_dot",
                plan::attention_launch(t * nh, 1, 0, hd).unwrap(),
                &args,
            );
            let dq = DevBuf::<f32>::poisoned(t * nh * hd);
            let args = dims(
                Args::new()
                    .buf(&qd)
                    .buf(&kd)
                    .buf(&vd)
                    .buf(&dod)
                    .buf(&lse)
                    .buf(&dvec)
                    .buf(&sd),
                t,
                nh,
                nkv,
                hd,
                scale,
            )
            .buf(&dq);
            e.run(
                "attention_bwd_dq",
                plan::attention_launch(t, nh, 2, hd).unwrap(),
                &args,
            );
            let (dk, dv) = (
                DevBuf::<f32>::poisoned(t * nkv * hd),
                DevBuf::<f32>::poisoned(t * nkv * hd),
            );
            let args = dims(
                Args::new()
                    .buf(&qd)
                    .buf(&kd)
                    .buf(&vd)
                    .buf(&dod)
                    .buf(&lse)
                    .buf(&dvec)
                    .buf(&ed),
                t,
                nh,
                nkv,
                hd,
                scale,
            )
            .buf(&dk)
            .buf(&dv);
            e.run(
                "attention_bwd_dkv",
                plan::attention_launch(t, nkv, 2, hd).unwrap(),
                &args,
            );
            vec![
                out.to_vec(),
                lse.to_vec(),
                dq.to_vec(),
                dk.to_vec(),
                dv.to_vec(),
            ]
        });
        close(
            &got[0],
            &values(&out_ref),
            1e-5,
            0.0,
            &format!("{what}: out"),
        );
        close(
            &got[1],
            &values(&lse_ref),
            1e-5,
            0.0,
            &format!("{what}: lse"),
        );
        close(&got[2], &values(&dq_ref), 1e-5, 0.0, &format!("{what}: dq"));
        close(&got[3], &values(&dk_ref), 1e-5, 0.0, &format!("{what}: dk"));
        close(&got[4], &values(&dv_ref), 1e-5, 0.0, &format!("{what}: dv"));

        // Decoding over the paged cache, two rows of the longest sequence: row 0's first `pre`
        // positions written as a prefilled prompt (kv_write_rows), both rows then appended one
        // position per step (kv_append); row 0 ends at the sequence's last token, row 1 at
        // token `steps − 1`. Each must equal the varlen forward's row. Unwritten cache slots
        // hold NaN: reading one would show.
        let s = (0..lens.len()).max_by_key(|&s| lens[s]).unwrap_or(0);
        let (o, len) = (seqs.offsets[s], lens[s]);
        let pre = len / 2;
        let steps = len - pre;
        let kvd = nkv * hd;
        let out_rows = values(&out_ref);
        let got = in_both_orders(&format!("{what}: decode"), || {
            let n_blocks = 2 * plan::BlockTables::blocks_for(len) + 1;
            let mut tables = plan::BlockTables::new(n_blocks);
            tables.push(pre, len).unwrap();
            tables.push(0, len).unwrap();
            let kp = DevBuf::<f32>::poisoned(n_blocks * KV_BLOCK * kvd);
            let vp = DevBuf::<f32>::poisoned(n_blocks * KV_BLOCK * kvd);
            // The prompt: packed rows o..o+pre into row 0's slots.
            let src: Vec<u32> = (0..pre as u32).map(|p| (o as u32) + p).collect();
            let slots: Vec<u32> = (0..pre).map(|p| tables.slot(0, p) as u32).collect();
            let (kd, vd) = (DevBuf::from_slice(&k), DevBuf::from_slice(&v));
            let (srcd, slotd) = (DevBuf::from_slice(&src), DevBuf::from_slice(&slots));
            let args = Args::new()
                .buf(&kd)
                .buf(&vd)
                .buf(&srcd)
                .buf(&slotd)
                .i32(pre as i32)
                .i32(kvd as i32)
                .buf(&kp)
                .buf(&vp);
            e.run("kv_write_rows", elementwise(pre * kvd), &args);
            for step in 0..steps {
                let (table, mb) = tables.table();
                let rows_pos = [o + pre + step, o + step];
                let kn: Vec<f32> = rows_pos
                    .iter()
                    .flat_map(|&p| k[p * kvd..(p + 1) * kvd].to_vec())
                    .collect();
                let vn: Vec<f32> = rows_pos
                    .iter()
                    .flat_map(|&p| v[p * kvd..(p + 1) * kvd].to_vec())
                    .collect();
                let (knd, vnd) = (DevBuf::from_slice(&kn), DevBuf::from_slice(&vn));
                let (td, bd) = (
                    DevBuf::from_slice(&table),
                    DevBuf::from_slice(tables.lens()),
                );
                tables.check_room().unwrap();
                let args = Args::new()
                    .buf(&knd)
                    .buf(&vnd)
                    .buf(&td)
                    .buf(&bd)
                    .i32(2)
                    .i32(mb as i32)
                    .i32(KV_BLOCK as i32)
                    .i32(kvd as i32)
                    .buf(&kp)
                    .buf(&vp);
                e.run("kv_append", elementwise(2 * kvd), &args);
                tables.advance().unwrap();
            }
            let (table, mb) = tables.table();
            let qrows: Vec<f32> = [o + len - 1, o + steps - 1]
                .iter()
                .flat_map(|&p| q[p * nh * hd..(p + 1) * nh * hd].to_vec())
                .collect();
            let (qd, td, ld) = (
                DevBuf::from_slice(&qrows),
                DevBuf::from_slice(&table),
                DevBuf::from_slice(tables.lens()),
            );
            let att = DevBuf::<f32>::poisoned(2 * nh * hd);
            let args = Args::new()
                .buf(&qd)
                .buf(&kp)
                .buf(&vp)
                .buf(&td)
                .buf(&ld)
                .i32(mb as i32)
                .i32(KV_BLOCK as i32)
                .i32(nh as i32)
                .i32(nkv as i32)
                .i32(hd as i32)
                .f32(scale)
                .buf(&att);
            e.run(
                "attention_decode_paged",
                plan::attention_decode_launch(2, nh, hd).unwrap(),
                &args,
            );
            vec![att.to_vec()]
        });
        let row = |p: usize| &out_rows[p * nh * hd..(p + 1) * nh * hd];
        close(
            &got[0][..nh * hd],
            row(o + len - 1),
            1e-5,
            0.0,
            &format!("{what}: decode row 0"),
        );
        close(
            &got[0][nh * hd..],
            row(o + steps - 1),
            1e-5,
            0.0,
            &format!("{what}: decode row 1"),
        );
    }
    let _ = ATTENTION_WARPS;
}

// ---------------------------------------------------------------- output head

#[test]
fn emulated_lm_head_matches_the_cpu() {
    let Some(e) = emu() else { return };
    let (rows, hidden, vocab, inv_t) = (11, 96, 1000, 0.8f32);
    let mut r = rng(4);
    let h = rand_vec(&mut r, rows * hidden, 1.0);
    let w = rand_vec(&mut r, vocab * hidden, 0.3);
    let g = rand_vec(&mut r, rows, 1.0);
    let targets: Vec<u32> = (0..rows as u32).map(|i| i * 89 % vocab as u32).collect();
    let (ht, wt) = (tensor(&h, &[rows, hidden]), tensor(&w, &[vocab, hidden]));
    let want = cpu_ops::lm_head_logprobs(&ht, &wt, &targets, inv_t).unwrap();
    let (dh_ref, _) = cpu_ops::lm_head_backward(&ht, &wt, &targets, &want.lse, &g, inv_t).unwrap();
    // A budget of 3 chunks with a ragged last one, as the GPU test.
    let cols = plan::head_chunk_columns(rows * 350, rows, vocab);
    // cuBLAS's chunk product on the host: z[n, c] = inv_t·h_n·W_{c0+c}.
    let chunk = |c0: usize, c: usize| -> Vec<f32> {
        let mut z = vec![0f32; rows * c];
        for n in 0..rows {
            for j in 0..c {
                let s: f64 = (0..hidden)
                    .map(|i| h[n * hidden + i] as f64 * w[(c0 + j) * hidden + i] as f64)
                    .sum();
                z[n * c + j] = (s * inv_t as f64) as f32;
            }
        }
        z
    };
    let got = in_both_orders("lm_head", || {
        let z = DevBuf::<f32>::poisoned(rows * cols);
        let td = DevBuf::from_slice(&targets);
        let m = DevBuf::filled(rows, f32::NEG_INFINITY);
        let (l, s) = (DevBuf::filled(rows, 0f32), DevBuf::filled(rows, 0f32));
        // tgt: every target lies in one chunk, so the fold writes each row once.
        let tgt = DevBuf::<f32>::poisoned(rows);
        let mut c0 = 0;
        while c0 < vocab {
            let c = cols.min(vocab - c0);
            z.write(0, &chunk(c0, c));
            let args = Args::new()
                .buf(&z)
                .i32(c as i32)
                .i32(c0 as i32)
                .buf(&td)
                .buf(&m)
                .buf(&l)
                .buf(&s)
                .buf(&tgt);
            e.run("head_chunk_fold", plan::row_launch(rows).unwrap(), &args);
            c0 += c;
        }
        let (lp, ent, lse) = (
            DevBuf::<f32>::poisoned(rows),
            DevBuf::<f32>::poisoned(rows),
            DevBuf::<f32>::poisoned(rows),
        );
        let args = Args::new()
            .buf(&m)
            .buf(&l)
            .buf(&s)
            .buf(&tgt)
            .i32(rows as i32)
            .buf(&lp)
            .buf(&ent)
            .buf(&lse);
        e.run("head_finish", elementwise(rows), &args);
        // Backward: dz per chunk in place, then dh += inv_t·dz·W_chunk on the host.
        let gd = DevBuf::from_slice(&g);
        let mut dh = vec![0f64; rows * hidden];
        let mut c0 = 0;
        while c0 < vocab {
            let c = cols.min(vocab - c0);
            z.write(0, &chunk(c0, c));
            let args = Args::new()
                .buf(&z)
                .i32(rows as i32)
                .i32(c as i32)
                .i32(c0 as i32)
                .buf(&td)
                .buf(&lse)
                .buf(&gd);
            e.run("head_chunk_dlogits", elementwise(rows * c), &args);
            let dz = z.to_vec();
            for n in 0..rows {
                for j in 0..c {
                    let d = dz[n * c + j] as f64 * inv_t as f64;
                    for i in 0..hidden {
                        dh[n * hidden + i] += d * w[(c0 + j) * hidden + i] as f64;
                    }
                }
            }
            c0 += c;
        }
        vec![
            lp.to_vec(),
            ent.to_vec(),
            lse.to_vec(),
            dh.iter().map(|&x| x as f32).collect(),
        ]
    });
    close(&got[0], &want.logprobs, 1e-5, 1e-5, "logprobs");
    close(&got[1], &want.entropy, 1e-5, 1e-5, "entropy");
    close(&got[2], &want.lse, 1e-5, 0.0, "lse");
    close(&got[3], &values(&dh_ref), 1e-4, 0.0, "dh");
}

// ---------------------------------------------------------------- embedding

#[test]
fn emulated_embedding_gather_and_scatter_add_match() {
    let Some(e) = emu() else { return };
    let hidden = 96;
    let ids = [3u32, 7, 3, 0, 7, 7];
    let mut r = rng(5);
    let table = rand_vec(&mut r, 10 * hidden, 1.0);
    let dxv = rand_vec(&mut r, ids.len() * hidden, 1.0);
    let groups = plan::group_by_id(&ids, 10).unwrap();
    let got = in_both_orders("embedding", || {
        let idd = DevBuf::from_slice(&ids);
        let x = DevBuf::<f32>::poisoned(ids.len() * hidden);
        let tabd = DevBuf::from_slice(&table);
        let launch = plan::row_launch(ids.len()).unwrap();
        let args = Args::new().buf(&tabd).buf(&idd).i32(hidden as i32).buf(&x);
        e.run("embedding_fwd_f32", launch, &args);
        let xb = DevBuf::<f32>::poisoned(ids.len() * hidden);
        let tabb = DevBuf::from_slice(&to_bf(&table));
        let args = Args::new().buf(&tabb).buf(&idd).i32(hidden as i32).buf(&xb);
        e.run("embedding_fwd_bf16", launch, &args);
        let dxd = DevBuf::from_slice(&dxv);
        let dtab = DevBuf::filled(10 * hidden, 0f32);
        let (u, off, tok) = (
            DevBuf::from_slice(&groups.unique),
            DevBuf::from_slice(&groups.offsets),
            DevBuf::from_slice(&groups.tokens),
        );
        let args = Args::new()
            .buf(&dxd)
            .buf(&u)
            .buf(&off)
            .buf(&tok)
            .i32(hidden as i32)
            .buf(&dtab);
        e.run(
            "embedding_bwd",
            plan::row_launch(groups.unique.len()).unwrap(),
            &args,
        );
        vec![x.to_vec(), xb.to_vec(), dtab.to_vec()]
    });
    let gathered: Vec<f32> = ids
        .iter()
        .flat_map(|&i| table[i as usize * hidden..(i as usize + 1) * hidden].to_vec())
        .collect();
    assert_eq!(got[0], gathered);
    assert_eq!(got[1], from_bf(&to_bf(&gathered)));
    // Each id's rows summed in token order: exactly the host's loop in that order.
    let mut want = vec![0f32; 10 * hidden];
    for j in 0..hidden {
        for (u, &id) in groups.unique.iter().enumerate() {
            let mut acc = 0f32;
            for &t in &groups.tokens[groups.offsets[u] as usize..groups.offsets[u + 1] as usize] {
                acc += dxv[t as usize * hidden + j];
            }
            want[id as usize * hidden + j] += acc;
        }
    }
    assert_eq!(got[2], want);
}

// ---------------------------------------------------------------- optimiser

#[test]
fn emulated_adamw_and_grad_norm_match_the_cpu() {
    let Some(e) = emu() else { return };
    let n = 3000;
    let mut r = rng(6);
    let p0 = rand_vec(&mut r, n, 1.0);
    let grad = rand_vec(&mut r, n, 0.1);
    let cfg = crate::optim::AdamWConfig::default();
    let mut cpu = crate::optim::AdamW::new(cfg).unwrap();
    let mut p_ref = p0.clone();
    let steps: Vec<_> = (1..=3u64)
        .map(|step| {
            let bc1 = 1.0 - cfg.beta1.powi(step as i32);
            let bc2 = 1.0 - cfg.beta2.powi(step as i32);
            [
                1.0,
                (1.0 - 1e-3f32 as f64 * cfg.weight_decay) as f32,
                (1.0 - cfg.beta1) as f32,
                cfg.beta2 as f32,
                (1.0 - cfg.beta2) as f32,
                (1e-3f32 as f64 / bc1) as f32,
                bc2.sqrt() as f32,
                cfg.eps as f32,
            ]
        })
        .collect();
    for _ in 1..=3 {
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
    }
    let got = in_both_orders("adamw", || {
        let (pd, gd) = (DevBuf::from_slice(&p0), DevBuf::from_slice(&grad));
        let (md, vd) = (DevBuf::filled(n, 0f32), DevBuf::filled(n, 0f32));
        let wb = DevBuf::<u16>::poisoned(n);
        for (i, s) in steps.iter().enumerate() {
            let mut args = Args::new()
                .buf(&pd)
                .buf(&gd)
                .buf(&md)
                .buf(&vd)
                .u64(n as u64);
            for &x in s {
                args = args.f32(x);
            }
            // The bf16 compute copy on the last step only (a null pointer before).
            args = if i == 2 { args.buf(&wb) } else { args.null() };
            e.run("adamw_step", elementwise(n), &args);
        }
        vec![pd.to_vec(), from_bf(&wb.to_vec())]
    });
    close(&got[0], &p_ref, 1e-6, 1e-7, "adamw");
    assert_eq!(got[1], from_bf(&to_bf(&got[0])), "bf16 write-back");

    // The global norm: two tensors' partials, then their sum in order.
    let grad2 = rand_vec(&mut r, 100_003, 0.5);
    let want: f64 = grad
        .iter()
        .chain(&grad2)
        .map(|&x| x as f64 * x as f64)
        .sum();
    let blocks = plan::GRAD_NORM_BLOCKS;
    let got = in_both_orders("grad norm", || {
        let partial = DevBuf::<f64>::poisoned(2 * blocks);
        for (i, g) in [&grad, &grad2].into_iter().enumerate() {
            let gd = DevBuf::from_slice(g);
            let args = Args::new()
                .buf(&gd)
                .u64(g.len() as u64)
                .buf_at(&partial, i * blocks);
            e.run("sum_squares", Some(plan::grad_norm_launch()), &args);
        }
        let total = DevBuf::<f64>::poisoned(1);
        let args = Args::new()
            .buf(&partial)
            .u64((2 * blocks) as u64)
            .buf(&total);
        e.run("sum_f64", Some(plan::sum_f64_launch()), &args);
        vec![vec![total.to_vec()[0] as f32]]
    });
    assert!(
        ((got[0][0] as f64) - want).abs() <= 1e-6 * want,
        "{} vs {want}",
        got[0][0]
    );
    // Any block size, not only powers of two (the tree used to drop threads ≥ the largest
    // power of two below the block size): f64 sums within 1e-12.
    for threads in [32u32, 96, 1000, 1024] {
        let partial = DevBuf::<f64>::poisoned(7);
        let gd = DevBuf::from_slice(&grad2);
        let args = Args::new().buf(&gd).u64(grad2.len() as u64).buf(&partial);
        let launch = Launch {
            grid: (7, 1, 1),
            block: threads,
            shared_bytes: 0,
        };
        e.run("sum_squares", Some(launch), &args);
        let sum: f64 = partial.to_vec().iter().sum();
        let want: f64 = grad2.iter().map(|&x| x as f64 * x as f64).sum();
        assert!(
            (sum - want).abs() <= 1e-12 * want,
            "{threads} threads: {sum} vs {want}"
        );
    }
}

// ---------------------------------------------------------------- element-wise

#[test]
fn emulated_elementwise_kernels_are_exact() {
    let Some(e) = emu() else { return };
    let (rows, n) = (300, 70);
    let mut r = rng(7);
    let y0 = rand_vec(&mut r, rows * n, 1.0);
    let b = rand_vec(&mut r, n, 1.0);
    let mut x = rand_vec(&mut r, rows * n, 3.0);
    // Rounding cases: ties to even, NaN, ±inf, the largest finite value, subnormals.
    x[..8].copy_from_slice(&[
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::from_bits(1),
        -0.0,
    ]);
    let got = in_both_orders("elementwise", || {
        let (yd, bd, xd) = (
            DevBuf::from_slice(&y0),
            DevBuf::from_slice(&b),
            DevBuf::from_slice(&x),
        );
        let args = Args::new().buf(&yd).buf(&bd).u64(rows as u64).i32(n as i32);
        e.run("add_bias_f32", elementwise(rows * n), &args);
        let xb = DevBuf::<u16>::poisoned(rows * n);
        let args = Args::new().buf(&xd).buf(&xb).u64((rows * n) as u64);
        e.run("cast_f32_bf16", elementwise(rows * n), &args);
        let back = DevBuf::<f32>::poisoned(rows * n);
        let args = Args::new().buf(&xb).buf(&back).u64((rows * n) as u64);
        e.run("cast_bf16_f32", elementwise(rows * n), &args);
        let sum = DevBuf::from_slice(&y0);
        let args = Args::new().buf(&sum).buf(&yd).u64((rows * n) as u64);
        e.run("add_f32", elementwise(rows * n), &args);
        // The bias gradient's two passes, as ops::add_col_sums.
        let cols = DevBuf::from_slice(&b);
        let (parts, per, launches) = plan::col_sum_launch(rows, n).unwrap();
        let (first, second) = launches.unwrap();
        let partial = DevBuf::<f32>::poisoned(parts * n);
        let args = Args::new()
            .buf(&yd)
            .i32(rows as i32)
            .i32(n as i32)
            .i32(per as i32)
            .buf(&partial);
        e.run("col_sum_parts", Some(first), &args);
        let args = Args::new()
            .buf(&partial)
            .i32(parts as i32)
            .i32(n as i32)
            .buf(&cols);
        e.run("add_sum_parts", Some(second), &args);
        vec![
            yd.to_vec(),
            xb.to_vec().iter().map(|&h| h as f32).collect(),
            back.to_vec(),
            sum.to_vec(),
            cols.to_vec(),
        ]
    });
    let biased: Vec<f32> = (0..rows * n).map(|i| y0[i] + b[i % n]).collect();
    assert_eq!(got[0], biased, "add_bias");
    let bits: Vec<f32> = to_bf(&x).iter().map(|&h| h as f32).collect();
    let bits_eq = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
    };
    // NaN: a quiet NaN either way (the payload may differ from half's).
    for (i, (g, w)) in got[1].iter().zip(&bits).enumerate() {
        let (g, w) = (*g as u16, *w as u16);
        let nan = |h: u16| h & 0x7f80 == 0x7f80 && h & 0x7f != 0;
        assert!(
            g == w || (nan(g) && nan(w)),
            "cast_f32_bf16[{i}]: {g:#x} vs {w:#x}"
        );
    }
    assert!(bits_eq(&got[2], &from_bf(&to_bf(&x))), "cast_bf16_f32");
    let doubled: Vec<f32> = y0.iter().zip(&biased).map(|(a, b)| a + b).collect();
    assert_eq!(got[3], doubled, "add_f32");
    // Rows in order within each part, parts in order: the host's loops in that order.
    let (parts, per, _) = plan::col_sum_launch(rows, n).unwrap();
    let col_sums: Vec<f32> = (0..n)
        .map(|j| {
            let mut total = 0f32;
            for p in 0..parts {
                let mut acc = 0f32;
                for row in p * per..((p + 1) * per).min(rows) {
                    acc += biased[row * n + j];
                }
                total += acc;
            }
            b[j] + total
        })
        .collect();
    assert_eq!(
        got[4], col_sums,
        "col_sum_parts + add_sum_parts: a fixed order"
    );
}

// ---------------------------------------------------------------- sampling

#[test]
fn emulated_sampling_matches_the_cpu_sampler() {
    let Some(e) = emu() else { return };
    use crate::sampling::{SamplingParams, TokenSampler};
    let (rows, vocab) = (3, 3000);
    let mut r = rng(8);
    let logits = rand_vec(&mut r, rows * vocab, 6.0);
    let sample = |logits: &[f32], t: f32, k: usize, p: f32, u: &[f64]| -> Vec<Vec<f32>> {
        let z = DevBuf::from_slice(logits);
        let ud = DevBuf::from_slice(u);
        let (tok, lp, st) = (
            DevBuf::<u32>::poisoned(rows),
            DevBuf::<f32>::poisoned(rows),
            DevBuf::<u32>::poisoned(rows),
        );
        let args = Args::new()
            .buf(&z)
            .i32(vocab as i32)
            .f32(t)
            .i32(k as i32)
            .f32(p)
            .buf(&ud)
            .buf(&tok)
            .buf(&lp)
            .buf(&st);
        e.run("sample_rows", plan::sample_launch(rows).unwrap(), &args);
        vec![
            tok.to_vec().iter().map(|&x| x as f32).collect(),
            lp.to_vec(),
            st.to_vec().iter().map(|&x| x as f32).collect(),
        ]
    };
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
        let mut emu_s = cpu.clone();
        let want: Vec<(u32, f32)> = cpu
            .iter_mut()
            .zip(logits.chunks(vocab))
            .map(|(s, l)| s.sample(&mut l.to_vec()))
            .collect();
        let u: Vec<f64> = emu_s.iter_mut().map(|s| s.next_uniform(vocab)).collect();
        let got = in_both_orders("sample_rows", || {
            sample(&logits, temperature, top_k, top_p, &u)
        });
        for (row, (tok, lp)) in want.iter().enumerate() {
            assert_eq!(got[2][row], 0.0, "status");
            let picked = got[0][row] as usize;
            let l = &logits[row * vocab..(row + 1) * vocab];
            let tt = if temperature == 0.0 { 1.0 } else { temperature };
            let m = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b / tt));
            let lse = m + l
                .iter()
                .map(|&x| ((x / tt - m) as f64).exp())
                .sum::<f64>()
                .ln() as f32;
            assert!(
                (got[1][row] - (l[picked] / tt - lse)).abs() < 1e-4,
                "row {row}: log-prob of the drawn token"
            );
            if temperature == 0.0 || (top_k == 0 && top_p == 1.0) {
                assert_eq!(got[0][row] as u32, *tok, "row {row}: T {temperature}");
                assert!((got[1][row] - lp).abs() < 1e-4);
            } else if top_k > 0 {
                // The drawn token is among the k largest.
                let above = l.iter().filter(|&&x| x > l[picked]).count();
                assert!(above < top_k, "row {row}: token outside the top {top_k}");
            }
        }
    }
    let mut bad = logits.clone();
    bad[vocab + 5] = f32::NAN;
    let got = sample(&bad, 1.0, 0, 1.0, &[0.5; 3]);
    assert_eq!(
        got[2],
        vec![0.0, 1.0, 0.0],
        "non-finite logits flagged per row"
    );
}

// ---------------------------------------------------------------- the emulator's own checks

#[test]
fn the_emulator_reports_races_exits_deadlocks_and_overflows() {
    let Some(e) = emu() else { return };
    let threads = 64u32;
    let input: Vec<f32> = (0..2 * threads).map(|i| i as f32).collect();
    let mirror = |sync: i32| {
        in_both_orders_result(|| {
            let (i, o) = (
                DevBuf::from_slice(&input),
                DevBuf::<f32>::poisoned(2 * threads as usize),
            );
            let args = Args::new().buf(&i).i32(sync).buf(&o);
            let l = Launch {
                grid: (2, 1, 1),
                block: threads,
                shared_bytes: threads * 4,
            };
            e.run("emu_mirror", Some(l), &args);
            vec![o.to_vec()]
        })
    };
    assert!(mirror(1).is_ok(), "with the barrier");
    let err = mirror(0).unwrap_err();
    assert!(err.contains("race"), "{err}");

    let one_block = |kernel: &str, threads: u32, shared: u32| {
        let o = DevBuf::<f32>::poisoned(threads as usize);
        let l = Launch {
            grid: (1, 1, 1),
            block: threads,
            shared_bytes: shared,
        };
        e.launch(kernel, Some(l), &Args::new().buf(&o))
    };
    let err = one_block("emu_shuffle_after_exit", 32, 0).unwrap_err();
    assert!(err.contains("lane 0 has exited"), "{err}");
    let err = one_block("emu_divergent_barrier", 32, 0).unwrap_err();
    assert!(err.contains("deadlock"), "{err}");
    let err = one_block("emu_shared_writes", 64, 128).unwrap_err();
    assert!(err.contains("beyond the 128 bytes"), "{err}");
    assert!(one_block("emu_shared_writes", 64, 256).is_ok());
    let err = one_block("emu_shared_writes", 64, 64 * 1024).unwrap_err();
    assert!(err.contains("48 KiB"), "{err}");

    let o = DevBuf::<f32>::poisoned(100);
    let past = |extra: i32| {
        e.launch(
            "emu_write_past",
            elementwise(100 + extra as usize),
            &Args::new().buf(&o).i32(100).i32(extra),
        )
    };
    assert!(past(0).is_ok());
    let err = past(3).unwrap_err();
    assert!(err.contains("wrote outside buffer argument 0"), "{err}");
    // Argument count and sizes are the kernel's.
    let err = e
        .launch(
            "emu_write_past",
            elementwise(1),
            &Args::new().buf(&o).i32(1),
        )
        .unwrap_err();
    assert!(err.contains("takes 3 arguments, 2 given"), "{err}");
    let err = e
        .launch(
            "emu_write_past",
            elementwise(1),
            &Args::new().buf(&o).u64(1).i32(0),
        )
        .unwrap_err();
    assert!(err.contains("argument 1 is 8 bytes"), "{err}");
    // 1024 threads need __launch_bounds__ (sample_rows and sum_squares have it).
    let err = e
        .launch(
            "add_f32",
            Launch::elementwise_with(5000, 1024).unwrap(),
            &Args::new().buf(&o).buf(&o).u64(0),
        )
        .unwrap_err();
    assert!(err.contains("__launch_bounds__"), "{err}");
}

/// [`in_both_orders`] as a Result (the race message) for the emulator's own test.
fn in_both_orders_result(
    f: impl Fn() -> Vec<Vec<f32>> + std::panic::RefUnwindSafe,
) -> Result<(), String> {
    std::panic::catch_unwind(|| {
        in_both_orders("mirror", &f);
    })
    .map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}
