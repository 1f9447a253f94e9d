//! Running one VM from one [`VmSpec`]: its image, memory, network, disk, domain registration,
//! protection (remote-backup mode) and scheduling. `vigil vm run` and the agent's VMM
//! processes both come here; `vigil backup` runs [`run_backup`], `vigil arbiter` [`serve_arbiter`].

use crate::domain::{Domain, DomainSpec};
use crate::protection::{self, primary::Outcome};
use crate::{Error, Result};
use replication::{PolicySpec, Timing};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use vmm::{api, Stop, Vm, VmConfig};

/// Everything needed to start a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmSpec {
    /// The VM's name (its lease, its domain's name, its log lines).
    pub name: String,
    /// Guest image (a static ELF built with the guest SDK).
    pub image: PathBuf,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Arguments handed to the guest.
    #[serde(default)]
    pub args: Vec<String>,
    /// Disk image file. A relative path is the host's own copy, in its agent's state directory.
    #[serde(default)]
    pub disk: Option<PathBuf>,
    /// The disk's size (MiB) when the file has to be created: a VM that starts where it has no
    /// disk yet gets a new, zeroed one ([`prepare_disk`]); without it a missing disk is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<u64>,
    /// Where the disk's host I/O runs: in the VMM (`vmm`, the default) or in a supervised
    /// backend process of the VM's own (`process`, `vigil backend blk`).
    #[serde(default, skip_serializing_if = "BackendPlace::is_vmm")]
    pub disk_backend: BackendPlace,
    /// Network card.
    #[serde(default)]
    pub net: Option<NetSpec>,
    /// Control socket of the VMM.
    #[serde(default)]
    pub api: Option<PathBuf>,
    /// Start with dirty-page logging on.
    #[serde(default)]
    pub dirty_log: bool,
    /// Guest memory as a shared memfd even without backend processes (benchmarks).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_memory: bool,
    /// How a protected VM's checkpoints find dirty pages: `auto` (per epoch, from measured
    /// costs), `log` or `compare` (`vmm::tracking`).
    #[serde(default)]
    pub tracking: vmm::TrackingChoice,
    /// How a protected VM's checkpoint pages travel: `auto` (per checkpoint, compressed when
    /// the link is the bottleneck), `lz4` (or `on`), `xor` (deltas against the backup's copy,
    /// then LZ4) or `off` (`replication::compress`).
    #[serde(with = "compression_str", default)]
    pub compression: replication::compress::Compression,
    /// Announce the VM in the store as a domain.
    #[serde(default)]
    pub domain: Option<DomainSpec>,
    /// Remote-backup mode: replicate to a backup host.
    #[serde(default)]
    pub protection: Option<Protection>,
    /// CPU placement and scheduling of the VMM.
    #[serde(default)]
    pub scheduling: Scheduling,
    /// Continue the VM from this snapshot directory instead of booting the image (the
    /// destination of a migration).
    #[serde(default)]
    pub restore: Option<PathBuf>,
    /// Local redundancy: run it as voted instances (`vigil local --spec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<crate::voter::LocalSpec>,
}

/// The VM's network card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    /// Tap device (created if missing).
    pub tap: String,
    /// The guest's address, if it has one.
    #[serde(default)]
    pub ip: Option<Ipv4Cidr>,
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default)]
    pub mac: Option<Mac>,
    /// A bridge the agent attaches the tap to before the VM starts.
    #[serde(default)]
    pub bridge: Option<String>,
    /// Where the card's host I/O runs: in the VMM (`vmm`, the default) or in a supervised
    /// backend process of the VM's own (`process`, `vigil backend net`: a crash or hang of it
    /// costs the guest a delay, not the VM).
    #[serde(default, skip_serializing_if = "BackendPlace::is_vmm")]
    pub backend: BackendPlace,
}

/// Where a device's host I/O runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendPlace {
    /// Inside the VMM process.
    #[default]
    Vmm,
    /// In a backend process of its own, supervised by the VMM (`vmm::backend`).
    Process,
}

impl BackendPlace {
    fn is_vmm(&self) -> bool {
        *self == BackendPlace::Vmm
    }
}

impl FromStr for BackendPlace {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vmm" => Ok(BackendPlace::Vmm),
            "process" => Ok(BackendPlace::Process),
            _ => Err(format!("{s:?}: expected vmm or process")),
        }
    }
}

