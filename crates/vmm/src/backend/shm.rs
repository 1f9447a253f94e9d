//! Shared memory between a VMM and its backend: a mapping of a memfd (guest memory, the
//! progress page), reached only through bounds-checked copies, and the progress page itself.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// A `MAP_SHARED` mapping of a whole memfd. Its bytes may change under us at any time (the
/// guest, the other process): they are only ever copied, never borrowed as Rust references.
pub struct Mapping {
    base: *mut u8,
    size: usize,
}

// SAFETY: the mapping is plain shared memory; every access goes through raw copies or atomics.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps all of `fd` (its size from fstat) read-write and shared.
    pub fn map(fd: BorrowedFd<'_>) -> Result<Mapping, String> {
        // SAFETY: fstat fills a plain struct for a descriptor we borrow.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a live, writable stat struct.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(format!("fstat: {}", std::io::Error::last_os_error()));
        }
        let size = st.st_size as usize;
        if size == 0 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(format!("not a memory file (mode 0o{:o}, {size} bytes)", st.st_mode));
        }
        // SAFETY: a fresh shared mapping of `size` bytes of `fd`; the kernel picks the address.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap of {size} bytes: {}", std::io::Error::last_os_error()));
        }
        Ok(Mapping { base: p.cast(), size })
    }

    pub fn size(&self) -> u64 {
        self.size as u64
    }

    /// The host address of `[addr, addr+len)`, when that lies inside the mapping.
    pub fn range(&self, addr: u64, len: usize) -> Result<*mut u8, String> {
        match addr.checked_add(len as u64) {
            Some(end) if end <= self.size as u64 => {
                // SAFETY: `addr` is inside the mapping (checked), so the offset pointer stays in it.
                Ok(unsafe { self.base.add(addr as usize) })
            }
            _ => Err(format!("range 0x{addr:x}+{len} is outside guest memory (0x{:x} bytes)", self.size)),
        }
    }

    /// Copies `[addr, addr+buf.len())` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        let p = self.range(addr, buf.len())?;
        // SAFETY: the source range lies inside the mapping (checked); the copy goes into our
        // own buffer. Another agent may write those bytes meanwhile: a torn copy of plain bytes
        // is the worst outcome, the same as a device reading memory the guest is writing.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `buf` to `[addr, addr+buf.len())`.
    pub fn write(&self, addr: u64, buf: &[u8]) -> Result<(), String> {
        let p = self.range(addr, buf.len())?;
        // SAFETY: the destination range lies inside the writable mapping (checked); no Rust
        // reference to it exists (see `read`).
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), p, buf.len()) };
        Ok(())
    }

    fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        assert!(off + 8 <= self.size && off.is_multiple_of(8), "progress field out of the page");
        // SAFETY: in bounds and aligned (asserted; the mapping is page-aligned); the memory is
        // only accessed atomically by both processes.
        unsafe { AtomicU64::from_ptr(self.base.add(off).cast()) }
    }

    fn atomic_u32(&self, off: usize) -> &AtomicU32 {
        assert!(off + 4 <= self.size && off.is_multiple_of(4), "progress field out of the page");
        // SAFETY: as in `atomic_u64`.
        unsafe { AtomicU32::from_ptr(self.base.add(off).cast()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference into it outlives `self`.
        unsafe { libc::munmap(self.base.cast(), self.size) };
    }
}

/// Bytes of the progress page.
pub const PROGRESS_BYTES: usize = 4096;
const SEQ: usize = 0;
const DONE: usize = 8;
const LENS: usize = 16;

/// How far the backend got with the request it is serving: its sequence number, the entries
/// done, and (receive) the length of each frame written. The backend updates it after each
/// entry; after a crash the VMM reads it to replay only what was not done, so a frame is sent
/// or delivered twice at most once per crash (the one in flight when it died).
pub struct Progress {
    map: Mapping,
}

impl Progress {
    pub fn new(map: Mapping) -> Result<Progress, String> {
        if map.size < PROGRESS_BYTES {
            return Err(format!("a progress page of {} bytes (needs {PROGRESS_BYTES})", map.size));
        }
        Ok(Progress { map })
    }

    /// The backend starts serving request `seq`.
    pub fn begin(&self, seq: u32) {
        self.map.atomic_u64(DONE).store(0, Ordering::Release);
        self.map.atomic_u64(SEQ).store(seq as u64, Ordering::Release);
    }

    /// The backend finished entry `i` (of length `len`, for receive).
    pub fn record(&self, i: usize, len: u32) {
        if i < super::wire::MAX_ENTRIES {
            self.map.atomic_u32(LENS + 4 * i).store(len, Ordering::Release);
        }
        self.map.atomic_u64(DONE).store(i as u64 + 1, Ordering::Release);
    }

    /// What the page says about request `seq`: entries done and their lengths (nothing when
    /// the backend never started it). Clamped to `count`: the page is written by another
    /// process and trusted for nothing.
    pub fn of(&self, seq: u32, count: usize) -> Vec<u32> {
        if self.map.atomic_u64(SEQ).load(Ordering::Acquire) != seq as u64 {
            return vec![];
        }
        let done = (self.map.atomic_u64(DONE).load(Ordering::Acquire) as usize).min(count).min(super::wire::MAX_ENTRIES);
        (0..done).map(|i| self.map.atomic_u32(LENS + 4 * i).load(Ordering::Acquire)).collect()
    }

    /// The backend's claim of how many entries of request `seq` it did (see [`Progress::of`]).
    pub fn done(&self, seq: u32, count: usize) -> usize {
        if self.map.atomic_u64(SEQ).load(Ordering::Acquire) != seq as u64 {
            return 0;
        }
        (self.map.atomic_u64(DONE).load(Ordering::Acquire) as usize).min(count)
    }
}

/// A new memfd of `size` bytes.
pub fn memfd(name: &std::ffi::CStr, size: u64) -> Result<std::os::fd::OwnedFd, String> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own descriptor.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
        return Err(format!("ftruncate to {size} bytes: {}", std::io::Error::last_os_error()));
    }
    Ok(fd)
}

