//! The analysis against the discrete-event simulator (`sim`): for arrival patterns each event
//! model allows, simulated response times, backlogs and end-to-end latencies never exceed the
//! bounds, and the synchronous periodic worst case reaches them exactly.

mod common;

use common::*;
use rtc::q::q;
use rtc::system::*;
use sim::gen::{self, ExecMode, JitterMode};
use sim::{simulate, Supply, TaskSpec};

const HORIZON: i64 = 3000;

fn releases(t: &T, r: &mut gen::Rng, mode: JitterMode) -> Vec<i64> {
    if t.j == 0 && mode == JitterMode::Zero {
        gen::periodic(t.p, 0, HORIZON)
    } else {
        gen::pjd(t.p, t.j, 1, HORIZON, r, mode)
    }
}

fn specs(ts: &[T], r: &mut gen::Rng, jm: JitterMode, em: ExecMode) -> Vec<TaskSpec> {
    ts.iter()
        .enumerate()
        .map(|(i, t)| {
            let rel = releases(t, r, jm);
            let ex = gen::exec_times(rel.len(), t.b, t.c, r, em);
            TaskSpec::new(i as i64, t.d, &rel, &ex)
        })
        .collect()
}

fn modes(k: u64) -> (JitterMode, ExecMode) {
    let jm = [JitterMode::Zero, JitterMode::Random, JitterMode::Burst][(k % 3) as usize];
    let em = if k.is_multiple_of(2) { ExecMode::Wcet } else { ExecMode::Random };
    (jm, em)
}

fn check(name: &str, ts: &[T], a: &Analysis, out: &sim::SimResult) {
    for (i, (t, o)) in a.tasks.iter().zip(&out.tasks).enumerate() {
        let Some(w) = &t.wcrt else { continue };
        assert!(o.max_response <= int(w), "{name}: task {i} simulated {} > bound {w}; {ts:?}", o.max_response);
        if let Some(b) = &t.backlog {
            assert!(o.max_backlog as i64 <= int(&b.ceil()), "{name}: task {i} backlog {} > {b}; {ts:?}", o.max_backlog);
        }
        if let Some(b) = &t.backlog_work {
            assert!(q(o.max_backlog_work) <= *b, "{name}: task {i} pending work {} > {b}; {ts:?}", o.max_backlog_work);
        }
    }
    if let Some(b) = &a.resources[0].backlog {
        assert!(q(out.max_total_backlog_work) <= *b, "{name}: total pending work {} > {b}; {ts:?}", out.max_total_backlog_work);
    }
}

fn policy_case(policy: Policy, sp: sim::Policy, seed: u64, rounds: usize) {
    let mut r = Rng(seed);
    let mut g = gen::Rng::new(seed);
    for k in 0..rounds {
        let n = r.int(2, 5) as usize;
        let ts = random_taskset(&mut r, n, 90, k % 2 == 1);
        let sys = single_resource(&ts, dedicated(), policy);
        let a = analyze(&sys, &Options::default()).unwrap();
        let (jm, em) = modes(k as u64);
        let out = simulate(sp, &Supply::Full, &specs(&ts, &mut g, jm, em), HORIZON);
        check(&format!("{policy:?}"), &ts, &a, &out);
    }
}

#[test]
fn fixed_priority_bounds_hold_and_are_reached() {
    policy_case(Policy::FixedPriority, sim::Policy::FixedPriorityPreemptive, 11, 300);
    // Synchronous periodic release with every job at its WCET is the critical instant.
    let mut r = Rng(12);
    let mut g = gen::Rng::new(12);
    for _ in 0..300 {
        let n = r.int(2, 5) as usize;
        let ts = random_taskset(&mut r, n, 90, false);
        let sys = single_resource(&ts, dedicated(), Policy::FixedPriority);
        let a = analyze(&sys, &Options::default()).unwrap();
        let out =
            simulate(sim::Policy::FixedPriorityPreemptive, &Supply::Full, &specs(&ts, &mut g, JitterMode::Zero, ExecMode::Wcet), HORIZON);
        for (i, (t, o)) in a.tasks.iter().zip(&out.tasks).enumerate() {
            assert_eq!(Some(o.max_response), t.wcrt.as_ref().map(int), "task {i} of {ts:?}");
        }
    }
}

#[test]
fn nonpreemptive_bounds_hold() {
    policy_case(Policy::FixedPriorityNonPreemptive, sim::Policy::FixedPriorityNonPreemptive, 21, 300);
}

#[test]
fn edf_bounds_hold() {
    policy_case(Policy::Edf, sim::Policy::Edf, 31, 300);
}

#[test]
fn fifo_bounds_hold() {
    policy_case(Policy::Fifo, sim::Policy::Fifo, 41, 300);
}

