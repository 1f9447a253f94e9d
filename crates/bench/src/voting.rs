//! `vigil bench voting`: what local redundancy costs and how fast it repairs. The kv guest
//! (real KVM) as 1, 2 and 3 voted instances behind `vigil local`, against one instance used
//! directly (redis-benchmark inside its namespace, no voter): request latency (one client, no
//! pipelining: p50, p99) and throughput (8 clients, 16 requests pipelined), for INCR (a
//! state change) and GET; then the repair time of an instance SIGKILLed under load (the
//! voter's `took`: fault seen → restored instance serving again).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PORT: u16 = 16479;

struct Local {
    child: Child,
    dir: PathBuf,
}

impl Drop for Local {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the child this benchmark started, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(n: usize, image: &Path) -> Result<Local> {
    let dir = std::env::temp_dir().join(format!("vigil-bench-voting-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::File::create(dir.join("voter.log"))?;
    let child = Command::new(std::env::current_exe()?)
        .args(["local", "--vm", "bench", "--listen", &format!("127.0.0.1:{PORT}"), "--port", "6379", "-n", &n.to_string()])
        .args(["--netns-prefix", "vglbench-", "--dir"])
        .arg(&dir)
        .arg("--image")
        .arg(image)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start vigil local")?;
    let mut l = Local { child, dir };
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", PORT)).is_err() {
        if t.elapsed() > Duration::from_secs(60) || !matches!(l.child.try_wait(), Ok(None)) {
            bail!("vigil local -n {n} does not serve: {}", std::fs::read_to_string(l.dir.join("voter.log")).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(l)
}

/// One redis-benchmark run: (requests per second, p50 ms, p99 ms).
fn redis_benchmark(netns: Option<&str>, host: &str, test: &str, clients: u32, pipeline: u32, requests: u32) -> Result<(f64, f64, f64)> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "redis-benchmark"]);
            c
        }
        None => Command::new("redis-benchmark"),
    };
    let port = if netns.is_some() { 6379 } else { PORT };
    cmd.args(["-h", host, "-p", &port.to_string(), "-t", test, "--csv"]);
    cmd.args(["-c", &clients.to_string(), "-P", &pipeline.to_string(), "-n", &requests.to_string()]);
    let out = cmd.stdin(Stdio::null()).output().context("cannot run redis-benchmark (package redis-tools)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let row = text.lines().find(|l| l.to_uppercase().starts_with(&format!("\"{}", test.to_uppercase())));
    let Some(row) = row else { bail!("redis-benchmark -t {test}: no result: {text}{}", String::from_utf8_lossy(&out.stderr)) };
    let f: Vec<f64> = row.split(',').skip(1).map(|x| x.trim_matches('"').parse().unwrap_or(f64::NAN)).collect();
    if f.len() < 6 {
        bail!("redis-benchmark: unexpected row {row}");
    }
    Ok((f[0], f[3], f[5]))
}

struct Row {
    setup: String,
    test: &'static str,
    p50: f64,
    p99: f64,
    rps: f64,
}

fn measure(setup: &str, netns: Option<&str>, host: &str, rows: &mut Vec<Row>) -> Result<()> {
    for test in ["incr", "get"] {
        let (_, p50, p99) = redis_benchmark(netns, host, test, 1, 1, 3000)?;
        let (rps, _, _) = redis_benchmark(netns, host, test, 8, 16, 40000)?;
        eprintln!("{setup} {test}: p50 {p50:.3} ms, p99 {p99:.3} ms, {rps:.0} requests/s");
        rows.push(Row { setup: setup.to_string(), test, p50, p99, rps });
    }
    Ok(())
}

fn repair_times(local: &Local, kills: usize) -> Result<Vec<f64>> {
    let mut took = Vec::new();
    // Load while it repairs: redis-benchmark in a loop.
    let load = std::thread::spawn(move || {
        let _ = redis_benchmark(None, "127.0.0.1", "incr", 4, 4, 20000 * kills as u32);
    });
    std::thread::sleep(Duration::from_millis(500));
    for k in 0..kills {
        let i = 1 + k % 2;
        let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(local.dir.join("local.json"))?)?;
        let pid = state["instances"][i]["pid"].as_i64().context("local.json without pid")? as i32;
        let before = events(local, "repaired").len();
        // SAFETY: kill(2) of a VMM process started by this benchmark's `vigil local`.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let t = Instant::now();
        loop {
            let ev = events(local, "repaired");
            if ev.len() > before {
                took.push(ev[before]["event"]["took"].as_f64().unwrap_or(f64::NAN) / 1e6);
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("instance {i} not repaired within 30 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = load.join();
    Ok(took)
}

fn events(local: &Local, kind: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(local.dir.join("events.jsonl")).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter(|e| e["event"]["report"] == kind).collect()
}

/// Runs the benchmark and prints its table (or JSON).
pub fn run(kills: usize, json: bool) -> Result<()> {
    let image = testbed::guest("kv").map_err(|e| anyhow::anyhow!(e))?;
    let mut rows = Vec::new();
    let mut repair = Vec::new();
    for n in [1usize, 2, 3] {
        let local = start(n, &image)?;
        if n == 1 {
            measure("direct (1 instance, no voter)", Some("vglbench-0"), "10.250.0.2", &mut rows)?;
        }
        measure(&format!("voted, n = {n}"), None, "127.0.0.1", &mut rows)?;
        if n == 3 {
            repair = repair_times(&local, kills)?;
        }
    }
    let base = |test: &str| rows.iter().find(|r| r.test == test).map(|r| (r.p50, r.rps)).unwrap_or((f64::NAN, f64::NAN));
    let mut sorted = repair.clone();
    sorted.sort_by(f64::total_cmp);
    if json {
        let rows: Vec<_> = rows
            .iter()
            .map(|r| serde_json::json!({"setup": r.setup, "test": r.test, "p50_ms": r.p50, "p99_ms": r.p99, "rps": r.rps}))
            .collect();
        println!("{}", serde_json::json!({"rows": rows, "repair_ms": repair}));
        return Ok(());
    }
    println!("{:<32} {:>5} {:>9} {:>9} {:>11} {:>9} {:>11}", "setup", "test", "p50 ms", "p99 ms", "p50 added", "req/s", "throughput");
    for r in &rows {
        let (p50, rps) = base(r.test);
        println!(
            "{:<32} {:>5} {:>9.3} {:>9.3} {:>+11.3} {:>9.0} {:>10.2}x",
            r.setup,
            r.test.to_uppercase(),
            r.p50,
            r.p99,
            r.p50 - p50,
            r.rps,
            r.rps / rps
        );
    }
    if !sorted.is_empty() {
        println!(
            "repair of an instance SIGKILLed under load (n = 3, {} kills): p50 {:.0} ms, max {:.0} ms",
            sorted.len(),
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1]
        );
    }
    Ok(())
}
