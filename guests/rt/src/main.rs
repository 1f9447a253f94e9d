//! `rt`: periodic real-time tasks inside a VM (guest SDK's `rt` runtime, preemptive on timer
//! upcalls). Arguments:
//!
//! - `rm` or `edf`: the policy (default `rm`);
//! - `C/T` or `C/T/D`, one per task: execution time, period and deadline in ms (decimals
//!   allowed: `0.5/10`); the deadline defaults to the period;
//! - `ms=N`: release jobs for N ms (default 1000);
//! - `cal=N`: iterations of the work loop per µs (default: measured at start, the fastest of
//!   40 trials);
//! - `align=MS`: release the first jobs at a multiple of MS ms of the guest clock (where the
//!   periods of a reservation the VMM enforces begin: a release-synchronous reservation);
//! - `upcall N`: instead, measures N upcalls' latency (an upcall asked for 1–2 ms ahead while
//!   the guest computes) and prints their deadline→handler latencies.
//!
//! Prints `rt: cal N`, then every job as `job TASK N RELEASE_US START_US END_US EXEC_US`
//! (guest clock, µs from the first release; EXEC: the time it ran), in batches, then `rt: done JOBS jobs, D dropped,
//! U upcalls, max latency L ns, W wrong` (W: jobs whose work came out different from an
//! undisturbed run: a broken context switch) and exits 0.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use guest_sdk::println;
use guest_sdk::rt::{Policy, Task};

guest_sdk::entry!(main);

fn ms_to_us(s: &str) -> Option<u64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let mut us: u64 = int.parse::<u64>().ok()?.checked_mul(1000)?;
    let mut scale = 100;
    for c in frac.chars() {
        us += c.to_digit(10)? as u64 * scale;
        scale /= 10;
    }
    Some(us)
}

fn main() -> u32 {
    let mut policy = Policy::RateMonotonic;
    let mut tasks = Vec::new();
    let mut horizon_ms = 1000;
    let mut cal = 0;
    let mut align_ms = 0;
    let mut args = guest_sdk::args();
    while let Some(a) = args.next() {
        if a == "upcall" {
            return upcall_latency(args.next().and_then(|n| n.parse().ok()).unwrap_or(1000));
        } else if a == "rm" {
            policy = Policy::RateMonotonic;
        } else if a == "edf" {
            policy = Policy::Edf;
        } else if let Some(n) = a.strip_prefix("ms=") {
            horizon_ms = n.parse().unwrap_or(horizon_ms);
        } else if let Some(n) = a.strip_prefix("align=") {
            align_ms = n.parse().unwrap_or(0);
        } else if let Some(n) = a.strip_prefix("cal=") {
            cal = n.parse().unwrap_or(0);
        } else {
            let p: Vec<Option<u64>> = a.split('/').map(ms_to_us).collect();
            match p.as_slice() {
                [Some(c), Some(t)] if *c > 0 && c <= t => tasks.push(Task { exec_us: *c, period_us: *t, deadline_us: *t }),
                [Some(c), Some(t), Some(d)] if *c > 0 && c <= d => tasks.push(Task { exec_us: *c, period_us: *t, deadline_us: *d }),
                _ => {
                    println!("rt: bad argument {a:?} (expected rm, edf, C/T[/D] in ms, ms=N, cal=N, align=MS)");
                    return 2;
                }
            }
        }
    }
    if tasks.is_empty() {
        println!("rt: no tasks (give C/T in ms, e.g. 30/150 50/200)");
        return 2;
    }
    if cal == 0 {
        cal = guest_sdk::rt::calibrate(40);
    }
    println!("rt: cal {cal}");
    let out = guest_sdk::rt::run(policy, &tasks, horizon_ms, cal, align_ms * 1_000_000);
    let t0 = out.jobs.iter().map(|j| j.release_ns).min().unwrap_or(0);
    let mut batch = String::new();
    for j in &out.jobs {
        let _ = writeln!(
            batch,
            "job {} {} {} {} {} {}",
            j.task,
            j.job,
            (j.release_ns - t0) / 1000,
            (j.start_ns - t0) / 1000,
            (j.end_ns - t0) / 1000,
            j.exec_ns / 1000
        );
        if batch.len() > 16_000 {
            guest_sdk::console::write_raw(batch.as_bytes());
            batch.clear();
        }
    }
    guest_sdk::console::write_raw(batch.as_bytes());
    println!(
        "rt: done {} jobs, {} dropped, {} upcalls, max latency {} ns, {} wrong",
        out.jobs.len(),
        out.dropped,
        out.upcalls,
        out.max_upcall_latency_ns,
        out.wrong
    );
    0
}

static mut LATENCIES: Vec<u64> = Vec::new();
static mut HANDLER_TSC: u64 = 0;

fn on_upcall(frame: *mut guest_sdk::abi::UpcallFrame, _reason: usize) -> *mut guest_sdk::abi::UpcallFrame {
    // SAFETY: single vCPU, masked: the main loop only reads these after the upcall.
    unsafe { HANDLER_TSC = guest_sdk::trace::tsc() };
    frame
}

/// N upcalls, each asked for 1–2 ms ahead while the guest computes: the VMM's delivery latency
/// (deadline → redirection, guest clock) and the handler's entry (TSC) per upcall.
#[allow(static_mut_refs)]
fn upcall_latency(n: u32) -> u32 {
    let per_us = guest_sdk::trace::tsc_per_us();
    guest_sdk::upcall::register(on_upcall);
    let mut handler_ns = Vec::with_capacity(n as usize);
    // SAFETY: single vCPU; the handler does not touch LATENCIES.
    unsafe { LATENCIES.reserve(n as usize) };
    let mut seed = 12345u64;
    for _ in 0..n {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let ahead = 1_000_000 + (seed >> 33) % 1_000_000;
        let now = guest_sdk::now_ns();
        let deadline = now + ahead;
        let tsc_deadline = guest_sdk::trace::tsc() + ahead * per_us / 1000;
        let before = guest_sdk::upcall::state().delivered;
        // SAFETY: as above.
        unsafe { HANDLER_TSC = 0 };
        guest_sdk::upcall::arm(deadline);
        // Unmask by resuming ourselves: the dispatch returns the frame it was given.
        guest_sdk::upcall::switch_out(1);
        while guest_sdk::upcall::state().delivered == before {
            core::hint::black_box(guest_sdk::rt::work(100));
        }
        let b = guest_sdk::upcall::state();
        // SAFETY: as above.
        unsafe {
            LATENCIES.push(b.entered_ns.saturating_sub(b.fired_ns));
            handler_ns.push(HANDLER_TSC.saturating_sub(tsc_deadline) * 1000 / per_us);
        }
    }
    // SAFETY: as above.
    let lat = unsafe { &mut LATENCIES };
    lat.sort_unstable();
    handler_ns.sort_unstable();
    let q = |v: &Vec<u64>, p: usize| v[(v.len() - 1) * p / 100];
    println!(
        "rt: upcall latency n={} vmm p50={} p99={} max={} ns; handler (tsc) p50={} p99={} max={} ns",
        lat.len(),
        q(lat, 50),
        q(lat, 99),
        lat[lat.len() - 1],
        q(&handler_ns, 50),
        q(&handler_ns, 99),
        handler_ns[handler_ns.len() - 1]
    );
    0
}
