//! `vigil up`, `status`, `fail`, `down` (the embedded cluster), `vigil agent` and
//! `vigil manager`: argument mapping only; the `manager` and `agent` crates do the work.

use anyhow::{bail, Context, Result};
use manager::local::{self, ClusterFile, UpOptions};
use std::path::PathBuf;
use std::time::Duration;

/// Where the embedded cluster keeps its files.
fn default_dir() -> PathBuf {
    PathBuf::from("/run/vigil")
}

#[derive(clap::Args)]
pub struct UpArgs {
    /// The system description (with [[host]] and [[run]] items).
    model: PathBuf,
    /// Directory for the cluster's store, logs and sockets.
    #[arg(long, default_value_os_t = default_dir())]
    dir: PathBuf,
    /// Tag of the cluster's namespaces (vg<TAG>-h0, ...), 1 to 4 letters or digits.
    #[arg(long, default_value = "c")]
    tag: String,
    /// Managers to start: one leads, the others stand by.
    #[arg(long, default_value_t = 2)]
    managers: usize,
    /// Plan for every set of up to K failed hosts.
    #[arg(long, default_value_t = 1, value_name = "K")]
    faults: usize,
    /// Hosts' and the manager's lease (ms).
    #[arg(long, default_value_t = 500)]
    lease_ms: u64,
    /// Heartbeat period (ms).
    #[arg(long, default_value_t = 50)]
    period_ms: u64,
    /// Seconds to wait for every VM to run.
    #[arg(long, default_value_t = 60)]
    wait: u64,
    /// Distributed mode: a 3-member etcd cluster (/usr/bin/etcd) on the switch, a store front
    /// end per host on it.
    #[arg(long)]
    etcd: bool,
    /// The managers' dashboards (and /metrics) on 127.0.0.1:PORT, PORT+1, ... (0: any free
    /// ports; `vigil status` shows where).
    #[arg(long, default_value_t = 8470, value_name = "PORT")]
    http_port: u16,
    /// No dashboards.
    #[arg(long, conflicts_with = "http_port")]
    no_http: bool,
}

#[derive(clap::Args)]
pub struct DirArgs {
    /// The cluster's directory (`vigil up --dir`).
    #[arg(long, default_value_os_t = default_dir())]
    dir: PathBuf,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Print the status again every SECONDS until interrupted.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "1")]
    watch: Option<f64>,
}

#[derive(clap::Args)]
pub struct TraceArgs {
    /// The VM.
    vm: String,
    #[command(flatten)]
    dir: DirArgs,
}

#[derive(clap::Args)]
pub struct FailArgs {
    /// The host to fail.
    #[arg(required_unless_present_any = ["instance", "host_opt"])]
    host: Option<String>,
    /// The host (as HOST).
    #[arg(long = "host", value_name = "HOST", conflicts_with = "host")]
    host_opt: Option<String>,
    /// Fail one component of the host instead of all of it: `net` or `blk` (a VM's network or
    /// block backend process; --vm names the VM when the host runs several), `agent` (the
    /// host agent: its VMs run on, a new agent re-adopts them), `store` (the store server
    /// under its supervisor). SIGKILL, or SIGSTOP with --hang.
    #[arg(long, value_enum, conflicts_with_all = ["instance", "partition", "heal"])]
    component: Option<Component>,
    /// With --component net: the VM whose backend fails.
    #[arg(long, requires = "component")]
    vm: Option<String>,
    /// Fail one instance of a voted VM (mode `local`) instead, as VM#K (K from 1): its VMM
    /// is SIGKILLed (a crash), or SIGSTOPped with --hang; the voter masks it and repairs it.
    #[arg(long, value_name = "VM#K", conflicts_with_all = ["host", "partition", "heal"])]
    instance: Option<String>,
    /// With --instance or --component: a hang (SIGSTOP) instead of a crash.
    #[arg(long)]
    hang: bool,
    /// With --component store: no crash, a slow disk — every sync of the store's log takes MS
    /// longer from now on (0 ends it; at most 10000).
    #[arg(long, value_name = "MS", conflicts_with = "hang")]
    slow_disk: Option<u64>,
    /// With --instance: from now on one reply in N of that instance is wrong (the kv guest's
    /// `DEBUG WRONG-ANSWERS N`, sent to it alone through the voter) instead of a crash.
    #[arg(long, value_name = "N", requires = "instance", conflicts_with = "hang")]
    wrong: Option<u64>,
    /// Only cut the host's link (a partition): its processes live on, cut off.
    #[arg(long)]
    partition: bool,
    /// Restore the link of a host failed with --partition.
    #[arg(long, conflicts_with = "partition")]
    heal: bool,
    #[command(flatten)]
    dir: DirArgs,
}

