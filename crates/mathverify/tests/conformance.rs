//! Conformance with math-verify 0.8.0's own test cases (tests/data/cases.jsonl, 196 cases
//! taken from huggingface/Math-Verify tests with their options and expected results).
//! Prints the agreement and every disagreement; fails below 97 %.

mod support;

use support::cases::run_cases;

#[test]
fn conformance_with_math_verify_cases() {
    let data = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/cases.jsonl"
    ))
    .unwrap_or_else(|e| panic!("reading tests/data/cases.jsonl: {e}"));
    let (agree, total) = run_cases(&data);
    let share = agree as f64 / total.max(1) as f64;
    println!("conformance: {agree}/{total} = {:.2}%", 100.0 * share);
    assert!(total >= 196, "expected 196 cases, found {total}");
    assert!(share >= 0.97, "agreement {:.2}% below 97%", 100.0 * share);
}
