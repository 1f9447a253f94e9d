//! Evaluating a placement under a fault scenario: the analysis of the system it gives
//! (incremental from the last placement evaluated, whatever the scenario), and the verdict:
//! which deadlines are missed, which are given up with a stopped VM, the smallest slack.

use crate::scenario::Scenario;
use model::{Deployment, Placement};
use rtc::incremental::{reanalyze, Reuse};
use rtc::system::{analyze, Analysis, AnalysisError, Options, System};
use rtc::Q;
use std::collections::HashMap;

/// The fixed facts of one scenario.
#[derive(Debug, Clone)]
pub struct World {
    pub scenario: Scenario,
    /// Per host: failed.
    pub host_down: Vec<bool>,
    /// Per host: cannot reach other hosts (no port, port failed, or host failed).
    pub port_down: Vec<bool>,
    /// Per resource: a failed link.
    pub link_down: Vec<bool>,
}

impl World {
    pub fn new(dep: &Deployment, sys: &System, scenario: &Scenario) -> World {
        let mut host_down = vec![false; dep.hosts.len()];
        for &h in &scenario.hosts {
            host_down[h] = true;
        }
        let mut link_down = vec![false; sys.resources.len()];
        for &l in &scenario.links {
            link_down[l] = true;
        }
        let port_down = dep.hosts.iter().enumerate().map(|(h, host)| host_down[h] || host.port.is_none_or(|p| link_down[p])).collect();
        World { scenario: scenario.clone(), host_down, port_down, link_down }
    }
}

/// What the analysis says of a placement.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Task and chain deadlines missed (or bounds lost) among those not given up.
    pub misses: usize,
    /// Smallest slack over the deadlines kept (None when there are none).
    pub slack: Option<Q>,
    /// The tasks whose deadline (a task's own, or its chain's) has that smallest slack.
    pub tightest: Vec<usize>,
    /// Tasks whose deadline (or bound) fails, by index.
    pub missed_tasks: Vec<usize>,
    pub missed_chains: Vec<usize>,
    /// Chains given up because they pass through a stopped VM.
    pub given_up_chains: Vec<usize>,
    /// Messages that cannot be delivered (their sender's host cannot reach a receiver's).
    pub undeliverable: Vec<usize>,
    /// Tasks on failed fixed links, and the chains through them: lost to the fault whatever
    /// the placement, so not counted in `misses`.
    pub lost_tasks: Vec<usize>,
    pub lost_chains: Vec<usize>,
}

/// Work counters, for the benchmark and the report.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Stats {
    /// Scenarios planned.
    pub scenarios: usize,
    /// Placements evaluated (analysed or found in the memo).
    pub evaluations: usize,
    /// Evaluations answered from the memo.
    pub memo_hits: usize,
    /// Tasks analysed again by incremental analyses.
    pub tasks_reanalysed: usize,
    /// Tasks whose previous results were reused.
    pub tasks_reused: usize,
    /// Analyses that had to cover the whole system.
    pub full_analyses: usize,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.scenarios += o.scenarios;
        self.evaluations += o.evaluations;
        self.memo_hits += o.memo_hits;
        self.tasks_reanalysed += o.tasks_reanalysed;
        self.tasks_reused += o.tasks_reused;
        self.full_analyses += o.full_analyses;
    }
}

/// Analyses placements one after another, each incrementally from the previous one, and
/// remembers verdicts by placement and failed links.
pub struct Evaluator<'a> {
    pub base: &'a System,
    pub dep: &'a Deployment,
    opts: Options,
    cur: System,
    scratch: System,
    an: Option<Analysis>,
    memo: HashMap<(Placement, Vec<usize>), Verdict>,
    pub stats: Stats,
}

/// Options for analyses inside the planner: no smallest-budget search (it is not needed to
/// decide feasibility and costs a bisection per reservation) and no service curves (nothing
/// the planner decides reads them; see `rtc::system::Options::service_curves`).
pub fn planning_options() -> Options {
    Options { budget_step: Q::zero(), service_curves: false, ..Options::default() }
}

