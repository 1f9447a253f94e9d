//! Job marks for the VMM's monitoring, without an exit: [`mark`] writes a record into the
//! trace ring at [`vmm_abi::TRACE_ADDR`] (ordinary guest memory the VMM reads when asked).
//! A job's marks share its `id`: [`release`] when its input arrived, [`start`] when it runs,
//! [`end`] when it is done; the VMM turns them into execution and response times.
//!
//! The TSC also gives the guest a cheap clock for busy work of a calibrated length
//! ([`spin_us`]): [`tsc_per_us`] measures it once against the paravirtual clock.

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

/// TSC ticks per microsecond, measured once against the paravirtual clock (two exits, 1 ms).
pub fn tsc_per_us() -> u64 {
    let known = TSC_PER_US.load(Ordering::Relaxed);
    if known != 0 {
        return known;
    }
    let (t0, c0) = (crate::now_ns(), tsc());
    while crate::now_ns() < t0 + 1_000_000 {}
    let (t1, c1) = (crate::now_ns(), tsc());
    let per_us = ((c1 - c0) * 1000 / (t1 - t0).max(1)).max(1);
    TSC_PER_US.store(per_us, Ordering::Relaxed);
    per_us
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
