//! Finding the answer in free text.
//!
//! Candidate spans are found by hand-written scanners (linear, with precomputed "next
//! delimiter" tables so no input is scanned quadratically) and ranked like math-verify:
//!
//! | priority | LaTeX                                         | plain numbers / expressions            |
//! |---------:|-----------------------------------------------|----------------------------------------|
//! | 0        | `final answer is $…$. I hope`                 | `final answer is 42. I hope`           |
//! | boxed    | `\boxed{…}` (last box, adjacent boxes joined) |                                        |
//! | 50       | `final answer … is $…$`                       | `final answer … is 42`                 |
//! | 100      | `answer: … $…$` (≤ 50 chars apart)            | `answer: … = 42` / `answer: … 42`      |
//! | 200      | `answer … $…$`                                | `answer … = 42` / `answer … 42`        |
//! | 300      | any `$…$`, `$$…$$`, `\(…\)`, `\[…\]`, `\frac{a}{b}` | any number or `2/3`-like expression |
//!
//! Within one priority the rightmost span is tried first; the first that parses wins. LaTeX
//! environments joined by `,`/`and`/`or` (up to six) form one answer (a set).

use crate::expr::Expr;
use crate::normalize::{normalize_latex, BoxedMode};
use crate::parser::{decimal_number, parse_math};
use crate::{MatchType, Options};

/// Spans longer than this (bytes) are not normalised or parsed.
pub const MAX_SPAN_BYTES: usize = 20_000;

/// At most this many candidate spans are parsed for one text.
pub const MAX_PARSE_ATTEMPTS: usize = 64;

/// The parsed answer of one span and its text.
#[derive(Clone, Debug)]
pub struct Extracted {
    /// The parsed expression, when the span parsed.
    pub expr: Option<Expr>,
    /// The normalised text of the span (the string fallback).
    pub text: String,
}

#[derive(Clone, Debug)]
struct LatexPart {
    content: String,
    boxed_raw: bool,
    percent: bool,
}

#[derive(Clone, Debug)]
enum Kind {
    Latex(Vec<LatexPart>),
    Number {
        int: String,
        frac: String,
        float: bool,
        percent: bool,
        shown: String,
    },
    Formula(String),
    /// The inside of `<answer>…</answer>`.
    Tagged(String),
}

#[derive(Clone, Debug)]
struct Candidate {
    priority: u32,
    start: usize,
    end: usize,
    kind: Kind,
}

struct Text {
    c: Vec<char>,
    /// next index ≥ i of "$$" not preceded by a backslash
    next_dd: Vec<usize>,
    /// next index ≥ i of "\]"
    next_rbracket: Vec<usize>,
    /// next index ≥ i of "\)"
    next_rparen: Vec<usize>,
    /// next index ≥ i of '\n'
    next_newline: Vec<usize>,
    /// number of "\boxed{" starting before i
    boxed_count: Vec<u32>,
}

impl Text {
    fn new(s: &str) -> Text {
        let c: Vec<char> = s.chars().collect();
        let n = c.len();
        let mut next_dd = vec![n; n + 1];
        let mut next_rbracket = vec![n; n + 1];
        let mut next_rparen = vec![n; n + 1];
        let mut next_newline = vec![n; n + 1];
        for i in (0..n).rev() {
            next_dd[i] =
                if c[i] == '$' && i + 1 < n && c[i + 1] == '$' && (i == 0 || c[i - 1] != '\\') {
                    i
                } else {
                    next_dd[i + 1]
                };
            next_rbracket[i] =
                if c[i] == '\\' && i + 1 < n && c[i + 1] == ']' && (i == 0 || c[i - 1] != '\\') {
                    i
                } else {
                    next_rbracket[i + 1]
                };
            next_rparen[i] =
                if c[i] == '\\' && i + 1 < n && c[i + 1] == ')' && (i == 0 || c[i - 1] != '\\') {
                    i
                } else {
                    next_rparen[i + 1]
                };
            next_newline[i] = if c[i] == '\n' { i } else { next_newline[i + 1] };
        }
        let mut boxed_count = vec![0u32; n + 1];
        let pat: Vec<char> = "\\boxed{".chars().collect();
        for i in 0..n {
            let hit = i + pat.len() <= n && c[i..i + pat.len()] == pat[..];
            boxed_count[i + 1] = boxed_count[i] + hit as u32;
        }
        Text {
            c,
            next_dd,
            next_rbracket,
            next_rparen,
            next_newline,
            boxed_count,
        }
    }

