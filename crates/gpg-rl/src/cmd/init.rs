//! `gpg-rl init`: a randomly initialised model in Hugging Face format (Qwen2 by default;
//! `--family qwen3` or `llama` for those architectures), with a small byte-level BPE tokenizer
//! and a ChatML chat template trained on a built-in corpus (or `--corpus FILE`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use gpg::candle_core::{DType, Device};
use gpg::model::config::ModelFamily;
use gpg::model::{Qwen2, Qwen2Config};
use gpg::tokenizer::{train_byte_level_bpe_with, PreTokenizerStyle, Tokenizer};

#[derive(Args, Clone)]
pub struct InitArgs {
    /// Output directory (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Architecture (config.json `model_type`): qwen2 (q/k/v biases), qwen3 (QK-norm, no
    /// biases) or llama (Llama 3: no biases). The tokenizer and its ChatML chat template are
    /// the same for every family.
    #[arg(long, value_enum, default_value_t = FamilyArg::Qwen2)]
    pub family: FamilyArg,
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 1024)]
    pub intermediate: usize,
    /// Vocabulary size of the model; the tokenizer is trained up to this size.
    #[arg(long, default_value_t = 4096)]
    pub vocab: usize,
    #[arg(long, default_value_t = 4096)]
    pub max_positions: usize,
    #[arg(long, default_value_t = 1e6)]
    pub rope_theta: f64,
    #[arg(long, default_value_t = 1e-6)]
    pub rms_norm_eps: f64,
    /// Separate output head instead of sharing the embedding matrix.
    #[arg(long)]
    pub untied: bool,
    /// Standard deviation of the initial weights (transformers uses 0.02).
    #[arg(long, default_value_t = 0.02)]
    pub init_std: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = StorageDtype::F32)]
    pub dtype: StorageDtype,
    /// Text file to train the tokenizer on (one document per line), or `synthetic` for the
    /// built-in arithmetic task's texts; default: a small built-in English/arithmetic corpus.
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// How the tokenizer splits text before BPE: `qwen2` (single digits; what transformers'
    /// Qwen2Tokenizer does) or `gpt2` (digit runs kept together; load it in transformers with
    /// PreTrainedTokenizerFast). The committed demo model uses `gpt2`.
    #[arg(long, value_enum, default_value_t = PreTokenizerArg::Qwen2)]
    pub pre_tokenizer: PreTokenizerArg,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FamilyArg {
    Qwen2,
    Qwen3,
    Llama,
}

