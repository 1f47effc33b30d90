//! Hugging Face tokenizer.json via `tokenizers`, chat templates via `minijinja`.
//!
//! A [`Tokenizer`] is a Hugging Face tokenizer directory held in memory: the `tokenizers`
//! model of tokenizer.json plus the parts of tokenizer_config.json that matter here (the
//! chat template and the bos / eos / pad tokens). It reads and writes both files in the HF
//! schema, so a directory saved here loads in transformers' `AutoTokenizer` and vice versa.
//!
//! * [`Tokenizer::encode`] / [`Tokenizer::decode`] behave like transformers' fast tokenizers:
//!   special tokens written in the text become single ids, and `add_special_tokens` only
//!   controls what the post-processor adds (e.g. a BOS for Llama; nothing for Qwen2).
//! * [`Tokenizer::apply_chat_template`] renders the model's Jinja chat template as
//!   `apply_chat_template(messages, tokenize=False)` does. Encode its output with
//!   `add_special_tokens = false`, as transformers does.
//! * [`IncrementalDecoder`] decodes a growing completion with one short decode per token,
//!   independent of its length (for stop strings and streaming).
//! * [`train_byte_level_bpe`] builds a small Qwen2-like byte-level BPE tokenizer from a corpus
//!   (for tests, demos and models trained from scratch).

mod chat;
mod config;
mod prompt;
mod pyjson;
mod stream;
mod strftime;
mod train;

pub use chat::ChatMessage;
pub use prompt::Prompt;
pub use stream::IncrementalDecoder;
pub use train::{
    train_byte_level_bpe, train_byte_level_bpe_with, PreTokenizerStyle, CHATML_TEMPLATE,
};

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};

use chat::{ChatTemplate, TemplateTokens};
use config::{AddedTokenEntry, TokenizerConfig};

/// File names inside a tokenizer directory.
const TOKENIZER_FILE: &str = "tokenizer.json";
const CONFIG_FILE: &str = "tokenizer_config.json";
/// Recent transformers versions save the chat template here instead of in
/// tokenizer_config.json;
/// when present it takes precedence.
const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// A Hugging Face tokenizer: tokenizer.json plus tokenizer_config.json.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    config: TokenizerConfig,
    chat_template: Option<ChatTemplate>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
    /// Sorted, without duplicates.
    special_token_ids: Vec<u32>,
    /// One more than the largest id.
    vocab_size: usize,
    /// Extra variables of every chat-template rendering (transformers'
    /// `apply_chat_template(..., **kwargs)`, TRL's `chat_template_kwargs`), e.g. Qwen3's
    /// `enable_thinking`.
    template_kwargs: serde_json::Map<String, serde_json::Value>,
}

