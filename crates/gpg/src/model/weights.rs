//! Reading and writing Hugging Face safetensors checkpoints (single file or sharded).
//!
//! Tensors are converted to f32 on load (bf16 and f16 are widened exactly); every problem
//! names the file and the tensor.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// All tensors of a checkpoint directory, by name, as f32 on `device`.
pub struct WeightMap {
    tensors: HashMap<String, Tensor>,
    /// Where each tensor came from, for error messages.
    source: HashMap<String, PathBuf>,
    dir: PathBuf,
}

impl WeightMap {
    /// Loads `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        let files = safetensors_files(dir)?;
        let mut tensors = HashMap::new();
        let mut source = HashMap::new();
        for file in files {
            let loaded =
                candle_core::safetensors::load(&file, &Device::Cpu).with_context(|| {
                    format!(
                        "{}: cannot read safetensors (the file is corrupt or truncated)",
                        file.display()
                    )
                })?;
            for (name, tensor) in loaded {
                let tensor = match tensor.dtype() {
                    DType::F32 => tensor,
                    DType::BF16 | DType::F16 | DType::F64 => tensor.to_dtype(DType::F32)?,
                    other => bail!(
                        "{}: tensor `{name}` has dtype {other:?}; expected f32, bf16 or f16",
                        file.display()
                    ),
                };
                let tensor = tensor.to_device(device)?;
                source.insert(name.clone(), file.clone());
                tensors.insert(name, tensor);
            }
        }
        Ok(Self {
            tensors,
            source,
            dir: dir.to_path_buf(),
        })
    }

    /// Removes and returns tensor `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = self.tensors.remove(name).with_context(|| {
            format!(
                "{}: tensor `{name}` is missing from the checkpoint",
                self.dir.display()
            )
        })?;
        if tensor.dims() != shape {
            let file = self
                .source
                .get(name)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            bail!(
                "{file}: tensor `{name}` has shape {:?}; the config requires {:?}",
                tensor.dims(),
                shape
            );
        }
        Ok(tensor)
    }

    /// Removes and returns tensor `name` if present.
    pub fn take_optional(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.tensors.contains_key(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Names not consumed by the model (reported so that a mismatched checkpoint is noticed).
    pub fn remaining(&self) -> BTreeSet<String> {
        self.tensors.keys().cloned().collect()
    }
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        bail!(
            "{}: no model.safetensors or model.safetensors.index.json (is this a Hugging Face model directory?)",
            dir.display()
        );
    }
    let text = std::fs::read_to_string(&index)
        .with_context(|| format!("{}: cannot read", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| {
            format!(
                "{}: field `weight_map` missing or not an object",
                index.display()
            )
        })?;
    let mut files = BTreeSet::new();
    for (name, file) in map {
        let file = file.as_str().with_context(|| {
            format!(
                "{}: field `weight_map.{name}` is not a string",
                index.display()
            )
        })?;
        files.insert(file.to_string());
    }
    let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
    for f in &files {
        if !f.is_file() {
            bail!(
                "{}: shard {} listed in the index is missing",
                index.display(),
                f.display()
            );
        }
    }
    Ok(files)
}

/// Writes tensors as one `model.safetensors` in `dtype`, atomically: the file is written
/// under a temporary name and renamed, so a crash never leaves a half-written checkpoint.
pub fn save_safetensors(tensors: &[(String, Tensor)], dtype: DType, path: &Path) -> Result<()> {
    let mut map = HashMap::new();
    for (name, t) in tensors {
        map.insert(name.clone(), t.to_dtype(dtype)?.to_device(&Device::Cpu)?);
    }
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&map, &tmp)
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Writes `contents` to `path` atomically (temporary file + rename).
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
