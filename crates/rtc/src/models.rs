//! Event models (arrival curves) and resource models (service curves).
//!
//! Arrival curves count events in any half-open window of length Δ (`α(0) = 0`); service
//! curves give the work a resource can (upper) or must (lower) provide in any window of length
//! Δ. Workload is a constant best/worst-case demand per event, applied by scaling
//! (see [`demand`]).

use crate::curve::{Curve, CurveError, Seg};
use crate::q::Q;

/// Errors in model parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Curve(#[from] CurveError),
}

type Result<T> = std::result::Result<T, ModelError>;

fn need(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(ModelError::Invalid(msg()))
    }
}

/// How events arrive.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventModel {
    /// Exactly one event every `period`.
    Periodic { period: Q },
    /// Periodic with release jitter and a minimum distance between events (0 = none).
    Pjd { period: Q, jitter: Q, min_distance: Q },
    /// At least `min_distance` between events, no lower rate.
    Sporadic { min_distance: Q },
    /// Token bucket: up to `burst` events at once, refilled one per `period`, events at least
    /// `min_distance` apart (0 = none). No lower rate.
    Bursty { period: Q, burst: i64, min_distance: Q },
    /// Curves measured from a recorded trace of arrival times (sorted), exact for windows up to
    /// `window` and extended beyond by sub-/super-additivity.
    Trace { times: Vec<Q>, window: Option<Q> },
}

/// `⌈Δ / p⌉`.
fn ceil_staircase(p: &Q) -> Curve {
    Curve::from_parts(vec![Seg::new(Q::zero(), Q::zero(), Q::one(), Q::zero())], Q::zero(), p.clone(), Q::one())
        .unwrap_or_else(|_| Curve::zero())
}

/// `⌊Δ / p⌋`.
fn floor_staircase(p: &Q) -> Curve {
    Curve::from_parts(vec![Seg::line(Q::zero(), Q::zero(), Q::zero())], Q::zero(), p.clone(), Q::one()).unwrap_or_else(|_| Curve::zero())
}

impl EventModel {
    /// Upper and lower arrival curves.
    pub fn curves(&self) -> Result<(Curve, Curve)> {
        match self {
            EventModel::Periodic { period } => {
                need(period.is_positive(), || format!("period must be positive, got {period}"))?;
                Ok((ceil_staircase(period), floor_staircase(period)))
            }
            EventModel::Pjd { period, jitter, min_distance } => {
                need(period.is_positive(), || format!("period must be positive, got {period}"))?;
                need(!jitter.is_negative(), || format!("jitter must not be negative, got {jitter}"))?;
                need(!min_distance.is_negative(), || format!("min_distance must not be negative, got {min_distance}"))?;
                need(min_distance <= period, || format!("min_distance {min_distance} exceeds the period {period}"))?;
                let mut up = ceil_staircase(period).shift_left(jitter).with_value_at_zero(&Q::zero());
                if min_distance.is_positive() {
                    up = up.min(&ceil_staircase(min_distance))?;
                }
                let lo = floor_staircase(period).shift_right(jitter, &Q::zero());
                Ok((up, lo))
            }
            EventModel::Sporadic { min_distance } => {
                need(min_distance.is_positive(), || format!("min_distance must be positive, got {min_distance}"))?;
                Ok((ceil_staircase(min_distance), Curve::zero()))
            }
            EventModel::Bursty { period, burst, min_distance } => {
                need(period.is_positive(), || format!("period must be positive, got {period}"))?;
                need(*burst >= 1, || format!("burst must be at least 1, got {burst}"))?;
                need(!min_distance.is_negative(), || format!("min_distance must not be negative, got {min_distance}"))?;
                let mut up = ceil_staircase(period).offset(&Q::int(burst - 1)).with_value_at_zero(&Q::zero());
                if min_distance.is_positive() {
                    up = up.min(&ceil_staircase(min_distance))?;
                }
                Ok((up, Curve::zero()))
            }
            EventModel::Trace { times, window } => trace_curves(times, window.as_ref()),
        }
    }

