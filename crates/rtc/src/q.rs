//! Exact rational numbers.
//!
//! Bounds must never be rounded, so every time, amount and slope in `rtc` is a [`Q`]. The common
//! case (numerator and denominator fit in `i64`) is computed without allocation, with `i128`
//! intermediates; anything larger is promoted to an arbitrary-precision rational, so no
//! operation can overflow or lose precision.

use num_bigint::BigInt;
use num_integer::Integer;
use num_rational::BigRational;
use num_traits::{One, Signed, ToPrimitive, Zero};
use std::cmp::Ordering;
use std::fmt;
use std::ops::{Add, Div, Mul, Neg, Sub};
use std::str::FromStr;

/// An exact rational number. Always normalised (positive denominator, lowest terms; the small
/// representation is used whenever the value fits), so derived equality is value equality.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Q(Repr);

#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    Small(i64, i64),
    Big(Box<BigRational>),
}

/// GCD of wide values: 64-bit (the common case) by [`gcd_u64`], otherwise Euclid.
fn gcd_i128(a: i128, b: i128) -> i128 {
    let (mut a, mut b) = (a.unsigned_abs(), b.unsigned_abs());
    if a <= u64::MAX as u128 && b <= u64::MAX as u128 {
        return gcd_u64(a as u64, b as u64) as i128;
    }
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a as i128
}

/// Binary GCD (Stein) after one division that brings both operands to the smaller one's size.
fn gcd_u64(mut a: u64, mut b: u64) -> u64 {
    // Denominators are usually small and numerators large: one division first brings both
    // operands down to the size of the smaller one.
    if a < b {
        std::mem::swap(&mut a, &mut b);
    }
    if b == 0 {
        return a;
    }
    a %= b;
    if a == 0 {
        return b;
    }
    let shift = (a | b).trailing_zeros();
    a >>= a.trailing_zeros();
    loop {
        b >>= b.trailing_zeros();
        if a > b {
            std::mem::swap(&mut a, &mut b);
        }
        b -= a;
        if b == 0 {
            return a << shift;
        }
    }
}

impl Q {
    /// Builds `n / d` from wide integers, normalising. `d` must not be zero. The common case
    /// (both fit in 64 bits) inline, with 64-bit arithmetic only; the wide one out of line.
    #[inline]
    fn from_i128(n: i128, d: i128) -> Q {
        debug_assert!(d != 0);
        if let (Ok(n64), Ok(d64)) = (i64::try_from(n), i64::try_from(d)) {
            if n64 != i64::MIN && d64 != i64::MIN {
                let (n64, d64) = if d64 < 0 { (-n64, -d64) } else { (n64, d64) };
                if d64 == 1 {
                    return Q(Repr::Small(n64, 1));
                }
                let g = gcd_u64(n64.unsigned_abs(), d64 as u64) as i64;
                return if g > 1 { Q(Repr::Small(n64 / g, d64 / g)) } else { Q(Repr::Small(n64, d64)) };
            }
        }
        Q::from_wide(n, d)
    }

    #[inline(never)]
    fn from_wide(n: i128, d: i128) -> Q {
        let (mut n, mut d) = if d < 0 { (-n, -d) } else { (n, d) };
        if d == 1 {
            if let Ok(n) = i64::try_from(n) {
                if n != i64::MIN {
                    return Q(Repr::Small(n, 1));
                }
            }
        }
        let g = gcd_i128(n, d);
        if g > 1 {
            n /= g;
            d /= g;
        }
        match (i64::try_from(n), i64::try_from(d)) {
            (Ok(n), Ok(d)) if n != i64::MIN => Q(Repr::Small(n, d)),
            _ => Q(Repr::Big(Box::new(BigRational::new_raw(BigInt::from(n), BigInt::from(d))))),
        }
    }

    fn from_big(r: BigRational) -> Q {
        // BigRational arithmetic keeps values reduced; demote if it fits.
        if let (Some(n), Some(d)) = (r.numer().to_i64(), r.denom().to_i64()) {
            if n != i64::MIN && d > 0 {
                return Q(Repr::Small(n, d));
            }
        }
        Q(Repr::Big(Box::new(r)))
    }

