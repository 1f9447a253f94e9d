//! The machine: KVM VM and vCPU, guest memory, devices, and the run loop that dispatches port
//! I/O exits to devices and control commands between exits.

use crate::arch;
use crate::control::{Command, Inbox, Reply};
use crate::devices::{block::Block, clock::Clock, net::Tap};
use crate::error::kvm as kvm_err;
use crate::memory::{GuestMem, Pod};
use crate::{Error, Result};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use vmm_abi::*;

/// How to build a VM.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Guest image (ELF).
    pub image: PathBuf,
    /// Disk image file.
    pub disk: Option<PathBuf>,
    /// Tap device for the network card.
    pub tap: Option<String>,
    /// Network configuration handed to the guest.
    pub net: NetConfig,
    /// Arguments handed to the guest.
    pub args: Vec<String>,
    /// Start with KVM dirty logging on.
    pub dirty_log: bool,
    /// How a protected VM's checkpoints find dirty pages (see [`crate::tracking`]).
    #[serde(default)]
    pub tracking: crate::tracking::TrackingChoice,
    /// Run the network device's host I/O in a backend process of its own
    /// ([`crate::backend`]); `None` does it in the VMM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_backend: Option<crate::backend::BackendProgram>,
    /// Run the block device's disk I/O in a backend process of its own; `None` does it in
    /// the VMM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blk_backend: Option<crate::backend::BackendProgram>,
    /// Guest memory as a shared memfd even without a backend process (what a backend
    /// process needs; for comparing the two kinds of memory).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_memory: bool,
}

/// Network configuration handed to the guest in the boot page.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig { mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56], ip: Ipv4Addr::UNSPECIFIED, prefix_len: 0, gateway: Ipv4Addr::UNSPECIFIED }
    }
}

impl VmConfig {
    /// A configuration with defaults for everything but the image and memory.
    pub fn new(image: impl Into<PathBuf>, mem_mib: u64) -> Self {
        VmConfig {
            mem_mib,
            image: image.into(),
            disk: None,
            tap: None,
            net: NetConfig::default(),
            args: vec![],
            dirty_log: false,
            tracking: Default::default(),
            net_backend: None,
            blk_backend: None,
            shared_memory: false,
        }
    }
}

/// Guest memory size of `config` in bytes, checked against the ABI's limits.
pub(crate) fn mem_bytes(config: &VmConfig) -> Result<u64> {
    let mem_bytes = config.mem_mib.saturating_mul(1 << 20);
    if !(MIN_MEM..=MAX_MEM).contains(&mem_bytes) {
        return Err(Error::Config(format!("memory {} MiB is outside {}..={} MiB", config.mem_mib, MIN_MEM >> 20, MAX_MEM >> 20)));
    }
    Ok(mem_bytes)
}

/// Why a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The guest called exit with this status.
    Exited(u32),
    /// The guest broke the ABI or crashed (triple fault, emulation failure, bad request...).
    Fault(String),
    /// A `quit` command ended the VM.
    Quit,
}

/// What `status` reports.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Status {
    pub paused: bool,
    pub guest_ns: u64,
    pub mem_bytes: u64,
    pub dirty_logging: bool,
    pub exits: u64,
    /// How the vCPU thread is scheduled and what it consumed (read on that thread).
    #[serde(default)]
    pub vcpu: Option<VcpuSched>,
    /// The network backend process, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_backend: Option<crate::backend::BackendStatus>,
    /// The block backend process, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blk_backend: Option<crate::backend::BackendStatus>,
}

/// The vCPU thread's scheduling policy and consumption.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct VcpuSched {
    /// `other`, `fifo`, `rr`, `deadline`, ...
    pub policy: String,
    /// SCHED_FIFO/RR priority.
    pub priority: u32,
    /// SCHED_DEADLINE runtime and period (µs).
    pub runtime_us: u64,
    pub period_us: u64,
    /// CPU time the thread has used, time it waited runnable, and how many times it ran
    /// (`/proc/thread-self/schedstat`).
    pub cpu_ns: u64,
    pub wait_ns: u64,
    pub timeslices: u64,
    /// The reservation the VMM enforces on the thread, and what it measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<crate::server::ServerStats>,
}

impl VcpuSched {
    /// The calling thread's.
    pub fn of_this_thread() -> Option<VcpuSched> {
        let a = crate::sched::get()?;
        let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
        let mut f = stat.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
        let policy = match a.policy {
            0 => "other",
            1 => "fifo",
            2 => "rr",
            3 => "batch",
            5 => "idle",
            6 => "deadline",
            _ => "unknown",
        };
        Some(VcpuSched {
            policy: policy.into(),
            priority: a.priority,
            runtime_us: a.runtime / 1000,
            period_us: a.period / 1000,
            cpu_ns: f.next().unwrap_or(0),
            wait_ns: f.next().unwrap_or(0),
            timeslices: f.next().unwrap_or(0),
            server: None,
        })
    }
}

/// Sets guest memory as KVM's memory slot 0, with or without dirty logging (turning logging on
/// starts a clean log).
fn memory_slot(vm: &VmFd, mem: &GuestMem, log_dirty: bool) -> Result<()> {
    slot_region(vm, mem.size(), mem.host_base()? as u64, log_dirty)
}

