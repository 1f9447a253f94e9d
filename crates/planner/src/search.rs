//! The search for the best placement under one fault scenario.
//!
//! A placement is compared with another by its [`Cost`], lexicographically: deadlines missed;
//! then, for each criticality level from the highest down, VMs stopped (shed) and VMs that lose
//! their remote backup; then running VMs the fault did not touch that are migrated; then bytes
//! copied between hosts; then bytes copied while a VM is down; then VMs moved; and last (larger
//! is better) the smallest slack.
//!
//! Two searches share the same choices and costs:
//! - [`branch_and_bound`]: depth-first over every VM's choices (where its instances run, where
//!   its backup is, or stopped), pruning a branch as soon as it breaks a processor's or a host's
//!   capacity, or its cost so far already exceeds the best complete placement. When it finishes
//!   within its budget of evaluations, its placement is optimal.
//! - [`greedy`]: places the VMs the fault displaced (most critical first) where they leave the
//!   most room, gives new backups to VMs that lost theirs, then repairs missed deadlines by
//!   moving the VMs involved and, if that fails, by shedding the least critical VMs. Fast, not
//!   always optimal; it seeds the branch and bound with a good bound.
//!
//! [`exhaustive`] enumerates every combination of choices with no pruning and analyses each in
//! full: the reference the tests compare the two against.

use crate::eval::{verdict, Evaluator, Verdict, World};
use model::{Deployment, Placement, VmPlace};
use rtc::system::{analyze, AnalysisError, System};
use rtc::Q;
use std::cmp::Ordering;

/// The discrete part of a placement's cost (smaller is better; compared field by field, in
/// this order; `docs/planning.md` "Which plan is best").
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Cost {
    /// Deadlines missed (or bounds lost), not counting those given up with a stopped VM.
    pub misses: usize,
    /// For each criticality level, highest first: (VMs stopped, VMs without their backup).
    pub levels: Vec<(usize, usize)>,
    /// Running VMs the fault did not touch that are migrated (their service is disturbed).
    pub untouched_moved: usize,
    /// Bytes copied between hosts: a migration copies the VM's memory (per instance), resuming a
    /// displaced VM on another host than its backup's copies the replica, and every new backup
    /// copies the VM's memory.
    #[serde(serialize_with = "as_text")]
    pub bytes: Q,
    /// Bytes copied while a VM is down: the replica of a displaced VM resumed on another host
    /// than its backup's (live migrations and new backups run beside the service).
    #[serde(serialize_with = "as_text")]
    pub downtime_bytes: Q,
    /// VMs moved: migrated, resumed away from their backup's host, or whose backup moved though
    /// the fault left it usable (reported as the plan's moves).
    pub moves: usize,
}

fn as_text<S: serde::Serializer>(q: &Q, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&q.to_string())
}

/// What one VM's choice costs (see [`Cost`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmCost {
    pub stopped: bool,
    /// A remote-mode VM without a backup.
    pub lost: bool,
    pub untouched_moved: usize,
    pub bytes: Q,
    pub downtime_bytes: Q,
    pub moves: usize,
}

impl Cost {
    pub fn zero(levels: usize) -> Cost {
        Cost { misses: 0, levels: vec![(0, 0); levels], untouched_moved: 0, bytes: Q::zero(), downtime_bytes: Q::zero(), moves: 0 }
    }

    /// Adds VM choice `c` at criticality level `level`.
    pub fn add(&mut self, level: usize, c: &VmCost) {
        self.levels[level].0 += c.stopped as usize;
        self.levels[level].1 += c.lost as usize;
        self.untouched_moved += c.untouched_moved;
        self.bytes = &self.bytes + &c.bytes;
        self.downtime_bytes = &self.downtime_bytes + &c.downtime_bytes;
        self.moves += c.moves;
    }
}

/// A placement with its cost and verdict.
#[derive(Debug, Clone)]
pub struct Scored {
    pub place: Placement,
    pub cost: Cost,
    pub verdict: Verdict,
}

