//! The guest's monotonic clock: host CLOCK_MONOTONIC while running, frozen while paused, and
//! carried in snapshots, so guest time is continuous across pause, snapshot and restore (and,
//! later, failover). Never the raw TSC.

use std::time::Instant;

/// Guest time in nanoseconds.
#[derive(Debug, Clone)]
pub struct Clock {
    /// Guest time at `anchor`, or the frozen time while paused.
    base_ns: u64,
    /// Host instant at which guest time was `base_ns`; `None` while paused.
    anchor: Option<Instant>,
}

impl Clock {
    /// A paused clock reading `ns`.
    pub fn new(ns: u64) -> Self {
        Clock { base_ns: ns, anchor: None }
    }

    /// Current guest time.
    pub fn now_ns(&self) -> u64 {
        match self.anchor {
            Some(a) => self.base_ns.saturating_add(a.elapsed().as_nanos() as u64),
            None => self.base_ns,
        }
    }

    /// Starts (or keeps) the clock running.
    pub fn resume(&mut self) {
        if self.anchor.is_none() {
            self.anchor = Some(Instant::now());
        }
    }

    /// Freezes the clock at the current guest time.
    pub fn pause(&mut self) {
        self.base_ns = self.now_ns();
        self.anchor = None;
    }

    /// Whether the clock runs.
    pub fn running(&self) -> bool {
        self.anchor.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_while_paused_and_continuous_on_resume() {
        let mut c = Clock::new(5_000);
        assert_eq!(c.now_ns(), 5_000);
        c.resume();
        assert!(c.now_ns() >= 5_000);
        c.pause();
        let t = c.now_ns();
        assert_eq!(c.now_ns(), t);
        c.resume();
        assert!(c.now_ns() >= t);
        assert!(c.running());
    }
}
