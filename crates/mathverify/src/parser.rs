//! Recursive-descent parser for LaTeX and plain math into [`Expr`].
//!
//! Grammar, lowest precedence first:
//! list (`,`/`;`) → relation chain (`= < ≤ …`) → set operators (`∪ ∩ \setminus`) →
//! additive (`+ − ±`) → multiplicative (`· × / ÷`, implicit juxtaposition) → unary sign →
//! postfix (`^`, `_`, `!`, `%`) → primary (numbers, letters, commands, brackets).
//! Unbraced macro arguments take one token, as TeX does (`\frac12` = ½, `\sqrt2` = √2).
//! Depth and length are bounded; every failure is an `Err`, never a panic.

use crate::eval;
use crate::expr::{Constant, Expr, Func, Number, RelOp};
use num_bigint::BigInt;
use num_rational::BigRational;
use num_traits::Zero;

/// Inputs longer than this many characters are not parsed.
pub const MAX_INPUT_CHARS: usize = 4000;
/// Maximum nesting depth of the recursive descent.
pub const MAX_DEPTH: usize = 400;

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Digit(char),
    Letter(char),
    /// `\name` (letters) or `\c` for a single escaped char, without the backslash.
    Cmd(String),
    /// Raw text of `\text{…}`-like commands.
    Text(String),
    /// `\operatorname{name}`
    OpName(String),
    Begin(String),
    End(String),
    Op(char),
    Rel(RelOp),
    Approx,
    RowSep,
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    space_before: bool,
}

type PResult<T> = Result<T, String>;

fn read_brace_group(chars: &[char], open: usize) -> PResult<(String, usize)> {
    // chars[open] == '{'
    let mut depth = 0usize;
    let mut i = open;
    while i < chars.len() {
        match chars[i] {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Ok((chars[open + 1..i].iter().collect(), i + 1));
                }
            }
            '\\' => i += 1,
            _ => {}
        }
        i += 1;
    }
    Err("unbalanced braces".into())
}

const TEXT_COMMANDS: &[&str] = &["text", "mbox", "textup", "hbox", "textsf"];
const IGNORED_COMMANDS: &[&str] = &[
    "left",
    "right",
    "big",
    "Big",
    "bigg",
    "Bigg",
    "bigl",
    "bigr",
    "Bigl",
    "Bigr",
    "displaystyle",
    "textstyle",
    "limits",
    "nolimits",
    "quad",
    "qquad",
    "mleft",
    "mright",
    "middle",
    "rm",
    "bf",
    "it",
    "scriptstyle",
    "mathstrut",
    "strut",
    "notag",
    "nonumber",
];

fn tokenize(s: &str) -> PResult<Vec<Token>> {
    let chars: Vec<char> = s.chars().collect();
    let mut out: Vec<Token> = Vec::new();
    let mut i = 0;
    let mut space = false;
    let push = |out: &mut Vec<Token>, tok: Tok, space: &mut bool| {
        out.push(Token {
            tok,
            space_before: *space,
        });
        *space = false;
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            space = true;
            i += 1;
            continue;
        }
        if c.is_ascii_digit() {
            push(&mut out, Tok::Digit(c), &mut space);
            i += 1;
            continue;
        }
        if c.is_ascii_alphabetic() {
            push(&mut out, Tok::Letter(c), &mut space);
            i += 1;
            continue;
        }
        if c == '\\' {
            let j = i + 1;
            if j >= chars.len() {
                return Err("trailing backslash".into());
            }
            if chars[j] == '\\' {
                push(&mut out, Tok::RowSep, &mut space);
                i = j + 1;
                continue;
            }
            if !chars[j].is_ascii_alphabetic() {
                let e = chars[j];
                i = j + 1;
                match e {
                    ',' | ';' | ':' | '!' | ' ' | '>' => {
                        space = true;
                    }
                    '{' | '}' | '|' | '%' | '$' | '#' | '&' | '_' => {
                        push(&mut out, Tok::Cmd(e.to_string()), &mut space)
                    }
                    _ => return Err(format!("unknown escape \\{e}")),
                }
                continue;
            }
            let mut k = j;
            while k < chars.len() && chars[k].is_ascii_alphabetic() {
                k += 1;
            }
            let name: String = chars[j..k].iter().collect();
            i = k;
            if TEXT_COMMANDS.contains(&name.as_str())
                || name == "operatorname"
                || name == "begin"
                || name == "end"
            {
                while i < chars.len() && chars[i] == ' ' {
                    i += 1;
                }
                if i < chars.len() && chars[i] == '{' {
                    let (content, next) = read_brace_group(&chars, i)?;
                    i = next;
                    let tok = match name.as_str() {
                        "operatorname" => Tok::OpName(content.trim().to_string()),
                        "begin" => {
                            let env = content.trim().to_string();
                            // skip an array column spec {cc}
                            let mut p = i;
                            while p < chars.len() && chars[p] == ' ' {
                                p += 1;
                            }
                            if env.starts_with("array") && p < chars.len() && chars[p] == '{' {
                                let (_, n2) = read_brace_group(&chars, p)?;
                                i = n2;
                            }
                            Tok::Begin(env)
                        }
                        "end" => Tok::End(content.trim().to_string()),
                        _ => Tok::Text(content),
                    };
                    push(&mut out, tok, &mut space);
                } else if name == "text" || name == "mbox" {
                    return Err("\\text without braces".into());
                } else {
                    return Err(format!("\\{name} without braces"));
                }
                continue;
            }
            if IGNORED_COMMANDS.contains(&name.as_str()) {
                space = true;
                continue;
            }
            let tok = match name.as_str() {
                "le" | "leq" | "leqslant" | "leqq" => Tok::Rel(RelOp::Le),
                "ge" | "geq" | "geqslant" | "geqq" => Tok::Rel(RelOp::Ge),
                "lt" => Tok::Rel(RelOp::Lt),
                "gt" => Tok::Rel(RelOp::Gt),
                "ne" | "neq" => Tok::Rel(RelOp::Ne),
                "in" | "equiv" => Tok::Rel(RelOp::Eq),
                "approx" | "simeq" | "sim" | "cong" => Tok::Approx,
                _ => Tok::Cmd(name),
            };
            push(&mut out, tok, &mut space);
            continue;
        }
        // two-char operators
        let next = chars.get(i + 1).copied();
        let two = match (c, next) {
            ('<', Some('=')) => Some(Tok::Rel(RelOp::Le)),
            ('>', Some('=')) => Some(Tok::Rel(RelOp::Ge)),
            ('!', Some('=')) => Some(Tok::Rel(RelOp::Ne)),
            ('=', Some('=')) => Some(Tok::Rel(RelOp::Eq)),
            ('*', Some('*')) => Some(Tok::Op('^')),
            _ => None,
        };
        if let Some(t) = two {
            push(&mut out, t, &mut space);
            i += 2;
            continue;
        }
        let tok = match c {
            '+' | '-' | '*' | '/' | '^' | '_' | '(' | ')' | '[' | ']' | '{' | '}' | ',' | ';'
            | '|' | '!' | '&' | '\'' | '.' | '%' | ':' => Tok::Op(c),
            '=' => Tok::Rel(RelOp::Eq),
            '<' => Tok::Rel(RelOp::Lt),
            '>' => Tok::Rel(RelOp::Gt),
            '≤' | '⩽' => Tok::Rel(RelOp::Le),
            '≥' | '⩾' => Tok::Rel(RelOp::Ge),
            '≠' => Tok::Rel(RelOp::Ne),
            '≈' => Tok::Approx,
            '×' | '·' | '⋅' | '∙' => Tok::Op('*'),
            '÷' => Tok::Op('/'),
            '−' | '–' => Tok::Op('-'),
            'π' => Tok::Cmd("pi".into()),
            '∞' => Tok::Cmd("infty".into()),
            '√' => Tok::Cmd("sqrt".into()),
            '±' => Tok::Cmd("pm".into()),
            '∪' => Tok::Cmd("cup".into()),
            '∩' => Tok::Cmd("cap".into()),
            '∈' => Tok::Rel(RelOp::Eq),
            '°' => {
                i += 1;
                continue;
            }
            c if c.is_alphabetic() => Tok::Letter(c),
            _ => return Err(format!("unexpected character {c:?}")),
        };
        push(&mut out, tok, &mut space);
        i += 1;
    }
    Ok(out)
}

