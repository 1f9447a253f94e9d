//! The running system against its model (DESIGN's monitoring unit): each VM's measured job
//! execution times (its guest's marks, `agent::monitor`) are compared with the WCETs the model
//! declares for the tasks inside it. A VM whose jobs take longer raises an alert naming it and
//! by how much; the manager then analyses the model with the observed execution times
//! substituted ([`observed_model`]) and recomputes the plan table from it.
//!
//! Measured execution times run from a job's start mark to its end mark, so they include the
//! host preempting the vCPU and the pauses for checkpoints: the median of the VM's last 64
//! jobs (at least [`MIN_JOBS`]) is what is compared — the last window's 99th percentile and
//! maximum are reported beside it — so that preemptions of the VMM do not pass for longer jobs.
//! A VM that exceeds its WCET in fewer than half of its jobs is not caught this way.

use agent::cluster::JobFigures;
use model::Loaded;
use rtc::Q;
use std::collections::BTreeMap;

/// Observed execution times are rounded up to this grain (µs) before they replace a WCET, and
/// a new alert for a VM needs its execution time to grow by more than [`REGROW`] since the
/// last one.
pub const GRAIN_US: i64 = 10;
pub const REGROW: f64 = 1.1;
/// Jobs needed before a VM is judged.
pub const MIN_JOBS: u64 = 16;

/// A VM whose jobs take longer than its model says.
#[derive(Debug, Clone, PartialEq)]
pub struct Drift {
    pub vm: String,
    /// The task whose WCET is exceeded (the longest-declared task of the VM).
    pub task: String,
    pub declared_us: f64,
    /// The median of the recent jobs (what is compared and substituted).
    pub observed_us: f64,
    pub observed_p99_us: f64,
    pub observed_max_us: f64,
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VM {}: measured execution time {:.0} µs (median of recent jobs; p99 {:.0} µs, max {:.0} µs) exceeds the WCET {:.0} µs of task {} by {:.0} µs",
            self.vm,
            self.observed_us,
            self.observed_p99_us,
            self.observed_max_us,
            self.declared_us,
            self.task,
            self.observed_us - self.declared_us
        )
    }
}

/// The task of `vm` whose WCET is compared (the VM's longest-declared task) and that WCET (µs).
pub fn compared_task(l: &Loaded, vm: &str) -> Option<(usize, f64)> {
    let dep = l.deployment.as_ref()?;
    let v = dep.vms.iter().find(|v| v.name == vm)?;
    v.tasks.iter().map(|&t| (t, l.system.tasks[t].wcet.to_f64())).max_by(|a, b| a.1.total_cmp(&b.1))
}

/// What the figures say about `vm` against the model, given the execution time already
/// substituted for it (`known_us`, from an earlier alert).
pub fn check(l: &Loaded, vm: &str, jobs: &JobFigures, known_us: Option<f64>) -> Option<Drift> {
    let (t, declared) = compared_task(l, vm)?;
    if jobs.recent_jobs < MIN_JOBS || jobs.recent_p50_us <= declared {
        return None;
    }
    if known_us.is_some_and(|k| jobs.recent_p50_us <= k * REGROW) {
        return None;
    }
    Some(Drift {
        vm: vm.to_string(),
        task: l.system.tasks[t].name.clone(),
        declared_us: declared,
        observed_us: jobs.recent_p50_us,
        observed_p99_us: jobs.exec_p99_us,
        observed_max_us: jobs.exec_max_us,
    })
}

/// More activations of a VM's jobs in some window than the model's arrival curve allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Burst {
    pub vm: String,
    pub task: String,
    pub window_ms: f64,
    pub observed: u64,
    pub allowed: u64,
}

impl std::fmt::Display for Burst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VM {}: {} jobs started within {} ms, the model allows at most {} (the arrival curve of task {}'s input) — {} more",
            self.vm,
            self.observed,
            self.window_ms,
            self.allowed,
            self.task,
            self.observed - self.allowed
        )
    }
}