impl Scored {
    /// Strictly better than `other`: a smaller cost, or the same cost and more slack.
    pub fn better_than(&self, other: &Scored) -> bool {
        match self.cost.cmp(&other.cost) {
            Ordering::Less => true,
            Ordering::Greater => false,
            Ordering::Equal => match (&self.verdict.slack, &other.verdict.slack) {
                (Some(a), Some(b)) => a > b,
                (Some(_), None) => false,
                (None, _) => false,
            },
        }
    }
}

/// One scenario's search problem.
pub struct Problem<'a> {
    pub base: &'a System,
    pub dep: &'a Deployment,
    pub world: World,
    pub initial: Placement,
    /// Distinct criticalities, highest first.
    pub levels: Vec<i64>,
    /// Per VM: index into `levels`.
    pub level_of: Vec<usize>,
    /// Per VM: its primary instance is on a failed host.
    pub displaced: Vec<bool>,
    /// VMs in search order: displaced ones first, most critical first.
    pub order: Vec<usize>,
}

impl<'a> Problem<'a> {
    pub fn new(base: &'a System, dep: &'a Deployment, world: World) -> Problem<'a> {
        let initial = dep.initial();
        let mut levels: Vec<i64> = dep.vms.iter().map(|v| v.criticality).collect();
        levels.sort_unstable_by(|a, b| b.cmp(a));
        levels.dedup();
        let level_of = dep.vms.iter().map(|v| levels.iter().position(|&l| l == v.criticality).unwrap_or(0)).collect();
        let displaced: Vec<bool> = initial
            .vms
            .iter()
            .map(|p| p.instances.first().and_then(|&c| dep.host_of_processor(c)).is_none_or(|h| world.host_down[h]))
            .collect();
        let mut order: Vec<usize> = (0..dep.vms.len()).collect();
        order.sort_by_key(|&v| {
            let backup_lost = initial.vms[v].backup.is_some_and(|b| world.port_down[b]);
            (!(displaced[v] || backup_lost), std::cmp::Reverse(dep.vms[v].criticality), std::cmp::Reverse(dep.vms[v].share.clone()), v)
        });
        Problem { base, dep, world, initial, levels, level_of, displaced, order }
    }

    fn host(&self, processor: usize) -> usize {
        self.dep.host_of_processor(processor).unwrap_or(0)
    }

    fn live_hosts(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.dep.hosts.len()).filter(|&h| !self.world.host_down[h])
    }

    /// The backup a VM had, if it can still serve as one (alive and reachable).
    fn old_backup(&self, v: usize) -> Option<usize> {
        self.initial.vms[v].backup.filter(|&b| !self.world.port_down[b])
    }

    /// The host holding a displaced VM's state (its backup), if it is alive.
    fn state_host(&self, v: usize) -> Option<usize> {
        self.initial.vms[v].backup.filter(|&b| !self.world.host_down[b])
    }

    /// How many combinations of choices the VMs the fault forces to change have (displaced
    /// VMs, and VMs whose backup is lost).
    pub fn forced_space(&self) -> f64 {
        let empty = Loads::empty(self);
        let mut space = 1.0;
        for v in
            (0..self.dep.vms.len()).filter(|&v| self.displaced[v] || (self.initial.vms[v].backup.is_some() && self.old_backup(v).is_none()))
        {
            // As many as `choices(v, &empty).len()`, counted without building them.
            let n: usize = self.primaries(v, &empty).iter().map(|inst| self.backup_count(v, self.host(inst[0]))).sum::<usize>() + 1;
            space *= n as f64;
            if space > 1e18 {
                break; // far beyond any budget
            }
        }
        space
    }

    /// `backups(v, h).len()`, without building the list.
    fn backup_count(&self, v: usize, h: usize) -> usize {
        if !self.dep.vms[v].mode.remote() {
            return 1;
        }
        let kept = self.old_backup(v).filter(|&b| b != h && !self.displaced[v]);
        let others = if self.world.port_down[h] {
            0
        } else {
            self.live_hosts().filter(|&b| b != h && !self.world.port_down[b] && Some(b) != kept).count()
        };
        usize::from(kept.is_some()) + others + 1
    }

    /// What one VM's choice costs.
    pub fn vm_cost(&self, v: usize, p: &VmPlace) -> VmCost {
        if !p.running() {
            return VmCost { stopped: true, ..VmCost::default() };
        }
        let vm = &self.dep.vms[v];
        let init = &self.initial.vms[v];
        let h = self.host(p.instances[0]);
        let mut c = VmCost { lost: vm.mode.remote() && p.backup.is_none(), ..VmCost::default() };
        // The backup kept as it was (if still usable), or none: anything else is a new copy.
        let mut kept_backup = None;
        if !self.displaced[v] {
            if p.instances != init.instances {
                c.untouched_moved = 1;
                c.moves += 1;
                c.bytes = &vm.memory * &Q::int(p.instances.len() as i64);
            }
            if let Some(b0) = self.old_backup(v) {
                if h != b0 && p.backup != Some(b0) {
                    c.moves += 1;
                }
                kept_backup = Some(b0);
            }
        } else if let Some(b) = self.state_host(v) {
            if h != b {
                // The replica is copied to the new host before the VM resumes there.
                c.moves += 1;
                c.bytes = vm.memory.clone();
                c.downtime_bytes = vm.memory.clone();
            }
        }
        if p.backup.is_some() && p.backup != kept_backup {
            c.bytes = &c.bytes + &vm.memory;
        }
        c
    }

    /// The cost of a whole placement, with `misses` from its verdict.
    pub fn cost(&self, place: &Placement, misses: usize) -> Cost {
        let mut c = Cost::zero(self.levels.len());
        c.misses = misses;
        for (v, p) in place.vms.iter().enumerate() {
            c.add(self.level_of[v], &self.vm_cost(v, p));
        }
        c
    }

    /// Every choice for VM `v`: where its instances run and where its backup is, or stopped.
    /// The choice that changes least comes first, stopping last.
    pub fn choices(&self, v: usize, loads: &Loads) -> Vec<VmPlace> {
        let mut out = Vec::new();
        for instances in self.primaries(v, loads) {
            let h = self.host(instances[0]);
            for backup in self.backups(v, h) {
                out.push(VmPlace { instances: instances.clone(), backup });
            }
        }
        out.push(VmPlace { instances: vec![], backup: None });
        out
    }

    /// Where VM `v`'s instances can run: where they are first (unless displaced), then, for a
    /// displaced VM, the host holding its state, then every live host.
    pub fn primaries(&self, v: usize, loads: &Loads) -> Vec<Vec<usize>> {
        let vm = &self.dep.vms[v];
        let init = &self.initial.vms[v];
        let mut prims: Vec<Vec<usize>> = Vec::new();
        if !self.displaced[v] {
            prims.push(init.instances.clone());
        }
        let mut hosts: Vec<usize> = self.live_hosts().collect();
        if let Some(b) = self.state_host(v).filter(|_| self.displaced[v]) {
            hosts.sort_by_key(|&h| h != b);
        }
        for h in hosts {
            if vm.instances.len() == 1 {
                for &c in &self.dep.hosts[h].processors {
                    if prims.first() != Some(&vec![c]) {
                        prims.push(vec![c]);
                    }
                }
            } else if prims.first().is_none_or(|p| self.host(p[0]) != h) {
                if let Some(list) = loads.fit_instances(self, v, h) {
                    prims.push(list);
                }
            }
        }
        prims
    }

    /// Where VM `v`'s backup can be when its instances run on host `h`: where it is (if still
    /// usable), every other reachable host, or none.
    pub fn backups(&self, v: usize, h: usize) -> Vec<Option<usize>> {
        let mut backups: Vec<Option<usize>> = Vec::new();
        if self.dep.vms[v].mode.remote() {
            if let Some(b0) = self.old_backup(v).filter(|&b| b != h && !self.displaced[v]) {
                backups.push(Some(b0));
            }
            if !self.world.port_down[h] {
                for b in self.live_hosts() {
                    if b != h && !self.world.port_down[b] && !backups.contains(&Some(b)) {
                        backups.push(Some(b));
                    }
                }
            }
        }
        backups.push(None);
        backups
    }
}

