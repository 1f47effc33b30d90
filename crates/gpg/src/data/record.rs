//! One training or evaluation prompt, with its gold answer and where it came from.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One chat message, as in the Hugging Face chat format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// What the model is asked: raw text given to the model as is, or chat messages that the
/// tokenizer renders with the model's chat template (with the generation prompt appended).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prompt {
    /// Tokenized as is; no template.
    Text(String),
    /// Rendered by the chat template; never ends with an assistant message.
    Chat(Vec<ChatMessage>),
}

impl Prompt {
    /// The prompt's text without any template: the text itself, or the message contents
    /// joined by newlines. A lower bound of the rendered text, used where no renderer is
    /// available (e.g. a prompt-length estimate or a reward's `prompt` field).
    pub fn plain_text(&self) -> String {
        match self {
            Prompt::Text(text) => text.clone(),
            Prompt::Chat(messages) => messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

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
}
