//! `vigil bench components`: what it costs to run the network backend as a supervised process
//! of its own, and what it buys.
//!
//! The guest is kv with a disk (it logs every batch of requests there before it replies), so
//! both devices work on every write.
//!
//! - **Tail latency without failures**: kv under `redis-benchmark` (SET and GET, and kv's
//!   ROTATE of a small image: a service that computes for ~0.2 ms a request), with both
//!   backends inside the VMM against both as processes, in alternating rounds; medians over
//!   the rounds of p50, p95, p99, p99.9, mean and throughput, with their ratios.
//! - **A failure mid-run**: the network or the block backend SIGKILLed (a crash) or
//!   SIGSTOPped (a hang) while `redis-benchmark` runs: requests failed, the tail, and the VMM's
//!   own record of detection and restart.
//! - **Recovery**: the service gap a client that asks without pause sees when a backend fails,
//!   against the coarse restart a crash of an in-VMM backend forces (the whole VMM, the guest
//!   booted again and its log replayed, its connections lost).
//! - **A real cluster** ([`crate::cluster::management_domain`]): everything that manages a host
//!   (agent, store, the VM's backends) SIGKILLed at once — the coarse baseline — with the
//!   backends in the VMM and as processes, against each component alone.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testbed::tapns::{TapNs, VmProc, GUEST_IP};

/// What to run.
pub struct Options {
    /// Directory of the release-built guests (`kv`).
    pub guests: PathBuf,
    /// Rounds of each setup (alternating).
    pub rounds: usize,
    /// Requests per redis-benchmark test.
    pub requests: usize,
    /// Backend kills (and hangs) timed for recovery.
    pub kills: usize,
    /// Run kv without a disk (only the network backend works then; the block rows are
    /// skipped).
    pub no_disk: bool,
    /// Also measure in a real cluster ([`crate::cluster::management_domain`]): a host's
    /// whole management (agent, store, backends) restarted at once, against one component.
    pub cluster: bool,
    pub json: bool,
}

/// One redis-benchmark test's figures (ms, and requests per second).
#[derive(Debug, Clone, Default)]
struct Lat {
    completed: u64,
    rps: f64,
    avg: f64,
    p50: f64,
    p95: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// Parses redis-benchmark's (7.x) full output: per test, the completed count, the percentile
/// distribution (p99.9: the first line at or above 99.9 %) and the summary.
fn parse(out: &str) -> Vec<(String, Lat)> {
    let mut res: Vec<(String, Lat)> = Vec::new();
    let text = out.replace('\r', "\n");
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        let l = l.trim();
        if let Some(name) = l.strip_prefix("====== ").and_then(|x| x.strip_suffix(" ======")) {
            res.push((name.to_string(), Lat::default()));
            continue;
        }
        let Some((_, lat)) = res.last_mut() else { continue };
        if let Some(n) = l.split_whitespace().next().filter(|_| l.contains("requests completed in")) {
            lat.completed = n.parse().unwrap_or(0);
        } else if let Some((pct, rest)) = l.split_once("% <= ") {
            if let (Ok(p), Some(ms)) = (pct.parse::<f64>(), rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok())) {
                if p >= 99.9 && lat.p999 == 0.0 {
                    lat.p999 = ms;
                }
            }
        } else if let Some(r) = l.strip_prefix("throughput summary: ") {
            lat.rps = r.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        } else if l.starts_with("avg") && l.contains("p99") {
            if let Some(v) = lines.next() {
                let v: Vec<f64> = v.split_whitespace().filter_map(|x| x.parse().ok()).collect();
                if let [avg, _min, p50, p95, p99, max] = v[..] {
                    (lat.avg, lat.p50, lat.p95, lat.p99, lat.max) = (avg, p50, p95, p99, max);
                }
            }
        }
    }
    // The cumulative distribution repeats percentiles: only the first block counts, which
    // the `p999 == 0` check keeps.
    res
}

fn redis_benchmark(ns: &TapNs, requests: usize, tests: &str) -> std::process::Command {
    let mut c = ns.command("redis-benchmark");
    c.args(["-h", GUEST_IP, "-p", "6379", "-c", "4", "-n", &requests.to_string(), "-t", tests]);
    c
}

/// The CPU-plus-network service: kv's ROTATE of a 256×256 image by 20°, about 0.2 ms of CPU a
/// request (as a host process here), asked by redis-benchmark as a command of its own.
const SERVICE: [&str; 3] = ["ROTATE", "256", "20"];

