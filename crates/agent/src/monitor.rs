//! Job monitoring on a host: four times a second, each running VM's job marks — written by the guest
//! into its trace ring and read by its VMM without an exit per mark (`vmm_abi::TRACE_ADDR`) —
//! become execution-time figures ([`JobFigures`]), which the agent publishes in the VM's
//! `actual` record for the manager to compare with the model.
//!
//! The same read brings the timestamps of the frames that went in and out at the VM's network
//! device (one host clock read per batch, by the VMM: no exit of their own), which become the
//! input frames' observed arrival curve and the device-level latency ([`Frames`]).
//!
//! The reading runs on its own thread with a timeout per VM, so a stuck VMM never holds up
//! the agent's lease; [`Jobs`] (marks to figures) and [`Frames`] are pure.

use crate::cluster::JobFigures;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often marks are read, and how long a VMM may take to answer.
pub const PERIOD: Duration = Duration::from_millis(250);
pub const TIMEOUT: Duration = Duration::from_millis(300);
/// Jobs started but not yet ended that are remembered across reads.
const MAX_OPEN: usize = 256;
/// The last this many execution times give the rolling median.
pub const RECENT: usize = 64;
/// Window lengths (ms) of the observed arrival curve: the most job starts in any window of
/// each length over the last [`ARRIVAL_HISTORY_MS`].
pub const ARRIVAL_WINDOWS_MS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];
pub const ARRIVAL_HISTORY_MS: f64 = 2000.0;
/// Most starts remembered for the arrival curve.
const MAX_STARTS: usize = 8192;

/// Marks to figures for one VM.
#[derive(Debug, Default)]
pub struct Jobs {
    /// Started, not ended yet: id → TSC.
    open: BTreeMap<u32, u64>,
    total: u64,
    recent: std::collections::VecDeque<f64>,
    /// Start TSCs of the last [`ARRIVAL_HISTORY_MS`].
    starts: std::collections::VecDeque<u64>,
}

impl Jobs {
    /// The figures of one read: execution times (start to end) of the jobs that ended in it.
    pub fn figures(&mut self, t: &vmm::control::Trace) -> Option<JobFigures> {
        if t.tsc_khz == 0 {
            return None;
        }
        let mut exec_us: Vec<f64> = Vec::new();
        for m in &t.marks {
            match m.kind {
                vmm_abi::MARK_START => {
                    if self.open.len() >= MAX_OPEN {
                        self.open.pop_first();
                    }
                    self.open.insert(m.id, m.tsc);
                    if self.starts.len() == MAX_STARTS {
                        self.starts.pop_front();
                    }
                    if self.starts.back().is_none_or(|&b| m.tsc >= b) {
                        self.starts.push_back(m.tsc);
                    }
                }
                vmm_abi::MARK_END => {
                    if let Some(s) = self.open.remove(&m.id) {
                        if m.tsc >= s {
                            exec_us.push((m.tsc - s) as f64 * 1000.0 / t.tsc_khz as f64);
                        }
                    }
                }
                _ => {}
            }
        }
        let per_ms = t.tsc_khz as f64;
        if let Some(&newest) = self.starts.back() {
            let horizon = (ARRIVAL_HISTORY_MS * per_ms) as u64;
            while self.starts.front().is_some_and(|&f| newest - f > horizon) {
                self.starts.pop_front();
            }
        }
        let arrivals = ARRIVAL_WINDOWS_MS.iter().map(|&w| (w, most_in_window(&self.starts, (w * per_ms) as u64))).collect();
        self.total += exec_us.len() as u64;
        for &e in &exec_us {
            if self.recent.len() == RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back(e);
        }
        let mut recent: Vec<f64> = self.recent.iter().copied().collect();
        recent.sort_by(f64::total_cmp);
        exec_us.sort_by(f64::total_cmp);
        let q = |p: f64| exec_us.get(((exec_us.len().saturating_sub(1)) as f64 * p).round() as usize).copied().unwrap_or(0.0);
        Some(JobFigures {
            jobs: exec_us.len() as u64,
            total_jobs: self.total,
            exec_p50_us: q(0.5),
            exec_p99_us: q(0.99),
            exec_max_us: exec_us.last().copied().unwrap_or(0.0),
            arrivals,
            recent_jobs: recent.len() as u64,
            recent_p50_us: recent.get(recent.len() / 2).copied().unwrap_or(0.0),
            lost: t.lost,
            at_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            ..JobFigures::default()
        })
    }
}

/// Frame timestamps to figures for one VM.
#[derive(Debug, Default)]
pub struct Frames {
    /// Input batches (ns, frames) of the last [`ARRIVAL_HISTORY_MS`].
    arrivals: std::collections::VecDeque<(u64, u32)>,
    /// The first input since the guest's last output (ns).
    waiting_since: Option<u64>,
}

