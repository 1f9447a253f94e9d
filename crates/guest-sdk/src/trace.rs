//! Job marks for the VMM's monitoring, without an exit: [`mark`] writes a record into the
//! trace ring at [`vmm_abi::TRACE_ADDR`] (ordinary guest memory the VMM reads when asked).
//! A job's marks share its `id`: [`release`] when its input arrived, [`start`] when it runs,
//! [`end`] when it is done; the VMM turns them into execution and response times.
//!
//! The TSC also gives the guest a cheap clock for busy work of a calibrated length
//! ([`spin_us`]): [`tsc_per_us`] measures it once against the paravirtual clock, robust to the
//! vCPU being preempted while it measures.

use core::sync::atomic::{AtomicU64, Ordering};
use vmm_abi::{TraceHeader, TraceRecord, MARK_END, MARK_RELEASE, MARK_START, TRACE_ADDR, TRACE_CAPACITY, TRACE_HEADER, TRACE_MAGIC};

/// The TSC now.
#[inline(always)]
pub fn tsc() -> u64 {
    // SAFETY: rdtsc reads a counter; it has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn header() -> *mut TraceHeader {
    TRACE_ADDR as *mut TraceHeader
}

/// Records one mark (single-threaded guests: no other writer).
pub fn mark(kind: u32, id: u32) {
    let h = header();
    // SAFETY: the trace ring is guest memory reserved by the ABI (mapped, writable, used by
    // nothing else); the guest is single-threaded, and the VMM reads it only while the vCPU
    // is stopped, so these plain writes never race.
    unsafe {
        if (*h).magic != TRACE_MAGIC {
            (*h).written = 0;
            (*h).magic = TRACE_MAGIC;
        }
        let n = (*h).written;
        let slot = (TRACE_ADDR + TRACE_HEADER) as *mut TraceRecord;
        slot.add((n % TRACE_CAPACITY) as usize).write_volatile(TraceRecord { tsc: tsc(), kind, id });
        core::ptr::write_volatile(&mut (*h).written, n + 1);
    }
}

pub fn release(id: u32) {
    mark(MARK_RELEASE, id)
}
pub fn start(id: u32) {
    mark(MARK_START, id)
}
pub fn end(id: u32) {
    mark(MARK_END, id)
}

static TSC_PER_US: AtomicU64 = AtomicU64::new(0);

/// How long the TSC is measured against the paravirtual clock (ns).
const CALIBRATION_NS: u64 = 10_000_000;

/// TSC ticks per microsecond, measured once against the paravirtual clock over
/// [`CALIBRATION_NS`] ([`calibrate`]).
pub fn tsc_per_us() -> u64 {
    let known = TSC_PER_US.load(Ordering::Relaxed);
    if known != 0 {
        return known;
    }
    let per_us = calibrate(crate::now_ns, tsc, CALIBRATION_NS);
    TSC_PER_US.store(per_us, Ordering::Relaxed);
    per_us
}

/// TSC ticks per microsecond from `clock` (ns) and `counter` over about `window` ns.
///
/// Each end of the window is a *pair*: a counter read between two clock reads, dated at their
/// middle, and the tightest of a few pairs is kept. A vCPU preempted between a clock read and
/// the counter read (a host busy starting other VMs: the reads are exits of tens of µs each)
/// would otherwise date the counter wrongly by as long as the preemption — a preemption of
/// 0.5 ms in a 1 ms window once made every calibrated job half as long as asked. Preemption
/// inside the window does not matter (both clocks run on).
fn calibrate(mut clock: impl FnMut() -> u64, mut counter: impl FnMut() -> u64, window: u64) -> u64 {
    let mut pair = |clock: &mut dyn FnMut() -> u64| {
        let mut best = (u64::MAX, 0, 0);
        for _ in 0..3 {
            let a = clock();
            let c = counter();
            let b = clock();
            let spread = b.saturating_sub(a);
            if spread < best.0 {
                best = (spread, a + spread / 2, c);
            }
        }
        (best.1, best.2)
    };
    let (t0, c0) = pair(&mut clock);
    while clock() < t0 + window {}
    let (t1, c1) = pair(&mut clock);
    (c1.saturating_sub(c0).saturating_mul(1000) / t1.saturating_sub(t0).max(1)).max(1)
}

/// Busy work for about `us` microseconds of TSC time (a calibrated execution time).
pub fn spin_us(us: u64) {
    if us == 0 {
        return;
    }
    let until = tsc() + us * tsc_per_us();
    while tsc() < until {
        core::hint::spin_loop();
    }
}
