//! End-to-end tests of `evaluate` on a tiny random model (which answers at random, so the
//! checks are of the plumbing and the counting: golds are taken from the model's own answers).

use candle_core::{Device, Tensor};

use super::*;
use crate::data::benchmarks::{Benchmark, BenchmarkItem};
use crate::model::{Qwen2, Qwen2Config};
use crate::tokenizer::train_byte_level_bpe;

fn tiny() -> (Qwen2, Tokenizer) {
    let mut corpus: Vec<String> = Vec::new();
    for a in 0..40u32 {
        corpus.push(format!(
            "Compute {a}+{a}= {}. The answer is \\boxed{{{}}}.",
            2 * a,
            2 * a
        ));
    }
    let tokenizer = train_byte_level_bpe(&corpus, 300).unwrap();
    let config: Qwen2Config = serde_json::from_value(serde_json::json!({
        "vocab_size": tokenizer.vocab_size(),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false,
    }))
    .unwrap();
    // A larger init than transformers' 0.02 makes the logits far from uniform, so greedy
    // text varies between prompts.
    let mut model = Qwen2::random(config, 0.5, 7, &Device::Cpu).unwrap();
    // Zero the output-head rows of every token that is not digits and spaces: the other
    // tokens' logits are then 0 while digit tokens' are spread around 0, so the text is
    // mostly numbers (which mathverify extracts) and does not end at once on EOS.
    let head = model.weights.lm_head.as_mut().unwrap();
    let mut rows = head.to_vec2::<f32>().unwrap();
    for (id, row) in rows.iter_mut().enumerate() {
        let text = tokenizer.decode(&[id as u32], false).unwrap();
        let numeric =
            !text.trim().is_empty() && text.chars().all(|c| c.is_ascii_digit() || c == ' ');
        let scale = if numeric { 3.0 } else { 0.0 };
        row.iter_mut().for_each(|w| *w *= scale);
    }
    let shape = head.shape().clone();
    *head = Tensor::from_vec(rows.concat(), shape, &Device::Cpu).unwrap();
    (model, tokenizer)
}

fn text_items(n: usize, gold: &str) -> Vec<EvalItem> {
    (0..n)
        .map(|i| EvalItem {
            id: format!("q{i}"),
            prompt: Prompt::Text(format!("Compute {i}+{}=", 3 * i + 1)),
            gold: gold.to_string(),
            images: Vec::new(),
        })
        .collect()
}

fn greedy(max_new_tokens: usize) -> EvalConfig {
    EvalConfig {
        temperature: 0.0,
        max_new_tokens,
        batch_prompts: 3,
        ..EvalConfig::default()
    }
}

fn texts(report: &EvalReport) -> Vec<Vec<String>> {
    report
        .per_item
        .iter()
        .map(|i| i.samples.iter().map(|s| s.text.clone()).collect())
        .collect()
}

#[test]
fn gold_equal_to_the_greedy_answer_counts_as_correct() {
    let (model, tok) = tiny();
    let mut items = text_items(8, "-12345");
    let first = evaluate(&model, &tok, &items, &greedy(24)).unwrap();
    assert_eq!(first.summary.pass_at_1, 0.0);
    // Set each item's gold to the answer extracted from its greedy completion.
    let mut with_answer = 0;
    for (item, result) in items.iter_mut().zip(&first.per_item) {
        if let Some(answer) = &result.samples[0].extracted {
            item.gold = answer.clone();
            with_answer += 1;
        }
    }
    assert!(
        with_answer >= 2,
        "only {with_answer} greedy completions have an answer: {:?}",
        texts(&first)
    );
    let second = evaluate(&model, &tok, &items, &greedy(24)).unwrap();
    assert_eq!(texts(&first), texts(&second), "greedy is deterministic");
    for (item, result) in items.iter().zip(&second.per_item) {
        let expected = item.gold != "-12345";
        assert_eq!(
            result.samples[0].correct, expected,
            "item {}: {result:?}",
            item.id
        );
        assert_eq!(result.n_correct, expected as usize);
    }
    let share = with_answer as f64 / items.len() as f64;
    assert!((second.summary.pass_at_1 - share).abs() < 1e-12);
    assert!((second.summary.pass_at_k - share).abs() < 1e-12);
}