fn slot_region(vm: &VmFd, size: u64, host_base: u64, log_dirty: bool) -> Result<()> {
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: host_base,
    };
    // SAFETY: the region describes the VM's own guest memory mapping, which lives as long as
    // the VM (the `Vm` owns both and drops the VM fd first: fields drop in declaration order).
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
}

const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: u64 = 168;
/// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: u64 = 0xC018_AEC0;

/// Clears the dirty bits `bits` (one per page of slot 0, `pages` pages) and write-protects
/// those pages again (manual dirty-log protection).
fn clear_dirty_log(vm: &VmFd, pages: u64, bits: &[u64]) -> std::result::Result<(), String> {
    if (bits.len() as u64) < pages.div_ceil(64) {
        return Err(format!("a dirty bitmap of {} words for {pages} pages", bits.len()));
    }
    let mut arg = kvm_bindings::kvm_clear_dirty_log { slot: 0, num_pages: pages as u32, first_page: 0, ..Default::default() };
    arg.__bindgen_anon_1.dirty_bitmap = bits.as_ptr() as *mut libc::c_void;
    // SAFETY: KVM reads `pages` bits from the bitmap, which holds at least that many (checked
    // above) and outlives the call; the VM fd is ours.
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(vm), KVM_CLEAR_DIRTY_LOG as _, &arg) };
    if r < 0 {
        return Err(format!("KVM_CLEAR_DIRTY_LOG: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// KVM's dirty log of a VM's memory, as [`crate::tracking::DirtyLog`] sees it.
pub(crate) struct KvmLog<'a> {
    vm: &'a VmFd,
    mem_size: u64,
    host_base: Result<u64>,
    logging: &'a mut bool,
    manual: bool,
}

impl crate::tracking::DirtyLog for KvmLog<'_> {
    fn get(&mut self) -> std::result::Result<Vec<u64>, String> {
        if !*self.logging {
            return Err("dirty logging is off".into());
        }
        self.vm.get_dirty_log(0, self.mem_size as usize).map_err(|e| format!("KVM_GET_DIRTY_LOG: {e}"))
    }

    fn manual(&self) -> bool {
        self.manual
    }

    fn clear(&mut self, bits: &[u64]) -> std::result::Result<(), String> {
        if self.manual {
            clear_dirty_log(self.vm, self.mem_size / vmm_abi::PAGE_SIZE, bits)?;
        }
        Ok(())
    }

    fn set_enabled(&mut self, on: bool) -> std::result::Result<(), String> {
        let base = self.host_base.as_ref().map_err(|e| e.to_string())?;
        slot_region(self.vm, self.mem_size, *base, on).map_err(|e| e.to_string())?;
        *self.logging = on;
        Ok(())
    }
}

/// A virtual machine with one vCPU.
pub struct Vm {
    _kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    pub(crate) mem: GuestMem,
    pub(crate) config: VmConfig,
    pub(crate) clock: Clock,
    pub(crate) block: Option<Block>,
    pub(crate) tap: Option<Tap>,
    console: crate::devices::console::Console,
    pub(crate) dirty_logging: bool,
    /// KVM's manual dirty-log protection is on: a collection must say which pages to
    /// write-protect again ([`clear_dirty_log`]).
    manual_protect: bool,
    paused: bool,
    /// KVM_RUN left an exit whose completion needs one more KVM_RUN (see `settle`).
    unsettled: bool,
    exits: u64,
    /// Checkpoint replication state while protected (see `checkpoint.rs`).
    pub(crate) protection: Option<crate::checkpoint::Protection>,
    /// The number the next protection epoch gets (epochs are never reused by a VM).
    pub(crate) next_epoch: u64,
    /// The dirty tracker's shadow buffer of an ended protection, for the next one.
    pub(crate) spare_shadow: Option<Vec<u8>>,
    /// The port exit being handled must be issued again by the guest (a block request
    /// waiting for room in the disk mirror): its request block address.
    retry_block: Option<u64>,
    /// Trace records read so far (`None`: a restored VM, whose ring's records predate it and
    /// are skipped at the first read).
    trace_read: Option<u64>,
    /// The host timer that brings the vCPU thread out for the guest's next upcall (created on
    /// the running thread when first needed, dropped at the end of each run).
    upcall_timer: Option<crate::upcall::ThreadTimer>,
    /// A reservation the VMM enforces on the vCPU thread ([`crate::server`]).
    server: Option<crate::server::PeriodicServer>,
}

impl Vm {
    /// Creates the VM, loads the image and writes the boot page; the vCPU is ready at entry.
    pub fn create(config: VmConfig, console: Box<dyn Write + Send>) -> Result<Self> {
        let mut vm = Self::bare(config, console)?;
        let loaded = crate::loader::load_file(&vm.config.image.clone(), &mut vm.mem)?;
        arch::write_page_tables(&mut vm.mem)?;
        arch::write_gdt(&mut vm.mem)?;
        let stack_top = vm.mem.size();
        vm.write_boot_info(loaded.end, stack_top)?;
        arch::setup_sregs(&vm.vcpu)?;
        arch::setup_regs(&vm.vcpu, loaded.entry, stack_top)?;
        vm.trace_read = Some(0);
        Ok(vm)
    }

    /// The guest's job marks since the last call. The vCPU is stopped while this runs, so the
    /// ring is read whole; whatever the guest wrote there (it is guest memory) gives at most
    /// [`TRACE_CAPACITY`] marks, never an error.
    pub fn read_trace(&mut self) -> crate::control::Trace {
        let mut t = self.read_marks();
        if let Some(tap) = self.tap.as_mut() {
            (t.frames, t.frames_lost) = tap.take_stamps();
        }
        t
    }

    fn read_marks(&mut self) -> crate::control::Trace {
        use crate::control::{Mark, Trace};
        let tsc_khz = self.vcpu.get_tsc_khz().unwrap_or(0);
        let Ok(h) = self.mem.read_obj::<TraceHeader>(TRACE_ADDR) else { return Trace { tsc_khz, ..Trace::default() } };
        if h.magic != TRACE_MAGIC {
            return Trace { tsc_khz, ..Trace::default() };
        }
        // A ring that went backwards (the guest set it up again) starts over.
        let read = match self.trace_read {
            Some(r) if r <= h.written => r,
            _ => h.written,
        };
        let from = read.max(h.written.saturating_sub(TRACE_CAPACITY));
        let mut marks = Vec::with_capacity((h.written - from) as usize);
        for n in from..h.written {
            let at = TRACE_ADDR + TRACE_HEADER + (n % TRACE_CAPACITY) * std::mem::size_of::<TraceRecord>() as u64;
            if let Ok(r) = self.mem.read_obj::<TraceRecord>(at) {
                marks.push(Mark { kind: r.kind, id: r.id, tsc: r.tsc });
            }
        }
        self.trace_read = Some(h.written);
        Trace { tsc_khz, lost: from - read, marks, ..Trace::default() }
    }

    /// KVM VM, vCPU, memory and devices, but nothing in memory and no registers set.
    pub(crate) fn bare(config: VmConfig, console: Box<dyn Write + Send>) -> Result<Self> {
        Self::bare_with(config, console, None, None)
    }

    /// As [`Vm::bare`], with `mem` (of the configured size) moved in instead of fresh memory,
    /// and `tap` (already open) instead of opening the configured one.
    pub(crate) fn bare_with(config: VmConfig, console: Box<dyn Write + Send>, mem: Option<GuestMem>, tap: Option<Tap>) -> Result<Self> {
        let mem_bytes = mem_bytes(&config)?;
        let args_len: usize = config.args.iter().map(|a| a.len() + 1).sum();
        if args_len as u64 > ARGS_MAX || config.args.iter().any(|a| a.contains('\0')) {
            return Err(Error::Config(format!("guest arguments take {args_len} bytes (at most {ARGS_MAX}, no NUL)")));
        }
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // Manual dirty-log protection: collecting the log does not write-protect the pages
        // again, the VMM says which to (so hot pages can stay writable: `tracking::Hot`).
        let manual_protect = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) & 1 != 0 && {
            let cap =
                kvm_bindings::kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 as u32, args: [1, 0, 0, 0], ..Default::default() };
            vm.enable_cap(&cap).is_ok()
        };
        // A backend process maps guest memory: it must be shared (a memfd).
        let shared = config.shared_memory
            || (config.net_backend.is_some() && config.tap.is_some())
            || (config.blk_backend.is_some() && config.disk.is_some());
        let mem = match mem {
            Some(m) if m.size() != mem_bytes => {
                return Err(Error::Config(format!("memory of {} bytes for a VM configured with {mem_bytes}", m.size())))
            }
            Some(m) if shared => m.into_shared()?,
            Some(m) => m,
            None if shared => GuestMem::new_shared(mem_bytes)?,
            None => GuestMem::new(mem_bytes)?,
        };
        let mut block = config.disk.as_deref().map(Block::open).transpose()?;
        if let (Some(b), Some(program)) = (block.as_mut(), &config.blk_backend) {
            b.attach_backend(&mem, program)?;
        }
        let tap = match tap {
            Some(t) => Some(t),
            None => config.tap.as_deref().map(Tap::open).transpose()?,
        };
        let mut tap = tap;
        if let (Some(t), Some(program)) = (tap.as_mut(), &config.net_backend) {
            let mut program = program.clone();
            program.sync_rx |= !net_receive_ring(block.as_ref().is_some_and(|b| b.backend_status().is_some()));
            t.attach_backend(&mem, &program)?;
        }
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let dirty = config.dirty_log;
        let mut m = Vm {
            _kvm: kvm,
            vm,
            vcpu,
            mem,
            config,
            clock: Clock::new(0),
            block,
            tap,
            console: crate::devices::console::Console::new(console),
            dirty_logging: false,
            manual_protect,
            paused: false,
            unsettled: false,
            exits: 0,
            protection: None,
            next_epoch: 1,
            spare_shadow: None,
            retry_block: None,
            trace_read: None,
            upcall_timer: None,
            server: None,
        };
        m.set_memory_slot(dirty)?;
        Ok(m)
    }

    fn set_memory_slot(&mut self, log_dirty: bool) -> Result<()> {
        memory_slot(&self.vm, &self.mem, log_dirty)?;
        self.dirty_logging = log_dirty;
        Ok(())
    }

    /// The parts a checkpoint's dirty tracking works on at once: the tracker's KVM log, guest
    /// memory, and the protection state.
    pub(crate) fn tracking_parts(&mut self) -> (KvmLog<'_>, &GuestMem, Option<&mut crate::checkpoint::Protection>) {
        (
            KvmLog {
                vm: &self.vm,
                mem_size: self.mem.size(),
                host_base: self.mem.host_base().map(|b| b as u64),
                logging: &mut self.dirty_logging,
                manual: self.manual_protect,
            },
            &self.mem,
            self.protection.as_mut(),
        )
    }

    fn write_boot_info(&mut self, image_end: u64, stack_top: u64) -> Result<()> {
        let c = &self.config;
        let heap_start = image_end.max(IMAGE_MIN_ADDR);
        let heap_end = stack_top - STACK_SIZE;
        if heap_start >= heap_end {
            return Err(Error::Config(format!("the image leaves no room for a heap in {} MiB", c.mem_mib)));
        }
        let mut args = Vec::new();
        for a in &c.args {
            args.extend_from_slice(a.as_bytes());
            args.push(0);
        }
        let info = BootInfo {
            magic: BOOT_MAGIC,
            abi_version: ABI_VERSION,
            argc: c.args.len() as u32,
            mem_size: self.mem.size(),
            heap_start,
            heap_size: heap_end - heap_start,
            stack_top,
            disk_sectors: self.block.as_ref().map_or(0, |b| b.sectors()),
            has_net: self.tap.is_some() as u32,
            prefix_len: c.net.prefix_len as u32,
            mac: c.net.mac,
            _pad: [0; 2],
            ipv4: c.net.ip.octets(),
            gateway: c.net.gateway.octets(),
            args_len: args.len() as u32,
            _pad2: 0,
        };
        self.mem.write_obj(BOOT_INFO_ADDR, &info).map_err(Error::Memory)?;
        self.mem.write(BOOT_INFO_ADDR + ARGS_OFFSET, &args).map_err(Error::Memory)?;
        self.mem.take_vmm_dirty();
        Ok(())
    }

    /// Whether KVM's manual dirty-log protection is on (hybrid tracking possible).
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// The current state.
    pub fn status(&self) -> Status {
        Status {
            paused: self.paused,
            guest_ns: self.clock.now_ns(),
            mem_bytes: self.mem.size(),
            dirty_logging: self.dirty_logging,
            exits: self.exits,
            vcpu: VcpuSched::of_this_thread().map(|v| VcpuSched { server: self.server.as_ref().map(|s| s.stats()), ..v }),
            net_backend: self.tap.as_ref().and_then(|t| t.backend_status()),
            blk_backend: self.block.as_ref().and_then(|b| b.backend_status()),
        }
    }

    /// What the reservation the VMM enforces measured (`None`: none).
    pub fn reservation_stats(&self) -> Option<crate::server::ServerStats> {
        self.server.as_ref().map(|s| s.stats())
    }

    /// Enforces a hard reservation of `budget_ns` every `period_ns` on the thread that runs
    /// the vCPU, by the VMM itself ([`crate::server`]; for hosts where SCHED_DEADLINE cannot
    /// run a vCPU). The caller runs that thread under SCHED_FIFO above every other real-time
    /// task of its CPU.
    pub fn set_reservation(&mut self, budget_ns: u64, period_ns: u64) -> Result<()> {
        if budget_ns == 0 || budget_ns > period_ns {
            return Err(Error::Config(format!("a reservation of {budget_ns} ns every {period_ns} ns (0 < budget ≤ period)")));
        }
        self.server = Some(crate::server::PeriodicServer::new(budget_ns, period_ns));
        Ok(())
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// Turns KVM dirty logging on or off.
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<()> {
        if on && !self.dirty_logging {
            // Start from a clean slate: what the VMM wrote before counts as already known.
            self.mem.take_vmm_dirty();
        }
        self.set_memory_slot(on)
    }

    /// Pages dirtied since the last call (KVM's log OR pages the VMM wrote), as a bitmap of
    /// one bit per page, and clears them. Without dirty logging only the VMM's own writes are
    /// known, so this is an error.
    pub fn dirty_bitmap_get_and_clear(&mut self) -> Result<Vec<u64>> {
        if !self.dirty_logging {
            return Err(Error::Config("dirty logging is off (start it first)".into()));
        }
        let mut bits = self.vm.get_dirty_log(0, self.mem.size() as usize).map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
        if self.manual_protect {
            clear_dirty_log(&self.vm, self.mem.pages(), &bits).map_err(Error::Config)?;
        }
        let vmm = self.mem.take_vmm_dirty();
        for (b, v) in bits.iter_mut().zip(vmm) {
            *b |= v;
        }
        Ok(bits)
    }

    /// Pages dirtied since the last call, as ascending page numbers.
    pub fn dirty_pages_get_and_clear(&mut self) -> Result<Vec<u64>> {
        let bits = self.dirty_bitmap_get_and_clear()?;
        Ok(pages_of(&bits))
    }

    /// Runs until the guest exits or faults, or a `quit` command arrives. Commands from
    /// `inbox` are handled between exits.
    pub fn run(&mut self, inbox: Option<&Inbox>) -> Result<Stop> {
        // The kick signal (commands, upcall and reservation timers) finds the vCPU through this.
        crate::control::register_vcpu(self.vcpu.get_kvm_run());
        if let Some(i) = inbox {
            i.attach(self.vcpu.get_kvm_run());
        }
        let result = self.run_loop(inbox);
        if let Some(i) = inbox {
            i.detach();
        }
        crate::control::register_vcpu(std::ptr::null_mut());
        // Timers signal the thread that created them: a later run (perhaps on another thread)
        // makes its own.
        self.upcall_timer = None;
        self.clock.pause();
        self.console.flush();
        result
    }

    fn run_loop(&mut self, inbox: Option<&Inbox>) -> Result<Stop> {
        if !self.paused {
            self.clock.resume();
        }
        loop {
            // A kick (command, upcall or reservation timer) that arrives from here on either
            // is seen by the checks below or makes the next KVM_RUN return at once.
            self.vcpu.set_kvm_immediate_exit(0);
            if let Some(inbox) = inbox {
                if let Some(stop) = self.handle_commands(inbox)? {
                    return Ok(stop);
                }
            }
            if let Some(stop) = self.before_entry(inbox)? {
                return Ok(stop);
            }
            let exit = match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if data.len() == 4 {
                        Exit::Out(port, u32::from_le_bytes([data[0], data[1], data[2], data[3]]))
                    } else {
                        Exit::Fault(format!("{}-byte write to port 0x{port:x} (the ABI uses 4-byte `out dx, eax`)", data.len()))
                    }
                }
                Ok(VcpuExit::IoIn(port, _)) => Exit::Fault(format!("read from port 0x{port:x} (no device reads ports)")),
                Ok(VcpuExit::MmioRead(a, _)) | Ok(VcpuExit::MmioWrite(a, _)) => {
                    Exit::Fault(format!("access to guest-physical 0x{a:x}, outside guest memory"))
                }
                Ok(VcpuExit::Shutdown) => Exit::Fault("triple fault (KVM shutdown exit): the guest crashed".into()),
                Ok(VcpuExit::InternalError) => Exit::Fault(self.internal_error()),
                Ok(VcpuExit::FailEntry(reason, cpu)) => Exit::Fault(format!("KVM entry failure, reason 0x{reason:x} on cpu {cpu}")),
                Ok(VcpuExit::Hlt) => Exit::Fault("hlt".into()),
                Ok(other) => Exit::Fault(format!("unexpected KVM exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
                Err(e) => return Err(Error::Kvm { op: "KVM_RUN", errno: e }),
            };
            self.exits += 1;
            match exit {
                Exit::Interrupted => self.unsettled = false,
                Exit::Out(port, value) => {
                    self.unsettled = true;
                    match self.port_out(port, value, inbox) {
                        Ok(None) => {
                            if let Some(addr) = self.retry_block.take() {
                                if self.rewind_out()? {
                                    if let Some(stop) = self.wait_for_mirror(addr, inbox)? {
                                        return Ok(stop);
                                    }
                                } else if let Some(Err(reason)) = self.block.as_mut().map(|b| b.request(&mut self.mem, addr)) {
                                    // Not rewindable: the request runs now, its writes
                                    // waiting for room one by one.
                                    return Ok(Stop::Fault(self.describe(format!("port 0x{port:x}: {reason}"))));
                                }
                            }
                        }
                        Ok(Some(stop)) => return Ok(stop),
                        Err(reason) => return Ok(Stop::Fault(self.describe(format!("port 0x{port:x}: {reason}")))),
                    }
                }
                Exit::Fault(reason) => return Ok(Stop::Fault(self.describe(reason))),
            }
        }
    }

    /// What KVM said about an internal-error exit: the suberror by name and its data words.
    fn internal_error(&mut self) -> String {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit, `internal` is the union member KVM
        // filled in; it is plain data, valid for any bit pattern.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let what = match internal.suberror {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => {
                "emulation failure (KVM could not emulate an instruction: a jump or access past guest memory, or an instruction this host cannot run for the guest)"
            }
            kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "an exception while delivering another (simultaneous exceptions)",
            kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "an exit while delivering an event",
            kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "an exit reason KVM did not expect",
            _ => "unknown suberror",
        };
        let n = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..n].iter().map(|d| format!("0x{d:x}")).collect();
        format!("KVM internal error: {what} (suberror {}, data [{}])", internal.suberror, data.join(", "))
    }

    fn describe(&self, reason: String) -> String {
        match self.vcpu.get_regs() {
            Ok(r) => format!("{reason} (rip=0x{:x} rsp=0x{:x} rflags=0x{:x})", r.rip, r.rsp, r.rflags),
            Err(_) => reason,
        }
    }

    /// Completes the pending `out` and puts the guest back on it, so that it issues it again
    /// (and a checkpoint taken meanwhile records the request as not yet made). KVM leaves
    /// `rip` on the instruction until the next KVM_RUN completes it; PVM (measured here) has
    /// already moved it past: then the instruction is the one-byte `out dx, eax` (0xEF) before
    /// `rip`. False (the instruction completed, not rewound) when neither holds.
    fn rewind_out(&mut self) -> Result<bool> {
        let before = self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        self.settle()?;
        let mut regs = self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let start = if regs.rip != before.rip {
            Some(before.rip)
        } else {
            let mut op = [0u8];
            let at = before.rip.checked_sub(1);
            at.filter(|a| self.mem.read(*a, &mut op).is_ok() && op[0] == 0xef)
        };
        let Some(start) = start else { return Ok(false) };
        regs.rip = start;
        self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        Ok(true)
    }

    /// The block request at `addr` does not fit in the disk mirror and the guest was put back
    /// on its `out`: serves commands until the request fits.
    fn wait_for_mirror(&mut self, addr: u64, inbox: Option<&Inbox>) -> Result<Option<Stop>> {
        loop {
            if let Some(inbox) = inbox {
                self.vcpu.set_kvm_immediate_exit(0);
                if let Some(stop) = self.handle_commands(inbox)? {
                    return Ok(Some(stop));
                }
            }
            let ready = match self.block.as_mut() {
                Some(b) => b.ready(&self.mem, addr, std::time::Duration::from_millis(2)),
                None => true,
            };
            if ready {
                return Ok(None);
            }
        }
    }

    /// Completes a pending exit (KVM finishes an I/O instruction only on the next KVM_RUN), so
    /// that the registers read next are the ones after it.
    pub(crate) fn settle(&mut self) -> Result<()> {
        if self.unsettled {
            self.vcpu.set_kvm_immediate_exit(1);
            let r = self.vcpu.run();
            let interrupted = matches!(&r, Err(e) if e.errno() == libc::EINTR);
            drop(r);
            self.vcpu.set_kvm_immediate_exit(0);
            if !interrupted {
                return Err(Error::Os("KVM_RUN with immediate_exit did not return EINTR".into()));
            }
            self.unsettled = false;
        }
        Ok(())
    }

    fn handle_commands(&mut self, inbox: &Inbox) -> Result<Option<Stop>> {
        inbox.shared.drain();
        loop {
            let next = if self.paused { inbox.rx.recv().ok() } else { inbox.rx.try_recv().ok() };
            let Some((cmd, reply)) = next else {
                return Ok(None);
            };
            let (answer, stop) = self.command(cmd);
            let _ = reply.send(answer);
            if stop.is_some() {
                return Ok(stop);
            }
            if !self.paused {
                inbox.shared.drain();
            }
        }
    }

    /// Pauses the VM (the vCPU is already out of KVM_RUN when this is called).
    pub fn pause(&mut self) -> Result<()> {
        if !self.paused {
            self.settle()?;
            self.clock.pause();
            self.paused = true;
        }
        Ok(())
    }

    fn command(&mut self, cmd: Command) -> (Reply, Option<Stop>) {
        let r = match cmd {
            Command::Pause => self.pause().map(|_| Reply::ok()),
            Command::Resume => {
                self.unpause();
                Ok(Reply::ok())
            }
            Command::Status => Ok(Reply { status: Some(self.status()), ..Reply::ok() }),
            Command::Snapshot { dir } => self.pause().and_then(|_| self.snapshot(&dir)).map(|_| Reply::ok()),
            Command::DirtyLogStart | Command::DirtyLogStop | Command::DirtyLogGetAndClear if self.protection.is_some() => {
                Err(Error::Config("the VM is protected: checkpoints collect its dirty pages (unprotect first)".into()))
            }
            Command::DirtyLogStart => self.set_dirty_logging(true).map(|_| Reply::ok()),
            Command::DirtyLogStop => self.set_dirty_logging(false).map(|_| Reply::ok()),
            Command::DirtyLogGetAndClear => self.dirty_pages_get_and_clear().map(|p| Reply { dirty_pages: Some(p), ..Reply::ok() }),
            Command::NetHold | Command::NetSeal | Command::NetUnhold | Command::NetRelease { .. } if self.protection.is_some() => {
                Err(Error::Config("the VM is protected: checkpoints seal its output epochs and the backup's acknowledgements release them (unprotect first)".into()))
            }
            Command::NetHold | Command::NetSeal | Command::NetRelease { .. } | Command::NetUnhold => match self.tap.as_mut() {
                None => Err(Error::Config("the VM has no network device".into())),
                Some(tap) => {
                    let value = match cmd {
                        Command::NetHold => {
                            tap.hold();
                            None
                        }
                        Command::NetSeal => Some(tap.seal()),
                        Command::NetRelease { epoch } => Some(tap.release(epoch) as u64),
                        _ => Some(tap.unhold() as u64),
                    };
                    Ok(Reply { value, ..Reply::ok() })
                }
            },
            Command::ReleaseAcked { epoch } => match (&self.protection, self.tap.as_mut()) {
                (None, _) => Err(Error::Config("the VM is not protected (send net-release)".into())),
                (_, None) => Err(Error::Config("the VM has no network device".into())),
                (Some(_), Some(tap)) => Ok(Reply { value: Some(tap.release(epoch) as u64), ..Reply::ok() }),
            },
            Command::Protect { mirror, hold, input } => self.protect_logging(mirror, hold, input).map(|_| Reply::ok()),
            Command::HoldOutput => self.hold_output().map(|_| Reply::ok()),
            Command::DrainInput => Ok(Reply { value: self.tap.as_mut().map(|t| t.drain_to_log()), ..Reply::ok() }),
            Command::Unprotect => self.unprotect().map(|_| Reply::ok()),
            Command::Checkpoint { buffer } => self.checkpoint(buffer).map(|c| Reply { checkpoint: Some(Box::new(c)), ..Reply::ok() }),
            Command::Tracking { choice } => {
                self.set_tracking(choice);
                Ok(Reply::ok())
            }
            Command::MemoryView => self.mem.view().map(|v| Reply {
                memory_view: Some(v),
                disk_settler: self.block.as_ref().and_then(|b| b.settler()),
                ..Reply::ok()
            }),
            Command::Announce { count } => self.announce(count).map(|n| Reply { value: Some(n), ..Reply::ok() }),
            Command::Trace => Ok(Reply { trace: Some(self.read_trace()), ..Reply::ok() }),
            Command::Quit => return (Reply::ok(), Some(Stop::Quit)),
        };
        (r.unwrap_or_else(Reply::err), None)
    }

    fn port_out(&mut self, port: u16, value: u32, inbox: Option<&Inbox>) -> Result<Option<Stop>, String> {
        let addr = value as u64;
        match port {
            PORT_CONSOLE => {
                let req: ConsoleRequest = self.mem.read_obj(addr)?;
                if req.len > CONSOLE_MAX {
                    return Err(format!("console write of {} bytes (at most {CONSOLE_MAX})", req.len));
                }
                let mut buf = vec![0; req.len as usize];
                self.mem.read(req.addr, &mut buf)?;
                self.console.write(&buf);
            }
            PORT_CLOCK => {
                self.mem.read_obj::<ClockRequest>(addr)?;
                self.mem.write_obj(addr, &ClockRequest { now_ns: self.clock.now_ns() })?;
            }
            PORT_EXIT => return Ok(Some(Stop::Exited(value))),
            // The upcall block changed: the next entry looks at it.
            PORT_UPCALL => {}
            PORT_IDLE => {
                let req: IdleRequest = self.mem.read_obj(addr)?;
                if req.rx != 0 && self.tap.is_none() {
                    return Err("idle with a receive request but the VM has no network device".into());
                }
                let events = self.idle(req.deadline_ns, inbox);
                if let (Some(tap), true) = (self.tap.as_mut(), req.rx != 0) {
                    tap.receive(&mut self.mem, req.rx)?;
                }
                let events = match &self.tap {
                    Some(t) if req.rx != 0 => events & !EVENT_NET_RX | if t.readable() { EVENT_NET_RX } else { 0 },
                    _ => events,
                };
                self.mem.write_obj(addr, &IdleRequest { now_ns: self.clock.now_ns(), events, ..req })?;
            }
            PORT_BLOCK => match self.block.as_mut() {
                Some(b) => {
                    if b.ready(&self.mem, addr, std::time::Duration::ZERO) {
                        b.request(&mut self.mem, addr)?
                    } else {
                        self.retry_block = Some(addr)
                    }
                }
                None => return Err("block request but the VM has no disk".into()),
            },
            PORT_NET_TX | PORT_NET_RX => {
                let Some(tap) = self.tap.as_mut() else {
                    return Err("network request but the VM has no network device".into());
                };
                if port == PORT_NET_TX {
                    tap.transmit(&mut self.mem, addr)?
                } else {
                    tap.receive(&mut self.mem, addr)?
                }
            }
            _ => return Err("no device at this port".into()),
        }
        Ok(None)
    }

    /// What happens between two runs of the vCPU besides commands: the reservation's budget
    /// (waiting for the next period when it is spent, still serving commands) and the guest's
    /// upcall (delivered when due, its timer armed otherwise).
    fn before_entry(&mut self, inbox: Option<&Inbox>) -> Result<Option<Stop>> {
        while let Some(server) = self.server.as_mut() {
            let Some(wait) = server.before_entry(self.clock.now_ns())? else { break };
            let from = crate::upcall::host_now_ns();
            if let Some(stop) = self.wait_until(from + wait, inbox)? {
                return Ok(Some(stop));
            }
            if let Some(server) = self.server.as_mut() {
                server.throttled(crate::upcall::host_now_ns().saturating_sub(from));
            }
        }
        self.upcall_check()
    }

    /// Waits until host monotonic time `until`, serving commands.
    fn wait_until(&mut self, until: u64, inbox: Option<&Inbox>) -> Result<Option<Stop>> {
        use std::os::fd::AsRawFd;
        loop {
            let now = crate::upcall::host_now_ns();
            if now >= until {
                return Ok(None);
            }
            let wait = until - now;
            let ts = libc::timespec { tv_sec: (wait / 1_000_000_000) as i64, tv_nsec: (wait % 1_000_000_000) as i64 };
            let mut fds: Vec<libc::pollfd> =
                inbox.iter().map(|i| libc::pollfd { fd: i.shared.event.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
            // SAFETY: `fds` is a live array of `fds.len()` pollfds and `ts` a live timespec.
            unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, &ts, std::ptr::null()) };
            if let Some(inbox) = inbox {
                self.vcpu.set_kvm_immediate_exit(0);
                if let Some(stop) = self.handle_commands(inbox)? {
                    return Ok(Some(stop));
                }
            }
        }
    }

    /// Delivers the guest's upcall if it is due, or arms the timer for it.
    fn upcall_check(&mut self) -> Result<Option<Stop>> {
        use crate::upcall::{deliver, due, host_now_ns, Due, ThreadTimer};
        let Ok(block) = self.mem.read_obj::<UpcallBlock>(UPCALL_ADDR) else { return Ok(None) };
        let now = self.clock.now_ns();
        match due(&block, now) {
            Due::Nothing => Ok(None),
            Due::Masked if block.pending != 0 => Ok(None),
            Due::Masked => {
                let pending = UpcallBlock { pending: 1, ..block };
                if let Err(reason) = self.mem.write_obj(UPCALL_ADDR, &pending) {
                    return Ok(Some(Stop::Fault(self.describe(format!("upcall: {reason}")))));
                }
                Ok(None)
            }
            Due::At(deadline) => {
                if self.upcall_timer.is_none() {
                    self.upcall_timer = Some(ThreadTimer::for_this_thread()?);
                }
                let host = host_now_ns();
                if let Some(t) = self.upcall_timer.as_mut() {
                    t.fire_by(host.saturating_add(deadline - now), host);
                }
                Ok(None)
            }
            Due::Now => {
                self.settle()?;
                let regs = self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
                let d = match deliver(&regs, &block, self.clock.now_ns(), self.mem.size()) {
                    Ok(d) => d,
                    Err(reason) => return Ok(Some(Stop::Fault(self.describe(reason)))),
                };
                if let Err(reason) = self.mem.write_obj(d.frame_addr, &d.frame).and_then(|()| self.mem.write_obj(UPCALL_ADDR, &d.block)) {
                    return Ok(Some(Stop::Fault(self.describe(format!("upcall: {reason}")))));
                }
                self.vcpu.set_regs(&d.regs).map_err(kvm_err("KVM_SET_REGS"))?;
                Ok(None)
            }
        }
    }

    /// The guest clock time of the next upcall that can be delivered (`u64::MAX`: none).
    fn upcall_deadline(&self) -> u64 {
        match self.mem.read_obj::<UpcallBlock>(UPCALL_ADDR).map(|b| crate::upcall::due(&b, self.clock.now_ns())) {
            Ok(crate::upcall::Due::At(d)) => d,
            Ok(crate::upcall::Due::Now) => 0,
            Ok(crate::upcall::Due::Masked) | Ok(crate::upcall::Due::Nothing) | Err(_) => u64::MAX,
        }
    }

    /// Blocks until a frame arrives, a command is sent, or guest time reaches `deadline` (or
    /// the guest's next upcall is due).
    fn idle(&mut self, deadline: u64, inbox: Option<&Inbox>) -> u64 {
        let deadline = deadline.min(self.upcall_deadline());
        // The disk's backend writes what the guest wrote while the guest idles.
        if let Some(b) = &self.block {
            b.kick_owed();
        }
        let mut fds = Vec::with_capacity(2);
        if let Some(t) = &self.tap {
            fds.push(libc::pollfd { fd: t.wait_fd(), events: libc::POLLIN, revents: 0 });
        }
        if let Some(i) = inbox {
            use std::os::fd::AsRawFd;
            fds.push(libc::pollfd { fd: i.shared.event.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        let now = self.clock.now_ns();
        let waiting = self.tap.as_ref().is_some_and(|t| !t.prepare_wait());
        if deadline > now && !waiting {
            let wait = deadline - now;
            let ts = libc::timespec { tv_sec: (wait / 1_000_000_000).min(i32::MAX as u64) as i64, tv_nsec: (wait % 1_000_000_000) as i64 };
            let tsp = if deadline == u64::MAX { std::ptr::null() } else { &ts as *const libc::timespec };
            // SAFETY: `fds` is a live array of `fds.len()` pollfds, `tsp` null or a live
            // timespec. EINTR (a kick) simply ends the wait.
            unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, tsp, std::ptr::null()) };
        }
        if let Some(t) = &self.tap {
            t.end_wait(fds.first().is_some_and(|p| p.revents != 0));
        }
        match &self.tap {
            Some(t) if t.readable() => EVENT_NET_RX,
            _ => 0,
        }
    }

    pub(crate) fn vcpu(&self) -> &VcpuFd {
        &self.vcpu
    }

    pub(crate) fn mark_paused(&mut self) {
        self.paused = true;
    }

    pub(crate) fn unpause(&mut self) {
        self.paused = false;
        self.clock.resume();
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Sets the function the vCPU thread calls for the first network frame held back in each
    /// epoch (so a replication driver learns at once that output waits). Returns false when
    /// the VM has no network device.
    pub fn set_output_hook(&mut self, hook: Box<dyn Fn() + Send>) -> bool {
        match self.tap.as_mut() {
            Some(t) => {
                t.set_output_hook(Some(hook));
                true
            }
            None => false,
        }
    }

    /// Whether the VM is paused.
    pub fn paused(&self) -> bool {
        self.paused
    }
}

enum Exit {
    Out(u16, u32),
    Fault(String),
    Interrupted,
}

/// Page numbers of the set bits of a bitmap.
pub fn pages_of(bits: &[u64]) -> Vec<u64> {
    let mut pages = Vec::new();
    for (w, &word) in bits.iter().enumerate() {
        let mut x = word;
        while x != 0 {
            let b = x.trailing_zeros() as u64;
            pages.push(w as u64 * 64 + b);
            x &= x - 1;
        }
    }
    pages
}

// SAFETY: `Vm` owns its fds and mapping; the raw kvm_run pointer inside `VcpuFd` is only used
// by the thread that runs the VM.
unsafe impl Send for Vm {}

#[allow(dead_code)]
fn _assert_pod<T: Pod>() {}

/// Whether a VM's network backend process gets its receive ring (else it receives
/// synchronously, a round trip when the tap has a frame). Yes, unless the VM's disk has a
/// backend process too and this process may run on fewer than four CPUs: three busy processes
/// (the vCPU, two backends) then share them, and measured on two shared cores with kv's disk
/// log the receive ring cost 25–38 % at p99 while the setup without it was the in-VMM
/// backends' equal (without a disk the ring was the better one; docs/components.md).
/// `VIGIL_NET_RX_RING=1` (or `0`) decides instead.
pub fn net_receive_ring(disk_backend: bool) -> bool {
    match std::env::var("VIGIL_NET_RX_RING").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => !disk_backend || std::thread::available_parallelism().map_or(1, |n| n.get()) >= 4,
    }
}