impl Frames {
    /// Adds one read's batches to `f` (a VM's figures of the same read).
    pub fn add(&mut self, t: &vmm::control::Trace, f: &mut JobFigures) {
        let mut latencies: Vec<f64> = Vec::new();
        for b in &t.frames {
            if b.output {
                f.frames_out += b.frames as u64;
                if let Some(since) = self.waiting_since.take() {
                    latencies.push(b.at_ns.saturating_sub(since) as f64 / 1e3);
                }
            } else {
                f.frames_in += b.frames as u64;
                self.waiting_since.get_or_insert(b.at_ns);
                if self.arrivals.len() == MAX_STARTS {
                    self.arrivals.pop_front();
                }
                if self.arrivals.back().is_none_or(|&(at, _)| b.at_ns >= at) {
                    self.arrivals.push_back((b.at_ns, b.frames));
                }
            }
        }
        if let Some(&(newest, _)) = self.arrivals.back() {
            let horizon = (ARRIVAL_HISTORY_MS * 1e6) as u64;
            while self.arrivals.front().is_some_and(|&(a, _)| newest - a > horizon) {
                self.arrivals.pop_front();
            }
        }
        f.frame_arrivals = ARRIVAL_WINDOWS_MS.iter().map(|&w| (w, most_frames_in_window(&self.arrivals, (w * 1e6) as u64))).collect();
        latencies.sort_by(f64::total_cmp);
        let q = |p: f64| latencies.get(((latencies.len().saturating_sub(1)) as f64 * p).round() as usize).copied().unwrap_or(0.0);
        f.device_samples = latencies.len() as u64;
        f.device_p50_us = q(0.5);
        f.device_p99_us = q(0.99);
        f.device_max_us = latencies.last().copied().unwrap_or(0.0);
        f.frames_lost = t.frames_lost;
    }
}

/// The most frames of the sorted batches `(ns, frames)` in any half-open window `[t, t + len)`.
fn most_frames_in_window(batches: &std::collections::VecDeque<(u64, u32)>, len: u64) -> u64 {
    let (mut best, mut sum, mut lo) = (0u64, 0u64, 0usize);
    for hi in 0..batches.len() {
        sum += batches[hi].1 as u64;
        while batches[hi].0 - batches[lo].0 >= len {
            sum -= batches[lo].1 as u64;
            lo += 1;
        }
        best = best.max(sum);
    }
    best
}