fn func_of(name: &str) -> Option<Func> {
    use Func::*;
    Some(match name {
        "sin" => Sin,
        "cos" => Cos,
        "tan" | "tg" => Tan,
        "csc" | "cosec" => Csc,
        "sec" => Sec,
        "cot" | "ctg" => Cot,
        "arcsin" | "asin" => Asin,
        "arccos" | "acos" => Acos,
        "arctan" | "atan" => Atan,
        "arccsc" => Acsc,
        "arcsec" => Asec,
        "arccot" => Acot,
        "sinh" => Sinh,
        "cosh" => Cosh,
        "tanh" => Tanh,
        "arsinh" | "arcsinh" => Asinh,
        "arcosh" | "arccosh" => Acosh,
        "artanh" | "arctanh" => Atanh,
        "log" | "ln" | "lg" => Log,
        "exp" => Exp,
        "gcd" => Gcd,
        "lcm" => Lcm,
        "max" => Max,
        "min" => Min,
        "floor" => Floor,
        "ceil" => Ceil,
        _ => return None,
    })
}

const GREEK: &[&str] = &[
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "varepsilon",
    "zeta",
    "eta",
    "theta",
    "vartheta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "rho",
    "varrho",
    "sigma",
    "varsigma",
    "tau",
    "upsilon",
    "phi",
    "varphi",
    "chi",
    "psi",
    "omega",
    "Gamma",
    "Delta",
    "Theta",
    "Lambda",
    "Xi",
    "Pi",
    "Sigma",
    "Upsilon",
    "Phi",
    "Psi",
    "Omega",
    "ell",
    "hbar",
    "aleph",
];

/// Commands whose single argument is shown decorated but means the argument itself.
const TRANSPARENT: &[&str] = &[
    "mathbf",
    "boldsymbol",
    "bm",
    "mathit",
    "mathsf",
    "mathtt",
    "vec",
    "overline",
    "underline",
    "hat",
    "bar",
    "tilde",
    "widehat",
    "widetilde",
    "overrightarrow",
    "overleftrightarrow",
    "mathcal",
    "mathscr",
    "mathfrak",
    "operatorname*",
    "pmb",
    "textbf",
    "emph",
    "dot",
    "ddot",
    "underbrace",
    "overbrace",
];

/// Whether a letter directly followed by `(` names a function: `f`, `g`, `h` and capitals
/// (`f(x)`, `P(A)`, `I(0)`); other lower-case letters multiply (`x(x+1)`).
fn is_function_letter(c: char) -> bool {
    matches!(c, 'f' | 'g' | 'h') || c.is_ascii_uppercase()
}

