//! Replication's cost in the analysis, against the discrete-event simulator (`sim`): a
//! protected VM pauses for each checkpoint (at most `pause` once per `every`, pauses starting
//! at least `every` apart) and its output is held until the checkpoint that covers it is
//! acknowledged. Simulated response times and end-to-end latencies never exceed the bounds,
//! whatever the phase and spacing of the pauses and of the acknowledgements.

mod common;

use common::*;
use rtc::q::q;
use rtc::system::*;
use sim::gen::{self, ExecMode, JitterMode};
use sim::{simulate, Supply, TaskSpec};

const HORIZON: i64 = 4000;

/// Pauses of length in [1, d] (or exactly d), starting at least `every` apart with random
/// extra gaps, from a random first phase: the processor's available intervals.
fn paused_supply(d: i64, every: i64, g: &mut gen::Rng, exact: bool) -> Vec<(i64, i64)> {
    let mut free = Vec::new();
    let mut t = 0;
    let mut start = g.range(0, every);
    while start < HORIZON * 2 {
        let len = if exact { d } else { g.range(1, d) };
        if start > t {
            free.push((t, start));
        }
        t = start + len;
        start += every + if exact { 0 } else { g.range(0, every / 2) };
    }
    free.push((t, HORIZON * 3));
    free
}

/// Intersection of two sorted lists of disjoint intervals.
fn intersect(a: &[(i64, i64)], b: &[(i64, i64)]) -> Vec<(i64, i64)> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

fn specs(ts: &[T], g: &mut gen::Rng, k: usize) -> Vec<TaskSpec> {
    let jm = [JitterMode::Zero, JitterMode::Random, JitterMode::Burst][k % 3];
    let em = if k.is_multiple_of(2) { ExecMode::Wcet } else { ExecMode::Random };
    ts.iter()
        .enumerate()
        .map(|(i, t)| {
            let rel =
                if t.j == 0 && jm == JitterMode::Zero { gen::periodic(t.p, 0, HORIZON) } else { gen::pjd(t.p, t.j, 1, HORIZON, g, jm) };
            let ex = gen::exec_times(rel.len(), t.b, t.c, g, em);
            TaskSpec::new(i as i64, t.d, &rel, &ex)
        })
        .collect()
}

fn check(name: &str, ts: &[T], a: &Analysis, out: &sim::SimResult) -> usize {
    let mut reached = 0;
    for (i, (t, o)) in a.tasks.iter().zip(&out.tasks).enumerate() {
        let Some(w) = &t.wcrt else { continue };
        assert!(q(o.max_response) <= *w, "{name}: task {i} simulated {} > bound {w}; {ts:?}", o.max_response);
        reached += usize::from(q(o.max_response) == *w);
    }
    reached
}

#[test]
fn checkpoint_pauses_on_a_dedicated_processor_hold() {
    let mut r = Rng(301);
    let mut g = gen::Rng::new(301);
    let (mut bounded, mut reached) = (0, 0);
    for k in 0..300 {
        let n = r.int(1, 4) as usize;
        let ts = random_taskset(&mut r, n, 60, k % 2 == 1);
        let every = r.pick(&[5i64, 8, 10, 16, 25]);
        let pause = r.int(1, (every / 3).max(1));
        let mut sys = single_resource(&ts, dedicated(), Policy::FixedPriority);
        sys.resources[0].blackout = Some(Blackout { pause: q(pause), every: q(every) });
        let a = analyze(&sys, &Options::default()).unwrap();
        // Pauses only take service away: every bound is at least the undisturbed one.
        let mut undisturbed = sys.clone();
        undisturbed.resources[0].blackout = None;
        let b = analyze(&undisturbed, &Options::default()).unwrap();
        for (x, y) in a.tasks.iter().zip(&b.tasks) {
            if let (Some(x), Some(y)) = (&x.wcrt, &y.wcrt) {
                assert!(x >= y, "a pause shortened a bound: {x} < {y}");
            }
        }
        for exact in [true, false] {
            let supply = Supply::Intervals(paused_supply(pause, every, &mut g, exact));
            let out = simulate(sim::Policy::FixedPriorityPreemptive, &supply, &specs(&ts, &mut g, k), HORIZON);
            reached += check(&format!("pause {pause} every {every}"), &ts, &a, &out);
            bounded += a.tasks.iter().filter(|t| t.wcrt.is_some()).count();
        }
    }
    assert!(bounded > 500, "{bounded} bounded tasks");
    eprintln!("{reached} of {bounded} bounds reached exactly by the simulation");
}

