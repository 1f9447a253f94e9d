//! Analysis of a network of components (the implementation of [`crate::system::analyze`]).
//!
//! Resources are analysed in dependency order (a resource after every resource that feeds its
//! tasks). When dependencies are cyclic, all resources are re-analysed until no completion curve
//! changes (a fixed point), starting from the source streams' curves propagated without jitter.

use crate::busy_window::{BusyWindow, Staircase};
use crate::component::{self, Pair, TaskBounds, Workload};
use crate::curve::{Curve, CurveError};
use crate::models;
use crate::q::Q;
use crate::system::*;
use std::cell::OnceCell;

pub(crate) struct Ctx<'a> {
    pub sys: &'a System,
    pub opts: &'a Options,
    pub streams: Vec<Pair>,
    pub tasks_on: Vec<Vec<usize>>,
    /// Whether fixed-priority service chains may be truncated at a horizon (see [`FpState`]).
    pub truncate: bool,
    /// Per task: whether it belongs to a chain of two or more tasks (whose pay-bursts-only-once
    /// bound reads the services reported for it; see [`FpState`]).
    pub chained: Vec<bool>,
}

/// [`Ctx::chained`] for `sys`.
pub(crate) fn chained_tasks(sys: &System) -> Vec<bool> {
    let mut chained = vec![false; sys.tasks.len()];
    for c in sys.chains.iter().filter(|c| c.tasks.len() > 1) {
        for &i in &c.tasks {
            if let Some(x) = chained.get_mut(i) {
                *x = true;
            }
        }
    }
    chained
}

fn task_err(sys: &System, i: usize, msg: impl Into<String>) -> AnalysisError {
    AnalysisError::Task { task: sys.tasks[i].name.clone(), msg: msg.into() }
}

fn res_err(sys: &System, r: usize, msg: impl Into<String>) -> AnalysisError {
    AnalysisError::Resource { resource: sys.resources[r].name.clone(), msg: msg.into() }
}

/// Checks that every index is in range and the task inputs form no cycle.
pub(crate) fn check_structure(sys: &System) -> Result<(), AnalysisError> {
    for (i, t) in sys.tasks.iter().enumerate() {
        if t.resource >= sys.resources.len() {
            return Err(task_err(sys, i, "unknown resource"));
        }
        match t.input {
            Input::Stream(s) if s >= sys.streams.len() => return Err(task_err(sys, i, "unknown input stream")),
            Input::Task(j) if j >= sys.tasks.len() => return Err(task_err(sys, i, "unknown input task")),
            _ => {}
        }
        // Zero work is allowed: the planner zeroes the work of the tasks of a VM it sheds.
        if t.wcet.is_negative() {
            return Err(task_err(sys, i, format!("WCET must not be negative, got {}", t.wcet)));
        }
        if t.bcet.is_negative() || t.bcet > t.wcet {
            return Err(task_err(sys, i, format!("BCET {} must be in [0, WCET {}]", t.bcet, t.wcet)));
        }
        if let Some(g) = &t.workload {
            g.validate(&t.wcet, &t.bcet).map_err(|e| task_err(sys, i, e.to_string()))?;
        }
        // Follow the inputs: they must end at a stream.
        let mut cur = i;
        for _ in 0..=sys.tasks.len() {
            match sys.tasks[cur].input {
                Input::Stream(_) => break,
                Input::Task(j) => cur = j,
            }
        }
        if let Input::Task(_) = sys.tasks[cur].input {
            return Err(task_err(sys, i, "its inputs form a cycle"));
        }
    }
    for (r, res) in sys.resources.iter().enumerate() {
        if let ResourceKind::Reservation { host, .. } = &res.kind {
            if *host >= sys.resources.len() || matches!(sys.resources[*host].kind, ResourceKind::Reservation { .. }) {
                return Err(res_err(sys, r, "a reservation's host must be a processor"));
            }
        }
        if res.policy == Policy::Tdma && res.cycle.as_ref().is_none_or(|c| !c.is_positive()) {
            return Err(res_err(sys, r, "TDMA needs a positive cycle"));
        }
        if res.policy == Policy::Tdma && !matches!(res.kind, ResourceKind::Dedicated { .. }) {
            // Slots are cut from a dedicated resource's full rate; under a reservation or a
            // latency the slot supply would be overstated.
            return Err(res_err(sys, r, "TDMA is only supported on a dedicated processor or link"));
        }
    }
    for (c, ch) in sys.chains.iter().enumerate() {
        let err = |msg: String| AnalysisError::Chain { chain: sys.chains[c].name.clone(), msg };
        if ch.tasks.is_empty() {
            return Err(err("has no tasks".into()));
        }
        for w in ch.tasks.windows(2) {
            if w[1] >= sys.tasks.len() || sys.tasks[w[1]].input != Input::Task(w[0]) {
                return Err(err("consecutive tasks are not connected".into()));
            }
        }
        if ch.tasks.iter().any(|&t| t >= sys.tasks.len()) {
            return Err(err("unknown task".into()));
        }
    }
    Ok(())
}

/// Base service curves of a resource, its blackout taken out of the lower curve.
pub(crate) fn base_service(sys: &System, r: usize) -> Result<Pair, AnalysisError> {
    let (upper, lower) = undisturbed_service(sys, r)?;
    let Some(b) = &sys.resources[r].blackout else { return Ok((upper, lower)) };
    let e = |m: String| res_err(sys, r, m);
    if !b.pause.is_positive() || b.pause >= b.every {
        return Err(e(format!("a pause of {} every {} (it must be positive and shorter than the period)", b.pause, b.every)));
    }
    let speed = match &sys.resources[r].kind {
        ResourceKind::Dedicated { rate } | ResourceKind::BoundedDelay { rate, .. } => rate.clone(),
        ResourceKind::Reservation { host, .. } => host_speed(sys, *host),
    };
    let lower = blackout_lower(&lower, &b.pause, &b.every, &speed).map_err(e)?;
    Ok((upper, lower))
}

/// A lower service curve with pauses of up to `pause` every `every` taken out: in any window
/// of length Δ the pauses cover at most B(Δ) = ⌊Δ/T⌋·d + min(d, Δ mod T) (T = every, d =
/// pause) — the time a TDMA slot of T − d per cycle T leaves out — and each paused time unit
/// takes at most `speed` work units of service, so the service is at least
/// sup_{s ≤ Δ} max(0, β(s) − speed·B(s)) (service only accumulates).
pub fn blackout_lower(lower: &Curve, pause: &Q, every: &Q, speed: &Q) -> Result<Curve, String> {
    let (_, available) = models::tdma(&(every - pause), every, &Q::one()).map_err(|e| e.to_string())?;
    let e = |c: CurveError| c.to_string();
    let paused = Curve::affine(Q::zero(), Q::zero(), Q::one()).sub(&available).map_err(e)?.scale(speed);
    lower.sub(&paused).map_err(e)?.clamp_nonnegative().map_err(e)?.running_max().map_err(e)
}

/// A task's completions as its consumers see them: held up to [`Task::hold`] longer.
pub(crate) fn released(sys: &System, j: usize, out: Pair) -> Pair {
    match &sys.tasks[j].hold {
        Some(h) if h.is_positive() => component::propagate_jitter(&out, h, &Q::zero()),
        _ => out,
    }
}

/// Base service curves of a resource without its blackout.
fn undisturbed_service(sys: &System, r: usize) -> Result<Pair, AnalysisError> {
    let res = &sys.resources[r];
    let e = |m: models::ModelError| res_err(sys, r, m.to_string());
    match &res.kind {
        ResourceKind::Dedicated { rate } => {
            if !rate.is_positive() {
                return Err(res_err(sys, r, format!("rate must be positive, got {rate}")));
            }
            Ok(models::dedicated(rate))
        }
        ResourceKind::BoundedDelay { rate, latency } => {
            if !rate.is_positive() || latency.is_negative() {
                return Err(res_err(sys, r, "rate must be positive and latency not negative"));
            }
            Ok(models::bounded_delay(rate, latency))
        }
        ResourceKind::Reservation { host, budget, period, supply } => {
            let (u, l) = models::periodic_resource(budget, period, *supply).map_err(e)?;
            let speed = host_speed(sys, *host);
            Ok((u.scale(&speed), l.scale(&speed)))
        }
    }
}

