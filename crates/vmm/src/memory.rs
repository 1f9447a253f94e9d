//! Guest memory: one anonymous mapping at guest-physical 0, bounds-checked access for devices,
//! and the bitmap of pages the VMM itself wrote (KVM's dirty log does not see those).

use crate::{Error, Result};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_abi::PAGE_SIZE;

/// The guest's RAM. The mapping is shared (`Arc`) so that a [`MemoryView`] keeps it alive
/// after the VM has ended.
pub struct GuestMem {
    mem: Arc<GuestMemoryMmap>,
    size: u64,
    /// One bit per page the VMM wrote since the last [`GuestMem::take_vmm_dirty`].
    vmm_dirty: Vec<u64>,
}

impl GuestMem {
    /// Maps `size` bytes (a multiple of the page size) of zeroed guest memory.
    pub fn new(size: u64) -> Result<Self> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Config(format!("memory size {size} is not a positive multiple of 4 KiB")));
        }
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|e| Error::Memory(format!("cannot map {} MiB: {e}", size >> 20)))?;
        let pages = size / PAGE_SIZE;
        Ok(GuestMem { mem: Arc::new(mem), size, vmm_dirty: vec![0; pages.div_ceil(64) as usize] })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Host address of guest-physical 0 (for KVM's memory slot and for snapshots).
    pub fn host_base(&self) -> Result<*mut u8> {
        self.mem.get_host_address(GuestAddress(0)).map_err(|e| Error::Memory(format!("no host address for 0: {e}")))
    }

    /// Checks that `[addr, addr+len)` lies inside guest memory.
    pub fn check(&self, addr: u64, len: u64) -> Result<(), String> {
        match addr.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(format!("range 0x{addr:x}+{len} is outside guest memory (0x{:x} bytes)", self.size)),
        }
    }

    /// Reads guest memory (bounds-checked).
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        self.check(addr, buf.len() as u64)?;
        self.mem.read_slice(buf, GuestAddress(addr)).map_err(|e| format!("read at 0x{addr:x}: {e}"))
    }

    /// Writes guest memory (bounds-checked) and marks the pages dirty for the VMM bitmap.
    pub fn write(&mut self, addr: u64, buf: &[u8]) -> Result<(), String> {
        self.check(addr, buf.len() as u64)?;
        self.mem.write_slice(buf, GuestAddress(addr)).map_err(|e| format!("write at 0x{addr:x}: {e}"))?;
        self.mark(addr, buf.len() as u64);
        Ok(())
    }

    /// Reads a plain-data value (a request block) at `addr`, which must be 8-byte aligned.
    pub fn read_obj<T: Pod>(&self, addr: u64) -> Result<T, String> {
        if !addr.is_multiple_of(8) {
            return Err(format!("request block at 0x{addr:x} is not 8-byte aligned"));
        }
        let mut v = T::zeroed();
        self.read(addr, v.as_bytes_mut())?;
        Ok(v)
    }

    /// Writes a plain-data value at `addr`.
    pub fn write_obj<T: Pod>(&mut self, addr: u64, v: &T) -> Result<(), String> {
        let mut copy = *v;
        self.write(addr, copy.as_bytes_mut())
    }

    fn mark(&mut self, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = addr / PAGE_SIZE;
        let last = (addr + len - 1) / PAGE_SIZE;
        for p in first..=last {
            self.vmm_dirty[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    /// Returns and clears the bitmap of pages the VMM wrote.
    pub fn take_vmm_dirty(&mut self) -> Vec<u64> {
        let n = self.vmm_dirty.len();
        std::mem::replace(&mut self.vmm_dirty, vec![0; n])
    }

    /// The whole of guest memory as a byte slice (for snapshots; the vCPU must not run).
    pub fn as_slice(&self) -> Result<&[u8]> {
        let base = self.host_base()?;
        // SAFETY: the mapping is `size` bytes long and lives as long as `self`; callers only
        // use this while the vCPU is stopped, so nothing writes it concurrently.
        Ok(unsafe { std::slice::from_raw_parts(base, self.size as usize) })
    }

    /// The whole of guest memory, writable (for restore; the vCPU must not run).
    pub fn as_mut_slice(&mut self) -> Result<&mut [u8]> {
        let base = self.host_base()?;
        // SAFETY: as in `as_slice`, and `&mut self` excludes other VMM access.
        Ok(unsafe { std::slice::from_raw_parts_mut(base, self.size as usize) })
    }
}

impl GuestMem {
    /// A read-only view of all of guest memory for another thread, valid while the vCPU runs
    /// (see [`MemoryView`]).
    pub fn view(&self) -> Result<MemoryView> {
        let base = self.host_base()? as usize;
        Ok(MemoryView { _mapping: self.mem.clone(), base, size: self.size })
    }

    /// Copies `pages` whole pages starting at page `first` to the end of `out` (which keeps
    /// its capacity between calls: no zeroing, no page faults on a reused buffer).
    pub(crate) fn append_pages(&self, first: u64, pages: u64, out: &mut Vec<u8>) -> Result<(), String> {
        let (addr, len) = (first * PAGE_SIZE, pages * PAGE_SIZE);
        self.check(addr, len)?;
        let base = self.host_base().map_err(|e| e.to_string())?;
        // SAFETY: `[addr, addr+len)` lies inside the mapping (checked), which lives as long as
        // `self`; this runs on the vCPU thread while the vCPU is out of KVM_RUN, so nothing
        // writes those bytes concurrently.
        out.extend_from_slice(unsafe { std::slice::from_raw_parts(base.add(addr as usize), len as usize) });
        Ok(())
    }
}

/// All of a VM's guest memory, readable from any thread while the vCPU keeps running (for the
/// initial synchronisation of a backup). Cloneable; keeps the mapping alive even after the VM
/// has ended.
///
/// Reads race with the guest's (and the VMM's) writes: a page being written while it is
/// copied may come out torn. That is what it is for: dirty logging is on before the view is
/// read, so every page written meanwhile is dirty and the next checkpoint sends it again.
#[derive(Clone)]
pub struct MemoryView {
    /// Keeps the mapping alive.
    _mapping: Arc<GuestMemoryMmap>,
    /// Host address of guest-physical 0 inside `mem`.
    base: usize,
    size: u64,
}

impl std::fmt::Debug for MemoryView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemoryView({} bytes)", self.size)
    }
}

