//! `vigil bench tracking`: what each way of finding a checkpoint's dirty pages costs on this
//! host, measured with a real KVM guest (the `compute` guest rewriting a working set).
//!
//! - the guest's cost of KVM dirty logging: the same passes over the working set with logging
//!   off, and with logging on and the log collected and cleared every epoch (as a protected
//!   VM's checkpoints do); every page in a collected log took exactly one write-protection
//!   fault, so (time on − time off − pauses) / pages collected is the cost of one fault;
//! - the host's cost of comparing guest memory against a copy (per GiB, all pages equal: the
//!   worst case, every byte read twice), and of copying it;
//! - what the VMM's own calibration ([`vmm::tracking::Calibration`]) says.

use anyhow::{Context, Result};
use std::time::{Duration, Instant};
use vmm::{channel_pair, Command, Vm, VmConfig};

use crate::vmm::Console;

/// CPU time (user, system) of the calling thread.
fn thread_cpu() -> (Duration, Duration) {
    // SAFETY: getrusage writes into the zeroed struct we pass; RUSAGE_THREAD is valid on Linux.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let d = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    (d(ru.ru_utime), d(ru.ru_stime))
}

/// One run of `compute WS_MIB PASSES`: wall time of the run, pages collected from the dirty
/// log (0 without logging), number of collections, their summed round-trip time, and the vCPU
/// thread's user and system CPU time.
struct Run {
    wall: Duration,
    pages: u64,
    collections: u64,
    collect_time: Duration,
    user: Duration,
    system: Duration,
}

fn run_compute(image: &std::path::Path, ws_mib: u64, passes: u64, epoch: Option<Duration>) -> Result<Run> {
    let (ctl, inbox) = channel_pair()?;
    let mut config = VmConfig::new(image, 64);
    config.args = vec![ws_mib.to_string(), passes.to_string(), passes.to_string()];
    config.dirty_log = epoch.is_some();
    let console = Console::default();
    let mut vm = Vm::create(config, Box::new(console.clone()))?;
    let t = Instant::now();
    let runner = std::thread::spawn(move || {
        let before = thread_cpu();
        let r = vm.run(Some(&inbox));
        let after = thread_cpu();
        (r, after.0 - before.0, after.1 - before.1)
    });
    let (mut pages, mut collections, mut collect_time) = (0u64, 0u64, Duration::ZERO);
    while !runner.is_finished() {
        match epoch {
            Some(e) => {
                std::thread::sleep(e);
                let c = Instant::now();
                let r = ctl.call(Command::DirtyLogGetAndClear);
                if let Some(p) = r.dirty_pages {
                    collect_time += c.elapsed();
                    pages += p.len() as u64;
                    collections += 1;
                }
            }
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    let wall = t.elapsed();
    let (r, user, system) = runner.join().map_err(|_| anyhow::anyhow!("the vCPU thread panicked"))?;
    r.context("compute guest")?;
    let text = console.text();
    anyhow::ensure!(text.contains("compute: done"), "compute did not finish: {text}");
    Ok(Run { wall, pages, collections, collect_time, user, system })
}

pub fn run(guests: &std::path::Path, json: bool) -> Result<()> {
    let _ = guests;
    let image = testbed::guest("compute").map_err(anyhow::Error::msg)?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let ws = 8u64;
    let mut rows = vec![];
    for (epoch_ms, passes) in [(25u64, 40u64), (100, 20_000)] {
        let epoch = Duration::from_millis(epoch_ms);
        // Passes sized so that each run takes about a second or two on this host.
        let off = run_compute(&image, ws, 20_000, None)?;
        let on = run_compute(&image, ws, passes, Some(epoch))?;
        let per_pass_off = off.wall.as_secs_f64() / 20_000.0;
        let extra = on.wall.as_secs_f64() - per_pass_off * passes as f64 - on.collect_time.as_secs_f64();
        let fault_us = extra / on.pages.max(1) as f64 * 1e6;
        let sys_us = (on.system.as_secs_f64() - off.system.as_secs_f64() * passes as f64 / 20_000.0) / on.pages.max(1) as f64 * 1e6;
        eprintln!(
            "epoch {epoch_ms} ms: off {:.3} s/20000 passes (user {:.2} s sys {:.2} s); on {:.3} s/{passes} passes, {} pages in {} collections ({:.1} ms), user {:.2} s sys {:.2} s; fault {fault_us:.1} µs (system time per fault {sys_us:.1} µs)",
            off.wall.as_secs_f64(),
            off.user.as_secs_f64(),
            off.system.as_secs_f64(),
            on.wall.as_secs_f64(),
            on.pages,
            on.collections,
            on.collect_time.as_secs_f64() * 1e3,
            on.user.as_secs_f64(),
            on.system.as_secs_f64()
        );
        rows.push(serde_json::json!({
            "epoch_ms": epoch_ms, "fault_us": fault_us, "system_us_per_fault": sys_us,
            "pass_us_unlogged": per_pass_off * 1e6, "pages": on.pages, "collections": on.collections,
        }));
    }
    // The VMM's own calibration (its probe runs under SCHED_IDLE: on a busy host it fails).
    let cals: Vec<Result<vmm::tracking::Calibration, String>> =
        (0..3).map(|_| vmm::tracking::Calibration::measure().map_err(|e| e.to_string())).collect();
    if json {
        let c: Vec<_> = cals
            .iter()
            .map(|c| match c {
                Ok(c) => serde_json::json!({"fault_ns": c.fault_ns, "compare_ns_per_page": c.compare_ns_per_page}),
                Err(e) => serde_json::json!({"error": e}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"load": load.trim(), "fault": rows, "calibration": c}))?);
        return Ok(());
    }
    println!("Dirty tracking on this host (load {})", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    for r in &rows {
        println!(
            "  logging, log collected every {} ms: {:.1} µs per first write to a page ({} pages, {} collections); unlogged pass over {ws} MiB {:.1} µs",
            r["epoch_ms"], r["fault_us"].as_f64().unwrap_or(f64::NAN), r["pages"], r["collections"], r["pass_us_unlogged"].as_f64().unwrap_or(f64::NAN)
        );
    }
    for c in &cals {
        match c {
            Ok(c) => println!("  VMM calibration (probe VM under SCHED_IDLE, timed by its CPU time): {c}"),
            Err(e) => println!("  VMM calibration: {e}"),
        }
    }
    Ok(())
}