    fn to_big(&self) -> BigRational {
        match &self.0 {
            Repr::Small(n, d) => BigRational::new_raw(BigInt::from(*n), BigInt::from(*d)),
            Repr::Big(b) => (**b).clone(),
        }
    }

    /// `n / d`. Returns `None` when `d == 0`.
    pub fn new(n: i64, d: i64) -> Option<Q> {
        if d == 0 {
            None
        } else {
            Some(Q::from_i128(n as i128, d as i128))
        }
    }

    pub fn int(n: i64) -> Q {
        Q::from_i128(n as i128, 1)
    }

    pub fn zero() -> Q {
        Q(Repr::Small(0, 1))
    }

    pub fn one() -> Q {
        Q(Repr::Small(1, 1))
    }

    pub fn is_zero(&self) -> bool {
        matches!(self.0, Repr::Small(0, _))
    }

    pub fn is_positive(&self) -> bool {
        self.signum() > 0
    }

    pub fn is_negative(&self) -> bool {
        self.signum() < 0
    }

    pub fn signum(&self) -> i32 {
        match &self.0 {
            Repr::Small(n, _) => n.signum() as i32,
            Repr::Big(b) => {
                if b.is_positive() {
                    1
                } else if b.is_negative() {
                    -1
                } else {
                    0
                }
            }
        }
    }

    pub fn is_integer(&self) -> bool {
        match &self.0 {
            Repr::Small(_, d) => *d == 1,
            Repr::Big(b) => b.is_integer(),
        }
    }

    pub fn abs(&self) -> Q {
        if self.is_negative() {
            -self
        } else {
            self.clone()
        }
    }

    /// Largest integer not above `self`.
    pub fn floor(&self) -> Q {
        match &self.0 {
            Repr::Small(n, d) => Q::int(n.div_euclid(*d)),
            Repr::Big(b) => Q::from_big(b.floor()),
        }
    }

    /// Smallest integer not below `self`.
    pub fn ceil(&self) -> Q {
        match &self.0 {
            Repr::Small(n, d) => {
                let f = n.div_euclid(*d);
                Q::int(if n.rem_euclid(*d) == 0 { f } else { f + 1 })
            }
            Repr::Big(b) => Q::from_big(b.ceil()),
        }
    }

    pub fn recip(&self) -> Option<Q> {
        if self.is_zero() {
            return None;
        }
        match &self.0 {
            Repr::Small(n, d) => Some(Q::from_i128(*d as i128, *n as i128)),
            Repr::Big(b) => Some(Q::from_big(b.recip())),
        }
    }

    /// Exact division; `None` when dividing by zero.
    pub fn checked_div(&self, o: &Q) -> Option<Q> {
        o.recip().map(|r| self * &r)
    }

    pub fn min(a: &Q, b: &Q) -> Q {
        if a <= b {
            a.clone()
        } else {
            b.clone()
        }
    }

    pub fn max(a: &Q, b: &Q) -> Q {
        if a >= b {
            a.clone()
        } else {
            b.clone()
        }
    }

    /// Least common multiple of two positive rationals: the smallest positive `l` that is an
    /// integer multiple of both. `None` unless both are positive.
    pub fn lcm(a: &Q, b: &Q) -> Option<Q> {
        if !a.is_positive() || !b.is_positive() {
            return None;
        }
        if let (Repr::Small(p, q), Repr::Small(r, s)) = (&a.0, &b.0) {
            // Positive and in lowest terms: lcm(p, r) / gcd(q, s), also in lowest terms.
            let (p, r) = (*p as u64, *r as u64);
            let n = (p / gcd_u64(p, r)) as i128 * r as i128;
            return Some(Q::from_i128(n, gcd_u64(*q as u64, *s as u64) as i128));
        }
        let (a, b) = (a.to_big(), b.to_big());
        // a = p/q, b = r/s in lowest terms: lcm = lcm(p, r) / gcd(q, s).
        let n = a.numer().lcm(b.numer());
        let d = a.denom().gcd(b.denom());
        Some(Q::from_big(BigRational::new(n, d)))
    }

