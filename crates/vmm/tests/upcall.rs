//! Timer upcalls and preemption inside a guest on real KVM (the `rt` guest): upcalls arrive
//! and their latency is measured; rate-monotonic and EDF schedules inside the guest finish their
//! jobs in the order an independent simulator (`sim`) gives for the same task set; a guest
//! preempted mid-job carries on exactly after snapshots and restores into new VMs and after a
//! takeover from a checkpoint replica (a pending upcall is part of the state).

mod common;

use common::{guest, skip_without_kvm, wait_for, Console};
use std::time::Duration;
use vmm::{channel_pair, Checkpoint, Command, Replica, Stop, Vm, VmConfig};

fn config(args: &[&str]) -> VmConfig {
    let mut c = VmConfig::new(guest("rt"), 16);
    c.args = args.iter().map(|a| a.to_string()).collect();
    c
}

/// Runs the vCPU thread under SCHED_FIFO when permitted, so that the host's other work
/// (builds, other tests) cannot stretch the guest's jobs and change their order.
fn fifo() {
    let p = libc::sched_param { sched_priority: 10 };
    // SAFETY: sets the calling thread's policy; `p` is a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) } != 0 {
        eprintln!("note: SCHED_FIFO refused ({}); the guest runs at normal priority", std::io::Error::last_os_error());
    }
}

fn run_to_end(config: VmConfig) -> String {
    let console = Console::default();
    let mut vm = Vm::create(config, console.boxed()).expect("create VM");
    let stop = std::thread::spawn(move || {
        fifo();
        vm.run(None)
    })
    .join()
    .expect("vCPU thread");
    assert_eq!(stop.expect("run"), Stop::Exited(0), "{}", console.text());
    console.text()
}

/// (task, job, release µs, start µs, end µs) of every `job` line.
fn jobs(out: &str) -> Vec<(usize, usize, i64, i64, i64)> {
    out.lines()
        .filter_map(|l| l.strip_prefix("job "))
        .map(|l| {
            let v: Vec<i64> = l.split(' ').map(|x| x.parse().expect("number")).collect();
            (v[0] as usize, v[1] as usize, v[2], v[3], v[4])
        })
        .collect()
}

fn summary(out: &str) -> String {
    out.lines().find(|l| l.starts_with("rt: done")).unwrap_or_else(|| panic!("no summary in {out}")).to_owned()
}

#[test]
fn upcalls_arrive_and_their_latency_is_measured() {
    if skip_without_kvm("upcalls_arrive_and_their_latency_is_measured") {
        return;
    }
    let out = run_to_end(config(&["upcall", "300"]));
    let line = out.lines().find(|l| l.starts_with("rt: upcall latency")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("n=300"), "{line}");
    eprintln!("{line}");
}

/// The completion order (task, job) the simulator gives for periodic tasks (C, T) released
/// together at 0, with deadlines = periods, over `horizon` µs.
fn simulated_order(policy: sim::Policy, tasks: &[(i64, i64)], horizon: i64) -> Vec<(usize, usize)> {
    let specs: Vec<sim::TaskSpec> = tasks
        .iter()
        .map(|&(c, t)| {
            let releases = sim::gen::periodic(t, 0, horizon);
            let execs = vec![c; releases.len()];
            sim::TaskSpec::new(t, t, &releases, &execs)
        })
        .collect();
    let r = sim::simulate(policy, &sim::Supply::Full, &specs, horizon * 4);
    let mut ends: Vec<(i64, usize, usize)> = Vec::new();
    for (i, o) in r.tasks.iter().enumerate() {
        for (k, c) in o.completions.iter().enumerate() {
            ends.push((c.expect("every job completes"), i, k));
        }
    }
    ends.sort();
    ends.into_iter().map(|(_, i, k)| (i, k)).collect()
}

/// Where the host stalled the guest: the first job that started more than 1 ms after it could
/// have started (its release, or the end of the job the guest ran before it: the guest slept
/// through its wake-up because the host did not run it; seen in CI: 3.7 ms, a nested host's vCPU
/// descheduled by the level-0 host), or that ran, apart from the jobs that preempted it, more
/// than 30 % longer than its execution time `exec[task]` (µs). Such a run measures the host,
/// not the guest's scheduler, and may finish jobs in another order than the simulator's
/// undisturbed schedule.
fn host_stall(jobs: &[(usize, usize, i64, i64, i64)], exec: &[i64]) -> Option<String> {
    let mut by_start = jobs.to_vec();
    by_start.sort_by_key(|j| j.3);
    let mut busy_until = 0;
    for &(task, job, release, start, end) in &by_start {
        let ready = release.max(busy_until);
        if start - ready > 1_000 {
            return Some(format!("job {task}/{job} could start at {ready} µs but started at {start} µs"));
        }
        busy_until = busy_until.max(end);
        let preempted: i64 = by_start.iter().filter(|j| j.3 > start && j.4 < end).map(|j| j.4 - j.3).sum();
        let own = end - start - preempted;
        if own * 10 > exec[task] * 13 {
            return Some(format!("job {task}/{job} ran {own} µs of its own, {} µs expected", exec[task]));
        }
    }
    None
}

