//! Mapping a dataset's fields (JSON keys or Parquet columns) to a [`PromptRecord`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::record::{ChatMessage, Location, Prompt, PromptRecord};

/// Prompt fields tried in order when [`PromptDatasetConfig::prompt_field`] is not set.
pub const DEFAULT_PROMPT_FIELDS: [&str; 4] = ["problem", "question", "prompt", "messages"];
/// Answer fields tried in order when [`PromptDatasetConfig::answer_field`] is not set.
pub const DEFAULT_ANSWER_FIELDS: [&str; 2] = ["answer", "solution"];
/// Id field used when [`PromptDatasetConfig::id_field`] is not set (optional in the data).
pub const DEFAULT_ID_FIELD: &str = "id";

/// How to read prompts from a dataset file and how to present them to the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptDatasetConfig {
    /// Field holding the prompt (a string, or a list of `{role, content}` messages).
    /// Unset: the first present of [`DEFAULT_PROMPT_FIELDS`].
    pub prompt_field: Option<String>,
    /// Field holding the gold answer (string or number). Unset: the first present of
    /// [`DEFAULT_ANSWER_FIELDS`], and none is fine unless `require_answer`.
    pub answer_field: Option<String>,
    /// Field holding a record id (string or integer). Unset: `id` when present, else the
    /// record's line/row number.
    pub id_field: Option<String>,
    /// System message put before the prompt (chat: a `system` message when the data has
    /// none; raw text: the system text, a newline, then the prompt).
    pub system_prompt: Option<String>,
    /// true: prompts are chat messages rendered by the tokenizer's chat template.
    /// false: prompts are raw text tokenized as is (chat-message data is then an error).
    pub apply_chat_template: bool,
    /// Whether a record without a gold answer is an error.
    pub require_answer: bool,
}

impl Default for PromptDatasetConfig {
    fn default() -> Self {
        Self {
            prompt_field: None,
            answer_field: None,
            id_field: None,
            system_prompt: None,
            apply_chat_template: true,
            require_answer: false,
        }
    }
}

impl PromptDatasetConfig {
    /// Prompt field names to try, in order.
    pub fn prompt_candidates(&self) -> Vec<&str> {
        match &self.prompt_field {
            Some(name) => vec![name.as_str()],
            None => DEFAULT_PROMPT_FIELDS.to_vec(),
        }
    }

    /// Answer field names to try, in order.
    pub fn answer_candidates(&self) -> Vec<&str> {
        match &self.answer_field {
            Some(name) => vec![name.as_str()],
            None => DEFAULT_ANSWER_FIELDS.to_vec(),
        }
    }

    /// The id field name.
    pub fn id_name(&self) -> &str {
        self.id_field.as_deref().unwrap_or(DEFAULT_ID_FIELD)
    }

    /// Turns the prompt text into a [`Prompt`] following `system_prompt` and
    /// `apply_chat_template`.
    pub fn text_prompt(&self, text: &str) -> Prompt {
        if self.apply_chat_template {
            let mut messages = Vec::with_capacity(2);
            if let Some(system) = &self.system_prompt {
                messages.push(ChatMessage::new("system", system.clone()));
            }
            messages.push(ChatMessage::new("user", text));
            Prompt::Chat(messages)
        } else {
            match &self.system_prompt {
                Some(system) => Prompt::Text(format!("{system}\n{text}")),
                None => Prompt::Text(text.to_string()),
            }
        }
    }
}

/// JSON type name with its article, for messages ("a number", "an array").
pub(super) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The first of `candidates` present in `fields` (null counts as present).
fn first_present<'a>(fields: &Map<String, Value>, candidates: &[&'a str]) -> Option<&'a str> {
    candidates.iter().copied().find(|c| fields.contains_key(*c))
}

