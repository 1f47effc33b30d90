//! Evaluation benchmarks and their gold answers.
//!
//! `load_benchmark(name_or_path)` accepts a benchmark name — `math500`, `gsm8k` (vendored in
//! `data/benchmarks/` of the repository), `aime24`, `amc23`, `minerva`, `olympiadbench` (read
//! from the directory named by the environment variable `GPG_RL_DATA`, see
//! data/benchmarks/README.md) — or the path of a JSONL file. Each line's format is
//! recognised from its fields:
//!
//! | fields | gold answer |
//! |---|---|
//! | `final_answer` (list of `$…$` strings, OlympiadBench) | the items joined by `, ` |
//! | `answer` containing `#### ` (GSM8K) | the text after the last `#### ` |
//! | `answer` (string or number; AMC floats such as `27.0` become `27`) | the answer |
//! | `solution` only (Minerva) | the content of the last `\boxed{…}` of the solution |
//!
//! The problem is the `problem` field, else `question`; the id is `unique_id`, `id` or `idx`,
//! else the 1-based line number.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Environment variable naming a directory with the non-vendored benchmark files.
pub const DATA_ENV: &str = "GPG_RL_DATA";

/// The benchmark names `load_benchmark` knows.
pub const BENCHMARK_NAMES: [&str; 6] = [
    "math500",
    "gsm8k",
    "aime24",
    "amc23",
    "minerva",
    "olympiadbench",
];

/// One benchmark problem with its gold answer.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchmarkItem {
    /// Identifier from the file (or the line number).
    pub id: String,
    /// The problem statement.
    pub problem: String,
    /// The gold answer, as a LaTeX or plain string for `mathverify`.
    pub answer: String,
}

/// A loaded benchmark.
#[derive(Clone, Debug, PartialEq)]
pub struct Benchmark {
    /// The benchmark name (or the file stem for a path).
    pub name: String,
    /// The file it was read from.
    pub path: PathBuf,
    /// Its problems in file order.
    pub items: Vec<BenchmarkItem>,
}

/// The repository's `data/benchmarks` directory (found from this crate's source location).
pub fn vendored_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/benchmarks")
}

/// Candidate file locations for a benchmark name, in search order.
fn candidate_paths(name: &str) -> Vec<PathBuf> {
    let dirs: &[&str] = match name {
        "minerva" => &["minerva_math", "minerva"],
        other => std::slice::from_ref(match BENCHMARK_NAMES.iter().find(|n| **n == other) {
            Some(n) => n,
            None => return vec![],
        }),
    };
    let mut out = Vec::new();
    for d in dirs {
        out.push(vendored_dir().join(d).join("test.jsonl"));
    }
    if let Some(root) = std::env::var_os(DATA_ENV) {
        for d in dirs {
            out.push(PathBuf::from(&root).join(d).join("test.jsonl"));
        }
    }
    out
}

/// Load a benchmark by name (see module docs) or from a JSONL path.
pub fn load_benchmark(name_or_path: &str) -> Result<Benchmark> {
    let key = name_or_path.trim().to_ascii_lowercase();
    let key = if key == "minerva_math" {
        "minerva".to_string()
    } else {
        key
    };
    if BENCHMARK_NAMES.contains(&key.as_str()) {
        let candidates = candidate_paths(&key);
        let path = candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
            anyhow!(
                "benchmark {key}: no file found (looked at {}); it is not vendored (see data/benchmarks/README.md): set {DATA_ENV} to a directory holding {key}'s test.jsonl or pass the file's path",
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )
        })?;
        return load_file(&key, &path);
    }
    let path = PathBuf::from(name_or_path);
    if !path.is_file() {
        bail!(
            "{name_or_path}: neither a benchmark name ({}) nor a readable JSONL file",
            BENCHMARK_NAMES.join("|")
        );
    }
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "benchmark".into());
    load_file(&name, &path)
}

fn load_file(name: &str, path: &Path) -> Result<Benchmark> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let lineno = i + 1;
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{lineno}: invalid JSON", path.display()))?;
        items.push(
            parse_record(&v, lineno).with_context(|| format!("{}:{lineno}", path.display()))?,
        );
    }
    Ok(Benchmark {
        name: name.to_string(),
        path: path.to_path_buf(),
        items,
    })
}

fn field_str(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A JSON number or numeric string written without a needless `.0` (AMC's `27.0` → `27`).
fn tidy_number(s: &str) -> String {
    let t = s.trim();
    if let Some(int) = t.strip_suffix(".0") {
        if !int.is_empty()
            && int
                .trim_start_matches('-')
                .chars()
                .all(|c| c.is_ascii_digit())
        {
            return int.to_string();
        }
    }
    t.to_string()
}

/// The content of the last `\boxed{…}` (or `\fbox{…}`) of `text`, brace matched.
pub fn last_boxed(text: &str) -> Option<String> {
    let start = text
        .rfind("\\boxed")
        .map(|i| (i, 6))
        .into_iter()
        .chain(text.rfind("\\fbox").map(|i| (i, 5)))
        .max_by_key(|x| x.0)?;
    let rest = &text[start.0 + start.1..];
    let open = rest.find('{')?;
    if !rest[..open].trim().is_empty() {
        return None;
    }
    let mut depth = 0usize;
    for (i, c) in rest[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(rest[open + 1..open + i].trim().to_string());
                }
            }
            _ => {}
        }
    }
    None
}

