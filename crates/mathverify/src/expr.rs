//! The expression tree every parsed answer becomes, and its printing.
//!
//! Numbers are exact rationals (`BigRational`); a number written with a decimal point keeps the
//! flag `float`, because the comparison rules differ for decimals (they are compared after
//! rounding to `Options::float_rounding` places, as in math-verify).

use num_bigint::BigInt;
use num_rational::BigRational;
use num_traits::{One, Signed};
use std::fmt;

/// An exact number; `float` is true when the source wrote it with a decimal point.
#[derive(Clone, Debug, PartialEq)]
pub struct Number {
    /// The exact value of the literal.
    pub value: BigRational,
    /// Whether the literal was a decimal (e.g. `1000.0`, `0.33`).
    pub float: bool,
}

/// Named constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Constant {
    /// π
    Pi,
    /// Euler's number e
    E,
    /// The imaginary unit i
    I,
    /// +∞ (negative infinity is `-1 · ∞`)
    Infinity,
}

/// Known functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Func {
    Sin,
    Cos,
    Tan,
    Csc,
    Sec,
    Cot,
    Asin,
    Acos,
    Atan,
    Acsc,
    Asec,
    Acot,
    Sinh,
    Cosh,
    Tanh,
    Asinh,
    Acosh,
    Atanh,
    /// `log(x)` natural, or `log(x, base)` with two arguments.
    Log,
    Exp,
    Abs,
    Floor,
    Ceil,
    Factorial,
    Binom,
    Gcd,
    Lcm,
    Max,
    Min,
}

impl Func {
    /// The printed name of the function.
    pub fn name(self) -> &'static str {
        use Func::*;
        match self {
            Sin => "sin",
            Cos => "cos",
            Tan => "tan",
            Csc => "csc",
            Sec => "sec",
            Cot => "cot",
            Asin => "asin",
            Acos => "acos",
            Atan => "atan",
            Acsc => "acsc",
            Asec => "asec",
            Acot => "acot",
            Sinh => "sinh",
            Cosh => "cosh",
            Tanh => "tanh",
            Asinh => "asinh",
            Acosh => "acosh",
            Atanh => "atanh",
            Log => "log",
            Exp => "exp",
            Abs => "Abs",
            Floor => "floor",
            Ceil => "ceiling",
            Factorial => "factorial",
            Binom => "binomial",
            Gcd => "gcd",
            Lcm => "lcm",
            Max => "Max",
            Min => "Min",
        }
    }

    /// The inverse trigonometric function (`\sin^{-1}` means arcsin), if any.
    pub fn inverse(self) -> Option<Func> {
        use Func::*;
        Some(match self {
            Sin => Asin,
            Cos => Acos,
            Tan => Atan,
            Csc => Acsc,
            Sec => Asec,
            Cot => Acot,
            Sinh => Asinh,
            Cosh => Acosh,
            Tanh => Atanh,
            _ => return None,
        })
    }
}

/// Relation operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl RelOp {
    /// The relation read right to left: `a < b` is `b > a`.
    pub fn flipped(self) -> RelOp {
        match self {
            RelOp::Lt => RelOp::Gt,
            RelOp::Gt => RelOp::Lt,
            RelOp::Le => RelOp::Ge,
            RelOp::Ge => RelOp::Le,
            other => other,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            RelOp::Eq => "=",
            RelOp::Ne => "!=",
            RelOp::Lt => "<",
            RelOp::Le => "<=",
            RelOp::Gt => ">",
            RelOp::Ge => ">=",
        }
    }
}