/// An IPv4 address with its prefix length (`10.0.0.2/24`; `/24` when omitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, "24"));
        let addr = addr.parse().map_err(|_| format!("{s:?}: bad IPv4 address"))?;
        let prefix_len = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(|| format!("{s:?}: bad prefix length"))?;
        Ok(Ipv4Cidr { addr, prefix_len })
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A MAC address (`52:54:00:12:34:56`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<u8> =
            s.split(':').map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>().map_err(|_| format!("{s:?}: bad MAC address"))?;
        parts.try_into().map(Mac).map_err(|_| format!("{s:?}: a MAC address has six bytes"))
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

/// Serde through `FromStr` and `Display`, for the small value types above.
macro_rules! serde_via_str {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
serde_via_str!(Ipv4Cidr, Mac);

/// Remote-backup mode: where the backup and the arbiter are, and how to checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Protection {
    /// The backup's replication address (`vigil backup --listen`), HOST:PORT.
    pub backup: String,
    /// The fencing arbiter, HOST:PORT.
    pub arbiter: String,
    /// This host's name at the arbiter.
    pub holder: String,
    #[serde(with = "policy_str", default)]
    pub policy: PolicySpec,
    #[serde(default)]
    pub timing: TimingSpec,
    /// Print a JSON line of statistics per checkpoint on stderr.
    #[serde(default)]
    pub stats: bool,
    /// Serve Prometheus metrics and the policy switch here (HOST:PORT).
    #[serde(default)]
    pub control: Option<String>,
    /// Keep the replication state here (JSON, for the agent).
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// The cluster's key file: the backup and the arbiter authenticate with it.
    pub key_file: PathBuf,
}

mod compression_str {
    use replication::compress::Compression;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(c: &Compression, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(c)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Compression, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

mod policy_str {
    use replication::PolicySpec;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(p: &PolicySpec, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(p)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PolicySpec, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Heartbeat, failure detection and lease timing in milliseconds (both sides should agree).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimingSpec {
    pub heartbeat_ms: u64,
    pub timeout_ms: u64,
    pub lease_ms: u64,
    pub renew_ms: u64,
}

impl Default for TimingSpec {
    fn default() -> Self {
        let t = Timing::default();
        const MS: u64 = 1_000_000;
        TimingSpec {
            heartbeat_ms: t.heartbeat_ns / MS,
            timeout_ms: t.timeout_ns / MS,
            lease_ms: t.lease_ttl_ns / MS,
            renew_ms: t.lease_renew_ns / MS,
        }
    }
}

impl TimingSpec {
    /// The protocol's timing, checked.
    pub fn timing(&self) -> Result<Timing> {
        const MS: u64 = 1_000_000;
        let t = Timing {
            heartbeat_ns: self.heartbeat_ms * MS,
            timeout_ns: self.timeout_ms * MS,
            lease_ttl_ns: self.lease_ms * MS,
            lease_renew_ns: self.renew_ms * MS,
            reconnect_ns: Timing::default().reconnect_ns,
        };
        t.validate()?;
        Ok(t)
    }
}

/// Where and how the VMM's threads run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scheduling {
    /// Pin the VMM to these CPUs (the model's processor of the VM).
    #[serde(default)]
    pub cpus: Vec<usize>,
    /// Run the vCPU under SCHED_FIFO at this priority (1..=99): the model's fixed priority.
    #[serde(default)]
    pub fifo_priority: Option<u8>,
    /// Run the vCPU under this hard reservation: the model's budget and period.
    #[serde(default)]
    pub reservation: Option<crate::realtime::Reservation>,
    /// Who enforces the reservation.
    #[serde(default)]
    pub enforcer: crate::realtime::Enforcer,
}

impl Scheduling {
    /// Applies the reservation or the priority to the calling thread, which runs `vm`'s vCPU
    /// (call it after the VMM's other threads are started, so they stay outside).
    pub fn apply_to_vcpu(&self, vm: &mut Vm) -> Result<(), String> {
        use crate::realtime::Enforcer;
        match (self.reservation, self.fifo_priority) {
            (Some(r), p) => match self.enforcer.resolve() {
                Enforcer::Vmm => {
                    crate::realtime::admit_vmm(r)?;
                    crate::realtime::fifo(p.unwrap_or(crate::realtime::SERVER_PRIORITY))?;
                    vm.set_reservation(r.runtime_us * 1000, r.period_us * 1000).map_err(|e| e.to_string())
                }
                _ if p.is_some() => {
                    Err(format!("reservation {r}: a priority applies only to a reservation the VMM enforces (--enforcer vmm)"))
                }
                _ => crate::realtime::reserve_vcpu(r),
            },
            (None, Some(p)) => crate::realtime::fifo(p),
            (None, None) => Ok(()),
        }
    }
}

/// The exit statuses of a process that runs a VM (`vigil vm run`, `vigil vm restore`,
/// `vigil backup`): each status means one thing.
pub mod status {
    /// An invalid command line or VM specification (options, spec file): nothing ran. The
    /// same status as every other `vigil` command's invalid input.
    pub const INVALID: u8 = 2;
    /// The guest exited with a status up to this one: the process exits with the same status.
    pub const GUEST_MAX: u8 = 123;
    /// The guest exited with a status above [`GUEST_MAX`] (its own status is reported on
    /// stderr and in `--json`).
    pub const GUEST_OUT_OF_RANGE: u8 = 124;
    /// The VMM failed: invalid input (image, snapshot, options), KVM, host I/O.
    pub const VMM_ERROR: u8 = 125;
    /// The guest faulted (broke the ABI, crashed, or KVM could not run it).
    pub const GUEST_FAULT: u8 = 126;
    /// Another copy of the VM took over (fenced): this one was stopped.
    pub const FENCED: u8 = 127;
}

/// How a VM's run ended, for people (stderr) and tools (`--json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunReport {
    /// The VM.
    pub vm: String,
    /// `exited`, `quit`, `fault`, `fenced` or `error`.
    pub outcome: String,
    /// The guest's own exit status (`exited` only), whatever its value.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub guest_status: Option<u32>,
    /// The fault's reason, the holder that fenced this copy, or the error.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    /// The process's exit status (see [`status`]).
    pub exit_status: u8,
}

impl RunReport {
    /// The report of a run that ended with `o`; says on stderr (log) what is not a plain
    /// exit 0.
    pub fn of(vm: &str, o: &Outcome) -> RunReport {
        let (outcome, guest_status, detail, exit_status) = match o {
            Outcome::Stopped(Stop::Exited(s)) => {
                let st = if *s <= status::GUEST_MAX as u32 { *s as u8 } else { status::GUEST_OUT_OF_RANGE };
                if *s != 0 {
                    tracing::info!("{vm}: guest exited with status {s} (exit status {st})");
                }
                ("exited", Some(*s), None, st)
            }
            Outcome::Stopped(Stop::Quit) => ("quit", None, None, 0),
            Outcome::Stopped(Stop::Fault(reason)) => {
                tracing::error!("guest fault: {reason}");
                ("fault", None, Some(reason.clone()), status::GUEST_FAULT)
            }
            Outcome::Fenced { holder } => ("fenced", None, Some(holder.clone()), status::FENCED),
            Outcome::HandedOver { epoch } => ("handed-over", None, Some(format!("the destination runs it from epoch {epoch}")), 0),
        };
        RunReport { vm: vm.to_owned(), outcome: outcome.into(), guest_status, detail, exit_status }
    }

    /// The report of a run that could not be done (the error is printed by the caller):
    /// `exit_status` is [`status::INVALID`] or [`status::VMM_ERROR`] (see [`Error::exit_status`]).
    pub fn error(vm: &str, error: String, exit_status: u8) -> RunReport {
        RunReport { vm: vm.to_owned(), outcome: "error".into(), guest_status: None, detail: Some(error), exit_status }
    }
}

/// How a VM's run ended, as an exit status ([`status`]).
pub fn exit_status(o: &Outcome) -> u8 {
    RunReport::of("vm", o).exit_status
}

impl VmSpec {
    /// A VM of `memory_mib` MiB from `image`, named after the image's file name.
    pub fn new(image: impl Into<PathBuf>, memory_mib: u64) -> VmSpec {
        let image = image.into();
        let name = image.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "vm".into());
        VmSpec {
            name,
            image,
            memory_mib,
            args: Vec::new(),
            disk: None,
            disk_mib: None,
            disk_backend: BackendPlace::Vmm,
            net: None,
            api: None,
            dirty_log: false,
            shared_memory: false,
            tracking: Default::default(),
            compression: Default::default(),
            domain: None,
            protection: None,
            scheduling: Scheduling::default(),
            restore: None,
            local: None,
        }
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Spec { vm: self.name.clone(), reason: reason.into() }
    }

    /// Checks what can be checked before anything starts.
    pub fn check(&self) -> Result<()> {
        if let Some(p) = &self.protection {
            p.timing.timing()?;
            p.arbiter.parse::<crate::fencing::Service>().map_err(|e| self.err(e))?;
        }
        if let Some(d) = &self.disk {
            if !d.exists() && self.disk_mib.is_none() {
                return Err(self.err(format!("disk {}: no such file", d.display())));
            }
        }
        if let Some(p) = self.scheduling.fifo_priority {
            if !(1..=99).contains(&p) {
                return Err(self.err(format!("real-time priority {p} is outside 1..=99")));
            }
        }
        Ok(())
    }

    /// How the VMM starts a backend process for `device` (`net`, `blk`): this very executable
    /// (`vigil backend DEVICE`).
    fn backend_program(&self, device: &str) -> vmm::backend::BackendProgram {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("vigil"));
        let mut program = vmm::backend::BackendProgram::new(exe, vec!["backend".into(), device.into(), "--vm".into(), self.name.clone()]);
        // A protected VM's vCPU must not wait on a hung backend for as long as its backup
        // waits before it takes over (the checkpoint waits for the vCPU): the hang is
        // declared, and heartbeats run, at a third of the replication timeout.
        if let Some(p) = &self.protection {
            let third = (p.timing.timeout_ms / 3).max(5);
            program.timeout_ms = program.timeout_ms.min(third);
            program.period_ms = program.period_ms.min(third);
        }
        program
    }

    /// The VMM's configuration.
    pub fn vm_config(&self) -> VmConfig {
        let mut config = VmConfig::new(&self.image, self.memory_mib);
        config.disk = self.disk.clone();
        config.args = self.args.clone();
        config.dirty_log = self.dirty_log;
        config.shared_memory = self.shared_memory;
        config.tracking = self.tracking;
        if self.disk.is_some() && self.disk_backend == BackendPlace::Process {
            config.blk_backend = Some(self.backend_program("blk"));
        }
        if let Some(net) = &self.net {
            config.tap = Some(net.tap.clone());
            if let Some(ip) = net.ip {
                config.net.ip = ip.addr;
                config.net.prefix_len = ip.prefix_len;
            }
            if let Some(g) = net.gateway {
                config.net.gateway = g;
            }
            if let Some(m) = net.mac {
                config.net.mac = m.0;
            }
            if net.backend == BackendPlace::Process {
                config.net_backend = Some(self.backend_program("net"));
            }
        }
        config
    }
}

/// Applies the spec's CPU placement to the calling thread (threads it starts later inherit it).
pub fn apply_placement(spec: &VmSpec) -> Result<()> {
    if spec.scheduling.cpus.is_empty() {
        return Ok(());
    }
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in &spec.scheduling.cpus {
        if c >= libc::CPU_SETSIZE as usize {
            return Err(spec.err(format!("CPU {c} does not exist")));
        }
        // SAFETY: c is below CPU_SETSIZE, checked above.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(spec.err(format!("cannot pin to CPUs {:?}: {}", spec.scheduling.cpus, std::io::Error::last_os_error())));
    }
    Ok(())
}

/// Runs the VM of `spec` in this process until it stops (or, protected, is fenced); returns
/// the exit status ([`exit_status`]).
pub fn run(spec: &VmSpec) -> Result<u8> {
    run_outcome(spec).map(|o| exit_status(&o))
}

/// As [`run`], returning how the run ended.
pub fn run_outcome(spec: &VmSpec) -> Result<Outcome> {
    spec.check()?;
    if let Some(disk) = &spec.disk {
        prepare_disk(disk, spec.disk_mib, spec.restore.as_deref()).map_err(|reason| spec.err(reason))?;
    }
    apply_placement(spec)?;
    if let Some(dir) = &spec.restore {
        return run_restored(spec, dir);
    }
    let config = spec.vm_config();
    let announce = config.tap.is_some() && !config.net.ip.is_unspecified();
    let mut vm = Vm::create(config, Box::new(std::io::stdout())).map_err(|source| Error::Vmm { vm: spec.name.clone(), source })?;
    if announce {
        // Tell the switches where the VM's address lives now (it may have run elsewhere before).
        vm.announce(1).map_err(|source| Error::Vmm { vm: spec.name.clone(), source })?;
    }
    let _domain = spec.domain.as_ref().map(|d| Domain::introduce(d, &spec.name)).transpose()?;
    if let Some(p) = &spec.protection {
        return run_protected(vm, spec, p, announce);
    }
    drive(vm, spec.api.as_deref(), &spec.name, announce, &spec.scheduling, spec.disk.as_deref())
}

/// The name of a VM's disk in a migration snapshot (stop-and-copy carries the disk with the
/// memory: `agent::host`, `migrate_out`).
pub const SNAPSHOT_DISK: &str = "disk.img";

/// Makes `disk` ready before a VM (or its backup) starts on this host: the disk a migration
/// snapshot in `restore` carried replaces it (moved: a snapshot is restored once); a missing
/// disk with a size is created, zeroed (sparse: blocks are allocated as the guest writes).
pub fn prepare_disk(disk: &Path, size_mib: Option<u64>, restore: Option<&Path>) -> Result<(), String> {
    if let Some(carried) = restore.map(|d| d.join(SNAPSHOT_DISK)).filter(|c| c.exists()) {
        if std::fs::rename(&carried, disk).is_err() {
            std::fs::copy(&carried, disk).map_err(|e| format!("disk {}: cannot copy {} there: {e}", disk.display(), carried.display()))?;
        }
        return Ok(());
    }
    match (disk.exists(), size_mib) {
        (true, _) => Ok(()),
        (false, None) => Err(format!("disk {}: no such file", disk.display())),
        (false, Some(mib)) => {
            let create = || -> std::io::Result<()> {
                if let Some(parent) = disk.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent)?;
                }
                // A new name first, then renamed: a crash never leaves a short disk behind.
                let mut tmp = disk.as_os_str().to_owned();
                tmp.push(".new");
                let f = std::fs::File::create(&tmp)?;
                f.set_len(mib << 20)?;
                f.sync_all()?;
                std::fs::rename(&tmp, disk)
            };
            create().map_err(|e| format!("disk {}: cannot create it ({mib} MiB): {e}", disk.display()))
        }
    }
}