/// The window of `jobs.arrivals` in which `vm`'s jobs started more often than `upper` (the
/// upper arrival curve of its compared task's input, time in µs) allows, by the most.
pub fn check_arrivals(l: &Loaded, vm: &str, jobs: &JobFigures, upper: &rtc::Curve) -> Option<Burst> {
    let (t, _) = compared_task(l, vm)?;
    // The window exceeded by the most.
    jobs.arrivals
        .iter()
        .filter_map(|&(window_ms, observed)| {
            let allowed = upper.eval_right(&Q::int((window_ms * 1000.0).round() as i64)).floor().to_f64().max(0.0) as u64;
            (observed > allowed).then(|| Burst { vm: vm.to_string(), task: l.system.tasks[t].name.clone(), window_ms, observed, allowed })
        })
        .max_by_key(|b| b.observed - b.allowed)
}

/// The arrival curve `vm`'s jobs may follow under `plan` (its compared task's input upper
/// curve), at each of the monitor's window lengths: (window in ms, most activations allowed).
pub fn allowed_arrivals(l: &Loaded, plan: Option<&crate::table::StoredPlan>, vm: &str) -> Vec<(f64, u64)> {
    let Some((t, _)) = compared_task(l, vm) else { return Vec::new() };
    let Some((_, a)) = crate::dashboard::analyse(l, plan) else { return Vec::new() };
    let upper = &a.tasks[t].input.upper;
    agent::monitor::ARRIVAL_WINDOWS_MS
        .iter()
        .map(|&w| (w, upper.eval_right(&Q::int((w * 1000.0).round() as i64)).floor().to_f64().max(0.0) as u64))
        .collect()
}

/// What the leader observed above the model (kept in the store at `agent::cluster::OBSERVED`,
/// so that its successor plans with it).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Observed {
    /// Execution times (µs, by VM).
    #[serde(default)]
    pub exec_us: BTreeMap<String, f64>,
    /// Most job starts per window (window ms, count), by VM: the largest seen per window.
    #[serde(default)]
    pub arrivals: BTreeMap<String, Vec<(f64, u64)>>,
}

impl Observed {
    pub fn is_empty(&self) -> bool {
        self.exec_us.is_empty() && self.arrivals.is_empty()
    }

    /// Adds `vm`'s window counts (keeping the largest per window).
    pub fn add_arrivals(&mut self, vm: &str, windows: &[(f64, u64)]) {
        let known = self.arrivals.entry(vm.to_string()).or_default();
        for &(w, n) in windows {
            match known.iter_mut().find(|(kw, _)| *kw == w) {
                Some(k) => k.1 = k.1.max(n),
                None => known.push((w, n)),
            }
        }
    }

    /// The model with all of it substituted, and what changed in the streams.
    pub fn model(&self, l: &Loaded) -> (Loaded, Vec<String>) {
        observed_arrivals_model(&observed_model(l, &self.exec_us), &self.arrivals)
    }
}