fn quoted_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Builds one record from the fields of one JSON line or Parquet row.
///
/// Errors name `location` and the field: missing prompt field, wrong field type, empty
/// prompt, chat messages without `apply_chat_template`, missing answer when required.
pub fn record_from_fields(
    fields: &Map<String, Value>,
    location: Location,
    config: &PromptDatasetConfig,
) -> anyhow::Result<PromptRecord> {
    let candidates = config.prompt_candidates();
    let prompt_name = first_present(fields, &candidates).ok_or_else(|| {
        anyhow::anyhow!(
            "{location}: missing prompt field (looked for {}; set prompt_field to choose another)",
            quoted_list(&candidates)
        )
    })?;
    let prompt = prompt_from_value(&fields[prompt_name], prompt_name, &location, config)?;

    let answer_candidates = config.answer_candidates();
    let answer = match first_present(fields, &answer_candidates) {
        Some(name) => answer_from_value(&fields[name], name, &location).map_err(|e| {
            if config.answer_field.is_none() {
                anyhow::anyhow!("{e} (set answer_field to read the answer from another field)")
            } else {
                e
            }
        })?,
        None if config.answer_field.is_some() => anyhow::bail!(
            "{location}: missing answer field `{}`",
            answer_candidates[0]
        ),
        None => None,
    };
    if config.require_answer && answer.is_none() {
        anyhow::bail!(
            "{location}: no gold answer (looked for {}) but require_answer is set",
            quoted_list(&answer_candidates)
        );
    }

    let id_name = config.id_name();
    let id = match fields.get(id_name) {
        None if config.id_field.is_some() => {
            anyhow::bail!("{location}: missing id field `{id_name}`")
        }
        None | Some(Value::Null) => location.index.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        Some(other) => anyhow::bail!(
            "{location}: field `{id_name}` is {}, expected a string or an integer",
            type_name(other)
        ),
    };

    let columns = fields
        .iter()
        .filter(|(name, _)| name.as_str() != prompt_name)
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    Ok(PromptRecord {
        id,
        prompt,
        answer,
        location,
        columns,
    })
}

fn prompt_from_value(
    value: &Value,
    name: &str,
    location: &Location,
    config: &PromptDatasetConfig,
) -> anyhow::Result<Prompt> {
    match value {
        Value::String(text) => {
            anyhow::ensure!(!text.trim().is_empty(), "{location}: field `{name}` is empty");
            Ok(config.text_prompt(text))
        }
        Value::Array(items) => {
            anyhow::ensure!(
                config.apply_chat_template,
                "{location}: field `{name}` holds chat messages, which need apply_chat_template = true"
            );
            let mut messages = items
                .iter()
                .enumerate()
                .map(|(i, item)| message_from_value(item, name, i, location))
                .collect::<anyhow::Result<Vec<_>>>()?;
            // A prompt ends where the model's turn begins: drop trailing assistant turns
            // (chat datasets often carry the reference reply).
            while messages.last().is_some_and(|m| m.role == "assistant") {
                messages.pop();
            }
            anyhow::ensure!(
                !messages.is_empty(),
                "{location}: field `{name}` has no message before the assistant's reply"
            );
            if let Some(system) = &config.system_prompt {
                if messages[0].role != "system" {
                    messages.insert(0, ChatMessage::new("system", system.clone()));
                }
            }
            Ok(Prompt::Chat(messages))
        }
        other => anyhow::bail!(
            "{location}: field `{name}` is {}, expected a string or a list of {{role, content}} messages",
            type_name(other)
        ),
    }
}

fn message_from_value(
    item: &Value,
    name: &str,
    index: usize,
    location: &Location,
) -> anyhow::Result<ChatMessage> {
    let object = item.as_object().ok_or_else(|| {
        anyhow::anyhow!(
            "{location}: field `{name}[{index}]` is {}, expected a {{role, content}} object",
            type_name(item)
        )
    })?;
    let text = |key: &str| -> anyhow::Result<String> {
        match object.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => anyhow::bail!(
                "{location}: field `{name}[{index}].{key}` is {}, expected a string",
                type_name(other)
            ),
            None => anyhow::bail!("{location}: field `{name}[{index}]` has no `{key}`"),
        }
    };
    Ok(ChatMessage::new(text("role")?, text("content")?))
}

