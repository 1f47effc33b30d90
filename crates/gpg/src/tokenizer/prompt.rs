//! What a model is asked: raw text or chat messages ([`Prompt`]), the tokenizer's input
//! (`Tokenizer::encode_prompt`, chat templates). Datasets (data/) produce these.

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
