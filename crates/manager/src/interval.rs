//! The `analysed` checkpoint policy, kept true to what runs: the longest fixed checkpoint
//! interval whose pauses and held output keep every deadline (`model::replication`), chosen
//! again from the pauses and acknowledgements the VM's primary measures while it runs.
//!
//! Each protected VM's primary publishes, once a second, the 99th percentiles of its pauses,
//! of the page copying within them, and of the staging and acknowledgement by its backup
//! (after the checkpoint's last byte left) in `actual.replication`
//! (`agent::cluster::ReplicationFigures`). An [`Adapter`] keeps the last [`HISTORY`] of those
//! windows per VM, measured under the interval in force, and compares their largest values with
//! the ones the interval was chosen for (its *basis*: the declared `checkpoint_pause` and
//! `checkpoint_ack` at first):
//!
//! - **above the basis** (a pause or an acknowledgement longer than the interval was analysed
//!   for): the interval is chosen again at once from the measured values with a margin
//!   ([`MARGIN`]); a shorter one is switched to, the same one keeps running with the new basis;
//! - **well below it** for a while (the measured values with the margin below the basis by
//!   [`GROW`], and [`GROW_AFTER`] since the last change): chosen again, and a longer interval
//!   is switched to (less checkpoint overhead).
//!
//! The pause depends on the interval (a longer epoch dirties more pages): for a candidate
//! longer than the interval it was measured under, its copying part is scaled up in proportion
//! (`model::replication::Measured::pause_at`).
//!
//! Percentiles, not maxima: on a shared host the longest pause of a second is the host
//! preempting the primary's driver in the middle of a pause (a mean of 0.3 ms, 1.5–5 ms at the
//! top, measured under `vigil up` at load 2.6), which the model does not describe any more
//! than it describes the host preempting the VM itself; fed to the analysis, those would leave
//! no interval at all. What exceeds the bounds still shows as a chain measured above its bound
//! (`manager::daemon`'s alert). Nothing is switched on fewer than
//! [`MIN_WINDOWS`] windows; when no interval keeps every deadline with the measured values,
//! the interval in force stays and the caller raises an alert. The decisions are pure (the
//! daemon feeds the figures and applies them), so they are unit-tested here.

use agent::cluster::ReplicationFigures;
use model::replication::{fixed_interval_with, largest_fixed_interval_measured, Measured};
use model::Loaded;
use rtc::Q;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// How far back measured windows count (ms).
pub const HISTORY: u64 = 10_000;
/// Windows (seconds of checkpoints) needed before anything is decided.
pub const MIN_WINDOWS: usize = 3;
/// The measured largest values are multiplied by this before they are analysed.
pub const MARGIN: f64 = 1.25;
/// A longer interval is tried only when the measured values (with the margin) are below the
/// basis by this factor...
pub const GROW: f64 = 1.5;
/// ... and this long (ms) after the last change.
pub const GROW_AFTER: u64 = 10_000;

/// What an interval was chosen for, as kept in the store (`/vigil/manager/intervals`), so that
/// the next leader carries on from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chosen {
    /// `fixed:T`.
    pub policy: String,
    /// The pause and the backup's acknowledgement it was analysed with (µs).
    pub pause_us: f64,
    pub ack_us: f64,
    /// The output hold the analysis gives it (µs).
    pub hold_us: f64,
    /// When it was chosen (ms since the Unix epoch), and why.
    pub at_ms: u64,
    pub why: String,
}

/// A decision for one VM.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run `to` instead of `from`.
    Switch { from: String, to: Chosen },
    /// The interval stays; it now stands for the measured values (`basis` was exceeded, and the
    /// analysis chose the same interval again).
    Rebased { basis: Chosen },
    /// No fixed interval keeps every deadline with the measured values: `policy` stays.
    NoneHolds { policy: String, pause_us: f64, ack_us: f64 },
}

#[derive(Debug, Clone, Copy)]
struct Window {
    at_ms: u64,
    pause_ms: f64,
    copy_ms: f64,
    ack_ms: f64,
}

#[derive(Debug, Clone)]
struct Vm {
    chosen: Chosen,
    windows: VecDeque<Window>,
    /// When the last growth was tried (ms), so that a failed try is not repeated each check.
    grow_tried: u64,
    /// The values last reported as holding no interval (reported again when exceeded by half).
    none_alerted: Option<(f64, f64)>,
    /// Windows ending before this (ms) do not count (the VM was not protected: a backup
    /// synchronising, its first checkpoints).
    counts_from: u64,
}

