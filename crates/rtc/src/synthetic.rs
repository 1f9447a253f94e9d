//! Synthetic systems for benchmarks: distributed 3-hop chains (task on a processor, message on a
//! shared link, task on another processor), with periods from a set of realistic rates.

use crate::models::EventModel;
use crate::q::Q;
use crate::system::*;

/// Deterministic pseudo-random generator (splitmix64), for synthetic systems and tests.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    /// Uniform in `lo..=hi`.
    pub fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % ((hi - lo + 1).max(1) as u64)) as i64
    }
    /// One element of `v` (which must not be empty).
    pub fn pick<T: Clone>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())].clone()
    }
}

/// Periods in microseconds (1 ms … 100 ms; their least common multiple is 100 ms).
const PERIODS_US: [i64; 8] = [1_000, 2_000, 5_000, 10_000, 20_000, 25_000, 50_000, 100_000];

/// About `tasks` tasks (a multiple of 3): `tasks/3` chains, each a task on one of `tasks/10`
/// processors, a message on one of `tasks/100` links (100 Mbit/s, fixed-priority frames as with 802.1Q classes) and a task on another
/// processor. Priorities are rate-monotonic per processor; per-processor utilisation stays below
/// about 60 % and per-link below about 30 %, so every chain has a finite bound.
pub fn distributed_chains(tasks: usize, seed: u64) -> System {
    let chains = (tasks / 3).max(1);
    let procs = (tasks / 10).max(2);
    let links = (tasks / 100).max(1);
    let mut r = Rng(seed);
    let mut sys = System::default();
    for p in 0..procs {
        sys.resources.push(Resource {
            blackout: None,
            name: format!("cpu{p}"),
            kind: ResourceKind::Dedicated { rate: Q::one() },
            policy: Policy::FixedPriority,
            cycle: None,
        });
    }
    // 100 Mbit/s = 12.5 bytes per microsecond.
    let bw = Q::new(25, 2).unwrap_or_else(Q::one);
    for l in 0..links {
        sys.resources.push(Resource {
            blackout: None,
            name: format!("link{l}"),
            kind: ResourceKind::Dedicated { rate: bw.clone() },
            policy: Policy::FixedPriority,
            cycle: None,
        });
    }
    let per_proc = (2 * chains).div_ceil(procs) as i64;
    let per_link = chains.div_ceil(links) as i64;
    for c in 0..chains {
        let period = PERIODS_US[r.below(PERIODS_US.len())];
        sys.streams.push(Stream { name: format!("s{c}"), model: EventModel::Periodic { period: Q::int(period) } });
        let p1 = r.below(procs);
        let p2 = (p1 + 1 + r.below(procs - 1)) % procs;
        let link = procs + r.below(links);
        // Utilisation per task ~ 0.6 / per_proc; per message ~ 0.3 / per_link.
        let wcet = (period * 6 / 10 / per_proc.max(1)).max(1) * (50 + r.below(50) as i64) / 100;
        let bytes_max = (period as f64 * 12.5 * 0.3 / per_link.max(1) as f64) as i64;
        let bytes = bytes_max.clamp(64, 1500) * (50 + r.below(50) as i64) / 100;
        let base = sys.tasks.len();
        let prio = |p: i64| p * 1000 + (c as i64 % 1000);
        sys.tasks.push(Task {
            hold: None,
            name: format!("c{c}.sense"),
            resource: p1,
            input: Input::Stream(c),
            wcet: Q::int(wcet.max(1)),
            bcet: Q::int(wcet.max(2) / 2),
            priority: Some(prio(period)),
            deadline: None,
            slot: None,
            workload: None,
        });
        sys.tasks.push(Task {
            hold: None,
            name: format!("c{c}.msg"),
            resource: link,
            input: Input::Task(base),
            wcet: Q::int(bytes.max(64)),
            bcet: Q::int(64),
            priority: Some(prio(period)),
            deadline: None,
            slot: None,
            workload: None,
        });
        sys.tasks.push(Task {
            hold: None,
            name: format!("c{c}.act"),
            resource: p2,
            input: Input::Task(base + 1),
            wcet: Q::int(wcet.max(1)),
            bcet: Q::int(wcet.max(2) / 2),
            priority: Some(prio(period)),
            deadline: None,
            slot: None,
            workload: None,
        });
        sys.chains.push(Chain { name: format!("c{c}"), tasks: vec![base, base + 1, base + 2], deadline: Some(Q::int(3 * period)) });
    }
    sys
}

/// `tasks` independent tasks, `per_processor` on each processor (preemptive fixed priority,
/// rate-monotonic), periodic or with a jitter of a tenth of the period, periods 1–100 ms,
/// utilisation at most 70 % per processor: the workload of the comparison with pyCPA
/// (`examples/pycpa/compare.py` writes the same kind of system as files for both tools).
pub fn independent_fp(tasks: usize, per_processor: usize, seed: u64) -> System {
    let mut r = Rng(seed);
    let per = per_processor.max(1);
    let procs = tasks.div_ceil(per).max(1);
    let mut sys = System::default();
    for p in 0..procs {
        sys.resources.push(Resource {
            blackout: None,
            name: format!("cpu{p}"),
            kind: ResourceKind::Dedicated { rate: Q::one() },
            policy: Policy::FixedPriority,
            cycle: None,
        });
        let mut periods: Vec<i64> = (0..per).map(|_| r.pick(&PERIODS_US)).collect();
        periods.sort_unstable();
        let mut left = 0.7;
        for (k, &period) in periods.iter().enumerate() {
            let share = left / (per - k) as f64 * (0.5 + 0.5 * (r.below(1000) as f64 / 1000.0));
            let c = ((period as f64 * share) as i64).max(1);
            left -= c as f64 / period as f64;
            let jitter = if r.below(3) == 0 { period / 10 } else { 0 };
            let model = if jitter > 0 {
                EventModel::Pjd { period: Q::int(period), jitter: Q::int(jitter), min_distance: Q::zero() }
            } else {
                EventModel::Periodic { period: Q::int(period) }
            };
            let i = sys.tasks.len();
            sys.streams.push(Stream { name: format!("s{i}"), model });
            sys.tasks.push(Task {
                hold: None,
                name: format!("t{p}_{k}"),
                resource: p,
                input: Input::Stream(i),
                wcet: Q::int(c),
                bcet: Q::int(c),
                priority: Some(k as i64 + 1),
                deadline: None,
                slot: None,
                workload: None,
            });
        }
    }
    sys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_synthetic_system_is_schedulable() {
        let sys = distributed_chains(30, 1);
        assert_eq!(sys.tasks.len(), 30);
        let a = analyze(&sys, &Options::default()).unwrap();
        assert!(a.tasks.iter().all(|t| t.wcrt.is_some()), "{:?}", a.tasks.iter().map(|t| &t.problem).collect::<Vec<_>>());
        assert!(a.chains.iter().all(|c| c.worst.is_some()));
    }
}
