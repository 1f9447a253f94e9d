//! The deployment part of a system description: hosts (their processors, memory and network
//! port), and for each VM its execution mode, criticality, memory, where its instances and its
//! remote backup are, and the checkpoint traffic that feeds the backup.
//!
//! A [`Deployment`] knows how to turn a [`Placement`] (where every VM's instances and backup
//! are) into the [`System`] the analysis sees: a VM's reservation moves to the processor of its
//! first instance, a message between VMs leaves through the port of its sender's host (or the
//! host's loopback when every receiver is on the same host), a checkpoint stream becomes a
//! message on the port of the primary's host, and a stopped VM's tasks do no work. Indices of
//! resources, streams and tasks never change, so one placement's analysis can be updated
//! incrementally into another's.

use crate::error::ModelError;
use crate::names::NameMap;
use crate::raw::{RawFile, RawVm};
use crate::units;
use crate::validate::{Ctx, Site};
use crate::{Item, ItemKind};
use rtc::models::EventModel;
use rtc::system::{Blackout, Input, Policy, Resource, ResourceKind, Stream, System, Task};
use rtc::Q;

type Result<T> = std::result::Result<T, ModelError>;

/// How a VM is made fault tolerant (DESIGN §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// One instance, no redundancy.
    Normal,
    /// Two or more instances on one host, fed the same inputs (tolerates software faults).
    Local,
    /// One instance and a replica on another host kept current by checkpoints (tolerates the
    /// failure of the host).
    Remote,
    /// Both.
    LocalRemote,
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Local => "local",
            Mode::Remote => "remote",
            Mode::LocalRemote => "local+remote",
        }
    }
    /// Whether the mode keeps a replica on another host.
    pub fn remote(&self) -> bool {
        matches!(self, Mode::Remote | Mode::LocalRemote)
    }
}

/// A host: a machine that fails as a whole.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub line: usize,
    /// Bytes.
    pub memory: Q,
    /// Its processors (resource indices).
    pub processors: Vec<usize>,
    /// The link its traffic to other hosts leaves on (resource index), if it has one.
    pub port: Option<usize>,
    /// Traffic between VMs on this host (resource index).
    pub loopback: usize,
}

/// The checkpoint stream that keeps a VM's remote backup current.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The message task carrying it (on the primary's host port).
    pub task: usize,
    /// Worst-case bytes per checkpoint.
    pub size: Q,
    pub interval: Q,
    /// Longest pause of the VM per checkpoint: its reservations' blackout while protected.
    pub pause: Option<Q>,
    /// Longest hold of an output until its checkpoint is acknowledged, and the VM's tasks whose
    /// completions leave the VM (or end a chain) and are held so while protected (when a
    /// commit is declared).
    pub commit: Option<Q>,
    pub held: Vec<usize>,
    /// The backup's staging and acknowledgement per checkpoint (`checkpoint_ack`).
    pub ack: Option<Q>,
}

#[derive(Debug, Clone)]
pub struct Vm {
    pub name: String,
    pub line: usize,
    pub mode: Mode,
    /// Higher is more critical; the least critical VMs are shed first.
    pub criticality: i64,
    /// Bytes, per instance (a backup holds as much).
    pub memory: Q,
    /// Processors its instances run on now (all on one host).
    pub instances: Vec<usize>,
    /// Host of its remote backup now.
    pub backup: Option<usize>,
    /// Its reservation (resource index), if it has one.
    pub reservation: Option<usize>,
    /// The reservations of its further local instances (no tasks run in them: every instance
    /// runs the same tasks, analysed once in `reservation`).
    pub extra_reservations: Vec<usize>,
    /// The VM itself as a task (task index), if it is one.
    pub task: Option<usize>,
    /// Every task that runs in the VM (in its reservation, or the VM itself).
    pub tasks: Vec<usize>,
    /// Long-run share of a processor one instance takes (budget/period, or its task's load).
    pub share: Q,
    pub checkpoint: Option<Checkpoint>,
    /// VMs whose instances must never run on the same host as this one's (anti-affinity,
    /// symmetric: each lists the other), sorted.
    pub apart: Vec<usize>,
}

/// A message that travels between hosts and is routed by the placement of its sender.
#[derive(Debug, Clone)]
pub struct Message {
    pub task: usize,
    /// The task whose completions it carries.
    pub sender: usize,
    /// Tasks activated by it.
    pub receivers: Vec<usize>,
}

/// Where every VM runs: indexed like [`Deployment::vms`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Placement {
    pub vms: Vec<VmPlace>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VmPlace {
    /// Processors of its instances; empty when the VM is stopped.
    pub instances: Vec<usize>,
    /// Host of its remote backup.
    pub backup: Option<usize>,
}

