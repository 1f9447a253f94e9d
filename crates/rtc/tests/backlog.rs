//! Backlog bounds (the vertical deviation of demand and service) against independent
//! computations: a token-bucket stream on a rate-latency server by hand, fixed priority on a
//! dedicated processor and in a (Q, P) reservation against a brute-force evaluation of the
//! classical formulas on the integer grid, and every policy against the simulator's largest
//! queue, which reaches the bound in the synchronous periodic case (and in the worst budget
//! placement of a reservation, the worst slot phase of TDMA).

mod common;

use common::*;
use rtc::models::EventModel;
use rtc::q::q;
use rtc::system::*;
use sim::gen::{self, ExecMode, JitterMode};
use sim::{simulate, Supply, TaskSpec};

/// The example: a token bucket (5 events at once, then one per 10) with 2 units of work
/// each, on a server of rate 1 after a latency of 10. At 10⁺, 6 events (12 units) have
/// arrived and nothing is served yet; the delay (20) window would count 7 (14 units).
#[test]
fn token_bucket_into_rate_latency_is_tight() {
    let mut sys = System::default();
    sys.resources.push(Resource {
        blackout: None,
        name: "srv".into(),
        kind: ResourceKind::BoundedDelay { rate: q(1), latency: q(10) },
        policy: Policy::FixedPriority,
        cycle: None,
    });
    sys.streams.push(Stream { name: "tb".into(), model: EventModel::Bursty { period: q(10), burst: 5, min_distance: q(0) } });
    sys.tasks.push(Task {
        hold: None,
        name: "t".into(),
        resource: 0,
        input: Input::Stream(0),
        wcet: q(2),
        bcet: q(2),
        priority: Some(0),
        deadline: None,
        slot: None,
        workload: None,
    });
    let a = analyze(&sys, &Options::default()).unwrap();
    assert_eq!(a.tasks[0].wcrt, Some(q(20)));
    assert_eq!(a.tasks[0].backlog, Some(q(6)));
    assert_eq!(a.tasks[0].backlog_work, Some(q(12)));
}

/// αu(Δ) of a PJD stream without minimum distance, at an integer Δ (left-continuous).
fn alpha(t: &T, s: i64) -> i64 {
    if s == 0 {
        0
    } else {
        (s + t.j + t.p - 1).div_euclid(t.p)
    }
}

/// Its right limit at integer Δ: the events of a window closed on the right.
fn alpha_right(t: &T, s: i64) -> i64 {
    (s + t.j).div_euclid(t.p) + 1
}

/// Shin and Lee's supply bound function of a (Q, P) periodic resource, at integer t.
fn sbf(budget: i64, period: i64, t: i64) -> i64 {
    let t1 = t - (period - budget);
    if t1 < 0 {
        return 0;
    }
    let k = t1.div_euclid(period);
    k * budget + (t1 - k * period - (period - budget)).max(0)
}

/// Brute-force backlog of task `i` (events, work) under preemptive fixed priority on a supply
/// `supply(t)`: the service left by higher priorities at integer t is max over s <= t of
/// supply(s) − their demand(s) (with integer parameters the supremum over real s is reached at
/// an integer), and the backlog is max over integer Δ <= h of αu(Δ⁺)·C − βl(Δ) (work) and
/// αu(Δ⁺) − ⌊βl(Δ)/C⌋ (events).
fn brute_backlog(ts: &[T], i: usize, supply: impl Fn(i64) -> i64, h: i64) -> (i64, i64) {
    let mut beta = 0i64;
    let (mut ev, mut work) = (0i64, 0i64);
    for d in 0..=h {
        let hp: i64 = ts[..i].iter().map(|t| t.c * alpha(t, d)).sum();
        beta = beta.max(supply(d) - hp);
        let a = alpha_right(&ts[i], d);
        work = work.max(a * ts[i].c - beta);
        ev = ev.max(a - beta.div_euclid(ts[i].c));
    }
    (ev, work)
}

