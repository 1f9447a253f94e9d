//! `vigil bench replication`: what checkpoint replication costs, per workload and policy.
//!
//! In the two-host testbed (`testbed::twohost`), each workload runs once without
//! protection and once under each checkpoint policy, with its backup on the other host:
//! - `compute`: a compute-bound guest rewriting an 8 MiB working set 100,000 times (run time);
//! - `stream`: a guest sending 50 MB over TCP to a client (throughput);
//! - `kv`: redis-benchmark against the kv guest, one connection (latency) and 16 (throughput);
//! - `mixed`: the same against kv while it also rewrites a working set in the background.
//!
//! Then the checkpoint pause against the number of dirty pages, the checkpoint throughput to
//! the backup, and the failover time as a client sees it.

use agent::protection::stats::EpochStats;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use testbed::twohost::{vm_net_args, Host, Testbed, VM_IP};
use testbed::Proc;

/// Starts `vigil ARGS` in namespace `ns`, logging to `log`.
fn spawn(ns: &str, args: &[String], log: PathBuf) -> Result<Proc> {
    Proc::spawn(ns, std::env::current_exe()?, args, log).map_err(anyhow::Error::msg)
}

/// Waits until `needle` appears in the process's log.
fn wait_for(p: &mut Proc, needle: &str, secs: u64) -> Result<()> {
    p.wait_for(needle, 1, secs).map_err(anyhow::Error::msg)
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Per-checkpoint figures from the primary's `--stats` records.
#[derive(Default, Clone)]
struct Epochs {
    n: usize,
    pause_ms: Vec<f64>,
    pages: Vec<f64>,
    bytes: f64,
    transfer_ms: f64,
    ack_ms: Vec<f64>,
    delay_ms: Vec<f64>,
    /// Epochs whose dirty pages were found by comparing memory (the rest: the dirty log).
    compare: usize,
    /// Switches of tracking mode.
    switches: usize,
    /// Time finding dirty pages, summed (ms).
    find_ms: f64,
    /// Page frame bytes on the wire, checkpoints sent compressed, and of them as XOR deltas.
    wire_bytes: f64,
    compressed: usize,
    delta: usize,
}

fn parse_epochs(text: &str) -> Epochs {
    let ms = |ns: u64| ns as f64 / 1e6;
    let mut e = Epochs::default();
    for r in EpochStats::parse_all(text) {
        e.n += 1;
        e.pause_ms.push(ms(r.pause_ns));
        e.pages.push(r.dirty_pages as f64);
        e.bytes += r.bytes as f64;
        e.transfer_ms += ms(r.transfer_ns);
        e.ack_ms.push(ms(r.ack_ns));
        e.delay_ms.extend(r.output_delay_ns.map(ms));
        e.compare += (r.tracking == Some(vmm::TrackingMode::Compare)) as usize;
        e.switches += (r.tracking != r.next_tracking) as usize;
        e.find_ms += ms(r.find_ns);
        e.wire_bytes += r.wire_bytes as f64;
        e.compressed += r.compressed as usize;
        e.delta += r.delta as usize;
    }
    e
}

/// The median (of an even count, the mean of the two middle values).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 0 => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        n => v[n / 2],
    }
}

struct Bed {
    tb: Testbed,
    dir: PathBuf,
    _arbiter: Proc,
    images: std::collections::HashMap<&'static str, PathBuf>,
    run: usize,
    /// `--tracking` and `--compression` of the protected VMs.
    tracking: vmm::TrackingChoice,
    compression: replication::compress::Compression,
    /// When the last primary was started (its backup, on the other host, was already
    /// listening, as a backup host's agent is).
    primary_started: Instant,
}

impl Bed {
    /// Starts `image` on host A (protected with `policy` unless `None`) and its backup on B.
    fn start(&mut self, image: &str, net: bool, policy: Option<&str>, guest_args: &[&str]) -> Result<(Proc, Option<Proc>)> {
        self.start_with(image, net, policy, guest_args, true)
    }

    /// Like `start`; `wait` says whether to wait until the VM is protected.
    fn start_with(
        &mut self,
        image: &str,
        net: bool,
        policy: Option<&str>,
        guest_args: &[&str],
        wait: bool,
    ) -> Result<(Proc, Option<Proc>)> {
        self.run += 1;
        let backup = match policy {
            Some(_) => {
                let mut b = spawn(&self.tb.b, &Host::B.backup_args(None), self.dir.join(format!("{}-backup.log", self.run)))?;
                wait_for(&mut b, "listening", 10)?;
                Some(b)
            }
            None => None,
        };
        let mut args = s(&["vm", "run", "--mem", "64", "--image"]);
        args.push(self.images[image].display().to_string());
        args.extend(s(&["--api", &self.dir.join(format!("{}.api", self.run)).display().to_string()]));
        if net {
            args.extend(vm_net_args());
        }
        if let Some(p) = policy {
            args.extend(Host::A.protect_args(&Host::B.backup_addr(), image));
            args.extend(s(&["--policy", p, "--stats", "--tracking", &self.tracking.to_string()]));
            args.extend(s(&["--compression", &self.compression.to_string()]));
        }
        args.push("--".into());
        args.extend(s(guest_args));
        self.primary_started = Instant::now();
        let mut p = spawn(&self.tb.a, &args, self.dir.join(format!("{}-primary.log", self.run)))?;
        if policy.is_some() && wait {
            wait_for(&mut p, "protected: the backup holds", 30)?;
        }
        Ok((p, backup))
    }