pub(crate) fn host_speed(sys: &System, host: usize) -> Q {
    match &sys.resources[host].kind {
        ResourceKind::Dedicated { rate } | ResourceKind::BoundedDelay { rate, .. } => rate.clone(),
        ResourceKind::Reservation { .. } => Q::one(),
    }
}

/// Per-task outcome of one resource analysis.
pub(crate) struct Outcome {
    pub(crate) bounds: Option<TaskBounds>,
    pub(crate) service: Pair,
    /// The service is exact before this time and a lower bound after it (`None`: exact).
    pub(crate) exact_until: Option<Q>,
    pub(crate) method: &'static str,
    pub(crate) problem: Option<String>,
}

fn unbounded(service: &Pair, method: &'static str, why: String) -> Outcome {
    Outcome { bounds: None, service: service.clone(), exact_until: None, method, problem: Some(why) }
}

fn curve_problem(e: &CurveError) -> String {
    match e {
        CurveError::Unbounded(_) => "overload: demand exceeds the service available to this task".into(),
        other => other.to_string(),
    }
}

/// Progress through one fixed-priority resource, highest priority first: each step analyses
/// one task on the service left by the ones before it.
///
/// Without GPC completion curves only the lower remaining service is chained, and it is kept
/// *truncated at a horizon* H (`docs/analysis.md` §9): exact on [0, H), a safe lower line
/// beyond, computed from demands that are exact on [0, H) and a safe upper line beyond. Each
/// task's delay is accepted only when a check proves it equal to the delay on the exact curves;
/// otherwise H grows (at least doubles, see [`FpState::grow`]) and the service is rebuilt, and
/// when H would exceed twice the window the exact curves need, the state falls back to
/// exact curves (the analysis as without truncation). Delays, backlogs and completion curves are therefore exactly those of the
/// untruncated analysis; the service curves reported for the tasks are lower bounds that are
/// exact on [0, H).
pub(crate) struct FpState {
    np: bool,
    pub(crate) order: Vec<usize>,
    pub(crate) next: usize,
    base: Pair,
    cur: Option<Pair>,
    why_lost: String,
    /// Horizon of the truncated service in `cur`; `None`: exact curves.
    horizon: Option<Q>,
    /// Whether the horizon has been chosen (at the first task analysed).
    started: bool,
    /// Tasks whose upper demand has been taken out of `cur`, to rebuild it with another horizon.
    served: Vec<(usize, Curve)>,
    /// Whether backlogs may also be proven exact from the deviation before the horizon (see
    /// [`backlog_is_exact`]): only where no task belongs to a chain of several tasks. That test
    /// lets a horizon stop growing earlier, which changes the reported services after it, and
    /// a chain's pboo (when it does not decide the worst case) is computed from them; elsewhere
    /// nothing reported depends on the horizon.
    backlog_below_h: bool,
    /// The busy-window recurrences instead of curves ([`crate::busy_window`]), when the
    /// resource and its tasks allow them: the processor so far and each task's activations
    /// (in `order`).
    classical: Option<(BusyWindow, Vec<Staircase>)>,
}

impl FpState {
    pub(crate) fn new(ctx: &Ctx, r: usize, tasks: &[usize], beta: &Pair) -> FpState {
        let sys = ctx.sys;
        let mut order = tasks.to_vec();
        order.sort_by_key(|&i| (sys.tasks[i].priority.unwrap_or(i64::MAX), i));
        let np = sys.resources[r].policy == Policy::FixedPriorityNonPreemptive;
        let classical = classical(ctx, r, &order);
        FpState {
            np,
            order,
            next: 0,
            base: beta.clone(),
            cur: Some(beta.clone()),
            why_lost: String::new(),
            horizon: None,
            started: false,
            served: Vec::new(),
            backlog_below_h: !tasks.iter().any(|&i| ctx.chained.get(i).copied().unwrap_or(true)),
            classical,
        }
    }

    /// The next task by the busy-window recurrences, if this resource uses them (`None`: by
    /// curves; after a task the recurrences could not bound, every later task is by curves).
    fn classical_step(&mut self, ctx: &Ctx, k: usize, ev: &Pair, w: &Workload) -> Option<Outcome> {
        let (bw, acts) = self.classical.as_mut()?;
        let i = self.order[k];
        let s = acts.get(k)?.clone();
        let Some(dev) = bw.task(&s, &w.wcet) else {
            // Continue on exact curves, rebuilt from every demand served so far.
            self.classical = None;
            self.started = true;
            self.exact(ctx.sys);
            return None;
        };
        let demand = w.demand(ev);
        let (backlog, backlog_work) = component::backlog_of_deviations(ev, w, &demand.0, &dev.delay, |_| Ok(dev.vertical.clone()));
        let bcrt = component::best_case(&w.bcet, &self.base.0);
        let output = component::propagate_jitter(ev, &dev.delay, &bcrt);
        let (rate, burst) = bw.lower_line();
        let lower = Curve::rate_latency(rate.clone(), burst / rate);
        bw.push(s, w.wcet.clone());
        self.served.push((i, demand.0));
        let bounds = TaskBounds { wcrt: dev.delay, bcrt, backlog, backlog_work, output };
        let service = (self.base.0.clone(), lower);
        Some(Outcome { bounds: Some(bounds), service, exact_until: Some(Q::zero()), method: "fp: busy-window recurrences", problem: None })
    }

    pub(crate) fn done(&self) -> bool {
        self.next >= self.order.len()
    }

    /// Recomputes `cur` from the base service and the demands served so far, truncated at `h`
    /// (`None`: exactly, with the same errors the untruncated chain would have met). An error
    /// with a horizon is returned (the caller falls back to exact curves).
    ///
    /// With a horizon, the served demands are taken out all at once (one difference, one
    /// running maximum): every demand is non-decreasing and at least 0, so
    /// max(sup_{s<=t}(max(sup_{u<=s}(β − a)(u), 0) − b(s)), 0) = max(sup_{s<=t}(β − a − b)(s), 0),
    /// the function the step-by-step chain gives. Exact curves are rebuilt step by step, as the
    /// untruncated analysis computes them (the same function may come out with another periodic
    /// start at once, and exact services are compared curve for curve).
    fn rebuild(&mut self, sys: &System, h: Option<Q>) -> Result<(), CurveError> {
        self.horizon = h.clone();
        if let (Some(h), false) = (&h, self.served.is_empty()) {
            let left = self.base.1.left_after_truncated(self.served.iter().map(|(_, d)| d), h)?;
            self.cur = Some((self.base.0.clone(), left));
            return Ok(());
        }
        let mut cur = match &h {
            Some(h) => (self.base.0.clone(), self.base.1.truncate_below(h)?),
            None => self.base.clone(),
        };
        for (i, d) in &self.served {
            let alpha = match &h {
                Some(h) => (d.truncate_above(h)?, Curve::zero()),
                None => (d.clone(), Curve::zero()),
            };
            match component::remaining_lower(&alpha, &cur) {
                Ok(rem) => cur = rem,
                Err(e) if h.is_some() => return Err(e),
                Err(e) => {
                    self.cur = None;
                    self.why_lost =
                        format!("higher-priority task {:?} leaves no bounded service: {}", sys.tasks[*i].name, curve_problem(&e));
                    return Ok(());
                }
            }
        }
        self.cur = Some(cur);
        Ok(())
    }

    /// Switches to exact curves.
    fn exact(&mut self, sys: &System) {
        let _ = self.rebuild(sys, None);
    }

    /// The next horizon after `h` failed for a task whose delay on the truncated service was
    /// `delay` (if any): at least twice `h` and three times that delay (the exact delay is no
    /// larger, and a horizon a few times the delay usually passes the check). `None` (exact
    /// curves) once it would exceed twice one common period past the periodic starts of the
    /// curves involved (twice the window the exact curves are computed on). Even that far a
    /// truncated service, rebuilt at once, costs less than exact curves replayed step by step:
    /// with half the window as the limit, 75 of the 100 processors of the pyCPA comparison's
    /// workload fell back to exact curves, with the window 22 (−5 % instructions), with twice
    /// it none (−3 % more).
    fn grow(&self, h: &Q, demand: &Curve, delay: Option<&Q>) -> Option<Q> {
        let curves = std::iter::once(&self.base.1).chain(self.served.iter().map(|(_, d)| d)).chain(std::iter::once(demand));
        let mut period = Q::one();
        let mut start = Q::zero();
        for c in curves {
            period = Q::lcm(&period, c.period())?;
            start = Q::max(&start, c.periodic_start());
        }
        let mut next = h * Q::int(2);
        if let Some(d) = delay {
            next = Q::max(&next, &(d * Q::int(3)).ceil());
        }
        (next <= (start + period) * Q::int(2)).then_some(next)
    }