#[test]
fn fixed_priority_backlogs_equal_brute_force_on_dedicated_processors() {
    let mut r = Rng(81);
    let mut tighter = 0;
    for k in 0..400 {
        let n = r.int(1, 5) as usize;
        let ts = random_taskset(&mut r, n, 92, k % 2 == 1);
        let sys = single_resource(&ts, dedicated(), Policy::FixedPriority);
        let a = analyze(&sys, &Options::default()).unwrap();
        for i in 0..n {
            let (ev, work) = brute_backlog(&ts, i, |t| t, 4000);
            assert_eq!(a.tasks[i].backlog, Some(q(ev)), "events, task {i} of {ts:?}");
            assert_eq!(a.tasks[i].backlog_work, Some(q(work)), "work, task {i} of {ts:?}");
            // The former bound: the activations of one WCRT window.
            let by_wcrt = alpha_right(&ts[i], int(a.tasks[i].wcrt.as_ref().unwrap()));
            assert!(ev <= by_wcrt);
            tighter += usize::from(ev < by_wcrt);
        }
    }
    assert!(tighter > 50, "only {tighter} tasks have a backlog below the WCRT window's");
}

#[test]
fn fixed_priority_backlogs_equal_brute_force_in_reservations() {
    let mut r = Rng(82);
    let mut checked = 0;
    for k in 0..600 {
        let period = r.pick(&[2i64, 3, 4, 5, 6]);
        let budget = r.int(1, period);
        let n = r.int(1, 4) as usize;
        let ts = random_taskset(&mut r, n, 90 * budget / period, k % 2 == 1);
        let mut sys = single_resource(&ts, reservation(1, budget, period), Policy::FixedPriority);
        sys.resources.push(Resource { blackout: None, name: "host".into(), kind: dedicated(), policy: Policy::FixedPriority, cycle: None });
        let a = analyze(&sys, &Options::default()).unwrap();
        for i in 0..n {
            let (ev, work) = brute_backlog(&ts, i, |t| sbf(budget, period, t), 6000);
            assert_eq!(a.tasks[i].backlog, Some(q(ev)), "events, task {i} of {ts:?} in ({budget}, {period})");
            assert_eq!(a.tasks[i].backlog_work, Some(q(work)), "work, task {i} of {ts:?} in ({budget}, {period})");
            checked += 1;
        }
    }
    assert!(checked > 1000, "{checked}");
}

fn sync_specs(ts: &[T], offset: i64, horizon: i64) -> Vec<TaskSpec> {
    ts.iter()
        .enumerate()
        .map(|(i, t)| {
            let rel = gen::periodic(t.p, offset, horizon);
            TaskSpec::new(i as i64, t.d, &rel, &vec![t.c; rel.len()])
        })
        .collect()
}

/// Synchronous periodic release with every job at its WCET reaches every fixed-priority backlog
/// exactly, in events and in work, on a dedicated processor.
#[test]
fn simulator_reaches_fixed_priority_backlogs() {
    let mut r = Rng(83);
    for _ in 0..300 {
        let n = r.int(1, 5) as usize;
        let ts = random_taskset(&mut r, n, 92, false);
        let sys = single_resource(&ts, dedicated(), Policy::FixedPriority);
        let a = analyze(&sys, &Options::default()).unwrap();
        let out = simulate(sim::Policy::FixedPriorityPreemptive, &Supply::Full, &sync_specs(&ts, 0, 3000), 3000);
        for (i, (t, o)) in a.tasks.iter().zip(&out.tasks).enumerate() {
            assert_eq!(Some(q(o.max_backlog as i64)), t.backlog, "events, task {i} of {ts:?}");
            assert_eq!(Some(q(o.max_backlog_work)), t.backlog_work, "work, task {i} of {ts:?}");
        }
    }
}

/// In a (Q, P) reservation the worst supply comes when the budget is spent at the start of one
/// period and at the end of every later one; tasks released together just after the first
/// budget then see exactly Shin and Lee's bound, and reach every backlog.
#[test]
fn simulator_reaches_reservation_backlogs() {
    let mut r = Rng(84);
    for k in 0..300 {
        let period = r.pick(&[2i64, 3, 4, 5, 6]);
        let budget = r.int(1, period);
        let n = r.int(1, 4) as usize;
        let ts = random_taskset(&mut r, n, 90 * budget / period, false);
        let mut sys = single_resource(&ts, reservation(1, budget, period), Policy::FixedPriority);
        sys.resources.push(Resource { blackout: None, name: "host".into(), kind: dedicated(), policy: Policy::FixedPriority, cycle: None });
        let a = analyze(&sys, &Options::default()).unwrap();
        let h = 6000;
        let supply = Supply::periodic_resource(budget, period, h + period, |p| if p == 0 { 0 } else { period - budget });
        let out = simulate(sim::Policy::FixedPriorityPreemptive, &supply, &sync_specs(&ts, budget, h), h);
        for (i, (t, o)) in a.tasks.iter().zip(&out.tasks).enumerate() {
            assert_eq!(Some(q(o.max_backlog as i64)), t.backlog, "round {k}: events, task {i} of {ts:?} in ({budget}, {period})");
            assert_eq!(Some(q(o.max_backlog_work)), t.backlog_work, "round {k}: work, task {i} of {ts:?} in ({budget}, {period})");
        }
    }
}

