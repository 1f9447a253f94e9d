//! Checkpoint intervals chosen by the analysis (DESIGN §4: the longer the interval, the less
//! replication costs, but a protected VM's output waits for the checkpoint that covers it).
//!
//! Under `fixed:T` an output waits at most T for its checkpoint to begin, the pause d, and the
//! checkpoint's transfer to the backup (the worst-case response of the VM's checkpoint message
//! on its port, which itself depends on T), then the backup's staging and acknowledgement A
//! (`checkpoint_ack`): a hold of T + d + W + A. The VM pauses d once per T.
//! [`largest_fixed_interval`] tries intervals from the longest down ([`CANDIDATES_US`]), and
//! between the first whose pauses and holds keep every deadline of the system and the
//! candidate above it (which breaks one) searches for the longest interval that keeps them, to
//! three significant digits (the precision of a `fixed:T` policy's name in ms): e.g. 3.47 ms
//! instead of the candidate 2.5 ms, up to 39 % less checkpointing for the same deadlines.
//! Deadlines need not hold for every interval below one that keeps them (a pause that is a
//! large part of a short interval starves the VM), so the search keeps the bracket it was
//! given: an interval it returns was analysed and keeps every deadline, and the one a grid step
//! above it was analysed and breaks one.

use crate::Loaded;
use rtc::models::EventModel;
use rtc::system::{analyze, Blackout, Input, Options};
use rtc::Q;

/// Intervals tried first (µs), longest first; the longest that keeps every deadline is then
/// refined up to the next one.
pub const CANDIDATES_US: [i64; 14] =
    [500_000, 200_000, 150_000, 100_000, 75_000, 50_000, 40_000, 25_000, 20_000, 10_000, 5_000, 2_500, 1_000, 500];

/// The analysis's choice for one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The longest interval that keeps every deadline (None: none does).
    pub interval: Option<Q>,
    /// Its output hold (T + pause + the checkpoint's worst-case transfer + `checkpoint_ack`).
    pub commit: Option<Q>,
    pub pause: Q,
}

/// The longest fixed checkpoint interval (see the module's doc) for remote-mode VM `vm` that
/// keeps every deadline, with `pause` (the VM's declared `checkpoint_pause` when `None`, e.g.
/// a measured one) and the other VMs as declared. Errors name what is missing.
pub fn largest_fixed_interval(l: &Loaded, vm: &str, pause: Option<Q>) -> Result<Choice, String> {
    let pause = resolve_pause(l, vm, pause)?;
    let keeps = |us: i64| -> Result<Option<Q>, String> {
        let t = Q::int(us);
        if t <= pause {
            return Ok(None);
        }
        Ok(match fixed_interval(l, vm, &t, Some(pause.clone()))? {
            Some((true, commit)) => Some(commit),
            _ => None,
        })
    };
    Ok(match longest_keeping(keeps)? {
        Some((us, commit)) => Choice { interval: Some(Q::int(us)), commit: Some(commit), pause },
        None => Choice { interval: None, commit: None, pause },
    })
}

/// The step of the grid of intervals with three significant digits in ms around `us` (µs):
/// 1 µs below 1 ms, 10 µs below 10 ms, ... (at least 1).
fn grid_step(us: i64) -> i64 {
    let mut step = 1;
    while us >= step * 1_000 {
        step *= 10;
    }
    step
}

/// The longest interval (µs) on the grid of three significant digits for which `keeps` gives
/// the output hold (`None`: a deadline breaks): the first candidate of [`CANDIDATES_US`] that
/// keeps every deadline, then a bisection between it and the candidate above it.
fn longest_keeping(mut keeps: impl FnMut(i64) -> Result<Option<Q>, String>) -> Result<Option<(i64, Q)>, String> {
    let mut above: Option<i64> = None;
    for us in CANDIDATES_US {
        let Some(commit) = keeps(us)? else {
            above = Some(us);
            continue;
        };
        let (mut lo, mut lo_commit) = (us, commit);
        let Some(mut hi) = above else { return Ok(Some((lo, lo_commit))) };
        loop {
            let step = grid_step(lo);
            let mid = lo + (hi - lo) / 2;
            let mid = mid / grid_step(mid) * grid_step(mid);
            if mid <= lo {
                if hi - lo > step {
                    // The bisection is down to one grid step of `lo` below a boundary that may
                    // lie on a coarser grid: try the step itself.
                    match keeps(lo + step)? {
                        Some(c) => (lo, lo_commit) = (lo + step, c),
                        None => hi = lo + step,
                    }
                    continue;
                }
                return Ok(Some((lo, lo_commit)));
            }
            match keeps(mid)? {
                Some(c) => (lo, lo_commit) = (mid, c),
                None => hi = mid,
            }
        }
    }
    Ok(None)
}

