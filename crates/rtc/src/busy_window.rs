//! Fixed-priority preemptive scheduling on a dedicated processor by the busy-window
//! recurrences (Lehoczky, Tindell) instead of curve operations.
//!
//! When every task of such a processor is activated by a standard event model (periodic, PJd,
//! sporadic, bursty) and nothing needs its service curve (no chain through it, no GPC
//! completion curves, no plot), the curve analysis of `network::FpState` computes numbers the
//! classical recurrences give directly, in a few arithmetic operations per activation:
//!
//! - the delay hdev(C·αu, βl) of a task with WCET C on the lower service βl left by the higher
//!   priorities is max over q ≥ 1 of w(q) − a(q), where a(q) is the earliest the q-th
//!   activation can arrive after the first (the pseudo-inverse of αu's right limit) and w(q)
//!   the least fixed point of r·w = q·C + HP(w) (HP: the higher priorities' demand in a
//!   half-open window, r the processor's rate);
//! - the vertical deviation sup (C·αu − βl), which the backlogs are made of, is max over
//!   q ≥ 1 of q·C − βl(a(q)), with βl(t) = max(0, sup over λ ≤ t of r·λ − HP(λ)) attained at t
//!   or at a point where HP jumps.
//!
//! Both maxima are taken over every q until one of two proven stopping rules holds
//! (`docs/analysis.md` §9): the level-i busy window closed (w(q) ≤ a(q + 1); the arrival
//! functions of these models are sub-additive, so every later term is at most an earlier one),
//! or an affine upper bound of every later term is no larger than the maximum so far. The
//! tests compare every delay, backlog and completion curve with the curve analysis on random
//! systems.

use crate::models::EventModel;
use crate::q::Q;

/// The upper arrival curve of a standard event model in closed form: η(0) = 0 and, for Δ > 0,
/// η(Δ) = min(⌈(Δ + J)/P⌉ + B − 1, ⌈Δ/d⌉ if d > 0) — the same function as
/// [`EventModel::curves`] gives (left-continuous: events in a half-open window).
#[derive(Debug, Clone)]
pub(crate) struct Staircase {
    period: Q,
    jitter: Q,
    burst: Q,
    min_distance: Q,
    /// The same parameters when all are integers (times in µs, say): η at an integer time
    /// is then computed in 64-bit integers.
    ints: Option<[i64; 4]>,
}

impl Staircase {
    /// The closed form of `m`'s upper curve (`None`: a trace, or parameters the model rejects).
    pub(crate) fn of(m: &EventModel) -> Option<Staircase> {
        let (period, jitter, burst, min_distance) = match m {
            EventModel::Periodic { period } => (period.clone(), Q::zero(), 1, Q::zero()),
            EventModel::Pjd { period, jitter, min_distance } => {
                if jitter.is_negative() || min_distance.is_negative() || min_distance > period {
                    return None;
                }
                (period.clone(), jitter.clone(), 1, min_distance.clone())
            }
            EventModel::Sporadic { min_distance } => (min_distance.clone(), Q::zero(), 1, Q::zero()),
            EventModel::Bursty { period, burst, min_distance } => {
                if *burst < 1 || min_distance.is_negative() {
                    return None;
                }
                (period.clone(), Q::zero(), *burst, min_distance.clone())
            }
            EventModel::Trace { .. } => return None,
        };
        let ints = match (period.to_i64(), jitter.to_i64(), min_distance.to_i64()) {
            (Some(p), Some(j), Some(d)) => Some([p, j, burst, d]),
            _ => None,
        };
        period.is_positive().then(|| Staircase { period, jitter, burst: Q::int(burst), min_distance, ints })
    }

    /// η(t): activations in a half-open window of length t.
    fn events(&self, t: &Q) -> Q {
        if !t.is_positive() {
            return Q::zero();
        }
        if let (Some([p, j, b, d]), Some(t)) = (self.ints, t.to_i64()) {
            // ⌈x/p⌉ for x > 0 is (x − 1)/p + 1 in integer division.
            let by_period = t.checked_add(j).and_then(|x| ((x - 1) / p).checked_add(b - 1)).and_then(|n| n.checked_add(1));
            let n = match (by_period, d > 0) {
                (Some(n), true) => Some(n.min((t - 1) / d + 1)),
                (n, _) => n,
            };
            if let Some(n) = n {
                return Q::int(n);
            }
        }
        let by_period = ((t + &self.jitter) / &self.period).ceil() + &self.burst - Q::one();
        if self.min_distance.is_positive() {
            Q::min(&by_period, &(t / &self.min_distance).ceil())
        } else {
            by_period
        }
    }