    /// Analyses the next task (`input`: its activation curves, `None` if unbounded).
    pub(crate) fn step(&mut self, ctx: &Ctx, input: Option<&Pair>) -> Outcome {
        let sys = ctx.sys;
        let k = self.next;
        let i = self.order[k];
        self.next += 1;
        let method = if self.np { "fp-np: GPC on remaining service minus blocking" } else { "fp: GPC on remaining service" };
        if self.cur.is_none() {
            return unbounded(&self.base, method, self.why_lost.clone());
        }
        let Some(ev) = input else {
            let svc = self.cur.take().unwrap_or_else(|| self.base.clone());
            self.why_lost = format!("higher-priority task {:?} has an unbounded input", sys.tasks[i].name);
            let o = unbounded(&svc, method, "its input is unbounded (an upstream task has no bound)".into());
            return Outcome { exact_until: self.horizon.clone(), ..o };
        };
        let w = Workload { wcet: sys.tasks[i].wcet.clone(), bcet: sys.tasks[i].bcet.clone(), curves: sys.tasks[i].workload.clone() };
        if let Some(o) = self.classical_step(ctx, k, ev, &w) {
            return o;
        }
        let demand = w.demand(ev);
        if !self.started {
            self.started = true;
            // The GPC completion curves need the exact upper service (and `running_min_ahead`
            // looks ahead in time): truncate only without them.
            if !ctx.opts.gpc_outputs && ctx.truncate {
                let h = first_horizon(&demand.0, &self.base.1);
                if self.rebuild(sys, Some(h)).is_err() {
                    self.exact(sys);
                }
            }
        }
        let blocking = if self.np { self.order[k + 1..].iter().map(|&j| sys.tasks[j].wcet.clone()).max() } else { None };
        // Analyse on the current service; with a horizon, accept only a provably exact delay.
        let (svc, outcome) = loop {
            let Some(svc) = self.cur.clone() else {
                return unbounded(&self.base, method, self.why_lost.clone());
            };
            let svc_i = match &blocking {
                Some(b) => match svc.1.offset(&-b).clamp_nonnegative() {
                    Ok(l) => (svc.0.clone(), l),
                    Err(_) if self.horizon.is_some() => {
                        self.exact(sys);
                        continue;
                    }
                    // As without truncation, the task's demand is then not taken out.
                    Err(e) => return unbounded(&svc, method, curve_problem(&e)),
                },
                None => svc.clone(),
            };
            let Some(h) = self.horizon.clone() else {
                let outcome = match component::task_on_service(ev, &w, &svc_i, ctx.opts.gpc_outputs) {
                    Ok(b) => Outcome { bounds: Some(b), service: svc_i, exact_until: None, method, problem: None },
                    Err(e) => unbounded(&svc_i, method, curve_problem(&e)),
                };
                break (svc, outcome);
            };
            // The delay first; backlogs and completion curves only once it is proven exact.
            // Where nothing reported depends on the horizon (`backlog_below_h`), also when the
            // truncated delay is attained at a level below Y0: the deviation at those levels is
            // exact and the exact delay is never above the truncated one (`docs/analysis.md` §9).
            let truncated = TruncatedService::new(&svc_i.1, &h);
            let delay = demand.0.hdev_and_below(&svc_i.1, self.backlog_below_h.then(|| truncated.y0()));
            let res = match &delay {
                Ok((d, below)) if below.as_ref() == Some(d) || delay_is_exact(&truncated, &demand.0, d) => {
                    component::task_bounds(ev, &w, &demand, &svc_i, d.clone(), ctx.opts.gpc_outputs).ok()
                }
                _ => None,
            };
            let delay = delay.map(|(d, _)| d);
            match res {
                Some(b) if backlog_is_exact(&truncated, ev, &w, &demand.0, &b, self.backlog_below_h) => {
                    break (svc, Outcome { bounds: Some(b), service: svc_i, exact_until: Some(h), method, problem: None });
                }
                _ => match self.grow(&h, &demand.0, delay.as_ref().ok()) {
                    Some(h2) => {
                        if self.rebuild(sys, Some(h2)).is_err() {
                            self.exact(sys);
                        }
                    }
                    None => self.exact(sys),
                },
            }
        };
        if self.next < self.order.len() {
            self.served.push((i, demand.0.clone()));
            // The upper remaining service only matters for the GPC completion curves; without
            // them the resource's own upper service is kept (a valid, looser upper bound).
            let rem = if ctx.opts.gpc_outputs {
                component::remaining_service(&demand, &svc)
            } else {
                match &self.horizon {
                    Some(h) => demand.0.truncate_above(h).and_then(|d| component::remaining_lower(&(d, Curve::zero()), &svc)),
                    None => component::remaining_lower(&demand, &svc),
                }
            };
            match rem {
                Ok(rem) => self.cur = Some(rem),
                Err(_) if self.horizon.is_some() => self.exact(sys),
                Err(e) => {
                    self.cur = None;
                    self.why_lost =
                        format!("higher-priority task {:?} leaves no bounded service: {}", sys.tasks[i].name, curve_problem(&e));
                }
            }
        }
        outcome
    }
}

/// What [`FpState`] needs to analyse resource `r` by the busy-window recurrences, if it may
/// (see [`Options::service_curves`]): a preemptive fixed-priority processor of its own rate,
/// no blackout, every task activated by a stream of a standard event model, with a constant
/// WCET and in no chain of several tasks, and a long-run demand below the rate.
fn classical(ctx: &Ctx, r: usize, order: &[usize]) -> Option<(BusyWindow, Vec<Staircase>)> {
    let (sys, opts) = (ctx.sys, ctx.opts);
    let res = &sys.resources[r];
    if opts.service_curves || opts.gpc_outputs || res.policy != Policy::FixedPriority || res.blackout.is_some() {
        return None;
    }
    let ResourceKind::Dedicated { rate } = &res.kind else { return None };
    if !rate.is_positive() {
        return None;
    }
    let mut acts = Vec::with_capacity(order.len());
    let mut demand = Q::zero();
    for &i in order {
        let t = &sys.tasks[i];
        let Input::Stream(st) = t.input else { return None };
        if t.workload.is_some() || ctx.chained.get(i).copied().unwrap_or(true) {
            return None;
        }
        let s = Staircase::of(&sys.streams.get(st)?.model)?;
        demand = demand + s.long_run() * &t.wcet;
        acts.push(s);
    }
    (&demand < rate).then(|| (BusyWindow::new(rate.clone()), acts))
}

/// A first horizon for a fixed-priority resource: twice the point where the linear upper bound
/// of the first task's demand meets the linear lower bound of the service (at least 1).
fn first_horizon(demand: &Curve, service: &Curve) -> Q {
    let (r, rho) = (demand.rate(), service.rate());
    let (_, b) = demand.affine_bounds();
    let (m, _) = service.affine_bounds();
    let t = if rho > r { (b - m) / (rho - r) } else { Q::one() };
    Q::max(&(t * Q::int(2)).ceil(), &Q::one())
}

