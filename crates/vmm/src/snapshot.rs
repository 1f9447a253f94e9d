//! Snapshots: a directory with `vm.json` (format version, configuration, device state, guest
//! clock), `memory.bin` (all of guest memory) and `vcpu0.bin` (KVM register state). Restoring
//! builds a new KVM VM in any process; guest time continues where the snapshot left it.

use crate::devices::clock::Clock;
use crate::error::kvm;
use crate::machine::{Vm, VmConfig};
use crate::memory::Pod;
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

    fn vcpu_state(&self) -> Result<Vec<u8>> {
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
        let mut config = m.config.clone();
        if overrides.tap.is_some() {
            config.tap = overrides.tap.clone();
        }
        if overrides.disk.is_some() {
            config.disk = overrides.disk.clone();
        }
        let mut vm = Vm::bare(config, console)?;
        let disk_sectors = vm.block.as_ref().map_or(0, |b| b.sectors());
        if disk_sectors != m.disk_sectors {
            return Err(err(dir, format!("the disk has {disk_sectors} sectors, the snapshot expects {}", m.disk_sectors)));
        }
        let mem_path = dir.join("memory.bin");
        let mut f = std::fs::File::open(&mem_path).map_err(crate::error::io("cannot open snapshot memory", &mem_path))?;
        let len = f.metadata().map_err(crate::error::io("cannot stat snapshot memory", &mem_path))?.len();
        if len != vm.mem.size() {
            return Err(err(dir, format!("memory.bin has {len} bytes, vm.json says {}", vm.mem.size())));
        }
        std::io::Read::read_exact(&mut f, vm.mem.as_mut_slice()?).map_err(crate::error::io("cannot read snapshot memory", &mem_path))?;
        vm.mem.take_vmm_dirty();
        let cpu_path = dir.join("vcpu0.bin");
        let cpu = std::fs::read(&cpu_path).map_err(crate::error::io("cannot read vCPU state", &cpu_path))?;
        vm.set_vcpu_state(&cpu).map_err(|reason| err(dir, format!("vcpu0.bin: {reason}")))??;
        vm.clock = Clock::new(m.guest_ns);
        vm.mark_paused();
        Ok(vm)
    }

    fn set_vcpu_state(&mut self, b: &[u8]) -> Result<Result<()>, String> {
        if b.len() < 12 || &b[..8] != VCPU_MAGIC {
            return Err("not a vCPU state file (bad magic)".into());
        }
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if version != SNAPSHOT_VERSION {
            return Err(format!("format version {version}"));
        }
        let mut rest = &b[12..];
        let mut part = |name: &str| -> Result<Vec<u8>, String> {
            let len = rest.get(..4).ok_or(format!("truncated before {name}"))?;
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let data = rest.get(4..4 + len).ok_or(format!("truncated in {name}"))?.to_vec();
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
        let regs: kvm_regs = pod("regs", &part("regs")?)?;
        let sregs: kvm_sregs = pod("sregs", &part("sregs")?)?;
        let fpu: kvm_fpu = pod("fpu", &part("fpu")?)?;
        let xcrs: kvm_xcrs = pod("xcrs", &part("xcrs")?)?;
        let xsave_bytes = part("xsave")?;
        let v = self.vcpu();
        let apply = || -> Result<()> {
            v.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
            if xcrs.nr_xcrs > 0 {
                v.set_xcrs(&xcrs).map_err(kvm("KVM_SET_XCRS"))?;
            }
            v.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
            if xsave_bytes.len() == 4096 {
                let mut x = kvm_xsave::default();
                for (w, c) in x.region.iter_mut().zip(xsave_bytes.chunks_exact(4)) {
                    *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                // SAFETY: `x` is a plain 4 KiB xsave area (no extra FAM entries), the legacy
                // size KVM_SET_XSAVE reads.
                unsafe { v.set_xsave(&x) }.map_err(kvm("KVM_SET_XSAVE"))?;
            }
            v.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
            Ok(())
        };
        Ok(apply())
    }

    /// Resumes a paused VM (before or between runs).
    pub fn resume(&mut self) {
        self.unpause();
    }
}

fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    std::fs::write(path, data).map_err(crate::error::io("cannot write snapshot file", path))
}