struct Parser {
    toks: Vec<Token>,
    pos: usize,
    depth: usize,
    abs_depth: usize,
    /// whether the primary just parsed was a `\frac` (for mixed numbers)
    last_was_frac: bool,
    /// calls of `enter` so far (bounded)
    steps: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.tok)
    }
    fn peek_at(&self, k: usize) -> Option<&Tok> {
        self.toks.get(self.pos + k).map(|t| &t.tok)
    }
    fn space_before(&self) -> bool {
        self.toks.get(self.pos).is_some_and(|t| t.space_before)
    }
    fn bump(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).map(|t| t.tok.clone());
        self.pos += 1;
        t
    }
    fn is_op(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Op(c))
    }
    fn is_cmd(&self, name: &str) -> bool {
        matches!(self.peek(), Some(Tok::Cmd(n)) if n == name)
    }
    fn expect_op(&mut self, c: char) -> PResult<()> {
        if self.is_op(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(format!("expected '{c}' at token {}", self.pos))
        }
    }
    fn enter(&mut self) -> PResult<()> {
        // a work bound on top of the depth bound: a few hundred steps per token at most
        self.steps += 1;
        if self.steps > 200 * self.toks.len() + 1000 {
            return Err("parser step budget exceeded".into());
        }
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            Err("expression nested too deeply".into())
        } else {
            Ok(())
        }
    }
    fn leave(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }

    /// Comma/semicolon separated list; stops at closers.
    /// A `,`/`;` separated list. When `;` separates groups that themselves hold several
    /// comma-separated items (`p=5, q=2; p=7, q=2`), each such group becomes one set.
    fn parse_list(&mut self) -> PResult<Vec<Expr>> {
        let mut groups: Vec<Vec<Expr>> = vec![Vec::new()];
        loop {
            if self.at_list_end() {
                break;
            }
            if self.is_op(',') {
                self.pos += 1;
                continue;
            }
            if self.is_op(';') {
                self.pos += 1;
                groups.push(Vec::new());
                continue;
            }
            let item = self.parse_relation()?;
            if let Some(g) = groups.last_mut() {
                g.push(item);
            }
            if self.is_op(',') || self.is_op(';') {
                continue;
            }
            break;
        }
        groups.retain(|g| !g.is_empty());
        if groups.len() > 1 && groups.iter().any(|g| g.len() > 1) {
            return Ok(groups
                .into_iter()
                .map(|g| {
                    if g.len() == 1 {
                        g.into_iter().next().unwrap_or_else(|| Expr::int(0))
                    } else {
                        Expr::Set(g)
                    }
                })
                .collect());
        }
        Ok(groups.into_iter().flatten().collect())
    }

    fn at_list_end(&self) -> bool {
        match self.peek() {
            None => true,
            Some(Tok::Op('|')) => self.abs_depth > 0,
            Some(Tok::Op(c)) => matches!(c, ')' | ']' | '}' | '&'),
            Some(Tok::Cmd(n)) => matches!(
                n.as_str(),
                "}" | "rangle" | "rfloor" | "rceil" | "rvert" | "rbrace" | "rbrack"
            ),
            Some(Tok::End(_)) | Some(Tok::RowSep) => true,
            _ => false,
        }
    }

    fn parse_relation(&mut self) -> PResult<Expr> {
        self.enter()?;
        let first = self.parse_setexpr()?;
        let mut terms = vec![first];
        let mut ops = Vec::new();
        let mut approx_at: Option<usize> = None;
        loop {
            match self.peek() {
                Some(Tok::Rel(op)) => {
                    let op = *op;
                    self.pos += 1;
                    ops.push(op);
                    terms.push(self.parse_setexpr()?);
                }
                Some(Tok::Approx) => {
                    self.pos += 1;
                    if approx_at.is_none() {
                        approx_at = Some(terms.len());
                    }
                    ops.push(RelOp::Eq);
                    terms.push(self.parse_setexpr()?);
                }
                _ => break,
            }
        }
        self.leave();
        // `a ≈ b`: keep what precedes the first ≈ when it is a relation, else the value after it.
        if let Some(k) = approx_at {
            if k >= 2 {
                terms.truncate(k);
                ops.truncate(k - 1);
            } else {
                let last = terms.pop().unwrap_or_else(|| Expr::int(0));
                return Ok(last);
            }
        }
        Ok(build_chain(terms, ops))
    }

    fn parse_setexpr(&mut self) -> PResult<Expr> {
        let mut left = self.parse_additive()?;
        loop {
            if self.is_cmd("cup") {
                self.pos += 1;
                let r = self.parse_additive()?;
                left = match left {
                    Expr::Union(mut v) => {
                        v.push(r);
                        Expr::Union(v)
                    }
                    l => Expr::Union(vec![l, r]),
                };
            } else if self.is_cmd("cap") {
                self.pos += 1;
                let r = self.parse_additive()?;
                left = Expr::Intersection(vec![left, r]);
            } else if self.is_cmd("setminus") || self.is_cmd("backslash") {
                return Err("set difference not supported".into());
            } else {
                break;
            }
        }
        Ok(left)
    }

    fn parse_additive(&mut self) -> PResult<Expr> {
        self.enter()?;
        let mut terms = vec![self.parse_term()?];
        loop {
            if self.is_op('+') {
                self.pos += 1;
                terms.push(self.parse_term()?);
            } else if self.is_op('-') {
                self.pos += 1;
                let t = self.parse_term()?;
                terms.push(Expr::negate(t));
            } else if self.is_cmd("pm") || self.is_cmd("mp") {
                let minus_first = self.is_cmd("mp");
                self.pos += 1;
                let t = self.parse_term()?;
                let t = if minus_first { Expr::negate(t) } else { t };
                let base = if terms.len() == 1 {
                    terms.pop().unwrap_or_else(|| Expr::int(0))
                } else {
                    Expr::Add(std::mem::take(&mut terms))
                };
                terms = vec![Expr::PlusMinus(Box::new(base), Box::new(t))];
            } else {
                break;
            }
        }
        self.leave();
        Ok(if terms.len() == 1 {
            terms.pop().unwrap_or_else(|| Expr::int(0))
        } else {
            Expr::Add(terms)
        })
    }

    fn starts_primary(&self) -> bool {
        match self.peek() {
            Some(Tok::Digit(_)) | Some(Tok::Letter(_)) | Some(Tok::Text(_))
            | Some(Tok::OpName(_)) | Some(Tok::Begin(_)) => true,
            Some(Tok::Op(c)) => match c {
                '(' | '[' | '{' => true,
                '|' => self.abs_depth == 0,
                '.' => matches!(self.peek_at(1), Some(Tok::Digit(_))),
                _ => false,
            },
            Some(Tok::Cmd(n)) => !matches!(
                n.as_str(),
                "cdot"
                    | "times"
                    | "div"
                    | "pm"
                    | "mp"
                    | "cup"
                    | "cap"
                    | "setminus"
                    | "}"
                    | "rangle"
                    | "rfloor"
                    | "rceil"
                    | "rvert"
                    | "%"
                    | "to"
                    | "rightarrow"
                    | "Rightarrow"
                    | "implies"
                    | "iff"
                    | "mid"
                    | "colon"
                    | "backslash"
                    | "ast"
                    | "star"
                    | "circ"
                    | "rbrace"
                    | "rbrack"
            ),
            _ => false,
        }
    }

    fn parse_term(&mut self) -> PResult<Expr> {
        self.enter()?;
        let mut factors = vec![self.parse_unary()?];
        loop {
            if self.is_op('*') || self.is_cmd("cdot") || self.is_cmd("times") || self.is_cmd("ast")
            {
                self.pos += 1;
                factors.push(self.parse_unary()?);
            } else if self.is_op('/') || self.is_cmd("div") || self.is_op(':') {
                self.pos += 1;
                let d = self.parse_unary()?;
                let n = if factors.len() == 1 {
                    factors.pop().unwrap_or_else(|| Expr::int(1))
                } else {
                    Expr::Mul(std::mem::take(&mut factors))
                };
                factors = vec![Expr::divide(n, d)];
            } else if self.is_cmd("over") {
                return Err("\\over not supported".into());
            } else if self.starts_primary() {
                let next = self.parse_postfix()?;
                // a mixed number: `4\frac{2}{3}` = 4 + 2/3 (an integer followed by a proper fraction)
                if factors.len() == 1 && self.toks.get(self.pos.wrapping_sub(1)).is_some() {
                    if let (Expr::Num(whole), Some(frac)) = (&factors[0], proper_fraction(&next)) {
                        if !whole.float
                            && whole.value.is_integer()
                            && !whole.value.is_zero()
                            && self.last_was_frac
                        {
                            let total = if whole.value < BigRational::zero() {
                                &whole.value - frac
                            } else {
                                &whole.value + frac
                            };
                            factors[0] = Expr::rational(total);
                            continue;
                        }
                    }
                }
                factors.push(next);
            } else {
                break;
            }
        }
        self.leave();
        Ok(if factors.len() == 1 {
            factors.pop().unwrap_or_else(|| Expr::int(1))
        } else {
            Expr::Mul(factors)
        })
    }

    fn parse_unary(&mut self) -> PResult<Expr> {
        self.enter()?;
        let r = if self.is_op('-') {
            self.pos += 1;
            Expr::negate(self.parse_unary()?)
        } else if self.is_op('+') {
            self.pos += 1;
            self.parse_unary()?
        } else if self.is_cmd("pm") || self.is_cmd("mp") {
            self.pos += 1;
            let v = self.parse_unary()?;
            Expr::PlusMinus(Box::new(Expr::int(0)), Box::new(v))
        } else {
            self.parse_postfix()?
        };
        self.leave();
        Ok(r)
    }

    /// The exponent after `^`: a brace group, or one token (a whole digit run counts as one).
    fn parse_script_arg(&mut self) -> PResult<Expr> {
        self.enter()?;
        let r = if self.is_op('{') {
            self.pos += 1;
            let e = self.parse_relation()?;
            self.expect_op('}')?;
            e
        } else if self.is_op('-') {
            self.pos += 1;
            Expr::negate(self.parse_script_arg()?)
        } else if self.is_op('+') {
            self.pos += 1;
            self.parse_script_arg()?
        } else {
            self.parse_primary()?
        };
        self.leave();
        Ok(r)
    }

    /// Raw subscript text (for symbol names) after `_`.
    fn parse_subscript_text(&mut self) -> PResult<String> {
        if self.is_op('{') {
            let start = self.pos + 1;
            let mut depth = 0usize;
            while let Some(t) = self.bump() {
                match t {
                    Tok::Op('{') => depth += 1,
                    Tok::Op('}') => {
                        depth -= 1;
                        if depth == 0 {
                            let end = self.pos - 1;
                            return Ok(tokens_text(&self.toks[start..end]));
                        }
                    }
                    _ => {}
                }
            }
            Err("unbalanced subscript".into())
        } else {
            match self.bump() {
                Some(Tok::Digit(d)) => Ok(d.to_string()),
                Some(Tok::Letter(l)) => Ok(l.to_string()),
                Some(Tok::Cmd(c)) => Ok(c),
                _ => Err("bad subscript".into()),
            }
        }
    }

    fn parse_postfix(&mut self) -> PResult<Expr> {
        self.enter()?;
        let mut base = self.parse_primary()?;
        loop {
            if self.is_op('^') {
                self.pos += 1;
                if self.is_cmd("circ") {
                    self.pos += 1;
                    continue;
                }
                if self.is_cmd("prime") {
                    self.pos += 1;
                    base = prime_of(base)?;
                    continue;
                }
                if self.is_op('{') && matches!(self.peek_at(1), Some(Tok::Cmd(c)) if c == "prime") {
                    // ^{\prime}, ^{\prime\prime}
                    let mut k = 1;
                    while matches!(self.peek_at(k), Some(Tok::Cmd(c)) if c == "prime") {
                        k += 1;
                    }
                    if self.peek_at(k) == Some(&Tok::Op('}')) {
                        self.pos += k + 1;
                        for _ in 1..k {
                            base = prime_of(base)?;
                        }
                        continue;
                    }
                }
                let exp = self.parse_script_arg()?;
                base = Expr::Pow(Box::new(base), Box::new(exp));
            } else if self.is_op('_') {
                self.pos += 1;
                let sub = self.parse_subscript_text()?;
                base = match base {
                    Expr::Sym(name) => Expr::Sym(format!("{name}_{sub}")),
                    // a base written as a subscript (`204_5`) is ignored, as math-verify does
                    Expr::Num(n) => Expr::Num(n),
                    other => other,
                };
            } else if self.is_op('!') {
                self.pos += 1;
                base = Expr::Func(Func::Factorial, vec![base]);
            } else if self.is_cmd("%") || self.is_op('%') {
                self.pos += 1;
                base = Expr::Percent(Box::new(base));
            } else if self.is_op('\'') {
                self.pos += 1;
                base = prime_of(base)?;
            } else {
                break;
            }
        }
        self.leave();
        Ok(base)
    }

    /// A macro argument: brace group, or a single token (one digit, one letter, one command).
    fn parse_macro_arg(&mut self) -> PResult<Expr> {
        self.enter()?;
        let r = if self.is_op('{') {
            self.pos += 1;
            let items = self.parse_list()?;
            self.expect_op('}')?;
            list_to_value(items)?
        } else {
            match self.peek().cloned() {
                Some(Tok::Digit(d)) => {
                    self.pos += 1;
                    Expr::int(d.to_digit(10).unwrap_or(0) as i64)
                }
                Some(Tok::Letter(_)) | Some(Tok::Cmd(_)) => self.parse_primary()?,
                _ => return Err("missing macro argument".into()),
            }
        };
        self.leave();
        Ok(r)
    }

    fn parse_number(&mut self) -> PResult<Expr> {
        let mut int = String::new();
        while let Some(Tok::Digit(d)) = self.peek() {
            if !int.is_empty() && self.space_before() {
                break;
            }
            int.push(*d);
            self.pos += 1;
        }
        let mut frac = String::new();
        let mut float = false;
        if self.is_op('.') && !self.space_before() {
            if let Some(Tok::Digit(_)) = self.peek_at(1) {
                self.pos += 1;
                float = true;
                while let Some(Tok::Digit(d)) = self.peek() {
                    if !frac.is_empty() && self.space_before() {
                        break;
                    }
                    frac.push(*d);
                    self.pos += 1;
                }
            } else if !int.is_empty() {
                // trailing "5." : the dot is punctuation
                self.pos += 1;
            }
        }
        if int.is_empty() && frac.is_empty() {
            return Err("expected a number".into());
        }
        if int.len() + frac.len() > 2000 {
            return Err("number too long".into());
        }
        Ok(Expr::Num(decimal_number(&int, &frac, float)))
    }

    fn parse_group_contents(&mut self, closers: &[char]) -> PResult<(Vec<Expr>, char)> {
        let saved_abs = self.abs_depth;
        self.abs_depth = 0;
        let items = self.parse_list();
        self.abs_depth = saved_abs;
        let items = items?;
        match self.peek() {
            Some(Tok::Op(c)) if closers.contains(c) => {
                let c = *c;
                self.pos += 1;
                Ok((items, c))
            }
            _ => Err("unclosed bracket".into()),
        }
    }

    fn parse_function_call(&mut self, f: Func) -> PResult<Expr> {
        // optional ^power and _base in either order
        let mut power: Option<Expr> = None;
        let mut base: Option<Expr> = None;
        for _ in 0..2 {
            if self.is_op('^') {
                self.pos += 1;
                power = Some(self.parse_script_arg()?);
            } else if self.is_op('_') {
                self.pos += 1;
                base = Some(self.parse_script_arg()?);
            }
        }
        let args: Vec<Expr> = if self.is_op('(') {
            self.pos += 1;
            let (items, _) = self.parse_group_contents(&[')'])?;
            items
        } else if self.is_op('{') {
            self.pos += 1;
            let items = self.parse_list()?;
            self.expect_op('}')?;
            items
        } else {
            // unparenthesised argument: a run of juxtaposed factors, stopping at functions
            let mut factors = vec![self.parse_unary()?];
            while self.starts_primary() && !self.next_is_function() && !self.is_op('(') {
                factors.push(self.parse_postfix()?);
            }
            vec![if factors.len() == 1 {
                factors.pop().unwrap_or_else(|| Expr::int(0))
            } else {
                Expr::Mul(factors)
            }]
        };
        if args.is_empty() {
            return Err("function without argument".into());
        }
        let mut f = f;
        let mut args = args;
        if f == Func::Log {
            if args.len() != 1 {
                return Err("log takes one argument".into());
            }
            if let Some(b) = base {
                args.push(b);
            }
        } else if !matches!(f, Func::Gcd | Func::Lcm | Func::Max | Func::Min) && args.len() != 1 {
            return Err("function takes one argument".into());
        }
        if let Some(p) = &power {
            if is_minus_one(p) {
                if let Some(inv) = f.inverse() {
                    f = inv;
                    power = None;
                }
            }
        }
        let call = Expr::Func(f, args);
        Ok(match power {
            Some(p) => Expr::Pow(Box::new(call), Box::new(p)),
            None => call,
        })
    }

    fn next_is_function(&self) -> bool {
        match self.peek() {
            Some(Tok::Cmd(n)) => func_of(n).is_some() || n == "sqrt" || n == "frac",
            Some(Tok::OpName(_)) => true,
            _ => false,
        }
    }

    fn parse_matrix(&mut self, env: &str) -> PResult<Expr> {
        let mut rows: Vec<Vec<Expr>> = Vec::new();
        let mut row: Vec<Expr> = Vec::new();
        loop {
            match self.peek() {
                Some(Tok::End(e)) => {
                    if e != env {
                        return Err("mismatched \\end".into());
                    }
                    self.pos += 1;
                    break;
                }
                Some(Tok::RowSep) => {
                    self.pos += 1;
                    if !row.is_empty() {
                        rows.push(std::mem::take(&mut row));
                    }
                }
                Some(Tok::Op('&')) => {
                    self.pos += 1;
                }
                None => return Err("unterminated matrix".into()),
                _ => {
                    let cell = self.parse_relation()?;
                    row.push(cell);
                    if !matches!(
                        self.peek(),
                        Some(Tok::Op('&')) | Some(Tok::RowSep) | Some(Tok::End(_))
                    ) {
                        return Err("bad matrix cell".into());
                    }
                }
            }
        }
        if !row.is_empty() {
            rows.push(row);
        }
        if rows.is_empty() {
            return Err("empty matrix".into());
        }
        let w = rows[0].len();
        if rows.iter().any(|r| r.len() != w) {
            return Err("ragged matrix".into());
        }
        Ok(Expr::Matrix(rows))
    }

    fn parse_primary(&mut self) -> PResult<Expr> {
        self.last_was_frac = false;
        self.enter()?;
        let r = self.parse_primary_inner();
        self.leave();
        r
    }

    fn parse_primary_inner(&mut self) -> PResult<Expr> {
        let tok = self.peek().cloned().ok_or("unexpected end")?;
        match tok {
            Tok::Digit(_) => self.parse_number(),
            Tok::Op('.') => {
                // ".5"
                self.parse_number()
            }
            Tok::Letter(c) => {
                self.pos += 1;
                if is_function_letter(c) && self.is_op('(') && !self.space_before() {
                    self.pos += 1;
                    let (args, _) = self.parse_group_contents(&[')'])?;
                    if args.is_empty() {
                        return Err("empty call".into());
                    }
                    return Ok(Expr::Apply(c.to_string(), args));
                }
                Ok(match c {
                    'e' => Expr::Const(Constant::E),
                    'i' => Expr::Const(Constant::I),
                    _ => Expr::Sym(c.to_string()),
                })
            }
            Tok::Text(t) => {
                self.pos += 1;
                text_value(&t, self.depth)
            }
            Tok::OpName(name) => {
                self.pos += 1;
                match func_of(&name) {
                    Some(f) => self.parse_function_call(f),
                    None => {
                        if self.is_op('(') {
                            self.pos += 1;
                            let (args, _) = self.parse_group_contents(&[')'])?;
                            Ok(Expr::Apply(name, args))
                        } else {
                            Ok(Expr::Sym(name))
                        }
                    }
                }
            }
            Tok::Begin(env) => {
                self.pos += 1;
                let kind = env.trim_end_matches('*');
                if kind.ends_with("matrix") || kind == "array" {
                    let m = self.parse_matrix(&env)?;
                    if kind == "vmatrix" {
                        return Err("determinant not supported".into());
                    }
                    Ok(m)
                } else if kind == "cases"
                    || kind.starts_with("align")
                    || kind == "equation"
                    || kind == "gather"
                {
                    Err(format!("environment {env} not supported"))
                } else {
                    Err(format!("unknown environment {env}"))
                }
            }
            Tok::Op('(') => {
                self.pos += 1;
                let (items, close) = self.parse_group_contents(&[')', ']'])?;
                bracket_value(items, true, close == ')')
            }
            Tok::Op('[') => {
                self.pos += 1;
                let (items, close) = self.parse_group_contents(&[')', ']'])?;
                if items.len() == 1 && close == ']' {
                    return list_to_value(items);
                }
                bracket_value(items, false, close == ')')
            }
            Tok::Op('{') => {
                self.pos += 1;
                let (items, _) = self.parse_group_contents(&['}'])?;
                list_to_value(items)
            }
            Tok::Op('|') => {
                self.pos += 1;
                self.abs_depth += 1;
                let inner = self.parse_additive();
                self.abs_depth = self.abs_depth.saturating_sub(1);
                let inner = inner?;
                self.expect_op('|')?;
                Ok(Expr::Func(Func::Abs, vec![inner]))
            }
            Tok::Cmd(name) => {
                self.pos += 1;
                self.parse_command(&name)
            }
            other => Err(format!("unexpected token {other:?}")),
        }
    }

    fn parse_delimited(&mut self, close: &str) -> PResult<Expr> {
        let saved = self.abs_depth;
        self.abs_depth = 0;
        let e = self.parse_additive();
        self.abs_depth = saved;
        let e = e?;
        if self.is_cmd(close)
            || (close == "rvert" && (self.is_cmd("vert") || self.is_cmd("|") || self.is_op('|')))
        {
            self.pos += 1;
            Ok(e)
        } else {
            Err(format!("expected \\{close}"))
        }
    }

    fn parse_command(&mut self, name: &str) -> PResult<Expr> {
        if let Some(f) = func_of(name) {
            return self.parse_function_call(f);
        }
        match name {
            "frac" => {
                let n = self.parse_macro_arg()?;
                let d = self.parse_macro_arg()?;
                self.last_was_frac = true;
                Ok(Expr::divide(n, d))
            }
            "binom" | "choose" => {
                let n = self.parse_macro_arg()?;
                let k = self.parse_macro_arg()?;
                Ok(Expr::Func(Func::Binom, vec![n, k]))
            }
            "sqrt" => {
                let mut index: Option<Expr> = None;
                if self.is_op('[') {
                    self.pos += 1;
                    let (items, _) = self.parse_group_contents(&[']'])?;
                    index = Some(list_to_value(items)?);
                }
                let radicand = if self.is_op('(') {
                    self.pos += 1;
                    let (items, _) = self.parse_group_contents(&[')'])?;
                    list_to_value(items)?
                } else {
                    self.parse_macro_arg()?
                };
                let exp = match index {
                    Some(n) => Expr::Pow(Box::new(n), Box::new(Expr::int(-1))),
                    None => Expr::rational(BigRational::new(BigInt::from(1), BigInt::from(2))),
                };
                Ok(Expr::Pow(Box::new(radicand), Box::new(exp)))
            }
            "pi" | "varpi" => Ok(Expr::Const(Constant::Pi)),
            "infty" | "infin" | "infinity" => Ok(Expr::Const(Constant::Infinity)),
            "e" => Ok(Expr::Const(Constant::E)),
            "i" | "imath" => Ok(Expr::Const(Constant::I)),
            "emptyset" | "varnothing" => Ok(Expr::Set(vec![])),
            "{" | "lbrace" => {
                let saved = self.abs_depth;
                self.abs_depth = 0;
                let items = self.parse_list();
                self.abs_depth = saved;
                let items = items?;
                if self.is_cmd("}") || self.is_cmd("rbrace") {
                    self.pos += 1;
                    Ok(Expr::Set(items))
                } else {
                    Err("unclosed \\{".into())
                }
            }
            "langle" => {
                let items = self.parse_list()?;
                if self.is_cmd("rangle") {
                    self.pos += 1;
                    Ok(Expr::Tuple(items))
                } else {
                    Err("unclosed \\langle".into())
                }
            }
            "lfloor" => Ok(Expr::Func(
                Func::Floor,
                vec![self.parse_delimited("rfloor")?],
            )),
            "lceil" => Ok(Expr::Func(Func::Ceil, vec![self.parse_delimited("rceil")?])),
            "lvert" | "vert" | "|" => {
                let close = if name == "|" { "|" } else { "rvert" };
                Ok(Expr::Func(Func::Abs, vec![self.parse_delimited(close)?]))
            }
            "mathbb" => {
                let arg = self.parse_macro_arg()?;
                match arg {
                    Expr::Sym(s) if s == "R" => Ok(Expr::Interval {
                        lo: Box::new(Expr::negate(Expr::Const(Constant::Infinity))),
                        hi: Box::new(Expr::Const(Constant::Infinity)),
                        left_open: true,
                        right_open: true,
                    }),
                    Expr::Sym(s) => Ok(Expr::Sym(format!("mathbb_{s}"))),
                    _ => Err("bad \\mathbb".into()),
                }
            }
            "exp" => self.parse_function_call(Func::Exp),
            "%" => Err("stray percent".into()),
            n if GREEK.contains(&n) => Ok(Expr::Sym(n.to_string())),
            n if TRANSPARENT.contains(&n) => self.parse_macro_arg(),
            other => Err(format!("unknown command \\{other}")),
        }
    }
}