/// Whether `delay` = hdev(`demand`, `service`), computed on a lower service curve that is exact
/// on [0, h) (and lower beyond), equals the delay on the exact service. Levels below the left
/// limit Y0 of the service at h are first reached before h on both curves, so they give the
/// same deviation; for a level y >= Y0 reached by the demand at t, t >= (y − b)/r (demand
/// <= r·t + b) and the truncated service reaches y by max(h, (y − m)/ρ) (service >= ρ·t + m
/// for t >= h), so the deviation there is at most TB = max(h − (Y0 − b)/r,
/// (Y0 − m)/ρ − (Y0 − b)/r) (both terms decrease with y when ρ > r). If TB < delay, the delay is attained below Y0 and is exact
/// (`docs/analysis.md` §9).
fn delay_is_exact(service: &TruncatedService, demand: &Curve, delay: &Q) -> bool {
    if delay.is_zero() {
        return true; // the exact delay is never below the truncated one, and never negative
    }
    let (r, rho) = (demand.rate(), service.curve.rate());
    let (_, b) = demand.affine_bounds();
    let y0 = service.y0();
    if r.is_zero() {
        // The demand never exceeds b: no level at or above Y0 > b is ever reached.
        return y0 > &b;
    }
    if !r.is_positive() || rho <= r {
        return false;
    }
    let reach_demand = (y0 - &b) / &r;
    let tb = Q::max(&(service.h - &reach_demand), &((y0 - service.m()) / &rho - &reach_demand));
    &tb < delay
}

/// A lower service curve exact on [0, h) and lower beyond, with what the exactness tests read
/// of it, each computed once: its left limit Y0 at h, and m = inf over t >= h of (service − ρ·t)
/// (the offset of its best lower line of slope ρ after h).
struct TruncatedService<'a> {
    curve: &'a Curve,
    h: &'a Q,
    y0: OnceCell<Q>,
    m: OnceCell<Q>,
}

impl<'a> TruncatedService<'a> {
    fn new(curve: &'a Curve, h: &'a Q) -> TruncatedService<'a> {
        TruncatedService { curve, h, y0: OnceCell::new(), m: OnceCell::new() }
    }

    fn y0(&self) -> &Q {
        self.y0.get_or_init(|| self.curve.eval_left(self.h))
    }

    fn m(&self) -> &Q {
        self.m.get_or_init(|| self.curve.affine_lower_from(self.h))
    }
}

/// Whether the backlogs of `b` (computed by [`component::backlog_on_service`] on a lower
/// service curve exact on [0, h) and lower beyond) equal those on the exact service
/// (`docs/analysis.md` §4 and §9). The deviation V_t = sup (D − βl) on the truncated curve is
/// never below the exact V, and both agree on [0, h), so V_lo = sup over [0, h) of D − βl
/// (`Curve::vdev_before`) is never above V. Both backlogs are non-decreasing functions of the
/// deviations (capped by the WCRT window, which is exact since the WCRT is): when the values
/// from V_lo equal those from V_t, they are the exact ones. A cheaper sufficient test first:
/// for t >= h the truncated service is at least Y0 = βl(h⁻) and at least ρ·t + m, and
/// D(t) <= r·t + b, so D − βl there is at most TB = b − Y0 (r = 0) or (r − ρ)·h + b − m
/// (ρ > r; the bound decreases with t). A deviation V > TB is therefore attained before h, where
/// it is also the exact one. Work: V = the reported work backlog (unless 0, which is exact as
/// the deviation is never negative); events: E = ⌈V/wcet⌉ with V > wcet·(E − 1).
fn backlog_is_exact(service: &TruncatedService, ev: &Pair, w: &Workload, demand: &Curve, b: &TaskBounds, below_h: bool) -> bool {
    backlog_tail_is_below(service, ev, w, demand, b)
        || below_h && {
            let mut failed = false;
            let lo = component::backlog_of_deviations(ev, w, demand, &b.wcrt, |d| {
                d.vdev_before(service.curve, service.h).inspect_err(|_| failed = true)
            });
            !failed && lo.0 == b.backlog && lo.1 == b.backlog_work
        }
}

/// The tail-bound test of [`backlog_is_exact`].
fn backlog_tail_is_below(service: &TruncatedService, ev: &Pair, w: &Workload, demand: &Curve, b: &TaskBounds) -> bool {
    let tail_bound = |d: &Curve| -> Option<Q> {
        let (r, rho) = (d.rate(), service.curve.rate());
        let (_, top) = d.affine_bounds();
        if r.is_zero() {
            Some(top - service.y0())
        } else if rho > r {
            Some((&r - &rho) * service.h + top - service.m())
        } else {
            None
        }
    };
    // The demand's bound serves both tests when the task has no workload curves.
    let demand_bound = OnceCell::new();
    let demand_bound = || demand_bound.get_or_init(|| tail_bound(demand)).clone();
    let work_ok = b.backlog_work.is_zero() || demand_bound().is_some_and(|tb| tb < b.backlog_work);
    if !work_ok {
        return false;
    }
    if !w.wcet.is_positive() || b.backlog.is_zero() {
        return true;
    }
    let bound = if w.curves.is_none() { demand_bound() } else { tail_bound(&ev.0.scale(&w.wcet)) };
    bound.is_some_and(|tb| tb <= &w.wcet * (&b.backlog - Q::one()))
}

/// Analyses the tasks of resource `r` given their activation curves and the base service.
pub(crate) fn analyze_resource(ctx: &Ctx, r: usize, inputs: &[Option<Pair>], beta: &Pair) -> Vec<(usize, Outcome)> {
    let sys = ctx.sys;
    let res = &sys.resources[r];
    let tasks = &ctx.tasks_on[r];
    let wl =
        |i: usize| Workload { wcet: sys.tasks[i].wcet.clone(), bcet: sys.tasks[i].bcet.clone(), curves: sys.tasks[i].workload.clone() };
    let gpc_out = ctx.opts.gpc_outputs;
    let mut out = Vec::new();
    match res.policy {
        Policy::FixedPriority | Policy::FixedPriorityNonPreemptive => {
            let mut st = FpState::new(ctx, r, tasks, beta);
            for _ in 0..st.order.len() {
                let i = st.order[st.next];
                out.push((i, st.step(ctx, inputs[i].as_ref())));
            }
        }
        Policy::Tdma => {
            let method = "tdma: GPC on the task's slot";
            let rate = match &res.kind {
                ResourceKind::Dedicated { rate } | ResourceKind::BoundedDelay { rate, .. } => rate.clone(),
                ResourceKind::Reservation { .. } => Q::one(),
            };
            let cycle = res.cycle.clone().unwrap_or_else(Q::one);
            for &i in tasks {
                let slot = sys.tasks[i].slot.clone().unwrap_or_default();
                let svc = match models::tdma(&slot, &cycle, &rate) {
                    Ok(s) => s,
                    Err(e) => {
                        out.push((i, unbounded(beta, method, e.to_string())));
                        continue;
                    }
                };
                let Some(ev) = &inputs[i] else {
                    out.push((i, unbounded(&svc, method, "its input is unbounded".into())));
                    continue;
                };
                match component::task_on_service(ev, &wl(i), &svc, gpc_out) {
                    Ok(b) => out.push((i, Outcome { bounds: Some(b), service: svc, exact_until: None, method, problem: None })),
                    Err(e) => out.push((i, unbounded(&svc, method, curve_problem(&e)))),
                }
            }
        }
        Policy::Edf | Policy::Fifo => {
            let edf = res.policy == Policy::Edf;
            let method = if edf { "edf: demand-bound test, busy window" } else { "fifo: aggregate horizontal deviation" };
            if let Some(&i) = tasks.iter().find(|&&i| inputs[i].is_none()) {
                let why = format!("task {:?} on this resource has an unbounded input", sys.tasks[i].name);
                for &j in tasks {
                    out.push((j, unbounded(beta, method, why.clone())));
                }
                return out;
            }
            let demands: Vec<Pair> = tasks.iter().map(|&i| wl(i).demand(inputs[i].as_ref().expect("checked above"))).collect();
            let total = component::sum(demands.iter().map(|d| d.0.clone()));
            let total_backlog = total.as_ref().ok().and_then(|t| total_backlog(t, &beta.1));
            let shared: Result<Vec<Q>, CurveError> = total.and_then(|total| {
                if edf {
                    let dl: Vec<(Curve, Q)> = tasks
                        .iter()
                        .zip(&demands)
                        .map(|(&i, d)| (d.0.clone(), sys.tasks[i].deadline.clone().unwrap_or_default()))
                        .collect();
                    let ok = component::edf_schedulable(&dl, &beta.1)?;
                    let busy = total.busy_window(&beta.1)?;
                    Ok(tasks
                        .iter()
                        .map(|&i| match (&sys.tasks[i].deadline, ok) {
                            (Some(d), true) => Q::min(d, &busy),
                            _ => busy.clone(),
                        })
                        .collect())
                } else {
                    let d = total.hdev(&beta.1)?;
                    Ok(vec![d; tasks.len()])
                }
            });
            match shared {
                Ok(wcrts) => {
                    for (k, &i) in tasks.iter().enumerate() {
                        let ev = inputs[i].as_ref().expect("checked above");
                        let wcrt = wcrts[k].clone();
                        let bcrt = component::best_case(&sys.tasks[i].bcet, &beta.0);
                        // Per task, only the activations of one WCRT window are known to be
                        // pending; the resource's total is exact (`ResourceResult::backlog`).
                        let work = demands[k].0.eval_right(&wcrt);
                        let b = TaskBounds {
                            backlog: component::backlog_from_wcrt(ev, &wcrt),
                            backlog_work: match &total_backlog {
                                Some(t) => Q::min(&work, t),
                                None => work,
                            },
                            output: component::propagate_jitter(ev, &wcrt, &bcrt),
                            wcrt,
                            bcrt,
                        };
                        out.push((i, Outcome { bounds: Some(b), service: beta.clone(), exact_until: None, method, problem: None }));
                    }
                }
                Err(e) => {
                    for &i in tasks {
                        out.push((i, unbounded(beta, method, curve_problem(&e))));
                    }
                }
            }
        }
    }
    out
}

