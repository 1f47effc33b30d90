//! `gpg-rl math-verify`: check model answers against gold answers.
//!
//! * `--input FILE.jsonl`: each line `{"gold": str, "pred": str, …}`; each output line repeats
//!   the input object and adds `correct` (bool), `gold_extracted` and `pred_extracted` (the
//!   answers found, as strings). A summary goes to stderr.
//! * `--gold G --pred P`: one pair, same output format.
//!
//! The gold is a reference answer (bare LaTeX or plain, or text with `$…$`/`\boxed{}`); the
//! prediction is free model text from which the answer is extracted.

use anyhow::{bail, Context, Result};
use mathverify::{check, MatchType, Options};
use serde_json::{Map, Value};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;

/// Arguments of `gpg-rl math-verify`.
#[derive(clap::Args, Debug, Clone)]
pub struct MathVerifyArgs {
    /// JSONL file of {"gold": str, "pred": str} objects.
    #[arg(long, conflicts_with_all = ["gold", "pred"])]
    pub input: Option<PathBuf>,
    /// Write the results here instead of stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// A single gold answer (with --pred).
    #[arg(long, requires = "pred")]
    pub gold: Option<String>,
    /// A single prediction (with --gold).
    #[arg(long, requires = "gold")]
    pub pred: Option<String>,
    /// Decimal places a decimal answer is compared to.
    #[arg(long, default_value_t = 6)]
    pub float_rounding: u32,
    /// Compare up to renaming of variables (f(x) = f(y)).
    #[arg(long)]
    pub no_strict: bool,
    /// Allow comparing a gold set with a predicted relation ([-2,7] vs -2 <= x <= 7).
    #[arg(long)]
    pub allow_set_relation_comp: bool,
    /// Span kinds to extract, comma separated: latex, expr.
    #[arg(long, default_value = "latex,expr")]
    pub match_types: String,
    /// Priority of \boxed{} answers (0 = first; negative disables boxed extraction).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub boxed_priority: i64,
    /// Only take answers after an anchor ("answer", "final answer", \boxed), not the last number.
    #[arg(long)]
    pub anchored_only: bool,
    /// Treat 28% and 28 as different answers (math-verify's behaviour).
    #[arg(long)]
    pub strict_percent: bool,
}

impl MathVerifyArgs {
    /// The verifier options these arguments select.
    pub fn options(&self) -> Result<Options> {
        let mut match_types = Vec::new();
        for m in self
            .match_types
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            match m {
                "latex" => match_types.push(MatchType::Latex),
                "expr" => match_types.push(MatchType::Expr),
                other => bail!("--match-types: unknown kind {other:?} (expected latex, expr)"),
            }
        }
        if match_types.is_empty() {
            bail!("--match-types: give at least one of latex, expr");
        }
        Ok(Options {
            float_rounding: self.float_rounding,
            strict: !self.no_strict,
            allow_set_relation_comp: self.allow_set_relation_comp,
            match_types,
            boxed_match_priority: u32::try_from(self.boxed_priority).ok(),
            try_extract_without_anchor: !self.anchored_only,
            lenient_percent: !self.strict_percent,
        })
    }
}

/// Verify one (gold, pred) pair and return the output object (input fields + results).
pub fn verify_object(
    mut obj: Map<String, Value>,
    gold: &str,
    pred: &str,
    opts: &Options,
) -> Map<String, Value> {
    let v = check(gold, pred, opts);
    obj.insert("correct".into(), Value::Bool(v.correct));
    obj.insert(
        "gold_extracted".into(),
        Value::Array(v.gold.into_iter().map(Value::String).collect()),
    );
    obj.insert(
        "pred_extracted".into(),
        Value::Array(v.pred.into_iter().map(Value::String).collect()),
    );
    obj
}

fn string_field<'a>(
    obj: &'a Map<String, Value>,
    field: &str,
    file: &str,
    line: usize,
) -> Result<&'a str> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => bail!(
            "{file}:{line}: field \"{field}\": expected a string, found {}",
            kind_of(other)
        ),
        None => bail!("{file}:{line}: missing field \"{field}\""),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Process a JSONL stream: one output line per non-empty input line. Returns (pairs, correct).
pub fn verify_jsonl(
    input: impl BufRead,
    name: &str,
    out: &mut impl Write,
    opts: &Options,
) -> Result<(usize, usize)> {
    let (mut n, mut correct) = (0usize, 0usize);
    for (i, line) in input.lines().enumerate() {
        let lineno = i + 1;
        let line = line.with_context(|| format!("{name}:{lineno}: reading"))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(&line)
            .with_context(|| format!("{name}:{lineno}: invalid JSON"))?;
        let Value::Object(obj) = value else {
            bail!("{name}:{lineno}: expected a JSON object with fields \"gold\" and \"pred\"");
        };
        let gold = string_field(&obj, "gold", name, lineno)?.to_string();
        let pred = string_field(&obj, "pred", name, lineno)?.to_string();
        let result = verify_object(obj, &gold, &pred, opts);
        if result.get("correct") == Some(&Value::Bool(true)) {
            correct += 1;
        }
        n += 1;
        serde_json::to_writer(&mut *out, &Value::Object(result))
            .with_context(|| format!("{name}:{lineno}: writing result"))?;
        writeln!(out).context("writing result")?;
    }
    Ok((n, correct))
}