/// `y'`: a derivative symbol, named with a prime.
fn prime_of(base: Expr) -> PResult<Expr> {
    match base {
        Expr::Sym(n) => Ok(Expr::Sym(format!("{n}'"))),
        Expr::Apply(n, a) => Ok(Expr::Apply(format!("{n}'"), a)),
        other => Err(format!("prime after {other}")),
    }
}

/// The value p/q of `\frac{p}{q}` with integers 0 < p < q, else `None`.
fn proper_fraction(e: &Expr) -> Option<BigRational> {
    if let Expr::Mul(v) = e {
        if let [Expr::Num(p), Expr::Pow(q, m)] = v.as_slice() {
            if let (Expr::Num(q), true) = (&**q, is_minus_one(m)) {
                let zero = BigRational::zero();
                if !p.float
                    && !q.float
                    && p.value.is_integer()
                    && q.value.is_integer()
                    && p.value > zero
                    && p.value < q.value
                {
                    return Some(&p.value / &q.value);
                }
            }
        }
    }
    None
}

fn is_minus_one(e: &Expr) -> bool {
    matches!(e, Expr::Num(n) if n.value == BigRational::from_integer(BigInt::from(-1)))
}

fn tokens_text(toks: &[Token]) -> String {
    let mut s = String::new();
    for t in toks {
        match &t.tok {
            Tok::Digit(c) | Tok::Letter(c) | Tok::Op(c) => s.push(*c),
            Tok::Cmd(n) => s.push_str(n),
            Tok::Text(n) | Tok::OpName(n) => s.push_str(n),
            _ => {}
        }
    }
    s
}