    fn len(&self) -> usize {
        self.c.len()
    }

    fn at(&self, i: usize) -> Option<char> {
        self.c.get(i).copied()
    }

    fn slice(&self, a: usize, b: usize) -> String {
        self.c[a.min(self.len())..b.min(self.len())]
            .iter()
            .collect()
    }

    fn starts_with(&self, i: usize, pat: &str) -> bool {
        (i..).zip(pat.chars()).all(|(k, p)| self.at(k) == Some(p))
    }

    fn starts_with_ci(&self, i: usize, pat: &str) -> bool {
        (i..)
            .zip(pat.chars())
            .all(|(k, p)| self.at(k).is_some_and(|c| c.to_ascii_lowercase() == p))
    }

    /// Whether `[a, b)` contains a `\boxed{` that starts and ends inside.
    fn contains_boxed(&self, a: usize, b: usize) -> bool {
        if b < a + 8 {
            return false;
        }
        self.boxed_count[b - 7] > self.boxed_count[a]
    }

    fn is_space(&self, i: usize) -> bool {
        self.at(i).is_some_and(|c| c.is_whitespace())
    }

    fn skip_spaces(&self, mut i: usize) -> usize {
        while self.is_space(i) {
            i += 1;
        }
        i
    }
}

/// One LaTeX environment starting at `p`: (content start, content end, match end).
fn env_at(t: &Text, p: usize, boxed: bool) -> Option<(usize, usize, usize)> {
    let n = t.len();
    let c = t.at(p)?;
    let prev = if p > 0 { t.at(p - 1) } else { None };
    let check = |a: usize, b: usize| -> bool { b > a && (!boxed || t.contains_boxed(a, b)) };
    // $$ … $$
    if c == '$' && t.at(p + 1) == Some('$') && prev != Some('\\') {
        let q = t.next_dd[(p + 3).min(n)];
        if q < n && check(p + 2, q) {
            return Some((p + 2, q, q + 2));
        }
    }
    // \[ … \]
    if c == '\\' && t.at(p + 1) == Some('[') && prev != Some('\\') {
        let q = t.next_rbracket[(p + 3).min(n)];
        if q < n && check(p + 2, q) {
            return Some((p + 2, q, q + 2));
        }
    }
    // $ … $ (one line, `\$` allowed inside)
    if c == '$' && prev != Some('\\') && !prev.is_some_and(|d| d.is_ascii_digit()) {
        let mut k = p + 1;
        let limit = t.next_newline[p];
        while k < limit {
            match t.c[k] {
                '\\' if t.at(k + 1) == Some('$') => k += 2,
                '$' => break,
                _ => k += 1,
            }
        }
        if k < limit && t.at(k) == Some('$') && check(p + 1, k) {
            return Some((p + 1, k, k + 1));
        }
    }
    // \( … \) (one line)
    if c == '\\' && t.at(p + 1) == Some('(') && prev != Some('\\') {
        let q = t.next_rparen[(p + 3).min(n)];
        if q < n && q < t.next_newline[p] && check(p + 2, q) {
            return Some((p + 2, q, q + 2));
        }
    }
    // " [ … ] " (one line, no brackets inside)
    if c.is_whitespace() && t.at(p + 1) == Some('[') {
        let mut k = p + 2;
        while k < n && !matches!(t.c[k], '\n' | ']' | '[') && k < p + 2 + 2000 {
            k += 1;
        }
        if t.at(k) == Some(']') && t.is_space(k + 1) && check(p + 2, k) {
            return Some((p + 2, k, k + 2));
        }
    }
    None
}

