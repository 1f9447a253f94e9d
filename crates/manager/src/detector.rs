//! Host failure detection from lease heartbeats, as a pure state machine (time passed in).
//!
//! Each agent rewrites its host's heartbeat counter every period. The detector remembers, by
//! the manager's own monotonic clock, when it last saw each counter change; a host whose
//! counter has not changed for the lease is declared failed — once. The agent stops acting
//! when it could not renew for half the lease (counted from the start of its last successful
//! write, which is before the detector saw it), so the host has stopped before the detector
//! declares it failed.
//!
//! A host never heard from is given `grace` from the detector's start (agents starting up).

use std::collections::BTreeMap;

/// What the detector thinks of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Not heard from yet (within the start-up grace).
    Unknown,
    Alive,
    /// Declared failed: its lease expired.
    Failed,
}

#[derive(Debug, Clone)]
struct View {
    last: Option<u64>,
    changed_at: u64,
    state: Liveness,
}

impl View {
    /// How long this host may stay silent: `None` once it failed.
    fn limit(&self, lease_ns: u64, grace_ns: u64) -> Option<u64> {
        match self.state {
            Liveness::Failed => None,
            Liveness::Alive => Some(lease_ns),
            // Seen once: the lease runs from when it was seen. Never seen: the grace.
            Liveness::Unknown if self.last.is_some() => Some(lease_ns),
            Liveness::Unknown => Some(grace_ns.max(lease_ns)),
        }
    }
}

/// The detector: hosts, their last heartbeat and when it changed (ns on the caller's clock).
#[derive(Debug, Clone)]
pub struct Detector {
    lease_ns: u64,
    grace_ns: u64,
    hosts: BTreeMap<String, View>,
}

impl Detector {
    /// Watches `hosts` from `now`; a host's lease is `lease_ns`, the start-up grace `grace_ns`.
    pub fn new(hosts: impl IntoIterator<Item = String>, lease_ns: u64, grace_ns: u64, now: u64) -> Detector {
        let hosts = hosts.into_iter().map(|h| (h, View { last: None, changed_at: now, state: Liveness::Unknown })).collect();
        Detector { lease_ns, grace_ns, hosts }
    }

    /// A host the caller already knows has failed (a plan executed before a manager restart).
    pub fn mark_failed(&mut self, host: &str) {
        if let Some(v) = self.hosts.get_mut(host) {
            v.state = Liveness::Failed;
        }
    }

    /// The heartbeat counter read for `host` at `now` (`None`: no heartbeat node).
    pub fn observe(&mut self, host: &str, value: Option<u64>, now: u64) {
        let Some(v) = self.hosts.get_mut(host) else { return };
        if value.is_some() && value != v.last {
            let first = v.last.is_none();
            v.last = value;
            // The first value seen proves nothing about when it was written: count the lease
            // from now, as for a change.
            v.changed_at = now;
            if v.state == Liveness::Unknown && !first {
                v.state = Liveness::Alive;
            } else if v.state == Liveness::Unknown {
                // Seen once; alive once it changes again, or failed if it never does.
            }
        }
    }

    /// Hosts whose lease expired since the last call (each reported once).
    pub fn expired(&mut self, now: u64) -> Vec<String> {
        let mut out = Vec::new();
        let (lease_ns, grace_ns) = (self.lease_ns, self.grace_ns);
        for (h, v) in self.hosts.iter_mut() {
            let Some(limit) = v.limit(lease_ns, grace_ns) else { continue };
            if now.saturating_sub(v.changed_at) > limit {
                v.state = Liveness::Failed;
                out.push(h.clone());
            }
        }
        out
    }

    /// When the next lease would expire if nothing changes (the earliest over the hosts not
    /// failed yet): the caller reads the heartbeats once more right then, instead of finding
    /// the expiry up to a polling period late.
    pub fn next_expiry(&self) -> Option<u64> {
        self.hosts
            .values()
            .filter_map(|v| {
                let limit = v.limit(self.lease_ns, self.grace_ns)?;
                Some(v.changed_at.saturating_add(limit).saturating_add(1))
            })
            .min()
    }

    /// The caller could not read the heartbeats for a while (its own store was slow or
    /// unreachable): what it missed is unknown, so every lease restarts from `now` — a stall
    /// of the store is never taken for the failure of every host.
    pub fn restart_leases(&mut self, now: u64) {
        for v in self.hosts.values_mut() {
            if v.state != Liveness::Failed {
                v.changed_at = v.changed_at.max(now);
            }
        }
    }