/// Exact value of a decimal literal `int.frac`.
pub fn decimal_number(int: &str, frac: &str, float: bool) -> Number {
    let digits = format!("{int}{frac}");
    let numer: BigInt = if digits.is_empty() {
        BigInt::zero()
    } else {
        digits.parse().unwrap_or_default()
    };
    let denom = num_traits::pow(BigInt::from(10), frac.len());
    Number {
        value: BigRational::new(numer, denom),
        float,
    }
}

/// A `\text{…}` body: numbers and math inside are parsed; words become a lower-cased `Text`.
fn text_value(t: &str, depth: usize) -> PResult<Expr> {
    let trimmed = t.trim();
    if trimmed.is_empty() {
        return Err("empty text".into());
    }
    if depth < MAX_DEPTH / 2 {
        let inner = trimmed.trim_start_matches('(').trim_end_matches(')');
        let is_word = inner.chars().count() > 1
            && inner
                .chars()
                .all(|c| c.is_alphabetic() || c == ' ' || c == '-');
        if !is_word {
            if let Ok(e) = parse_math(trimmed) {
                return Ok(e);
            }
        }
    }
    let word: String = trimmed
        .trim_matches(|c: char| c == '(' || c == ')' || c == '.' || c == ' ')
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_lowercase();
    if word.is_empty() {
        return Err("empty text".into());
    }
    Ok(Expr::Text(word))
}

