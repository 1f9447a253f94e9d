//! Property tests: every curve operator against a brute-force evaluation of its definition on a
//! grid of times, for random ultimately pseudo-periodic curves (with jumps, flat parts, slopes).
//!
//! The brute force evaluates infima/suprema over all candidate split points (breakpoints of
//! both operands and their mirror images) with values and one-sided limits, straight from the
//! definitions; it shares no code with the operators except `eval`/`unroll`, which are checked
//! first against a direct periodic extension.

mod common;

use common::Rng;
use proptest::prelude::*;
use rtc::q::{q, qf};
use rtc::{Curve, Seg, Q};

/// `f` with every piece made flat (still non-decreasing when `f` is).
fn staircase_of(f: &Curve) -> Curve {
    let segs = f.segments().iter().map(|s| Seg::new(s.x.clone(), s.y.clone(), s.yr.clone(), q(0))).collect();
    Curve::from_parts(segs, f.periodic_start().clone(), f.period().clone(), f.increment().clone()).unwrap()
}

/// A random curve; `mono` makes it non-decreasing and starting at 0.
fn random_curve(r: &mut Rng, mono: bool) -> Curve {
    let t = qf(r.int(0, 8), 2);
    let d = qf(r.int(1, 8), 2);
    let end = &t + &d;
    let n = r.int(1, 4);
    let mut xs: Vec<Q> = vec![Q::zero(), t.clone()];
    for _ in 0..n {
        xs.push(qf(r.int(0, 40), 4) * &end / q(10));
    }
    xs.retain(|x| x < &end);
    xs.sort();
    xs.dedup();
    let slopes = [q(0), q(0), qf(1, 2), q(1), q(2), q(-1), qf(1, 3)];
    let mut segs = Vec::new();
    let mut prev_top = Q::zero();
    for (i, x) in xs.iter().enumerate() {
        let nx = xs.get(i + 1).cloned().unwrap_or(end.clone());
        let (y, yr, s) = if mono {
            let y = if i == 0 { Q::zero() } else { &prev_top + qf(r.int(0, 2), 2) };
            let yr = &y + qf(r.int(0, 3), 2);
            let mut s = r.pick(&slopes);
            if s.is_negative() {
                s = Q::zero();
            }
            (y, yr, s)
        } else {
            (qf(r.int(-6, 6), 2), qf(r.int(-6, 6), 2), r.pick(&slopes))
        };
        prev_top = &yr + &s * (&nx - x);
        segs.push(Seg::new(x.clone(), y, yr, s));
    }
    let c = if mono {
        // The next period must start no lower than this one ended.
        let start = segs.iter().find(|s| s.x == t).map(|s| s.y.clone()).unwrap();
        let need = &prev_top - &start;
        Q::max(&need, &Q::zero()) + qf(r.int(0, 4), 2)
    } else {
        qf(r.int(-4, 6), 2)
    };
    Curve::from_parts(segs, t, d, c).expect("valid random curve")
}

/// Independent periodic evaluation from the raw description (value, left, right limits).
#[derive(Clone)]
struct Brute {
    segs: Vec<Seg>,
    t: Q,
    d: Q,
    c: Q,
}

