//! Image questions for a Qwen2-VL-family model, evaluated by [`super::evaluate_on`] with its
//! tower ([`super::Vision`]): the same pass@1 / pass@k, answers checked by the GPG
//! reference's visual accuracy.
//!
//! Items come from a JSONL file, one per line: either `{"messages": [...]}` (chat messages
//! with image parts, [`crate::data::vl_chat`]) or a question field (`problem`, `question` or
//! `prompt`) with `image` (a path) or `images` (a list of paths), the images put before the
//! question in one user message; the gold answer in `answer` or `solution`; an optional `id`.
//! Image paths are relative to the file.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::EvalItem;
use crate::data::vl_chat::{parse_messages, VlChat};
use crate::data::{ChatMessage, Prompt};
use crate::model::qwen2_vl::IMAGE_PLACEHOLDER;

fn string_field<'a>(obj: &'a serde_json::Map<String, Value>, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().find_map(|k| obj.get(*k))
}

/// Reads the items of a JSONL file (see the module doc); `system_prompt` is put first when a
/// line's chat has no system message.
pub fn load_vl_items(path: &Path, system_prompt: Option<&str>) -> Result<Vec<EvalItem>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let what = format!("{}:{}", path.display(), i + 1);
        let obj: serde_json::Map<String, Value> =
            serde_json::from_str(line).with_context(|| format!("{what}: not a JSON object"))?;
        let mut chat = if let Some(m) = obj.get("messages") {
            parse_messages(m, base, &what)?
        } else {
            let question = match string_field(&obj, &["problem", "question", "prompt"]) {
                Some(Value::String(s)) => s.clone(),
                Some(_) => bail!("{what}: the question field must be a string"),
                None => bail!("{what}: needs `messages`, or `problem`/`question`/`prompt` with `image`/`images`"),
            };
            let images: Vec<String> = match (obj.get("image"), obj.get("images")) {
                (Some(Value::String(p)), _) => vec![p.clone()],
                (_, Some(Value::Array(a))) => a
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .with_context(|| format!("{what}: `images` must be a list of paths"))?,
                (None, None) => Vec::new(),
                _ => bail!("{what}: `image` must be a path or `images` a list of paths"),
            };
            VlChat {
                messages: vec![ChatMessage::new(
                    "user",
                    IMAGE_PLACEHOLDER.repeat(images.len()) + &question,
                )],
                images: images.iter().map(|p| base.join(p)).collect(),
            }
        };
        if let Some(system) = system_prompt {
            if chat.messages.first().is_none_or(|m| m.role != "system") {
                chat.messages.insert(0, ChatMessage::new("system", system));
            }
        }
        let gold = match string_field(&obj, &["answer", "solution"]) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => bail!("{what}: the answer must be a string or a number"),
            None => bail!("{what}: no gold answer (`answer` or `solution`)"),
        };
        let id = match obj.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => (i + 1).to_string(),
        };
        items.push(EvalItem {
            id,
            prompt: Prompt::Chat(chat.messages),
            gold,
            images: chat.images,
        });
    }
    ensure!(!items.is_empty(), "{}: no items", path.display());
    Ok(items)
}