fn list_to_value(mut items: Vec<Expr>) -> PResult<Expr> {
    match items.len() {
        0 => Err("empty group".into()),
        1 => Ok(items.pop().unwrap_or_else(|| Expr::int(0))),
        _ => Ok(Expr::Set(items)),
    }
}

/// `( … )`, `[ … ]` and mixed brackets: a group, an interval, or a tuple.
fn bracket_value(mut items: Vec<Expr>, open_paren: bool, close_paren: bool) -> PResult<Expr> {
    match items.len() {
        0 => Err("empty brackets".into()),
        1 if open_paren && close_paren => Ok(items.pop().unwrap_or_else(|| Expr::int(0))),
        1 => Err("one-element interval".into()),
        2 => {
            let hi = items.pop().unwrap_or_else(|| Expr::int(0));
            let lo = items.pop().unwrap_or_else(|| Expr::int(0));
            if open_paren && close_paren {
                // (a, b): an open interval when a < b are real numbers, otherwise a pair
                if let (Some(a), Some(b)) = (eval::real_value(&lo), eval::real_value(&hi)) {
                    if a < b {
                        return Ok(Expr::Interval {
                            lo: Box::new(lo),
                            hi: Box::new(hi),
                            left_open: true,
                            right_open: true,
                        });
                    }
                }
                return Ok(Expr::Tuple(vec![lo, hi]));
            }
            Ok(Expr::Interval {
                lo: Box::new(lo),
                hi: Box::new(hi),
                left_open: open_paren,
                right_open: close_paren,
            })
        }
        _ if open_paren && close_paren || (!open_paren && !close_paren) => Ok(Expr::Tuple(items)),
        _ => Err("bad interval".into()),
    }
}

