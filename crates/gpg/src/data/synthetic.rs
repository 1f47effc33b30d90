//! A built-in synthetic reasoning task: multi-step integer arithmetic with worked solutions.
//!
//! A problem chains k operations onto a starting number, e.g.
//!
//! ```text
//! question: Compute (23+58)*4-17.
//! solution: 23+58=81
//!           81*4=324
//!           324-17=307
//!           \boxed{307}
//! answer:   307
//! ```
//!
//! The solution evaluates one operation per line, in the order the parentheses and the usual
//! precedence dictate, then states the result as `\boxed{N}`. Every intermediate value lies
//! in 0..=max_value, so no negative numbers appear. The texts are short and regular so that
//! a tiny model can learn the format by SFT and then improve its accuracy by RL; the
//! difficulty (number of operations, operand sizes) is tunable.
//!
//! Generation is seeded and reproducible (ChaCha8 and this crate's own uniform draws, so it
//! does not change with `rand` versions). The held-out set is drawn from its own stream and
//! the training set excludes its texts, so the two are disjoint by question text and the
//! held-out set does not depend on the training set's size.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::dataset::PromptDataset;
use super::fields::PromptDatasetConfig;
use super::record::{Location, PromptRecord};
use super::sampler::uniform_below;

/// Knobs of the generator. Every problem has between `min_ops` and `max_ops` operations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    pub min_ops: usize,
    pub max_ops: usize,
    /// Starting numbers and operands of `+` and `-` are drawn from 1..=max_operand.
    pub max_operand: u64,
    /// Operands of `*` are drawn from 2..=max_factor; 0 or 1 turns multiplication off.
    pub max_factor: u64,
    /// Every intermediate result lies in 0..=max_value.
    pub max_value: u64,
}

impl Default for SyntheticConfig {
    /// Difficulty level 2.
    fn default() -> Self {
        Self::level(2).unwrap_or_else(|_| unreachable!("level 2 exists"))
    }
}

impl SyntheticConfig {
    /// Preset difficulties, easiest first:
    ///
    /// | level | ops | + − operands | × operands | values ≤ |
    /// |-------|-----|--------------|------------|----------|
    /// | 1     | 1–2 | 1..=9        | 2..=5      | 99       |
    /// | 2     | 2–3 | 1..=20       | 2..=9      | 199      |
    /// | 3     | 2–4 | 1..=50       | 2..=9      | 999      |
    /// | 4     | 3–5 | 1..=99       | 2..=12     | 9999     |
    pub fn level(level: u8) -> anyhow::Result<Self> {
        let (min_ops, max_ops, max_operand, max_factor, max_value) = match level {
            1 => (1, 2, 9, 5, 99),
            2 => (2, 3, 20, 9, 199),
            3 => (2, 4, 50, 9, 999),
            4 => (3, 5, 99, 12, 9999),
            other => anyhow::bail!("synthetic difficulty level {other} does not exist (1 to 4)"),
        };
        Ok(Self {
            min_ops,
            max_ops,
            max_operand,
            max_factor,
            max_value,
        })
    }

    /// Checks that the ranges are non-empty and every step can always be taken.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.min_ops >= 1, "synthetic task: min_ops must be ≥ 1");
        anyhow::ensure!(
            self.max_ops >= self.min_ops,
            "synthetic task: max_ops ({}) is below min_ops ({})",
            self.max_ops,
            self.min_ops
        );
        anyhow::ensure!(self.max_ops <= 16, "synthetic task: max_ops must be ≤ 16");
        anyhow::ensure!(
            self.max_operand >= 1,
            "synthetic task: max_operand must be ≥ 1"
        );
        // From any value v ≤ max_value, either v + 1 ≤ max_value or v − 1 ≥ 0 is possible,
        // provided max_value ≥ max_operand ≥ 1 (0 + x for the start, v − x for large v).
        anyhow::ensure!(
            self.max_value >= self.max_operand,
            "synthetic task: max_value ({}) must be ≥ max_operand ({})",
            self.max_value,
            self.max_operand
        );
        anyhow::ensure!(
            self.max_value <= 1_000_000_000,
            "synthetic task: max_value must be ≤ 10^9"
        );
        Ok(())
    }

    fn multiply(&self) -> bool {
        self.max_factor >= 2
    }
}