    pub fn state(&self, host: &str) -> Option<Liveness> {
        self.hosts.get(host).map(|v| v.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_host_fails_once_after_a_lease_of_silence_and_never_before() {
        let mut d = Detector::new(["a".to_string(), "b".to_string()], 100 * MS, 1000 * MS, 0);
        for t in (0..=500).step_by(10) {
            d.observe("a", Some(t / 10), t * MS);
            d.observe("b", Some(t / 10), t * MS);
            assert!(d.expired(t * MS).is_empty(), "at {t} ms");
        }
        assert_eq!(d.state("a"), Some(Liveness::Alive));
        // b stops at 500 ms; a goes on.
        for t in (510..=700).step_by(10) {
            d.observe("a", Some(t / 10), t * MS);
            d.observe("b", Some(50), t * MS);
            let e = d.expired(t * MS);
            if t <= 600 {
                assert!(e.is_empty(), "b silent for {} ms only", t - 500);
            } else if t == 610 {
                assert_eq!(e, vec!["b".to_string()]);
            } else {
                assert!(e.is_empty(), "reported once");
            }
        }
        assert_eq!(d.state("b"), Some(Liveness::Failed));
        assert_eq!(d.state("a"), Some(Liveness::Alive));
    }

    #[test]
    fn a_host_never_heard_from_fails_after_the_grace_and_a_stale_counter_proves_nothing() {
        let mut d = Detector::new(["a".to_string(), "b".to_string()], 100 * MS, 1000 * MS, 0);
        // a's counter is there from a previous run (first read at 400 ms) but never changes.
        for t in (400..=500).step_by(50) {
            d.observe("a", Some(7), t * MS);
            assert!(d.expired(t * MS).is_empty(), "within the lease at {t} ms");
        }
        // a: its first value restarted its clock, nothing more: it fails a lease later.
        let mut d2 = d.clone();
        assert_eq!(d2.expired(1000 * MS), vec!["a".to_string()]);
        for t in (0..=1000).step_by(50) {
            assert!(d.expired(t * MS).iter().all(|h| h == "a"), "b within its grace at {t} ms");
        }
        assert_eq!(d.expired(1001 * MS), vec!["b".to_string()], "b was never heard from");
    }

    #[test]
    fn a_stalled_observer_restarts_the_leases_instead_of_failing_everyone() {
        let mut d = Detector::new(["a".to_string()], 100 * MS, 100 * MS, 0);
        d.observe("a", Some(1), 0);
        d.observe("a", Some(2), 10 * MS);
        // The observer could not read for 500 ms; when it can again, a gets a new lease.
        d.restart_leases(510 * MS);
        d.observe("a", Some(2), 510 * MS);
        assert!(d.expired(600 * MS).is_empty());
        assert_eq!(d.expired(611 * MS), vec!["a".to_string()], "and fails if it stays silent for a lease after that");
    }

    #[test]
    fn the_next_expiry_is_when_the_earliest_silent_host_would_fail() {
        let mut d = Detector::new(["a".to_string(), "b".to_string()], 100 * MS, 300 * MS, 0);
        assert_eq!(d.next_expiry(), Some(300 * MS + 1), "never heard from: the grace");
        d.observe("a", Some(1), 10 * MS);
        d.observe("a", Some(2), 40 * MS);
        d.observe("b", Some(1), 20 * MS);
        d.observe("b", Some(2), 50 * MS);
        assert_eq!(d.next_expiry(), Some(140 * MS + 1), "a's lease, from when its counter last changed");
        assert!(d.expired(140 * MS).is_empty(), "not a moment before");
        assert_eq!(d.expired(d.next_expiry().unwrap()), vec!["a".to_string()]);
        assert_eq!(d.next_expiry(), Some(150 * MS + 1), "a failed: b's is next");
        assert_eq!(d.expired(150 * MS + 1), vec!["b".to_string()]);
        assert_eq!(d.next_expiry(), None, "nobody left to fail");
    }

    #[test]
    fn known_failures_are_not_reported_again() {
        let mut d = Detector::new(["a".to_string()], 100 * MS, 100 * MS, 0);
        d.mark_failed("a");
        assert!(d.expired(10_000 * MS).is_empty());
        d.observe("unknown-host", Some(1), 0);
    }
}
