//! `vigil bench store`: throughput and latency of the store server (a real `vigil store serve`
//! child process, its data directory on disk, every write fsync'ed), and the supervisor's
//! detection and recovery times for crashes (SIGKILL) and hangs (SIGSTOP).

use agent::supervisor::{Config, Supervisor};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use store::Client;

/// Latency samples of one kind of operation.
struct Series {
    name: String,
    samples: Vec<Duration>,
    wall: Duration,
}

impl Series {
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.samples.clone();
        v.sort();
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    }
    fn rate(&self) -> f64 {
        self.samples.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

fn measure(name: &str, n: usize, mut f: impl FnMut(usize) -> anyhow::Result<()>) -> anyhow::Result<Series> {
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        f(i)?;
        samples.push(t.elapsed());
    }
    Ok(Series { name: name.to_string(), samples, wall: start.elapsed() })
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let st = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().context("running kill")?;
    anyhow::ensure!(st.success(), "kill {sig} {pid} failed");
    Ok(())
}

fn config(dir: &Path, period: Duration, misses: u32) -> anyhow::Result<Config> {
    let socket = dir.join("sock");
    Ok(Config {
        program: std::env::current_exe().context("locating the vigil binary")?,
        args: vec!["store".into(), "serve".into(), "--socket".into(), socket.clone().into(), "--data".into(), dir.join("data").into()],
        socket,
        period,
        misses,
        start_timeout: Duration::from_secs(10),
    })
}

