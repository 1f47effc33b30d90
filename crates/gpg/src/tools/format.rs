//! The tokens a tool's answer adds to a trajectory, in Qwen's format:
//!
//! ```text
//! …</tool_call><|im_end|>
//! <|im_start|>user
//! <tool_response>
//! 307
//! </tool_response><|im_end|>
//! <|im_start|>assistant
//! ```
//!
//! The model's turn stops at `</tool_call>`; what follows — the end of its turn, the tool
//! turn, the next assistant header — is rendered by the model's chat template where the
//! template renders tool calls and `tool` messages (Qwen2.5's does), so the tokens are those
//! transformers' `apply_chat_template` gives for the same conversation. The template is
//! rendered once, at start, around a marker: [`TurnFormat::of`] renders
//! `[user, assistant with a tool call]` and the same conversation plus a `tool` message with
//! the generation prompt, and keeps the difference, split at the marker. A template that does
//! not render tool calls (or a tokenizer without one) falls back to the built-in text above,
//! which is Qwen2.5's.

use anyhow::Result;
use serde_json::{json, Value};

use crate::tokenizer::Tokenizer;

use super::call::CALL_CLOSE;

/// Stands for the tool's answer while the template is rendered.
const MARKER: &str = "\u{1}GPG_RL_TOOL_RESPONSE\u{1}";

/// The built-in (Qwen2.5) text around a tool's answer.
const QWEN_BEFORE: &str = "<|im_end|>\n<|im_start|>user\n<tool_response>\n";
const QWEN_AFTER: &str = "\n</tool_response><|im_end|>\n<|im_start|>assistant\n";

/// Where the text of a tool turn comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FormatSource {
    /// The model's chat template.
    ChatTemplate,
    /// The built-in Qwen2.5 text (the template does not render tool calls, or there is none).
    BuiltIn,
}

/// The text around a tool's answer: `before + answer + after` follows `</tool_call>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnFormat {
    pub before: String,
    pub after: String,
    pub source: FormatSource,
}

impl TurnFormat {
    /// The built-in Qwen2.5 format.
    pub fn built_in() -> Self {
        Self {
            before: QWEN_BEFORE.into(),
            after: QWEN_AFTER.into(),
            source: FormatSource::BuiltIn,
        }
    }

    /// The format of `tokenizer`'s chat template, rendered with `tools`, or the built-in one
    /// when the template does not render a tool call and a tool message consistently.
    pub fn of(tokenizer: &Tokenizer, tools: &[Value]) -> Self {
        Self::from_template(tokenizer, tools).unwrap_or_else(|_| Self::built_in())
    }

    fn from_template(tokenizer: &Tokenizer, tools: &[Value]) -> Result<Self> {
        let name = tools
            .first()
            .and_then(|t| t["function"]["name"].as_str())
            .unwrap_or("tool");
        let user = json!({"role": "user", "content": "question"});
        let assistant = json!({
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {}}}],
        });
        let tool = json!({"role": "tool", "name": name, "content": MARKER});
        let tools = (!tools.is_empty()).then_some(tools);
        let a =
            tokenizer.apply_chat_template_json(&[user.clone(), assistant.clone()], tools, false)?;
        let b = tokenizer.apply_chat_template_json(&[user, assistant, tool], tools, true)?;
        let close = a
            .rfind(CALL_CLOSE)
            .ok_or_else(|| anyhow::anyhow!("the template does not render tool calls"))?;
        anyhow::ensure!(b.starts_with(&a), "the tool turn rewrites the conversation");
        let turn = format!("{}{}", &a[close + CALL_CLOSE.len()..], &b[a.len()..]);
        anyhow::ensure!(
            turn.matches(MARKER).count() == 1,
            "the template does not render the tool's answer once"
        );
        let (before, after) = turn
            .split_once(MARKER)
            .ok_or_else(|| anyhow::anyhow!("no marker"))?;
        Ok(Self {
            before: before.into(),
            after: after.into(),
            source: FormatSource::ChatTemplate,
        })
    }

    /// The text that follows the model's `</tool_call>`: the end of its turn, the tool turn
    /// with `response`, and the next assistant header.
    pub fn render(&self, response: &str) -> String {
        format!("{}{response}{}", self.before, self.after)
    }
}