/// Announces the VM's address again 20, 100 and 500 ms from now: the first announcement can
/// be lost while the bridge port of a newly opened tap comes up, and a switch that still sends
/// the VM's traffic to the host it ran on before would keep its clients away until the VM
/// speaks first (seen in `vigil bench replication`: after 30 runs alternating hosts, a fresh
/// VM got no client for 10 s).
fn announce_again(ctl: vmm::Controller) {
    std::thread::spawn(move || {
        for ms in [20, 80, 400] {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            let _ = ctl.call(vmm::Command::Announce { count: 1 });
        }
    });
}

/// The destination of a migration: the VM continues from the source's snapshot on this host's
/// tap, announces its address here, and runs.
fn run_restored(spec: &VmSpec, dir: &Path) -> Result<Outcome> {
    let vmm_err = |source| Error::Vmm { vm: spec.name.clone(), source };
    let overrides = vmm::snapshot::RestoreOverrides {
        tap: spec.net.as_ref().map(|n| n.tap.clone()),
        disk: spec.disk.clone(),
        backend_program: std::env::current_exe().ok(),
    };
    let t0 = std::time::Instant::now();
    let mut vm = Vm::restore(dir, &overrides, Box::new(std::io::stdout())).map_err(vmm_err)?;
    if spec.net.as_ref().is_some_and(|n| n.ip.is_some()) {
        vm.announce(1).map_err(vmm_err)?;
    }
    vm.resume();
    tracing::info!("{}: restored from {} in {:.1} ms and resumed", spec.name, dir.display(), t0.elapsed().as_secs_f64() * 1e3);
    let _domain = spec.domain.as_ref().map(|d| Domain::introduce(d, &spec.name)).transpose()?;
    drive(vm, spec.api.as_deref(), &spec.name, spec.net.as_ref().is_some_and(|n| n.ip.is_some()), &spec.scheduling, spec.disk.as_deref())
}