/// The model with the arrivals observed at each VM (`agent::monitor`'s (window ms, most job
/// starts) pairs, by VM) covered: the periodic or PJD stream feeding the VM's compared task gets
/// the smallest jitter and the largest minimum distance (µs grain) under which every observed
/// count is allowed (never less jitter or more distance than declared), and a shorter period
/// when the longest window's count is a higher rate than declared. Returns the model and
/// what changed, one line per stream; a VM fed by another task (a chain hop) or by a stream of
/// another kind is left as it is and said so.
pub fn observed_arrivals_model(l: &Loaded, observed: &BTreeMap<String, Vec<(f64, u64)>>) -> (Loaded, Vec<String>) {
    use rtc::models::EventModel;
    let mut m = l.clone();
    let mut said = Vec::new();
    for (vm, windows) in observed {
        let Some((t, _)) = compared_task(l, vm) else { continue };
        let rtc::system::Input::Stream(si) = l.system.tasks[t].input else {
            said.push(format!(
                "{vm}: its task {} is fed by another task: its observed arrivals are not substituted",
                l.system.tasks[t].name
            ));
            continue;
        };
        let (period, jitter, distance) = match &m.system.streams[si].model {
            EventModel::Periodic { period } => (period.clone(), Q::zero(), Q::zero()),
            EventModel::Pjd { period, jitter, min_distance } => (period.clone(), jitter.clone(), min_distance.clone()),
            other => {
                said.push(format!(
                    "{vm}: stream {} is {other:?}, not periodic or PJD: its observed arrivals are not substituted",
                    m.system.streams[si].name
                ));
                continue;
            }
        };
        // Counts are of closed windows: a curve allows n starts in w when its right limit at w
        // is n, which for PJD is ⌊(w + J) / P⌋ + 1 and for the distance ⌊w / d⌋ + 1.
        let (up, down) = (|x: f64| Q::int(x.ceil() as i64), |x: f64| Q::int(x.floor() as i64));
        // A rate above the declared one over the longest window is a shorter period (a jitter
        // alone would have to grow with the length of the excess): n starts span w.
        let longest = windows.iter().filter(|(_, n)| *n >= 2).max_by(|a, b| a.0.total_cmp(&b.0));
        let period = match longest {
            Some(&(w_ms, n)) if down(w_ms * 1000.0 / (n - 1) as f64) < period => down(w_ms * 1000.0 / (n - 1) as f64).max(Q::one()),
            _ => period,
        };
        let p_us = period.to_f64();
        let mut j = jitter.clone();
        let mut d = distance.clone();
        for &(w_ms, n) in windows {
            if n < 2 {
                continue;
            }
            let w = w_ms * 1000.0;
            // ⌊(w + J) / P⌋ + 1 ≥ n needs J ≥ (n − 1)·P − w.
            let need_j = up((n - 1) as f64 * p_us - w);
            if need_j > j {
                j = need_j;
            }
            // ⌊w / d⌋ + 1 ≥ n needs d ≤ w / (n − 1).
            if d > Q::zero() {
                let most_d = down(w / (n - 1) as f64);
                if most_d < d {
                    d = most_d;
                }
            }
        }
        let declared_period = match &m.system.streams[si].model {
            EventModel::Periodic { period } | EventModel::Pjd { period, .. } => period.clone(),
            _ => period.clone(),
        };
        if j != jitter || d != distance || period != declared_period {
            said.push(format!(
                "stream {} (into {vm}): period {:.3} → {:.3} ms, jitter {:.3} → {:.3} ms, minimum distance {:.3} → {:.3} ms",
                m.system.streams[si].name,
                declared_period.to_f64() / 1e3,
                period.to_f64() / 1e3,
                jitter.to_f64() / 1e3,
                j.to_f64() / 1e3,
                distance.to_f64() / 1e3,
                d.to_f64() / 1e3
            ));
            m.system.streams[si].model = EventModel::Pjd { period, jitter: j, min_distance: d };
        }
    }
    (m, said)
}

