//! Components: the greedy processing component (GPC) and the scheduling policies built from it.
//!
//! Curves come in pairs `(upper, lower)`. Demand and service are in work units; events are
//! counted. A task's activation curves `α` become demand `(wcet·αu, bcet·αl)`.

use crate::curve::{Curve, CurveError};
use crate::q::Q;

type Result<T> = std::result::Result<T, CurveError>;

/// Upper and lower curve.
pub type Pair = (Curve, Curve);

/// The outcome of a greedy processing component fed with demand `α` on service `β`.
#[derive(Debug, Clone)]
pub struct Gpc {
    /// Maximum delay: horizontal deviation of `αu` and `βl`.
    pub delay: Q,
    /// Maximum backlog (work): vertical deviation of `αu` and `βl`.
    pub backlog: Q,
    /// Processed work: `α'u = min((αu ⊗ βu) ⊘ βl, βu)`, `α'l = min((αl ⊘ βu) ⊗ βl, βl)`.
    pub output: Pair,
    /// Service left for lower priorities: `β'u = max(inf_{λ≥Δ}(βu − αl), 0)`,
    /// `β'l = sup_{λ≤Δ}(βl − αu)`.
    pub remaining: Pair,
}

/// Full GPC analysis (demand `alpha`, service `beta`).
pub fn gpc(alpha: &Pair, beta: &Pair) -> Result<Gpc> {
    let delay = alpha.0.hdev(&beta.1)?;
    let backlog = alpha.0.vdev(&beta.1)?;
    let out_u = alpha.0.conv(&beta.0)?.deconv(&beta.1)?.min(&beta.0)?;
    let out_l = alpha.1.deconv(&beta.0)?.conv(&beta.1)?.min(&beta.1)?;
    let remaining = remaining_service(alpha, beta)?;
    Ok(Gpc { delay, backlog, output: (out_u, out_l), remaining })
}

/// Service left over after serving `alpha` from `beta` (see [`Gpc::remaining`]).
pub fn remaining_service(alpha: &Pair, beta: &Pair) -> Result<Pair> {
    let lower = beta.1.sub_running_max_nonneg(&alpha.0)?;
    let upper = beta.0.sub(&alpha.1)?.running_min_ahead()?.clamp_nonnegative()?;
    Ok((upper, lower))
}

/// Lower remaining service only; the upper service is passed on unchanged (it still bounds
/// what the lower priorities can get).
pub fn remaining_lower(alpha: &Pair, beta: &Pair) -> Result<Pair> {
    let lower = beta.1.sub_running_max_nonneg(&alpha.0)?;
    Ok((beta.0.clone(), lower))
}

/// A task's execution demand per activation.
#[derive(Debug, Clone)]
pub struct Workload {
    pub wcet: Q,
    pub bcet: Q,
    /// Workload curves over consecutive activations, when known.
    pub curves: Option<crate::models::WorkloadCurve>,
}

impl Workload {
    pub fn constant(wcet: Q, bcet: Q) -> Workload {
        Workload { wcet, bcet, curves: None }
    }

    /// Demand curves: `(γu ∘ αu, γl ∘ αl)` with workload curves, else `(wcet·αu, bcet·αl)`.
    /// (The constant form is always valid, since the curves never exceed k·wcet or fall below
    /// k·bcet; it is used when the activation curves are not integer staircases.)
    pub fn demand(&self, events: &Pair) -> Pair {
        let up = self.curves.as_ref().and_then(|g| g.compose(&events.0, true).ok()).unwrap_or_else(|| events.0.scale(&self.wcet));
        let lo = self.curves.as_ref().and_then(|g| g.compose(&events.1, false).ok()).unwrap_or_else(|| events.1.scale(&self.bcet));
        (up, lo)
    }
}