impl Brute {
    fn of(f: &Curve) -> Brute {
        Brute { segs: f.segments().to_vec(), t: f.periodic_start().clone(), d: f.period().clone(), c: f.increment().clone() }
    }
    fn lift(&self, x: &Q, left: bool) -> (Q, Q) {
        // Number of whole periods to step back so that x lands in [T, T + d) (or (T, T + d]).
        let end = &self.t + &self.d;
        let beyond = if left { x > &end } else { x >= &end };
        if !beyond {
            return (x.clone(), Q::zero());
        }
        let r = (x - &self.t) / &self.d;
        let k = if left { r.ceil() - Q::one() } else { r.floor() };
        (x - &k * &self.d, k)
    }
    fn val(&self, x: &Q) -> Q {
        let (x, k) = self.lift(x, false);
        let s = self.segs.iter().rev().find(|s| s.x <= x).unwrap();
        let v = if s.x == x { s.y.clone() } else { &s.yr + &s.s * (&x - &s.x) };
        v + k * &self.c
    }
    fn right(&self, x: &Q) -> Q {
        let (x, k) = self.lift(x, false);
        let s = self.segs.iter().rev().find(|s| s.x <= x).unwrap();
        &s.yr + &s.s * (&x - &s.x) + k * &self.c
    }
    fn left(&self, x: &Q) -> Q {
        if !x.is_positive() {
            return self.val(x);
        }
        let (x, k) = self.lift(x, true);
        let s = self.segs.iter().rev().find(|s| s.x < x).unwrap();
        &s.yr + &s.s * (&x - &s.x) + k * &self.c
    }
    fn breakpoints(&self, upto: &Q) -> Vec<Q> {
        let mut out = Vec::new();
        let mut k = Q::zero();
        loop {
            let mut any = false;
            for s in &self.segs {
                if k.is_positive() && s.x < self.t {
                    continue;
                }
                let x = &s.x + &k * &self.d;
                if &x <= upto {
                    out.push(x);
                    any = true;
                }
            }
            if !any {
                break;
            }
            k = k + Q::one();
        }
        out
    }
}

fn grid(h: i64, step_den: i64) -> Vec<Q> {
    (0..=h * step_den).map(|i| qf(i, step_den)).collect()
}

fn brute_conv(f: &Brute, g: &Brute, t: &Q) -> Q {
    let mut cands: Vec<Q> = vec![Q::zero(), t.clone()];
    cands.extend(g.breakpoints(t));
    cands.extend(f.breakpoints(t).into_iter().map(|x| t - x));
    let mut best: Option<Q> = None;
    let mut see = |v: Q| {
        if best.as_ref().is_none_or(|b| &v < b) {
            best = Some(v)
        }
    };
    for s in cands.iter().filter(|s| !s.is_negative() && s <= &t) {
        let r = t - s;
        see(f.val(&r) + g.val(s));
        if s.is_positive() {
            see(f.right(&r) + g.left(s));
        }
        if s < t {
            see(f.left(&r) + g.right(s));
        }
    }
    best.unwrap()
}

fn brute_deconv(f: &Brute, g: &Brute, t: &Q, umax: &Q) -> Q {
    let mut cands: Vec<Q> = vec![Q::zero()];
    cands.extend(g.breakpoints(umax));
    cands.extend(f.breakpoints(&(t + umax)).into_iter().map(|x| x - t).filter(|u| !u.is_negative()));
    let mut best: Option<Q> = None;
    let mut see = |v: Q| {
        if best.as_ref().is_none_or(|b| &v > b) {
            best = Some(v)
        }
    };
    for u in &cands {
        let x = t + u;
        see(f.val(&x) - g.val(u));
        see(f.right(&x) - g.right(u));
        if u.is_positive() {
            see(f.left(&x) - g.left(u));
        }
    }
    best.unwrap()
}

