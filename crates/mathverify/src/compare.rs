//! Mathematical equivalence of two parsed answers (gold first: the rules are not symmetric).
//!
//! Order of rules (each is a pure function of the two trees and the options):
//! 1. non-strict mode renames the prediction's variables onto the gold's;
//! 2. assignments `x = … = v` are shortened to `x = v`; an equation predicted for a plain gold
//!    is reduced to its last right-hand side, and an assignment gold against a plain prediction
//!    to its value;
//! 3. a relation gold against a set prediction becomes a set (`-2 ≤ x ≤ 7` → `[-2, 7]`), and the
//!    other way round only with `allow_set_relation_comp`;
//! 4. structural equality;
//! 5. relations: same operator with equal `lhs − rhs`, flipped operator with opposite sides, or
//!    proportional `lhs − rhs` (positive factor keeps direction, negative flips it);
//! 6. sets/intervals/tuples/matrices element-wise (sets ignore order, tuples keep it);
//! 7. words (`\text{…}`) by case-insensitive spelling;
//! 8. numbers: a decimal on either side of an atomic number → equal after rounding both to
//!    `float_rounding` places; exact rationals → exact equality; otherwise numeric equality at
//!    several pseudo-random points with relative tolerance [`NUMERIC_TOLERANCE`].

use crate::eval::{self, C64};
use crate::expr::{Constant, Expr, Func, RelOp};
use crate::Options;
use num_bigint::BigInt;
use num_rational::BigRational;
use num_traits::Signed;

/// Relative tolerance of numeric comparisons at random points.
pub const NUMERIC_TOLERANCE: f64 = 1e-9;
/// Number of random evaluation points.
pub const NUM_POINTS: u64 = 6;
/// Largest set/tuple compared element by element.
pub const MAX_ELEMENTS: usize = 64;

/// Whether `e` contains only variables (the left side of an assignment such as `x`, `(t,u)`,
/// `f(x)`, `A/S`).
fn only_symbols(e: &Expr) -> bool {
    match e {
        Expr::Sym(_) | Expr::Text(_) => true,
        Expr::Pow(b, x) => {
            matches!(**x, Expr::Num(ref n) if n.value == BigRational::from_integer(BigInt::from(-1)))
                && only_symbols(b)
        }
        Expr::Num(_) | Expr::Const(_) => false,
        _ => {
            let kids = e.children();
            !kids.is_empty() && kids.into_iter().all(only_symbols)
        }
    }
}

fn rel_parts(e: &Expr) -> Option<(RelOp, &Expr, &Expr)> {
    match e {
        Expr::Rel(op, a, b) => Some((*op, a, b)),
        _ => None,
    }
}

fn first_relation(e: &Expr) -> &Expr {
    match e {
        Expr::And(v) if !v.is_empty() => &v[0],
        other => other,
    }
}

fn last_relation(e: &Expr) -> &Expr {
    match e {
        Expr::And(v) if !v.is_empty() => last_relation(&v[v.len() - 1]),
        other => other,
    }
}

/// `x = 1` or a chain of equations starting with a variable.
pub fn is_assignment(e: &Expr) -> bool {
    match e {
        Expr::Rel(RelOp::Eq, lhs, _) => only_symbols(lhs),
        Expr::And(v) => {
            e.is_equation() && rel_parts(&v[0]).is_some_and(|(_, l, _)| only_symbols(l))
        }
        _ => false,
    }
}

fn last_rhs(e: &Expr) -> Expr {
    match rel_parts(last_relation(e)) {
        Some((_, _, r)) => r.clone(),
        None => e.clone(),
    }
}

fn shorten_assignment(e: &Expr) -> Expr {
    let lhs = match rel_parts(first_relation(e)) {
        Some((_, l, _)) => l.clone(),
        None => return e.clone(),
    };
    Expr::Rel(RelOp::Eq, Box::new(lhs), Box::new(last_rhs(e)))
}

fn sub(a: &Expr, b: &Expr) -> Expr {
    Expr::Add(vec![a.clone(), Expr::negate(b.clone())])
}