    /// Greatest common divisor of two rationals: the largest `g > 0` of which both are integer
    /// multiples (`gcd(p/q, r/s) = gcd(p, r) / lcm(q, s)`); `|b|` when `a` is 0.
    pub fn gcd(a: &Q, b: &Q) -> Q {
        let (a, b) = (a.to_big(), b.to_big());
        let n = a.numer().gcd(b.numer());
        let d = a.denom().lcm(b.denom());
        Q::from_big(BigRational::new(n, d))
    }

    /// The simplest rational (smallest denominator, then smallest numerator) in the interval
    /// from `lo` to `hi` (`None`: unbounded above), each end included or not as told; `lo >= 0`
    /// and the interval must not be empty. Continued-fraction descent.
    pub fn simplest_in(lo: &Q, lo_incl: bool, hi: Option<&Q>, hi_incl: bool) -> Q {
        let n = if lo_incl { lo.ceil() } else { lo.floor() + Q::one() };
        match hi {
            Some(h) if !(&n < h || (&n == h && hi_incl)) => {}
            _ => return n,
        }
        // No integer inside: x = f + 1/y with f = ⌊lo⌋ and y in (1/(hi − f), 1/(lo − f)).
        let f = lo.floor();
        let h = hi.expect("checked above");
        let ylo = (h - &f).recip().expect("hi > f");
        let yhi = (lo - &f).recip();
        let y = Q::simplest_in(&ylo, hi_incl, yhi.as_ref(), lo_incl);
        f + y.recip().expect("y >= 1")
    }

    /// Nearest `f64`, for plots and human output only; never for a bound.
    pub fn to_f64(&self) -> f64 {
        match &self.0 {
            Repr::Small(n, d) => *n as f64 / *d as f64,
            Repr::Big(b) => b.to_f64().unwrap_or(f64::NAN),
        }
    }

    /// Integer value if `self` is an integer that fits in `i64`.
    pub fn to_i64(&self) -> Option<i64> {
        match &self.0 {
            Repr::Small(n, 1) => Some(*n),
            _ => None,
        }
    }
}

/// The least and greatest `v − r·t` over points `(t, v)` seen one by one (a curve's offsets from
/// the line of slope `r`), exact. Points of integer coordinates (times and amounts in µs, the
/// common case) with a small `r = p/q` are compared as the integers `q·v − p·t` (128-bit, no
/// overflow for 64-bit operands), without building a rational per point; others as rationals.
pub(crate) struct LineOffsets {
    r: Q,
    /// `r` as `(p, q)` when it is small.
    small: Option<(i64, i64)>,
    /// Least and greatest `q·v − p·t` over the integer points (`lo > hi` before any: every
    /// value lies strictly between the 128-bit extremes, `|q·v|, |p·t| < 2^126`).
    lo: i128,
    hi: i128,
    /// Extremes of `v − r·t` over the other points.
    other: Option<(Q, Q)>,
}

impl LineOffsets {
    pub(crate) fn new(r: &Q) -> LineOffsets {
        let small = match r.0 {
            Repr::Small(p, q) => Some((p, q)),
            Repr::Big(_) => None,
        };
        LineOffsets { r: r.clone(), small, lo: i128::MAX, hi: i128::MIN, other: None }
    }

    /// Integer points inline (a curve's every breakpoint goes through here), others out of line.
    #[inline]
    pub(crate) fn see(&mut self, t: &Q, v: &Q) {
        if let (Some((p, q)), Repr::Small(t, 1), Repr::Small(v, 1)) = (self.small, &t.0, &v.0) {
            let k = *v as i128 * q as i128 - p as i128 * *t as i128;
            self.lo = self.lo.min(k);
            self.hi = self.hi.max(k);
            return;
        }
        self.see_other(t, v);
    }

    #[inline(never)]
    fn see_other(&mut self, t: &Q, v: &Q) {
        let k = v - &self.r * t;
        self.other = Some(match self.other.take() {
            Some((lo, hi)) => (Q::min(&lo, &k), Q::max(&hi, &k)),
            None => (k.clone(), k),
        });
    }