/// Pending work of a whole work-conserving resource: sup (Σ demand − βl), at least 0 (`None`
/// when unbounded or too complex).
fn total_backlog(total: &Curve, service_lower: &Curve) -> Option<Q> {
    total.vdev(service_lower).ok().map(|v| Q::max(&v, &Q::zero()))
}

/// Resources in an order where each comes after the resources feeding it; the flag tells
/// whether the dependencies were acyclic.
pub(crate) fn resource_order(sys: &System, tasks_on: &[Vec<usize>]) -> (Vec<usize>, bool) {
    let n = sys.resources.len();
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (r, ts) in tasks_on.iter().enumerate() {
        for &i in ts {
            if let Input::Task(j) = sys.tasks[i].input {
                let src = sys.tasks[j].resource;
                if src != r && !deps[r].contains(&src) {
                    deps[r].push(src);
                }
            }
        }
    }
    let mut indeg: Vec<usize> = deps.iter().map(|d| d.len()).collect();
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (r, d) in deps.iter().enumerate() {
        for &s in d {
            users[s].push(r);
        }
    }
    let mut order = Vec::with_capacity(n);
    let mut ready: Vec<usize> = (0..n).filter(|&r| indeg[r] == 0).collect();
    ready.reverse();
    while let Some(r) = ready.pop() {
        order.push(r);
        for &u in &users[r] {
            indeg[u] -= 1;
            if indeg[u] == 0 {
                ready.push(u);
            }
        }
    }
    let acyclic = order.len() == n;
    if !acyclic {
        let mut seen = vec![false; n];
        for &r in &order {
            seen[r] = true;
        }
        order.extend((0..n).filter(|&r| !seen[r]));
    }
    (order, acyclic)
}

/// A task's activation curves: from its stream, or the completions of the task feeding it.
fn input_of(sys: &System, i: usize, streams: &[Pair], outputs: &[Option<Option<Pair>>]) -> Option<Pair> {
    match sys.tasks[i].input {
        Input::Stream(s) => Some(streams[s].clone()),
        Input::Task(j) => match &outputs[j] {
            Some(o) => o.clone().map(|o| released(sys, j, o)),
            // Not analysed yet (cyclic dependencies): start from the source without jitter.
            None => input_of(sys, j, streams, outputs),
        },
    }
}

/// The work of one resource in one round of [`ordered_pass`]: its fixed-priority state (if it
/// has one) and, after the round, the tasks analysed with their inputs and outcomes.
struct Job {
    r: usize,
    fp: Option<FpState>,
    done: Vec<(usize, Option<Pair>, Outcome)>,
}

/// One pass in task-dependency order; `false` (with partial results) if some tasks wait on each
/// other in a cycle.
///
/// Rounds: in each, every resource analyses the tasks that are ready given the results of the
/// previous rounds (a task once its input is known and, under fixed priority, every
/// higher-priority task there is done; other policies once all their inputs are known). The
/// resources of a round are independent, so they run on all available cores; each task's
/// result depends only on its inputs and its resource's earlier tasks, so it is the same
/// whatever the number of threads.
fn ordered_pass(
    ctx: &Ctx,
    services: &[Pair],
    outputs: &mut [Option<Option<Pair>>],
    outcomes: &mut [Option<Outcome>],
    inputs: &mut [Option<Pair>],
) -> bool {
    let sys = ctx.sys;
    let ready = |i: usize, outputs: &[Option<Option<Pair>>]| match sys.tasks[i].input {
        Input::Stream(_) => true,
        Input::Task(j) => outputs[j].is_some(),
    };
    let mut fp: Vec<Option<FpState>> = (0..sys.resources.len())
        .map(|r| {
            matches!(sys.resources[r].policy, Policy::FixedPriority | Policy::FixedPriorityNonPreemptive)
                .then(|| FpState::new(ctx, r, &ctx.tasks_on[r], &services[r]))
        })
        .collect();
    let mut whole_done = vec![false; sys.resources.len()];
    let threads = threads(sys);
    loop {
        let mut jobs = Vec::new();
        for r in 0..sys.resources.len() {
            let has_work = match &fp[r] {
                Some(st) => !st.done() && ready(st.order[st.next], outputs),
                None => !whole_done[r] && ctx.tasks_on[r].iter().all(|&i| ready(i, outputs)),
            };
            if has_work {
                jobs.push(Job { r, fp: fp[r].take(), done: Vec::new() });
            }
        }
        if jobs.is_empty() {
            break;
        }
        let snapshot: &[Option<Option<Pair>>] = outputs;
        let run = |job: &mut Job| {
            let r = job.r;
            match job.fp.as_mut() {
                Some(st) => {
                    while !st.done() {
                        let i = st.order[st.next];
                        if !ready(i, snapshot) {
                            break;
                        }
                        let input = input_of(sys, i, &ctx.streams, snapshot);
                        let o = st.step(ctx, input.as_ref());
                        job.done.push((i, input, o));
                    }
                }
                None => {
                    let mut ins: Vec<Option<Pair>> = vec![None; sys.tasks.len()];
                    for &i in &ctx.tasks_on[r] {
                        ins[i] = input_of(sys, i, &ctx.streams, snapshot);
                    }
                    for (i, o) in analyze_resource(ctx, r, &ins, &services[r]) {
                        job.done.push((i, ins[i].take(), o));
                    }
                }
            }
        };
        run_all(&mut jobs, threads, run);
        for job in jobs {
            if job.fp.is_none() {
                whole_done[job.r] = true;
            }
            fp[job.r] = job.fp;
            for (i, input, o) in job.done {
                outputs[i] = Some(o.bounds.as_ref().map(|b| b.output.clone()));
                inputs[i] = input;
                outcomes[i] = Some(o);
            }
        }
    }
    outputs.iter().all(|o| o.is_some())
}

/// Threads used by [`ordered_pass`] at most.
const MAX_THREADS: usize = 8;

/// Systems with fewer tasks are analysed on one thread (starting threads would cost more).
const MIN_TASKS_FOR_THREADS: usize = 64;

/// Threads for independent work in `sys`: the available cores, at most [`MAX_THREADS`], and one
/// for small systems.
fn threads(sys: &System) -> usize {
    if sys.tasks.len() < MIN_TASKS_FOR_THREADS {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_THREADS)
}

/// Runs `f` on every job, on up to `threads` threads (the caller's included), each taking the
/// next unclaimed job.
fn run_all<T: Send, F: Fn(&mut T) + Sync>(jobs: &mut [T], threads: usize, f: F) {
    let n = threads.min(jobs.len());
    if n <= 1 {
        jobs.iter_mut().for_each(&f);
        return;
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<&mut T>> = jobs.iter_mut().map(std::sync::Mutex::new).collect();
    let work = || loop {
        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(slot) = slots.get(k) else { break };
        // Each slot is claimed by exactly one thread, so the lock is never contended.
        let mut job = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut job);
    };
    std::thread::scope(|s| {
        for _ in 1..n {
            s.spawn(work);
        }
        work();
    });
}