    fn quit(&self, mut p: Proc) -> Result<String> {
        let api = self.dir.join(format!("{}.api", self.run));
        let _ = vmm::api::call(&api, &vmm::Command::Quit);
        let t = Instant::now();
        while p.child.try_wait()?.is_none() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = p.text();
        p.kill();
        Ok(text)
    }
}

/// Reads everything the stream guest sends, from inside the client namespace.
fn stream_client(ns: &str) -> Result<(u64, Duration)> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::scope(|sc| {
        sc.spawn(|| -> Result<(u64, Duration)> {
            let f = std::fs::File::open(&path)?;
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd moves only this (scoped) thread.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            let addr = format!("{VM_IP}:5001").parse().expect("constant");
            let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            c.set_read_timeout(Some(Duration::from_secs(60)))?;
            let t = Instant::now();
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0u64;
            loop {
                match c.read(&mut buf)? {
                    0 => break,
                    k => n += k as u64,
                }
            }
            Ok((n, t.elapsed()))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("stream client panicked"))?
    })
}

/// redis-benchmark from the client namespace: (requests per second, p50 latency ms) over SET
/// and GET.
fn redis_bench(ns: &str, clients: u32, requests: u32) -> Result<(f64, f64)> {
    let out = Testbed::command(ns, "timeout")
        .args(["120", "redis-benchmark", "-h", VM_IP, "-n", &requests.to_string(), "-c", &clients.to_string(), "-t", "set,get", "--csv"])
        .output()
        .context("cannot run redis-benchmark (package redis-tools)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut rps = vec![];
    let mut p50 = vec![];
    for l in text.lines().filter(|l| l.starts_with("\"SET\"") || l.starts_with("\"GET\"")) {
        let f: Vec<f64> = l.split(',').skip(1).filter_map(|x| x.trim_matches('"').parse().ok()).collect();
        if f.len() >= 4 {
            rps.push(f[0]);
            p50.push(f[3]);
        }
    }
    if rps.len() != 2 {
        bail!("redis-benchmark gave no SET/GET results: {text} {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((rps.iter().sum::<f64>() / 2.0, p50.iter().sum::<f64>() / 2.0))
}

#[derive(Default, Clone)]
struct Row {
    policy: String,
    compute_s: f64,
    stream_mbs: f64,
    kv_p50_ms: f64,
    kv_rps: f64,
    mixed_p50_ms: f64,
    mixed_rps: f64,
    epochs: Epochs,
    seconds: f64,
    /// Workloads during which the backup took over (the primary stalled past the timeout on
    /// a loaded host): from then on the VM ran unprotected, so those figures are not the
    /// policy's.
    spoiled: Vec<&'static str>,
    /// Times the backup suspected the primary (a stall of at least the timeout).
    suspicions: usize,
    /// CPU time of the primary's and the backup's processes over all workloads (s).
    cpu_primary: f64,
    cpu_backup: f64,
    /// `compute` did not finish within the limit: its time is estimated from its progress.
    compute_estimated: bool,
    /// Times the primary lost its backup (and ran unprotected, output unheld, until a new one
    /// had synchronised).
    unprotected: usize,
}

/// Notes whether the backup of a finished workload took over or suspected the primary.
fn check_backup(row: &mut Row, what: &'static str, b: Option<Proc>) {
    if let Some(b) = b {
        row.cpu_backup += cpu_seconds(b.child.id()).unwrap_or(0.0);
        let text = b.text();
        row.suspicions += text.matches("Suspecting").count();
        if text.contains("TAKING OVER") {
            row.spoiled.push(what);
        }
    }
}

/// What `vigil bench replication` runs besides the policies.
pub struct Options {
    pub failovers: usize,
    pub failover_only: bool,
    /// Only the checkpoint path's throughput with the guest idle, against the link's.
    pub throughput_only: bool,
    pub json: bool,
    /// Dirty tracking of the protected VMs.
    pub tracking: vmm::TrackingChoice,
    /// Compression of their checkpoints on the wire.
    pub compression: replication::compress::Compression,
    /// Limit the replication link to this many Mbit/s (tc in host A's namespace).
    pub link_mbit: Option<u32>,
    /// The replication link's MTU.
    pub link_mtu: u32,
    /// How long `compute` may run; a run that takes longer is stopped and its time estimated
    /// from its progress.
    pub compute_limit: Duration,
    /// Rounds of every policy, interleaved (unprotected, each policy, again...): the table
    /// shows each figure's median over the rounds, and each round's ratios beside it.
    pub rounds: usize,
}

impl Row {
    /// One row of `rounds` rows of a policy: each workload's figure the median over the
    /// rounds, the checkpoints and counts of all of them, CPU times per round.
    fn median_of(rounds: &[Row]) -> Row {
        let m = |f: fn(&Row) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
        let n = rounds.len().max(1) as f64;
        let mut epochs = Epochs::default();
        for r in rounds {
            let e = &r.epochs;
            epochs.n += e.n;
            epochs.pause_ms.extend(&e.pause_ms);
            epochs.pages.extend(&e.pages);
            epochs.bytes += e.bytes;
            epochs.transfer_ms += e.transfer_ms;
            epochs.ack_ms.extend(&e.ack_ms);
            epochs.delay_ms.extend(&e.delay_ms);
            epochs.compare += e.compare;
            epochs.switches += e.switches;
            epochs.find_ms += e.find_ms;
            epochs.wire_bytes += e.wire_bytes;
            epochs.compressed += e.compressed;
            epochs.delta += e.delta;
        }
        Row {
            policy: rounds.first().map(|r| r.policy.clone()).unwrap_or_default(),
            compute_s: m(|r| r.compute_s),
            stream_mbs: m(|r| r.stream_mbs),
            kv_p50_ms: m(|r| r.kv_p50_ms),
            kv_rps: m(|r| r.kv_rps),
            mixed_p50_ms: m(|r| r.mixed_p50_ms),
            mixed_rps: m(|r| r.mixed_rps),
            epochs,
            seconds: rounds.iter().map(|r| r.seconds).sum(),
            spoiled: rounds.iter().flat_map(|r| r.spoiled.iter().copied()).collect(),
            suspicions: rounds.iter().map(|r| r.suspicions).sum(),
            cpu_primary: rounds.iter().map(|r| r.cpu_primary).sum::<f64>() / n,
            cpu_backup: rounds.iter().map(|r| r.cpu_backup).sum::<f64>() / n,
            compute_estimated: rounds.iter().any(|r| r.compute_estimated),
            unprotected: rounds.iter().map(|r| r.unprotected).sum(),
        }
    }
}

/// CPU time (user + system) a process has used so far, from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

pub fn run(policies: &[replication::PolicySpec], opts: &Options) -> Result<()> {
    let (failovers, failover_only, json) = (opts.failovers, opts.failover_only, opts.json);
    let policies: Vec<String> = policies.iter().map(ToString::to_string).collect();
    if !Path::new("/dev/kvm").exists() {
        bail!("vigil bench replication needs /dev/kvm");
    }
    let mut images = std::collections::HashMap::new();
    for g in ["kv", "compute", "stream", "counter"] {
        images.insert(g, testbed::guest(g).map_err(anyhow::Error::msg)?);
    }
    let dir = std::env::temp_dir().join(format!("vigil-bench-replication-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let tb = Testbed::new("bench").map_err(anyhow::Error::msg)?;
    let mut arbiter = spawn(&tb.switch, &testbed::twohost::arbiter_args(&dir.join("arbiter.leases")), dir.join("arbiter.log"))?;
    wait_for(&mut arbiter, "serving leases", 10)?;
    tb.set_replication_mtu(opts.link_mtu).map_err(anyhow::Error::msg)?;
    if let Some(mbit) = opts.link_mbit {
        // The replication link from host A, limited to `mbit` (a token bucket, as a real link
        // of that rate would be).
        let rate = format!("{mbit}mbit");
        let out = Testbed::command(&tb.a, "tc")
            .args(["qdisc", "replace", "dev", "rep", "root", "tbf", "rate", &rate, "burst", "256kb", "latency", "50ms"])
            .output()
            .context("cannot run tc (package iproute2)")?;
        if !out.status.success() {
            bail!("tc on the replication link: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    let mut bed = Bed {
        tb,
        dir: dir.clone(),
        _arbiter: arbiter,
        images,
        run: 0,
        tracking: opts.tracking,
        compression: opts.compression,
        primary_started: Instant::now(),
    };
    if opts.throughput_only {
        let t = Throughput::measure(&mut bed)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&t.json())?);
        } else {
            t.print();
        }
        return Ok(());
    }
    let modes: Vec<Option<&str>> = std::iter::once(None).chain(policies.iter().map(|p| Some(p.as_str()))).collect();
    let modes = if failover_only { vec![] } else { modes };
    let rounds = opts.rounds.max(1);
    // Per mode, its row of each round.
    let mut per_round: Vec<Vec<Row>> = vec![Vec::new(); modes.len()];
    for round in 0..rounds {
        for (k, &mode) in modes.iter().enumerate() {
            let name = mode.unwrap_or("unprotected").to_string();
            if rounds > 1 {
                eprintln!("bench replication: {name} (round {} of {rounds})", round + 1);
            } else {
                eprintln!("bench replication: {name}");
            }
            let mut row = Row { policy: name, ..Row::default() };
            let mut log = String::new();
            let mut seconds = 0.0;
            // compute: 8 MiB working set, 100,000 passes (from the primary's start to its
            // exit, the initial synchronisation of the protected runs included; the backup's
            // own start before it is not the VM's time).
            {
                let (mut p, b) = bed.start_with("compute", false, mode, &["8", "100000", "1000"], false)?;
                let t0 = bed.primary_started;
                let t = t0;
                let mut cpu = 0.0;
                row.compute_s = loop {
                    if p.child.try_wait()?.is_some() {
                        break t0.elapsed().as_secs_f64();
                    }
                    cpu = cpu_seconds(p.child.id()).unwrap_or(cpu);
                    if t.elapsed() > opts.compute_limit {
                        // Estimate from the last pass the guest reported.
                        let pass = p
                            .text()
                            .lines()
                            .filter_map(|l| l.strip_prefix("compute: pass ")?.split_whitespace().next()?.parse::<f64>().ok())
                            .last();
                        p.kill();
                        let Some(pass) = pass else { bail!("compute reported no progress within {:?}", opts.compute_limit) };
                        row.compute_estimated = true;
                        break t0.elapsed().as_secs_f64() * 100_000.0 / pass;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                };
                row.cpu_primary += cpu;
                seconds += row.compute_s;
                log.push_str(&p.text());
                check_backup(&mut row, "compute", b);
            }
            // stream: 50 MB to a client.
            {
                let (mut p, b) = bed.start("stream", true, mode, &["50"])?;
                wait_for(&mut p, "stream: serving", 20)?;
                let (n, d) = stream_client(&bed.tb.client)?;
                if n != 50_000_000 {
                    bail!("the stream client got {n} bytes, not 50,000,000");
                }
                row.stream_mbs = n as f64 / 1e6 / d.as_secs_f64();
                seconds += d.as_secs_f64();
                row.cpu_primary += cpu_seconds(p.child.id()).unwrap_or(0.0);
                log.push_str(&bed.quit(p)?);
                check_backup(&mut row, "stream", b);
            }
            // kv and mixed.
            for busy in ["0", "8"] {
                let (mut p, b) = bed.start("kv", true, mode, &["6379", busy])?;
                wait_for(&mut p, "kv: serving", 20)?;
                let t = Instant::now();
                let (_, p50) = redis_bench(&bed.tb.client, 1, 100)?;
                let (rps, _) = redis_bench(&bed.tb.client, 16, 2000)?;
                seconds += t.elapsed().as_secs_f64();
                row.cpu_primary += cpu_seconds(p.child.id()).unwrap_or(0.0);
                if busy == "0" {
                    (row.kv_p50_ms, row.kv_rps) = (p50, rps);
                } else {
                    (row.mixed_p50_ms, row.mixed_rps) = (p50, rps);
                }
                log.push_str(&bed.quit(p)?);
                check_backup(&mut row, if busy == "0" { "kv" } else { "mixed" }, b);
            }
            row.epochs = parse_epochs(&log);
            row.unprotected = log.matches("UNPROTECTED").count();
            row.seconds = seconds;
            per_round[k].push(row);
        }
    }
    let rows: Vec<Row> = per_round.iter().map(|r| Row::median_of(r)).collect();
    let checkpoints = if failover_only { vec![] } else { checkpoint_table(&bed)? };
    // Missing rather than fatal: the rounds above are measured already.
    let throughput = if failover_only {
        None
    } else {
        Throughput::measure(&mut bed).map_err(|e| eprintln!("bench replication: checkpoint throughput not measured: {e:#}")).ok()
    };
    let failover = failovers_measured(&mut bed, failovers, None)?;
    let failover_fast_client = failovers_measured(&mut bed, failovers, Some(10))?;
    bed.tb.flood(true).map_err(anyhow::Error::msg)?;
    let failover_flooded = failovers_measured(&mut bed, failovers, None);
    bed.tb.flood(false).map_err(anyhow::Error::msg)?;
    let failover_flooded = failover_flooded?;
    let base = rows.first().cloned().unwrap_or_default();
    if json {
        let j: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "policy": r.policy, "compute_s": r.compute_s, "stream_mb_per_s": r.stream_mbs, "kv_p50_ms": r.kv_p50_ms,
                    "kv_rps": r.kv_rps, "mixed_p50_ms": r.mixed_p50_ms, "mixed_rps": r.mixed_rps, "checkpoints": r.epochs.n,
                    "median_pause_ms": median(&r.epochs.pause_ms), "median_dirty_pages": median(&r.epochs.pages),
                    "median_ack_ms": median(&r.epochs.ack_ms), "median_output_delay_ms": median(&r.epochs.delay_ms),
                    "taken_over_during": r.spoiled, "suspicions": r.suspicions,
                    "compute_estimated": r.compute_estimated, "backup_lost": r.unprotected, "compare_epochs": r.epochs.compare, "tracking_switches": r.epochs.switches,
                    "bytes_sent": r.epochs.bytes, "wire_bytes": r.epochs.wire_bytes, "compressed_checkpoints": r.epochs.compressed, "delta_checkpoints": r.epochs.delta, "cpu_primary_s": r.cpu_primary, "cpu_backup_s": r.cpu_backup, "find_ms_total": r.epochs.find_ms,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"policies": j, "throughput": throughput.as_ref().map(Throughput::json), "failover_ms": failover, "failover_rto_min_10ms": failover_fast_client, "failover_flooding_lan": failover_flooded})
            )?
        );
        return Ok(());
    }
    println!("Checkpoint replication: each workload unprotected and under each policy (backup on the other host)");
    println!("ratios are relative to the unprotected run (time: higher is slower; throughput: lower is slower)\n");
    println!(
        "{:<14} {:>10} {:>8} {:>11} {:>8} {:>10} {:>9} {:>10} {:>9} {:>10} {:>9} {:>9} {:>8} {:>8} {:>9}",
        "policy",
        "compute s",
        "ratio",
        "stream MB/s",
        "ratio",
        "kv p50 ms",
        "ratio",
        "kv req/s",
        "ratio",
        "mixed p50",
        "ratio",
        "mixed r/s",
        "ratio",
        "ckpt/s",
        "pause ms"
    );
    for r in &rows {
        let rate = if r.seconds > 0.0 { r.epochs.n as f64 / r.seconds } else { 0.0 };
        println!(
            "{:<14} {:>10.2} {:>8.2} {:>11.1} {:>8.2} {:>10.2} {:>9.2} {:>10.0} {:>9.2} {:>10.2} {:>9.2} {:>9.0} {:>8.2} {:>8.0} {:>9.3}",
            r.policy,
            r.compute_s,
            r.compute_s / base.compute_s,
            r.stream_mbs,
            r.stream_mbs / base.stream_mbs,
            r.kv_p50_ms,
            r.kv_p50_ms / base.kv_p50_ms,
            r.kv_rps,
            r.kv_rps / base.kv_rps,
            r.mixed_p50_ms,
            r.mixed_p50_ms / base.mixed_p50_ms,
            r.mixed_rps,
            r.mixed_rps / base.mixed_rps,
            rate,
            median(&r.epochs.pause_ms),
        );
    }
    if rounds > 1 {
        println!("\n{rounds} rounds: the figures above are medians; each round's ratios to the same round's unprotected run:");
        println!("{:<14} {:<24} {:<24} {:<24} {:<24}", "policy", "compute", "kv p50", "mixed p50", "mixed r/s");
        let ratios = |rs: &[Row], f: fn(&Row) -> f64| {
            rs.iter().zip(&per_round[0]).map(|(r, b)| format!("{:.2}", f(r) / f(b))).collect::<Vec<_>>().join(" ")
        };
        for rs in per_round.iter().skip(1) {
            println!(
                "{:<14} {:<24} {:<24} {:<24} {:<24}",
                rs[0].policy,
                ratios(rs, |r| r.compute_s),
                ratios(rs, |r| r.kv_p50_ms),
                ratios(rs, |r| r.mixed_p50_ms),
                ratios(rs, |r| r.mixed_rps)
            );
        }
    }
    println!(
        "\nAccounting (tracking {}, compression {}, replication link MTU {}{}): share of epochs tracked by comparing memory, switches, time finding dirty pages, checkpoint page bytes, their bytes on the wire, page frame bytes per checkpoint, share of checkpoints compressed (as LZ4 or XOR deltas) and as XOR deltas, CPU time of the primary's and the backup's processes (all four workloads; the unprotected primary's is the guests' own)",
        bed.tracking,
        bed.compression,
        opts.link_mtu,
        opts.link_mbit.map(|m| format!(", {m} Mbit/s")).unwrap_or_default()
    );
    println!(
        "{:<14} {:>8} {:>9} {:>9} {:>10} {:>10} {:>10} {:>12} {:>10} {:>8} {:>12} {:>11}",
        "policy",
        "epochs",
        "compare",
        "switches",
        "find ms",
        "page MB",
        "wire MB",
        "wire KB/ckpt",
        "compressed",
        "delta",
        "CPU primary",
        "CPU backup"
    );
    for r in &rows {
        let share = if r.epochs.n > 0 { format!("{:.0} %", 100.0 * r.epochs.compare as f64 / r.epochs.n as f64) } else { "–".into() };
        let of_n = |k: usize| if r.epochs.n > 0 { format!("{:.0} %", 100.0 * k as f64 / r.epochs.n as f64) } else { "–".into() };
        let per = if r.epochs.n > 0 { format!("{:.1}", r.epochs.wire_bytes / r.epochs.n as f64 / 1e3) } else { "–".into() };
        println!(
            "{:<14} {:>8} {:>9} {:>9} {:>10.0} {:>10.0} {:>10.0} {:>12} {:>10} {:>8} {:>10.1} s {:>9.1} s",
            r.policy,
            r.epochs.n,
            share,
            r.epochs.switches,
            r.epochs.find_ms,
            r.epochs.bytes / 1e6,
            r.epochs.wire_bytes / 1e6,
            per,
            of_n(r.epochs.compressed),
            of_n(r.epochs.delta),
            r.cpu_primary,
            r.cpu_backup
        );
    }
    for r in rows.iter().filter(|r| r.compute_estimated) {
        println!(
            "  {}: compute did not finish within {:?}; its time is estimated from the passes it reported",
            r.policy, opts.compute_limit
        );
    }
    println!("  host load at the end: {:.1}", load_average());
    for r in rows.iter().filter(|r| r.unprotected > 0) {
        println!(
            "  {}: the primary lost its backup {} times (unprotected until a new one synchronised: figures of those stretches are not the policy's)",
            r.policy, r.unprotected
        );
    }
    for r in rows.iter().filter(|r| !r.spoiled.is_empty() || r.suspicions > 0) {
        let spoiled = if r.spoiled.is_empty() {
            String::new()
        } else {
            format!("; the backup TOOK OVER during {} (those figures are of an unprotected VM, not of the policy)", r.spoiled.join(", "))
        };
        println!(
            "  {}: the backup suspected a stalled primary {} times (host load {:.1}){spoiled}",
            r.policy,
            r.suspicions,
            load_average()
        );
    }
    let all: Vec<&Epochs> = rows.iter().skip(1).map(|r| &r.epochs).collect();
    let bytes: f64 = all.iter().map(|e| e.wire_bytes).sum();
    let page_bytes: f64 = all.iter().map(|e| e.bytes).sum();
    let transfer: f64 = all.iter().map(|e| e.transfer_ms).sum();
    println!("\nCheckpoint pause against dirty pages (the counter guest dirties a chosen number of pages; median of 7)");
    println!("{:>12} {:>12} {:>12} {:>12} {:>12}", "dirty pages", "pause ms", "copy ms", "GB/s copy", "call ms");
    for (pages, pause, copy, call) in &checkpoints {
        let rate = if *copy > 0.0 { pages * 4096.0 / (copy / 1e3) / 1e9 } else { f64::NAN };
        println!("{pages:>12.0} {pause:>12.3} {copy:>12.3} {rate:>12.2} {call:>12.3}");
    }
    println!(
        "\nCheckpoint throughput to the backup: {:.0} MB of pages ({:.0} MB on the wire) in {:.0} ms of sending = {:.0} MB/s of pages, {:.0} MB/s on the wire (all protected runs)",
        page_bytes / 1e6,
        bytes / 1e6,
        transfer,
        if transfer > 0.0 { page_bytes / 1e6 / (transfer / 1e3) } else { 0.0 },
        if transfer > 0.0 { bytes / 1e6 / (transfer / 1e3) } else { 0.0 }
    );
    if let Some(t) = &throughput {
        t.print();
    }
    for (runs, client) in [
        (&failover, "a default Linux client"),
        (&failover_fast_client, "a client with rto_min 10ms on its route"),
        (&failover_flooded, "a default Linux client, the LAN flooding the VM's frames to both hosts"),
    ] {
        if runs.is_empty() {
            continue;
        }
        let (takeover, answer): (Vec<f64>, Vec<f64>) = runs.iter().copied().unzip();
        let q = |v: &[f64], p: f64| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v.get(((v.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or(f64::NAN)
        };
        println!(
            "Failover (kv, adaptive, SIGKILL of the primary's VMM, {} kills, {client}): takeover {:.0} ms (median); the client's first answer after the kill: min {:.0}, p50 {:.0}, p90 {:.0}, p99 {:.0}, max {:.0} ms; {} of {} within 150 ms",
            runs.len(),
            median(&takeover),
            q(&answer, 0.0),
            q(&answer, 0.5),
            q(&answer, 0.9),
            q(&answer, 0.99),
            q(&answer, 1.0),
            answer.iter().filter(|a| **a <= 150.0).count(),
            answer.len()
        );
    }
    println!("  (takeover: the backup's timeout + the lease + building the VM; the rest is the client's TCP retransmission timer, 200 ms at least by default on Linux)");
    Ok(())
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|t| t.split_whitespace().next()?.parse().ok()).unwrap_or(f64::NAN)
}

const IDLE_PAGES: u64 = 8192;
const IDLE_ROUND_MS: u64 = 100;
const IDLE_SECONDS: u64 = 5;
const IDLE_ATTEMPTS: usize = 3;
/// Whole checkpoints left out at the start (their buffers are not yet mapped).
const IDLE_SKIP: usize = 2;

/// The checkpoint path's own speed, with the guest idle, against the link's own for the same
/// bursts measured just before and just after it (against the host's drift).
///
/// The counter guest rewrites [`IDLE_PAGES`] pages, then sleeps [`IDLE_ROUND_MS`], under
/// `fixed:IDLE_ROUND_MS`, so that the primary's sender and the backup's receiver have the
/// cores to themselves (in the workloads above, a guest's vCPU holds one of this host's two
/// cores while they run, and they share the other). Uncompressed, whatever `--compression`
/// says: the link carries every page byte, as the bare bursts do. Only checkpoints of all the
/// rewritten pages count (an epoch boundary can fall inside a rewrite and split it in two),
/// less the first [`IDLE_SKIP`].
struct Throughput {
    /// MB/s of page bytes over sending time, of each whole checkpoint counted.
    whole: Vec<f64>,
    /// Checkpoints in the run.
    all: usize,
    /// Runs spoiled by a lost backup before the one measured.
    spoiled: usize,
    raw_before: f64,
    raw_after: f64,
}

impl Throughput {
    fn measure(bed: &mut Bed) -> Result<Throughput> {
        let burst = IDLE_PAGES as usize * replication::wire::PAGE;
        let raw_before = raw_bursts(&bed.tb, burst, 30)?;
        let chosen = std::mem::replace(&mut bed.compression, replication::compress::Compression::Off);
        let idle = idle_run(bed);
        bed.compression = chosen;
        let (log, spoiled) = idle?;
        let raw_after = raw_bursts(&bed.tb, burst, 30)?;
        let records = EpochStats::parse_all(&log);
        let whole = records
            .iter()
            .filter(|r| r.dirty_pages >= IDLE_PAGES && r.transfer_ns > 0)
            .skip(IDLE_SKIP)
            .map(|r| r.bytes as f64 / 1e6 / (r.transfer_ns as f64 / 1e9))
            .collect();
        Ok(Throughput { whole, all: records.len(), spoiled, raw_before, raw_after })
    }

    /// vigil's median over the link's (the mean of its two medians).
    fn ratio(&self) -> f64 {
        median(&self.whole) / ((self.raw_before + self.raw_after) / 2.0)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "compression": "off", "pages_per_checkpoint": IDLE_PAGES, "checkpoints": self.all, "whole_checkpoints_counted": self.whole.len(),
            "median_checkpoint_mb_per_s": median(&self.whole), "link_mb_per_s_before": self.raw_before,
            "link_mb_per_s_after": self.raw_after, "ratio": self.ratio(), "runs_spoiled": self.spoiled,
        })
    }

    fn print(&self) {
        println!(
            "Checkpoint throughput to the backup, the guest idle between checkpoints (the counter guest rewrites {IDLE_PAGES} pages, then sleeps {IDLE_ROUND_MS} ms; fixed:{IDLE_ROUND_MS}, compression off, {IDLE_SECONDS} s{}): median {:.0} MB/s of page bytes over sending time, of {} whole checkpoints ({} in all, the first {IDLE_SKIP} whole ones left out)",
            if self.spoiled > 0 { format!("; run again after {} run(s) that lost the backup", self.spoiled) } else { String::new() },
            median(&self.whole),
            self.whole.len(),
            self.all,
        );
        println!(
            "  the link itself, the same bursts without vigil (written whole, read whole into one buffer; median of 30 before and of 30 after): {:.0} and {:.0} MB/s; vigil's median checkpoint reaches {:.2} of their mean",
            self.raw_before,
            self.raw_after,
            self.ratio()
        );
    }
}