/// Restores a VM from a snapshot directory and runs it; returns how the run ended.
pub fn restore(
    dir: &Path,
    overrides: &vmm::snapshot::RestoreOverrides,
    paused: bool,
    api: Option<&Path>,
    domain: Option<&DomainSpec>,
    sched: &Scheduling,
) -> Result<Outcome> {
    let name = dir.display().to_string();
    let mut vm = Vm::restore(dir, overrides, Box::new(std::io::stdout())).map_err(|source| Error::Vmm { vm: name.clone(), source })?;
    if !paused {
        vm.resume();
    }
    let _domain = domain.map(|d| Domain::introduce(d, &name)).transpose()?;
    drive(vm, api, &name, false, sched, overrides.disk.as_deref())
}

/// Runs `vm` until it stops, serving its control socket at `api_path`; with `announce`, its
/// address is announced again shortly after the start ([`announce_again`]). The calling thread
/// runs the vCPU, under `sched` (applied once every other thread is started).
fn drive(mut vm: Vm, api_path: Option<&Path>, name: &str, announce: bool, sched: &Scheduling, disk: Option<&Path>) -> Result<Outcome> {
    let vmm_err = |source| Error::Vmm { vm: name.to_owned(), source };
    if api_path.is_none() && vm.paused() {
        return Err(Error::Spec { vm: name.into(), reason: "a paused VM needs a control socket to be resumed".into() });
    }
    let (ctl, inbox) = vmm::channel_pair().map_err(vmm_err)?;
    let _server = api_path.map(|p| api::serve(p, ctl.clone())).transpose().map_err(vmm_err)?;
    if announce {
        announce_again(ctl.clone());
    }
    let Some(api_path) = api_path else {
        sched.apply_to_vcpu(&mut vm).map_err(|reason| Error::Spec { vm: name.into(), reason })?;
        let stop = vm.run(Some(&inbox)).map_err(vmm_err)?;
        return Ok(Outcome::Stopped(stop));
    };
    // With a control socket the VM can be migrated: its vCPU runs on a thread of its own,
    // and this one waits for it to stop or for the agent to ask for a migration.
    let (tx, rx) = std::sync::mpsc::channel::<protection::Input>();
    let running =
        protection::primary::spawn_vcpu(vm, inbox, sched.clone(), tx.clone()).map_err(|reason| Error::Spec { vm: name.into(), reason })?;
    let mig_path = crate::migration::socket_path(api_path);
    let _mig = crate::migration::serve(&mig_path, tx.clone()).map_err(|e| Error::io("cannot listen on", &mig_path, e))?;
    loop {
        let Ok(input) = rx.recv() else { return Err(Error::Spec { vm: name.into(), reason: "internal: the VM's channel closed".into() }) };
        match input {
            protection::Input::VmStopped(r) => {
                let stop = r.map_err(|reason| Error::Spec { vm: name.into(), reason })?;
                return Ok(Outcome::Stopped(stop));
            }
            protection::Input::Migrate(crate::migration::Request::Protect(p), answer) => {
                let opts = match protection_options(name, &p, disk, sched, Default::default()) {
                    Ok(o) => o,
                    Err(e) => {
                        let _ = answer.send(Err(e.to_string()));
                        continue;
                    }
                };
                tracing::info!("{name}: migrating: protecting the VM to {} (pre-copy rounds)", p.backup);
                let _ = answer.send(Ok("synchronising".into()));
                let start = protection::primary::Start::Running;
                return protection::primary::run_attached(running, ctl, opts, start, protection::Clock::new(), tx, rx)
                    .map_err(|reason| Error::Replication { vm: name.into(), reason });
            }
            protection::Input::Migrate(crate::migration::Request::Policy { .. }, answer) => {
                let _ = answer.send(Err("the VM is not protected: it has no checkpoint policy".into()));
            }
            protection::Input::Migrate(_, answer) => {
                let _ = answer.send(Err("not migrating: ask to protect the VM first".into()));
            }
            _ => {}
        }
    }
}

