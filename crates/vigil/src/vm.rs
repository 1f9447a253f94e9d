//! `vigil vm`: run, restore and control unikernel VMs (the `agent` and `vmm` crates do the work).

use agent::vm::{Ipv4Cidr, Mac, NetSpec, RunReport, Scheduling};
use agent::VmSpec;
use anyhow::{bail, Context, Result};
use clap::{Args as ClapArgs, Subcommand};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use vmm::{api, snapshot::RestoreOverrides, Command};

#[derive(ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(Subcommand)]
enum VmCommand {
    /// Boot a guest image. Exit status: the guest's own (0-123), 124 the guest's status was
    /// above 123 (it is printed on stderr and in --json), 125 the VMM failed (bad input, KVM,
    /// I/O), 126 the guest faulted, 127 another copy took over (fenced).
    Run(Box<RunArgs>),
    /// Continue a VM from a snapshot directory, in this new process (exit status as `run`).
    Restore(RestoreArgs),
    /// Pause a running VM (its clock stops).
    Pause(ApiArg),
    /// Resume a paused VM.
    Resume(ApiArg),
    /// Print a running VM's state as JSON.
    Status(ApiArg),
    /// Pause a VM and write a snapshot into DIR (it stays paused).
    Snapshot {
        dir: PathBuf,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Dirty-page log: start, stop, or get (and clear) the dirty pages as JSON.
    DirtyLog {
        #[arg(value_parser = ["start", "stop", "get"])]
        action: String,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Network output buffering (for replication): hold, seal (prints the epoch), release
    /// EPOCH (sends the output of sealed epochs up to EPOCH), unhold.
    NetOutput {
        #[arg(value_parser = ["hold", "seal", "release", "unhold"])]
        action: String,
        /// Epoch for `release`.
        epoch: Option<u64>,
        #[command(flatten)]
        api: ApiArg,
    },
    /// End a running VM.
    Quit(ApiArg),
}

#[derive(ClapArgs)]
struct ApiArg {
    /// Control socket of the VM.
    #[arg(long)]
    api: PathBuf,
}

#[derive(ClapArgs)]
struct RunArgs {
    /// Run the VM a spec file describes (JSON `agent::VmSpec`, as the agent writes them);
    /// no other option is taken then.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["image", "args"])]
    spec: Option<PathBuf>,
    /// Guest image (static ELF built with the guest SDK).
    #[arg(long, required_unless_present = "spec")]
    image: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64)]
    mem: u64,
    /// Disk image file.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Where the disk's host I/O runs: `vmm` (in this process) or `process` (a supervised
    /// backend process, `vigil backend blk`, restarted alone when it fails).
    #[arg(long, default_value = "vmm", value_name = "vmm|process", requires = "disk")]
    blk_backend: agent::vm::BackendPlace,
    /// Tap device for the network card (created if missing).
    #[arg(long)]
    tap: Option<String>,
    /// Guest IPv4 address with prefix length, e.g. 10.0.0.2/24.
    #[arg(long)]
    ip: Option<Ipv4Cidr>,
    /// Guest IPv4 gateway.
    #[arg(long)]
    gateway: Option<Ipv4Addr>,
    /// Guest MAC address, e.g. 52:54:00:12:34:56.
    #[arg(long)]
    mac: Option<Mac>,
    /// Where the network card's host I/O runs: `vmm` (in this process) or `process` (a
    /// supervised backend process, `vigil backend net`, restarted alone when it fails).
    #[arg(long, default_value = "vmm", value_name = "vmm|process", requires = "tap")]
    net_backend: agent::vm::BackendPlace,
    /// Control socket.
    #[arg(long)]
    api: Option<PathBuf>,
    /// Start with dirty-page logging on.
    #[arg(long)]
    dirty_log: bool,
    /// Guest memory as a shared memfd even without backend processes (to compare the kinds
    /// of memory: `vigil bench components`).
    #[arg(long, hide = true)]
    shared_memory: bool,
    /// When the VM ends, print how as one JSON line on stdout (after the guest's output):
    /// outcome, the guest's own status, the fault, the exit status.
    #[arg(long)]
    json: bool,
    /// Pin the VMM to these CPUs (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "CPU,...")]
    cpus: Vec<usize>,
    /// Run the vCPU under SCHED_FIFO at this real-time priority (1..=99); with a reservation
    /// the VMM enforces, the priority it runs at (default 90).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=99))]
    priority: Option<u8>,
    /// Run the vCPU under a hard reservation: runtime Q every period P, e.g. `2ms/10ms` (the
    /// VMM's other threads stay outside it).
    #[arg(long, value_name = "Q/P")]
    reservation: Option<agent::realtime::Reservation>,
    /// Who enforces the reservation: `kernel` (SCHED_DEADLINE), `vmm` (the VMM's periodic
    /// server over SCHED_FIFO), `auto` (the kernel unless this host's KVM cannot run a vCPU
    /// under SCHED_DEADLINE: nested PVM).
    #[arg(long, default_value = "auto", requires = "reservation")]
    enforcer: agent::realtime::Enforcer,
    #[command(flatten)]
    domain: DomainArgs,
    #[command(flatten)]
    protect: crate::replicate::ProtectArgs,
    /// Arguments for the guest.
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(ClapArgs)]
struct RestoreArgs {
    /// Snapshot directory.
    dir: PathBuf,
    /// Tap device; required when the snapshot's VM had one (a snapshot's host paths are not
    /// trusted: the command line confirms them).
    #[arg(long)]
    tap: Option<String>,
    /// Disk image; required when the snapshot's VM had one (as for --tap).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Control socket.
    #[arg(long)]
    api: Option<PathBuf>,
    /// Stay paused until a `resume` on the control socket.
    #[arg(long, requires = "api")]
    paused: bool,
    /// Run the vCPU under a hard reservation, e.g. `2ms/10ms` (as `run --reservation`).
    #[arg(long, value_name = "Q/P")]
    reservation: Option<agent::realtime::Reservation>,
    /// As `run --enforcer`.
    #[arg(long, default_value = "auto", requires = "reservation")]
    enforcer: agent::realtime::Enforcer,
    /// As `run --json`.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    domain: DomainArgs,
}

