//! The decode seam: a batch of sequences decoded one token per step, on some device.
//!
//! Rollout (`crate::rollout`) sees only these two traits:
//!
//! * [`DecodeEngine`]: a model's weights laid out for decoding on one device (the CPU
//!   [`Qwen2`] itself, or `model::cuda::CudaDecoder` with the `cuda` feature); it makes empty
//!   batches.
//! * [`DecodeBatch`]: the per-row KV caches and activations of one batch. A row enters with its
//!   prompt's cache and next-token logits ([`DecodeBatch::push_row`]); each step samples one
//!   token per row from the last logits ([`DecodeBatch::sample`]), rows that finished leave
//!   ([`DecodeBatch::retain`]) and the rest feed their token ([`DecodeBatch::step`]).
//!
//! The CPU implementation wraps [`Decoder`] / [`DecodeState`] unchanged: sampling through the
//! seam draws exactly what it drew before the seam existed (same logits, same
//! [`TokenSampler`] calls in the same order).

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::decode::{DecodeState, Decoder};
use super::ops::VarLen;
use super::qwen2::Qwen2;
use crate::sampling::TokenSampler;

/// One batch being decoded. Rows are numbered 0..rows() in the order they were pushed, minus
/// the ones dropped by [`DecodeBatch::retain`] (the survivors keep their order).
pub trait DecodeBatch {
    /// Number of rows in the batch.
    fn rows(&self) -> usize;

    /// Adds a row whose cache starts with its prompt's keys and values (`kv[layer] = (k, v)`,
    /// each [len, kv_dim] f32 row-major), with room for `max_len` positions in all; `logits`
    /// [V] are the prompt's next-token logits (what the first [`DecodeBatch::sample`] draws from).
    fn push_row(&mut self, kv: &[(&[f32], &[f32])], max_len: usize, logits: &[f32]) -> Result<()>;

    /// Prefills `prompts` (packed, one pass) and adds `n` rows per prompt, prompt-major (rows
    /// of prompt 0 first), each with its own copy of the prompt's cache, room for
    /// `prompt.len() + max_new_tokens` positions and the prompt's next-token logits.
    fn push_prompts(&mut self, prompts: &[Vec<u32>], n: usize, max_new_tokens: usize)
        -> Result<()>;

    /// Keeps the rows whose flag is true, in order (`keep.len() == rows()`).
    fn retain(&mut self, keep: &[bool]) -> Result<()>;

    /// One step: row r feeds `tokens[r]` at `positions[r]`; its key and value join its cache and
    /// its next-token logits replace the last ones.
    fn step(&mut self, tokens: &[u32], positions: &[u32]) -> Result<()>;

    /// Draws one token per row from the last logits, row r with `samplers[r]`; returns
    /// (token, log π(token)) per row. `step` numbers the completion token (for error messages).
    /// Non-finite logits end in an error naming the row.
    fn sample(
        &mut self,
        samplers: &mut [&mut TokenSampler],
        step: usize,
    ) -> Result<Vec<(u32, f32)>>;

    /// The last logits, [rows, V] row-major, copied to the host (checks and tests; sampling
    /// does not need it). Valid after `push_row` / `step` until `sample` or `retain`, which
    /// use the logits as scratch or leave them in place.
    fn logits(&mut self) -> Result<Vec<f32>>;
}

/// A model laid out for decoding on one device.
pub trait DecodeEngine: Sync {
    /// The device's name, for messages (`cpu`, `cuda:0`).
    fn device_name(&self) -> String;

    /// An empty batch with room for `capacity` rows of at most `max_len` positions each.
    fn new_batch(&self, capacity: usize, max_len: usize) -> Result<Box<dyn DecodeBatch + '_>>;
}

impl DecodeEngine for Qwen2 {
    fn device_name(&self) -> String {
        "cpu".into()
    }

    fn new_batch(&self, capacity: usize, _max_len: usize) -> Result<Box<dyn DecodeBatch + '_>> {
        let decoder = Decoder::new(self)?;
        let state = decoder.state(capacity);
        Ok(Box::new(CpuDecodeBatch {
            model: self,
            decoder,
            state,
            vocab: self.config.vocab_size,
        }))
    }
}

/// The CPU batch: [`Decoder`] and its [`DecodeState`].
pub struct CpuDecodeBatch<'m> {
    model: &'m Qwen2,
    decoder: Decoder<'m>,
    state: DecodeState,
    vocab: usize,
}