    /// Long-run events per time unit.
    pub fn rate(&self) -> Result<Q> {
        Ok(self.curves()?.0.rate())
    }
}

/// The arrival curves of many event models, each distinct model's built once.
///
/// Systems often give many streams the same model (a 10 ms period, say): this owns the curves
/// built so far, keyed by model, and hands out copies that share their segments (a [`Curve`]
/// keeps them behind an `Arc`). A model whose curves cannot be built is not remembered; asking
/// again gives the same error.
#[derive(Debug, Default)]
pub struct CurveCache {
    built: std::collections::HashMap<EventModel, (Curve, Curve)>,
}

impl CurveCache {
    pub fn new() -> CurveCache {
        CurveCache::default()
    }

    /// [`EventModel::curves`] of `model`, built on the first request for an equal model.
    pub fn curves(&mut self, model: &EventModel) -> Result<(Curve, Curve)> {
        if let Some(c) = self.built.get(model) {
            return Ok(c.clone());
        }
        let c = model.curves()?;
        self.built.insert(model.clone(), c.clone());
        Ok(c)
    }
}

fn trace_curves(times: &[Q], window: Option<&Q>) -> Result<(Curve, Curve)> {
    need(times.len() >= 2, || format!("a trace needs at least 2 arrival times, got {}", times.len()))?;
    if let Some(i) = times.windows(2).position(|w| w[1] < w[0]) {
        return Err(ModelError::Invalid(format!("trace times must not decrease (entry {} is {} after {})", i + 2, times[i + 1], times[i])));
    }
    let n = times.len();
    let span = &times[n - 1] - &times[0];
    need(span.is_positive(), || "a trace must span a positive time".into())?;
    let w = match window {
        Some(w) => {
            need(w.is_positive() && w <= &span, || format!("trace window must be in (0, {span}], got {w}"))?;
            w.clone()
        }
        None => &span / &Q::int(2),
    };
    // Upper: αu(Δ) = max{k : m_k < Δ}, m_k the shortest span of k consecutive events.
    let mut ups: Vec<(Q, i64)> = Vec::new(); // (m_k, k) for k >= 2 with m_k < w
    for k in 2..=n {
        let m = (0..=n - k).map(|i| &times[i + k - 1] - &times[i]).min().unwrap_or_default();
        if m >= w {
            break;
        }
        ups.push((m, k as i64));
    }
    let mut segs = vec![Seg::new(Q::zero(), Q::zero(), Q::one(), Q::zero())];
    for (m, k) in &ups {
        if m.is_zero() {
            // Simultaneous events: k arrive in any window of positive length.
            segs[0].yr = Q::int(*k);
            continue;
        }
        match segs.last_mut() {
            Some(last) if &last.x == m => last.yr = Q::int(*k),
            _ => {
                let before = segs.last().map(|s| s.yr.clone()).unwrap_or_default();
                segs.push(Seg::new(m.clone(), before, Q::int(*k), Q::zero()));
            }
        }
    }
    let top = segs.last().map(|s| s.yr.clone()).unwrap_or_default();
    let upper = Curve::from_parts(segs, Q::zero(), w.clone(), top)?;
    // Lower: αl(Δ) = max{k : M_k <= Δ}, M_k the longest span of k+1 consecutive events.
    let mut segs = vec![Seg::line(Q::zero(), Q::zero(), Q::zero())];
    for k in 1..n {
        let m = (0..n - k).map(|i| &times[i + k] - &times[i]).max().unwrap_or_default();
        if m >= w {
            break;
        }
        match segs.last_mut() {
            Some(last) if last.x == m => {
                last.y = Q::int(k as i64);
                last.yr = Q::int(k as i64);
            }
            _ => segs.push(Seg::line(m, Q::int(k as i64), Q::zero())),
        }
    }
    let lo_top = segs.last().map(|s| s.yr.clone()).unwrap_or_default();
    // αl(w) itself: largest k with M_k <= w.
    let at_w = (1..n).take_while(|k| (0..n - k).map(|i| &times[i + k] - &times[i]).max().unwrap_or_default() <= w).count();
    let lower = Curve::from_parts(segs, Q::zero(), w, Q::max(&lo_top, &Q::int(at_w as i64)))?;
    Ok((upper, lower))
}

