//! `vigil bench vmm`: what the VMM costs on this host, measured with real KVM and real
//! clients. Needs root (a network namespace with a tap device for the kv rows) and the guests
//! built in release mode (`cargo build --release`).

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::{channel_pair, Command, Stop, Vm, VmConfig};

/// A guest's console captured in memory (shared by the benchmarks that run VMs in process).
#[derive(Clone, Default)]
pub(crate) struct Console(Arc<Mutex<Vec<u8>>>);

impl Console {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    bail!("timed out waiting for {what}")
}

struct Row {
    what: String,
    value: String,
    note: String,
}

fn row(rows: &mut Vec<Row>, what: &str, value: String, note: &str) {
    eprintln!("  {what}: {value}");
    rows.push(Row { what: what.into(), value, note: note.into() });
}

pub(crate) const NS_IP_GUEST: &str = "10.78.0.2";

/// A network namespace with a tap, entered by the calling thread (and so by the VMs and
/// clients it starts); deleted on drop.
pub(crate) struct Netns(String);

impl Netns {
    pub(crate) fn new() -> Result<Netns> {
        let name = format!("vigil-bench-{}", std::process::id());
        let ip = |args: &[&str]| -> Result<()> {
            let out = std::process::Command::new("ip").args(args).output().context("cannot run ip (iproute2)")?;
            if !out.status.success() {
                bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(())
        };
        ip(&["netns", "add", &name])?;
        let ns = Netns(name.clone());
        for cmd in [
            vec!["link", "set", "lo", "up"],
            vec!["tuntap", "add", "dev", "vbtap0", "mode", "tap"],
            vec!["addr", "add", "10.78.0.1/24", "dev", "vbtap0"],
            vec!["link", "set", "vbtap0", "up"],
        ] {
            let mut args = vec!["netns", "exec", &name, "ip"];
            args.extend(cmd);
            ip(&args)?;
        }
        let f = std::fs::File::open(format!("/var/run/netns/{name}")).context("open the bench netns")?;
        use std::os::fd::AsRawFd;
        // SAFETY: setns with a valid namespace fd; it moves only the calling thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn redis_benchmark(port: u16, host: &str) -> Result<(f64, f64)> {
    let out = std::process::Command::new("redis-benchmark")
        .args(["-h", host, "-p", &port.to_string(), "-q", "-n", "20000", "-c", "16", "-t", "set,get"])
        .output()
        .context("cannot run redis-benchmark (package redis-tools)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rps = |cmd: &str| -> Result<f64> {
        text.split(['\r', '\n'])
            .filter(|l| l.trim_start().starts_with(cmd) && l.contains("requests per second"))
            .find_map(|l| l.split(':').nth(1)?.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {cmd} result from redis-benchmark: {text}"))
    };
    Ok((rps("SET")?, rps("GET")?))
}

fn ping(addr: &str) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr.parse().expect("constant address"), Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One checkpoint as the bench saw it.
struct Sample {
    pages: f64,
    pause_ms: f64,
    copy_ms: f64,
    /// Command round trip from the bench thread (kick included).
    call_ms: f64,
}

/// Checkpoint cost with `pages` dirtied per round: the counter guest dirties them and idles;
/// after each round the bench takes a checkpoint (reusing the previous checkpoint's buffer, as
/// a replication driver would, unless `fresh`) and reads the pause and copy times the vCPU
/// thread measured. Returns the medians of (dirty pages, pause ms, copy ms, call ms).
fn checkpoint_medians(counter: &Path, pages: u64, fresh: bool) -> Result<(f64, f64, f64, f64)> {
    let samples = 7;
    let console = Console::default();
    let (ctl, inbox) = channel_pair()?;
    let mut config = VmConfig::new(counter, 256);
    config.args = vec!["rounds".into(), pages.to_string(), "0".into(), "20".into()];
    let mut vm = Vm::create(config, Box::new(console.clone()))?;
    let runner = std::thread::spawn(move || vm.run(Some(&inbox)));
    let result = (|| -> Result<Vec<Sample>> {
        wait_for("round 1", Duration::from_secs(20), || console.text().contains("round 1\n"))?;
        if !ctl.call(Command::Protect { mirror: None, hold: true, input: None }).ok {
            bail!("protect failed");
        }
        let mut buffer = None;
        let mut out = vec![];
        let mut round = 1;
        while out.len() < samples {
            round += 1;
            let line = format!("round {round}\n");
            wait_for(&line, Duration::from_secs(60), || console.text().contains(&line))?;
            let t = Instant::now();
            let r = ctl.call(Command::Checkpoint { buffer: buffer.take() });
            let call = t.elapsed().as_secs_f64() * 1e3;
            let Some(c) = r.checkpoint else {
                bail!("checkpoint failed: {:?}", r.error);
            };
            // The first checkpoint after protect also holds what the guest wrote between
            // protect and its round: skip it.
            if round > 2 {
                out.push(Sample {
                    pages: c.pages.len() as f64,
                    pause_ms: c.pause_ns as f64 / 1e6,
                    copy_ms: c.copy_ns as f64 / 1e6,
                    call_ms: call,
                });
            }
            if !fresh {
                buffer = Some(c.data);
            }
        }
        Ok(out)
    })();
    ctl.call(Command::Quit);
    let _ = runner.join();
    let out = result?;
    Ok((
        median(out.iter().map(|s| s.pages).collect()),
        median(out.iter().map(|s| s.pause_ms).collect()),
        median(out.iter().map(|s| s.copy_ms).collect()),
        median(out.iter().map(|s| s.call_ms).collect()),
    ))
}

/// Checkpoint pause against dirty pages (0 to 32,768), reusing buffers: (dirty pages,
/// pause ms, copy ms, call ms) medians, for `vigil bench replication`.
pub fn checkpoint_samples(counter: &Path) -> Result<Vec<(f64, f64, f64, f64)>> {
    [0u64, 64, 1024, 8192, 32768].iter().map(|&p| checkpoint_medians(counter, p, false)).collect()
}

/// The checkpoint rows of `vigil bench vmm`.
fn checkpoint_rows(counter: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let samples = 7;
    let mut fixed = vec![];
    for (pages, fresh) in [(0u64, false), (64, false), (1024, false), (8192, false), (32768, false), (32768, true)] {
        let (dirty, pause, copy, call) = checkpoint_medians(counter, pages, fresh)?;
        let rate = if copy > 0.0 { dirty * 4096.0 / (copy / 1e3) / 1e9 } else { f64::NAN };
        if !fresh {
            fixed.push(pause - copy);
        }
        row(
            rows,
            &format!("checkpoint, {pages} pages dirtied{}", if fresh { " (fresh buffer)" } else { "" }),
            format!("{pause:.3} ms"),
            &format!(
                "vCPU pause; copy {copy:.3} ms = {rate:.2} GB/s for {dirty:.0} dirty pages; pause - copy {:.0} µs; command round trip {call:.3} ms; median of {samples}",
                (pause - copy) * 1e3
            ),
        );
    }
    let fixed = median(fixed);
    row(
        rows,
        "checkpoint fixed cost (pause - copy)",
        format!("{:.0} µs", fixed * 1e3),
        "median over the rows above: dirty log get-and-clear, vCPU state, clock, epoch seal",
    );
    Ok(())
}

pub fn run(guests: &Path, json: bool) -> Result<()> {
    if !vmm::kvm_available() {
        bail!("/dev/kvm is absent: nothing to measure");
    }
    let image = |name: &str| -> Result<PathBuf> {
        let p = guests.join(name);
        if !p.exists() {
            bail!("{} is missing: build the guests first (cargo build --release)", p.display());
        }
        Ok(p)
    };
    let counter = image("counter")?;
    let mut rows = Vec::new();
    eprintln!("vigil bench vmm:");

    // Port I/O exit round trip: the guest reads the clock N times.
    let n = 20_000;
    let console = Console::default();
    let mut config = VmConfig::new(&counter, 16);
    config.args = vec!["clock".into(), n.to_string()];
    let mut vm = Vm::create(config, Box::new(console.clone()))?;
    let t = Instant::now();
    vm.run(None)?;
    let host = t.elapsed();
    let text = console.text();
    let guest_ns: f64 = text.split_whitespace().nth(3).and_then(|v| v.parse().ok()).with_context(|| format!("counter said {text:?}"))?;
    row(
        &mut rows,
        "port-I/O exit round trip",
        format!("{:.2} µs", guest_ns / n as f64 / 1e3),
        &format!("{n} clock calls; whole run {:.1} ms", host.as_secs_f64() * 1e3),
    );

    // Boot to exit of the smallest guest.
    let mut times = vec![];
    for _ in 0..5 {
        let mut config = VmConfig::new(&counter, 16);
        config.args = vec!["exit".into(), "0".into()];
        let t = Instant::now();
        let mut vm = Vm::create(config, Box::new(std::io::sink()))?;
        vm.run(None)?;
        times.push(t.elapsed());
    }
    times.sort();
    row(&mut rows, "create + boot + exit (counter, 16 MiB)", format!("{:.2} ms", times[2].as_secs_f64() * 1e3), "median of 5");

    // Snapshot and restore per GiB.
    let mib = 512u64;
    let dir = std::env::temp_dir().join(format!("vigil-bench-snap-{}", std::process::id()));
    let mut config = VmConfig::new(&counter, mib);
    config.args = vec!["exit".into(), "0".into()];
    let mut vm = Vm::create(config, Box::new(std::io::sink()))?;
    let t = Instant::now();
    vm.snapshot(&dir)?;
    let snap = t.elapsed().as_secs_f64() * 1024.0 / mib as f64;
    drop(vm);
    let t = Instant::now();
    let mut vm = Vm::restore(&dir, &Default::default(), Box::new(std::io::sink()))?;
    let restore = t.elapsed().as_secs_f64() * 1024.0 / mib as f64;
    vm.resume();
    if vm.run(None)? != Stop::Exited(0) {
        bail!("the restored guest did not exit cleanly");
    }
    let _ = std::fs::remove_dir_all(&dir);
    row(
        &mut rows,
        "snapshot per GiB",
        format!("{:.0} ms", snap * 1e3),
        &format!("{mib} MiB VM, memory file in {}", std::env::temp_dir().display()),
    );
    row(&mut rows, "restore per GiB", format!("{:.0} ms", restore * 1e3), "new KVM VM + memory read");

    // Dirty-log collection while a guest dirties its working set.
    if let Ok(compute) = image("compute") {
        let mib = 1024u64;
        let ws = 256u64;
        let (ctl, inbox) = channel_pair()?;
        let mut config = VmConfig::new(&compute, mib);
        config.args = vec![ws.to_string(), "0".into(), "1000000".into()];
        config.dirty_log = true;
        let mut vm = Vm::create(config, Box::new(std::io::sink()))?;
        let runner = std::thread::spawn(move || vm.run(Some(&inbox)));
        std::thread::sleep(Duration::from_millis(300));
        let mut kicks = vec![];
        for _ in 0..50 {
            let t = Instant::now();
            ctl.call(Command::Status);
            kicks.push(t.elapsed());
            std::thread::sleep(Duration::from_millis(2));
        }
        kicks.sort();
        row(
            &mut rows,
            "control round trip into a running vCPU",
            format!("{:.0} µs", kicks[kicks.len() / 2].as_secs_f64() * 1e6),
            "status command: signal + immediate_exit out of KVM_RUN, answer, re-enter; median of 50",
        );
        let mut samples = vec![];
        for _ in 0..20 {
            let t = Instant::now();
            let r = ctl.call(Command::DirtyLogGetAndClear);
            let d = t.elapsed();
            let pages = r.dirty_pages.map(|p| p.len()).unwrap_or(0);
            samples.push((d, pages));
            std::thread::sleep(Duration::from_millis(50));
        }
        ctl.call(Command::Quit);
        let _ = runner.join();
        samples.sort();
        let (d, pages) = samples[samples.len() / 2];
        row(
            &mut rows,
            "dirty-log get-and-clear (1 GiB VM)",
            format!("{:.2} ms", d.as_secs_f64() * 1e3),
            &format!("median of 20 every 50 ms, {pages} dirty pages of {} (guest rewrites {ws} MiB); includes pausing the vCPU", mib * 256),
        );
        // Guest slowdown from write-protection faults: passes over the working set per second.
        let pass_rate = |log: bool| -> Result<f64> {
            let console = Console::default();
            let (ctl, inbox) = channel_pair()?;
            let mut config = VmConfig::new(&compute, 256);
            config.args = vec!["64".into(), "40".into(), "40".into()];
            config.dirty_log = log;
            let mut vm = Vm::create(config, Box::new(console.clone()))?;
            let runner = std::thread::spawn(move || vm.run(Some(&inbox)));
            let t = Instant::now();
            while !runner.is_finished() {
                if log {
                    ctl.call(Command::DirtyLogGetAndClear);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = runner.join();
            let _ = t;
            let text = console.text();
            let ms: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("compute: pass 40 ")?.split_whitespace().nth(3)?.parse().ok())
                .with_context(|| format!("compute said {text:?}"))?;
            Ok(40.0 / (ms.max(1.0) / 1e3))
        };
        // The alternative to write-protection faults: compare pages against the last checkpoint.
        let mut config = VmConfig::new(&compute, 512);
        config.args = vec!["128".into(), "3".into(), "3".into()];
        let mut vm = Vm::create(config, Box::new(std::io::sink()))?;
        let t = Instant::now();
        let before = vm.memory().as_slice()?.to_vec();
        let copy = t.elapsed().as_secs_f64() * 2.0;
        vm.run(None)?;
        let now = vm.memory().as_slice()?;
        let t = Instant::now();
        let changed = before.chunks_exact(4096).zip(now.chunks_exact(4096)).filter(|(a, b)| a != b).count();
        let compare = t.elapsed().as_secs_f64() * 2.0;
        row(
            &mut rows,
            "compare pages with last checkpoint / copy, per GiB",
            format!("{:.0} ms / {:.0} ms", compare * 1e3, copy * 1e3),
            &format!("host memcmp of a 512 MiB VM, {changed} pages changed (guest rewrote 128 MiB)"),
        );
        let off = pass_rate(false)?;
        let on = pass_rate(true)?;
        row(
            &mut rows,
            "guest passes over 64 MiB, logging off / on",
            format!("{off:.0}/s / {on:.0}/s"),
            &format!("slowdown ×{:.1} with get-and-clear every ~1 ms", off / on.max(1e-9)),
        );
    }

    checkpoint_rows(&counter, &mut rows)?;

    // kv: start to serving, and redis-benchmark VM versus native.
    match (image("kv"), Netns::new()) {
        (Ok(kv), Ok(_ns)) => {
            let console = Console::default();
            let (ctl, inbox) = channel_pair()?;
            let mut config = VmConfig::new(&kv, 64);
            config.tap = Some("vbtap0".into());
            config.net.ip = NS_IP_GUEST.parse()?;
            config.net.prefix_len = 24;
            let t = Instant::now();
            let c2 = console.clone();
            let runner = std::thread::spawn(move || -> Result<Stop> {
                let mut vm = Vm::create(config, Box::new(c2))?;
                Ok(vm.run(Some(&inbox))?)
            });
            wait_for("kv to serve", Duration::from_secs(10), || console.text().contains("kv: serving"))?;
            let up = t.elapsed();
            row(
                &mut rows,
                "kv start to listening",
                format!("{:.1} ms", up.as_secs_f64() * 1e3),
                "create VM, load, boot, smoltcp up (console line)",
            );
            let addr = format!("{NS_IP_GUEST}:6379");
            wait_for("kv to answer PING", Duration::from_secs(10), || ping(&addr))?;
            let serving = t.elapsed();
            row(
                &mut rows,
                "kv start to first PING answered",
                format!("{:.1} ms", serving.as_secs_f64() * 1e3),
                "create VM, boot, ARP, TCP connect, PING",
            );
            let (vset, vget) = redis_benchmark(6379, NS_IP_GUEST)?;
            ctl.call(Command::Quit);
            let _ = runner.join();
            let native = guests.join("kv-native");
            if native.exists() {
                let mut child = std::process::Command::new(&native).arg("127.0.0.1:6390").spawn()?;
                wait_for("kv-native", Duration::from_secs(5), || ping("127.0.0.1:6390"))?;
                let r = redis_benchmark(6390, "127.0.0.1");
                let _ = child.kill();
                let _ = child.wait();
                let (nset, nget) = r?;
                row(
                    &mut rows,
                    "redis-benchmark SET, VM / native",
                    format!("{vset:.0} / {nset:.0} req/s = {:.2}", vset / nset),
                    "-n 20000 -c 16; VM over tap, native over loopback",
                );
                row(
                    &mut rows,
                    "redis-benchmark GET, VM / native",
                    format!("{vget:.0} / {nget:.0} req/s = {:.2}", vget / nget),
                    "same kv-core logic",
                );
            } else {
                row(
                    &mut rows,
                    "redis-benchmark SET / GET in the VM",
                    format!("{vset:.0} / {vget:.0} req/s"),
                    "kv-native not built: no ratio",
                );
            }
        }
        (Err(e), _) | (_, Err(e)) => row(&mut rows, "kv rows", "skipped".into(), &format!("{e:#}")),
    }

    print_rows(&rows, json)
}

fn print_rows(rows: &[Row], json: bool) -> Result<()> {
    if json {
        let v: Vec<_> = rows.iter().map(|r| serde_json::json!({"what": r.what, "value": r.value, "note": r.note})).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let w = rows.iter().map(|r| r.what.chars().count()).max().unwrap_or(0);
        let wv = rows.iter().map(|r| r.value.chars().count()).max().unwrap_or(0);
        println!("{:w$}  {:>wv$}  note", "measure", "value");
        for r in rows {
            println!("{:w$}  {:>wv$}  {}", r.what, r.value, r.note);
        }
    }
    Ok(())
}

/// kv in a VM on the bench's tap with `args`: redis-benchmark's SET and GET rates.
fn kv_rates(kv: &Path, args: &[&str]) -> Result<(f64, f64)> {
    let console = Console::default();
    let (ctl, inbox) = channel_pair()?;
    let mut config = VmConfig::new(kv, 64);
    config.tap = Some("vbtap0".into());
    config.net.ip = NS_IP_GUEST.parse()?;
    config.net.prefix_len = 24;
    config.args = args.iter().map(|a| a.to_string()).collect();
    let c2 = console.clone();
    let runner = std::thread::spawn(move || -> Result<Stop> {
        let mut vm = Vm::create(config, Box::new(c2))?;
        Ok(vm.run(Some(&inbox))?)
    });
    let addr = format!("{NS_IP_GUEST}:6379");
    wait_for("kv to answer PING", Duration::from_secs(10), || ping(&addr)).with_context(|| console.text())?;
    let r = redis_benchmark(6379, NS_IP_GUEST);
    ctl.call(Command::Quit);
    let _ = runner.join();
    r
}

/// `vigil bench monitoring`: kv under redis-benchmark with job marks on (the default) and off
/// (`trace=0`), alternated `rounds` times, and the VMM's read of a full trace ring.
pub fn monitoring(guests: &Path, rounds: usize, json: bool) -> Result<()> {
    let kv = guests.join("kv");
    if !kv.exists() {
        bail!("{}: missing (cargo build --release -p kv)", kv.display());
    }
    let _ns = Netns::new()?;
    let mut rows = Vec::new();
    let (mut on, mut off, mut unstamped) = (Vec::new(), Vec::new(), Vec::new());
    use std::sync::atomic::Ordering::Relaxed;
    let stamps = &vmm::devices::net::FRAME_STAMPS;
    for r in 0..rounds {
        // Rotate the order so that drift of the host favours none: marks and frame stamps
        // on, marks off (stamps on), frame stamps off (marks on).
        let mut order = [0, 1, 2];
        order.rotate_left(r % 3);
        for config in order {
            stamps.store(config != 2, Relaxed);
            let rates = kv_rates(&kv, if config == 1 { &["trace=0"] } else { &[] })?;
            let what = ["marks and frame stamps on", "marks off", "frame stamps off"][config];
            eprintln!("  round {r}: {what}: SET {:.0} GET {:.0} req/s", rates.0, rates.1);
            [&mut on, &mut off, &mut unstamped][config].push(rates);
        }
    }
    stamps.store(true, Relaxed);
    let m = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(v.iter().map(f).collect());
    let (on_set, off_set, on_get, off_get) = (m(&on, |x| x.0), m(&off, |x| x.0), m(&on, |x| x.1), m(&off, |x| x.1));
    row(
        &mut rows,
        "redis-benchmark SET, marks on / off",
        format!("{on_set:.0} / {off_set:.0} req/s = {:.3}", on_set / off_set),
        "median of the rounds; one job (start, end) per batch of requests",
    );
    row(
        &mut rows,
        "redis-benchmark GET, marks on / off",
        format!("{on_get:.0} / {off_get:.0} req/s = {:.3}", on_get / off_get),
        "no exit per mark: two stores into guest memory",
    );
    let (un_set, un_get) = (m(&unstamped, |x| x.0), m(&unstamped, |x| x.1));
    // Also paired: each round's on / off (the same minute of the host's load), their median.
    let paired = |f: fn(&(f64, f64)) -> f64| median(on.iter().zip(&unstamped).map(|(a, b)| f(a) / f(b)).collect());
    row(
        &mut rows,
        "redis-benchmark SET, frame stamps on / off",
        format!("{on_set:.0} / {un_set:.0} req/s = {:.3} (paired by round: {:.3})", on_set / un_set, paired(|x| x.0)),
        "one host clock read per batch of frames, at the guest's own net exits",
    );
    row(
        &mut rows,
        "redis-benchmark GET, frame stamps on / off",
        format!("{on_get:.0} / {un_get:.0} req/s = {:.3} (paired by round: {:.3})", on_get / un_get, paired(|x| x.1)),
        "medians of the rounds (marks on in both)",
    );
    // What one stamp costs: the clock read (and a push into a ring).
    let n = 1_000_000u32;
    let t = Instant::now();
    let mut sink = 0u64;
    for _ in 0..n {
        sink = sink.wrapping_add(vmm::devices::net::monotonic_ns());
    }
    let per = t.elapsed().as_secs_f64() * 1e9 / n as f64;
    std::hint::black_box(sink);
    row(&mut rows, "one frame-batch stamp (host clock read)", format!("{per:.0} ns"), "against 26–40 µs for the exit it rides on");
    // The read: a guest that fills the ring, then the VMM's `trace` command.
    let counter = guests.join("counter");
    if counter.exists() {
        let (ctl, inbox) = channel_pair()?;
        let mut config = VmConfig::new(&counter, 64);
        config.args = vec!["marks".into(), "100000".into()];
        let console = Console::default();
        let c2 = console.clone();
        let runner = std::thread::spawn(move || -> Result<Stop> {
            let mut vm = Vm::create(config, Box::new(c2))?;
            Ok(vm.run(Some(&inbox))?)
        });
        wait_for("the marks", Duration::from_secs(10), || console.text().contains("marks done"))?;
        let t = Instant::now();
        let full = ctl.call(Command::Trace);
        let full_us = t.elapsed().as_secs_f64() * 1e6;
        let read = full.trace.map_or(0, |t| t.marks.len());
        let mut times = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            ctl.call(Command::Trace);
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        ctl.call(Command::Quit);
        let _ = runner.join();
        row(
            &mut rows,
            "VMM read of the trace ring",
            format!("{full_us:.0} µs for {read} marks; {:.0} µs empty (median of 20)", median(times)),
            "the command's round trip: a kick out of the guest's idle, a copy of the ring",
        );
    }
    print_rows(&rows, json)
}
