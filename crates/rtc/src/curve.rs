//! Ultimately pseudo-periodic piecewise-linear curves and the operators of (min,+) / (max,+)
//! algebra on them.
//!
//! A [`Curve`] `f` is described on `[0, T + d)` by a list of [`Seg`]s; beyond that it repeats:
//! `f(t + d) = f(t) + c` for every `t >= T`. Each segment gives the value *at* its start point
//! and the line on the open interval up to the next start point, so jumps (left- and
//! right-continuous staircases, the shape of every event-count curve) are represented exactly.
//!
//! All operators are exact. The ones whose result has a structure derived from both operands
//! (convolution, deconvolution, pointwise operations on different periods) compute the result on
//! a finite window whose length is proven sufficient (see each function) and then extend it
//! periodically. Results that would need more than [`MAX_SEGMENTS`] segments are refused with
//! [`CurveError::TooComplex`] instead of exhausting memory.

use crate::q::{LineOffsets, Q};
use std::borrow::Cow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};

/// Upper limit on the number of segments an operation may materialise.
pub const MAX_SEGMENTS: usize = 250_000;

/// Errors of curve operations. They describe the mathematical reason; callers add context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CurveError {
    #[error("the result is unbounded ({0})")]
    Unbounded(&'static str),
    #[error("the result needs more than {MAX_SEGMENTS} segments (periods with a very large common multiple?)")]
    TooComplex,
    #[error("invalid curve: {0}")]
    Invalid(String),
    #[error("the operation needs a non-decreasing curve")]
    NotMonotone,
}

pub type Result<T> = std::result::Result<T, CurveError>;

/// One piece of a curve: `f(x) = y`, and `f(t) = yr + s (t - x)` for `t` in the open interval
/// up to the next segment's `x`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Seg {
    pub x: Q,
    pub y: Q,
    pub yr: Q,
    pub s: Q,
}

impl Seg {
    pub fn new(x: Q, y: Q, yr: Q, s: Q) -> Seg {
        Seg { x, y, yr, s }
    }
    /// A continuous piece starting at `(x, y)` with slope `s`.
    pub fn line(x: Q, y: Q, s: Q) -> Seg {
        Seg { x, yr: y.clone(), y, s }
    }
    /// The line's value at `t` (meaningful for `t` in the segment's closed interval).
    pub fn at(&self, t: &Q) -> Q {
        if self.s.is_zero() || t == &self.x {
            self.yr.clone()
        } else {
            &self.yr + &self.s * (t - &self.x)
        }
    }
    fn shifted(&self, dx: &Q, dy: &Q) -> Seg {
        Seg { x: &self.x + dx, y: &self.y + dy, yr: &self.yr + dy, s: self.s.clone() }
    }
}

impl fmt::Debug for Seg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}: {} | {} {:+}]", self.x, self.y, self.yr, self.s.to_f64())
    }
}

/// An ultimately pseudo-periodic piecewise-linear function on `[0, ∞)`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Curve {
    /// Shared: cloning a curve (analyses hold thousands, and the planner copies analyses) only
    /// bumps a count; operators build new segment lists.
    segs: Arc<Vec<Seg>>,
    t: Q,
    d: Q,
    c: Q,
    memo: Memo,
}

/// Properties of a curve computed once, when first asked for (an analysis step asks for a
/// service's and a demand's several times), and copied with it. Never part of the curve's
/// value: curves compare and hash equal whatever either has computed. A curve's description is
/// only changed while it is built, before anything is memoised (`Curve::normalized`), or with
/// a fresh memo (`Curve::with_value_at_zero`).
#[derive(Clone, Default)]
struct Memo {
    nondecreasing: OnceLock<bool>,
    affine_bounds: OnceLock<Box<(Q, Q)>>,
}

impl Memo {
    /// A memo of a curve known to be non-decreasing by construction.
    fn nondecreasing() -> Memo {
        Memo { nondecreasing: OnceLock::from(true), ..Memo::default() }
    }
}

impl PartialEq for Memo {
    fn eq(&self, _: &Memo) -> bool {
        true
    }
}

impl Eq for Memo {}

impl Hash for Memo {
    fn hash<H: Hasher>(&self, _: &mut H) {}
}

impl fmt::Debug for Curve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Curve{{T={} d={} c={} {:?}}}", self.t, self.d, self.c, self.segs)
    }
}

/// Segment end (start of the next one, or `end` for the last one).
fn seg_end<'a>(segs: &'a [Seg], i: usize, end: &'a Q) -> &'a Q {
    segs.get(i + 1).map(|s| &s.x).unwrap_or(end)
}

/// Index of the segment containing `x` (last with `seg.x <= x`).
fn find_seg(segs: &[Seg], x: &Q) -> usize {
    segs.partition_point(|s| &s.x <= x).saturating_sub(1)
}

/// Value at `x` of a finite segment list (x inside its range).
fn fin_eval(segs: &[Seg], x: &Q) -> Q {
    let i = find_seg(segs, x);
    let s = &segs[i];
    if &s.x == x {
        s.y.clone()
    } else {
        s.at(x)
    }
}

/// Right limit at `x` of a finite segment list.
fn fin_right(segs: &[Seg], x: &Q) -> Q {
    segs[find_seg(segs, x)].at(x)
}

/// Merges adjacent segments that continue each other exactly.
fn merge_collinear(mut segs: Vec<Seg>) -> Vec<Seg> {
    // In place: each segment is compared with the last one kept. Cheap tests first: most
    // neighbours differ in slope or jump.
    segs.dedup_by(|s, p| s.s == p.s && s.y == s.yr && s.y == p.at(&s.x));
    segs
}

/// Splits a finite list so that `x` is a breakpoint (no-op if it already is or is out of range).
fn split_at(segs: &mut Vec<Seg>, x: &Q) -> usize {
    let i = find_seg(segs, x);
    if &segs[i].x == x {
        return i;
    }
    let v = segs[i].at(x);
    let s = segs[i].s.clone();
    segs.insert(i + 1, Seg::new(x.clone(), v.clone(), v, s));
    i + 1
}

impl Curve {
    // ----------------------------------------------------------------- construction

    /// Builds a curve from segments covering at least `[0, t + d)`; segments at or beyond
    /// `t + d` are dropped and `t` is made a breakpoint.
    pub fn from_parts(segs: Vec<Seg>, t: Q, d: Q, c: Q) -> Result<Curve> {
        if !d.is_positive() {
            return Err(CurveError::Invalid(format!("period must be positive, got {d}")));
        }
        if t.is_negative() {
            return Err(CurveError::Invalid(format!("periodic start must be >= 0, got {t}")));
        }
        if segs.is_empty() || !segs[0].x.is_zero() {
            return Err(CurveError::Invalid("segments must start at 0".into()));
        }
        if segs.windows(2).any(|w| w[0].x >= w[1].x) {
            return Err(CurveError::Invalid("segment start points must increase".into()));
        }
        Ok(Curve::normalized(segs, t, d, c))
    }

    /// Builds a curve from segments already known to be well formed (start at 0, increasing,
    /// covering `[0, t + d)`, `d > 0`): cuts, merges, keeps `t` a breakpoint, shrinks `t`.
    fn normalized(mut segs: Vec<Seg>, t: Q, d: Q, c: Q) -> Curve {
        debug_assert!(
            segs.first().is_some_and(|s| s.x.is_zero()) && segs.windows(2).all(|w| w[0].x < w[1].x),
            "malformed segments {segs:?}"
        );
        let end = &t + &d;
        segs.retain(|s| s.x < end);
        let segs = merge_collinear(segs);
        let mut c = Curve { segs: Arc::new(segs), t, d, c, memo: Memo::default() };
        // `t` must remain a breakpoint (merging may have removed it).
        let tt = c.t.clone();
        split_at(Arc::make_mut(&mut c.segs), &tt);
        c.shrink_transient();
        c
    }

    /// `f(t) = v` everywhere.
    pub fn constant(v: Q) -> Curve {
        Curve { segs: Arc::new(vec![Seg::line(Q::zero(), v, Q::zero())]), t: Q::zero(), d: Q::one(), c: Q::zero(), memo: Memo::default() }
    }

    pub fn zero() -> Curve {
        Curve::constant(Q::zero())
    }

    /// `f(0) = at0`, `f(t) = b + r t` for `t > 0`.
    pub fn affine(at0: Q, b: Q, r: Q) -> Curve {
        Curve { segs: Arc::new(vec![Seg::new(Q::zero(), at0, b, r.clone())]), t: Q::zero(), d: Q::one(), c: r, memo: Memo::default() }
            .fix_origin_pattern()
    }

    /// `f(t) = max(0, r (t - latency))` (a rate-latency service curve).
    pub fn rate_latency(r: Q, latency: Q) -> Curve {
        if latency.is_positive() {
            let segs = vec![Seg::line(Q::zero(), Q::zero(), Q::zero()), Seg::line(latency.clone(), Q::zero(), r.clone())];
            Curve { segs: Arc::new(segs), t: latency, d: Q::one(), c: r, memo: Memo::default() }
        } else {
            Curve {
                segs: Arc::new(vec![Seg::line(Q::zero(), Q::zero(), r.clone())]),
                t: Q::zero(),
                d: Q::one(),
                c: r,
                memo: Memo::default(),
            }
        }
    }

    /// When the pattern starts at 0 with a jump there, move the periodic start one period on
    /// (the value at 0 is special: it is not repeated).
    fn fix_origin_pattern(self) -> Curve {
        if self.t.is_zero() && self.segs[0].y != self.segs[0].yr {
            let segs = self.unroll_raw(&(&self.d + &self.d));
            let (d, c) = (self.d.clone(), self.c.clone());
            Curve::normalized(segs, d.clone(), d, c)
        } else {
            self
        }
    }