#[test]
fn sampled_flags_match_an_independent_check_and_aggregate() {
    let (model, tok) = tiny();
    let config = EvalConfig {
        samples: 4,
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: 16,
        seed: 11,
        batch_prompts: 2,
        ..EvalConfig::default()
    };
    let mut items = text_items(5, "-12345");
    let first = evaluate(&model, &tok, &items, &config).unwrap();
    // Golds from sample 0's answer (the run is reproducible, so sample 0 will be correct).
    for (item, result) in items.iter_mut().zip(&first.per_item) {
        if let Some(answer) = &result.samples[0].extracted {
            item.gold = answer.clone();
        }
    }
    let report = evaluate(&model, &tok, &items, &config).unwrap();
    assert_eq!(texts(&first), texts(&report), "same seed, same samples");
    assert_eq!(report.summary.n_items, 5);
    assert_eq!(report.summary.samples, 4);
    let mut pass1 = 0.0;
    let mut passk = 0.0;
    let mut tokens = 0;
    for (item, result) in items.iter().zip(&report.per_item) {
        assert_eq!(result.samples.len(), 4);
        assert_eq!(result.id, item.id);
        assert_eq!(result.gold, item.gold);
        let flags: Vec<bool> = result
            .samples
            .iter()
            .map(|s| mathverify::is_correct(&item.gold, &s.text))
            .collect();
        assert_eq!(
            result.samples.iter().map(|s| s.correct).collect::<Vec<_>>(),
            flags
        );
        let c = flags.iter().filter(|&&f| f).count();
        assert_eq!(result.n_correct, c);
        if result.samples[0].extracted.is_some() && item.gold != "-12345" {
            assert!(result.samples[0].correct, "{result:?}");
        }
        pass1 += c as f64 / 4.0;
        passk += (c > 0) as u8 as f64;
        tokens += result
            .samples
            .iter()
            .map(|s| s.completion_tokens)
            .sum::<usize>();
        for s in &result.samples {
            assert!(s.completion_tokens >= 1 && s.completion_tokens <= 16);
        }
    }
    // The counting is exercised on a mix of correct and wrong samples.
    assert!(pass1 > 0.0 && pass1 < 5.0, "pass1 sum {pass1}");
    assert!((report.summary.pass_at_1 - pass1 / 5.0).abs() < 1e-12);
    assert!((report.summary.pass_at_k - passk / 5.0).abs() < 1e-12);
    assert_eq!(report.summary.generated_tokens, tokens);
    assert!((report.summary.mean_completion_tokens - tokens as f64 / 20.0).abs() < 1e-12);
}

#[test]
fn greedy_does_not_depend_on_chunking_and_one_chunk_matches_generate() {
    let (model, tok) = tiny();
    let items = text_items(5, "1");
    let one = evaluate(
        &model,
        &tok,
        &items,
        &EvalConfig {
            batch_prompts: 1,
            ..greedy(12)
        },
    )
    .unwrap();
    let all = evaluate(
        &model,
        &tok,
        &items,
        &EvalConfig {
            batch_prompts: 8,
            ..greedy(12)
        },
    )
    .unwrap();
    assert_eq!(texts(&one), texts(&all));

    // A single chunk draws what rollout::generate draws with the same seed.
    let config = EvalConfig {
        samples: 2,
        temperature: 0.9,
        top_p: 0.95,
        max_new_tokens: 10,
        seed: 5,
        batch_prompts: 16,
        ..EvalConfig::default()
    };
    let report = evaluate(&model, &tok, &items, &config).unwrap();
    let ids: Vec<Vec<u32>> = items
        .iter()
        .map(|i| tok.encode_prompt(&i.prompt).unwrap())
        .collect();
    let direct = rollout::generate(&model, &tok, &ids, &config.sampling_params(0)).unwrap();
    let direct_texts: Vec<String> = direct.into_iter().map(|c| c.text).collect();
    assert_eq!(texts(&report).concat(), direct_texts);
}

