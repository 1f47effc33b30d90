//! Tests of the tokenizer module on a byte-level BPE trained here and on Qwen2.5's real chat
//! template.

use super::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

/// Qwen2.5-Instruct's chat_template, verbatim from its tokenizer_config.json.
const QWEN25_TEMPLATE: &str = include_str!("testdata/qwen2.5-instruct.chat_template.jinja");

fn corpus() -> Vec<String> {
    let base = [
        "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
        "Answer: Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May. The answer is \\boxed{72}.",
        "Let x be the number of apples. Then 3x + 5 = 20, so 3x = 15 and x = 5.",
        "The sum of the first n positive integers is n(n+1)/2. For n = 10 the sum is 55.",
        "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
        "Please reason step by step, and put your final answer within \\boxed{}.",
        "Wir rechnen: 7 × 8 = 56. Ça fait cinquante-six. 七乘八等于五十六。",
    ];
    (0..4)
        .flat_map(|i| base.iter().map(move |s| format!("{s} (copy {i})")))
        .collect()
}

/// `text` in Unicode normal form C, which the trained tokenizer's normalizer (Qwen2's)
/// applies before splitting: decode(encode(text)) == nfc(text).
fn nfc(text: &str) -> String {
    use tokenizers::{NormalizedString, Normalizer};
    let mut n = NormalizedString::from(text);
    tokenizers::normalizers::unicode::NFC
        .normalize(&mut n)
        .unwrap();
    n.get().to_string()
}

fn trained(vocab_size: usize) -> Tokenizer {
    train_byte_level_bpe(&corpus(), vocab_size).unwrap()
}