/// `-?\frac{num}{num}` with simple numbers, outside any environment.
fn bare_fraction_at(t: &Text, p: usize) -> Option<usize> {
    let mut k = p;
    if t.at(k) == Some('-') {
        k += 1;
    }
    if !t.starts_with(k, "\\frac{") {
        return None;
    }
    k += 6;
    let simple_number = |mut k: usize| -> Option<usize> {
        if t.at(k) == Some('-') {
            k += 1;
        }
        let s = k;
        while t.at(k).is_some_and(|c| c.is_ascii_digit()) {
            k += 1;
        }
        if k == s {
            return None;
        }
        if matches!(t.at(k), Some('.') | Some(','))
            && t.at(k + 1).is_some_and(|c| c.is_ascii_digit())
        {
            k += 1;
            while t.at(k).is_some_and(|c| c.is_ascii_digit()) {
                k += 1;
            }
        }
        Some(k)
    };
    k = simple_number(k)?;
    if t.at(k) != Some('}') || t.at(k + 1) != Some('{') {
        return None;
    }
    k = simple_number(k + 2)?;
    if t.at(k) != Some('}') {
        return None;
    }
    Some(k + 1)
}

/// Optional `\s*` + percent word after an environment; returns (end, is_percent).
fn percent_suffix(t: &Text, e: usize) -> (usize, bool) {
    let k = t.skip_spaces(e);
    for w in [
        "\\%",
        "%",
        "Percentage",
        "percentage",
        "Percent",
        "percent",
        "Pct",
        "pct",
    ] {
        if t.starts_with(k, w) {
            return (k + w.chars().count(), true);
        }
    }
    (e, false)
}

/// One environment with its percent suffix.
fn env_part_at(t: &Text, p: usize, boxed: bool, plain: bool) -> Option<(LatexPart, usize)> {
    if let Some((a, b, e)) = env_at(t, p, boxed) {
        let (end, percent) = percent_suffix(t, e);
        return Some((
            LatexPart {
                content: t.slice(a, b),
                boxed_raw: false,
                percent,
            },
            end,
        ));
    }
    if plain && !boxed {
        if let Some(e) = bare_fraction_at(t, p) {
            let (end, percent) = percent_suffix(t, e);
            return Some((
                LatexPart {
                    content: t.slice(p, e),
                    boxed_raw: false,
                    percent,
                },
                end,
            ));
        }
    }
    None
}

/// An environment followed by up to five more joined by `,` / `and` / `or`.
fn env_group_at(t: &Text, p: usize, boxed: bool) -> Option<(Vec<LatexPart>, usize)> {
    let (first, mut end) = env_part_at(t, p, boxed, true)?;
    let mut parts = vec![first];
    for _ in 0..5 {
        let mut k = t.skip_spaces(end);
        let mut sep = false;
        if t.at(k) == Some(',') {
            k += 1;
            sep = true;
        }
        if t.starts_with(k, "and") {
            k += 3;
            sep = true;
        } else if t.starts_with(k, "or") {
            k += 2;
            sep = true;
        }
        if !sep {
            break;
        }
        k = t.skip_spaces(k);
        match env_part_at(t, k, boxed, true) {
            Some((part, e)) => {
                parts.push(part);
                end = e;
            }
            None => break,
        }
    }
    Some((parts, end))
}

/// All occurrences (case-insensitive) of `word`, as start indices.
fn find_all_ci(t: &Text, word: &str) -> Vec<usize> {
    let first = word.chars().next().unwrap_or(' ');
    (0..t.len())
        .filter(|&i| t.c[i].to_ascii_lowercase() == first && t.starts_with_ci(i, word))
        .collect()
}

