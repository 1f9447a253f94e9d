//! `vigil bench service`: the service macro-benchmark of real-time VMs (DESIGN §6). A
//! request/response service whose handler is CPU-bound — kv-core's `ROTATE 2000 20`, a
//! 2000×2000 image rotated by 20°, the same code in the `kv` guest and in `kv-native` — is
//! called by 10 clients × 10 requests, `--repetitions` times, in four columns on one CPU: the
//! service as a host process; in a VM on an unloaded host; loaded by the real-time host tasks of
//! `vigil bench rt` (τ3, τ4 under SCHED_FIFO on the same CPU), no reservation; loaded, the VM
//! under a (3 ms, 5 ms) reservation. Without a reservation the service runs at SCHED_FIFO 1,
//! below the host's tasks (so that the rest of the machine does not disturb the unloaded
//! columns); the clients run on another CPU. Every reply is checked against the known sum.
//! Prints min/avg/max/std (and p50/p99) of the response time per column and ratios.

use crate::rt::{fifo, host_tasks, mono_ns, pin, LOAD};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENTS: usize = 10;
const REQUESTS: usize = 10;
const REQUEST: &[u8] = b"ROTATE 2000 20\r\n";

/// One repetition: every client connects, sends its requests one after another, and returns
/// each response time (ms); a wrong or missing reply is an error.
fn repetition(addr: &str, expected: &str, client_cpu: usize) -> Result<Vec<f64>> {
    let handles: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (addr, expected) = (addr.to_string(), expected.to_string());
            std::thread::spawn(move || -> Result<Vec<f64>> {
                let _ = pin(client_cpu);
                let s = TcpStream::connect(&addr).with_context(|| format!("connect to {addr}"))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(120)))?;
                let mut w = s.try_clone()?;
                let mut r = BufReader::new(s);
                let mut times = Vec::with_capacity(REQUESTS);
                let mut line = String::new();
                for _ in 0..REQUESTS {
                    let t = Instant::now();
                    w.write_all(REQUEST)?;
                    line.clear();
                    r.read_line(&mut line)?;
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                    if line.trim_end() != expected {
                        bail!("ROTATE answered {line:?}, expected {expected:?}");
                    }
                }
                Ok(times)
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().map_err(|_| anyhow::anyhow!("client panicked"))??);
    }
    Ok(all)
}

