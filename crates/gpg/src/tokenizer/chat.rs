//! Chat templates: Hugging Face Jinja templates rendered with minijinja, set up the way
//! transformers sets up Jinja2 for `apply_chat_template`.
//!
//! transformers' environment: `trim_blocks=True`, `lstrip_blocks=True`, the `loopcontrols`
//! extension, a `tojson` filter that is Python's `json.dumps` (no HTML escaping), and the
//! globals `raise_exception(msg)` and `strftime_now(fmt)`. The template is rendered with
//! `messages`, `add_generation_prompt`, `tools = None`, `documents = None` and the special
//! tokens (`bos_token`, `eos_token`, `pad_token`; absent ones are undefined). Python string
//! and dict methods (`.strip()`, `.startswith()`, `.items()` …) come from minijinja-contrib's
//! pycompat callback.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};

use super::pyjson::{dumps, DumpOptions};
use super::strftime::{strftime, DateTime};

/// One turn of a conversation, as chat templates read it (`message.role`, `message.content`).
pub use super::prompt::ChatMessage;

/// The special-token strings a template may refer to.
#[derive(Debug, Clone, Default)]
pub(crate) struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
}

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template together with its source text.
#[derive(Clone)]
pub(crate) struct ChatTemplate {
    source: String,
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error names the template line.
    pub(crate) fn compile(source: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Jinja2's default, which transformers keeps: a single trailing newline is dropped.
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(source))
            .map_err(|e| anyhow::anyhow!("{}", describe(&e)))
            .context("compiling the chat template")?;
        Ok(ChatTemplate {
            source: source.to_string(),
            env,
        })
    }

    /// The template text.
    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation. An empty conversation is an error, as in transformers.
    pub(crate) fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tokens: &TemplateTokens,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        if messages.is_empty() {
            bail!("cannot apply the chat template to an empty conversation");
        }
        self.render_values(
            Value::from_serialize(messages),
            None,
            add_generation_prompt,
            tokens,
            kwargs,
        )
    }

    /// Renders a conversation given as JSON messages (which may hold `tool_calls`, and
    /// `tool` messages) with `tools` (the function schemas, as transformers'
    /// `apply_chat_template(..., tools=...)`; `None`: no tools) and the template variables
    /// `kwargs`.
    pub(crate) fn render_json(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
        tokens: &TemplateTokens,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        if messages.is_empty() {
            bail!("cannot apply the chat template to an empty conversation");
        }
        self.render_values(
            Value::from_serialize(messages),
            tools.map(Value::from_serialize),
            add_generation_prompt,
            tokens,
            kwargs,
        )
    }

    fn render_values(
        &self,
        messages: Value,
        tools: Option<Value>,
        add_generation_prompt: bool,
        tokens: &TemplateTokens,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| anyhow::anyhow!("{}", describe(&e)))?;
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", messages);
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", tools.unwrap_or(Value::from(())));
        ctx.insert("documents", Value::from(()));
        // A special token that is not set is left out (undefined), as in transformers,
        // where `special_tokens_map` holds only the tokens that are set.
        for (name, token) in [
            ("bos_token", &tokens.bos_token),
            ("eos_token", &tokens.eos_token),
            ("pad_token", &tokens.pad_token),
        ] {
            if let Some(token) = token {
                ctx.insert(name, Value::from(token.as_str()));
            }
        }
        // Caller variables (transformers' **kwargs of apply_chat_template, e.g. Qwen3's
        // `enable_thinking`) come last and override.
        for (name, value) in kwargs {
            ctx.insert(name.as_str(), Value::from_serialize(value));
        }
        template
            .render(ctx)
            .map_err(|e| anyhow::anyhow!("{}", describe(&e)))
            .context("rendering the chat template")
    }
}

