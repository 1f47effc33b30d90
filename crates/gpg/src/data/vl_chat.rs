//! Chat messages with image parts, as Hugging Face writes them, and their encoding for a
//! Qwen2-VL-family model:
//!
//! ```json
//! {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "..."}]}
//! ```
//!
//! Image paths are relative to the directory of the file they come from. A message's content
//! is a string or a list of parts; each image part becomes `<|vision_start|><|image_pad|>
//! <|vision_end|>` in place and each text part its text, joined with nothing between them —
//! what Qwen2-VL's chat template renders for a list content — so the chat is rendered by the
//! tokenizer's template with string contents. The rendered prompt is tokenized (no special
//! tokens added) and the i-th pad expanded to one `<|image_pad|>` per merged patch of image i,
//! as the Qwen2-VL processor does.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::record::ChatMessage;
use crate::image::{load_rgb, ImageProcessor, ProcessedImage};
use crate::model::qwen2_vl::{expand_image_pads, Qwen2VLConfig, IMAGE_PLACEHOLDER};
use crate::tokenizer::Tokenizer;

/// A chat whose image parts are placeholders in the text, with the images in order.
#[derive(Debug, Clone, PartialEq)]
pub struct VlChat {
    pub messages: Vec<ChatMessage>,
    pub images: Vec<PathBuf>,
}

/// The image path of a content part, if it is an image part.
fn image_of(part: &serde_json::Map<String, Value>, what: &str) -> Result<Option<String>> {
    let ty = part.get("type").and_then(Value::as_str);
    let field = part.get("image").or_else(|| part.get("path"));
    match (ty, field) {
        (Some("image"), Some(Value::String(p))) | (None, Some(Value::String(p))) => {
            Ok(Some(p.clone()))
        }
        (Some("image"), _) => bail!("{what}: an image part needs `\"image\": \"PATH\"`"),
        (Some("video"), _) => bail!("{what}: video parts are not supported"),
        _ => Ok(None),
    }
}

/// Parses a `messages` value (a list of `{role, content}`); `base` is the directory relative
/// image paths start from; `what` names the place in errors (file:line).
pub fn parse_messages(v: &Value, base: &Path, what: &str) -> Result<VlChat> {
    let list = v
        .as_array()
        .with_context(|| format!("{what}: `messages` must be a list of {{role, content}}"))?;
    let mut messages = Vec::with_capacity(list.len());
    let mut images = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let here = format!("{what}: messages[{i}]");
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .with_context(|| format!("{here}: `role` must be a string"))?;
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    let here = format!("{here}.content[{j}]");
                    let obj = part
                        .as_object()
                        .with_context(|| format!("{here}: a content part must be an object"))?;
                    if let Some(path) = image_of(obj, &here)? {
                        text.push_str(IMAGE_PLACEHOLDER);
                        images.push(base.join(path));
                    } else if let Some(t) = obj.get("text") {
                        text.push_str(
                            t.as_str()
                                .with_context(|| format!("{here}: `text` must be a string"))?,
                        );
                    } else {
                        bail!("{here}: a part must be {{\"type\": \"image\", \"image\": PATH}} or {{\"type\": \"text\", \"text\": STR}}");
                    }
                }
                text
            }
            _ => bail!("{here}: `content` must be a string or a list of parts"),
        };
        messages.push(ChatMessage::new(role, content));
    }
    Ok(VlChat { messages, images })
}

/// Prompt token ids (pads expanded) and processed images of a chat for `config`'s model.
pub fn encode_chat(
    config: &Qwen2VLConfig,
    tokenizer: &Tokenizer,
    processor: &ImageProcessor,
    chat: &VlChat,
    add_generation_prompt: bool,
) -> Result<(Vec<u32>, Vec<ProcessedImage>)> {
    let text = tokenizer.apply_chat_template(&chat.messages, add_generation_prompt)?;
    let images: Vec<ProcessedImage> = chat
        .images
        .iter()
        .map(|p| {
            processor
                .process(&load_rgb(p)?)
                .with_context(|| p.display().to_string())
        })
        .collect::<Result<_>>()?;
    let counts: Vec<usize> = images
        .iter()
        .map(|im| config.image_tokens(im.grid_thw))
        .collect();
    let ids = tokenizer.encode(&text, false)?;
    let ids = expand_image_pads(&ids, config.image_token_id, &counts)?;
    Ok((ids, images))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_parts_become_placeholders_with_paths_relative_to_the_file() {
        let v: Value = serde_json::from_str(
            r#"[{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "image": "a.png"},
                                             {"type": "image", "image": "/abs/b.png"},
                                             {"type": "text", "text": "Which is red?"}]}]"#,
        )
        .unwrap();
        let chat = parse_messages(&v, Path::new("/data/set"), "f.jsonl:3").unwrap();
        assert_eq!(chat.messages[0].content, "Be brief.");
        assert_eq!(
            chat.messages[1].content,
            format!("{IMAGE_PLACEHOLDER}{IMAGE_PLACEHOLDER}Which is red?")
        );
        assert_eq!(
            chat.images,
            vec![
                PathBuf::from("/data/set/a.png"),
                PathBuf::from("/abs/b.png")
            ]
        );
    }

    #[test]
    fn bad_parts_are_errors_naming_the_place() {
        for (json, needle) in [
            (
                r#"[{"role": "user", "content": [{"type": "image"}]}]"#,
                "content[0]",
            ),
            (
                r#"[{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}]"#,
                "video",
            ),
            (r#"[{"role": "user", "content": 5}]"#, "messages[0]"),
            (r#"{"role": "user"}"#, "list"),
        ] {
            let v: Value = serde_json::from_str(json).unwrap();
            let err = parse_messages(&v, Path::new("."), "f.jsonl:7")
                .unwrap_err()
                .to_string();
            assert!(err.contains("f.jsonl:7") && err.contains(needle), "{err}");
        }
    }
}
