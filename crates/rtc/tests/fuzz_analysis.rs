//! Random and malformed systems straight into the analysis entry point: it must return a result
//! or an error naming the culprit, never panic (bad indices, zero or negative parameters,
//! overload, cycles, missing priorities, slots or deadlines, huge and tiny numbers).

mod common;

use common::Rng;
use rtc::models::{EventModel, SupplyModel};
use rtc::q::{q, qf};
use rtc::system::*;
use rtc::Q;
use std::panic::{catch_unwind, AssertUnwindSafe};

fn num(r: &mut Rng) -> Q {
    match r.int(0, 99) {
        0 => q(0),
        1 => q(-r.int(1, 5)),
        2..=4 => q(r.int(1, 1_000_000_000)),
        5..=7 => qf(1, r.int(1, 1_000_000)),
        8..=20 => qf(r.int(1, 100), r.int(1, 7)),
        _ => q(r.int(1, 40)),
    }
}

fn random_system(r: &mut Rng) -> System {
    let mut sys = System::default();
    let nr = r.int(1, 4) as usize;
    let ns = r.int(1, 4) as usize;
    let nt = r.int(0, 8) as usize;
    let idx = |r: &mut Rng, n: usize| if n == 0 || r.int(0, 100) == 0 { r.int(0, 9) as usize } else { r.int(0, n as i64 - 1) as usize };
    for i in 0..nr {
        let kind = match if i == 0 { 0 } else { r.int(0, 5) } {
            0..=2 => ResourceKind::Dedicated { rate: num(r) },
            3 => ResourceKind::BoundedDelay { rate: num(r), latency: num(r) },
            _ => ResourceKind::Reservation {
                host: if r.int(0, 9) == 0 { idx(r, nr) } else { 0 },
                budget: num(r),
                period: num(r),
                supply: if r.int(0, 1) == 0 { SupplyModel::WorstCase } else { SupplyModel::Synchronous },
            },
        };
        let policy = r.pick(&[
            Policy::FixedPriority,
            Policy::FixedPriority,
            Policy::FixedPriorityNonPreemptive,
            Policy::Edf,
            Policy::Fifo,
            Policy::Tdma,
        ]);
        let cycle = if policy == Policy::Tdma || r.int(0, 9) == 0 { Some(num(r)) } else { None };
        sys.resources.push(Resource { blackout: None, name: format!("r{i}"), kind, policy, cycle });
    }
    for i in 0..ns {
        let model = match r.int(0, 4) {
            0 => EventModel::Periodic { period: num(r) },
            1 => EventModel::Pjd { period: num(r), jitter: num(r), min_distance: num(r) },
            2 => EventModel::Sporadic { min_distance: num(r) },
            3 => EventModel::Bursty { period: num(r), burst: r.int(-1, 5), min_distance: num(r) },
            _ => EventModel::Trace {
                times: (0..r.int(0, 6)).map(|_| num(r)).collect(),
                window: if r.int(0, 1) == 0 { Some(num(r)) } else { None },
            },
        };
        sys.streams.push(Stream { name: format!("s{i}"), model });
    }
    for i in 0..nt {
        let input = if i > 0 && r.int(0, 2) == 0 {
            Input::Task(if r.int(0, 30) == 0 { idx(r, nt) } else { r.int(0, i as i64 - 1) as usize })
        } else {
            Input::Stream(idx(r, ns))
        };
        sys.tasks.push(Task {
            hold: None,
            name: format!("t{i}"),
            resource: idx(r, nr),
            input,
            wcet: num(r),
            bcet: if r.int(0, 10) == 0 { num(r) } else { q(0) },
            priority: if r.int(0, 5) == 0 { None } else { Some(r.int(0, 3)) },
            deadline: if r.int(0, 2) == 0 { None } else { Some(num(r)) },
            slot: if r.int(0, 1) == 0 { None } else { Some(num(r)) },
            workload: None,
        });
    }
    for i in 0..r.int(0, 3) {
        // Mostly a real path through the inputs (tail first), sometimes garbage.
        let tasks: Vec<usize> = if nt > 0 && r.int(0, 3) > 0 {
            let mut path = vec![r.int(0, nt as i64 - 1) as usize];
            while let (Input::Task(j), true) = (sys.tasks[path[0]].input, path.len() < 4) {
                if path.contains(&j) {
                    break;
                }
                path.insert(0, j);
            }
            path
        } else {
            (0..r.int(0, 3)).map(|_| idx(r, nt)).collect()
        };
        sys.chains.push(Chain { name: format!("c{i}"), tasks, deadline: Some(num(r)) });
    }
    sys
}

#[test]
fn random_systems_never_panic() {
    let mut r = Rng(0xF022);
    let (mut ok, mut err) = (0, 0);
    for round in 0..1500 {
        let sys = random_system(&mut r);
        let opts =
            Options { budget_step: q(r.int(1, 1000)), gpc_outputs: round % 5 == 0, max_iterations: 20, service_curves: round % 3 != 0 };
        match catch_unwind(AssertUnwindSafe(|| analyze(&sys, &opts))) {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(e)) => {
                assert!(!e.to_string().is_empty());
                err += 1;
            }
            Err(_) => panic!("analysis panicked on round {round}: {sys:#?}"),
        }
    }
    assert!(ok > 100 && err > 100, "both outcomes must be exercised: {ok} ok, {err} errors");
}