fn wait_serving(addr: &str) -> Result<()> {
    let t = Instant::now();
    loop {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut line = String::new();
            if s.write_all(b"PING\r\n").is_ok() && BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("+PONG") {
                return Ok(());
            }
        }
        if t.elapsed() > Duration::from_secs(20) {
            bail!("{addr} does not answer PING");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `kv-native`, built into the guests' target directory.
fn kv_native(workspace: &Path) -> Result<std::path::PathBuf> {
    let target = workspace.join("target/guests");
    let out = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace)
        .args(["build", "--release", "--quiet", "-p", "kv-core", "--bin", "kv-native", "--target-dir"])
        .arg(&target)
        .output()
        .context("cannot run cargo to build kv-native")?;
    if !out.status.success() {
        bail!("building kv-native: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(target.join("release/kv-native"))
}

#[derive(serde::Serialize)]
struct Row {
    column: String,
    requests: usize,
    min: f64,
    avg: f64,
    max: f64,
    std: f64,
    p50: f64,
    p99: f64,
}

fn row(column: &str, mut v: Vec<f64>) -> Row {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len().max(1) as f64;
    let avg = v.iter().sum::<f64>() / n;
    let q = |p: f64| v.get(((v.len().saturating_sub(1)) as f64 * p) as usize).copied().unwrap_or(f64::NAN);
    Row {
        column: column.into(),
        requests: v.len(),
        min: v.first().copied().unwrap_or(f64::NAN),
        avg,
        max: v.last().copied().unwrap_or(f64::NAN),
        std: (v.iter().map(|x| (x - avg).powi(2)).sum::<f64>() / n).sqrt(),
        p50: q(0.5),
        p99: q(0.99),
    }
}

/// How the guest's vCPU is scheduled.
#[derive(Clone, Copy)]
enum Vcpu {
    Fifo(i32),
    Reserved { q_us: u64, p_us: u64 },
}

/// Runs the benchmark.
pub fn run(repetitions: usize, json: bool) -> Result<()> {
    if !vmm::kvm_available() {
        bail!("vigil bench service needs /dev/kvm");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (cpu, client_cpu) = (cpus - 1, 0);
    let workspace = testbed::workspace();
    let kv = testbed::guest("kv").map_err(anyhow::Error::msg)?;
    let native = kv_native(&workspace)?;
    let expected = {
        let mut s = kv_core::Store::new();
        format!(":{}", s.rotate(2000, 20))
    };
    let reps = repetitions.max(1);
    let _isolated = crate::rt::IsolatedCpu::new(cpu);
    eprintln!("vigil bench service: {CLIENTS} clients × {REQUESTS} × ROTATE 2000 20, {reps} repetitions per column, service on CPU {cpu}");
    let mut rows = Vec::new();

    // 1. The host process, pinned, SCHED_FIFO 1.
    {
        let addr = "127.0.0.1:6391";
        let mut cmd = std::process::Command::new(&native);
        cmd.arg(addr).stdout(std::process::Stdio::null());
        // SAFETY: between fork and exec the child only makes two syscalls.
        unsafe { cmd.pre_exec(move || pin(cpu).and_then(|()| fifo(1)).map_err(|e| std::io::Error::other(e.to_string()))) };
        let mut child = cmd.spawn().context("start kv-native")?;
        let r = wait_serving(addr).and_then(|()| (0..reps).map(|_| repetition(addr, &expected, client_cpu)).collect::<Result<Vec<_>>>());
        let _ = child.kill();
        let _ = child.wait();
        rows.push(row("host process", r?.concat()));
    }

    // 2–4. The kv guest in a network namespace, clients from the same namespace.
    let ns = crate::vmm::Netns::new()?;
    let addr = format!("{}:6379", crate::vmm::NS_IP_GUEST);
    let guest = |vcpu: Vcpu, loaded: bool| -> Result<Vec<f64>> {
        let mut config = vmm::VmConfig::new(&kv, 64);
        config.tap = Some("vbtap0".into());
        config.net.ip = crate::vmm::NS_IP_GUEST.parse()?;
        config.net.prefix_len = 24;
        let (ctl, inbox) = vmm::channel_pair()?;
        let mut vm = vmm::Vm::create(config, Box::new(std::io::sink()))?;
        let runner = std::thread::spawn(move || -> Result<vmm::Stop> {
            pin(cpu)?;
            match vcpu {
                Vcpu::Fifo(p) => fifo(p)?,
                Vcpu::Reserved { q_us, p_us } => {
                    let sched = agent::vm::Scheduling {
                        reservation: Some(agent::realtime::Reservation { runtime_us: q_us, period_us: p_us }),
                        ..Default::default()
                    };
                    sched.apply_to_vcpu(&mut vm).map_err(anyhow::Error::msg)?;
                }
            }
            Ok(vm.run(Some(&inbox))?)
        });
        let _throttle = crate::rt::RtThrottleOff::new();
        let stop = Arc::new(AtomicBool::new(false));
        let load = if loaded { host_tasks(&LOAD, cpu, 30, None, mono_ns(), stop.clone()) } else { Vec::new() };
        let r = wait_serving(&addr).and_then(|()| (0..reps).map(|_| repetition(&addr, &expected, client_cpu)).collect::<Result<Vec<_>>>());
        stop.store(true, Ordering::Relaxed);
        for t in load {
            let _ = t.join();
        }
        ctl.call(vmm::Command::Quit);
        match runner.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.context("the kv VM")),
            Err(_) => bail!("the vCPU thread panicked"),
        }
        Ok(r?.concat())
    };
    rows.push(row("guest, unloaded", guest(Vcpu::Fifo(1), false)?));
    rows.push(row("guest, loaded", guest(Vcpu::Fifo(1), true)?));
    rows.push(row("guest, loaded, (3 ms, 5 ms) reservation", guest(Vcpu::Reserved { q_us: 3000, p_us: 5000 }, true)?));
    drop(ns);

    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "cpu": cpu, "repetitions": reps, "rows": rows }))?);
        return Ok(());
    }
    println!("{CLIENTS} clients × {REQUESTS} requests × {reps} repetitions of ROTATE 2000 20 (a 2000×2000 image rotated by 20°); service on CPU {cpu}, load τ3 (50 ms, 120 ms), τ4 (20 ms, 80 ms) SCHED_FIFO");
    println!();
    println!("| column | requests | min ms | avg ms | max ms | std ms | p50 ms | p99 ms | avg / host | avg / guest unloaded |");
    println!("| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: |");
    let (host, unloaded) = (rows[0].avg, rows[1].avg);
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
            r.column,
            r.requests,
            r.min,
            r.avg,
            r.max,
            r.std,
            r.p50,
            r.p99,
            r.avg / host,
            r.avg / unloaded
        );
    }
    Ok(())
}
