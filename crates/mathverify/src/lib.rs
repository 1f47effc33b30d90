//! Answer extraction and mathematical equivalence for verifiable math rewards.
//!
//! A pure-Rust counterpart of Hugging Face's math-verify: it finds the final answer in model
//! text (`\boxed{}`, "final answer is", `$…$`, plain numbers), parses LaTeX or plain math into
//! an [`Expr`] with exact big-rational arithmetic, and decides equivalence (exactly where
//! possible, otherwise numerically at deterministic pseudo-random points). Work is bounded by
//! size limits instead of timeouts, so every function is safe to call from many threads and
//! never panics on any input.
//!
//! ```
//! assert!(mathverify::is_correct("\\frac{1}{2}", "so the answer is $\\boxed{0.5}$"));
//! assert!(!mathverify::is_correct("3", "The answer is 4."));
//! ```

pub mod compare;
pub mod eval;
pub mod expr;
pub mod extract;
pub mod normalize;
pub mod parser;

pub use expr::{Constant, Expr, Func, Number, RelOp};

/// Which kinds of spans are looked for in text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchType {
    /// LaTeX: `\boxed{}`, `$…$`, `\[…\]`, …
    Latex,
    /// Plain numbers and simple expressions such as `1,000.5` or `2/3`.
    Expr,
}

/// Options mirroring math-verify's `parse`/`verify` arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// Decimal places to which a decimal answer is compared (math-verify `float_rounding`).
    pub float_rounding: u32,
    /// Variables matter (`f(x)` ≠ `f(y)`); when false, the prediction's variables are renamed
    /// onto the gold's.
    pub strict: bool,
    /// Compare a gold set with a predicted relation (`[-2,7]` vs `-2 ≤ x ≤ 7`); a gold relation
    /// against a predicted set is always compared.
    pub allow_set_relation_comp: bool,
    /// Span kinds extracted from text.
    pub match_types: Vec<MatchType>,
    /// Priority of `\boxed{}` spans (0 = before everything; `None` disables them). Other
    /// priorities: "final answer is … I hope" 0, "final answer … is" 50, "answer:" 100,
    /// "answer" 200, anywhere 300.
    pub boxed_match_priority: Option<u32>,
    /// Also take spans that follow no "answer" anchor (the last number, the last `$…$`).
    pub try_extract_without_anchor: bool,
    /// Accept `28` for a gold `28\%` (and `28\%` for a gold `28`). Not in math-verify.
    pub lenient_percent: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            float_rounding: 6,
            strict: true,
            allow_set_relation_comp: false,
            match_types: vec![MatchType::Latex, MatchType::Expr],
            boxed_match_priority: Some(0),
            try_extract_without_anchor: true,
            lenient_percent: true,
        }
    }
}

/// One extracted answer: a parsed expression, or a string fallback.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// A parsed answer and the normalised text it came from.
    Expr { expr: Expr, text: String },
    /// Text that did not parse; compared only with other text.
    Text(String),
}

impl Answer {
    /// The answer's text as printed in reports (the parsed form for expressions).
    pub fn display(&self) -> String {
        match self {
            Answer::Expr { expr, .. } => expr.to_string(),
            Answer::Text(s) => s.clone(),
        }
    }

    /// The source text of the answer.
    pub fn source(&self) -> &str {
        match self {
            Answer::Expr { text, .. } => text,
            Answer::Text(s) => s,
        }
    }
}

/// Extract the answer(s) of free text `text`: the first span (by priority, rightmost first)
/// that parses, followed by the first span's text as a string fallback.
pub fn extract_answers(text: &str, opts: &Options) -> Vec<Answer> {
    let (parsed, fallback) = extract::extract(text, opts);
    let mut out = Vec::new();
    if let Some(ex) = parsed {
        if let Some(e) = ex.expr {
            out.push(Answer::Expr {
                expr: e,
                text: ex.text,
            });
        }
    }
    if let Some(f) = fallback {
        out.push(Answer::Text(f));
    }
    out
}

/// The answers extracted from `text`, printed (parsed form first, then the source text).
pub fn extract_answer_strings(text: &str, opts: &Options) -> Vec<String> {
    extract_answers(text, opts)
        .iter()
        .map(Answer::display)
        .collect()
}

fn has_latex_delimiters(s: &str) -> bool {
    s.replace("\\$", "").contains('$')
        || s.contains("\\boxed")
        || s.contains("\\fbox")
        || s.contains("\\(")
        || s.contains("\\[")
}

/// Parse a reference answer: a bare LaTeX or plain answer (`\frac{14}{3}`, `x^2+1`, `1,000`)
/// is parsed whole; text with `$…$`/`\boxed{}` goes through [`extract_answers`].
pub fn parse_gold(gold: &str, opts: &Options) -> Vec<Answer> {
    if !has_latex_delimiters(gold) {
        let norm = normalize::normalize_latex(gold, normalize::BoxedMode::All);
        if let Some(e) = extract::parse_latex_normalized(&norm) {
            return vec![
                Answer::Expr {
                    expr: e,
                    text: norm.clone(),
                },
                Answer::Text(norm),
            ];
        }
    }
    extract_answers(gold, opts)
}

/// Whether any gold answer equals any predicted answer (expressions by [`compare::expr_eq`],
/// strings by trimmed equality).
pub fn verify(gold: &[Answer], pred: &[Answer], opts: &Options) -> bool {
    gold.iter().any(|g| {
        pred.iter().any(|p| match (g, p) {
            (Answer::Expr { expr: ge, .. }, Answer::Expr { expr: pe, .. }) => {
                compare::expr_eq(ge, pe, opts)
            }
            (Answer::Text(a), Answer::Text(b)) => {
                let (a, b) = (a.trim(), b.trim());
                !a.is_empty() && a == b
            }
            _ => false,
        })
    })
}

/// The outcome of checking one completion against one gold answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Whether the completion's answer equals the gold answer.
    pub correct: bool,
    /// The gold answers as parsed (printed).
    pub gold: Vec<String>,
    /// The completion's extracted answers (printed).
    pub pred: Vec<String>,
}

/// Check `completion` against `gold` with `opts`, returning the extracted answers too.
pub fn check(gold: &str, completion: &str, opts: &Options) -> Verdict {
    let g = parse_gold(gold, opts);
    let p = extract_answers(completion, opts);
    Verdict {
        correct: verify(&g, &p, opts),
        gold: g.iter().map(Answer::display).collect(),
        pred: p.iter().map(Answer::display).collect(),
    }
}

/// Whether `completion` (free model text) states an answer mathematically equal to `gold`
/// (a reference answer in LaTeX or plain form), with default [`Options`].
pub fn is_correct(gold: &str, completion: &str) -> bool {
    let opts = Options::default();
    let g = parse_gold(gold, &opts);
    if g.is_empty() {
        return false;
    }
    let p = extract_answers(completion, &opts);
    verify(&g, &p, &opts)
}