/// What the placed VMs take of each processor and host.
#[derive(Debug, Clone)]
pub struct Loads {
    /// Per resource (processors): share taken.
    share: Vec<Q>,
    /// Per processor: VMs running as plain tasks (they cannot share a processor with
    /// reservations).
    plain: Vec<usize>,
    reserved: Vec<usize>,
    /// Per host: memory taken.
    memory: Vec<Q>,
    /// Per host: the running VMs whose instances are on it (for anti-affinity).
    on_host: Vec<Vec<usize>>,
}

impl Loads {
    pub fn empty(p: &Problem) -> Loads {
        let n = p.base.resources.len();
        let hosts = p.dep.hosts.len();
        Loads {
            share: vec![Q::zero(); n],
            plain: vec![0; n],
            reserved: vec![0; n],
            memory: vec![Q::zero(); hosts],
            on_host: vec![Vec::new(); hosts],
        }
    }

    pub fn of(p: &Problem, place: &Placement) -> Loads {
        let mut l = Loads::empty(p);
        for (v, vp) in place.vms.iter().enumerate() {
            l.add(p, v, vp, true);
        }
        l
    }

    pub fn add(&mut self, p: &Problem, v: usize, vp: &VmPlace, add: bool) {
        let vm = &p.dep.vms[v];
        let plain = vm.reservation.is_none();
        for &c in &vp.instances {
            if add {
                self.share[c] = &self.share[c] + &vm.share;
            } else {
                self.share[c] = &self.share[c] - &vm.share;
            }
            let counter = if plain { &mut self.plain[c] } else { &mut self.reserved[c] };
            if add {
                *counter += 1;
            } else {
                *counter -= 1;
            }
        }
        if let Some(&c) = vp.instances.first() {
            let h = p.host(c);
            let m = &vm.memory * &Q::int(vp.instances.len() as i64);
            self.memory[h] = if add { &self.memory[h] + &m } else { &self.memory[h] - &m };
            if add {
                self.on_host[h].push(v);
            } else if let Some(k) = self.on_host[h].iter().position(|&x| x == v) {
                self.on_host[h].swap_remove(k);
            }
        }
        if let (Some(b), true) = (vp.backup, vp.running()) {
            self.memory[b] = if add { &self.memory[b] + &vm.memory } else { &self.memory[b] - &vm.memory };
        }
    }

