//! What is evaluated: a prompt and its gold answer, built from a benchmark or a dataset record.

use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};

use crate::data::benchmarks::Benchmark;
use crate::data::{Prompt, PromptDatasetConfig, PromptRecord};
use crate::tokenizer::Tokenizer;

/// The instruction of the paper's evaluation: reason step by step and put the final answer in
/// `\boxed{}` (where the answer extractor looks first).
pub const DEFAULT_SYSTEM_PROMPT: &str =
    "Please reason step by step, and put your final answer within \\boxed{}.";

/// One problem to evaluate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalItem {
    /// The benchmark's or dataset's id of the problem.
    pub id: String,
    /// What the model is given (raw text, or chat messages rendered by the chat template).
    pub prompt: Prompt,
    /// The reference answer, checked with `mathverify` (by visual accuracy when the model
    /// has a vision tower).
    pub gold: String,
    /// The images of a chat prompt, in order (paths; their `<|image_pad|>` placeholders are in
    /// the messages). Empty for a text question; images need a model with a tower.
    pub images: Vec<std::path::PathBuf>,
}

impl EvalItem {
    /// The item of a dataset record, formatted as the dataset config formatted it (so a
    /// held-out split is asked exactly as the training prompts are). A record without a gold
    /// answer is an error naming where it came from.
    pub fn from_record(record: &PromptRecord) -> Result<EvalItem> {
        let gold = record.answer.clone().ok_or_else(|| {
            anyhow!(
                "{}: record {} has no gold answer (evaluation needs one)",
                record.location,
                record.id
            )
        })?;
        Ok(EvalItem {
            id: record.id.clone(),
            prompt: record.prompt.clone(),
            gold,
            images: Vec::new(),
        })
    }
}

/// How a benchmark problem is put to the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptStyle {
    /// Instruction given before the problem: a `system` message with the chat template, else
    /// the instruction, a newline, then the problem. `None`: the bare problem.
    pub system_prompt: Option<String>,
    /// Render the problem as a user message with the tokenizer's chat template, when the
    /// tokenizer has one (otherwise raw text is used).
    pub chat_template: bool,
}

impl Default for PromptStyle {
    /// The paper's: [`DEFAULT_SYSTEM_PROMPT`] in the chat template.
    fn default() -> Self {
        Self {
            system_prompt: Some(DEFAULT_SYSTEM_PROMPT.to_string()),
            chat_template: true,
        }
    }
}

impl PromptStyle {
    /// The prompt for `problem`: chat messages when `chat`, raw text otherwise (same layout as
    /// training prompts, see [`PromptDatasetConfig::text_prompt`]).
    pub fn prompt(&self, problem: &str, chat: bool) -> Prompt {
        PromptDatasetConfig {
            system_prompt: self.system_prompt.clone(),
            apply_chat_template: chat,
            ..PromptDatasetConfig::default()
        }
        .text_prompt(problem)
    }

    /// Whether prompts for `tokenizer` use its chat template.
    pub fn uses_chat(&self, tokenizer: &Tokenizer) -> bool {
        self.chat_template && tokenizer.has_chat_template()
    }
}

/// The items of a benchmark, in file order, asked in `style` (the chat template is used when
/// `style.chat_template` and `tokenizer` has one).
pub fn benchmark_items(
    benchmark: &Benchmark,
    style: &PromptStyle,
    tokenizer: &Tokenizer,
) -> Vec<EvalItem> {
    let chat = style.uses_chat(tokenizer);
    benchmark
        .items
        .iter()
        .map(|item| EvalItem {
            id: item.id.clone(),
            prompt: style.prompt(&item.problem, chat),
            gold: item.answer.clone(),
            images: Vec::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::benchmarks::BenchmarkItem;
    use crate::data::{ChatMessage, Location};

    fn tokenizer(chat: bool) -> Tokenizer {
        let corpus: Vec<String> = (0..50)
            .map(|i| format!("{i} plus {i} is {}", 2 * i))
            .collect();
        let mut tok = crate::tokenizer::train_byte_level_bpe(&corpus, 300).unwrap();
        if !chat {
            tok.set_chat_template(None).unwrap();
        }
        tok
    }

    fn benchmark() -> Benchmark {
        Benchmark {
            name: "tiny".into(),
            path: "tiny.jsonl".into(),
            items: vec![BenchmarkItem {
                id: "a".into(),
                problem: "What is 1+1?".into(),
                answer: "2".into(),
            }],
        }
    }

    #[test]
    fn default_style_is_a_system_message_in_the_chat_template() {
        let items = benchmark_items(&benchmark(), &PromptStyle::default(), &tokenizer(true));
        assert_eq!(
            items,
            vec![EvalItem {
                id: "a".into(),
                prompt: Prompt::Chat(vec![
                    ChatMessage::new("system", DEFAULT_SYSTEM_PROMPT),
                    ChatMessage::new("user", "What is 1+1?"),
                ]),
                gold: "2".into(),
                images: Vec::new(),
            }]
        );
    }

    #[test]
    fn raw_text_without_template_or_when_asked() {
        let style = PromptStyle::default();
        let expected = Prompt::Text(format!("{DEFAULT_SYSTEM_PROMPT}\nWhat is 1+1?"));
        let no_template = benchmark_items(&benchmark(), &style, &tokenizer(false));
        assert_eq!(no_template[0].prompt, expected);
        let no_chat = PromptStyle {
            chat_template: false,
            ..style
        };
        assert_eq!(
            benchmark_items(&benchmark(), &no_chat, &tokenizer(true))[0].prompt,
            expected
        );
        let bare = PromptStyle {
            system_prompt: None,
            chat_template: false,
        };
        assert_eq!(
            benchmark_items(&benchmark(), &bare, &tokenizer(true))[0].prompt,
            Prompt::Text("What is 1+1?".into())
        );
    }

    #[test]
    fn record_without_answer_is_an_error_naming_it() {
        let mut record = PromptRecord {
            id: "q7".into(),
            prompt: Prompt::Text("p".into()),
            answer: None,
            location: Location::new("heldout.jsonl", "line", 7),
            columns: Default::default(),
        };
        let err = EvalItem::from_record(&record).unwrap_err().to_string();
        assert!(
            err.contains("heldout.jsonl line 7") && err.contains("q7"),
            "{err}"
        );
        record.answer = Some("5".into());
        let item = EvalItem::from_record(&record).unwrap();
        assert_eq!((item.id.as_str(), item.gold.as_str()), ("q7", "5"));
        assert_eq!(item.prompt, Prompt::Text("p".into()));
    }

    #[test]
    fn style_deserializes_with_defaults_and_rejects_unknown_keys() {
        let style: PromptStyle = serde_json::from_str(r#"{"chat_template": false}"#).unwrap();
        assert_eq!(style.system_prompt.as_deref(), Some(DEFAULT_SYSTEM_PROMPT));
        assert!(!style.chat_template);
        assert!(serde_json::from_str::<PromptStyle>(r#"{"system": "x"}"#).is_err());
    }
}