    /// a(q): the earliest the q-th activation (q ≥ 1) arrives after the first, the least
    /// t ≥ 0 where η's right limit reaches q: max(0, (q − B)·P − J, (q − 1)·d).
    fn arrival(&self, q: &Q) -> Q {
        let by_period = (q - &self.burst) * &self.period - &self.jitter;
        let by_distance = (q - Q::one()) * &self.min_distance;
        Q::max(&Q::max(&by_period, &by_distance), &Q::zero())
    }

    /// Long-run activations per time unit, 1/P.
    pub(crate) fn long_run(&self) -> Q {
        self.period.recip().unwrap_or_default()
    }

    /// Long-run rate 1/P and burst J/P + B: η(t) ≤ t/P + J/P + B for every t ≥ 0.
    fn affine(&self) -> (Q, Q) {
        (self.period.recip().unwrap_or_default(), &self.jitter / &self.period + &self.burst)
    }
}

/// The first numbers of a task on the service left by the higher priorities: its delay
/// hdev(C·αu, βl) and the deviation sup (C·αu − βl) (at least 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Deviations {
    pub delay: Q,
    pub vertical: Q,
}

/// Activations looked at per task before giving up (the caller then uses the curves).
const MAX_ACTIVATIONS: u32 = 100_000;
/// Fixed-point steps per activation, and jumps of the higher priorities' demand per task,
/// before giving up.
const MAX_STEPS: u32 = 10_000;
const MAX_JUMPS: u32 = 1_000_000;

/// A dedicated processor of rate `rate` and the tasks analysed on it so far, highest priority
/// first.
#[derive(Debug, Clone)]
pub(crate) struct BusyWindow {
    rate: Q,
    higher: Vec<(Staircase, Q)>,
    /// HP(t) ≤ rho·t + burst for every t ≥ 0.
    rho: Q,
    burst: Q,
}

impl BusyWindow {
    pub(crate) fn new(rate: Q) -> BusyWindow {
        BusyWindow { rate, higher: Vec::new(), rho: Q::zero(), burst: Q::zero() }
    }

    /// HP(t): the higher priorities' demand in a half-open window of length t.
    fn higher_demand(&self, t: &Q) -> Q {
        self.higher.iter().fold(Q::zero(), |acc, (s, c)| acc + s.events(t) * c)
    }

    /// The least w ≥ `from` with rate·w = `work` + HP(w), `from` at most that fixed point
    /// (`None`: not found within [`MAX_STEPS`]).
    fn completion(&self, work: &Q, from: &Q) -> Option<Q> {
        let mut w = Q::max(from, &(work / &self.rate));
        for _ in 0..MAX_STEPS {
            let next = (work + self.higher_demand(&w)) / &self.rate;
            if next == w {
                return Some(w);
            }
            w = next;
        }
        None
    }

    /// The service left to the next task: max(0, (rate − rho)·t − burst) bounds it from below.
    pub(crate) fn lower_line(&self) -> (Q, Q) {
        (&self.rate - &self.rho, self.burst.clone())
    }