    /// `(least, greatest)`, `None` before any point.
    pub(crate) fn extremes(&self) -> Option<(Q, Q)> {
        let int =
            self.small.filter(|_| self.lo <= self.hi).map(|(_, q)| (Q::from_i128(self.lo, q as i128), Q::from_i128(self.hi, q as i128)));
        match (int, &self.other) {
            (Some((a, b)), Some((c, d))) => Some((Q::min(&a, c), Q::max(&b, d))),
            (Some(e), None) => Some(e),
            (None, o) => o.clone(),
        }
    }
}

impl Default for Q {
    fn default() -> Q {
        Q::zero()
    }
}

impl From<i64> for Q {
    fn from(n: i64) -> Q {
        Q::int(n)
    }
}

impl Ord for Q {
    #[inline]
    fn cmp(&self, o: &Q) -> Ordering {
        #[inline(never)]
        fn general(x: &Q, o: &Q) -> Ordering {
            match (&x.0, &o.0) {
                (Repr::Small(a, b), Repr::Small(c, d)) => ((*a as i128) * (*d as i128)).cmp(&((*c as i128) * (*b as i128))),
                _ => x.to_big().cmp(&o.to_big()),
            }
        }
        match (&self.0, &o.0) {
            (Repr::Small(a, b), Repr::Small(c, d)) if b == d => a.cmp(c),
            _ => general(self, o),
        }
    }
}