    // ----------------------------------------------------------------- accessors

    pub fn segments(&self) -> &[Seg] {
        &self.segs
    }
    pub fn periodic_start(&self) -> &Q {
        &self.t
    }
    pub fn period(&self) -> &Q {
        &self.d
    }
    pub fn increment(&self) -> &Q {
        &self.c
    }
    /// Long-run rate `c / d`.
    pub fn rate(&self) -> Q {
        &self.c / &self.d
    }
    fn base_end(&self) -> Q {
        &self.t + &self.d
    }

    /// Maps `x` into the described window: returns `(x', k)` with `f(x) = f(x') + k c`.
    fn reduce(&self, x: &Q) -> (Q, Q) {
        let end = self.base_end();
        if x < &end {
            return (x.clone(), Q::zero());
        }
        let k = ((x - &self.t) / &self.d).floor();
        (x - &k * &self.d, k)
    }

    pub fn eval(&self, x: &Q) -> Q {
        let (x, k) = self.reduce(x);
        fin_eval(&self.segs, &x) + k * &self.c
    }

    /// `lim f(t)` as `t` decreases to `x`.
    pub fn eval_right(&self, x: &Q) -> Q {
        let (x, k) = self.reduce(x);
        fin_right(&self.segs, &x) + k * &self.c
    }

    /// `lim f(t)` as `t` increases to `x` (for `x = 0`, `f(0)`).
    pub fn eval_left(&self, x: &Q) -> Q {
        if !x.is_positive() {
            return self.segs[0].y.clone();
        }
        let end = self.base_end();
        let (xr, k) = if x <= &end {
            (x.clone(), Q::zero())
        } else {
            let k = ((x - &self.t) / &self.d).ceil() - Q::one();
            (x - &k * &self.d, k)
        };
        let i = self.segs.partition_point(|s| s.x < xr).saturating_sub(1);
        self.segs[i].at(&xr) + k * &self.c
    }

    /// The segments covering `[0, h)`, repeating the pattern as needed.
    pub fn unroll(&self, h: &Q) -> Result<Vec<Seg>> {
        let end = self.base_end();
        if h > &end && !self.is_affine_tail() {
            let periods = ((h - &end) / &self.d).ceil();
            let per = self.segs.len() - find_seg(&self.segs, &self.t);
            let n = periods.to_f64() * per as f64 + self.segs.len() as f64;
            if n.is_nan() || n > MAX_SEGMENTS as f64 {
                return Err(CurveError::TooComplex);
            }
        }
        Ok(self.unroll_raw(h))
    }

