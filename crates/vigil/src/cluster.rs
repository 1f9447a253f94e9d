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
    host: String,
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
    let out = serde_json::json!({
        "vm": v.vm, "host": v.host, "backup": v.backup, "serving": v.serving,
        "jobs": v.jobs, "wcet_us": v.wcet_us, "replication": v.figures, "protection": v.replication,
        "chains": chains, "events": events,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(0)
}

pub fn fail(a: &FailArgs) -> Result<u8> {
    if a.heal {
        local::heal(&a.dir.dir, &a.host).map_err(anyhow::Error::msg)?;
        println!("host {}: its link restored", a.host);
        return Ok(0);
    }
    let pids = local::fail(&a.dir.dir, &a.host, a.partition).map_err(anyhow::Error::msg)?;
    if a.partition {
        println!("host {}: its link cut (its processes run on)", a.host);
    } else {
        println!("host {}: {} process(es) killed (SIGKILL), its link cut", a.host, pids.len());
    }
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
        return respawn(&exe, &args);
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
/// it keeps dying within a second); ends when it ends with status 0.
fn respawn(exe: &std::path::Path, args: &[String]) -> Result<u8> {
    let mut fast_deaths = 0u32;
    loop {
        let started = std::time::Instant::now();
        let st = std::process::Command::new(exe).args(args).status().context("cannot start the agent")?;
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
                v.replication.clone(),
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
