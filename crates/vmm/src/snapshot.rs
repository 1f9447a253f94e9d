//! Snapshots: a directory with `vm.json` (format version, configuration, device state, guest
//! clock), `memory.bin` (all of guest memory) and `vcpu0.bin` (KVM register state). Restoring
//! builds a new KVM VM in any process; guest time continues where the snapshot left it.

use crate::devices::clock::Clock;
use crate::error::kvm as kvm_err;
use crate::machine::{Vm, VmConfig};
use crate::memory::{GuestMem, Pod};
use crate::{Error, Result};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, kvm_xcrs, kvm_xsave};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Version of the snapshot format (2: checksums in `vm.json`).
pub const SNAPSHOT_VERSION: u32 = 2;

/// Version of the vCPU state blob (`vcpu0.bin`, also carried by checkpoints).
pub const VCPU_VERSION: u32 = 1;

const VCPU_MAGIC: &[u8; 8] = b"VIGILCPU";

/// Largest `vm.json` read.
pub const MANIFEST_MAX: u64 = 1 << 20;
/// Largest `vcpu0.bin` read.
pub const VCPU_MAX: u64 = 64 << 10;

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
    /// CRC-32 of each file, so that corruption is detected rather than run.
    pub checksums: Checksums,
}

/// CRC-32 (IEEE) checksums of a snapshot's files. `manifest` covers `vm.json` itself: it is
/// the checksum of the manifest's compact JSON with `manifest` set to 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checksums {
    pub manifest: u32,
    pub memory: u32,
    pub vcpu: u32,
}

impl Manifest {
    fn own_checksum(&self) -> Result<u32, String> {
        let mut m = self.clone();
        m.checksums.manifest = 0;
        let compact = serde_json::to_vec(&m).map_err(|e| e.to_string())?;
        Ok(crc32fast::hash(&compact))
    }

    /// The text of `vm.json`, with its own checksum filled in.
    pub fn to_json(&self) -> Result<Vec<u8>, String> {
        let mut m = self.clone();
        m.checksums.manifest = m.own_checksum()?;
        serde_json::to_vec_pretty(&m).map_err(|e| e.to_string())
    }

    /// Parses and checks `vm.json`: JSON of the expected shape, format and ABI versions, its
    /// own checksum, and a memory size within the ABI's limits (checked before anything is
    /// allocated for it). Never panics, whatever the bytes.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        if bytes.len() as u64 > MANIFEST_MAX {
            return Err(format!("{} bytes (at most {MANIFEST_MAX})", bytes.len()));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if m.version != SNAPSHOT_VERSION {
            return Err(format!("format version {} (this VMM reads {SNAPSHOT_VERSION})", m.version));
        }
        if m.abi_version != vmm_abi::ABI_VERSION {
            return Err(format!("guest ABI version {} (this VMM speaks {})", m.abi_version, vmm_abi::ABI_VERSION));
        }
        let own = m.own_checksum()?;
        if own != m.checksums.manifest {
            return Err(format!("checksum mismatch (the file says {:08x}, its contents give {own:08x}): corrupted", m.checksums.manifest));
        }
        crate::machine::mem_bytes(&m.config).map_err(|e| e.to_string())?;
        Ok(m)
    }
}

