//! The paravirtual clock and the idle call.

use vmm_abi::{ClockRequest, IdleRequest, PORT_CLOCK, PORT_IDLE};

/// Guest monotonic time in nanoseconds (continuous across pause, snapshot and restore).
pub fn now_ns() -> u64 {
    let mut req = ClockRequest::default();
    crate::port::request(PORT_CLOCK, &mut req);
    req.now_ns
}

/// What [`idle`] returned.
#[derive(Clone, Copy, Debug)]
pub struct Wake {
    /// Guest time at wake-up.
    pub now_ns: u64,
    /// A frame is waiting ([`vmm_abi::EVENT_NET_RX`]).
    pub net_rx: bool,
}

/// Blocks until an event or until the clock reaches `deadline_ns` (`u64::MAX`: none).
pub fn idle(deadline_ns: u64) -> Wake {
    crate::console::flush();
    let mut req = IdleRequest { deadline_ns, ..Default::default() };
    crate::port::request(PORT_IDLE, &mut req);
    Wake { now_ns: req.now_ns, net_rx: req.events & vmm_abi::EVENT_NET_RX != 0 }
}

/// Sleeps for `ns` nanoseconds of guest time.
pub fn sleep_ns(ns: u64) {
    let deadline = now_ns().saturating_add(ns);
    while now_ns() < deadline {
        idle(deadline);
    }
}
