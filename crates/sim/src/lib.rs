//! `sim` owns an exact, dependency-free discrete-event scheduling simulator
//! used by tests to check real-time-calculus bounds against simulated
//! behaviour.
//!
//! It is deliberately independent of every other crate of the workspace: it
//! shares no types or arithmetic with `rtc`, so agreement between the two is
//! meaningful evidence.
//!
//! * Time is integer ticks ([`i64`]); the simulator jumps between events
//!   (releases, completions, supply boundaries), so long horizons are cheap.
//! * [`Supply`] describes when the single processor is available.
//! * [`Policy`] selects the scheduler; [`simulate`] runs it and reports
//!   per-job completions and per-task response/backlog maxima.
//! * [`gen`] produces arrival traces and execution times, [`check`] measures
//!   traces against arrival curves.

pub mod check;
pub mod gen;

/// Availability of the processor over time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Supply {
    /// The processor is always available.
    Full,
    /// Sorted, disjoint, non-empty half-open intervals `[start, end)` during
    /// which the processor is available; unavailable everywhere else.
    Intervals(Vec<(i64, i64)>),
}

impl Supply {
    /// TDMA: a slot `[k*cycle + slot_start, k*cycle + slot_start + slot_len)`
    /// in every cycle `k` that starts before `horizon`.
    pub fn tdma(slot_start: i64, slot_len: i64, cycle: i64, horizon: i64) -> Supply {
        assert!(cycle > 0, "tdma: cycle must be positive");
        assert!(slot_len > 0, "tdma: slot_len must be positive");
        assert!(slot_start >= 0 && slot_start + slot_len <= cycle, "tdma: slot must lie within the cycle");
        Supply::periodic_resource(slot_len, cycle, horizon, |_| slot_start)
    }

    /// Periodic resource: in each period `k` (of length `period`, starting
    /// before `horizon`) the processor is available for one contiguous chunk
    /// of `budget` ticks starting at `k*period + placement(k)`, where
    /// `0 <= placement(k) <= period - budget`. Models periodic-resource / CBS
    /// servers whose budget may be consumed anywhere within each period.
    pub fn periodic_resource(budget: i64, period: i64, horizon: i64, mut placement: impl FnMut(usize) -> i64) -> Supply {
        assert!(period > 0, "periodic_resource: period must be positive");
        assert!((0..=period).contains(&budget), "periodic_resource: budget must be in [0, period]");
        let mut intervals = Vec::new();
        let mut k = 0usize;
        while (k as i64) * period < horizon {
            let offset = placement(k);
            assert!((0..=period - budget).contains(&offset), "periodic_resource: placement({k}) = {offset} outside [0, period - budget]");
            if budget > 0 {
                let start = k as i64 * period + offset;
                intervals.push((start, start + budget));
            }
            k += 1;
        }
        Supply::Intervals(intervals)
    }

    fn validate(&self) {
        if let Supply::Intervals(iv) = self {
            for (i, &(s, e)) in iv.iter().enumerate() {
                assert!(s < e, "Supply::Intervals: interval {i} [{s},{e}) is empty");
                if i > 0 {
                    assert!(iv[i - 1].1 <= s, "Supply::Intervals: interval {i} overlaps or is out of order");
                }
            }
        }
    }
}

/// Scheduling policy of the single processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Preemptive fixed priority (smaller `priority` = higher; ties by task index).
    FixedPriorityPreemptive,
    /// Non-preemptive fixed priority: a started job keeps the processor until
    /// it completes (supply gaps pause it, but nothing else may run).
    FixedPriorityNonPreemptive,
    /// Preemptive earliest deadline first (absolute deadline =
    /// release + relative deadline; ties by task index, then release).
    Edf,
    /// One FIFO queue over all tasks in release order (ties by task index).
    Fifo,
}

/// One job: released at `release`, needing `exec` ticks of processor time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Job {
    pub release: i64,
    pub exec: i64,
}

/// A task: a sequence of jobs served in FIFO order (a job starts only after
/// the previous job of the same task completed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskSpec {
    /// Fixed priority; a SMALLER number means a HIGHER priority.
    pub priority: i64,
    /// Relative deadline, used by [`Policy::Edf`].
    pub deadline: i64,
    /// Jobs, sorted by release; `exec >= 0`, `release >= 0`.
    pub jobs: Vec<Job>,
}

