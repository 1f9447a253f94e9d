//! The incremental re-analysis gives exactly the full analysis, on random networks changed
//! step by step the way the planner changes them (tasks moved, work changed or zeroed,
//! reservations moved to another host or resized).

mod common;

use common::Rng;
use rtc::incremental::reanalyze;
use rtc::models::{EventModel, SupplyModel};
use rtc::q::q;
use rtc::system::*;

const PROCESSORS: usize = 3;
const RESERVATIONS: usize = 2;
const LINKS: usize = 2;

fn random_system(r: &mut Rng) -> System {
    let mut sys = System::default();
    let policies = [Policy::FixedPriority, Policy::FixedPriorityNonPreemptive, Policy::Edf, Policy::Fifo];
    for p in 0..PROCESSORS {
        let policy = if p == 0 { Policy::FixedPriority } else { r.pick(&policies) };
        sys.resources.push(Resource {
            blackout: None,
            name: format!("cpu{p}"),
            kind: ResourceKind::Dedicated { rate: q(1) },
            policy,
            cycle: None,
        });
    }
    for v in 0..RESERVATIONS {
        let period = r.pick(&[10, 20, 40]);
        let kind = ResourceKind::Reservation {
            host: r.int(0, PROCESSORS as i64 - 1) as usize,
            budget: q(r.int(period / 4, period)),
            period: q(period),
            supply: r.pick(&[SupplyModel::WorstCase, SupplyModel::Synchronous]),
        };
        sys.resources.push(Resource { blackout: None, name: format!("vm{v}"), kind, policy: Policy::FixedPriority, cycle: None });
    }
    for l in 0..LINKS {
        let kind = if r.int(0, 1) == 0 {
            ResourceKind::Dedicated { rate: q(2) }
        } else {
            ResourceKind::BoundedDelay { rate: q(2), latency: q(r.int(1, 3)) }
        };
        let policy = r.pick(&[Policy::FixedPriority, Policy::Fifo]);
        sys.resources.push(Resource { blackout: None, name: format!("link{l}"), kind, policy, cycle: None });
    }
    for s in 0..4 {
        let period = r.pick(&common::PERIODS) * 5;
        let model = if r.int(0, 1) == 0 {
            EventModel::Periodic { period: q(period) }
        } else {
            EventModel::Pjd { period: q(period), jitter: q(r.int(0, period)), min_distance: q(r.int(0, period / 4)) }
        };
        sys.streams.push(Stream { name: format!("s{s}"), model });
    }
    for c in 0..4 {
        let len = r.int(1, 3) as usize;
        let mut ids = Vec::new();
        for k in 0..len {
            let i = sys.tasks.len();
            let input = if k == 0 { Input::Stream(c) } else { Input::Task(i - 1) };
            let resource = r.int(0, sys.resources.len() as i64 - 1) as usize;
            let wcet = q(r.int(1, 4));
            let deadline = if r.int(0, 2) > 0 { Some(q(r.int(20, 200))) } else { None };
            sys.tasks.push(Task {
                hold: None,
                name: format!("t{c}.{k}"),
                resource,
                input,
                bcet: q(r.int(0, 1)),
                wcet,
                priority: Some(r.int(0, 20)),
                deadline,
                slot: None,
                workload: None,
            });
            ids.push(i);
        }
        let deadline = if r.int(0, 1) == 0 { Some(q(r.int(50, 400))) } else { None };
        sys.chains.push(Chain { name: format!("c{c}"), tasks: ids, deadline });
    }
    sys
}

/// One change of the kind the planner makes.
fn change(r: &mut Rng, sys: &mut System) {
    match r.int(0, 4) {
        0 | 1 => {
            let i = r.int(0, sys.tasks.len() as i64 - 1) as usize;
            sys.tasks[i].resource = r.int(0, sys.resources.len() as i64 - 1) as usize;
        }
        2 => {
            let i = r.int(0, sys.tasks.len() as i64 - 1) as usize;
            let w = q(r.int(0, 4));
            sys.tasks[i].bcet = rtc::Q::min(&sys.tasks[i].bcet, &w);
            sys.tasks[i].wcet = w;
        }
        3 => {
            let v = PROCESSORS + r.int(0, RESERVATIONS as i64 - 1) as usize;
            if let ResourceKind::Reservation { host, .. } = &mut sys.resources[v].kind {
                *host = r.int(0, PROCESSORS as i64 - 1) as usize;
            }
        }
        _ => {
            let v = PROCESSORS + r.int(0, RESERVATIONS as i64 - 1) as usize;
            if let ResourceKind::Reservation { budget, period, .. } = &mut sys.resources[v].kind {
                *budget = rtc::Q::min(&(&*budget + &q(r.int(-3, 3))), period);
                if !budget.is_positive() {
                    *budget = q(1);
                }
            }
        }
    }
}

#[test]
fn reanalysis_equals_full_analysis_after_random_changes() {
    let opts = Options::default();
    let mut r = Rng(0x1ac2);
    let (mut steps, mut partial, mut reused_tasks, mut total_tasks) = (0, 0, 0, 0);
    for _ in 0..60 {
        let mut sys = random_system(&mut r);
        let mut an = analyze(&sys, &opts).expect("random systems are well formed");
        for _ in 0..15 {
            let old = sys.clone();
            for _ in 0..r.int(1, 2) {
                change(&mut r, &mut sys);
            }
            let full = analyze(&sys, &opts).expect("changed systems are well formed");
            let (inc, reuse) = reanalyze(&old, an, &sys, &opts).expect("re-analysis succeeds where analysis does");
            assert_eq!(inc, full, "incremental result differs after changing\n{old:#?}\ninto\n{sys:#?}");
            steps += 1;
            if !reuse.full {
                partial += 1;
                reused_tasks += sys.tasks.len() - reuse.tasks;
            }
            total_tasks += sys.tasks.len();
            an = inc;
        }
    }
    // The test is only meaningful if most changes were handled incrementally.
    assert!(partial * 2 > steps, "only {partial} of {steps} changes were incremental");
    eprintln!("{partial}/{steps} incremental; {reused_tasks}/{total_tasks} task results reused");
}