/// The replication driver's options for `vm` protected as `p` says.
fn protection_options(
    vm: &str,
    p: &Protection,
    disk: Option<&Path>,
    sched: &Scheduling,
    compression: replication::compress::Compression,
) -> Result<protection::primary::Options> {
    Ok(protection::primary::Options {
        vm: vm.to_owned(),
        holder: p.holder.clone(),
        backup: Some(p.backup.clone()),
        arbiter: p.arbiter.clone(),
        policy: p.policy,
        timing: p.timing.timing()?,
        stats_lines: p.stats,
        control: p.control.clone(),
        disk: disk.map(Path::to_path_buf),
        state_file: p.state_file.clone(),
        key: crate::auth::Key::load(&p.key_file)?,
        vcpu_sched: sched.clone(),
        compression,
        handover_ms: None,
    })
}

fn run_protected(vm: Vm, spec: &VmSpec, p: &Protection, announce: bool) -> Result<Outcome> {
    let vmm_err = |source| Error::Vmm { vm: spec.name.clone(), source };
    let (ctl, inbox) = vmm::channel_pair().map_err(vmm_err)?;
    if announce {
        announce_again(ctl.clone());
    }
    let _api = match &spec.api {
        Some(path) => Some(vmm::api::serve(path, ctl.clone()).map_err(vmm_err)?),
        None => None,
    };
    let opts = protection_options(&spec.name, p, spec.disk.as_deref(), &spec.scheduling, spec.compression)?;
    let repl_err = |reason| Error::Replication { vm: spec.name.clone(), reason };
    // With a control socket, the agent reaches the replication driver on the socket beside it
    // (`crate::migration`): to switch the checkpoint policy while the VM runs.
    let (tx, rx) = std::sync::mpsc::channel::<protection::Input>();
    let running = protection::primary::spawn_vcpu(vm, inbox, spec.scheduling.clone(), tx.clone()).map_err(repl_err)?;
    let _mig = match &spec.api {
        Some(path) => {
            let m = crate::migration::socket_path(path);
            Some(crate::migration::serve(&m, tx.clone()).map_err(|e| Error::io("cannot listen on", &m, e))?)
        }
        None => None,
    };
    let start = protection::primary::Start::Fresh;
    let outcome = protection::primary::run_attached(running, ctl, opts, start, protection::Clock::new(), tx, rx).map_err(repl_err)?;
    Ok(outcome)
}

