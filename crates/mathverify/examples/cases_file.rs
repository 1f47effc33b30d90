//! Run a JSONL file of cases (`gold`, `pred`, `expected`, optional `match_types`,
//! `float_rounding`, `strict`, `allow_set_relation_comp`) and print the disagreements.
//! Usage: cargo run --release -p mathverify --example cases_file -- FILE.jsonl

use mathverify::{extract_answers, verify, MatchType, Options};

fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!("usage: cases_file FILE.jsonl");
        std::process::exit(2)
    });
    let data = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        eprintln!("{path}: {e}");
        std::process::exit(1)
    });
    let (mut total, mut agree) = (0, 0);
    for (i, line) in data.lines().enumerate() {
        let Ok(case) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let mut opts = Options::default();
        if let Some(m) = case["match_types"].as_array() {
            opts.match_types = m
                .iter()
                .filter_map(|x| match x.as_str() {
                    Some("latex") => Some(MatchType::Latex),
                    Some("expr") => Some(MatchType::Expr),
                    _ => None,
                })
                .collect();
        }
        opts.float_rounding = case["float_rounding"].as_u64().unwrap_or(6) as u32;
        opts.strict = case["strict"].as_bool().unwrap_or(true);
        opts.allow_set_relation_comp = case["allow_set_relation_comp"].as_bool().unwrap_or(false);
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
                "line {} expected={expected} got={got}\n  gold: {}\n  pred: {}",
                i + 1,
                show(&g),
                show(&p)
            );
        }
    }
    println!("agreement {agree}/{total}");
}