/// One generated problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyntheticProblem {
    /// `Compute <expression>.`
    pub question: String,
    /// One `a<op>b=c` line per operation, then `\boxed{N}`.
    pub solution: String,
    /// N, the final value, as text.
    pub answer: String,
}

impl SyntheticProblem {
    /// The problem as a dataset record (prompt built by `config`: chat or raw text).
    pub fn prompt_record(&self, id: usize, config: &PromptDatasetConfig) -> PromptRecord {
        PromptRecord {
            id: id.to_string(),
            prompt: config.text_prompt(&self.question),
            answer: Some(self.answer.clone()),
            location: Location::new("synthetic", "problem", id + 1),
            columns: Default::default(),
        }
    }
}

/// A training set and a held-out set, disjoint by question text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticSplit {
    pub train: Vec<SyntheticProblem>,
    pub heldout: Vec<SyntheticProblem>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Sub,
    Mul,
}

impl Op {
    fn symbol(self) -> char {
        match self {
            Op::Add => '+',
            Op::Sub => '-',
            Op::Mul => '*',
        }
    }

    fn apply(self, a: u64, b: u64) -> Option<u64> {
        match self {
            Op::Add => a.checked_add(b),
            Op::Sub => a.checked_sub(b),
            Op::Mul => a.checked_mul(b),
        }
    }
}

/// The expression built so far: its text, its top-level operation and its value.
struct Expr {
    text: String,
    top: Option<Op>,
    value: u64,
}

/// Draws one problem from `rng`; the draw order is documented on `build_problem`.
pub fn generate_problem(config: &SyntheticConfig, rng: &mut ChaCha8Rng) -> SyntheticProblem {
    build_problem(config, &mut |n| uniform_below(rng, n))
}

/// Builds one problem from a source of choices: `below(n)` returns an integer in 0..n.
///
/// Draw order: number of operations, starting number, then per operation: the operation
/// (index into `+ - *`, or `+ -` without multiplication), its operand, and for `+` and `*`
/// whether the operand goes first. An operation whose result would leave 0..=max_value is
/// drawn again (always possible after validation: `+` from 0, `-` otherwise).
fn build_problem(config: &SyntheticConfig, below: &mut dyn FnMut(u64) -> u64) -> SyntheticProblem {
    let mut uniform_in = |lo: u64, hi: u64| lo + below(hi - lo + 1);
    let ops = uniform_in(config.min_ops as u64, config.max_ops as u64) as usize;
    let start = uniform_in(1, config.max_operand);
    let mut expr = Expr {
        text: start.to_string(),
        top: None,
        value: start,
    };
    let mut lines = Vec::with_capacity(ops + 1);
    let choices: &[Op] = if config.multiply() {
        &[Op::Add, Op::Sub, Op::Mul]
    } else {
        &[Op::Add, Op::Sub]
    };
    for _ in 0..ops {
        let (op, operand, value) = loop {
            let op = choices[uniform_in(0, choices.len() as u64 - 1) as usize];
            let operand = match op {
                Op::Mul => uniform_in(2, config.max_factor),
                Op::Add | Op::Sub => uniform_in(1, config.max_operand),
            };
            match op.apply(expr.value, operand) {
                Some(v) if v <= config.max_value => break (op, operand, v),
                _ => continue,
            }
        };
        // + and * are commutative: put the new operand first half of the time.
        let operand_first = op != Op::Sub && uniform_in(0, 1) == 1;
        let (text, line) = if operand_first {
            // The running expression is the right operand: bracket it when reading left to
            // right would evaluate it in another order.
            let bracket = match op {
                Op::Mul => expr.top.is_some(),
                _ => matches!(expr.top, Some(Op::Add | Op::Sub)),
            };
            let right = if bracket {
                format!("({})", expr.text)
            } else {
                expr.text.clone()
            };
            (
                format!("{operand}{}{right}", op.symbol()),
                format!("{operand}{}{}={value}", op.symbol(), expr.value),
            )
        } else {
            let bracket = op == Op::Mul && matches!(expr.top, Some(Op::Add | Op::Sub));
            let left = if bracket {
                format!("({})", expr.text)
            } else {
                expr.text.clone()
            };
            (
                format!("{left}{}{operand}", op.symbol()),
                format!("{}{}{operand}={value}", expr.value, op.symbol()),
            )
        };
        lines.push(line);
        expr = Expr {
            text,
            top: Some(op),
            value,
        };
    }
    lines.push(format!("\\boxed{{{}}}", expr.value));
    SyntheticProblem {
        question: format!("Compute {}.", expr.text),
        solution: lines.join("\n"),
        answer: expr.value.to_string(),
    }
}