/// Run `gpg-rl math-verify`.
pub fn run(args: &MathVerifyArgs) -> Result<()> {
    let opts = args.options()?;
    let mut sink: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    match (&args.input, &args.gold, &args.pred) {
        (Some(path), _, _) => {
            let name = path.display().to_string();
            let file = std::fs::File::open(path).with_context(|| format!("opening {name}"))?;
            let (n, correct) = verify_jsonl(BufReader::new(file), &name, &mut sink, &opts)?;
            sink.flush().context("writing results")?;
            let share = if n > 0 {
                100.0 * correct as f64 / n as f64
            } else {
                0.0
            };
            eprintln!("math-verify: {correct}/{n} correct ({share:.2}%)");
        }
        (None, Some(gold), Some(pred)) => {
            let mut obj = Map::new();
            obj.insert("gold".into(), Value::String(gold.clone()));
            obj.insert("pred".into(), Value::String(pred.clone()));
            let result = verify_object(obj, gold, pred, &opts);
            serde_json::to_writer(&mut sink, &Value::Object(result)).context("writing result")?;
            writeln!(sink).context("writing result")?;
            sink.flush().context("writing result")?;
        }
        _ => bail!("math-verify: give --input FILE.jsonl, or --gold G --pred P"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> MathVerifyArgs {
        MathVerifyArgs {
            input: None,
            output: None,
            gold: None,
            pred: None,
            float_rounding: 6,
            no_strict: false,
            allow_set_relation_comp: false,
            match_types: "latex,expr".into(),
            boxed_priority: 0,
            anchored_only: false,
            strict_percent: false,
        }
    }

    #[test]
    fn jsonl_round_trip() {
        let input = "{\"gold\": \"\\\\frac{1}{2}\", \"pred\": \"so \\\\boxed{0.5}\", \"id\": 7}\n\n{\"gold\": \"3\", \"pred\": \"The answer is 4.\"}\n";
        let mut out = Vec::new();
        let opts = args().options().unwrap_or_default();
        let (n, correct) = verify_jsonl(input.as_bytes(), "mem", &mut out, &opts).unwrap_or((0, 0));
        assert_eq!((n, correct), (2, 1));
        let text = String::from_utf8(out).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["correct"], Value::Bool(true));
        assert_eq!(lines[0]["id"], Value::from(7));
        assert_eq!(lines[0]["pred_extracted"][1], Value::String("0.5".into()));
        assert_eq!(lines[1]["correct"], Value::Bool(false));
    }

    #[test]
    fn bad_input_names_file_line_and_field() {
        let opts = args().options().unwrap_or_default();
        let mut out = Vec::new();
        let e = verify_jsonl(
            "{\"gold\": \"1\", \"pred\": \"1\"}\n{\"gold\": \"1\"}\n".as_bytes(),
            "f.jsonl",
            &mut out,
            &opts,
        )
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
        assert!(e.contains("f.jsonl:2") && e.contains("\"pred\""), "{e}");
        let e = verify_jsonl(
            "{\"gold\": 1, \"pred\": \"1\"}\n".as_bytes(),
            "f.jsonl",
            &mut out,
            &opts,
        )
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
        assert!(
            e.contains("f.jsonl:1") && e.contains("\"gold\"") && e.contains("a number"),
            "{e}"
        );
        let e = verify_jsonl("{not json\n".as_bytes(), "f.jsonl", &mut out, &opts)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("f.jsonl:1: invalid JSON"), "{e}");
    }

    #[test]
    fn options_from_flags() {
        let mut a = args();
        a.boxed_priority = -1;
        a.match_types = "latex".into();
        a.no_strict = true;
        let o = a.options().unwrap_or_default();
        assert_eq!(o.boxed_match_priority, None);
        assert_eq!(o.match_types, vec![MatchType::Latex]);
        assert!(!o.strict);
        a.match_types = "latex,words".into();
        assert!(a.options().is_err());
    }

    #[test]
    fn run_with_files() {
        let dir = tempfile::tempdir()
            .map(|d| d.keep())
            .unwrap_or_else(|_| std::env::temp_dir());
        let input = dir.join("in.jsonl");
        let output = dir.join("out.jsonl");
        std::fs::write(
            &input,
            "{\"gold\": \"x=3\", \"pred\": \"we find $x = 3$.\"}\n",
        )
        .unwrap_or(());
        let mut a = args();
        a.input = Some(input);
        a.output = Some(output.clone());
        assert!(run(&a).is_ok());
        let text = std::fs::read_to_string(&output).unwrap_or_default();
        assert!(text.contains("\"correct\":true"), "{text}");
        let mut bad = args();
        bad.input = Some(dir.join("missing.jsonl"));
        let e = run(&bad)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("missing.jsonl"), "{e}");
    }
}
