//! Keeping the ranks' model replicas identical: rank 0's weights are broadcast to every rank
//! at start, and a digest of the weights is compared between ranks every few steps (the same
//! summed gradient and the same AdamW step keep them equal; a difference means a bug, a bad
//! reduction or a faulty machine, and stops the run with an error).

use anyhow::{ensure, Result};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::model::ops::tensor_io::{with_weight, WeightSlice};
use crate::model::ops::{update_in_place, WeightSliceMut};
use crate::model::Qwen2;

use super::collective::Collective;

/// The raw bytes of a parameter (native endianness, f32 or bf16 elements).
fn weight_bytes(name: &str, t: &candle_core::Tensor) -> Result<Vec<u8>> {
    with_weight("replica", name, t, |w| match w {
        WeightSlice::F32(v) => v.iter().flat_map(|x| x.to_ne_bytes()).collect(),
        WeightSlice::Bf16(v) => v.iter().flat_map(|x| x.to_bits().to_ne_bytes()).collect(),
    })
}

/// SHA-256 over every parameter's name and raw bytes, in the visitor's (HF name) order; the
/// leaves are hashed in parallel, then their digests in order.
pub fn weights_digest(model: &Qwen2) -> Result<[u8; 32]> {
    weights_digest_with(model, &[])
}

/// [`weights_digest`] with `extra` parameters (a vision tower's) hashed after the model's own.
pub fn weights_digest_with(
    model: &Qwen2,
    extra: &[(String, &candle_core::Tensor)],
) -> Result<[u8; 32]> {
    let mut leaves = model.weights.named();
    leaves.extend(extra.iter().map(|(n, t)| (n.clone(), *t)));
    let digests = leaves
        .par_iter()
        .map(|(name, t)| {
            let mut h = Sha256::new();
            h.update(name.as_bytes());
            with_weight("replica", name, t, |w| match w {
                WeightSlice::F32(v) => v.iter().for_each(|x| h.update(x.to_ne_bytes())),
                WeightSlice::Bf16(v) => v.iter().for_each(|x| h.update(x.to_bits().to_ne_bytes())),
            })?;
            Ok(h.finalize())
        })
        .collect::<Result<Vec<_>>>()?;
    let mut all = Sha256::new();
    for d in digests {
        all.update(d);
    }
    // A LoRA adapter's A and B are part of the replica too.
    if let Some(adapter) = model.adapter() {
        for (module, pair) in adapter.modules() {
            all.update(module.as_bytes());
            for t in [&pair.a, &pair.b] {
                for x in t.flatten_all()?.to_vec1::<f32>()? {
                    all.update(x.to_ne_bytes());
                }
            }
        }
    }
    Ok(all.finalize().into())
}

/// Replaces every rank's weights by rank 0's, parameter by parameter. A no-op at world 1.
pub fn broadcast_weights(model: &Qwen2, collective: &dyn Collective) -> Result<()> {
    broadcast_tensors(&model.weights.named(), collective)
}

/// [`broadcast_weights`] for any named parameters (a vision tower's).
pub fn broadcast_tensors(
    tensors: &[(String, &candle_core::Tensor)],
    collective: &dyn Collective,
) -> Result<()> {
    if collective.world() == 1 {
        return Ok(());
    }
    for (name, t) in tensors.iter().map(|(n, t)| (n.clone(), *t)) {
        let mut bytes = if collective.is_root() {
            weight_bytes(&name, t)?
        } else {
            Vec::new()
        };
        collective.broadcast_bytes(&mut bytes, 0)?;
        if collective.is_root() {
            continue;
        }
        update_in_place(t, |slot| {
            match slot {
                WeightSliceMut::F32(dst) => {
                    ensure!(
                        bytes.len() == dst.len() * 4,
                        "{name}: rank 0 sent {} bytes for {} f32 values (the ranks loaded different models)",
                        bytes.len(),
                        dst.len()
                    );
                    for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                        *d = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
                    }
                }
                WeightSliceMut::Bf16(dst) => {
                    ensure!(
                        bytes.len() == dst.len() * 2,
                        "{name}: rank 0 sent {} bytes for {} bf16 values (the ranks loaded different models or precisions)",
                        bytes.len(),
                        dst.len()
                    );
                    for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                        *d = half::bf16::from_bits(u16::from_ne_bytes([b[0], b[1]]));
                    }
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// ⊕ Copies rank 0's LoRA adapter (every A and B, f32) to every rank: the other ranks start
/// from a fresh adapter of the same configuration and receive rank 0's values, which may come
/// from a checkpoint only rank 0 can read. A no-op without an adapter or on one rank.
pub fn broadcast_adapter(model: &Qwen2, collective: &dyn Collective) -> Result<()> {
    let Some(adapter) = model.adapter() else {
        return Ok(());
    };
    if collective.world() == 1 {
        return Ok(());
    }
    for (module, pair) in adapter.modules() {
        for (part, t) in [("lora_A", &pair.a), ("lora_B", &pair.b)] {
            let values = t.flatten_all()?.to_vec1::<f32>()?;
            let mut bytes = if collective.is_root() {
                values.iter().flat_map(|x| x.to_ne_bytes()).collect()
            } else {
                Vec::new()
            };
            collective.broadcast_bytes(&mut bytes, 0)?;
            if collective.is_root() {
                continue;
            }
            ensure!(
                bytes.len() == values.len() * 4,
                "{module}.{part}: rank 0 sent {} bytes for {} f32 values (the ranks built different adapters)",
                bytes.len(),
                values.len()
            );
            let received: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            crate::model::lora::write_f32(t, &received)?;
        }
    }
    Ok(())
}