/// "I hope" tail of the priority-0 pattern: `\.?\s?I hope`.
fn i_hope_at(t: &Text, mut k: usize) -> Option<usize> {
    if t.at(k) == Some('.') {
        k += 1;
    }
    if t.is_space(k) {
        k += 1;
    }
    if t.starts_with(k, "I hope") {
        Some(k + 6)
    } else {
        None
    }
}

fn latex_candidates(t: &Text, opts: &Options, out: &mut Vec<Candidate>) {
    let n = t.len();
    // priority 0: final answer is $…$. I hope
    for a in find_all_ci(t, "final answer is") {
        let mut k = a + 15;
        if t.at(k) == Some(':') {
            k += 1;
        }
        k = t.skip_spaces(k);
        if let Some((parts, e)) = env_group_at(t, k, false) {
            if let Some(end) = i_hope_at(t, e) {
                out.push(Candidate {
                    priority: 0,
                    start: a,
                    end,
                    kind: Kind::Latex(parts),
                });
            }
        }
    }
    // priority 50: final answer … is $…$
    let mut next_free = 0;
    for a in find_all_ci(t, "final answer") {
        if a < next_free {
            continue;
        }
        let base = a + 12;
        for g in 0..=100 {
            let k = base + g;
            if k >= n {
                break;
            }
            if !t.is_space(k) {
                continue;
            }
            let mut j = t.skip_spaces(k);
            if !t.starts_with(j, "is") {
                continue;
            }
            j += 2;
            if t.at(j) == Some(':') {
                j += 1;
            }
            j = t.skip_spaces(j);
            if let Some((parts, e)) = env_group_at(t, j, false) {
                out.push(Candidate {
                    priority: 50,
                    start: a,
                    end: e,
                    kind: Kind::Latex(parts),
                });
                next_free = e;
                break;
            }
        }
    }
    // priorities 100 / 200: answer: … $…$ and answer … $…$
    for (prio, colon) in [(100u32, true), (200u32, false)] {
        let mut next_free = 0;
        for a in find_all_ci(t, "answer") {
            if a < next_free {
                continue;
            }
            let mut base = a + 6;
            if colon {
                if t.at(base) != Some(':') {
                    continue;
                }
                base += 1;
            }
            for g in 0..=50 {
                let k = base + g;
                if k >= n {
                    break;
                }
                if let Some((parts, e)) = env_group_at(t, k, false) {
                    out.push(Candidate {
                        priority: prio,
                        start: a,
                        end: e,
                        kind: Kind::Latex(parts),
                    });
                    next_free = e;
                    break;
                }
            }
        }
    }
    // priority 300: any environment
    if opts.try_extract_without_anchor {
        let mut p = 0;
        while p < n {
            if let Some((parts, e)) = env_group_at(t, p, false) {
                out.push(Candidate {
                    priority: 300,
                    start: p,
                    end: e,
                    kind: Kind::Latex(parts),
                });
                p = e.max(p + 1);
            } else {
                p += 1;
            }
        }
    }
    // boxed
    if let Some(bp) = opts.boxed_match_priority {
        let mut p = 0;
        while p < n {
            if let Some((parts, e)) = env_group_at(t, p, true) {
                out.push(Candidate {
                    priority: bp,
                    start: p,
                    end: e,
                    kind: Kind::Latex(parts),
                });
                p = e.max(p + 1);
            } else {
                p += 1;
            }
        }
        // raw \boxed{ … } spanning to the last closing brace
        let first_box =
            (0..n).find(|&i| t.starts_with(i, "\\boxed{") || t.starts_with(i, "\\fbox{"));
        let last_close = t.c.iter().rposition(|&c| c == '}');
        if let (Some(s), Some(e)) = (first_box, last_close) {
            if e > s + 6 {
                out.push(Candidate {
                    priority: bp,
                    start: s,
                    end: e + 1,
                    kind: Kind::Latex(vec![LatexPart {
                        content: t.slice(s, e + 1),
                        boxed_raw: true,
                        percent: false,
                    }]),
                });
            }
        }
    }
}