/// Frames one ring holds.
pub const RING_SLOTS: u64 = 256;
/// Bytes of one slot: `[len: u32][0: u32][frame]`.
pub const RING_SLOT: usize = 2048;
/// Bytes of the ring's control page (before the slots).
const RING_CONTROL: usize = 4096;
/// Bytes of a ring's memfd.
pub const RING_BYTES: usize = RING_CONTROL + RING_SLOTS as usize * RING_SLOT;
/// Entries the producer has published (written by the producer; by the VMM while no backend
/// runs).
const HEAD: usize = 0;
/// Entries the consumer has finished (written by the consumer; by the VMM while no backend
/// runs).
const TAIL: usize = 64;
/// Nonzero while the consumer may be asleep (written by the consumer): the producer then
/// kicks it.
const SLEEPING: usize = 128;
/// Block write ring: writes whose host I/O failed (written by the consumer, counted up).
const FAILED: usize = 192;

/// Sectors one block write ring entry holds (a longer guest write takes several entries).
pub const WRITE_SECTORS: usize = 8;
/// Bytes of one block write ring slot: `[len: u32][0: u32][sector: u64][data]`.
pub const WRITE_SLOT: usize = 16 + WRITE_SECTORS * vmm_abi::SECTOR_SIZE as usize;
/// Bytes of a block write ring's memfd.
pub const WRITE_RING_BYTES: usize = RING_CONTROL + RING_SLOTS as usize * WRITE_SLOT;