fn check_pointwise(name: &str, got: &Curve, want: impl Fn(&Q) -> Q, h: i64) {
    for x in grid(h, 4) {
        assert_eq!(got.eval(&x), want(&x), "{name} at {x}: {got:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn eval_matches_periodic_definition(seed in any::<u64>()) {
        let mut r = Rng(seed);
        let f = random_curve(&mut r, false);
        let b = Brute::of(&f);
        for x in grid(30, 8) {
            prop_assert_eq!(f.eval(&x), b.val(&x));
            prop_assert_eq!(f.eval_right(&x), b.right(&x));
            prop_assert_eq!(f.eval_left(&x), b.left(&x));
        }
    }

    #[test]
    fn pointwise_operators(seed in any::<u64>()) {
        let mut r = Rng(seed);
        let f = random_curve(&mut r, false);
        let g = random_curve(&mut r, false);
        let (bf, bg) = (Brute::of(&f), Brute::of(&g));
        check_pointwise("min", &f.min(&g).unwrap(), |x| Q::min(&bf.val(x), &bg.val(x)), 40);
        check_pointwise("max", &f.max(&g).unwrap(), |x| Q::max(&bf.val(x), &bg.val(x)), 40);
        check_pointwise("add", &f.add(&g).unwrap(), |x| bf.val(x) + bg.val(x), 40);
        check_pointwise("sub", &f.sub(&g).unwrap(), |x| bf.val(x) - bg.val(x), 40);
        let k = qf(r.int(-3, 5), 2);
        check_pointwise("scale", &f.scale(&k), |x| bf.val(x) * &k, 30);
        let s = qf(r.int(0, 9), 2);
        check_pointwise("shift_right", &f.shift_right(&s, &q(7)), |x| if x < &s { q(7) } else { bf.val(&(x - &s)) }, 30);
        check_pointwise("shift_left", &f.shift_left(&s), |x| bf.val(&(x + &s)), 30);
        // Far beyond the periodic start (whole periods are taken as an offset).
        let far = qf(r.int(0, 400), r.int(1, 3));
        check_pointwise("shift_left far", &f.shift_left(&far), |x| bf.val(&(x + &far)), 30);
        check_pointwise("floor", &f.floor().unwrap(), |x| bf.val(x).floor(), 30);
        check_pointwise("ceil", &f.ceil().unwrap(), |x| bf.val(x).ceil(), 30);
    }

    /// The sum of several curves in one sweep is the curve adding them one by one (the same
    /// segments and periodic part, not only the same values), and its values, right and left
    /// limits are the sums of theirs; with truncated curves too (what fixed-priority rebuilds
    /// add).
    #[test]
    fn a_sum_in_one_sweep_is_the_sum_added_one_by_one(seed in any::<u64>()) {
        let mut r = Rng(seed);
        let k = r.int(0, 7) as usize;
        let mut cs: Vec<Curve> = (0..k).map(|_| random_curve(&mut r, false)).collect();
        if r.int(0, 2) == 0 {
            let h = q(r.int(1, 30));
            cs = cs.iter().map(|c| c.truncate_above(&h).unwrap()).collect();
        }
        let one_by_one = match cs.split_first() {
            Some((first, rest)) => rest.iter().try_fold(first.clone(), |s, c| s.add(c)),
            None => Ok(Curve::zero()),
        };
        match (Curve::sum(&cs), one_by_one) {
            (Ok(swept), Ok(added)) => {
                prop_assert_eq!(&swept, &added);
                let bs: Vec<Brute> = cs.iter().map(Brute::of).collect();
                for x in grid(40, 4) {
                    prop_assert_eq!(swept.eval(&x), bs.iter().fold(Q::zero(), |a, b| a + b.val(&x)));
                    prop_assert_eq!(swept.eval_right(&x), bs.iter().fold(Q::zero(), |a, b| a + b.right(&x)));
                    if x.is_positive() {
                        prop_assert_eq!(swept.eval_left(&x), bs.iter().fold(Q::zero(), |a, b| a + b.left(&x)));
                    }
                }
            }
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (a, b) => prop_assert!(false, "sum {:?} against added {:?}", a, b),
        }
    }

    /// The service left after a demand in one pass is the difference's running maximum
    /// clamped at 0, computed step by step (values and one-sided limits; the same errors).
    #[test]
    fn the_service_left_in_one_pass_is_the_step_by_step_one(seed in any::<u64>()) {
        let mut r = Rng(seed);
        let mut f = random_curve(&mut r, false);
        let mut g = random_curve(&mut r, false);
        if r.int(0, 2) == 0 {
            let h = q(r.int(1, 30));
            f = f.truncate_below(&h).unwrap();
            g = g.truncate_above(&h).unwrap();
        }
        let stepwise = f.sub(&g).and_then(|d| d.running_max()).and_then(|m| m.clamp_nonnegative());
        match (f.sub_running_max_nonneg(&g), stepwise) {
            (Ok(fused), Ok(want)) => {
                for x in grid(40, 4) {
                    prop_assert_eq!(fused.eval(&x), want.eval(&x), "at {} f={:?} g={:?}", x, f, g);
                    prop_assert_eq!(fused.eval_right(&x), want.eval_right(&x));
                    if x.is_positive() {
                        prop_assert_eq!(fused.eval_left(&x), want.eval_left(&x));
                    }
                }
                prop_assert_eq!(fused.rate(), want.rate());
            }
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (a, b) => prop_assert!(false, "one pass {:?} against step by step {:?}", a, b),
        }
    }

    /// A curve's memoised properties (non-decreasing, affine bounds) are those a fresh copy of
    /// its description computes, also for running maxima, which are marked non-decreasing when
    /// built, and after the value at 0 is replaced.
    #[test]
    fn memoised_properties_are_those_of_a_fresh_curve(seed in any::<u64>()) {
        let mut r = Rng(seed);
        let (mf, mg) = (r.int(0, 2) > 0, r.int(0, 2) > 0);
        let f = random_curve(&mut r, mf);
        let g = random_curve(&mut r, mg);
        let fresh = |c: &Curve| {
            Curve::from_parts(c.segments().to_vec(), c.periodic_start().clone(), c.period().clone(), c.increment().clone())
                .unwrap()
        };
        let h = q(r.int(1, 30));
        let derived = [
            f.running_max(),
            f.sub_running_max_nonneg(&g),
            f.left_after_truncated([&g], &h),
            Ok(f.with_value_at_zero(&q(r.int(-3, 3)))),
        ];
        // Memoised before the value at 0 is replaced.
        prop_assert_eq!(f.is_nondecreasing(), fresh(&f).is_nondecreasing());
        for c in std::iter::once(f.clone()).chain(derived.into_iter().filter_map(Result::ok)) {
            // Asked twice: the second answer comes from the memo.
            for _ in 0..2 {
                prop_assert_eq!(c.is_nondecreasing(), fresh(&c).is_nondecreasing(), "{:?}", c);
                prop_assert_eq!(c.affine_bounds(), fresh(&c).affine_bounds(), "{:?}", c);
            }
        }
    }

    /// The service left after several demands all truncated at a horizon, in one sweep, is the
    /// one truncating each, summing them and taking the sum out of the truncated service
    /// (values and one-sided limits, also far beyond the horizon; the same errors).
    #[test]
    fn the_service_left_after_truncated_demands_is_the_composed_one(seed in any::<u64>()) {
        let mut r = Rng(seed);
        let mono = r.int(0, 2) > 0;
        let f = random_curve(&mut r, mono);
        let gs: Vec<Curve> = (0..r.int(0, 5)).map(|_| random_curve(&mut r, mono)).collect();
        let h = qf(r.int(1, 60), r.int(1, 2));
        let composed = gs
            .iter()
            .map(|g| g.truncate_above(&h))
            .collect::<Result<Vec<_>, _>>()
            .and_then(|parts| Curve::sum(&parts))
            .and_then(|total| f.truncate_below(&h)?.sub_running_max_nonneg(&total));
        match (f.left_after_truncated(&gs, &h), composed) {
            (Ok(swept), Ok(want)) => {
                for x in grid(40, 4).into_iter().chain([q(97), qf(1001, 3), q(5000)]) {
                    prop_assert_eq!(swept.eval(&x), want.eval(&x), "at {} f={:?} gs={:?} h={}", x, f, gs, h);
                    prop_assert_eq!(swept.eval_right(&x), want.eval_right(&x));
                    if x.is_positive() {
                        prop_assert_eq!(swept.eval_left(&x), want.eval_left(&x));
                    }
                }
                prop_assert_eq!(swept.rate(), want.rate());
            }
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (a, b) => prop_assert!(false, "one sweep {:?} against composed {:?}", a, b),
        }
    }

    #[test]
    fn convolution_matches_definition(seed in any::<u64>()) {
        let mut r = Rng(seed);
        let m1 = seed % 2 == 0; let f = random_curve(&mut r, m1);
        let m2 = seed % 3 == 0; let g = random_curve(&mut r, m2);
        let h = f.conv(&g);
        prop_assume!(h != Err(rtc::CurveError::TooComplex));
        let h = h.unwrap();
        let (bf, bg) = (Brute::of(&f), Brute::of(&g));
        for t in grid(30, 4) {
            prop_assert_eq!(h.eval(&t), brute_conv(&bf, &bg, &t), "t={} f={:?} g={:?} h={:?}", t, f, g, h);
        }
        let m = f.maxplus_conv(&g);
        prop_assume!(m != Err(rtc::CurveError::TooComplex));
        let m = m.unwrap();
        let (nf, ng) = (Brute::of(&f.neg()), Brute::of(&g.neg()));
        for t in grid(20, 4) {
            prop_assert_eq!(m.eval(&t), -brute_conv(&nf, &ng, &t));
        }
    }

    #[test]
    fn deconvolution_matches_definition(seed in any::<u64>()) {
        let mut r = Rng(seed);
        let f = random_curve(&mut r, true);
        let g = random_curve(&mut r, true);
        let (f, g) = if f.rate() <= g.rate() { (f, g) } else { (g, f) };
        let h = f.deconv(&g);
        prop_assume!(h != Err(rtc::CurveError::TooComplex));
        let h = h.unwrap();
        let (bf, bg) = (Brute::of(&f), Brute::of(&g));
        for t in grid(25, 4) {
            prop_assert_eq!(h.eval(&t), brute_deconv(&bf, &bg, &t, &q(60)), "t={} f={:?} g={:?} h={:?}", t, f, g, h);
        }
    }

    #[test]
    fn deconvolution_general_curves(seed in any::<u64>()) {
        let mut r = Rng(seed);
        let f = random_curve(&mut r, false);
        let g = random_curve(&mut r, false);
        if f.rate() <= g.rate() {
            let h = f.deconv(&g).unwrap();
            let (bf, bg) = (Brute::of(&f), Brute::of(&g));
            for t in grid(20, 4) {
                prop_assert_eq!(h.eval(&t), brute_deconv(&bf, &bg, &t, &q(80)), "t={} f={:?} g={:?}", t, f, g);
            }
        } else {
            prop_assert!(f.deconv(&g).is_err());
        }
    }

    #[test]
    fn closures(seed in any::<u64>()) {
        let mut r = Rng(seed);
        let f = random_curve(&mut r, false);
        // A truncated curve ends in one line (its running maximum is then built in one scan).
        let f = if r.int(0, 2) == 0 { f.truncate_above(&q(r.int(1, 15))).unwrap() } else { f };
        let b = Brute::of(&f);
        let m = f.running_max().unwrap();
        for t in grid(25, 4) {
            let mut best = b.val(&Q::zero());
            for x in b.breakpoints(&t).into_iter().chain([t.clone()]) {
                best = Q::max(&best, &b.val(&x));
                if x.is_positive() { best = Q::max(&best, &b.left(&x)); }
                if x < t { best = Q::max(&best, &b.right(&x)); }
            }
            prop_assert_eq!(m.eval(&t), best, "t={} f={:?}", t, f);
        }
    }

    #[test]
    fn deviations(seed in any::<u64>()) {
        let mut r = Rng(seed);
        let f = random_curve(&mut r, true);
        let g = random_curve(&mut r, true);
        let bg = Brute::of(&g);
        // The backlog of `f` and of its staircase (then scanned at its breakpoints only).
        for f in [f.clone(), staircase_of(&f)] {
            let bf = Brute::of(&f);
            match f.vdev(&g) {
                Ok(v) => {
                    // Never below any sampled difference, and attained at some breakpoint.
                    let mut best: Option<Q> = None;
                    let h = q(80);
                    let mut pts = bf.breakpoints(&h);
                    pts.extend(bg.breakpoints(&h));
                    for x in pts {
                        for d in [bf.val(&x) - bg.val(&x), bf.right(&x) - bg.right(&x), bf.left(&x) - bg.left(&x)] {
                            prop_assert!(d <= v, "vdev {} below {} at {}", v, d, x);
                            if best.as_ref().is_none_or(|b| &d > b) { best = Some(d); }
                        }
                    }
                    prop_assert_eq!(best.unwrap(), v);
                }
                Err(_) => prop_assert!(f.rate() > g.rate() || (f.rate() == g.rate() && f.rate().is_positive())),
            }
        }
        // The delay of `f` and of its staircase (every piece made flat; `hdev` then scans the
        // demand's levels only).
        for f in [f.clone(), staircase_of(&f)] {
            let bf = Brute::of(&f);
            match f.hdev(&g) {
                Ok(dl) => {
                    // f(t) <= g(t + d) everywhere sampled, and no smaller shift works.
                    let eps = qf(1, 64);
                    let mut tight = false;
                    let mut ts = grid(40, 8);
                    ts.extend(bf.breakpoints(&q(40)));
                    // Where f crosses a level at which g jumps or bends, the supremum is approached
                    // just after the crossing: sample there too.
                    let mut levels = Vec::new();
                    for x in bg.breakpoints(&q(60)) {
                        levels.extend([bg.val(&x), bg.left(&x), bg.right(&x)]);
                    }
                    for x in bf.breakpoints(&q(40)) {
                        let (r0, nx) = (bf.right(&x), x.clone() + qf(1, 1_000_000));
                        let slope = (bf.val(&nx) - &r0) / qf(1, 1_000_000);
                        if slope.is_positive() {
                            for l in &levels {
                                let tc = &x + (l - &r0) / &slope;
                                if tc >= x && tc < q(40) { ts.push(tc.clone()); ts.push(tc + &eps / q(4)); }
                            }
                        }
                    }
                    for t in &ts {
                        // The infimum need not be attained: compare with the right limit.
                        prop_assert!(bf.val(t) <= bg.right(&(t + &dl)), "f({})={} > g({}+)", t, bf.val(t), t + &dl);
                        prop_assert!(bf.right(t) <= bg.right(&(t + &dl)));
                        if dl.is_positive() {
                            let d2 = &dl - &eps;
                            let d2 = if d2.is_negative() { Q::zero() } else { d2 };
                            if bf.val(t) > bg.val(&(t + &d2)) || bf.right(t) > bg.right(&(t + &d2)) { tight = true; }
                        }
                    }
                    prop_assert!(dl.is_zero() || tight, "hdev {} not tight f={:?} g={:?}", dl, f, g);
                }
                Err(_) => prop_assert!(f.rate() > g.rate() || g.rate().is_zero()),
            }
        }
    }
}

#[test]
fn staircase_delay_examples() {
    // Periodic events every 4 with 1 unit of work each, full processor: delay 1, backlog 1.
    let demand = Curve::from_parts(vec![Seg::new(q(0), q(0), q(1), q(0))], q(0), q(4), q(1)).unwrap();
    let full = Curve::rate_latency(q(1), q(0));
    assert_eq!(demand.hdev(&full).unwrap(), q(1));
    assert_eq!(demand.vdev(&full).unwrap(), q(1));
    // Behind a latency of 3: delay 4.
    let rl = Curve::rate_latency(q(1), q(3));
    assert_eq!(demand.hdev(&rl).unwrap(), q(4));
    assert_eq!(demand.busy_window(&rl).unwrap(), q(4));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    #[test]
    fn running_min_ahead_matches_definition(seed in any::<u64>()) {
        let mut r = Rng(seed);
        let f = random_curve(&mut r, false);
        let b = Brute::of(&f);
        match f.running_min_ahead() {
            Ok(m) => {
                // inf over [t, t + 200]: enough, the curve does not decrease in the long run.
                for t in grid(25, 4) {
                    let h = &t + q(200);
                    let mut best = b.val(&t);
                    for x in b.breakpoints(&h).into_iter().filter(|x| x >= &t) {
                        best = Q::min(&best, &b.val(&x));
                        if x > t { best = Q::min(&best, &b.left(&x)); }
                        best = Q::min(&best, &b.right(&x));
                    }
                    best = Q::min(&best, &b.right(&t));
                    prop_assert_eq!(m.eval(&t), best, "t={} f={:?} m={:?}", t, f, m);
                }
            }
            Err(_) => prop_assert!(f.rate().is_negative()),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    /// The affine bounds (least and greatest `f(t) − rate·t`) and the lower offset from a time
    /// on are the extremes of the offsets at every breakpoint over one period after the
    /// transient (values and one-sided limits, read with `eval`): a piecewise-linear offset has
    /// its extremes there, and it repeats from `T` on.
    #[test]
    fn affine_bounds_are_the_extreme_offsets_at_the_breakpoints(seed in any::<u64>()) {
        let mut r = Rng(seed);
        let mono = r.int(0, 1) == 1;
        let f = random_curve(&mut r, mono);
        let rate = f.rate();
        let end = f.periodic_start() + f.period();
        let from = qf(r.int(0, 40), 2);
        let mut xs: Vec<Q> = f.segments().iter().map(|s| s.x.clone()).chain([end.clone(), from.clone()]).collect();
        // Breakpoints after `from` that lie beyond the first period (`from` may be later).
        let periods = (&from / f.period()).ceil() + q(1);
        let mut k = q(1);
        while k <= periods {
            let shift = &k * f.period();
            xs.extend(f.segments().iter().filter(|s| &s.x >= f.periodic_start()).map(|s| &s.x + &shift));
            k = k + q(1);
        }
        let offsets = |x: &Q| {
            let mut v = vec![f.eval(x) - &rate * x, f.eval_right(x) - &rate * x];
            if x.is_positive() {
                v.push(f.eval_left(x) - &rate * x);
            }
            v
        };
        let all: Vec<Q> = xs.iter().filter(|x| *x <= &end).flat_map(offsets).collect();
        let want = (all.iter().min().unwrap().clone(), all.iter().max().unwrap().clone());
        prop_assert_eq!(f.affine_bounds(), want, "{:?}", f);
        // From `from` on: the value and the right limit at `from`, then everything after it.
        let mut after: Vec<Q> = xs.iter().filter(|x| *x > &from).flat_map(offsets).collect();
        after.extend([f.eval(&from) - &rate * &from, f.eval_right(&from) - &rate * &from]);
        prop_assert_eq!(f.affine_lower_from(&from), after.iter().min().unwrap().clone(), "{:?} from {}", f, from);
    }

    /// The delay found at levels below Y0 = g(h⁻) is the same on a service truncated at h
    /// (`truncate_below`) and on the service itself, and when it is the whole delay on the
    /// truncated service, that delay is the exact one (the shortcut of `FpState::step`).
    #[test]
    fn a_delay_attained_below_the_truncation_level_is_exact(seed in any::<u64>()) {
        let mut r = Rng(seed);
        let f = staircase_of(&random_curve(&mut r, true));
        let g = random_curve(&mut r, true);
        let h = qf(r.int(1, 40), 2);
        let (Ok(exact), Ok(gh)) = (f.hdev(&g), g.truncate_below(&h)) else { return Ok(()) };
        let y0 = g.eval_left(&h);
        let (Ok((d, below)), Ok((de, below_exact))) = (f.hdev_and_below(&gh, Some(&y0)), f.hdev_and_below(&g, Some(&y0))) else {
            return Ok(());
        };
        prop_assert_eq!(&de, &exact);
        prop_assert_eq!(&d, &f.hdev(&gh).unwrap());
        prop_assert!(d >= exact, "truncated {} below exact {}", d, exact);
        prop_assert_eq!(&below, &below_exact, "f={:?} g={:?} h={}", f, g, h);
        if below.as_ref() == Some(&d) {
            prop_assert_eq!(&d, &exact, "f={:?} g={:?} h={}", f, g, h);
        }
    }

    /// Truncation keeps the curve on [0, h) and only ever moves it up (`truncate_above`) or down
    /// (`truncate_below`, which also stays non-decreasing when the curve is), values and
    /// one-sided limits.
    #[test]
    fn truncation_is_exact_before_the_horizon_and_safe_after(seed in any::<u64>()) {
        let mut r = Rng(seed);
        let mono = r.int(0, 1) == 1;
        let f = random_curve(&mut r, mono);
        let h = qf(r.int(1, 40), 2);
        let (up, lo) = (f.truncate_above(&h).unwrap(), f.truncate_below(&h).unwrap());
        if mono {
            prop_assert!(lo.is_nondecreasing(), "{:?} -> {:?}", f, lo);
        }
        // The lower line from h on holds there and is no worse than the global one.
        let m = f.affine_lower_from(&h);
        prop_assert!(m >= f.affine_bounds().0);
        for x in grid(60, 8).into_iter().filter(|x| x >= &h) {
            prop_assert!(f.eval(&x) - f.rate() * &x >= m, "{:?} from {}: {} at {}", f, h, m, x);
            prop_assert!(f.eval_right(&x) - f.rate() * &x >= m, "{:?} from {}: {} at {}", f, h, m, x);
        }
        prop_assert_eq!(up.rate(), f.rate());
        prop_assert_eq!(lo.rate(), f.rate());
        for x in grid(60, 8) {
            let v = [(f.eval(&x), up.eval(&x), lo.eval(&x)), (f.eval_right(&x), up.eval_right(&x), lo.eval_right(&x))];
            for (fv, uv, lv) in v {
                if x < h {
                    prop_assert_eq!(&uv, &fv, "above at {}: {:?} -> {:?}", x, f, up);
                    prop_assert_eq!(&lv, &fv, "below at {}: {:?} -> {:?}", x, f, lo);
                } else {
                    prop_assert!(uv >= fv, "above at {}: {:?} -> {:?}", x, f, up);
                    prop_assert!(lv <= fv, "below at {}: {:?} -> {:?}", x, f, lo);
                }
            }
            if x <= h {
                prop_assert_eq!(up.eval_left(&x), f.eval_left(&x));
                prop_assert_eq!(lo.eval_left(&x), f.eval_left(&x));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    /// `vdev_before`: the largest difference (values and one-sided limits, the left limit at `h`
    /// included) at the breakpoints of both curves before `h`, never above `vdev`.
    #[test]
    fn vertical_deviation_before_a_horizon(seed in any::<u64>()) {
        let mut r = Rng(seed);
        let (mono_f, mono_g) = (r.int(0, 1) == 1, r.int(0, 1) == 1);
        let f = random_curve(&mut r, mono_f);
        // A staircase `f` on a non-decreasing `g` is scanned at `f`'s breakpoints only.
        let f = if r.int(0, 1) == 1 { staircase_of(&f) } else { f };
        let g = random_curve(&mut r, mono_g);
        let h = qf(r.int(1, 60), 2);
        let (bf, bg) = (Brute::of(&f), Brute::of(&g));
        let got = f.vdev_before(&g, &h).unwrap();
        let mut pts: Vec<Q> = bf.breakpoints(&h).into_iter().chain(bg.breakpoints(&h)).filter(|x| x < &h).collect();
        pts.push(h.clone());
        let mut best: Option<Q> = None;
        for x in pts {
            let mut ds = vec![bf.left(&x) - bg.left(&x)];
            if x < h {
                ds.extend([bf.val(&x) - bg.val(&x), bf.right(&x) - bg.right(&x)]);
            }
            for d in ds {
                if best.as_ref().is_none_or(|b| &d > b) { best = Some(d); }
            }
        }
        prop_assert_eq!(&got, &best.unwrap(), "{:?} {:?} before {}", f, g, h);
        if let Ok(v) = f.vdev(&g) {
            prop_assert!(got <= v);
        }
        prop_assert!(f.vdev_before(&g, &Q::zero()).is_err());
    }
}