#[derive(clap::Args)]
pub struct AgentArgs {
    /// The host this agent holds (as named in the model).
    #[arg(long)]
    host: String,
    /// The store's socket.
    #[arg(long)]
    store: PathBuf,
    /// Directory for spec files, VMM logs and the agent's lock.
    #[arg(long)]
    state: PathBuf,
    #[arg(long, default_value_t = 50)]
    period_ms: u64,
    #[arg(long, default_value_t = 500)]
    lease_ms: u64,
    /// Run the agent as a child and start it again at once whenever it dies (what an init
    /// system does for it): its VMMs keep running meanwhile and are re-adopted.
    #[arg(long)]
    respawn: bool,
}

#[derive(clap::Args)]
pub struct ManagerArgs {
    /// The embedded cluster's directory (model, store and layout from its cluster file).
    #[arg(long)]
    dir: PathBuf,
    /// This manager's id in the election.
    #[arg(long)]
    id: String,
    #[arg(long, default_value_t = 1, value_name = "K")]
    faults: usize,
    /// Serve the dashboard and /metrics here (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
}

#[derive(clap::Args)]
pub struct FieldArgs {
    /// The embedded cluster's directory.
    #[arg(long)]
    dir: PathBuf,
}

/// `vigil keep`: the keeper of a `vigil up` cluster (started by it).
pub fn keep(a: &FieldArgs) -> Result<u8> {
    let exe = std::env::current_exe().context("cannot find the vigil executable")?;
    manager::local::keep(&a.dir, &exe, Duration::from_millis(100)).map_err(anyhow::Error::msg)?;
    Ok(0)
}

pub fn field(a: &FieldArgs) -> Result<u8> {
    let cf = ClusterFile::load(&a.dir).map_err(anyhow::Error::msg)?;
    let loaded = model::load(&cf.model).map_err(|e| anyhow::anyhow!("{e}"))?;
    let probes = manager::field::probes(&loaded);
    for p in &probes {
        tracing::info!("field: chain {} through VM {} at {}, a request every {:?}", p.chain, p.vm, p.addr, p.period);
    }
    manager::field::run(&cf.store, probes, Duration::from_millis(500))
}

pub fn up(a: &UpArgs) -> Result<u8> {
    let exe = std::env::current_exe().context("cannot find the vigil executable")?;
    let o = UpOptions {
        model: a.model.clone(),
        dir: a.dir.clone(),
        tag: a.tag.clone(),
        exe,
        managers: a.managers,
        faults: a.faults,
        lease_ms: a.lease_ms,
        period_ms: a.period_ms,
        wait: Duration::from_secs(a.wait),
        etcd: a.etcd,
        http_port: (!a.no_http).then_some(a.http_port),
    };
    let cf = local::up(&o).map_err(anyhow::Error::msg)?;
    print_status(&local::status(&cf).map_err(anyhow::Error::msg)?);
    println!("cluster up: `vigil status --dir {0}`, `vigil fail HOST --dir {0}`, `vigil down --dir {0}`", cf.dir.display());
    Ok(0)
}

pub fn status(a: &StatusArgs) -> Result<u8> {
    let cf = ClusterFile::load(&a.dir.dir).map_err(anyhow::Error::msg)?;
    let every = match a.watch {
        Some(s) if !(0.05..=3600.0).contains(&s) => bail!("--watch {s}: the period must be between 0.05 and 3600 seconds"),
        s => s.map(Duration::from_secs_f64),
    };
    loop {
        let st = local::status(&cf).map_err(anyhow::Error::msg);
        let Some(every) = every else {
            let st = st?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print_status(&st);
            }
            return Ok(if st.ok { 0 } else { 1 });
        };
        // Watching: clear the screen (not for JSON, one document per line), and keep going
        // through a store that does not answer.
        match st {
            Ok(st) if a.json => println!("{}", serde_json::to_string(&st)?),
            Ok(st) => {
                print!("\x1b[H\x1b[2J");
                println!("{}  (every {:.1} s; Ctrl-C to stop)", chrono_now(), every.as_secs_f64());
                print_status(&st);
            }
            Err(e) => eprintln!("{e}"),
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        std::thread::sleep(every);
    }
}