/// Announcing the VM in the control-plane store (`vigil store serve`).
#[derive(ClapArgs)]
struct DomainArgs {
    /// Store socket: the VM is introduced there as a domain when it starts (@introduceDomain,
    /// /local/domain/<domid>) and released when it stops (@releaseDomain).
    #[arg(long, requires = "domid", value_name = "SOCKET")]
    store: Option<PathBuf>,
    /// Domain id of the VM in the store (1 and up; 0 is the control domain).
    #[arg(long, requires = "store", value_parser = clap::value_parser!(u32).range(1..))]
    domid: Option<u32>,
}

impl DomainArgs {
    fn spec(&self) -> Option<agent::domain::DomainSpec> {
        Some(agent::domain::DomainSpec { store: self.store.clone()?, domid: self.domid? })
    }
}

/// Runs a `vigil vm` subcommand; returns the process exit status.
pub fn run(args: &Args) -> Result<u8> {
    match &args.command {
        VmCommand::Run(a) => {
            let name = a.spec.as_ref().or(a.image.as_ref()).and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
            let name = a.protect.name.clone().or(name).unwrap_or_else(|| "vm".into());
            Ok(finish(a.json, &name, run_spec(a).and_then(|spec| Ok(agent::vm::run_outcome(&spec)?))))
        }
        VmCommand::Restore(a) => {
            let overrides = RestoreOverrides { tap: a.tap.clone(), disk: a.disk.clone(), backend_program: std::env::current_exe().ok() };
            let sched = Scheduling { cpus: Vec::new(), fifo_priority: None, reservation: a.reservation, enforcer: a.enforcer };
            let outcome = agent::vm::restore(&a.dir, &overrides, a.paused, a.api.as_deref(), a.domain.spec().as_ref(), &sched);
            Ok(finish(a.json, &a.dir.display().to_string(), outcome.map_err(anyhow::Error::from)))
        }
        VmCommand::Pause(api) => simple(&api.api, Command::Pause),
        VmCommand::Resume(api) => simple(&api.api, Command::Resume),
        VmCommand::Status(api) => simple(&api.api, Command::Status),
        VmCommand::Quit(api) => simple(&api.api, Command::Quit),
        VmCommand::Snapshot { dir, api } => {
            let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
            simple(&api.api, Command::Snapshot { dir })
        }
        VmCommand::NetOutput { action, epoch, api } => {
            let cmd = match action.as_str() {
                "hold" => Command::NetHold,
                "seal" => Command::NetSeal,
                "release" => Command::NetRelease { epoch: epoch.context("release needs an EPOCH")? },
                _ => Command::NetUnhold,
            };
            simple(&api.api, cmd)
        }
        VmCommand::DirtyLog { action, api } => {
            let cmd = match action.as_str() {
                "start" => Command::DirtyLogStart,
                "stop" => Command::DirtyLogStop,
                _ => Command::DirtyLogGetAndClear,
            };
            simple(&api.api, cmd)
        }
    }
}