/// The protected counter guest's run for [`Throughput`]; returns its primary's log and the
/// runs spoiled. A run in which the VM lost its backup measures nothing (on this nested host
/// the first checkpoints of 32 MiB, into buffers not yet mapped, can stall a side past the
/// replication timeout): it is run again, at most [`IDLE_ATTEMPTS`] times.
fn idle_run(bed: &mut Bed) -> Result<(String, usize)> {
    let (pages, delay) = (IDLE_PAGES.to_string(), IDLE_ROUND_MS.to_string());
    let policy = format!("fixed:{IDLE_ROUND_MS}");
    for spoiled in 0..IDLE_ATTEMPTS {
        let (mut p, b) = bed.start("counter", false, Some(&policy), &["rounds", &pages, "0", &delay])?;
        wait_for(&mut p, "round 2", 30)?;
        std::thread::sleep(Duration::from_secs(IDLE_SECONDS));
        let log = bed.quit(p)?;
        drop(b);
        if !log.contains("UNPROTECTED") {
            return Ok((log, spoiled));
        }
    }
    bail!("the counter guest lost its backup in each of {IDLE_ATTEMPTS} runs (logs in {})", bed.dir.display())
}

/// The link's own speed for the same traffic: `count` bursts of `bytes` from host A to host
/// B over the replication link, one every [`IDLE_ROUND_MS`], each written whole and read whole
/// into one reused buffer, then answered with one byte before the next; returns the median
/// MB/s of a burst, timed as the primary times a checkpoint's sending (until the last byte is
/// written to the socket). No framing, checksums or replica: what a checkpoint of that size
/// cannot beat on this link.
fn raw_bursts(tb: &Testbed, bytes: usize, count: usize) -> Result<f64> {
    let addr = format!("{}:7199", Host::B.rep_ip());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::result::Result<(), String>>();
    let b = std::thread::scope(|scope| -> Result<f64> {
        let receiver = scope.spawn(|| -> std::result::Result<(), String> {
            let listener = tb.enter(Host::B).and_then(|_| std::net::TcpListener::bind(&addr).map_err(|e| format!("bind {addr}: {e}")));
            let listener = match listener {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.clone()));
                    return Err(e);
                }
            };
            // Not for ever: a sender that failed to connect must not hang the bench.
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let t = Instant::now();
            let mut c = loop {
                match listener.accept() {
                    Ok((c, _)) => break c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && t.elapsed() < Duration::from_secs(10) => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => return Err(format!("accepting the burst sender: {e}")),
                }
            };
            c.set_nonblocking(false).and_then(|_| c.set_read_timeout(Some(Duration::from_secs(10)))).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; bytes];
            for _ in 0..count {
                c.read_exact(&mut buf).map_err(|e| e.to_string())?;
                c.write_all(b"k").map_err(|e| e.to_string())?;
            }
            Ok(())
        });
        ready_rx.recv().map_err(|_| anyhow::anyhow!("the receiver ended"))?.map_err(anyhow::Error::msg)?;
        let sender = scope.spawn(|| -> std::result::Result<Vec<f64>, String> {
            tb.enter(Host::A)?;
            let mut s = std::net::TcpStream::connect(&addr).map_err(|e| format!("connect {addr}: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .and_then(|_| s.set_write_timeout(Some(Duration::from_secs(10))))
                .map_err(|e| e.to_string())?;
            let data = vec![7u8; bytes];
            let mut ack = [0u8; 1];
            let mut rates = Vec::new();
            for _ in 0..count {
                let t = Instant::now();
                s.write_all(&data).map_err(|e| e.to_string())?;
                rates.push(bytes as f64 / 1e6 / t.elapsed().as_secs_f64());
                s.read_exact(&mut ack).map_err(|e| e.to_string())?;
                std::thread::sleep(Duration::from_millis(IDLE_ROUND_MS));
            }
            Ok(rates)
        });
        let rates = sender.join().map_err(|_| anyhow::anyhow!("the sender panicked"))?.map_err(anyhow::Error::msg)?;
        receiver.join().map_err(|_| anyhow::anyhow!("the receiver panicked"))?.map_err(anyhow::Error::msg)?;
        Ok(median(&rates))
    })?;
    Ok(b)
}

