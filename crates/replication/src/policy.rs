//! Checkpoint policies: when the primary takes its next checkpoint.
//!
//! A policy only proposes the earliest moment for the next checkpoint; the protocol never
//! starts one before the previous one is acknowledged, so when a checkpoint takes longer than
//! the interval, its duration sets the pace (DESIGN §4). Policies are chosen per VM by name
//! ([`parse`]) and can be swapped while the VM runs.

use crate::Error;
use std::fmt;

const MS: u64 = 1_000_000;

/// What a policy sees when it proposes the next checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// Now (ns, the primary's monotonic clock).
    pub now: u64,
    /// When the last checkpoint started (or protection began).
    pub last_start: u64,
    /// Since when network output has been waiting in the open epoch, if any.
    pub output_since: Option<u64>,
}

/// What a policy learns when a checkpoint is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Done {
    pub epoch: u64,
    /// From the start of the checkpoint (pause) to its acknowledgement.
    pub duration_ns: u64,
    /// Network frames the VM sent during the epoch this checkpoint closed.
    pub output_frames: u64,
}

/// A checkpoint policy.
pub trait Policy: Send + fmt::Debug {
    /// The name it was selected by (`fixed:25`, `floating`, `network`, `adaptive`).
    fn name(&self) -> String;
    /// The current mode, for statistics (`fixed`, `processing`, `network`, `idle`, ...).
    fn mode(&self) -> &'static str;
    /// The earliest time (ns) for the next checkpoint; at or before `view.now` means as soon
    /// as the previous one is acknowledged.
    fn next(&self, view: &View) -> u64;
    /// A checkpoint was acknowledged.
    fn done(&mut self, done: &Done);
}

/// `fixed:T`: a checkpoint every T ms.
#[derive(Debug, Clone)]
pub struct Fixed {
    pub interval_ns: u64,
}

impl Policy for Fixed {
    fn name(&self) -> String {
        format!("fixed:{}", fmt_ms(self.interval_ns))
    }
    fn mode(&self) -> &'static str {
        "fixed"
    }
    fn next(&self, v: &View) -> u64 {
        v.last_start.saturating_add(self.interval_ns)
    }
    fn done(&mut self, _: &Done) {}
}

/// `floating`: 25 ms while the previous checkpoint took under 25 ms, else 100 ms.
#[derive(Debug, Clone, Default)]
pub struct Floating {
    slow: bool,
}

impl Policy for Floating {
    fn name(&self) -> String {
        "floating".into()
    }
    fn mode(&self) -> &'static str {
        if self.slow {
            "100ms"
        } else {
            "25ms"
        }
    }
    fn next(&self, v: &View) -> u64 {
        v.last_start.saturating_add(if self.slow { 100 * MS } else { 25 * MS })
    }
    fn done(&mut self, d: &Done) {
        self.slow = d.duration_ns >= 25 * MS;
    }
}

/// `network`: processing mode checkpoints every 100 ms and after each checkpoint checks
/// whether the VM sent network output; if it did, network mode checkpoints as soon as the
/// previous one is acknowledged, for 30 checkpoints without checking, then processing again.
#[derive(Debug, Clone, Default)]
pub struct NetworkDriven {
    /// Checkpoints left in network mode (0: processing mode).
    left: u32,
}

/// Checkpoints the network-driven policy stays in network mode.
pub const NETWORK_MODE_CHECKPOINTS: u32 = 30;

impl Policy for NetworkDriven {
    fn name(&self) -> String {
        "network".into()
    }
    fn mode(&self) -> &'static str {
        if self.left > 0 {
            "network"
        } else {
            "processing"
        }
    }
    fn next(&self, v: &View) -> u64 {
        if self.left > 0 {
            v.now
        } else {
            v.last_start.saturating_add(100 * MS)
        }
    }
    fn done(&mut self, d: &Done) {
        if self.left > 0 {
            self.left -= 1;
        } else if d.output_frames > 0 {
            self.left = NETWORK_MODE_CHECKPOINTS;
        }
    }
}