/// The whole analysis with truncated fixed-priority services (as [`crate::system::analyze`]).
pub(crate) fn analyze(sys: &System, opts: &Options) -> Result<Analysis, AnalysisError> {
    analyze_with(sys, opts, true)
}

/// The whole analysis; `truncate`: whether fixed-priority services may be truncated.
pub(crate) fn analyze_with(sys: &System, opts: &Options, truncate: bool) -> Result<Analysis, AnalysisError> {
    check_structure(sys)?;
    let mut streams = Vec::with_capacity(sys.streams.len());
    let mut cache = models::CurveCache::new();
    for s in &sys.streams {
        streams.push(cache.curves(&s.model).map_err(|e| AnalysisError::Stream { stream: s.name.clone(), msg: e.to_string() })?);
    }
    let mut tasks_on: Vec<Vec<usize>> = vec![Vec::new(); sys.resources.len()];
    for (i, t) in sys.tasks.iter().enumerate() {
        tasks_on[t.resource].push(i);
    }
    let mut services = Vec::with_capacity(sys.resources.len());
    for r in 0..sys.resources.len() {
        services.push(base_service(sys, r)?);
    }
    let ctx = Ctx { sys, opts, streams, tasks_on, truncate, chained: chained_tasks(sys) };
    let (order, _) = resource_order(sys, &ctx.tasks_on);

    let n = sys.tasks.len();
    // outputs[i]: None = not analysed yet; Some(None) = analysed, unbounded.
    let mut outputs: Vec<Option<Option<Pair>>> = vec![None; n];
    let mut outcomes: Vec<Option<Outcome>> = (0..n).map(|_| None).collect();
    let mut inputs: Vec<Option<Pair>> = vec![None; n];
    let mut iterations = 0;
    // First try task by task: a task is analysed as soon as its input and (under fixed
    // priority) every higher-priority task on its resource are known. This is one exact pass
    // whenever the task-level dependencies are acyclic, even if the resource graph is not.
    let ordered = ordered_pass(&ctx, &services, &mut outputs, &mut outcomes, &mut inputs);
    let mut converged = ordered;
    if ordered {
        iterations = 1;
    }
    let mut gave_up = false;
    // Otherwise iterate over whole resources until no completion curve changes.
    while !converged {
        iterations += 1;
        let mut changed = false;
        for &r in &order {
            if ctx.tasks_on[r].is_empty() {
                continue;
            }
            for &i in &ctx.tasks_on[r] {
                inputs[i] = input_of(sys, i, &ctx.streams, &outputs);
            }
            for (i, o) in analyze_resource(&ctx, r, &inputs, &services[r]) {
                let new = o.bounds.as_ref().map(|b| b.output.clone());
                if outputs[i].as_ref() != Some(&new) {
                    changed = true;
                }
                outputs[i] = Some(new);
                outcomes[i] = Some(o);
            }
        }
        if !changed {
            converged = true;
            break;
        }
        if iterations >= opts.max_iterations {
            gave_up = true;
            break;
        }
    }
    debug_assert!(converged != gave_up);

    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let o = outcomes[i].take().unwrap_or_else(|| unbounded(&services[sys.tasks[i].resource], "none", "not analysed".into()));
        let input = inputs[i].clone().unwrap_or_else(|| (Curve::zero(), Curve::zero()));
        let o = if converged {
            o
        } else {
            let why = format!("no fixed point after {iterations} iterations of the cyclic dependencies (bounds keep growing)");
            Outcome { bounds: None, problem: Some(why), ..o }
        };
        tasks.push(task_result(sys, i, o, input));
    }

    // Chains are independent of each other: all cores.
    let mut chains: Vec<(usize, Option<ChainResult>)> = (0..sys.chains.len()).map(|c| (c, None)).collect();
    run_all(&mut chains, threads(sys), |(c, r)| *r = Some(chain_result(sys, &sys.chains[*c], &tasks)));
    let chains = chains.into_iter().filter_map(|(_, r)| r).collect();
    let resources = (0..sys.resources.len()).map(|r| resource_result(&ctx, r, &inputs, &services[r])).collect();
    Ok(Analysis { tasks, chains, resources, iterations })
}

/// The reported result of task `i` from its outcome and its activation curves.
pub(crate) fn task_result(sys: &System, i: usize, o: Outcome, input: Pair) -> TaskResult {
    match o.bounds {
        Some(b) => TaskResult {
            wcrt: Some(b.wcrt),
            bcrt: b.bcrt,
            backlog: Some(b.backlog),
            backlog_work: Some(b.backlog_work),
            input: Bounds { upper: input.0, lower: input.1 },
            output: Bounds { upper: b.output.0, lower: b.output.1 },
            service: Bounds { upper: o.service.0, lower: o.service.1 },
            service_exact_until: o.exact_until,
            method: o.method,
            problem: o.problem,
        },
        None => TaskResult {
            wcrt: None,
            bcrt: component::best_case(&sys.tasks[i].bcet, &o.service.0),
            backlog: None,
            backlog_work: None,
            input: Bounds { upper: input.0, lower: input.1 },
            output: Bounds { upper: Curve::zero(), lower: Curve::zero() },
            service: Bounds { upper: o.service.0, lower: o.service.1 },
            service_exact_until: o.exact_until,
            method: o.method,
            problem: o.problem,
        },
    }
}

pub(crate) fn chain_result(sys: &System, c: &Chain, tasks: &[TaskResult]) -> ChainResult {
    let best = c.tasks.iter().fold(Q::zero(), |acc, &i| acc + &tasks[i].bcrt);
    // Held output (replication's output commit) adds its delay once per hop that holds.
    let holds = c.tasks.iter().filter_map(|&i| sys.tasks[i].hold.clone()).fold(Q::zero(), |a, h| a + h);
    let per_hop = c.tasks.iter().try_fold(holds.clone(), |acc, &i| tasks[i].wcrt.as_ref().map(|w| acc + w));
    // Pay bursts only once: valid when every hop serves the stream FIFO through a service
    // curve of its own (fixed priority or TDMA).
    let pboo = if c.tasks.len() > 1
        && per_hop.is_some()
        && c.tasks.iter().all(|&i| {
            matches!(sys.resources[sys.tasks[i].resource].policy, Policy::FixedPriority | Policy::FixedPriorityNonPreemptive | Policy::Tdma)
        }) {
        // With truncated services (`FpState`), max_below_line of the reported curve is an
        // upper bound of the exact one and the part before the horizon a lower bound, so the
        // latency L of the rate-latency curve lies between L_lo and L_up. The bound is
        // max(0, L + sup(αu/R − Δ)), which moves by at most the change of L: when
        // pboo(L_up) − (L_up − L_lo) is not below the per-hop sum, neither is the exact pboo and
        // `worst` is the per-hop sum either way; otherwise the hops' services are recomputed
        // exactly, so `worst` is always what the exact services give (`docs/analysis.md` §9).
        // A hop that holds its output is a pure delay element after it: its hold adds to the
        // latency of the concatenated service.
        let input = &tasks[c.tasks[0]].input.upper;
        let bound = |(r, l): (Q, Q)| input.hdev(&Curve::rate_latency(r, l + &holds)).ok();
        let up = pboo_params(sys, c, tasks, |_, bl, rho| bl.max_below_line(rho).ok());
        let pboo_up = up.clone().and_then(bound);
        match (&up, &pboo_up, &per_hop) {
            (Some((r, l_up)), Some(p_up), Some(ph)) if c.tasks.iter().any(|&i| tasks[i].service_exact_until.is_some()) => {
                let lo = pboo_params(sys, c, tasks, |i, bl, rho| match &tasks[i].service_exact_until {
                    Some(h) => Some(bl.max_below_line_before(rho, h)),
                    None => bl.max_below_line(rho).ok(),
                });
                match lo {
                    Some((_, l_lo)) if &l_lo != l_up && &(p_up - &(l_up - &l_lo)) < ph => {
                        let p_lo = bound((r.clone(), l_lo));
                        if p_lo.as_ref().is_some_and(|p| p < ph) {
                            pboo_params(sys, c, tasks, |i, bl, rho| {
                                if tasks[i].service_exact_until.is_none() {
                                    return bl.max_below_line(rho).ok();
                                }
                                exact_service(sys, tasks, i)?.1.max_below_line(rho).ok()
                            })
                            .and_then(bound)
                        } else {
                            pboo_up
                        }
                    }
                    _ => pboo_up,
                }
            }
            _ => pboo_up,
        }
    } else {
        None
    };
    let worst = match (&per_hop, &pboo) {
        (Some(a), Some(b)) => Some(Q::min(a, b)),
        (Some(a), None) => Some(a.clone()),
        _ => None,
    };
    let slack = match (&c.deadline, &worst) {
        (Some(d), Some(w)) => Some(d - w),
        _ => None,
    };
    let meets_deadline = c.deadline.as_ref().map(|d| worst.as_ref().is_some_and(|w| w <= d));
    ChainResult { worst, best, per_hop, pboo, deadline: c.deadline.clone(), slack, meets_deadline }
}