impl MemoryView {
    /// Size of guest memory in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Copies guest memory from `offset` into `buf`.
    pub fn copy_range(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.size => {}
            _ => {
                return Err(Error::Memory(format!(
                    "view range 0x{offset:x}+{} is outside guest memory (0x{:x} bytes)",
                    buf.len(),
                    self.size
                )))
            }
        }
        // SAFETY: the range lies inside the mapping (checked above), which `self._mapping` keeps
        // mapped. The guest (through KVM) and the vCPU thread may write these bytes while we
        // copy them: this is a racy read of plain bytes from memory shared with another agent,
        // like reading a buffer shared with another process. `u8` has no invalid values, the
        // copy goes into our own buffer and no reference to guest memory outlives the call, so
        // the worst outcome is a torn copy, which the caller accepts (dirty logging makes the
        // next checkpoint resend every page written meanwhile).
        unsafe { std::ptr::copy_nonoverlapping((self.base + offset as usize) as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies page `page` into `buf`.
    pub fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE as usize]) -> Result<()> {
        let offset = page.checked_mul(PAGE_SIZE).ok_or_else(|| Error::Memory(format!("page {page} is out of range")))?;
        self.copy_range(offset, buf)
    }
}

/// Plain data: any byte pattern is a valid value (the ABI's request blocks and KVM's state
/// structures).
///
/// # Safety
/// Implement only for `repr(C)` types made of integers and arrays of integers.
pub unsafe trait Pod: Copy {
    fn zeroed() -> Self {
        // SAFETY: by the trait's contract all-zero bytes are a valid value.
        unsafe { std::mem::zeroed() }
    }
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: by the trait's contract the value is plain bytes without padding invariants.
        unsafe { std::slice::from_raw_parts_mut(self as *mut Self as *mut u8, std::mem::size_of::<Self>()) }
    }
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self as *const Self as *const u8, std::mem::size_of::<Self>()) }
    }
}

// SAFETY: all of these are repr(C) structs of integers (and integer arrays).
unsafe impl Pod for vmm_abi::ConsoleRequest {}
unsafe impl Pod for vmm_abi::ClockRequest {}
unsafe impl Pod for vmm_abi::IdleRequest {}
unsafe impl Pod for vmm_abi::BlockRequest {}
unsafe impl Pod for vmm_abi::BlockDesc {}
unsafe impl Pod for vmm_abi::NetRequest {}
unsafe impl Pod for vmm_abi::NetBuf {}
unsafe impl Pod for vmm_abi::BootInfo {}
unsafe impl Pod for vmm_abi::TraceHeader {}
unsafe impl Pod for vmm_abi::TraceRecord {}
unsafe impl Pod for vmm_abi::UpcallBlock {}
unsafe impl Pod for vmm_abi::UpcallFrame {}
unsafe impl Pod for kvm_bindings::kvm_regs {}
unsafe impl Pod for kvm_bindings::kvm_sregs {}
unsafe impl Pod for kvm_bindings::kvm_fpu {}
unsafe impl Pod for kvm_bindings::kvm_xcrs {}