fn run_benchmark(ns: &TapNs, requests: usize, tests: &str) -> Result<Vec<(String, Lat)>> {
    run_command(redis_benchmark(ns, requests, tests))
}

/// redis-benchmark sending `command` (its test is named by the command's words).
fn run_service(ns: &TapNs, requests: usize, command: &[&str]) -> Result<Vec<(String, Lat)>> {
    let mut c = ns.command("redis-benchmark");
    c.args(["-h", GUEST_IP, "-p", "6379", "-c", "4", "-n", &requests.to_string()]).args(command);
    run_command(c)
}

fn run_command(mut c: std::process::Command) -> Result<Vec<(String, Lat)>> {
    let out = c.output().context("redis-benchmark (package redis-tools)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("redis-benchmark failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(parse(&text))
}

/// One figure of a [`Lat`].
type Metric = fn(&Lat) -> f64;

/// The median (of an even count, the mean of the two middle values).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 0 => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        n => v[n / 2],
    }
}

/// A client that sends PING on one connection without pause from inside the namespace and
/// records when each reply came.
struct Prober {
    replies: Arc<Mutex<Vec<Instant>>>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn enter(ns: &str) -> Result<()> {
    let path = format!("/var/run/netns/{ns}");
    let f = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
    // SAFETY: setns on a namespace descriptor we opened; it moves only the calling thread.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Prober {
    fn start(ns: &str) -> Result<Prober> {
        let (replies, errors, stop) =
            (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (r, e, s, ns) = (replies.clone(), errors.clone(), stop.clone(), ns.to_string());
        let thread = std::thread::spawn(move || {
            let run = || -> Result<()> {
                enter(&ns)?;
                let mut c = std::net::TcpStream::connect((GUEST_IP, 6379))?;
                c.set_nodelay(true)?;
                c.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut buf = [0u8; 7];
                while !s.load(Ordering::Relaxed) {
                    c.write_all(b"PING\r\n")?;
                    c.read_exact(&mut buf)?;
                    if &buf != b"+PONG\r\n" {
                        bail!("answer {:?}", String::from_utf8_lossy(&buf));
                    }
                    r.lock().map_err(|_| anyhow::anyhow!("lock"))?.push(Instant::now());
                }
                Ok(())
            };
            if let Err(err) = run() {
                if let Ok(mut e) = e.lock() {
                    e.push(err.to_string());
                }
            }
        });
        let p = Prober { replies, errors, stop, thread: Some(thread) };
        let t = Instant::now();
        while p.replies.lock().map(|r| r.len()).unwrap_or(0) < 10 {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("the probe got no replies: {:?}", p.errors.lock().map(|e| e.clone()).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(p)
    }

    /// The longest gap between replies from the last one before `at` to the first one after
    /// `until` (waits up to 10 s for that one).
    fn gap(&self, at: Instant, until: Instant) -> Result<Duration> {
        let t = Instant::now();
        loop {
            {
                let r = self.replies.lock().map_err(|_| anyhow::anyhow!("lock"))?;
                if let Some(last) = r.iter().position(|x| *x > until) {
                    let first = r.iter().rposition(|x| *x <= at).unwrap_or(0);
                    let gap = r[first..=last].windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
                    return Ok(gap);
                }
            }
            if let Some(e) = self.errors.lock().ok().and_then(|e| e.first().cloned()) {
                bail!("the probe failed: {e}");
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!("no reply within 10 s of the fault");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn stop(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

/// The pid of backend `which` of `vm`, asked again for up to 2 s (a status call can fail while
/// the VMM is busy); the error quotes the last status.
fn pid_of(vm: &VmProc, which: &str) -> Result<u32> {
    let t = Instant::now();
    loop {
        let st = vm.status();
        if let Some(pid) = st[which]["pid"].as_u64().filter(|p| *p != 0) {
            return Ok(pid as u32);
        }
        if t.elapsed() > Duration::from_secs(2) {
            bail!("no {which} process in the VM's status: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: u32, sig: i32) -> Result<()> {
    if pid == 0 {
        bail!("no backend process");
    }
    // SAFETY: kill(2) of the backend pid the VMM reports (its child, not reaped, so not reused).
    if unsafe { libc::kill(pid as i32, sig) } != 0 {
        bail!("kill {pid}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until the VM reports `restarts` restarts of backend `which`; returns its last incident.
fn wait_restart(vm: &VmProc, which: &str, restarts: u64) -> Result<serde_json::Value> {
    let t = Instant::now();
    loop {
        let st = vm.status();
        if st[which]["restarts"].as_u64().unwrap_or(0) >= restarts {
            return Ok(st[which]["incidents"].as_array().and_then(|a| a.last().cloned()).unwrap_or_default());
        }
        if t.elapsed() > Duration::from_secs(10) {
            bail!("the backend was not restarted within 10 s: {st}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Table {
    rows: Vec<[String; 5]>,
}

impl Table {
    fn add(&mut self, what: &str, a: String, b: String, ratio: String, note: &str) {
        eprintln!("  {what}: {a} | {b} | {ratio}");
        self.rows.push([what.into(), a, b, ratio, note.into()]);
    }
    fn print(&self, json: bool) -> Result<()> {
        if json {
            let v: Vec<_> = self
                .rows
                .iter()
                .map(|r| serde_json::json!({"what": r[0], "in_vmm": r[1], "process": r[2], "ratio": r[3], "note": r[4]}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        let head = ["measure", "backend in VMM", "backend process", "ratio", "note"];
        let w: Vec<usize> =
            (0..4).map(|i| self.rows.iter().map(|r| r[i].chars().count()).chain([head[i].len()]).max().unwrap_or(0)).collect();
        println!(
            "{:w0$}  {:>w1$}  {:>w2$}  {:>w3$}  {}",
            head[0],
            head[1],
            head[2],
            head[3],
            head[4],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3]
        );
        for r in &self.rows {
            println!("{:w0$}  {:>w1$}  {:>w2$}  {:>w3$}  {}", r[0], r[1], r[2], r[3], r[4], w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3]);
        }
        Ok(())
    }
}

/// Starts kv on a fresh disk (none with `no_disk`), with both backends in the VMM (`vmm`),
/// in the VMM with guest memory a shared memfd as a backend process needs (`vmm-memfd`), as
/// processes (`process`: the network's receive ring as the VMM chooses it,
/// [`vmm::net_receive_ring`]), as processes with the other choice (`process-other`:
/// `VIGIL_NET_RX_RING` set to the opposite), or as processes with both backends synchronous as
/// before their rings (`process-sync`: the network both ways, and the block backend's writes,
/// `VIGIL_BLK_WRITE_RING=0`).
fn start(ns: &TapNs, exe: &std::path::Path, kv: &std::path::Path, mode: &str, dir: &std::path::Path, no_disk: bool) -> Result<VmProc> {
    std::fs::create_dir_all(dir)?;
    let disk = dir.join(format!("disk-{mode}"));
    let d = disk.display().to_string();
    let mut extra: Vec<&str> = Vec::new();
    if !no_disk {
        let f = std::fs::File::create(&disk)?;
        f.set_len(64 << 20)?;
        extra.extend(["--disk", &d]);
    }
    match mode {
        "vmm" => {}
        "vmm-memfd" => extra.push("--shared-memory"),
        "process-sync" | "process-other" => {
            extra.extend(["--net-backend", "process"]);
            if !no_disk {
                extra.extend(["--blk-backend", "process"]);
            }
            // Read by the VMM when it starts its backend; this thread is the only one
            // running while VMs start.
            let vars: &[(&str, &str)] = if mode == "process-sync" {
                &[("VIGIL_NET_TX_RING", "0"), ("VIGIL_NET_RX_RING", "0"), ("VIGIL_BLK_WRITE_RING", "0")]
            } else if vmm::net_receive_ring(!no_disk) {
                &[("VIGIL_NET_RX_RING", "0")]
            } else {
                &[("VIGIL_NET_RX_RING", "1")]
            };
            for (v, value) in vars {
                std::env::set_var(v, value);
            }
            let vm = ns.start_vm_with(exe, kv, &extra, &format!("vm-{mode}"), dir).map_err(anyhow::Error::msg);
            for (v, _) in vars {
                std::env::remove_var(v);
            }
            return vm;
        }
        _ => {
            extra.extend(["--net-backend", "process"]);
            if !no_disk {
                extra.extend(["--blk-backend", "process"]);
            }
        }
    }
    ns.start_vm_with(exe, kv, &extra, &format!("vm-{mode}"), dir).map_err(anyhow::Error::msg)
}

pub fn run(o: &Options) -> Result<()> {
    let kv = o.guests.join("kv");
    if !kv.exists() {
        bail!("{}: missing (cargo build --release -p kv)", kv.display());
    }
    let exe = std::env::current_exe().context("the vigil executable")?;
    let ns = TapNs::new("bench-comp").map_err(anyhow::Error::msg)?;
    let dir = std::env::temp_dir().join(format!("vigil-bench-comp-{}", std::process::id()));
    let mut t = Table { rows: Vec::new() };

    // 1. Tail latency without failures, alternating setups (rotating their order).
    const MODES: [&str; 5] = ["vmm-memfd", "process", "vmm", "process-sync", "process-other"];
    let (chosen, other) = if vmm::net_receive_ring(!o.no_disk) {
        ("both network rings", "the transmit ring only")
    } else {
        ("the network's transmit ring only (the VMM's choice with a disk on fewer than 4 CPUs)", "both network rings")
    };
    let mut per: [Vec<Vec<(String, Lat)>>; 5] = Default::default();
    for round in 0..o.rounds.max(1) {
        for j in 0..5 {
            let m = (round + j) % 5;
            let mode = MODES[m];
            let vm = start(&ns, &exe, &kv, mode, &dir, o.no_disk)?;
            run_benchmark(&ns, o.requests / 4, "set")?;
            let mut r = run_benchmark(&ns, o.requests, "set,get")?;
            r.extend(run_service(&ns, o.requests / 4, &SERVICE)?);
            eprintln!(
                "  round {round}, backend {mode}: {}",
                r.iter()
                    .map(|(n, l)| format!("{n} p50 {:.3} p99 {:.3} p99.9 {:.3} ms, {:.0}/s", l.p50, l.p99, l.p999, l.rps))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            per[m].push(r);
            drop(vm);
        }
    }
    let service = SERVICE.join(" ");
    for (test, label) in [("SET", "SET"), ("GET", "GET"), (service.as_str(), "ROTATE (CPU + network)")] {
        let pick = |m: usize, f: fn(&Lat) -> f64| {
            median(per[m].iter().filter_map(|r| r.iter().find(|(n, _)| n == test)).map(|(_, l)| f(l)).collect())
        };
        let metrics: [(&str, Metric); 6] = [
            ("p50", |l| l.p50),
            ("p95", |l| l.p95),
            ("p99", |l| l.p99),
            ("p99.9", |l| l.p999),
            ("mean", |l| l.avg),
            ("throughput", |l| l.rps),
        ];
        for (name, f) in metrics {
            let (a, b, anon, sync, flip) = (pick(0, f), pick(1, f), pick(2, f), pick(3, f), pick(4, f));
            let unit = if name == "throughput" { "req/s" } else { "ms" };
            let fmt = |v: f64| if name == "throughput" { format!("{v:.0} {unit}") } else { format!("{v:.3} {unit}") };
            let requests = if test == service { o.requests / 4 } else { o.requests };
            t.add(
                &format!("{label} {name}"),
                fmt(a),
                fmt(b),
                format!("{:.3}", b / a),
                &format!(
                    "median of {} rounds of {} requests, 4 clients{}; both with memfd guest memory; process with {chosen}; in VMM with anonymous memory: {} ({:.3} of memfd); process with both rings off (synchronous, as before them): {} ({:.3} of memfd); process with {other}: {} ({:.3} of memfd)",
                    o.rounds.max(1),
                    requests,
                    match (o.no_disk, test == service) {
                        (true, _) => ", no disk",
                        (false, false) => ", kv logging to its disk",
                        (false, true) => ", kv with its disk (ROTATE writes nothing to it)",
                    },
                    fmt(anon),
                    anon / a,
                    fmt(sync),
                    sync / a,
                    fmt(flip),
                    flip / a
                ),
            );
        }
    }

    // 2. A failure mid-run: SIGKILL, then SIGSTOP, of each backend while redis-benchmark runs.
    let devices: &[(&str, &str)] = if o.no_disk { &[("net_backend", "net")] } else { &[("net_backend", "net"), ("blk_backend", "blk")] };
    for &(which, dev) in devices {
        for (sig, what) in [(libc::SIGKILL, "crash (SIGKILL)"), (libc::SIGSTOP, "hang (SIGSTOP)")] {
            let vm = start(&ns, &exe, &kv, "process", &dir, o.no_disk)?;
            // Long enough that the fault lands in the middle of it.
            let n = (o.requests * 4).max(10_000);
            let child = redis_benchmark(&ns, n, "set").stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn()?;
            std::thread::sleep(Duration::from_millis(400));
            signal(pid_of(&vm, which)?, sig)?;
            let incident = wait_restart(&vm, which, 1)?;
            let out = child.wait_with_output()?;
            let r = parse(&String::from_utf8_lossy(&out.stdout));
            let l = r.first().map(|x| x.1.clone()).unwrap_or_default();
            let failed = n as u64 - l.completed.min(n as u64);
            let errs = String::from_utf8_lossy(&out.stderr).lines().filter(|l| !l.trim().is_empty()).count();
            t.add(
                &format!("{dev} backend {what} mid-run: failed requests"),
                "-".into(),
                format!("{failed} of {n}"),
                "-".into(),
                &format!("redis-benchmark SET, {}, {errs} error lines", out.status),
            );
            t.add(
                &format!("{dev} backend {what} mid-run: p99 / max"),
                "-".into(),
                format!("{:.3} / {:.1} ms", l.p99, l.max),
                "-".into(),
                "the requests in flight wait for the restart",
            );
            t.add(
                &format!("{dev} backend {what}: detection + restart"),
                "-".into(),
                format!(
                    "{:.1} + {:.1} ms",
                    incident["waited_us"].as_f64().unwrap_or(0.0) / 1e3,
                    incident["restart_us"].as_f64().unwrap_or(0.0) / 1e3
                ),
                "-".into(),
                &format!("the VMM's record: {}", incident["cause"].as_str().unwrap_or("?")),
            );
            drop(vm);
        }
    }

    // 3. Recovery: the gap a client sees when a backend crashes or hangs ...
    let all =
        [("net_backend", libc::SIGKILL), ("net_backend", libc::SIGSTOP), ("blk_backend", libc::SIGKILL), ("blk_backend", libc::SIGSTOP)];
    let kinds = if o.no_disk { &all[..2] } else { &all[..] };
    let mut gaps: [Vec<f64>; 4] = Default::default();
    {
        let vm = start(&ns, &exe, &kv, "process", &dir, o.no_disk)?;
        let probe = Prober::start(&ns.name)?;
        let mut restarts = [0u64; 2];
        for k in 0..o.kills.max(1) * kinds.len() {
            let i = k % kinds.len();
            let (which, sig) = kinds[i];
            std::thread::sleep(Duration::from_millis(200));
            let at = Instant::now();
            signal(pid_of(&vm, which)?, sig)?;
            let r = &mut restarts[i / 2];
            *r += 1;
            wait_restart(&vm, which, *r)?;
            gaps[i].push(probe.gap(at, Instant::now())?.as_secs_f64() * 1e3);
        }
        let errors = probe.stop();
        if !errors.is_empty() {
            bail!("the probe's connection failed: {errors:?}");
        }
        drop(vm);
    }
    // ... against a restart of the whole VMM (what a crash of an in-VMM backend costs).
    let mut coarse = Vec::new();
    for _ in 0..o.kills.clamp(1, 3) {
        let mut vm = start(&ns, &exe, &kv, "vmm", &dir, o.no_disk)?;
        let at = Instant::now();
        vm.proc_.kill();
        let _vm2 = start(&ns, &exe, &kv, "vmm", &dir, o.no_disk)?;
        // First PING answered on a new connection.
        let (ns_name, probe_at) = (ns.name.clone(), at);
        let took = std::thread::spawn(move || -> Result<Duration> {
            enter(&ns_name)?;
            loop {
                if let Ok(mut c) = std::net::TcpStream::connect_timeout(
                    &(GUEST_IP.parse::<std::net::Ipv4Addr>()?, 6379).into(),
                    Duration::from_millis(200),
                ) {
                    let mut buf = [0u8; 7];
                    if c.write_all(b"PING\r\n").is_ok() && c.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n" {
                        return Ok(probe_at.elapsed());
                    }
                }
                if probe_at.elapsed() > Duration::from_secs(30) {
                    bail!("the restarted VM did not answer within 30 s");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
        .join()
        .map_err(|_| anyhow::anyhow!("probe thread"))??;
        coarse.push(took.as_secs_f64() * 1e3);
    }
    let coarse_ms = median(coarse.clone());
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    t.add(
        "service gap: whole VMM restarted",
        format!("{coarse_ms:.1} ms"),
        "-".into(),
        "1".into(),
        &format!(
            "median (max {:.1} ms) of {}: what a crash of an in-VMM backend costs (a new VMM, the guest booted, its log replayed), connections lost",
            max(&coarse),
            coarse.len()
        ),
    );
    for (i, (which, sig)) in kinds.iter().enumerate() {
        let g = median(gaps[i].clone());
        let dev = &which[..3];
        let what = if *sig == libc::SIGKILL { "crash (SIGKILL)" } else { "hang (SIGSTOP)" };
        t.add(
            &format!("service gap: {dev} backend {what}"),
            "-".into(),
            format!("{g:.1} ms"),
            format!("{:.3}", g / coarse_ms),
            &format!(
                "median (max {:.1} ms) of {}; against the whole-VMM restart; the connection survives{}",
                max(&gaps[i]),
                gaps[i].len(),
                if *sig == libc::SIGSTOP { "; detection is the 150 ms request timeout" } else { "" }
            ),
        );
    }
    if o.cluster {
        domain_rows(&mut t, &dir.join("cluster"), o.kills.clamp(1, 3))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    t.print(o.json)
}

/// The rows of [`crate::cluster::management_domain`]: in a real cluster, everything that
/// manages the host restarted at once (the coarse baseline: agent, store and the VM's device
/// backends — with the backends in the VMM, the VMM with them) against one component alone.
fn domain_rows(t: &mut Table, dir: &std::path::Path, kills: usize) -> Result<()> {
    eprintln!("a real cluster (vigil up examples/crowded.toml, the cache with a disk on hostB) ...");
    let g = crate::cluster::management_domain(dir, kills)?;
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let coarse = median(g.coarse_in_vmm.clone());
    let fine = median(g.coarse_process.clone());
    t.add(
        "cluster: host's management restarted (agent, store, backends)",
        format!("{coarse:.1} ms"),
        format!("{fine:.1} ms"),
        format!("{:.3}", fine / coarse),
        &format!(
            "median (max {:.1} / {:.1} ms) of {} each: hostB's agent, store server and the cache's backends SIGKILLed at once; in the VMM that is the VMM (the guest boots again and replays its disk log), as processes the VMM runs on",
            max(&g.coarse_in_vmm),
            max(&g.coarse_process),
            g.coarse_in_vmm.len()
        ),
    );
    for (name, gaps) in &g.alone {
        let m = median(gaps.clone());
        t.add(
            &format!("cluster: {name} crash alone"),
            "-".into(),
            format!("{m:.1} ms"),
            format!("{:.3}", m / coarse),
            &format!(
                "median (max {:.1} ms) of {} (`vigil fail --component`); against the whole restart with the backends in the VMM",
                max(gaps),
                gaps.len()
            ),
        );
    }
    t.add(
        "cluster: no fault",
        format!("{:.1} ms", median(g.quiet.clone())),
        "-".into(),
        "-".into(),
        &format!(
            "the client's longest silence over 1.5 s without a fault, median (max {:.1} ms) of {}: its noise",
            max(&g.quiet),
            g.quiet.len()
        ),
    );
    t.add(
        "cluster: acknowledged increments checked",
        "-".into(),
        format!("{}", g.increments),
        "-".into(),
        &format!("every value the next one (none lost or repeated); {} new connections after breaks or late answers", g.reconnects),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn redis_benchmark_output_parses() {
        let out = "====== SET ======\n  3000 requests completed in 0.90 seconds\nLatency by percentile distribution:\n0.000% <= 0.303 milliseconds (cumulative count 2)\n99.805% <= 9.695 milliseconds (cumulative count 2995)\n99.902% <= 24.479 milliseconds (cumulative count 3000)\n100.000% <= 24.479 milliseconds (cumulative count 3000)\n\nCumulative distribution of latencies:\n99.950% <= 1.0 milliseconds (cumulative count 0)\nSummary:\n  throughput summary: 3329.63 requests per second\n  latency summary (msec):\n          avg       min       p50       p95       p99       max\n        0.882     0.104     0.863     1.223     1.471     2.015\n";
        let r = super::parse(out);
        assert_eq!(r.len(), 1);
        let l = &r[0].1;
        assert_eq!((l.completed, l.p999, l.p50, l.p99, l.max), (3000, 24.479, 0.863, 1.471, 2.015));
        assert!((l.rps - 3329.63).abs() < 1e-6);
    }
}