    /// Whether VM `v` placed as `vp` fits on top of these loads.
    pub fn fits(&self, p: &Problem, v: usize, vp: &VmPlace) -> bool {
        let vm = &p.dep.vms[v];
        let plain = vm.reservation.is_none();
        let mut extra: Vec<(usize, Q)> = Vec::new();
        for &c in &vp.instances {
            if (plain && self.reserved[c] > 0) || (!plain && self.plain[c] > 0) {
                return false;
            }
            match extra.iter_mut().find(|(x, _)| *x == c) {
                Some((_, s)) => *s = &*s + &vm.share,
                None => extra.push((c, vm.share.clone())),
            }
        }
        if extra.iter().any(|(c, s)| &self.share[*c] + s > Q::one()) {
            return false;
        }
        // Anti-affinity: no VM it must be kept apart from already runs on that host.
        if let Some(&c) = vp.instances.first() {
            if p.dep.vms[v].apart.iter().any(|u| self.on_host[p.host(c)].contains(u)) {
                return false;
            }
        }
        let mut mem: Vec<(usize, Q)> = Vec::new();
        if let Some(&c) = vp.instances.first() {
            mem.push((p.host(c), &vm.memory * &Q::int(vp.instances.len() as i64)));
        }
        if let (Some(b), true) = (vp.backup, vp.running()) {
            mem.push((b, vm.memory.clone()));
        }
        mem.iter().all(|(h, m)| &self.memory[*h] + m <= p.dep.hosts[*h].memory)
    }