/// Pause against dirty pages, with the counter guest (see `vigil bench vmm`).
fn checkpoint_table(bed: &Bed) -> Result<Vec<(f64, f64, f64, f64)>> {
    crate::vmm::checkpoint_samples(&bed.images["counter"])
}

/// Kills the primary of a protected kv while redis-cli writes; returns (takeover ms, first
/// answer ms) per run.
fn failovers_measured(bed: &mut Bed, runs: usize, rto_min_ms: Option<u32>) -> Result<Vec<(f64, f64)>> {
    let mut out = Vec::new();
    match rto_min_ms {
        Some(ms) => bed.tb.exec(&bed.tb.client, &["route", "replace", "10.99.0.0/24", "dev", "eth0", "rto_min", &format!("{ms}ms")]),
        None => bed.tb.exec(&bed.tb.client, &["route", "replace", "10.99.0.0/24", "dev", "eth0"]),
    }
    .map_err(anyhow::Error::msg)?;
    // A round whose VM lost its backup before the kill (a stall of this loaded host made the
    // two sides give up on each other) measures nothing: it is run again, up to `runs` times.
    let mut lost = 0;
    while out.len() < runs && lost <= runs {
        let (mut p, b) = bed.start("kv", true, Some("adaptive"), &[])?;
        let mut b = b.context("a backup")?;
        wait_for(&mut p, "kv: serving", 20)?;
        // A failover is measured only from a protected VM (its backup registered in the lease).
        wait_for(&mut p, "protected: the backup holds", 20)?;
        let mut cli = Testbed::command(&bed.tb.client, "redis-cli")
            .args(["-h", VM_IP])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("redis-cli (package redis-tools)")?;
        let mut stdin = cli.stdin.take().context("stdin")?;
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(cli.stdout.take().context("stdout")?));
        let (tx, rx) = std::sync::mpsc::channel::<Instant>();
        let writer = std::thread::spawn(move || -> Result<()> {
            for i in 0..100_000u64 {
                writeln!(stdin, "INCR n")?;
                stdin.flush()?;
                let l = lines.next().context("redis-cli ended")??;
                if l != (i + 1).to_string() {
                    bail!("INCR answered {l}, expected {}", i + 1);
                }
                if tx.send(Instant::now()).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        });
        // Wait until the client is answered (its first SYN may go to the host that ran the VM
        // in the previous run, until the switch learns where the VM is now), let it run, then
        // kill the primary.
        for _ in 0..20 {
            rx.recv_timeout(Duration::from_secs(10)).context("the client got no answers")?;
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(500) {
            let _ = rx.recv_timeout(Duration::from_millis(50));
        }
        while rx.try_recv().is_ok() {}
        // At a random point of the client's request cycle (about 1.5 ms), not in the instant
        // after an answer reached this thread (the client has just sent its next request then).
        let jitter = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos() as u64) % 3_000;
        std::thread::sleep(Duration::from_micros(jitter));
        let text = p.text();
        let unprotected = text.rfind("UNPROTECTED").is_some_and(|u| text.rfind("protected: the backup holds").is_none_or(|at| at < u));
        if unprotected {
            lost += 1;
            eprintln!("failover round run again: the VM had lost its backup before the kill ({lost} so far)");
            p.kill();
            drop(rx);
            let _ = cli.kill();
            let _ = cli.wait();
            let _ = writer.join();
            b.kill();
            continue;
        }
        let kill = Instant::now();
        p.kill();
        let first = loop {
            let at = rx.recv_timeout(Duration::from_secs(10)).context("no answer within 10 s of the kill")?;
            // Answers already on their way when the primary died do not count.
            if at.duration_since(kill) > Duration::from_millis(1) {
                break at.duration_since(kill);
            }
        };
        wait_for(&mut b, "TAKING OVER", 5)?;
        let text = b.text();
        let after: f64 = text
            .lines()
            .find(|l| l.contains("TAKING OVER"))
            .and_then(|l| l.split('(').nth(1)?.split_whitespace().next()?.parse().ok())
            .unwrap_or(f64::NAN);
        let build: f64 = text
            .lines()
            .find(|l| l.contains("ms to build it"))
            .and_then(|l| l.split('(').nth(1)?.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        out.push((60.0 + after + build, first.as_secs_f64() * 1e3));
        drop(rx);
        let _ = cli.kill();
        let _ = cli.wait();
        let _ = writer.join();
        b.kill();
    }
    Ok(out)
}
