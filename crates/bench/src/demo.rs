//! `vigil demo failover`: one command that shows checkpoint replication at work. It builds the
//! `kv` guest, creates a client namespace and two host namespaces joined by a bridge
//! (`testbed::twohost`), runs `kv` protected on host A with its backup on host B, drives
//! it with `redis-cli` over one TCP connection, kills host A's VMM with SIGKILL, and shows the
//! takeover and the client carrying on.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};
use testbed::twohost::{vm_net_args, Host, Testbed, VM_IP};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// Protect a kv VM, kill its host's VMM, watch the backup take over.
    Failover {
        /// Checkpoint policy of the primary.
        #[arg(long, default_value = "adaptive")]
        policy: replication::PolicySpec,
        /// Requests the client makes before the kill.
        #[arg(long, default_value_t = 200)]
        before: u64,
        /// Requests the client makes after the kill.
        #[arg(long, default_value_t = 200)]
        after: u64,
    },
}

struct Proc {
    name: &'static str,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `vigil ARGS` in a namespace; its output lines go to `tx`, prefixed with `name`.
fn spawn(ns: &str, name: &'static str, args: &[String], tx: &std::sync::mpsc::Sender<String>) -> Result<Proc> {
    let exe = std::env::current_exe().context("cannot find the vigil executable")?;
    let mut child =
        Testbed::command(ns, exe).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("cannot start vigil")?;
    for out in
        [Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>, Box::new(child.stderr.take().expect("piped"))]
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(format!("{name:>8} | {l}"));
            }
        });
    }
    Ok(Proc { name, child })
}

/// Prints process output until a line contains `needle` (or the time is up).
fn until(rx: &Receiver<String>, needle: &str, secs: u64) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(50)) {
            println!("{l}");
            if l.contains(needle) {
                return Ok(());
            }
        }
    }
    bail!("timed out waiting for {needle:?}")
}

fn echo(rx: &Receiver<String>) {
    while let Ok(l) = rx.try_recv() {
        println!("{l}");
    }
}

pub fn run(args: &Args) -> Result<u8> {
    let What::Failover { policy, before, after } = &args.what;
    if !Path::new("/dev/kvm").exists() {
        bail!("the demo needs /dev/kvm");
    }
    println!("== building the kv guest");
    let image = testbed::guest("kv").map_err(anyhow::Error::msg)?;
    println!("== creating namespaces: client, switch (arbiter), host A, host B");
    let tb = Testbed::new("demo").map_err(anyhow::Error::msg)?;
    let (tx, rx) = channel();
    let state = std::env::temp_dir().join(format!("vigil-demo-{}.leases", std::process::id()));
    let _arbiter = spawn(&tb.switch, "arbiter", &testbed::twohost::arbiter_args(&state), &tx)?;
    until(&rx, "serving leases", 10)?;
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let _backup = spawn(&tb.b, "host B", &Host::B.backup_args(None), &tx)?;
    until(&rx, "listening", 10)?;
    let mut args = s(&["vm", "run", "--mem", "32", "--policy", &policy.to_string(), "--image", &image.display().to_string()]);
    args.extend(vm_net_args());
    args.extend(Host::A.protect_args(&Host::B.backup_addr(), "kv"));
    let mut primary = spawn(&tb.a, "host A", &args, &tx)?;
    until(&rx, "protected: the backup holds", 20)?;
    println!("== the client (redis-cli, one TCP connection) writes keys and counts");
    let mut cli = Testbed::command(&tb.client, "redis-cli")
        .args(["-h", VM_IP])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run redis-cli (package redis-tools)")?;
    let mut stdin = cli.stdin.take().expect("piped");
    let mut lines = BufReader::new(cli.stdout.take().expect("piped")).lines();
    let mut call = |cmd: &str| -> Result<(String, Duration)> {
        let t = Instant::now();
        writeln!(stdin, "{cmd}")?;
        stdin.flush()?;
        let l = lines.next().context("redis-cli ended")??;
        Ok((l, t.elapsed()))
    };
    let mut n = 0;
    for _ in 0..*before {
        n += 1;
        call(&format!("SET key{n} value{n}"))?;
        let (c, _) = call("INCR requests")?;
        if c != n.to_string() {
            bail!("INCR answered {c}, expected {n}");
        }
    }
    echo(&rx);
    println!("== {n} requests answered; killing host A's VMM (SIGKILL)");
    let killed = Instant::now();
    let _ = primary.child.kill();
    let _ = primary.child.wait();
    println!("== {} is dead; the client sends its next request", primary.name);
    let mut worst = Duration::ZERO;
    let mut first = None;
    for _ in 0..*after {
        n += 1;
        let (ok, t1) = call(&format!("SET key{n} value{n}"))?;
        let (c, t2) = call("INCR requests")?;
        if ok != "OK" || c != n.to_string() {
            bail!("after the failover: SET answered {ok:?}, INCR answered {c:?} (expected {n})");
        }
        worst = worst.max(t1 + t2);
        first.get_or_insert(killed.elapsed());
        echo(&rx);
    }
    let (missing, _) = call("GET key1")?;
    echo(&rx);
    println!("== the client carried on over the same TCP connection:");
    println!(
        "   first answer {:.0} ms after the kill; slowest request {:.0} ms",
        first.unwrap_or_default().as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3
    );
    println!("   {n} requests, each answered once (INCR counted 1..{n} without gap); key1 = {missing}");
    Ok(0)
}
