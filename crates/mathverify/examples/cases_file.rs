//! Run a JSONL file of cases (`gold`, `pred`, `expected`, optional `match_types`,
//! `float_rounding`, `strict`, `allow_set_relation_comp`, `boxed_match_priority`) with the
//! conformance test's options and print the disagreements.
//! Usage: cargo run --release -p mathverify --example cases_file -- FILE.jsonl

#[path = "../tests/support/cases.rs"]
mod cases;

fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!("usage: cases_file FILE.jsonl");
        std::process::exit(2)
    });
    let data = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        eprintln!("{path}: {e}");
        std::process::exit(1)
    });
    let (agree, total) = cases::run_cases(&data);
    println!("agreement {agree}/{total}");
}