/// The backup host's side of a protected VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupSpec {
    /// Address to listen on for the primary (HOST:PORT).
    pub listen: String,
    /// The fencing arbiter (HOST:PORT).
    pub arbiter: String,
    /// This host's name at the arbiter.
    pub holder: String,
    /// The tap device the VM gets on this host after a takeover.
    #[serde(default)]
    pub tap: Option<String>,
    /// A bridge the agent attaches the tap to before the backup starts.
    #[serde(default)]
    pub bridge: Option<String>,
    /// This host's copy of the VM's disk (relative: in the agent's state directory).
    #[serde(default)]
    pub disk: Option<PathBuf>,
    /// Its size (MiB), to create it zeroed when this host has none yet (the initial
    /// synchronisation fills it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<u64>,
    /// The VM's control socket after a takeover.
    #[serde(default)]
    pub api: Option<PathBuf>,
    /// Metrics address.
    #[serde(default)]
    pub control: Option<String>,
    /// Print protocol events.
    #[serde(default)]
    pub stats: bool,
    /// After a takeover: protect the VM with a new backup here.
    #[serde(default)]
    pub then_protect: Option<String>,
    #[serde(with = "policy_str", default)]
    pub then_policy: PolicySpec,
    #[serde(default)]
    pub timing: TimingSpec,
    /// After a takeover: keep the replication state here (JSON, for the agent).
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// The cluster's key file: the primary and the arbiter authenticate with it.
    pub key_file: PathBuf,
    /// After a takeover: how the VM's vCPU runs (its reservation or priority, as on the
    /// primary).
    #[serde(default)]
    pub scheduling: Scheduling,
    /// Mode 4 (local + remote): the backup of a voted group (`vigil local --receive`: a
    /// snapshot and the log of requests, `voter::remote`), not of one VMM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<crate::voter::LocalSpec>,
}