impl TaskSpec {
    /// Zip `releases` with `execs` (which must have the same length).
    pub fn new(priority: i64, deadline: i64, releases: &[i64], execs: &[i64]) -> TaskSpec {
        assert_eq!(releases.len(), execs.len(), "TaskSpec::new: length mismatch");
        let jobs = releases.iter().zip(execs).map(|(&release, &exec)| Job { release, exec }).collect();
        TaskSpec { priority, deadline, jobs }
    }
}

/// Observed behaviour of one task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskOutcome {
    /// Completion time per job; `None` if not finished by the horizon (or
    /// never released because its release is `>= horizon`).
    pub completions: Vec<Option<i64>>,
    /// Maximum of `completion - release` over finished jobs (0 if none).
    pub max_response: i64,
    /// Maximum number of released-but-unfinished jobs at any instant
    /// (completions at `t` are counted before releases at `t`; a zero-exec
    /// job released at `t` counts as backlogged at `t`).
    pub max_backlog: usize,
    /// Maximum pending (released, not yet executed) demand in ticks.
    pub max_backlog_work: i64,
}

impl TaskOutcome {
    fn empty(task: &TaskSpec) -> TaskOutcome {
        TaskOutcome { completions: vec![None; task.jobs.len()], max_response: 0, max_backlog: 0, max_backlog_work: 0 }
    }
}

/// Result of [`simulate`], one outcome per task in input order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimResult {
    pub tasks: Vec<TaskOutcome>,
    /// Maximum pending demand of all tasks together at any instant (ticks),
    /// measured like [`TaskOutcome::max_backlog_work`].
    pub max_total_backlog_work: i64,
}

/// Per-task mutable state during simulation.
struct State {
    /// Number of jobs released so far.
    released: usize,
    /// Index of the first unfinished job.
    head: usize,
    /// Remaining execution of job `head` (if it exists).
    remaining: i64,
    /// Remaining execution summed over released, unfinished jobs.
    pending_work: i64,
}

/// The task whose head job should get the processor at this instant, among
/// tasks whose head job is released (`running` is a started non-preemptive job).
fn select(policy: Policy, tasks: &[TaskSpec], st: &[State], running: Option<usize>) -> Option<usize> {
    if running.is_some() {
        return running;
    }
    let ready = (0..tasks.len()).filter(|&i| st[i].head < st[i].released);
    let head = |i: usize| tasks[i].jobs[st[i].head];
    match policy {
        Policy::FixedPriorityPreemptive | Policy::FixedPriorityNonPreemptive => ready.min_by_key(|&i| (tasks[i].priority, i)),
        Policy::Edf => ready.min_by_key(|&i| (head(i).release.saturating_add(tasks[i].deadline), i)),
        Policy::Fifo => ready.min_by_key(|&i| (head(i).release, i)),
    }
}