#[test]
fn a_stalled_wakeup_and_a_stretched_job_are_told_from_an_undisturbed_run() {
    // Lines from the CI run that finished job 0/23 before 1/11: the guest woke 3.7 ms late.
    let exec = [1_500, 4_500, 7_500];
    let undisturbed = [
        (0, 20, 200_000, 200_032, 201_739),
        (1, 10, 200_000, 201_739, 206_505),
        (2, 5, 200_000, 206_505, 216_263),
        (0, 21, 210_000, 210_061, 211_754),
        (0, 22, 220_000, 220_040, 221_740),
        (1, 11, 220_000, 221_740, 226_520),
    ];
    assert_eq!(host_stall(&undisturbed, &exec), None);
    let late = [
        (0, 20, 200_000, 200_032, 201_739),
        (1, 10, 200_000, 201_739, 206_505),
        (2, 5, 200_000, 206_505, 216_263),
        (0, 21, 210_000, 210_061, 211_754),
        (0, 22, 220_000, 223_727, 225_473),
        (0, 23, 230_000, 230_063, 231_753),
        (1, 11, 220_000, 225_473, 232_120),
    ];
    assert_eq!(host_stall(&late, &exec).as_deref(), Some("job 0/22 could start at 220000 µs but started at 223727 µs"));
    // Job 2/5 above was preempted by 0/21 and ran 8065 µs of its own: not a stall; 3 ms more is.
    let mut stretched = undisturbed;
    stretched[2].4 += 3_000;
    assert_eq!(host_stall(&stretched, &exec).as_deref(), Some("job 2/5 ran 11065 µs of its own, 7500 µs expected"));
}

fn check_against_simulator(policy: &str, sim_policy: sim::Policy, tasks: &[(i64, i64)], horizon_ms: i64) -> Vec<(usize, usize)> {
    let mut args = vec![policy.to_string(), format!("ms={horizon_ms}")];
    args.extend(tasks.iter().map(|(c, t)| format!("{}.{:03}/{}", c / 1000, c % 1000, t / 1000)));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let exec: Vec<i64> = tasks.iter().map(|t| t.0).collect();
    // A run the host stalled is repeated (at most three runs); the one compared is undisturbed,
    // or the last one.
    let mut out = run_to_end(config(&args));
    for _ in 0..2 {
        match host_stall(&jobs(&out), &exec) {
            Some(why) => eprintln!("{policy}: the host stalled the guest ({why}); running again"),
            None => break,
        }
        out = run_to_end(config(&args));
    }
    let s = summary(&out);
    assert!(s.contains(" 0 dropped") && s.ends_with(" 0 wrong"), "{s}");
    let got = jobs(&out);
    for &(task, job, release, start, end) in &got {
        assert!(release <= start && start < end, "job {task}/{job}: release {release} start {start} end {end}");
        assert_eq!(release, job as i64 * tasks[task].1, "job {task}/{job} released off its period");
    }
    let order: Vec<(usize, usize)> = got.iter().map(|j| (j.0, j.1)).collect();
    let want = simulated_order(sim_policy, tasks, horizon_ms * 1000);
    assert_eq!(order, want, "{policy}: the guest's completion order differs from the simulator's\n{out}");
    eprintln!("{policy}: {} jobs in the simulator's order; {s}", order.len());
    order
}

#[test]
fn rate_monotonic_and_edf_inside_the_guest_match_the_simulator() {
    if skip_without_kvm("rate_monotonic_and_edf_inside_the_guest_match_the_simulator") {
        return;
    }
    // Three tasks (µs) whose completions all lie well away from any release, so that the order
    // is the same with execution times 25 % shorter to 30 % longer (a calibration disturbed by
    // the host, the VMM's and the scheduler's overhead; checked on the simulator by hand): the
    // lowest-priority one is preempted in each hyperperiod.
    let rm = [(1_500, 10_000), (4_500, 20_000), (7_500, 40_000)];
    check_against_simulator("rm", sim::Policy::FixedPriorityPreemptive, &rm, 240);
    // A set whose EDF schedule differs from its rate-monotonic one (checked on the simulator).
    let edf = [(2_500, 11_000), (4_500, 12_000)];
    let fp = simulated_order(sim::Policy::FixedPriorityPreemptive, &edf, 140_000);
    let order = check_against_simulator("edf", sim::Policy::Edf, &edf, 140);
    assert_ne!(order, fp, "the EDF set must tell EDF from rate monotonic");
}

