//! `planner` — proactive reconfiguration (DESIGN §2): for every fault scenario the system
//! must tolerate, the best placement of the VMs afterwards and the actions that reach it,
//! each checked by the real-time calculus analysis.
//!
//! Owns: fault scenarios ([`scenario`]), the evaluation of a placement under a scenario by
//! incremental analysis with a memo ([`eval`]), the search for the best placement — branch and
//! bound, greedy with repair, and an exhaustive reference for tests ([`search`]) — and plans as
//! ordered actions with what they give up ([`plan`]).
//!
//! Does not own: the system description and how a placement maps onto the analysed system
//! (`model::Deployment`), the analysis itself (`rtc`), printing (the `vigil` binary), or
//! executing a plan (the manager).
//!
//! Which results are optimal: a scenario's plan is optimal when the branch and bound finishes
//! within its budget of evaluations (`SearchOptions::exact_budget`); the plan then says
//! `optimal`. The branch and bound is not started when the choices of the VMs the fault
//! forces to change already outnumber the budget. Otherwise the plan is the best placement
//! found (the greedy one, improved by the part of the branch and bound that ran) and says
//! `heuristic`. The instances of a multi-instance VM go
//! to the processors of their host with the most room; the search chooses the host.

pub mod eval;
pub mod plan;
pub mod scenario;
pub mod search;
pub mod synthetic;

pub use eval::{Evaluator, Stats, World};
pub use plan::{Action, ChainRow, Coverage, GivenUp, Plan, TaskRow, VmRow};
pub use scenario::Scenario;
pub use search::{Cost, SearchOptions};

use model::Deployment;
use rtc::system::{AnalysisError, System};

/// Why no plans could be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the system has no [[host]] items: there is nothing to plan for")]
    NoHosts,
    #[error("analysis failed: {0}")]
    Analysis(#[from] AnalysisError),
    #[error("internal error: a planning thread panicked")]
    Panicked,
}

/// The plans for every scenario, and the work they took.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanTable {
    pub plans: Vec<Plan>,
    pub stats: Stats,
}

/// Plans every scenario. Scenarios are shared out among the machine's cores; on each core one
/// evaluator re-analyses incrementally from the analysis of the initial placement (computed
/// once) and remembers every placement it has evaluated.
pub fn plan_all(base: &System, dep: &Deployment, scenarios: &[Scenario], opts: &SearchOptions) -> Result<PlanTable, PlanError> {
    let start = rtc::system::analyze(base, &eval::planning_options())?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(scenarios.len()).max(1);
    let chunk = scenarios.len().div_ceil(threads);
    let results: Vec<Result<(Vec<Plan>, Stats), PlanError>> = std::thread::scope(|sc| {
        let handles: Vec<_> = scenarios
            .chunks(chunk.max(1))
            .map(|part| {
                let start = &start;
                sc.spawn(move || plan_some(base, dep, part, opts, start))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(PlanError::Panicked))).collect()
    });
    let mut plans = Vec::with_capacity(scenarios.len());
    let mut stats = Stats::default();
    for r in results {
        let (p, s) = r?;
        plans.extend(p);
        stats.add(&s);
    }
    Ok(PlanTable { plans, stats })
}

fn plan_some(
    base: &System,
    dep: &Deployment,
    scenarios: &[Scenario],
    opts: &SearchOptions,
    start: &rtc::system::Analysis,
) -> Result<(Vec<Plan>, Stats), PlanError> {
    let mut ev = Evaluator::new(base, dep);
    let mut plans = Vec::with_capacity(scenarios.len());
    for s in scenarios {
        ev.restart_from(start);
        let before = ev.stats.evaluations;
        let world = World::new(dep, base, s);
        let p = search::Problem::new(base, dep, world.clone());
        let greedy = search::greedy(&p, &mut ev, opts)?;
        // The branch and bound must at least try every choice of the VMs the fault forces to
        // change; when that alone exceeds the budget it cannot finish: not started.
        let (best, search) = if opts.exact_budget > 0 && p.forced_space() <= opts.exact_budget as f64 {
            let (best, optimal) = search::branch_and_bound(&p, &mut ev, greedy, opts.exact_budget)?;
            (best, if optimal { "complete" } else { "budget exhausted" })
        } else {
            (greedy, "quick pass")
        };
        let mut stats = ev.stats;
        stats.evaluations -= before;
        let validation = if opts.full_validation { plan::Validation::Full } else { plan::Validation::FromStart(start) };
        let sys = ev.system_of(&best.place);
        plans.push(plan::build(base, dep, &world, s, &p, &best, search, &stats, validation, sys)?);
    }
    Ok((plans, ev.stats))
}
