//! The busy-window recurrences (`Options::service_curves` false) against the curve analysis:
//! on random systems of fixed-priority processors fed by every standard event model — jitter
//! beyond the period, minimum distances, bursts, rational rates and WCETs, tied and missing
//! priorities, zero WCETs, loads up to and past the rate, tasks feeding tasks on other
//! processors — every delay, best case, backlog, completion curve, problem, chain and resource
//! result is the same as with curves, and the recurrences are taken where they apply.

mod common;

use common::Rng;
use rtc::incremental::reanalyze;
use rtc::models::EventModel;
use rtc::q::{q, qf};
use rtc::system::*;
use rtc::Q;

/// Mostly periods with a small common multiple (the curve analysis, the reference here, takes
/// long on others), sometimes any integer or a fraction.
fn time(r: &mut Rng) -> Q {
    match r.int(0, 19) {
        0 => qf(r.int(1, 400), r.int(2, 7)),
        1 => q(r.int(1, 100)),
        _ => q(r.pick(&common::PERIODS)) * q(r.pick(&[1, 1, 2, 5])),
    }
}

fn model(r: &mut Rng) -> EventModel {
    let period = time(r);
    match r.int(0, 5) {
        0 | 1 => EventModel::Periodic { period },
        2 | 3 => {
            let jitter = match r.int(0, 3) {
                0 => q(0),
                1 => &period * q(r.int(1, 3)) + time(r),
                _ => Q::min(&time(r), &period),
            };
            let min_distance = if r.int(0, 2) == 0 { Q::min(&time(r), &period) / q(r.int(1, 4)) } else { q(0) };
            EventModel::Pjd { period, jitter, min_distance }
        }
        4 => EventModel::Sporadic { min_distance: period },
        _ => EventModel::Bursty {
            period: period.clone(),
            burst: r.int(1, 4),
            min_distance: if r.int(0, 1) == 0 { q(0) } else { &period * qf(r.int(1, 12), 4) },
        },
    }
}

/// Processors with fixed priority (sometimes another policy or kind), tasks at a random load
/// of about `load` percent of each processor's rate, some fed by tasks elsewhere, some chains.
fn random_system(r: &mut Rng) -> System {
    let mut sys = System::default();
    let nr = r.int(1, 3) as usize;
    for i in 0..nr {
        let rate = r.pick(&[q(1), q(1), q(2), qf(3, 2), qf(2, 3)]);
        let kind = if r.int(0, 9) == 0 {
            ResourceKind::BoundedDelay { rate: rate.clone(), latency: time(r) }
        } else {
            ResourceKind::Dedicated { rate: rate.clone() }
        };
        let policy = if r.int(0, 9) == 0 { Policy::FixedPriorityNonPreemptive } else { Policy::FixedPriority };
        sys.resources.push(Resource { blackout: None, name: format!("r{i}"), kind, policy, cycle: None });
        let load = qf(r.int(20, 104), 100) * &rate;
        let n = r.int(1, 7);
        let mut left = load;
        for k in 0..n {
            let m = model(r);
            let per_event = m.rate().expect("valid model");
            let share = if k == n - 1 { left.clone() } else { &left * qf(r.int(1, 60), 100) };
            left = &left - &share;
            // C·rate = share, rounded to a multiple of 1/4 (sometimes zero work).
            let wcet = if r.int(0, 19) == 0 { q(0) } else { Q::max(&((&share / &per_event) * q(4)).floor(), &q(1)) / q(4) };
            let bcet = match r.int(0, 2) {
                0 => q(0),
                1 => wcet.clone(),
                _ => &wcet / q(2),
            };
            let s = sys.streams.len();
            sys.streams.push(rtc::system::Stream { name: format!("s{s}"), model: m });
            let t = sys.tasks.len();
            // Sometimes fed by an earlier task on another processor instead.
            let input = match (0..t).filter(|&j| sys.tasks[j].resource != i).last() {
                Some(j) if r.int(0, 7) == 0 => Input::Task(j),
                _ => Input::Stream(s),
            };
            sys.tasks.push(Task {
                hold: None,
                name: format!("t{t}"),
                resource: i,
                input,
                wcet,
                bcet,
                priority: if r.int(0, 9) == 0 { None } else { Some(r.int(0, 5)) },
                deadline: if r.int(0, 1) == 0 { None } else { Some(time(r) * q(3)) },
                slot: None,
                workload: None,
            });
        }
    }
    // A chain along a task's inputs, sometimes (its tasks keep the curves).
    if r.int(0, 3) == 0 {
        if let Some(t) = (0..sys.tasks.len()).find(|&t| matches!(sys.tasks[t].input, Input::Task(_))) {
            let Input::Task(j) = sys.tasks[t].input else { unreachable!() };
            sys.chains.push(Chain { name: "c".into(), tasks: vec![j, t], deadline: None });
        }
    }
    sys
}