#[test]
fn a_preempted_guest_carries_on_exactly_after_snapshots_and_a_takeover() {
    if skip_without_kvm("a_preempted_guest_carries_on_exactly_after_snapshots_and_a_takeover") {
        return;
    }
    // The guest runs on while the test snapshots, copies and checkpoints it: its horizon leaves
    // room for those steps on a loaded machine (600 ms was too short on CI: the guest ended
    // before the eighth checkpoint).
    const HORIZON_MS: usize = 2_000;
    let horizon = format!("ms={HORIZON_MS}");
    let args = ["rm", horizon.as_str(), "3/10", "7/25", "11/50"];
    let scratch = common::scratch("upcall-snap");
    let console = Console::default();
    let mut vm = Vm::create(config(&args), console.boxed()).expect("create VM");
    let mut text = String::new();
    // Three snapshots at unrelated moments, each restored into a new KVM VM.
    for (round, wait_ms) in [37u64, 91, 53].into_iter().enumerate() {
        let (ctl, inbox) = channel_pair().expect("control");
        let runner = std::thread::spawn(move || {
            let stop = vm.run(Some(&inbox));
            (vm, stop)
        });
        if round == 0 {
            wait_for("the first job", || console.text().contains("rt: cal"));
        }
        std::thread::sleep(Duration::from_millis(wait_ms));
        let dir = scratch.join(format!("snap{round}"));
        let r = ctl.call(Command::Snapshot { dir: dir.clone() });
        assert!(r.ok, "{r:?}");
        assert!(ctl.call(Command::Quit).ok);
        let (old, stop) = runner.join().expect("join");
        assert_eq!(stop.expect("run"), Stop::Quit);
        drop(old);
        vm = Vm::restore(&dir, &Default::default(), console.boxed()).expect("restore");
        vm.resume();
    }
    // Then protection and a takeover by a VM built from the replica.
    let (ctl, inbox) = channel_pair().expect("control");
    let config = vm.config().clone();
    let runner = std::thread::spawn(move || {
        let stop = vm.run(Some(&inbox));
        (vm, stop)
    });
    assert!(ctl.call(Command::Protect { mirror: None, hold: false, input: None }).ok);
    let view = ctl.call(Command::MemoryView).memory_view.expect("view");
    let mut replica = Replica::new(config).expect("replica");
    let mut all = vec![0u8; view.size() as usize];
    view.copy_range(0, &mut all).expect("copy");
    replica.write_pages(0, &all).expect("initial copy");
    let mut buffer = None;
    for i in 0..8 {
        std::thread::sleep(Duration::from_millis(13));
        let r = ctl.call(Command::Checkpoint { buffer: buffer.take() });
        let c: Checkpoint = *r
            .checkpoint
            .unwrap_or_else(|| panic!("checkpoint {i}: {:?}; guest: {}", r.error, console.text().lines().last().unwrap_or("")));
        replica.apply(&c).expect("apply");
        buffer = Some(c.data);
    }
    assert!(ctl.call(Command::Pause).ok);
    let last = *ctl.call(Command::Checkpoint { buffer }).checkpoint.expect("last checkpoint");
    replica.apply(&last).expect("apply");
    assert!(ctl.call(Command::Quit).ok);
    drop(runner.join().expect("join"));
    text.push_str(&console.text());
    let console2 = Console::default();
    let mut backup = Vm::from_replica(replica, &Default::default(), console2.boxed()).expect("takeover");
    backup.resume();
    let stop = std::thread::spawn(move || backup.run(None)).join().expect("join");
    assert_eq!(stop.expect("run"), Stop::Exited(0), "{}", console2.text());
    // Only the VM that ran to the end printed the jobs: all of them, none wrong.
    let out = console2.text();
    let s = summary(&out);
    assert!(s.ends_with(" 0 wrong") && s.contains(" 0 dropped"), "{s}");
    let got = jobs(&out);
    let want = HORIZON_MS / 10 + HORIZON_MS / 25 + HORIZON_MS / 50;
    assert_eq!(got.len(), want, "{out}");
    for t in 0..3 {
        let n: Vec<usize> = got.iter().filter(|j| j.0 == t).map(|j| j.1).collect();
        let mut sorted = n.clone();
        sorted.sort();
        assert_eq!(sorted, (0..n.len()).collect::<Vec<_>>(), "task {t}: every job once");
    }
    assert!(text.contains("rt: cal"), "{text}");
    eprintln!("after 3 snapshots and a takeover: {s}");
}
