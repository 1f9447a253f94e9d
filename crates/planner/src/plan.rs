//! A plan: the actions that take the system from where it runs now to the chosen placement
//! after a fault, what the plan gives up, and the analysis of the result.

use crate::eval::{verdict, Stats, World};
use crate::scenario::Scenario;
use crate::search::{Cost, Problem, Scored};
use model::{Deployment, Placement};
use rtc::system::{analyze, AnalysisError, System};
use rtc::Q;
use serde::Serialize;

/// One step for the manager, executed in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// Stop a VM (shed it) to make room for more critical ones.
    Stop { vm: String },
    /// Stop keeping a VM's backup on a host.
    StopBackup { vm: String, host: String },
    /// Live-migrate a VM (all its instances) to other processors.
    Migrate { vm: String, from: Vec<String>, to: Vec<String> },
    /// Resume a VM from its backup held on `host`, on processors `on` (of that host, or of
    /// another host the replica is then copied to: that counts as a move).
    ActivateBackup { vm: String, host: String, on: Vec<String> },
    /// Start a VM afresh (its state died with its host).
    Restart { vm: String, on: Vec<String> },
    /// Start replicating a VM to a new backup host.
    StartBackup { vm: String, host: String },
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Action::Stop { vm } => write!(f, "stop {vm}"),
            Action::StopBackup { vm, host } => write!(f, "stop backup of {vm} on {host}"),
            Action::Migrate { vm, from, to } => write!(f, "migrate {vm} from {} to {}", from.join(","), to.join(",")),
            Action::ActivateBackup { vm, host, on } => write!(f, "activate backup of {vm} (held on {host}) on {}", on.join(",")),
            Action::Restart { vm, on } => write!(f, "restart {vm} on {}", on.join(",")),
            Action::StartBackup { vm, host } => write!(f, "start new backup of {vm} on {host}"),
        }
    }
}

/// Something a plan cannot keep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum GivenUp {
    /// A VM is stopped: shed by the plan, or (`displaced`) its host failed and the plan does
    /// not restart it.
    Vm { vm: String, criticality: i64, displaced: bool },
    /// A VM with a remote-backup mode runs without a backup.
    FaultTolerance { vm: String, criticality: i64 },
    /// A VM's state died with its host and its backup's host: it restarts from scratch.
    State { vm: String },
    /// A chain's deadline is given up with a stopped VM.
    Chain { chain: String },
}

/// How well a scenario is covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Coverage {
    /// Every VM runs, every deadline holds, every remote-mode VM keeps a backup.
    Covered,
    /// Every deadline kept holds, but VMs are stopped or run without backup or lost state.
    Degraded,
    /// Some deadline is missed whatever is done (or lost with a failed fixed link).
    Uncoverable,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChainRow {
    pub chain: String,
    /// Worst-case latency in µs (exact rational as text) and ms.
    pub worst_us: Option<String>,
    pub worst_ms: Option<f64>,
    pub deadline_ms: Option<f64>,
    pub slack_ms: Option<f64>,
    /// `ok`, `MISS`, `given-up` (through a stopped VM), `lost` (through a failed fixed link).
    pub status: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub scenario: String,
    pub failed_hosts: Vec<String>,
    pub failed_links: Vec<String>,
    pub coverage: Coverage,
    pub actions: Vec<Action>,
    pub given_up: Vec<GivenUp>,
    /// Deadlines still missed (uncoverable scenarios): task and chain names.
    pub missed: Vec<String>,
    /// Tasks and chains on failed fixed links: lost whatever is done.
    pub lost: Vec<String>,
    pub moves: usize,
    pub min_slack_ms: Option<f64>,
    pub chains: Vec<ChainRow>,
    /// `optimal` (the branch and bound finished) or `heuristic`.
    pub method: &'static str,
    /// How far the search went: `complete` (the branch and bound finished: optimal),
    /// `quick pass` (greedy with repair only: `--budget 0`, or the forced choices alone
    /// outnumber the budget), or `budget exhausted` (the branch and bound stopped at its budget).
    /// A heuristic plan that is not covered may have a covered alternative.
    pub search: &'static str,
    /// Every task after the plan: response time, deadline, slack and status.
    pub tasks: Vec<TaskRow>,
    pub cost: Cost,
    /// Placements evaluated for this scenario.
    pub evaluations: usize,
    /// Where every VM runs once the plan is executed.
    pub vms: Vec<VmRow>,
    #[serde(skip)]
    pub placement: Placement,
}

/// A task after the plan (also messages and checkpoint streams).
#[derive(Debug, Clone, Serialize)]
pub struct TaskRow {
    pub task: String,
    /// The VM it runs in, if any.
    pub vm: Option<String>,
    /// The processor, link or reservation it runs on after the plan.
    pub resource: String,
    /// Worst-case response time (µs exact, and ms); `None` when unbounded, given up or lost.
    pub wcrt_us: Option<String>,
    pub wcrt_ms: Option<f64>,
    pub deadline_us: Option<String>,
    pub deadline_ms: Option<f64>,
    pub slack_us: Option<String>,
    pub slack_ms: Option<f64>,
    /// `ok`, `MISS` (over its deadline, unbounded or undeliverable), `given-up` (its VM, or the
    /// sender of its message, is stopped), `lost` (on a failed fixed link) or `unbounded` (a
    /// checkpoint stream without a bound: it has no deadline, so the plan does not count it).
    pub status: &'static str,
}

