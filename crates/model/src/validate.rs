//! From the file as written ([`crate::raw`]) to an [`rtc::system::System`], checking every rule
//! of the format (see `docs/model-format.md`) and blaming the item and line that breaks it.

use crate::error::ModelError;
use crate::names::{self, NameMap};
use crate::raw::*;
use crate::report::policy_name;
use crate::units;
use crate::{Item, ItemKind, Loaded};
use rtc::models::{CurveCache, EventModel, SupplyModel};
use rtc::system::{Chain, Input, Policy, Resource, ResourceKind, Stream, System, Task};
use rtc::Q;
use std::ops::Range;
use std::path::Path;

/// Most items (of all kinds together) a file may describe.
pub const MAX_ITEMS: usize = 100_000;
/// Most arrival times in one trace (trace curves cost time quadratic in this).
pub const MAX_TRACE: usize = 10_000;
/// Largest file (system description or trace) read, in bytes.
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// Largest processor speed multiplier and TDMA/bursty counts.
const MAX_FACTOR: i64 = 1_000_000;

type Result<T> = std::result::Result<T, ModelError>;

/// The text being validated, for turning byte offsets into lines.
pub(crate) struct Ctx<'a> {
    pub file: &'a str,
    pub text: &'a str,
    /// Byte offsets where lines 2, 3, … start.
    line_starts: Vec<usize>,
    /// Byte offsets where the items (`[[kind]]` tables) start, in order (see
    /// [`Ctx::set_items`]).
    item_starts: Vec<usize>,
}

/// An item of the file: what to call it in a message, and where it is.
#[derive(Clone, Debug)]
pub(crate) struct Site {
    pub kind: ItemKind,
    pub name: String,
    pub span: Range<usize>,
}

impl Site {
    pub fn new(kind: ItemKind, name: &str, span: Range<usize>) -> Site {
        Site { kind, name: name.to_string(), span }
    }
}

