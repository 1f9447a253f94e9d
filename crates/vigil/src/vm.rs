//! `vigil vm`: run, restore and control unikernel VMs (the `vmm` crate does the work).

use anyhow::{bail, Context, Result};
use clap::{Args as ClapArgs, Subcommand};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use vmm::{api, snapshot::RestoreOverrides, Command, Stop, Vm, VmConfig};

#[derive(ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(Subcommand)]
enum VmCommand {
    /// Boot a guest image. Exit status: the guest's, 3 if the guest faulted, 2 on VMM errors.
    Run(Box<RunArgs>),
    /// Continue a VM from a snapshot directory, in this new process.
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
    /// Guest image (static ELF built with the guest SDK).
    #[arg(long)]
    image: PathBuf,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64)]
    mem: u64,
    /// Disk image file.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Tap device for the network card (created if missing).
    #[arg(long)]
    tap: Option<String>,
    /// Guest IPv4 address with prefix length, e.g. 10.0.0.2/24.
    #[arg(long)]
    ip: Option<String>,
    /// Guest IPv4 gateway.
    #[arg(long)]
    gateway: Option<Ipv4Addr>,
    /// Guest MAC address, e.g. 52:54:00:12:34:56.
    #[arg(long)]
    mac: Option<String>,
    /// Control socket.
    #[arg(long)]
    api: Option<PathBuf>,
    /// Start with dirty-page logging on.
    #[arg(long)]
    dirty_log: bool,
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
    /// Tap device (default: the one in the snapshot).
    #[arg(long)]
    tap: Option<String>,
    /// Disk image (default: the one in the snapshot).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Control socket.
    #[arg(long)]
    api: Option<PathBuf>,
    /// Stay paused until a `resume` on the control socket.
    #[arg(long, requires = "api")]
    paused: bool,
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

/// The VM's domain in the store, released when dropped.
struct Domain {
    client: store::Client,
    domid: u32,
}

impl Domain {
    fn introduce(a: &DomainArgs, what: &str) -> Result<Option<Domain>> {
        let (Some(socket), Some(domid)) = (&a.store, a.domid) else { return Ok(None) };
        let mut client = store::Client::connect(socket).with_context(|| format!("store {}", socket.display()))?;
        let base = format!("/local/domain/{domid}");
        client.write(&format!("{base}/name"), what.as_bytes()).with_context(|| format!("store: cannot write {base}/name"))?;
        client.write(&format!("{base}/state"), b"running").with_context(|| format!("store: cannot write {base}/state"))?;
        client.introduce(domid).with_context(|| format!("store: cannot introduce domain {domid}"))?;
        Ok(Some(Domain { client, domid }))
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let base = format!("/local/domain/{}", self.domid);
        let released = self.client.release(self.domid).and_then(|_| self.client.rm(&base));
        if let Err(e) = released {
            eprintln!("store: cannot release domain {}: {e}", self.domid);
        }
    }
}

/// Runs a `vigil vm` subcommand; returns the process exit status.
pub fn run(args: &Args) -> Result<u8> {
    match &args.command {
        VmCommand::Run(a) => {
            if a.protect.protect.is_some() {
                // Check the protection options before starting anything.
                replication::policy::parse(&a.protect.policy).map_err(anyhow::Error::msg)?;
                a.protect.timing.timing()?;
            }
            let mut config = VmConfig::new(&a.image, a.mem);
            config.disk = a.disk.clone();
            config.tap = a.tap.clone();
            config.args = a.args.clone();
            config.dirty_log = a.dirty_log;
            if let Some(ip) = &a.ip {
                let (addr, prefix) = ip.split_once('/').unwrap_or((ip, "24"));
                config.net.ip = addr.parse().with_context(|| format!("--ip {ip}: bad address"))?;
                config.net.prefix_len =
                    prefix.parse().ok().filter(|p| *p <= 32).with_context(|| format!("--ip {ip}: bad prefix length"))?;
            }
            if let Some(g) = a.gateway {
                config.net.gateway = g;
            }
            if let Some(mac) = &a.mac {
                config.net.mac = parse_mac(mac)?;
            }
            let announce = config.tap.is_some() && !config.net.ip.is_unspecified();
            let mut vm = Vm::create(config, Box::new(std::io::stdout())).with_context(|| format!("cannot start {}", a.image.display()))?;
            if announce {
                // Tell the switches where the VM's address lives now (it may have run
                // elsewhere before).
                vm.announce(1).context("cannot announce the VM's address")?;
            }
            let name = a.image.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let _domain = Domain::introduce(&a.domain, &name)?;
            if a.protect.protect.is_some() {
                return crate::replicate::run_protected(vm, &a.protect, &name, a.disk.clone(), a.api.as_deref());
            }
            drive(vm, a.api.as_deref())
        }
        VmCommand::Restore(a) => {
            let overrides = RestoreOverrides { tap: a.tap.clone(), disk: a.disk.clone() };
            let mut vm = Vm::restore(&a.dir, &overrides, Box::new(std::io::stdout()))?;
            if !a.paused {
                vm.resume();
            }
            let _domain = Domain::introduce(&a.domain, &a.dir.display().to_string())?;
            drive(vm, a.api.as_deref())
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

fn drive(mut vm: Vm, api_path: Option<&Path>) -> Result<u8> {
    let (_server, inbox) = match api_path {
        Some(p) => {
            let (ctl, inbox) = vmm::channel_pair()?;
            (Some(api::serve(p, ctl)?), Some(inbox))
        }
        None => {
            if vm.paused() {
                bail!("a paused VM needs --api to be resumed");
            }
            (None, None)
        }
    };
    match vm.run(inbox.as_ref())? {
        Stop::Exited(s) => Ok(s.min(255) as u8),
        Stop::Quit => Ok(0),
        Stop::Fault(reason) => {
            eprintln!("guest fault: {reason}");
            Ok(3)
        }
    }
}

fn simple(path: &Path, cmd: Command) -> Result<u8> {
    let reply = api::call(path, &cmd)?;
    if !reply.ok {
        bail!("{}", reply.error.unwrap_or_default());
    }
    println!("{}", serde_json::to_string(&reply)?);
    Ok(0)
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<u8> = s.split(':').map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>().with_context(|| format!("--mac {s}"))?;
    parts.try_into().map_err(|_| anyhow::anyhow!("--mac {s}: six bytes expected"))
}
