//! Running a JSONL file of math-verify cases (`gold`, `pred`, `expected`, and the options
//! `match_types`, `float_rounding`, `strict`, `allow_set_relation_comp`,
//! `boxed_match_priority`): shared by the conformance test and the `cases_file` example.

use mathverify::{extract_answers, verify, MatchType, Options};
use serde_json::Value;

pub fn options_of(case: &Value) -> Options {
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

/// Checks every case of `data` (JSONL; blank lines skipped), prints each disagreement, and
/// returns (agreeing cases, cases).
pub fn run_cases(data: &str) -> (usize, usize) {
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
    (agree, total)
}
