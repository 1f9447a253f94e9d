//! The plan table: for every fault scenario the manager must tolerate from the current
//! configuration, the plan `planner` computed for it, kept in memory and in the store
//! (`/vigil/plans/<scenario>`), so that a failure is handled by a lookup and a new leader
//! reads the table instead of computing it.
//!
//! From the initial configuration the scenarios are every set of up to `faults` failed hosts.
//! After hosts `F` have failed, they are `F` itself (the plan now in force) and `F` plus each
//! remaining host. Every plan is computed from the model's initial placement (the planner's
//! reference), so a plan's moves count from there; the manager executes a plan as the target
//! placement it describes, which is the same whatever happened before.

use agent::cluster::{self, PlanMeta};
use model::Loaded;
use planner::{scenario, PlanError, Scenario, SearchOptions};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

/// Where a VM runs under a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub vm: String,
    /// Its host (none: stopped).
    pub host: Option<String>,
    /// Its backup's host.
    pub backup: Option<String>,
    /// The model processors its instances run on (on its host).
    #[serde(default)]
    pub processors: Vec<String>,
}

/// A chain's worst case under a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainBound {
    pub chain: String,
    pub worst_ms: Option<f64>,
    pub deadline_ms: Option<f64>,
    pub status: String,
}

/// A plan as the manager keeps it (and stores it): the target placement, the actions that
/// reach it from the initial placement, and the analysis that checked it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredPlan {
    pub scenario: String,
    /// Failed hosts, sorted.
    pub failed: Vec<String>,
    pub coverage: String,
    pub actions: Vec<String>,
    pub given_up: Vec<String>,
    pub targets: Vec<Target>,
    pub chains: Vec<ChainBound>,
    pub method: String,
}

impl StoredPlan {
    fn from_plan(p: &planner::Plan) -> StoredPlan {
        let mut failed = p.failed_hosts.clone();
        failed.sort();
        StoredPlan {
            scenario: p.scenario.clone(),
            failed,
            coverage: format!("{:?}", p.coverage).to_lowercase(),
            actions: p.actions.iter().map(ToString::to_string).collect(),
            given_up: p.given_up.iter().map(|g| serde_json::to_string(g).unwrap_or_default()).collect(),
            targets: p
                .vms
                .iter()
                .map(|v| Target { vm: v.vm.clone(), host: v.host.clone(), backup: v.backup.clone(), processors: v.instances.clone() })
                .collect(),
            chains: p
                .chains
                .iter()
                .map(|c| ChainBound {
                    chain: c.chain.clone(),
                    worst_ms: c.worst_ms,
                    deadline_ms: c.deadline_ms,
                    status: c.status.to_string(),
                })
                .collect(),
            method: p.method.to_string(),
        }
    }

    pub fn target(&self, vm: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.vm == vm)
    }
}

/// The plans of one configuration, by their sorted set of failed hosts.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub plans: BTreeMap<Vec<String>, StoredPlan>,
    pub meta: Option<PlanMeta>,
}

/// Why there is no table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("{0}")]
    Plan(#[from] PlanError),
    #[error("unknown host {0:?} in the failed set")]
    UnknownHost(String),
    #[error("the model has no [[host]] items")]
    NoHosts,
}

/// The key of a set of failed hosts.
pub fn key(failed: &[String]) -> Vec<String> {
    let mut k = failed.to_vec();
    k.sort();
    k.dedup();
    k
}

impl Table {
    pub fn lookup(&self, failed: &[String]) -> Option<&StoredPlan> {
        self.plans.get(&key(failed))
    }

    /// Computes the table for the configuration where `failed` hosts have failed.
    pub fn compute(loaded: &Loaded, failed: &[String], faults: usize, generation: u64) -> Result<Table, TableError> {
        let dep = loaded.deployment.as_ref().ok_or(TableError::NoHosts)?;
        let index = |h: &str| dep.hosts.iter().position(|x| x.name == h).ok_or_else(|| TableError::UnknownHost(h.into()));
        let failed_idx: Vec<usize> = key(failed).iter().map(|h| index(h)).collect::<Result<_, _>>()?;
        let scenarios: Vec<Scenario> = if failed_idx.is_empty() {
            // The configuration in force (nothing failed) and every fault from it.
            let mut v = vec![Scenario { hosts: Vec::new(), links: Vec::new() }];
            v.extend(scenario::enumerate(dep, &[], faults.max(1), false));
            v
        } else {
            let mut v = vec![Scenario { hosts: failed_idx.clone(), links: Vec::new() }];
            for h in 0..dep.hosts.len() {
                if !failed_idx.contains(&h) {
                    let mut hosts = failed_idx.clone();
                    hosts.push(h);
                    hosts.sort();
                    v.push(Scenario { hosts, links: Vec::new() });
                }
            }
            v
        };
        let t0 = Instant::now();
        let table = planner::plan_all(&loaded.system, dep, &scenarios, &SearchOptions::default())?;
        let compute_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut plans = BTreeMap::new();
        for p in &table.plans {
            let sp = StoredPlan::from_plan(p);
            plans.insert(sp.failed.clone(), sp);
        }
        let meta = PlanMeta { generation, failed: key(failed), scenarios: plans.len(), compute_ms };
        Ok(Table { plans, meta: Some(meta) })
    }

    /// Writes the table to the store in one transaction (the old plans removed), so that a
    /// reader never sees half of two tables.
    pub fn save(&self, store: &mut store::Client) -> agent::Result<()> {
        let mut values = Vec::new();
        for (i, p) in self.plans.values().enumerate() {
            values.push((cluster::plan_path(i), serde_json::to_vec(p).map_err(|e| agent::Error::Cluster(e.to_string()))?));
        }
        if let Some(m) = &self.meta {
            values.push((cluster::PLAN_META.to_string(), serde_json::to_vec(m).map_err(|e| agent::Error::Cluster(e.to_string()))?));
        }
        store.transaction(|tx| {
            match tx.rm(cluster::PLANS) {
                Ok(()) | Err(store::Error::Store { errno: store::Errno::ENOENT, .. }) => {}
                Err(e) => return Err(e),
            }
            for (path, v) in &values {
                tx.write(path, v)?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Reads the table from the store.
    pub fn load(store: &mut store::Client) -> agent::Result<Table> {
        let mut t = Table { plans: BTreeMap::new(), meta: cluster::read(store, cluster::PLAN_META)? };
        for name in cluster::children(store, cluster::PLANS)? {
            if name.starts_with('@') {
                continue;
            }
            if let Some(p) = cluster::read::<StoredPlan>(store, &format!("{}/{name}", cluster::PLANS))? {
                t.plans.insert(p.failed.clone(), p);
            }
        }
        Ok(t)
    }
}

/// A scenario's name from its failed hosts (`hostA+hostB`).
pub fn plan_name(failed: &[String]) -> String {
    if failed.is_empty() {
        "none".into()
    } else {
        key(failed).join("+")
    }
}