    /// [`Curve::unroll`] without copying when `[0, h)` lies within the described window (or the
    /// curve is one line from its last segment on): the segments covering it are then a prefix of
    /// the description, borrowed, the same list `unroll` copies.
    fn unroll_view(&self, h: &Q) -> Result<Cow<'_, [Seg]>> {
        if h <= &self.base_end() || self.is_affine_tail() {
            let n = self.segs.partition_point(|s| &s.x < h);
            return Ok(Cow::Borrowed(&self.segs[..n]));
        }
        self.unroll(h).map(Cow::Owned)
    }

    fn unroll_raw(&self, h: &Q) -> Vec<Seg> {
        let end = self.base_end();
        // The last segment of an affine tail already extends to infinity.
        let periods = if h > &end && !self.is_affine_tail() { ((h - &end) / &self.d).ceil().to_f64() } else { 0.0 };
        let p0 = find_seg(&self.segs, &self.t);
        // Reserved at once, for the base and one pattern per period started before `h`
        // (segments are large: growing by doubling moved them several times).
        // Two more: callers append a tail of up to two segments, or insert a breakpoint.
        let room = self.segs.len() as f64 + periods * (self.segs.len() - p0) as f64 + 2.0;
        let mut out: Vec<Seg> = Vec::with_capacity(room.min(MAX_SEGMENTS as f64) as usize);
        out.extend(self.segs.iter().filter(|s| &s.x < h).cloned());
        if periods == 0.0 {
            return out;
        }
        let pattern = &self.segs[p0..];
        let mut k = Q::one();
        loop {
            let dx = &k * &self.d;
            let dy = &k * &self.c;
            for s in pattern {
                let n = s.shifted(&dx, &dy);
                if &n.x >= h {
                    return out;
                }
                match out.last() {
                    Some(p) if p.s == n.s && n.y == n.yr && p.at(&n.x) == n.y => {}
                    _ => out.push(n),
                }
            }
            k = k + Q::one();
        }
    }

    /// Whether the curve is a single line from `T` on (its pattern is one continuous segment).
    pub fn is_affine_tail(&self) -> bool {
        let p0 = find_seg(&self.segs, &self.t);
        p0 + 1 == self.segs.len() && {
            let s = &self.segs[p0];
            s.y == s.yr && &s.s * &self.d == self.c
        }
    }

    /// Bounds `m <= f(t) - rate t <= M` over all `t >= 0` (values and one-sided limits).
    pub fn affine_bounds(&self) -> (Q, Q) {
        (**self.memo.affine_bounds.get_or_init(|| Box::new(self.affine_bounds_scan()))).clone()
    }

    fn affine_bounds_scan(&self) -> (Q, Q) {
        let end = self.base_end();
        let r = self.rate();
        let mut offsets = LineOffsets::new(&r);
        for (i, s) in self.segs.iter().enumerate() {
            offsets.see(&s.x, &s.y);
            if s.yr != s.y {
                offsets.see(&s.x, &s.yr);
            }
            // Along the open piece the offset changes linearly, by (s − r) per unit: with s = r
            // its left limit at the end is the right limit at the start, already seen.
            if s.s != r {
                let e = seg_end(&self.segs, i, &end);
                offsets.see(e, &s.at(e));
            }
        }
        offsets.extremes().unwrap_or_default()
    }

    /// `inf (f(t) − rate·t)` over `t >= h` (values and one-sided limits): the offset of the best
    /// lower line of slope `rate` from `h` on (at least the `m` of [`Curve::affine_bounds`]).
    pub fn affine_lower_from(&self, h: &Q) -> Q {
        let end = self.base_end();
        // From T on, f(t) − r·t repeats with period d: every phase of it comes again after h.
        let start = if h < &self.t { h } else { &self.t };
        let r = self.rate();
        let mut offsets = LineOffsets::new(&r);
        // From the segment containing `start` (those before it end at or before `start`).
        for (i, s) in self.segs.iter().enumerate().skip(find_seg(&self.segs, start)) {
            let e = seg_end(&self.segs, i, &end);
            if e <= start {
                continue;
            }
            if &s.x >= start {
                offsets.see(&s.x, &s.y);
                if s.yr != s.y {
                    offsets.see(&s.x, &s.yr);
                }
            } else {
                offsets.see(start, &s.at(start));
            }
            // As in `affine_bounds`: with s = r the offset is constant along the piece.
            if s.s != r {
                offsets.see(e, &s.at(e));
            }
        }
        offsets.extremes().map(|(lo, _)| lo).unwrap_or_default()
    }

    /// `true` when `f` never decreases (checked exactly on the description).
    pub fn is_nondecreasing(&self) -> bool {
        *self.memo.nondecreasing.get_or_init(|| self.is_nondecreasing_scan())
    }

    fn is_nondecreasing_scan(&self) -> bool {
        if self.c.is_negative() {
            return false;
        }
        let end = self.base_end();
        let mut prev: Option<Q> = None;
        for (i, s) in self.segs.iter().enumerate() {
            if let Some(p) = &prev {
                if &s.y < p {
                    return false;
                }
            }
            if s.yr < s.y || s.s.is_negative() {
                return false;
            }
            prev = Some(s.at(seg_end(&self.segs, i, &end)));
        }
        // The jump into the next period.
        let first_pattern = &self.segs[find_seg(&self.segs, &self.t)];
        prev.is_none_or(|p| &first_pattern.y + &self.c >= p)
    }

    /// Smallest transient start consistent with the periodic description (checked on
    /// breakpoints), which keeps repeated operations from growing curves needlessly.
    fn shrink_transient(&mut self) {
        if self.t.is_zero() {
            return;
        }
        let p0 = find_seg(&self.segs, &self.t);
        // Candidate starts: breakpoints before t, latest first; stop at the first failure.
        // Periodicity from a breakpoint implies it from every later one: bisect.
        // f on [x + d, T + d) lies within the described window: no unrolling needed.
        let ext: &[Seg] = &self.segs;
        if p0 == 0 || !self.periodic_from(ext, p0 - 1, &self.t) {
            return;
        }
        // Gallop back to bracket the earliest start, then bisect. Each check only covers the
        // stretch not yet known to be periodic (up to the start of the last success).
        let (mut lo, mut hi) = (0usize, p0 - 1); // hi: known periodic
        let mut step = 1;
        while hi > 0 {
            let cand = hi.saturating_sub(step);
            if self.periodic_from(ext, cand, &ext[hi].x) {
                hi = cand;
                step *= 2;
            } else {
                lo = cand + 1;
                break;
            }
        }
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.periodic_from(ext, mid, &ext[hi].x) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        let best = hi;
        if best != p0 {
            let t = self.segs[best].x.clone();
            let end = &t + &self.d;
            // The segments before the new end, in place (they are sorted; the list is usually
            // this curve's own, just built).
            let segs = Arc::make_mut(&mut self.segs);
            segs.truncate(segs.partition_point(|s| s.x < end));
            split_at(segs, &t);
            *segs = merge_collinear(std::mem::take(segs));
            split_at(segs, &t);
            self.t = t;
        }
    }

    /// Whether `f(x + d) = f(x) + c` holds for every `x` in `[ext[i].x, t)`; `ext` is the curve
    /// unrolled over at least `[0, t + 2d)`. One linear walk over both ranges.
    fn periodic_from(&self, ext: &[Seg], i: usize, upto: &Q) -> bool {
        let mut x = ext[i].x.clone();
        let mut a = i;
        let mut b = find_seg(ext, &(&x + &self.d));
        loop {
            let xd = &x + &self.d;
            let va = if ext[a].x == x { ext[a].y.clone() } else { ext[a].at(&x) };
            let vb = if ext[b].x == xd { ext[b].y.clone() } else { ext[b].at(&xd) };
            if vb != va + &self.c || ext[b].at(&xd) != ext[a].at(&x) + &self.c || ext[a].s != ext[b].s {
                return false;
            }
            let na = ext.get(a + 1).map(|s| s.x.clone());
            let nb = ext.get(b + 1).map(|s| &s.x - &self.d);
            let next = match (na, nb) {
                (Some(p), Some(q)) => Q::min(&p, &q),
                (Some(p), None) | (None, Some(p)) => p,
                (None, None) => return true,
            };
            if &next >= upto {
                return true;
            }
            if ext.get(a + 1).is_some_and(|s| s.x == next) {
                a += 1;
            }
            if ext.get(b + 1).is_some_and(|s| &s.x - &self.d == next) {
                b += 1;
            }
            x = next;
        }
    }

    // ----------------------------------------------------------------- simple transforms

    /// `k · f`.
    pub fn scale(&self, k: &Q) -> Curve {
        let segs = self.segs.iter().map(|s| Seg::new(s.x.clone(), &s.y * k, &s.yr * k, &s.s * k)).collect();
        Curve::normalized(segs, self.t.clone(), self.d.clone(), &self.c * k)
    }

    /// `-f`.
    pub fn neg(&self) -> Curve {
        self.scale(&Q::int(-1))
    }

    /// `f + v`.
    pub fn offset(&self, v: &Q) -> Curve {
        let segs = self.segs.iter().map(|s| Seg::new(s.x.clone(), &s.y + v, &s.yr + v, s.s.clone())).collect::<Vec<Seg>>();
        Curve { segs: Arc::new(segs), t: self.t.clone(), d: self.d.clone(), c: self.c.clone(), memo: Memo::default() }
    }

    /// `g(t) = fill` for `t < delta`, `f(t - delta)` for `t >= delta` (delta >= 0).
    pub fn shift_right(&self, delta: &Q, fill: &Q) -> Curve {
        if !delta.is_positive() {
            return self.clone();
        }
        let mut segs = vec![Seg::line(Q::zero(), fill.clone(), Q::zero())];
        segs.extend(self.segs.iter().map(|s| s.shifted(delta, &Q::zero())));
        Curve::normalized(segs, &self.t + delta, self.d.clone(), self.c.clone())
    }

    /// `g(t) = f(t + delta)` (delta >= 0).
    pub fn shift_left(&self, delta: &Q) -> Curve {
        if !delta.is_positive() {
            return self.clone();
        }
        // Whole periods past the periodic start only add their increment:
        // f(x + k·d + r) = f(x + r) + k·c when x + r >= t, so shift by the rest r in
        // [t, t + d) (unrolling about t + 3d instead of delta + t + 2d) and offset.
        let periods = if delta >= &(&self.t + &self.d) { ((delta - &self.t) / &self.d).floor() } else { Q::zero() };
        if periods.is_positive() {
            let rest = delta - &periods * &self.d;
            return self.shift_left(&rest).offset(&(&periods * &self.c));
        }
        let h = delta + &self.t + &self.d + &self.d;
        let mut segs = self.unroll_raw(&h);
        let i = split_at(&mut segs, delta);
        let segs: Vec<Seg> = segs[i..].iter().map(|s| s.shifted(&-delta, &Q::zero())).collect();
        let t = if &self.t > delta { &self.t - delta } else { Q::zero() };
        Curve::normalized(segs, t, self.d.clone(), self.c.clone())
    }

    /// The same curve with `f(0)` replaced by `v`.
    pub fn with_value_at_zero(&self, v: &Q) -> Curve {
        let mut c = if self.t.is_zero() {
            let mut segs = self.unroll_raw(&(&self.d + &self.d));
            split_at(&mut segs, &self.d);
            Curve { segs: Arc::new(segs), t: self.d.clone(), d: self.d.clone(), c: self.c.clone(), memo: Memo::default() }
        } else {
            self.clone()
        };
        Arc::make_mut(&mut c.segs)[0].y = v.clone();
        c.memo = Memo::default();
        c
    }

    // ----------------------------------------------------------------- truncation

    /// A safe *upper* approximation: `f` on `[0, h)`, then the line `rate·t + ⌈M⌉` from `h` on,
    /// where `M = sup (f(t) − rate·t)` ([`Curve::affine_bounds`]), so the result never lies
    /// below `f`. For upper (arrival, demand) curves whose values beyond `h` cannot influence a
    /// bound (`docs/analysis.md` §9). Its tail is one line, so sums and differences with other
    /// truncated curves stay within about `[0, h)` instead of spanning a common period. (The
    /// offset is rounded to an integer to keep later breakpoints on small denominators.)
    pub fn truncate_above(&self, h: &Q) -> Result<Curve> {
        self.truncate(h, true)
    }

    /// A safe *lower* approximation: `f` on `[0, h)`, then from `h` on `f(h⁻)` until the line
    /// `rate·t + ⌊m⌋` has passed it (at an integer time), then that line, where
    /// `m = inf (f(t) − rate·t)`; only the line when `f` is not non-decreasing. The result never
    /// lies above `f`, and it is non-decreasing when `f` is. For lower (service) curves; see
    /// [`Curve::truncate_above`].
    pub fn truncate_below(&self, h: &Q) -> Result<Curve> {
        self.truncate(h, false)
    }

    fn truncate(&self, h: &Q, upper: bool) -> Result<Curve> {
        if !h.is_positive() || (self.is_affine_tail() && h >= &self.base_end()) {
            // Nothing to cut: the curve is already one line from before `h` on.
            return Ok(self.clone());
        }
        let r = self.rate();
        if upper {
            return Curve::from_parts(self.truncated_above_segments(h)?, h.clone(), Q::one(), r);
        }
        let off = self.affine_bounds().0.floor();
        let mut segs = self.unroll(h)?;
        let line_at_h = &r * h + &off;
        // A non-decreasing lower curve stays at least at its left limit at h.
        let floor = self.is_nondecreasing().then(|| self.eval_left(h)).filter(|f| f > &line_at_h);
        match floor {
            Some(f) if r.is_positive() => {
                // Flat until an integer time at which the line has reached f (after h, since f is
                // above the line at h); below both f and the line until then, so still below `self`.
                let t0 = ((&f - &off) / &r).ceil();
                let y0 = &r * &t0 + &off;
                segs.push(Seg::line(h.clone(), f, Q::zero()));
                segs.push(Seg::line(t0.clone(), y0, r.clone()));
                Curve::from_parts(segs, t0, Q::one(), r)
            }
            Some(f) => {
                segs.push(Seg::line(h.clone(), f, Q::zero()));
                Curve::from_parts(segs, h.clone(), Q::one(), Q::zero())
            }
            None => {
                segs.push(Seg::line(h.clone(), line_at_h, r.clone()));
                Curve::from_parts(segs, h.clone(), Q::one(), r)
            }
        }
    }

    /// The segments of [`Curve::truncate_above`] (`h > 0`), not normalised: `f` on `[0, h)`,
    /// then the line `rate·t + ⌈M⌉` (`f`'s own line when `f` is one from before `h` on).
    fn truncated_above_segments(&self, h: &Q) -> Result<Vec<Seg>> {
        let r = self.rate();
        let at_h = if self.is_affine_tail() && h >= &self.base_end() { self.eval(h) } else { &r * h + self.affine_bounds().1.ceil() };
        let mut segs = self.unroll(h)?;
        segs.push(Seg::line(h.clone(), at_h, r));
        Ok(segs)
    }

    /// The lower service a fixed-priority resource leaves after `demands`, all truncated at
    /// `h > 0`: `max(0, sup_{s<=t} (f_h − Σ g_h)(s))` with `f_h` = [`Curve::truncate_below`]`(h)`
    /// and each `g_h` = [`Curve::truncate_above`]`(h)` (the function that truncating each,
    /// [`Curve::sum`] and [`Curve::sub_running_max_nonneg`] give). The difference is built in one
    /// sweep over every breakpoint, without a curve per truncated demand or for their sum: from
    /// `max(T, h)` on (`T` the periodic start of `f_h`) every term is periodic with `f_h`'s period.
    pub fn left_after_truncated<'a>(&self, demands: impl IntoIterator<Item = &'a Curve>, h: &Q) -> Result<Curve> {
        if !h.is_positive() {
            return Err(CurveError::Invalid(format!("horizon must be positive, got {h}")));
        }
        let base = self.truncate_below(h)?;
        let t = Q::max(&base.t, h);
        let d = base.d.clone();
        let mut c = base.c.clone();
        let mut terms = vec![(base.unroll_view(&(&t + &d))?, false)];
        for g in demands {
            c = c - g.rate() * &d;
            terms.push((Cow::Owned(g.truncated_above_segments(h)?), true));
        }
        let mut segs = signed_sum(&terms);
        split_at(&mut segs, &t);
        Curve { segs: Arc::new(segs), t, d, c, memo: Memo::default() }.running_max_from(Some(Q::zero()))
    }

    // ----------------------------------------------------------------- pointwise operations

    fn binary(&self, o: &Curve, op: Op) -> Result<Curve> {
        let (r1, r2) = (self.rate(), o.rate());
        let (t, d, c) = match op {
            Op::Add | Op::Sub => {
                let l = Q::lcm(&self.d, &o.d).ok_or(CurveError::TooComplex)?;
                let c1 = &self.c * (&l / &self.d);
                let c2 = &o.c * (&l / &o.d);
                let c = if op == Op::Add { c1 + c2 } else { c1 - c2 };
                (Q::max(&self.t, &o.t), l, c)
            }
            Op::Min | Op::Max => {
                if r1 == r2 {
                    let l = Q::lcm(&self.d, &o.d).ok_or(CurveError::TooComplex)?;
                    let c = &r1 * &l;
                    (Q::max(&self.t, &o.t), l, c)
                } else {
                    // The curve of lower rate eventually stays below the other.
                    let (lo, hi) = if r1 < r2 { (self, o) } else { (o, self) };
                    let (_, m_lo) = lo.affine_bounds();
                    let (m_hi, _) = hi.affine_bounds();
                    let cross = ((m_lo - m_hi) / (hi.rate() - lo.rate())).ceil();
                    let winner = if op == Op::Min { lo } else { hi };
                    let t = Q::max(&winner.t, &Q::max(&cross, &Q::zero()));
                    (t, winner.d.clone(), winner.c.clone())
                }
            }
        };
        let h = &t + &d;
        let a = self.unroll_view(&h)?;
        let b = o.unroll_view(&h)?;
        Curve::from_parts(combine(&a, &b, &h, op), t, d, c)
    }

    pub fn add(&self, o: &Curve) -> Result<Curve> {
        self.binary(o, Op::Add)
    }

    /// The pointwise sum of `curves` (0 for none): the curve adding them one by one (the first
    /// plus the second, plus the third...) gives, in
    /// one sweep over all their breakpoints. Adding k curves one by one merges the growing sum
    /// with each next curve, evaluating every breakpoint of the sum again each time; the sweep
    /// keeps the sum's current line (intercept and slope) and, at each breakpoint, only updates
    /// the terms of the curves that change there.
    pub fn sum(curves: &[Curve]) -> Result<Curve> {
        match curves {
            [] => return Ok(Curve::zero()),
            [c] => return Ok(c.clone()),
            _ => {}
        }
        let mut t = curves[0].t.clone();
        let mut d = curves[0].d.clone();
        for c in &curves[1..] {
            t = Q::max(&t, &c.t);
            d = Q::lcm(&d, &c.d).ok_or(CurveError::TooComplex)?;
        }
        let mut growth = Q::zero();
        for c in curves {
            growth = growth + &c.c * (&d / &c.d);
        }
        let h = &t + &d;
        let terms = curves.iter().map(|c| Ok((c.unroll_view(&h)?, false))).collect::<Result<Vec<_>>>()?;
        let out = signed_sum(&terms);
        Curve::from_parts(out, t, d, growth)
    }
    pub fn sub(&self, o: &Curve) -> Result<Curve> {
        self.binary(o, Op::Sub)
    }
    pub fn min(&self, o: &Curve) -> Result<Curve> {
        self.binary(o, Op::Min)
    }
    pub fn max(&self, o: &Curve) -> Result<Curve> {
        self.binary(o, Op::Max)
    }

    /// Pointwise `max(f, 0)`.
    pub fn clamp_nonnegative(&self) -> Result<Curve> {
        if !self.c.is_negative() && !self.inf_on_base().is_negative() {
            return Ok(self.clone());
        }
        self.max(&Curve::zero())
    }

    // ----------------------------------------------------------------- staircases

    /// `⌊f⌋` (`floor = true`) or `⌈f⌉`, an integer staircase.
    pub fn round(&self, floor: bool) -> Result<Curve> {
        // An integer increment per period is needed; repeat the period until it is.
        let mut k = Q::one();
        while !(&self.c * &k).is_integer() {
            k = k + Q::one();
            if k > Q::int(1_000_000) {
                return Err(CurveError::TooComplex);
            }
        }
        let d = &self.d * &k;
        let c = &self.c * &k;
        let end = &self.t + &d;
        let segs = self.unroll(&end)?;
        let rnd = |v: &Q| if floor { v.floor() } else { v.ceil() };
        let mut out = Vec::new();
        let mut budget = MAX_SEGMENTS;
        for (i, s) in segs.iter().enumerate() {
            let e = seg_end(&segs, i, &end).clone();
            // Just after x the line moves away from yr in the direction of its slope.
            let right = if s.yr.is_integer() && floor && s.s.is_negative() {
                &s.yr - &Q::one()
            } else if s.yr.is_integer() && !floor && s.s.is_positive() {
                &s.yr + &Q::one()
            } else {
                rnd(&s.yr)
            };
            out.push(Seg::new(s.x.clone(), rnd(&s.y), right, Q::zero()));
            if s.s.is_zero() {
                continue;
            }
            // Each integer level crossed strictly inside (x, e).
            let ve = s.at(&e);
            let up = s.s.is_positive();
            let (mut lvl, last) =
                if up { (s.yr.floor() + Q::one(), ve.ceil() - Q::one()) } else { (s.yr.ceil() - Q::one(), ve.floor() + Q::one()) };
            while (up && lvl <= last) || (!up && lvl >= last) {
                let x = &s.x + (&lvl - &s.yr) / &s.s;
                if x > s.x && x < e {
                    // At the crossing f = lvl exactly; just after, f is above (up) or below.
                    let after = if up {
                        if floor {
                            lvl.clone()
                        } else {
                            &lvl + &Q::one()
                        }
                    } else if floor {
                        &lvl - &Q::one()
                    } else {
                        lvl.clone()
                    };
                    out.push(Seg::new(x, lvl.clone(), after, Q::zero()));
                    budget = budget.checked_sub(1).ok_or(CurveError::TooComplex)?;
                }
                lvl = if up { lvl + Q::one() } else { lvl - Q::one() };
            }
        }
        Curve::from_parts(out, self.t.clone(), d, c)
    }

    pub fn floor(&self) -> Result<Curve> {
        self.round(true)
    }
    pub fn ceil(&self) -> Result<Curve> {
        self.round(false)
    }

    // ----------------------------------------------------------------- (min,+) algebra

    /// Min-plus convolution `(f ⊗ g)(t) = inf_{0<=s<=t} f(t-s) + g(s)`.
    ///
    /// Window: equal rates: periodic from `Tf + Tg + lcm(df, dg)` with period `lcm`; otherwise
    /// the splits that use more than `S*` of the faster curve are never better than putting
    /// everything on the slower one, so the result follows the slower curve's period from
    /// `T_slow + S*`.
    pub fn conv(&self, o: &Curve) -> Result<Curve> {
        let (rf, rg) = (self.rate(), o.rate());
        let (t, d, c) = if rf == rg {
            let l = Q::lcm(&self.d, &o.d).ok_or(CurveError::TooComplex)?;
            (&self.t + &o.t + &l, l.clone(), &rf * &l)
        } else {
            let (slow, fast) = if rf < rg { (self, o) } else { (o, self) };
            let (ms, mxs) = slow.affine_bounds();
            let (mf, _) = fast.affine_bounds();
            let s_star = (fast.eval(&Q::zero()) + &mxs - &ms - &mf) / (fast.rate() - slow.rate());
            let s_star = Q::max(&s_star.ceil(), &Q::zero());
            (&slow.t + &s_star, slow.d.clone(), slow.c.clone())
        };
        let h = &t + &d;
        let a = self.unroll(&h)?;
        let b = o.unroll(&h)?;
        Curve::from_parts(fin_conv(&a, &b, &h)?, t, d, c)
    }

    /// Min-plus deconvolution `(f ⊘ g)(t) = sup_{u>=0} f(t+u) - g(u)`.
    ///
    /// Finite only when `g` grows at least as fast as `f`. The result repeats with `f`'s period
    /// from `Tf`; the supremum is attained for `u` below a bound derived from the affine bounds
    /// (different rates) or within one common period after both transients (equal rates).
    pub fn deconv(&self, o: &Curve) -> Result<Curve> {
        let (rf, rg) = (self.rate(), o.rate());
        if rf > rg {
            return Err(CurveError::Unbounded("deconvolution by a curve of smaller long-run rate"));
        }
        let u_max = if rf == rg {
            let l = Q::lcm(&self.d, &o.d).ok_or(CurveError::TooComplex)?;
            Q::max(&self.t, &o.t) + l
        } else {
            let (mf, mxf) = self.affine_bounds();
            let (mg, _) = o.affine_bounds();
            let u = (&mxf - &mf - &mg + o.eval(&Q::zero())) / (&rg - &rf);
            Q::max(&u.ceil(), &Q::zero())
        } + Q::one();
        let t = self.t.clone();
        let h = &t + &self.d;
        let a = self.unroll(&(&h + &u_max))?;
        let b = o.unroll(&u_max)?;
        Curve::from_parts(fin_deconv(&a, &(&h + &u_max), &b, &u_max, &h)?, t, self.d.clone(), self.c.clone())
    }

    /// Max-plus convolution `sup_{0<=s<=t} f(t-s) + g(s)`.
    pub fn maxplus_conv(&self, o: &Curve) -> Result<Curve> {
        Ok(self.neg().conv(&o.neg())?.neg())
    }

    /// Max-plus deconvolution `inf_{u>=0} f(t+u) - g(u)`.
    pub fn maxplus_deconv(&self, o: &Curve) -> Result<Curve> {
        Ok(self.neg().deconv(&o.neg())?.neg())
    }

    /// `sup_{0<=s<=t} f(s)`: the smallest non-decreasing curve above `f` (equal to the max-plus
    /// convolution with 0, computed by one forward scan).
    pub fn running_max(&self) -> Result<Curve> {
        self.running_max_from(None)
    }

    /// `max(0, sup_{0<=s<=t} (f − g)(s))`: the service `f` leaves after a demand `g`
    /// (`component::remaining_lower`). The same function as `f.sub(g)?.running_max()?
    /// .clamp_nonnegative()`, in one pass over the difference, which is not normalised in
    /// between (its transient may stay longer than it needs: the scan covers it anyway).
    pub fn sub_running_max_nonneg(&self, g: &Curve) -> Result<Curve> {
        let d = Q::lcm(&self.d, &g.d).ok_or(CurveError::TooComplex)?;
        let c = &self.c * (&d / &self.d) - &g.c * (&d / &g.d);
        let t = Q::max(&self.t, &g.t);
        let h = &t + &d;
        let mut segs = combine(&self.unroll_view(&h)?, &g.unroll_view(&h)?, &h, Op::Sub);
        split_at(&mut segs, &t);
        Curve { segs: Arc::new(segs), t, d, c, memo: Memo::default() }.running_max_from(Some(Q::zero()))
    }

    /// `max(floor, sup_{0<=s<=t} f(s))` (`floor`: none when `None`), known to be non-decreasing
    /// (a running maximum is; checked against the scan in debug builds and by the property
    /// tests).
    fn running_max_from(&self, floor: Option<Q>) -> Result<Curve> {
        let mut r = self.running_max_from_scan(floor)?;
        debug_assert!(r.is_nondecreasing_scan(), "running maximum not non-decreasing: {r:?}");
        r.memo = Memo::nondecreasing();
        Ok(r)
    }

    fn running_max_from_scan(&self, floor: Option<Q>) -> Result<Curve> {
        let end = self.base_end();
        if !self.c.is_positive() {
            // Later periods never exceed the first: constant from T + d on.
            let segs = self.unroll_view(&end)?;
            let mut out = scan_running_max(&segs, &end, floor.clone());
            let sup = self.sup_on_base();
            out.push(Seg::line(end.clone(), floor.map_or(sup.clone(), |f| Q::max(&f, &sup)), Q::zero()));
            return Curve::from_parts(out, end, Q::one(), Q::zero());
        }
        if self.is_affine_tail() {
            // From T on, f is one rising line (a truncated curve's tail): the running maximum
            // stays at the maximum reached before the line until the line passes it, then
            // follows the line. One scan, no bound on the periods needed.
            let p0 = find_seg(&self.segs, &self.t);
            let tail = &self.segs[p0];
            let mut out = Vec::with_capacity(2 * p0 + 2);
            let before = scan_running_max_onto(&mut out, &self.segs[..p0], &tail.x, floor);
            let v = before.map_or(tail.y.clone(), |m| Q::max(&m, &tail.y));
            let start = if tail.yr >= v {
                out.push(Seg::new(tail.x.clone(), v, tail.yr.clone(), tail.s.clone()));
                tail.x.clone()
            } else {
                let xc = &tail.x + (&v - &tail.yr) / &tail.s;
                out.push(Seg::new(tail.x.clone(), v.clone(), v.clone(), Q::zero()));
                out.push(Seg::line(xc.clone(), v, tail.s.clone()));
                xc
            };
            return Curve::from_parts(out, start, self.d.clone(), self.c.clone());
        }
        // For t >= T + d, r(t + d) = r(t) + c as soon as sup[T, t] f >= sup[0, T) f. Since
        // sup[T, T + jd] f >= sup[T, T + d] f + (j − 1) c, that holds from
        // T + (1 + max(0, ⌈(sup[0,T) − sup[T,T+d]) / c⌉)) d on.
        let p0 = find_seg(&self.segs, &self.t);
        let sup_of = |segs: &[Seg], first: usize, last_end: &Q| -> Option<Q> {
            let mut m: Option<Q> = None;
            for (i, s) in segs.iter().enumerate().skip(first) {
                let e = seg_end(segs, i, last_end);
                for v in [s.y.clone(), s.yr.clone(), s.at(e)] {
                    if m.as_ref().is_none_or(|x| &v > x) {
                        m = Some(v);
                    }
                }
            }
            m
        };
        let pattern_sup = sup_of(&self.segs, p0, &end).unwrap_or_default();
        // With a floor, the running maximum over [0, T) is at least the floor.
        let pre = match (sup_of(&self.segs[..p0], 0, &self.t), &floor) {
            (Some(p), Some(f)) => Some(Q::max(&p, f)),
            (p, f) => p.or_else(|| f.clone()),
        };
        let k = Q::one()
            + match pre {
                Some(pre) if pre > pattern_sup => ((pre - &pattern_sup) / &self.c).ceil(),
                _ => Q::zero(),
            };
        let t = &self.t + &k * &self.d;
        let h = &t + &self.d;
        let segs = self.unroll_view(&h)?;
        Curve::from_parts(scan_running_max(&segs, &h, floor), t, self.d.clone(), self.c.clone())
    }

    /// `inf_{u>=t} f(u)`: the largest non-decreasing curve below `f` (the max-plus deconvolution
    /// by 0, computed by one backward scan). Unbounded below if `f` decreases in the long run.
    pub fn running_min_ahead(&self) -> Result<Curve> {
        if self.c.is_negative() {
            return Err(CurveError::Unbounded("infimum ahead of a decreasing curve"));
        }
        // inf over [T + d, ∞) is reached within one period (later periods are no lower).
        let end = self.base_end();
        let h = &end + &self.d;
        let segs = self.unroll(&h)?;
        let tail_inf = {
            // inf over [end, h): the value and right limit at `end`, then every later piece.
            let i = find_seg(&segs, &end);
            let mut m = Q::min(&fin_eval(&segs, &end), &fin_right(&segs, &end));
            for (k, s) in segs.iter().enumerate().skip(i) {
                let e = seg_end(&segs, k, &h);
                if s.x > end {
                    m = Q::min(&m, &Q::min(&s.y, &s.yr));
                }
                m = Q::min(&m, &s.at(e));
            }
            m
        };
        let out = scan_running_min_ahead(&segs, &h, tail_inf);
        Curve::from_parts(out, self.t.clone(), self.d.clone(), self.c.clone())
    }

    /// Infimum over `[0, T + d]` (values and one-sided limits).
    fn inf_on_base(&self) -> Q {
        self.extreme_on_base(|v, best| v < best)
    }

    /// Supremum over `[0, T + d]` (values and one-sided limits).
    fn sup_on_base(&self) -> Q {
        self.extreme_on_base(|v, best| v > best)
    }

    /// The value, right limit or left limit over `[0, T + d]` that `better` prefers.
    fn extreme_on_base(&self, better: impl Fn(&Q, &Q) -> bool) -> Q {
        let end = self.base_end();
        let mut best = self.segs[0].y.clone();
        for (i, s) in self.segs.iter().enumerate() {
            for v in [&s.y, &s.yr, &s.at(seg_end(&self.segs, i, &end))] {
                if better(v, &best) {
                    best = v.clone();
                }
            }
        }
        best
    }

    // ----------------------------------------------------------------- deviations

    /// `sup_t f(t)` (values and one-sided limits); unbounded if `f` grows.
    pub fn sup(&self) -> Result<Q> {
        if self.c.is_positive() {
            return Err(CurveError::Unbounded("supremum of a growing curve"));
        }
        // Later periods never rise above the first.
        Ok(self.sup_on_base())
    }

    /// Vertical deviation `sup_t f(t) - g(t)` (the backlog bound when `f` is an arrival curve
    /// and `g` a service curve).
    pub fn vdev(&self, g: &Curve) -> Result<Q> {
        // sup (f − g) over the window of f − g (`Curve::sub`), without building that curve:
        // beyond it, the difference repeats with the increment it has over one common period.
        let l = Q::lcm(&self.d, &g.d).ok_or(CurveError::TooComplex)?;
        let c = &self.c * (&l / &self.d) - &g.c * (&l / &g.d);
        let sup = self.vdev_before(g, &(Q::max(&self.t, &g.t) + &l))?;
        if c.is_positive() {
            return Err(CurveError::Unbounded("supremum of a growing curve"));
        }
        Ok(sup)
    }

    /// `sup_t f(t) − g(t)` over `t` in `[0, h)` (values and one-sided limits, including the
    /// left limit at `h`): the part of the vertical deviation seen before `h`, never above
    /// [`Curve::vdev`]. It depends only on both curves on `[0, h)`. `h` must be positive.
    pub fn vdev_before(&self, g: &Curve, h: &Q) -> Result<Q> {
        if !h.is_positive() {
            return Err(CurveError::Invalid(format!("window end must be positive, got {h}")));
        }
        let (fs, gs) = (self.unroll_view(h)?, g.unroll_view(h)?);
        if fs.iter().all(|s| s.s.is_zero()) && g.is_nondecreasing() {
            return Ok(staircase_above(&fs, &gs));
        }
        let d = combine(&fs, &gs, h, Op::Sub);
        let mut best = d[0].y.clone();
        for (i, s) in d.iter().enumerate() {
            for v in [&s.y, &s.yr, &s.at(seg_end(&d, i, h))] {
                if v > &best {
                    best = v.clone();
                }
            }
        }
        Ok(best)
    }

    /// First time `f` reaches `y`: `inf {t >= 0 : f(t) >= y}` (or `> y` when `strict`);
    /// `None` if never. `f` must be non-decreasing.
    pub fn first_reach(&self, y: &Q, strict: bool) -> Option<Q> {
        let hit = |v: &Q, y: &Q| if strict { v > y } else { v >= y };
        let end = self.base_end();
        if let Some(t) = reach_in(&self.segs, 0, &end, y, strict) {
            return Some(t);
        }
        // Not within [0, T + d): levels above the top of the base are first reached in the
        // k-th repetition of the pattern.
        if !self.c.is_positive() {
            return None;
        }
        let top = fin_left_end(&self.segs, &end);
        let k = if strict { ((y - &top) / &self.c).floor() + Q::one() } else { Q::max(&((y - &top) / &self.c).ceil(), &Q::one()) };
        let y2 = y - &k * &self.c;
        let p0 = find_seg(&self.segs, &self.t);
        let t = reach_in(&self.segs, p0, &end, &y2, strict).or_else(|| {
            // Reached exactly at the end of the pattern (approached from the left).
            hit(&top, &y2).then(|| end.clone())
        })?;
        Some(t + k * &self.d)
    }

    /// Horizontal deviation `sup_t inf {τ >= 0 : f(t) <= g(t + τ)}` (the delay bound when `f`
    /// is an arrival curve and `g` a service curve). Both must be non-decreasing.
    pub fn hdev(&self, g: &Curve) -> Result<Q> {
        self.hdev_and_below(g, None).map(|(d, _)| d)
    }

    /// [`Curve::hdev`], and the largest deviation it found at a level below `y0` (`None`
    /// without `y0`): a lower bound of the deviation over the levels below `y0`, which depends
    /// only on where both curves first reach (and exceed) those levels.
    pub fn hdev_and_below(&self, g: &Curve, y0: Option<&Q>) -> Result<(Q, Option<Q>)> {
        if !self.is_nondecreasing() || !g.is_nondecreasing() {
            return Err(CurveError::NotMonotone);
        }
        let (rf, rg) = (self.rate(), g.rate());
        if rf > rg {
            return Err(CurveError::Unbounded("demand grows faster than service"));
        }
        // Levels beyond `top` cannot contribute (see the module documentation of `hdev`).
        let top = if rf.is_zero() {
            self.sup()?
        } else if rf < rg {
            let (_, mf) = self.affine_bounds();
            let (mg, _) = g.affine_bounds();
            let t_star = Q::max(&((mf - mg) / (&rg - &rf)), &Q::zero());
            self.eval_right(&t_star)
        } else {
            let lc = Q::lcm(&self.c, &g.c).ok_or(CurveError::TooComplex)?;
            let ef = self.eval_left(&(&self.t + &self.d));
            let eg = g.eval_left(&(&g.t + &g.d));
            Q::max(&ef, &eg) + lc
        };
        let mut levels: Vec<Q> = vec![Q::zero(), top.clone()];
        let mut unrolled: Vec<(Cow<[Seg]>, Q)> = Vec::with_capacity(2);
        // A staircase demand (every piece flat) needs only its own levels when `top` is one of
        // its values (always but when both rates are equal): within a step the deviation
        // decreases, and a level y between two of its values v < y <= v' is first reached (and
        // exceeded) where v' is, by the demand, and no later by the service, so v' deviates
        // at least as much.
        let mut staircase = !rf.is_positive() || rf < rg;
        for c in [self, g] {
            let h = match c.first_reach(&top, false) {
                Some(t) => t + Q::one(),
                None => return Err(CurveError::Unbounded("service never reaches the demand")),
            };
            let segs = c.unroll_view(&h)?;
            let own_levels = unrolled.is_empty();
            if own_levels {
                staircase &= segs.iter().all(|s| s.s.is_zero());
            }
            if own_levels || !staircase {
                levels.reserve(3 * segs.len());
                for (i, s) in segs.iter().enumerate() {
                    let e = seg_end(&segs, i, &h);
                    for v in [s.y.clone(), s.yr.clone(), s.at(e)] {
                        if !v.is_negative() && v <= top {
                            levels.push(v);
                        }
                    }
                }
            }
            unrolled.push((segs, h));
        }
        levels.sort();
        levels.dedup();
        // Every level below `top` is first reached (and exceeded) inside the unrolled windows, so
        // increasing levels are found by forward scans; `top` itself may be exceeded only later,
        // after the scan (which answers only with a point inside its window, hence the first
        // reach of the whole curve, which is non-decreasing) found nothing.
        let sweep = |k: usize| Sweep { segs: &unrolled[k].0, end: &unrolled[k].1, i: 0 };
        let (mut sf, mut sg, mut sf_strict, mut sg_strict) = (sweep(0), sweep(1), sweep(0), sweep(1));
        let fsup = if rf.is_zero() { Some(top.clone()) } else { None };
        let mut best = Q::zero();
        let mut below = y0.map(|_| Q::zero());
        for y in &levels {
            let reach = |sw: &mut Sweep, c: &Curve, strict: bool| sw.reach(y, strict).or_else(|| c.first_reach(y, strict));
            let mut see = |d: Q| {
                if let Some(b) = below.as_mut().filter(|_| y0.is_some_and(|y0| y < y0)) {
                    if &d > b {
                        *b = d.clone();
                    }
                }
                if d > best {
                    best = d;
                }
            };
            let Some(fi) = reach(&mut sf, self, false) else { continue };
            let gi = reach(&mut sg, g, false).ok_or(CurveError::Unbounded("service never reaches the demand"))?;
            see(gi - fi);
            if fsup.as_ref().is_none_or(|s| y < s) {
                if let Some(fi) = reach(&mut sf_strict, self, true) {
                    let gi = reach(&mut sg_strict, g, true).ok_or(CurveError::Unbounded("service never exceeds the demand"))?;
                    see(gi - fi);
                }
            }
        }
        Ok((best, below))
    }

    /// `sup (r·t − f(t))` over `t` in `[0, h)` (values and one-sided limits, including the
    /// left limit at `h`): how far `f` falls below the line before `h`.
    pub fn max_below_line_before(&self, r: &Q, h: &Q) -> Q {
        let segs = self.unroll_raw(h);
        let Some(first) = segs.first() else { return -&self.segs[0].y };
        let mut best = r * &first.x - &first.y;
        for (i, s) in segs.iter().enumerate() {
            let e = seg_end(&segs, i, h);
            let rx = r * &s.x;
            for v in [&rx - &s.y, &rx - &s.yr, r * e - s.at(e)] {
                if v > best {
                    best = v;
                }
            }
        }
        best
    }

    /// `sup_t (r·t − f(t))`: how far `f` falls below the line through the origin with slope
    /// `r`. Finite when `f` grows at least at rate `r` in the long run.
    pub fn max_below_line(&self, r: &Q) -> Result<Q> {
        if &self.rate() < r {
            return Err(CurveError::Unbounded("curve falls ever further below the line"));
        }
        // With equal rates the difference repeats from T on; with a larger rate it only shrinks.
        let end = self.base_end();
        let mut best: Option<Q> = None;
        for (i, s) in self.segs.iter().enumerate() {
            let e = seg_end(&self.segs, i, &end);
            let rx = r * &s.x;
            for v in [&rx - &s.y, &rx - &s.yr, r * e - s.at(e)] {
                if best.as_ref().is_none_or(|b| &v > b) {
                    best = Some(v);
                }
            }
        }
        Ok(best.unwrap_or_default())
    }

    /// `inf {t > 0 : f(t) <= g(t)}`: the longest busy window when `f` is the total demand and
    /// `g` the service.
    pub fn busy_window(&self, g: &Curve) -> Result<Q> {
        if self.rate() > g.rate() {
            return Err(CurveError::Unbounded("demand grows faster than service"));
        }
        let diff = self.sub(g)?;
        let h = if diff.c.is_negative() {
            let (_, mx) = diff.affine_bounds();
            Q::max(&(mx / -diff.rate()).ceil(), &Q::zero()) + diff.base_end() + Q::one()
        } else {
            diff.base_end() + diff.d.clone()
        };
        let segs = diff.unroll(&h)?;
        for (i, s) in segs.iter().enumerate() {
            if s.x.is_positive() && !s.y.is_positive() {
                return Ok(s.x.clone());
            }
            if !s.yr.is_positive() {
                return Ok(s.x.clone());
            }
            let e = seg_end(&segs, i, &h);
            if s.s.is_negative() && !s.at(e).is_positive() {
                let x = &s.x + &s.yr / -&s.s;
                if &x < e {
                    return Ok(x);
                }
            }
        }
        Err(CurveError::Unbounded("the busy window never closes"))
    }
}