/// Which supply a reservation's tasks may assume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SupplyModel {
    /// Any phasing: the budget may come at the start of one period and the end of the next
    /// (longest blackout 2(P − Q)).
    WorstCase,
    /// The reservation's periods start with the task releases, so the longest blackout is
    /// P − Q (valid only for tasks released synchronously with the reservation).
    Synchronous,
}

impl SupplyModel {
    pub fn name(&self) -> &'static str {
        match self {
            SupplyModel::WorstCase => "worst-case",
            SupplyModel::Synchronous => "release-synchronous",
        }
    }

    /// The convention the model assumes about where the budget comes in each period.
    pub fn convention(&self) -> &'static str {
        match self {
            SupplyModel::WorstCase => {
                "budget anywhere in each period (at the start of one and the end of the next: longest blackout 2(P - Q))"
            }
            SupplyModel::Synchronous => "periods start with the task releases, budget at the end of each period (longest blackout P - Q)",
        }
    }
}

/// Service of a dedicated resource: `rate · Δ` (upper, lower).
pub fn dedicated(rate: &Q) -> (Curve, Curve) {
    let c = Curve::rate_latency(rate.clone(), Q::zero());
    (c.clone(), c)
}

/// Service with rate `rate` after at most `latency`.
pub fn bounded_delay(rate: &Q, latency: &Q) -> (Curve, Curve) {
    (Curve::rate_latency(rate.clone(), Q::zero()), Curve::rate_latency(rate.clone(), latency.clone()))
}

/// A TDMA slot of length `slot` in every `cycle`, at `rate` while in the slot.
pub fn tdma(slot: &Q, cycle: &Q, rate: &Q) -> Result<(Curve, Curve)> {
    need(cycle.is_positive(), || format!("TDMA cycle must be positive, got {cycle}"))?;
    need(slot.is_positive() && slot <= cycle, || format!("TDMA slot must be in (0, {cycle}], got {slot}"))?;
    if slot == cycle {
        return Ok(dedicated(rate));
    }
    let top = rate * slot;
    let upper = Curve::from_parts(
        vec![Seg::line(Q::zero(), Q::zero(), rate.clone()), Seg::line(slot.clone(), top.clone(), Q::zero())],
        Q::zero(),
        cycle.clone(),
        top.clone(),
    )?;
    let lower = Curve::from_parts(
        vec![Seg::line(Q::zero(), Q::zero(), Q::zero()), Seg::line(cycle - slot, Q::zero(), rate.clone())],
        Q::zero(),
        cycle.clone(),
        top,
    )?;
    Ok((upper, lower))
}

/// Supply of a periodic resource / CBS reservation: `budget` every `period` (upper, lower).
pub fn periodic_resource(budget: &Q, period: &Q, model: SupplyModel) -> Result<(Curve, Curve)> {
    need(period.is_positive(), || format!("reservation period must be positive, got {period}"))?;
    need(budget.is_positive() && budget <= period, || format!("reservation budget must be in (0, {period}], got {budget}"))?;
    if budget == period {
        return Ok(dedicated(&Q::one()));
    }
    let (q, p) = (budget, period);
    let gap = p - q;
    match model {
        SupplyModel::WorstCase => {
            // Lower (Shin & Lee): nothing for 2(P−Q), then Q at rate 1, then P−Q idle, ...
            let lower = Curve::from_parts(
                vec![
                    Seg::line(Q::zero(), Q::zero(), Q::zero()),
                    Seg::line(&gap + &gap, Q::zero(), Q::one()),
                    Seg::line(&gap + &gap + q, q.clone(), Q::zero()),
                ],
                &gap + &gap,
                p.clone(),
                q.clone(),
            )?;
            // Upper: the end of one budget then a whole budget back to back, then the pattern.
            let two_q = q + q;
            let upper = Curve::from_parts(
                vec![
                    Seg::line(Q::zero(), Q::zero(), Q::one()),
                    Seg::line(q.clone(), q.clone(), Q::one()),
                    Seg::line(two_q.clone(), two_q, Q::zero()),
                ],
                q.clone(),
                p.clone(),
                q.clone(),
            )?;
            Ok((upper, lower))
        }
        SupplyModel::Synchronous => {
            // The lower curve relies on windows starting with a period; the upper curve must
            // hold for every window, so it is the worst-case one.
            let (upper, _) = periodic_resource(budget, period, SupplyModel::WorstCase)?;
            let (_, lower) = tdma(q, p, &Q::one())?;
            Ok((upper, lower))
        }
    }
}

