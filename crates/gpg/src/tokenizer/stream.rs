//! Incremental detokenization: text that grows by one token at a time, for stop strings and
//! streaming output.
//!
//! Decoding token by token and concatenating is wrong for two reasons: a byte-level token
//! may hold only part of a UTF-8 character (an emoji spans several tokens), and some decoders
//! (SentencePiece's Metaspace) drop a leading space when a token is decoded alone. So each
//! step decodes a short window `context ++ pending` and emits
//!
//! ```text
//!   piece = decode(context ++ pending) − decode(context)      (a string suffix)
//! ```
//!
//! once it does not end in U+FFFD (an unfinished character); `pending` then becomes the next
//! `context`. For byte-level BPE the concatenated pieces equal `decode(all ids)`.
//! Each step costs one decode of a few tokens, independent of the sequence length.

use anyhow::{bail, Result};

use super::Tokenizer;

/// Turns token ids, pushed one at a time, into text. See the module documentation.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    skip_special_tokens: bool,
    /// `context ++ pending`: the last emitted group of ids, then the ids not yet emitted.
    window: Vec<u32>,
    /// Number of context ids at the start of `window`.
    context_len: usize,
    /// `decode(context)`.
    context_text: String,
    /// Everything emitted so far.
    text: String,
    /// Number of ids pushed.
    len: usize,
}

impl IncrementalDecoder {
    /// An empty decoder; `skip_special_tokens` as in [`Tokenizer::decode`].
    pub fn new(skip_special_tokens: bool) -> IncrementalDecoder {
        IncrementalDecoder {
            skip_special_tokens,
            window: Vec::new(),
            context_len: 0,
            context_text: String::new(),
            text: String::new(),
            len: 0,
        }
    }

    /// Appends `id` and returns the text that became final with it (often empty while a
    /// multi-byte character is incomplete, sometimes several characters at once).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<&str> {
        self.window.push(id);
        self.len += 1;
        let full = tokenizer.decode(&self.window, self.skip_special_tokens)?;
        let start = self.text.len();
        if full.len() > self.context_text.len() && !full.ends_with('\u{FFFD}') {
            self.emit(tokenizer, &full)?;
        }
        Ok(&self.text[start..])
    }

    /// Emits whatever is still held back (an unfinished character becomes U+FFFD, as in
    /// [`Tokenizer::decode`]) and returns it.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<&str> {
        let start = self.text.len();
        if self.window.len() > self.context_len {
            let full = tokenizer.decode(&self.window, self.skip_special_tokens)?;
            self.emit(tokenizer, &full)?;
        }
        Ok(&self.text[start..])
    }

    /// Appends `decode(window) − decode(context)` to the text; the pending ids become the
    /// context.
    fn emit(&mut self, tokenizer: &Tokenizer, full: &str) -> Result<()> {
        let Some(piece) = full.strip_prefix(self.context_text.as_str()) else {
            bail!(
                "incremental decoding: the decoder output {full:?} does not extend {:?}",
                self.context_text
            );
        };
        self.text.push_str(piece);
        self.window.drain(..self.context_len);
        self.context_len = self.window.len();
        self.context_text = tokenizer.decode(&self.window, self.skip_special_tokens)?;
        Ok(())
    }

    /// All text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Number of ids pushed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no id has been pushed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