/// `adaptive` (vigil's own): checkpoint as soon as output is waiting (and the previous
/// checkpoint is acknowledged), so output waits for one checkpoint at most; while nothing
/// waits, stretch the interval, doubling it after each quiet checkpoint from `base` up to the
/// recovery-point limit `max` (how far the backup may lag behind).
#[derive(Debug, Clone)]
pub struct Adaptive {
    pub base_ns: u64,
    pub max_ns: u64,
    stretch_ns: u64,
}

impl Adaptive {
    /// Stretches from `base_ns` up to `max_ns`.
    pub fn new(base_ns: u64, max_ns: u64) -> Self {
        let max_ns = max_ns.max(base_ns);
        Adaptive { base_ns, max_ns, stretch_ns: base_ns }
    }
}

impl Default for Adaptive {
    fn default() -> Self {
        Adaptive::new(25 * MS, 200 * MS)
    }
}

impl Policy for Adaptive {
    fn name(&self) -> String {
        if self.base_ns == 25 * MS && self.max_ns == 200 * MS {
            "adaptive".into()
        } else {
            format!("adaptive:{}:{}", fmt_ms(self.base_ns), fmt_ms(self.max_ns))
        }
    }
    fn mode(&self) -> &'static str {
        if self.stretch_ns > self.base_ns {
            "idle"
        } else {
            "active"
        }
    }
    fn next(&self, v: &View) -> u64 {
        let quiet = v.last_start.saturating_add(self.stretch_ns);
        match v.output_since {
            Some(_) => v.now.min(quiet),
            None => quiet,
        }
    }
    fn done(&mut self, d: &Done) {
        self.stretch_ns = if d.output_frames > 0 { self.base_ns } else { (self.stretch_ns.saturating_mul(2)).min(self.max_ns) };
    }
}

fn fmt_ms(ns: u64) -> String {
    if ns.is_multiple_of(MS) {
        format!("{}", ns / MS)
    } else {
        format!("{}", ns as f64 / MS as f64)
    }
}

/// The policy names [`PolicySpec`] parses, for help texts.
pub const NAMES: &str = "fixed:T (T in ms), floating, network, adaptive[:BASE:MAX] (ms)";

/// A checkpoint policy as it is named (`fixed:25`, `floating`, `network`, `adaptive`,
/// `adaptive:25:200`): parsed once where it enters (a flag, a model file, the policy switch),
/// then passed typed; [`PolicySpec::build`] makes a fresh policy of that kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicySpec {
    Fixed { interval_ns: u64 },
    Floating,
    Network,
    Adaptive { base_ns: u64, max_ns: u64 },
}

impl Default for PolicySpec {
    fn default() -> Self {
        PolicySpec::Adaptive { base_ns: 25 * MS, max_ns: 200 * MS }
    }
}

impl PolicySpec {
    /// A new policy of this kind, in its initial mode.
    pub fn build(&self) -> Box<dyn Policy> {
        match *self {
            PolicySpec::Fixed { interval_ns } => Box::new(Fixed { interval_ns }),
            PolicySpec::Floating => Box::new(Floating::default()),
            PolicySpec::Network => Box::new(NetworkDriven::default()),
            PolicySpec::Adaptive { base_ns, max_ns } => Box::new(Adaptive::new(base_ns, max_ns)),
        }
    }
}

impl fmt::Display for PolicySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.build().name())
    }
}

