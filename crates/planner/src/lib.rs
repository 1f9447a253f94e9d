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
//! `optimal`. Otherwise it is the best placement found (the greedy one, improved by the part of
//! the branch and bound that ran) and says `heuristic`. The instances of a multi-instance VM go
//! to the processors of their host with the most room; the search chooses the host.

pub mod eval;
pub mod plan;
pub mod scenario;
pub mod search;

pub use eval::{Evaluator, Stats, World};
pub use plan::{Action, ChainRow, Coverage, GivenUp, Plan};
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
}

/// The plans for every scenario, and the work they took.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanTable {
    pub plans: Vec<Plan>,
    pub stats: Stats,
}

/// Plans every scenario, reusing analyses across all of them.
pub fn plan_all(base: &System, dep: &Deployment, scenarios: &[Scenario], opts: &SearchOptions) -> Result<PlanTable, PlanError> {
    let mut ev = Evaluator::new(base, dep);
    let mut plans = Vec::with_capacity(scenarios.len());
    for s in scenarios {
        let before = ev.stats.evaluations;
        let world = World::new(dep, base, s);
        let p = search::Problem::new(base, dep, world.clone());
        let greedy = search::greedy(&p, &mut ev, opts)?;
        let (best, optimal) =
            if opts.exact_budget > 0 { search::branch_and_bound(&p, &mut ev, greedy, opts.exact_budget)? } else { (greedy, false) };
        let mut stats = ev.stats;
        stats.evaluations -= before;
        plans.push(plan::build(base, dep, &world, s, &p, &best, optimal, &stats)?);
    }
    Ok(PlanTable { plans, stats: ev.stats })
}