fn build_chain(mut terms: Vec<Expr>, ops: Vec<RelOp>) -> Expr {
    if ops.is_empty() {
        return terms.pop().unwrap_or_else(|| Expr::int(0));
    }
    let mut rels = Vec::with_capacity(ops.len());
    for (k, op) in ops.iter().enumerate() {
        rels.push(Expr::Rel(
            *op,
            Box::new(terms[k].clone()),
            Box::new(terms[k + 1].clone()),
        ));
    }
    if rels.len() == 1 {
        rels.pop().unwrap_or_else(|| Expr::int(0))
    } else {
        Expr::And(rels)
    }
}

/// Expand `±` into the set of its values; nested sets inside a set are flattened.
fn resolve_plus_minus(e: Expr) -> Expr {
    fn has_pm(e: &Expr) -> bool {
        matches!(e, Expr::PlusMinus(..)) || e.children().into_iter().any(has_pm)
    }
    fn expand(e: &Expr, budget: &mut usize) -> Vec<Expr> {
        if *budget == 0 {
            return vec![e.clone()];
        }
        match e {
            Expr::PlusMinus(a, b) => {
                *budget -= 1;
                let mut out = Vec::new();
                for x in expand(a, budget) {
                    for y in expand(b, budget) {
                        out.push(Expr::Add(vec![x.clone(), Expr::negate(y.clone())]));
                        out.push(Expr::Add(vec![x.clone(), y]));
                    }
                }
                out
            }
            Expr::Set(_)
            | Expr::Tuple(_)
            | Expr::Matrix(_)
            | Expr::Rel(..)
            | Expr::And(_)
            | Expr::Interval { .. } => {
                vec![resolve_plus_minus(e.clone())]
            }
            _ if !has_pm(e) => vec![e.clone()],
            _ => {
                // expand the first child containing ±, keep the rest
                let kids: Vec<&Expr> = e.children();
                let idx = kids.iter().position(|k| has_pm(k)).unwrap_or(0);
                let variants = expand(kids[idx], budget);
                variants
                    .into_iter()
                    .map(|v| {
                        let mut i = 0usize;
                        replace_child(e, idx, &v, &mut i)
                    })
                    .flat_map(|x| expand(&x, budget))
                    .collect()
            }
        }
    }
    fn replace_child(e: &Expr, idx: usize, v: &Expr, counter: &mut usize) -> Expr {
        let c = std::cell::Cell::new(0usize);
        let r = e.map_children(|ch| {
            let k = c.get();
            c.set(k + 1);
            if k == idx {
                v.clone()
            } else {
                ch.clone()
            }
        });
        *counter = c.get();
        r
    }
    if !has_pm(&e) {
        return e;
    }
    match e {
        Expr::Set(items) => {
            let mut out = Vec::new();
            for it in items {
                match resolve_plus_minus(it) {
                    Expr::Set(inner) => out.extend(inner),
                    x => out.push(x),
                }
            }
            Expr::Set(out)
        }
        Expr::Tuple(items) => Expr::Tuple(items.into_iter().map(resolve_plus_minus).collect()),
        Expr::Rel(op, a, b) => Expr::Rel(
            op,
            Box::new(resolve_plus_minus(*a)),
            Box::new(resolve_plus_minus(*b)),
        ),
        Expr::And(v) => Expr::And(v.into_iter().map(resolve_plus_minus).collect()),
        other => {
            let mut budget = 8usize;
            let vals = expand(&other, &mut budget);
            if vals.len() == 1 {
                vals.into_iter().next().unwrap_or(other)
            } else {
                Expr::Set(vals)
            }
        }
    }
}