impl PartialOrd for Q {
    fn partial_cmp(&self, o: &Q) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// A small result that is already in lowest terms (no gcd needed), if it is representable.
fn small(n: i128, d: i128) -> Option<Q> {
    match (i64::try_from(n), i64::try_from(d)) {
        (Ok(n), Ok(d)) if n != i64::MIN => Some(Q(Repr::Small(n, d))),
        _ => None,
    }
}

/// `a/b ± c/d` for reduced small operands (`sub` negates `c`), without a gcd on the result in the
/// common cases: equal denominators of 1 need none, and coprime denominators give a result in
/// lowest terms directly (Knuth, TAOCP 4.5.1: a prime of `bd` divides exactly one of `b`, `d`,
/// hence not `ad + cb`).
fn add_small(a: i64, b: i64, c: i64, d: i64) -> Q {
    let (a, b, c, d) = (a as i128, b as i128, c as i128, d as i128);
    if b == d {
        // Both in i64 range, so the sum fits in i128.
        return if b == 1 { small(a + c, 1).unwrap_or_else(|| Q::from_i128(a + c, 1)) } else { Q::from_i128(a + c, b) };
    }
    // |a|, |c| < 2^63 and 0 < b, d < 2^63: every product and the sum fit in i128.
    let (n, den) = (a * d + c * b, b * d);
    if gcd_u64(b as u64, d as u64) == 1 {
        if let Some(q) = small(n, den) {
            return q;
        }
    }
    Q::from_i128(n, den)
}

/// `a/b · c/d` for reduced small operands. With an integer operand one gcd on the small values
/// (the other denominator against the integer) leaves the result in lowest terms.
fn mul_small(a: i64, b: i64, c: i64, d: i64) -> Q {
    if b == 1 && d == 1 {
        let n = a as i128 * c as i128;
        return small(n, 1).unwrap_or_else(|| Q::from_i128(n, 1));
    }
    if b == 1 || d == 1 {
        // n/den · k with gcd(n, den) = 1: cancel g = gcd(k, den); gcd(n·k/g, den/g) = 1.
        // (64-bit division: k is never i64::MIN and g >= 1.)
        let (n, den, k) = if d == 1 { (a, b, c) } else { (c, d, a) };
        let g = gcd_u64(k.unsigned_abs(), den as u64) as i64;
        if let Some(q) = small(n as i128 * (k / g) as i128, (den / g) as i128) {
            return q;
        }
    }
    Q::from_i128(a as i128 * c as i128, b as i128 * d as i128)
}

macro_rules! binop {
    ($tr:ident, $m:ident, $int:expr, $small:expr, $big:expr) => {
        impl<'a, 'b> $tr<&'b Q> for &'a Q {
            type Output = Q;
            /// Integers (the most common operands: times in µs) inline, the rest out of line.
            #[inline]
            fn $m(self, o: &'b Q) -> Q {
                if let (Repr::Small(a, 1), Repr::Small(c, 1)) = (&self.0, &o.0) {
                    let f: fn(i64, i64) -> Option<i64> = $int;
                    if let Some(n) = f(*a, *c).filter(|&n| n != i64::MIN) {
                        return Q(Repr::Small(n, 1));
                    }
                }
                #[inline(never)]
                fn general(x: &Q, o: &Q) -> Q {
                    if let (Repr::Small(a, b), Repr::Small(c, d)) = (&x.0, &o.0) {
                        let f: fn(i64, i64, i64, i64) -> Option<Q> = $small;
                        if let Some(q) = f(*a, *b, *c, *d) {
                            return q;
                        }
                    }
                    let g: fn(BigRational, BigRational) -> BigRational = $big;
                    Q::from_big(g(x.to_big(), o.to_big()))
                }
                general(self, o)
            }
        }
        impl $tr<Q> for Q {
            type Output = Q;
            fn $m(self, o: Q) -> Q {
                (&self).$m(&o)
            }
        }
        impl<'b> $tr<&'b Q> for Q {
            type Output = Q;
            fn $m(self, o: &'b Q) -> Q {
                (&self).$m(o)
            }
        }
        impl<'a> $tr<Q> for &'a Q {
            type Output = Q;
            fn $m(self, o: Q) -> Q {
                self.$m(&o)
            }
        }
    };
}

// Small operands never overflow i128 intermediates (|n| < 2^63, 0 < d < 2^63), so the small
// paths always answer; the big closures serve big operands.
binop!(Add, add, i64::checked_add, |a, b, c, d| Some(add_small(a, b, c, d)), |x, y| x + y);
// -c cannot overflow: a small numerator is never i64::MIN.
binop!(Sub, sub, i64::checked_sub, |a, b, c, d| Some(add_small(a, b, -c, d)), |x, y| x - y);
binop!(Mul, mul, i64::checked_mul, |a, b, c, d| Some(mul_small(a, b, c, d)), |x, y| x * y);
// Division by zero is a programming error guarded at every call site (`checked_div` for input).
// (A quotient of integers needs a gcd: no integer path.)
binop!(
    Div,
    div,
    |_, _| None,
    |a, b, c, d| match (c, d) {
        (0, _) => None,
        // By one (a curve's rate over a period of 1): already in lowest terms.
        (1, 1) => Some(Q(Repr::Small(a, b))),
        _ => Some(Q::from_i128(a as i128 * d as i128, b as i128 * c as i128)),
    },
    |x, y| if y.is_zero() { BigRational::zero() } else { x / y }
);

impl Neg for &Q {
    type Output = Q;
    fn neg(self) -> Q {
        match &self.0 {
            Repr::Small(n, d) => Q::from_i128(-(*n as i128), *d as i128),
            Repr::Big(b) => Q::from_big(-(**b).clone()),
        }
    }
}

impl Neg for Q {
    type Output = Q;
    fn neg(self) -> Q {
        -&self
    }
}

impl fmt::Display for Q {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Small(n, 1) => write!(f, "{n}"),
            Repr::Small(n, d) => write!(f, "{n}/{d}"),
            Repr::Big(b) => {
                if b.denom().is_one() {
                    write!(f, "{}", b.numer())
                } else {
                    write!(f, "{}/{}", b.numer(), b.denom())
                }
            }
        }
    }
}