#[test]
fn progress_streams_every_result_once() {
    let (model, tok) = tiny();
    let items = text_items(7, "1");
    let mut seen: Vec<String> = Vec::new();
    let mut dones = Vec::new();
    let report = evaluate_with_progress(&model, &tok, &items, &greedy(4), &mut |new, progress| {
        seen.extend(new.iter().map(|r| r.id.clone()));
        dones.push((progress.items_done, progress.items_total));
        Ok(())
    })
    .unwrap();
    assert_eq!(dones, vec![(3, 7), (6, 7), (7, 7)]);
    let ids: Vec<String> = report.per_item.iter().map(|r| r.id.clone()).collect();
    assert_eq!(seen, ids);
    assert_eq!(ids, (0..7).map(|i| format!("q{i}")).collect::<Vec<_>>());
    // An error from the callback stops the evaluation.
    let err = evaluate_with_progress(&model, &tok, &items, &greedy(4), &mut |_, _| {
        anyhow::bail!("stop here")
    })
    .unwrap_err();
    assert!(err.to_string().contains("stop here"));
}

#[test]
fn benchmark_prompts_use_the_chat_template() {
    let (model, tok) = tiny();
    let benchmark = Benchmark {
        name: "tiny".into(),
        path: "tiny.jsonl".into(),
        items: vec![BenchmarkItem {
            id: "b1".into(),
            problem: "Compute 2+2=".into(),
            answer: "4".into(),
        }],
    };
    let style = PromptStyle {
        system_prompt: Some("Be brief.".into()),
        chat_template: true,
    };
    let items = benchmark_items(&benchmark, &style, &tok);
    let report = evaluate(&model, &tok, &items, &greedy(4)).unwrap();
    assert_eq!(
        report.per_item[0].prompt,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompute 2+2=<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(report.per_item[0].gold_parsed.as_deref(), Some("4"));
}

#[test]
fn bad_input_is_a_clear_error() {
    let (model, tok) = tiny();
    let items = text_items(2, "1");
    let err = |items: &[EvalItem], config: &EvalConfig| {
        format!("{:#}", evaluate(&model, &tok, items, config).unwrap_err())
    };
    assert!(err(&[], &greedy(4)).contains("no items"));
    assert!(err(
        &items,
        &EvalConfig {
            samples: 0,
            ..greedy(4)
        }
    )
    .contains("samples"));
    assert!(err(
        &items,
        &EvalConfig {
            batch_prompts: 0,
            ..greedy(4)
        }
    )
    .contains("batch_prompts"));
    assert!(err(
        &items,
        &EvalConfig {
            top_p: 0.0,
            ..greedy(4)
        }
    )
    .contains("top_p"));
    let long = vec![EvalItem {
        id: "long-one".into(),
        prompt: Prompt::Text("~".repeat(300)),
        gold: "1".into(),
        images: Vec::new(),
    }];
    let msg = err(&long, &greedy(4));
    assert!(
        msg.contains("long-one") && msg.contains("256 positions"),
        "{msg}"
    );
    let empty = vec![EvalItem {
        id: "blank".into(),
        prompt: Prompt::Text(String::new()),
        gold: "1".into(),
        images: Vec::new(),
    }];
    assert!(err(&empty, &greedy(4)).contains("blank"));
}

#[test]
fn config_defaults_and_unknown_keys() {
    let config: EvalConfig = serde_json::from_str(r#"{"samples": 4}"#).unwrap();
    assert_eq!(config.samples, 4);
    assert_eq!(
        (config.temperature, config.top_p, config.max_new_tokens),
        (0.6, 0.95, 1024)
    );
    assert!(serde_json::from_str::<EvalConfig>(r#"{"sample": 4}"#).is_err());
    let p = config.sampling_params(0);
    assert_eq!((p.n, p.seed, p.ignore_eos), (4, 0, false));
    assert_ne!(config.sampling_params(16).seed, p.seed);
}