/// Forward scan for the first time a non-decreasing finite list (covering `[0, end)`) reaches
/// each of a series of increasing levels: the linear-time counterpart of [`reach_in`] (same
/// answers), since the segment where a level is first reached never moves back as it rises.
struct Sweep<'a> {
    segs: &'a [Seg],
    end: &'a Q,
    i: usize,
}

impl Sweep<'_> {
    /// `inf {t : f(t) >= y}` (`> y` when `strict`) within the list; `None` if not reached there.
    fn reach(&mut self, y: &Q, strict: bool) -> Option<Q> {
        let hit = |v: &Q| if strict { v > y } else { v >= y };
        while let Some(s) = self.segs.get(self.i) {
            if hit(&s.y) || hit(&s.yr) {
                return Some(s.x.clone());
            }
            let e = seg_end(self.segs, self.i, self.end);
            if s.s.is_positive() && hit(&s.at(e)) {
                return Some(&s.x + (y - &s.yr) / &s.s);
            }
            self.i += 1;
        }
        None
    }
}

/// `sup (f − g)` over the window of two finite lists on the same `[0, h)`, for a staircase `f`
/// (every piece flat) and a non-decreasing `g`: within a step `f − g` does not increase, so the
/// supremum is the value or the right limit at one of `f`'s breakpoints (the left limit at a
/// step's end is no larger than its right limit at the start). `g` is evaluated there by one
/// forward scan, without building the difference.
fn staircase_above(f: &[Seg], g: &[Seg]) -> Q {
    let mut best: Option<Q> = None;
    let mut j = 0;
    for s in f {
        while g.get(j + 1).is_some_and(|n| n.x <= s.x) {
            j += 1;
        }
        let at = &g[j];
        let (v, vr) = if at.x == s.x {
            (&s.y - &at.y, &s.yr - &at.yr)
        } else {
            let gx = at.at(&s.x);
            (&s.y - &gx, &s.yr - &gx)
        };
        for v in [v, vr] {
            if best.as_ref().is_none_or(|b| &v > b) {
                best = Some(v);
            }
        }
    }
    best.unwrap_or_default()
}