/// How long after a VM is (again) protected its windows start to count (ms): the first
/// checkpoints after a synchronisation carry what was dirtied during it.
pub const SETTLE: u64 = 3_000;

/// The adapted intervals of the VMs whose policy is `analysed`.
#[derive(Debug, Clone, Default)]
pub struct Adapter {
    vms: BTreeMap<String, Vm>,
}

/// `fixed:T` for `t` µs.
pub fn policy_name(t: &Q) -> String {
    format!("fixed:{}", model::units::trim_float(t.to_f64() / 1000.0, 3))
}

impl Adapter {
    /// Starts from the interval `chosen` for `vm` (at the manager's start, from the declared
    /// values; or what a previous leader chose).
    pub fn track(&mut self, vm: &str, chosen: Chosen) {
        let counts_from = chosen.at_ms + SETTLE;
        self.vms.insert(vm.to_string(), Vm { chosen, windows: VecDeque::new(), grow_tried: 0, none_alerted: None, counts_from });
    }

    /// What `vm` runs now, as chosen.
    pub fn chosen(&self, vm: &str) -> Option<&Chosen> {
        self.vms.get(vm).map(|v| &v.chosen)
    }

    /// `vm` is not protected at `now_ms`: its figures count again only [`SETTLE`] after it is.
    pub fn unprotected(&mut self, vm: &str, now_ms: u64) {
        if let Some(v) = self.vms.get_mut(vm) {
            v.windows.clear();
            v.counts_from = now_ms + SETTLE;
        }
    }

    /// Every VM's chosen interval.
    pub fn all(&self) -> impl Iterator<Item = (&String, &Chosen)> {
        self.vms.iter().map(|(vm, v)| (vm, &v.chosen))
    }

    /// The VMs tracked.
    pub fn vms(&self) -> impl Iterator<Item = &String> {
        self.vms.keys()
    }

    /// A window of `vm`'s replication figures. Only windows measured entirely under the
    /// interval in force count (its policy, ended a second or more after the switch), each
    /// once, with checkpoints in it.
    pub fn observe(&mut self, vm: &str, f: &ReplicationFigures) {
        let Some(v) = self.vms.get_mut(vm) else { return };
        if f.policy != v.chosen.policy || f.per_second <= 0.0 || f.at_ms <= v.chosen.at_ms || f.at_ms < v.counts_from {
            return;
        }
        if v.windows.back().is_some_and(|w| w.at_ms >= f.at_ms) {
            return;
        }
        v.windows.push_back(Window { at_ms: f.at_ms, pause_ms: f.pause_p99_ms, copy_ms: f.copy_p99_ms, ack_ms: f.ack_p99_ms });
        while v.windows.front().is_some_and(|w| w.at_ms + HISTORY < f.at_ms) {
            v.windows.pop_front();
        }
    }