/// Runs the backup until it took over and the VM it then ran stopped; returns the exit status.
pub fn run_backup(b: &BackupSpec) -> Result<u8> {
    let timing = b.timing.timing()?;
    b.arbiter.parse::<crate::fencing::Service>().map_err(|reason| Error::Spec { vm: "backup".into(), reason })?;
    if let Some(d) = &b.disk {
        if b.disk_mib.is_some() {
            prepare_disk(d, b.disk_mib, None).map_err(|reason| Error::Spec { vm: "backup".into(), reason })?;
        }
        if !d.exists() {
            return Err(Error::Spec {
                vm: "backup".into(),
                reason: format!("disk {}: no such file (give the backup a copy of the VM's disk image, of the same size)", d.display()),
            });
        }
    }
    let opts = protection::backup::Options {
        listen: b.listen.clone(),
        holder: b.holder.clone(),
        arbiter: b.arbiter.clone(),
        tap: b.tap.clone(),
        disk: b.disk.clone(),
        timing,
        stats_lines: b.stats,
        control: b.control.clone(),
        api: b.api.clone(),
        then_protect: b.then_protect.clone(),
        then_policy: b.then_policy,
        state_file: b.state_file.clone(),
        key: crate::auth::Key::load(&b.key_file)?,
        vcpu_sched: b.scheduling.clone(),
    };
    let outcome = protection::backup::run(opts).map_err(|reason| Error::Replication { vm: format!("backup on {}", b.listen), reason })?;
    Ok(exit_status(&outcome))
}

