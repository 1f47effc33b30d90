//! Print how each gold answer of a JSONL file (field `answer`) parses (development aid).
fn main() {
    let path = std::env::args().nth(1).unwrap_or_default();
    let field = std::env::args().nth(2).unwrap_or_else(|| "answer".into());
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let opts = mathverify::Options::default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let gold = match &v[&field] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            other => other.to_string(),
        };
        let parsed = mathverify::parse_gold(&gold, &opts);
        let boxed = format!(
            "The final answer is $\\boxed{{{}}}$.",
            gold.trim_matches('$')
        );
        let selfcheck = mathverify::is_correct(&gold, &boxed);
        println!(
            "{}\t{}\t{}",
            if selfcheck { "ok " } else { "BAD" },
            gold,
            parsed.first().map(|a| a.display()).unwrap_or_default()
        );
    }
}