/// Texts that exercise every byte class: ASCII, whitespace runs, accents (NFC and NFD),
/// CJK, emoji with joiners and skin tones, control characters, text unlike the corpus.
fn tricky_texts() -> Vec<String> {
    [
        "",
        " ",
        "\n\n",
        "Hello, world!",
        "  leading and trailing spaces  ",
        "tabs\tand\r\nCRLF\n\n\nnewlines",
        "Natalia sold 48/2 = 24 clips",
        "café vs cafe\u{301} (NFC vs NFD)",
        "数学题：七乘八等于多少？",
        "emoji 😀👍🏽 family 👨\u{200d}👩\u{200d}👧 flag 🇫🇷",
        "control \u{0}\u{1}\u{7f} and BOM \u{feff}",
        "\\boxed{\\frac{1}{2}} $x^2 + y^2 = z^2$",
        "zzzzqqqq unseen-words ÆØÅ ŁŹŻ ∑∫∂ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn trained_tokenizer_layout_matches_qwen2() {
    let tk = trained(400);
    // Bytes first, in GPT-2 printable-character code-point order.
    assert_eq!(tk.token_to_id("!"), Some(0));
    assert_eq!(tk.token_to_id("~"), Some(93));
    assert_eq!(tk.token_to_id("Ā"), Some(188)); // byte 0x00
    assert_eq!(tk.token_to_id("Ġ"), Some(220)); // the space byte, as in GPT-2 / Qwen2
                                                // Merges were learned (the corpus has many " the", "Natalia" …) and fill the vocab.
    assert_eq!(tk.vocab_size(), 400);
    let eot = tk.token_to_id("<|endoftext|>").unwrap();
    let im_start = tk.token_to_id("<|im_start|>").unwrap();
    let im_end = tk.token_to_id("<|im_end|>").unwrap();
    assert_eq!((eot, im_start, im_end), (397, 398, 399));
    assert_eq!(tk.eos_token_id(), Some(eot));
    assert_eq!(tk.pad_token_id(), Some(eot));
    assert_eq!(tk.bos_token_id(), None);
    assert_eq!(tk.special_token_ids(), vec![eot, im_start, im_end]);
    assert!(tk.has_chat_template());
    assert_eq!(tk.chat_template(), Some(CHATML_TEMPLATE));
    // Merges shorten text from the corpus well below one token per byte.
    let text = "Natalia sold 48 clips in April and May.";
    assert!(tk.encode(text, false).unwrap().len() < text.len() / 2);
}

#[test]
fn training_is_deterministic() {
    let a = trained(420).inner.to_string(false).unwrap();
    let b = trained(420).inner.to_string(false).unwrap();
    assert_eq!(a, b);
    // And does not depend on the order of the corpus lines.
    let mut reversed = corpus();
    reversed.reverse();
    let c = train_byte_level_bpe(&reversed, 420)
        .unwrap()
        .inner
        .to_string(false)
        .unwrap();
    assert_eq!(a, c);
}

#[test]
fn vocab_size_bounds() {
    let err = train_byte_level_bpe(&corpus(), 258).unwrap_err();
    assert!(err.to_string().contains("at least 259"), "{err}");
    // An empty corpus yields bytes + specials only.
    let tk = train_byte_level_bpe(&[], 1000).unwrap();
    assert_eq!(tk.vocab_size(), 259);
    // A corpus too small for the requested size stops early, never overshoots.
    let tk = trained(100_000);
    assert!(tk.vocab_size() < 100_000 && tk.vocab_size() > 259);
}

#[test]
fn byte_level_round_trips_any_utf8() {
    let tk = trained(400);
    for text in tricky_texts() {
        let ids = tk.encode(&text, false).unwrap();
        assert_eq!(tk.decode(&ids, false).unwrap(), nfc(&text), "ids {ids:?}");
        assert_eq!(tk.decode(&ids, true).unwrap(), nfc(&text));
    }
    // Random strings over all of Unicode's scalar values.
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..200 {
        let len = rng.gen_range(0..40);
        let text: String = (0..len)
            .map(|_| loop {
                let cp = if rng.gen_bool(0.5) {
                    rng.gen_range(0..0x80)
                } else {
                    rng.gen_range(0..0x11_0000)
                };
                if let Some(c) = char::from_u32(cp) {
                    break c;
                }
            })
            .collect();
        let ids = tk.encode(&text, false).unwrap();
        assert_eq!(tk.decode(&ids, false).unwrap(), nfc(&text));
    }
    // "\n\n" is two newline bytes: "Ċ" is byte 0x0A.
    let nl = tk.token_to_id("Ċ").unwrap();
    let ids = tk.encode("\n\n", false).unwrap();
    assert!(ids == vec![nl, nl] || ids == vec![tk.token_to_id("ĊĊ").unwrap()]);
}

#[test]
fn special_tokens_in_text_are_single_ids() {
    let tk = trained(400);
    let im_start = tk.token_to_id("<|im_start|>").unwrap();
    let im_end = tk.token_to_id("<|im_end|>").unwrap();
    let eot = tk.token_to_id("<|endoftext|>").unwrap();
    let text = "<|im_start|>user\nWhat is 7 × 8?<|im_end|>\n<|endoftext|>";
    let ids = tk.encode(text, false).unwrap();
    assert_eq!(ids[0], im_start);
    assert_eq!(*ids.last().unwrap(), eot);
    assert_eq!(ids.iter().filter(|&&i| i == im_end).count(), 1);
    // The parts between special tokens encode as they would alone.
    let body = tk.encode("user\nWhat is 7 × 8?", false).unwrap();
    assert_eq!(&ids[1..1 + body.len()], &body[..]);
    assert_eq!(tk.decode(&ids, false).unwrap(), text);
    assert_eq!(tk.decode(&ids, true).unwrap(), "user\nWhat is 7 × 8?\n");
    // A partial special token is plain text.
    let partial = tk.encode("<|im_start", false).unwrap();
    assert!(!partial.contains(&im_start));
}

#[test]
fn add_special_tokens_follows_the_post_processor() {
    let tk = trained(400);
    let text = "Hello world";
    // Qwen-like: the ByteLevel post-processor adds nothing.
    assert_eq!(
        tk.encode(text, true).unwrap(),
        tk.encode(text, false).unwrap()
    );

    // A Llama-like tokenizer.json whose TemplateProcessing prepends a BOS.
    let dir = tempfile::tempdir().unwrap();
    tk.save_pretrained(dir.path()).unwrap();
    let path = dir.path().join("tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let bos = tk.token_to_id("<|im_start|>").unwrap();
    json["post_processor"] = json!({
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}}
        ],
        "pair": [
            {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}}
        ],
        "special_tokens": {
            "<|im_start|>": {"id": "<|im_start|>", "ids": [bos], "tokens": ["<|im_start|>"]}
        }
    });
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    let llama_like = Tokenizer::from_dir(dir.path()).unwrap();
    let plain = llama_like.encode(text, false).unwrap();
    let with = llama_like.encode(text, true).unwrap();
    assert_eq!(with[0], bos);
    assert_eq!(&with[1..], &plain[..]);
    assert_eq!(plain, tk.encode(text, false).unwrap());
}