/// The bounds of one task served FIFO by its own (lower) service curve.
#[derive(Debug, Clone)]
pub struct TaskBounds {
    pub wcrt: Q,
    pub bcrt: Q,
    /// Pending activations (events).
    pub backlog: Q,
    /// Pending work (work units): released and not yet served.
    pub backlog_work: Q,
    /// Completion curves (events).
    pub output: Pair,
}

/// Best-case response time: the earliest the upper service can deliver `bcet`.
pub fn best_case(bcet: &Q, service_upper: &Curve) -> Q {
    if !bcet.is_positive() {
        return Q::zero();
    }
    service_upper.first_reach(bcet, false).unwrap_or_else(Q::zero)
}

/// Completion curves bounded by jitter propagation: every activation completes between `bcrt`
/// and `wcrt` after it arrived.
pub fn propagate_jitter(events: &Pair, wcrt: &Q, bcrt: &Q) -> Pair {
    let j = if wcrt > bcrt { wcrt - bcrt } else { Q::zero() };
    let up = events.0.shift_left(&j).with_value_at_zero(&Q::zero());
    let lo = events.1.shift_right(&j, &Q::zero());
    (up, lo)
}

/// Pending activations when each completes within `wcrt`: those that arrived in the last
/// `wcrt` (window closed on the right, hence the right limit).
pub fn backlog_from_wcrt(events: &Pair, wcrt: &Q) -> Q {
    events.0.eval_right(wcrt)
}

/// Backlog of a task that gets the lower service `service_lower` for itself and serves its
/// activations FIFO, as `(events, work)`:
///
/// - work: the vertical deviation sup (γu∘αu − βl) of its upper demand `demand_upper` and the
///   service, exact for the model;
/// - events: `⌈sup (wcet·αu − βl) / wcet⌉`. At time t in a busy window that started at s, at
///   most A = ⌊αu((t − s)⁺)⌋ activations arrived and at least ⌊βl(t − s)/wcet⌋ completed (each
///   needs at most wcet), so the backlog is an integer below αu − βl/wcet + 1, hence at most
///   ⌈V/wcet⌉ with V the deviation; when αu is integer-valued (every event model) this is
///   exactly sup (αu − ⌊βl/wcet⌋). It is also capped by the activations of one WCRT window
///   ([`backlog_from_wcrt`]), which it never exceeds when exact.
///
/// A deviation that cannot be computed (a curve error) falls back to the WCRT window.
pub fn backlog_on_service(events: &Pair, w: &Workload, demand_upper: &Curve, service_lower: &Curve, wcrt: &Q) -> (Q, Q) {
    backlog_of_deviations(events, w, demand_upper, wcrt, |d| d.vdev(service_lower))
}

/// [`backlog_on_service`] with the vertical deviation from the service given by `vdev` (of the
/// upper demand, and of `wcet·αu` when the task has workload curves). Both results are
/// non-decreasing functions of the deviations.
pub(crate) fn backlog_of_deviations(
    events: &Pair,
    w: &Workload,
    demand_upper: &Curve,
    wcrt: &Q,
    mut vdev: impl FnMut(&Curve) -> Result<Q>,
) -> (Q, Q) {
    let by_wcrt = backlog_from_wcrt(events, wcrt);
    let work_by_wcrt = demand_upper.eval_right(wcrt);
    let work = match vdev(demand_upper) {
        Ok(v) => Q::min(&Q::max(&v, &Q::zero()), &work_by_wcrt),
        Err(_) => work_by_wcrt,
    };
    if !w.wcet.is_positive() {
        return (by_wcrt, work);
    }
    let v = if w.curves.is_none() { Ok(work.clone()) } else { vdev(&events.0.scale(&w.wcet)) };
    let events = match v {
        Ok(v) => Q::min(&Q::max(&(v / &w.wcet).ceil(), &Q::zero()), &by_wcrt),
        Err(_) => by_wcrt,
    };
    (events, work)
}