const CURRENCY: &str = "$€£¥₹₽₪₩₫฿₡₢₣₤₥₦₧₨₭₮₯₰₱₲₳₴₵₶₷₸₺₻₼₾₿";

fn digits_from(t: &Text, k: usize) -> usize {
    let mut j = k;
    while t.at(j).is_some_and(|c| c.is_ascii_digit()) {
        j += 1;
    }
    j
}

/// A number body at `b` (after prefix and currency): returns (end, kind).
fn number_body_at(t: &Text, b: usize) -> Option<(usize, Kind)> {
    let neg = t.at(b) == Some('-');
    let s = if neg { b + 1 } else { b };
    let sign = if neg { "-" } else { "" };
    let finish = |end: usize, int: String, frac: String| -> (usize, Kind) {
        let (pend, percent) = number_percent(t, end);
        let int_clean: String = int.chars().filter(|c| *c != ',' && *c != ' ').collect();
        let trimmed = int_clean.trim_start_matches('0');
        let int_final = if trimmed.is_empty() {
            "0".to_string()
        } else {
            trimmed.to_string()
        };
        let float = !frac.is_empty();
        let shown = if float {
            format!("{sign}{int_final}.{frac}")
        } else {
            format!("{sign}{int_final}")
        };
        let int_signed = format!("{sign}{int_final}");
        (
            pend,
            Kind::Number {
                int: int_signed,
                frac,
                float,
                percent,
                shown,
            },
        )
    };
    // F1: thousands groups
    if t.at(s).is_some_and(|c| ('1'..='9').contains(&c)) {
        let run = digits_from(t, s);
        for lead in (1..=3usize).rev() {
            if s + lead > run {
                continue;
            }
            let mut k = s + lead;
            let mut groups = 0;
            while matches!(t.at(k), Some(' ') | Some(',')) && digits_from(t, k + 1) >= k + 4 {
                k += 4;
                groups += 1;
            }
            if groups > 0 {
                let int = t.slice(s, k);
                let mut frac = String::new();
                let mut end = k;
                if t.at(k) == Some('.') && t.at(k + 1).is_some_and(|c| c.is_ascii_digit()) {
                    let fe = digits_from(t, k + 1);
                    frac = t.slice(k + 1, fe);
                    end = fe;
                }
                return Some(finish(end, int, frac));
            }
        }
    }
    // F2: digits [.,] digits
    let run = digits_from(t, s);
    if run > s
        && matches!(t.at(run), Some('.') | Some(','))
        && t.at(run + 1).is_some_and(|c| c.is_ascii_digit())
    {
        let fe = digits_from(t, run + 1);
        return Some(finish(fe, t.slice(s, run), t.slice(run + 1, fe)));
    }
    // F3: .digits
    if !neg && t.at(b) == Some('.') && t.at(b + 1).is_some_and(|c| c.is_ascii_digit()) {
        let fe = digits_from(t, b + 1);
        return Some(finish(fe, String::new(), t.slice(b + 1, fe)));
    }
    // F4: digits
    if run > s {
        return Some(finish(run, t.slice(s, run), String::new()));
    }
    None
}

fn number_percent(t: &Text, e: usize) -> (usize, bool) {
    let k = t.skip_spaces(e);
    for w in [
        "%",
        "Percentage",
        "percentage",
        "Percent",
        "percent",
        "Pct",
        "pct",
    ] {
        if t.starts_with(k, w) {
            return (k + w.chars().count(), true);
        }
    }
    (e, false)
}

const EXPR_OPS: &[char] = &['+', '-', '*', '×', '/', '^', '(', ')', '÷'];

fn is_expr_char(c: char) -> bool {
    c.is_ascii_digit() || c == '.' || c.is_whitespace() || EXPR_OPS.contains(&c)
}