/// A directory like Qwen2.5-Instruct's: our byte-level tokenizer.json, Qwen's
/// tokenizer_config.json fields and its chat template.
fn qwen_like_dir() -> tempfile::TempDir {
    let tk = trained(400);
    let dir = tempfile::tempdir().unwrap();
    tk.save_pretrained(dir.path()).unwrap();
    let config = json!({
        "add_prefix_space": false,
        "added_tokens_decoder": {
            "397": {"content": "<|endoftext|>", "lstrip": false, "normalized": false,
                    "rstrip": false, "single_word": false, "special": true},
            "398": {"content": "<|im_start|>", "lstrip": false, "normalized": false,
                    "rstrip": false, "single_word": false, "special": true},
            "399": {"content": "<|im_end|>", "lstrip": false, "normalized": false,
                    "rstrip": false, "single_word": false, "special": true}
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": null,
        "chat_template": QWEN25_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": false,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": null
    });
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    dir
}

#[test]
fn qwen25_chat_template_system_and_user() {
    let dir = qwen_like_dir();
    let tk = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tk.eos_token_id(), tk.token_to_id("<|im_end|>"));
    assert_eq!(tk.pad_token_id(), tk.token_to_id("<|endoftext|>"));
    let messages = [
        ChatMessage::new(
            "system",
            "Please reason step by step, and put your final answer within \\boxed{}.",
        ),
        ChatMessage::new("user", "What is 1+1?"),
    ];
    // Hand-derived from the template: no tools, so the else branch writes the system turn;
    // the loop skips the first (system) message and writes the user turn; then the prompt.
    let want = "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n\
                <|im_start|>user\nWhat is 1+1?<|im_end|>\n\
                <|im_start|>assistant\n";
    assert_eq!(tk.apply_chat_template(&messages, true).unwrap(), want);
    let without_prompt = tk.apply_chat_template(&messages, false).unwrap();
    assert_eq!(
        without_prompt,
        want.strip_suffix("<|im_start|>assistant\n").unwrap()
    );

    // The rendered prompt tokenizes with each marker as one special id.
    let ids = tk.encode(want, false).unwrap();
    let im_start = tk.token_to_id("<|im_start|>").unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == im_start).count(), 3);
    assert_eq!(tk.decode(&ids, false).unwrap(), want);
}

#[test]
fn qwen25_chat_template_default_system_and_multi_turn() {
    let dir = qwen_like_dir();
    let tk = Tokenizer::from_dir(dir.path()).unwrap();
    let messages = [ChatMessage::new("user", "Hi")];
    assert_eq!(
        tk.apply_chat_template(&messages, true).unwrap(),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    let messages = [
        ChatMessage::new("user", "1+1?"),
        ChatMessage::new("assistant", "2"),
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "2+2?"),
    ];
    // A later system message is written in the loop like any turn.
    assert_eq!(
        tk.apply_chat_template(&messages, false).unwrap(),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\n1+1?<|im_end|>\n\
         <|im_start|>assistant\n2<|im_end|>\n\
         <|im_start|>system\nBe brief.<|im_end|>\n\
         <|im_start|>user\n2+2?<|im_end|>\n"
    );
}

#[test]
fn chatml_template_of_trained_tokenizer() {
    let tk = trained(400);
    let messages = [
        ChatMessage::new("system", "S"),
        ChatMessage::new("user", "U"),
        ChatMessage::new("assistant", "A"),
    ];
    assert_eq!(
        tk.apply_chat_template(&messages, false).unwrap(),
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    );
    assert_eq!(
        tk.apply_chat_template(&messages[1..2], true).unwrap(),
        "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn chat_template_sources_list_form_and_jinja_file() {
    let dir = qwen_like_dir();
    let config_path = dir.path().join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["chat_template"] = json!([
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ messages[0].content }}!"}
    ]);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let msg = [ChatMessage::new("user", "x")];
    let tk = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tk.apply_chat_template(&msg, false).unwrap(), "x!");

    // chat_template.jinja takes precedence over tokenizer_config.json.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "[{{ messages[0].content }}]\n",
    )
    .unwrap();
    let tk = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tk.apply_chat_template(&msg, false).unwrap(), "[x]");

    // A template that does not compile is reported with its file.
    std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").unwrap();
    let err = format!("{:#}", Tokenizer::from_dir(dir.path()).unwrap_err());
    assert!(err.contains("chat_template.jinja"), "{err}");

    // Without a template, rendering is an error.
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    config.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let tk = Tokenizer::from_dir(dir.path()).unwrap();
    assert!(!tk.has_chat_template());
    assert!(tk.apply_chat_template(&msg, false).is_err());
}

