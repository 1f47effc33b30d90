//! A small Qwen2-like byte-level BPE tokenizer trained on a caller's corpus.
//!
//! Layout of the vocabulary (as in Qwen2 / GPT-2):
//!
//! ```text
//!   ids 0..256                 the 256 bytes, as GPT-2's printable byte characters, in
//!                              code-point order ("!" = 0 … "Ā".."Ń" for the unprintable bytes)
//!   ids 256..vocab_size-3      merges, in the order the BPE trainer learned them
//!   ids vocab_size-3..         <|endoftext|>, <|im_start|>, <|im_end|>  (special)
//! ```
//!
//! The pipeline is Qwen2's, so that transformers' `Qwen2Tokenizer` (which `AutoTokenizer`
//! picks for every `model_type = "qwen2"` directory and which imposes this pipeline) splits
//! text exactly as tokenizer.json does: normalizer NFC; pre-tokenizer the Qwen2 regex split
//! (single digits, letters with one leading non-letter, punctuation runs, whitespace) then
//! ByteLevel without its own regex; decoder ByteLevel; no unknown token, so every NFC string
//! round-trips exactly. Training is
//! deterministic: the trainer breaks count ties by the (sorted) pair ids, so the same corpus
//! gives a byte-identical tokenizer.json.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::config::TokenizerConfig;
use super::Tokenizer;

/// ChatML, the conversation format of Qwen2 (without Qwen's default system message):
///
/// ```text
/// <|im_start|>{role}\n{content}<|im_end|>\n        for each message
/// <|im_start|>assistant\n                          if add_generation_prompt
/// ```
pub const CHATML_TEMPLATE: &str = "{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
";

/// The special tokens, in id order after the merges.
const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const END_OF_TEXT: &str = "<|endoftext|>";
const BYTE_TOKENS: usize = 256;

/// Qwen2's pre-tokenization pattern (transformers' `PRETOKENIZE_REGEX`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Qwen2 split, then the byte-to-character mapping of ByteLevel (no regex of its own).
fn qwen2_pre_tokenizer() -> Result<PreTokenizerWrapper> {
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| anyhow!("the Qwen2 split pattern: {e}"))?;
    Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])))
}

/// Trains a byte-level BPE tokenizer on `corpus` with at most `vocab_size` tokens in all
/// (256 bytes + merges + 3 special tokens). Only pairs seen at least twice are merged, so a
/// small corpus may give fewer; size the model by [`Tokenizer::vocab_size`].
/// eos and pad are `<|endoftext|>`, there is no bos, and the chat template is
/// [`CHATML_TEMPLATE`].
pub fn train_byte_level_bpe(corpus: &[String], vocab_size: usize) -> Result<Tokenizer> {
    train_byte_level_bpe_with(corpus, vocab_size, PreTokenizerStyle::Qwen2)
}

/// How text is split before BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreTokenizerStyle {
    /// Qwen2's pipeline (NFC, the Qwen2 regex: single digits): what transformers'
    /// `Qwen2Tokenizer` applies, so both sides agree.
    #[default]
    Qwen2,
    /// GPT-2's ByteLevel regex split (digit runs kept together), no normalizer. Load such a
    /// tokenizer in transformers with `PreTrainedTokenizerFast`, not `AutoTokenizer`.
    Gpt2,
}

/// [`train_byte_level_bpe`] with a choice of pre-tokenizer.
pub fn train_byte_level_bpe_with(
    corpus: &[String],
    vocab_size: usize,
    style: PreTokenizerStyle,
) -> Result<Tokenizer> {
    let min = BYTE_TOKENS + SPECIAL_TOKENS.len();
    if vocab_size < min {
        bail!("vocab_size {vocab_size} is too small: a byte-level BPE needs at least {min} (256 bytes + 3 special tokens)");
    }
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size - SPECIAL_TOKENS.len())
        .min_frequency(2)
        .initial_alphabet(alphabet)
        .build();
    let mut trainer = TrainerWrapper::from(trainer);

    let mut inner = tokenizers::Tokenizer::new(BPE::default());
    match style {
        PreTokenizerStyle::Qwen2 => {
            inner
                .with_normalizer(Some(NFC))
                .with_pre_tokenizer(Some(qwen2_pre_tokenizer()?));
        }
        PreTokenizerStyle::Gpt2 => {
            inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
    }
    inner
        .with_post_processor(Some(ByteLevel::new(false, false, true)))
        .with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
    inner
        .train(&mut trainer, corpus.iter())
        .map_err(|e| anyhow!("training the BPE model: {e}"))?;
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    inner.add_special_tokens(&specials);

    let config = TokenizerConfig {
        chat_template: Some(CHATML_TEMPLATE.to_string()),
        bos_token: None,
        eos_token: Some(END_OF_TEXT.to_string()),
        pad_token: Some(END_OF_TEXT.to_string()),
        added_tokens: Vec::new(),
        raw: base_config(),
    };
    Tokenizer::assemble(
        inner,
        config,
        Path::new("tokenizer_config.json"),
        "CHATML_TEMPLATE",
    )
}

/// The tokenizer_config.json fields, besides those `Tokenizer` manages, that make
/// transformers load the directory as a plain fast tokenizer over tokenizer.json.
fn base_config() -> serde_json::Map<String, Value> {
    let mut raw = serde_json::Map::new();
    raw.insert(
        "tokenizer_class".into(),
        Value::from("PreTrainedTokenizerFast"),
    );
    raw.insert("clean_up_tokenization_spaces".into(), Value::from(false));
    raw.insert("split_special_tokens".into(), Value::from(false));
    raw.insert("unk_token".into(), Value::Null);
    raw.insert(
        "additional_special_tokens".into(),
        Value::from(vec!["<|im_start|>", "<|im_end|>"]),
    );
    raw
}
