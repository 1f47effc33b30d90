//! A prompt dataset loaded from a JSONL or Parquet file, and the prompt-length limit.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::fields::{record_from_fields, type_name, PromptDatasetConfig};
use super::parquet_rows::read_parquet;
use super::record::{Location, Prompt, PromptRecord};

/// The prompts of one dataset file, in file order. Never empty.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptDataset {
    /// The file the records came from (for messages).
    pub source: String,
    pub records: Vec<PromptRecord>,
}

/// What to do with a prompt longer than the maximum prompt length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LongPromptPolicy {
    /// Remove it from the dataset (the count is returned).
    #[default]
    Drop,
    /// Fail, naming its file and line.
    Error,
}

impl PromptDataset {
    /// Loads `path` by its extension: `.jsonl` / `.json` (one JSON object per line) or
    /// `.parquet`.
    pub fn load(path: impl AsRef<Path>, config: &PromptDatasetConfig) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("jsonl") | Some("json") | Some("ndjson") => Self::load_jsonl(path, config),
            Some("parquet") => Self::load_parquet(path, config),
            _ => anyhow::bail!(
                "{}: unknown dataset format (expected a .jsonl or .parquet file)",
                path.display()
            ),
        }
    }

    /// Loads a JSON-lines file: one object per line; blank lines are skipped.
    pub fn load_jsonl(
        path: impl AsRef<Path>,
        config: &PromptDatasetConfig,
    ) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let file = File::open(path).with_context(|| format!("cannot open {name}"))?;
        Self::from_jsonl_reader(BufReader::new(file), &name, config)
    }

    /// Reads JSON lines from `reader`; `source` names it in messages.
    pub fn from_jsonl_reader(
        reader: impl BufRead,
        source: &str,
        config: &PromptDatasetConfig,
    ) -> anyhow::Result<Self> {
        let mut records = Vec::new();
        for (i, line) in reader.lines().enumerate() {
            let location = Location::new(source, "line", i + 1);
            let line = line.with_context(|| format!("{location}: cannot read the line"))?;
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(&line)
                .map_err(|e| anyhow::anyhow!("{location}: malformed JSON: {e}"))?;
            let Value::Object(fields) = value else {
                anyhow::bail!(
                    "{location}: expected a JSON object, got a {}",
                    type_name(&value)
                );
            };
            records.push(record_from_fields(&fields, location, config)?);
        }
        Self::new(source, records)
    }

    /// Loads a Parquet file (string, number and list-of-struct columns; snappy, gzip and
    /// zstd compression).
    pub fn load_parquet(
        path: impl AsRef<Path>,
        config: &PromptDatasetConfig,
    ) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let records = read_parquet(path, config)?;
        Self::new(path.display().to_string(), records)
    }

    /// A dataset of `records`; errors if there are none.
    pub fn new(source: impl Into<String>, records: Vec<PromptRecord>) -> anyhow::Result<Self> {
        let source = source.into();
        anyhow::ensure!(!records.is_empty(), "{source}: the dataset has no records");
        Ok(Self { source, records })
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The records at `indices` (e.g. a sampler's batch), in that order.
    pub fn batch(&self, indices: &[usize]) -> anyhow::Result<Vec<&PromptRecord>> {
        indices
            .iter()
            .map(|&i| {
                self.records.get(i).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: index {i} out of range ({} records)",
                        self.source,
                        self.len()
                    )
                })
            })
            .collect()
    }

    /// Applies a maximum prompt length measured by `measure` (e.g. render with the chat
    /// template and count tokens). Returns how many prompts were dropped (always 0 with
    /// [`LongPromptPolicy::Error`], which instead fails naming the first long prompt's
    /// file and line). Fails if every prompt would be dropped or `measure` fails.
    pub fn limit_prompt_length_with(
        &mut self,
        max_tokens: usize,
        policy: LongPromptPolicy,
        measure: &dyn Fn(&Prompt) -> anyhow::Result<usize>,
    ) -> anyhow::Result<usize> {
        let mut keep = Vec::with_capacity(self.records.len());
        for record in &self.records {
            let tokens = measure(&record.prompt)
                .with_context(|| format!("{}: measuring the prompt", record.location))?;
            if tokens > max_tokens && policy == LongPromptPolicy::Error {
                anyhow::bail!(
                    "{}: prompt has {tokens} tokens, more than the maximum prompt length {max_tokens}",
                    record.location
                );
            }
            keep.push(tokens <= max_tokens);
        }
        let before = self.records.len();
        let kept = keep.iter().filter(|&&k| k).count();
        anyhow::ensure!(
            kept > 0,
            "{}: all {before} prompts are longer than the maximum prompt length {max_tokens} tokens",
            self.source
        );
        let mut keep = keep.into_iter();
        self.records.retain(|_| keep.next().unwrap_or(false));
        Ok(before - kept)
    }

    /// [`Self::limit_prompt_length_with`] with a token counter over text: each prompt is
    /// measured as its [`Prompt::plain_text`] (for chat prompts this leaves out the
    /// template's own tokens; use `limit_prompt_length_with` and the rendered text to
    /// count them too).
    pub fn limit_prompt_length(
        &mut self,
        max_tokens: usize,
        policy: LongPromptPolicy,
        count_tokens: &dyn Fn(&str) -> anyhow::Result<usize>,
    ) -> anyhow::Result<usize> {
        self.limit_prompt_length_with(max_tokens, policy, &|p: &Prompt| {
            count_tokens(&p.plain_text())
        })
    }
}
