//! The built-in demo: recipes/demo.toml and its warm-start model (demo/model, 6.7 MB), compiled
//! in so that a binary or Python package installed outside the checkout still runs the demo.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The demo recipe.
pub const DEMO_RECIPE: &str = include_str!("../../../../recipes/demo.toml");

/// The demo's warm-start model files.
pub const DEMO_MODEL: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../../../../demo/model/config.json"),
    ),
    (
        "generation_config.json",
        include_bytes!("../../../../demo/model/generation_config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../../../demo/model/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../../../demo/model/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../../../demo/model/tokenizer_config.json"),
    ),
];

/// The repository root this crate was built from (where the demo's model and recipes live).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A relative path that does not exist from the working directory is looked up from the
/// repository root (so the demo runs from anywhere).
pub fn resolve(path: &Path) -> PathBuf {
    if path.is_relative() && !path.exists() {
        let candidate = repo_root().join(path);
        if candidate.exists() {
            return candidate;
        }
    }
    path.to_path_buf()
}

/// The demo model directory: `model` (demo/model) from the working directory or the checkout
/// this crate was built from, else the compiled-in copy written next to the run folder
/// (`<output_dir>/../demo-model`, written once, atomically).
pub fn demo_model(model: &Path, output_dir: &Path) -> Result<PathBuf> {
    let found = resolve(model);
    if found.join("model.safetensors").is_file() {
        return Ok(found);
    }
    let parent = output_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = parent.join("demo-model");
    if dir.join("model.safetensors").is_file() {
        return Ok(dir);
    }
    eprintln!(
        "{} not found (looked in {} and {}): writing the built-in demo model to {}",
        model.display(),
        std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        repo_root().display(),
        dir.display()
    );
    let tmp = parent.join("demo-model.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("{}: cannot remove", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    for (name, bytes) in DEMO_MODEL {
        std::fs::write(tmp.join(name), bytes)
            .with_context(|| format!("{}: cannot write {name}", tmp.display()))?;
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    Ok(dir)
}
