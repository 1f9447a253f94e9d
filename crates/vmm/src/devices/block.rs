//! The block device: a host file, read and written in 512-byte sectors, in batches. The
//! reads and writes are done here, or by a backend process of the VM's own when one is
//! attached ([`Block::attach_backend`], [`crate::backend`]); the checks, the disk mirror of a
//! protected VM and the dirty bitmap stay here either way.

use crate::checkpoint::DiskWrite;
use crate::memory::GuestMem;
use crate::mirror::{MirrorSender, MIRROR_STALL};
use crate::{error::io, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vmm_abi::{
    BlockDesc, BlockRequest, BLOCK_FLUSH, BLOCK_IO_ERROR, BLOCK_MAX_DESCS, BLOCK_MAX_SECTORS, BLOCK_OK, BLOCK_READ, BLOCK_WRITE,
    SECTOR_SIZE,
};

/// How long [`Block::open`] waits for a disk another process holds.
pub const DISK_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A disk backed by a file (its size rounded down to whole sectors).
pub struct Block {
    file: File,
    path: PathBuf,
    sectors: u64,
    mirror: Option<Mirror>,
    /// The backend process doing the disk I/O, if any.
    backend: Option<crate::backend::Backend>,
    /// Writes of the backend's write ring that failed, as already reported to the guest.
    failed_seen: u64,
    /// Wake the backend for each write (`VIGIL_BLK_KICK=each`), not when the guest idles.
    kick_each_write: bool,
}

/// Where guest writes are mirrored while the VM is protected.
struct Mirror {
    tx: MirrorSender,
    /// The open epoch the next writes belong to.
    epoch: u64,
    /// Mirroring stopped (the receiver went away, or took nothing for too long): why, with
    /// the epoch. The backup missed writes from then on.
    lost: Option<String>,
    /// A request has waited for room since then, when the receiver had taken so many bytes.
    waiting: Option<(std::time::Instant, u64)>,
}

/// Sends SIGCONT to every other process that has `file` open (the same device and inode) and
/// is stopped with SIGTERM pending, and returns their pids. A block backend's death signal is
/// SIGTERM, which it handles by writing its ring and exiting; stopped when its VMM died, it
/// would hold the disk (and the guest's last writes) until someone continued it. A process
/// stopped without a pending SIGTERM (a hang injected, a debugger) is left as it is.
pub fn continue_stopped_holders(file: &File) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(me) = file.metadata() else { return Vec::new() };
    let own = std::process::id();
    let mut continued = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return continued };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()).filter(|&n| n != own) else { continue };
        // The process first, then what /proc says of it: a pid reused after this refers to
        // another process than the pidfd, which then can no longer be signalled (ESRCH).
        // SAFETY: pidfd_open(2) of a pid; the result is checked and owned below.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as i32;
        if pidfd < 0 {
            continue;
        }
        // SAFETY: a new descriptor owned by nothing else.
        let pidfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(pidfd) };
        let Ok(status) = std::fs::read_to_string(p.path().join("status")) else { continue };
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
        let stopped = field("State:").is_some_and(|s| s.starts_with('T'));
        let term = 1u64 << (libc::SIGTERM - 1);
        let pending =
            ["SigPnd:", "ShdPnd:"].iter().any(|f| field(f).and_then(|m| u64::from_str_radix(m, 16).ok()).is_some_and(|m| m & term != 0));
        if !stopped || !pending {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        let holds = fds.flatten().any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == me.dev() && m.ino() == me.ino()));
        let fd = std::os::fd::AsRawFd::as_raw_fd(&pidfd);
        // SAFETY: pidfd_send_signal(2) on our own pidfd with a constant signal and no info.
        if holds && unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd, libc::SIGCONT, std::ptr::null::<libc::siginfo_t>(), 0) } == 0 {
            continued.push(pid);
        }
    }
    continued
}