/// Parse a LaTeX or plain-math string (already normalised) into an expression.
pub fn parse_math(s: &str) -> PResult<Expr> {
    if s.chars().count() > MAX_INPUT_CHARS {
        return Err("input too long".into());
    }
    let toks = tokenize(s)?;
    if toks.is_empty() {
        return Err("empty".into());
    }
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
        abs_depth: 0,
        last_was_frac: false,
        steps: 0,
    };
    let items = p.parse_list()?;
    if p.pos < p.toks.len() {
        return Err(format!("unexpected trailing token {:?}", p.peek()));
    }
    let e = match items.len() {
        0 => return Err("empty".into()),
        1 => items.into_iter().next().ok_or("empty")?,
        _ => {
            // a bare list: with assignments like `a=1, b=2` keep a tuple of relations
            Expr::Set(items)
        }
    };
    let e = resolve_plus_minus(e);
    if e.size() > eval::MAX_EXPR_NODES {
        return Err("expression too large".into());
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> String {
        parse_math(s)
            .map(|e| e.to_string())
            .unwrap_or_else(|e| format!("ERR {e}"))
    }

    #[test]
    fn basic_forms() {
        assert_eq!(p("\\frac12"), "1/2");
        assert_eq!(p("\\sqrt2"), "2**(1/2)");
        assert_eq!(p("2^{10}"), "2**10");
        assert_eq!(p("x_1+y"), "x_1 + y");
        assert_eq!(p("204_5"), "204");
        assert_eq!(p("(1,2)"), "(1, 2)");
        assert_eq!(p("(2,1)"), "(2, 1)");
        assert_eq!(p("[0,1)"), "[0, 1)");
        assert_eq!(p("\\{1,2\\}"), "{1, 2}");
        assert_eq!(p("1,2"), "{1, 2}");
        assert_eq!(p("x \\le 5"), "x <= 5");
        assert_eq!(p("1 \\pm 2"), "{1 + -2, 1 + 2}");
        assert_eq!(p("|x|"), "Abs(x)");
        assert_eq!(p("5!"), "factorial(5)");
        assert_eq!(p("f(x)"), "f(x)");
        assert_eq!(p("\\sin^2 x"), "sin(x)**2");
        assert_eq!(p("\\log_2 8"), "log(8, 2)");
        assert!(p("\\zzz").starts_with("ERR"));
        assert!(p(
            "(((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((x"
        )
        .starts_with("ERR"));
    }
}