#[test]
fn tdma_bounds_hold() {
    let mut r = Rng(51);
    let mut g = gen::Rng::new(51);
    for k in 0..200 {
        let n = r.int(1, 3) as usize;
        let ts = random_taskset(&mut r, n, 60, k % 2 == 1);
        let cycle = r.pick(&[4i64, 5, 6, 8, 10]);
        let mut slots = Vec::new();
        let mut left = cycle;
        for (i, t) in ts.iter().enumerate() {
            let share = (t.c as f64 / t.p as f64 * cycle as f64).ceil() as i64 + r.int(0, 1);
            let s = share.clamp(1, (left - (ts.len() - i - 1) as i64).max(1));
            slots.push(s);
            left -= s;
        }
        if left < 0 {
            continue;
        }
        let mut sys = single_resource(&ts, dedicated(), Policy::Tdma);
        sys.resources[0].cycle = Some(q(cycle));
        for (t, s) in sys.tasks.iter_mut().zip(&slots) {
            t.slot = Some(q(*s));
        }
        let a = analyze(&sys, &Options::default()).unwrap();
        let (jm, em) = modes(k as u64);
        let sp = specs(&ts, &mut g, jm, em);
        let mut start = 0;
        for (i, spec) in sp.iter().enumerate() {
            let supply = Supply::tdma(start, slots[i], cycle, HORIZON + cycle);
            start += slots[i];
            let out = simulate(sim::Policy::FixedPriorityPreemptive, &supply, std::slice::from_ref(spec), HORIZON);
            if let Some(w) = &a.tasks[i].wcrt {
                assert!(
                    out.tasks[0].max_response <= int(w),
                    "tdma task {i}: {} > {w}; {ts:?} slots {slots:?}/{cycle}",
                    out.tasks[0].max_response
                );
            }
        }
    }
}

#[test]
fn reservation_bounds_hold() {
    let mut r = Rng(61);
    let mut g = gen::Rng::new(61);
    for k in 0..200 {
        let n = r.int(1, 3) as usize;
        let ts = random_taskset(&mut r, n, 50, k % 2 == 1);
        let period = r.pick(&[2i64, 3, 4, 5]);
        let budget = r.int(1, period);
        let mut sys = single_resource(&ts, reservation(1, budget, period), Policy::FixedPriority);
        sys.resources.push(Resource { blackout: None, name: "host".into(), kind: dedicated(), policy: Policy::FixedPriority, cycle: None });
        let a = analyze(&sys, &Options::default()).unwrap();
        let (jm, em) = modes(k as u64);
        let sp = specs(&ts, &mut g, jm, em);
        let mut pr = gen::Rng::new(k as u64);
        let supply = Supply::periodic_resource(budget, period, HORIZON + period, |_| pr.range(0, period - budget));
        let out = simulate(sim::Policy::FixedPriorityPreemptive, &supply, &sp, HORIZON);
        check("reservation", &ts, &a, &out);
    }
}

/// Events in the sliding window `[t, t + delta)` never exceed the output curve.
fn assert_within_curve(name: &str, times: &[i64], upper: &rtc::Curve) {
    for delta in 1..80 {
        let n = sim::check::max_events_in_window(times, delta) as i64;
        let bound = upper.eval(&q(delta));
        assert!(q(n) <= bound, "{name}: {n} completions in a window of {delta}, bound {bound}");
    }
}