impl Block {
    /// Opens `path` read-write and locks it (an exclusive `flock`, held by this VMM and its
    /// block backends, released when the last of them exits). A disk locked by another
    /// process is waited for up to [`DISK_LOCK_WAIT`] — a block backend whose VMM died writes
    /// the guest's last writes before it exits, and a VMM restarted on the disk must read
    /// them — then refused: two VMMs writing one disk would corrupt it.
    ///
    /// A holder stopped (SIGSTOP) with a SIGTERM pending — a block backend whose VMM died while
    /// it was stopped, told to end by its death signal — is continued, so that it writes what
    /// its ring holds and exits ([`continue_stopped_holders`]).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(io("cannot open disk", path))?;
        let t = std::time::Instant::now();
        let mut looked = None;
        // SAFETY: flock(2) on a descriptor we own (and keep: the lock lives with it).
        while unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(crate::Error::Config(format!("disk {}: cannot lock it: {e}", path.display())));
            }
            // A scan of every process: only after a moment, and not at every turn.
            if t.elapsed() >= std::time::Duration::from_millis(50)
                && looked.is_none_or(|l: std::time::Instant| l.elapsed() >= std::time::Duration::from_millis(250))
            {
                looked = Some(std::time::Instant::now());
                for pid in continue_stopped_holders(&file) {
                    eprintln!("vmm: disk {}: its holder {pid} was stopped with SIGTERM pending: continued, to end", path.display());
                }
            }
            if t.elapsed() >= DISK_LOCK_WAIT {
                return Err(crate::Error::Config(format!(
                    "disk {}: in use by another VMM (or its block backend) for {} s: refused",
                    path.display(),
                    DISK_LOCK_WAIT.as_secs()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let len = file.metadata().map_err(io("cannot stat disk", path))?.len();
        Ok(Block {
            file,
            path: path.to_owned(),
            sectors: len / SECTOR_SIZE,
            mirror: None,
            backend: None,
            failed_seen: 0,
            kick_each_write: false,
        })
    }

    /// Hands the disk I/O to a backend process started from `program`, on guest memory `mem`
    /// (which must be shared: [`GuestMem::new_shared`]).
    pub fn attach_backend(&mut self, mem: &GuestMem, program: &crate::backend::BackendProgram) -> Result<()> {
        let err = |reason: String| crate::Error::Config(format!("disk {}: {reason}", self.path.display()));
        let memfd = mem.memfd().ok_or_else(|| err("a block backend process needs shared guest memory".into()))?;
        let mut program = program.clone();
        if std::env::var_os("VIGIL_BLK_WRITE_RING").is_some_and(|v| v == "0") {
            program.sync_tx = true;
        }
        self.kick_each_write = std::env::var_os("VIGIL_BLK_KICK").is_some_and(|v| v == "each");
        let backend = crate::backend::Backend::start(crate::backend::Device::Block, &program, memfd, std::os::fd::AsFd::as_fd(&self.file))
            .map_err(|e| err(format!("block backend: {e}")))?;
        self.backend = Some(backend);
        Ok(())
    }

    /// The backend process's state, when the I/O is done by one.
    pub fn backend_status(&self) -> Option<crate::backend::BackendStatus> {
        self.backend.as_ref().map(|b| b.status())
    }

    /// [`Block::request`] through the backend process: every descriptor is checked here
    /// first; the backend runs them; reads go into the dirty bitmap and writes to the mirror
    /// here; the status is written once.
    fn request_backend(&mut self, mem: &mut GuestMem, addr: u64, req: BlockRequest) -> Result<(), String> {
        let Some(backend) = &self.backend else { return Err("no block backend".into()) };
        let mut descs = Vec::with_capacity(req.count as usize);
        for i in 0..req.count as u64 {
            let d: BlockDesc = mem.read_obj(req.descs + i * std::mem::size_of::<BlockDesc>() as u64)?;
            if d.op != BLOCK_FLUSH {
                if d.op != BLOCK_READ && d.op != BLOCK_WRITE {
                    return Err(format!("block descriptor {i}: unknown operation {}", d.op));
                }
                if d.sectors > BLOCK_MAX_SECTORS {
                    return Err(format!("block descriptor {i}: {} sectors (at most {BLOCK_MAX_SECTORS})", d.sectors));
                }
                if d.sector.checked_add(d.sectors as u64).is_none_or(|e| e > self.sectors) {
                    return Err(format!(
                        "block descriptor {i}: sectors {}+{} beyond the disk ({} sectors)",
                        d.sector, d.sectors, self.sectors
                    ));
                }
                mem.check(d.buf, d.sectors as u64 * SECTOR_SIZE).map_err(|e| format!("block descriptor {i}: buffer {e}"))?;
            }
            descs.push(crate::backend::wire::BlockEntry { op: d.op, sectors: d.sectors, sector: d.sector, buf: d.buf });
        }
        // Only writes, and a write ring: copied into the ring and done for the guest at once
        // (the backend writes them in order; a read or a flush after them waits until it
        // has). With the mirror, the same bytes go to the backup.
        if backend.has_ring() && descs.iter().all(|d| d.op == BLOCK_WRITE) {
            let mut status = BLOCK_OK;
            let mut data = Vec::new();
            for d in &descs {
                data.resize(d.sectors as usize * SECTOR_SIZE as usize, 0);
                mem.read(d.buf, &mut data)?;
                if data.is_empty() {
                    continue;
                }
                if !backend.queue_write(d.sector, &data) {
                    status = BLOCK_IO_ERROR;
                    break;
                }
                if let Some(m) = self.mirror.as_mut().filter(|m| m.lost.is_none()) {
                    if let Err(e) =
                        m.tx.send(DiskWrite { epoch: m.epoch, offset: d.sector * SECTOR_SIZE, data: data.clone() }, MIRROR_STALL)
                    {
                        m.lost = Some(format!("epoch {}: {e}", m.epoch));
                    }
                }
            }
            if self.kick_each_write {
                backend.publish();
            } else {
                backend.publish_lazy();
            }
            return mem.write_obj(addr, &BlockRequest { status, ..req });
        }
        let result = backend.block(&descs);
        // A write of the ring that failed on the host is the guest's to hear of at its next
        // flush (as a disk with a write cache reports it).
        let failed = backend.write_failures();
        let failed_now = failed > self.failed_seen && descs.iter().any(|d| d.op == BLOCK_FLUSH);
        if failed_now {
            self.failed_seen = failed;
        }
        // The backend may have written any read buffer it was given (a failed request too).
        for d in descs.iter().filter(|d| d.op == BLOCK_READ) {
            mem.mark_written(d.buf, d.sectors as u64 * SECTOR_SIZE);
        }
        let ran = match result {
            Ok(()) => descs.len(),
            Err(i) => i,
        };
        if let Some(m) = self.mirror.as_mut().filter(|m| m.lost.is_none()) {
            for d in descs[..ran].iter().filter(|d| d.op == BLOCK_WRITE) {
                let mut data = vec![0u8; d.sectors as usize * SECTOR_SIZE as usize];
                mem.read(d.buf, &mut data)?;
                if let Err(e) = m.tx.send(DiskWrite { epoch: m.epoch, offset: d.sector * SECTOR_SIZE, data }, MIRROR_STALL) {
                    m.lost = Some(format!("epoch {}: {e}", m.epoch));
                    break;
                }
            }
        }
        let status = if result.is_ok() && !failed_now { BLOCK_OK } else { BLOCK_IO_ERROR };
        mem.write_obj(addr, &BlockRequest { status, ..req })
    }

    /// Waits until every write the guest was told is done is on the disk file (a process
    /// backend may still hold some in its write ring): before anything reads the file from
    /// outside, e.g. a snapshot that carries the disk. False when some could not be written.
    pub fn settle(&self) -> bool {
        // (A write that failed and that the guest has not heard of yet fails the settling:
        // whatever reads the file now would miss it, and the guest would never hear of it.)
        self.backend.as_ref().is_none_or(|b| b.settle() && b.write_failures() <= self.failed_seen)
    }

    /// Wakes the backend for writes it was not woken for yet (the guest is about to idle).
    pub fn kick_owed(&self) {
        if let Some(b) = &self.backend {
            b.kick_owed();
        }
    }

    /// What settles the write ring from another thread (see [`Block::settle`]), when a
    /// backend process keeps one.
    pub fn settler(&self) -> Option<crate::backend::Settler> {
        self.backend.as_ref().filter(|b| b.has_ring()).map(|b| b.settler())
    }

    /// Mirrors every guest write from now on to `tx`, tagged with `epoch` (until
    /// [`Block::set_mirror_epoch`] changes it); `None` stops mirroring.
    pub fn set_mirror(&mut self, tx: Option<MirrorSender>, epoch: u64) {
        self.mirror = tx.map(|tx| Mirror { tx, epoch, lost: None, waiting: None });
    }

    /// The epoch of the writes from now on.
    pub fn set_mirror_epoch(&mut self, epoch: u64) {
        if let Some(m) = &mut self.mirror {
            m.epoch = epoch;
        }
    }

    /// Why mirroring stopped (and in which epoch), if it did.
    pub fn mirror_lost(&self) -> Option<&str> {
        self.mirror.as_ref().and_then(|m| m.lost.as_deref())
    }

    /// Size in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// The backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the request at `addr` may run now: while the VM is protected, its writes must
    /// fit in the disk mirror (an empty mirror takes any request). Waits up to `wait` for
    /// room. When the mirror's receiver takes nothing for [`MIRROR_STALL`], mirroring stops
    /// (see [`Block::mirror_lost`]) and the request may run.
    pub fn ready(&mut self, mem: &GuestMem, addr: u64, wait: std::time::Duration) -> bool {
        let Some(m) = self.mirror.as_mut().filter(|m| m.lost.is_none()) else { return true };
        let need = write_bytes(mem, addr);
        if need == 0 {
            return true;
        }
        match m.tx.wait_room(need, wait) {
            Ok(true) => {
                m.waiting = None;
                true
            }
            Ok(false) => {
                let taken = m.tx.taken();
                match m.waiting {
                    Some((since, t)) if t == taken => {
                        if since.elapsed() < MIRROR_STALL {
                            return false;
                        }
                        let queued = m.tx.drop_queued();
                        let e = crate::mirror::MirrorError::Stalled { queued, waited: since.elapsed() };
                        m.lost = Some(format!("epoch {}: {e}", m.epoch));
                        m.waiting = None;
                        true
                    }
                    _ => {
                        m.waiting = Some((std::time::Instant::now(), taken));
                        false
                    }
                }
            }
            Err(e) => {
                m.lost = Some(format!("epoch {}: {e}", m.epoch));
                true
            }
        }
    }

    /// Handles one [`BlockRequest`] at `addr`. Host I/O errors become `BLOCK_IO_ERROR` for the
    /// guest; ABI violations are `Err`.
    pub fn request(&mut self, mem: &mut GuestMem, addr: u64) -> Result<(), String> {
        let req: BlockRequest = mem.read_obj(addr)?;
        if req.count > BLOCK_MAX_DESCS {
            return Err(format!("block request with {} descriptors (at most {BLOCK_MAX_DESCS})", req.count));
        }
        if self.backend.is_some() {
            return self.request_backend(mem, addr, req);
        }
        let mut status = BLOCK_OK;
        let mut buf = Vec::new();
        for i in 0..req.count as u64 {
            let d: BlockDesc = mem.read_obj(req.descs + i * std::mem::size_of::<BlockDesc>() as u64)?;
            if d.op == BLOCK_FLUSH {
                if self.file.sync_data().is_err() {
                    status = BLOCK_IO_ERROR;
                }
                continue;
            }
            if d.sectors > BLOCK_MAX_SECTORS {
                return Err(format!("block descriptor {i}: {} sectors (at most {BLOCK_MAX_SECTORS})", d.sectors));
            }
            let end = d.sector.checked_add(d.sectors as u64).filter(|e| *e <= self.sectors);
            if end.is_none() {
                return Err(format!("block descriptor {i}: sectors {}+{} beyond the disk ({} sectors)", d.sector, d.sectors, self.sectors));
            }
            let len = d.sectors as u64 * SECTOR_SIZE;
            mem.check(d.buf, len).map_err(|e| format!("block descriptor {i}: buffer {e}"))?;
            buf.resize(len as usize, 0);
            let off = d.sector * SECTOR_SIZE;
            match d.op {
                BLOCK_READ => {
                    if self.file.read_exact_at(&mut buf, off).is_err() {
                        status = BLOCK_IO_ERROR;
                        break;
                    }
                    mem.write(d.buf, &buf)?;
                }
                BLOCK_WRITE => {
                    mem.read(d.buf, &mut buf)?;
                    if self.file.write_all_at(&buf, off).is_err() {
                        status = BLOCK_IO_ERROR;
                        break;
                    }
                    if let Some(m) = self.mirror.as_mut().filter(|m| m.lost.is_none()) {
                        // Waits while the mirror is full: the guest writes at the pace the
                        // backup takes them.
                        if let Err(e) = m.tx.send(DiskWrite { epoch: m.epoch, offset: off, data: buf.clone() }, MIRROR_STALL) {
                            m.lost = Some(format!("epoch {}: {e}", m.epoch));
                        }
                    }
                }
                op => return Err(format!("block descriptor {i}: unknown operation {op}")),
            }
        }
        mem.write_obj(addr, &BlockRequest { status, ..req })
    }
}

/// Bytes a block request would write (0 when it cannot be read: it will fault).
fn write_bytes(mem: &GuestMem, addr: u64) -> usize {
    let Ok(req) = mem.read_obj::<BlockRequest>(addr) else { return 0 };
    let mut total = 0usize;
    for i in 0..req.count.min(BLOCK_MAX_DESCS) as u64 {
        let Ok(d) = mem.read_obj::<BlockDesc>(req.descs.wrapping_add(i * std::mem::size_of::<BlockDesc>() as u64)) else { break };
        if d.op == BLOCK_WRITE && d.sectors <= BLOCK_MAX_SECTORS {
            total += d.sectors as usize * SECTOR_SIZE as usize;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Pod;

    /// A process holding the disk's lock, stopped, with and without a SIGTERM pending.
    fn stopped_holder(path: &Path, term: bool) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("disk");
        // SAFETY: flock(2) on a descriptor we own.
        assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX | libc::LOCK_NB) }, 0);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        // SAFETY: between fork and exec only fcntl(2), async-signal-safe: the locked
        // descriptor stays open across exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::fcntl(fd, libc::F_SETFD, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("sleep");
        drop(f);
        let pid = child.id() as libc::pid_t;
        // SAFETY: signals to our own child.
        unsafe {
            libc::kill(pid, libc::SIGSTOP);
            if term {
                std::thread::sleep(std::time::Duration::from_millis(50));
                libc::kill(pid, libc::SIGTERM);
            }
        }
        child
    }

    /// The disk's holder stopped with SIGTERM pending (a block backend whose VMM died while it
    /// was stopped) is continued and ends, and the disk opens well within the wait; one stopped
    /// without it (a hang) is left alone and the disk refused.
    #[test]
    fn a_stopped_holder_told_to_end_is_continued_and_the_disk_opens() {
        let dir = std::env::temp_dir().join(format!("vigil-block-stopped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("disk");
        std::fs::write(&path, vec![0u8; 64 * 512]).expect("disk");
        let mut told = stopped_holder(&path, true);
        let t = std::time::Instant::now();
        let disk = Block::open(&path).expect("opens once the holder ended");
        assert!(t.elapsed() < DISK_LOCK_WAIT / 2, "took {:?}", t.elapsed());
        let st = told.wait().expect("wait");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(libc::SIGTERM), "{st:?}");
        drop(disk);
        let mut hung = stopped_holder(&path, false);
        let e = Block::open(&path).err().expect("refused");
        assert!(e.to_string().contains("in use by another VMM"), "{e}");
        assert!(hung.try_wait().expect("wait").is_none(), "a stopped holder without SIGTERM pending was ended");
        let _ = hung.kill();
        let _ = hung.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Random request blocks and descriptors never panic the device: each is either served
    /// or refused with a reason.
    #[test]
    fn random_requests_never_panic() {
        let dir = std::env::temp_dir().join(format!("vigil-block-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("disk");
        std::fs::write(&path, vec![0u8; 64 * 512]).expect("disk");
        let mut disk = Block::open(&path).expect("open");
        let mut mem = GuestMem::new(1 << 20).expect("memory");
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut served, mut refused) = (0, 0);
        for _ in 0..5000 {
            let pick = |v: u64, small: u64, big: u64| if v.is_multiple_of(4) { big } else { v % small };
            let descs = 0x1000 * (1 + next() % 8);
            let req = BlockRequest {
                count: pick(next(), 4, next() as u32 as u64) as u32,
                status: 0,
                descs: pick(next(), 1 << 20, next()) & !7 | descs,
            };
            mem.write_obj(0x800, &req).expect("req");
            for k in 0..4 {
                let d = BlockDesc {
                    op: (next() % 4) as u32,
                    sectors: pick(next(), 8, next() as u32 as u64) as u32,
                    sector: pick(next(), 70, next()),
                    buf: pick(next(), 1 << 20, next()),
                };
                let _ = mem.write_obj(req.descs + k * 24, &d);
            }
            let addr = if next() % 8 == 0 { next() % (2 << 20) } else { 0x800 };
            match disk.request(&mut mem, addr) {
                Ok(()) => served += 1,
                Err(reason) => {
                    assert!(!reason.is_empty());
                    refused += 1;
                }
            }
        }
        assert!(served > 0 && refused > 0, "served {served}, refused {refused}");
        let _ = std::fs::remove_dir_all(&dir);
        let _ = BlockDesc::zeroed();
    }

    /// One request of `descs` (op, sectors, sector, buffer) at 0x800; its status.
    fn run(disk: &mut Block, mem: &mut GuestMem, descs: &[(u32, u32, u64, u64)]) -> u32 {
        for (k, &(op, sectors, sector, buf)) in descs.iter().enumerate() {
            mem.write_obj(0x1000 + k as u64 * 24, &BlockDesc { op, sectors, sector, buf }).expect("desc");
        }
        mem.write_obj(0x800, &BlockRequest { count: descs.len() as u32, status: 99, descs: 0x1000 }).expect("req");
        disk.request(mem, 0x800).expect("served");
        mem.read_obj::<BlockRequest>(0x800).expect("req").status
    }

    /// With a block backend process and its write ring, a request of writes is done for the
    /// guest at once; a read after it sees them (the backend writes the ring before it serves
    /// the read), a flush finds them on the file, and a second disk open waits for the lock.
    #[test]
    fn writes_through_the_ring_are_read_back_and_flushed() {
        let dir = std::env::temp_dir().join(format!("vigil-block-ring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("disk");
        std::fs::write(&path, vec![0u8; 256 * 512]).expect("disk");
        let mut mem = GuestMem::new_shared(1 << 20).expect("memory");
        let mut disk = Block::open(&path).expect("open");
        let exe = std::env::current_exe().expect("test binary");
        let program = crate::backend::BackendProgram::new(
            exe,
            vec!["--exact".into(), "backend::client::tests::fake_backend_real".into(), "--test-threads=1".into(), "-q".into()],
        );
        disk.attach_backend(&mem, &program).expect("backend");
        mem.write(0x10000, &[7u8; 20 * 512]).expect("data");
        mem.write(0x20000, &[9u8; 512]).expect("data");
        // 20 sectors (three ring entries) at 10, one at 100.
        assert_eq!(run(&mut disk, &mut mem, &[(BLOCK_WRITE, 20, 10, 0x10000), (BLOCK_WRITE, 1, 100, 0x20000)]), BLOCK_OK);
        assert_eq!(run(&mut disk, &mut mem, &[(BLOCK_READ, 21, 9, 0x40000)]), BLOCK_OK);
        let mut back = vec![0u8; 21 * 512];
        mem.read(0x40000, &mut back).expect("read");
        assert!(back[..512].iter().all(|&b| b == 0) && back[512..].iter().all(|&b| b == 7), "read after the write");
        mem.write(0x20000, &[3u8; 512]).expect("data");
        assert_eq!(run(&mut disk, &mut mem, &[(BLOCK_WRITE, 1, 100, 0x20000)]), BLOCK_OK);
        assert_eq!(run(&mut disk, &mut mem, &[(BLOCK_FLUSH, 0, 0, 0)]), BLOCK_OK);
        let file = std::fs::read(&path).expect("file");
        assert!(file[10 * 512..30 * 512].iter().all(|&b| b == 7) && file[100 * 512..101 * 512].iter().all(|&b| b == 3));
        // Another VMM on the same disk is refused while this one (and its backend) holds it.
        let t = std::time::Instant::now();
        let e = Block::open(&path).err().expect("refused");
        assert!(e.to_string().contains("in use by another VMM") && t.elapsed() >= DISK_LOCK_WAIT, "{e}");
        drop(disk);
        Block::open(&path).expect("free once the first is gone");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