impl DecodeBatch for CpuDecodeBatch<'_> {
    fn rows(&self) -> usize {
        self.state.rows()
    }

    fn push_row(&mut self, kv: &[(&[f32], &[f32])], max_len: usize, logits: &[f32]) -> Result<()> {
        ensure!(
            logits.len() == self.vocab,
            "decoder: prompt logits of {} values for a vocabulary of {}",
            logits.len(),
            self.vocab
        );
        self.decoder.push_row(&mut self.state, kv, max_len)?;
        let rows = self.state.rows();
        let all = self.state.logits_mut(rows, self.vocab);
        all[(rows - 1) * self.vocab..].copy_from_slice(logits);
        Ok(())
    }

    fn push_prompts(
        &mut self,
        prompts: &[Vec<u32>],
        n: usize,
        max_new_tokens: usize,
    ) -> Result<()> {
        let model = self.model;
        // Prefill every prompt once, packed.
        let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let seqs = VarLen::from_lens(&lens);
        let tokens: Vec<u32> = prompts.concat();
        let positions: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
        let (h_last, kv) = model.prefill(&tokens, &seqs, &positions)?;
        let prompt_logits = model.logits(&h_last)?.to_vec2::<f32>()?;
        push_prefilled(self, model, &kv, &seqs, &prompt_logits, n, max_new_tokens)
    }

    fn retain(&mut self, keep: &[bool]) -> Result<()> {
        ensure!(
            keep.len() == self.state.rows(),
            "decoder: {} keep flags for {} rows",
            keep.len(),
            self.state.rows()
        );
        self.state.retain(keep);
        Ok(())
    }

    fn step(&mut self, tokens: &[u32], positions: &[u32]) -> Result<()> {
        self.decoder.step(tokens, positions, &mut self.state)
    }

    fn sample(
        &mut self,
        samplers: &mut [&mut TokenSampler],
        step: usize,
    ) -> Result<Vec<(u32, f32)>> {
        let rows = self.state.rows();
        ensure!(
            samplers.len() == rows,
            "decoder: {} samplers for {rows} rows",
            samplers.len()
        );
        let logits = self.state.logits_mut(rows, self.vocab);
        check_logits(logits, self.vocab, step)?;
        Ok(samplers
            .par_iter_mut()
            .zip(logits.par_chunks_mut(self.vocab))
            .map(|(s, l)| s.sample(l))
            .collect())
    }

    fn logits(&mut self) -> Result<Vec<f32>> {
        let rows = self.state.rows();
        Ok(self.state.logits_mut(rows, self.vocab).to_vec())
    }
}

/// Adds `n` rows per prefilled prompt to `batch`, prompt-major, each with its own copy of the
/// prompt's cache (`kv[layer]` = packed keys and values [T, kv_dim] of all prompts, split by
/// `seqs`), room for its prompt length + `max_new_tokens` positions and the prompt's
/// next-token logits `prompt_logits[i]`.
pub fn push_prefilled(
    batch: &mut dyn DecodeBatch,
    model: &Qwen2,
    kv: &[(candle_core::Tensor, candle_core::Tensor)],
    seqs: &VarLen,
    prompt_logits: &[Vec<f32>],
    n: usize,
    max_new_tokens: usize,
) -> Result<()> {
    let kv: Vec<(Vec<f32>, Vec<f32>)> = kv
        .iter()
        .map(|(k, v)| {
            Ok((
                k.flatten_all()?.to_vec1::<f32>()?,
                v.flatten_all()?.to_vec1::<f32>()?,
            ))
        })
        .collect::<Result<_>>()?;
    let kv_dim = model.config.kv_dim();
    for (pi, logits) in prompt_logits.iter().enumerate() {
        let span = seqs.offsets[pi] * kv_dim..seqs.offsets[pi + 1] * kv_dim;
        let len = seqs.offsets[pi + 1] - seqs.offsets[pi];
        let prompt_kv: Vec<(&[f32], &[f32])> = kv
            .iter()
            .map(|(k, v)| (&k[span.clone()], &v[span.clone()]))
            .collect();
        for _ in 0..n {
            batch.push_row(&prompt_kv, len + max_new_tokens, logits)?;
        }
    }
    Ok(())
}

/// Ends sampling with an error when a row's logits hold NaN or ±inf (broken weights or an
/// overflow): sampling from them would give garbage completions, silently.
pub fn check_logits(logits: &[f32], vocab: usize, step: usize) -> Result<()> {
    let bad = logits
        .par_chunks(vocab)
        .position_first(|row| row.iter().any(|v| !v.is_finite()));
    if let Some(row) = bad {
        non_finite_logits(step, row)?;
    }
    Ok(())
}

/// The error of a row whose logits are not finite.
pub fn non_finite_logits(step: usize, row: usize) -> Result<()> {
    anyhow::bail!(
        "sampling step {step} (completion token {step}): the model produced non-finite logits \
         (NaN or ±inf) for batch row {row}; the weights or activations have overflowed or are \
         corrupt, so sampling stops here instead of returning garbage completions"
    )
}

impl<T: DecodeEngine + ?Sized> DecodeEngine for &T {
    fn device_name(&self) -> String {
        (**self).device_name()
    }

    fn new_batch(&self, capacity: usize, max_len: usize) -> Result<Box<dyn DecodeBatch + '_>> {
        (**self).new_batch(capacity, max_len)
    }
}

/// The decode engine of `model` on `device`: the CPU model itself, or (feature `cuda`) its
/// weights uploaded to the GPU. Without the feature a CUDA device is refused with the rebuild
/// instruction; without a driver, with the libraries looked for.
pub fn engine_for<'m>(
    model: &'m Qwen2,
    device: &super::DeviceName,
) -> Result<Box<dyn DecodeEngine + 'm>> {
    if device.is_cpu() {
        return Ok(Box::new(model));
    }
    #[cfg(feature = "cuda")]
    {
        ensure!(
            model.adapter().is_none(),
            "--adapter with --device {device}: the CUDA decoder does not run LoRA adapters yet; \
             sample on the CPU, or merge the adapter first (gpg-rl merge)"
        );
        let gpu = device.open_gpu()?;
        Ok(Box::new(super::cuda_decode::CudaDecoder::new(gpu, model)?))
    }
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("{}", device.no_cuda_build())
}

/// Checks, before a model is loaded, that sampling can run on `device` in this build.
pub fn check_sampling_device(device: &super::DeviceName) -> Result<()> {
    if device.is_cpu() || cfg!(feature = "cuda") {
        return Ok(());
    }
    anyhow::bail!("{}", device.no_cuda_build())
}