    /// Whether `vm`'s interval should change, at `now_ms`, for `loaded` (the model; its other
    /// VMs as declared). Errors are the analysis's (a VM without checkpoints, ...).
    pub fn decide(&mut self, loaded: &Loaded, vm: &str, now_ms: u64) -> Result<Option<Decision>, String> {
        let Some(v) = self.vms.get_mut(vm) else { return Ok(None) };
        if v.windows.len() < MIN_WINDOWS {
            return Ok(None);
        }
        let pause_ms = v.windows.iter().map(|w| w.pause_ms).fold(0.0, f64::max);
        let copy_ms = v.windows.iter().map(|w| w.copy_ms).fold(0.0, f64::max).min(pause_ms);
        let ack_ms = v.windows.iter().map(|w| w.ack_ms).fold(0.0, f64::max);
        // The values analysed: the measured largest with the margin, in whole µs (rounded up).
        let (pause_us, ack_us) = ((pause_ms * 1e3 * MARGIN).ceil(), (ack_ms * 1e3 * MARGIN).ceil());
        let basis = (v.chosen.pause_us, v.chosen.ack_us);
        let exceeded = pause_ms * 1e3 > basis.0 || ack_ms * 1e3 > basis.1;
        let since = now_ms.saturating_sub(v.chosen.at_ms.max(v.grow_tried));
        let lower = (pause_us * GROW < basis.0 || ack_us * GROW < basis.1) && since >= GROW_AFTER;
        if !(exceeded || lower) {
            return Ok(None);
        }
        if !exceeded && v.none_alerted.is_some() {
            // Nothing held with values not exceeded since: nothing new to try.
            return Ok(None);
        }
        let Some(at) = v.chosen.policy.strip_prefix("fixed:").and_then(|t| t.parse::<f64>().ok()) else {
            return Err(format!("{vm}: the interval in force {:?} is not a fixed one", v.chosen.policy));
        };
        let at = Q::int((at * 1000.0).round() as i64);
        let copy_us = (copy_ms * 1e3 * MARGIN).ceil();
        let m = Measured { pause: Q::int(pause_us as i64), copy: Q::int(copy_us as i64), ack: Q::int(ack_us as i64), at: at.clone() };
        // When the values the interval in force was analysed for are exceeded, it stays if it
        // still keeps every deadline with the measured ones (the search may find a longer
        // one, not yet due, or — deadlines need not hold below an interval that keeps them —
        // a shorter one in another bracket); its hold for them is the one it now stands for.
        let at_hold = if exceeded && m.pause_at(&at) < at {
            match fixed_interval_with(loaded, vm, &at, Some(m.pause_at(&at)), Some(m.ack.clone()))? {
                Some((true, hold)) => Some(hold),
                _ => None,
            }
        } else {
            None
        };
        let choice = largest_fixed_interval_measured(loaded, vm, &m)?;
        let why = |what: &str| {
            format!(
                "{what}: 99th percentiles of the pause {pause_ms:.2} ms and of the backup's acknowledgement {ack_ms:.2} ms over the last {} s (the interval in force was analysed for {:.2} ms and {:.2} ms; analysed now with {:.3} ms and {:.3} ms, a {}% margin)",
                HISTORY / 1000,
                basis.0 / 1e3,
                basis.1 / 1e3,
                pause_us / 1e3,
                ack_us / 1e3,
                ((MARGIN - 1.0) * 100.0).round()
            )
        };
        let Some(t) = choice.interval.or_else(|| at_hold.as_ref().map(|_| at.clone())) else {
            if exceeded && v.none_alerted.is_none_or(|(p, a)| pause_us > 1.5 * p || ack_us > 1.5 * a) {
                let (p, a) = v.none_alerted.unwrap_or_default();
                v.none_alerted = Some((pause_us.max(p), ack_us.max(a)));
                return Ok(Some(Decision::NoneHolds { policy: v.chosen.policy.clone(), pause_us, ack_us }));
            }
            if !exceeded {
                v.grow_tried = now_ms;
            }
            return Ok(None);
        };
        v.none_alerted = None;
        let hold_us = choice.commit.as_ref().map_or(0.0, Q::to_f64);
        let to = |why: String| Chosen { policy: policy_name(&t), pause_us, ack_us, hold_us, at_ms: now_ms, why };
        if (t < at && at_hold.is_none()) || (t > at && since >= GROW_AFTER) {
            let what = if t < at {
                "the measured pauses or acknowledgements are too long for it"
            } else {
                "the measured pauses and acknowledgements allow a longer one"
            };
            let next = to(why(what));
            let from = std::mem::replace(&mut v.chosen, next.clone()).policy;
            v.windows.clear();
            v.grow_tried = 0;
            return Ok(Some(Decision::Switch { from, to: next }));
        }
        if exceeded {
            // The same interval (or a longer one, not yet due) still holds with the measured
            // values: it stands for them now.
            let hold_us = at_hold.as_ref().map_or(hold_us, Q::to_f64);
            let keep = Chosen { policy: v.chosen.policy.clone(), at_ms: v.chosen.at_ms, hold_us, ..to(why("still holds")) };
            v.chosen = keep.clone();
            return Ok(Some(Decision::Rebased { basis: keep }));
        }
        v.grow_tried = now_ms;
        Ok(None)
    }
}

