//! tokenizer_config.json: the fields this crate reads and writes, in the Hugging Face schema.
//!
//! Read: `chat_template` (a string, or a list of `{"name", "template"}` of which the one
//! named "default" is used), `bos_token` / `eos_token` / `pad_token` (a string, an AddedToken
//! object `{"content": ...}`, or null) and `added_tokens_decoder` (`{"<id>": {"content",
//! "special", "lstrip", "rstrip", "normalized", "single_word"}}`). Every other field is kept
//! verbatim so that saving a loaded tokenizer writes it back unchanged.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

/// One entry of `added_tokens_decoder`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AddedTokenEntry {
    pub id: u32,
    pub content: String,
    pub special: bool,
    pub lstrip: bool,
    pub rstrip: bool,
    pub normalized: bool,
    pub single_word: bool,
}

impl AddedTokenEntry {
    /// The entry as transformers writes it.
    pub(crate) fn to_json(&self) -> Value {
        serde_json::json!({
            "content": self.content,
            "lstrip": self.lstrip,
            "normalized": self.normalized,
            "rstrip": self.rstrip,
            "single_word": self.single_word,
            "special": self.special,
        })
    }
}

/// The parsed tokenizer_config.json.
#[derive(Debug, Clone, Default)]
pub(crate) struct TokenizerConfig {
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// Sorted by id.
    pub added_tokens: Vec<AddedTokenEntry>,
    /// The whole file as read (including the fields above).
    pub raw: Map<String, Value>,
}

impl TokenizerConfig {
    /// Parses the text of `path` (named in every error).
    pub(crate) fn parse(text: &str, path: &Path) -> Result<TokenizerConfig> {
        let file = path.display();
        let value: Value =
            serde_json::from_str(text).with_context(|| format!("{file}: malformed JSON"))?;
        let Value::Object(raw) = value else {
            bail!("{file}: expected a JSON object at the top level");
        };
        let chat_template = match raw.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                parse_chat_template(v).with_context(|| format!("{file}: field `chat_template`"))?,
            ),
        };
        let token = |field: &str| -> Result<Option<String>> {
            match raw.get(field) {
                None => Ok(None),
                Some(v) => token_content(v).with_context(|| format!("{file}: field `{field}`")),
            }
        };
        let bos_token = token("bos_token")?;
        let eos_token = token("eos_token")?;
        let pad_token = token("pad_token")?;
        let added_tokens = match raw.get("added_tokens_decoder") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => parse_added_tokens(v)
                .with_context(|| format!("{file}: field `added_tokens_decoder`"))?,
        };
        Ok(TokenizerConfig {
            chat_template,
            bos_token,
            eos_token,
            pad_token,
            added_tokens,
            raw,
        })
    }

    /// The JSON object to write: the fields read (`raw`) with this crate's fields replaced,
    /// keys sorted as transformers writes them.
    pub(crate) fn to_json_object(&self) -> BTreeMap<String, Value> {
        let mut out: BTreeMap<String, Value> = self.raw.clone().into_iter().collect();
        let opt = |s: &Option<String>| s.clone().map_or(Value::Null, Value::String);
        out.insert("bos_token".into(), opt(&self.bos_token));
        out.insert("eos_token".into(), opt(&self.eos_token));
        out.insert("pad_token".into(), opt(&self.pad_token));
        match &self.chat_template {
            Some(t) => out.insert("chat_template".into(), Value::String(t.clone())),
            None => out.remove("chat_template"),
        };
        let decoder: Map<String, Value> = self
            .added_tokens
            .iter()
            .map(|t| (t.id.to_string(), t.to_json()))
            .collect();
        out.insert("added_tokens_decoder".into(), Value::Object(decoder));
        out
    }
}

/// `"..."` or `[{"name": "default", "template": "..."}, ...]`.
fn parse_chat_template(v: &Value) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(items) => {
            let mut names = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let name = item
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| anyhow!("entry {i}: expected a string field `name`"))?;
                let template = item
                    .get("template")
                    .and_then(Value::as_str)
                    .ok_or_else(|| anyhow!("entry {i}: expected a string field `template`"))?;
                if name == "default" {
                    return Ok(template.to_string());
                }
                names.push(name.to_string());
            }
            bail!("no template named \"default\" among {names:?}")
        }
        other => bail!(
            "expected a string or a list of {{\"name\", \"template\"}} objects, got {}",
            kind(other)
        ),
    }
}

/// A special token field: `"<s>"`, `{"content": "<s>", ...}` or null.
fn token_content(v: &Value) -> Result<Option<String>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Object(map) => match map.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => bail!("an AddedToken object needs a string field `content`"),
        },
        other => bail!(
            "expected a string, an AddedToken object {{\"content\": ...}} or null, got {}",
            kind(other)
        ),
    }
}

