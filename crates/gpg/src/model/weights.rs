//! Reading and writing Hugging Face safetensors checkpoints (single file or sharded).
//!
//! Files are memory-mapped and each tensor is read when the model asks for it, straight into
//! the dtype the model keeps it in (a bf16 checkpoint loads into a bf16 model without widening;
//! f32/f16/bf16 files widen or round as needed), so loading never holds a second copy of the
//! model. Every tensor is checked for NaN and ±inf as it is read. Every problem names the file
//! and the tensor.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

/// The tensors of a checkpoint directory, by name, read on demand.
pub struct WeightMap {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// Which file holds each tensor not yet taken.
    index: HashMap<String, usize>,
    dir: PathBuf,
    device: Device,
}

impl WeightMap {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        let paths = safetensors_files(dir)?;
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            // SAFETY: the file is mapped read-only; safetensors checks the header against the
            // file's length, so a truncated file is an error here, not a fault later. The
            // checkpoint must not be rewritten while it loads (gpg-rl writes checkpoints under
            // a temporary name and renames them, never in place).
            let st = unsafe { MmapedSafetensors::new(&path) }.with_context(|| {
                format!(
                    "{}: cannot read safetensors (the file is corrupt or truncated)",
                    path.display()
                )
            })?;
            for (name, _) in st.tensors() {
                index.insert(name, files.len());
            }
            files.push((path, st));
        }
        Ok(Self {
            files,
            index,
            dir: dir.to_path_buf(),
            device: device.clone(),
        })
    }

    fn file_of(&self, name: &str) -> String {
        self.index
            .get(name)
            .map(|&i| self.files[i].0.display().to_string())
            .unwrap_or_else(|| self.dir.display().to_string())
    }

    /// Removes and returns tensor `name` as `dtype`, checking its shape and that every element
    /// is finite.
    pub fn take(&mut self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let file = self.file_of(name);
        let i = self.index.remove(name).with_context(|| {
            format!(
                "{}: tensor `{name}` is missing from the checkpoint",
                self.dir.display()
            )
        })?;
        let tensor = self.files[i]
            .1
            .load(name, &Device::Cpu)
            .with_context(|| format!("{file}: cannot read tensor `{name}`"))?;
        if tensor.dims() != shape {
            bail!(
                "{file}: tensor `{name}` has shape {:?}; the config requires {:?}",
                tensor.dims(),
                shape
            );
        }
        if !matches!(
            tensor.dtype(),
            DType::F32 | DType::BF16 | DType::F16 | DType::F64
        ) {
            bail!(
                "{file}: tensor `{name}` has dtype {:?}; expected f32, bf16 or f16",
                tensor.dtype()
            );
        }
        check_finite(&tensor).map_err(|e| {
            anyhow::anyhow!(
                "{file}: tensor `{name}` {e}; the checkpoint is corrupt (re-export or restore it)"
            )
        })?;
        let tensor = if tensor.dtype() == dtype {
            tensor
        } else {
            tensor.to_dtype(dtype)?
        };
        Ok(tensor.to_device(&self.device)?)
    }

    /// Removes and returns tensor `name` if present.
    pub fn take_optional(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Option<Tensor>> {
        if self.index.contains_key(name) {
            self.take(name, shape, dtype).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Names not consumed by the model (reported so that a mismatched checkpoint is noticed).
    pub fn remaining(&self) -> BTreeSet<String> {
        self.index.keys().cloned().collect()
    }
}

/// Ok when every element of `t` is finite; otherwise says how many are not and where the
/// first one is. Scans in parallel, in the tensor's own dtype.
pub fn check_finite(t: &Tensor) -> std::result::Result<(), String> {
    use rayon::prelude::*;
    fn scan<T: Copy + Send + Sync>(
        v: &[T],
        finite: impl Fn(T) -> bool + Sync,
    ) -> Option<(usize, usize)> {
        const CHUNK: usize = 1 << 16;
        let bad: Vec<(usize, usize)> = v
            .par_chunks(CHUNK)
            .enumerate()
            .filter_map(|(c, chunk)| {
                let n = chunk.iter().filter(|&&x| !finite(x)).count();
                (n > 0).then(|| {
                    let first = chunk.iter().position(|&x| !finite(x)).unwrap_or(0);
                    (c * CHUNK + first, n)
                })
            })
            .collect();
        bad.first()
            .map(|&(first, _)| (first, bad.iter().map(|b| b.1).sum()))
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err("is not on the CPU".into());
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err("is not contiguous".into());
    };
    use candle_core::CpuStorage as S;
    let found = match cpu {
        S::F32(v) => scan(&v[start..end], f32::is_finite),
        S::BF16(v) => scan(&v[start..end], |x: half::bf16| x.is_finite()),
        S::F16(v) => scan(&v[start..end], |x: half::f16| x.is_finite()),
        S::F64(v) => scan(&v[start..end], f64::is_finite),
        _ => None,
    };
    match found {
        None => Ok(()),
        Some((first, n)) => Err(format!(
            "holds {n} non-finite value(s) (NaN or ±inf), the first at flat index {first}"
        )),
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