impl<'a> Ctx<'a> {
    pub fn new(file: &'a str, text: &'a str) -> Ctx<'a> {
        let line_starts = text.bytes().enumerate().filter(|(_, b)| *b == b'\n').map(|(i, _)| i + 1).collect();
        Ctx { file, text, line_starts, item_starts: Vec::new() }
    }

    /// Records where the items of `raw` start. An item's span covers its `[[kind]]` header
    /// only; its keys are the lines up to the next item.
    pub(crate) fn set_items(&mut self, raw: &crate::raw::RawFile) {
        let mut starts: Vec<usize> = [
            raw.host.iter().map(|x| x.span().start).collect::<Vec<_>>(),
            raw.processor.iter().map(|x| x.span().start).collect(),
            raw.link.iter().map(|x| x.span().start).collect(),
            raw.vm.iter().map(|x| x.span().start).collect(),
            raw.stream.iter().map(|x| x.span().start).collect(),
            raw.task.iter().map(|x| x.span().start).collect(),
            raw.chain.iter().map(|x| x.span().start).collect(),
            raw.run.iter().map(|x| x.span().start).collect(),
        ]
        .concat();
        starts.sort_unstable();
        self.item_starts = starts;
    }

    /// 1-based line of byte `off`.
    pub fn line_at(&self, off: usize) -> usize {
        1 + self.line_starts.partition_point(|&s| s <= off.min(self.text.len()))
    }

    /// The line of `key = ...` inside the item, or the item's first line.
    pub(crate) fn key_line(&self, span: &Range<usize>, key: Option<&str>) -> usize {
        let start = span.start.min(self.text.len());
        let next = self.item_starts.get(self.item_starts.partition_point(|&s| s <= start)).copied().unwrap_or(self.text.len());
        let end = span.end.max(next).clamp(start, self.text.len());
        if let (Some(key), Some(body)) = (key, self.text.get(start..end)) {
            let mut off = start;
            for l in body.split_inclusive('\n') {
                let t = l.trim_start();
                if let Some(rest) = t.strip_prefix(key) {
                    if rest.trim_start().starts_with('=') {
                        return self.line_at(off);
                    }
                }
                off += l.len();
            }
        }
        self.line_at(start)
    }

    pub(crate) fn fail(&self, s: &Site, key: Option<&str>, msg: impl Into<String>) -> ModelError {
        ModelError::Invalid {
            file: self.file.to_string(),
            line: self.key_line(&s.span, key),
            kind: s.kind.name(),
            name: s.name.clone(),
            msg: msg.into(),
        }
    }

    pub(crate) fn quantity(
        &self,
        s: &Site,
        key: &str,
        v: &Val,
        what: &str,
        parse: fn(&str) -> std::result::Result<Q, String>,
    ) -> Result<Q> {
        match v {
            Val::Str(t) => parse(t).map_err(|e| self.fail(s, Some(key), format!("`{key}`: {e}"))),
            Val::Int(n) => {
                Err(self.fail(s, Some(key), format!("`{key}` = {n} needs a unit: write a {what} as a string such as {}", example(what))))
            }
            Val::Float(x) => {
                Err(self.fail(s, Some(key), format!("`{key}` = {x} needs a unit: write a {what} as a string such as {}", example(what))))
            }
        }
    }

    fn time(&self, s: &Site, key: &str, v: &Val) -> Result<Q> {
        self.quantity(s, key, v, "time", units::time)
    }

    pub(crate) fn positive_time(&self, s: &Site, key: &str, v: &Val) -> Result<Q> {
        let t = self.time(s, key, v)?;
        if !t.is_positive() {
            return Err(self.fail(s, Some(key), format!("`{key}` must be positive, got {}", show(v))));
        }
        Ok(t)
    }

    pub(crate) fn nonneg_time(&self, s: &Site, key: &str, v: &Val) -> Result<Q> {
        let t = self.time(s, key, v)?;
        if t.is_negative() {
            return Err(self.fail(s, Some(key), format!("`{key}` must not be negative, got {}", show(v))));
        }
        Ok(t)
    }

    pub(crate) fn size(&self, s: &Site, key: &str, v: &Val) -> Result<Q> {
        self.quantity(s, key, v, "size", units::size)
    }

    /// A dimensionless number: integer, decimal or a string such as "3/2".
    fn factor(&self, s: &Site, key: &str, v: &Val) -> Result<Q> {
        let q = match v {
            Val::Int(n) => Some(Q::int(*n)),
            // The shortest decimal that round-trips is what the user wrote.
            Val::Float(x) if x.abs() > MAX_FACTOR as f64 => Some(Q::int(MAX_FACTOR + 1)),
            Val::Float(x) if x.is_finite() => format!("{x}").parse::<Q>().ok(),
            Val::Float(_) => None,
            Val::Str(t) => t.parse::<Q>().ok(),
        };
        let q = q.ok_or_else(|| self.fail(s, Some(key), format!("`{key}` must be a number, got {}", show(v))))?;
        if !q.is_positive() || q > Q::int(MAX_FACTOR) {
            return Err(self.fail(s, Some(key), format!("`{key}` must be in (0, {MAX_FACTOR}], got {}", show(v))));
        }
        Ok(q)
    }

    fn policy(&self, s: &Site, v: Option<&str>, default: Policy) -> Result<Policy> {
        Ok(match v {
            None => default,
            Some("fp") => Policy::FixedPriority,
            Some("fp-np") => Policy::FixedPriorityNonPreemptive,
            Some("edf") => Policy::Edf,
            Some("fifo") => Policy::Fifo,
            Some("tdma") => Policy::Tdma,
            Some(p) => return Err(self.fail(s, Some("policy"), format!("unknown policy {p:?} (use fp, fp-np, edf, fifo or tdma)"))),
        })
    }

    /// TDMA needs a cycle, other policies must not have one.
    fn cycle(&self, s: &Site, policy: Policy, v: Option<&Val>) -> Result<Option<Q>> {
        match (policy, v) {
            (Policy::Tdma, Some(v)) => Ok(Some(self.positive_time(s, "cycle", v)?)),
            (Policy::Tdma, None) => Err(self.fail(s, Some("policy"), "policy tdma needs a `cycle`")),
            (_, Some(_)) => Err(self.fail(s, Some("cycle"), "`cycle` applies only to policy tdma")),
            (_, None) => Ok(None),
        }
    }
}

fn example(what: &str) -> &'static str {
    match what {
        "time" => "\"10ms\"",
        "size" => "\"1500B\"",
        _ => "\"100Mbit/s\"",
    }
}

fn show(v: &Val) -> String {
    match v {
        Val::Int(n) => n.to_string(),
        Val::Float(x) if x.abs() >= 1e15 || (*x != 0.0 && x.abs() < 1e-6) => format!("{x:e}"),
        Val::Float(x) => x.to_string(),
        Val::Str(s) => format!("{s:?}"),
    }
}

/// Percentage for messages (display only).
fn percent(u: &Q) -> String {
    let p = u.to_f64() * 100.0;
    let s = format!("{p:.1}");
    if s == "100.0" {
        format!("{p:.4}")
    } else {
        s
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && n.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
}

/// A task before its references are resolved: from a `[[task]]` or a `[[vm]]` that is a task.
struct TaskSpec<'r> {
    site: Site,
    on: Option<&'r str>,
    /// Resource fixed by a VM (its reservation or its host).
    resource: Option<usize>,
    input: Option<&'r str>,
    wcet: Option<&'r Val>,
    bcet: Option<&'r Val>,
    size: Option<&'r Val>,
    min_size: Option<&'r Val>,
    priority: Option<i64>,
    deadline: Option<&'r Val>,
    slot: Option<&'r Val>,
    workload_upper: Option<&'r Vec<Val>>,
    workload_lower: Option<&'r Vec<Val>>,
}