/// A mathematical answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Num(Number),
    /// A variable (`x`, `x_1`, `alpha`).
    Sym(String),
    /// A word from `\text{...}`, lower-cased (answers like `\text{Evelyn}` or `\text{(C)}`).
    Text(String),
    Const(Constant),
    Add(Vec<Expr>),
    Mul(Vec<Expr>),
    Pow(Box<Expr>, Box<Expr>),
    Func(Func, Vec<Expr>),
    /// An undefined function applied to arguments, `f(x)`.
    Apply(String, Vec<Expr>),
    /// `x%` = x/100, kept apart so that percent answers can be recognised.
    Percent(Box<Expr>),
    /// `a ± b`: stands for the two values a+b, a−b; resolved into a set after parsing.
    PlusMinus(Box<Expr>, Box<Expr>),
    Tuple(Vec<Expr>),
    Set(Vec<Expr>),
    Interval {
        lo: Box<Expr>,
        hi: Box<Expr>,
        left_open: bool,
        right_open: bool,
    },
    Union(Vec<Expr>),
    Intersection(Vec<Expr>),
    Matrix(Vec<Vec<Expr>>),
    Rel(RelOp, Box<Expr>, Box<Expr>),
    /// A chain of relations `a = b = c` or `1 < x < 2`, each element a `Rel`.
    And(Vec<Expr>),
}

impl Expr {
    /// An exact integer.
    pub fn int(v: i64) -> Expr {
        Expr::Num(Number {
            value: BigRational::from_integer(BigInt::from(v)),
            float: false,
        })
    }

    /// An exact rational.
    pub fn rational(v: BigRational) -> Expr {
        Expr::Num(Number {
            value: v,
            float: false,
        })
    }

    /// `-e`.
    pub fn negate(e: Expr) -> Expr {
        match e {
            Expr::Num(n) => Expr::Num(Number {
                value: -n.value,
                float: n.float,
            }),
            other => Expr::Mul(vec![Expr::int(-1), other]),
        }
    }

    /// `a / b` as `a · b^(-1)`.
    pub fn divide(a: Expr, b: Expr) -> Expr {
        Expr::Mul(vec![a, Expr::Pow(Box::new(b), Box::new(Expr::int(-1)))])
    }

    /// Whether this is a relation or a chain of relations.
    pub fn is_relation(&self) -> bool {
        matches!(self, Expr::Rel(..)) || matches!(self, Expr::And(v) if !v.is_empty())
    }

    /// Whether this is an equation or a chain of equations only.
    pub fn is_equation(&self) -> bool {
        match self {
            Expr::Rel(RelOp::Eq, ..) => true,
            Expr::And(v) => {
                !v.is_empty() && v.iter().all(|r| matches!(r, Expr::Rel(RelOp::Eq, ..)))
            }
            _ => false,
        }
    }

    /// Whether this is a set-like value (set, interval, union, tuple).
    pub fn is_set_like(&self) -> bool {
        matches!(
            self,
            Expr::Set(_) | Expr::Interval { .. } | Expr::Union(_) | Expr::Intersection(_)
        )
    }

    /// Number of nodes, used to bound work.
    pub fn size(&self) -> usize {
        1 + self.children().iter().map(|c| c.size()).sum::<usize>()
    }

    /// The direct sub-expressions.
    pub fn children(&self) -> Vec<&Expr> {
        match self {
            Expr::Num(_) | Expr::Sym(_) | Expr::Text(_) | Expr::Const(_) => vec![],
            Expr::Add(v)
            | Expr::Mul(v)
            | Expr::Func(_, v)
            | Expr::Apply(_, v)
            | Expr::Tuple(v)
            | Expr::Set(v)
            | Expr::Union(v)
            | Expr::Intersection(v)
            | Expr::And(v) => v.iter().collect(),
            Expr::Pow(a, b) | Expr::PlusMinus(a, b) | Expr::Rel(_, a, b) => vec![a, b],
            Expr::Percent(a) => vec![a],
            Expr::Interval { lo, hi, .. } => vec![lo, hi],
            Expr::Matrix(rows) => rows.iter().flatten().collect(),
        }
    }

    /// Names of the free variables (symbols), sorted and deduplicated.
    pub fn free_symbols(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_symbols(&mut out);
        out.sort();
        out.dedup();
        out
    }

    fn collect_symbols(&self, out: &mut Vec<String>) {
        if let Expr::Sym(s) = self {
            out.push(s.clone());
        }
        for c in self.children() {
            c.collect_symbols(out);
        }
    }

