//! Analysis results mapped back onto the names of the file, for tables and JSON.
//!
//! Every time appears twice: `*_us` is the exact value in microseconds (a rational as text,
//! such as `"1500"` or `"2500/3"`), `*_ms` the nearest float in milliseconds for humans.

use crate::{ItemKind, Loaded};
use rtc::system::{Analysis, Policy, ResourceKind};
use rtc::Q;
use serde::Serialize;

/// Whether a bound meets its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// Bounded, and within the deadline if there is one.
    #[serde(rename = "ok")]
    Ok,
    /// The bound exceeds the deadline.
    #[serde(rename = "MISS")]
    Miss,
    /// No finite bound.
    #[serde(rename = "unbounded")]
    Unbounded,
}

impl Verdict {
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Miss => "MISS",
            Verdict::Unbounded => "unbounded",
        }
    }

    fn of(bound: Option<&Q>, deadline: Option<&Q>) -> Verdict {
        match (bound, deadline) {
            (None, _) => Verdict::Unbounded,
            (Some(b), Some(d)) if b > d => Verdict::Miss,
            _ => Verdict::Ok,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChainReport {
    pub name: String,
    pub line: usize,
    pub tasks: Vec<String>,
    pub worst_us: Option<String>,
    pub worst_ms: Option<f64>,
    pub best_us: String,
    pub best_ms: f64,
    pub per_hop_us: Option<String>,
    pub per_hop_ms: Option<f64>,
    pub pboo_us: Option<String>,
    pub pboo_ms: Option<f64>,
    pub deadline_us: Option<String>,
    pub deadline_ms: Option<f64>,
    pub slack_us: Option<String>,
    pub slack_ms: Option<f64>,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    pub name: String,
    pub line: usize,
    /// `task`, or `vm` for a VM that is itself one task.
    pub kind: ItemKind,
    /// The processor, link or VM it runs on.
    pub resource: String,
    /// Unit of its work: `µs` of processing or `B` on a link.
    pub work_unit: &'static str,
    pub wcrt_us: Option<String>,
    pub wcrt_ms: Option<f64>,
    pub bcrt_us: String,
    pub bcrt_ms: f64,
    /// Largest number of pending activations, in events (exact, and as a float).
    pub backlog: Option<String>,
    pub backlog_events: Option<f64>,
    /// Largest pending work, in `work_unit` (exact): µs of processing, or bytes on a link.
    pub backlog_work: Option<String>,
    pub deadline_us: Option<String>,
    pub deadline_ms: Option<f64>,
    pub verdict: Verdict,
    /// Which analysis produced the bound.
    pub method: String,
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResourceReport {
    pub name: String,
    pub line: usize,
    /// `processor`, `link` or `vm`.
    pub kind: ItemKind,
    pub policy: &'static str,
    /// Long-run demand over long-run capacity, exact and in percent.
    pub utilisation: String,
    pub utilisation_percent: f64,
    /// Long-run capacity (work units per µs).
    pub capacity: String,
    pub capacity_unit: &'static str,
    /// For a VM: the supply model its tasks were analysed with.
    pub supply: Option<&'static str>,
    /// For a VM: where its supply model assumes the budget comes in each period.
    pub supply_convention: Option<&'static str>,
    /// For a VM: the smallest budget for its period that keeps every inner deadline, under
    /// its supply model, on the grid of `--budget-step`.
    pub min_budget_us: Option<String>,
    pub min_budget_ms: Option<f64>,
    /// The same, exactly (a rational number of µs, such as `"80000/3"`).
    pub min_budget_exact_us: Option<String>,
    pub min_budget_exact_ms: Option<f64>,
    /// The smallest budgets under both supply models (its own first).
    pub min_budgets: Vec<MinBudgetReport>,
    /// For EDF and FIFO resources (one shared queue): the largest pending work of all tasks
    /// together, in `work_unit` (exact).
    pub backlog_work: Option<String>,
    /// `µs` of processing, or `B` on a link.
    pub work_unit: &'static str,
    pub problem: Option<String>,
}

/// The smallest budget of a VM under one supply model.
#[derive(Debug, Clone, Serialize)]
pub struct MinBudgetReport {
    pub supply: &'static str,
    pub supply_convention: &'static str,
    /// On the grid of `--budget-step` (capped at the period).
    pub grid_us: Option<String>,
    pub grid_ms: Option<f64>,
    /// Exact; `None` when even the whole period misses a deadline, or when the demands are not
    /// staircases (then only the grid value is known).
    pub exact_us: Option<String>,
    pub exact_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub file: String,
    /// Every task and chain deadline holds and every bound is finite.
    pub all_deadlines_met: bool,
    pub iterations: usize,
    pub chains: Vec<ChainReport>,
    pub tasks: Vec<TaskReport>,
    pub resources: Vec<ResourceReport>,
}

fn us(q: Option<&Q>) -> Option<String> {
    q.map(|q| q.to_string())
}

fn ms(q: Option<&Q>) -> Option<f64> {
    q.map(|q| q.to_f64() / 1000.0)
}

pub fn policy_name(p: Policy) -> &'static str {
    match p {
        Policy::FixedPriority => "fp",
        Policy::FixedPriorityNonPreemptive => "fp-np",
        Policy::Edf => "edf",
        Policy::Fifo => "fifo",
        Policy::Tdma => "tdma",
    }
}

impl Report {
    pub fn new(l: &Loaded, a: &Analysis) -> Report {
        let sys = &l.system;
        let chains = sys
            .chains
            .iter()
            .zip(&a.chains)
            .zip(&l.chains)
            .map(|((c, r), item)| ChainReport {
                name: c.name.clone(),
                line: item.line,
                tasks: c.tasks.iter().filter_map(|&t| sys.tasks.get(t)).map(|t| t.name.clone()).collect(),
                worst_us: us(r.worst.as_ref()),
                worst_ms: ms(r.worst.as_ref()),
                best_us: r.best.to_string(),
                best_ms: r.best.to_f64() / 1000.0,
                per_hop_us: us(r.per_hop.as_ref()),
                per_hop_ms: ms(r.per_hop.as_ref()),
                pboo_us: us(r.pboo.as_ref()),
                pboo_ms: ms(r.pboo.as_ref()),
                deadline_us: us(c.deadline.as_ref()),
                deadline_ms: ms(c.deadline.as_ref()),
                slack_us: us(r.slack.as_ref()),
                slack_ms: ms(r.slack.as_ref()),
                verdict: match (&r.worst, r.meets_deadline) {
                    (None, _) => Verdict::Unbounded,
                    (Some(_), Some(false)) => Verdict::Miss,
                    (Some(w), _) => Verdict::of(Some(w), c.deadline.as_ref()),
                },
            })
            .collect();
        let tasks = sys
            .tasks
            .iter()
            .enumerate()
            .zip(&a.tasks)
            .map(|((i, t), r)| TaskReport {
                name: t.name.clone(),
                line: l.tasks.get(i).map(|x| x.line).unwrap_or(0),
                kind: l.tasks.get(i).map(|x| x.kind).unwrap_or(ItemKind::Task),
                resource: sys.resources.get(t.resource).map(|r| r.name.clone()).unwrap_or_default(),
                work_unit: l.work_unit(i),
                wcrt_us: us(r.wcrt.as_ref()),
                wcrt_ms: ms(r.wcrt.as_ref()),
                bcrt_us: r.bcrt.to_string(),
                bcrt_ms: r.bcrt.to_f64() / 1000.0,
                backlog: us(r.backlog.as_ref()),
                backlog_events: r.backlog.as_ref().map(Q::to_f64),
                backlog_work: us(r.backlog_work.as_ref()),
                deadline_us: us(t.deadline.as_ref()),
                deadline_ms: ms(t.deadline.as_ref()),
                verdict: Verdict::of(r.wcrt.as_ref(), t.deadline.as_ref()),
                method: r.method.to_string(),
                problem: r.problem.clone(),
            })
            .collect();
        let resources = sys
            .resources
            .iter()
            .zip(&a.resources)
            .zip(&l.resources)
            .map(|((res, r), item)| {
                let declared = match &res.kind {
                    ResourceKind::Reservation { supply, .. } => Some(supply.name()),
                    _ => None,
                };
                ResourceReport {
                    name: res.name.clone(),
                    line: item.line,
                    kind: item.kind,
                    policy: policy_name(res.policy),
                    utilisation: r.utilisation.to_string(),
                    utilisation_percent: r.utilisation.to_f64() * 100.0,
                    capacity: r.capacity.to_string(),
                    capacity_unit: if item.kind == ItemKind::Link { "B/µs" } else { "µs/µs" },
                    supply: r.supply.map(|s| s.name()).or(declared),
                    supply_convention: match &res.kind {
                        ResourceKind::Reservation { supply, .. } => Some(r.supply.unwrap_or(*supply).convention()),
                        _ => None,
                    },
                    min_budget_us: us(r.min_budget.as_ref()),
                    min_budget_ms: ms(r.min_budget.as_ref()),
                    min_budget_exact_us: us(r.min_budgets.first().and_then(|m| m.exact.as_ref())),
                    min_budget_exact_ms: ms(r.min_budgets.first().and_then(|m| m.exact.as_ref())),
                    min_budgets: r
                        .min_budgets
                        .iter()
                        .map(|m| MinBudgetReport {
                            supply: m.supply.name(),
                            supply_convention: m.supply.convention(),
                            grid_us: us(m.grid.as_ref()),
                            grid_ms: ms(m.grid.as_ref()),
                            exact_us: us(m.exact.as_ref()),
                            exact_ms: ms(m.exact.as_ref()),
                        })
                        .collect(),
                    backlog_work: us(r.backlog.as_ref()),
                    work_unit: if item.kind == ItemKind::Link { "B" } else { "µs" },
                    problem: r.problem.clone(),
                }
            })
            .collect();
        Report { file: l.file.clone(), all_deadlines_met: a.all_deadlines_met(sys), iterations: a.iterations, chains, tasks, resources }
    }
}