/// An expression body like `2/3` or `(1+2)*3` at `b`; returns (body end, match end).
fn formula_body_at(t: &Text, b: usize) -> Option<(usize, usize)> {
    let mut k = b;
    if t.at(k) == Some('-') {
        k += 1;
    }
    if t.at(k) == Some('(') {
        k += 1;
    }
    if t.at(k) == Some('-') {
        k += 1;
    }
    if !t.at(k).is_some_and(|c| c.is_ascii_digit()) {
        return None;
    }
    let first_digit = k;
    let mut r = k + 1;
    while r < t.len() && is_expr_char(t.c[r]) && r < first_digit + 500 {
        r += 1;
    }
    let suffix_end = |e: usize| -> Option<usize> {
        let mut j = e;
        if t.starts_with(j, "**") {
            j += 2;
        }
        match t.at(j) {
            None => Some(j),
            Some(c) if matches!(c, '.' | ',' | ':' | ')' | '$') || c.is_whitespace() => Some(j + 1),
            _ => None,
        }
    };
    // the last operator position that is followed by at least one more char before e
    let mut e = r;
    while e > first_digit + 1 {
        let has_op = (first_digit + 1..e - 1).any(|q| EXPR_OPS.contains(&t.c[q]));
        if has_op {
            if let Some(m) = suffix_end(e) {
                return Some((e, m));
            }
        } else {
            return None;
        }
        e -= 1;
    }
    None
}

/// Expression-or-number at a position whose prefix (start, whitespace or '=') is `p`.
fn expr_or_number_after_prefix(
    t: &Text,
    body: usize,
    allow_formula: bool,
    allow_number: bool,
) -> Option<(usize, Kind)> {
    let mut b = body;
    if t.starts_with(b, "**") {
        b += 2;
    }
    if allow_formula {
        if let Some((be, me)) = formula_body_at(t, b) {
            return Some((me, Kind::Formula(t.slice(b, be))));
        }
    }
    if allow_number {
        let mut nb = b;
        if t.at(nb).is_some_and(|c| CURRENCY.contains(c)) {
            nb += 1;
        }
        return number_body_at(t, nb);
    }
    None
}

/// Try the prefix rule at `q`: start of text (no char consumed) or a whitespace/`=` char.
fn anchored_at(
    t: &Text,
    q: usize,
    allow_formula: bool,
    allow_number: bool,
) -> Option<(usize, Kind)> {
    if q == 0 {
        if let Some(r) = expr_or_number_after_prefix(t, 0, allow_formula, allow_number) {
            return Some(r);
        }
    }
    if t.at(q).is_some_and(|c| c.is_whitespace() || c == '=') {
        return expr_or_number_after_prefix(t, q + 1, allow_formula, allow_number);
    }
    None
}

/// After an anchor ending at `k` followed by `\s*`: the prefix is the last space of the run.
fn after_spaces(t: &Text, k: usize) -> Option<(usize, Kind)> {
    let k1 = t.skip_spaces(k);
    if k1 > k {
        anchored_at(t, k1 - 1, true, true)
    } else {
        anchored_at(t, k, true, true)
    }
}

fn not_followed_by_eq(t: &Text, e: usize) -> bool {
    t.at(t.skip_spaces(e)) != Some('=')
}