    /// Rename symbols by `map` (pairs old → new).
    pub fn rename_symbols(&self, map: &[(String, String)]) -> Expr {
        match self {
            Expr::Sym(s) => match map.iter().find(|(a, _)| a == s) {
                Some((_, b)) => Expr::Sym(b.clone()),
                None => self.clone(),
            },
            _ => self.map_children(|c| c.rename_symbols(map)),
        }
    }

    /// Rebuild this node with `f` applied to each child.
    pub fn map_children(&self, f: impl Fn(&Expr) -> Expr) -> Expr {
        let mv = |v: &Vec<Expr>| v.iter().map(&f).collect::<Vec<_>>();
        match self {
            Expr::Num(_) | Expr::Sym(_) | Expr::Text(_) | Expr::Const(_) => self.clone(),
            Expr::Add(v) => Expr::Add(mv(v)),
            Expr::Mul(v) => Expr::Mul(mv(v)),
            Expr::Func(k, v) => Expr::Func(*k, mv(v)),
            Expr::Apply(n, v) => Expr::Apply(n.clone(), mv(v)),
            Expr::Tuple(v) => Expr::Tuple(mv(v)),
            Expr::Set(v) => Expr::Set(mv(v)),
            Expr::Union(v) => Expr::Union(mv(v)),
            Expr::Intersection(v) => Expr::Intersection(mv(v)),
            Expr::And(v) => Expr::And(mv(v)),
            Expr::Pow(a, b) => Expr::Pow(Box::new(f(a)), Box::new(f(b))),
            Expr::PlusMinus(a, b) => Expr::PlusMinus(Box::new(f(a)), Box::new(f(b))),
            Expr::Rel(op, a, b) => Expr::Rel(*op, Box::new(f(a)), Box::new(f(b))),
            Expr::Percent(a) => Expr::Percent(Box::new(f(a))),
            Expr::Interval {
                lo,
                hi,
                left_open,
                right_open,
            } => Expr::Interval {
                lo: Box::new(f(lo)),
                hi: Box::new(f(hi)),
                left_open: *left_open,
                right_open: *right_open,
            },
            Expr::Matrix(rows) => {
                Expr::Matrix(rows.iter().map(|r| r.iter().map(&f).collect()).collect())
            }
        }
    }
}

fn fmt_rational(v: &BigRational, float: bool, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    if float {
        // A decimal literal: print its decimal expansion (finite for literals).
        let ten = BigInt::from(10);
        let r = BigRational::new(v.numer().clone(), v.denom().clone());
        let mut p = 0usize;
        let mut scaled = r.clone();
        while !scaled.is_integer() && p < 60 {
            scaled *= BigRational::from_integer(ten.clone());
            p += 1;
        }
        let int = scaled.to_integer();
        let neg = int.is_negative();
        let digits = int.abs().to_string();
        let s = if p == 0 {
            format!("{digits}.0")
        } else if digits.len() > p {
            format!(
                "{}.{}",
                &digits[..digits.len() - p],
                &digits[digits.len() - p..]
            )
        } else {
            format!("0.{}{}", "0".repeat(p - digits.len()), digits)
        };
        return write!(f, "{}{}", if neg { "-" } else { "" }, s);
    }
    if v.denom().is_one() {
        write!(f, "{}", v.numer())
    } else {
        write!(f, "{}/{}", v.numer(), v.denom())
    }
}

fn join(f: &mut fmt::Formatter<'_>, items: &[Expr], sep: &str) -> fmt::Result {
    for (i, it) in items.iter().enumerate() {
        if i > 0 {
            write!(f, "{sep}")?;
        }
        write!(f, "{it}")?;
    }
    Ok(())
}

