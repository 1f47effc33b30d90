//! Checkpoints: a Hugging Face model directory (loadable by transformers) plus the trainer's
//! state (optimiser moments, step, data position, metrics so far).
//!
//! A checkpoint is written into `<name>.tmp/` and renamed to `<name>/` only when complete, so a
//! crash (even SIGKILL) never leaves a half-written checkpoint behind: either the previous
//! checkpoint or the new one exists, whole.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::model::Qwen2;
use crate::tokenizer::Tokenizer;

/// File holding the trainer state (JSON) inside a checkpoint directory.
pub const TRAINER_STATE: &str = "trainer_state.json";
/// File holding named f32 buffers of the trainer (optimiser moments) inside a checkpoint.
pub const TRAINER_BUFFERS: &str = "trainer_buffers.safetensors";

/// Named f32 buffers with their shapes.
pub type Buffers = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Writes a complete checkpoint to `dir` atomically.
pub fn save(
    dir: &Path,
    model: &Qwen2,
    tokenizer: &Tokenizer,
    extra_files: &[(&str, Vec<u8>)],
    state: &serde_json::Value,
    buffers: &Buffers,
) -> Result<()> {
    let tmp = tmp_dir(dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("{}: cannot remove", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    model.save_trained(&tmp)?; // the adapter only, in PEFT format, for a LoRA run
    tokenizer.save_pretrained(&tmp)?;
    for (name, bytes) in extra_files {
        std::fs::write(tmp.join(name), bytes)
            .with_context(|| format!("{}: cannot write {name}", tmp.display()))?;
    }
    std::fs::write(tmp.join(TRAINER_STATE), serde_json::to_vec_pretty(state)?)
        .with_context(|| format!("{}: cannot write {TRAINER_STATE}", tmp.display()))?;
    let mut map = HashMap::new();
    for (name, shape, data) in buffers {
        map.insert(
            name.clone(),
            Tensor::from_slice(data, shape.as_slice(), &Device::Cpu)?,
        );
    }
    candle_core::safetensors::save(&map, tmp.join(TRAINER_BUFFERS))
        .with_context(|| format!("{}: cannot write {TRAINER_BUFFERS}", tmp.display()))?;
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("{}: cannot replace", dir.display()))?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    Ok(())
}

fn tmp_dir(dir: &Path) -> PathBuf {
    let mut name = dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    dir.with_file_name(name)
}

/// Reads the trainer state and buffers of checkpoint `dir`.
pub fn load_state(dir: &Path) -> Result<(serde_json::Value, HashMap<String, Vec<f32>>)> {
    let state_path = dir.join(TRAINER_STATE);
    let text = std::fs::read_to_string(&state_path).with_context(|| {
        format!(
            "{}: cannot read (is {} a gpg-rl checkpoint?)",
            state_path.display(),
            dir.display()
        )
    })?;
    let state = serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed JSON", state_path.display()))?;
    let buf_path = dir.join(TRAINER_BUFFERS);
    let tensors = candle_core::safetensors::load(&buf_path, &Device::Cpu)
        .with_context(|| format!("{}: cannot read", buf_path.display()))?;
    let mut buffers = HashMap::new();
    for (name, t) in tensors {
        if t.dtype() != DType::F32 {
            bail!(
                "{}: buffer `{name}` is {:?}, expected f32",
                buf_path.display(),
                t.dtype()
            );
        }
        buffers.insert(name, t.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok((state, buffers))
}

/// The checkpoint with the highest step in `run_dir` (directories named `checkpoint-<step>`).
pub fn latest(run_dir: &Path) -> Result<Option<(u64, PathBuf)>> {
    if !run_dir.is_dir() {
        return Ok(None);
    }
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in
        std::fs::read_dir(run_dir).with_context(|| format!("{}: cannot list", run_dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(TRAINER_STATE).is_file()
            && best.as_ref().is_none_or(|(b, _)| step > *b)
        {
            best = Some((step, entry.path()));
        }
    }
    Ok(best)
}