/// Analysis of a task that gets the service `beta` for itself and serves its activations FIFO
/// (a GPC in the event domain).
pub fn task_on_service(events: &Pair, w: &Workload, beta: &Pair, gpc_outputs: bool) -> Result<TaskBounds> {
    let demand = w.demand(events);
    let wcrt = demand.0.hdev(&beta.1)?;
    task_bounds(events, w, &demand, beta, wcrt, gpc_outputs)
}

/// [`task_on_service`] once the demand (`w.demand(events)`) and the delay are known.
pub(crate) fn task_bounds(events: &Pair, w: &Workload, demand: &Pair, beta: &Pair, wcrt: Q, gpc_outputs: bool) -> Result<TaskBounds> {
    let bcrt = best_case(&w.bcet, &beta.0);
    let (backlog, backlog_work) = backlog_on_service(events, w, &demand.0, &beta.1, &wcrt);
    let mut output = propagate_jitter(events, &wcrt, &bcrt);
    if gpc_outputs && w.bcet.is_positive() {
        let g = gpc(demand, beta)?;
        // Completions in a window with w work processed: at most ⌈w/bcet⌉ + 1, at least
        // ⌈w/wcet⌉ − 1 (partial jobs at both ends of the window).
        let up = g.output.0.scale(&w.bcet.recip().unwrap_or_default()).ceil()?.offset(&Q::one()).with_value_at_zero(&Q::zero());
        output.0 = output.0.min(&up)?;
        let lo = g.output.1.scale(&w.wcet.recip().unwrap_or_default()).ceil()?.offset(&-Q::one()).clamp_nonnegative()?;
        output.1 = output.1.max(&lo)?;
    }
    Ok(TaskBounds { wcrt, bcrt, backlog, backlog_work, output })
}

/// EDF demand-bound test on service `beta_lower`: `Σ wcet_i αu_i(Δ − D_i) <= βl(Δ)` for all Δ.
pub fn edf_schedulable(demands: &[(Curve, Q)], beta_lower: &Curve) -> Result<bool> {
    let mut total = Curve::zero();
    for (d, deadline) in demands {
        total = total.add(&d.shift_right(deadline, &Q::zero()))?;
    }
    match total.vdev(beta_lower) {
        Ok(v) => Ok(!v.is_positive()),
        Err(CurveError::Unbounded(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Sum of curves.
pub fn sum(curves: impl IntoIterator<Item = Curve>) -> Result<Curve> {
    let mut total = Curve::zero();
    for c in curves {
        total = total.add(&c)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{dedicated, EventModel};
    use crate::q::q;

    #[test]
    fn fixed_priority_chain_matches_rta() {
        // (C, T) = (1,4), (2,6), (3,12): classical RTA gives 1, 3, 10.
        let mut beta = dedicated(&q(1));
        let mut got = Vec::new();
        for (c, t) in [(1, 4), (2, 6), (3, 12)] {
            let ev = EventModel::Periodic { period: q(t) }.curves().unwrap();
            let w = Workload::constant(q(c), q(c));
            let b = task_on_service(&ev, &w, &beta, true).unwrap();
            got.push(b.wcrt.clone());
            beta = remaining_service(&w.demand(&ev), &beta).unwrap();
        }
        assert_eq!(got, vec![q(1), q(3), q(10)]);
    }

    #[test]
    fn gpc_output_is_within_input_shifted() {
        let ev = EventModel::Periodic { period: q(10) }.curves().unwrap();
        let w = Workload::constant(q(4), q(2));
        let b = task_on_service(&ev, &w, &dedicated(&q(1)), true).unwrap();
        assert_eq!(b.wcrt, q(4));
        assert_eq!(b.bcrt, q(2));
        // Jitter 2: at most 2 completions in a window of just over 8.
        assert_eq!(b.output.0.eval(&q(9)), q(2));
        assert_eq!(b.output.0.eval(&q(8)), q(1));
    }
}
