//! The analysis with fixed-priority service curves truncated at a verified horizon (the
//! default, `analyze`) gives exactly the task bounds, completion curves, verdicts and chain
//! worst cases of the analysis with exact curves (`analyze_exact_services`), on random
//! networks and on the synthetic benchmark systems; its service curves are exact before their
//! horizon and never above the exact ones, and its pay-bursts-only-once bounds never below.

mod common;

use common::Rng;
use rtc::models::{EventModel, SupplyModel};
use rtc::q::{q, qf};
use rtc::system::*;
use rtc::Q;

fn random_system(r: &mut Rng) -> System {
    let mut sys = System::default();
    for p in 0..3 {
        let policy = if r.int(0, 3) == 0 { Policy::FixedPriorityNonPreemptive } else { Policy::FixedPriority };
        let kind = match r.int(0, 3) {
            0 => ResourceKind::BoundedDelay { rate: qf(r.int(2, 5), 2), latency: q(r.int(1, 5)) },
            _ => ResourceKind::Dedicated { rate: qf(r.int(2, 5), 2) },
        };
        sys.resources.push(Resource { blackout: None, name: format!("cpu{p}"), kind, policy, cycle: None });
    }
    for v in 0..2 {
        let period = r.pick(&[10, 20, 25, 40]);
        let kind = ResourceKind::Reservation {
            host: r.int(0, 2) as usize,
            budget: q(r.int(period / 3, period)),
            period: q(period),
            supply: r.pick(&[SupplyModel::WorstCase, SupplyModel::Synchronous]),
        };
        sys.resources.push(Resource { blackout: None, name: format!("vm{v}"), kind, policy: Policy::FixedPriority, cycle: None });
    }
    for s in 0..5 {
        let period = r.pick(&common::PERIODS) * 5;
        let model = match r.int(0, 2) {
            0 => EventModel::Periodic { period: q(period) },
            _ => EventModel::Pjd { period: q(period), jitter: q(r.int(0, 3 * period)), min_distance: q(r.int(0, period / 4)) },
        };
        sys.streams.push(Stream { name: format!("s{s}"), model });
    }
    for c in 0..5 {
        let len = r.int(1, 5) as usize;
        let mut ids = Vec::new();
        for k in 0..len {
            let i = sys.tasks.len();
            let input = if k == 0 { Input::Stream(c) } else { Input::Task(i - 1) };
            let wcet = q(r.int(1, 5));
            sys.tasks.push(Task {
                hold: None,
                name: format!("t{c}.{k}"),
                resource: r.int(0, sys.resources.len() as i64 - 1) as usize,
                input,
                bcet: q(r.int(0, 1)),
                wcet,
                priority: Some(r.int(0, 20)),
                deadline: (r.int(0, 2) > 0).then(|| q(r.int(20, 300))),
                slot: None,
                workload: None,
            });
            ids.push(i);
        }
        sys.chains.push(Chain { name: format!("c{c}"), tasks: ids, deadline: (r.int(0, 1) == 0).then(|| q(r.int(50, 600))) });
    }
    sys
}

/// The two analyses agree on everything but the truncated service curves and looser pboo
/// bounds; returns how many chains had a pboo bound that decided their worst case and how many
/// tasks had a truncated service.
fn compare(sys: &System, what: &str) -> (usize, usize) {
    let (Ok(t), Ok(e)) = (analyze(sys, &Options::default()), analyze_exact_services(sys, &Options::default())) else {
        assert_eq!(analyze(sys, &Options::default()).err(), analyze_exact_services(sys, &Options::default()).err(), "{what}");
        return (0, 0);
    };
    assert_eq!(t.iterations, e.iterations, "{what}");
    assert_eq!(t.resources, e.resources, "{what}");
    for (i, (a, b)) in t.tasks.iter().zip(&e.tasks).enumerate() {
        let m = format!("{what}: task {i}");
        assert_eq!((&a.wcrt, &a.bcrt, &a.backlog, &a.problem, a.method), (&b.wcrt, &b.bcrt, &b.backlog, &b.problem, b.method), "{m}");
        assert_eq!((&a.input, &a.output), (&b.input, &b.output), "{m}");
        assert_eq!(a.service.upper, b.service.upper, "{m}");
        assert_eq!(b.service_exact_until, None, "{m}");
        match &a.service_exact_until {
            None => assert_eq!(a.service.lower, b.service.lower, "{m}"),
            Some(h) => {
                let end = Q::max(&(h * q(3)), &q(400));
                let mut x = Q::zero();
                while x <= end {
                    let (lt, le) = (&a.service.lower, &b.service.lower);
                    if &x < h {
                        assert_eq!(lt.eval(&x), le.eval(&x), "{m} at {x}");
                        assert_eq!(lt.eval_right(&x), le.eval_right(&x), "{m} at {x}");
                    } else {
                        assert!(lt.eval(&x) <= le.eval(&x), "{m} at {x}");
                    }
                    x = x + qf(1, 4);
                }
            }
        }
    }
    let mut decided = 0;
    for (c, (a, b)) in t.chains.iter().zip(&e.chains).enumerate() {
        let m = format!("{what}: chain {c}");
        assert_eq!((&a.worst, &a.best, &a.per_hop), (&b.worst, &b.best, &b.per_hop), "{m}");
        assert_eq!((&a.slack, &a.meets_deadline), (&b.slack, &b.meets_deadline), "{m}");
        match (&a.pboo, &b.pboo) {
            (Some(x), Some(y)) => assert!(x >= y, "{m}: pboo {x} below the exact {y}"),
            (x, y) => assert_eq!(x, y, "{m}"),
        }
        if matches!((&b.pboo, &b.per_hop), (Some(p), Some(h)) if p < h) {
            decided += 1;
        }
    }
    (decided, t.tasks.iter().filter(|x| x.service_exact_until.is_some()).count())
}

#[test]
fn truncated_services_give_the_exact_bounds() {
    let mut r = Rng(2027);
    let (mut decided, mut truncated) = (0, 0);
    for round in 0..150 {
        let (d, t) = compare(&random_system(&mut r), &format!("random system {round}"));
        decided += d;
        truncated += t;
    }
    // Both truncation and chains decided by pay-bursts-only-once must have occurred.
    assert!(decided > 0 && truncated > 0, "{decided} chains decided by pboo, {truncated} truncated services");
}

/// Without chains of several tasks, backlogs are also accepted from the deviation before the
/// horizon (`network::backlog_is_exact`), so horizons stop growing earlier: the same random
/// networks with only their one-task chains.
#[test]
fn truncated_services_without_multi_task_chains() {
    let mut r = Rng(2028);
    let mut truncated = 0;
    for round in 0..150 {
        let mut sys = random_system(&mut r);
        sys.chains.retain(|c| c.tasks.len() == 1);
        truncated += compare(&sys, &format!("random system {round} without multi-task chains")).1;
    }
    assert!(truncated > 0);
}

#[test]
fn truncated_services_on_the_benchmark_systems() {
    for (n, seed) in [(30, 1), (99, 7), (300, 3)] {
        let (_, truncated) = compare(&rtc::synthetic::distributed_chains(n, seed), &format!("distributed_chains({n}, {seed})"));
        assert!(truncated > 0);
    }
    for (n, per, seed) in [(40, 4, 1), (150, 10, 7)] {
        let (_, truncated) = compare(&rtc::synthetic::independent_fp(n, per, seed), &format!("independent_fp({n}, {per}, {seed})"));
        assert!(truncated > 0);
    }
}
