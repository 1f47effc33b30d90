//! Checkpoints: a Hugging Face model directory (loadable by transformers) plus the trainer's
//! state (optimiser moments, step, data position, metrics so far).
//!
//! A checkpoint is written into `<name>.tmp/` and renamed to `<name>/` only when complete, so a
//! crash (even SIGKILL) never leaves a half-written checkpoint behind: either the previous
//! checkpoint or the new one exists, whole.
//!
//! Integrity: the last file written into a checkpoint is [`MANIFEST`], the size and SHA-256 of
//! every other file. [`latest_verified`] (what `--resume` uses) takes the newest checkpoint
//! whose files all match their manifest and reports the newer ones it skipped (a disk that
//! filled up, a file truncated or corrupted after the rename, a copy cut short), so one bad
//! checkpoint costs the steps since the previous one instead of the run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::Qwen2;
use crate::tokenizer::Tokenizer;

/// File holding the trainer state (JSON) inside a checkpoint directory.
pub const TRAINER_STATE: &str = "trainer_state.json";
/// File holding named f32 buffers of the trainer (optimiser moments) inside a checkpoint.
pub const TRAINER_BUFFERS: &str = "trainer_buffers.safetensors";

/// File listing the size and SHA-256 of every other file of a checkpoint (written last).
pub const MANIFEST: &str = "checkpoint_manifest.json";

/// Named f32 buffers with their shapes.
pub type Buffers = Vec<(String, Vec<usize>, Vec<f32>)>;

/// A model that writes its trained weights into a checkpoint directory (Hugging Face format;
/// a LoRA run's adapter; a vision-language model in the layout it came in).
pub trait TrainedModel {
    fn save_trained(&self, dir: &Path) -> Result<()>;
}

impl TrainedModel for Qwen2 {
    fn save_trained(&self, dir: &Path) -> Result<()> {
        Qwen2::save_trained(self, dir)
    }
}

/// Writes a complete checkpoint to `dir` atomically.
pub fn save(
    dir: &Path,
    model: &dyn TrainedModel,
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
    write_manifest(&tmp)?;
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
    let (state, buffers) = read_state_files(dir)?;
    parse_state(dir, &state, &buffers)
}

/// The raw bytes of a checkpoint's trainer state and buffers files (what rank 0 broadcasts to
/// the other ranks, which may not see the run folder).
pub fn read_state_files(dir: &Path) -> Result<(Vec<u8>, Vec<u8>)> {
    let state_path = dir.join(TRAINER_STATE);
    let state = std::fs::read(&state_path).with_context(|| {
        format!(
            "{}: cannot read (is {} a gpg-rl checkpoint?)",
            state_path.display(),
            dir.display()
        )
    })?;
    let buf_path = dir.join(TRAINER_BUFFERS);
    let buffers =
        std::fs::read(&buf_path).with_context(|| format!("{}: cannot read", buf_path.display()))?;
    Ok((state, buffers))
}

/// Parses the bytes of [`read_state_files`]; `dir` names them in errors.
pub fn parse_state(
    dir: &Path,
    state: &[u8],
    buffers: &[u8],
) -> Result<(serde_json::Value, HashMap<String, Vec<f32>>)> {
    let state_path = dir.join(TRAINER_STATE);
    let state = serde_json::from_slice(state)
        .with_context(|| format!("{}: malformed JSON", state_path.display()))?;
    let buf_path = dir.join(TRAINER_BUFFERS);
    let tensors = candle_core::safetensors::load_buffer(buffers, &Device::Cpu)
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

/// One file of a checkpoint as its manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Path relative to the checkpoint directory, `/`-separated.
    pub path: String,
    pub bytes: u64,
    /// Lower-case hex SHA-256 of the file's contents.
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    files: Vec<ManifestEntry>,
}

/// Every regular file under `dir` (relative, `/`-separated, sorted), except the manifest.
fn list_files(dir: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, sub: &Path, out: &mut Vec<String>) -> Result<()> {
        let here = root.join(sub);
        for entry in
            std::fs::read_dir(&here).with_context(|| format!("{}: cannot list", here.display()))?
        {
            let entry = entry?;
            let rel = sub.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                walk(root, &rel, out)?;
            } else {
                let name = rel
                    .to_str()
                    .with_context(|| format!("{}: file name is not UTF-8", rel.display()))?
                    .replace(std::path::MAIN_SEPARATOR, "/");
                if name != MANIFEST {
                    out.push(name);
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, Path::new(""), &mut out)?;
    out.sort();
    Ok(out)
}

/// Size and SHA-256 of `path` (read in 8 MB blocks).
fn file_digest(path: &Path) -> Result<(u64, String)> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((bytes, hex))
}