/// A ring of frames between a VMM and its network backend, in a memfd both map, one producer
/// and one consumer. `HEAD` and `TAIL` are free-running counters (entry `i` lives in slot
/// `i % RING_SLOTS`).
///
/// - Transmit: the VMM produces (a guest's transmitted frames are copied in and the vCPU goes
///   on at once), the backend consumes, sending them to the tap in order and advancing `TAIL`
///   after each frame it wrote, so after a crash the next process sends exactly the entries
///   from `TAIL` on (a frame is sent twice only when the process died between the write and
///   the store that follows it).
/// - Receive: the backend produces (frames read from the tap ahead of the guest's request),
///   the VMM consumes, copying them into the guest's buffers itself (so it knows the pages it
///   wrote). A frame is lost in a crash only when it was read from the tap but not published.
///
/// Both sides trust nothing the other wrote: the VMM keeps its own copy of its counter and
/// checks the other's against it, and each slot's length is checked by whoever reads it.
///
/// The same layout with larger slots carries a disk's writes ([`FrameRing::for_writes`]): the
/// VMM copies each guest write in (up to [`WRITE_SECTORS`] sectors an entry) and completes it
/// for the guest at once; the backend writes the entries to the disk in order, advancing the
/// tail after each, so after a crash the next process writes them again from the tail (a
/// write of the same bytes to the same sectors, harmless). A write the host refused is
/// counted in the control page and reported to the guest by its next flush.
pub struct FrameRing {
    map: Mapping,
    slot: usize,
}

impl FrameRing {
    pub fn new(map: Mapping) -> Result<FrameRing, String> {
        if map.size < RING_BYTES {
            return Err(format!("a transmit ring of {} bytes (needs {RING_BYTES})", map.size));
        }
        Ok(FrameRing { map, slot: RING_SLOT })
    }

    /// A block write ring (slots of [`WRITE_SLOT`] bytes).
    pub fn for_writes(map: Mapping) -> Result<FrameRing, String> {
        if map.size < WRITE_RING_BYTES {
            return Err(format!("a block write ring of {} bytes (needs {WRITE_RING_BYTES})", map.size));
        }
        Ok(FrameRing { map, slot: WRITE_SLOT })
    }

    fn slot_at(&self, index: u64) -> u64 {
        (RING_CONTROL + (index % RING_SLOTS) as usize * self.slot) as u64
    }

    /// Copies a write of `data` (whole sectors, at most [`WRITE_SECTORS`]) at `sector` into
    /// the slot of entry `index`, which the consumer must have finished.
    pub fn put_write(&self, index: u64, sector: u64, data: &[u8]) -> Result<(), String> {
        let sector_size = vmm_abi::SECTOR_SIZE as usize;
        if data.is_empty() || data.len() > self.slot - 16 || !data.len().is_multiple_of(sector_size) {
            return Err(format!("a write of {} bytes does not fit a ring slot", data.len()));
        }
        let at = self.slot_at(index);
        self.map.write(at, &(data.len() as u32).to_le_bytes())?;
        self.map.write(at + 8, &sector.to_le_bytes())?;
        self.map.write(at + 16, data)
    }

