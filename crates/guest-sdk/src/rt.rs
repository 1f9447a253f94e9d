//! A real-time runtime for guests: periodic tasks under preemptive fixed-priority (rate
//! monotonic) or EDF scheduling, switched on timer upcalls ([`crate::upcall`]).
//!
//! Each task has its own stack and runs jobs of CPU-bound work of a calibrated length
//! ([`work`], [`calibrate`]): iterations of a loop, so a preempted job keeps its remaining
//! work. Releases are strictly periodic from a common start; the scheduler runs in the upcall
//! dispatch (masked, allocation-free, on preallocated state): at each release it arms the next
//! upcall, picks the highest-priority pending job and resumes its context; when no job is
//! pending it idles until the next release. Every job's release, first start and end (guest
//! clock, ns) is recorded; [`run`] returns them once every job released before the horizon
//! has ended. Jobs are also marked in the trace ring ([`crate::trace`]: start and end, id =
//! task << 24 | job), where the host's monitoring reads them.

use crate::upcall::{self, REASON_TIMER};
use alloc::vec::Vec;
use vmm_abi::UpcallFrame;

/// A periodic task: execution time, period and relative deadline, in µs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Task {
    pub exec_us: u64,
    pub period_us: u64,
    pub deadline_us: u64,
}

/// The scheduling policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Fixed priorities by period, shortest first (ties: the earlier task).
    RateMonotonic,
    /// Earliest absolute deadline first (ties: the earlier task).
    Edf,
}

/// One job's record (guest clock, ns).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Job {
    pub task: u32,
    pub job: u32,
    pub release_ns: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Time the job ran (its share of the time between releases and end, excluding
    /// preemptions and the scheduler's own work).
    pub exec_ns: u64,
}

/// What [`run`] measured.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Every job, in the order they ended.
    pub jobs: Vec<Job>,
    /// Jobs released while 256 of the same task were still pending (not run, not recorded).
    pub dropped: u64,
    /// Upcalls delivered and the largest delivery latency seen (deadline → handler, ns).
    pub upcalls: u64,
    pub max_upcall_latency_ns: u64,
    /// Jobs whose work gave another result than the same work run undisturbed before the start:
    /// a context switch that lost or damaged a register (always 0 unless something is broken).
    pub wrong: u64,
}

static WRONG: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Busy work of `iterations` steps of a dependent integer recurrence (no memory traffic, not
/// optimisable away): a nearly constant execution time per step on a given CPU.
#[inline(never)]
pub fn work(iterations: u64) -> u64 {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..iterations {
        x = core::hint::black_box(x.rotate_left(7) ^ i).wrapping_mul(0x2545_F491_4F6C_DD1D);
    }
    x
}

/// Iterations of [`work`] per microsecond on this vCPU: the fastest of `trials` timed runs of
/// about 2 ms (TSC-timed, so the slow trials are the preempted ones).
pub fn calibrate(trials: u32) -> u64 {
    let per_us = crate::trace::tsc_per_us();
    let chunk = 200_000u64;
    let mut best = 0u64;
    for _ in 0..trials.max(1) {
        let t0 = crate::trace::tsc();
        work(chunk);
        let us = ((crate::trace::tsc() - t0) / per_us).max(1);
        best = best.max(chunk / us);
    }
    best.max(1)
}

const QUEUE: usize = 256;
const STACK: usize = 64 << 10;
const MAIN: usize = usize::MAX;
const REASON_DONE: usize = 1;
const REASON_START: usize = 2;

struct TaskState {
    spec: Task,
    /// What a job's work yields.
    expected: u64,
    frame: *mut UpcallFrame,
    next_release: u64,
    /// Pending releases (a ring).
    queue: [u64; QUEUE],
    head: usize,
    len: usize,
    /// The front job has run at some point: its start time.
    started: Option<u64>,
    /// Time the front job has run so far, and when it last got the CPU.
    ran: u64,
    switched_in: u64,
    jobs: u32,
    _stack: Vec<u8>,
}

struct Sched {
    policy: Policy,
    tasks: Vec<TaskState>,
    current: usize,
    main: *mut UpcallFrame,
    horizon_end: u64,
    iters_per_us: u64,
    out: Outcome,
}

static mut SCHED: Option<Sched> = None;

/// The scheduler's state. Only the dispatch function (masked) and `run` (before the first
/// switch and after the last) touch it; tasks read their immutable spec.
#[allow(static_mut_refs)]
fn sched() -> &'static mut Sched {
    // SAFETY: single vCPU; see above. `run` sets it before any dispatch can happen.
    unsafe { SCHED.as_mut().unwrap_or_else(|| crate::exit(120)) }
}

extern "C" fn task_main(index: usize) -> ! {
    let (exec_us, per_us, expected) = {
        let s = sched();
        (s.tasks[index].spec.exec_us, s.iters_per_us, s.tasks[index].expected)
    };
    loop {
        if work(exec_us * per_us) != expected {
            WRONG.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        }
        upcall::switch_out(REASON_DONE);
    }
}

impl Sched {
    fn release_due(&mut self, now: u64) {
        for t in &mut self.tasks {
            while t.next_release <= now && t.next_release < self.horizon_end {
                if t.len < QUEUE {
                    t.queue[(t.head + t.len) % QUEUE] = t.next_release;
                    t.len += 1;
                } else {
                    self.out.dropped += 1;
                }
                t.next_release += t.spec.period_us * 1000;
            }
        }
    }