/// Writes `dir`/[`MANIFEST`]: the size and SHA-256 of every other file under `dir` (hashed in
/// parallel, one file per thread).
pub fn write_manifest(dir: &Path) -> Result<()> {
    let names = list_files(dir)?;
    let files = names
        .par_iter()
        .map(|name| {
            let (bytes, sha256) = file_digest(&dir.join(name))?;
            Ok(ManifestEntry {
                path: name.clone(),
                bytes,
                sha256,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let path = dir.join(MANIFEST);
    std::fs::write(&path, serde_json::to_vec_pretty(&Manifest { files })?)
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// How a checkpoint directory checked out against its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Integrity {
    /// Every listed file has its recorded size and SHA-256.
    Verified,
    /// No manifest (a checkpoint from a gpg-rl before manifests): only the trainer state's
    /// presence could be checked.
    Unverified,
}

/// Checks every file listed in `dir`'s manifest: present, of the recorded size, with the
/// recorded SHA-256. The error names the first file that differs.
pub fn verify(dir: &Path) -> Result<Integrity> {
    let path = dir.join(MANIFEST);
    if !path.is_file() {
        ensure!(
            dir.join(TRAINER_STATE).is_file(),
            "{}: neither {MANIFEST} nor {TRAINER_STATE}",
            dir.display()
        );
        return Ok(Integrity::Unverified);
    }
    let text = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .with_context(|| format!("{}: malformed manifest", path.display()))?;
    ensure!(
        manifest.files.iter().any(|f| f.path == TRAINER_STATE),
        "{}: the manifest does not list {TRAINER_STATE}",
        path.display()
    );
    manifest.files.par_iter().try_for_each(|entry| {
        let file = dir.join(&entry.path);
        let len = std::fs::metadata(&file)
            .with_context(|| format!("{}: missing", file.display()))?
            .len();
        ensure!(
            len == entry.bytes,
            "{}: {len} bytes, the manifest records {}",
            file.display(),
            entry.bytes
        );
        let (_, sha) = file_digest(&file)?;
        ensure!(
            sha == entry.sha256,
            "{}: SHA-256 {sha} differs from the manifest's {} (the file is corrupt)",
            file.display(),
            entry.sha256
        );
        Ok(())
    })?;
    Ok(Integrity::Verified)
}

/// The checkpoints `checkpoint-<step>` of `run_dir`, newest first.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    if !run_dir.is_dir() {
        return Ok(found);
    }
    for entry in
        std::fs::read_dir(run_dir).with_context(|| format!("{}: cannot list", run_dir.display()))?
    {
        let entry = entry?;
        let Some(step) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().is_dir() {
            found.push((step, entry.path()));
        }
    }
    found.sort_by_key(|e| std::cmp::Reverse(e.0));
    Ok(found)
}

/// What [`latest_verified`] found.
#[derive(Debug, Clone)]
pub struct ResumePoint {
    pub step: u64,
    pub dir: PathBuf,
    pub integrity: Integrity,
    /// Newer checkpoints that failed verification, with the reason (newest first).
    pub skipped: Vec<(PathBuf, String)>,
}

/// The newest checkpoint of `run_dir` that passes [`verify`], with the newer ones it skipped;
/// `None` when no checkpoint verifies (the skipped ones are then in the error message).
pub fn latest_verified(run_dir: &Path) -> Result<Option<ResumePoint>> {
    let mut skipped = Vec::new();
    for (step, dir) in list(run_dir)? {
        match verify(&dir) {
            Ok(integrity) => {
                return Ok(Some(ResumePoint {
                    step,
                    dir,
                    integrity,
                    skipped,
                }))
            }
            Err(e) => skipped.push((dir, format!("{e:#}"))),
        }
    }
    if !skipped.is_empty() {
        let list: Vec<String> = skipped
            .iter()
            .map(|(d, why)| format!("{}: {why}", d.display()))
            .collect();
        bail!(
            "{}: no checkpoint verifies against its manifest:\n  {}",
            run_dir.display(),
            list.join("\n  ")
        );
    }
    Ok(None)
}

/// Removes all but the newest `keep` checkpoints `checkpoint-<step>` of `run_dir` (never the
/// newest one: `keep` is at least 1).
pub fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(run_dir)? {
        let entry = entry?;
        if let Some(step) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            steps.push((step, entry.path()));
        }
    }
    steps.sort();
    let keep = keep.max(1);
    if steps.len() > keep {
        for (_, path) in &steps[..steps.len() - keep] {
            std::fs::remove_dir_all(path)
                .with_context(|| format!("{}: cannot remove", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_checkpoint(run: &Path, step: u64) -> PathBuf {
        let dir = run.join(format!("checkpoint-{step}"));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join(TRAINER_STATE), format!("{{\"step\": {step}}}")).unwrap();
        std::fs::write(dir.join("model.safetensors"), vec![step as u8; 1000]).unwrap();
        std::fs::write(dir.join("sub/adapter.bin"), b"abc").unwrap();
        write_manifest(&dir).unwrap();
        dir
    }

    #[test]
    fn prune_keeps_the_newest_by_step_number() {
        let run = tempfile::tempdir().unwrap();
        for step in [2, 10, 9] {
            fake_checkpoint(run.path(), step);
        }
        std::fs::write(run.path().join("metrics.jsonl"), b"").unwrap();
        prune(run.path(), 2).unwrap();
        let left: Vec<u64> = list(run.path()).unwrap().iter().map(|e| e.0).collect();
        assert_eq!(left, [10, 9]);
        // At least the newest one is always kept.
        prune(run.path(), 0).unwrap();
        let left: Vec<u64> = list(run.path()).unwrap().iter().map(|e| e.0).collect();
        assert_eq!(left, [10]);
        assert!(run.path().join("metrics.jsonl").exists());
    }

    #[test]
    fn manifest_lists_every_file_with_size_and_sha256() {
        let run = tempfile::tempdir().unwrap();
        let dir = fake_checkpoint(run.path(), 3);
        let m: Manifest =
            serde_json::from_slice(&std::fs::read(dir.join(MANIFEST)).unwrap()).unwrap();
        let names: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            names,
            ["model.safetensors", "sub/adapter.bin", TRAINER_STATE]
        );
        let adapter = &m.files[1];
        assert_eq!(adapter.bytes, 3);
        // sha256("abc"), FIPS 180-2 test vector.
        assert_eq!(
            adapter.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(verify(&dir).unwrap(), Integrity::Verified);
    }

    #[test]
    fn truncated_or_corrupt_newest_checkpoint_is_skipped_with_the_reason() {
        let run = tempfile::tempdir().unwrap();
        fake_checkpoint(run.path(), 10);
        let c20 = fake_checkpoint(run.path(), 20);
        let c30 = fake_checkpoint(run.path(), 30);
        // Truncate checkpoint-30's weights, flip one byte of checkpoint-20's.
        std::fs::write(c30.join("model.safetensors"), vec![30u8; 10]).unwrap();
        let mut bytes = std::fs::read(c20.join("model.safetensors")).unwrap();
        bytes[500] ^= 1;
        std::fs::write(c20.join("model.safetensors"), bytes).unwrap();
        let found = latest_verified(run.path()).unwrap().unwrap();
        assert_eq!(found.step, 10);
        assert_eq!(found.integrity, Integrity::Verified);
        assert_eq!(found.skipped.len(), 2);
        assert!(found.skipped[0].0.ends_with("checkpoint-30"));
        assert!(
            found.skipped[0]
                .1
                .contains("10 bytes, the manifest records 1000"),
            "{}",
            found.skipped[0].1
        );
        assert!(found.skipped[1].0.ends_with("checkpoint-20"));
        assert!(
            found.skipped[1].1.contains("(the file is corrupt)"),
            "{}",
            found.skipped[1].1
        );
    }

    #[test]
    fn a_missing_file_or_a_run_with_no_good_checkpoint_is_an_error_naming_them() {
        let run = tempfile::tempdir().unwrap();
        let c5 = fake_checkpoint(run.path(), 5);
        std::fs::remove_file(c5.join("sub/adapter.bin")).unwrap();
        let e = format!("{:#}", latest_verified(run.path()).unwrap_err());
        assert!(e.contains("no checkpoint verifies"), "{e}");
        assert!(e.contains("adapter.bin: missing"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        assert!(latest_verified(empty.path()).unwrap().is_none());
    }

    #[test]
    fn a_checkpoint_without_manifest_is_accepted_as_unverified() {
        let run = tempfile::tempdir().unwrap();
        let dir = fake_checkpoint(run.path(), 7);
        std::fs::remove_file(dir.join(MANIFEST)).unwrap();
        let found = latest_verified(run.path()).unwrap().unwrap();
        assert_eq!((found.step, found.integrity), (7, Integrity::Unverified));
    }
}