impl fmt::Debug for Q {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// Error parsing a rational.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an exact number: {0:?} (write an integer, a decimal such as 2.5, or a fraction such as 7/3)")]
pub struct ParseQError(pub String);

impl FromStr for Q {
    type Err = ParseQError;
    /// Parses `12`, `-3`, `2.5`, `7/3` exactly (decimals are not rounded).
    fn from_str(s: &str) -> Result<Q, ParseQError> {
        let err = || ParseQError(s.to_string());
        let t = s.trim();
        if t.is_empty() || t.len() > 64 {
            return Err(err());
        }
        if let Some((n, d)) = t.split_once('/') {
            let n: BigInt = n.trim().parse().map_err(|_| err())?;
            let d: BigInt = d.trim().parse().map_err(|_| err())?;
            if d.is_zero() {
                return Err(err());
            }
            return Ok(Q::from_big(BigRational::new(n, d)));
        }
        let (neg, body) = match t.strip_prefix('-') {
            Some(b) => (true, b),
            None => (false, t.strip_prefix('+').unwrap_or(t)),
        };
        let (ip, fp) = body.split_once('.').unwrap_or((body, ""));
        if ip.is_empty() && fp.is_empty() {
            return Err(err());
        }
        if !ip.chars().all(|c| c.is_ascii_digit()) || !fp.chars().all(|c| c.is_ascii_digit()) {
            return Err(err());
        }
        // Up to 18 digits fit an i64 with its power of ten: no big integers (a model's every
        // time and size goes through here).
        if ip.len() + fp.len() <= 18 {
            let n = ip.bytes().chain(fp.bytes()).fold(0i64, |n, b| n * 10 + i64::from(b - b'0'));
            return Ok(Q::from_i128(if neg { -i128::from(n) } else { i128::from(n) }, 10i128.pow(fp.len() as u32)));
        }
        decimal_big(neg, ip, fp).ok_or_else(err)
    }
}

/// The decimal `ip.fp` (ASCII digits, at least one), negated if `neg`, through big integers.
fn decimal_big(neg: bool, ip: &str, fp: &str) -> Option<Q> {
    let digits = format!("{ip}{fp}");
    let n: BigInt = if digits.is_empty() { BigInt::zero() } else { digits.parse().ok()? };
    let d = num_traits::pow(BigInt::from(10), fp.len());
    Some(Q::from_big(BigRational::new(if neg { -n } else { n }, d)))
}

/// Shorthand for an integer rational.
pub fn q(n: i64) -> Q {
    Q::int(n)
}

/// Shorthand for `n / d` with a non-zero constant denominator.
pub fn qf(n: i64, d: i64) -> Q {
    Q::from_i128(n as i128, if d == 0 { 1 } else { d as i128 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_is_exact_and_promotes() {
        let a = qf(1, 3);
        let b = qf(1, 6);
        assert_eq!(&a + &b, qf(1, 2));
        let big = Q::int(i64::MAX);
        let s = &big + &big;
        assert!(s > big);
        assert_eq!(&s - &big, big);
        assert_eq!((&s * &s) / &s, s);
    }

    #[test]
    fn floor_ceil_negative() {
        assert_eq!(qf(-7, 2).floor(), q(-4));
        assert_eq!(qf(-7, 2).ceil(), q(-3));
        assert_eq!(qf(7, 2).ceil(), q(4));
    }

    #[test]
    fn short_decimals_parse_as_through_big_integers() {
        // Every split of up to 19 digits (the fast path takes up to 18), signs, leading and
        // trailing zeros, the largest 18-digit values.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut cases: Vec<String> = vec![
            "999999999999999999".into(),
            "99999999999999999.9".into(),
            ".999999999999999999".into(),
            "0.000000000000000001".into(),
            "007".into(),
            "5.".into(),
            ".5".into(),
        ];
        for _ in 0..20_000 {
            let len = 1 + (next() % 19) as usize;
            let digits: String = (0..len).map(|_| char::from(b'0' + (next() % 10) as u8)).collect();
            let at = (next() % (len as u64 + 1)) as usize;
            let sign = ["", "-", "+"][(next() % 3) as usize];
            cases.push(format!("{sign}{}.{}", &digits[..at], &digits[at..]));
            cases.push(format!("{sign}{digits}"));
        }
        for c in cases {
            let body = c.trim_start_matches(['-', '+']);
            let (ip, fp) = body.split_once('.').unwrap_or((body, ""));
            let want = decimal_big(c.starts_with('-'), ip, fp).unwrap();
            assert_eq!(c.parse::<Q>().unwrap(), want, "{c}");
        }
    }

    #[test]
    fn parse_decimals_exactly() {
        assert_eq!("2.5".parse::<Q>().unwrap(), qf(5, 2));
        assert_eq!("0.1".parse::<Q>().unwrap(), qf(1, 10));
        assert_eq!("-7/14".parse::<Q>().unwrap(), qf(-1, 2));
        assert!("1/0".parse::<Q>().is_err());
        assert!("abc".parse::<Q>().is_err());
        assert!("".parse::<Q>().is_err());
        assert!(".".parse::<Q>().is_err());
    }

    #[test]
    fn fast_paths_agree_with_big_rationals() {
        // Random small operands, including extremes, against BigRational (always reduced):
        // equal results and a canonical representation (derived equality is value equality).
        let mut r = crate::synthetic::Rng(3);
        let edge = [0, 1, -1, 2, 3, 6, 25, 1 << 31, i64::MAX, i64::MIN + 1, i64::MAX / 3, 1_000_000_007];
        let pick = |r: &mut crate::synthetic::Rng| {
            let v = if r.below(3) == 0 { edge[r.below(edge.len())] } else { r.int(-1000, 1000) };
            if r.below(2) == 0 {
                v
            } else {
                v.wrapping_mul(r.int(1, 7))
            }
        };
        for _ in 0..20_000 {
            let (n1, n2) = (pick(&mut r), pick(&mut r));
            let (d1, d2) = (pick(&mut r).unsigned_abs().max(1) as i64, pick(&mut r).unsigned_abs().max(1) as i64);
            let (d1, d2) = (if d1 < 0 { 1 } else { d1 }, if d2 < 0 { 1 } else { d2 });
            let (x, y) = (Q::from_i128(n1 as i128, d1 as i128), Q::from_i128(n2 as i128, d2 as i128));
            let (bx, by) = (x.to_big(), y.to_big());
            let mut ops = vec![(&x + &y, &bx + &by), (&x - &y, &bx - &by), (&x * &y, &bx * &by)];
            if !y.is_zero() {
                ops.push((&x / &y, &bx / &by));
            }
            for (got, want) in ops {
                assert_eq!(got, Q::from_big(want.clone()), "{x} {y}");
                assert_eq!(got.to_big(), want, "{x} {y}");
            }
            assert_eq!(x.cmp(&y), bx.cmp(&by), "{x} {y}");
            if x.is_positive() && y.is_positive() {
                let want = BigRational::new(bx.numer().lcm(by.numer()), bx.denom().gcd(by.denom()));
                assert_eq!(Q::lcm(&x, &y), Some(Q::from_big(want)), "{x} {y}");
            }
        }
    }

    #[test]
    fn line_offsets_agree_with_rationals() {
        // Integer and fractional points (extremes included) against v − r·t in rationals.
        let mut r = crate::synthetic::Rng(5);
        let edge = [0, 1, -1, i64::MAX, i64::MIN + 1, 1 << 40];
        for _ in 0..2_000 {
            let pick = |r: &mut crate::synthetic::Rng| if r.below(4) == 0 { edge[r.below(edge.len())] } else { r.int(-100_000, 100_000) };
            let rate = Q::from_i128(pick(&mut r) as i128, pick(&mut r).unsigned_abs().max(1) as i128);
            let mut offsets = LineOffsets::new(&rate);
            let mut want: Option<(Q, Q)> = None;
            for _ in 0..r.below(6) + 1 {
                let den = if r.below(3) == 0 { r.int(2, 9) } else { 1 };
                let (t, v) = (Q::from_i128(pick(&mut r) as i128, den as i128), Q::from_i128(pick(&mut r) as i128, 1));
                offsets.see(&t, &v);
                let k = &v - &rate * &t;
                want = Some(want.map_or((k.clone(), k.clone()), |(lo, hi)| (Q::min(&lo, &k), Q::max(&hi, &k))));
            }
            assert_eq!(offsets.extremes(), want, "rate {rate}");
        }
    }

    #[test]
    fn lcm_of_rationals() {
        assert_eq!(Q::lcm(&q(4), &q(6)), Some(q(12)));
        assert_eq!(Q::lcm(&qf(1, 2), &qf(1, 3)), Some(q(1)));
        assert_eq!(Q::lcm(&qf(3, 2), &q(2)), Some(q(6)));
    }
}