/// The rate R and latency L of the rate-latency service the hops of chain `c` guarantee
/// together (pay bursts only once), with `v(i, βl_i, ρ_i)` giving sup (ρ_i·Δ − βl_i(Δ)) for each
/// hop (`None`: no bound).
fn pboo_params(sys: &System, c: &Chain, tasks: &[TaskResult], v: impl Fn(usize, &Curve, &Q) -> Option<Q>) -> Option<(Q, Q)> {
    // Each hop guarantees at least ⌊βl/wcet⌋ completions, which lies above the rate-latency
    // curve R (Δ − T − 1/R) with R = rate(βl)/wcet and T the horizontal distance of βl
    // from its own long-run line. Rate-latency curves concatenate in closed form.
    let mut rate: Option<Q> = None;
    let mut latency = Q::zero();
    for &i in &c.tasks {
        let bl = &tasks[i].service.lower;
        let rho = bl.rate();
        let r_ev = rho.checked_div(&sys.tasks[i].wcet).filter(|r| r.is_positive())?;
        // T = sup (Δ − βl(Δ)/ρ): the vertical distance to the line, divided by the rate.
        latency = latency + v(i, bl, &rho)? / &rho + r_ev.recip().unwrap_or_default();
        rate = Some(rate.map_or(r_ev.clone(), |r| Q::min(&r, &r_ev)));
    }
    Some((rate?, latency))
}

/// The exact (untruncated) service of fixed-priority task `i`, replaying its resource's
/// higher-priority tasks on their recorded activation curves.
fn exact_service(sys: &System, tasks: &[TaskResult], i: usize) -> Option<Pair> {
    let r = sys.tasks[i].resource;
    let on: Vec<usize> = (0..sys.tasks.len()).filter(|&j| sys.tasks[j].resource == r).collect();
    let beta = base_service(sys, r).ok()?;
    let opts = Options::default();
    let mut tasks_on = vec![Vec::new(); sys.resources.len()];
    tasks_on[r] = on.clone();
    let ctx = Ctx { sys, opts: &opts, streams: Vec::new(), tasks_on, truncate: false, chained: Vec::new() };
    let mut st = FpState::new(&ctx, r, &on, &beta);
    while !st.done() {
        let j = st.order[st.next];
        let input = (tasks[j].input.upper.clone(), tasks[j].input.lower.clone());
        let o = st.step(&ctx, Some(&input));
        if j == i {
            return Some(o.service);
        }
    }
    None
}

pub(crate) fn resource_result(ctx: &Ctx, r: usize, inputs: &[Option<Pair>], beta: &Pair) -> ResourceResult {
    let sys = ctx.sys;
    let res = &sys.resources[r];
    let capacity = beta.1.rate();
    let mut demand = Q::zero();
    for &i in &ctx.tasks_on[r] {
        if let Some(ev) = &inputs[i] {
            demand = demand + &sys.tasks[i].wcet * ev.0.rate();
        }
    }
    // Reservations hosted here take their share of the host.
    let mut reserved = Q::zero();
    for other in &sys.resources {
        if let ResourceKind::Reservation { host, budget, period, .. } = &other.kind {
            if *host == r {
                reserved = reserved + budget / period;
            }
        }
    }
    let mut utilisation = if capacity.is_positive() { &demand / &capacity } else { Q::zero() };
    utilisation = utilisation + &reserved;
    let mut problem = None;
    if utilisation > Q::one() {
        problem = Some(format!("overloaded: long-run utilisation {:.1}%", utilisation.to_f64() * 100.0));
    }
    let (supply, min_budgets) = match &res.kind {
        ResourceKind::Reservation { period, supply, host, .. } => (Some(*supply), min_budgets(ctx, r, inputs, period, *supply, *host)),
        _ => (None, Vec::new()),
    };
    let min_budget = min_budgets.first().and_then(|m| m.grid.clone());
    // Every policy but TDMA is work-conserving: the resource holds at most sup (Σ demand − βl)
    // of pending work whichever task it serves first. Computed where the sum is needed anyway
    // (EDF, FIFO); for fixed priority the per-task backlogs are exact and the sum would span
    // the common period of every input.
    let backlog = match res.policy {
        Policy::Edf | Policy::Fifo => {
            let ds = ctx.tasks_on[r].iter().map(|&i| {
                let w =
                    Workload { wcet: sys.tasks[i].wcet.clone(), bcet: sys.tasks[i].bcet.clone(), curves: sys.tasks[i].workload.clone() };
                inputs[i].as_ref().map(|ev| w.demand(ev).0)
            });
            ds.collect::<Option<Vec<Curve>>>().and_then(|ds| component::sum(ds).ok()).and_then(|t| total_backlog(&t, &beta.1))
        }
        _ => None,
    };
    ResourceResult { utilisation, capacity, supply, min_budget, min_budgets, backlog, problem }
}

/// Smallest budgets of reservation `r` under the declared supply model and the other one.
fn min_budgets(ctx: &Ctx, r: usize, inputs: &[Option<Pair>], period: &Q, declared: models::SupplyModel, host: usize) -> Vec<MinBudget> {
    let sys = ctx.sys;
    if ctx.tasks_on[r].iter().all(|&i| sys.tasks[i].deadline.is_none()) || !ctx.opts.budget_step.is_positive() {
        return Vec::new();
    }
    let other = match declared {
        models::SupplyModel::WorstCase => models::SupplyModel::Synchronous,
        models::SupplyModel::Synchronous => models::SupplyModel::WorstCase,
    };
    [declared, other].into_iter().map(|m| min_budget(ctx, r, inputs, period, m, host)).collect()
}

