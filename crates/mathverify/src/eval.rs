//! Evaluation: exact rational arithmetic where it is possible and cheap, and complex
//! floating-point evaluation at pseudo-random points otherwise.
//!
//! Limits keep every call bounded: exact results above [`MAX_EXACT_BITS`] bits, exponents
//! above [`MAX_EXACT_EXPONENT`] and factorials above [`MAX_FACTORIAL`] are not computed exactly
//! (the numeric path takes over, which overflows to "not evaluable" rather than looping).

use crate::expr::{Constant, Expr, Func};
use num_bigint::{BigInt, Sign};
use num_integer::Integer;
use num_rational::BigRational;
use num_traits::{One, Signed, ToPrimitive, Zero};

/// Largest expression (in nodes) that is parsed or compared.
pub const MAX_EXPR_NODES: usize = 3000;
/// Largest exact intermediate, in bits of numerator plus denominator.
pub const MAX_EXACT_BITS: u64 = 40_000;
/// Largest integer exponent computed exactly.
pub const MAX_EXACT_EXPONENT: u64 = 20_000;
/// Largest n for which n! is computed exactly.
pub const MAX_FACTORIAL: u64 = 2_000;

fn bits(r: &BigRational) -> u64 {
    r.numer().bits() + r.denom().bits()
}

fn checked(r: BigRational) -> Option<BigRational> {
    if bits(&r) > MAX_EXACT_BITS {
        None
    } else {
        Some(r)
    }
}

fn as_integer(r: &BigRational) -> Option<BigInt> {
    if r.is_integer() {
        Some(r.to_integer())
    } else {
        None
    }
}

/// Exact `n`-th root of a non-negative integer, if it is a perfect power.
fn exact_root(v: &BigInt, n: u32) -> Option<BigInt> {
    if v.is_negative() {
        return None;
    }
    let r = v.nth_root(n);
    if num_traits::pow(r.clone(), n as usize) == *v {
        Some(r)
    } else {
        None
    }
}

fn pow_exact(base: &BigRational, exp: &BigRational) -> Option<BigRational> {
    if let Some(k) = as_integer(exp) {
        let k64 = k.to_i64()?;
        if k64.unsigned_abs() > MAX_EXACT_EXPONENT {
            return None;
        }
        if base.is_zero() {
            return if k64 > 0 {
                Some(BigRational::zero())
            } else if k64 == 0 {
                Some(BigRational::one())
            } else {
                None
            };
        }
        if (bits(base) as u128) * (k64.unsigned_abs() as u128) > MAX_EXACT_BITS as u128 {
            return None;
        }
        let p = num_traits::pow(base.clone(), k64.unsigned_abs() as usize);
        return checked(if k64 < 0 { p.recip() } else { p });
    }
    // rational exponent p/q with a perfect q-th power base
    let q = exp.denom().to_u32()?;
    if q > 64 || base.is_negative() {
        return None;
    }
    let rn = exact_root(base.numer(), q)?;
    let rd = exact_root(base.denom(), q)?;
    let root = BigRational::new(rn, rd);
    pow_exact(&root, &BigRational::from_integer(exp.numer().clone()))
}

fn factorial(n: &BigInt) -> Option<BigInt> {
    let n = n.to_u64()?;
    if n > MAX_FACTORIAL {
        return None;
    }
    let mut acc = BigInt::one();
    for k in 2..=n {
        acc *= k;
    }
    Some(acc)
}

fn binomial(n: &BigInt, k: &BigInt) -> Option<BigInt> {
    if k.is_negative() || n.is_negative() {
        return None;
    }
    if k > n {
        return Some(BigInt::zero());
    }
    let n = n.to_u64()?;
    let k = k.to_u64()?;
    let k = k.min(n - k);
    if k > MAX_FACTORIAL * 5 {
        return None;
    }
    let mut acc = BigInt::one();
    for j in 0..k {
        acc = acc * (n - j) / (j + 1);
        if acc.bits() > MAX_EXACT_BITS {
            return None;
        }
    }
    Some(acc)
}

/// The exact rational value of a constant expression, if it has one that is cheap to compute.
pub fn exact(e: &Expr) -> Option<BigRational> {
    exact_depth(e, 0)
}