    /// Processors of host `h` for the instances of VM `v`, each on the processor with the most
    /// room left (None if they do not fit).
    pub fn fit_instances(&self, p: &Problem, v: usize, h: usize) -> Option<Vec<usize>> {
        let vm = &p.dep.vms[v];
        if vm.apart.iter().any(|u| self.on_host[h].contains(u)) {
            return None;
        }
        let mut share: Vec<(usize, Q)> = p.dep.hosts[h].processors.iter().map(|&c| (c, self.share[c].clone())).collect();
        let mut out = Vec::new();
        for _ in 0..vm.instances.len() {
            let (c, s) =
                share.iter_mut().filter(|(c, s)| &*s + &vm.share <= Q::one() && self.plain[*c] == 0).min_by(|a, b| a.1.cmp(&b.1))?;
            *s = &*s + &vm.share;
            out.push(*c);
        }
        out.sort_unstable();
        Some(out)
    }

    /// Room left on processor `c`.
    pub fn free(&self, c: usize) -> Q {
        Q::one() - &self.share[c]
    }

    pub fn free_memory(&self, p: &Problem, h: usize) -> Q {
        &p.dep.hosts[h].memory - &self.memory[h]
    }
}

/// How hard to search.
#[derive(Debug, Clone)]
pub struct SearchOptions {
    /// Most placements the branch and bound evaluates before it gives up proving optimality.
    pub exact_budget: usize,
    /// Alternatives tried per VM when the greedy search repairs or improves a placement.
    pub alternatives: usize,
    /// Validate each plan by a full analysis instead of an incremental one from the initial
    /// placement's analysis (`plan::Validation`); both give the same plans (tested).
    pub full_validation: bool,
}

impl Default for SearchOptions {
    fn default() -> SearchOptions {
        SearchOptions { exact_budget: 20_000, alternatives: 4, full_validation: false }
    }
}

fn score(p: &Problem, ev: &mut Evaluator, place: Placement) -> Result<Scored, AnalysisError> {
    let verdict = ev.evaluate(&p.world, &place)?;
    let cost = p.cost(&place, verdict.misses);
    Ok(Scored { place, cost, verdict })
}

/// Greedy placement with repair (see the module documentation).
pub fn greedy(p: &Problem, ev: &mut Evaluator, opts: &SearchOptions) -> Result<Scored, AnalysisError> {
    let mut place = p.initial.clone();
    // Start from what survives: displaced VMs are unplaced, dead or unreachable backups gone.
    for v in 0..place.vms.len() {
        if p.displaced[v] {
            place.vms[v] = VmPlace { instances: vec![], backup: None };
        } else if place.vms[v].backup.is_some() && p.old_backup(v).is_none() {
            place.vms[v].backup = None;
        }
    }
    let mut loads = Loads::of(p, &place);
    for &v in &p.order {
        if !p.displaced[v] {
            continue;
        }
        // (disturbance: untouched moved, bytes, downtime bytes, moves), room, choice.
        type Candidate = ((usize, Q, Q, usize), Q, VmPlace);
        let mut best: Option<Candidate> = None;
        for instances in p.primaries(v, &loads) {
            // Place the instances now, the backup below; fewest moves, then the most room.
            let c = VmPlace { instances, backup: None };
            if !loads.fits(p, v, &c) {
                continue;
            }
            let vc = p.vm_cost(v, &c);
            let disturb = (vc.untouched_moved, vc.bytes, vc.downtime_bytes, vc.moves);
            let room = c.instances.iter().map(|&x| loads.free(x)).min().unwrap_or_default();
            if best.as_ref().is_none_or(|(m, r, _)| disturb < *m || (&disturb == m && room > *r)) {
                best = Some((disturb, room, c));
            }
        }
        if let Some((_, _, c)) = best {
            loads.add(p, v, &c, true);
            place.vms[v] = c;
        }
    }
    give_backups(p, &mut place, &mut loads);
    let mut cur = score(p, ev, place)?;

    // Repair missed deadlines by moving the VMs involved, then by shedding.
    for _round in 0..2 * p.dep.vms.len() + 2 {
        if cur.cost.misses == 0 {
            break;
        }
        let involved = involved_vms(p, &cur.verdict);
        let mut improved: Option<Scored> = None;
        for &v in &involved {
            for alt in alternatives(p, &cur.place, v, opts.alternatives) {
                let mut place = cur.place.clone();
                place.vms[v] = alt;
                let s = score(p, ev, place)?;
                if s.better_than(improved.as_ref().unwrap_or(&cur)) {
                    improved = Some(s);
                }
            }
        }
        if let Some(s) = improved {
            cur = s;
            continue;
        }
        // Shed the least critical running VM, preferring those involved in the misses.
        let victim = (0..p.dep.vms.len())
            .filter(|&v| cur.place.vms[v].running())
            .min_by_key(|&v| (p.dep.vms[v].criticality, !involved.contains(&v), std::cmp::Reverse(p.dep.vms[v].share.clone())));
        let Some(victim) = victim else { break };
        let mut place = cur.place.clone();
        place.vms[victim] = VmPlace { instances: vec![], backup: None };
        let mut loads = Loads::of(p, &place);
        give_backups(p, &mut place, &mut loads);
        cur = score(p, ev, place)?;
    }

    // With deadlines met, try other processors for the displaced VMs that share a resource
    // with the tightest deadline: more slack at no cost. (Moving any other VM cannot raise
    // the smallest slack, except by unloading those resources indirectly.)
    if cur.cost.misses == 0 {
        let near = near_tightest(p, &cur, ev.system_of(&cur.place));
        for &v in &p.order {
            if !p.displaced[v] || !cur.place.vms[v].running() || !near.contains(&v) {
                continue;
            }
            for alt in alternatives(p, &cur.place, v, opts.alternatives) {
                let mut place = cur.place.clone();
                place.vms[v] = alt;
                let s = score(p, ev, place)?;
                if s.better_than(&cur) {
                    cur = s;
                }
            }
        }
    }
    Ok(cur)
}