/// `Σ ±l` of finite lists all starting at 0 (each term's last segment extends to the end of the
/// result; `true`: subtracted), in one sweep over all their breakpoints (see [`Curve::sum`]).
/// The sweep keeps the result's current line (intercept and slope) and, at each breakpoint,
/// only updates the terms of the lists that change there.
fn signed_sum(terms: &[(Cow<[Seg]>, bool)]) -> Vec<Seg> {
    // Per list: its current segment and that segment's line as intercept + slope·t.
    let mut at = vec![0usize; terms.len()];
    let intercept = |g: &Seg| &g.yr - &(&g.s * &g.x);
    let add = |acc: Q, v: &Q, minus: bool| if minus { acc - v } else { acc + v };
    let (mut a, mut b) = (Q::zero(), Q::zero());
    let (mut y0, mut yr0) = (Q::zero(), Q::zero());
    for (l, minus) in terms {
        a = add(a, &intercept(&l[0]), *minus);
        b = add(b, &l[0].s, *minus);
        y0 = add(y0, &l[0].y, *minus);
        yr0 = add(yr0, &l[0].yr, *minus);
    }
    let mut out = Vec::with_capacity(terms.iter().map(|(l, _)| l.len()).sum());
    out.push(Seg::new(Q::zero(), y0, yr0, b.clone()));
    while let Some(x) = terms.iter().zip(&at).filter_map(|((l, _), &k)| l.get(k + 1).map(|g| &g.x)).min().cloned() {
        // The sum's left limit at x: every current line extends up to x.
        let mut y = &a + &(&b * &x);
        for ((l, minus), k) in terms.iter().zip(at.iter_mut()) {
            let Some(new) = l.get(*k + 1).filter(|g| g.x == x) else { continue };
            let old = &l[*k];
            y = add(y, &(&new.y - &old.at(&x)), *minus);
            a = add(a, &(intercept(new) - intercept(old)), *minus);
            b = add(b, &(&new.s - &old.s), *minus);
            *k += 1;
        }
        let yr = &a + &(&b * &x);
        out.push(Seg::new(x, y, yr, b.clone()));
    }
    out
}