impl FamilyArg {
    fn family(self) -> ModelFamily {
        match self {
            FamilyArg::Qwen2 => ModelFamily::Qwen2,
            FamilyArg::Qwen3 => ModelFamily::Qwen3,
            FamilyArg::Llama => ModelFamily::Llama,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PreTokenizerArg {
    Qwen2,
    Gpt2,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum StorageDtype {
    F32,
    Bf16,
    F16,
}

impl StorageDtype {
    fn dtype(self) -> DType {
        match self {
            StorageDtype::F32 => DType::F32,
            StorageDtype::Bf16 => DType::BF16,
            StorageDtype::F16 => DType::F16,
        }
    }
}

pub fn run(args: &InitArgs) -> Result<()> {
    write_model(args)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// Writes the model and tokenizer described by `args`; returns the model.
pub fn write_model(args: &InitArgs) -> Result<Qwen2> {
    let corpus = match &args.corpus {
        Some(path) if path.as_os_str() == "synthetic" => synthetic_corpus()?,
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read corpus", path.display()))?
            .lines()
            .map(str::to_string)
            .collect(),
        None => builtin_corpus(),
    };
    let style = match args.pre_tokenizer {
        PreTokenizerArg::Qwen2 => PreTokenizerStyle::Qwen2,
        PreTokenizerArg::Gpt2 => PreTokenizerStyle::Gpt2,
    };
    let tokenizer = train_byte_level_bpe_with(&corpus, args.vocab, style)?;
    let tokenizer_vocab = tokenizer.vocab_size();
    anyhow::ensure!(
        tokenizer_vocab <= args.vocab,
        "the tokenizer has {tokenizer_vocab} tokens, more than --vocab {}",
        args.vocab
    );
    let eos = tokenizer
        .eos_token_id()
        .context("the trained tokenizer has no EOS token")?;
    let config = Qwen2Config {
        vocab_size: args.vocab,
        hidden_size: args.hidden,
        intermediate_size: args.intermediate,
        num_hidden_layers: args.layers,
        num_attention_heads: args.heads,
        num_key_value_heads: Some(args.kv_heads),
        head_dim: None,
        max_position_embeddings: args.max_positions,
        rope_theta: Some(args.rope_theta),
        rope_parameters: None,
        rms_norm_eps: args.rms_norm_eps,
        tie_word_embeddings: !args.untied,
        hidden_act: "silu".into(),
        bos_token_id: Some(eos),
        eos_token_id: Some(gpg::model::config::TokenIds::One(eos)),
        rope_scaling: None,
        use_sliding_window: false,
        // The family is read from `model_type` (QK-norm weights for qwen3; no biases for
        // qwen3 and llama).
        extra: [(
            "model_type".to_string(),
            serde_json::Value::from(args.family.family().model_type()),
        )]
        .into_iter()
        .collect(),
    };
    let model = Qwen2::random(config, args.init_std, args.seed, &Device::Cpu)?;
    save_with_tokenizer(&model, &tokenizer, &args.out, args.dtype.dtype())?;
    Ok(model)
}

/// Writes model, tokenizer and generation_config.json into `dir`.
pub fn save_with_tokenizer(
    model: &Qwen2,
    tokenizer: &Tokenizer,
    dir: &Path,
    dtype: DType,
) -> Result<()> {
    model.save_pretrained_as(dir, dtype)?;
    tokenizer.save_pretrained(dir)?;
    let mut eos = vec![];
    eos.extend(tokenizer.eos_token_id());
    eos.extend(tokenizer.token_to_id("<|im_end|>"));
    let generation = serde_json::json!({
        "bos_token_id": tokenizer.eos_token_id(),
        "eos_token_id": eos,
    });
    gpg::model::weights::write_atomic(
        &dir.join("generation_config.json"),
        serde_json::to_string_pretty(&generation)?.as_bytes(),
    )
}

/// A small built-in corpus of English, arithmetic and pseudo-English text (a fixed-seed
/// lexicon of made-up words with Zipf-like frequencies), enough for a byte-level BPE of 4096
/// tokens or more.
pub fn builtin_corpus() -> Vec<String> {
    let mut corpus: Vec<String> = [
        "The quick brown fox jumps over the lazy dog.",
        "Let's think step by step and put the final answer in \\boxed{}.",
        "Solve the equation for x. First, subtract 3 from both sides. Then divide by 2.",
        "The answer is 42. Therefore the result is \\boxed{42}.",
        "A train travels 60 miles per hour for 3 hours. How far does it travel?",
        "We compute the sum, the difference, the product and the quotient of two numbers.",
        "<think> reasoning goes here </think> <answer> 7 </answer>",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for a in 0..100u32 {
        for b in (0..100u32).step_by(7) {
            corpus.push(format!("Compute {a}+{b}= {}", a + b));
            corpus.push(format!(
                "{a} * {b} = {}, so {a} - {b} = {}",
                a * b,
                a as i64 - b as i64
            ));
        }
    }
    corpus.extend(pseudo_english(4000, 0));
    corpus
}

/// `sentences` lines of made-up words (onset + vowel + coda syllables) drawn from a lexicon
/// of 6,000 with probability ∝ 1/rank, from a fixed seed.
fn pseudo_english(sentences: usize, seed: u64) -> Vec<String> {
    use rand::{Rng, SeedableRng};
    const ONSETS: [&str; 21] = [
        "", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st",
        "tr", "ch", "sh",
    ];
    const VOWELS: [&str; 8] = ["a", "e", "i", "o", "u", "ai", "ou", "ea"];
    const CODAS: [&str; 9] = ["", "", "n", "r", "s", "t", "l", "nd", "ng"];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let lexicon: Vec<String> = (0..6000)
        .map(|_| {
            (0..rng.gen_range(1..=3))
                .map(|_| {
                    format!(
                        "{}{}{}",
                        ONSETS[rng.gen_range(0..ONSETS.len())],
                        VOWELS[rng.gen_range(0..VOWELS.len())],
                        CODAS[rng.gen_range(0..CODAS.len())]
                    )
                })
                .collect()
        })
        .collect();
    // Inverse-CDF draws from p(rank) ∝ 1/(rank + 1).
    let cdf: Vec<f64> = lexicon
        .iter()
        .enumerate()
        .scan(0.0, |acc, (i, _)| {
            *acc += 1.0 / (i + 1) as f64;
            Some(*acc)
        })
        .collect();
    let total = cdf[cdf.len() - 1];
    (0..sentences)
        .map(|_| {
            let words: Vec<&str> = (0..rng.gen_range(6..16))
                .map(|_| {
                    let u = rng.gen::<f64>() * total;
                    &lexicon[cdf.partition_point(|&c| c < u).min(lexicon.len() - 1)][..]
                })
                .collect();
            let mut line = words.join(" ");
            line.push('.');
            line
        })
        .collect()
}

/// Questions and worked solutions of the built-in arithmetic task (all difficulty levels).
fn synthetic_corpus() -> Result<Vec<String>> {
    use gpg::data::synthetic;
    let mut corpus = Vec::new();
    for level in 1..=4 {
        let split =
            synthetic::generate_split(&synthetic::SyntheticConfig::level(level)?, 7, 2000, 0)?;
        corpus.extend(synthetic::corpus(&split.train));
    }
    Ok(corpus)
}