fn same(exact: &Analysis, fast: &Analysis, sys: &System, what: &str) -> usize {
    let mut classical = 0;
    for (i, (a, b)) in exact.tasks.iter().zip(&fast.tasks).enumerate() {
        let m = format!("{what}: task {} ({}) of {sys:#?}", sys.tasks[i].name, b.method);
        assert_eq!(a.wcrt, b.wcrt, "wcrt {m}");
        assert_eq!(a.bcrt, b.bcrt, "bcrt {m}");
        assert_eq!(a.backlog, b.backlog, "backlog {m}");
        assert_eq!(a.backlog_work, b.backlog_work, "backlog_work {m}");
        assert_eq!(a.output, b.output, "output {m}");
        assert_eq!(a.input, b.input, "input {m}");
        assert_eq!(a.problem, b.problem, "problem {m}");
        if b.method.contains("busy-window") {
            classical += 1;
            // The reported service is a lower bound of the one the curves give (where that
            // one is exact).
            let (lo, ex) = (&b.service.lower, &a.service.lower);
            for t in (0..400).map(|t| q(t) / q(2)).filter(|t| a.service_exact_until.as_ref().is_none_or(|h| t < h)) {
                assert!(lo.eval(&t) <= ex.eval(&t), "service at {t} {m}");
            }
            assert_eq!(b.service_exact_until, Some(q(0)));
        } else {
            assert_eq!(a.method, b.method, "{m}");
        }
    }
    assert_eq!(exact.chains, fast.chains, "{what}: chains of {sys:#?}");
    assert_eq!(exact.resources, fast.resources, "{what}: resources of {sys:#?}");
    assert_eq!(exact.all_deadlines_met(sys), fast.all_deadlines_met(sys));
    classical
}

fn fast() -> Options {
    Options { service_curves: false, ..Options::default() }
}

#[test]
fn the_recurrences_give_what_the_curves_give() {
    let mut r = Rng(0xB05E);
    let (mut classical, mut tasks, mut unbounded) = (0, 0, 0);
    for _ in 0..1500 {
        let sys = random_system(&mut r);
        let exact = analyze(&sys, &Options::default());
        let fast = analyze(&sys, &fast());
        let (exact, fast) = match (exact, fast) {
            (Ok(e), Ok(f)) => (e, f),
            (Err(e), Err(f)) => {
                assert_eq!(e, f);
                continue;
            }
            (e, f) => panic!("{e:?} against {f:?} for {sys:#?}"),
        };
        classical += same(&exact, &fast, &sys, "analyze");
        tasks += sys.tasks.len();
        unbounded += exact.tasks.iter().filter(|t| t.wcrt.is_none()).count();
    }
    eprintln!("{classical} of {tasks} tasks by the recurrences, {unbounded} unbounded");
    assert!(classical * 2 > tasks, "the recurrences analysed only {classical} of {tasks} tasks");
    assert!(unbounded > 50, "overload must be exercised: {unbounded} unbounded tasks");
}

#[test]
fn the_recurrences_give_what_the_curves_give_on_the_pycpa_workload() {
    let sys = rtc::synthetic::independent_fp(1000, 10, 7);
    let exact = analyze(&sys, &Options::default()).unwrap();
    let fast = analyze(&sys, &fast()).unwrap();
    assert_eq!(same(&exact, &fast, &sys, "independent_fp"), 1000);
}

#[test]
fn incremental_reanalysis_with_the_recurrences_equals_the_full_one() {
    let mut r = Rng(0x1BC0);
    for _ in 0..300 {
        let old = random_system(&mut r);
        let Ok(prev) = analyze(&old, &fast()) else { continue };
        // Change one task's work and move another.
        let mut sys = old.clone();
        let n = sys.tasks.len();
        let i = r.below(n);
        sys.tasks[i].wcet = &sys.tasks[i].wcet * qf(r.int(1, 8), 4);
        sys.tasks[i].bcet = Q::min(&sys.tasks[i].bcet, &sys.tasks[i].wcet);
        let j = r.below(n);
        sys.tasks[j].resource = r.below(sys.resources.len());
        let (Ok(full), Ok((inc, _))) = (analyze(&sys, &Options::default()), reanalyze(&old, prev, &sys, &fast())) else { continue };
        same(&full, &inc, &sys, "reanalyze");
    }
}