/// Device and host settings that may change on restore (another host: another tap, disk path).
#[derive(Debug, Clone, Default)]
pub struct RestoreOverrides {
    pub tap: Option<String>,
    pub disk: Option<PathBuf>,
    /// The program that runs the VM's backend processes on this host, used when the one the
    /// configuration recorded (on the host that took the snapshot or ran the primary) does
    /// not exist here. Arguments and timing stay as recorded.
    pub backend_program: Option<PathBuf>,
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
        if let Some(program) = &self.backend_program {
            for b in [config.net_backend.as_mut(), config.blk_backend.as_mut()].into_iter().flatten() {
                if !b.program.exists() {
                    b.program = program.clone();
                }
            }
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
        if version != VCPU_VERSION {
            return Err(format!("format version {version}"));
        }
        let mut rest = &b[12..];
        let mut part = |name: &str| -> Result<&[u8], String> {
            let len = rest.get(..4).ok_or(format!("truncated before {name}"))?;
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let end = len.checked_add(4).ok_or(format!("{name} is too long"))?;
            let data = rest.get(4..end).ok_or(format!("truncated in {name}"))?;
            rest = &rest[end..];
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
    /// Writes a snapshot of the paused VM into `dir` (created if missing). Each file is written
    /// to a new temporary file (never through a symbolic link or over an existing file) and
    /// renamed into place; `vm.json`, with the checksums of the others, comes last.
    pub fn snapshot(&mut self, dir: &Path) -> Result<()> {
        self.pause()?;
        // Whoever takes the snapshot may copy the disk file with it (a migration does): every
        // write the guest was told is done must be in the file first.
        if self.block.as_ref().is_some_and(|b| !b.settle()) {
            return Err(crate::Error::Config("snapshot: the block backend could not write the guest's last writes to the disk".into()));
        }
        std::fs::create_dir_all(dir).map_err(crate::error::io("cannot create snapshot directory", dir))?;
        let memory = self.mem.as_slice()?;
        write_part(dir, "memory.bin", memory)?;
        let vcpu = self.vcpu_state()?;
        write_part(dir, "vcpu0.bin", &vcpu)?;
        let manifest = Manifest {
            version: SNAPSHOT_VERSION,
            abi_version: vmm_abi::ABI_VERSION,
            config: self.config.clone(),
            guest_ns: self.clock.now_ns(),
            disk_sectors: self.block.as_ref().map_or(0, |b| b.sectors()),
            checksums: Checksums { manifest: 0, memory: crc32fast::hash(memory), vcpu: crc32fast::hash(&vcpu) },
        };
        let json = manifest.to_json().map_err(|e| err(dir, format!("vm.json: {e}")))?;
        write_part(dir, "vm.json", &json)
    }

    /// The vCPU state blob (`vcpu0.bin`; also carried by checkpoints). The vCPU must be
    /// settled (see [`Vm::pause`]).
    pub(crate) fn vcpu_state(&self) -> Result<Vec<u8>> {
        let v = self.vcpu();
        let regs = v.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = v.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let fpu = v.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
        let xcrs = v.get_xcrs().unwrap_or_default();
        let xsave = v.get_xsave().ok();
        let mut out = Vec::new();
        out.extend_from_slice(VCPU_MAGIC);
        out.extend_from_slice(&VCPU_VERSION.to_le_bytes());
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
    ///
    /// Nothing in the directory is trusted: files are opened without following symbolic links
    /// and must be regular files of bounded size, every size is checked before memory is
    /// allocated for it, every checksum is verified, and the host paths the snapshot names
    /// (disk, tap) are used only when `overrides` confirms them (the command line's `--disk`,
    /// `--tap`).
    pub fn restore(dir: &Path, overrides: &RestoreOverrides, console: Box<dyn Write + Send>) -> Result<Self> {
        let json = read_part(dir, "vm.json", MANIFEST_MAX)?;
        let m = Manifest::parse(&json).map_err(|e| err(dir, format!("vm.json: {e}")))?;
        if let (Some(disk), None) = (&m.config.disk, &overrides.disk) {
            return Err(err(
                dir,
                format!("vm.json names the disk {}: a snapshot's host paths are not trusted; confirm it with --disk", disk.display()),
            ));
        }
        if let (Some(tap), None) = (&m.config.tap, &overrides.tap) {
            return Err(err(
                dir,
                format!("vm.json names the tap device {tap:?}: a snapshot's host paths are not trusted; confirm it with --tap"),
            ));
        }
        let config = overrides.apply(m.config.clone());
        let size = crate::machine::mem_bytes(&config).map_err(|e| err(dir, format!("vm.json: {e}")))?;
        let (mut f, len) = open_part(dir, "memory.bin", vmm_abi::MAX_MEM)?;
        if len != size {
            return Err(err(dir, format!("memory.bin has {len} bytes, vm.json says {size}")));
        }
        let cpu_bytes = read_part(dir, "vcpu0.bin", VCPU_MAX)?;
        let cpu = VcpuState::parse(&cpu_bytes).map_err(|reason| err(dir, format!("vcpu0.bin: {reason}")))?;
        let crc = crc32fast::hash(&cpu_bytes);
        if crc != m.checksums.vcpu {
            return Err(err(
                dir,
                format!("vcpu0.bin: checksum mismatch (vm.json says {:08x}, the file gives {crc:08x}): corrupted", m.checksums.vcpu),
            ));
        }
        let mut mem = GuestMem::new(size)?;
        let mut hasher = crc32fast::Hasher::new();
        for chunk in mem.as_mut_slice()?.chunks_mut(64 << 20) {
            std::io::Read::read_exact(&mut f, chunk).map_err(|e| err(dir, format!("memory.bin: cannot read: {e}")))?;
            hasher.update(chunk);
        }
        let crc = hasher.finalize();
        if crc != m.checksums.memory {
            return Err(err(
                dir,
                format!("memory.bin: checksum mismatch (vm.json says {:08x}, the file gives {crc:08x}): corrupted", m.checksums.memory),
            ));
        }
        let vm = Vm::assemble(config, console, mem, &cpu, m.guest_ns, None).map_err(|e| match e {
            Error::VcpuRejected(reason) => err(dir, format!("vcpu0.bin: KVM refused the saved vCPU state: {reason}")),
            other => other,
        })?;
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
        vm.set_vcpu_state(cpu).map_err(Error::VcpuRejected)?;
        vm.clock = Clock::new(guest_ns);
        vm.mark_paused();
        Ok(vm)
    }

    fn set_vcpu_state(&mut self, s: &VcpuState) -> Result<(), String> {
        let v = self.vcpu();
        fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> String {
            move |e| format!("{op}: {e}")
        }
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

/// Opens the snapshot file `dir/name` for reading: not through a symbolic link, a regular
/// file, at most `max` bytes. Returns it and its length.
fn open_part(dir: &Path, name: &str, max: u64) -> Result<(std::fs::File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(&path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            err(dir, format!("{name}: is a symbolic link (refused: snapshot files must be regular files)"))
        } else {
            err(dir, format!("{name}: cannot open: {e}"))
        }
    })?;
    let meta = f.metadata().map_err(|e| err(dir, format!("{name}: cannot stat: {e}")))?;
    if !meta.is_file() {
        return Err(err(dir, format!("{name}: not a regular file")));
    }
    if meta.len() > max {
        return Err(err(dir, format!("{name}: {} bytes (at most {max})", meta.len())));
    }
    Ok((f, meta.len()))
}

/// Reads the snapshot file `dir/name` as [`open_part`] opens it.
fn read_part(dir: &Path, name: &str, max: u64) -> Result<Vec<u8>> {
    let (f, len) = open_part(dir, name, max)?;
    let mut data = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(f, max + 1), &mut data)
        .map_err(|e| err(dir, format!("{name}: cannot read: {e}")))?;
    if data.len() as u64 > max {
        return Err(err(dir, format!("{name}: more than {max} bytes")));
    }
    Ok(data)
}

/// Writes `dir/name`: into a new temporary file (created exclusively, never through a symbolic
/// link), synced, then renamed over `name` (which replaces a symbolic link, never follows it).
fn write_part(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!(".{name}.tmp-{}-{:x}", std::process::id(), unique()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(dir, format!("{name}: cannot write: {e}"))
    })
}

/// A number not used before by this process (temporary file names).
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos() as u64);
    (t << 20) ^ NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_backend_program_missing_here_is_replaced_on_restore() {
        use crate::backend::BackendProgram;
        let mut config = crate::VmConfig::new("/images/kv", 16);
        config.net_backend = Some(BackendProgram::new("/elsewhere/bin/vigil", vec!["backend".into(), "net".into()]));
        config.blk_backend = Some(BackendProgram::new("/bin/sh", vec!["backend".into(), "blk".into()]));
        let o = super::RestoreOverrides { backend_program: Some("/here/vigil".into()), ..Default::default() };
        let c = o.apply(config.clone());
        let net = c.net_backend.expect("net");
        assert_eq!(net.program, std::path::PathBuf::from("/here/vigil"), "missing here: replaced");
        assert_eq!(net.args, vec!["backend".to_string(), "net".into()], "arguments as recorded");
        assert_eq!(c.blk_backend.expect("blk").program, std::path::PathBuf::from("/bin/sh"), "present here: kept");
        assert_eq!(super::RestoreOverrides::default().apply(config.clone()).net_backend, config.net_backend, "no override");
    }

    use super::*;
    use proptest::prelude::*;

    fn manifest() -> Manifest {
        Manifest {
            version: SNAPSHOT_VERSION,
            abi_version: vmm_abi::ABI_VERSION,
            config: VmConfig::new("/guests/counter", 16),
            guest_ns: 123_456,
            disk_sectors: 0,
            checksums: Checksums { manifest: 0, memory: 7, vcpu: 9 },
        }
    }

    fn vcpu_blob() -> Vec<u8> {
        let mut b = VCPU_MAGIC.to_vec();
        b.extend_from_slice(&VCPU_VERSION.to_le_bytes());
        for n in [size_of::<kvm_regs>(), size_of::<kvm_sregs>(), size_of::<kvm_fpu>(), size_of::<kvm_xcrs>(), 4096] {
            b.extend_from_slice(&(n as u32).to_le_bytes());
            b.extend(std::iter::repeat_n(0u8, n));
        }
        b
    }

    #[test]
    fn a_manifest_round_trips_and_detects_changes() {
        let json = manifest().to_json().expect("json");
        let m = Manifest::parse(&json).expect("parses");
        assert_eq!((m.guest_ns, m.checksums.memory), (123_456, 7));
        let text = String::from_utf8(json).expect("utf-8");
        let e = Manifest::parse(text.replace("123456", "123457").as_bytes()).expect_err("refused");
        assert!(e.contains("checksum mismatch"), "{e}");
        let big = manifest();
        let mut big = Manifest { config: VmConfig::new("/x", 6144), ..big };
        big.checksums.manifest = 0;
        let e = Manifest::parse(&big.to_json().expect("json")).expect_err("refused");
        assert!(e.contains("outside 4..=4096 MiB"), "{e}");
        assert!(VcpuState::parse(&vcpu_blob()).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// The vCPU blob parser on any bytes, and on a valid blob with a word overwritten or
        /// cut short: a reason, never a panic.
        #[test]
        fn vcpu_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), at in 0usize..5000, value in any::<u32>(), cut in any::<bool>()) {
            let _ = VcpuState::parse(&bytes);
            let mut b = vcpu_blob();
            let at = at % b.len();
            let end = (at + 4).min(b.len());
            b[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
            if cut {
                b.truncate(at);
            }
            if let Err(reason) = VcpuState::parse(&b) {
                prop_assert!(!reason.is_empty());
            }
        }

        /// The manifest parser on a valid `vm.json` with a byte changed or the text cut short:
        /// refused with a reason, or (a change that keeps the same meaning, such as
        /// whitespace) accepted, never a panic.
        #[test]
        fn manifest_parser_never_panics(at in any::<usize>(), byte in any::<u8>(), cut in any::<bool>()) {
            let mut json = manifest().to_json().expect("json");
            let at = at % json.len();
            if cut {
                json.truncate(at);
            } else {
                json[at] = byte;
            }
            if let Ok(m) = Manifest::parse(&json) {
                prop_assert_eq!(m.guest_ns, 123_456);
            }
        }
    }
}