/// The model with the observed execution times (µs, by VM) in place of the declared WCETs of
/// the compared tasks (never below what the model declares).
pub fn observed_model(l: &Loaded, observed: &BTreeMap<String, f64>) -> Loaded {
    let mut m = l.clone();
    for (vm, us) in observed {
        let Some((t, declared)) = compared_task(l, vm) else { continue };
        let grains = (us / GRAIN_US as f64).ceil() as i64;
        let wcet = Q::int(grains * GRAIN_US);
        if wcet.to_f64() > declared {
            m.system.tasks[t].wcet = wcet.clone();
            if m.system.tasks[t].bcet > wcet {
                m.system.tasks[t].bcet = wcet;
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn substation() -> Loaded {
        model::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/substation.toml"))).unwrap()
    }

    fn jobs(median: f64, max: f64) -> JobFigures {
        JobFigures {
            jobs: 10,
            total_jobs: 40,
            exec_p50_us: median,
            exec_p99_us: max,
            exec_max_us: max,
            arrivals: Vec::new(),
            recent_jobs: 40,
            recent_p50_us: median,
            lost: 0,
            at_ms: 0,
            ..JobFigures::default()
        }
    }

    #[test]
    fn a_longer_execution_time_is_named_and_substituted() {
        let l = substation();
        // relay runs task protect, declared 800 µs.
        assert_eq!(check(&l, "relay", &jobs(500.0, 3000.0), None), None, "a preempted maximum alone is no alert");
        assert_eq!(check(&l, "relay", &JobFigures { recent_jobs: 5, ..jobs(2000.0, 2000.0) }, None), None, "too few jobs to judge");
        let d = check(&l, "relay", &jobs(2004.0, 2300.0), None).expect("drift");
        assert_eq!((d.task.as_str(), d.declared_us), ("protect", 800.0));
        assert!(
            d.to_string().contains(
                "VM relay: measured execution time 2004 µs (median of recent jobs; p99 2300 µs, max 2300 µs) exceeds the WCET 800 µs of task protect by 1204 µs"
            ),
            "{d}"
        );
        // Known already (within 10 %): no new alert; grown further: a new one.
        assert_eq!(check(&l, "relay", &jobs(2100.0, 2300.0), Some(2004.0)), None);
        assert!(check(&l, "relay", &jobs(2500.0, 2600.0), Some(2004.0)).is_some());
        assert_eq!(check(&l, "ghost", &jobs(2500.0, 2600.0), None), None);
        // The observed model misses the protection chain's deadline (15 ms).
        let m = observed_model(&l, &[("relay".to_string(), 2004.0)].into());
        let t = m.system.tasks.iter().position(|t| t.name == "protect").unwrap();
        assert_eq!(m.system.tasks[t].wcet, Q::int(2010));
        let a = rtc::system::analyze(&m.system, &rtc::system::Options::default()).unwrap();
        assert!(!a.all_deadlines_met(&m.system));
        assert!(rtc::system::analyze(&l.system, &rtc::system::Options::default()).unwrap().all_deadlines_met(&l.system));
    }

    #[test]
    fn observed_arrivals_widen_the_streams_jitter_until_every_count_is_allowed() {
        let l = substation();
        let (vm, (t, _)) = l
            .runs
            .iter()
            .filter_map(|r| compared_task(&l, &r.vm).map(|c| (r.vm.clone(), c)))
            .find(|(_, (t, _))| matches!(l.system.tasks[*t].input, rtc::system::Input::Stream(_)))
            .expect("a VM fed by a stream");
        let windows = vec![(1.0, 5u64), (5.0, 7), (100.0, 9)];
        let (m, said) = observed_arrivals_model(&l, &[(vm.clone(), windows.clone())].into());
        assert_eq!(said.len(), 1, "{said:?}");
        // Every observed count is now within the substituted upper curve; the declared one
        // did not allow them.
        let upper = |l: &Loaded| match l.system.tasks[t].input {
            rtc::system::Input::Stream(s) => l.system.streams[s].model.curves().expect("curves").0,
            _ => panic!("a stream"),
        };
        let (before, after) = (upper(&l), upper(&m));
        let allows = |c: &rtc::Curve, w: f64, n: u64| c.eval_right(&Q::int((w * 1000.0) as i64)).floor().to_f64() as u64 >= n;
        assert!(windows.iter().any(|&(w, n)| !allows(&before, w, n)));
        assert!(windows.iter().all(|&(w, n)| allows(&after, w, n)), "{said:?}");
        // Counts the model allows change nothing: one start in 1 ms, and as many in each window
        // as a strictly periodic stream has in the closed window.
        let period_ms = match l.system.tasks[t].input {
            rtc::system::Input::Stream(s) => match &l.system.streams[s].model {
                rtc::models::EventModel::Periodic { period } | rtc::models::EventModel::Pjd { period, .. } => period.to_f64() / 1e3,
                _ => panic!("periodic"),
            },
            _ => panic!("a stream"),
        };
        let allowed: Vec<(f64, u64)> = [1.0, 100.0, 1000.0].iter().map(|&w| (w, (w / period_ms).floor() as u64 + 1)).collect();
        let (same, said) = observed_arrivals_model(&l, &[(vm, allowed)].into());
        assert!(said.is_empty() && same.system.streams == l.system.streams, "{said:?}");
    }

    #[test]
    fn a_burst_above_the_arrival_curve_is_named() {
        let l = substation();
        let a = rtc::system::analyze(&l.system, &rtc::system::Options::default()).unwrap();
        let (t, _) = compared_task(&l, "relay").unwrap();
        let upper = &a.tasks[t].input.upper;
        // The samples every 5 ms (jitter 0.5 ms): what the model allows is never an alert.
        let allowed = |ms: f64| upper.eval_right(&Q::int((ms * 1000.0) as i64)).floor().to_f64() as u64;
        let fine = JobFigures { arrivals: vec![(5.0, allowed(5.0)), (100.0, allowed(100.0))], ..jobs(100.0, 100.0) };
        assert_eq!(check_arrivals(&l, "relay", &fine, upper), None);
        let burst = JobFigures { arrivals: vec![(1.0, allowed(1.0)), (5.0, allowed(5.0) + 7)], ..jobs(100.0, 100.0) };
        let b = check_arrivals(&l, "relay", &burst, upper).expect("burst");
        assert_eq!((b.window_ms, b.observed - b.allowed), (5.0, 7));
        assert!(b.to_string().starts_with("VM relay: "), "{b}");
        assert!(b.to_string().contains("the arrival curve of task protect's input"), "{b}");
    }
}