fn answer_from_value(
    value: &Value,
    name: &str,
    location: &Location,
) -> anyhow::Result<Option<String>> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Number(n) => Ok(Some(n.to_string())),
        other => anyhow::bail!(
            "{location}: field `{name}` is {}, expected a string or a number",
            type_name(other)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn loc() -> Location {
        Location::new("d.jsonl", "line", 7)
    }

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn default_fields_and_chat_prompt() {
        let config = PromptDatasetConfig {
            system_prompt: Some("Think step by step.".into()),
            ..Default::default()
        };
        let r = record_from_fields(
            &fields(json!({"question": "1+1?", "answer": 2})),
            loc(),
            &config,
        )
        .unwrap();
        assert_eq!(r.id, "7");
        assert_eq!(r.answer.as_deref(), Some("2"));
        assert_eq!(
            r.prompt,
            Prompt::Chat(vec![
                ChatMessage::new("system", "Think step by step."),
                ChatMessage::new("user", "1+1?"),
            ])
        );
    }

    #[test]
    fn problem_wins_over_later_fallbacks_and_raw_text() {
        let config = PromptDatasetConfig {
            system_prompt: Some("S".into()),
            apply_chat_template: false,
            ..Default::default()
        };
        let f =
            fields(json!({"prompt": "b", "problem": "a", "solution": "\\boxed{3}", "id": "x1"}));
        let r = record_from_fields(&f, loc(), &config).unwrap();
        assert_eq!(r.prompt, Prompt::Text("S\na".into()));
        assert_eq!(r.answer.as_deref(), Some("\\boxed{3}"));
        assert_eq!(r.id, "x1");
    }

    #[test]
    fn chat_messages_drop_trailing_assistant_and_keep_own_system() {
        let config = PromptDatasetConfig {
            prompt_field: Some("messages".into()),
            system_prompt: Some("ignored".into()),
            ..Default::default()
        };
        let f = fields(json!({"messages": [
            {"role": "system", "content": "own"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}
        ]}));
        let r = record_from_fields(&f, loc(), &config).unwrap();
        assert_eq!(
            r.prompt,
            Prompt::Chat(vec![
                ChatMessage::new("system", "own"),
                ChatMessage::new("user", "q")
            ])
        );
        assert_eq!(r.prompt.plain_text(), "own\nq");
        assert_eq!(r.answer, None);
    }

    #[test]
    fn other_fields_are_kept_as_columns_but_the_prompt_field() {
        let config = PromptDatasetConfig {
            prompt_field: Some("messages".into()),
            ..Default::default()
        };
        let f = fields(json!({
            "messages": [{"role": "user", "content": "q"}],
            "prompt": "also a column here",
            "answer": 3,
            "id": "r1",
            "weight": null,
        }));
        let r = record_from_fields(&f, loc(), &config).unwrap();
        let names: Vec<&str> = r.columns.keys().map(String::as_str).collect();
        assert_eq!(names, vec!["answer", "id", "prompt", "weight"]);
        assert_eq!(r.columns["answer"], json!(3));
        assert_eq!(r.columns["prompt"], json!("also a column here"));
        assert_eq!(r.columns["weight"], Value::Null);
        // Serialized records stay as before when there are no columns.
        let mut bare = r.clone();
        bare.columns.clear();
        assert!(!serde_json::to_string(&bare).unwrap().contains("columns"));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let config = PromptDatasetConfig::default();
        let cases: Vec<(Value, PromptDatasetConfig, &[&str])> = vec![
            (
                json!({"text": "x"}),
                config.clone(),
                &[
                    "d.jsonl line 7",
                    "missing prompt field",
                    "`problem`",
                    "`question`",
                ],
            ),
            (
                json!({"problem": 3}),
                config.clone(),
                &["d.jsonl line 7", "`problem`", "number"],
            ),
            (
                json!({"problem": "  "}),
                config.clone(),
                &["`problem`", "empty"],
            ),
            (
                json!({"problem": "q", "answer": [1]}),
                config.clone(),
                &["line 7", "`answer`", "an array", "answer_field"],
            ),
            (
                json!({"problem": "q", "solution": {"a": 1}}),
                config.clone(),
                &["line 7", "`solution`", "an object"],
            ),
            (
                json!({"problem": "q", "id": 1.5}),
                config.clone(),
                &["`id`", "number"],
            ),
            (
                json!({"problem": [{"role": "user"}]}),
                config.clone(),
                &["`problem[0]`", "content"],
            ),
            (
                json!({"problem": [{"role": "user", "content": 1}]}),
                config.clone(),
                &["`problem[0].content`", "number"],
            ),
            (
                json!({"problem": "q"}),
                PromptDatasetConfig {
                    require_answer: true,
                    ..Default::default()
                },
                &["line 7", "require_answer"],
            ),
            (
                json!({"problem": "q"}),
                PromptDatasetConfig {
                    answer_field: Some("gold".into()),
                    ..Default::default()
                },
                &["line 7", "`gold`"],
            ),
            (
                json!({"problem": [{"role": "user", "content": "q"}]}),
                PromptDatasetConfig {
                    apply_chat_template: false,
                    ..Default::default()
                },
                &["`problem`", "apply_chat_template"],
            ),
        ];
        for (value, config, needles) in cases {
            let err = record_from_fields(&fields(value.clone()), loc(), &config)
                .unwrap_err()
                .to_string();
            for needle in needles {
                assert!(err.contains(needle), "{value}: `{err}` lacks `{needle}`");
            }
        }
    }
}