impl VmPlace {
    pub fn running(&self) -> bool {
        !self.instances.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct Deployment {
    pub hosts: Vec<Host>,
    pub vms: Vec<Vm>,
    pub messages: Vec<Message>,
    /// For every resource: the host it belongs to (processors, ports, loopbacks).
    pub host_of: Vec<Option<usize>>,
    /// For every task: the VM it runs in.
    pub vm_of_task: Vec<Option<usize>>,
    /// For every resource: the VM whose reservation it is.
    pub vm_of_resource: Vec<Option<usize>>,
}

impl Deployment {
    /// Where everything runs as described in the file.
    pub fn initial(&self) -> Placement {
        Placement { vms: self.vms.iter().map(|v| VmPlace { instances: v.instances.clone(), backup: v.backup }).collect() }
    }

    /// Host of a processor.
    pub fn host_of_processor(&self, p: usize) -> Option<usize> {
        self.host_of.get(p).copied().flatten()
    }

    /// The first pair of running VMs (a, b, their host) that `place` puts on one host although
    /// they must be kept apart (`apart`), if any.
    pub fn apart_violation(&self, place: &Placement) -> Option<(usize, usize, usize)> {
        let host = |v: usize| place.vms[v].instances.first().and_then(|&p| self.host_of_processor(p));
        for (a, vm) in self.vms.iter().enumerate() {
            for &b in vm.apart.iter().filter(|&&b| b > a) {
                if let (Some(ha), Some(hb)) = (host(a), host(b)) {
                    if ha == hb {
                        return Some((a, b, ha));
                    }
                }
            }
        }
        None
    }

    /// Host a task runs on under `place` (None for tasks off the hosts, or of a stopped VM).
    pub fn host_of_task(&self, sys: &System, place: &Placement, task: usize) -> Option<usize> {
        match self.vm_of_task[task] {
            Some(v) => place.vms[v].instances.first().and_then(|&p| self.host_of_processor(p)),
            None => self.host_of[sys.tasks[task].resource],
        }
    }

    /// Rewrites `sys` (built from this deployment) for `place`. `base` is the system as
    /// loaded; only resource assignments, reservation hosts and the work of stopped VMs and
    /// unused checkpoint streams change. Every one of those fields is written, from `place` or
    /// (for a stopped VM, a message of a stopped sender, a checkpoint stream without a port)
    /// from `base`, so the result depends only on `base` and `place`, not on what `sys` held:
    /// a scratch system can be reused for any placement.
    pub fn apply(&self, base: &System, place: &Placement, sys: &mut System) {
        for (v, vm) in self.vms.iter().enumerate() {
            let pl = &place.vms[v];
            let running = pl.running();
            for (k, r) in vm.reservation.iter().chain(&vm.extra_reservations).enumerate() {
                let to = pl.instances.get(k).copied();
                if let (ResourceKind::Reservation { host, .. }, ResourceKind::Reservation { host: h0, .. }) =
                    (&mut sys.resources[*r].kind, &base.resources[*r].kind)
                {
                    *host = to.unwrap_or(*h0);
                }
            }
            if let Some(t) = vm.task {
                sys.tasks[t].resource = pl.instances.first().copied().unwrap_or(base.tasks[t].resource);
            }
            for &t in &vm.tasks {
                set_work(&mut sys.tasks[t], &base.tasks[t], running);
            }
            if let Some(c) = &vm.checkpoint {
                let primary = pl.instances.first().and_then(|&p| self.host_of_processor(p));
                let port = primary.and_then(|h| self.hosts[h].port);
                let active = running && pl.backup.is_some() && port.is_some();
                set_work(&mut sys.tasks[c.task], &base.tasks[c.task], active);
                sys.tasks[c.task].resource = port.unwrap_or(base.tasks[c.task].resource);
                // While protected, the VM pauses for checkpoints and its output is held.
                let blackout = c.pause.clone().filter(|_| active).map(|pause| Blackout { pause, every: c.interval.clone() });
                for &r in vm.reservation.iter().chain(&vm.extra_reservations) {
                    sys.resources[r].blackout = blackout.clone();
                }
                for &t in &c.held {
                    sys.tasks[t].hold = c.commit.clone().filter(|_| active);
                }
            }
        }
        for m in &self.messages {
            let sender_runs = self.vm_of_task[m.sender].is_none_or(|v| place.vms[v].running());
            set_work(&mut sys.tasks[m.task], &base.tasks[m.task], sender_runs);
            let Some(from) = self.host_of_task(base, place, m.sender) else {
                sys.tasks[m.task].resource = base.tasks[m.task].resource;
                continue;
            };
            let local = m.receivers.iter().all(|&r| self.host_of_task(base, place, r) == Some(from));
            let h = &self.hosts[from];
            sys.tasks[m.task].resource = match (local, h.port) {
                (true, _) | (false, None) => h.loopback,
                (false, Some(port)) => port,
            };
        }
    }

    /// Messages that cannot be delivered under `place` with the hosts and ports in `down`
    /// failed: the sender's host has no working port but some receiver is elsewhere.
    pub fn undeliverable(&self, base: &System, place: &Placement, port_down: &[bool]) -> Vec<usize> {
        let mut out = Vec::new();
        for m in &self.messages {
            let Some(from) = self.host_of_task(base, place, m.sender) else { continue };
            let remote: Vec<Option<usize>> =
                m.receivers.iter().map(|&r| self.host_of_task(base, place, r)).filter(|h| *h != Some(from)).collect();
            if remote.is_empty() {
                continue;
            }
            let ok_from = self.hosts[from].port.is_some() && !port_down[from];
            let ok_to = remote.iter().all(|h| h.is_none_or(|h| self.hosts[h].port.is_some() && !port_down[h]));
            if !(ok_from && ok_to) {
                out.push(m.task);
            }
        }
        out
    }
}

fn set_work(t: &mut Task, base: &Task, on: bool) {
    if on {
        t.wcet = base.wcet.clone();
        t.bcet = base.bcet.clone();
        t.workload = base.workload.clone();
    } else {
        t.wcet = Q::zero();
        t.bcet = Q::zero();
        t.workload = None;
    }
}

/// What `validate::build` knows when it gets to the deployment.
pub(crate) struct Parts<'a> {
    pub raw: &'a RawFile,
    pub ctx: &'a Ctx<'a>,
    pub sys: &'a mut System,
    pub res_items: &'a mut Vec<Item>,
    pub task_items: &'a mut Vec<Item>,
    pub stream_items: &'a mut Vec<Item>,
    pub stream_rates: &'a mut Vec<Q>,
    pub task_index: &'a NameMap<&'a str, usize>,
    pub res_index: &'a NameMap<&'a str, usize>,
    pub processors: usize,
    pub links: usize,
}

/// Default bandwidth between VMs of one host (a memory copy through the VMM).
const LOOPBACK: &str = "10Gbit/s";

/// The voter's work per reply: compare the replies and pass the voted one on (µs; measured
/// about 0.1 ms on this project's machines, `vigil bench voting`).
fn vote_work() -> Q {
    Q::int(100)
}

pub(crate) fn build(p: Parts) -> Result<Option<Deployment>> {
    let Parts { raw, ctx, sys, res_items, task_items, stream_items, stream_rates, task_index, res_index, processors, links } = p;
    let deployment_keys = |v: &RawVm| {
        v.instances.is_some()
            || v.mode.is_some()
            || v.criticality.is_some()
            || v.memory.is_some()
            || v.backup.is_some()
            || v.checkpoint_size.is_some()
            || v.checkpoint_interval.is_some()
            || v.checkpoint_priority.is_some()
            || v.voting_delay.is_some()
            || v.checkpoint_pause.is_some()
            || v.output_commit.is_some()
            || v.checkpoint_ack.is_some()
            || v.apart.is_some()
    };
    if raw.host.is_empty() {
        if let Some(l) = raw.link.iter().find(|l| l.get_ref().host.is_some()) {
            let s = Site::new(ItemKind::Link, &l.get_ref().name, l.span());
            return Err(ctx.fail(&s, Some("host"), format!("unknown host {:?} (the file has no [[host]])", l.get_ref().host)));
        }
        if let Some(v) = raw.vm.iter().find(|v| deployment_keys(v.get_ref())) {
            let r = v.get_ref();
            let s = Site::new(ItemKind::Vm, &r.name, v.span());
            let given = [
                ("instances", r.instances.is_some()),
                ("mode", r.mode.is_some()),
                ("criticality", r.criticality.is_some()),
                ("memory", r.memory.is_some()),
                ("backup", r.backup.is_some()),
                ("checkpoint_size", r.checkpoint_size.is_some()),
                ("checkpoint_interval", r.checkpoint_interval.is_some()),
                ("checkpoint_priority", r.checkpoint_priority.is_some()),
                ("checkpoint_pause", r.checkpoint_pause.is_some()),
                ("output_commit", r.output_commit.is_some()),
                ("checkpoint_ack", r.checkpoint_ack.is_some()),
                ("apart", r.apart.is_some()),
            ];
            let key = given.iter().find(|(_, g)| *g).map(|(k, _)| *k);
            return Err(ctx.fail(
                &s,
                key,
                format!("`{}` describes a deployment, which needs [[host]] items (see docs/model-format.md)", key.unwrap_or("memory")),
            ));
        }
        return Ok(None);
    }

    // ------------------------------------------------------------- hosts
    let nres = sys.resources.len();
    let mut host_of: Vec<Option<usize>> = vec![None; nres];
    let mut hosts: Vec<Host> = Vec::new();
    let mut host_index: NameMap<&str, usize> = NameMap::default();
    for h in &raw.host {
        let (r, s) = (h.get_ref(), Site::new(ItemKind::Host, &h.get_ref().name, h.span()));
        let memory = match &r.memory {
            Some(v) => ctx.size(&s, "memory", v)?,
            None => return Err(ctx.fail(&s, None, "missing `memory` (e.g. \"64GiB\")")),
        };
        if !memory.is_positive() {
            return Err(ctx.fail(&s, Some("memory"), "`memory` must be positive"));
        }
        let names = r.processors.as_deref().unwrap_or_default();
        if names.is_empty() {
            return Err(ctx.fail(&s, Some("processors"), "a host needs `processors` (the names of its processors)"));
        }
        let hi = hosts.len();
        let mut procs = Vec::new();
        for n in names {
            match res_index.get(n.as_str()) {
                Some(&i) if i < processors => {
                    if let Some(o) = host_of[i] {
                        return Err(ctx.fail(
                            &s,
                            Some("processors"),
                            format!("processor {n:?} already belongs to host {:?}", hosts[o].name),
                        ));
                    }
                    host_of[i] = Some(hi);
                    procs.push(i);
                }
                _ => return Err(ctx.fail(&s, Some("processors"), format!("unknown processor {n:?}"))),
            }
        }
        let lb = match &r.loopback {
            Some(v) => ctx.quantity(&s, "loopback", v, "bandwidth", units::bandwidth)?,
            None => units::bandwidth(LOOPBACK).map_err(|e| ctx.fail(&s, None, e))?,
        };
        if !lb.is_positive() {
            return Err(ctx.fail(&s, Some("loopback"), "`loopback` must be positive"));
        }
        let lb_name = format!("{}.loopback", r.name);
        if res_index.contains_key(lb_name.as_str()) || task_index.contains_key(lb_name.as_str()) {
            return Err(ctx.fail(&s, Some("name"), format!("the name {lb_name:?} is taken; vigil names this host's loopback so")));
        }
        let loopback = sys.resources.len();
        sys.resources.push(Resource {
            blackout: None,
            name: lb_name,
            kind: ResourceKind::Dedicated { rate: lb },
            policy: Policy::Fifo,
            cycle: None,
        });
        res_items.push(Item { kind: ItemKind::Host, line: ctx.line_at(s.span.start) });
        host_of.push(Some(hi));
        host_index.insert(&r.name, hi);
        hosts.push(Host { name: r.name.clone(), line: ctx.line_at(s.span.start), memory, processors: procs, port: None, loopback });
    }
    for (k, l) in raw.link.iter().enumerate() {
        let Some(hn) = &l.get_ref().host else { continue };
        let s = Site::new(ItemKind::Link, &l.get_ref().name, l.span());
        let Some(&h) = host_index.get(hn.as_str()) else {
            return Err(ctx.fail(&s, Some("host"), format!("unknown host {hn:?}")));
        };
        if let Some(o) = hosts[h].port {
            return Err(ctx.fail(&s, Some("host"), format!("host {hn:?} already has a port, link {:?}", sys.resources[o].name)));
        }
        let r = processors + k;
        hosts[h].port = Some(r);
        host_of[r] = Some(h);
    }
    let _ = links;

    // ------------------------------------------------------------- VMs
    let mut vm_of_task: Vec<Option<usize>> = vec![None; sys.tasks.len()];
    let mut vm_of_resource: Vec<Option<usize>> = vec![None; sys.resources.len()];
    let mut vms: Vec<Vm> = Vec::new();
    let mut used_memory: Vec<Q> = vec![Q::zero(); hosts.len()];
    let mut proc_share: Vec<Q> = vec![Q::zero(); nres];
    // Local-mode VMs whose voter is a component of the analysis: (VM, its tasks, delay, line).
    let mut voted: Vec<(usize, Vec<usize>, Q, usize)> = Vec::new();
    for v in &raw.vm {
        let (r, s) = (v.get_ref(), Site::new(ItemKind::Vm, &v.get_ref().name, v.span()));
        let line = ctx.line_at(s.span.start);
        let reservation = res_index.get(r.name.as_str()).copied().filter(|&i| i >= processors + links);
        let task = task_index.get(r.name.as_str()).copied();
        // Processors of the instances ("host" is short for one instance).
        let names: Vec<&str> = match (&r.instances, &r.host) {
            (Some(list), _) => list.iter().map(String::as_str).collect(),
            (None, Some(h)) => vec![h.as_str()],
            (None, None) => vec![],
        };
        if names.is_empty() {
            return Err(ctx.fail(&s, Some("instances"), "`instances` is empty"));
        }
        let mut instances = Vec::new();
        for n in &names {
            match res_index.get(n) {
                Some(&i) if i < processors => instances.push(i),
                _ => return Err(ctx.fail(&s, Some("instances"), format!("instance on unknown processor {n:?}"))),
            }
        }
        let key = if r.instances.is_some() { "instances" } else { "host" };
        let Some(home) = host_of[instances[0]] else {
            return Err(ctx.fail(
                &s,
                Some(key),
                format!("processor {:?} belongs to no host; list it in the `processors` of a [[host]]", names[0]),
            ));
        };
        if let Some(k) = instances.iter().position(|&i| host_of[i] != Some(home)) {
            return Err(ctx.fail(
                &s,
                Some(key),
                format!("instances on processors {:?} and {:?} of different hosts; local instances share one host", names[0], names[k]),
            ));
        }
        let mode = match r.mode.as_deref() {
            None | Some("normal") => Mode::Normal,
            Some("local") => Mode::Local,
            Some("remote") => Mode::Remote,
            Some("local+remote") => Mode::LocalRemote,
            Some(m) => return Err(ctx.fail(&s, Some("mode"), format!("unknown mode {m:?} (use normal, local, remote or local+remote)"))),
        };
        let local = matches!(mode, Mode::Local | Mode::LocalRemote);
        let voting_delay = match &r.voting_delay {
            Some(_) if !local => {
                return Err(ctx.fail(&s, Some("voting_delay"), "`voting_delay` applies only to local redundancy (mode local)"))
            }
            Some(d) => Some(ctx.positive_time(&s, "voting_delay", d)?),
            None => None,
        };
        if local && instances.len() < 2 {
            return Err(ctx.fail(&s, Some("mode"), format!("mode {} needs two or more `instances`", mode.name())));
        }
        if !local && instances.len() > 1 {
            return Err(ctx.fail(&s, Some("instances"), format!("{} instances, but mode {} runs one", instances.len(), mode.name())));
        }
        if local && reservation.is_none() {
            return Err(ctx.fail(&s, Some("mode"), "local redundancy needs a reservation (`budget` and `period`) for each instance"));
        }
        let backup = match (&r.backup, mode.remote()) {
            (Some(b), true) => match host_index.get(b.as_str()) {
                Some(&h) if h == home => {
                    return Err(ctx.fail(
                        &s,
                        Some("backup"),
                        format!("backup on host {b:?}, the host its instances run on: a remote backup must be on another host"),
                    ))
                }
                Some(&h) => Some(h),
                None => return Err(ctx.fail(&s, Some("backup"), format!("backup on unknown host {b:?}"))),
            },
            (None, true) => return Err(ctx.fail(&s, Some("mode"), format!("mode {} needs a `backup` host", mode.name()))),
            (Some(_), false) => return Err(ctx.fail(&s, Some("backup"), format!("`backup` given, but mode {} keeps none", mode.name()))),
            (None, false) => None,
        };
        for (k, given) in [
            ("checkpoint_size", &r.checkpoint_size),
            ("checkpoint_interval", &r.checkpoint_interval),
            ("checkpoint_pause", &r.checkpoint_pause),
            ("output_commit", &r.output_commit),
            ("checkpoint_ack", &r.checkpoint_ack),
        ]
        .map(|(k, v)| (k, v.is_some()))
        {
            if given && !mode.remote() {
                return Err(ctx.fail(&s, Some(k), format!("`{k}` applies only to modes with a remote backup")));
            }
        }
        let criticality = r.criticality.unwrap_or(0);
        if !(0..=1_000_000).contains(&criticality) {
            return Err(ctx.fail(&s, Some("criticality"), "`criticality` must be an integer in [0, 1000000]"));
        }
        let memory = match &r.memory {
            Some(m) => ctx.size(&s, "memory", m)?,
            None => return Err(ctx.fail(&s, None, "missing `memory` (e.g. \"2GiB\"): a VM on a host needs its memory size")),
        };
        if !memory.is_positive() {
            return Err(ctx.fail(&s, Some("memory"), "`memory` must be positive"));
        }
        used_memory[home] = &used_memory[home] + &(&memory * &Q::int(instances.len() as i64));
        if let Some(b) = backup {
            used_memory[b] = &used_memory[b] + &memory;
        }
        let vi = vms.len();
        let mut tasks = Vec::new();
        if let Some(t) = task {
            tasks.push(t);
        }
        if let Some(res) = reservation {
            vm_of_resource[res] = Some(vi);
            tasks.extend(sys.tasks.iter().enumerate().filter(|(i, t)| t.resource == res && Some(*i) != task).map(|(i, _)| i));
        }
        for &t in &tasks {
            vm_of_task[t] = Some(vi);
        }
        let share = match (&sys.resources.get(reservation.unwrap_or(usize::MAX)).map(|x| &x.kind), task) {
            (Some(ResourceKind::Reservation { budget, period, .. }), _) => budget / period,
            (_, Some(t)) => &sys.tasks[t].wcet * &source_rate(sys, stream_rates, t),
            _ => Q::zero(),
        };
        for &i in &instances {
            proc_share[i] = &proc_share[i] + &share;
        }
        let mut extra_reservations = Vec::new();
        if let Some(res) = reservation {
            for (k, &p) in instances.iter().enumerate().skip(1) {
                let mut copy = sys.resources[res].clone();
                copy.name = format!("{}#{}", r.name, k + 1);
                if let ResourceKind::Reservation { host, .. } = &mut copy.kind {
                    *host = p;
                }
                extra_reservations.push(sys.resources.len());
                sys.resources.push(copy);
                res_items.push(Item { kind: ItemKind::Vm, line });
                host_of.push(None);
                vm_of_resource.push(Some(vi));
            }
        }
        // The checkpoint stream: a message on the primary host's port.
        let checkpoint = if mode.remote() {
            let size = match &r.checkpoint_size {
                Some(v) => ctx.size(&s, "checkpoint_size", v)?,
                None => return Err(ctx.fail(&s, None, "missing `checkpoint_size` (worst-case bytes per checkpoint, e.g. \"4MiB\")")),
            };
            let interval = match &r.checkpoint_interval {
                Some(v) => ctx.positive_time(&s, "checkpoint_interval", v)?,
                None => return Err(ctx.fail(&s, None, "missing `checkpoint_interval` (e.g. \"25ms\")")),
            };
            if !size.is_positive() {
                return Err(ctx.fail(&s, Some("checkpoint_size"), "`checkpoint_size` must be positive"));
            }
            let Some(port) = hosts[home].port else {
                return Err(ctx.fail(
                    &s,
                    Some("backup"),
                    format!(
                        "host {:?} has no port (a [[link]] with host = {:?}) to send checkpoints on",
                        hosts[home].name, hosts[home].name
                    ),
                ));
            };
            let (sname, tname) = (format!("{}.checkpoints", r.name), format!("{}.checkpoint", r.name));
            for n in [&sname, &tname] {
                if res_index.contains_key(n.as_str()) || task_index.contains_key(n.as_str()) {
                    return Err(ctx.fail(&s, Some("name"), format!("the name {n:?} is taken; vigil names this VM's checkpoint stream so")));
                }
            }
            let priority = match (sys.resources[port].policy, r.checkpoint_priority) {
                (Policy::FixedPriority | Policy::FixedPriorityNonPreemptive, None) => {
                    return Err(ctx.fail(&s, None, "missing `checkpoint_priority` (the ports use fixed priorities)"))
                }
                (_, p) => p,
            };
            let st = sys.streams.len();
            let model = EventModel::Periodic { period: interval.clone() };
            sys.streams.push(Stream { name: sname, model });
            stream_rates.push(interval.recip().unwrap_or_default());
            stream_items.push(Item { kind: ItemKind::Vm, line });
            let ti = sys.tasks.len();
            sys.tasks.push(Task {
                hold: None,
                name: tname,
                resource: port,
                input: Input::Stream(st),
                wcet: size.clone(),
                bcet: Q::zero(),
                priority,
                deadline: None,
                slot: None,
                workload: None,
            });
            task_items.push(Item { kind: ItemKind::Vm, line });
            vm_of_task.push(None);
            let pause = match &r.checkpoint_pause {
                Some(v) => {
                    let d = ctx.nonneg_time(&s, "checkpoint_pause", v)?;
                    if d >= interval {
                        return Err(ctx.fail(
                            &s,
                            Some("checkpoint_pause"),
                            "`checkpoint_pause` must be shorter than `checkpoint_interval` (the VM would never run)",
                        ));
                    }
                    if reservation.is_none() && d.is_positive() {
                        return Err(ctx.fail(
                            &s,
                            Some("checkpoint_pause"),
                            "`checkpoint_pause` needs the VM's reservation (`budget` and `period`): the pauses are taken out of its service",
                        ));
                    }
                    d.is_positive().then_some(d)
                }
                None => None,
            };
            let commit = match &r.output_commit {
                Some(v) => Some(ctx.nonneg_time(&s, "output_commit", v)?).filter(|d| d.is_positive()),
                None => None,
            };
            let ack = match &r.checkpoint_ack {
                Some(v) => Some(ctx.nonneg_time(&s, "checkpoint_ack", v)?).filter(|d| d.is_positive()),
                None => None,
            };
            Some(Checkpoint { task: ti, size, interval, pause, commit, held: Vec::new(), ack })
        } else {
            if r.checkpoint_priority.is_some() {
                return Err(ctx.fail(&s, Some("checkpoint_priority"), "`checkpoint_priority` applies only to modes with a remote backup"));
            }
            None
        };
        if let Some(d) = voting_delay {
            voted.push((vms.len(), tasks.clone(), d, line));
        }
        vms.push(Vm {
            name: r.name.clone(),
            line,
            mode,
            criticality,
            memory,
            instances,
            backup,
            reservation,
            extra_reservations,
            task,
            tasks,
            share,
            checkpoint,
            apart: Vec::new(),
        });
    }
    // Held output: a protected VM's tasks whose completions leave the VM (a consumer elsewhere)
    // or end a chain (the actuation goes out).
    for v in vms.iter_mut() {
        let Some(c) = v.checkpoint.as_mut() else { continue };
        let inside = |t: usize| v.tasks.contains(&t);
        c.held = v
            .tasks
            .iter()
            .copied()
            .filter(|&t| {
                let leaves = (0..sys.tasks.len()).any(|u| sys.tasks[u].input == Input::Task(t) && !inside(u));
                let ends = sys.chains.iter().any(|ch| ch.tasks.last() == Some(&t));
                leaves || ends
            })
            .collect();
    }
    // The voters of local-mode VMs with a `voting_delay`: each reply of each of the VM's tasks
    // passes the voter (a bounded-delay resource, FIFO, `VOTE_WORK` per reply) before it goes
    // on, so the chains through the VM count the voting delay. The VM's tasks are analysed
    // once (every instance has the same reservation); the voted reply leaves at the quorum's
    // completion, never later than the slowest instance's, so the voter adds its own delay
    // only.
    for (vi, tasks, delay, line) in voted {
        let vm = vms[vi].name.clone();
        let res = sys.resources.len();
        sys.resources.push(Resource {
            name: format!("{vm}.voter"),
            kind: ResourceKind::BoundedDelay { rate: Q::one(), latency: delay },
            policy: Policy::Fifo,
            cycle: None,
            blackout: None,
        });
        res_items.push(Item { kind: ItemKind::Vm, line });
        host_of.push(None);
        vm_of_resource.push(None);
        for t in tasks {
            let vt = sys.tasks.len();
            sys.tasks.push(Task {
                name: format!("{}.vote", sys.tasks[t].name),
                resource: res,
                input: Input::Task(t),
                wcet: vote_work(),
                bcet: Q::zero(),
                priority: None,
                deadline: None,
                slot: None,
                workload: None,
                hold: None,
            });
            task_items.push(Item { kind: ItemKind::Vm, line });
            // It runs where the VM runs (the voter is on the instances' host).
            vm_of_task.push(Some(vi));
            for (u, task) in sys.tasks.iter_mut().enumerate() {
                if u != vt && task.input == Input::Task(t) {
                    task.input = Input::Task(vt);
                }
            }
            for ch in sys.chains.iter_mut() {
                if let Some(k) = ch.tasks.iter().position(|&x| x == t) {
                    ch.tasks.insert(k + 1, vt);
                }
            }
        }
    }
    // Anti-affinity: resolve the names, make the relation symmetric, and check that the
    // placement as written keeps it.
    for (vi, v) in raw.vm.iter().enumerate() {
        let (r, s) = (v.get_ref(), Site::new(ItemKind::Vm, &v.get_ref().name, v.span()));
        for other in r.apart.iter().flatten() {
            let Some(o) = vms.iter().position(|x| &x.name == other) else {
                return Err(ctx.fail(
                    &s,
                    Some("apart"),
                    format!("unknown VM {other:?} (`apart` lists VMs this one must never share a host with)"),
                ));
            };
            if o == vi {
                return Err(ctx.fail(&s, Some("apart"), "a VM cannot be kept apart from itself"));
            }
            for (a, b) in [(vi, o), (o, vi)] {
                if !vms[a].apart.contains(&b) {
                    vms[a].apart.push(b);
                    vms[a].apart.sort_unstable();
                }
            }
            let (ha, hb) = (host_of[vms[vi].instances[0]], host_of[vms[o].instances[0]]);
            if let (Some(ha), true) = (ha, ha == hb) {
                return Err(ctx.fail(
                    &s,
                    Some("apart"),
                    format!("it must never share a host with VM {other:?} (`apart`), but both run on host {:?}", hosts[ha].name),
                ));
            }
        }
    }
    for (h, host) in hosts.iter().enumerate() {
        if used_memory[h] > host.memory {
            let s = Site::new(ItemKind::Host, &host.name, span_of(raw, h));
            return Err(ctx.fail(
                &s,
                Some("memory"),
                format!(
                    "the VMs placed on it need {} (instances and backups), more than its memory {}",
                    units::human_size(&used_memory[h]),
                    units::human_size(&host.memory)
                ),
            ));
        }
    }
    for (p, u) in proc_share.iter().enumerate() {
        if u > &Q::one() {
            let pr = &raw.processor[p];
            let s = Site::new(ItemKind::Processor, &pr.get_ref().name, pr.span());
            return Err(ctx.fail(&s, None, format!("overloaded: its VM instances take {:.1}% of it", u.to_f64() * 100.0)));
        }
    }

    // ------------------------------------------------------------- tasks and messages
    let n_tasks = vm_of_task.len();
    let mut messages = Vec::new();
    for i in 0..n_tasks {
        let r = sys.tasks[i].resource;
        if r < processors && host_of[r].is_some() && vm_of_task[i].is_none() {
            return Err(ctx.fail(
                &task_site(raw, &sys.tasks[i].name, ctx),
                Some("on"),
                format!(
                    "processor {:?} belongs to a host: only VMs run on a host's processors (put the task in a VM)",
                    sys.resources[r].name
                ),
            ));
        }
        let is_port = hosts.iter().any(|h| h.port == Some(r));
        if !is_port || vms.iter().any(|v| v.checkpoint.as_ref().is_some_and(|c| c.task == i)) {
            continue;
        }
        let site = task_site(raw, &sys.tasks[i].name, ctx);
        let Input::Task(sender) = sys.tasks[i].input else {
            return Err(ctx.fail(&site, Some("input"), "a message on a host's port must be sent by a task (its `input`) on that host"));
        };
        let from = vm_of_task[sender].map(|v| host_of[vms[v].instances[0]]).unwrap_or(host_of[sys.tasks[sender].resource]);
        if from != host_of[r] {
            let on = from.map(|h| format!("host {:?}", hosts[h].name)).unwrap_or_else(|| "no host".into());
            return Err(ctx.fail(
                &site,
                Some("on"),
                format!(
                    "it is on the port of host {:?}, but its sender {:?} runs on {on}",
                    hosts[host_of[r].unwrap_or(0)].name,
                    sys.tasks[sender].name
                ),
            ));
        }
        let receivers = (0..n_tasks).filter(|&j| sys.tasks[j].input == Input::Task(i)).collect();
        messages.push(Message { task: i, sender, receivers });
    }
    // Tasks on ports move between ports with their VMs: fixed priorities must be unique across
    // all ports, not only per port.
    let mut seen: NameMap<i64, usize> = NameMap::default();
    let port_tasks = messages.iter().map(|m| m.task).chain(vms.iter().filter_map(|v| v.checkpoint.as_ref().map(|c| c.task)));
    for t in port_tasks {
        let res = &sys.resources[sys.tasks[t].resource];
        if !matches!(res.policy, Policy::FixedPriority | Policy::FixedPriorityNonPreemptive) {
            continue;
        }
        let Some(p) = sys.tasks[t].priority else { continue };
        if let Some(&o) = seen.get(&p) {
            let (first, second) = (&sys.tasks[o].name, &sys.tasks[t].name);
            let s = match vm_of_task
                .get(t)
                .copied()
                .flatten()
                .or_else(|| vms.iter().position(|v| v.checkpoint.as_ref().is_some_and(|c| c.task == t)))
            {
                Some(v) if vms[v].checkpoint.as_ref().is_some_and(|c| c.task == t) => {
                    Site::new(ItemKind::Vm, &vms[v].name, span_of_vm(raw, &vms[v].name))
                }
                _ => task_site(raw, second, ctx),
            };
            return Err(ctx.fail(
                &s,
                Some("priority"),
                format!("priority {p} is also used by {first:?}: messages on host ports move between ports with their VMs, so their priorities must be unique across all ports"),
            ));
        }
        seen.insert(p, t);
    }
    let _ = n_tasks;
    let d = Deployment { hosts, vms, messages, host_of, vm_of_task, vm_of_resource };
    let base = sys.clone();
    d.apply(&base, &d.initial(), sys);
    Ok(Some(d))
}

/// Long-run activation rate of task `t` (events per µs of the stream at the start of its inputs).
fn source_rate(sys: &System, rates: &[Q], t: usize) -> Q {
    let mut src = sys.tasks[t].input;
    while let Input::Task(j) = src {
        src = sys.tasks[j].input;
    }
    match src {
        Input::Stream(s) => rates.get(s).cloned().unwrap_or_default(),
        Input::Task(_) => Q::zero(),
    }
}

fn span_of(raw: &RawFile, h: usize) -> std::ops::Range<usize> {
    raw.host.get(h).map(|x| x.span()).unwrap_or(0..0)
}

fn span_of_vm(raw: &RawFile, name: &str) -> std::ops::Range<usize> {
    raw.vm.iter().find(|v| v.get_ref().name == name).map(|v| v.span()).unwrap_or(0..0)
}

/// The site of a task, whether it came from a `[[task]]` or a `[[vm]]`.
fn task_site(raw: &RawFile, name: &str, _ctx: &Ctx) -> Site {
    if let Some(t) = raw.task.iter().find(|t| t.get_ref().name == name) {
        return Site::new(ItemKind::Task, name, t.span());
    }
    Site::new(ItemKind::Vm, name, span_of_vm(raw, name))
}