/// The gold answer of one record (see the table in the module docs).
fn gold_answer(v: &Value) -> Result<String> {
    if let Some(fa) = v.get("final_answer") {
        let parts: Vec<String> = match fa {
            Value::Array(a) => a
                .iter()
                .filter_map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .or_else(|| x.as_f64().map(|f| f.to_string()))
                })
                .collect(),
            Value::String(s) => vec![s.clone()],
            _ => bail!("field final_answer: expected a list of strings"),
        };
        if parts.is_empty() {
            bail!("field final_answer: empty");
        }
        return Ok(parts.join(", "));
    }
    if let Some(ans) = v.get("answer") {
        return match ans {
            Value::String(s) => Ok(match s.rfind("#### ") {
                Some(p) => s[p + 5..].trim().to_string(),
                None => tidy_number(s),
            }),
            Value::Number(n) => Ok(tidy_number(&n.to_string())),
            Value::Null => bail!("field answer: null"),
            _ => bail!("field answer: expected a string or a number"),
        };
    }
    if let Some(sol) = v.get("solution").and_then(Value::as_str) {
        return last_boxed(sol)
            .ok_or_else(|| anyhow!("field solution: no \\boxed{{…}} answer in it"));
    }
    bail!("missing field: answer (or final_answer, or solution with a \\boxed{{}} answer)")
}

fn parse_record(v: &Value, lineno: usize) -> Result<BenchmarkItem> {
    if !v.is_object() {
        bail!("expected a JSON object");
    }
    let problem = field_str(v, "problem")
        .or_else(|| field_str(v, "question"))
        .ok_or_else(|| anyhow!("missing field: problem (or question)"))?;
    let answer = gold_answer(v)?;
    let id = ["unique_id", "id", "idx"]
        .iter()
        .find_map(|k| field_str(v, k))
        .unwrap_or_else(|| lineno.to_string());
    Ok(BenchmarkItem {
        id,
        problem,
        answer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn gold_formats() {
        let gsm = json!({"question": "q", "answer": "3 + 4 = <<3+4=7>>7\n#### 1,234"});
        assert_eq!(
            parse_record(&gsm, 1).map(|r| r.answer).ok().as_deref(),
            Some("1,234")
        );
        let amc = json!({"id": "0", "problem": "p", "answer": 27.0});
        assert_eq!(
            parse_record(&amc, 1).map(|r| r.answer).ok().as_deref(),
            Some("27")
        );
        let amc_s = json!({"id": "0", "problem": "p", "answer": "27.0"});
        assert_eq!(
            parse_record(&amc_s, 1).map(|r| r.answer).ok().as_deref(),
            Some("27")
        );
        let minerva = json!({"problem": "p", "solution": "so \\boxed{1} then \\boxed{\\frac{1}{2}}.", "idx": "5"});
        let m = parse_record(&minerva, 1).ok();
        assert_eq!(m.as_ref().map(|r| r.answer.as_str()), Some("\\frac{1}{2}"));
        assert_eq!(m.as_ref().map(|r| r.id.as_str()), Some("5"));
        let ob = json!({"id": 3, "question": "p", "final_answer": ["$1$", "$2$"]});
        assert_eq!(
            parse_record(&ob, 1).map(|r| r.answer).ok().as_deref(),
            Some("$1$, $2$")
        );
        let bad = json!({"problem": "p"});
        let err = parse_record(&bad, 1)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("missing field: answer"), "{err}");
    }

    #[test]
    fn vendored_benchmarks_load() {
        let m = load_benchmark("math500").expect("math500 is vendored");
        assert_eq!(m.items.len(), 500);
        assert_eq!(m.items[0].answer, "\\left( 3, \\frac{\\pi}{2} \\right)");
        let g = load_benchmark("gsm8k").expect("gsm8k is vendored");
        assert_eq!(g.items.len(), 1319);
        assert_eq!(g.items[0].answer, "18");
    }

    /// Share of gold answers that parse to an expression, per available benchmark
    /// (vendored ones always; the others when `GPG_RL_DATA` points at them).
    /// `cargo test --release -p gpg gold_parse_share -- --nocapture` prints the table.
    #[test]
    fn gold_parse_share() {
        let opts = mathverify::Options::default();
        for name in BENCHMARK_NAMES {
            let Ok(b) = load_benchmark(name) else {
                println!("{name}: not available (set {DATA_ENV})");
                continue;
            };
            let mut failures = Vec::new();
            for it in &b.items {
                let parsed = mathverify::parse_gold(&it.answer, &opts);
                if !matches!(parsed.first(), Some(mathverify::Answer::Expr { .. })) {
                    failures.push(format!("{}: {}", it.id, it.answer));
                }
            }
            let n = b.items.len();
            let ok = n - failures.len();
            println!(
                "{name}: {ok}/{n} golds parse ({:.1}%)",
                100.0 * ok as f64 / n.max(1) as f64
            );
            for f in &failures {
                println!("    unparsed {f}");
            }
            assert!(
                ok as f64 >= 0.95 * n as f64,
                "{name}: only {ok}/{n} golds parse"
            );
        }
    }

    #[test]
    fn unknown_name_is_a_clear_error() {
        let e = load_benchmark("no-such-benchmark")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("neither a benchmark name"), "{e}");
    }
}