    fn next_release(&self) -> u64 {
        self.tasks.iter().map(|t| t.next_release).filter(|&r| r < self.horizon_end).min().unwrap_or(u64::MAX)
    }

    fn pick(&self) -> Option<usize> {
        let key = |i: usize, t: &TaskState| match self.policy {
            Policy::RateMonotonic => (t.spec.period_us, i),
            Policy::Edf => (t.queue[t.head] + t.spec.deadline_us * 1000, i),
        };
        self.tasks.iter().enumerate().filter(|(_, t)| t.len > 0).min_by_key(|(i, t)| key(*i, t)).map(|(i, _)| i)
    }

    fn dispatch(&mut self, frame: *mut UpcallFrame, reason: usize) -> *mut UpcallFrame {
        let mut now = if reason == REASON_TIMER {
            let b = upcall::state();
            self.out.upcalls += 1;
            self.out.max_upcall_latency_ns = self.out.max_upcall_latency_ns.max(b.entered_ns.saturating_sub(b.fired_ns));
            b.entered_ns
        } else {
            crate::now_ns()
        };
        if self.current == MAIN {
            self.main = frame;
        } else {
            let c = self.current;
            let t = &mut self.tasks[c];
            t.frame = frame;
            t.ran += now.saturating_sub(t.switched_in);
            if reason == REASON_DONE && t.len > 0 {
                let release_ns = t.queue[t.head];
                let start_ns = t.started.take().unwrap_or(release_ns);
                t.head = (t.head + 1) % QUEUE;
                t.len -= 1;
                let job = Job { task: c as u32, job: t.jobs, release_ns, start_ns, end_ns: now, exec_ns: core::mem::take(&mut t.ran) };
                // The host's monitoring sees the job too (trace marks: no exit).
                crate::trace::end(mark_id(c, t.jobs));
                t.jobs += 1;
                if self.out.jobs.len() < self.out.jobs.capacity() {
                    self.out.jobs.push(job);
                }
            }
        }
        loop {
            self.release_due(now);
            if let Some(i) = self.pick() {
                let t = &mut self.tasks[i];
                if t.started.is_none() {
                    crate::trace::start(mark_id(i, t.jobs));
                }
                t.started.get_or_insert(now);
                t.switched_in = now;
                self.current = i;
                upcall::arm(self.next_release());
                return self.tasks[i].frame;
            }
            let next = self.next_release();
            if next == u64::MAX {
                self.current = MAIN;
                upcall::arm(u64::MAX);
                return self.main;
            }
            now = crate::clock::idle(next).now_ns;
        }
    }
}

/// A job's identity in the trace marks: the task in the top byte, the job number below.
fn mark_id(task: usize, job: u32) -> u32 {
    ((task as u32) << 24) | (job & 0x00ff_ffff)
}

fn dispatch(frame: *mut UpcallFrame, reason: usize) -> *mut UpcallFrame {
    sched().dispatch(frame, reason)
}

/// Runs `tasks` under `policy`, releasing jobs together from about 1 ms from now (rounded up to
/// a multiple of `align_ns` of the guest clock, if not 0) for `horizon_ms`, with [`work`] at
/// `iters_per_us` iterations per µs of execution time; returns when every released job has
/// ended.
pub fn run(policy: Policy, tasks: &[Task], horizon_ms: u64, iters_per_us: u64, align_ns: u64) -> Outcome {
    let expected: Vec<u64> = tasks.iter().map(|t| work(t.exec_us * iters_per_us)).collect();
    WRONG.store(0, core::sync::atomic::Ordering::Relaxed);
    let t0 = crate::now_ns() + 1_000_000;
    let t0 = if align_ns > 0 { t0.div_ceil(align_ns) * align_ns } else { t0 };
    let horizon_end = t0 + horizon_ms * 1_000_000;
    let capacity: u64 = tasks.iter().map(|t| horizon_ms * 1000 / t.period_us.max(1) + 1).sum();
    let mut states = Vec::with_capacity(tasks.len());
    for (i, spec) in tasks.iter().enumerate() {
        let mut stack = alloc::vec![0u8; STACK];
        let top = stack.as_mut_ptr() as u64 + STACK as u64;
        // SAFETY: the stack is this task's alone and lives in the scheduler as long as it runs.
        let frame = unsafe { upcall::new_frame(top, task_main, i) };
        states.push(TaskState {
            spec: *spec,
            expected: expected[i],
            frame,
            next_release: t0,
            queue: [0; QUEUE],
            head: 0,
            len: 0,
            started: None,
            ran: 0,
            switched_in: 0,
            jobs: 0,
            _stack: stack,
        });
    }
    let out = Outcome { jobs: Vec::with_capacity(capacity as usize), ..Outcome::default() };
    // SAFETY: no dispatch can run before `register`.
    unsafe {
        SCHED = Some(Sched { policy, tasks: states, current: MAIN, main: core::ptr::null_mut(), horizon_end, iters_per_us, out });
    }
    upcall::register(dispatch);
    upcall::switch_out(REASON_START);
    upcall::arm(u64::MAX);
    upcall::mask();
    // SAFETY: every task is parked (no job pending, no release left): nothing runs but us.
    let s = unsafe { (*core::ptr::addr_of_mut!(SCHED)).take() };
    let mut out = s.map(|s| s.out).unwrap_or_default();
    out.wrong = WRONG.load(core::sync::atomic::Ordering::Relaxed);
    out
}