/// The wall-clock time of day (UTC), for `--watch`.
fn chrono_now() -> String {
    let s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02} UTC", s / 3600 % 24, s / 60 % 60, s % 60)
}

/// `vigil trace VM`: what the cluster measures of one VM, as JSON: its job execution times
/// beside its WCET, its replication, the chains it serves (measured beside analysed), and the
/// events that name it.
pub fn trace(a: &TraceArgs) -> Result<u8> {
    let cf = ClusterFile::load(&a.dir.dir).map_err(anyhow::Error::msg)?;
    let st = local::status(&cf).map_err(anyhow::Error::msg)?;
    let Some(v) = st.vms.iter().find(|v| v.vm == a.vm) else {
        bail!("no VM {:?} in the cluster (VMs: {})", a.vm, st.vms.iter().map(|v| v.vm.as_str()).collect::<Vec<_>>().join(", "));
    };
    let chains: Vec<serde_json::Value> = st
        .measured
        .iter()
        .filter(|(_, m)| m.vm == a.vm)
        .map(|(c, m)| {
            let bound = st.plan.as_ref().and_then(|p| p.chains.iter().find(|x| &x.chain == c));
            serde_json::json!({ "chain": c, "measured": m, "bound_ms": bound.and_then(|b| b.worst_ms), "deadline_ms": m.deadline_ms })
        })
        .collect();
    let events: Vec<&agent::cluster::Event> = st.events.iter().filter(|e| e.what.contains(&a.vm)).collect();
    // The arrival curve: what the monitor observed beside what the model allows.
    let loaded = model::load(&cf.model).map_err(|e| anyhow::anyhow!("{e}"))?;
    let observed = v.jobs.as_ref().map(|j| j.arrivals.clone()).unwrap_or_default();
    let arrivals: Vec<serde_json::Value> = manager::drift::allowed_arrivals(&loaded, st.plan.as_ref(), &a.vm)
        .into_iter()
        .map(|(w, allowed)| {
            let seen = observed.iter().find(|o| o.0 == w).map(|o| o.1);
            serde_json::json!({ "window_ms": w, "observed": seen, "allowed": allowed })
        })
        .collect();
    let out = serde_json::json!({
        "vm": v.vm, "host": v.host, "backup": v.backup, "serving": v.serving,
        "jobs": v.jobs, "wcet_us": v.wcet_us, "arrivals": arrivals, "replication": v.figures, "protection": v.replication,
        "chains": chains, "events": events,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(0)
}

pub fn fail(a: &FailArgs) -> Result<u8> {
    if let Some(inst) = &a.instance {
        return fail_instance(&a.dir.dir, inst, a.hang, a.wrong);
    }
    let Some(host) = a.host.as_ref().or(a.host_opt.as_ref()) else { bail!("which host? (or --instance VM#K)") };
    if let Some(ms) = a.slow_disk {
        if a.component != Some(Component::Store) {
            bail!("--slow-disk goes with --component store");
        }
        return slow_store_disk(&a.dir.dir, host, ms);
    }
    if let Some(c) = a.component {
        return fail_component(&a.dir.dir, host, c, a.vm.as_deref(), a.hang);
    }
    if a.hang {
        bail!("--hang goes with --instance or --component");
    }
    if a.heal {
        local::heal(&a.dir.dir, host).map_err(anyhow::Error::msg)?;
        println!("host {host}: its link restored");
        return Ok(0);
    }
    let pids = local::fail(&a.dir.dir, host, a.partition).map_err(anyhow::Error::msg)?;
    if a.partition {
        println!("host {host}: its link cut (its processes run on)");
    } else {
        println!("host {host}: {} process(es) killed (SIGKILL), its link cut", pids.len());
    }
    Ok(0)
}

/// `vigil fail --component store --host H --slow-disk MS`: the store that host uses makes every
/// sync of its log MS longer (`XS_CONTROL sync-delay`), as a disk that other writers keep busy.
fn slow_store_disk(dir: &std::path::Path, host: &str, ms: u64) -> Result<u8> {
    let cf = manager::local::ClusterFile::load(dir).map_err(anyhow::Error::msg)?;
    if !cf.host_ns.contains_key(host) {
        bail!("unknown host {host:?} (hosts: {})", cf.host_ns.keys().cloned().collect::<Vec<_>>().join(", "));
    }
    let sock = cf.host_store.get(host).unwrap_or(&cf.store);
    let mut c = store::Client::connect(sock).with_context(|| format!("the store at {}", sock.display()))?;
    let reply = c.control(&["sync-delay", &ms.to_string()]).context("XS_CONTROL sync-delay")?;
    if reply != "OK" {
        bail!("the store at {}: {reply}", sock.display());
    }
    println!("host {host}: every sync of its store's log takes {ms} ms longer");
    Ok(0)
}

/// A component of a host that `vigil fail --component` fails alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Component {
    Net,
    Blk,
    Agent,
    Store,
}

/// The command line of process `pid`, split at its NULs.
fn cmdline(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// Whether `args` has `flag` followed by `value`.
fn has_flag(args: &[String], flag: &str, value: &str) -> bool {
    args.windows(2).any(|w| w[0] == flag && w[1] == value)
}

/// `vigil fail --component C --host H [--vm V] [--hang]`: finds the one process of that
/// component on that host (by its command line, among the host namespace's processes) and
/// SIGKILLs or SIGSTOPs it. Whoever supervises it notices and replaces it: the VMM its network
/// backend, the respawner the agent, the store's supervisor the store.
fn fail_component(dir: &std::path::Path, host: &str, c: Component, vm: Option<&str>, hang: bool) -> Result<u8> {
    let cf = manager::local::ClusterFile::load(dir).map_err(anyhow::Error::msg)?;
    let candidates: Vec<(u32, Vec<String>)> = match c {
        Component::Net | Component::Blk => {
            let device = if c == Component::Net { "net" } else { "blk" };
            manager::local::host_pids(&cf, host)
                .map_err(anyhow::Error::msg)?
                .into_iter()
                .map(|p| (p, cmdline(p)))
                .filter(|(_, a)| a.windows(2).any(|w| w[0] == "backend" && w[1] == device) && vm.is_none_or(|v| has_flag(a, "--vm", v)))
                .collect()
        }
        Component::Agent => manager::local::host_pids(&cf, host)
            .map_err(anyhow::Error::msg)?
            .into_iter()
            .map(|p| (p, cmdline(p)))
            .filter(|(_, a)| a.get(1).is_some_and(|x| x == "agent") && has_flag(a, "--host", host) && !a.iter().any(|x| x == "--respawn"))
            .collect(),
        Component::Store => {
            // The store server is the child of its supervisor (the host's own front end with
            // etcd, else the cluster's one store).
            let sup =
                cf.pids.get(&format!("store:{host}")).or_else(|| cf.pids.get("store")).copied().context("no store in this cluster")?;
            let children = std::fs::read_to_string(format!("/proc/{sup}/task/{sup}/children")).unwrap_or_default();
            children
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .map(|p| (p, cmdline(p)))
                .filter(|(_, a)| a.iter().any(|x| x == "serve"))
                .collect()
        }
    };
    let name = match c {
        Component::Net | Component::Blk => format!("{} backend", format!("{c:?}").to_lowercase()),
        _ => format!("{c:?}").to_lowercase(),
    };
    let (pid, _) = match &candidates[..] {
        [one] => one.clone(),
        [] => bail!(
            "host {host} runs no {name} process{} (a VM's network backend is a process with `net_backend = \"process\"` in its [[run]]; a disk's with `disk = \"SIZE\"` and `blk_backend = \"process\"`)",
            vm.map(|v| format!(" for VM {v}")).unwrap_or_default()
        ),
        many => bail!(
            "host {host} runs {} {name} processes (pids {}): name the VM with --vm",
            many.len(),
            many.iter().map(|(p, _)| p.to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    let sig = if hang { libc::SIGSTOP } else { libc::SIGKILL };
    // SAFETY: kill(2) of a process just found by its command line; no memory is involved.
    if unsafe { libc::kill(pid as i32, sig) } != 0 {
        bail!("kill {pid}: {}", std::io::Error::last_os_error());
    }
    println!(
        "host {host}: {name}{} (pid {pid}) {}",
        vm.map(|v| format!(" of {v}")).unwrap_or_default(),
        if hang { "stopped (SIGSTOP): a hang" } else { "killed (SIGKILL): a crash" }
    );
    Ok(0)
}

/// `vigil fail --instance VM#K`: the instance's VMM, found in the voter's `local.json` on
/// whichever host runs the VM, SIGKILLed or SIGSTOPped.
fn fail_instance(dir: &std::path::Path, which: &str, hang: bool, wrong: Option<u64>) -> Result<u8> {
    let Some((vm, k)) = which.split_once('#') else { bail!("--instance {which:?}: expected VM#K (K from 1)") };
    let k: usize = k.parse().ok().filter(|&k| k >= 1).with_context(|| format!("--instance {which:?}: K is a number from 1"))?;
    let hosts = std::fs::read_dir(dir.join("hosts")).with_context(|| format!("no cluster in {} (vigil up?)", dir.display()))?;
    let mut found = None;
    for h in hosts.flatten() {
        let state = h.path().join(format!("{vm}.primary.json.local")).join("local.json");
        let Ok(text) = std::fs::read_to_string(&state) else { continue };
        let v: agent::voter::driver::GroupState =
            serde_json::from_str(&text).with_context(|| format!("{}: not a voter's state", state.display()))?;
        let newer = std::fs::metadata(&state).and_then(|m| m.modified()).ok();
        if found.as_ref().is_none_or(|(_, t, _, _)| newer > *t) {
            found = Some((v, newer, h.file_name().to_string_lossy().into_owned(), state.with_file_name("voter.sock")));
        }
    }
    let Some((state, _, host, control)) = found else { bail!("VM {vm:?} runs no voted instances in this cluster (mode local)") };
    let Some(inst) = state.instances.get(k - 1) else { bail!("VM {vm} has {} instances: there is no #{k}", state.instances.len()) };
    if let Some(n) = wrong {
        use std::io::{BufRead, Write};
        let control = std::fs::canonicalize(&control).unwrap_or(control);
        let mut s = unixsock::connect(&control).with_context(|| format!("the voter of {vm} ({})", control.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        writeln!(s, "inject {} DEBUG WRONG-ANSWERS {n}", k - 1)?;
        let mut answer = String::new();
        std::io::BufReader::new(s).read_line(&mut answer)?;
        if answer.trim() != "ok" {
            bail!("{vm}#{k}: the voter says {}", answer.trim());
        }
        println!("{vm}#{k} on {host}: one reply in {n} is wrong from now on");
        return Ok(0);
    }
    // A pid that no longer names a VMM is refused (its command line is checked first).
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", inst.pid)).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains("vm\0") {
        bail!("{vm}#{k}: its VMM (pid {}) is not running", inst.pid);
    }
    let out = std::process::Command::new("kill").args([if hang { "-STOP" } else { "-KILL" }, &inst.pid.to_string()]).output()?;
    if !out.status.success() {
        bail!("{vm}#{k}: kill {}: {}", inst.pid, String::from_utf8_lossy(&out.stderr).trim());
    }
    println!("{vm}#{k} on {host}: VMM {} {}", inst.pid, if hang { "stopped (SIGSTOP): a hang" } else { "killed (SIGKILL): a crash" });
    Ok(0)
}

pub fn down(a: &DirArgs) -> Result<u8> {
    local::down(&a.dir).map_err(anyhow::Error::msg)?;
    Ok(0)
}

pub fn agent(a: &AgentArgs) -> Result<u8> {
    if a.period_ms == 0 || a.period_ms * 3 > a.lease_ms {
        bail!("--period-ms {} must be positive and at most a third of --lease-ms {}", a.period_ms, a.lease_ms);
    }
    let exe = std::env::current_exe().context("cannot find the vigil executable")?;
    if a.respawn {
        let args: Vec<String> = std::env::args().skip(1).filter(|x| x != "--respawn").collect();
        // Hung: no heartbeat for a quarter lease and a period. The agent's fencing watchdog
        // sends it every 1/20 lease while the agent's loop goes round (`agent::host::ALIVE_FD`),
        // whatever the store does, so an agent stopped whole (SIGSTOP) is replaced with time
        // left for the new one to renew the host's lease (its watchdog fences the host at nine
        // tenths of a lease after the last renewal), while one that waits long for a slow
        // store, or is cut off from it and goes on to fence itself, is not.
        let hang = Duration::from_millis(a.lease_ms / 4 + a.period_ms);
        return respawn(&exe, &args, hang);
    }
    let cfg = agent::host::Config {
        host: a.host.clone(),
        store: a.store.clone(),
        state_dir: a.state.clone(),
        exe,
        period: Duration::from_millis(a.period_ms),
        lease: Duration::from_millis(a.lease_ms),
    };
    agent::host::run(&cfg)?;
    Ok(0)
}

/// Keeps `exe ARGS` running: starts it again when it dies (at once, then backing off while
/// it keeps dying within a second), or when it hangs (no heartbeat on its pipe for `hang`:
/// it is SIGKILLed first); ends when it ends with status 0.
///
/// The heartbeat is a byte on a pipe whose writing end the child inherits (its number in
/// `agent::host::ALIVE_FD`), not a file: neither side ever waits for a disk.
fn respawn(exe: &std::path::Path, args: &[String], hang: Duration) -> Result<u8> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut fds = [0i32; 2];
    // SAFETY: pipe2(2) writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        bail!("cannot create the agent's heartbeat pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both were just returned by the kernel and are owned by nobody else.
    let (beats, beat_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The child inherits the writing end (and only it).
    // SAFETY: fcntl(2) on a descriptor we own; clears its close-on-exec flag.
    unsafe { libc::fcntl(beat_end.as_raw_fd(), libc::F_SETFD, 0) };
    let heard = || {
        let mut buf = [0u8; 256];
        let mut any = false;
        // SAFETY: reads into a live local buffer from a non-blocking descriptor we own.
        while unsafe { libc::read(beats.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {
            any = true;
        }
        any
    };
    let mut fast_deaths = 0u32;
    loop {
        let started = std::time::Instant::now();
        // What a previous child sent does not count for this one.
        heard();
        let mut child = std::process::Command::new(exe)
            .args(args)
            .env(agent::host::ALIVE_FD, beat_end.as_raw_fd().to_string())
            .spawn()
            .context("cannot start the agent")?;
        // Only a heartbeat this child sent counts (it takes a while to start).
        let mut last: Option<std::time::Instant> = None;
        let st = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if heard() {
                last = Some(std::time::Instant::now());
            }
            if last.is_some_and(|t| t.elapsed() > hang) {
                tracing::warn!("agent (pid {}) hung: no heartbeat for {} ms; killing it", child.id(), hang.as_millis());
                let _ = child.kill();
                break child.wait()?;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if st.success() {
            return Ok(0);
        }
        fast_deaths = if started.elapsed() < Duration::from_secs(1) { fast_deaths + 1 } else { 0 };
        tracing::warn!("agent ended ({st}); starting it again");
        if fast_deaths > 3 {
            std::thread::sleep(Duration::from_millis(100 << fast_deaths.min(6)));
        }
    }
}

pub fn manager(a: &ManagerArgs) -> Result<u8> {
    let cf = ClusterFile::load(&a.dir).map_err(anyhow::Error::msg)?;
    let loaded = model::load(&cf.model).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = manager::daemon::Config {
        id: a.id.clone(),
        store: cf.store.clone(),
        period: Duration::from_millis(cf.period_ms),
        poll: Duration::from_millis(10),
        lease: Duration::from_millis(cf.lease_ms),
        grace: Duration::from_millis(cf.lease_ms * 10),
        faults: a.faults,
    };
    // The dashboard is for people: a manager without one still manages.
    if let Some(addr) = &a.http {
        match manager::dashboard::serve(addr, cf.store.clone(), loaded.clone(), a.id.clone()) {
            Ok(bound) => tracing::info!("manager {}: dashboard on http://{bound}/", a.id),
            Err(e) => tracing::error!("manager {}: NO DASHBOARD: cannot listen on {addr}: {e}", a.id),
        }
    }
    let mut layout = cf.layout();
    let notes = layout.analyse_policies(&loaded);
    if !notes.is_empty() {
        if let Ok(mut c) = store::Client::connect(&cf.store) {
            for n in notes {
                tracing::info!("manager {}: {n}", a.id);
                let _ = agent::cluster::log_event(&mut c, &agent::cluster::Event::now(&a.id, n));
            }
        }
    }
    manager::daemon::run(&cfg, &loaded, &layout)?;
    Ok(0)
}

fn print_status(st: &local::Status) {
    let leader = st.leader.as_ref().map_or("none".to_string(), |l| format!("{} (generation {})", l.id, l.generation));
    println!("manager: {leader}; failed hosts: {}", if st.failed.is_empty() { "none".into() } else { st.failed.join(", ") });
    let rows: Vec<Vec<String>> = st
        .hosts
        .iter()
        .map(|h| {
            vec![
                h.host.clone(),
                h.heartbeat.map_or("-".into(), |b| b.to_string()),
                if h.fenced { "FENCED".into() } else { "ok".into() },
                h.agent_pid.map_or("-".into(), |p| p.to_string()),
            ]
        })
        .collect();
    print!("{}", model::text::table("hosts", &["host", "heartbeat", "state", "agent pid"], &rows));
    let rows: Vec<Vec<String>> = st
        .vms
        .iter()
        .map(|v| {
            vec![
                v.vm.clone(),
                v.mode.clone(),
                v.host.clone().unwrap_or_else(|| "-".into()),
                v.backup.clone().unwrap_or_else(|| "-".into()),
                if v.serving { "serving".into() } else { "DOWN".into() },
                // With the checkpoint policy it runs (the `analysed` one adapts).
                match &v.figures {
                    Some(f) if v.replication != "-" => format!("{} {}", v.replication, f.policy),
                    _ => v.replication.clone(),
                },
                v.detail.clone(),
            ]
        })
        .collect();
    print!("{}", model::text::table("VMs", &["vm", "mode", "host", "backup", "state", "replication", "detail"], &rows));
    if let Some(p) = &st.plan {
        let rows: Vec<Vec<String>> = p
            .chains
            .iter()
            .map(|c| {
                let ms = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.3} ms"));
                let m = st.measured.get(&c.chain);
                // A measured latency above the analysed bound means the model (or the analysis)
                // misses something that runs: say so where it shows.
                let above = m.zip(c.worst_ms).is_some_and(|(m, w)| m.max_ms > w);
                let measured = m.map_or("-".into(), |m| {
                    format!("{:.2} / {:.2} / {:.2} ms{}", m.p50_ms, m.p99_ms, m.max_ms, if above { " ABOVE THE BOUND" } else { "" })
                });
                let late = m.map_or("-".into(), |m| format!("{} of {}", m.over_deadline, m.samples));
                vec![c.chain.clone(), ms(c.worst_ms), ms(c.deadline_ms), c.status.clone(), measured, late]
            })
            .collect();
        let scenario = if p.failed.is_empty() { "no host failed".to_string() } else { format!("{} failed", p.failed.join(", ")) };
        let title = format!("plan in force: {scenario} ({})", p.coverage);
        print!("{}", model::text::table(&title, &["chain", "bound", "deadline", "analysis", "measured p50 / p99 / max", "late"], &rows));
    }
    for d in &st.deviations {
        println!("DEVIATION from the plan: {d}");
    }
    let cov: Vec<String> = st.coverage.iter().map(|(s, c)| format!("{s}: {c}")).collect();
    println!("plan table: {}", cov.join(", "));
    for (id, url) in &st.dashboards {
        println!("dashboard of manager {id}: {url}  (Prometheus: {url}metrics)");
    }
    for e in st.events.iter().rev().take(8).rev() {
        println!("  event [{}] {}", e.source, e.what);
    }
}