/// Serves fencing leases on `listen` until the process ends, keeping the lease table's
/// durable state in `state` (a file, or the cluster store) and authenticating clients with the
/// key in `key_file`.
pub fn serve_arbiter(listen: &str, state: &crate::arbiter::State, key_file: &Path) -> Result<std::convert::Infallible> {
    let key = crate::auth::Key::load(key_file)?;
    let listener = std::net::TcpListener::bind(listen).map_err(|e| Error::io("cannot listen on", listen, e))?;
    let arb = crate::arbiter::serve(listener, state, key)?;
    tracing::info!("arbiter: serving leases on {}", arb.addr);
    loop {
        std::thread::park();
    }
}

/// This machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_through_json_and_bad_values_are_named() {
        let mut s = VmSpec::new("/images/kv", 64);
        s.net = Some(NetSpec {
            tap: "vtap".into(),
            ip: Some("10.0.0.2/24".parse().unwrap()),
            gateway: None,
            mac: Some("52:54:00:00:00:01".parse().unwrap()),
            bridge: None,
            backend: BackendPlace::Process,
        });
        s.protection = Some(Protection {
            backup: "10.98.0.2:7100".into(),
            arbiter: "10.99.0.254:7000".into(),
            holder: "host-a".into(),
            policy: "fixed:25".parse().unwrap(),
            timing: TimingSpec::default(),
            stats: false,
            control: None,
            state_file: None,
            key_file: "/etc/vigil/key".into(),
        });
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"policy\":\"fixed:25\"") && json.contains("\"10.0.0.2/24\""), "{json}");
        assert_eq!(serde_json::from_str::<VmSpec>(&json).unwrap(), s);
        let bad = json.replace("fixed:25", "fixed:0");
        let e = serde_json::from_str::<VmSpec>(&bad).unwrap_err().to_string();
        assert!(e.contains("policy") && e.contains("fixed:0"), "{e}");
        for (v, want) in [("10.0.0.300/24", "bad IPv4"), ("10.0.0.1/40", "prefix"), ("10.0.0.1/x", "prefix")] {
            assert!(v.parse::<Ipv4Cidr>().unwrap_err().contains(want), "{v}");
        }
        assert!("52:54:00".parse::<Mac>().unwrap_err().contains("six bytes"));
        assert!("zz:54:00:00:00:00".parse::<Mac>().is_err());
    }

    #[test]
    fn a_disk_is_created_zeroed_kept_or_taken_from_a_migration_snapshot() {
        let dir = std::env::temp_dir().join(format!("vigil-prepare-disk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let disk = dir.join("state/relay.disk");
        // Missing, no size: an error naming the file.
        let e = prepare_disk(&disk, None, None).unwrap_err();
        assert!(e.contains("relay.disk: no such file"), "{e}");
        // Missing with a size: created (its directory too), zeroed, of that size.
        prepare_disk(&disk, Some(2), None).expect("create");
        assert_eq!(std::fs::read(&disk).unwrap(), vec![0u8; 2 << 20]);
        // Present: kept as it is (the size is for creating only).
        std::fs::write(&disk, b"the VM's log").unwrap();
        prepare_disk(&disk, Some(2), None).expect("keep");
        assert_eq!(std::fs::read(&disk).unwrap(), b"the VM's log");
        // A migration snapshot's disk replaces it, and is taken (restored once).
        let snap = dir.join("migrate-relay-3");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join(SNAPSHOT_DISK), b"the source's disk").unwrap();
        prepare_disk(&disk, Some(2), Some(&snap)).expect("carried");
        assert_eq!(std::fs::read(&disk).unwrap(), b"the source's disk");
        assert!(!snap.join(SNAPSHOT_DISK).exists());
        // A snapshot without a disk leaves the host's own.
        prepare_disk(&disk, Some(2), Some(&snap)).expect("no disk in the snapshot");
        assert_eq!(std::fs::read(&disk).unwrap(), b"the source's disk");
        // A spec that creates its disk passes the check.
        let mut s = VmSpec::new("/images/kv", 64);
        s.disk = Some(dir.join("other.disk"));
        s.disk_mib = Some(1);
        s.check().expect("a disk to create");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn check_names_the_vm_and_the_problem() {
        let mut s = VmSpec::new("/images/kv", 64);
        s.disk = Some("/nonexistent/disk.img".into());
        let e = s.check().unwrap_err().to_string();
        assert!(e.starts_with("VM kv:") && e.contains("/nonexistent/disk.img"), "{e}");
        s.disk = None;
        s.scheduling.fifo_priority = Some(0);
        assert!(s.check().unwrap_err().to_string().contains("priority 0"));
    }
}