pub(crate) fn build(raw: &RawFile, ctx: &Ctx, base_dir: &Path) -> Result<Loaded> {
    let total = raw.host.len() + raw.processor.len() + raw.link.len() + raw.vm.len() + raw.stream.len() + raw.task.len() + raw.chain.len();
    if total > MAX_ITEMS {
        return Err(ModelError::Syntax {
            file: ctx.file.into(),
            line: 1,
            msg: format!("{total} items; at most {MAX_ITEMS} are supported"),
        });
    }

    // ------------------------------------------------------------- names
    let mut all: Vec<Site> = Vec::with_capacity(total);
    let site = |kind, name: &str, span: Range<usize>| Site { kind, name: name.to_string(), span };
    all.extend(raw.host.iter().map(|p| site(ItemKind::Host, &p.get_ref().name, p.span())));
    all.extend(raw.processor.iter().map(|p| site(ItemKind::Processor, &p.get_ref().name, p.span())));
    all.extend(raw.link.iter().map(|p| site(ItemKind::Link, &p.get_ref().name, p.span())));
    all.extend(raw.vm.iter().map(|p| site(ItemKind::Vm, &p.get_ref().name, p.span())));
    all.extend(raw.stream.iter().map(|p| site(ItemKind::Stream, &p.get_ref().name, p.span())));
    all.extend(raw.task.iter().map(|p| site(ItemKind::Task, &p.get_ref().name, p.span())));
    all.extend(raw.chain.iter().map(|p| site(ItemKind::Chain, &p.get_ref().name, p.span())));
    all.sort_by_key(|s| s.span.start);
    let mut kind_of: NameMap<&str, (ItemKind, usize)> = names::with_capacity(total);
    for s in &all {
        if !valid_name(&s.name) {
            return Err(ctx.fail(
                s,
                Some("name"),
                "a name must be 1 to 64 ASCII letters, digits, '_', '-' or '.', starting with a letter, digit or '_'",
            ));
        }
        if let Some((k, line)) = kind_of.get(s.name.as_str()) {
            return Err(ctx.fail(s, Some("name"), format!("duplicate name: {} {:?} at line {line} has the same name", k.name(), s.name)));
        }
        kind_of.insert(&s.name, (s.kind, ctx.line_at(s.span.start)));
    }
    let what_is = |name: &str| kind_of.get(name).map(|(k, _)| k.name());

    let mut sys = System::default();
    let mut res_items: Vec<Item> = Vec::new();
    let mut res_sites: Vec<Site> = Vec::new();
    let mut res_index: NameMap<&str, usize> = names::with_capacity(raw.processor.len() + raw.link.len() + raw.vm.len());

    // ------------------------------------------------------------- processors and links
    for p in &raw.processor {
        let (r, s) = (p.get_ref(), site(ItemKind::Processor, &p.get_ref().name, p.span()));
        let policy = ctx.policy(&s, r.policy.as_deref(), Policy::FixedPriority)?;
        let cycle = ctx.cycle(&s, policy, r.cycle.as_ref())?;
        let speed = match &r.speed {
            Some(v) => ctx.factor(&s, "speed", v)?,
            None => Q::one(),
        };
        let latency = match &r.latency {
            Some(v) => ctx.nonneg_time(&s, "latency", v)?,
            None => Q::zero(),
        };
        let kind = if latency.is_positive() {
            ResourceKind::BoundedDelay { rate: speed, latency }
        } else {
            ResourceKind::Dedicated { rate: speed }
        };
        res_index.insert(&r.name, sys.resources.len());
        sys.resources.push(Resource { blackout: None, name: r.name.clone(), kind, policy, cycle });
        res_items.push(Item { kind: ItemKind::Processor, line: ctx.line_at(s.span.start) });
        res_sites.push(s);
    }
    for p in &raw.link {
        let (r, s) = (p.get_ref(), site(ItemKind::Link, &p.get_ref().name, p.span()));
        let policy = ctx.policy(&s, r.policy.as_deref(), Policy::Fifo)?;
        if policy == Policy::Edf {
            return Err(ctx.fail(&s, Some("policy"), "policy edf is not available on links (use fifo, fp, fp-np or tdma)"));
        }
        let cycle = ctx.cycle(&s, policy, r.cycle.as_ref())?;
        let rate = match &r.bandwidth {
            Some(v) => ctx.quantity(&s, "bandwidth", v, "bandwidth", units::bandwidth)?,
            None => return Err(ctx.fail(&s, None, "missing `bandwidth` (e.g. \"100Mbit/s\")")),
        };
        if !rate.is_positive() {
            return Err(ctx.fail(&s, Some("bandwidth"), "`bandwidth` must be positive"));
        }
        let latency = match &r.latency {
            Some(v) => ctx.nonneg_time(&s, "latency", v)?,
            None => Q::zero(),
        };
        let kind = if latency.is_positive() { ResourceKind::BoundedDelay { rate, latency } } else { ResourceKind::Dedicated { rate } };
        res_index.insert(&r.name, sys.resources.len());
        sys.resources.push(Resource { blackout: None, name: r.name.clone(), kind, policy, cycle });
        res_items.push(Item { kind: ItemKind::Link, line: ctx.line_at(s.span.start) });
        res_sites.push(s);
    }
    let processors = raw.processor.len();

    // ------------------------------------------------------------- VMs
    let mut specs: Vec<TaskSpec> = Vec::new();
    // VMs without a reservation (they are a task on their host, not a resource).
    let mut plain_vms: NameMap<&str, ()> = NameMap::default();
    for p in &raw.vm {
        let (r, s) = (p.get_ref(), site(ItemKind::Vm, &p.get_ref().name, p.span()));
        let first = r.instances.as_ref().and_then(|l| l.first());
        if let (Some(h), Some(f)) = (&r.host, first) {
            if h != f {
                return Err(ctx.fail(&s, Some("host"), "give `host` or `instances`, not both"));
            }
        }
        let host = match r.host.as_deref().or(first.map(String::as_str)) {
            None => return Err(ctx.fail(&s, None, "missing `host` (the processor it runs on)")),
            Some(h) => match res_index.get(h) {
                Some(&i) if i < processors => i,
                _ => {
                    let msg = match what_is(h) {
                        Some(k) => format!("host {h:?} is a {k}, not a processor"),
                        None => format!("unknown host {h:?} (no processor has that name)"),
                    };
                    return Err(ctx.fail(&s, Some("host"), msg));
                }
            },
        };
        let is_task =
            r.input.is_some() || r.wcet.is_some() || r.bcet.is_some() || r.deadline.is_some() || r.priority.is_some() || r.slot.is_some();
        let resource = match (&r.budget, &r.period) {
            (Some(b), Some(per)) => {
                let budget = ctx.positive_time(&s, "budget", b)?;
                let period = ctx.positive_time(&s, "period", per)?;
                if budget > period {
                    return Err(ctx.fail(&s, Some("budget"), format!("budget {} exceeds the period {}", show(b), show(per))));
                }
                let policy = ctx.policy(&s, r.policy.as_deref(), Policy::FixedPriority)?;
                let cycle = ctx.cycle(&s, policy, r.cycle.as_ref())?;
                let supply = match r.supply.as_deref() {
                    None | Some("worst-case") => SupplyModel::WorstCase,
                    Some("synchronous") | Some("release-synchronous") => SupplyModel::Synchronous,
                    Some(x) => {
                        return Err(ctx.fail(
                            &s,
                            Some("supply"),
                            format!("unknown supply model {x:?} (use \"worst-case\" or \"synchronous\")"),
                        ))
                    }
                };
                let i = sys.resources.len();
                res_index.insert(&r.name, i);
                sys.resources.push(Resource {
                    blackout: None,
                    name: r.name.clone(),
                    kind: ResourceKind::Reservation { host, budget, period, supply },
                    policy,
                    cycle,
                });
                res_items.push(Item { kind: ItemKind::Vm, line: ctx.line_at(s.span.start) });
                res_sites.push(s.clone());
                i
            }
            (Some(_), None) => return Err(ctx.fail(&s, Some("budget"), "`budget` needs a `period` (give both or neither)")),
            (None, Some(_)) => return Err(ctx.fail(&s, Some("period"), "`period` needs a `budget` (give both or neither)")),
            (None, None) => {
                for (key, given) in [("policy", r.policy.is_some()), ("supply", r.supply.is_some()), ("cycle", r.cycle.is_some())] {
                    if given {
                        return Err(ctx.fail(
                            &s,
                            Some(key),
                            format!("`{key}` applies only to a VM with a reservation (`budget` and `period`)"),
                        ));
                    }
                }
                if !is_task {
                    return Err(ctx.fail(
                        &s,
                        None,
                        "a VM needs a reservation (`budget` and `period`) or a workload of its own (`input` and `wcet`)",
                    ));
                }
                plain_vms.insert(&r.name, ());
                host
            }
        };
        if is_task {
            specs.push(TaskSpec {
                site: s,
                on: None,
                resource: Some(resource),
                input: r.input.as_deref(),
                wcet: r.wcet.as_ref(),
                bcet: r.bcet.as_ref(),
                size: None,
                min_size: None,
                priority: r.priority,
                deadline: r.deadline.as_ref(),
                slot: r.slot.as_ref(),
                workload_upper: None,
                workload_lower: None,
            });
        }
    }

    // ------------------------------------------------------------- streams
    let mut stream_items = Vec::new();
    let mut stream_index: NameMap<&str, usize> = names::with_capacity(raw.stream.len());
    let mut stream_rates: Vec<Q> = Vec::new();
    // Streams often share a model: each distinct model's curves are built once.
    let mut curves = CurveCache::new();
    for p in &raw.stream {
        let (r, s) = (p.get_ref(), site(ItemKind::Stream, &p.get_ref().name, p.span()));
        let model = stream_model(ctx, &s, r, base_dir)?;
        let (upper, _) = curves.curves(&model).map_err(|e| ctx.fail(&s, None, e.to_string()))?;
        stream_index.insert(&r.name, sys.streams.len());
        stream_rates.push(upper.rate());
        sys.streams.push(Stream { name: r.name.clone(), model });
        stream_items.push(Item { kind: ItemKind::Stream, line: ctx.line_at(s.span.start) });
    }

    // ------------------------------------------------------------- tasks
    for p in &raw.task {
        let r = p.get_ref();
        specs.push(TaskSpec {
            site: site(ItemKind::Task, &r.name, p.span()),
            on: Some(r.on.as_deref().unwrap_or("")),
            resource: None,
            input: r.input.as_deref(),
            wcet: r.wcet.as_ref(),
            bcet: r.bcet.as_ref(),
            size: r.size.as_ref(),
            min_size: r.min_size.as_ref(),
            priority: r.priority,
            deadline: r.deadline.as_ref(),
            slot: r.slot.as_ref(),
            workload_upper: r.workload_upper.as_ref(),
            workload_lower: r.workload_lower.as_ref(),
        });
    }
    specs.sort_by_key(|t| t.site.span.start);
    let task_index: NameMap<&str, usize> = specs.iter().enumerate().map(|(i, t)| (t.site.name.as_str(), i)).collect();
    let mut task_items = Vec::new();
    for t in &specs {
        let s = &t.site;
        let resource = match (t.resource, t.on) {
            (Some(r), _) => r,
            (None, Some("")) | (None, None) => return Err(ctx.fail(s, None, "missing `on` (the processor, link or VM it runs on)")),
            (None, Some(on)) => match res_index.get(on) {
                Some(&r) => r,
                None if plain_vms.contains_key(on) => {
                    return Err(ctx.fail(
                        s,
                        Some("on"),
                        format!("VM {on:?} has no reservation (`budget` and `period`), so no task can run inside it"),
                    ))
                }
                None => {
                    let msg = match what_is(on) {
                        Some(k) => format!("{on:?} is a {k}, not a processor, link or VM"),
                        None => format!("unknown resource {on:?}"),
                    };
                    return Err(ctx.fail(s, Some("on"), msg));
                }
            },
        };
        let input = match t.input {
            None => return Err(ctx.fail(s, None, "missing `input` (a stream, or the task whose completions activate it)")),
            Some(i) => match (stream_index.get(i), task_index.get(i)) {
                (Some(&k), _) => Input::Stream(k),
                (None, Some(&k)) => Input::Task(k),
                (None, None) => {
                    let msg = match what_is(i) {
                        Some(k) => format!("input {i:?} is a {k}, not a stream or task"),
                        None => format!("unknown input {i:?} (no stream or task has that name)"),
                    };
                    return Err(ctx.fail(s, Some("input"), msg));
                }
            },
        };
        let on_link = res_items[resource].kind == ItemKind::Link;
        let (wcet, bcet) = if on_link {
            if t.wcet.is_some() || t.bcet.is_some() {
                return Err(ctx.fail(
                    s,
                    Some(if t.wcet.is_some() { "wcet" } else { "bcet" }),
                    "a task on a link gives `size` and `min_size` (bytes), not `wcet`/`bcet`",
                ));
            }
            let size = match t.size {
                Some(v) => ctx.size(s, "size", v)?,
                None => return Err(ctx.fail(s, None, "missing `size` (bytes per message, e.g. \"1500B\")")),
            };
            if !size.is_positive() {
                return Err(ctx.fail(s, Some("size"), "`size` must be positive"));
            }
            let min = match t.min_size {
                Some(v) => ctx.size(s, "min_size", v)?,
                None => Q::zero(),
            };
            if min.is_negative() {
                return Err(ctx.fail(s, Some("min_size"), "`min_size` must not be negative"));
            }
            if min > size {
                return Err(ctx.fail(s, Some("min_size"), "`min_size` exceeds `size`"));
            }
            (size, min)
        } else {
            if t.size.is_some() || t.min_size.is_some() {
                return Err(ctx.fail(
                    s,
                    Some(if t.size.is_some() { "size" } else { "min_size" }),
                    "`size`/`min_size` apply to tasks on links; on a processor or VM give `wcet` and `bcet`",
                ));
            }
            let wcet = match t.wcet {
                Some(v) => ctx.positive_time(s, "wcet", v)?,
                None => return Err(ctx.fail(s, None, "missing `wcet` (worst-case execution time, e.g. \"1ms\")")),
            };
            let bcet = match t.bcet {
                Some(v) => ctx.nonneg_time(s, "bcet", v)?,
                None => Q::zero(),
            };
            if bcet > wcet {
                return Err(ctx.fail(
                    s,
                    Some("bcet"),
                    format!("bcet {} exceeds wcet {}", show(t.bcet.unwrap_or(&Val::Int(0))), show(t.wcet.unwrap_or(&Val::Int(0)))),
                ));
            }
            (wcet, bcet)
        };
        let workload = if t.workload_upper.is_some() || t.workload_lower.is_some() {
            if on_link {
                let key = if t.workload_upper.is_some() { "workload_upper" } else { "workload_lower" };
                return Err(ctx.fail(s, Some(key), "workload curves apply to tasks on processors or VMs"));
            }
            let curve = |key: &str, v: Option<&Vec<Val>>, first: &Q| -> Result<Vec<Q>> {
                match v {
                    Some(vs) => vs.iter().map(|x| ctx.nonneg_time(s, key, x)).collect(),
                    None => Ok(vec![first.clone()]),
                }
            };
            let w = rtc::models::WorkloadCurve {
                upper: curve("workload_upper", t.workload_upper, &wcet)?,
                lower: curve("workload_lower", t.workload_lower, &bcet)?,
            };
            let key = if t.workload_upper.is_some() { "workload_upper" } else { "workload_lower" };
            w.validate(&wcet, &bcet).map_err(|e| ctx.fail(s, Some(key), e.to_string()))?;
            Some(w)
        } else {
            None
        };
        let deadline = t.deadline.map(|v| ctx.positive_time(s, "deadline", v)).transpose()?;
        let slot = t.slot.map(|v| ctx.positive_time(s, "slot", v)).transpose()?;
        sys.tasks.push(Task {
            hold: None,
            name: s.name.clone(),
            resource,
            input,
            wcet,
            bcet,
            priority: t.priority,
            deadline,
            slot,
            workload,
        });
        task_items.push(Item { kind: s.kind, line: ctx.line_at(s.span.start) });
    }

    // ------------------------------------------------------------- per-resource rules
    let mut prio_seen: NameMap<(usize, i64), usize> = names::with_capacity(sys.tasks.len());
    let mut slots: Vec<Q> = vec![Q::zero(); sys.resources.len()];
    let mut hosts_reservations = vec![false; sys.resources.len()];
    for r in &sys.resources {
        if let ResourceKind::Reservation { host, .. } = r.kind {
            hosts_reservations[host] = true;
        }
    }
    for (i, t) in sys.tasks.iter().enumerate() {
        let s = &specs[i].site;
        let res = &sys.resources[t.resource];
        let rname = &res.name;
        let rkind = res_items[t.resource].kind.name();
        if t.resource < processors && hosts_reservations[t.resource] {
            return Err(ctx.fail(
                s,
                if s.kind == ItemKind::Vm { Some("host") } else { Some("on") },
                format!("processor {rname:?} hosts VM reservations, so no task can run on it directly (put the task in a VM)"),
            ));
        }
        match res.policy {
            Policy::FixedPriority | Policy::FixedPriorityNonPreemptive => match t.priority {
                None => {
                    return Err(ctx.fail(
                        s,
                        None,
                        format!("missing `priority` (required on {rkind} {rname:?} with policy {})", policy_name(res.policy)),
                    ))
                }
                Some(p) => {
                    if let Some(&j) = prio_seen.get(&(t.resource, p)) {
                        return Err(ctx.fail(
                            s,
                            Some("priority"),
                            format!(
                                "priority {p} is also used by {} {:?} on {rkind} {rname:?} (priorities must be unique per resource)",
                                task_items[j].kind.name(),
                                sys.tasks[j].name
                            ),
                        ));
                    }
                    prio_seen.insert((t.resource, p), i);
                }
            },
            Policy::Edf if t.deadline.is_none() => {
                return Err(ctx.fail(s, None, format!("missing `deadline` (required on {rkind} {rname:?} with policy edf)")));
            }
            _ => {}
        }
        match (res.policy, &t.slot) {
            (Policy::Tdma, None) => {
                return Err(ctx.fail(s, None, format!("missing `slot` (required on {rkind} {rname:?} with policy tdma)")))
            }
            (Policy::Tdma, Some(sl)) => slots[t.resource] = &slots[t.resource] + sl,
            (_, Some(_)) => {
                return Err(ctx.fail(
                    s,
                    Some("slot"),
                    format!("`slot` applies only to tdma, but {rkind} {rname:?} uses {}", policy_name(res.policy)),
                ))
            }
            _ => {}
        }
    }
    for (r, res) in sys.resources.iter().enumerate() {
        if let Some(c) = &res.cycle {
            if &slots[r] > c {
                return Err(ctx.fail(
                    &res_sites[r],
                    Some("cycle"),
                    format!(
                        "the slots of its tasks add up to {}, more than the cycle {}",
                        units::human_time(&slots[r]),
                        units::human_time(c)
                    ),
                ));
            }
        }
    }

    // ------------------------------------------------------------- input cycles
    let mut state = vec![0u8; sys.tasks.len()]; // 0 new, 1 on the current path, 2 done
    for start in 0..sys.tasks.len() {
        let mut path = Vec::new();
        let mut cur = start;
        loop {
            if state[cur] == 2 {
                break;
            }
            if state[cur] == 1 {
                let at = path.iter().position(|&x| x == cur).unwrap_or(0);
                let cyc = &path[at..];
                let first = cyc.iter().copied().min().unwrap_or(cur);
                let pos = cyc.iter().position(|&x| x == first).unwrap_or(0);
                // `path` follows inputs backwards; print the flow of data, starting at `first`.
                let mut names: Vec<&str> =
                    cyc[..=pos].iter().rev().chain(cyc[pos + 1..].iter().rev()).map(|&k| sys.tasks[k].name.as_str()).collect();
                names.push(names[0]);
                return Err(ctx.fail(
                    &specs[first].site,
                    Some("input"),
                    format!("input cycle: {} (the first task of every path needs a stream as input)", names.join(" → ")),
                ));
            }
            state[cur] = 1;
            path.push(cur);
            match sys.tasks[cur].input {
                Input::Task(j) => cur = j,
                Input::Stream(_) => break,
            }
        }
        for k in path {
            state[k] = 2;
        }
    }

    // ------------------------------------------------------------- chains
    let mut chain_items = Vec::new();
    for p in &raw.chain {
        let (r, s) = (p.get_ref(), site(ItemKind::Chain, &p.get_ref().name, p.span()));
        if r.tasks.is_empty() {
            return Err(ctx.fail(&s, Some("tasks"), "`tasks` is empty"));
        }
        let mut ids: Vec<usize> = Vec::with_capacity(r.tasks.len());
        for n in &r.tasks {
            let Some(&k) = task_index.get(n.as_str()) else {
                let msg = match what_is(n) {
                    Some(k) => format!("{n:?} is a {k}, not a task"),
                    None => format!("unknown task {n:?}"),
                };
                return Err(ctx.fail(&s, Some("tasks"), msg));
            };
            if ids.contains(&k) {
                return Err(ctx.fail(&s, Some("tasks"), format!("task {n:?} appears twice")));
            }
            if let Some(&prev) = ids.last() {
                if sys.tasks[k].input != Input::Task(prev) {
                    let from = match sys.tasks[k].input {
                        Input::Task(j) => sys.tasks[j].name.as_str(),
                        Input::Stream(j) => sys.streams[j].name.as_str(),
                    };
                    return Err(ctx.fail(
                        &s,
                        Some("tasks"),
                        format!("{n:?} does not follow {:?}: its input is {from:?}", sys.tasks[prev].name),
                    ));
                }
            }
            ids.push(k);
        }
        let deadline = r.deadline.as_ref().map(|v| ctx.positive_time(&s, "deadline", v)).transpose()?;
        sys.chains.push(Chain { name: r.name.clone(), tasks: ids, deadline });
        chain_items.push(Item { kind: ItemKind::Chain, line: ctx.line_at(s.span.start) });
    }

    // ------------------------------------------------------------- hosts and VM deployment
    let deployment = crate::deploy::build(crate::deploy::Parts {
        raw,
        ctx,
        sys: &mut sys,
        res_items: &mut res_items,
        task_items: &mut task_items,
        stream_items: &mut stream_items,
        stream_rates: &mut stream_rates,
        task_index: &task_index,
        res_index: &res_index,
        processors,
        links: raw.link.len(),
    })?;

    // ------------------------------------------------------------- long-run load
    let overload = |r: usize, u: &Q, detail: String| ModelError::Overload {
        file: ctx.file.into(),
        line: res_items[r].line,
        kind: res_items[r].kind.name(),
        name: sys.resources[r].name.clone(),
        percent: percent(u),
        detail,
    };
    let mut host_load: Vec<Q> = vec![Q::zero(); sys.resources.len()];
    for res in &sys.resources {
        if let ResourceKind::Reservation { host, budget, period, .. } = &res.kind {
            host_load[*host] = &host_load[*host] + &(budget / period);
        }
    }
    for (r, u) in host_load.iter().enumerate() {
        if u > &Q::one() {
            return Err(overload(r, u, " for the budget/period of the VMs it hosts".into()));
        }
        if u.is_positive() && !matches!(&sys.resources[r].kind, ResourceKind::Dedicated { rate } if rate == &Q::one()) {
            return Err(ctx.fail(
                &res_sites[r],
                None,
                "a processor hosting VM reservations must have speed 1 and no latency (budgets are in its time)",
            ));
        }
    }
    let mut demand: Vec<Q> = vec![Q::zero(); sys.resources.len()];
    for t in &sys.tasks {
        let mut src = t.input;
        while let Input::Task(j) = src {
            src = sys.tasks[j].input;
        }
        let Input::Stream(st) = src else { continue };
        demand[t.resource] = &demand[t.resource] + &(&t.wcet * &stream_rates[st]);
    }
    for (r, res) in sys.resources.iter().enumerate() {
        let capacity = match &res.kind {
            ResourceKind::Dedicated { rate } | ResourceKind::BoundedDelay { rate, .. } => rate.clone(),
            ResourceKind::Reservation { budget, period, .. } => budget / period,
        };
        let u = &demand[r] / &capacity;
        if u > Q::one() {
            let detail = match res.kind {
                ResourceKind::Reservation { .. } => " of its reservation",
                _ => "",
            };
            return Err(overload(r, &u, detail.into()));
        }
    }

    Ok(Loaded {
        system: sys,
        file: ctx.file.to_string(),
        resources: res_items,
        streams: stream_items,
        tasks: task_items,
        chains: chain_items,
        deployment,
        runs: Vec::new(),
    })
}