    /// Entry `index` of a block write ring: its sector and its data, copied into `buf` (of at
    /// least [`WRITE_SLOT`] bytes); an error when its length is not whole sectors that fit.
    pub fn get_write<'b>(&self, index: u64, buf: &'b mut [u8]) -> Result<(u64, &'b [u8]), String> {
        let at = self.slot_at(index);
        let mut head = [0u8; 16];
        self.map.read(at, &mut head)?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let sector = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
        if len == 0 || len > (self.slot - 16).min(buf.len()) || !len.is_multiple_of(vmm_abi::SECTOR_SIZE as usize) {
            return Err(format!("write ring entry {index}: {len} bytes"));
        }
        let data = &mut buf[..len];
        self.map.read(at + 16, data)?;
        Ok((sector, data))
    }

    /// Writes the backend could not do (a block write ring; counted up by the backend).
    pub fn failed(&self) -> u64 {
        self.map.atomic_u64(FAILED).load(Ordering::Acquire)
    }

    /// The backend could not do one more write.
    pub fn add_failed(&self) {
        self.map.atomic_u64(FAILED).fetch_add(1, Ordering::AcqRel);
    }

    /// Entries published (the VMM's head, as the page says it).
    pub fn head(&self) -> u64 {
        self.map.atomic_u64(HEAD).load(Ordering::SeqCst)
    }

    /// Entries finished, as the page says it (untrusted on the VMM's side).
    pub fn tail(&self) -> u64 {
        self.map.atomic_u64(TAIL).load(Ordering::Acquire)
    }

    /// The backend finished every entry before `tail` (or the VMM resets it, no backend
    /// running).
    pub fn set_tail(&self, tail: u64) {
        self.map.atomic_u64(TAIL).store(tail, Ordering::Release);
    }

    /// Resets the head (the VMM, while no backend runs).
    pub fn set_head(&self, head: u64) {
        self.map.atomic_u64(HEAD).store(head, Ordering::SeqCst);
    }

    /// Sets the head to `head` if it still reads `was`.
    pub fn replace_head(&self, was: u64, head: u64) {
        let _ = self.map.atomic_u64(HEAD).compare_exchange(was, head, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Copies `frame` (at most `RING_SLOT - 8` bytes; the caller checks) into the slot of
    /// entry `index`, which the consumer must have finished.
    pub fn put(&self, index: u64, frame: &[u8]) -> Result<(), String> {
        if frame.len() > self.slot - 8 {
            return Err(format!("a frame of {} bytes does not fit a ring slot", frame.len()));
        }
        let at = self.slot_at(index);
        self.map.write(at, &(frame.len() as u32).to_le_bytes())?;
        self.map.write(at + 8, frame)
    }

    /// Publishes every entry before `head`; true when the backend may be asleep (kick it).
    pub fn publish(&self, head: u64) -> bool {
        self.map.atomic_u64(HEAD).store(head, Ordering::SeqCst);
        self.map.atomic_u32(SLEEPING).load(Ordering::SeqCst) != 0
    }

    /// Copies entry `index` into `buf` and returns the frame; an error when its length is
    /// not a frame's (the VMM never writes one: the slot was overwritten by someone else).
    pub fn get<'b>(&self, index: u64, buf: &'b mut [u8; RING_SLOT]) -> Result<&'b [u8], String> {
        let at = self.slot_at(index);
        let mut len = [0u8; 4];
        self.map.read(at, &mut len)?;
        let len = u32::from_le_bytes(len);
        if !(vmm_abi::FRAME_MIN..=vmm_abi::FRAME_MAX).contains(&len) {
            return Err(format!("ring entry {index}: a frame of {len} bytes"));
        }
        let f = &mut buf[..len as usize];
        self.map.read(at + 8, f)?;
        Ok(f)
    }

    /// The consumer's view: `(head, tail)` while entries wait, `None` when none does, an
    /// error (naming the ring `what`) when the counters cannot be.
    pub fn waiting(&self, what: &str) -> Result<Option<(u64, u64)>, String> {
        let (head, tail) = (self.head(), self.tail());
        if head == tail {
            return Ok(None);
        }
        if head < tail || head - tail > RING_SLOTS {
            return Err(format!("{what} with head {head} and tail {tail} ({RING_SLOTS} slots)"));
        }
        Ok(Some((head, tail)))
    }

    /// The backend is about to sleep: true when it may (nothing published past `tail`);
    /// otherwise it must go on (and the flag is cleared again).
    pub fn may_sleep(&self, tail: u64) -> bool {
        self.map.atomic_u32(SLEEPING).store(1, Ordering::SeqCst);
        if self.map.atomic_u64(HEAD).load(Ordering::SeqCst) != tail {
            self.awake();
            return false;
        }
        true
    }

    /// The backend is awake.
    pub fn awake(&self) {
        self.map.atomic_u32(SLEEPING).store(0, Ordering::SeqCst);
    }

    /// Writes raw bytes at `offset` of the ring's memory (tests: a backend scribbling on it).
    #[cfg(test)]
    pub fn scribble(&self, offset: u64, bytes: &[u8]) {
        let _ = self.map.write(offset, bytes);
    }
}

/// A new eventfd (non-blocking, close-on-exec), for kicks.
pub fn eventfd() -> Result<std::os::fd::OwnedFd, String> {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd(2) with constant flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor owned by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Adds one to eventfd `fd` (wakes whoever polls it).
pub fn kick(fd: std::os::fd::RawFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd; a full counter (EAGAIN) already
    // means a wakeup is pending.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Resets eventfd `fd` (after a wakeup).
pub fn clear(fd: std::os::fd::RawFd) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}
