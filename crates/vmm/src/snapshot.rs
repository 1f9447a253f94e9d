//! Snapshots: a directory with `vm.json` (format version, configuration, device state, guest
//! clock), `memory.bin` (all of guest memory) and `vcpu0.bin` (KVM register state). Restoring
//! builds a new KVM VM in any process; guest time continues where the snapshot left it.

use crate::devices::clock::Clock;
use crate::error::kvm;
use crate::machine::{Vm, VmConfig};
use crate::memory::{GuestMem, Pod};
use crate::{Error, Result};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, kvm_xcrs, kvm_xsave};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Version of the snapshot format.
pub const SNAPSHOT_VERSION: u32 = 1;

const VCPU_MAGIC: &[u8; 8] = b"VIGILCPU";

/// `vm.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub abi_version: u32,
    pub config: VmConfig,
    /// Guest clock at the snapshot.
    pub guest_ns: u64,
    /// Disk size in sectors at the snapshot (the disk file must still have it).
    pub disk_sectors: u64,
}

/// Device and host settings that may change on restore (another host: another tap, disk path).
#[derive(Debug, Clone, Default)]
pub struct RestoreOverrides {
    pub tap: Option<String>,
    pub disk: Option<PathBuf>,
}

impl RestoreOverrides {
    /// `config` with the overridden settings replaced.
    pub fn apply(&self, mut config: VmConfig) -> VmConfig {
        if self.tap.is_some() {
            config.tap = self.tap.clone();
        }
        if self.disk.is_some() {
            config.disk = self.disk.clone();
        }
        config
    }
}

/// A parsed vCPU state blob: everything KVM needs to continue the vCPU.
pub(crate) struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    xcrs: kvm_xcrs,
    xsave: Option<kvm_xsave>,
}

impl VcpuState {
    /// Parses a blob written by `Vm::vcpu_state`, checking magic, version and every size.
    pub(crate) fn parse(b: &[u8]) -> Result<VcpuState, String> {
        if b.len() < 12 || &b[..8] != VCPU_MAGIC {
            return Err("not a vCPU state blob (bad magic)".into());
        }
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if version != SNAPSHOT_VERSION {
            return Err(format!("format version {version}"));
        }
        let mut rest = &b[12..];
        let mut part = |name: &str| -> Result<&[u8], String> {
            let len = rest.get(..4).ok_or(format!("truncated before {name}"))?;
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let data = rest.get(4..4usize.saturating_add(len)).ok_or(format!("truncated in {name}"))?;
            rest = &rest[4 + len..];
            Ok(data)
        };
        fn pod<T: Pod>(name: &str, data: &[u8]) -> Result<T, String> {
            let mut v = T::zeroed();
            if data.len() != std::mem::size_of::<T>() {
                return Err(format!("{name} has {} bytes, expected {}", data.len(), std::mem::size_of::<T>()));
            }
            v.as_bytes_mut().copy_from_slice(data);
            Ok(v)
        }
        let regs: kvm_regs = pod("regs", part("regs")?)?;
        let sregs: kvm_sregs = pod("sregs", part("sregs")?)?;
        let fpu: kvm_fpu = pod("fpu", part("fpu")?)?;
        let xcrs: kvm_xcrs = pod("xcrs", part("xcrs")?)?;
        let xsave_bytes = part("xsave")?;
        let xsave = match xsave_bytes.len() {
            0 => None,
            4096 => {
                let mut x = kvm_xsave::default();
                for (w, c) in x.region.iter_mut().zip(xsave_bytes.chunks_exact(4)) {
                    *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                Some(x)
            }
            n => return Err(format!("xsave has {n} bytes, expected 0 or 4096")),
        };
        if !rest.is_empty() {
            return Err(format!("{} bytes after the xsave area", rest.len()));
        }
        Ok(VcpuState { regs, sregs, fpu, xcrs, xsave })
    }
}

fn err(dir: &Path, reason: impl ToString) -> Error {
    Error::Snapshot { dir: dir.to_owned(), reason: reason.to_string() }
}

impl Vm {
    /// Writes a snapshot of the paused VM into `dir` (created if missing).
    pub fn snapshot(&mut self, dir: &Path) -> Result<()> {
        self.pause()?;
        std::fs::create_dir_all(dir).map_err(crate::error::io("cannot create snapshot directory", dir))?;
        let manifest = Manifest {
            version: SNAPSHOT_VERSION,
            abi_version: vmm_abi::ABI_VERSION,
            config: self.config.clone(),
            guest_ns: self.clock.now_ns(),
            disk_sectors: self.block.as_ref().map_or(0, |b| b.sectors()),
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| err(dir, e))?;
        write_file(&dir.join("vm.json"), &json)?;
        write_file(&dir.join("memory.bin"), self.mem.as_slice()?)?;
        write_file(&dir.join("vcpu0.bin"), &self.vcpu_state()?)?;
        Ok(())
    }