/// Running maximum of a finite list on `[0, h)`.
fn scan_running_max(segs: &[Seg], h: &Q, floor: Option<Q>) -> Vec<Seg> {
    // At most two segments for each (reserved at once: growing would move them all).
    let mut out = Vec::with_capacity(2 * segs.len());
    scan_running_max_onto(&mut out, segs, h, floor);
    merge_collinear(out)
}

/// Appends the running maximum of a finite list ending at `h`, above `floor`, to `out` (not
/// merged); returns the maximum reached (the left limit at `h`), `None` for no segments and
/// no floor.
fn scan_running_max_onto(out: &mut Vec<Seg>, segs: &[Seg], h: &Q, floor: Option<Q>) -> Option<Q> {
    let mut m: Option<Q> = floor;
    for (i, s) in segs.iter().enumerate() {
        let e = seg_end(segs, i, h);
        let v = m.as_ref().map_or(s.y.clone(), |m| Q::max(m, &s.y));
        let mut cur = v.clone();
        if s.yr > cur {
            cur = s.yr.clone();
        }
        if s.s.is_positive() && s.yr >= v {
            out.push(Seg::new(s.x.clone(), v, s.yr.clone(), s.s.clone()));
            cur = s.at(e);
        } else if let Some(top) = s.s.is_positive().then(|| s.at(e)).filter(|top| top > &cur) {
            // Flat at `cur` until the line climbs above it.
            let xc = &s.x + (&cur - &s.yr) / &s.s;
            out.push(Seg::new(s.x.clone(), v, cur.clone(), Q::zero()));
            out.push(Seg::line(xc, cur, s.s.clone()));
            cur = top;
        } else {
            out.push(Seg::new(s.x.clone(), v, cur.clone(), Q::zero()));
        }
        m = Some(cur);
    }
    m
}