fn neg_inf() -> Expr {
    Expr::negate(Expr::Const(Constant::Infinity))
}

fn interval(lo: Expr, hi: Expr, left_open: bool, right_open: bool) -> Expr {
    Expr::Interval {
        lo: Box::new(lo),
        hi: Box::new(hi),
        left_open,
        right_open,
    }
}

/// A one-variable relation as the set of its solutions, where that is immediate.
fn relation_as_set(e: &Expr) -> Option<Expr> {
    let simple = |op: RelOp, var_left: bool, c: &Expr| -> Option<Expr> {
        let op = if var_left { op } else { op.flipped() };
        eval::real_value(c)?;
        Some(match op {
            RelOp::Lt => interval(neg_inf(), c.clone(), true, true),
            RelOp::Le => interval(neg_inf(), c.clone(), true, false),
            RelOp::Gt => interval(c.clone(), Expr::Const(Constant::Infinity), true, true),
            RelOp::Ge => interval(c.clone(), Expr::Const(Constant::Infinity), false, true),
            RelOp::Eq => Expr::Set(vec![c.clone()]),
            RelOp::Ne => Expr::Union(vec![
                interval(neg_inf(), c.clone(), true, true),
                interval(c.clone(), Expr::Const(Constant::Infinity), true, true),
            ]),
        })
    };
    let is_var = |x: &Expr| matches!(x, Expr::Sym(_) | Expr::Apply(..));
    match e {
        Expr::Rel(op, a, b) => {
            if is_var(a) && *op == RelOp::Eq && b.is_set_like() {
                Some((**b).clone())
            } else if is_var(a) {
                simple(*op, true, b)
            } else if is_var(b) {
                simple(*op, false, a)
            } else {
                None
            }
        }
        Expr::And(v) if v.len() == 2 => {
            let (op1, a, x1) = rel_parts(&v[0])?;
            let (op2, x2, b) = rel_parts(&v[1])?;
            if !is_var(x1) || x1 != x2 {
                return None;
            }
            eval::real_value(a)?;
            eval::real_value(b)?;
            match (op1, op2) {
                (RelOp::Lt | RelOp::Le, RelOp::Lt | RelOp::Le) => Some(interval(
                    a.clone(),
                    b.clone(),
                    op1 == RelOp::Lt,
                    op2 == RelOp::Lt,
                )),
                (RelOp::Gt | RelOp::Ge, RelOp::Gt | RelOp::Ge) => Some(interval(
                    b.clone(),
                    a.clone(),
                    op2 == RelOp::Gt,
                    op1 == RelOp::Gt,
                )),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Most element comparisons one [`expr_eq`] call may make (nested sets of tuples…).
pub const MAX_COMPARISONS: u32 = 20_000;

thread_local! {
    static BUDGET: std::cell::Cell<u32> = const { std::cell::Cell::new(MAX_COMPARISONS) };
}

/// Spend one unit of the per-call comparison budget; false when it is exhausted.
fn spend() -> bool {
    BUDGET.with(|b| {
        let left = b.get();
        if left == 0 {
            false
        } else {
            b.set(left - 1);
            true
        }
    })
}

/// Whether a relation in one variable holds exactly on the real set `set` (a union of
/// intervals and points): checked at every finite end, just beside each end, and on a grid
/// around them. `None` when the relation has not exactly one variable or the set is not real.
fn relation_matches_set(rel: &Expr, set: &Expr) -> Option<bool> {
    let vars = rel.free_symbols();
    if vars.len() != 1 {
        return None;
    }
    let var = vars[0].as_str();
    let pieces = canonical_real_set(set)?;
    let holds = |x: f64| -> bool {
        let rels: Vec<&Expr> = match rel {
            Expr::And(v) => v.iter().collect(),
            other => vec![other],
        };
        rels.iter().all(|r| {
            let Some((op, l, rt)) = rel_parts(r) else {
                return false;
            };
            let (Some(a), Some(b)) = (
                eval::numeric_bound(l, 0, &[(var, x)]),
                eval::numeric_bound(rt, 0, &[(var, x)]),
            ) else {
                return false;
            };
            if a.im.abs() > 1e-9 * (1.0 + a.re.abs()) || b.im.abs() > 1e-9 * (1.0 + b.re.abs()) {
                return false;
            }
            let d = a.re - b.re;
            let tol = 1e-9 * (1.0 + a.re.abs().max(b.re.abs()));
            match op {
                RelOp::Lt => d < -tol,
                RelOp::Le => d <= tol,
                RelOp::Gt => d > tol,
                RelOp::Ge => d >= -tol,
                RelOp::Eq => d.abs() <= tol,
                RelOp::Ne => d.abs() > tol,
            }
        })
    };
    let member = |x: f64| -> bool {
        pieces
            .iter()
            .any(|&(lo, hi, lc, hc)| (lo < x && x < hi) || (x == lo && lc) || (x == hi && hc))
    };
    let ends: Vec<f64> = pieces
        .iter()
        .flat_map(|p| [p.0, p.1])
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = ends
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let (lo, hi) = if lo.is_finite() {
        (lo - 5.0, hi + 5.0)
    } else {
        (-10.0, 10.0)
    };
    let mut xs: Vec<f64> = Vec::new();
    for &e in &ends {
        let delta = 1e-6 * e.abs().max(1.0);
        xs.extend([e, e - delta, e + delta]);
    }
    xs.extend((0..=100).map(|k| lo + (hi - lo) * k as f64 / 100.0 + 1e-7));
    xs.extend([-1e6, 1e6, 0.0]);
    Some(xs.into_iter().all(|x| holds(x) == member(x)))
}

/// Compare two parsed answers under `opts` (math-verify's `sympy_expr_eq`).
pub fn expr_eq(gold: &Expr, pred: &Expr, opts: &Options) -> bool {
    BUDGET.with(|b| b.set(MAX_COMPARISONS));
    expr_eq_depth(gold, pred, opts, 0)
}

fn expr_eq_depth(gold: &Expr, pred: &Expr, opts: &Options, depth: usize) -> bool {
    if depth > 12 || !spend() {
        return false;
    }
    if depth == 0 && (gold.size() > eval::MAX_EXPR_NODES || pred.size() > eval::MAX_EXPR_NODES) {
        return false;
    }
    let mut gold = gold.clone();
    let mut pred = pred.clone();
    if !opts.strict {
        let gs = gold.free_symbols();
        let ps = pred.free_symbols();
        if gs.len() == ps.len() && gs != ps {
            let map: Vec<(String, String)> = ps.into_iter().zip(gs).collect();
            pred = pred.rename_symbols(&map);
        }
    }
    let gold_assign = is_assignment(&gold);
    let pred_assign = is_assignment(&pred);
    let gold_eqn = gold.is_equation();
    let pred_eqn = pred.is_equation();
    if gold_assign {
        gold = shorten_assignment(&gold);
    }
    if pred_assign {
        pred = shorten_assignment(&pred);
    }
    if pred_eqn && !gold_eqn {
        pred = last_rhs(&pred);
    } else if gold_assign && !pred_eqn {
        gold = last_rhs(&gold);
    }
    if gold.is_relation() && pred.is_set_like() {
        match relation_as_set(&gold) {
            Some(s) => gold = s,
            None => {
                if let Some(r) = relation_matches_set(&gold, &pred) {
                    return r;
                }
            }
        }
    }
    if opts.allow_set_relation_comp && pred.is_relation() && gold.is_set_like() {
        match relation_as_set(&pred) {
            Some(s) => pred = s,
            None => {
                if let Some(r) = relation_matches_set(&pred, &gold) {
                    return r;
                }
            }
        }
    }
    if gold == pred {
        return true;
    }
    // percent answers: 28% also accepts 28 (and 0.28 through its value)
    if opts.lenient_percent {
        let plain =
            |e: &Expr| !matches!(e, Expr::Percent(_)) && !e.is_relation() && !e.is_set_like();
        match (&gold, &pred) {
            (Expr::Percent(g), p) if plain(p) && scalar_eq(g, p, opts) => return true,
            (g, Expr::Percent(p)) if plain(g) && scalar_eq(g, p, opts) => return true,
            _ => {}
        }
    }
    if gold.is_relation() && pred.is_relation() {
        return relations_eq(&gold, &pred, opts, depth);
    }
    if gold.is_relation() || pred.is_relation() {
        return false;
    }
    let is_collection = |e: &Expr| e.is_set_like() || matches!(e, Expr::Tuple(_));
    if is_collection(&gold) || is_collection(&pred) {
        return sets_eq(&gold, &pred, opts, depth);
    }
    if let (Some(gm), Some(pm)) = (matrix_value(&gold), matrix_value(&pred)) {
        return matrices_eq(&gm, &pm, opts, depth);
    }
    if matches!(gold, Expr::Matrix(_)) || matches!(pred, Expr::Matrix(_)) {
        return false;
    }
    if let Some(r) = words_eq(&gold, &pred) {
        return r;
    }
    scalar_eq(&gold, &pred, opts)
}

/// Word answers: `\text{Evelyn}` vs `Evelyn` (letters multiplied), `\text{(C)}` vs `C`,
/// `e` vs Euler's e. `None` when neither side is a word or a lone symbol.
fn words_eq(gold: &Expr, pred: &Expr) -> Option<bool> {
    fn letters(e: &Expr) -> Option<String> {
        match e {
            Expr::Sym(s) | Expr::Text(s) => Some(s.clone()),
            Expr::Const(Constant::E) => Some("e".into()),
            Expr::Const(Constant::I) => Some("i".into()),
            Expr::Const(Constant::Pi) => Some("pi".into()),
            Expr::Mul(v) => v
                .iter()
                .map(letters)
                .collect::<Option<Vec<_>>>()
                .map(|p| p.concat()),
            _ => None,
        }
    }
    let g_word = matches!(gold, Expr::Text(_));
    let p_word = matches!(pred, Expr::Text(_));
    let g_sym = matches!(gold, Expr::Sym(_));
    let p_sym = matches!(pred, Expr::Sym(_));
    if !(g_word || p_word || g_sym || p_sym) {
        return None;
    }
    let (gl, pl) = (letters(gold), letters(pred));
    if let (Some(g), Some(p)) = (&gl, &pl) {
        let same = if g_word || p_word || g.len() > 1 || p.len() > 1 {
            g.to_lowercase() == p.to_lowercase()
        } else {
            g == p
                || (g.eq_ignore_ascii_case("e")
                    && p.eq_ignore_ascii_case("e")
                    && (gold == &Expr::Const(Constant::E) || pred == &Expr::Const(Constant::E)))
        };
        if same {
            return Some(true);
        }
    }
    if g_word || p_word {
        return Some(false);
    }
    None
}

fn relations_eq(gold: &Expr, pred: &Expr, opts: &Options, depth: usize) -> bool {
    match (gold, pred) {
        (Expr::And(g), Expr::And(p)) => {
            g.len() == p.len()
                && g.iter()
                    .zip(p)
                    .all(|(a, b)| relations_eq(a, b, opts, depth + 1))
        }
        (Expr::Rel(gop, gl, gr), Expr::Rel(pop, pl, pr)) => {
            // relations with sets on a side (x ∈ S): compare side by side
            if gr.is_set_like()
                || pr.is_set_like()
                || matches!(**gr, Expr::Tuple(_))
                || matches!(**pr, Expr::Tuple(_))
            {
                return gop == pop
                    && expr_eq_depth(gl, pl, opts, depth + 1)
                    && expr_eq_depth(gr, pr, opts, depth + 1);
            }
            let dg = sub(gl, gr);
            if gop == pop && scalar_eq(&dg, &sub(pl, pr), opts) {
                return true;
            }
            if gop.flipped() == *pop && scalar_eq(&dg, &sub(pr, pl), opts) {
                return true;
            }
            // proportional: dg = c · dp with c constant, c > 0 keeps the direction
            match proportional_factor(&dg, &sub(pl, pr)) {
                Some(c) => match gop {
                    RelOp::Eq | RelOp::Ne => gop == pop,
                    _ => (gop == pop && c > 0.0) || (gop.flipped() == *pop && c < 0.0),
                },
                None => false,
            }
        }
        _ => false,
    }
}

/// The constant c with a = c·b at every evaluation point, when there is one (c ≠ 0).
fn proportional_factor(a: &Expr, b: &Expr) -> Option<f64> {
    let mut c: Option<C64> = None;
    let mut valid = 0;
    for point in 0..NUM_POINTS {
        let (va, vb) = match (eval::numeric(a, point), eval::numeric(b, point)) {
            (Some(x), Some(y)) => (x, y),
            _ => continue,
        };
        if vb.abs() < 1e-12 {
            if va.abs() < 1e-12 {
                continue;
            }
            return None;
        }
        let ratio = C64::new(
            (va.re * vb.re + va.im * vb.im) / (vb.re * vb.re + vb.im * vb.im),
            (va.im * vb.re - va.re * vb.im) / (vb.re * vb.re + vb.im * vb.im),
        );
        match c {
            None => c = Some(ratio),
            Some(c0) => {
                let diff = C64::new(c0.re - ratio.re, c0.im - ratio.im).abs();
                if diff > NUMERIC_TOLERANCE * (1.0 + c0.abs()) {
                    return None;
                }
            }
        }
        valid += 1;
    }
    let c = c?;
    if valid < 2 || c.abs() < 1e-12 || c.im.abs() > 1e-9 {
        return None;
    }
    Some(c.re)
}

fn as_collection(e: &Expr) -> Expr {
    if e.is_set_like() || matches!(e, Expr::Tuple(_)) {
        e.clone()
    } else {
        Expr::Set(vec![e.clone()])
    }
}

fn sets_eq(gold: &Expr, pred: &Expr, opts: &Options, depth: usize) -> bool {
    let a = as_collection(gold);
    let b = as_collection(pred);
    if let (
        Expr::Interval {
            lo: al,
            hi: ah,
            left_open: alo,
            right_open: aro,
        },
        Expr::Interval {
            lo: bl,
            hi: bh,
            left_open: blo,
            right_open: bro,
        },
    ) = (&a, &b)
    {
        return alo == blo
            && aro == bro
            && expr_eq_depth(al, bl, opts, depth + 1)
            && expr_eq_depth(ah, bh, opts, depth + 1);
    }
    if a == b {
        return true;
    }
    if let (Some(ca), Some(cb)) = (canonical_real_set(&a), canonical_real_set(&b)) {
        if real_sets_equal(&ca, &cb) {
            return true;
        }
    }
    match (&a, &b) {
        (Expr::Set(g), Expr::Set(p)) => {
            let (g, p) = (dedup(g, opts, depth), dedup(p, opts, depth));
            unordered_eq(&g, &p, opts, depth)
        }
        (Expr::Tuple(g), Expr::Tuple(p)) | (Expr::Tuple(g), Expr::Set(p)) => {
            ordered_eq(g, p, opts, depth)
        }
        (Expr::Set(g), Expr::Tuple(p)) => unordered_eq(g, p, opts, depth),
        (
            Expr::Interval {
                lo,
                hi,
                left_open: true,
                right_open: true,
            },
            Expr::Set(p) | Expr::Tuple(p),
        ) => ordered_eq(&[(**lo).clone(), (**hi).clone()], p, opts, depth),
        (
            Expr::Set(g) | Expr::Tuple(g),
            Expr::Interval {
                lo,
                hi,
                left_open: true,
                right_open: true,
            },
        ) => ordered_eq(g, &[(**lo).clone(), (**hi).clone()], opts, depth),
        (Expr::Union(g), Expr::Union(p)) => unordered_eq(g, p, opts, depth),
        (Expr::Tuple(g), m @ Expr::Matrix(_)) | (m @ Expr::Matrix(_), Expr::Tuple(g)) => {
            match matrix_value(m) {
                Some(rows) if rows.len() == 1 || rows.iter().all(|r| r.len() == 1) => {
                    let flat: Vec<Expr> = rows.into_iter().flatten().collect();
                    ordered_eq(g, &flat, opts, depth)
                }
                _ => false,
            }
        }
        _ => false,
    }
}

/// A set's distinct elements (a set lists each element once: `{1, 1}` = `{1}`).
fn dedup(v: &[Expr], opts: &Options, depth: usize) -> Vec<Expr> {
    let mut out: Vec<Expr> = Vec::with_capacity(v.len());
    for x in v.iter().take(MAX_ELEMENTS * 2) {
        if !out
            .iter()
            .any(|y| y == x || expr_eq_depth(y, x, opts, depth + 1))
        {
            out.push(x.clone());
        }
    }
    out
}

fn ordered_eq(g: &[Expr], p: &[Expr], opts: &Options, depth: usize) -> bool {
    g.len() == p.len()
        && g.len() <= MAX_ELEMENTS
        && g.iter()
            .zip(p)
            .all(|(a, b)| expr_eq_depth(a, b, opts, depth + 1))
}

/// Order-insensitive equality: a perfect matching between equal elements (Kuhn's algorithm).
fn unordered_eq(g: &[Expr], p: &[Expr], opts: &Options, depth: usize) -> bool {
    let n = g.len();
    if n != p.len() || n > MAX_ELEMENTS {
        return false;
    }
    let mut adj = vec![vec![false; n]; n];
    for i in 0..n {
        for j in 0..n {
            adj[i][j] = expr_eq_depth(&g[i], &p[j], opts, depth + 1);
        }
        if !adj[i].iter().any(|x| *x) {
            return false;
        }
    }
    let mut match_of: Vec<Option<usize>> = vec![None; n];
    fn augment(
        i: usize,
        adj: &[Vec<bool>],
        seen: &mut [bool],
        match_of: &mut [Option<usize>],
    ) -> bool {
        for j in 0..adj.len() {
            if adj[i][j] && !seen[j] {
                seen[j] = true;
                if match_of[j].is_none_or(|k| augment(k, adj, seen, match_of)) {
                    match_of[j] = Some(i);
                    return true;
                }
            }
        }
        false
    }
    (0..n).all(|i| {
        let mut seen = vec![false; n];
        augment(i, &adj, &mut seen, &mut match_of)
    })
}

/// A real set as sorted disjoint pieces `(lo, hi, lo_closed, hi_closed)`, for unions of
/// intervals and finite sets with numeric ends.
fn canonical_real_set(e: &Expr) -> Option<Vec<(f64, f64, bool, bool)>> {
    let mut pieces: Vec<(f64, f64, bool, bool)> = Vec::new();
    fn collect(e: &Expr, out: &mut Vec<(f64, f64, bool, bool)>) -> Option<()> {
        match e {
            Expr::Interval {
                lo,
                hi,
                left_open,
                right_open,
            } => {
                let a = eval::real_value(lo)?;
                let b = eval::real_value(hi)?;
                if a < b || (a == b && !left_open && !right_open) {
                    out.push((
                        a,
                        b,
                        !left_open && a.is_finite(),
                        !right_open && b.is_finite(),
                    ));
                }
            }
            Expr::Set(v) => {
                for x in v {
                    let a = eval::real_value(x)?;
                    if !a.is_finite() {
                        return None;
                    }
                    out.push((a, a, true, true));
                }
            }
            Expr::Union(v) => {
                for x in v {
                    collect(x, out)?;
                }
            }
            _ => return None,
        }
        Some(())
    }
    collect(e, &mut pieces)?;
    pieces.sort_by(|x, y| x.0.partial_cmp(&y.0).unwrap_or(std::cmp::Ordering::Equal));
    let mut merged: Vec<(f64, f64, bool, bool)> = Vec::new();
    for p in pieces {
        if let Some(last) = merged.last_mut() {
            let touches = p.0 < last.1 || (close(p.0, last.1) && (p.2 || last.3));
            if touches || (p.0 <= last.1) {
                if p.1 > last.1 || (close(p.1, last.1) && p.3) {
                    last.3 = if close(p.1, last.1) {
                        last.3 || p.3
                    } else {
                        p.3
                    };
                    last.1 = last.1.max(p.1);
                }
                if close(p.0, last.0) {
                    last.2 = last.2 || p.2;
                }
                continue;
            }
        }
        merged.push(p);
    }
    Some(merged)
}

fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= NUMERIC_TOLERANCE * a.abs().max(b.abs())
}

fn real_sets_equal(a: &[(f64, f64, bool, bool)], b: &[(f64, f64, bool, bool)]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| close(x.0, y.0) && close(x.1, y.1) && x.2 == y.2 && x.3 == y.3)
}

/// The value of a matrix expression (sums, products, scalar multiples of matrices).
fn matrix_value(e: &Expr) -> Option<Vec<Vec<Expr>>> {
    match e {
        Expr::Matrix(rows) => Some(rows.clone()),
        Expr::Add(terms) => {
            let mats: Option<Vec<_>> = terms.iter().map(matrix_value).collect();
            let mats = mats?;
            let first = mats.first()?;
            let (r, c) = (first.len(), first[0].len());
            if mats.iter().any(|m| m.len() != r || m[0].len() != c) {
                return None;
            }
            Some(
                (0..r)
                    .map(|i| {
                        (0..c)
                            .map(|j| Expr::Add(mats.iter().map(|m| m[i][j].clone()).collect()))
                            .collect()
                    })
                    .collect(),
            )
        }
        Expr::Mul(factors) => {
            let mut scalar: Vec<Expr> = Vec::new();
            let mut acc: Option<Vec<Vec<Expr>>> = None;
            for f in factors {
                if let Some(m) = matrix_value(f) {
                    acc = Some(match acc {
                        None => m,
                        Some(a) => {
                            if a[0].len() != m.len() {
                                return None;
                            }
                            (0..a.len())
                                .map(|i| {
                                    (0..m[0].len())
                                        .map(|j| {
                                            Expr::Add(
                                                (0..m.len())
                                                    .map(|k| {
                                                        Expr::Mul(vec![
                                                            a[i][k].clone(),
                                                            m[k][j].clone(),
                                                        ])
                                                    })
                                                    .collect(),
                                            )
                                        })
                                        .collect()
                                })
                                .collect()
                        }
                    });
                } else if matches!(f, Expr::Set(_) | Expr::Tuple(_) | Expr::Interval { .. }) {
                    return None;
                } else {
                    scalar.push(f.clone());
                }
            }
            let m = acc?;
            if scalar.is_empty() {
                return Some(m);
            }
            Some(
                m.into_iter()
                    .map(|row| {
                        row.into_iter()
                            .map(|x| {
                                let mut v = scalar.clone();
                                v.push(x);
                                Expr::Mul(v)
                            })
                            .collect()
                    })
                    .collect(),
            )
        }
        _ => None,
    }
}

fn matrices_eq(g: &[Vec<Expr>], p: &[Vec<Expr>], opts: &Options, depth: usize) -> bool {
    g.len() == p.len()
        && g.iter().zip(p).all(|(gr, pr)| {
            gr.len() == pr.len()
                && gr
                    .iter()
                    .zip(pr)
                    .all(|(a, b)| expr_eq_depth(a, b, opts, depth + 1))
        })
}

fn is_atomic_number(e: &Expr) -> bool {
    match e {
        Expr::Num(_) => true,
        Expr::Percent(x) => matches!(**x, Expr::Num(_)),
        _ => false,
    }
}

fn is_float_atom(e: &Expr) -> bool {
    match e {
        Expr::Num(n) => n.float,
        Expr::Percent(x) => matches!(**x, Expr::Num(ref n) if n.float),
        _ => false,
    }
}

fn contains_words(e: &Expr) -> bool {
    matches!(e, Expr::Text(_)) || e.children().into_iter().any(contains_words)
}

/// Round `v` to `places` decimal places (half away from zero), as an integer count of
/// 10^-places units.
fn round_exact(v: &BigRational, places: u32) -> BigInt {
    let scale = BigRational::from_integer(num_traits::pow(BigInt::from(10), places as usize));
    let x = v * scale;
    let half = BigRational::new(BigInt::from(1), BigInt::from(2));
    if x.is_negative() {
        -((-x) + half).floor().to_integer()
    } else {
        (x + half).floor().to_integer()
    }
}

fn round_eq(a: &Expr, b: &Expr, places: u32) -> bool {
    let places = places.min(30);
    match (eval::exact(a), eval::exact(b)) {
        (Some(x), Some(y)) => round_exact(&x, places) == round_exact(&y, places),
        (xa, xb) => {
            let va = match xa {
                Some(r) => C64::real(eval::rational_to_f64(&r)),
                None => match eval::numeric(a, 0) {
                    Some(v) => v,
                    None => return false,
                },
            };
            let vb = match xb {
                Some(r) => C64::real(eval::rational_to_f64(&r)),
                None => match eval::numeric(b, 0) {
                    Some(v) => v,
                    None => return false,
                },
            };
            let s = 10f64.powi(places as i32);
            let ra = (va.re * s).round();
            let rb = (vb.re * s).round();
            let ia = (va.im * s).round();
            let ib = (vb.im * s).round();
            ra == rb && ia == ib
        }
    }
}

/// Scalar (number or formula) equality: float rounding for decimals against atomic numbers,
/// exact equality for rationals, numeric equality at random points otherwise.
pub fn scalar_eq(a: &Expr, b: &Expr, opts: &Options) -> bool {
    if a == b {
        return true;
    }
    if contains_words(a) || contains_words(b) {
        return false;
    }
    if (is_atomic_number(a) || is_atomic_number(b)) && (is_float_atom(a) || is_float_atom(b)) {
        return round_eq(a, b, opts.float_rounding);
    }
    if let (Some(x), Some(y)) = (eval::exact(a), eval::exact(b)) {
        return x == y;
    }
    points_eq(a, b)
}

/// Numeric equality at [`NUM_POINTS`] pseudo-random points (both finite at ≥ 2 points, or at
/// ≥ 1 for constant expressions, and equal within tolerance at every point where both are).
fn points_eq(a: &Expr, b: &Expr) -> bool {
    let constant = a.free_symbols().is_empty()
        && b.free_symbols().is_empty()
        && !has_apply(a)
        && !has_apply(b);
    let mut valid = 0;
    let points = if constant { 1 } else { NUM_POINTS };
    // step functions (floor, ceil, factorial, …) of variables are also sampled at integers,
    // where small real samples would hide differences
    let integer_points = if !constant && (has_integer_function(a) || has_integer_function(b)) {
        INTEGER_POINTS
    } else {
        0
    };
    let all_points =
        (0..points).chain(eval::INTEGER_POINTS_START..eval::INTEGER_POINTS_START + integer_points);
    for point in all_points {
        match (eval::numeric(a, point), eval::numeric(b, point)) {
            (Some(x), Some(y)) => {
                let d = C64::new(x.re - y.re, x.im - y.im).abs();
                let scale = x.abs().max(y.abs());
                if d > NUMERIC_TOLERANCE * scale + 1e-13 {
                    return false;
                }
                valid += 1;
            }
            (None, None) => {}
            _ => {
                // one side undefined where the other is defined: not the same function
                if constant {
                    return false;
                }
            }
        }
    }
    if constant {
        valid == 1
    } else {
        valid >= 2
    }
}

/// Number of integer evaluation points for step functions.
pub const INTEGER_POINTS: u64 = 12;

fn has_integer_function(e: &Expr) -> bool {
    matches!(
        e,
        Expr::Func(
            Func::Floor | Func::Ceil | Func::Factorial | Func::Binom | Func::Gcd | Func::Lcm,
            _
        )
    ) || e.children().into_iter().any(has_integer_function)
}

fn has_apply(e: &Expr) -> bool {
    matches!(e, Expr::Apply(..))
        || matches!(e, Expr::Func(Func::Gcd | Func::Lcm, _))
        || e.children().into_iter().any(has_apply)
}
