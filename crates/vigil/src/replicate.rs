//! `vigil arbiter` (the fencing lease service), `vigil backup` (the backup host's side of
//! checkpoint replication) and the `--protect` options of `vigil vm run` (the primary's side).
//! The `agent` crate does the work.

use agent::vm::{hostname, BackupSpec, Protection, TimingSpec};
use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use replication::PolicySpec;
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
    pub fn spec(&self) -> TimingSpec {
        TimingSpec { heartbeat_ms: self.heartbeat_ms, timeout_ms: self.timeout_ms, lease_ms: self.lease_ms, renew_ms: self.renew_ms }
    }
}

/// The primary's protection options of `vigil vm run`.
#[derive(ClapArgs, Clone, Debug)]
pub struct ProtectArgs {
    /// Protect the VM by checkpoint replication to the backup listening at HOST:PORT
    /// (`vigil backup --listen`).
    #[arg(long, value_name = "HOST:PORT", requires = "arbiter")]
    pub protect: Option<String>,
    /// The lease service that fences the VM's copies: the arbiter (`vigil arbiter`) at
    /// HOST:PORT, or `store:SOCKET` (the VM's lease record in vigil's store, no arbiter).
    #[arg(long, value_name = "HOST:PORT|store:SOCKET")]
    pub arbiter: Option<String>,
    /// Checkpoint policy: fixed:T (ms), floating, network, adaptive[:BASE:MAX].
    #[arg(long, default_value = "adaptive")]
    pub policy: PolicySpec,
    /// The VM's name at the arbiter (default: the image's file name).
    #[arg(long)]
    pub name: Option<String>,
    /// This host's name at the arbiter (default: the host name).
    #[arg(long)]
    pub holder: Option<String>,
    /// Print a line of statistics per checkpoint on stderr.
    #[arg(long)]
    pub stats: bool,
    /// How checkpoints find dirty pages: auto (per epoch, the cheaper as measured on this
    /// host), log (KVM's dirty log), compare (against the last checkpoint's copy) or hybrid
    /// (log for cold pages, compare for hot ones).
    #[arg(long, default_value = "auto")]
    pub tracking: vmm::TrackingChoice,
    /// How checkpoint pages travel: auto (per checkpoint, compressed when the link is the
    /// bottleneck, as measured, as LZ4 or as XOR deltas, whichever pays), lz4 (`on`), xor (XOR
    /// against the backup's copy of each page, then LZ4) or off.
    #[arg(long, default_value = "auto")]
    pub compression: replication::compress::Compression,
    /// Serve Prometheus metrics (GET /metrics) and the policy switch (POST /policy) here.
    #[arg(long, value_name = "HOST:PORT")]
    pub control: Option<String>,
    /// The cluster's key file (16 to 4096 bytes, e.g. `head -c 32 /dev/urandom`): the
    /// backup and the arbiter authenticate with it.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    #[command(flatten)]
    pub timing: TimingArgs,
}

/// `vigil backup`.
#[derive(ClapArgs)]
pub struct BackupArgs {
    /// Run the backup a spec file describes (JSON `agent::vm::BackupSpec`, as the agent
    /// writes them).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["listen", "arbiter"])]
    spec: Option<PathBuf>,
    /// Address to listen on for the primary (HOST:PORT).
    #[arg(long, required_unless_present = "spec")]
    listen: Option<String>,
    /// The lease service: the arbiter at HOST:PORT, or `store:SOCKET` (the VM's lease record
    /// in vigil's store).
    #[arg(long, value_name = "HOST:PORT|store:SOCKET", required_unless_present = "spec")]
    arbiter: Option<String>,
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
    policy: PolicySpec,
    /// The cluster's key file: the primary and the arbiter authenticate with it.
    #[arg(long, value_name = "FILE", required_unless_present = "spec")]
    key_file: Option<PathBuf>,
    /// After a takeover, run the vCPU under this hard CBS reservation (SCHED_DEADLINE), e.g.
    /// `2ms/10ms`.
    #[arg(long, value_name = "Q/P")]
    reservation: Option<agent::realtime::Reservation>,
    #[command(flatten)]
    timing: TimingArgs,
}

/// `vigil arbiter`.
#[derive(ClapArgs)]
pub struct ArbiterArgs {
    /// Address to listen on (HOST:PORT).
    #[arg(long)]
    listen: String,
    /// The lease table's durable state (created if missing): a file, or `store:SOCKET` for the
    /// cluster store (replicated when the store runs on etcd). Generations, holders and
    /// registered backups survive a restart, and a restarted arbiter waits out the leases it
    /// may have granted before it grants new ones.
    #[arg(long, value_name = "FILE|store:SOCKET")]
    state: agent::arbiter::State,
    /// The cluster's key file: only clients holding it get leases.
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
}

impl ProtectArgs {
    /// The protection these options ask for (none without `--protect`), checked.
    pub fn protection(&self) -> Result<Option<Protection>> {
        let Some(backup) = self.protect.clone() else { return Ok(None) };
        let p = Protection {
            backup,
            arbiter: self.arbiter.clone().context("--protect needs --arbiter")?,
            holder: self.holder.clone().unwrap_or_else(hostname),
            policy: self.policy,
            timing: self.timing.spec(),
            stats: self.stats,
            control: self.control.clone(),
            state_file: None,
            key_file: self.key_file.clone().context("--protect needs --key-file (the cluster's key)")?,
        };
        p.timing.timing()?;
        Ok(Some(p))
    }
}

/// `vigil backup`: runs until it took over and the VM stopped.
pub fn backup(a: &BackupArgs) -> Result<u8> {
    if let Some(file) = &a.spec {
        return Ok(agent::vm::run_backup(&crate::vm::load_spec::<BackupSpec>(file)?)?);
    }
    let spec = BackupSpec {
        listen: a.listen.clone().context("--listen")?,
        arbiter: a.arbiter.clone().context("--arbiter")?,
        holder: a.holder.clone().unwrap_or_else(hostname),
        tap: a.tap.clone(),
        bridge: None,
        disk: a.disk.clone(),
        disk_mib: None,
        api: a.api.clone(),
        control: a.control.clone(),
        stats: a.stats,
        then_protect: a.protect.clone(),
        then_policy: a.policy,
        state_file: None,
        timing: a.timing.spec(),
        key_file: a.key_file.clone().context("--key-file")?,
        scheduling: agent::vm::Scheduling { reservation: a.reservation, ..Default::default() },
        local: None,
    };
    Ok(agent::vm::run_backup(&spec)?)
}

/// `vigil arbiter`: serves leases until killed.
pub fn arbiter(a: &ArbiterArgs) -> Result<u8> {
    match agent::vm::serve_arbiter(&a.listen, &a.state, &a.key_file)? {}
}

/// `vigil key`.
#[derive(ClapArgs)]
pub struct KeyArgs {
    #[command(subcommand)]
    what: KeyCommand,
}

#[derive(clap::Subcommand)]
enum KeyCommand {
    /// Write a new random key to FILE (mode 0600); an existing file is left as it is.
    New { file: PathBuf },
    /// Print the bearer token that `POST /policy` on a `--control` address needs.
    Token {
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
    },
}

/// `vigil key new|token`.
pub fn key(a: &KeyArgs) -> Result<u8> {
    match &a.what {
        KeyCommand::New { file } => agent::auth::Key::generate(file)?,
        KeyCommand::Token { key_file } => println!("{}", agent::auth::Key::load(key_file)?.control_token()),
    }
    Ok(0)
}
