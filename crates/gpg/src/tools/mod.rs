//! Tools a model may call during a rollout (multi-turn trajectories), and the recipe's
//! `[tools]` table.
//!
//! * [`call`]: Qwen's `<tool_call>` JSON format, parsed from the model's turn;
//! * [`calculator`], [`python`], [`external`]: the built-in calculator (exact arithmetic), the
//!   sandboxed Python interpreter, and any command speaking JSON lines;
//! * [`format`]: the tokens of a tool turn, from the model's chat template;
//! * [`Toolbox`]: the run's tools, their schemas (given to the chat template as `tools`) and
//!   one bounded call: every failure — a malformed call, an unknown tool, a tool that hangs,
//!   crashes, floods or prints garbage — is an error *result*, whose text (`error: …`) becomes
//!   the tool's response; it is counted in the metrics and never stops the run.
//!
//! The multi-turn sampling loop that uses them is `crate::rollout::multi_turn`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod calculator;
pub mod call;
pub mod external;
pub mod format;
mod process;
pub mod python;

pub use calculator::Calculator;
pub use call::{parse_tool_call, ToolCall, CALL_CLOSE, CALL_OPEN};
pub use external::{ExternalTool, ExternalToolOptions};
pub use format::{FormatSource, TurnFormat};
pub use python::{Python, PythonOptions};

/// A tool: a name, a JSON schema for the chat template, and a bounded call.
pub trait Tool: Send + Sync {
    fn name(&self) -> &str;
    /// `{"type": "function", "function": {"name", "description", "parameters"}}`.
    fn schema(&self) -> Value;
    /// The tool's answer, or an error message (both are shown to the model). Must return
    /// within the run's [`Limits`].
    fn call(&self, arguments: &serde_json::Map<String, Value>) -> Result<String, String>;
}

/// Names accepted in `[[tools.functions]]`.
pub const TOOL_NAMES: [&str; 3] = ["calculator", "python", "external"];

/// The recipe's `[tools]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolsConfig {
    /// The tools (`name` = calculator, python or external, with `options`).
    pub functions: Vec<ToolSpec>,
    /// Tool calls per trajectory; a call beyond it ends the trajectory (finish reason
    /// `tool_limit`, no response).
    #[serde(default = "default_max_turns")]
    pub max_turns: usize,
    /// Completion tokens of a whole trajectory — the model's turns and the tool responses
    /// together. Each turn samples at most `rollout.max_new_tokens` of them. Default:
    /// `rollout.max_new_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_total_tokens: Option<usize>,
    /// Wall-clock seconds per call of a process tool (python, external); it is killed after.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: f64,
    /// Bytes a process tool may print (stdout, and stderr, each); more kills it.
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: usize,
    /// Characters of a tool's answer put in the context (the rest is cut, marked `…`).
    #[serde(default = "default_max_response_chars")]
    pub max_response_chars: usize,
}

fn default_max_turns() -> usize {
    4
}
fn default_timeout_secs() -> f64 {
    10.0
}
fn default_max_output_bytes() -> usize {
    16 * 1024
}
fn default_max_response_chars() -> usize {
    1000
}

/// One `[[tools.functions]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    pub name: String,
    /// `python`: [`PythonOptions`]; `external`: [`ExternalToolOptions`] (required); the
    /// calculator takes none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Value>,
}

/// The bounds of one process-tool call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub timeout: Duration,
    pub max_output_bytes: usize,
}

impl ToolsConfig {
    /// Checks the numbers (the tools themselves are checked when built).
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(!self.functions.is_empty(), "[tools]: `functions` is empty");
        anyhow::ensure!(self.max_turns >= 1, "[tools] max_turns must be ≥ 1");
        anyhow::ensure!(
            self.timeout_secs.is_finite() && self.timeout_secs > 0.0,
            "[tools] timeout_secs must be a positive number, got {}",
            self.timeout_secs
        );
        anyhow::ensure!(
            self.max_output_bytes >= 16 && self.max_response_chars >= 16,
            "[tools] max_output_bytes and max_response_chars must be ≥ 16"
        );
        if let Some(n) = self.max_total_tokens {
            anyhow::ensure!(n >= 1, "[tools] max_total_tokens must be ≥ 1");
        }
        Ok(())
    }

    fn limits(&self) -> Limits {
        Limits {
            timeout: Duration::from_secs_f64(self.timeout_secs),
            max_output_bytes: self.max_output_bytes,
        }
    }
}

impl ToolSpec {
    fn options<T: serde::de::DeserializeOwned + Default>(&self) -> Result<T> {
        match &self.options {
            None => Ok(T::default()),
            Some(v) => serde_json::from_value(v.clone())
                .with_context(|| format!("[[tools.functions]] {}: options", self.name)),
        }
    }

    /// Builds the tool (a `python` tool checks that its interpreter starts).
    pub fn build(&self, limits: Limits) -> Result<Box<dyn Tool>> {
        Ok(match self.name.as_str() {
            "calculator" => {
                anyhow::ensure!(
                    self.options.is_none(),
                    "[[tools.functions]] calculator takes no options"
                );
                Box::new(Calculator)
            }
            "python" => Box::new(Python::new(self.options()?, limits)?),
            "external" => {
                let options = self.options.clone().context(
                    "[[tools.functions]] external needs options = { command = [...], name = \"...\" }",
                )?;
                let options: ExternalToolOptions = serde_json::from_value(options)
                    .context("[[tools.functions]] external: options")?;
                Box::new(ExternalTool::new(options, limits)?)
            }
            other => bail!(
                "[[tools.functions]]: unknown tool {other:?}; expected one of: {}",
                TOOL_NAMES.join(", ")
            ),
        })
    }
}