fn expr_candidates(t: &Text, opts: &Options, out: &mut Vec<Candidate>) {
    let n = t.len();
    for a in find_all_ci(t, "final answer is") {
        let mut k = a + 15;
        if t.at(k) == Some(':') {
            k += 1;
        }
        if let Some((e, kind)) = after_spaces(t, k) {
            if let Some(end) = i_hope_at(t, e) {
                out.push(Candidate {
                    priority: 0,
                    start: a,
                    end,
                    kind,
                });
            }
        }
    }
    for a in find_all_ci(t, "final answer") {
        for g in 0..=100 {
            let k = a + 12 + g;
            if k >= n {
                break;
            }
            if !t.is_space(k) {
                continue;
            }
            let mut j = t.skip_spaces(k);
            if !t.starts_with(j, "is") {
                continue;
            }
            j += 2;
            if t.at(j) == Some(':') {
                j += 1;
            }
            if let Some((e, kind)) = anchored_at(t, j, true, true) {
                out.push(Candidate {
                    priority: 50,
                    start: a,
                    end: e,
                    kind,
                });
                break;
            }
        }
    }
    for (prio, colon) in [(100u32, true), (200u32, false)] {
        for a in find_all_ci(t, "answer") {
            let mut base = a + 6;
            if colon {
                if t.at(base) != Some(':') {
                    continue;
                }
                base += 1;
            }
            let mut found: Option<(usize, Kind)> = None;
            // greedy: the last '=' within 100 chars, then spaces, then the value
            for q in (base..(base + 101).min(n)).rev() {
                if t.at(q) == Some('=') {
                    if let Some((e, kind)) = after_spaces(t, q + 1) {
                        if not_followed_by_eq(t, e) {
                            found = Some((e, kind));
                            break;
                        }
                    }
                }
            }
            if found.is_none() {
                for g in 0..=50 {
                    let q = base + g;
                    if q >= n {
                        break;
                    }
                    if let Some((e, kind)) = anchored_at(t, q, true, true) {
                        if not_followed_by_eq(t, e) {
                            found = Some((e, kind));
                            break;
                        }
                    }
                }
            }
            if let Some((e, kind)) = found {
                out.push(Candidate {
                    priority: prio,
                    start: a,
                    end: e,
                    kind,
                });
            }
        }
    }
    if opts.try_extract_without_anchor {
        for (formula, number) in [(true, false), (false, true)] {
            let mut p = 0;
            while p < n {
                let hit = if p == 0 {
                    anchored_at(t, 0, formula, number)
                } else {
                    None
                }
                .map(|r| (0usize, r))
                .or_else(|| {
                    if t.at(p).is_some_and(|c| c.is_whitespace() || c == '=') {
                        expr_or_number_after_prefix(t, p + 1, formula, number).map(|r| (p, r))
                    } else {
                        None
                    }
                });
                match hit {
                    Some((s, (e, kind))) => {
                        out.push(Candidate {
                            priority: 300,
                            start: s,
                            end: e,
                            kind,
                        });
                        p = e.max(p + 1);
                    }
                    None => p += 1,
                }
            }
        }
    }
}

/// Parse a normalised LaTeX string; on failure retry with the part after the last `=` of a
/// chain `a = b = c` (without commas).
pub fn parse_latex_normalized(s: &str) -> Option<Expr> {
    match parse_math(s) {
        Ok(e) => Some(e),
        Err(_) => {
            if s.contains(',') || s.contains(';') {
                return None;
            }
            let parts = split_equals(s);
            if parts.len() > 2 {
                parse_math(parts[parts.len() - 1].trim()).ok()
            } else {
                None
            }
        }
    }
}

fn split_equals(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let b = s.as_bytes();
    let mut last = 0;
    for i in 0..b.len() {
        if b[i] == b'=' && !(i > 0 && matches!(b[i - 1], b'\\' | b'<' | b'!' | b'>')) {
            parts.push(&s[last..i]);
            last = i + 1;
        }
    }
    parts.push(&s[last..]);
    parts
}

fn extract_latex(parts: &[LatexPart]) -> Extracted {
    let mut exprs: Vec<Option<Expr>> = Vec::new();
    let mut strs: Vec<String> = Vec::new();
    for part in parts {
        if part.content.len() > MAX_SPAN_BYTES && !part.boxed_raw {
            // far longer than any answer: not parsed, kept only as a string fallback
            strs.push(part.content.chars().take(200).collect());
            exprs.push(None);
            continue;
        }
        let mode = if part.boxed_raw {
            BoxedMode::Last
        } else {
            BoxedMode::All
        };
        let norm = normalize_latex(&part.content, mode);
        let parsed = parse_latex_normalized(&norm).map(|e| {
            if part.percent {
                Expr::Percent(Box::new(e))
            } else {
                e
            }
        });
        strs.push(norm);
        exprs.push(parsed);
    }
    if exprs.len() > 1 && exprs.iter().all(|e| e.is_some()) {
        let mut items = Vec::new();
        for e in exprs.into_iter().flatten() {
            match e {
                Expr::Set(v) => items.extend(v),
                other => items.push(other),
            }
        }
        return Extracted {
            expr: Some(Expr::Set(items)),
            text: strs.join(" and "),
        };
    }
    Extracted {
        expr: exprs.into_iter().next().flatten(),
        text: strs.into_iter().next().unwrap_or_default(),
    }
}