    /// The vCPU state blob (`vcpu0.bin`; also carried by checkpoints). The vCPU must be
    /// settled (see [`Vm::pause`]).
    pub(crate) fn vcpu_state(&self) -> Result<Vec<u8>> {
        let v = self.vcpu();
        let regs = v.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = v.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let fpu = v.get_fpu().map_err(kvm("KVM_GET_FPU"))?;
        let xcrs = v.get_xcrs().unwrap_or_default();
        let xsave = v.get_xsave().ok();
        let mut out = Vec::new();
        out.extend_from_slice(VCPU_MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        for part in [regs.as_bytes(), sregs.as_bytes(), fpu.as_bytes(), xcrs.as_bytes()] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part);
        }
        match xsave {
            Some(x) => {
                let bytes: Vec<u8> = x.region.iter().flat_map(|w| w.to_le_bytes()).collect();
                out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                out.extend_from_slice(&bytes);
            }
            None => out.extend_from_slice(&0u32.to_le_bytes()),
        }
        Ok(out)
    }

    /// Builds a new, paused VM from the snapshot in `dir`. Call [`Vm::resume`] or send a
    /// `resume` command to continue it.
    pub fn restore(dir: &Path, overrides: &RestoreOverrides, console: Box<dyn Write + Send>) -> Result<Self> {
        let json = std::fs::read(dir.join("vm.json")).map_err(crate::error::io("cannot read snapshot manifest", dir.join("vm.json")))?;
        let m: Manifest = serde_json::from_slice(&json).map_err(|e| err(dir, format!("vm.json: {e}")))?;
        if m.version != SNAPSHOT_VERSION {
            return Err(err(dir, format!("format version {} (this VMM reads {SNAPSHOT_VERSION})", m.version)));
        }
        if m.abi_version != vmm_abi::ABI_VERSION {
            return Err(err(dir, format!("guest ABI version {} (this VMM speaks {})", m.abi_version, vmm_abi::ABI_VERSION)));
        }
        let config = overrides.apply(m.config.clone());
        let mut mem = GuestMem::new(config.mem_mib.saturating_mul(1 << 20))?;
        let mem_path = dir.join("memory.bin");
        let mut f = std::fs::File::open(&mem_path).map_err(crate::error::io("cannot open snapshot memory", &mem_path))?;
        let len = f.metadata().map_err(crate::error::io("cannot stat snapshot memory", &mem_path))?.len();
        if len != mem.size() {
            return Err(err(dir, format!("memory.bin has {len} bytes, vm.json says {}", mem.size())));
        }
        let cpu_path = dir.join("vcpu0.bin");
        let cpu = std::fs::read(&cpu_path).map_err(crate::error::io("cannot read vCPU state", &cpu_path))?;
        let cpu = VcpuState::parse(&cpu).map_err(|reason| err(dir, format!("vcpu0.bin: {reason}")))?;
        std::io::Read::read_exact(&mut f, mem.as_mut_slice()?).map_err(crate::error::io("cannot read snapshot memory", &mem_path))?;
        let vm = Vm::assemble(config, console, mem, &cpu, m.guest_ns, None)?;
        let disk_sectors = vm.block.as_ref().map_or(0, |b| b.sectors());
        if disk_sectors != m.disk_sectors {
            return Err(err(dir, format!("the disk has {disk_sectors} sectors, the snapshot expects {}", m.disk_sectors)));
        }
        Ok(vm)
    }

    /// A new, paused VM from saved parts (snapshot restore and replica takeover): KVM VM and
    /// devices for `config`, `mem` moved in, the vCPU set to `cpu`, the clock continuing at
    /// `guest_ns`.
    pub(crate) fn assemble(
        config: VmConfig,
        console: Box<dyn Write + Send>,
        mut mem: GuestMem,
        cpu: &VcpuState,
        guest_ns: u64,
        tap: Option<crate::devices::net::Tap>,
    ) -> Result<Self> {
        mem.take_vmm_dirty();
        let mut vm = Vm::bare_with(config, console, Some(mem), tap)?;
        vm.set_vcpu_state(cpu)?;
        vm.clock = Clock::new(guest_ns);
        vm.mark_paused();
        Ok(vm)
    }

    fn set_vcpu_state(&mut self, s: &VcpuState) -> Result<()> {
        let v = self.vcpu();
        v.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        if s.xcrs.nr_xcrs > 0 {
            v.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        }
        v.set_fpu(&s.fpu).map_err(kvm("KVM_SET_FPU"))?;
        if let Some(x) = &s.xsave {
            // SAFETY: `x` is a plain 4 KiB xsave area (no extra FAM entries), the legacy size
            // KVM_SET_XSAVE reads.
            unsafe { v.set_xsave(x) }.map_err(kvm("KVM_SET_XSAVE"))?;
        }
        v.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
        Ok(())
    }

    /// Resumes a paused VM (before or between runs).
    pub fn resume(&mut self) {
        self.unpause();
    }
}

fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    std::fs::write(path, data).map_err(crate::error::io("cannot write snapshot file", path))
}
