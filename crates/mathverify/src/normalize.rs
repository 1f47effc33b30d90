//! LaTeX clean-up before parsing: boxed extraction, `\left`/`\right`, `\dfrac`, text macros,
//! percent words, trailing units, thousands separators.
//!
//! Every rule works on plain strings with bounded, linear scans (no regular expressions).

/// Longest text (bytes) normalised after boxed extraction; the rest is cut off.
pub const MAX_NORMALIZE_BYTES: usize = 20_000;

/// How `\boxed{…}` content is taken out of a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoxedMode {
    /// Every box, joined by commas.
    All,
    /// The last box, plus the boxes just before it when they are adjacent or separated by
    /// a short "and"/","-style separator (`\boxed{1}\boxed{2}` → `1,2`).
    Last,
}

/// Find the matching `}` for the `{` at byte `open`; returns its byte index.
pub fn matching_brace(text: &str, open: usize, limit: usize) -> Option<usize> {
    let b = text.as_bytes();
    let mut depth = 0usize;
    let mut i = open;
    while i < limit.min(b.len()) {
        match b[i] {
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn rfind_box(text: &str, before: usize) -> Option<(usize, usize)> {
    let hay = &text[..before];
    let a = hay.rfind("\\boxed").map(|i| (i, i + 6));
    let b = hay.rfind("\\fbox").map(|i| (i, i + 5));
    match (a, b) {
        (Some(x), Some(y)) => Some(if x.0 > y.0 { x } else { y }),
        (x, None) => x,
        (None, y) => y,
    }
}

fn is_valid_separator(between: &str) -> bool {
    between.contains(',')
        || between.contains(';')
        || between
            .split(|c: char| !c.is_alphanumeric())
            .any(|w| w == "and" || w == "or")
}

/// Contents of `\boxed{…}` / `\fbox{…}` (brace matched), or `None` when there is no box.
///
/// Boxes are searched from the right. In `Last` mode the walk stops at the first box that is
/// far from the one after it (≥ 10 characters apart, unless < 70 apart with a separator and
/// different content); consecutive identical contents are kept once. An unclosed last box
/// yields the rest of the text.
pub fn extract_boxed(text: &str, mode: BoxedMode) -> Option<String> {
    let mut results: Vec<String> = Vec::new();
    let mut current = text.len();
    let mut max_pos = text.len();
    let mut last_start: Option<usize> = None;
    let bytes = text.as_bytes();
    let mut guard = 0;
    while let Some((start, cmd_end)) = rfind_box(text, current) {
        guard += 1;
        if guard > 10_000 {
            break;
        }
        let mut p = cmd_end;
        while p < max_pos && (bytes[p] as char).is_ascii_whitespace() {
            p += 1;
        }
        if p >= max_pos {
            break;
        }
        if bytes[p] == b'{' {
            match matching_brace(text, p, max_pos) {
                None => {
                    if results.is_empty() {
                        results.push(text[p..].to_string());
                    }
                    break;
                }
                Some(close) => {
                    let content = text[p + 1..close].trim().to_string();
                    if mode == BoxedMode::Last {
                        if let Some(ls) = last_start {
                            let between = text.get(close + 1..ls).unwrap_or("");
                            let prev = results.last().cloned().unwrap_or_default();
                            let near = between.chars().count() < 10;
                            let sep_ok = content != prev
                                && between.chars().count() < 70
                                && is_valid_separator(between);
                            if !(near || sep_ok) {
                                break;
                            }
                        }
                    }
                    if results.last() != Some(&content) {
                        results.push(content);
                    }
                    last_start = Some(start);
                    max_pos = start;
                }
            }
        } else {
            if results.is_empty() {
                results.push(text[p..].to_string());
            }
            break;
        }
        current = start;
    }
    if results.is_empty() {
        return None;
    }
    results.reverse();
    Some(results.join(","))
}

/// Replace every occurrence of `from` by `to`.
fn replace_all(s: &str, from: &str, to: &str) -> String {
    if s.contains(from) {
        s.replace(from, to)
    } else {
        s.to_string()
    }
}

fn is_letter(c: Option<char>) -> bool {
    c.is_some_and(|c| c.is_ascii_alphabetic())
}

/// `\\frac` (doubled backslash before a command, common in JSON-escaped model output) → `\frac`.
fn fix_doubled_backslashes(s: &str) -> String {
    if s.contains("matrix") || s.contains("array") {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\\'
            && i + 2 < chars.len() + 1
            && chars.get(i + 1) == Some(&'\\')
            && is_letter(chars.get(i + 2).copied())
        {
            out.push('\\');
            i += 2;
            continue;
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

const SIZE_COMMANDS: &[&str] = &[
    "\\left", "\\right", "\\mleft", "\\mright", "\\bigl", "\\bigr", "\\Bigl", "\\Bigr", "\\biggl",
    "\\biggr", "\\Biggl", "\\Biggr", "\\big", "\\Big", "\\bigg", "\\Bigg",
];

/// Drop `\left`, `\right`, `\big…` sizing commands (keeping the delimiter), and `\left.`/`\right.`.
fn strip_sizing(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    'outer: while !rest.is_empty() {
        if rest.starts_with('\\') {
            for cmd in SIZE_COMMANDS {
                if let Some(after) = rest.strip_prefix(cmd) {
                    let next = after.chars().next();
                    if !is_letter(next) {
                        let after = after.strip_prefix('.').unwrap_or(after);
                        rest = after;
                        continue 'outer;
                    }
                }
            }
        }
        let c = rest.chars().next().unwrap_or(' ');
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Remove `\!` and the whitespace after it, in one pass.
fn remove_negative_spaces(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(p) = rest.find("\\!") {
        out.push_str(&rest[..p]);
        rest = rest[p + 2..].trim_start();
    }
    out.push_str(rest);
    out
}

/// `14 {, }916` → `14,916` (a comma in braces, with optional spaces around).
fn collapse_brace_commas(s: &str) -> String {
    if !s.contains('{') {
        return s.to_string();
    }
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '{' {
            let mut k = i + 1;
            while k < chars.len() && chars[k] == ' ' {
                k += 1;
            }
            if chars.get(k) == Some(&',') {
                k += 1;
                while k < chars.len() && chars[k] == ' ' {
                    k += 1;
                }
                if chars.get(k) == Some(&'}') {
                    while out.ends_with(' ') {
                        out.pop();
                    }
                    out.push(',');
                    i = k + 1;
                    continue;
                }
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// `\ `, `\,`, `\;`, `\:`, `\quad`, `~` → a space; a doubled backslash (row separator) is kept.
fn replace_control_spaces(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' {
            match chars.get(i + 1) {
                Some('\\') => {
                    out.push_str("\\\\");
                    i += 2;
                    continue;
                }
                Some(' ') | Some(',') | Some(';') | Some(':') => {
                    out.push(' ');
                    i += 2;
                    continue;
                }
                _ => {}
            }
            let rest: String = chars[i + 1..chars.len().min(i + 7)].iter().collect();
            // `\quadx` (a missing space) is read as `\quad x`: no other command starts with "quad"
            let quad = ["qquad", "quad"].into_iter().find(|q| rest.starts_with(q));
            if let Some(q) = quad {
                out.push(' ');
                i += 1 + q.len();
                continue;
            }
        }
        if c == '~' {
            out.push(' ');
            i += 1;
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

/// Percent words and `and`/`or` separators, `\ldots`, `infinity`, `\text{…}` spellings.
fn replace_words(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let n = chars.len();
    let mut out = String::with_capacity(s.len());
    let starts_with =
        |i: usize, w: &str| -> bool { (i..).zip(w.chars()).all(|(k, c)| k < n && chars[k] == c) };
    let word_at = |i: usize, w: &str| -> bool {
        starts_with(i, w)
            && (i == 0 || !chars[i - 1].is_alphanumeric())
            && (i + w.chars().count() >= n || !chars[i + w.chars().count()].is_alphanumeric())
    };
    let mut i = 0;
    while i < n {
        // \text{ and } / \text{or}
        if starts_with(i, "\\text{") {
            let mut j = i + 6;
            while j < n && chars[j] == ' ' {
                j += 1;
            }
            for w in ["and", "or"] {
                if starts_with(j, w) {
                    let mut k = j + w.len();
                    while k < n && chars[k] == ' ' {
                        k += 1;
                    }
                    if k < n && chars[k] == '}' {
                        trim_trailing_comma_space(&mut out);
                        out.push(',');
                        i = k + 1;
                        break;
                    }
                }
            }
            if i > j {
                continue;
            }
            for (w, rep) in [("percentage}", "%"), ("percent}", "%"), ("pct}", "%")] {
                if starts_with(i + 6, w) {
                    out.push_str(rep);
                    i += 6 + w.len();
                    break;
                }
            }
            if i > j {
                continue;
            }
        }
        if chars[i] == '\\' {
            // copy the command name whole so words inside commands are untouched
            if starts_with(i, "\\ldots") || starts_with(i, "\\dots") || starts_with(i, "\\cdots") {
                trim_trailing_comma_space(&mut out);
                out.push(' ');
                i += if starts_with(i, "\\ldots") || starts_with(i, "\\cdots") {
                    6
                } else {
                    5
                };
                continue;
            }
            out.push('\\');
            i += 1;
            while i < n && chars[i].is_ascii_alphabetic() {
                out.push(chars[i]);
                i += 1;
            }
            if i < n && !chars[i - 1].is_ascii_alphabetic() {
                // escaped single char like \% or \{
                out.push(chars[i]);
                i += 1;
            }
            continue;
        }
        if word_at(i, "and") || word_at(i, "or") {
            trim_trailing_comma_space(&mut out);
            out.push(',');
            i += if word_at(i, "and") { 3 } else { 2 };
            continue;
        }
        let mut matched = false;
        for w in ["percentage", "percent", "pct"] {
            if word_at(i, w) {
                while out.ends_with(' ') {
                    out.pop();
                }
                out.push_str("\\%");
                i += w.len();
                matched = true;
                break;
            }
        }
        if matched {
            continue;
        }
        if starts_with(i, "infinity") {
            out.push_str("\\infty");
            i += 8;
            continue;
        }
        if word_at(i, "inf") {
            out.push_str("\\infty");
            i += 3;
            continue;
        }
        // plain-text function names and π: `sqrt(2)`, `2pi`, `sin(x)` → `\sqrt(2)`, `2\pi`, `\sin(x)`
        let letter_free = |k: usize| k >= n || !chars[k].is_ascii_alphabetic();
        if i == 0 || !chars[i - 1].is_ascii_alphabetic() {
            let mut hit = false;
            for w in ["sqrt", "pi", "sin", "cos", "tan", "log", "ln", "exp"] {
                if starts_with(i, w) && letter_free(i + w.len()) {
                    out.push('\\');
                    out.push_str(w);
                    i += w.len();
                    hit = true;
                    break;
                }
            }
            if hit {
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

fn trim_trailing_comma_space(out: &mut String) {
    while out.ends_with(' ') {
        out.pop();
    }
    if out.ends_with(',') {
        out.pop();
    }
}

/// Multi-letter unit words stripped when they end an answer after a number or `}`.
const UNITS: &[&str] = &[
    "feet",
    "foot",
    "sue",
    "digit",
    "pound",
    "meal",
    "edge",
    "student",
    "children ticket",
    "multiple",
    "east",
    "degree",
    "mph",
    "kmph",
    "ft",
    "m square",
    "sq m",
    "deg",
    "mile",
    "monkey",
    "prime",
    "ratio",
    "gm",
    "lb",
    "tile",
    "per",
    "dm",
    "lt",
    "gain",
    "way",
    "west",
    "no change",
    "men",
    "soldier",
    "pie",
    "excess",
    "inches",
    "inch",
    "noon",
    "cent",
    "gal",
    "kmh",
    "acre",
    "rise",
    "sq",
    "mark",
    "toy",
    "coin",
    "sq . m",
    "gallon",
    "profit",
    "yr",
    "women",
    "hr",
    "cu cm",
    "square",
    "rupee",
    "rounds",
    "cubic",
    "cc",
    "mtr",
    "ohm",
    "number",
    "day",
    "hour",
    "minute",
    "min",
    "second",
    "man",
    "woman",
    "sec",
    "cube",
    "mt",
    "sq inch",
    "mp",
    "hectare",
    "more",
    "unit",
    "cm 2",
    "rs",
    "kg",
    "month",
    "km",
    "cm",
    "mm",
    "apple",
    "liter",
    "loss",
    "yard",
    "pure",
    "year",
    "increase",
    "decrease",
    "less",
    "litre",
    "metre",
    "meter",
    "dollar",
    "cents",
    "people",
    "page",
    "point",
    "week",
    "book",
    "hours",
    "units",
    "sq units",
    "sq ft",
    "square units",
    "square feet",
    "square inches",
    "square meters",
    "cubic feet",
    "mi",
];

fn strip_unit_words(s: &str) -> String {
    let t = s.trim_end();
    let lower = t.to_ascii_lowercase();
    let mut best: Option<usize> = None;
    for u in UNITS {
        for suffix in ["", "s", "es"] {
            let w = format!("{u}{suffix}");
            if lower.ends_with(&w) {
                let start = t.len() - w.len();
                let before = &t[..start];
                let prev = before.chars().last();
                let ok_boundary = prev.is_some_and(|c| c.is_ascii_digit() || c == '}' || c == ' ');
                let core = before.trim_end();
                let core_ok = core
                    .chars()
                    .last()
                    .is_some_and(|c| c.is_ascii_digit() || c == '}' || c == ')' || c == '%');
                if ok_boundary && core_ok && best.is_none_or(|b| start < b) {
                    best = Some(start);
                }
            }
        }
    }
    match best {
        Some(start) => t[..start].trim_end().to_string(),
        None => s.to_string(),
    }
}

/// Remove a trailing `\text{…}` / `\mbox{…}` (a unit), with an optional `^2`, when something
/// remains before it.
fn strip_trailing_text_unit(s: &str) -> String {
    let t = s.trim_end();
    for cmd in ["\\text{", "\\mbox{"] {
        if let Some(pos) = t.rfind(cmd) {
            let open = pos + cmd.len() - 1;
            if let Some(close) = matching_brace(t, open, t.len()) {
                let tail = t[close + 1..].trim();
                let tail_ok = tail.is_empty()
                    || (tail.len() <= 4
                        && tail.starts_with('^')
                        && tail[1..]
                            .trim_matches(|c| c == '{' || c == '}')
                            .chars()
                            .all(|c| c.is_ascii_digit()));
                let before = t[..pos].trim_end();
                let inner = t[open + 1..close].trim();
                let inner_is_word = inner.chars().any(|c| c.is_alphabetic());
                if tail_ok && !before.is_empty() && inner_is_word {
                    let last = before.chars().last().unwrap_or(' ');
                    if last.is_ascii_digit()
                        || last == '}'
                        || last == ')'
                        || last == '%'
                        || last == '.'
                    {
                        return before.to_string();
                    }
                }
            }
        }
    }
    s.to_string()
}

/// `14,916` (whole string, or right-hand side of the last `=`) → `14916`.
fn strip_thousands(s: &str) -> String {
    fn is_comma_number(t: &str) -> bool {
        let t = t.trim();
        let t = t.strip_prefix('-').unwrap_or(t);
        let (int, frac) = match t.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => (t, None),
        };
        if let Some(f) = frac {
            if f.is_empty() || !f.chars().all(|c| c.is_ascii_digit()) {
                return false;
            }
        }
        let groups: Vec<&str> = int.split(',').collect();
        groups.len() >= 2
            && !groups[0].is_empty()
            && groups[0].len() <= 3
            && groups[0].chars().all(|c| c.is_ascii_digit())
            && groups[1..]
                .iter()
                .all(|g| g.len() == 3 && g.chars().all(|c| c.is_ascii_digit()))
    }
    if is_comma_number(s) {
        return s.replace(',', "");
    }
    if let Some(pos) = s.rfind('=') {
        let rhs = &s[pos + 1..];
        if is_comma_number(rhs) && !s[..pos].contains(',') {
            return format!("{}={}", &s[..pos], rhs.replace(',', ""));
        }
    }
    s.to_string()
}

/// Normalise a LaTeX answer string (see module docs). `boxed` picks how boxes are unwrapped.
pub fn normalize_latex(text: &str, boxed: BoxedMode) -> String {
    let mut s = match extract_boxed(text, boxed) {
        Some(b) => b,
        None => text.to_string(),
    };
    if s.len() > MAX_NORMALIZE_BYTES {
        // not an answer; keep a bounded prefix so later passes stay cheap
        let mut cut = MAX_NORMALIZE_BYTES;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s = fix_doubled_backslashes(&s);
    s = replace_all(&s, "\\mathrm{T}", "T");
    s = replace_all(&s, "\\mathrm{d}", "d");
    s = replace_all(&s, "\\left[\\begin{matrix}", "\\begin{bmatrix}");
    s = replace_all(&s, "\\end{matrix}\\right]", "\\end{bmatrix}");
    s = strip_sizing(&s);
    // removals
    s = replace_all(&s, "\\mathrm{th}", "");
    s = replace_all(&s, "^{\\circ}", "");
    s = replace_all(&s, "^\\circ", "");
    s = replace_all(&s, "{}^\\circ", "");
    s = replace_all(&s, "\\circ", "");
    s = replace_all(&s, "\\degree", "");
    s = replace_all(&s, "°", "");
    s = replace_all(&s, "\\displaystyle", "");
    s = replace_all(&s, "\\$", "");
    s = replace_all(&s, "$", "");
    s = replace_all(&s, "\\%", "\u{1}");
    s = replace_all(&s, "%", "\\%");
    s = replace_all(&s, "\u{1}", "\\%");
    // `\!` and the spaces after it
    if s.contains("\\!") {
        s = remove_negative_spaces(&s);
    }
    s = replace_all(&s, "\\text{}", "");
    s = replace_all(&s, "\\text{ }", "");
    s = replace_all(&s, "\"", "");
    for (from, to) in [
        ("\\mathrm{", "\\text{"),
        ("\\mathit{", "\\text{"),
        ("\\textnormal{", "\\text{"),
        ("\\textbf{", "\\text{"),
        ("\\textit{", "\\text{"),
        ("\\textrm{", "\\text{"),
        ("\\textsf{", "\\text{"),
        ("\\texttt{", "\\text{"),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\cfrac", "\\frac"),
        ("\\dbinom", "\\binom"),
        ("\\tbinom", "\\binom"),
        ("~=", "\\approx"),
        ("\\le ", "\\leq "),
    ] {
        s = replace_all(&s, from, to);
    }
    s = s.replace(['\n', '\t', '\r'], " ");
    // `\ ` (control space) → space, `\,` `\;` `\:` `\quad` → space
    s = replace_control_spaces(&s);
    s = collapse_brace_commas(&s);
    s = replace_words(&s);
    // units
    let t = strip_trailing_text_unit(&s);
    if !t.trim().is_empty() {
        s = t;
    }
    for _ in 0..2 {
        let t = strip_unit_words(&s);
        if !t.trim().is_empty() {
            s = t;
        }
    }
    let mut s = s.trim().to_string();
    if s.starts_with('.') {
        s = format!("0{s}");
    }
    // ` .5` → ` 0.5`, `{.5` → `{0.5`
    if s.contains(" .") || s.contains("{.") {
        let mut out = String::with_capacity(s.len() + 4);
        let cs: Vec<char> = s.chars().collect();
        for (i, c) in cs.iter().enumerate() {
            if *c == '.'
                && i > 0
                && (cs[i - 1] == ' ' || cs[i - 1] == '{')
                && cs.get(i + 1).is_some_and(|d| d.is_ascii_digit())
            {
                out.push('0');
            }
            out.push(*c);
        }
        s = out;
    }
    strip_thousands(&s).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxed_last_and_adjacent() {
        assert_eq!(
            extract_boxed("a \\boxed{1} b \\boxed{2}", BoxedMode::Last).unwrap(),
            "1,2"
        );
        assert_eq!(
            extract_boxed("\\boxed{1}\\boxed{2}", BoxedMode::Last).unwrap(),
            "1,2"
        );
        let far = format!("\\boxed{{1}}{}\\boxed{{2}}", " x".repeat(50));
        assert_eq!(extract_boxed(&far, BoxedMode::Last).unwrap(), "2");
        assert_eq!(
            extract_boxed("\\boxed{\\frac{1}{2}}", BoxedMode::Last).unwrap(),
            "\\frac{1}{2}"
        );
        assert_eq!(extract_boxed("\\fbox{7}", BoxedMode::Last).unwrap(), "7");
        assert_eq!(
            extract_boxed("\\boxed{28 pct", BoxedMode::Last).unwrap(),
            "{28 pct"
        );
        assert!(extract_boxed("no box", BoxedMode::Last).is_none());
    }

    #[test]
    fn normalisations() {
        assert_eq!(
            normalize_latex("\\left( \\dfrac{1}{3} \\right)", BoxedMode::All),
            "( \\frac{1}{3} )"
        );
        assert_eq!(
            normalize_latex("12\\text{ and }13", BoxedMode::All),
            "12,13"
        );
        assert_eq!(normalize_latex("28 percent", BoxedMode::All), "28\\%");
        assert_eq!(normalize_latex("15\\mbox{ cm}^2", BoxedMode::All), "15");
        assert_eq!(
            normalize_latex("125\\textnormal{ miles}", BoxedMode::All),
            "125"
        );
        assert_eq!(
            normalize_latex("11,\\! 111,\\! 111,\\! 100", BoxedMode::All),
            "11111111100"
        );
        assert_eq!(normalize_latex("90^\\circ", BoxedMode::All), "90");
        assert_eq!(normalize_latex(".5", BoxedMode::All), "0.5");
        assert_eq!(normalize_latex("10 cm", BoxedMode::All), "10");
        assert_eq!(normalize_latex("a + c", BoxedMode::All), "a + c");
        assert_eq!(normalize_latex("x = 10,000", BoxedMode::All), "x = 10000");
    }
}