impl<'a> Evaluator<'a> {
    pub fn new(base: &'a System, dep: &'a Deployment) -> Evaluator<'a> {
        Evaluator {
            base,
            dep,
            opts: planning_options(),
            cur: base.clone(),
            scratch: base.clone(),
            an: None,
            memo: HashMap::new(),
            stats: Stats::default(),
        }
    }

    /// Continues from `an`, the analysis of the initial placement (the system as loaded):
    /// the next evaluation re-analyses only what its placement changes from there.
    pub fn restart_from(&mut self, an: &Analysis) {
        self.stats.scenarios += 1;
        // Placements differ only in the fields `Deployment::apply` writes, and the system as
        // loaded is the initial placement applied: applying it again restores `cur` without
        // copying the whole system (names included).
        self.dep.apply(self.base, &self.dep.initial(), &mut self.cur);
        debug_assert!(self.cur == *self.base);
        self.an = Some(an.clone());
    }

    /// The verdict on `place` in `world`.
    pub fn evaluate(&mut self, world: &World, place: &Placement) -> Result<Verdict, AnalysisError> {
        self.stats.evaluations += 1;
        let key = (place.clone(), world.scenario.links.clone());
        if let Some(v) = self.memo.get(&key) {
            self.stats.memo_hits += 1;
            return Ok(v.clone());
        }
        self.dep.apply(self.base, place, &mut self.scratch);
        let an = match self.an.take() {
            Some(prev) => {
                let (an, reuse): (Analysis, Reuse) = reanalyze(&self.cur, prev, &self.scratch, &self.opts)?;
                self.stats.tasks_reanalysed += reuse.tasks;
                self.stats.tasks_reused += self.base.tasks.len() - reuse.tasks;
                if reuse.full {
                    self.stats.full_analyses += 1;
                }
                an
            }
            None => {
                self.stats.full_analyses += 1;
                self.stats.tasks_reanalysed += self.base.tasks.len();
                analyze(&self.scratch, &self.opts)?
            }
        };
        std::mem::swap(&mut self.cur, &mut self.scratch);
        let v = verdict(self.base, self.dep, world, place, &an);
        self.an = Some(an);
        if self.memo.len() < 1_000_000 {
            self.memo.insert(key, v.clone());
        }
        Ok(v)
    }

    /// The system of `place` (built in the evaluator's scratch space, without copying the
    /// base system: placements differ only in the fields `Deployment::apply` writes).
    pub fn system_of(&mut self, place: &Placement) -> &System {
        self.dep.apply(self.base, place, &mut self.scratch);
        &self.scratch
    }

    /// The system and analysis of the placement evaluated last (not from the memo).
    pub fn current(&self) -> (&System, Option<&Analysis>) {
        (&self.cur, self.an.as_ref())
    }
}

/// The verdict from an analysis of `place` (shared by the incremental evaluator and the full
/// re-analysis that validates every plan).
pub fn verdict(base: &System, dep: &Deployment, world: &World, place: &Placement, an: &Analysis) -> Verdict {
    let n = base.tasks.len();
    let stopped = |t: usize| dep.vm_of_task.get(t).copied().flatten().is_some_and(|v| !place.vms[v].running());
    let undeliverable = dep.undeliverable(base, place, &world.port_down);
    let mut given_up = vec![false; n];
    let mut broken = vec![false; n];
    let mut lost = vec![false; n];
    for t in 0..n {
        given_up[t] = stopped(t);
        lost[t] = world.link_down[base.tasks[t].resource];
    }
    for m in &dep.messages {
        if stopped(m.sender) {
            given_up[m.task] = true;
        }
    }
    for v in &dep.vms {
        if let Some(c) = &v.checkpoint {
            // Checkpoint traffic has no deadline; it only competes for the ports.
            given_up[c.task] = true;
            lost[c.task] = false;
        }
    }
    // Messages on host ports are routed by the placement; a failed port only breaks the
    // messages that must cross it.
    for m in &dep.messages {
        lost[m.task] = false;
    }
    for &t in &undeliverable {
        broken[t] = true;
    }
    let mut v = Verdict {
        misses: 0,
        slack: None,
        tightest: vec![],
        missed_tasks: vec![],
        missed_chains: vec![],
        given_up_chains: vec![],
        undeliverable,
        lost_tasks: (0..n).filter(|&t| lost[t]).collect(),
        lost_chains: vec![],
    };
    let mut take_slack = |s: Q, tasks: &[usize]| {
        if v.slack.as_ref().is_none_or(|x| &s < x) {
            v.slack = Some(s);
            v.tightest = tasks.to_vec();
        }
    };
    for t in 0..n {
        if given_up[t] || lost[t] {
            continue;
        }
        let r = &an.tasks[t];
        let ok = !broken[t]
            && match (&r.wcrt, &base.tasks[t].deadline) {
                (None, _) => false,
                (Some(w), Some(d)) => {
                    take_slack(d - w, &[t]);
                    w <= d
                }
                (Some(_), None) => true,
            };
        if !ok {
            v.missed_tasks.push(t);
        }
    }
    for (c, ch) in base.chains.iter().enumerate() {
        if ch.tasks.iter().any(|&t| lost[t]) {
            v.lost_chains.push(c);
            continue;
        }
        if ch.tasks.iter().any(|&t| given_up[t]) {
            v.given_up_chains.push(c);
            continue;
        }
        let r = &an.chains[c];
        let ok = !ch.tasks.iter().any(|&t| broken[t])
            && match (&r.worst, &ch.deadline) {
                (None, _) => false,
                (Some(w), Some(d)) => {
                    take_slack(d - w, &ch.tasks);
                    w <= d
                }
                (Some(_), None) => true,
            };
        if !ok {
            v.missed_chains.push(c);
        }
    }
    v.misses = v.missed_tasks.len() + v.missed_chains.len();
    v
}