fn extract_kind(kind: &Kind, opts: &Options) -> Extracted {
    match kind {
        Kind::Latex(parts) => extract_latex(parts),
        Kind::Number {
            int,
            frac,
            float,
            percent,
            shown,
        } => {
            let negative = int.starts_with('-');
            let digits = int.trim_start_matches('-');
            let mut num = decimal_number(digits, frac, *float);
            if negative {
                num.value = -num.value;
            }
            let e = Expr::Num(num);
            let e = if *percent {
                Expr::Percent(Box::new(e))
            } else {
                e
            };
            Extracted {
                expr: Some(e),
                text: shown.clone(),
            }
        }
        Kind::Tagged(inner) => {
            let norm = normalize_latex(inner.trim(), BoxedMode::Last);
            if let Some(e) = parse_latex_normalized(&norm) {
                return Extracted {
                    expr: Some(e),
                    text: norm,
                };
            }
            let (parsed, fallback) = extract_inner(inner, opts);
            match parsed {
                Some(ex) => ex,
                None => Extracted {
                    expr: None,
                    text: fallback.unwrap_or(norm),
                },
            }
        }
        Kind::Formula(s) => {
            let cleaned = s.replace('\n', " ");
            Extracted {
                expr: parse_math(cleaned.trim()).ok(),
                text: s.clone(),
            }
        }
    }
}

/// Extract answers from free text: the first candidate (by priority, then rightmost) that
/// parses, and the first candidate's text as a string fallback.
pub fn extract(text: &str, opts: &Options) -> (Option<Extracted>, Option<String>) {
    extract_with_tags(text, opts, true)
}

fn extract_inner(text: &str, opts: &Options) -> (Option<Extracted>, Option<String>) {
    extract_with_tags(text, opts, false)
}

fn extract_with_tags(
    text: &str,
    opts: &Options,
    tags: bool,
) -> (Option<Extracted>, Option<String>) {
    let t = Text::new(text);
    let mut cands: Vec<Candidate> = Vec::new();
    if opts.match_types.contains(&MatchType::Latex) {
        latex_candidates(&t, opts, &mut cands);
    }
    if opts.match_types.contains(&MatchType::Expr) {
        expr_candidates(&t, opts, &mut cands);
    }
    // <answer>…</answer>: the last complete pair, at the boxed priority
    if let Some(close) = text.rfind("</answer>").filter(|_| tags) {
        if let Some(open) = text[..close].rfind("<answer>") {
            let inner = &text[open + 8..close];
            let start = text[..open].chars().count();
            let end = text[..close + 9].chars().count();
            cands.push(Candidate {
                priority: opts.boxed_match_priority.unwrap_or(0),
                start,
                end,
                kind: Kind::Tagged(inner.to_string()),
            });
        }
    }
    cands.sort_by(|a, b| {
        a.priority
            .cmp(&b.priority)
            .then(b.end.cmp(&a.end))
            .then(a.start.cmp(&b.start))
    });
    let mut fallback: Option<String> = None;
    for (attempts, c) in cands.iter().enumerate() {
        if attempts >= MAX_PARSE_ATTEMPTS {
            break;
        }
        let ex = extract_kind(&c.kind, opts);
        if fallback.is_none() && !ex.text.is_empty() {
            fallback = Some(ex.text.clone());
        }
        if ex.expr.is_some() {
            return (Some(ex), fallback);
        }
    }
    (None, fallback)
}