fn needs_parens(e: &Expr) -> bool {
    matches!(
        e,
        Expr::Add(_) | Expr::Rel(..) | Expr::And(_) | Expr::PlusMinus(..)
    ) || matches!(e, Expr::Num(n) if n.value.is_negative() || !n.value.is_integer())
        || matches!(e, Expr::Mul(_))
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Num(n) => fmt_rational(&n.value, n.float, f),
            Expr::Sym(s) => write!(f, "{s}"),
            Expr::Text(s) => write!(f, "{s}"),
            Expr::Const(c) => write!(
                f,
                "{}",
                match c {
                    Constant::Pi => "pi",
                    Constant::E => "E",
                    Constant::I => "I",
                    Constant::Infinity => "oo",
                }
            ),
            Expr::Add(v) => {
                for (i, t) in v.iter().enumerate() {
                    if i > 0 {
                        write!(f, " + ")?;
                    }
                    if matches!(t, Expr::Add(_) | Expr::Rel(..)) {
                        write!(f, "({t})")?;
                    } else {
                        write!(f, "{t}")?;
                    }
                }
                Ok(())
            }
            Expr::Mul(v) => {
                // factors x^(-1) print as a denominator: a*b/(c*d)
                let is_recip = |t: &Expr| matches!(t, Expr::Pow(_, e) if matches!(&**e, Expr::Num(n) if n.value == -BigRational::one()));
                let num: Vec<&Expr> = v.iter().filter(|t| !is_recip(t)).collect();
                let den: Vec<&Expr> = v
                    .iter()
                    .filter_map(|t| match t {
                        Expr::Pow(b, _) if is_recip(t) => Some(&**b),
                        _ => None,
                    })
                    .collect();
                let write_factors =
                    |f: &mut fmt::Formatter<'_>, items: &[&Expr], group: bool| -> fmt::Result {
                        let paren_all = group && items.len() > 1;
                        if paren_all {
                            write!(f, "(")?;
                        }
                        for (i, t) in items.iter().enumerate() {
                            if i > 0 {
                                write!(f, "*")?;
                            }
                            let wrap =
                                matches!(t, Expr::Add(_) | Expr::Rel(..) | Expr::PlusMinus(..))
                                    || (group
                                        && items.len() == 1
                                        && (needs_parens(t) || matches!(t, Expr::Pow(..))));
                            if wrap {
                                write!(f, "({t})")?;
                            } else {
                                write!(f, "{t}")?;
                            }
                        }
                        if paren_all {
                            write!(f, ")")?;
                        }
                        Ok(())
                    };
                if num.is_empty() {
                    write!(f, "1")?;
                } else {
                    write_factors(f, &num, false)?;
                }
                if !den.is_empty() {
                    write!(f, "/")?;
                    write_factors(f, &den, true)?;
                }
                Ok(())
            }
            Expr::Pow(a, b) => {
                if needs_parens(a) || matches!(**a, Expr::Pow(..)) {
                    write!(f, "({a})")?;
                } else {
                    write!(f, "{a}")?;
                }
                if needs_parens(b) || matches!(**b, Expr::Pow(..)) {
                    write!(f, "**({b})")
                } else {
                    write!(f, "**{b}")
                }
            }
            Expr::Func(k, v) => {
                write!(f, "{}(", k.name())?;
                join(f, v, ", ")?;
                write!(f, ")")
            }
            Expr::Apply(n, v) => {
                write!(f, "{n}(")?;
                join(f, v, ", ")?;
                write!(f, ")")
            }
            Expr::Percent(a) => write!(f, "{a}%"),
            Expr::PlusMinus(a, b) => write!(f, "{a} ± {b}"),
            Expr::Tuple(v) => {
                write!(f, "(")?;
                join(f, v, ", ")?;
                if v.len() == 1 {
                    write!(f, ",")?;
                }
                write!(f, ")")
            }
            Expr::Set(v) => {
                write!(f, "{{")?;
                join(f, v, ", ")?;
                write!(f, "}}")
            }
            Expr::Interval {
                lo,
                hi,
                left_open,
                right_open,
            } => write!(
                f,
                "{}{}, {}{}",
                if *left_open { "(" } else { "[" },
                lo,
                hi,
                if *right_open { ")" } else { "]" }
            ),
            Expr::Union(v) => join(f, v, " U "),
            Expr::Intersection(v) => join(f, v, " n "),
            Expr::Matrix(rows) => {
                write!(f, "Matrix([")?;
                for (i, r) in rows.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "[")?;
                    join(f, r, ", ")?;
                    write!(f, "]")?;
                }
                write!(f, "])")
            }
            Expr::Rel(op, a, b) => write!(f, "{a} {} {b}", op.symbol()),
            Expr::And(v) => join(f, v, " & "),
        }
    }
}