fn exact_depth(e: &Expr, depth: usize) -> Option<BigRational> {
    if depth > 200 {
        return None;
    }
    let d = depth + 1;
    match e {
        Expr::Num(n) => Some(n.value.clone()),
        Expr::Add(v) => {
            let mut acc = BigRational::zero();
            for t in v {
                acc = checked(acc + exact_depth(t, d)?)?;
            }
            Some(acc)
        }
        Expr::Mul(v) => {
            let mut acc = BigRational::one();
            for t in v {
                acc = checked(acc * exact_depth(t, d)?)?;
            }
            Some(acc)
        }
        Expr::Pow(b, x) => {
            let bv = exact_depth(b, d)?;
            let xv = exact_depth(x, d)?;
            pow_exact(&bv, &xv)
        }
        Expr::Percent(x) => Some(exact_depth(x, d)? / BigRational::from_integer(BigInt::from(100))),
        Expr::Func(f, args) => {
            let vals: Option<Vec<BigRational>> = args.iter().map(|a| exact_depth(a, d)).collect();
            let vals = vals?;
            match (f, vals.as_slice()) {
                (Func::Abs, [x]) => Some(x.abs()),
                (Func::Floor, [x]) => Some(BigRational::from_integer(x.floor().to_integer())),
                (Func::Ceil, [x]) => Some(BigRational::from_integer(x.ceil().to_integer())),
                (Func::Factorial, [x]) => {
                    Some(BigRational::from_integer(factorial(&as_integer(x)?)?))
                }
                (Func::Binom, [n, k]) => Some(BigRational::from_integer(binomial(
                    &as_integer(n)?,
                    &as_integer(k)?,
                )?)),
                (Func::Gcd, xs) if !xs.is_empty() => {
                    let mut g = as_integer(&xs[0])?;
                    for x in &xs[1..] {
                        g = g.gcd(&as_integer(x)?);
                    }
                    Some(BigRational::from_integer(g))
                }
                (Func::Lcm, xs) if !xs.is_empty() => {
                    let mut g = as_integer(&xs[0])?;
                    for x in &xs[1..] {
                        g = checked(BigRational::from_integer(g.lcm(&as_integer(x)?)))?
                            .to_integer();
                    }
                    Some(BigRational::from_integer(g))
                }
                (Func::Max, xs) if !xs.is_empty() => xs.iter().max().cloned(),
                (Func::Min, xs) if !xs.is_empty() => xs.iter().min().cloned(),
                (Func::Log, [x, b]) => {
                    // log_b(x) exact when x = b^k for a small integer k
                    if *b <= BigRational::zero()
                        || *b == BigRational::one()
                        || *x <= BigRational::zero()
                    {
                        return None;
                    }
                    let mut p = BigRational::one();
                    for k in 0..64i64 {
                        if p == *x {
                            return Some(BigRational::from_integer(BigInt::from(k)));
                        }
                        if p.recip() == *x {
                            return Some(BigRational::from_integer(BigInt::from(-k)));
                        }
                        p = checked(p * b)?;
                    }
                    None
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// A complex number of two `f64`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct C64 {
    pub re: f64,
    pub im: f64,
}

impl C64 {
    pub const fn new(re: f64, im: f64) -> C64 {
        C64 { re, im }
    }
    pub fn real(re: f64) -> C64 {
        C64 { re, im: 0.0 }
    }
    pub fn abs(self) -> f64 {
        self.re.hypot(self.im)
    }
    pub fn is_finite(self) -> bool {
        self.re.is_finite() && self.im.is_finite()
    }
    fn add(self, o: C64) -> C64 {
        C64::new(self.re + o.re, self.im + o.im)
    }
    fn sub(self, o: C64) -> C64 {
        C64::new(self.re - o.re, self.im - o.im)
    }
    fn mul(self, o: C64) -> C64 {
        C64::new(
            self.re * o.re - self.im * o.im,
            self.re * o.im + self.im * o.re,
        )
    }
    fn div(self, o: C64) -> C64 {
        let d = o.re * o.re + o.im * o.im;
        C64::new(
            (self.re * o.re + self.im * o.im) / d,
            (self.im * o.re - self.re * o.im) / d,
        )
    }
    fn exp(self) -> C64 {
        let m = self.re.exp();
        C64::new(m * self.im.cos(), m * self.im.sin())
    }
    fn ln(self) -> C64 {
        C64::new(self.abs().ln(), self.im.atan2(self.re))
    }
    fn powi(self, mut k: i64) -> C64 {
        let mut base = if k < 0 {
            C64::real(1.0).div(self)
        } else {
            self
        };
        k = k.abs();
        let mut acc = C64::real(1.0);
        while k > 0 {
            if k & 1 == 1 {
                acc = acc.mul(base);
            }
            base = base.mul(base);
            k >>= 1;
        }
        acc
    }
    fn pow(self, e: C64) -> C64 {
        if e.im == 0.0 && e.re.fract() == 0.0 && e.re.abs() < 1e6 {
            return self.powi(e.re as i64);
        }
        if self.re == 0.0 && self.im == 0.0 {
            return if e.re > 0.0 {
                C64::real(0.0)
            } else {
                C64::real(f64::NAN)
            };
        }
        if self.im == 0.0 && self.re > 0.0 && e.im == 0.0 {
            return C64::real(self.re.powf(e.re));
        }
        e.mul(self.ln()).exp()
    }
    fn sqrt(self) -> C64 {
        self.pow(C64::real(0.5))
    }
    fn sin(self) -> C64 {
        C64::new(
            self.re.sin() * self.im.cosh(),
            self.re.cos() * self.im.sinh(),
        )
    }
    fn cos(self) -> C64 {
        C64::new(
            self.re.cos() * self.im.cosh(),
            -self.re.sin() * self.im.sinh(),
        )
    }
    fn sinh(self) -> C64 {
        C64::new(
            self.re.sinh() * self.im.cos(),
            self.re.cosh() * self.im.sin(),
        )
    }
    fn cosh(self) -> C64 {
        C64::new(
            self.re.cosh() * self.im.cos(),
            self.re.sinh() * self.im.sin(),
        )
    }
    fn one() -> C64 {
        C64::real(1.0)
    }
    fn i() -> C64 {
        C64::new(0.0, 1.0)
    }
    /// asin z = −i ln(iz + √(1−z²))
    fn asin(self) -> C64 {
        let iz = C64::i().mul(self);
        let r = C64::one().sub(self.mul(self)).sqrt();
        C64::new(0.0, -1.0).mul(iz.add(r).ln())
    }
    /// acos z = π/2 − asin z
    fn acos(self) -> C64 {
        C64::real(std::f64::consts::FRAC_PI_2).sub(self.asin())
    }
    /// atan z = (i/2) ln((i+z)/(i−z))
    fn atan(self) -> C64 {
        if self.im == 0.0 {
            return C64::real(self.re.atan());
        }
        let i = C64::i();
        C64::new(0.0, 0.5).mul(i.add(self).div(i.sub(self)).ln())
    }
}

/// Lanczos approximation of Γ(x) for real x.
fn gamma(x: f64) -> f64 {
    if x < 0.5 {
        return std::f64::consts::PI / ((std::f64::consts::PI * x).sin() * gamma(1.0 - x));
    }
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    (2.0 * std::f64::consts::PI).sqrt() * t.powf(x + 0.5) * (-t).exp() * a
}

/// FNV-1a hash, for deterministic pseudo-random values.
pub fn hash_str(s: &str, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    splitmix(h)
}

/// SplitMix64 step: the fixed internal PRNG.
pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// First evaluation point of the integer family (used for floor/ceil/factorial answers).
pub const INTEGER_POINTS_START: u64 = 1000;

/// Value of variable `name` at evaluation point `point`: in ±[0.3, 2.3] with varying sign, or
/// an integer in [2, 61] for points ≥ [`INTEGER_POINTS_START`].
pub fn symbol_value(name: &str, point: u64) -> f64 {
    let h = hash_str(name, point);
    if point >= INTEGER_POINTS_START {
        return 2.0 + (h % 60) as f64;
    }
    let mag = 0.3 + 2.0 * unit(h);
    if point % 3 == 2 && (h >> 7) & 1 == 1 {
        -mag
    } else {
        mag
    }
}

/// Convert an exact rational to `f64` (±∞ when out of range).
pub fn rational_to_f64(r: &BigRational) -> f64 {
    if let (Some(n), Some(d)) = (r.numer().to_f64(), r.denom().to_f64()) {
        if n.is_finite() && d.is_finite() && d != 0.0 {
            return n / d;
        }
    }
    // scale down huge numerators/denominators
    let nb = r.numer().bits() as i64;
    let db = r.denom().bits() as i64;
    let shift_n = (nb - 60).max(0) as usize;
    let shift_d = (db - 60).max(0) as usize;
    let n = (r.numer().abs() >> shift_n).to_f64().unwrap_or(0.0);
    let d = (r.denom() >> shift_d).to_f64().unwrap_or(1.0);
    let exp2 = shift_n as i64 - shift_d as i64;
    let mag = (n / d) * 2f64.powi(exp2.clamp(-2000, 2000) as i32);
    if r.numer().sign() == Sign::Minus {
        -mag
    } else {
        mag
    }
}

/// Numeric value of `e` at evaluation point `point` (variables and undefined functions get
/// deterministic pseudo-random values); `None` when not a finite number.
pub fn numeric(e: &Expr, point: u64) -> Option<C64> {
    numeric_bound(e, point, &[])
}

/// Like [`numeric`], with the variables in `bind` set to the given values.
pub fn numeric_bound(e: &Expr, point: u64, bind: &[(&str, f64)]) -> Option<C64> {
    let v = numeric_depth(e, point, bind, 0)?;
    if v.is_finite() {
        Some(v)
    } else {
        None
    }
}

fn numeric_depth(e: &Expr, point: u64, bind: &[(&str, f64)], depth: usize) -> Option<C64> {
    if depth > 200 {
        return None;
    }
    let d = depth + 1;
    let r = match e {
        Expr::Num(n) => C64::real(rational_to_f64(&n.value)),
        Expr::Sym(s) => match bind.iter().find(|(n, _)| *n == s.as_str()) {
            Some((_, v)) => C64::real(*v),
            None => C64::real(symbol_value(s, point)),
        },
        Expr::Text(s) => C64::real(symbol_value(&format!("text:{s}"), point)),
        Expr::Const(c) => match c {
            Constant::Pi => C64::real(std::f64::consts::PI),
            Constant::E => C64::real(std::f64::consts::E),
            Constant::I => C64::i(),
            Constant::Infinity => return None,
        },
        Expr::Add(v) => {
            let mut acc = C64::real(0.0);
            for t in v {
                acc = acc.add(numeric_depth(t, point, bind, d)?);
            }
            acc
        }
        Expr::Mul(v) => {
            let mut acc = C64::one();
            for t in v {
                acc = acc.mul(numeric_depth(t, point, bind, d)?);
            }
            acc
        }
        Expr::Pow(b, x) => {
            let xv = match exact(x) {
                Some(r) => C64::real(rational_to_f64(&r)),
                None => numeric_depth(x, point, bind, d)?,
            };
            let bv = numeric_depth(b, point, bind, d)?;
            // real odd roots of negative reals stay real: (−8)^(1/3) = −2 is what answers mean
            if bv.im == 0.0 && bv.re < 0.0 && xv.im == 0.0 {
                if let Some(q) = exact(x) {
                    let den = q.denom().to_i64().unwrap_or(0);
                    if den % 2 == 1 && den > 1 {
                        let mag = (-bv.re).powf(xv.re);
                        let num_odd = q.numer().is_odd();
                        return Some(C64::real(if num_odd { -mag } else { mag }));
                    }
                }
            }
            bv.pow(xv)
        }
        Expr::Percent(x) => numeric_depth(x, point, bind, d)?.div(C64::real(100.0)),
        Expr::Func(f, args) => {
            let vals: Option<Vec<C64>> = args
                .iter()
                .map(|a| numeric_depth(a, point, bind, d))
                .collect();
            let vals = vals?;
            let x = *vals.first()?;
            let real = |v: C64| {
                if v.im.abs() < 1e-12 * (1.0 + v.re.abs()) {
                    Some(v.re)
                } else {
                    None
                }
            };
            match f {
                Func::Sin => x.sin(),
                Func::Cos => x.cos(),
                Func::Tan => x.sin().div(x.cos()),
                Func::Csc => C64::one().div(x.sin()),
                Func::Sec => C64::one().div(x.cos()),
                Func::Cot => x.cos().div(x.sin()),
                Func::Asin => x.asin(),
                Func::Acos => x.acos(),
                Func::Atan => x.atan(),
                Func::Acsc => C64::one().div(x).asin(),
                Func::Asec => C64::one().div(x).acos(),
                Func::Acot => C64::one().div(x).atan(),
                Func::Sinh => x.sinh(),
                Func::Cosh => x.cosh(),
                Func::Tanh => x.sinh().div(x.cosh()),
                Func::Asinh => x.add(x.mul(x).add(C64::one()).sqrt()).ln(),
                Func::Acosh => x.add(x.mul(x).sub(C64::one()).sqrt()).ln(),
                Func::Atanh => C64::one()
                    .add(x)
                    .div(C64::one().sub(x))
                    .ln()
                    .mul(C64::real(0.5)),
                Func::Log => {
                    if vals.len() == 2 {
                        x.ln().div(vals[1].ln())
                    } else {
                        x.ln()
                    }
                }
                Func::Exp => x.exp(),
                Func::Abs => C64::real(x.abs()),
                Func::Floor => C64::real(real(x)?.floor()),
                Func::Ceil => C64::real(real(x)?.ceil()),
                Func::Factorial => {
                    let v = real(x)?;
                    if v > 170.0 {
                        return None;
                    }
                    C64::real(gamma(v + 1.0))
                }
                Func::Binom => {
                    let n = real(x)?;
                    let k = real(*vals.get(1)?)?;
                    if n > 170.0 {
                        return None;
                    }
                    C64::real(gamma(n + 1.0) / (gamma(k + 1.0) * gamma(n - k + 1.0)))
                }
                Func::Max | Func::Min => {
                    let reals: Option<Vec<f64>> = vals.iter().map(|v| real(*v)).collect();
                    let reals = reals?;
                    let it = reals.iter().copied();
                    C64::real(if *f == Func::Max {
                        it.fold(f64::MIN, f64::max)
                    } else {
                        it.fold(f64::MAX, f64::min)
                    })
                }
                Func::Gcd | Func::Lcm => return None,
            }
        }
        Expr::Apply(name, args) => {
            // a fixed smooth pseudo-random function per name: c0 + Σ c_k sin(a_k z_k + b_k)
            let mut acc = C64::real(unit(hash_str(name, 1)) * 2.0 - 1.0);
            for (k, a) in args.iter().enumerate() {
                let z = numeric_depth(a, point, bind, d)?;
                let h = hash_str(name, 100 + k as u64);
                let ak = 0.5 + unit(h);
                let bk = unit(splitmix(h)) * 3.0;
                let ck = 0.5 + unit(splitmix(h ^ 0xABCD));
                acc = acc.add(C64::real(ck).mul(z.mul(C64::real(ak)).add(C64::real(bk)).sin()));
            }
            acc
        }
        _ => return None,
    };
    Some(r)
}

/// A real value of a constant expression, with ±∞ allowed (used to tell intervals from pairs).
pub fn real_value(e: &Expr) -> Option<f64> {
    match e {
        Expr::Const(Constant::Infinity) => return Some(f64::INFINITY),
        Expr::Mul(v) if v.len() == 2 && v[1] == Expr::Const(Constant::Infinity) => {
            let s = exact(&v[0])?;
            return Some(if s.is_negative() {
                f64::NEG_INFINITY
            } else {
                f64::INFINITY
            });
        }
        _ => {}
    }
    if !e.free_symbols().is_empty() || contains_text_or_apply(e) {
        return None;
    }
    if let Some(r) = exact(e) {
        return Some(rational_to_f64(&r));
    }
    let v = numeric(e, 0)?;
    if v.im.abs() > 1e-12 * (1.0 + v.re.abs()) {
        return None;
    }
    Some(v.re)
}

fn contains_text_or_apply(e: &Expr) -> bool {
    matches!(e, Expr::Text(_) | Expr::Apply(..))
        || e.children().into_iter().any(contains_text_or_apply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::parse_math;

    fn ex(s: &str) -> Option<String> {
        exact(&parse_math(s).ok()?).map(|r| r.to_string())
    }

    #[test]
    fn exact_values() {
        assert_eq!(ex("\\frac{3}{3}").as_deref(), Some("1"));
        assert_eq!(ex("2^{10}").as_deref(), Some("1024"));
        assert_eq!(ex("\\sqrt{\\frac{9}{4}}").as_deref(), Some("3/2"));
        assert_eq!(ex("5!").as_deref(), Some("120"));
        assert_eq!(ex("\\binom{5}{2}").as_deref(), Some("10"));
        assert_eq!(ex("28\\%").as_deref(), Some("7/25"));
        assert_eq!(ex("\\sqrt{2}"), None);
        assert_eq!(ex("2^{100000000}"), None);
        assert_eq!(ex("100000!"), None);
        assert_eq!(ex("\\log_2 8").as_deref(), Some("3"));
    }

    #[test]
    fn numeric_values() {
        let v =
            numeric(&parse_math("\\sqrt{17}").unwrap_or(Expr::int(0)), 0).unwrap_or(C64::real(0.0));
        assert!((v.re - 17f64.sqrt()).abs() < 1e-12);
        let t = numeric(
            &parse_math("\\tan^2(y)+1-\\sec^2(y)").unwrap_or(Expr::int(1)),
            3,
        )
        .unwrap_or(C64::real(1.0));
        assert!(t.abs() < 1e-9);
        assert!((gamma(6.0) - 120.0).abs() < 1e-9);
    }
}