#[test]
fn checkpoint_pauses_inside_a_reservation_hold() {
    let mut r = Rng(307);
    let mut g = gen::Rng::new(307);
    for k in 0..200 {
        let n = r.int(1, 3) as usize;
        let ts = random_taskset(&mut r, n, 35, k % 2 == 1);
        let period = r.pick(&[2i64, 3, 4, 5]);
        let budget = r.int(1, period);
        let every = r.pick(&[10i64, 16, 25]);
        let pause = r.int(1, 3);
        let mut sys = single_resource(&ts, reservation(1, budget, period), Policy::FixedPriority);
        sys.resources.push(Resource { blackout: None, name: "host".into(), kind: dedicated(), policy: Policy::FixedPriority, cycle: None });
        sys.resources[0].blackout = Some(Blackout { pause: q(pause), every: q(every) });
        let a = analyze(&sys, &Options::default()).unwrap();
        let mut pr = gen::Rng::new(k as u64);
        // The budget a pause falls on is lost (the pessimistic case of a suspended server).
        let Supply::Intervals(res) = Supply::periodic_resource(budget, period, HORIZON * 2, |_| pr.range(0, period - budget)) else {
            unreachable!()
        };
        let supply = Supply::Intervals(intersect(&res, &paused_supply(pause, every, &mut g, k % 2 == 0)));
        let out = simulate(sim::Policy::FixedPriorityPreemptive, &supply, &specs(&ts, &mut g, k), HORIZON);
        check("reservation with pauses", &ts, &a, &out);
    }
}

/// Stage 1's completions are released only at checkpoint acknowledgements (every `every`
/// from a random phase, later by up to `every`): with a hold of `every` on stage 1, stage 2's
/// responses and the end-to-end latencies stay within the bounds; without it they would not.
#[test]
fn held_output_holds_end_to_end() {
    let mut r = Rng(311);
    let mut g = gen::Rng::new(311);
    let mut exceeded_without = 0;
    for k in 0..150 {
        let n = r.int(1, 3) as usize;
        let s1 = random_taskset(&mut r, n, 60, k % 2 == 1);
        let every = r.pick(&[3i64, 5, 8, 12]);
        let mut sys = single_resource(&s1, dedicated(), Policy::FixedPriority);
        sys.resources.push(Resource { blackout: None, name: "cpu1".into(), kind: dedicated(), policy: Policy::FixedPriority, cycle: None });
        for i in 0..n {
            sys.tasks[i].hold = Some(q(every));
            sys.tasks.push(Task {
                hold: None,
                name: format!("u{i}"),
                resource: 1,
                input: Input::Task(i),
                wcet: q((s1[i].p / 4).max(1)),
                bcet: q(0),
                priority: Some(i as i64),
                deadline: None,
                slot: None,
                workload: None,
            });
            sys.chains.push(Chain { name: format!("c{i}"), tasks: vec![i, n + i], deadline: None });
        }
        let a = analyze(&sys, &Options::default()).unwrap();
        let mut unheld = sys.clone();
        unheld.tasks.iter_mut().for_each(|t| t.hold = None);
        let b = analyze(&unheld, &Options::default()).unwrap();
        let sp1 = specs(&s1, &mut g, k);
        let out1 = simulate(sim::Policy::FixedPriorityPreemptive, &Supply::Full, &sp1, HORIZON);
        let phase = g.range(0, every);
        let release = |c: i64| if c <= phase { phase } else { phase + (c - phase + every - 1) / every * every };
        let mut sp2 = Vec::new();
        let mut released = Vec::new();
        for i in 0..n {
            let done: Vec<(usize, i64)> =
                out1.tasks[i].completions.iter().enumerate().filter_map(|(j, c)| c.map(|c| (j, release(c)))).collect();
            let times: Vec<i64> = done.iter().map(|d| d.1).collect();
            let ex = gen::exec_times(times.len(), 0, int(&sys.tasks[n + i].wcet), &mut g, ExecMode::Wcet);
            sp2.push(TaskSpec::new(i as i64, 0, &times, &ex));
            released.push(done);
        }
        let out2 = simulate(sim::Policy::FixedPriorityPreemptive, &Supply::Full, &sp2, HORIZON * 2);
        for i in 0..n {
            let (Some(bound), Some(plain)) = (a.chains[i].worst.clone(), b.chains[i].worst.clone()) else { continue };
            assert!(bound >= &plain + &q(every) || a.chains[i].pboo.is_some(), "the hold is in the bound: {bound} vs {plain}");
            for (k2, c2) in out2.tasks[i].completions.iter().enumerate() {
                let (Some(c2), Some((j, _))) = (c2, released[i].get(k2)) else { continue };
                let latency = c2 - sp1[i].jobs[*j].release;
                assert!(q(latency) <= bound, "chain {i}: latency {latency} > bound {bound} ({:?})", a.chains[i]);
                exceeded_without += usize::from(q(latency) > plain);
            }
        }
    }
    assert!(exceeded_without > 0, "held output does exceed the bound that ignores it");
    eprintln!("{exceeded_without} end-to-end latencies above the bound without the hold");
}
