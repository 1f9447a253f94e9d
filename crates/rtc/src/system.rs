//! A system of resources, event streams, tasks and chains, analysed as a network of components.
//!
//! Everything is addressed by index; names exist only for error messages and reports (the
//! `model` crate maps a file onto these types and the results back onto names). Time is in
//! whatever unit the caller chose (the `model` crate uses microseconds); a resource serves
//! `rate` units of work per time unit, and a task's execution demand is in units of work
//! (processing time at rate 1 for processors, bytes for links).

use crate::models::{EventModel, SupplyModel, WorkloadCurve};
use crate::q::Q;
use crate::Curve;

/// How a resource provides service.
#[derive(Debug, Clone, PartialEq)]
pub enum ResourceKind {
    /// A dedicated processor or link serving `rate` work units per time unit.
    Dedicated { rate: Q },
    /// Service at `rate` after at most `latency` (a bounded-delay resource).
    BoundedDelay { rate: Q, latency: Q },
    /// A CBS hard reservation (budget `budget` every `period`) on processor `host` — a VM's
    /// vCPU. Its tasks see the supply of `supply`.
    Reservation { host: usize, budget: Q, period: Q, supply: SupplyModel },
}

/// How a resource shares its service among the tasks mapped to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Preemptive fixed priority (smaller number = higher priority).
    FixedPriority,
    /// Non-preemptive fixed priority.
    FixedPriorityNonPreemptive,
    /// Preemptive earliest deadline first (tasks need a deadline).
    Edf,
    /// One FIFO queue for all tasks.
    Fifo,
    /// Each task owns a slot of the cycle (tasks need a slot).
    Tdma,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub name: String,
    pub kind: ResourceKind,
    pub policy: Policy,
    /// TDMA cycle length (only for [`Policy::Tdma`]).
    pub cycle: Option<Q>,
    /// The resource stops serving for up to `pause` once every `every` (a protected VM paused
    /// for its checkpoints): its lower service loses what those pauses could take.
    pub blackout: Option<Blackout>,
}

