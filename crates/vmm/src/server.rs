//! A hard reservation enforced by the VMM itself: a periodic server for the vCPU thread.
//!
//! Linux's SCHED_DEADLINE is the reservation of choice, but on nested PVM hosts a vCPU thread
//! under it makes no progress (docs/realtime.md). There the vCPU thread runs under SCHED_FIFO
//! above every other real-time task of its CPU, and this server bounds it: at most `budget` of
//! the thread's CPU time in each `period` (periods back to back from the first entry; the
//! budget is replenished at each period's start and does not carry over). When the budget is
//! spent the vCPU thread stops entering the guest until the next period; a host timer signals
//! the thread at the moment the budget would run out, which brings it out of KVM_RUN. The
//! time the thread spends on the VMM's own work (exits, devices) is charged to the budget, as
//! a CBS charges it; an overrun (the timer's and the exit's latency) is taken from the next
//! period, so over any number of whole periods the thread never gets more than its share.
//! Periods are aligned on the guest clock (multiples of the period), which a guest can use to
//! make the reservation synchronous with its releases.
//! Given the CPU whenever it has budget, the VM receives the supply of the periodic resource
//! model (Shin and Lee): at least `budget` in every period, with a longest gap of
//! 2·(period − budget) — the worst-case supply model of `vigil analyze`.

use crate::upcall::{host_now_ns, ThreadTimer};
use crate::Result;

/// What the server measured.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServerStats {
    pub budget_us: u64,
    pub period_us: u64,
    /// Periods begun.
    pub periods: u64,
    /// Times the budget ran out and the vCPU waited for the next period.
    pub throttles: u64,
    /// Time spent waiting for replenishment (ms).
    pub throttled_ms: u64,
    /// CPU time the vCPU thread used under the server (ms).
    pub used_ms: u64,
    /// Largest overrun of a period's budget (µs): the enforcement's latency.
    pub max_overrun_us: u64,
}

/// The server's state, on the vCPU thread.
pub struct PeriodicServer {
    budget_ns: u64,
    period_ns: u64,
    /// End of the current period (host monotonic ns); 0 before the first entry.
    period_end: u64,
    /// The thread's CPU time at the current period's start.
    cpu_at_start: u64,
    /// Budget of the current period (less the previous period's overrun).
    this_budget: u64,
    timer: Option<ThreadTimer>,
    stats: ServerStats,
    throttled_ns: u64,
    cpu_total_start: Option<u64>,
    /// The thread's CPU time at the last entry.
    last_cpu: u64,
}

/// The calling thread's CPU time (ns).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes into a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl PeriodicServer {
    /// A server of `budget_ns` every `period_ns` (`0 < budget ≤ period`, checked by the caller).
    pub fn new(budget_ns: u64, period_ns: u64) -> PeriodicServer {
        PeriodicServer {
            budget_ns,
            period_ns,
            period_end: 0,
            cpu_at_start: 0,
            this_budget: budget_ns,
            timer: None,
            stats: ServerStats { budget_us: budget_ns / 1000, period_us: period_ns / 1000, ..Default::default() },
            throttled_ns: 0,
            cpu_total_start: None,
            last_cpu: 0,
        }
    }

    /// Called by the vCPU thread before each entry into the guest, at guest clock `guest_now`:
    /// `None` when the guest may run now (the timer is armed for the budget's end), or how
    /// long (ns) it must wait for the next period (the budget is spent). Periods are the
    /// guest clock's multiples of the period, so a guest that releases its jobs at such
    /// multiples gets a release-synchronous reservation. The thread's timer is created on
    /// first use.
    pub(crate) fn before_entry(&mut self, guest_now: u64) -> Result<Option<u64>> {
        if self.timer.is_none() {
            self.timer = Some(ThreadTimer::for_this_thread()?);
        }
        let now = host_now_ns();
        let cpu = thread_cpu_ns();
        self.cpu_total_start.get_or_insert(cpu);
        self.last_cpu = cpu;
        if guest_now >= self.period_end {
            let first = self.period_end == 0 && self.stats.periods == 0;
            let overrun = if first { 0 } else { (cpu - self.cpu_at_start).saturating_sub(self.this_budget) };
            self.stats.max_overrun_us = self.stats.max_overrun_us.max(overrun / 1000);
            let next_end = (guest_now / self.period_ns + 1) * self.period_ns;
            let missed = !first && next_end > self.period_end + self.period_ns;
            self.period_end = next_end;
            self.cpu_at_start = cpu;
            // An overrun is paid back in the next period (never more than a whole budget).
            self.this_budget = self.budget_ns.saturating_sub(if missed { 0 } else { overrun });
            self.stats.periods += 1;
        }
        let used = cpu - self.cpu_at_start;
        if used >= self.this_budget {
            return Ok(Some(self.period_end - guest_now));
        }
        if let Some(t) = self.timer.as_mut() {
            // Wall time passes at least as fast as CPU time: the timer fires at or before the
            // budget's end; if the guest did not use it all by then, it is armed again.
            t.fire_by(now + (self.this_budget - used), now);
        }
        Ok(None)
    }

    /// The vCPU waited `ns` for replenishment.
    pub(crate) fn throttled(&mut self, ns: u64) {
        self.stats.throttles += 1;
        self.throttled_ns += ns;
    }

    /// What it measured, as of the last entry into the guest.
    pub fn stats(&self) -> ServerStats {
        let mut s = self.stats.clone();
        s.throttled_ms = self.throttled_ns / 1_000_000;
        if let Some(start) = self.cpu_total_start {
            s.used_ms = (self.last_cpu - start) / 1_000_000;
        }
        s
    }
}