/// The VM spec `vigil vm run` describes.
fn run_spec(a: &RunArgs) -> Result<VmSpec> {
    if let Some(file) = &a.spec {
        return load_spec::<VmSpec>(file);
    }
    let image = a.image.clone().context("--image or --spec")?;
    let mut spec = VmSpec::new(&image, a.mem);
    spec.args = a.args.clone();
    spec.disk = a.disk.clone();
    spec.disk_backend = a.blk_backend;
    spec.api = a.api.clone();
    spec.dirty_log = a.dirty_log;
    spec.shared_memory = a.shared_memory;
    spec.tracking = a.protect.tracking;
    spec.compression = a.protect.compression;
    spec.domain = a.domain.spec();
    spec.net = a.tap.clone().map(|tap| NetSpec { tap, ip: a.ip, gateway: a.gateway, mac: a.mac, bridge: None, backend: a.net_backend });
    if a.tap.is_none() && (a.ip.is_some() || a.gateway.is_some() || a.mac.is_some()) {
        bail!("--ip, --gateway and --mac need --tap");
    }
    spec.scheduling = Scheduling { cpus: a.cpus.clone(), fifo_priority: a.priority, reservation: a.reservation, enforcer: a.enforcer };
    if let Some(name) = &a.protect.name {
        spec.name = name.clone();
    }
    spec.protection = a.protect.protection()?;
    Ok(spec)
}

/// Reports how a VM's run ended (an error on stderr; with `json`, a [`RunReport`] line on
/// stdout) and returns its exit status (`agent::vm::status`).
fn finish(json: bool, vm: &str, r: Result<agent::protection::primary::Outcome>) -> u8 {
    let report = match r {
        Ok(o) => RunReport::of(vm, &o),
        Err(e) => {
            let text = crate::describe(&e);
            eprintln!("{text}");
            RunReport::error(vm, text, error_status(&e))
        }
    };
    if json {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.flush();
        let _ = writeln!(out, "{}", serde_json::to_string(&report).unwrap_or_default());
    }
    report.exit_status
}

/// The exit status of a VM's process that ends with `e`: invalid input (the command line,
/// a spec file, a VM specification) or a VMM that could not run the VM.
pub fn error_status(e: &anyhow::Error) -> u8 {
    e.downcast_ref::<agent::Error>().map_or(agent::vm::status::INVALID, agent::Error::exit_status)
}

/// A JSON spec file; the error names the file and what is wrong.
pub fn load_spec<T: serde::de::DeserializeOwned>(file: &Path) -> Result<T> {
    let text = std::fs::read(file).with_context(|| format!("spec {}", file.display()))?;
    serde_json::from_slice(&text).map_err(|e| anyhow::anyhow!("spec {}: line {}: {e}", file.display(), e.line()))
}

fn simple(path: &Path, cmd: Command) -> Result<u8> {
    let reply = api::call(path, &cmd)?;
    if !reply.ok {
        bail!("{}", reply.error.unwrap_or_default());
    }
    println!("{}", serde_json::to_string(&reply)?);
    Ok(0)
}