/// The most of the sorted `times` in any half-open window `[t, t + len)`.
fn most_in_window(times: &std::collections::VecDeque<u64>, len: u64) -> u64 {
    let (mut best, mut lo) = (0usize, 0usize);
    for hi in 0..times.len() {
        while times[hi] - times[lo] >= len {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best as u64
}

struct Watched {
    api: PathBuf,
    jobs: Jobs,
    frames: Frames,
    figures: Option<JobFigures>,
}

/// The monitor thread and what it found.
#[derive(Clone, Default)]
pub struct Monitor {
    vms: Arc<Mutex<BTreeMap<String, Watched>>>,
}

impl Monitor {
    /// Starts the reading thread.
    pub fn start() -> Monitor {
        let m = Monitor::default();
        let vms = m.vms.clone();
        let _ = std::thread::Builder::new().name("job-monitor".into()).spawn(move || loop {
            std::thread::sleep(PERIOD);
            let targets: Vec<(String, PathBuf)> =
                vms.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, w)| (k.clone(), w.api.clone())).collect();
            for (vm, api) in targets {
                let reply = vmm::api::call_within(&api, &vmm::control::Command::Trace, Some(TIMEOUT));
                let mut all = vms.lock().unwrap_or_else(|e| e.into_inner());
                let Some(w) = all.get_mut(&vm) else { continue };
                if let Ok(vmm::control::Reply { trace: Some(t), .. }) = reply {
                    let jobs = w.jobs.figures(&t);
                    let marked = jobs.as_ref().is_some_and(|f| f.total_jobs > 0);
                    let mut f = jobs.unwrap_or_else(|| JobFigures {
                        at_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                        ..JobFigures::default()
                    });
                    w.frames.add(&t, &mut f);
                    let framed = f.frames_in + f.frames_out > 0 || w.figures.as_ref().is_some_and(|o| o.frames_in + o.frames_out > 0);
                    if marked || framed {
                        w.figures = Some(f);
                    }
                }
            }
        });
        m
    }

    /// Watches exactly these VMs (name → API socket) from now on.
    pub fn watch(&self, wanted: BTreeMap<String, PathBuf>) {
        let mut all = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|vm, w| wanted.get(vm) == Some(&w.api));
        for (vm, api) in wanted {
            all.entry(vm).or_insert_with(|| Watched { api, jobs: Jobs::default(), frames: Frames::default(), figures: None });
        }
    }

    /// The last figures of `vm`.
    pub fn figures(&self, vm: &str) -> Option<JobFigures> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner()).get(vm).and_then(|w| w.figures.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::control::{Mark, Trace};

    #[test]
    fn marks_become_execution_times_across_reads() {
        let mut j = Jobs::default();
        let m = |kind, id, tsc| Mark { kind, id, tsc };
        // 1 GHz: 1000 ticks per µs. Job 1 takes 50 µs, job 2 starts here and ends next read.
        let t = Trace {
            tsc_khz: 1_000_000,
            lost: 0,
            marks: vec![m(vmm_abi::MARK_START, 1, 1000), m(vmm_abi::MARK_END, 1, 51_000), m(vmm_abi::MARK_START, 2, 60_000)],
            ..Trace::default()
        };
        let f = j.figures(&t).unwrap();
        assert_eq!((f.jobs, f.exec_max_us), (1, 50.0));
        let t = Trace {
            tsc_khz: 1_000_000,
            lost: 3,
            marks: vec![m(vmm_abi::MARK_END, 2, 260_000), m(vmm_abi::MARK_END, 9, 1)],
            ..Trace::default()
        };
        let f = j.figures(&t).unwrap();
        assert_eq!((f.jobs, f.exec_max_us, f.total_jobs, f.lost), (1, 200.0, 2, 3), "an end without a start is skipped");
        assert_eq!((f.recent_jobs, f.recent_p50_us), (2, 200.0));
        // No frequency: nothing to say.
        assert!(j.figures(&Trace::default()).is_none());
    }

    #[test]
    fn starts_become_an_observed_arrival_curve() {
        let mut j = Jobs::default();
        // 1 MHz: 1000 ticks per ms. Starts every 5 ms, then three within 1 ms.
        let mut marks: Vec<Mark> = (0..10).map(|i| Mark { kind: vmm_abi::MARK_START, id: i, tsc: i as u64 * 5000 }).collect();
        marks.extend([45_200, 45_400].iter().enumerate().map(|(k, &tsc)| Mark { kind: vmm_abi::MARK_START, id: 100 + k as u32, tsc }));
        let f = j.figures(&Trace { tsc_khz: 1000, lost: 0, marks, ..Trace::default() }).unwrap();
        let at = |w: f64| f.arrivals.iter().find(|a| a.0 == w).map(|a| a.1);
        assert_eq!(at(1.0), Some(3), "45000, 45200, 45400 within 1 ms");
        assert_eq!(at(5.0), Some(3));
        assert_eq!(at(10.0), Some(4));
        assert_eq!(at(1000.0), Some(12));
    }

    #[test]
    fn frame_stamps_become_arrivals_and_device_latency() {
        use vmm::control::FrameBatch;
        let b = |output, ms: f64, frames| FrameBatch { output, at_ns: (ms * 1e6) as u64, frames };
        let mut fr = Frames::default();
        // A request every 5 ms answered 200 µs later; then a burst of 3 batches (6 frames)
        // within 1 ms answered once, 1 ms after the first of them.
        let mut frames: Vec<FrameBatch> = (0..10).flat_map(|i| [b(false, i as f64 * 5.0, 1), b(true, i as f64 * 5.0 + 0.2, 1)]).collect();
        frames.extend([b(false, 60.0, 2), b(false, 60.4, 2), b(false, 60.8, 2), b(true, 61.0, 3)]);
        let t = Trace { frames, frames_lost: 2, ..Trace::default() };
        let mut f = JobFigures::default();
        fr.add(&t, &mut f);
        assert_eq!((f.frames_in, f.frames_out, f.frames_lost), (16, 13, 2));
        let at = |w: f64| f.frame_arrivals.iter().find(|a| a.0 == w).map(|a| a.1);
        assert_eq!(at(1.0), Some(6), "three batches of 2 within 1 ms");
        assert_eq!(at(1000.0), Some(16));
        assert_eq!(f.device_samples, 11);
        assert!((f.device_p50_us - 200.0).abs() < 1.0, "{f:?}");
        assert!((f.device_max_us - 1000.0).abs() < 1.0, "from the burst's first frame: {f:?}");
        // An input not answered yet in one read is answered in the next.
        let mut f = JobFigures::default();
        fr.add(&Trace { frames: vec![b(false, 100.0, 1)], ..Trace::default() }, &mut f);
        assert_eq!(f.device_samples, 0);
        let mut f = JobFigures::default();
        fr.add(&Trace { frames: vec![b(true, 100.5, 1)], ..Trace::default() }, &mut f);
        assert_eq!((f.device_samples, f.device_max_us.round()), (1, 500.0));
    }

    #[test]
    fn a_flood_of_unfinished_jobs_stays_bounded() {
        let mut j = Jobs::default();
        let marks = (0..10_000).map(|i| Mark { kind: vmm_abi::MARK_START, id: i, tsc: i as u64 }).collect();
        j.figures(&Trace { tsc_khz: 1000, lost: 0, marks, ..Trace::default() });
        assert_eq!(j.open.len(), MAX_OPEN);
    }
}