/// Periodic pauses of a resource: at most `pause` once per `every` (0 < pause < every).
#[derive(Debug, Clone, PartialEq)]
pub struct Blackout {
    pub pause: Q,
    pub every: Q,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stream {
    pub name: String,
    pub model: EventModel,
}

/// Where a task's activations come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Stream(usize),
    /// The completions of another task (the previous hop of a chain).
    Task(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub name: String,
    pub resource: usize,
    pub input: Input,
    /// Worst-case and best-case demand per activation, in work units.
    pub wcet: Q,
    pub bcet: Q,
    pub priority: Option<i64>,
    /// Relative deadline (needed for EDF; checked for every policy when given).
    pub deadline: Option<Q>,
    /// TDMA slot length (only on TDMA resources).
    pub slot: Option<Q>,
    /// Work of k consecutive activations, tighter than k·wcet / k·bcet (optional).
    pub workload: Option<WorkloadCurve>,
    /// Each completion is released up to this long after it (output held until a checkpoint
    /// that covers it is acknowledged): consumers see the completions with that much more
    /// jitter, and a chain through the task takes that much longer.
    pub hold: Option<Q>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    pub name: String,
    /// Tasks in order; each one's input is the previous one.
    pub tasks: Vec<usize>,
    pub deadline: Option<Q>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct System {
    pub resources: Vec<Resource>,
    pub streams: Vec<Stream>,
    pub tasks: Vec<Task>,
    pub chains: Vec<Chain>,
}

/// Upper and lower curves of one quantity.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounds {
    pub upper: Curve,
    pub lower: Curve,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskResult {
    /// Worst-case response time (activation to completion); `None` when unbounded.
    pub wcrt: Option<Q>,
    /// Best-case response time.
    pub bcrt: Q,
    /// Largest number of pending activations (events); `None` when unbounded. Exact (the
    /// vertical deviation) for tasks with a service of their own (fixed priority, TDMA, on
    /// any resource); for EDF and FIFO the activations of one WCRT window (sound).
    pub backlog: Option<Q>,
    /// Largest pending work (work units: processing time, or bytes on a link), with the same
    /// provenance as `backlog`; for EDF and FIFO also at most the resource's total.
    pub backlog_work: Option<Q>,
    /// Activation arrival curves (events).
    pub input: Bounds,
    /// Completion arrival curves (events).
    pub output: Bounds,
    /// Service available to this task (work units).
    pub service: Bounds,
    /// Provenance of `service`: `None` when it is the exact service; `Some(h)` when the
    /// fixed-priority analysis kept it truncated at the horizon `h` (exact before `h`, a lower
    /// bound after it; the task's own bounds are still exact, see `docs/analysis.md` §9).
    pub service_exact_until: Option<Q>,
    /// Which analysis produced the bound.
    pub method: &'static str,
    /// Why no bound could be given, when `wcrt` is `None`.
    pub problem: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChainResult {
    /// Worst-case end-to-end latency (the smaller of the two bounds below).
    pub worst: Option<Q>,
    pub best: Q,
    /// Sum of per-hop worst-case response times.
    pub per_hop: Option<Q>,
    /// Pay-bursts-only-once bound (concatenated service curves), where valid.
    pub pboo: Option<Q>,
    pub deadline: Option<Q>,
    pub slack: Option<Q>,
    pub meets_deadline: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResourceResult {
    /// Long-run demand over long-run capacity.
    pub utilisation: Q,
    /// Long-run capacity in work units per time unit.
    pub capacity: Q,
    /// Supply model used for a reservation's tasks.
    pub supply: Option<SupplyModel>,
    /// For a reservation: the smallest budget (for its period, on a grid of `budget_step`)
    /// that keeps every inner task's deadline, under the declared supply model.
    pub min_budget: Option<Q>,
    /// For a reservation with inner deadlines: the smallest budget under each supply model
    /// (the declared one first), on the grid and exactly.
    pub min_budgets: Vec<MinBudget>,
    /// Largest pending work of all its tasks together (work units), exact, for resources
    /// scheduled EDF or FIFO (one shared queue or buffer); `None` for the others.
    pub backlog: Option<Q>,
    pub problem: Option<String>,
}

/// The smallest budget of a reservation (for its period) that keeps every inner task's
/// deadline under one supply model, with the reservation's inputs held fixed.
#[derive(Debug, Clone, PartialEq)]
pub struct MinBudget {
    pub supply: SupplyModel,
    /// The smallest multiple of [`Options::budget_step`] (capped at the period); `None` when
    /// even the whole period misses a deadline.
    pub grid: Option<Q>,
    /// The exact smallest budget, a rational (`docs/analysis.md` §5); `None` when even the
    /// whole period misses a deadline, or when the demands are not staircases (then only the
    /// grid value is known).
    pub exact: Option<Q>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    pub tasks: Vec<TaskResult>,
    pub chains: Vec<ChainResult>,
    pub resources: Vec<ResourceResult>,
    /// Fixed-point iterations needed (1 when the dependency graph is acyclic).
    pub iterations: usize,
}

impl Analysis {
    /// Every task deadline and chain deadline holds, and every bound is finite.
    pub fn all_deadlines_met(&self, sys: &System) -> bool {
        let tasks_ok = self.tasks.iter().zip(&sys.tasks).all(|(r, t)| match (&t.deadline, &r.wcrt) {
            (Some(d), Some(w)) => w <= d,
            (Some(_), None) => false,
            (None, w) => w.is_some(),
        });
        let chains_ok = self.chains.iter().all(|c| c.meets_deadline != Some(false) && c.worst.is_some());
        let res_ok = self.resources.iter().all(|r| r.problem.is_none());
        tasks_ok && chains_ok && res_ok
    }
}

/// Options of the analysis.
#[derive(Debug, Clone)]
pub struct Options {
    /// Granularity of the minimal-budget search for reservations.
    pub budget_step: Q,
    /// Compute completion curves with the full GPC formulas (tighter, slower) in addition to
    /// jitter propagation.
    pub gpc_outputs: bool,
    /// Stop fixed-point iteration of cyclic dependencies after this many rounds.
    pub max_iterations: usize,
    /// Report every task's service curve ([`TaskResult::service`]) as the analysis computes
    /// it. When false, the tasks of a preemptive fixed-priority processor (dedicated, without
    /// blackout) whose activations all come from standard event models and which no chain of
    /// several tasks passes through are analysed by the busy-window recurrences
    /// (`docs/analysis.md` §9) instead of curves: every delay, backlog, completion curve and
    /// verdict is the same, and their reported service is a rate-latency lower bound
    /// (`service_exact_until` 0). Much faster; plots want it true.
    pub service_curves: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options { budget_step: Q::one(), gpc_outputs: false, max_iterations: 50, service_curves: true }
    }
}

/// Why a system cannot be analysed at all (as opposed to a deadline being missed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnalysisError {
    #[error("task {task:?}: {msg}")]
    Task { task: String, msg: String },
    #[error("resource {resource:?}: {msg}")]
    Resource { resource: String, msg: String },
    #[error("stream {stream:?}: {msg}")]
    Stream { stream: String, msg: String },
    #[error("chain {chain:?}: {msg}")]
    Chain { chain: String, msg: String },
}

/// Analyses the whole system.
///
/// Fixed-priority service curves are kept truncated at a horizon that is verified for each
/// task (`docs/analysis.md` §9): every delay, backlog, completion curve, verdict and chain worst
/// case is the one the exact curves give, while [`TaskResult::service`] may be a lower bound
/// after [`TaskResult::service_exact_until`] and [`ChainResult::pboo`] may be looser where it
/// is not the chain's worst case. [`analyze_exact_services`] keeps every curve exact.
pub fn analyze(sys: &System, opts: &Options) -> Result<Analysis, AnalysisError> {
    crate::network::analyze(sys, opts)
}

/// [`analyze`] with exact service curves everywhere (no truncation; slower on systems with
/// long common periods). The task bounds, verdicts and chain worst cases are the same.
pub fn analyze_exact_services(sys: &System, opts: &Options) -> Result<Analysis, AnalysisError> {
    crate::network::analyze_with(sys, opts, false)
}