/// VMs with a task (or message, or checkpoint stream) on a resource used by the tasks with the
/// smallest slack, or on the processors of those tasks' VMs.
fn near_tightest(p: &Problem, s: &Scored, sys: &System) -> Vec<usize> {
    let host_proc = |r: usize| match &sys.resources[r].kind {
        rtc::system::ResourceKind::Reservation { host, .. } => *host,
        _ => r,
    };
    let used: Vec<usize> = s.verdict.tightest.iter().flat_map(|&t| [sys.tasks[t].resource, host_proc(sys.tasks[t].resource)]).collect();
    let mut out = Vec::new();
    for (t, task) in sys.tasks.iter().enumerate() {
        if !used.contains(&task.resource) && !used.contains(&host_proc(task.resource)) {
            continue;
        }
        let owner = p.dep.vm_of_task[t]
            .or_else(|| p.dep.messages.iter().find(|m| m.task == t).and_then(|m| p.dep.vm_of_task[m.sender]))
            .or_else(|| p.dep.vms.iter().position(|v| v.checkpoint.as_ref().is_some_and(|c| c.task == t)));
        if let Some(o) = owner {
            if !out.contains(&o) {
                out.push(o);
            }
        }
    }
    out
}

/// Gives a backup to every running remote-mode VM without one: on the reachable host with the
/// most free memory.
fn give_backups(p: &Problem, place: &mut Placement, loads: &mut Loads) {
    for &v in &p.order {
        let vm = &p.dep.vms[v];
        let cur = &place.vms[v];
        if !vm.mode.remote() || !cur.running() || cur.backup.is_some() {
            continue;
        }
        let h = p.host(cur.instances[0]);
        if p.world.port_down[h] {
            continue;
        }
        let best = p
            .live_hosts()
            .filter(|&b| b != h && !p.world.port_down[b])
            .filter(|&b| loads.free_memory(p, b) >= vm.memory)
            .max_by(|&a, &b| loads.free_memory(p, a).cmp(&loads.free_memory(p, b)).then(b.cmp(&a)));
        if let Some(b) = best {
            let np = VmPlace { instances: cur.instances.clone(), backup: Some(b) };
            loads.add(p, v, &place.vms[v], false);
            loads.add(p, v, &np, true);
            place.vms[v] = np;
        }
    }
}