/// Workload curves: the most (`upper[k-1]`) and least (`lower[k-1]`) work of any `k`
/// consecutive activations, for `k = 1..=n`; beyond `n` extended by sub-additivity (upper) and
/// super-additivity (lower), which every true workload curve satisfies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadCurve {
    pub upper: Vec<Q>,
    pub lower: Vec<Q>,
}

impl WorkloadCurve {
    /// Checks the curves against the per-activation bounds `wcet` and `bcet`.
    pub fn validate(&self, wcet: &Q, bcet: &Q) -> Result<()> {
        for (name, g, per, up) in [("upper", &self.upper, wcet, true), ("lower", &self.lower, bcet, false)] {
            need(!g.is_empty(), || format!("workload {name} curve is empty"))?;
            need(g.len() <= 10_000, || format!("workload {name} curve has more than 10000 entries"))?;
            need(&g[0] == per, || {
                format!("workload {name} curve must start with the {} ({per}), got {}", if up { "WCET" } else { "BCET" }, g[0])
            })?;
            for (k, w) in g.windows(2).enumerate() {
                need(w[1] >= w[0], || format!("workload {name} curve decreases at {} activations", k + 2))?;
            }
            for (k, v) in g.iter().enumerate() {
                let lim = per * &Q::int(k as i64 + 1);
                need(if up { v <= &lim } else { v >= &lim }, || {
                    format!("workload {name} curve at {} activations is {v}, beyond {} × {per}", k + 1, k + 1)
                })?;
            }
        }
        Ok(())
    }

    /// `γ(k)` for any `k >= 0`.
    fn at(g: &[Q], k: &Q) -> Q {
        let n = Q::int(g.len() as i64);
        let full = (k / &n).floor();
        let rest = k - &(&full * &n);
        let part = rest.to_i64().filter(|r| *r > 0).map(|r| g[(r - 1) as usize].clone()).unwrap_or_default();
        full * &g[g.len() - 1] + part
    }

