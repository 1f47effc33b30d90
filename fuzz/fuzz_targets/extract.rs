//! Fuzz answer extraction and gold parsing: any text, no panic, bounded time (libFuzzer's
//! `-timeout` turns a slow input into a failure), deterministic results.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mathverify::{extract_answers, parse_gold, MatchType, Options};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let opts = Options::default();
    let a = extract_answers(&text, &opts);
    let b = extract_answers(&text, &opts);
    assert_eq!(a, b, "extraction must be deterministic");
    for ans in &a {
        let _ = ans.display();
    }
    let latex_only = Options {
        match_types: vec![MatchType::Latex],
        boxed_match_priority: None,
        ..Options::default()
    };
    let _ = extract_answers(&text, &latex_only);
    let g = parse_gold(&text, &opts);
    for ans in &g {
        let _ = ans.display();
    }
});