fn resolve_pause(l: &Loaded, vm: &str, pause: Option<Q>) -> Result<Q, String> {
    let dep = l.deployment.as_ref().ok_or("the model has no [[host]] items")?;
    let v = dep.vms.iter().find(|v| v.name == vm).ok_or_else(|| format!("no VM {vm:?} in the model"))?;
    let c = v.checkpoint.as_ref().ok_or_else(|| format!("VM {vm:?} has no remote backup, so no checkpoints"))?;
    Ok(pause.or_else(|| c.pause.clone()).unwrap_or_else(Q::zero))
}

/// Whether every deadline holds with `vm` checkpointed under `fixed:T` (pauses of `pause`, its
/// declared one when `None`), and the output hold that gives; `None` when the transfer bound
/// does not settle or the system cannot be analysed.
pub fn fixed_interval(l: &Loaded, vm: &str, t: &Q, pause: Option<Q>) -> Result<Option<(bool, Q)>, String> {
    fixed_interval_with(l, vm, t, pause, None)
}

/// As [`fixed_interval`], with the backup's staging and acknowledgement `ack` instead of the
/// declared `checkpoint_ack` when given (a measured one).
pub fn fixed_interval_with(l: &Loaded, vm: &str, t: &Q, pause: Option<Q>, ack: Option<Q>) -> Result<Option<(bool, Q)>, String> {
    let pause = resolve_pause(l, vm, pause)?;
    let dep = l.deployment.as_ref().ok_or("the model has no [[host]] items")?;
    let v = dep.vms.iter().find(|v| v.name == vm).ok_or_else(|| format!("no VM {vm:?} in the model"))?;
    let c = v.checkpoint.as_ref().ok_or_else(|| format!("VM {vm:?} has no remote backup, so no checkpoints"))?;
    let Input::Stream(stream) = l.system.tasks[c.task].input else { return Err(format!("{vm}: checkpoint stream missing")) };
    if *t <= pause {
        return Err(format!("{vm}: an interval of {t} µs is not longer than the pause {pause} µs"));
    }
    let mut sys = l.system.clone();
    sys.streams[stream].model = EventModel::Periodic { period: t.clone() };
    let blackout = pause.is_positive().then(|| Blackout { pause: pause.clone(), every: t.clone() });
    for &r in v.reservation.iter().chain(&v.extra_reservations) {
        sys.resources[r].blackout = blackout.clone();
    }
    // The hold depends on the transfer time, which depends on the hold (through the traffic on
    // the port): iterate until the transfer bound settles.
    let mut transfer = Q::zero();
    for _ in 0..4 {
        let commit = &(t + &pause + &transfer) + ack.as_ref().or(c.ack.as_ref()).unwrap_or(&Q::zero());
        for &h in &c.held {
            sys.tasks[h].hold = Some(commit.clone());
        }
        let Ok(a) = analyze(&sys, &Options::default()) else { return Ok(None) };
        let Some(w) = a.tasks[c.task].wcrt.clone() else { return Ok(None) };
        if w == transfer {
            return Ok(Some((a.all_deadlines_met(&sys), commit)));
        }
        transfer = w;
    }
    Ok(None)
}

/// What a running cluster measured of a protected VM's checkpoints under a fixed interval `at`
/// (the policy it ran while they were measured): its pause, the part of the pause spent
/// copying dirty pages, and the backup's staging and acknowledgement after the transfer.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub pause: Q,
    pub copy: Q,
    pub ack: Q,
    pub at: Q,
}