    /// The delay and deviation of a task with activations `s` and WCET `wcet` on the service
    /// the higher priorities leave. `None` when the long-run demand with it reaches the rate
    /// (the recurrences do not terminate) or the work limits were hit.
    pub(crate) fn task(&self, s: &Staircase, wcet: &Q) -> Option<Deviations> {
        if !wcet.is_positive() {
            // No demand: no delay and nothing pending (βl is never negative).
            return Some(Deviations { delay: Q::zero(), vertical: Q::zero() });
        }
        let (own_rate, _) = s.affine();
        let spare = &self.rate - &self.rho;
        if &own_rate * wcet >= spare {
            return None;
        }
        // Later terms are bounded by lines of negative slope in q (see the module doc):
        //   w(q) − a(q) ≤ q·(C/spare − P) + burst/spare + B·P + J
        //   q·C − βl(a(q)) ≤ q·(C − spare·P) + spare·(B·P + J) + burst
        let late = &s.burst * &s.period + &s.jitter;
        let delay_line = (wcet / &spare - &s.period, &self.burst / &spare + &late);
        let vertical_line = (wcet - &spare * &s.period, &spare * &late + &self.burst);
        // Jump points of HP (per higher priority: the index of its next activation and when it
        // arrives), for the running supremum of rate·λ − HP(λ).
        let mut cursor: Vec<(Q, Q)> = self.higher.iter().map(|(hs, _)| (Q::int(2), hs.arrival(&Q::int(2)))).collect();
        let mut sup = Q::zero();
        let mut jumps = 0;
        let (mut delay, mut vertical) = (Q::zero(), Q::zero());
        let mut w = Q::zero();
        let mut q = Q::one();
        for _ in 0..MAX_ACTIVATIONS {
            let a = s.arrival(&q);
            let work = &q * wcet;
            w = self.completion(&work, &w)?;
            delay = Q::max(&delay, &(&w - &a));
            // βl(a): the running supremum over the jumps of HP up to a, and a itself.
            loop {
                let next = cursor.iter().enumerate().filter(|(_, (_, at))| at <= &a).min_by(|x, y| x.1 .1.cmp(&y.1 .1)).map(|(j, _)| j);
                let Some(j) = next else { break };
                jumps += 1;
                if jumps > MAX_JUMPS {
                    return None;
                }
                let at = &cursor[j].1;
                sup = Q::max(&sup, &(&self.rate * at - self.higher_demand(at)));
                let k = &cursor[j].0 + Q::one();
                cursor[j].1 = self.higher[j].0.arrival(&k);
                cursor[j].0 = k;
            }
            let beta = Q::max(&sup, &(&self.rate * &a - self.higher_demand(&a)));
            vertical = Q::max(&vertical, &(&work - &beta));
            let q1 = &q + Q::one();
            // The level's busy window closed before the next activation: nothing later is
            // larger (sub-additive arrivals).
            if w <= s.arrival(&q1) {
                return Some(Deviations { delay, vertical });
            }
            let later_delay = &delay_line.0 * &q1 + &delay_line.1;
            let later_vertical = &vertical_line.0 * &q1 + &vertical_line.1;
            if later_delay <= delay && later_vertical <= vertical {
                return Some(Deviations { delay, vertical });
            }
            q = q1;
        }
        None
    }

    /// Adds a task below the ones so far (it becomes a higher priority of the next).
    pub(crate) fn push(&mut self, s: Staircase, wcet: Q) {
        let (rate, burst) = s.affine();
        self.rho = &self.rho + &rate * &wcet;
        self.burst = &self.burst + &burst * &wcet;
        self.higher.push((s, wcet));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::q::{q, qf};

    /// η in 64-bit integers is the rational formula, and falls back to it where the integers
    /// would overflow.
    #[test]
    fn events_in_integers_match_the_rational_formula() {
        let models = [
            EventModel::Periodic { period: q(7) },
            EventModel::Pjd { period: q(10), jitter: q(23), min_distance: q(3) },
            EventModel::Sporadic { min_distance: q(4) },
            EventModel::Bursty { period: q(9), burst: 3, min_distance: q(2) },
            EventModel::Bursty { period: q(9), burst: i64::MAX - 5, min_distance: q(0) },
            EventModel::Pjd { period: q(1), jitter: q(i64::MAX - 1), min_distance: q(0) },
        ];
        for m in &models {
            let s = Staircase::of(m).expect("a standard model");
            let rational = Staircase { ints: None, ..s.clone() };
            for t in [q(0), q(1), q(6), q(7), q(8), q(30), q(1_000_000), q(i64::MAX - 1), qf(15, 2)] {
                assert_eq!(s.events(&t), rational.events(&t), "{m:?} at {t}");
            }
        }
        let curve = EventModel::Pjd { period: q(10), jitter: q(23), min_distance: q(3) }.curves().expect("curves").0;
        let s = Staircase::of(&EventModel::Pjd { period: q(10), jitter: q(23), min_distance: q(3) }).expect("pjd");
        for t in (0..200).map(|t| qf(t, 4)) {
            assert_eq!(s.events(&t), curve.eval(&t), "η = αu at {t}");
        }
    }
}