/// The event model of a `[[stream]]`, checking that only its model's keys are given.
fn stream_model(ctx: &Ctx, s: &Site, r: &RawStream, base_dir: &Path) -> Result<EventModel> {
    let Some(model) = r.model.as_deref() else {
        return Err(ctx.fail(s, None, "missing `model` (periodic, pjd, sporadic, bursty or trace)"));
    };
    let allowed: &[&str] = match model {
        "periodic" => &["period"],
        "pjd" => &["period", "jitter", "min_distance"],
        "sporadic" => &["min_distance"],
        "bursty" => &["period", "burst", "min_distance"],
        "trace" => &["times", "file", "window"],
        m => return Err(ctx.fail(s, Some("model"), format!("unknown model {m:?} (use periodic, pjd, sporadic, bursty or trace)"))),
    };
    let given = [
        ("period", r.period.is_some()),
        ("jitter", r.jitter.is_some()),
        ("min_distance", r.min_distance.is_some()),
        ("burst", r.burst.is_some()),
        ("times", r.times.is_some()),
        ("file", r.file.is_some()),
        ("window", r.window.is_some()),
    ];
    if let Some((k, _)) = given.iter().find(|(k, g)| *g && !allowed.contains(k)) {
        return Err(ctx.fail(s, Some(k), format!("`{k}` does not apply to a {model} stream (it takes {})", allowed.join(", "))));
    }
    let need =
        |key: &str, v: &Option<Val>| v.clone().ok_or_else(|| ctx.fail(s, None, format!("missing `{key}` (required for a {model} stream)")));
    let opt_nonneg = |key: &str, v: &Option<Val>| -> Result<Q> {
        v.as_ref().map(|v| ctx.nonneg_time(s, key, v)).transpose().map(|x| x.unwrap_or_default())
    };
    Ok(match model {
        "periodic" => EventModel::Periodic { period: ctx.positive_time(s, "period", &need("period", &r.period)?)? },
        "pjd" => EventModel::Pjd {
            period: ctx.positive_time(s, "period", &need("period", &r.period)?)?,
            jitter: opt_nonneg("jitter", &r.jitter)?,
            min_distance: opt_nonneg("min_distance", &r.min_distance)?,
        },
        "sporadic" => EventModel::Sporadic { min_distance: ctx.positive_time(s, "min_distance", &need("min_distance", &r.min_distance)?)? },
        "bursty" => {
            let burst = r.burst.ok_or_else(|| ctx.fail(s, None, "missing `burst` (required for a bursty stream)"))?;
            if !(1..=MAX_FACTOR).contains(&burst) {
                return Err(ctx.fail(s, Some("burst"), format!("`burst` must be in [1, {MAX_FACTOR}], got {burst}")));
            }
            EventModel::Bursty {
                period: ctx.positive_time(s, "period", &need("period", &r.period)?)?,
                burst,
                min_distance: opt_nonneg("min_distance", &r.min_distance)?,
            }
        }
        _ => {
            let times = match (&r.times, &r.file) {
                (Some(_), Some(_)) => return Err(ctx.fail(s, Some("file"), "give `times` or `file`, not both")),
                (None, None) => return Err(ctx.fail(s, None, "missing `times` or `file` (required for a trace stream)")),
                (Some(ts), None) => {
                    if ts.len() > MAX_TRACE {
                        return Err(ctx.fail(s, Some("times"), format!("{} times; at most {MAX_TRACE} are supported", ts.len())));
                    }
                    ts.iter().map(|v| ctx.time(s, "times", v)).collect::<Result<Vec<Q>>>()?
                }
                (None, Some(f)) => read_trace(ctx, s, &base_dir.join(f), f)?,
            };
            let window = r.window.as_ref().map(|v| ctx.positive_time(s, "window", v)).transpose()?;
            EventModel::Trace { times, window }
        }
    })
}

/// A trace file: one time (with unit) per line; blank lines and `#` comments are skipped.
fn read_trace(ctx: &Ctx, s: &Site, path: &Path, shown: &str) -> Result<Vec<Q>> {
    let bad = |msg: String| ctx.fail(s, Some("file"), format!("trace file {shown:?}: {msg}"));
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(bad(format!("larger than {MAX_FILE_BYTES} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for (n, l) in text.lines().enumerate() {
        let l = l.split('#').next().unwrap_or("").trim();
        if l.is_empty() {
            continue;
        }
        if out.len() >= MAX_TRACE {
            return Err(bad(format!("more than {MAX_TRACE} times")));
        }
        out.push(units::time(l).map_err(|e| bad(format!("line {}: {e}", n + 1)))?);
    }
    Ok(out)
}