/// Up to `k` other running choices for VM `v` that fit, the roomiest first; each keeps the
/// VM's backup if it can, or gets the reachable host with the most free memory.
fn alternatives(p: &Problem, place: &Placement, v: usize, k: usize) -> Vec<VmPlace> {
    let mut loads = Loads::of(p, place);
    let cur = &place.vms[v];
    loads.add(p, v, cur, false);
    let vm = &p.dep.vms[v];
    let mut alts: Vec<(Q, VmPlace)> = Vec::new();
    for instances in p.primaries(v, &loads) {
        if instances == cur.instances {
            continue;
        }
        let h = p.host(instances[0]);
        let backup = if cur.backup.is_some_and(|b| b != h && !p.world.port_down[h]) {
            cur.backup
        } else if vm.mode.remote() && cur.backup.is_some() {
            p.backups(v, h)
                .into_iter()
                .flatten()
                .filter(|&b| loads.free_memory(p, b) >= vm.memory)
                .max_by(|&a, &b| loads.free_memory(p, a).cmp(&loads.free_memory(p, b)).then(b.cmp(&a)))
        } else {
            None
        };
        if vm.mode.remote() && cur.backup.is_some() && backup.is_none() {
            continue;
        }
        let c = VmPlace { instances, backup };
        if loads.fits(p, v, &c) {
            alts.push((c.instances.iter().map(|&x| loads.free(x)).min().unwrap_or_default(), c));
        }
    }
    alts.sort_by(|a, b| b.0.cmp(&a.0));
    alts.into_iter().take(k).map(|(_, c)| c).collect()
}

/// VMs whose tasks or messages are in a missed deadline.
fn involved_vms(p: &Problem, v: &Verdict) -> Vec<usize> {
    let mut tasks: Vec<usize> = v.missed_tasks.clone();
    tasks.extend(v.undeliverable.iter().copied());
    for &c in &v.missed_chains {
        tasks.extend(p.base.chains[c].tasks.iter().copied());
    }
    let mut out: Vec<usize> = Vec::new();
    for t in tasks {
        let owner = p.dep.vm_of_task[t].or_else(|| {
            // A message belongs to its sender's VM.
            p.dep.messages.iter().find(|m| m.task == t).and_then(|m| p.dep.vm_of_task[m.sender])
        });
        if let Some(o) = owner {
            if !out.contains(&o) {
                out.push(o);
            }
        }
    }
    out
}

/// Branch and bound from an incumbent. Returns the best placement and whether the search
/// finished (then it is optimal).
pub fn branch_and_bound(p: &Problem, ev: &mut Evaluator, incumbent: Scored, budget: usize) -> Result<(Scored, bool), AnalysisError> {
    struct Bb<'p, 'a, 'e> {
        p: &'p Problem<'a>,
        ev: &'p mut Evaluator<'e>,
        best: Scored,
        leaves: usize,
        budget: usize,
        aborted: bool,
    }
    fn dfs(bb: &mut Bb, k: usize, place: &mut Placement, loads: &mut Loads, partial: &Cost) -> Result<(), AnalysisError> {
        if bb.aborted {
            return Ok(());
        }
        let p = bb.p;
        if k == p.order.len() {
            if bb.leaves >= bb.budget {
                bb.aborted = true;
                return Ok(());
            }
            bb.leaves += 1;
            let s = score(p, bb.ev, place.clone())?;
            if s.better_than(&bb.best) {
                bb.best = s;
            }
            return Ok(());
        }
        // Only the VMs decided so far are in `loads`: pruning on capacity is then sound.
        let v = p.order[k];
        let keep = place.vms[v].clone();
        for c in p.choices(v, loads) {
            if !loads.fits(p, v, &c) {
                continue;
            }
            // Every part of the cost only grows as VMs are added, so a partial cost already
            // above the best complete one cannot lead to a better placement.
            let mut next = partial.clone();
            next.add(p.level_of[v], &p.vm_cost(v, &c));
            if next > bb.best.cost {
                continue;
            }
            loads.add(p, v, &c, true);
            place.vms[v] = c.clone();
            dfs(bb, k + 1, place, loads, &next)?;
            loads.add(p, v, &c, false);
            if bb.aborted {
                break;
            }
        }
        place.vms[v] = keep;
        Ok(())
    }
    let mut place = p.initial.clone();
    let mut loads = Loads::empty(p);
    let mut bb = Bb { p, ev, best: incumbent, leaves: 0, budget, aborted: false };
    let zero = Cost::zero(p.levels.len());
    dfs(&mut bb, 0, &mut place, &mut loads, &zero)?;
    Ok((bb.best, !bb.aborted))
}