/// What one tool call of a trajectory did (logged with the trajectory).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCallRecord {
    /// The tool called (absent for a call that could not be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<serde_json::Map<String, Value>>,
    /// The text put in the context (the answer, or `error: …`).
    pub response: String,
    /// Whether the call failed (malformed, unknown tool, the tool's own error, timeout …).
    pub error: bool,
    pub seconds: f64,
}

/// The run's tools.
pub struct Toolbox {
    tools: Vec<Box<dyn Tool>>,
    config: ToolsConfig,
    format: TurnFormat,
}

impl std::fmt::Debug for Toolbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Toolbox")
            .field("tools", &self.names())
            .field("format", &self.format.source)
            .finish()
    }
}

impl Toolbox {
    /// Builds the tools of `config` (an absent interpreter, a bad option, two tools of one
    /// name are errors here, at the start of a run) and the tool-turn format of `tokenizer`.
    pub fn new(config: &ToolsConfig, tokenizer: &Tokenizer) -> Result<Self> {
        config.validate()?;
        let limits = config.limits();
        let tools = config
            .functions
            .iter()
            .map(|spec| spec.build(limits))
            .collect::<Result<Vec<_>>>()?;
        Self::with_tools(tools, config, tokenizer)
    }

    /// A toolbox of given tools (tests, embedding programs).
    pub fn with_tools(
        tools: Vec<Box<dyn Tool>>,
        config: &ToolsConfig,
        tokenizer: &Tokenizer,
    ) -> Result<Self> {
        let mut names: Vec<&str> = tools.iter().map(|t| t.name()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            bail!("[tools]: two tools are named {:?}", w[0]);
        }
        let schemas: Vec<Value> = tools.iter().map(|t| t.schema()).collect();
        let format = TurnFormat::of(tokenizer, &schemas);
        Ok(Self {
            tools,
            config: config.clone(),
            format,
        })
    }

    pub fn config(&self) -> &ToolsConfig {
        &self.config
    }

    /// The tools' names, in recipe order.
    pub fn names(&self) -> Vec<&str> {
        self.tools.iter().map(|t| t.name()).collect()
    }

    /// The schemas given to the chat template as `tools`.
    pub fn schemas(&self) -> Vec<Value> {
        self.tools.iter().map(|t| t.schema()).collect()
    }

    /// The text around a tool's answer.
    pub fn format(&self) -> &TurnFormat {
        &self.format
    }

    /// Reads the call at the end of a model turn's `text` and runs it. Never fails: an error
    /// is a record with `error = true` and `response = "error: …"`.
    pub fn run(&self, text: &str) -> ToolCallRecord {
        let t0 = Instant::now();
        let (name, arguments, result) = match parse_tool_call(text) {
            Err(e) => (None, None, Err(e.0)),
            Ok(call) => {
                let result = match self.tools.iter().find(|t| t.name() == call.name) {
                    Some(tool) => tool.call(&call.arguments),
                    None => Err(format!(
                        "unknown tool {:?}; the tools are: {}",
                        call.name,
                        self.names().join(", ")
                    )),
                };
                (Some(call.name), Some(call.arguments), result)
            }
        };
        let (text, error) = match result {
            Ok(answer) => (answer, false),
            Err(e) => (format!("error: {e}"), true),
        };
        ToolCallRecord {
            name,
            arguments,
            response: cut_chars(text.trim_end(), self.config.max_response_chars),
            error,
            seconds: t0.elapsed().as_secs_f64(),
        }
    }

    /// [`Self::run`] on several turns at once (threads; results in input order).
    pub fn run_all(&self, texts: &[String]) -> Vec<ToolCallRecord> {
        const PARALLEL: usize = 8;
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(PARALLEL) {
            std::thread::scope(|s| {
                let handles: Vec<_> = chunk.iter().map(|t| s.spawn(|| self.run(t))).collect();
                for h in handles {
                    out.push(h.join().unwrap_or_else(|_| ToolCallRecord {
                        name: None,
                        arguments: None,
                        response: "error: the tool panicked".into(),
                        error: true,
                        seconds: 0.0,
                    }));
                }
            });
        }
        out
    }
}

/// Token ids of a dataset prompt with the tools listed: chat messages rendered by the chat
/// template with `tools = schemas` (Qwen2.5's lists them in its system prompt), raw text
/// as is (a raw prompt has no place for the list).
pub fn encode_prompt_with_tools(
    tokenizer: &Tokenizer,
    prompt: &crate::tokenizer::Prompt,
    schemas: &[Value],
) -> Result<Vec<u32>> {
    match prompt {
        crate::tokenizer::Prompt::Text(text) => tokenizer.encode(text, false),
        crate::tokenizer::Prompt::Chat(messages) => {
            let messages: Vec<Value> = messages
                .iter()
                .map(serde_json::to_value)
                .collect::<std::result::Result<_, _>>()?;
            let text = tokenizer.apply_chat_template_json(&messages, Some(schemas), true)?;
            tokenizer.encode(&text, false)
        }
    }
}

/// The first `max` characters of `text`, marked `…` when cut.
fn cut_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some((i, _)) => format!("{}…", &text[..i]),
    }
}

use crate::tokenizer::Tokenizer;

#[cfg(test)]
mod tests;
