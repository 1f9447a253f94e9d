//! Incremental re-analysis: after a change to a system — tasks moved between resources, a
//! reservation moved to another host, a task's work changed — only the resources whose tasks,
//! parameters or activation curves changed are analysed again, and only the chains through
//! them are recomputed. Everything else is taken from the previous analysis. The result is the
//! same as a full [`crate::system::analyze`] (the tests compare them on random changes).
//!
//! The planner evaluates thousands of candidate configurations that differ from each other in a
//! few VMs; this is what makes that affordable.

use crate::component::Pair;
use crate::network::{self, Ctx, FpState};
use crate::system::*;
use std::collections::HashMap;

/// How much work a re-analysis did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reuse {
    /// Resources analysed again (the others were reused).
    pub resources: usize,
    /// Tasks analysed again.
    pub tasks: usize,
    /// Chains recomputed.
    pub chains: usize,
    /// The change could not be analysed incrementally (different shape, cyclic dependencies):
    /// the whole system was analysed.
    pub full: bool,
}

/// Analyses `sys`, given `prev`, the analysis of `old`. Both systems must have the same
/// resources, streams, tasks and chains by index (only their fields may differ); otherwise,
/// and when dependencies are cyclic, the whole system is analysed.
pub fn reanalyze(old: &System, prev: Analysis, sys: &System, opts: &Options) -> Result<(Analysis, Reuse), AnalysisError> {
    let full = || -> Result<(Analysis, Reuse), AnalysisError> {
        let a = network::analyze(sys, opts)?;
        let n = Reuse { resources: sys.resources.len(), tasks: sys.tasks.len(), chains: sys.chains.len(), full: true };
        Ok((a, n))
    };
    let same_shape = old.resources.len() == sys.resources.len()
        && old.tasks.len() == sys.tasks.len()
        && old.chains.len() == sys.chains.len()
        && prev.tasks.len() == sys.tasks.len()
        && prev.resources.len() == sys.resources.len()
        && prev.chains.len() == sys.chains.len()
        && prev.iterations == 1
        && old.streams == sys.streams
        && old.chains == sys.chains;
    if !same_shape {
        return full();
    }
    network::check_structure(sys)?;
    let nres = sys.resources.len();
    let mut tasks_on: Vec<Vec<usize>> = vec![Vec::new(); nres];
    let mut old_on: Vec<Vec<usize>> = vec![Vec::new(); nres];
    for (i, t) in sys.tasks.iter().enumerate() {
        tasks_on[t.resource].push(i);
    }
    for (i, t) in old.tasks.iter().enumerate() {
        old_on[t.resource].push(i);
    }
    let (order, acyclic) = network::resource_order(sys, &tasks_on);
    if !acyclic {
        return full();
    }

    // Resources whose service or task set changed, and hosts whose reservations changed.
    let mut dirty = vec![false; nres];
    let mut report_dirty = vec![false; nres];
    for r in 0..nres {
        let (a, b) = (&old.resources[r], &sys.resources[r]);
        let service_same = match (&a.kind, &b.kind) {
            (
                ResourceKind::Reservation { host: h0, budget: b0, period: p0, supply: s0 },
                ResourceKind::Reservation { host: h1, budget: b1, period: p1, supply: s1 },
            ) => {
                if h0 != h1 || b0 != b1 || p0 != p1 {
                    report_dirty[*h0] = true;
                    report_dirty[*h1] = true;
                }
                b0 == b1 && p0 == p1 && s0 == s1 && network::host_speed(old, *h0) == network::host_speed(sys, *h1)
            }
            (x, y) => x == y,
        };
        if !service_same || a.policy != b.policy || a.cycle != b.cycle || old_on[r] != tasks_on[r] {
            dirty[r] = true;
        }
    }
    for (i, t) in sys.tasks.iter().enumerate() {
        if &old.tasks[i] != t {
            dirty[t.resource] = true;
            dirty[old.tasks[i].resource] = true;
        }
    }

    let ctx = Ctx { sys, opts, streams: Vec::new(), tasks_on, truncate: true, chained: crate::network::chained_tasks(sys) };
    let mut stream_curves: HashMap<usize, Pair> = HashMap::new();
    let mut new: Vec<Option<TaskResult>> = (0..sys.tasks.len()).map(|_| None).collect();
    let mut changed = vec![false; sys.tasks.len()];
    let mut inputs: Vec<Option<Pair>> = vec![None; sys.tasks.len()];
    let mut resources = prev.resources;
    let mut reuse = Reuse::default();
    for &r in &order {
        let tasks = &ctx.tasks_on[r];
        let fed_by_change = tasks.iter().any(|&i| match sys.tasks[i].input {
            Input::Task(j) => sys.tasks[j].resource != r && changed[j],
            Input::Stream(_) => false,
        });
        if !dirty[r] && !fed_by_change {
            if report_dirty[r] {
                // Only the reservations it hosts changed: its own tasks keep their results.
                for &i in tasks {
                    inputs[i] = Some(pair_of(&prev.tasks[i].input));
                }
                let beta = network::base_service(sys, r)?;
                resources[r] = network::resource_result(&ctx, r, &inputs, &beta);
            }
            continue;
        }
        reuse.resources += 1;
        reuse.tasks += tasks.len();
        let beta = network::base_service(sys, r)?;
        // Activation curves from a stream, or from the (new or reused) completions upstream.
        let mut input_of = |i: usize, new: &[Option<TaskResult>]| -> Result<Option<Pair>, AnalysisError> {
            Ok(match sys.tasks[i].input {
                Input::Stream(s) => {
                    if let std::collections::hash_map::Entry::Vacant(e) = stream_curves.entry(s) {
                        let st = &sys.streams[s];
                        let c = st.model.curves().map_err(|e| AnalysisError::Stream { stream: st.name.clone(), msg: e.to_string() })?;
                        e.insert(c);
                    }
                    stream_curves.get(&s).cloned()
                }
                Input::Task(j) => {
                    let res = new[j].as_ref().unwrap_or(&prev.tasks[j]);
                    res.wcrt.is_some().then(|| network::released(sys, j, pair_of(&res.output)))
                }
            })
        };
        let outcomes = match sys.resources[r].policy {
            Policy::FixedPriority | Policy::FixedPriorityNonPreemptive => {
                let mut st = FpState::new(&ctx, r, tasks, &beta);
                let mut out = Vec::with_capacity(tasks.len());
                while !st.done() {
                    let i = st.order[st.next];
                    if let Input::Task(j) = sys.tasks[i].input {
                        // Fed by a task of this resource that is analysed later: only the full
                        // analysis (task by task across resources) handles that.
                        if sys.tasks[j].resource == r && new[j].is_none() {
                            return full();
                        }
                    }
                    inputs[i] = input_of(i, &new)?;
                    let o = st.step(&ctx, inputs[i].as_ref());
                    let res = network::task_result(sys, i, o, inputs[i].clone().unwrap_or_else(zero_pair));
                    new[i] = Some(res);
                    out.push(i);
                }
                out
            }
            _ => {
                for &i in tasks {
                    if matches!(sys.tasks[i].input, Input::Task(j) if sys.tasks[j].resource == r) {
                        return full();
                    }
                    inputs[i] = input_of(i, &new)?;
                }
                let mut out = Vec::with_capacity(tasks.len());
                for (i, o) in network::analyze_resource(&ctx, r, &inputs, &beta) {
                    new[i] = Some(network::task_result(sys, i, o, inputs[i].clone().unwrap_or_else(zero_pair)));
                    out.push(i);
                }
                out
            }
        };
        for i in outcomes {
            let (a, b) = (&prev.tasks[i], new[i].as_ref().expect("just analysed"));
            changed[i] = a.wcrt.is_some() != b.wcrt.is_some() || a.output != b.output;
        }
        resources[r] = network::resource_result(&ctx, r, &inputs, &beta);
    }

    let recomputed: Vec<bool> = new.iter().map(Option::is_some).collect();
    let mut tasks = prev.tasks;
    for (i, n) in new.into_iter().enumerate() {
        if let Some(n) = n {
            tasks[i] = n;
        }
    }
    let mut chains = prev.chains;
    for (c, ch) in sys.chains.iter().enumerate() {
        if ch.tasks.iter().any(|&i| recomputed[i]) {
            chains[c] = network::chain_result(sys, ch, &tasks);
            reuse.chains += 1;
        }
    }
    Ok((Analysis { tasks, chains, resources, iterations: 1 }, reuse))
}

fn pair_of(b: &Bounds) -> Pair {
    (b.upper.clone(), b.lower.clone())
}

fn zero_pair() -> Pair {
    (crate::Curve::zero(), crate::Curve::zero())
}