/// Every combination of every VM's choices, each analysed in full, no pruning: the reference
/// for tests (exponential; only for a handful of VMs).
pub fn exhaustive(p: &Problem) -> Result<Scored, AnalysisError> {
    exhaustive_where(p, |_| true)
}

/// [`exhaustive`] over the placements `keep` accepts (besides capacity): lets a test impose a
/// constraint independently of the planner's own checks.
pub fn exhaustive_where(p: &Problem, keep: impl Fn(&Placement) -> bool) -> Result<Scored, AnalysisError> {
    let n = p.dep.vms.len();
    let empty = Loads::empty(p);
    // Choices per VM, independent of the others (instances of multi-instance VMs are fitted
    // on an empty host, which lists every host).
    let per_vm: Vec<Vec<VmPlace>> = (0..n).map(|v| p.choices(v, &empty)).collect();
    let mut idx = vec![0usize; n];
    let mut best: Option<Scored> = None;
    let mut sys = p.base.clone();
    loop {
        let place = Placement { vms: (0..n).map(|v| per_vm[v][idx[v]].clone()).collect() };
        if capacity_ok(p, &place) && keep(&place) {
            p.dep.apply(p.base, &place, &mut sys);
            let an = analyze(&sys, &crate::eval::planning_options())?;
            let verdict = verdict(p.base, p.dep, &p.world, &place, &an);
            let s = Scored { cost: p.cost(&place, verdict.misses), place, verdict };
            if best.as_ref().is_none_or(|b| s.better_than(b)) {
                best = Some(s);
            }
        }
        // Next combination.
        let mut k = 0;
        loop {
            if k == n {
                return Ok(best.expect("stopping every VM always fits"));
            }
            idx[k] += 1;
            if idx[k] < per_vm[k].len() {
                break;
            }
            idx[k] = 0;
            k += 1;
        }
    }
}

/// Processor shares and host memory within capacity, every VM on live hosts.
pub fn capacity_ok(p: &Problem, place: &Placement) -> bool {
    let mut loads = Loads::empty(p);
    for (v, vp) in place.vms.iter().enumerate() {
        if vp.instances.iter().any(|&c| p.world.host_down[p.host(c)]) || vp.backup.is_some_and(|b| p.world.host_down[b]) {
            return false;
        }
        if !loads.fits(p, v, vp) {
            return false;
        }
        loads.add(p, v, vp, true);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `forced_space` counts the choices it used to build: on the example and a synthetic
    /// cluster, for every single-host failure, it equals the product of `choices(..).len()`.
    #[test]
    fn forced_space_counts_the_choices() {
        let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/cluster.toml")).unwrap();
        for text in [example, crate::synthetic::cluster(60, 6, 3)] {
            let l = model::parse(&text, "c.toml", std::path::Path::new(".")).unwrap();
            let dep = l.deployment.as_ref().unwrap();
            let links: Vec<usize> = dep.hosts.iter().filter_map(|h| h.port).collect();
            for s in crate::scenario::enumerate(dep, &links, 1, true) {
                let p = Problem::new(&l.system, dep, crate::eval::World::new(dep, &l.system, &s));
                let empty = Loads::empty(&p);
                let built: f64 = (0..dep.vms.len())
                    .filter(|&v| p.displaced[v] || (p.initial.vms[v].backup.is_some() && p.old_backup(v).is_none()))
                    .map(|v| p.choices(v, &empty).len() as f64)
                    .product();
                let counted = p.forced_space();
                if built > 1e18 {
                    assert!(counted > 1e18, "{s:?}: {counted} vs {built}");
                } else {
                    assert_eq!(counted, built, "{s:?}");
                }
            }
        }
    }
}