pub fn run(ops: usize, rounds: usize, with_etcd: bool, json: bool) -> anyhow::Result<()> {
    let dir: PathBuf = std::env::temp_dir().join(format!("vigil-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let period = Duration::from_millis(20);
    let mut sup = Supervisor::start(config(&dir, period, 3)?)?;
    let socket = dir.join("sock");
    let mut c = Client::connect(&socket)?;
    let value = vec![b'v'; 64];

    let mut series = Vec::new();
    series.push(measure("write (64 B, fsync'ed)", ops, |i| Ok(c.write(&format!("/bench/k{}", i % 1000), &value)?))?);
    series.push(measure("read", ops, |i| Ok(c.read(&format!("/bench/k{}", i % 1000)).map(|_| ())?))?);
    let children = format!("directory ({} children)", ops.min(1000));
    series.push(measure(&children, ops / 10, |_| Ok(c.directory("/bench").map(|_| ())?))?);
    series.push(measure("transaction (read + write + commit)", ops / 4, |i| {
        Ok(c.transaction(|tx| {
            let k = format!("/bench/tx{}", i % 100);
            let n = tx.try_read(&k)?.map_or(0, |v| v.len());
            tx.write(&k, &vec![b'x'; (n + 1) % 64])
        })?)
    })?);
    // Four writers at once: requests are serialised and each is fsync'ed on its own.
    let wall = Instant::now();
    let per = ops / 4;
    let handles: Vec<_> = (0..4)
        .map(|w| {
            let socket = socket.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                let mut c = Client::connect(&socket)?;
                let mut s = Vec::with_capacity(per);
                for i in 0..per {
                    let t = Instant::now();
                    c.write(&format!("/bench/par{w}/k{i}"), b"1")?;
                    s.push(t.elapsed());
                }
                Ok(s)
            })
        })
        .collect();
    let mut samples = Vec::new();
    for h in handles {
        samples.extend(h.join().map_err(|_| anyhow::anyhow!("writer thread panicked"))??);
    }
    series.push(Series { name: "write, 4 clients".into(), samples, wall: wall.elapsed() });

    let overhead = supervision_overhead(&dir, &mut c, ops)?;

    // Supervision: crashes and hangs.
    let mut crash = Vec::new();
    let mut hang = Vec::new();
    for r in 0..rounds * 2 {
        std::thread::sleep(Duration::from_millis(30));
        let kind = if r % 2 == 0 { "-KILL" } else { "-STOP" };
        let t0 = Instant::now();
        signal(sup.pid(), kind)?;
        let i = loop {
            if let Some(i) = sup.step()? {
                break i;
            }
        };
        c.read("/bench/k1").context("reading after recovery")?;
        let row = (i.detected_at.duration_since(t0), i.recovery);
        if r % 2 == 0 {
            crash.push(row);
        } else {
            hang.push(row);
        }
    }
    sup.shutdown();
    let vs_etcd = if with_etcd { compare_with_etcd(&dir, ops / 4)? } else { Vec::new() };
    let _ = std::fs::remove_dir_all(&dir);

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let sup_rows: Vec<(&str, f64, f64, f64)> = [("crash (SIGKILL)", &crash), ("hang (SIGSTOP)", &hang)]
        .iter()
        .map(|(n, v)| {
            let mut d: Vec<f64> = v.iter().map(|r| ms(r.0)).collect();
            let mut rec: Vec<f64> = v.iter().map(|r| ms(r.1)).collect();
            let max = d.iter().copied().fold(0.0, f64::max);
            (*n, med(&mut d), max, med(&mut rec))
        })
        .collect();
    if json {
        let ops: Vec<_> = series
            .iter()
            .map(|s| serde_json::json!({"operation": s.name, "count": s.samples.len(), "per_second": s.rate(), "p50_us": s.pct(0.5), "p99_us": s.pct(0.99)}))
            .collect();
        let sup: Vec<_> = sup_rows
            .iter()
            .map(|r| serde_json::json!({"fault": r.0, "detection_median_ms": r.1, "detection_max_ms": r.2, "recovery_median_ms": r.3, "rounds": rounds}))
            .collect();
        let over: Vec<_> = overhead
            .iter()
            .map(|(n, a, b)| serde_json::json!({"operation": n, "supervised_per_second": a, "unsupervised_per_second": b, "ratio": a / b}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "operations": ops, "supervision": sup, "supervision_overhead": over,
                "heartbeat_period_ms": ms(period), "misses": 3
            }))?
        );
    } else {
        let rows: Vec<Vec<String>> = series
            .iter()
            .map(|s| {
                vec![
                    s.name.to_string(),
                    s.samples.len().to_string(),
                    format!("{:.0}", s.rate()),
                    format!("{:.0}", s.pct(0.5)),
                    format!("{:.0}", s.pct(0.99)),
                ]
            })
            .collect();
        print!(
            "{}",
            model::text::table(
                "store operations (one client unless stated)",
                &["operation", "count", "per second", "p50 µs", "p99 µs"],
                &rows
            )
        );
        println!();
        let rows: Vec<Vec<String>> =
            sup_rows.iter().map(|r| vec![r.0.to_string(), format!("{:.1}", r.1), format!("{:.1}", r.2), format!("{:.1}", r.3)]).collect();
        let title = format!("supervision (heartbeat every {:.0} ms, hang after 3 misses; {rounds} rounds each)", ms(period));
        print!("{}", model::text::table(&title, &["fault", "detection median ms", "detection max ms", "recovery median ms"], &rows));
        println!();
        let rows: Vec<Vec<String>> =
            overhead.iter().map(|(n, a, b)| vec![n.to_string(), format!("{a:.0}"), format!("{b:.0}"), format!("{:.3}", a / b)]).collect();
        let title = format!(
            "overhead of supervision (heartbeat every {:.0} ms): the same server with and without its supervisor, alternating, medians of 5",
            ms(period)
        );
        print!("{}", model::text::table(&title, &["operation", "supervised /s", "unsupervised /s", "ratio"], &rows));
        if !vs_etcd.is_empty() {
            println!();
            let rows: Vec<Vec<String>> = vs_etcd
                .iter()
                .map(|(n, a, b)| vec![n.to_string(), format!("{a:.0}"), format!("{b:.0}"), format!("{:.2}", a / b)])
                .collect();
            let title = "store with the etcd backend vs etcd used directly (1 local member, same HTTP client, one client)";
            print!("{}", model::text::table(title, &["operation", "store on etcd /s", "etcd direct /s", "ratio"], &rows));
        }
    }
    // Transactions against the size of the tree (copy on touch: their cost follows what they
    // touch, not the tree).
    let mut reports = Vec::new();
    for nodes in [1_000, 100_000, 1_000_000] {
        reports.push(store::bench::transactions(nodes, if nodes >= 1_000_000 { 200 } else { rounds.max(1) * 100 })?);
    }
    if json {
        let r: Vec<String> = reports.iter().map(|r| format!("{r:?}")).collect();
        println!("{}", serde_json::json!({ "transactions": r }));
    } else {
        println!();
        print!("{}", store::bench::table(&reports));
    }
    Ok(())
}

