//! Builders shared by the cross-check tests.
#![allow(dead_code)]

use rtc::models::{EventModel, SupplyModel};
use rtc::q::q;
use rtc::system::*;
use rtc::Q;

pub use rtc::synthetic::Rng;

/// Periods with a small common multiple (120), as real task sets tend to have.
pub const PERIODS: [i64; 11] = [4, 5, 6, 8, 10, 12, 15, 20, 24, 30, 40];

/// One task of a single-resource task set: (wcet, bcet, period, jitter, deadline).
#[derive(Clone, Debug)]
pub struct T {
    pub c: i64,
    pub b: i64,
    pub p: i64,
    pub j: i64,
    pub d: i64,
}

/// Random task set with total utilisation at most `umax` (percent); tasks in priority order.
pub fn random_taskset(r: &mut Rng, n: usize, umax: i64, jitter: bool) -> Vec<T> {
    loop {
        let mut ts = Vec::new();
        let mut u = 0.0;
        for _ in 0..n {
            let p = r.pick(&PERIODS);
            let c = r.int(1, (p / 3).max(1));
            let b = r.int(0, c);
            let j = if jitter { r.int(0, p + p / 2) } else { 0 };
            u += c as f64 / p as f64;
            ts.push(T { c, b, p, j, d: p });
        }
        if u * 100.0 <= umax as f64 {
            return ts;
        }
    }
}

/// A system with the task set on one resource of the given kind and policy.
pub fn single_resource(ts: &[T], kind: ResourceKind, policy: Policy) -> System {
    let mut sys = System::default();
    sys.resources.push(Resource { blackout: None, name: "cpu".into(), kind, policy, cycle: None });
    for (i, t) in ts.iter().enumerate() {
        sys.streams.push(Stream {
            name: format!("s{i}"),
            model: if t.j == 0 {
                EventModel::Periodic { period: q(t.p) }
            } else {
                EventModel::Pjd { period: q(t.p), jitter: q(t.j), min_distance: q(0) }
            },
        });
        sys.tasks.push(Task {
            hold: None,
            name: format!("t{i}"),
            resource: 0,
            input: Input::Stream(i),
            wcet: q(t.c),
            bcet: q(t.b),
            priority: Some(i as i64),
            deadline: Some(q(t.d)),
            slot: None,
            workload: None,
        });
    }
    sys
}

pub fn dedicated() -> ResourceKind {
    ResourceKind::Dedicated { rate: q(1) }
}

pub fn reservation(host: usize, budget: i64, period: i64) -> ResourceKind {
    ResourceKind::Reservation { host, budget: q(budget), period: q(period), supply: SupplyModel::WorstCase }
}

pub fn int(v: &Q) -> i64 {
    v.to_i64().unwrap_or_else(|| panic!("{v} is not an integer"))
}