/// Draws `count` problems with distinct questions not in `exclude`, from `rng`. With several
/// configs, each draw first picks one uniformly (no extra draw with a single config).
fn distinct_problems(
    configs: &[SyntheticConfig],
    rng: &mut ChaCha8Rng,
    count: usize,
    exclude: &HashSet<String>,
    what: &str,
) -> anyhow::Result<Vec<SyntheticProblem>> {
    let max_draws = 20 * count + 1000;
    let mut seen = HashSet::with_capacity(count);
    let mut problems = Vec::with_capacity(count);
    let mut draws = 0;
    while problems.len() < count {
        anyhow::ensure!(
            draws < max_draws,
            "synthetic task: found only {} distinct {what} problems in {draws} draws (wanted \
             {count}); raise the difficulty or ask for fewer",
            problems.len()
        );
        draws += 1;
        let config = match configs {
            [only] => only,
            _ => &configs[uniform_below(rng, configs.len() as u64) as usize],
        };
        let problem = generate_problem(config, rng);
        if !exclude.contains(&problem.question) && seen.insert(problem.question.clone()) {
            problems.push(problem);
        }
    }
    Ok(problems)
}

/// `n_train` training and `n_heldout` held-out problems, reproducible from `seed`.
///
/// The held-out problems come from ChaCha8 stream 1 of `seed` and the training problems
/// from stream 0, skipping any held-out question; all questions are distinct.
pub fn generate_split(
    config: &SyntheticConfig,
    seed: u64,
    n_train: usize,
    n_heldout: usize,
) -> anyhow::Result<SyntheticSplit> {
    generate_mixed_split(std::slice::from_ref(config), seed, n_train, n_heldout)
}

/// Like [`generate_split`], but each problem's difficulty is drawn uniformly from `configs`
/// (e.g. preset levels 1–4 mixed). Duplicate questions are redrawn, so a config with few
/// distinct problems (level 1) ends up below its nominal share in large sets. With a single
/// config this is exactly [`generate_split`].
pub fn generate_mixed_split(
    configs: &[SyntheticConfig],
    seed: u64,
    n_train: usize,
    n_heldout: usize,
) -> anyhow::Result<SyntheticSplit> {
    anyhow::ensure!(!configs.is_empty(), "synthetic task: no difficulty given");
    for config in configs {
        config.validate()?;
    }
    let mut heldout_rng = ChaCha8Rng::seed_from_u64(seed);
    heldout_rng.set_stream(1);
    let heldout = distinct_problems(
        configs,
        &mut heldout_rng,
        n_heldout,
        &HashSet::new(),
        "held-out",
    )?;
    let heldout_questions: HashSet<String> = heldout.iter().map(|p| p.question.clone()).collect();
    let mut train_rng = ChaCha8Rng::seed_from_u64(seed);
    train_rng.set_stream(0);
    let train = distinct_problems(
        configs,
        &mut train_rng,
        n_train,
        &heldout_questions,
        "training",
    )?;
    Ok(SyntheticSplit { train, heldout })
}

/// Every question and solution text, for training a tokenizer on the task's vocabulary.
pub fn corpus(problems: &[SyntheticProblem]) -> Vec<String> {
    problems
        .iter()
        .flat_map(|p| [p.question.clone(), p.solution.clone()])
        .collect()
}

