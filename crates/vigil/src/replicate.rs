//! `vigil arbiter` (the fencing lease service), `vigil backup` (the backup host's side of
//! checkpoint replication) and the `--protect` options of `vigil vm run` (the primary's side).
//! The `replication` crate does the work.

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use replication::driver::{self, primary::Outcome};
use replication::Timing;
use std::path::PathBuf;

/// Heartbeat, failure detection and lease timing (both sides should agree).
#[derive(ClapArgs, Clone, Debug)]
pub struct TimingArgs {
    /// Milliseconds between heartbeats.
    #[arg(long, default_value_t = 10)]
    pub heartbeat_ms: u64,
    /// Milliseconds of silence after which the peer is suspected.
    #[arg(long, default_value_t = 60)]
    pub timeout_ms: u64,
    /// Milliseconds a lease lasts at the arbiter.
    #[arg(long, default_value_t = 90)]
    pub lease_ms: u64,
    /// Milliseconds between lease renewals.
    #[arg(long, default_value_t = 20)]
    pub renew_ms: u64,
}

impl TimingArgs {
    pub fn timing(&self) -> Result<Timing> {
        const MS: u64 = 1_000_000;
        let t = Timing {
            heartbeat_ns: self.heartbeat_ms * MS,
            timeout_ns: self.timeout_ms * MS,
            lease_ttl_ns: self.lease_ms * MS,
            lease_renew_ns: self.renew_ms * MS,
            reconnect_ns: Timing::default().reconnect_ns,
        };
        t.validate().map_err(anyhow::Error::msg)?;
        Ok(t)
    }
}

/// The primary's protection options of `vigil vm run`.
#[derive(ClapArgs, Clone, Debug)]
pub struct ProtectArgs {
    /// Protect the VM by checkpoint replication to the backup listening at HOST:PORT
    /// (`vigil backup --listen`).
    #[arg(long, value_name = "HOST:PORT", requires = "arbiter")]
    pub protect: Option<String>,
    /// The fencing arbiter (`vigil arbiter`) at HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub arbiter: Option<String>,
    /// Checkpoint policy: fixed:T (ms), floating, network, adaptive[:BASE:MAX].
    #[arg(long, default_value = "adaptive")]
    pub policy: String,
    /// The VM's name at the arbiter (default: the image's file name).
    #[arg(long)]
    pub name: Option<String>,
    /// This host's name at the arbiter (default: the host name).
    #[arg(long)]
    pub holder: Option<String>,
    /// Print a line of statistics per checkpoint on stderr.
    #[arg(long)]
    pub stats: bool,
    /// Serve Prometheus metrics (GET /metrics) and the policy switch (POST /policy) here.
    #[arg(long, value_name = "HOST:PORT")]
    pub control: Option<String>,
    #[command(flatten)]
    pub timing: TimingArgs,
}

/// `vigil backup`.
#[derive(ClapArgs)]
pub struct BackupArgs {
    /// Address to listen on for the primary (HOST:PORT).
    #[arg(long)]
    listen: String,
    /// The fencing arbiter at HOST:PORT.
    #[arg(long)]
    arbiter: String,
    /// This host's name at the arbiter (default: the host name).
    #[arg(long)]
    holder: Option<String>,
    /// The tap device the VM gets on this host after a takeover.
    #[arg(long)]
    tap: Option<String>,
    /// This host's copy of the VM's disk (kept in step; uncommitted writes never reach it).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// The VM's control socket after a takeover.
    #[arg(long)]
    api: Option<PathBuf>,
    /// Serve Prometheus metrics here (GET /metrics).
    #[arg(long, value_name = "HOST:PORT")]
    control: Option<String>,
    /// Print protocol events on stderr.
    #[arg(long)]
    stats: bool,
    /// After a takeover, protect the VM with a new backup at HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    protect: Option<String>,
    /// After a takeover, the checkpoint policy.
    #[arg(long, default_value = "adaptive")]
    policy: String,
    #[command(flatten)]
    timing: TimingArgs,
}

/// `vigil arbiter`.
#[derive(ClapArgs)]
pub struct ArbiterArgs {
    /// Address to listen on (HOST:PORT).
    #[arg(long)]
    listen: String,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "host".into())
}

/// Exit status of a protected VM's process: the guest's, 3 if it faulted, 4 if fenced.
pub fn outcome_status(o: Outcome) -> u8 {
    match o {
        Outcome::Stopped(vmm::Stop::Exited(s)) => s.min(255) as u8,
        Outcome::Stopped(vmm::Stop::Quit) => 0,
        Outcome::Stopped(vmm::Stop::Fault(reason)) => {
            eprintln!("guest fault: {reason}");
            3
        }
        Outcome::Fenced { .. } => 4,
    }
}

/// Runs `vm` protected (the primary's side).
pub fn run_protected(vm: vmm::Vm, p: &ProtectArgs, name: &str, disk: Option<PathBuf>, api: Option<&std::path::Path>) -> Result<u8> {
    let arbiter = p.arbiter.clone().context("--protect needs --arbiter")?;
    let policy = replication::policy::parse(&p.policy).map_err(anyhow::Error::msg)?;
    let (ctl, inbox) = vmm::channel_pair()?;
    let _api = match api {
        Some(path) => Some(vmm::api::serve(path, ctl.clone())?),
        None => None,
    };
    let opts = driver::primary::Options {
        vm: p.name.clone().unwrap_or_else(|| name.to_owned()),
        holder: p.holder.clone().unwrap_or_else(hostname),
        backup: p.protect.clone(),
        arbiter,
        policy,
        timing: p.timing.timing()?,
        stats_lines: p.stats,
        control: p.control.clone(),
        disk,
    };
    let outcome =
        driver::primary::run(vm, ctl, inbox, opts, driver::primary::Start::Fresh, driver::Clock::new()).map_err(anyhow::Error::msg)?;
    Ok(outcome_status(outcome))
}

/// `vigil backup`: runs until it took over and the VM stopped.
pub fn backup(a: &BackupArgs) -> Result<u8> {
    replication::policy::parse(&a.policy).map_err(anyhow::Error::msg)?;
    let opts = driver::backup::Options {
        listen: a.listen.clone(),
        holder: a.holder.clone().unwrap_or_else(hostname),
        arbiter: a.arbiter.clone(),
        tap: a.tap.clone(),
        disk: a.disk.clone(),
        timing: a.timing.timing()?,
        stats_lines: a.stats,
        control: a.control.clone(),
        api: a.api.clone(),
        then_protect: a.protect.clone(),
        then_policy: a.policy.clone(),
    };
    if let Some(d) = &opts.disk {
        if !d.exists() {
            bail!("--disk {}: no such file (give the backup a copy of the VM's disk image, of the same size)", d.display());
        }
    }
    let outcome = driver::backup::run(opts).map_err(anyhow::Error::msg)?;
    Ok(outcome_status(outcome))
}

/// `vigil arbiter`: serves leases until killed.
pub fn arbiter(a: &ArbiterArgs) -> Result<u8> {
    let listener = std::net::TcpListener::bind(&a.listen).with_context(|| format!("cannot listen on {}", a.listen))?;
    let arb = replication::lease::serve(listener)?;
    eprintln!("arbiter: serving leases on {}", arb.addr);
    loop {
        std::thread::park();
    }
}