/// `l` with each VM's chosen interval, its pause and output hold in place of the declared ones
/// (`model::replication::with_interval`): what the plan table is computed from, so that its
/// chains' bounds count the hold of the interval in force. Returns the model and what could
/// not be substituted.
pub fn apply<'a>(l: &Loaded, chosen: impl IntoIterator<Item = (&'a String, &'a Chosen)>) -> (Loaded, Vec<String>) {
    let mut m = l.clone();
    let mut said = Vec::new();
    for (vm, c) in chosen {
        let Some(t) = c.policy.strip_prefix("fixed:").and_then(|t| t.parse::<f64>().ok()) else { continue };
        if c.hold_us <= 0.0 {
            continue;
        }
        let us = |x: f64| Q::int(x.ceil() as i64);
        match model::replication::with_interval(&m, vm, &Q::int((t * 1000.0).round() as i64), &us(c.pause_us), &us(c.hold_us)) {
            Ok(next) => m = next,
            Err(e) => said.push(e),
        }
    }
    (m, said)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Loaded {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/substation.toml");
        let text = std::fs::read_to_string(path).unwrap().replacen("policy = \"adaptive\"", "policy = \"analysed\"", 1);
        model::parse(&text, "substation.toml", std::path::Path::new(".")).unwrap()
    }

    fn declared(at_ms: u64) -> Chosen {
        // What the manager starts from: the example's declared 500 µs pause and 3 ms
        // acknowledgement give fixed:3.48 (a hold of 9.077 ms).
        Chosen { policy: "fixed:3.48".into(), pause_us: 500.0, ack_us: 3000.0, hold_us: 9077.152, at_ms, why: "declared".into() }
    }

    /// A window with these 99th percentiles (the page copying a quarter of the pause).
    fn window(policy: &str, at_ms: u64, pause_ms: f64, ack_ms: f64) -> ReplicationFigures {
        ReplicationFigures {
            policy: policy.into(),
            per_second: 300.0,
            pause_p99_ms: pause_ms,
            copy_p99_ms: pause_ms / 4.0,
            ack_p99_ms: ack_ms,
            pause_max_ms: 10.0 * pause_ms,
            ack_max_ms: 10.0 * ack_ms,
            at_ms,
            ..Default::default()
        }
    }

    /// Feeds `n` windows a second apart from `t0` (ms), deciding after each.
    fn feed(a: &mut Adapter, l: &Loaded, t0: u64, n: u64, pause_ms: f64, ack_ms: f64) -> Vec<Decision> {
        let mut out = Vec::new();
        for i in 0..n {
            let now = t0 + i * 1000;
            let policy = a.chosen("relay").unwrap().policy.clone();
            a.observe("relay", &window(&policy, now, pause_ms, ack_ms));
            out.extend(a.decide(l, "relay", now).unwrap());
        }
        out
    }

    #[test]
    fn the_interval_follows_the_measured_pauses_with_hysteresis() {
        let l = example();
        let mut a = Adapter::default();
        a.track("relay", declared(0));
        // Measured as declared (or a little less): nothing changes, ever.
        assert_eq!(feed(&mut a, &l, 2_000, 30, 0.45, 2.7), vec![]);
        // Short pauses and fast acknowledgements, for long enough: a longer interval holds
        // every deadline, and is switched to once, after GROW_AFTER.
        let d = feed(&mut a, &l, 40_000, 30, 0.2, 0.8);
        assert_eq!(d.len(), 1, "{d:?}");
        let Decision::Switch { from, to } = &d[0] else { panic!("{d:?}") };
        assert_eq!(from, "fixed:3.48");
        assert_eq!(to.policy, "fixed:6.37", "{to:?}");
        assert!(to.why.contains("allow a longer"), "{to:?}");
        assert_eq!((to.pause_us, to.ack_us), (250.0, 1000.0));
        // Checked independently: fixed:6.37 holds with the pause it may reach (the copying part
        // of 63 µs scaled from 3.48 to 6.37 ms) and the acknowledgement; 10 µs longer does not.
        let measured = |p: i64, c: i64, a: i64, at: i64| model::replication::Measured {
            pause: Q::int(p),
            copy: Q::int(c),
            ack: Q::int(a),
            at: Q::int(at),
        };
        let ok = |t: i64, m: &model::replication::Measured| {
            model::replication::fixed_interval_with(&l, "relay", &Q::int(t), Some(m.pause_at(&Q::int(t))), Some(m.ack.clone()))
        };
        let m = measured(250, 63, 1000, 3480);
        assert!(matches!(ok(6_370, &m), Ok(Some((true, _)))));
        assert!(matches!(ok(6_380, &m), Ok(Some((false, _)))));
        // Pauses as before but slower acknowledgements (the backup's host, or the link): at
        // once (in the first decision with MIN_WINDOWS windows under fixed:6.37) the longest
        // interval that holds with them, fixed:4.48.
        let d = feed(&mut a, &l, 80_000, 3, 0.4, 1.6);
        assert_eq!(d.len(), 1, "{d:?}");
        let Decision::Switch { from, to } = &d[0] else { panic!("{d:?}") };
        assert_eq!((from.as_str(), to.policy.as_str()), ("fixed:6.37", "fixed:4.48"), "{to:?}");
        assert!(to.why.contains("too long") && to.why.contains("1.60 ms"), "{to:?}");
        let m = measured(500, 125, 2000, 6370);
        assert!(matches!(ok(4_480, &m), Ok(Some((true, _)))));
        assert!(matches!(ok(4_490, &m), Ok(Some((false, _)))));
        // Longer pauses, still within what fixed:4.48 keeps: it stays, standing for them now.
        // (The pause is longer than fixed:4.48 was analysed for, the acknowledgement shorter.)
        let d = feed(&mut a, &l, 85_000, 5, 0.52, 1.0);
        let [Decision::Rebased { basis }] = &d[..] else { panic!("{d:?}") };
        assert_eq!((basis.policy.as_str(), basis.pause_us, basis.ack_us), ("fixed:4.48", 650.0, 1250.0));
        assert!(matches!(ok(4_480, &measured(650, 163, 1250, 4480)), Ok(Some((true, _)))));
        // Pauses so long that no interval holds: said once, the interval stays.
        let d = feed(&mut a, &l, 100_000, 6, 4.0, 1.0);
        assert_eq!(d, vec![Decision::NoneHolds { policy: "fixed:4.48".into(), pause_us: 5000.0, ack_us: 1250.0 }]);
        assert_eq!(a.chosen("relay").unwrap().policy, "fixed:4.48");
    }

    #[test]
    fn the_plan_model_counts_the_hold_of_the_interval_in_force() {
        let l = example();
        let bound = |m: &Loaded| {
            let a = rtc::system::analyze(&m.system, &rtc::system::Options::default()).unwrap();
            let i = m.system.chains.iter().position(|c| c.name == "protection").unwrap();
            a.chains[i].worst.clone().unwrap().to_f64()
        };
        // Declared: output_commit 7 ms. The interval's own analysis: fixed:3.48 holds 9.077 ms.
        let chosen = declared(0);
        let (m, said) = apply(&l, [(&"relay".to_string(), &chosen)]);
        assert!(said.is_empty(), "{said:?}");
        let dep = m.deployment.as_ref().unwrap();
        let c = dep.vms.iter().find(|v| v.name == "relay").unwrap().checkpoint.as_ref().unwrap();
        // (The hold in whole µs, rounded up.)
        assert_eq!((c.interval.to_f64(), c.commit.as_ref().map(Q::to_f64)), (3480.0, Some(9078.0)));
        // The chain's bound grows by less than the 2.078 ms of extra hold (pauses every 3.48 ms
        // instead of 2.5 take less from the relay's tasks), and stays within its 15 ms: the
        // longest interval keeps it with 1.2 µs to spare.
        assert!(bound(&m) - bound(&l) > 1000.0 && bound(&m) <= 15_000.0, "{} → {}", bound(&l), bound(&m));
        // fixed:5 (a hold of 10.6 ms, pauses half as often): the chain misses its 15 ms, as
        // the interval's own analysis says (`vigil analyze --intervals`).
        let longer = Chosen { policy: "fixed:5".into(), hold_us: 10_600.0, ..declared(0) };
        let (m2, _) = apply(&l, [(&"relay".to_string(), &longer)]);
        assert!(bound(&m2) > 15_000.0 && bound(&m2) > bound(&m), "{} → {}", bound(&m), bound(&m2));
        assert!(!matches!(model::replication::fixed_interval(&l, "relay", &Q::int(5000), None), Ok(Some((true, _)))));
        // Not a fixed interval, or no VM of that name: said, nothing changed.
        let (_, said) = apply(&l, [(&"ghost".to_string(), &chosen)]);
        assert_eq!(said.len(), 1, "{said:?}");
    }

    #[test]
    fn windows_of_another_policy_or_without_checkpoints_do_not_count() {
        let l = example();
        let mut a = Adapter::default();
        a.track("relay", declared(0));
        for i in 0..10 {
            a.observe("relay", &window("adaptive", 2_000 + i * 1000, 3.0, 9.0));
            a.observe("relay", &ReplicationFigures { per_second: 0.0, ..window("fixed:3.48", 2_000 + i * 1000, 3.0, 9.0) });
            assert_eq!(a.decide(&l, "relay", 2_000 + i * 1000).unwrap(), None);
        }
        // The same window read twice counts once.
        for _ in 0..5 {
            a.observe("relay", &window("fixed:3.48", 20_000, 3.0, 9.0));
        }
        assert_eq!(a.decide(&l, "relay", 20_000).unwrap(), None);
    }
}