impl std::str::FromStr for PolicySpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<PolicySpec, Error> {
        let bad = |reason: String| Error::Policy { name: s.to_owned(), reason };
        let ms = |t: &str| -> Result<u64, Error> {
            let v: f64 = t.parse().map_err(|_| bad(format!("{t:?} is not a number of milliseconds")))?;
            if !(v.is_finite() && v > 0.0 && v <= 60_000.0) {
                return Err(bad(format!("{t} ms is outside (0, 60000]")));
            }
            Ok((v * MS as f64).round() as u64)
        };
        let mut parts = s.split(':');
        let head = parts.next().unwrap_or_default();
        let args: Vec<&str> = parts.collect();
        match (head, args.as_slice()) {
            ("fixed", [t]) => Ok(PolicySpec::Fixed { interval_ns: ms(t)? }),
            ("floating", []) => Ok(PolicySpec::Floating),
            ("network", []) => Ok(PolicySpec::Network),
            ("adaptive", []) => Ok(PolicySpec::default()),
            ("adaptive", [b, m]) => {
                let (base_ns, max_ns) = (ms(b)?, ms(m)?);
                if base_ns > max_ns {
                    return Err(bad("the base interval exceeds the limit".into()));
                }
                Ok(PolicySpec::Adaptive { base_ns, max_ns })
            }
            _ => Err(bad(format!("unknown checkpoint policy (expected {NAMES})"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(now: u64, last: u64, out: Option<u64>) -> View {
        View { now, last_start: last, output_since: out }
    }

    #[test]
    fn names_round_trip_and_bad_names_are_explained() {
        for n in ["fixed:25", "fixed:100", "floating", "network", "adaptive", "adaptive:10:500", "fixed:2.5"] {
            let spec: PolicySpec = n.parse().expect(n);
            assert_eq!(spec.build().name(), n);
            assert_eq!(spec.to_string(), n);
        }
        for bad in ["fixed", "fixed:0", "fixed:x", "fixed:-3", "slow", "adaptive:50:10", "network:3", ""] {
            let e = bad.parse::<PolicySpec>().unwrap_err().to_string();
            assert!(e.contains("policy"), "{bad}: {e}");
        }
    }

    #[test]
    fn fixed_and_floating_intervals() {
        let f = "fixed:25".parse::<PolicySpec>().expect("fixed").build();
        assert_eq!(f.next(&view(0, 1000, Some(0))), 1000 + 25 * MS);
        let mut fl = Floating::default();
        assert_eq!(fl.next(&view(0, 0, None)), 25 * MS);
        fl.done(&Done { duration_ns: 30 * MS, ..Done::default() });
        assert_eq!(fl.next(&view(0, 0, None)), 100 * MS);
        fl.done(&Done { duration_ns: 3 * MS, ..Done::default() });
        assert_eq!(fl.next(&view(0, 0, None)), 25 * MS);
    }

    #[test]
    fn network_mode_lasts_thirty_checkpoints() {
        let mut n = NetworkDriven::default();
        assert_eq!(n.next(&view(5, 0, Some(1))), 100 * MS, "processing mode ignores pending output");
        n.done(&Done { output_frames: 0, ..Done::default() });
        assert_eq!(n.mode(), "processing");
        n.done(&Done { output_frames: 3, ..Done::default() });
        for _ in 0..NETWORK_MODE_CHECKPOINTS {
            assert_eq!(n.mode(), "network");
            assert_eq!(n.next(&view(7, 0, None)), 7);
            n.done(&Done { output_frames: 0, ..Done::default() });
        }
        assert_eq!(n.mode(), "processing");
    }

    #[test]
    fn adaptive_goes_at_once_on_output_and_stretches_when_quiet() {
        let mut a = Adaptive::default();
        assert_eq!(a.next(&view(3 * MS, 0, Some(2 * MS))), 3 * MS);
        assert_eq!(a.next(&view(3 * MS, 0, None)), 25 * MS);
        for want in [50, 100, 200, 200] {
            a.done(&Done { output_frames: 0, ..Done::default() });
            assert_eq!(a.next(&view(0, 0, None)), want * MS);
        }
        assert_eq!(a.mode(), "idle");
        a.done(&Done { output_frames: 1, ..Done::default() });
        assert_eq!(a.next(&view(0, 0, None)), 25 * MS);
    }
}