/// A VM's place after the plan.
#[derive(Debug, Clone, Serialize)]
pub struct VmRow {
    pub vm: String,
    /// Processors of its instances (empty: stopped).
    pub instances: Vec<String>,
    pub host: Option<String>,
    pub backup: Option<String>,
}

fn ms(q: &Q) -> f64 {
    q.to_f64() / 1000.0
}

/// How a plan is validated: the analysis of the system it gives, computed independently of
/// the search's chain of incremental analyses, must give the search's verdict.
#[derive(Debug, Clone, Copy)]
pub enum Validation<'a> {
    /// A full analysis of the plan's system.
    Full,
    /// An incremental analysis from the analysis of the initial placement (the system as
    /// loaded, `start`): only what the plan's placement changes, and what depends on it, is
    /// analysed again (`rtc::incremental`, equal to the full analysis by its tests).
    FromStart(&'a rtc::system::Analysis),
}

/// Validates `best` by an analysis of the system it gives (`sys`, which must be `best.place`
/// applied to `base`; see [`Validation`]), and describes it.
#[allow(clippy::too_many_arguments)]
pub fn build(
    base: &System,
    dep: &Deployment,
    world: &World,
    scenario: &Scenario,
    p: &Problem,
    best: &Scored,
    search: &'static str,
    stats: &Stats,
    validation: Validation,
    sys: &System,
) -> Result<Plan, AnalysisError> {
    let optimal = search == "complete";
    let an = match validation {
        Validation::Full => analyze(sys, &crate::eval::planning_options())?,
        Validation::FromStart(start) => rtc::incremental::reanalyze(base, start.clone(), sys, &crate::eval::planning_options())?.0,
    };
    let full = verdict(base, dep, world, &best.place, &an);
    if full != best.verdict {
        return Err(AnalysisError::Resource {
            resource: scenario.name(dep, base),
            msg: "internal error: the search's analysis disagrees with the validating analysis of the plan".into(),
        });
    }
    if let Some((a, b, h)) = dep.apart_violation(&best.place) {
        return Err(AnalysisError::Resource {
            resource: scenario.name(dep, base),
            msg: format!(
                "internal error: the plan puts VMs {:?} and {:?} on host {:?} although they must be kept apart",
                dep.vms[a].name, dep.vms[b].name, dep.hosts[h].name
            ),
        });
    }
    let pname = |c: &usize| base.resources[*c].name.clone();
    let hname = |h: usize| dep.hosts[h].name.clone();
    let mut actions = Vec::new();
    let (mut stops, mut stop_backups, mut migrations, mut starts, mut new_backups) = (vec![], vec![], vec![], vec![], vec![]);
    let mut given_up = Vec::new();
    for (v, vm) in dep.vms.iter().enumerate() {
        let (init, fin) = (&p.initial.vms[v], &best.place.vms[v]);
        let displaced = p.displaced[v];
        let state_host = init.backup.filter(|&b| !world.host_down[b]);
        if !fin.running() {
            if !displaced {
                stops.push(Action::Stop { vm: vm.name.clone() });
            }
            if let Some(b) = init.backup.filter(|&b| !world.host_down[b]) {
                stop_backups.push(Action::StopBackup { vm: vm.name.clone(), host: hname(b) });
            }
            given_up.push(GivenUp::Vm { vm: vm.name.clone(), criticality: vm.criticality, displaced });
            continue;
        }
        let on: Vec<String> = fin.instances.iter().map(pname).collect();
        let mut backup_consumed = false;
        if displaced {
            match state_host {
                Some(b) => {
                    backup_consumed = true;
                    starts.push(Action::ActivateBackup { vm: vm.name.clone(), host: hname(b), on });
                }
                None => {
                    if vm.mode.remote() {
                        given_up.push(GivenUp::State { vm: vm.name.clone() });
                    }
                    starts.push(Action::Restart { vm: vm.name.clone(), on });
                }
            }
        } else if fin.instances != init.instances {
            migrations.push(Action::Migrate { vm: vm.name.clone(), from: init.instances.iter().map(pname).collect(), to: on });
        }
        // Backups.
        let old = if backup_consumed { None } else { init.backup.filter(|&b| !world.host_down[b]) };
        if old != fin.backup {
            if let Some(b) = old {
                stop_backups.push(Action::StopBackup { vm: vm.name.clone(), host: hname(b) });
            }
            if let Some(b) = fin.backup {
                new_backups.push(Action::StartBackup { vm: vm.name.clone(), host: hname(b) });
            }
        }
        if vm.mode.remote() && fin.backup.is_none() {
            given_up.push(GivenUp::FaultTolerance { vm: vm.name.clone(), criticality: vm.criticality });
        }
    }
    actions.extend(stops);
    actions.extend(stop_backups);
    actions.extend(migrations);
    actions.extend(starts);
    actions.extend(new_backups);
    for &c in &full.given_up_chains {
        given_up.push(GivenUp::Chain { chain: base.chains[c].name.clone() });
    }
    let chains = base
        .chains
        .iter()
        .enumerate()
        .map(|(c, ch)| {
            let r = &an.chains[c];
            let status = if full.lost_chains.contains(&c) {
                "lost"
            } else if full.given_up_chains.contains(&c) {
                "given-up"
            } else if full.missed_chains.contains(&c) {
                "MISS"
            } else {
                "ok"
            };
            let live = status == "ok" || status == "MISS";
            ChainRow {
                chain: ch.name.clone(),
                worst_us: r.worst.as_ref().filter(|_| live).map(|w| w.to_string()),
                worst_ms: r.worst.as_ref().filter(|_| live).map(ms),
                deadline_ms: ch.deadline.as_ref().map(ms),
                slack_ms: r.slack.as_ref().filter(|_| live).map(ms),
                status,
            }
        })
        .collect();
    let stopped = |t: usize| dep.vm_of_task.get(t).copied().flatten().is_some_and(|v| !best.place.vms[v].running());
    // Per task (linear in the system, whatever the number of messages and misses).
    let n = base.tasks.len();
    let mut given_up_task: Vec<bool> = (0..n).map(stopped).collect();
    for m in dep.messages.iter().filter(|m| stopped(m.sender)) {
        given_up_task[m.task] = true;
    }
    let (mut lost_task, mut missed_task) = (vec![false; n], vec![false; n]);
    full.lost_tasks.iter().for_each(|&t| lost_task[t] = true);
    full.missed_tasks.iter().for_each(|&t| missed_task[t] = true);
    let tasks = (0..n)
        .map(|t| {
            let r = &an.tasks[t];
            let status = if lost_task[t] {
                "lost"
            } else if given_up_task[t] {
                "given-up"
            } else if missed_task[t] {
                "MISS"
            } else if r.wcrt.is_none() {
                // A checkpoint stream has no deadline and is not counted as a miss.
                "unbounded"
            } else {
                "ok"
            };
            let live = matches!(status, "ok" | "MISS");
            let wcrt = r.wcrt.as_ref().filter(|_| live);
            let deadline = base.tasks[t].deadline.as_ref();
            let slack = wcrt.zip(deadline).map(|(w, d)| d - w);
            TaskRow {
                task: base.tasks[t].name.clone(),
                vm: dep.vm_of_task[t].map(|v| dep.vms[v].name.clone()),
                resource: sys.resources[sys.tasks[t].resource].name.clone(),
                wcrt_us: wcrt.map(|w| w.to_string()),
                wcrt_ms: wcrt.map(ms),
                deadline_us: deadline.map(|d| d.to_string()),
                deadline_ms: deadline.map(ms),
                slack_us: slack.as_ref().map(|s| s.to_string()),
                slack_ms: slack.as_ref().map(ms),
                status,
            }
        })
        .collect();
    let mut missed: Vec<String> = full.missed_tasks.iter().map(|&t| base.tasks[t].name.clone()).collect();
    missed.extend(full.missed_chains.iter().map(|&c| base.chains[c].name.clone()));
    let mut lost: Vec<String> = full.lost_tasks.iter().map(|&t| base.tasks[t].name.clone()).collect();
    lost.extend(full.lost_chains.iter().map(|&c| base.chains[c].name.clone()));
    let coverage = if full.misses > 0 || !lost.is_empty() {
        Coverage::Uncoverable
    } else if given_up.is_empty() {
        Coverage::Covered
    } else {
        Coverage::Degraded
    };
    Ok(Plan {
        scenario: scenario.name(dep, base),
        failed_hosts: scenario.hosts.iter().map(|&h| hname(h)).collect(),
        failed_links: scenario.links.iter().map(|&l| base.resources[l].name.clone()).collect(),
        coverage,
        actions,
        given_up,
        missed,
        lost,
        moves: best.cost.moves,
        min_slack_ms: full.slack.as_ref().map(ms),
        chains,
        method: if optimal { "optimal" } else { "heuristic" },
        search,
        tasks,
        cost: best.cost.clone(),
        evaluations: stats.evaluations,
        vms: dep
            .vms
            .iter()
            .zip(&best.place.vms)
            .map(|(vm, pl)| VmRow {
                vm: vm.name.clone(),
                instances: pl.instances.iter().map(pname).collect(),
                host: pl.instances.first().and_then(|&c| dep.host_of_processor(c)).map(hname),
                backup: pl.backup.map(hname),
            })
            .collect(),
        placement: best.place.clone(),
    })
}