impl Measured {
    /// The pause to expect under interval `t`: as measured for `t` up to `at`; for a longer
    /// interval, the copying part grows in proportion (a guest dirties at most that many more
    /// pages in a longer epoch — fewer when it rewrites the same ones), the rest (stopping the
    /// vCPU, collecting the dirty log, comparing hot pages) does not depend on the interval.
    pub fn pause_at(&self, t: &Q) -> Q {
        if *t > self.at && self.at.is_positive() {
            &self.pause + &(&(&self.copy * &(t - &self.at)) / &self.at)
        } else {
            self.pause.clone()
        }
    }
}

/// The longest fixed checkpoint interval (see the module's doc) for `vm` that keeps every
/// deadline with the pause and acknowledgement a running cluster measured
/// ([`Measured::pause_at`] for each candidate) instead of the declared ones.
pub fn largest_fixed_interval_measured(l: &Loaded, vm: &str, m: &Measured) -> Result<Choice, String> {
    resolve_pause(l, vm, None)?;
    let keeps = |us: i64| -> Result<Option<Q>, String> {
        let t = Q::int(us);
        let pause = m.pause_at(&t);
        if t <= pause {
            return Ok(None);
        }
        Ok(match fixed_interval_with(l, vm, &t, Some(pause), Some(m.ack.clone()))? {
            Some((true, commit)) => Some(commit),
            _ => None,
        })
    };
    Ok(match longest_keeping(keeps)? {
        Some((us, commit)) => {
            let t = Q::int(us);
            Choice { pause: m.pause_at(&t), interval: Some(t), commit: Some(commit) }
        }
        None => Choice { interval: None, commit: None, pause: m.pause.clone() },
    })
}

/// `l` with remote-mode VM `vm` checkpointed every `t`, pausing `pause` each time and holding its
/// output `hold` (what the interval's own analysis gives: [`Choice::commit`]): its checkpoint
/// stream's period, its reservations' blackout and the hold of its output tasks, as the plan's
/// analysis of every placement uses them (`Deployment::place`), instead of the declared
/// `checkpoint_interval`, `checkpoint_pause` and `output_commit`.
pub fn with_interval(l: &Loaded, vm: &str, t: &Q, pause: &Q, hold: &Q) -> Result<Loaded, String> {
    let mut m = l.clone();
    let dep = m.deployment.as_mut().ok_or("the model has no [[host]] items")?;
    let v = dep.vms.iter_mut().find(|v| v.name == vm).ok_or_else(|| format!("no VM {vm:?} in the model"))?;
    let c = v.checkpoint.as_mut().ok_or_else(|| format!("VM {vm:?} has no remote backup, so no checkpoints"))?;
    if !t.is_positive() || pause >= t {
        return Err(format!("{vm}: an interval of {t} µs with pauses of {pause} µs"));
    }
    c.interval = t.clone();
    c.pause = pause.is_positive().then(|| pause.clone());
    c.commit = hold.is_positive().then(|| hold.clone());
    let (task, held) = (c.task, c.held.clone());
    let reservations: Vec<usize> = v.reservation.iter().chain(&v.extra_reservations).copied().collect();
    let Input::Stream(stream) = m.system.tasks[task].input else { return Err(format!("{vm}: checkpoint stream missing")) };
    m.system.streams[stream].model = EventModel::Periodic { period: t.clone() };
    // The system as placed now (the model's placement): where the VM is protected, its pauses
    // and its hold as they are in force.
    for r in reservations {
        if m.system.resources[r].blackout.is_some() {
            m.system.resources[r].blackout = pause.is_positive().then(|| Blackout { pause: pause.clone(), every: t.clone() });
        }
    }
    for h in held {
        if m.system.tasks[h].hold.is_some() {
            m.system.tasks[h].hold = c_hold(hold);
        }
    }
    Ok(m)
}

fn c_hold(hold: &Q) -> Option<Q> {
    hold.is_positive().then(|| hold.clone())
}