#[test]
fn two_hop_chains_hold_end_to_end() {
    let mut r = Rng(71);
    let mut g = gen::Rng::new(71);
    for k in 0..150 {
        let n = r.int(2, 4) as usize;
        let s1 = random_taskset(&mut r, n, 70, k % 2 == 1);
        let s2 = random_taskset(&mut r, n, 60, false);
        // Stage 2 task i processes the completions of stage 1 task i, with its own WCET.
        let mut sys = single_resource(&s1, dedicated(), Policy::FixedPriority);
        sys.resources.push(Resource { blackout: None, name: "cpu1".into(), kind: dedicated(), policy: Policy::FixedPriority, cycle: None });
        let prio: Vec<usize> = {
            let mut p: Vec<usize> = (0..n).collect();
            p.sort_by_key(|_| r.next());
            p
        };
        for i in 0..n {
            sys.tasks.push(Task {
                hold: None,
                name: format!("u{i}"),
                resource: 1,
                input: Input::Task(i),
                wcet: q(s2[i].c.min(s1[i].p / 3).max(1)),
                bcet: q(0),
                priority: Some(prio[i] as i64),
                deadline: None,
                slot: None,
                workload: None,
            });
            sys.chains.push(Chain { name: format!("c{i}"), tasks: vec![i, n + i], deadline: None });
        }
        let a = match analyze(&sys, &Options::default()) {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        };
        let (jm, em) = modes(k as u64);
        let sp1 = specs(&s1, &mut g, jm, em);
        let out1 = simulate(sim::Policy::FixedPriorityPreemptive, &Supply::Full, &sp1, HORIZON);
        check("stage 1", &s1, &a, &out1);
        let mut sp2 = Vec::new();
        for i in 0..n {
            let done: Vec<i64> = out1.tasks[i].completions.iter().flatten().copied().collect();
            assert_within_curve(
                &format!(
                    "stage-1 output of {:?} wcrt {:?} bcrt {} out {:?}",
                    s1[i], a.tasks[i].wcrt, a.tasks[i].bcrt, a.tasks[i].output.upper
                ),
                &done,
                &a.tasks[i].output.upper,
            );
            let c = int(&sys.tasks[n + i].wcet);
            let ex = gen::exec_times(done.len(), 0, c, &mut g, em);
            sp2.push(TaskSpec::new(prio[i] as i64, 0, &done, &ex));
        }
        let out2 = simulate(sim::Policy::FixedPriorityPreemptive, &Supply::Full, &sp2, HORIZON * 2);
        for i in 0..n {
            let bound = a.chains[i].worst.clone().expect("bounded chain");
            let done1: Vec<(usize, i64)> = out1.tasks[i].completions.iter().enumerate().filter_map(|(j, c)| c.map(|c| (j, c))).collect();
            for (k2, c2) in out2.tasks[i].completions.iter().enumerate() {
                let (Some(c2), Some((j, _))) = (c2, done1.get(k2)) else { continue };
                let latency = c2 - sp1[i].jobs[*j].release;
                assert!(q(latency) <= bound, "chain {i}: latency {latency} > bound {bound} ({:?})", a.chains[i]);
            }
        }
    }
}

/// A multiframe task (execution times cycling 3, 1, 1) described by workload curves: the bound
/// of the lower-priority task is tighter than with 3 per activation, and still holds for every
/// phase of the frame sequence in the simulator.
#[test]
fn workload_curves_tighten_and_hold() {
    use rtc::models::{EventModel, WorkloadCurve};
    let frames = [3i64, 1, 1];
    let gamma_up: Vec<rtc::Q> = [3, 4, 5].iter().map(|v| q(*v)).collect();
    let gamma_lo: Vec<rtc::Q> = [1, 2, 5].iter().map(|v| q(*v)).collect();
    let build = |with_curves: bool| {
        let mut sys = System::default();
        sys.resources.push(Resource { blackout: None, name: "cpu".into(), kind: dedicated(), policy: Policy::FixedPriority, cycle: None });
        sys.streams.push(Stream { name: "a".into(), model: EventModel::Periodic { period: q(5) } });
        sys.streams.push(Stream { name: "b".into(), model: EventModel::Periodic { period: q(20) } });
        let wl = with_curves.then(|| WorkloadCurve { upper: gamma_up.clone(), lower: gamma_lo.clone() });
        sys.tasks.push(Task {
            hold: None,
            name: "mf".into(),
            resource: 0,
            input: Input::Stream(0),
            wcet: q(3),
            bcet: q(1),
            priority: Some(0),
            deadline: None,
            slot: None,
            workload: wl,
        });
        sys.tasks.push(Task {
            hold: None,
            name: "low".into(),
            resource: 0,
            input: Input::Stream(1),
            wcet: q(6),
            bcet: q(6),
            priority: Some(1),
            deadline: None,
            slot: None,
            workload: None,
        });
        sys
    };
    let with = analyze(&build(true), &Options::default()).unwrap();
    let without = analyze(&build(false), &Options::default()).unwrap();
    let (w, wo) = (with.tasks[1].wcrt.clone().unwrap(), without.tasks[1].wcrt.clone().unwrap());
    assert!(w < wo, "workload curves should tighten the bound: {w} vs {wo}");
    let mut worst = 0;
    for phase in 0..3 {
        for offset in 0..5 {
            let ra = gen::periodic(5, offset, HORIZON);
            let ea: Vec<i64> = (0..ra.len()).map(|k| frames[(k + phase) % 3]).collect();
            let rb = gen::periodic(20, 0, HORIZON);
            let eb = vec![6; rb.len()];
            let out = simulate(
                sim::Policy::FixedPriorityPreemptive,
                &Supply::Full,
                &[TaskSpec::new(0, 0, &ra, &ea), TaskSpec::new(1, 0, &rb, &eb)],
                HORIZON,
            );
            assert!(q(out.tasks[1].max_response) <= w, "phase {phase} offset {offset}: {} > {w}", out.tasks[1].max_response);
            worst = worst.max(out.tasks[1].max_response);
        }
    }
    // The bound is reached by some phasing of the frames.
    assert_eq!(q(worst), w, "simulated worst {worst}, bound {w}, constant-WCET bound {wo}");
}