/// Parses chat-template variables given as JSON text (`--chat-template-kwargs`, the Python
/// package's `chat_template_kwargs`): a JSON object such as `{"enable_thinking": false}`.
/// Anything else (invalid JSON, an array, a string …) is an error saying what was found.
pub fn parse_chat_template_kwargs(
    json: &str,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| {
        anyhow!("not valid JSON ({e}); expected an object such as '{{\"enable_thinking\": false}}'")
    })?;
    let kind = match value {
        serde_json::Value::Object(map) => return Ok(map),
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
    };
    bail!(
        "expected a JSON object of template variables such as '{{\"enable_thinking\": false}}', \
         not {kind}"
    )
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_token", &self.config.bos_token)
            .field("eos_token", &self.config.eos_token)
            .field("pad_token", &self.config.pad_token)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face tokenizer directory: tokenizer.json (required),
    /// tokenizer_config.json and chat_template.jinja (optional). Errors name the file and,
    /// for tokenizer_config.json, the field.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        if !dir.exists() {
            bail!("tokenizer directory {} does not exist", dir.display());
        }
        if !dir.is_dir() {
            bail!(
                "{} is not a directory (expected a tokenizer directory holding {TOKENIZER_FILE})",
                dir.display()
            );
        }
        let tokenizer_path = dir.join(TOKENIZER_FILE);
        if !tokenizer_path.is_file() {
            bail!(
                "{} is not a Hugging Face tokenizer directory: {TOKENIZER_FILE} is missing",
                dir.display()
            );
        }
        let text = read_text(&tokenizer_path)?;
        let inner = tokenizers::Tokenizer::from_str(&text).map_err(|e| {
            anyhow!(
                "{}: not a valid Hugging Face tokenizer.json: {e}",
                tokenizer_path.display()
            )
        })?;

        let config_path = dir.join(CONFIG_FILE);
        let mut config = if config_path.is_file() {
            TokenizerConfig::parse(&read_text(&config_path)?, &config_path)?
        } else {
            TokenizerConfig::default()
        };
        let template_path = dir.join(CHAT_TEMPLATE_FILE);
        let mut template_origin = format!("{}: field `chat_template`", config_path.display());
        if template_path.is_file() {
            config.chat_template = Some(read_text(&template_path)?);
            template_origin = template_path.display().to_string();
        }
        Tokenizer::assemble(inner, config, &config_path, &template_origin)
    }

    /// Builds the tokenizer from its parts: registers the added tokens of the config that
    /// tokenizer.json lacks, resolves the special tokens to ids and compiles the template.
    /// `config_path` and `template_origin` only name things in errors.
    fn assemble(
        mut inner: tokenizers::Tokenizer,
        config: TokenizerConfig,
        config_path: &Path,
        template_origin: &str,
    ) -> Result<Tokenizer> {
        let file = config_path.display();
        // transformers sets padding and truncation per call; a tokenizer.json that enables
        // them would otherwise silently pad or cut every encoding.
        inner
            .with_truncation(None)
            .map_err(|e| anyhow!("disabling truncation: {e}"))?;
        inner.with_padding(None);

        for entry in &config.added_tokens {
            match inner.token_to_id(&entry.content) {
                Some(id) if id == entry.id => {}
                Some(id) => bail!(
                    "{file}: field `added_tokens_decoder`: token {:?} has id {} there but {id} in {TOKENIZER_FILE}",
                    entry.content,
                    entry.id
                ),
                None => {
                    let token = tokenizers::AddedToken::from(entry.content.clone(), entry.special)
                        .lstrip(entry.lstrip)
                        .rstrip(entry.rstrip)
                        .normalized(entry.normalized)
                        .single_word(entry.single_word);
                    inner.add_tokens(&[token]);
                    let got = inner.token_to_id(&entry.content);
                    if got != Some(entry.id) {
                        bail!(
                            "{file}: field `added_tokens_decoder`: token {:?} cannot take id {} (the next free id is {})",
                            entry.content,
                            entry.id,
                            got.map_or("unknown".to_string(), |g| g.to_string())
                        );
                    }
                }
            }
        }

        let resolve = |field: &str, token: &Option<String>| -> Result<Option<u32>> {
            match token {
                None => Ok(None),
                Some(t) => inner.token_to_id(t).map(Some).ok_or_else(|| {
                    anyhow!("{file}: field `{field}`: token {t:?} is not in the vocabulary of {TOKENIZER_FILE}")
                }),
            }
        };
        let bos_token_id = resolve("bos_token", &config.bos_token)?;
        let eos_token_id = resolve("eos_token", &config.eos_token)?;
        let pad_token_id = resolve("pad_token", &config.pad_token)?;

        let chat_template = match &config.chat_template {
            Some(source) => {
                Some(ChatTemplate::compile(source).with_context(|| template_origin.to_string())?)
            }
            None => None,
        };

        let added = inner.get_added_tokens_decoder();
        let mut special_token_ids: Vec<u32> = added
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .chain(bos_token_id)
            .chain(eos_token_id)
            .chain(pad_token_id)
            .collect();
        special_token_ids.sort_unstable();
        special_token_ids.dedup();

        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&id| id as usize + 1);

        Ok(Tokenizer {
            inner,
            config,
            chat_template,
            bos_token_id,
            eos_token_id,
            pad_token_id,
            special_token_ids,
            vocab_size,
            template_kwargs: serde_json::Map::new(),
        })
    }

    /// Writes tokenizer.json and tokenizer_config.json into `dir` (created if needed), each
    /// atomically (a temporary file renamed into place). Fields of a loaded
    /// tokenizer_config.json that this crate does not interpret are written back unchanged.
    /// A chat_template.jinja already in `dir` is replaced by this tokenizer's template (or
    /// removed if it has none) so it cannot override the one written in the config.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating directory {}", dir.display()))?;
        let tokenizer_json = self
            .inner
            .to_string(true)
            .map_err(|e| anyhow!("serializing {TOKENIZER_FILE}: {e}"))?;
        write_atomic(&dir.join(TOKENIZER_FILE), tokenizer_json.as_bytes())?;

        let mut config = self.config.clone();
        let mut added: Vec<(u32, tokenizers::AddedToken)> =
            self.inner.get_added_tokens_decoder().into_iter().collect();
        added.sort_by_key(|(id, _)| *id);
        config.added_tokens = added
            .into_iter()
            .map(|(id, t)| AddedTokenEntry {
                id,
                content: t.content,
                special: t.special,
                lstrip: t.lstrip,
                rstrip: t.rstrip,
                normalized: t.normalized,
                single_word: t.single_word,
            })
            .collect();
        let mut config_json = serde_json::to_string_pretty(&config.to_json_object())
            .context("serializing tokenizer_config.json")?;
        config_json.push('\n');
        write_atomic(&dir.join(CONFIG_FILE), config_json.as_bytes())?;

        let template_path = dir.join(CHAT_TEMPLATE_FILE);
        if template_path.exists() {
            match &self.chat_template {
                Some(t) => write_atomic(&template_path, t.source().as_bytes())?,
                None => std::fs::remove_file(&template_path)
                    .with_context(|| format!("removing {}", template_path.display()))?,
            }
        }
        Ok(())
    }

    /// Token ids of `text`. Special tokens written in the text (e.g. `<|im_end|>`) become
    /// their single ids; `add_special_tokens` adds what the tokenizer's post-processor adds
    /// (nothing for Qwen2, a BOS for Llama).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| anyhow!("encoding text: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`; with `skip_special_tokens` the special tokens are left out. Ids
    /// outside the vocabulary (e.g. in a model's padded embedding rows) are skipped, as in
    /// Hugging Face `tokenizers`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("decoding {} token ids: {e}", ids.len()))
    }

    /// The id of `token` (a vocabulary entry or an added token), if it has one.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The string of token `id`, if it is in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// One more than the largest token id, added tokens included: the number of rows an
    /// embedding table needs at least (Qwen2.5: 151,665; its models pad to 151,936).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Id of the `bos_token` of tokenizer_config.json.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// Id of the `eos_token` of tokenizer_config.json.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    /// Id of the `pad_token` of tokenizer_config.json.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token_id
    }

    /// Ids of the added tokens marked special, plus bos / eos / pad; sorted, no duplicates.
    pub fn special_token_ids(&self) -> Vec<u32> {
        self.special_token_ids.clone()
    }

    /// Whether the tokenizer has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The chat template's source text, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_ref().map(ChatTemplate::source)
    }

    /// Renders `messages` with the chat template, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`. Encode the
    /// result with `add_special_tokens = false`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.apply_chat_template_with(messages, add_generation_prompt, &self.template_kwargs)
    }

    /// The variables every rendering of the chat template gets besides the conversation (see
    /// [`Self::set_chat_template_kwargs`]).
    pub fn chat_template_kwargs(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.template_kwargs
    }

    /// Sets extra template variables for every later rendering (and so for
    /// [`Self::encode_prompt`]), as transformers' `apply_chat_template(..., **kwargs)`: e.g.
    /// `{"enable_thinking": false}` for Qwen3, whose template then closes an empty
    /// `<think></think>` block after the generation prompt.
    pub fn set_chat_template_kwargs(&mut self, kwargs: serde_json::Map<String, serde_json::Value>) {
        self.template_kwargs = kwargs;
    }

    /// The tokenizer with `kwargs` as its template variables ([`Self::set_chat_template_kwargs`]);
    /// `None` leaves them as they are.
    pub fn with_chat_template_kwargs(
        mut self,
        kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Self {
        if let Some(kwargs) = kwargs {
            self.template_kwargs = kwargs;
        }
        self
    }

    /// [`Self::apply_chat_template`] with the template variables `kwargs` (they override the
    /// special-token variables of the same name, as in transformers).
    pub fn apply_chat_template_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let Some(template) = &self.chat_template else {
            bail!("this tokenizer has no chat template (tokenizer_config.json has no `chat_template`)");
        };
        let tokens = TemplateTokens {
            bos_token: self.config.bos_token.clone(),
            eos_token: self.config.eos_token.clone(),
            pad_token: self.config.pad_token.clone(),
        };
        template.render(messages, add_generation_prompt, &tokens, kwargs)
    }

    /// [`Self::apply_chat_template`] for JSON messages (assistant `tool_calls`, `tool`
    /// messages) and function schemas `tools`, as transformers'
    /// `apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=...)`.
    /// serde_json objects keep their keys sorted, so schemas render in sorted key order. The
    /// run's template variables ([`Self::set_chat_template_kwargs`]) apply.
    pub fn apply_chat_template_json(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(template) = &self.chat_template else {
            bail!("this tokenizer has no chat template (tokenizer_config.json has no `chat_template`)");
        };
        let tokens = TemplateTokens {
            bos_token: self.config.bos_token.clone(),
            eos_token: self.config.eos_token.clone(),
            pad_token: self.config.pad_token.clone(),
        };
        template.render_json(
            messages,
            tools,
            add_generation_prompt,
            &tokens,
            &self.template_kwargs,
        )
    }

    /// Token ids of a dataset prompt: raw text as is, chat messages through the chat template
    /// with the generation prompt appended. No special tokens are added beyond the template's.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Text(text) => self.encode(text, false),
            Prompt::Chat(messages) => {
                self.encode(&self.apply_chat_template(messages, true)?, false)
            }
        }
    }

    /// Replaces the chat template (`None` removes it); a template that does not compile is
    /// an error and leaves the tokenizer unchanged.
    pub fn set_chat_template(&mut self, source: Option<&str>) -> Result<()> {
        self.chat_template = source.map(ChatTemplate::compile).transpose()?;
        self.config.chat_template = source.map(str::to_string);
        Ok(())
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`, so that
/// `path` holds either the old or the new content, never a part.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp: PathBuf = path.with_file_name(tmp_name);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests;
