//! One training or evaluation prompt, with its gold answer and where it came from.
//!
//! The prompt itself ([`Prompt`], [`ChatMessage`]) is the tokenizer's input type and lives
//! there (tokenizer/prompt.rs); it is re-exported here.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::tokenizer::{ChatMessage, Prompt};

/// Where a record came from: a file and a 1-based line (JSONL) or row (Parquet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    pub file: String,
    /// `line` for JSONL, `row` for Parquet, `problem` for generated data.
    pub unit: String,
    /// 1-based.
    pub index: usize,
}

impl Location {
    pub fn new(file: impl Into<String>, unit: impl Into<String>, index: usize) -> Self {
        Self {
            file: file.into(),
            unit: unit.into(),
            index,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.file, self.unit, self.index)
    }
}

/// One prompt of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptRecord {
    /// The record's id field, or its 1-based line/row number when it has none.
    pub id: String,
    pub prompt: Prompt,
    /// The gold answer, when the dataset has one.
    pub answer: Option<String>,
    pub location: Location,
    /// The record's other fields, by name as in the dataset: every JSON key or Parquet column
    /// but the prompt's (the answer and id fields included, as read). In-process reward
    /// functions receive them as keyword lists, as TRL passes dataset columns. Empty for
    /// generated data (the synthetic task has only its prompt and answer).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub columns: Map<String, Value>,
}