#[test]
fn loading_errors_name_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = format!("{:#}", Tokenizer::from_dir(&missing).unwrap_err());
    assert!(
        err.contains("does not exist") && err.contains("nope"),
        "{err}"
    );

    let err = format!("{:#}", Tokenizer::from_dir(dir.path()).unwrap_err());
    assert!(err.contains("tokenizer.json is missing"), "{err}");

    let file = dir.path().join("file.txt");
    std::fs::write(&file, "x").unwrap();
    let err = format!("{:#}", Tokenizer::from_dir(&file).unwrap_err());
    assert!(err.contains("is not a directory"), "{err}");

    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": [1, 2,,]}").unwrap();
    let err = format!("{:#}", Tokenizer::from_dir(dir.path()).unwrap_err());
    assert!(
        err.contains("tokenizer.json") && err.contains("line 1"),
        "{err}"
    );

    // A valid tokenizer.json with a broken tokenizer_config.json.
    trained(300).save_pretrained(dir.path()).unwrap();
    let config_path = dir.path().join("tokenizer_config.json");
    std::fs::write(&config_path, "{\n\"eos_token\": \"<|im_end|>\"\n\"x\": 1}").unwrap();
    let err = format!("{:#}", Tokenizer::from_dir(dir.path()).unwrap_err());
    assert!(
        err.contains("tokenizer_config.json: malformed JSON"),
        "{err}"
    );
    assert!(err.contains("line 3"), "{err}");

    std::fs::write(&config_path, r#"{"eos_token": "</s>"}"#).unwrap();
    let err = format!("{:#}", Tokenizer::from_dir(dir.path()).unwrap_err());
    assert!(
        err.contains("tokenizer_config.json: field `eos_token`") && err.contains("\"</s>\""),
        "{err}"
    );

    std::fs::write(&config_path, r#"{"pad_token": ["a"]}"#).unwrap();
    let err = format!("{:#}", Tokenizer::from_dir(dir.path()).unwrap_err());
    assert!(err.contains("field `pad_token`"), "{err}");

    std::fs::write(
        &config_path,
        r#"{"added_tokens_decoder": {"5": {"content": "<|im_end|>", "special": true}}}"#,
    )
    .unwrap();
    let err = format!("{:#}", Tokenizer::from_dir(dir.path()).unwrap_err());
    assert!(err.contains("field `added_tokens_decoder`"), "{err}");

    // Without tokenizer_config.json the tokenizer loads with no special roles.
    std::fs::remove_file(&config_path).unwrap();
    let tk = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tk.eos_token_id(), None);
    assert!(!tk.has_chat_template());
}

#[test]
fn added_tokens_decoder_adds_missing_tokens() {
    let dir = tempfile::tempdir().unwrap();
    trained(300).save_pretrained(dir.path()).unwrap();
    let config_path = dir.path().join("tokenizer_config.json");
    std::fs::write(
        &config_path,
        r#"{"added_tokens_decoder": {
              "300": {"content": "<think>", "special": false},
              "301": {"content": "<|fim|>", "special": true}},
            "eos_token": "<|im_end|>"}"#,
    )
    .unwrap();
    let tk = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tk.token_to_id("<think>"), Some(300));
    assert_eq!(tk.token_to_id("<|fim|>"), Some(301));
    assert_eq!(tk.vocab_size(), 302);
    assert!(tk.special_token_ids().contains(&301));
    assert!(!tk.special_token_ids().contains(&300));
    let ids = tk.encode("a<think>b", false).unwrap();
    assert!(ids.contains(&300));
    assert_eq!(tk.decode(&ids, true).unwrap(), "a<think>b");
    let ids = tk.encode("a<|fim|>b", false).unwrap();
    assert!(ids.contains(&301));
    assert_eq!(tk.decode(&ids, true).unwrap(), "ab");
}