/// `inf_{u>=t}` of a finite list on `[0, h)`, given the infimum over `[h, ∞)`.
fn scan_running_min_ahead(segs: &[Seg], h: &Q, after: Q) -> Vec<Seg> {
    let mut rev: Vec<Vec<Seg>> = Vec::with_capacity(segs.len());
    let mut m = after;
    for (i, s) in segs.iter().enumerate().rev() {
        let e = seg_end(segs, i, h);
        let le = s.at(e);
        let mut piece = Vec::new();
        // Interior (x, e): min(m, inf of the line over [t, e)).
        let right = if !s.s.is_positive() {
            let v = Q::min(&m, &le);
            piece.push((Q::min(&m, &le), Q::zero(), None));
            v
        } else if le <= m {
            piece.push((s.yr.clone(), s.s.clone(), None));
            s.yr.clone()
        } else if s.yr >= m {
            piece.push((m.clone(), Q::zero(), None));
            m.clone()
        } else {
            let xc = &s.x + (&m - &s.yr) / &s.s;
            piece.push((s.yr.clone(), s.s.clone(), Some((xc, m.clone()))));
            s.yr.clone()
        };
        let at_x = Q::min(&s.y, &right);
        let mut segs_here = Vec::new();
        for (yr, sl, cross) in piece {
            segs_here.push(Seg::new(s.x.clone(), at_x.clone(), yr, sl));
            if let Some((xc, mv)) = cross {
                segs_here.push(Seg::line(xc, mv, Q::zero()));
            }
        }
        m = at_x;
        rev.push(segs_here);
    }
    merge_collinear(rev.into_iter().rev().flatten().collect())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Add,
    Sub,
    Min,
    Max,
}

/// Left limit at `end` of a finite list covering `[0, end)`.
fn fin_left_end(segs: &[Seg], end: &Q) -> Q {
    segs.last().map(|s| s.at(end)).unwrap_or_default()
}

/// First time in `segs[from..]` (covering up to `end`) at which a non-decreasing list reaches
/// `y` (`> y` when strict), as an infimum.
fn reach_in(segs: &[Seg], from: usize, end: &Q, y: &Q, strict: bool) -> Option<Q> {
    let hit = |v: &Q| if strict { v > y } else { v >= y };
    let top = |i: usize| segs[i].at(seg_end(segs, i, end));
    // Bisect for the first segment whose value or top reaches y.
    let (mut lo, mut hi) = (from, segs.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if hit(&top(mid)) || hit(&segs[mid].y) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    for i in lo.saturating_sub(1).max(from)..segs.len() {
        let s = &segs[i];
        if hit(&s.y) || hit(&s.yr) {
            return Some(s.x.clone());
        }
        let e = seg_end(segs, i, end);
        if s.s.is_positive() && hit(&s.at(e)) {
            let x = &s.x + (y - &s.yr) / &s.s;
            // Non-strict: where the line equals y. Strict: the infimum is the same point.
            return Some(x);
        }
        if i > lo + 1 {
            break;
        }
    }
    None
}

/// Pointwise combination of two finite lists both covering `[0, h)`.
fn combine(a: &[Seg], b: &[Seg], h: &Q, op: Op) -> Vec<Seg> {
    // Both lists are sorted: merge their breakpoints.
    let mut xs: Vec<&Q> = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0usize, 0usize);
    while i < a.len() || j < b.len() {
        let x = match (a.get(i), b.get(j)) {
            (Some(p), Some(q)) if p.x < q.x => {
                i += 1;
                &p.x
            }
            (Some(p), Some(q)) if p.x == q.x => {
                i += 1;
                j += 1;
                &p.x
            }
            (_, Some(q)) => {
                j += 1;
                &q.x
            }
            (Some(p), None) => {
                i += 1;
                &p.x
            }
            (None, None) => break,
        };
        xs.push(x);
    }
    let mut out = Vec::with_capacity(xs.len());
    let (mut ia, mut ib) = (0usize, 0usize);
    for (k, x) in xs.iter().enumerate() {
        while ia + 1 < a.len() && &a[ia + 1].x <= *x {
            ia += 1;
        }
        while ib + 1 < b.len() && &b[ib + 1].x <= *x {
            ib += 1;
        }
        let (sa, sb) = (&a[ia], &b[ib]);
        // Value and right limit at x: the segment's own at its start, else its line's (once).
        let value_and_right = |s: &Seg| {
            if &s.x == *x {
                (s.y.clone(), s.yr.clone())
            } else {
                let v = s.at(x);
                (v.clone(), v)
            }
        };
        let ((va, ra), (vb, rb)) = (value_and_right(sa), value_and_right(sb));
        let nx = xs.get(k + 1).copied().unwrap_or(h);
        match op {
            Op::Add => out.push(Seg::new((*x).clone(), va + vb, ra + rb, &sa.s + &sb.s)),
            Op::Sub => out.push(Seg::new((*x).clone(), va - vb, ra - rb, &sa.s - &sb.s)),
            Op::Min | Op::Max => {
                let pick_a = |l: &Q, r: &Q| if op == Op::Min { l < r } else { l > r };
                let y = if pick_a(&va, &vb) { va } else { vb };
                let (la, lb) = (sa.at(nx), sb.at(nx));
                let first_a = if ra == rb { pick_a(&sa.s, &sb.s) || sa.s == sb.s } else { pick_a(&ra, &rb) };
                let (f, g) = if first_a { (sa, sb) } else { (sb, sa) };
                let (rf, lf, lg) = if first_a { (&ra, &la, &lb) } else { (&rb, &lb, &la) };
                out.push(Seg::new((*x).clone(), y, rf.clone(), f.s.clone()));
                // The other line takes over strictly inside if the order flips.
                if pick_a(lg, lf) {
                    let xc = (*x) + &((&g.at(x) - &f.at(x)) / (&f.s - &g.s));
                    if &xc > *x && &xc < nx {
                        let v = f.at(&xc);
                        out.push(Seg::new(xc, v.clone(), v, g.s.clone()));
                    }
                }
            }
        }
    }
    merge_collinear(out)
}