fn parse_added_tokens(v: &Value) -> Result<Vec<AddedTokenEntry>> {
    let Value::Object(map) = v else {
        bail!(
            "expected an object mapping token ids to AddedToken objects, got {}",
            kind(v)
        );
    };
    let mut out = Vec::with_capacity(map.len());
    for (key, entry) in map {
        let id: u32 = key
            .parse()
            .map_err(|_| anyhow!("key {key:?} is not a token id (a non-negative integer)"))?;
        let Value::Object(fields) = entry else {
            bail!(
                "entry {key:?}: expected an AddedToken object, got {}",
                kind(entry)
            );
        };
        let content = match fields.get("content") {
            Some(Value::String(s)) => s.clone(),
            _ => bail!("entry {key:?}: expected a string field `content`"),
        };
        let flag = |name: &str, default: bool| -> Result<bool> {
            match fields.get(name) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => bail!(
                    "entry {key:?}: field `{name}` must be a boolean, got {}",
                    kind(other)
                ),
            }
        };
        let special = flag("special", false)?;
        out.push(AddedTokenEntry {
            id,
            special,
            lstrip: flag("lstrip", false)?,
            rstrip: flag("rstrip", false)?,
            // transformers' AddedToken default: normalized = not special.
            normalized: flag("normalized", !special)?,
            single_word: flag("single_word", false)?,
            content,
        });
    }
    out.sort_by_key(|t| t.id);
    Ok(out)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TokenizerConfig> {
        TokenizerConfig::parse(text, Path::new("/m/tokenizer_config.json"))
    }

    #[test]
    fn token_fields_accept_strings_objects_and_null() {
        let c = parse(
            r#"{"bos_token": null, "eos_token": {"content": "<|im_end|>", "special": true},
                "pad_token": "<|endoftext|>", "model_max_length": 131072}"#,
        )
        .unwrap();
        assert_eq!(c.bos_token, None);
        assert_eq!(c.eos_token.as_deref(), Some("<|im_end|>"));
        assert_eq!(c.pad_token.as_deref(), Some("<|endoftext|>"));
        assert_eq!(c.raw["model_max_length"], 131072);
    }

    #[test]
    fn chat_template_list_uses_default() {
        let c = parse(
            r#"{"chat_template": [{"name": "tool_use", "template": "T"},
                                  {"name": "default", "template": "D"}]}"#,
        )
        .unwrap();
        assert_eq!(c.chat_template.as_deref(), Some("D"));
        let err = parse(r#"{"chat_template": [{"name": "rag", "template": "R"}]}"#).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("tokenizer_config.json: field `chat_template`"),
            "{msg}"
        );
        assert!(msg.contains("default"), "{msg}");
    }

    #[test]
    fn errors_name_file_and_field() {
        let msg = format!("{:#}", parse(r#"{"eos_token": 7}"#).unwrap_err());
        assert!(
            msg.contains("/m/tokenizer_config.json: field `eos_token`"),
            "{msg}"
        );
        assert!(msg.contains("got a number"), "{msg}");

        let msg = format!("{:#}", parse("{\n  \"eos_token\": \"x\",\n}").unwrap_err());
        assert!(
            msg.contains("/m/tokenizer_config.json: malformed JSON"),
            "{msg}"
        );
        assert!(msg.contains("line 3"), "{msg}");

        let msg = format!(
            "{:#}",
            parse(r#"{"added_tokens_decoder": {"x1": {"content": "a"}}}"#).unwrap_err()
        );
        assert!(msg.contains("field `added_tokens_decoder`"), "{msg}");
        assert!(msg.contains("\"x1\""), "{msg}");
    }

    #[test]
    fn added_tokens_sorted_with_hf_defaults() {
        let c = parse(
            r#"{"added_tokens_decoder": {
                "12": {"content": "<b>", "special": false},
                "10": {"content": "<a>", "special": true, "lstrip": true}}}"#,
        )
        .unwrap();
        assert_eq!(c.added_tokens.len(), 2);
        assert_eq!(c.added_tokens[0].id, 10);
        assert!(c.added_tokens[0].lstrip && c.added_tokens[0].special);
        assert!(!c.added_tokens[0].normalized);
        assert!(c.added_tokens[1].normalized && !c.added_tokens[1].special);
    }

    #[test]
    fn writing_keeps_unknown_fields_and_sorts_keys() {
        let mut c = parse(r#"{"zeta": 1, "eos_token": "a", "chat_template": "T"}"#).unwrap();
        c.chat_template = None;
        c.pad_token = Some("p".into());
        let out = c.to_json_object();
        let keys: Vec<&str> = out.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "added_tokens_decoder",
                "bos_token",
                "eos_token",
                "pad_token",
                "zeta"
            ]
        );
        assert_eq!(out["pad_token"], "p");
        assert_eq!(out["bos_token"], Value::Null);
    }
}