/// TDMA: a task released just after its slot ends sees the slot's lower service curve, and
/// reaches its backlog.
#[test]
fn simulator_reaches_tdma_backlogs() {
    let mut r = Rng(85);
    for _ in 0..200 {
        let ts = random_taskset(&mut r, 1, 60, false);
        let cycle = r.pick(&[4i64, 5, 6, 8, 10]);
        let t = &ts[0];
        let slot = ((t.c * cycle + t.p - 1) / t.p + r.int(0, 1)).clamp(1, cycle);
        let mut sys = single_resource(&ts, dedicated(), Policy::Tdma);
        sys.resources[0].cycle = Some(q(cycle));
        sys.tasks[0].slot = Some(q(slot));
        let a = analyze(&sys, &Options::default()).unwrap();
        let Some(b) = &a.tasks[0].backlog else { continue };
        let h = 3000;
        let out = simulate(sim::Policy::FixedPriorityPreemptive, &Supply::tdma(0, slot, cycle, h + cycle), &sync_specs(&ts, slot, h), h);
        assert_eq!(q(out.tasks[0].max_backlog as i64), *b, "events: {t:?} slot {slot}/{cycle}");
        assert_eq!(Some(q(out.tasks[0].max_backlog_work)), a.tasks[0].backlog_work, "work: {t:?} slot {slot}/{cycle}");
    }
}

/// EDF and FIFO on a full processor are work-conserving: the resource's pending work is exactly
/// sup (Σ demand − βl), which synchronous periodic release at WCET reaches; with jitter and
/// random execution times the simulated total never exceeds it.
#[test]
fn edf_and_fifo_resource_backlogs_are_reached_and_hold() {
    let mut r = Rng(86);
    let mut g = gen::Rng::new(86);
    for k in 0..300 {
        let (policy, sp) = if k % 2 == 0 { (Policy::Edf, sim::Policy::Edf) } else { (Policy::Fifo, sim::Policy::Fifo) };
        let n = r.int(1, 5) as usize;
        let sync = k % 3 == 0;
        let ts = random_taskset(&mut r, n, 95, !sync);
        let sys = single_resource(&ts, dedicated(), policy);
        let a = analyze(&sys, &Options::default()).unwrap();
        let total = a.resources[0].backlog.clone().expect("edf and fifo report the resource's backlog");
        let specs: Vec<TaskSpec> = if sync {
            sync_specs(&ts, 0, 3000)
        } else {
            ts.iter()
                .enumerate()
                .map(|(i, t)| {
                    let rel = gen::pjd(t.p, t.j, 1, 3000, &mut g, [JitterMode::Burst, JitterMode::Random][k % 2]);
                    let ex = gen::exec_times(rel.len(), t.b, t.c, &mut g, [ExecMode::Wcet, ExecMode::Random][(k / 2) % 2]);
                    TaskSpec::new(i as i64, t.d, &rel, &ex)
                })
                .collect()
        };
        let out = simulate(sp, &Supply::Full, &specs, 3000);
        if sync {
            assert_eq!(q(out.max_total_backlog_work), total, "{policy:?} {ts:?}");
        } else {
            assert!(q(out.max_total_backlog_work) <= total, "{policy:?} {ts:?}");
        }
        for (i, (t, o)) in a.tasks.iter().zip(&out.tasks).enumerate() {
            assert!(q(o.max_backlog as i64) <= t.backlog.clone().unwrap(), "{policy:?} task {i} of {ts:?}");
            assert!(q(o.max_backlog_work) <= t.backlog_work.clone().unwrap(), "{policy:?} task {i} of {ts:?}");
        }
    }
}