#[test]
fn save_then_load_gives_the_same_tokenizer() {
    let dir = qwen_like_dir();
    let tk = Tokenizer::from_dir(dir.path()).unwrap();
    let out = tempfile::tempdir().unwrap();
    tk.save_pretrained(out.path()).unwrap();
    let back = Tokenizer::from_dir(out.path()).unwrap();
    for text in tricky_texts() {
        let with_special = format!("<|im_start|>{text}<|im_end|>");
        assert_eq!(
            tk.encode(&with_special, true).unwrap(),
            back.encode(&with_special, true).unwrap()
        );
    }
    assert_eq!(tk.vocab_size(), back.vocab_size());
    assert_eq!(tk.special_token_ids(), back.special_token_ids());
    assert_eq!(tk.eos_token_id(), back.eos_token_id());
    assert_eq!(tk.chat_template(), back.chat_template());

    // Saving again writes identical bytes, and unknown config fields survive.
    let again = tempfile::tempdir().unwrap();
    back.save_pretrained(again.path()).unwrap();
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        let a = std::fs::read(out.path().join(name)).unwrap();
        let b = std::fs::read(again.path().join(name)).unwrap();
        assert_eq!(a, b, "{name}");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(again.path().join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["model_max_length"], 131072);
    assert_eq!(config["tokenizer_class"], "Qwen2Tokenizer");
    assert_eq!(
        config["added_tokens_decoder"]["399"]["content"],
        "<|im_end|>"
    );
    assert_eq!(config["added_tokens_decoder"]["399"]["special"], true);
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(again.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn trained_tokenizer_files_use_the_hf_schema() {
    let tk = trained(300);
    let dir = tempfile::tempdir().unwrap();
    tk.save_pretrained(dir.path()).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(config["eos_token"], "<|endoftext|>");
    assert_eq!(config["pad_token"], "<|endoftext|>");
    assert_eq!(config["bos_token"], serde_json::Value::Null);
    assert_eq!(config["chat_template"], CHATML_TEMPLATE);
    assert_eq!(
        config["added_tokens_decoder"]["297"],
        json!({"content": "<|endoftext|>", "lstrip": false, "normalized": false,
               "rstrip": false, "single_word": false, "special": true})
    );
    let tokenizer: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("tokenizer.json")).unwrap()).unwrap();
    assert_eq!(tokenizer["model"]["type"], "BPE");
    assert_eq!(tokenizer["model"]["unk_token"], serde_json::Value::Null);
    // Qwen2's pipeline: NFC, the Qwen2 regex split, then ByteLevel without its own regex.
    assert_eq!(tokenizer["normalizer"]["type"], "NFC");
    assert_eq!(tokenizer["pre_tokenizer"]["type"], "Sequence");
    let steps = &tokenizer["pre_tokenizer"]["pretokenizers"];
    assert_eq!(steps[0]["type"], "Split");
    assert_eq!(steps[0]["behavior"], "Isolated");
    assert_eq!(steps[1]["type"], "ByteLevel");
    assert_eq!(steps[1]["add_prefix_space"], false);
    assert_eq!(steps[1]["use_regex"], false);
    assert_eq!(tokenizer["decoder"]["type"], "ByteLevel");
    assert_eq!(
        tokenizer["model"]["merges"].as_array().unwrap().len(),
        300 - 256 - 3
    );
    assert_eq!(tokenizer["added_tokens"][2]["content"], "<|im_end|>");
    assert_eq!(tokenizer["added_tokens"][2]["id"], 299);
}

#[test]
fn incremental_decoding_matches_full_decode() {
    let tk = trained(400);
    for text in tricky_texts() {
        let ids = tk.encode(&text, false).unwrap();
        let mut dec = IncrementalDecoder::new(false);
        let mut pieces = String::new();
        for &id in &ids {
            let piece = dec.push(&tk, id).unwrap();
            // A piece never ends inside a character.
            assert!(!piece.ends_with('\u{FFFD}'));
            pieces.push_str(piece);
        }
        pieces.push_str(dec.finish(&tk).unwrap());
        assert_eq!(pieces, nfc(&text));
        assert_eq!(dec.text(), nfc(&text));
        assert_eq!(dec.len(), ids.len());
    }
    // An emoji split over byte tokens appears only once complete.
    let bytes: Vec<u32> = "😀".bytes().map(|b| byte_token_id(&tk, b)).collect();
    let mut dec = IncrementalDecoder::new(false);
    for (i, &id) in bytes.iter().enumerate() {
        let piece = dec.push(&tk, id).unwrap().to_string();
        assert_eq!(piece, if i == 3 { "😀" } else { "" });
    }

    // Random id sequences (invalid UTF-8 included) with special tokens skipped.
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for _ in 0..100 {
        let ids: Vec<u32> = (0..rng.gen_range(1..30))
            .map(|_| rng.gen_range(0..tk.vocab_size() as u32))
            .collect();
        let mut dec = IncrementalDecoder::new(true);
        for &id in &ids {
            dec.push(&tk, id).unwrap();
        }
        dec.finish(&tk).unwrap();
        assert_eq!(dec.text(), tk.decode(&ids, true).unwrap(), "{ids:?}");
    }
}

