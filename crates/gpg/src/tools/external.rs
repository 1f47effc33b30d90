//! A tool served by an external command speaking JSON lines (the conventions of the external
//! reward, reward/external.rs): the command is started once per call, reads one line on stdin
//!
//! ```text
//! {"name": "search", "arguments": {"query": "..."}}
//! ```
//!
//! and writes one JSON value on stdout: a string (the tool's answer), `{"result": ...}` (a
//! string, or any JSON value, given to the model as its JSON text) or `{"error": "..."}`, then
//! exits with status 0. It inherits the trainer's environment and working directory (it is
//! the user's own program). Whatever it does wrong — hang past `timeout_secs`, exit non-zero,
//! print more than `max_output_bytes`, print bytes that are not UTF-8 or JSON — ends in an
//! error result for that call, never a stalled run.

use std::process::Command;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::process::run_bounded;
use super::{Limits, Tool};

/// Options of an `external` tool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalToolOptions {
    /// The program followed by its arguments, e.g. `["python3", "search.py"]`.
    pub command: Vec<String>,
    /// The tool's name, as the model calls it.
    pub name: String,
    /// What it does (shown to the model in the system prompt's tool list).
    #[serde(default)]
    pub description: String,
    /// JSON schema of the arguments (default: an object with no declared properties).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
}

/// An external-command tool.
#[derive(Debug, Clone)]
pub struct ExternalTool {
    options: ExternalToolOptions,
    limits: Limits,
}

/// Bytes of stderr or stdout quoted in an error.
const QUOTE_BYTES: usize = 300;

fn quote(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(QUOTE_BYTES)]);
    text.trim().to_string()
}

impl ExternalTool {
    pub fn new(options: ExternalToolOptions, limits: Limits) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !options.command.is_empty() && !options.command[0].is_empty(),
            "[tools] external tool {:?}: `command` is empty; give the program and its arguments",
            options.name
        );
        anyhow::ensure!(
            !options.name.is_empty(),
            "[tools] external tool `{}`: `name` is empty",
            options.command[0]
        );
        if let Some(p) = &options.parameters {
            anyhow::ensure!(
                p.is_object(),
                "[tools] external tool {:?}: `parameters` must be a JSON schema object",
                options.name
            );
        }
        Ok(Self { options, limits })
    }

    fn command_line(&self) -> String {
        self.options.command.join(" ")
    }
}

/// The answer in one stdout value (see the module docs): `Ok(Ok(answer))`, `Ok(Err(the
/// tool's own error))`, or `Err(what is wrong with the output)`.
fn read_answer(stdout: &[u8]) -> Result<Result<String, String>, String> {
    let text = std::str::from_utf8(stdout)
        .map_err(|e| format!("printed bytes that are not UTF-8 ({e}): {}", quote(stdout)))?;
    let value: Value = serde_json::from_str(text.trim()).map_err(|e| {
        format!(
            "printed output that is not one JSON value ({e}): {}",
            quote(stdout)
        )
    })?;
    match value {
        Value::String(s) => Ok(Ok(s)),
        Value::Object(mut o) => {
            if let Some(err) = o.remove("error") {
                return Ok(Err(match err {
                    Value::String(s) => s,
                    other => other.to_string(),
                }));
            }
            match o.remove("result") {
                Some(Value::String(s)) => Ok(Ok(s)),
                Some(other) => Ok(Ok(other.to_string())),
                None => Err(format!(
                    "printed an object with neither \"result\" nor \"error\": {}",
                    quote(stdout)
                )),
            }
        }
        other => Err(format!(
            "printed {other}, not a string or {{\"result\": ...}}"
        )),
    }
}

impl Tool for ExternalTool {
    fn name(&self) -> &str {
        &self.options.name
    }

    fn schema(&self) -> Value {
        json!({
            "type": "function",
            "function": {
                "name": self.options.name,
                "description": self.options.description,
                "parameters": self.options.parameters.clone()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            }
        })
    }

    fn call(&self, arguments: &Map<String, Value>) -> Result<String, String> {
        let mut line = serde_json::to_vec(&json!({
            "name": self.options.name,
            "arguments": arguments,
        }))
        .map_err(|e| format!("cannot encode the call: {e}"))?;
        line.push(b'\n');
        let mut command = Command::new(&self.options.command[0]);
        command.args(&self.options.command[1..]);
        let out = run_bounded(
            command,
            line,
            self.limits.timeout,
            self.limits.max_output_bytes,
        )
        .with_context(|| format!("cannot start `{}`", self.command_line()))
        .map_err(|e| format!("{e:#}"))?;
        if out.timed_out {
            return Err(format!(
                "`{}` timed out after {:.1} s and was killed",
                self.command_line(),
                self.limits.timeout.as_secs_f64()
            ));
        }
        if out.truncated {
            return Err(format!(
                "`{}` printed more than {} bytes and was killed",
                self.command_line(),
                self.limits.max_output_bytes
            ));
        }
        match out.status {
            Some(s) if s.success() => {
                read_answer(&out.stdout).map_err(|e| format!("`{}` {e}", self.command_line()))?
            }
            Some(s) => Err(format!(
                "`{}` failed with {s}; stderr: {}",
                self.command_line(),
                quote(&out.stderr)
            )),
            None => Err(format!("`{}` was killed", self.command_line())),
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn tool(script: &str, timeout_ms: u64) -> ExternalTool {
        ExternalTool::new(
            ExternalToolOptions {
                command: vec!["sh".into(), "-c".into(), script.into()],
                name: "t".into(),
                description: String::new(),
                parameters: None,
            },
            Limits {
                timeout: Duration::from_millis(timeout_ms),
                max_output_bytes: 1000,
            },
        )
        .unwrap()
    }

    fn call(t: &ExternalTool) -> Result<String, String> {
        t.call(json!({"x": 1}).as_object().unwrap())
    }

    #[test]
    fn answers_and_receives_the_call() {
        // The program sees the call's JSON line (echoed back as the result).
        let t = tool(r#"read line; printf '{"result": %s}\n' "$line""#, 5000);
        assert_eq!(call(&t).unwrap(), r#"{"arguments":{"x":1},"name":"t"}"#);
        assert_eq!(call(&tool(r#"echo '"hello"'"#, 5000)).unwrap(), "hello");
        let err = call(&tool(r#"echo '{"error": "no such page"}'"#, 5000)).unwrap_err();
        assert_eq!(err, "no such page");
    }

    #[test]
    fn bad_tools_end_in_bounded_errors() {
        let t0 = Instant::now();
        let cases = [
            ("sleep 30", "timed out"),
            (
                "echo oops >&2; exit 2",
                "failed with exit status: 2; stderr: oops",
            ),
            ("echo not json", "not one JSON value"),
            (r"printf '\377\376'", "not UTF-8"),
            ("yes", "more than 1000 bytes"),
            ("echo 42", "not a string"),
        ];
        for (script, want) in cases {
            let err = call(&tool(script, 300)).unwrap_err();
            assert!(err.contains(want), "{script}: {err}");
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        let err = call(&ExternalTool {
            options: ExternalToolOptions {
                command: vec!["/nonexistent/tool".into()],
                ..tool("", 1).options
            },
            limits: tool("", 100).limits,
        })
        .unwrap_err();
        assert!(err.contains("cannot start"), "{err}");
    }
}
