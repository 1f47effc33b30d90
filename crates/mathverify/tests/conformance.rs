//! Conformance with math-verify 0.8.0's own test cases (tests/data/cases.jsonl, 196 cases
//! taken from huggingface/Math-Verify tests with their options and expected results).
//! Prints the agreement and every disagreement; fails below 97 %.

use mathverify::{extract_answers, verify, MatchType, Options};
use serde_json::Value;

fn options_of(case: &Value) -> Options {
    let match_types = case["match_types"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| match m.as_str() {
                    Some("latex") => Some(MatchType::Latex),
                    Some("expr") => Some(MatchType::Expr),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let bp = case["boxed_match_priority"].as_i64().unwrap_or(0);
    Options {
        float_rounding: case["float_rounding"].as_u64().unwrap_or(6) as u32,
        strict: case["strict"].as_bool().unwrap_or(true),
        allow_set_relation_comp: case["allow_set_relation_comp"].as_bool().unwrap_or(false),
        match_types,
        boxed_match_priority: if bp < 0 { None } else { Some(bp as u32) },
        try_extract_without_anchor: true,
        lenient_percent: true,
    }
}

#[test]
fn conformance_with_math_verify_cases() {
    let data = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/cases.jsonl"
    ))
    .unwrap_or_else(|e| panic!("reading tests/data/cases.jsonl: {e}"));
    let mut total = 0usize;
    let mut agree = 0usize;
    for (lineno, line) in data.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let case: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("cases.jsonl line {}: {e}", lineno + 1));
        let opts = options_of(&case);
        let gold = case["gold"].as_str().unwrap_or_default();
        let pred = case["pred"].as_str().unwrap_or_default();
        let expected = case["expected"].as_bool().unwrap_or(false);
        let g = extract_answers(gold, &opts);
        let p = extract_answers(pred, &opts);
        let got = verify(&g, &p, &opts);
        total += 1;
        if got == expected {
            agree += 1;
        } else {
            let show = |a: &[mathverify::Answer]| {
                a.iter()
                    .map(|x| x.display())
                    .collect::<Vec<_>>()
                    .join(" | ")
            };
            println!(
                "DISAGREE line {} {} expected={} got={}\n   gold parsed: {}\n   pred parsed: {}",
                lineno + 1,
                case["id"].as_str().unwrap_or(""),
                expected,
                got,
                show(&g),
                show(&p)
            );
        }
    }
    let share = agree as f64 / total.max(1) as f64;
    println!("conformance: {agree}/{total} = {:.2}%", 100.0 * share);
    assert!(total >= 196, "expected 196 cases, found {total}");
    assert!(share >= 0.97, "agreement {:.2}% below 97%", 100.0 * share);
}