    /// `γ ∘ α` for an event-count staircase `α` (integer values, flat pieces).
    pub fn compose(&self, events: &Curve, upper: bool) -> Result<Curve> {
        let g = if upper { &self.upper } else { &self.lower };
        let segs = events.segments();
        if segs.iter().any(|s| !s.s.is_zero() || !s.y.is_integer() || !s.yr.is_integer() || s.y.is_negative())
            || !events.increment().is_integer()
        {
            return Err(ModelError::Invalid("workload curves apply to integer event staircases only".into()));
        }
        let n = g.len() as i64;
        let c = events.increment().to_i64().ok_or_else(|| ModelError::Invalid("increment too large".into()))?;
        // Repeat the period until it adds a whole number of workload-curve lengths.
        let m = if c == 0 { 1 } else { n / num_integer::gcd(c, n) };
        let d = events.period() * &Q::int(m);
        let cm = Q::int(c * m);
        let end = events.periodic_start() + &d;
        let base = events.unroll(&end)?;
        let mapped = base.iter().map(|s| Seg::new(s.x.clone(), Self::at(g, &s.y), Self::at(g, &s.yr), Q::zero())).collect();
        let inc = (&cm / &Q::int(n)) * &g[g.len() - 1];
        Ok(Curve::from_parts(mapped, events.periodic_start().clone(), d, inc)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::q::{q, qf};

    #[test]
    fn pjd_curves() {
        let (u, l) = EventModel::Pjd { period: q(10), jitter: q(3), min_distance: q(0) }.curves().unwrap();
        // ⌈(Δ+3)/10⌉ for Δ > 0.
        for (d, want) in [(0, 0), (1, 1), (7, 1), (8, 2), (17, 2), (18, 3)] {
            assert_eq!(u.eval(&q(d)), q(want), "upper at {d}");
        }
        for (d, want) in [(0, 0), (12, 0), (13, 1), (22, 1), (23, 2)] {
            assert_eq!(l.eval(&q(d)), q(want), "lower at {d}");
        }
        let (u, _) = EventModel::Pjd { period: q(10), jitter: q(25), min_distance: q(2) }.curves().unwrap();
        assert_eq!(u.eval(&qf(1, 2)), q(1));
        assert_eq!(u.eval(&q(3)), q(2));
        assert_eq!(u.eval(&q(100)), q(13));
    }

    #[test]
    fn periodic_resource_blackout() {
        let (u, l) = periodic_resource(&q(3), &q(4), SupplyModel::WorstCase).unwrap();
        let want = [0, 0, 0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8];
        for (d, w) in want.iter().enumerate() {
            assert_eq!(l.eval(&q(d as i64)), q(*w), "sbf at {d}");
        }
        assert_eq!(u.eval(&q(6)), q(6));
        assert_eq!(u.eval(&q(7)), q(6));
        let (_, ls) = periodic_resource(&q(3), &q(4), SupplyModel::Synchronous).unwrap();
        assert_eq!(ls.eval(&q(1)), q(0));
        assert_eq!(ls.eval(&q(4)), q(3));
    }

    #[test]
    fn trace_curves_bound_the_trace() {
        let times: Vec<Q> = [0, 10, 20, 25, 40, 50, 60, 70, 75, 90].iter().map(|t| q(*t)).collect();
        let (u, l) = EventModel::Trace { times: times.clone(), window: None }.curves().unwrap();
        assert_eq!(u.eval(&q(0)), q(0));
        assert_eq!(u.eval(&q(1)), q(1));
        assert_eq!(u.eval(&q(6)), q(2)); // 20, 25
                                         // Longest gap is 15 (25 → 40): a window of 15 always holds one event, of 14 not.
        assert_eq!(l.eval(&q(14)), q(0));
        assert_eq!(l.eval(&q(15)), q(1));
        assert!(EventModel::Trace { times: vec![q(1)], window: None }.curves().is_err());
        assert!(EventModel::Trace { times: vec![q(2), q(1)], window: None }.curves().is_err());
    }

    #[test]
    fn cache_gives_each_models_curves() {
        let models = [
            EventModel::Periodic { period: q(10) },
            EventModel::Pjd { period: q(10), jitter: q(3), min_distance: q(1) },
            EventModel::Periodic { period: q(10) },
            EventModel::Periodic { period: q(0) },
            EventModel::Bursty { period: q(7), burst: 3, min_distance: q(2) },
            EventModel::Pjd { period: q(10), jitter: q(3), min_distance: q(1) },
        ];
        let mut cache = CurveCache::new();
        for m in &models {
            assert_eq!(cache.curves(m), m.curves(), "{m:?}");
            assert_eq!(cache.curves(m), m.curves(), "{m:?}, again");
        }
        assert_eq!(cache.built.len(), 3);
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(EventModel::Periodic { period: q(0) }.curves().is_err());
        assert!(EventModel::Pjd { period: q(5), jitter: q(-1), min_distance: q(0) }.curves().is_err());
        assert!(tdma(&q(5), &q(4), &q(1)).is_err());
        assert!(periodic_resource(&q(0), &q(4), SupplyModel::WorstCase).is_err());
    }
}

#[cfg(test)]
mod shift_tests {
    use super::*;
    use crate::q::q;
    #[test]
    fn pjd_shift_left() {
        let (u, _) = EventModel::Pjd { period: q(20), jitter: q(4), min_distance: q(0) }.curves().unwrap();
        println!("u = {u:?}");
        let s = u.shift_left(&q(2));
        println!("s = {s:?}");
        let z = s.with_value_at_zero(&q(0));
        println!("z = {z:?}");
        assert_eq!(z.eval(&q(15)), q(2));
    }
}