/// The id of the single-byte token for byte `b`.
fn byte_token_id(tk: &Tokenizer, b: u8) -> u32 {
    // GPT-2's byte-to-character table: printable Latin-1 bytes map to themselves, the
    // others to U+0100 + n in byte order.
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let c = if printable(b) {
        char::from(b)
    } else {
        let n = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(0x100 + n).unwrap()
    };
    tk.token_to_id(&c.to_string()).unwrap()
}

#[test]
fn unknown_ids_are_skipped_in_decode() {
    let tk = trained(300);
    let h = tk.encode("h", false).unwrap();
    let ids = [h[0], 10_000, h[0]];
    assert_eq!(tk.decode(&ids, false).unwrap(), "hh");
}

#[test]
fn set_chat_template_validates() {
    let mut tk = trained(300);
    assert!(tk.set_chat_template(Some("{% for %}")).is_err());
    assert!(tk.has_chat_template());
    tk.set_chat_template(Some("{{ messages | length }}"))
        .unwrap();
    assert_eq!(
        tk.apply_chat_template(&[ChatMessage::new("user", "x")], false)
            .unwrap(),
        "1"
    );
    tk.set_chat_template(None).unwrap();
    assert!(!tk.has_chat_template());
}

#[test]
fn qwen25_normalizer_and_pre_tokenizer_load_and_apply() {
    // Qwen2.5's tokenizer.json normalizer and pre-tokenizer (digits split one by one, NFC)
    // over our vocabulary; fancy-regex must handle its look-ahead `\s+(?!\S)`.
    let tk = trained(400);
    let dir = tempfile::tempdir().unwrap();
    tk.save_pretrained(dir.path()).unwrap();
    let path = dir.path().join("tokenizer.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    j["normalizer"] = json!({"type": "NFC"});
    j["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]});
    std::fs::write(&path, j.to_string()).unwrap();
    let qwen = Tokenizer::from_dir(dir.path()).unwrap();
    let id = |s: &str| qwen.token_to_id(s).unwrap();
    assert_eq!(
        qwen.encode("1234", false).unwrap(),
        vec![id("1"), id("2"), id("3"), id("4")]
    );
    // NFC: a decomposed "é" encodes like the composed one.
    assert_eq!(
        qwen.encode("cafe\u{301}", false).unwrap(),
        qwen.encode("caf\u{e9}", false).unwrap()
    );
}

#[test]
fn tokenizer_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<IncrementalDecoder>();
    let tk = trained(300);
    let texts = tricky_texts();
    let ids: Vec<Vec<u32>> = std::thread::scope(|s| {
        let handles: Vec<_> = texts
            .iter()
            .map(|t| s.spawn(|| tk.encode(t, false).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (t, ids) in texts.iter().zip(ids) {
        assert_eq!(ids, tk.encode(t, false).unwrap());
    }
}

#[test]
fn gpt2_style_keeps_digit_runs_and_round_trips_exactly() {
    let qwen = trained(400);
    let gpt2 = train_byte_level_bpe_with(&corpus(), 400, PreTokenizerStyle::Gpt2).unwrap();
    // Qwen2's split gives one piece per digit; GPT-2's keeps "48" together, so BPE can merge it.
    let digits = |tk: &Tokenizer| tk.encode("48", false).unwrap().len();
    assert_eq!(digits(&qwen), 2);
    assert_eq!(digits(&gpt2), 1);
    // No normalizer: even NFD text round-trips byte for byte.
    for text in tricky_texts() {
        let ids = gpt2.encode(&text, false).unwrap();
        assert_eq!(gpt2.decode(&ids, false).unwrap(), text);
    }
}