/// Reads and writes per second through the supervised server (`sup_client`) and through a second,
/// unsupervised `vigil store serve`, measured alternately five times: (operation, supervised,
/// unsupervised), medians.
fn supervision_overhead(dir: &Path, sup_client: &mut Client, ops: usize) -> anyhow::Result<Vec<(&'static str, f64, f64)>> {
    let socket = dir.join("plain.sock");
    let mut child = std::process::Command::new(std::env::current_exe().context("locating the vigil binary")?)
        .args(["store", "serve", "--socket"])
        .arg(&socket)
        .arg("--data")
        .arg(dir.join("plain-data"))
        .spawn()
        .context("starting an unsupervised store")?;
    let result = (|| -> anyhow::Result<Vec<(&'static str, f64, f64)>> {
        let t0 = Instant::now();
        while !socket.exists() {
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(10), "the unsupervised store did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut plain = Client::connect(&socket)?;
        let value = vec![b'v'; 64];
        let n = (ops / 2).max(10);
        let mut out = Vec::new();
        for (name, write) in [("read", false), ("write (64 B, fsync'ed)", true)] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..5 {
                for (c, into) in [(&mut *sup_client, &mut a), (&mut plain, &mut b)] {
                    let s = measure(name, n, |i| {
                        let k = format!("/bench/k{}", i % 1000);
                        if write {
                            c.write(&k, &value)?;
                        } else {
                            c.try_read(&k)?;
                        }
                        Ok(())
                    })?;
                    into.push(s.rate());
                }
            }
            a.sort_by(f64::total_cmp);
            b.sort_by(f64::total_cmp);
            out.push((name, a[2], b[2]));
        }
        Ok(out)
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Starts a one-member etcd, measures writes and reads through the store (etcd backend) and
/// directly on etcd: (operation, store per second, etcd per second).
fn compare_with_etcd(dir: &Path, n: usize) -> anyhow::Result<Vec<(&'static str, f64, f64)>> {
    let port = 32379 + (std::process::id() % 500) as u16 * 2;
    let client = format!("http://127.0.0.1:{port}");
    let peer = format!("http://127.0.0.1:{}", port + 1);
    let mut etcd = std::process::Command::new("/usr/bin/etcd")
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer, "--initial-cluster", &format!("bench={peer}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting /usr/bin/etcd (Debian package etcd-server)")?;
    let result = (|| -> anyhow::Result<Vec<(&'static str, f64, f64)>> {
        let ep = vec![format!("127.0.0.1:{port}")];
        let mut direct = store::etcd::EtcdBackend::new(ep.clone(), "bench-direct")?;
        let start = Instant::now();
        while direct.get("ready").is_err() {
            anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "etcd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let value = vec![b'v'; 64];
        let d_put = measure("put", n, |i| Ok(direct.put(&format!("bench/k{}", i % 1000), &value)?))?;
        let d_get = measure("get", n, |i| Ok(direct.get(&format!("bench/k{}", i % 1000)).map(|_| ())?))?;
        let mut cfg = config(&dir.join("on-etcd"), Duration::from_millis(100), 3)?;
        std::fs::create_dir_all(dir.join("on-etcd"))?;
        cfg.args.extend(["--etcd".into(), ep[0].clone().into(), "--etcd-prefix".into(), "bench-store".into()]);
        let mut sup = Supervisor::start(cfg)?;
        let mut c = Client::connect(&dir.join("on-etcd").join("sock"))?;
        let s_put = measure("write", n, |i| Ok(c.write(&format!("/bench/k{}", i % 1000), &value)?))?;
        let s_get = measure("read", n, |i| Ok(c.read(&format!("/bench/k{}", i % 1000)).map(|_| ())?))?;
        sup.shutdown();
        Ok(vec![("write (64 B)", s_put.rate(), d_put.rate()), ("read", s_get.rate(), d_get.rate())])
    })();
    let _ = etcd.kill();
    let _ = etcd.wait();
    result
}