/// An elementary piece of a (de)convolution: a point, or a line on an open interval.
enum Piece {
    Point(Q, Q),
    Open { a: Q, b: Q, y0: Q, s: Q },
}

/// Lower envelope kept as a finite segment list on `[0, h)`, lowered piece by piece.
struct Envelope {
    segs: Vec<Seg>,
    h: Q,
}

impl Envelope {
    fn insert(&mut self, p: Piece) {
        match p {
            Piece::Point(x, y) => {
                if x.is_negative() || x >= self.h {
                    return;
                }
                let i = find_seg(&self.segs, &x);
                let cur = if self.segs[i].x == x { self.segs[i].y.clone() } else { self.segs[i].at(&x) };
                if y < cur {
                    let i = split_at(&mut self.segs, &x);
                    self.segs[i].y = y;
                }
            }
            Piece::Open { a, b, y0, s } => {
                let zero = Q::zero();
                if b <= zero || a >= self.h {
                    return;
                }
                let (a, y0) = if a.is_negative() {
                    let v0 = &y0 + &s * (&zero - &a);
                    self.insert(Piece::Point(zero.clone(), v0.clone()));
                    (zero, v0)
                } else {
                    (a, y0)
                };
                let b = if b > self.h { self.h.clone() } else { b };
                if a >= b {
                    return;
                }
                let line = |t: &Q| &y0 + &s * (t - &a);
                // Quick rejection: the piece is nowhere below the envelope.
                let i0 = find_seg(&self.segs, &a);
                let mut below = false;
                let mut i = i0;
                while i < self.segs.len() && self.segs[i].x < b {
                    let sg = &self.segs[i];
                    let lo = if sg.x > a { &sg.x } else { &a };
                    let nx = seg_end(&self.segs, i, &self.h);
                    let hi = if nx < &b { nx } else { &b };
                    if line(lo) < sg.at(lo) || line(hi) < sg.at(hi) || (sg.x > a && line(&sg.x) < sg.y) {
                        below = true;
                        break;
                    }
                    i += 1;
                }
                if !below {
                    return;
                }
                let ia = split_at(&mut self.segs, &a);
                let ib = if b < self.h { split_at(&mut self.segs, &b) } else { self.segs.len() };
                let mut rep: Vec<Seg> = Vec::with_capacity(ib - ia + 4);
                for j in ia..ib {
                    let sg = &self.segs[j];
                    let nx = seg_end(&self.segs, j, &self.h).clone();
                    let pv = line(&sg.x);
                    let y = if sg.x > a && pv < sg.y { pv.clone() } else { sg.y.clone() };
                    let (l_env, r_env) = (sg.yr.clone(), sg.at(&nx));
                    let (l_p, r_p) = (pv, line(&nx));
                    let env_first = l_env < l_p || (l_env == l_p && sg.s <= s);
                    if env_first {
                        rep.push(Seg::new(sg.x.clone(), y, l_env.clone(), sg.s.clone()));
                        if r_p < r_env {
                            let xc = &sg.x + (&l_p - &l_env) / (&sg.s - &s);
                            let v = line(&xc);
                            rep.push(Seg::new(xc, v.clone(), v, s.clone()));
                        }
                    } else {
                        rep.push(Seg::new(sg.x.clone(), y, l_p.clone(), s.clone()));
                        if r_env < r_p {
                            let xc = &sg.x + (&l_env - &l_p) / (&s - &sg.s);
                            let v = sg.at(&xc);
                            rep.push(Seg::new(xc, v.clone(), v, sg.s.clone()));
                        }
                    }
                }
                self.segs.splice(ia..ib, rep);
            }
        }
    }
}

/// Elements of a finite list: the point at each breakpoint and the open line after it.
fn elements<'a>(segs: &'a [Seg], end: &'a Q) -> impl Iterator<Item = (&'a Seg, &'a Q)> + 'a {
    segs.iter().enumerate().map(move |(i, s)| (s, seg_end(segs, i, end)))
}

/// Min-plus convolution of two finite lists on `[0, h)`.
fn fin_conv(a: &[Seg], b: &[Seg], h: &Q) -> Result<Vec<Seg>> {
    // Start from the split that puts everything on `a` (b's point at 0): covers [0, h).
    let g0 = b[0].y.clone();
    let mut env = Envelope { segs: a.iter().map(|s| Seg::new(s.x.clone(), &s.y + &g0, &s.yr + &g0, s.s.clone())).collect(), h: h.clone() };
    if a.len().saturating_mul(b.len()) > MAX_SEGMENTS * 4 {
        return Err(CurveError::TooComplex);
    }
    for (gs, ge) in elements(b, h) {
        for (fs, fe) in elements(a, h) {
            let (x0, lf, lg) = (&fs.x + &gs.x, fe - &fs.x, ge - &gs.x);
            if &x0 >= h {
                break;
            }
            // point ⊗ point
            if !gs.x.is_zero() {
                env.insert(Piece::Point(x0.clone(), &fs.y + &gs.y));
                // f's open line after its point, b's point
                env.insert(Piece::Open { a: x0.clone(), b: &x0 + &lf, y0: &fs.yr + &gs.y, s: fs.s.clone() });
            }
            // f point ⊗ g open
            env.insert(Piece::Open { a: x0.clone(), b: &x0 + &lg, y0: &fs.y + &gs.yr, s: gs.s.clone() });
            // open ⊗ open: the smaller slope first
            let ((l1, s1), (l2, s2)) = if fs.s <= gs.s { ((&lf, &fs.s), (&lg, &gs.s)) } else { ((&lg, &gs.s), (&lf, &fs.s)) };
            let y0 = &fs.yr + &gs.yr;
            let xm = &x0 + l1;
            let ym = &y0 + s1 * l1;
            env.insert(Piece::Open { a: x0.clone(), b: xm.clone(), y0, s: s1.clone() });
            env.insert(Piece::Point(xm.clone(), ym.clone()));
            env.insert(Piece::Open { a: xm.clone(), b: &xm + l2, y0: ym, s: s2.clone() });
        }
        if env.segs.len() > MAX_SEGMENTS {
            return Err(CurveError::TooComplex);
        }
    }
    Ok(merge_collinear(env.segs))
}

/// Min-plus deconvolution of finite lists: `sup_{u in [0, ub)} f(t+u) - g(u)` for `t in [0, h)`,
/// with `f` given on `[0, fa_end)` (at least `h + ub`) and `g` on `[0, ub)`.
fn fin_deconv(fa: &[Seg], fa_end: &Q, g: &[Seg], ub: &Q, h: &Q) -> Result<Vec<Seg>> {
    // Work on the negation: -result is a lower envelope. Start with u = 0: f(t) - g(0).
    let g0 = g[0].y.clone();
    let init: Vec<Seg> = fa.iter().filter(|s| &s.x < h).map(|s| Seg::new(s.x.clone(), &g0 - &s.y, &g0 - &s.yr, -&s.s)).collect();
    let mut env = Envelope { segs: init, h: h.clone() };
    if fa.len().saturating_mul(g.len()) > MAX_SEGMENTS * 4 {
        return Err(CurveError::TooComplex);
    }
    for (gs, ge) in elements(g, ub) {
        let lg = ge - &gs.x;
        for (fs, fe) in elements(fa, fa_end) {
            if fe <= &gs.x {
                continue;
            }
            let lf = fe - &fs.x;
            // Times covered by this pair: t = x - u.
            if &(&fs.x - ge) >= h {
                break;
            }
            if !gs.x.is_zero() {
                // f point, g point
                env.insert(Piece::Point(&fs.x - &gs.x, &gs.y - &fs.y));
                // f open, g point: t in (xa - ug, xb - ug)
                env.insert(Piece::Open { a: &fs.x - &gs.x, b: fe - &gs.x, y0: &gs.y - &fs.yr, s: -&fs.s });
            }
            // f point, g open (u in (ua, ub)): t in (xf - ub, xf - ua), rising with g's slope.
            let v_end = &gs.yr + &gs.s * &lg;
            env.insert(Piece::Open { a: &fs.x - ge, b: &fs.x - &gs.x, y0: &v_end - &fs.y, s: -&gs.s });
            // f open, g open: max-plus combination, the larger slope first (negated here).
            let start = &fs.x - ge;
            let v0 = &fs.yr - &v_end;
            let ((l1, s1), (l2, s2)) = if fs.s >= gs.s { ((&lf, &fs.s), (&lg, &gs.s)) } else { ((&lg, &gs.s), (&lf, &fs.s)) };
            let xm = &start + l1;
            let vm = &v0 + s1 * l1;
            env.insert(Piece::Open { a: start.clone(), b: xm.clone(), y0: -&v0, s: -s1 });
            env.insert(Piece::Point(xm.clone(), -&vm));
            env.insert(Piece::Open { a: xm.clone(), b: &xm + l2, y0: -&vm, s: -s2 });
        }
        if env.segs.len() > MAX_SEGMENTS {
            return Err(CurveError::TooComplex);
        }
    }
    Ok(merge_collinear(env.segs.into_iter().map(|s| Seg::new(s.x, -s.y, -s.yr, -s.s)).collect()))
}