/// The problems as a prompt dataset (ids 0.., prompts built by `config`).
pub fn to_dataset(
    problems: &[SyntheticProblem],
    config: &PromptDatasetConfig,
) -> anyhow::Result<PromptDataset> {
    let records = problems
        .iter()
        .enumerate()
        .map(|(i, p)| p.prompt_record(i, config))
        .collect();
    PromptDataset::new("synthetic", records)
}

/// Writes the problems as JSON lines `{"id", "problem", "solution", "answer"}`, a file that
/// [`PromptDataset::load`] reads with the default field names.
pub fn write_jsonl(problems: &[SyntheticProblem], path: impl AsRef<Path>) -> anyhow::Result<()> {
    #[derive(Serialize)]
    struct Line<'a> {
        id: usize,
        problem: &'a str,
        solution: &'a str,
        answer: &'a str,
    }
    let path = path.as_ref();
    let mut out = Vec::new();
    for (id, p) in problems.iter().enumerate() {
        serde_json::to_writer(
            &mut out,
            &Line {
                id,
                problem: &p.question,
                solution: &p.solution,
                answer: &p.answer,
            },
        )?;
        out.push(b'\n');
    }
    let mut file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(&out)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::record::Prompt;

    /// Evaluates a question's expression with the usual precedence (independent check).
    fn evaluate(expr: &str) -> i64 {
        fn expr_(s: &[u8], i: &mut usize) -> i64 {
            let mut v = term(s, i);
            while *i < s.len() && (s[*i] == b'+' || s[*i] == b'-') {
                let op = s[*i];
                *i += 1;
                let t = term(s, i);
                v = if op == b'+' { v + t } else { v - t };
            }
            v
        }
        fn term(s: &[u8], i: &mut usize) -> i64 {
            let mut v = atom(s, i);
            while *i < s.len() && s[*i] == b'*' {
                *i += 1;
                v *= atom(s, i);
            }
            v
        }
        fn atom(s: &[u8], i: &mut usize) -> i64 {
            if s[*i] == b'(' {
                *i += 1;
                let v = expr_(s, i);
                assert_eq!(s[*i], b')');
                *i += 1;
                v
            } else {
                let start = *i;
                while *i < s.len() && s[*i].is_ascii_digit() {
                    *i += 1;
                }
                std::str::from_utf8(&s[start..*i]).unwrap().parse().unwrap()
            }
        }
        let mut i = 0;
        let v = expr_(expr.as_bytes(), &mut i);
        assert_eq!(i, expr.len(), "unparsed rest in {expr}");
        v
    }

    fn expression(question: &str) -> &str {
        question
            .strip_prefix("Compute ")
            .and_then(|q| q.strip_suffix('.'))
            .unwrap()
    }

    #[test]
    fn solutions_are_correct_step_by_step() {
        for level in 1..=4 {
            let config = SyntheticConfig::level(level).unwrap();
            let split = generate_split(&config, 11, 300, 50).unwrap();
            for p in split.train.iter().chain(&split.heldout) {
                let value = evaluate(expression(&p.question));
                assert_eq!(value.to_string(), p.answer, "{p:?}");
                let lines: Vec<&str> = p.solution.lines().collect();
                assert_eq!(lines.last().unwrap(), &format!("\\boxed{{{}}}", p.answer));
                let steps = &lines[..lines.len() - 1];
                assert!(
                    (config.min_ops..=config.max_ops).contains(&steps.len()),
                    "{p:?}"
                );
                // Each step line is `a op b = c` with c = a op b, within range.
                let mut last = None;
                for step in steps {
                    let (lhs, rhs) = step.split_once('=').unwrap();
                    let c: u64 = rhs.parse().unwrap();
                    assert_eq!(evaluate(lhs), c as i64, "{step}");
                    assert!(c <= config.max_value);
                    last = Some(c);
                }
                assert_eq!(last.unwrap().to_string(), p.answer);
            }
        }
    }

    /// Builds a problem from a fixed list of choices.
    fn scripted(config: &SyntheticConfig, choices: &[u64]) -> SyntheticProblem {
        let mut it = choices.iter();
        let p = build_problem(config, &mut |n| {
            let c = *it.next().expect("script too short");
            assert!(c < n, "scripted choice {c} not below {n}");
            c
        });
        assert!(it.next().is_none(), "script too long");
        p
    }

    #[test]
    fn hand_checked_examples() {
        let config = SyntheticConfig {
            min_ops: 2,
            max_ops: 4,
            max_operand: 60,
            max_factor: 9,
            max_value: 999,
        };
        // 3 ops; start 23; +58 after; *4 after; -17.
        let p = scripted(&config, &[1, 22, 0, 57, 0, 2, 2, 0, 1, 16]);
        assert_eq!(p.question, "Compute (23+58)*4-17.");
        assert_eq!(p.solution, "23+58=81\n81*4=324\n324-17=307\n\\boxed{307}");
        assert_eq!(p.answer, "307");
        // 3 ops; start 5; 3+ first; 2* first (brackets the sum); 4+ first (no brackets
        // around a product).
        let p = scripted(&config, &[1, 4, 0, 2, 1, 2, 0, 1, 0, 3, 1]);
        assert_eq!(p.question, "Compute 4+2*(3+5).");
        assert_eq!(p.solution, "3+5=8\n2*8=16\n4+16=20\n\\boxed{20}");
        // 2 ops; start 9; -12 is redrawn (would go negative) as -4; then 3* first wraps
        // the difference; the product 3*5 = 15.
        let p = scripted(&config, &[0, 8, 1, 11, 1, 3, 2, 1, 1]);
        assert_eq!(p.question, "Compute 3*(9-4).");
        assert_eq!(p.solution, "9-4=5\n3*5=15\n\\boxed{15}");
        // A product times a number, operand first: brackets keep the reading order.
        let p = scripted(&config, &[0, 6, 2, 0, 0, 2, 3, 1]);
        assert_eq!(p.question, "Compute 5*(7*2).");
        assert_eq!(p.solution, "7*2=14\n5*14=70\n\\boxed{70}");
    }

    #[test]
    fn bracket_rules_hold_on_many_problems() {
        // Drive the renderer through its bracket rules with a fixed sequence of problems.
        let config = SyntheticConfig::level(3).unwrap();
        let split = generate_split(&config, 5, 2000, 0).unwrap();
        let has = |pred: &dyn Fn(&SyntheticProblem) -> bool| split.train.iter().any(pred);
        // A sum multiplied: bracketed on the left.
        assert!(has(
            &|p| p.question.starts_with("Compute (") && p.solution.lines().count() >= 3
        ));
        // Every bracket pair is balanced and no question has an empty pair.
        for p in &split.train {
            assert_eq!(
                p.question.matches('(').count(),
                p.question.matches(')').count()
            );
            assert!(!p.question.contains("()"));
        }
        // An explicit example of the format.
        let p = &split.train[0];
        assert!(p.question.starts_with("Compute ") && p.question.ends_with('.'));
        assert!(!p.solution.contains(' '));
    }

    #[test]
    fn reproducible_and_disjoint() {
        let config = SyntheticConfig::default();
        let a = generate_split(&config, 1, 500, 100).unwrap();
        let b = generate_split(&config, 1, 500, 100).unwrap();
        assert_eq!(a, b);
        let c = generate_split(&config, 2, 500, 100).unwrap();
        assert_ne!(a.train, c.train);
        let held: HashSet<&str> = a.heldout.iter().map(|p| p.question.as_str()).collect();
        assert!(a.train.iter().all(|p| !held.contains(p.question.as_str())));
        let train: HashSet<&str> = a.train.iter().map(|p| p.question.as_str()).collect();
        assert_eq!(train.len(), 500);
        assert_eq!(held.len(), 100);
        // The held-out set does not depend on the training set's size.
        let d = generate_split(&config, 1, 50, 100).unwrap();
        assert_eq!(d.heldout, a.heldout);
        assert_eq!(d.train[..], a.train[..50]);
    }

    #[test]
    fn mixed_levels_draw_every_level_and_one_level_is_unchanged() {
        let levels: Vec<SyntheticConfig> = (1..=4)
            .map(|l| SyntheticConfig::level(l).unwrap())
            .collect();
        let a = generate_mixed_split(&levels, 9, 400, 400).unwrap();
        assert_eq!(a, generate_mixed_split(&levels, 9, 400, 400).unwrap());
        // Operation counts tell the levels apart: 1 op is level 1 only, 5 ops level 4 only.
        let ops = |p: &SyntheticProblem| p.solution.lines().count() - 1;
        for set in [&a.train, &a.heldout] {
            assert!(set.iter().any(|p| ops(p) == 1), "no level-1 problem");
            assert!(set.iter().any(|p| ops(p) == 5), "no level-4 problem");
            let hard = set.iter().filter(|p| ops(p) >= 4).count();
            assert!((50..250).contains(&hard), "{hard} problems with 4-5 ops");
        }
        let held: HashSet<&str> = a.heldout.iter().map(|p| p.question.as_str()).collect();
        assert!(a.train.iter().all(|p| !held.contains(p.question.as_str())));
        // A single config draws exactly as generate_split.
        let one = SyntheticConfig::level(3).unwrap();
        assert_eq!(
            generate_mixed_split(std::slice::from_ref(&one), 9, 100, 50).unwrap(),
            generate_split(&one, 9, 100, 50).unwrap()
        );
        assert!(generate_mixed_split(&[], 9, 1, 1).is_err());
    }

    #[test]
    fn texts_stay_short() {
        for level in 1..=3 {
            let config = SyntheticConfig::level(level).unwrap();
            let split = generate_split(&config, 3, 2000, 0).unwrap();
            let longest_solution = split.train.iter().map(|p| p.solution.len()).max().unwrap();
            let longest_question = split.train.iter().map(|p| p.question.len()).max().unwrap();
            assert!(
                longest_solution <= 60,
                "level {level}: {longest_solution} bytes"
            );
            assert!(
                longest_question <= 40,
                "level {level}: {longest_question} bytes"
            );
        }
    }

    #[test]
    fn too_many_problems_for_a_tiny_space_is_an_error() {
        let config = SyntheticConfig {
            min_ops: 1,
            max_ops: 1,
            max_operand: 1,
            max_factor: 0,
            max_value: 2,
        };
        // Only "1+1" and "1-1" exist.
        let split = generate_split(&config, 0, 1, 1).unwrap();
        assert_ne!(split.train[0].question, split.heldout[0].question);
        let err = generate_split(&config, 0, 5, 0).unwrap_err().to_string();
        assert!(err.contains("distinct training problems"), "{err}");
        assert!(SyntheticConfig::level(9).is_err());
        let bad = SyntheticConfig {
            min_ops: 3,
            max_ops: 2,
            ..SyntheticConfig::default()
        };
        assert!(generate_split(&bad, 0, 1, 1).is_err());
    }

    #[test]
    fn corpus_records_and_jsonl_round_trip() {
        let split = generate_split(&SyntheticConfig::default(), 4, 3, 0).unwrap();
        let texts = corpus(&split.train);
        assert_eq!(texts.len(), 6);
        assert_eq!(texts[0], split.train[0].question);
        assert_eq!(texts[1], split.train[0].solution);

        let config = PromptDatasetConfig {
            apply_chat_template: false,
            ..Default::default()
        };
        let dataset = to_dataset(&split.train, &config).unwrap();
        assert_eq!(
            dataset.records[2].prompt,
            Prompt::Text(split.train[2].question.clone())
        );
        assert_eq!(
            dataset.records[2].answer.as_deref(),
            Some(split.train[2].answer.as_str())
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("synthetic.jsonl");
        write_jsonl(&split.train, &path).unwrap();
        let loaded = PromptDataset::load(&path, &config).unwrap();
        for (a, b) in loaded.records.iter().zip(&dataset.records) {
            assert_eq!((&a.id, &a.prompt, &a.answer), (&b.id, &b.prompt, &b.answer));
        }
    }
}