/// Replaces transformers' `{% generation %}` … `{% endgeneration %}` block (its
/// AssistantTracker extension, which only records where assistant text lies and renders its
/// body unchanged) by `{% if true %}` … `{% endif %}`, keeping the whitespace-control marks
/// (`-`, `+`) so that the output is the same.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let open_mark = inner.chars().next().filter(|c| matches!(c, '-' | '+'));
        let close_mark = inner.chars().last().filter(|c| matches!(c, '-' | '+'));
        let mut body = inner;
        if open_mark.is_some() {
            body = &body[1..];
        }
        if close_mark.is_some() && !body.is_empty() {
            body = &body[..body.len() - 1];
        }
        let body = body.trim();
        let replacement = match body {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.extend(open_mark);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.extend(close_mark);
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// A minijinja error with its whole cause chain (the template line is in the detail).
fn describe(e: &Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        msg.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    msg
}

/// `raise_exception(message)`: aborts rendering with the template's own message.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `x | tojson(ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let options = DumpOptions::from_kwargs(&kwargs)?;
    Ok(Value::from_safe_string(dumps(&value, &options)?))
}

/// `strftime_now(format)`: the current UTC time formatted like Python's `strftime`.
fn strftime_now(format: String) -> Result<String, Error> {
    strftime(&format, &DateTime::now_utc()).map_err(|e| Error::new(ErrorKind::InvalidOperation, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, messages: &[ChatMessage], gen: bool) -> Result<String> {
        let tokens = TemplateTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            pad_token: None,
        };
        ChatTemplate::compile(src)?.render(messages, gen, &tokens, &serde_json::Map::new())
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        // With trim_blocks the newline after a block tag goes; with lstrip_blocks the
        // indentation before it goes. So only the literal "  x\n" lines survive.
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n  U:{{ m.content }}\n    {% endif %}\n{% endfor %}\n";
        let out = render(src, &[ChatMessage::new("user", "hi")], false).unwrap();
        assert_eq!(out, "  U:hi\n");
    }

    #[test]
    fn special_tokens_and_absent_ones() {
        let src = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ pad_token is defined }}";
        let out = render(src, &[ChatMessage::new("user", "x")], false).unwrap();
        // Booleans print the Python way, as in Jinja2.
        assert_eq!(out, "<s>|</s>||False");
    }

    #[test]
    fn raise_exception_message_is_reported() {
        let src = "{% if messages[0].role != 'system' %}{{ raise_exception('System first!') }}{% endif %}";
        let err = render(src, &[ChatMessage::new("user", "x")], false).unwrap_err();
        assert!(format!("{err:#}").contains("System first!"), "{err:#}");
    }

    #[test]
    fn python_methods_loop_controls_and_namespace() {
        let src = "{%- set ns = namespace(n=0) -%}\
                   {%- for m in messages -%}\
                   {%- if m.content.startswith('skip') %}{% continue %}{% endif -%}\
                   {%- set ns.n = ns.n + 1 -%}\
                   [{{ m.content.strip().upper() }}]\
                   {%- endfor -%}\
                   {{ ns.n }}{{ messages[-1].content.split(',') | tojson }}";
        let msgs = [
            ChatMessage::new("user", "  a "),
            ChatMessage::new("user", "skip me"),
            ChatMessage::new("user", "b,c"),
        ];
        assert_eq!(
            render(src, &msgs, false).unwrap(),
            "[A][B,C]2[\"b\", \"c\"]"
        );
    }

    #[test]
    fn strftime_now_renders_a_date() {
        let out = render(
            "{{ strftime_now('%Y-%m-%d') }}",
            &[ChatMessage::new("u", "x")],
            false,
        )
        .unwrap();
        assert_eq!(out.len(), 10, "{out}");
        assert_eq!(&out[4..5], "-");
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = ChatTemplate::compile("line one\n{% if %}").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("chat_template:2"), "{msg}");
    }

    #[test]
    fn generation_blocks_render_their_body() {
        let src = "{% for m in messages %}{%- generation -%}\n  [{{ m.content }}]  \n{%- endgeneration %}\n{% endfor %}";
        let out = render(src, &[ChatMessage::new("assistant", "a")], false).unwrap();
        assert_eq!(out, "[a]");
        assert_eq!(
            rewrite_generation_tags("x{%- generation %}y{%endgeneration+%}z{% if a %}"),
            "x{%- if true %}y{% endif +%}z{% if a %}"
        );
    }

    #[test]
    fn empty_conversation_is_an_error() {
        assert!(render("x", &[], true).is_err());
    }
}
