//! Qwen's tool-call format: the model writes
//!
//! ```text
//! <tool_call>
//! {"name": "calculator", "arguments": {"expression": "(23+58)*4-17"}}
//! </tool_call>
//! ```
//!
//! and the rollout stops the turn at `</tool_call>`. [`parse_tool_call`] reads the last such
//! block of a turn's text. `arguments` may be an object or a string holding one (some models
//! write the JSON of the arguments as a string); anything else is a [`MalformedCall`], whose
//! text becomes the tool response (the model sees what it got wrong).

use serde_json::{Map, Value};

/// The opening tag.
pub const CALL_OPEN: &str = "<tool_call>";
/// The closing tag; the rollout's stop string for a turn that calls a tool.
pub const CALL_CLOSE: &str = "</tool_call>";

/// Bytes of a call body quoted in an error.
const QUOTE_BYTES: usize = 200;

/// A parsed call.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Map<String, Value>,
}

/// Why a call could not be read (the message is shown to the model as the tool response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedCall(pub String);

impl std::fmt::Display for MalformedCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `text` (one turn of the model) ends a tool call.
pub fn ends_with_call(text: &str) -> bool {
    text.contains(CALL_CLOSE)
}

/// The call of the last `<tool_call>` … `</tool_call>` block of `text`.
pub fn parse_tool_call(text: &str) -> Result<ToolCall, MalformedCall> {
    let end = text
        .rfind(CALL_CLOSE)
        .ok_or_else(|| MalformedCall(format!("no {CALL_CLOSE} in the turn")))?;
    let start = text[..end].rfind(CALL_OPEN).ok_or_else(|| {
        MalformedCall(format!(
            "malformed tool call: {CALL_CLOSE} without {CALL_OPEN}"
        ))
    })?;
    let body = text[start + CALL_OPEN.len()..end].trim();
    let quote = || {
        let mut cut = body.len().min(QUOTE_BYTES);
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body[..cut].to_string()
    };
    let value: Value = serde_json::from_str(body).map_err(|e| {
        MalformedCall(format!(
            "malformed tool call: the body is not JSON ({e}): {}",
            quote()
        ))
    })?;
    let Value::Object(mut object) = value else {
        return Err(MalformedCall(format!(
            "malformed tool call: expected {{\"name\": ..., \"arguments\": {{...}}}}, got {}",
            quote()
        )));
    };
    let name = match object.remove("name") {
        Some(Value::String(name)) if !name.is_empty() => name,
        _ => {
            return Err(MalformedCall(format!(
                "malformed tool call: no \"name\" string: {}",
                quote()
            )))
        }
    };
    let arguments = match object.remove("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(a)) => a,
        Some(Value::String(s)) => match serde_json::from_str(&s) {
            Ok(Value::Object(a)) => a,
            _ => {
                return Err(MalformedCall(format!(
                    "malformed tool call to {name}: \"arguments\" is a string that is not a JSON object"
                )))
            }
        },
        Some(other) => {
            return Err(MalformedCall(format!(
                "malformed tool call to {name}: \"arguments\" must be an object, got {other}"
            )))
        }
    };
    Ok(ToolCall { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_qwen_calls() {
        let text = "Let me compute.\n<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"2+3\"}}\n</tool_call>";
        assert!(ends_with_call(text));
        let call = parse_tool_call(text).unwrap();
        assert_eq!(call.name, "calculator");
        assert_eq!(call.arguments["expression"], "2+3");
        // Arguments as a JSON string, and absent.
        let s = "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}</tool_call>";
        assert_eq!(parse_tool_call(s).unwrap().arguments["x"], 1);
        let s = "<tool_call>{\"name\": \"f\"}</tool_call>";
        assert!(parse_tool_call(s).unwrap().arguments.is_empty());
        // The last block counts.
        let s = "<tool_call>{\"name\": \"a\"}</tool_call> <tool_call>{\"name\": \"b\"}</tool_call>";
        assert_eq!(parse_tool_call(s).unwrap().name, "b");
    }

    #[test]
    fn malformed_calls_say_why() {
        for (text, want) in [
            ("<tool_call>{\"name\": </tool_call>", "not JSON"),
            ("<tool_call>[1, 2]</tool_call>", "expected"),
            ("<tool_call>{\"arguments\": {}}</tool_call>", "no \"name\""),
            (
                "<tool_call>{\"name\": \"f\", \"arguments\": 3}</tool_call>",
                "must be an object",
            ),
            ("{\"name\": \"f\"}</tool_call>", "without <tool_call>"),
            ("no call", "no </tool_call>"),
        ] {
            let err = parse_tool_call(text).unwrap_err().0;
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