/// Smallest budget for one supply model: on the grid of `budget_step` (at most the period),
/// and exactly. Schedulability is monotone in the budget, so bisection is exact on the grid.
fn min_budget(ctx: &Ctx, r: usize, inputs: &[Option<Pair>], period: &Q, supply: models::SupplyModel, host: usize) -> MinBudget {
    let sys = ctx.sys;
    let speed = host_speed(sys, host);
    let step = &ctx.opts.budget_step;
    let feasible = |q: &Q| -> bool {
        let Ok((u, l)) = models::periodic_resource(q, period, supply) else { return false };
        let beta = (u.scale(&speed), l.scale(&speed));
        analyze_resource(ctx, r, inputs, &beta).iter().all(|(i, o)| match (&sys.tasks[*i].deadline, &o.bounds) {
            (Some(d), Some(b)) => &b.wcrt <= d,
            (Some(_), None) => false,
            (None, _) => true,
        })
    };
    let none = MinBudget { supply, grid: None, exact: None };
    let kmax = (period / step).ceil();
    let at = |k: &Q| Q::min(&(k * step), period);
    if !feasible(period) {
        return none;
    }
    let (mut lo, mut hi) = (Q::zero(), kmax); // infeasible at lo (budget 0), feasible at hi
    while &hi - &lo > Q::one() {
        let mid = ((&lo + &hi) / Q::int(2)).floor();
        if feasible(&at(&mid)) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let grid = at(&hi);
    let exact = exact_min_budget(ctx, r, inputs, period, supply, &speed, &feasible, at(&lo), grid.clone());
    MinBudget { supply, grid: Some(grid), exact }
}

/// The exact smallest budget in (`lo`, `hi`] (`lo` infeasible, `hi` feasible), or `None` when
/// the argument below does not apply (a demand that is not a staircase, no closing busy window).
///
/// Every deadline test of the analysis on a reservation reduces to conditions sbf_Q(s) ≥ v, for
/// times s and work v from a finite set: a fixed-priority or FIFO delay ≤ D holds iff each
/// level y = α(t⁺) reached at t is served by t + D, i.e. some s ≤ t + D has
/// sbf_Q(s) ≥ W(s) + y (W: the higher-priority or other demand, plus any blocking), and with
/// staircase demands only the s where W steps (or s = t + D) matter; the EDF test needs
/// sbf_Q(s) ≥ dbf(s⁺) at the steps of the dbf. All those s and v (v divided by the host speed)
/// are integer multiples of a unit u: the gcd of every breakpoint, value, period and increment
/// of the demands, the deadlines, the blocking terms and P. For a fixed s, sbf_Q(s) is piecewise
/// linear in Q: kQ + max(0, s − 2(P − Q) − kP) for the worst case (k the number of whole
/// periods), kQ + max(0, s − (k + 1)P + Q) for the release-synchronous model, so the smallest Q
/// meeting it is v/k, (v − s + (k + 2)P)/(k + 2) or (v − s + (k + 1)P)/(k + 1): u·N/m with an
/// integer N and 1 ≤ m ≤ M = ⌊S/P⌋ + 2, where S bounds the s that matter (the busy window at
/// `lo` plus the largest deadline; the window only shrinks as Q grows). The smallest feasible
/// budget is the largest of these per-condition minima, so it has that form too. Two distinct
/// such values differ by at least u/M², so once bisection has narrowed (lo, hi] below that
/// width, the simplest rational in (lo/u, hi/u] (scaled by u) is the minimum; it is checked
/// feasible.
#[allow(clippy::too_many_arguments)]
fn exact_min_budget(
    ctx: &Ctx,
    r: usize,
    inputs: &[Option<Pair>],
    period: &Q,
    supply: models::SupplyModel,
    speed: &Q,
    feasible: &dyn Fn(&Q) -> bool,
    mut lo: Q,
    mut hi: Q,
) -> Option<Q> {
    let sys = ctx.sys;
    let res = &sys.resources[r];
    let tasks = &ctx.tasks_on[r];
    // The tasks that influence a deadline: all of them on a shared queue, the higher
    // priorities of the last task with a deadline (and it) under fixed priority.
    let mut relevant: Vec<usize> = tasks.clone();
    let np = res.policy == Policy::FixedPriorityNonPreemptive;
    if matches!(res.policy, Policy::FixedPriority | Policy::FixedPriorityNonPreemptive) {
        relevant.sort_by_key(|&i| (sys.tasks[i].priority.unwrap_or(i64::MAX), i));
        let last = relevant.iter().rposition(|&i| sys.tasks[i].deadline.is_some())?;
        relevant.truncate(last + 1);
    }
    let mut unit = period.clone();
    let mut see = |v: &Q| unit = Q::gcd(&unit, v);
    let mut demands = Vec::new();
    let mut rate = Q::zero();
    let mut dmax = Q::zero();
    for &i in &relevant {
        let t = &sys.tasks[i];
        let w = Workload { wcet: t.wcet.clone(), bcet: t.bcet.clone(), curves: t.workload.clone() };
        let d = w.demand(inputs[i].as_ref()?).0.scale(&speed.recip()?);
        if d.segments().iter().any(|s| !s.s.is_zero()) {
            return None;
        }
        for s in d.segments() {
            see(&s.x);
            see(&s.y);
            see(&s.yr);
        }
        see(d.period());
        see(d.increment());
        see(d.periodic_start());
        if let Some(dl) = &t.deadline {
            see(dl);
            dmax = Q::max(&dmax, dl);
        }
        rate = rate + d.rate();
        demands.push(d);
    }
    // Non-preemptive blocking: any lower-priority WCET (all tasks, to be safe).
    let mut blocking = Q::zero();
    if np {
        for &i in tasks {
            let b = &sys.tasks[i].wcet / speed;
            see(&b);
            blocking = Q::max(&blocking, &b);
        }
    }
    let unit = unit;
    if !unit.is_positive() {
        return None;
    }
    // Below the long-run demand no budget keeps the last relevant deadline.
    let floor = &rate * period;
    if floor > lo && floor <= hi {
        if feasible(&floor) {
            return Some(floor);
        }
        lo = floor;
    }
    // A bound on the busy window at `lo` from linear bounds (cheap whatever the common period
    // of the demands): demand <= rate·t + b + blocking, and sbf_lo(t) >= (lo/P)·(t − L) with
    // the longest blackout L = 2(P − lo) (worst case) or P − lo (release-synchronous), so the
    // window closes by (b + blocking + ρL)/(ρ − rate) when ρ = lo/P > rate (bisect until so).
    let top = demands.iter().fold(blocking, |acc, d| acc + d.affine_bounds().1);
    let mut busy = None;
    for _ in 0..64 {
        let rho = &lo / period;
        if rho > rate {
            let blackout = match supply {
                models::SupplyModel::WorstCase => (period - &lo) * Q::int(2),
                models::SupplyModel::Synchronous => period - &lo,
            };
            busy = Some((&top + &rho * &blackout) / (&rho - &rate));
            break;
        }
        let mid = (&lo + &hi) / Q::int(2);
        if feasible(&mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let s_max = Q::max(&busy?, &Q::zero()) + dmax;
    let m = (&s_max / period).floor() + Q::int(2);
    let width = &unit / (&m * &m);
    for _ in 0..400 {
        if &hi - &lo < width {
            let x = Q::simplest_in(&(&lo / &unit), false, Some(&(&hi / &unit)), true) * &unit;
            return feasible(&x).then_some(x);
        }
        let mid = (&lo + &hi) / Q::int(2);
        if feasible(&mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::EventModel;
    use crate::q::q;

    /// Two chains crossing two processors with opposite priorities: a1 (low, P1) → a2 (high,
    /// P2) and b1 (low, P2) → b2 (high, P1). Each low task waits for a high task whose input
    /// waits for the other low task: a cycle that only a fixed point resolves.
    fn crossing() -> System {
        let cpu = |n: &str| Resource {
            blackout: None,
            name: n.into(),
            kind: ResourceKind::Dedicated { rate: q(1) },
            policy: Policy::FixedPriority,
            cycle: None,
        };
        let task = |n: &str, r, input, prio| Task {
            hold: None,
            name: n.into(),
            resource: r,
            input,
            wcet: q(2),
            bcet: q(1),
            priority: Some(prio),
            deadline: None,
            slot: None,
            workload: None,
        };
        System {
            resources: vec![cpu("p1"), cpu("p2")],
            streams: vec![
                Stream { name: "sa".into(), model: EventModel::Periodic { period: q(10) } },
                Stream { name: "sb".into(), model: EventModel::Periodic { period: q(12) } },
            ],
            tasks: vec![
                task("a1", 0, Input::Stream(0), 2),
                task("a2", 1, Input::Task(0), 1),
                task("b1", 1, Input::Stream(1), 2),
                task("b2", 0, Input::Task(2), 1),
            ],
            chains: vec![Chain { name: "a".into(), tasks: vec![0, 1], deadline: Some(q(20)) }],
        }
    }

    #[test]
    fn cyclic_dependencies_reach_a_fixed_point() {
        let sys = crossing();
        let a = analyze(&sys, &Options::default()).unwrap();
        assert!(a.iterations > 1, "needs iteration");
        assert!(a.tasks.iter().all(|t| t.wcrt.is_some()), "{:?}", a.tasks.iter().map(|t| &t.problem).collect::<Vec<_>>());
        // High-priority tasks see only their own work; low ones one job of the other chain.
        assert_eq!(a.tasks[1].wcrt, Some(q(2)));
        assert_eq!(a.tasks[3].wcrt, Some(q(2)));
        assert!(a.tasks[0].wcrt.as_ref().is_some_and(|w| w >= &q(4)));
        assert!(a.all_deadlines_met(&sys));
    }

    #[test]
    fn an_iteration_limit_withdraws_every_bound() {
        let sys = crossing();
        let a = analyze(&sys, &Options { max_iterations: 1, ..Options::default() }).unwrap();
        assert!(a.tasks.iter().all(|t| t.wcrt.is_none() && t.problem.as_deref().is_some_and(|p| p.contains("fixed point"))));
    }
}