/// Simulate `tasks` on one processor with the given `supply` and `policy`
/// over `[0, horizon)`. Jobs released at or after `horizon` are ignored;
/// jobs completing exactly at `horizon` count as finished.
pub fn simulate(policy: Policy, supply: &Supply, tasks: &[TaskSpec], horizon: i64) -> SimResult {
    supply.validate();
    for (i, task) in tasks.iter().enumerate() {
        let mut prev = 0;
        for (k, job) in task.jobs.iter().enumerate() {
            assert!(job.exec >= 0 && job.release >= prev, "simulate: task {i} job {k}: need exec >= 0 and sorted releases >= 0");
            prev = job.release;
        }
    }
    let mut out: Vec<TaskOutcome> = tasks.iter().map(TaskOutcome::empty).collect();
    let mut st: Vec<State> =
        tasks.iter().map(|t| State { released: 0, head: 0, remaining: t.jobs.first().map_or(0, |j| j.exec), pending_work: 0 }).collect();
    let complete = |i: usize, t: i64, st: &mut [State], out: &mut [TaskOutcome]| {
        let s = &mut st[i];
        let job = tasks[i].jobs[s.head];
        out[i].completions[s.head] = Some(t);
        out[i].max_response = out[i].max_response.max(t - job.release);
        s.head += 1;
        s.remaining = tasks[i].jobs.get(s.head).map_or(0, |j| j.exec);
    };

    let mut t: i64 = 0;
    let mut running: Option<usize> = None; // started non-preemptive job
    let mut cursor = 0usize; // first supply interval with end > t
    let mut max_total = 0i64;
    while t < horizon {
        // Releases at or before t (completions at t were already processed).
        let mut next_release = i64::MAX;
        for (i, s) in st.iter_mut().enumerate() {
            let jobs = &tasks[i].jobs;
            while s.released < jobs.len() && jobs[s.released].release <= t {
                s.pending_work += jobs[s.released].exec;
                s.released += 1;
            }
            if let Some(j) = jobs.get(s.released) {
                next_release = next_release.min(j.release);
            }
            let o = &mut out[i];
            o.max_backlog = o.max_backlog.max(s.released - s.head);
            o.max_backlog_work = o.max_backlog_work.max(s.pending_work);
        }
        max_total = max_total.max(st.iter().map(|s| s.pending_work).sum());
        // Choose a job; zero-exec jobs complete instantly when chosen.
        let chosen = loop {
            match select(policy, tasks, &st, running) {
                Some(i) if st[i].remaining == 0 => {
                    complete(i, t, &mut st, &mut out);
                    running = None;
                }
                other => break other,
            }
        };
        // Supply state at t: (available?, next instant at which it changes).
        let (available, change) = match supply {
            Supply::Full => (true, i64::MAX),
            Supply::Intervals(iv) => {
                while cursor < iv.len() && iv[cursor].1 <= t {
                    cursor += 1;
                }
                match iv.get(cursor) {
                    Some(&(s, e)) if s <= t => (true, e),
                    Some(&(s, _)) => (false, s),
                    None => (false, i64::MAX),
                }
            }
        };
        let Some(i) = chosen.filter(|_| available) else {
            // Idle (no work) or waiting for supply: jump to the next event.
            let wake = if chosen.is_some() { change } else { i64::MAX };
            t = next_release.min(wake).min(horizon);
            continue;
        };
        let end = t.saturating_add(st[i].remaining).min(change).min(next_release).min(horizon);
        st[i].remaining -= end - t;
        st[i].pending_work -= end - t;
        t = end;
        if st[i].remaining == 0 {
            complete(i, t, &mut st, &mut out);
            running = None;
        } else if policy == Policy::FixedPriorityNonPreemptive {
            running = Some(i);
        }
    }
    SimResult { tasks: out, max_total_backlog_work: max_total }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn periodic_task(prio: i64, c: i64, p: i64, horizon: i64) -> TaskSpec {
        let r = gen::periodic(p, 0, horizon);
        TaskSpec::new(prio, p, &r, &vec![c; r.len()])
    }

    fn rm_set(h: i64) -> Vec<TaskSpec> {
        vec![periodic_task(1, 1, 4, h), periodic_task(2, 2, 6, h), periodic_task(3, 3, 12, h)]
    }

    fn responses(r: &SimResult) -> Vec<i64> {
        r.tasks.iter().map(|t| t.max_response).collect()
    }

    fn completions(r: &SimResult, i: usize) -> Vec<i64> {
        r.tasks[i].completions.iter().map(|c| c.unwrap_or(-1)).collect()
    }

    #[test]
    fn fp_preemptive_rate_monotonic() {
        let r = simulate(Policy::FixedPriorityPreemptive, &Supply::Full, &rm_set(12), 12);
        assert_eq!(responses(&r), vec![1, 3, 10]);
        assert_eq!(completions(&r, 0), vec![1, 5, 9]);
        assert_eq!(completions(&r, 1), vec![3, 8]);
        assert_eq!(completions(&r, 2), vec![10]);
    }

    #[test]
    fn fp_non_preemptive() {
        // 0-1 t0, 1-3 t1, 3-6 t2 (blocks t0@4), 6-7 t0, 7-9 t1@6, 9-10 t0@8.
        let r = simulate(Policy::FixedPriorityNonPreemptive, &Supply::Full, &rm_set(12), 12);
        assert_eq!(completions(&r, 0), vec![1, 7, 10]);
        assert_eq!(completions(&r, 1), vec![3, 9]);
        assert_eq!(completions(&r, 2), vec![6]);
        assert_eq!(responses(&r), vec![3, 3, 6]);
    }

    #[test]
    fn edf_meets_deadlines_where_fp_fails() {
        // (C,T=D): (2,4), (3,6), U = 1.
        let tasks = vec![periodic_task(1, 2, 4, 12), periodic_task(2, 3, 6, 12)];
        let r = simulate(Policy::Edf, &Supply::Full, &tasks, 12);
        // 0-2 a, 2-5 b (a@4 has d=8 > 6), 5-7 a, 7-8 b, 8-10 a (tie d=12, index wins), 10-12 b.
        assert_eq!(completions(&r, 0), vec![2, 7, 10]);
        assert_eq!(completions(&r, 1), vec![5, 12]);
        assert_eq!(responses(&r), vec![3, 6]);
        let fp = simulate(Policy::FixedPriorityPreemptive, &Supply::Full, &tasks, 12);
        assert_eq!(fp.tasks[1].completions[0], Some(7)); // misses deadline 6
    }

    #[test]
    fn fifo_ignores_priorities() {
        let tasks = vec![TaskSpec::new(9, 0, &[1, 2, 8], &[3, 1, 1]), TaskSpec::new(0, 0, &[0, 3, 8], &[2, 1, 1])];
        let r = simulate(Policy::Fifo, &Supply::Full, &tasks, 20);
        assert_eq!(completions(&r, 0), vec![5, 6, 9]);
        assert_eq!(completions(&r, 1), vec![2, 7, 10]);
        assert_eq!(r.tasks[0].max_backlog, 2);
        assert_eq!(r.tasks[0].max_backlog_work, 4); // both pending at t=2
                                                    // t=1: 3 (task 0) + 1 left of task 1's first job; t=2 and t=3 also 4 in all.
        assert_eq!(r.max_total_backlog_work, 4);
    }

    #[test]
    fn tdma_slot() {
        let supply = Supply::tdma(2, 3, 10, 100);
        let tasks = vec![TaskSpec::new(0, 0, &[0, 14, 30], &[4, 1, 7])];
        let r = simulate(Policy::FixedPriorityPreemptive, &supply, &tasks, 100);
        // 2-5 + 12-13; 14-15; 32-35, 42-45, 52-53.
        assert_eq!(completions(&r, 0), vec![13, 15, 53]);
        assert_eq!(r.tasks[0].max_response, 23);
    }

    #[test]
    fn periodic_resource_blackout() {
        // Budget at the end of even periods, at the start of odd ones:
        // supply [3,5) [5,7) [13,15) [15,17) ... -> blackout [7,13) = 2(P-Q).
        let (q, p) = (2, 5);
        let supply = Supply::periodic_resource(q, p, 50, |k| if k % 2 == 0 { p - q } else { 0 });
        let tasks = vec![TaskSpec::new(0, 0, &[0, 7], &[4, 2])];
        let r = simulate(Policy::FixedPriorityPreemptive, &supply, &tasks, 50);
        assert_eq!(completions(&r, 0), vec![7, 15]);
        assert_eq!(r.tasks[0].max_response, 2 * (p - q) + q);
    }

    #[test]
    fn non_preemptive_job_keeps_processor_across_gap() {
        // Low-priority job starts at 0, paused by the gap [2,5); the
        // high-priority job released at 1 must wait until it completes.
        let supply = Supply::Intervals(vec![(0, 2), (5, 100)]);
        let tasks = vec![TaskSpec::new(0, 0, &[1], &[1]), TaskSpec::new(1, 0, &[0], &[3])];
        let np = simulate(Policy::FixedPriorityNonPreemptive, &supply, &tasks, 100);
        assert_eq!((completions(&np, 0), completions(&np, 1)), (vec![7], vec![6]));
        let p = simulate(Policy::FixedPriorityPreemptive, &supply, &tasks, 100);
        assert_eq!((completions(&p, 0), completions(&p, 1)), (vec![2], vec![7]));
    }

    #[test]
    fn backlog_counts_completion_before_release() {
        let tasks = vec![periodic_task(0, 2, 2, 10), TaskSpec::new(1, 0, &[0, 0, 0], &[1, 0, 1])];
        let r = simulate(Policy::FixedPriorityPreemptive, &Supply::Full, &tasks, 10);
        let b: Vec<_> = r.tasks.iter().map(|t| (t.max_backlog, t.max_backlog_work)).collect();
        assert_eq!(b, vec![(1, 2), (3, 2)]);
        assert_eq!(r.tasks[1].completions, vec![None, None, None]); // starved
    }

    #[test]
    fn horizon_cuts_unfinished_jobs() {
        let tasks = vec![TaskSpec::new(0, 0, &[0, 5, 10], &[7, 1, 1])];
        let r = simulate(Policy::Fifo, &Supply::Full, &tasks, 8);
        assert_eq!(r.tasks[0].completions, vec![Some(7), Some(8), None]);
        assert_eq!(r.tasks[0].max_response, 7);
    }

    #[test]
    fn long_horizon_is_fast() {
        let h = 10_000_000;
        let tasks = vec![periodic_task(1, 3, 10, h), periodic_task(2, 7, 25, h)];
        let supply = Supply::tdma(0, 8, 10, h);
        let r = simulate(Policy::FixedPriorityPreemptive, &supply, &tasks, h);
        assert!(r.tasks.iter().all(|t| t.completions.iter().rev().skip(1).all(Option::is_some)));
    }

    /// Independent tick-by-tick reference implementation of the same semantics.
    fn reference(policy: Policy, supply: &Supply, tasks: &[TaskSpec], horizon: i64) -> SimResult {
        let n = tasks.len();
        let mut rem: Vec<Vec<i64>> = tasks.iter().map(|t| t.jobs.iter().map(|j| j.exec).collect()).collect();
        let (mut released, mut head) = (vec![0usize; n], vec![0usize; n]);
        let mut out: Vec<TaskOutcome> = tasks.iter().map(TaskOutcome::empty).collect();
        let mut running: Option<usize> = None;
        let mut max_total = 0i64;
        for t in 0..horizon {
            let mut total = 0;
            for i in 0..n {
                while released[i] < tasks[i].jobs.len() && tasks[i].jobs[released[i]].release <= t {
                    released[i] += 1;
                }
                let o = &mut out[i];
                o.max_backlog = o.max_backlog.max(released[i] - head[i]);
                let pending: i64 = rem[i][head[i]..released[i]].iter().sum();
                o.max_backlog_work = o.max_backlog_work.max(pending);
                total += pending;
            }
            max_total = max_total.max(total);
            let avail = match supply {
                Supply::Full => true,
                Supply::Intervals(iv) => iv.iter().any(|&(s, e)| s <= t && t < e),
            };
            loop {
                let key = |i: usize| {
                    let j = tasks[i].jobs[head[i]];
                    match policy {
                        Policy::Edf => (j.release + tasks[i].deadline, i),
                        Policy::Fifo => (j.release, i),
                        _ => (tasks[i].priority, i),
                    }
                };
                let pick = running.or_else(|| (0..n).filter(|&i| head[i] < released[i]).min_by_key(|&i| key(i)));
                let Some(i) = pick else { break };
                let k = head[i];
                if rem[i][k] > 0 {
                    if !avail {
                        break;
                    }
                    rem[i][k] -= 1;
                    running = Some(i).filter(|_| policy == Policy::FixedPriorityNonPreemptive);
                    if rem[i][k] > 0 {
                        break;
                    }
                }
                let c = if tasks[i].jobs[k].exec == 0 { t } else { t + 1 };
                out[i].completions[k] = Some(c);
                out[i].max_response = out[i].max_response.max(c - tasks[i].jobs[k].release);
                head[i] += 1;
                running = None;
                if c > t {
                    break;
                }
            }
        }
        SimResult { tasks: out, max_total_backlog_work: max_total }
    }

    #[test]
    fn event_driven_matches_unit_stepping() {
        let mut rng = gen::Rng::new(7);
        let policies = [Policy::FixedPriorityPreemptive, Policy::FixedPriorityNonPreemptive, Policy::Edf, Policy::Fifo];
        for _ in 0..200 {
            let horizon = 120;
            let n = rng.range(1, 4) as usize;
            let tasks: Vec<TaskSpec> = (0..n)
                .map(|_| {
                    let rel = gen::sporadic(rng.range(3, 15), rng.range(0, 10), horizon, &mut rng);
                    let ex = gen::exec_times(rel.len(), 0, 6, &mut rng, gen::ExecMode::Random);
                    TaskSpec::new(rng.range(0, 3), rng.range(1, 30), &rel, &ex)
                })
                .collect();
            let (q, p) = (rng.range(1, 6), 6);
            let supply = if rng.range(0, 1) == 0 {
                Supply::Full
            } else {
                let mut r2 = gen::Rng::new(rng.next_u64());
                Supply::periodic_resource(q, p, horizon, move |_| r2.range(0, p - q))
            };
            for &pol in &policies {
                assert_eq!(
                    simulate(pol, &supply, &tasks, horizon),
                    reference(pol, &supply, &tasks, horizon),
                    "{pol:?} {supply:?} {tasks:?}"
                );
            }
        }
    }
}
