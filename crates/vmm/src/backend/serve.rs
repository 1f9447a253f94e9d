//! The backend process's side: serves one VMM's requests on its device (the tap, or the disk
//! file), reaching guest memory through its memfd, and (network) drains the transmit ring the
//! VMM fills. Started by the VMM with its descriptors at fixed numbers.

use super::shm::{FrameRing, Mapping, Progress, RING_SLOT, RING_SLOTS};
use super::wire::{self, Reply, Request, MAX_MSG, STATUS_IO_ERROR, STATUS_OK, STATUS_REFUSED};
use std::os::fd::{BorrowedFd, RawFd};
use vmm_abi::FRAME_MAX;

/// The request socket (`SOCK_SEQPACKET`).
pub const FD_SOCKET: RawFd = 3;
/// Guest memory (memfd).
pub const FD_MEMORY: RawFd = 4;
/// The device: the tap (network) or the disk file (block).
pub const FD_TAP: RawFd = 5;
/// The progress page (memfd).
pub const FD_PROGRESS: RawFd = 6;
/// The transmit ring (memfd; network only, else closed).
pub const FD_RING: RawFd = 7;
/// The eventfd the VMM kicks when it published transmit entries while the backend slept, or
/// made room in a full receive ring.
pub const FD_KICK: RawFd = 8;
/// The receive ring (memfd; network only, else closed).
pub const FD_RX_RING: RawFd = 9;
/// The eventfd the backend kicks when it published received frames while the VMM waited.
pub const FD_RX_EVENT: RawFd = 10;

/// Serves one request at a time.
pub struct Handler {
    mem: Mapping,
    tap: RawFd,
    progress: Progress,
    /// The transmit ring (network) or the write ring (block), when the VMM passed one.
    ring: Option<FrameRing>,
    /// `ring` carries a disk's writes, not frames.
    disk_ring: bool,
    /// The receive ring and the VMM's eventfd, when the VMM passed them.
    rx: Option<(FrameRing, RawFd)>,
    /// The tap blocks on reads (a VMM's tap does not; a test's socket may): poll first.
    tap_blocking: bool,
    /// Frames from the tap larger than [`FRAME_MAX`], dropped.
    pub dropped: u64,
    /// Ring entries not sent: refused by the tap (a full queue, as on a wire) or not a frame.
    pub tx_dropped: u64,
    /// The VMM said it speaks [`wire::PROTOCOL`] (`OP_HELLO`): requests are served.
    greeted: bool,
}

impl Handler {
    pub fn new(mem: Mapping, tap: RawFd, progress: Progress) -> Handler {
        Handler {
            mem,
            tap,
            progress,
            ring: None,
            disk_ring: false,
            rx: None,
            tap_blocking: false,
            dropped: 0,
            tx_dropped: 0,
            greeted: false,
        }
    }

    /// Also drains transmit ring `ring`.
    pub fn with_ring(self, ring: FrameRing) -> Handler {
        Handler { ring: Some(ring), ..self }
    }

    /// Also writes the entries of block write ring `ring` to the disk.
    pub fn with_write_ring(self, ring: FrameRing) -> Handler {
        Handler { ring: Some(ring), disk_ring: true, ..self }
    }

    /// Also reads frames from the tap ahead into receive ring `ring`, kicking eventfd `event`
    /// when the VMM waits for them.
    pub fn with_rx_ring(self, ring: FrameRing, event: RawFd) -> Handler {
        // SAFETY: F_GETFL on our own descriptor.
        let flags = unsafe { libc::fcntl(self.tap, libc::F_GETFL) };
        Handler { rx: Some((ring, event)), tap_blocking: flags >= 0 && flags & libc::O_NONBLOCK == 0, ..self }
    }

    /// Reads waiting frames from the tap into the receive ring while it has room, publishing
    /// each (so a crash loses at most the frame being read); whether it still has room (then
    /// the tap is worth waiting on). An error when the ring's counters are impossible.
    pub fn fill_rx(&mut self) -> Result<bool, String> {
        // No ring is touched before the VMM said it lays them out as this build does.
        let Some((ring, event)) = self.rx.as_ref().filter(|_| self.greeted) else { return Ok(false) };
        let mut frame = [0u8; 65536];
        let mut head = ring.head();
        let mut kick = false;
        let room = loop {
            let tail = ring.tail();
            if tail > head || head - tail > RING_SLOTS {
                return Err(format!("receive ring with head {head} and tail {tail} ({RING_SLOTS} slots)"));
            }
            if head - tail == RING_SLOTS {
                break false;
            }
            if self.tap_blocking {
                let mut p = libc::pollfd { fd: self.tap, events: libc::POLLIN, revents: 0 };
                // SAFETY: polls one live pollfd without waiting.
                if unsafe { libc::poll(&mut p, 1, 0) } <= 0 {
                    break true;
                }
            }
            // SAFETY: reads into our own buffer of its length from the tap (non-blocking, or
            // polled readable just now).
            let n = unsafe { libc::read(self.tap, frame.as_mut_ptr().cast(), frame.len()) };
            if n <= 0 {
                break true;
            }
            let n = n as usize;
            if !(vmm_abi::FRAME_MIN as usize..=FRAME_MAX as usize).contains(&n) {
                self.dropped += 1;
                continue;
            }
            ring.put(head, &frame[..n])?;
            head += 1;
            kick |= ring.publish(head);
        };
        if kick {
            super::shm::kick(*event);
        }
        Ok(room)
    }

    /// Sends every entry published in the transmit ring, in order, advancing its tail after
    /// each; an error when the ring's counters are impossible (the process then exits and the
    /// VMM starts another).
    pub fn drain_ring(&mut self) -> Result<u64, String> {
        if !self.greeted {
            return Ok(0);
        }
        if self.disk_ring {
            return self.drain_writes();
        }
        let Some(ring) = &self.ring else { return Ok(0) };
        let mut buf = [0u8; RING_SLOT];
        let (mut sent, mut dropped) = (0, 0);
        while let Some((head, mut tail)) = ring.waiting("transmit ring")? {
            while tail < head {
                match ring.get(tail, &mut buf) {
                    // SAFETY: writes `f.len()` initialised bytes from a live buffer to the tap.
                    Ok(f) if unsafe { libc::write(self.tap, f.as_ptr().cast(), f.len()) } >= 0 => sent += 1,
                    // A full queue or link down: lost, as on a real wire.
                    Ok(_) => dropped += 1,
                    Err(e) => {
                        eprintln!("vigil backend: {e}; skipped");
                        dropped += 1;
                    }
                }
                tail += 1;
                ring.set_tail(tail);
            }
        }
        self.tx_dropped += dropped;
        Ok(sent)
    }

    /// Writes every entry published in the block write ring to the disk, in order, advancing
    /// its tail after each; a write the host refuses (or that names sectors beyond the disk)
    /// is counted in the ring's control page, for the guest's next flush to report. An error
    /// when the ring's counters are impossible.
    fn drain_writes(&mut self) -> Result<u64, String> {
        let Some(ring) = &self.ring else { return Ok(0) };
        let mut buf = vec![0u8; super::shm::WRITE_SLOT];
        let mut written = 0;
        let mut disk_bytes = None;
        while let Some((head, mut tail)) = ring.waiting("write ring")? {
            let size = *disk_bytes.get_or_insert_with(|| stat(self.tap).map_or(0, |st| st.st_size as u64));
            while tail < head {
                let ok = match ring.get_write(tail, &mut buf) {
                    Ok((sector, data)) => sector
                        .checked_mul(vmm_abi::SECTOR_SIZE)
                        .filter(|o| o.checked_add(data.len() as u64).is_some_and(|e| e <= size))
                        .is_some_and(|off| self.pwrite_all(data, off)),
                    Err(e) => {
                        eprintln!("vigil backend: {e}; skipped");
                        false
                    }
                };
                if ok {
                    written += 1;
                } else {
                    ring.add_failed();
                }
                tail += 1;
                ring.set_tail(tail);
            }
        }
        Ok(written)
    }

    /// Writes all of `data` at byte `off` of the disk; false when the host refuses.
    fn pwrite_all(&self, data: &[u8], off: u64) -> bool {
        let mut at = 0usize;
        while at < data.len() {
            // SAFETY: writes initialised bytes of a live buffer to the disk.
            let n = unsafe { libc::pwrite(self.tap, data[at..].as_ptr().cast(), data.len() - at, (off + at as u64) as libc::off_t) };
            if n <= 0 {
                return false;
            }
            at += n as usize;
        }
        true
    }

    /// Serves one message and returns the reply's bytes; a malformed message (or one naming
    /// memory outside the guest's) is refused with its reason, never a panic.
    pub fn handle(&mut self, msg: &[u8]) -> Vec<u8> {
        let (op, seq) = (
            msg.get(0..4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            msg.get(4..8).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        let (done, status, reason) = match Request::parse(msg).and_then(|r| self.serve(r)) {
            Ok((done, status)) => (done, status, String::new()),
            Err(reason) => (0, STATUS_REFUSED, reason),
        };
        Reply { op, seq, done, status, reason }.encode()
    }

    fn serve(&mut self, req: Request) -> Result<(u32, u32), String> {
        if let Request::Hello { version, .. } = req {
            if version != wire::PROTOCOL {
                return Err(format!("the VMM speaks ring protocol {version}, this backend {}", wire::PROTOCOL));
            }
            self.greeted = true;
            return Ok((0, STATUS_OK));
        }
        if !self.greeted {
            return Err(format!("a request before the hello (this backend speaks ring protocol {})", wire::PROTOCOL));
        }
        let seq = req.seq();
        if let Request::Block { descs, .. } = req {
            return self.block(seq, &descs);
        }
        self.serve_net(req).map(|done| (done, STATUS_OK))
    }

    /// Runs block descriptors in order (all checked first): `(done, STATUS_OK)`, or
    /// `(i, STATUS_IO_ERROR)` when descriptor `i`'s host I/O failed.
    fn block(&mut self, seq: u32, descs: &[wire::BlockEntry]) -> Result<(u32, u32), String> {
        use vmm_abi::{BLOCK_FLUSH, BLOCK_READ, SECTOR_SIZE};
        let st = stat(self.tap).map_err(|e| format!("fstat of the disk: {e}"))?;
        let disk_sectors = st.st_size as u64 / SECTOR_SIZE;
        let mut ranges = Vec::with_capacity(descs.len());
        for (i, d) in descs.iter().enumerate() {
            if d.op == BLOCK_FLUSH {
                ranges.push((std::ptr::null_mut(), 0, 0));
                continue;
            }
            if d.sector.checked_add(d.sectors as u64).is_none_or(|e| e > disk_sectors) {
                return Err(format!("descriptor {i}: sectors {}+{} beyond the disk ({disk_sectors} sectors)", d.sector, d.sectors));
            }
            let len = d.sectors as usize * SECTOR_SIZE as usize;
            let p = self.mem.range(d.buf, len).map_err(|e| format!("descriptor {i}: buffer {e}"))?;
            ranges.push((p, len, d.sector * SECTOR_SIZE));
        }
        self.progress.begin(seq);
        for (i, (d, &(p, len, off))) in descs.iter().zip(&ranges).enumerate() {
            let ok = match d.op {
                // SAFETY: fdatasync of our own descriptor.
                BLOCK_FLUSH => unsafe { libc::fdatasync(self.tap) == 0 },
                op => {
                    let mut at = 0usize;
                    while at < len {
                        // SAFETY: `p..p+len` lies inside the guest memory mapping (checked
                        // above); the kernel copies between it and the file, no Rust reference
                        // to the shared bytes is made.
                        let n = unsafe {
                            if op == BLOCK_READ {
                                libc::pread(self.tap, p.add(at).cast(), len - at, (off + at as u64) as libc::off_t)
                            } else {
                                libc::pwrite(self.tap, p.add(at).cast(), len - at, (off + at as u64) as libc::off_t)
                            }
                        };
                        if n <= 0 {
                            break;
                        }
                        at += n as usize;
                    }
                    at == len
                }
            };
            if !ok {
                return Ok((i as u32, STATUS_IO_ERROR));
            }
            self.progress.record(i, 0);
        }
        Ok((descs.len() as u32, STATUS_OK))
    }

    fn serve_net(&mut self, req: Request) -> Result<u32, String> {
        let seq = req.seq();
        match req {
            Request::Ping { .. } | Request::Block { .. } | Request::Hello { .. } => Ok(0),
            Request::Tx { frames, .. } => {
                for (i, &(addr, len)) in frames.iter().enumerate() {
                    self.mem.range(addr, len as usize).map_err(|e| format!("frame {i}: {e}"))?;
                }
                self.progress.begin(seq);
                let mut frame = [0u8; FRAME_MAX as usize];
                for (i, &(addr, len)) in frames.iter().enumerate() {
                    let f = &mut frame[..len as usize];
                    self.mem.read(addr, f)?;
                    if !self.write_tap(f) {
                        // Full queue or link down: the rest is lost, as on a real wire.
                        return Ok(i as u32);
                    }
                    self.progress.record(i, len);
                }
                Ok(frames.len() as u32)
            }
            Request::Send { payload, .. } => {
                self.progress.begin(seq);
                let mut n = 0;
                for (i, f) in wire::send_frames(&payload).enumerate() {
                    let f = f?;
                    // A frame the queue refuses is lost, as on a wire; the others still go.
                    self.write_tap(f);
                    self.progress.record(i, f.len() as u32);
                    n += 1;
                }
                Ok(n)
            }
            Request::Rx { bufs, .. } => {
                for (i, &(addr, len)) in bufs.iter().enumerate() {
                    self.mem.range(addr, len as usize).map_err(|e| format!("buffer {i}: {e}"))?;
                }
                self.progress.begin(seq);
                let mut frame = vec![0u8; 65536];
                let mut done = 0;
                'bufs: for &(addr, _) in &bufs {
                    loop {
                        // SAFETY: reads into our own buffer of the given length.
                        let n = unsafe { libc::read(self.tap, frame.as_mut_ptr().cast(), frame.len()) };
                        if n <= 0 {
                            break 'bufs;
                        }
                        let n = n as usize;
                        if n > FRAME_MAX as usize {
                            self.dropped += 1;
                            continue;
                        }
                        self.mem.write(addr, &frame[..n])?;
                        self.progress.record(done, n as u32);
                        done += 1;
                        break;
                    }
                }
                Ok(done as u32)
            }
        }
    }

    fn write_tap(&self, f: &[u8]) -> bool {
        // SAFETY: writes `f.len()` initialised bytes from a live buffer to the tap descriptor.
        unsafe { libc::write(self.tap, f.as_ptr().cast(), f.len()) >= 0 }
    }
}

/// Whether `fd` is a disk (a regular file or a block device) rather than a tap or a socket.
fn is_disk(fd: RawFd) -> bool {
    stat(fd).is_ok_and(|st| matches!(st.st_mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFBLK))
}

/// `fstat` of descriptor `fd`.
fn stat(fd: RawFd) -> std::io::Result<libc::stat> {
    // SAFETY: fstat fills a plain struct for a descriptor we were given.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live, writable stat struct.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// The eventfd SIGTERM's handler kicks (see [`term_event`]).
static TERM_EVENT: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_term(_: libc::c_int) {
    let fd = TERM_EVENT.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: errno is this thread's; saved and restored around the write.
        let errno = unsafe { *libc::__errno_location() };
        super::shm::kick(fd);
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = errno };
    }
}

/// An eventfd that becomes readable when the process gets SIGTERM (its handler kicks it,
/// on whichever thread takes the signal), for the main loop to poll with the socket.
fn term_event() -> Result<RawFd, String> {
    use std::os::fd::IntoRawFd;
    let fd = super::shm::eventfd()?.into_raw_fd();
    TERM_EVENT.store(fd, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: installs a handler that only calls write(2) (async-signal-safe) on an eventfd.
    let ok = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_term as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut()) == 0
    };
    if !ok {
        return Err(format!("sigaction(SIGTERM): {}", std::io::Error::last_os_error()));
    }
    // The VMM starts a disk's backend with SIGTERM blocked (a death signal before the handler
    // was in place would have ended it without writing the ring): taken from here on.
    // SAFETY: plain signal-set manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    Ok(fd)
}

/// The backend process's main loop: takes its descriptors ([`FD_SOCKET`]...) and serves until
/// the VMM closes the socket (then `Ok`). A message that cannot be received is an error. The
/// device (tap or disk) is whatever descriptor [`FD_TAP`] is: the requests say which.
pub fn serve() -> Result<(), String> {
    // SAFETY: the VMM started this process with these descriptors open (see `client::spawn`);
    // borrowing them for the life of the process.
    let (mem_fd, progress_fd) = unsafe { (BorrowedFd::borrow_raw(FD_MEMORY), BorrowedFd::borrow_raw(FD_PROGRESS)) };
    let mem = Mapping::map(mem_fd).map_err(|e| format!("guest memory (fd {FD_MEMORY}): {e}"))?;
    let progress = Progress::new(Mapping::map(progress_fd).map_err(|e| format!("progress page (fd {FD_PROGRESS}): {e}"))?)?;
    // SAFETY: fcntl(F_GETFD) only checks that the descriptors are open.
    if unsafe { libc::fcntl(FD_TAP, libc::F_GETFD) } < 0 || unsafe { libc::fcntl(FD_SOCKET, libc::F_GETFD) } < 0 {
        return Err(format!("descriptors {FD_SOCKET} (socket) and {FD_TAP} (tap) must be open: started by a VMM?"));
    }
    let mut h = Handler::new(mem, FD_TAP, progress);
    // SAFETY: fcntl(F_GETFD) only checks that the descriptors are open.
    let open = |fd: RawFd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
    let kick_passed = open(FD_KICK);
    if kick_passed && open(FD_RING) {
        // SAFETY: as above, descriptor 7 is the ring memfd the VMM passed.
        let ring_fd = unsafe { BorrowedFd::borrow_raw(FD_RING) };
        let map = Mapping::map(ring_fd).map_err(|e| format!("ring (fd {FD_RING}): {e}"))?;
        h = if is_disk(FD_TAP) {
            h.with_write_ring(FrameRing::for_writes(map).map_err(|e| format!("write ring (fd {FD_RING}): {e}"))?)
        } else {
            h.with_ring(FrameRing::new(map).map_err(|e| format!("transmit ring (fd {FD_RING}): {e}"))?)
        };
    }
    // A disk's writes wait in the ring after the guest was told they are done: when the VMM
    // dies (its death signal to this process is SIGTERM then), they are written before exiting.
    let term = if h.disk_ring { Some(term_event()?) } else { None };
    if kick_passed && !h.disk_ring && open(FD_RX_RING) && open(FD_RX_EVENT) {
        // SAFETY: as above, descriptor 9 is the receive ring memfd the VMM passed.
        let ring_fd = unsafe { BorrowedFd::borrow_raw(FD_RX_RING) };
        let ring = FrameRing::new(Mapping::map(ring_fd).map_err(|e| format!("receive ring (fd {FD_RX_RING}): {e}"))?)?;
        h = h.with_rx_ring(ring, FD_RX_EVENT);
    }
    let ring_passed = h.ring.is_some() || h.rx.is_some();
    // Setup done: from here on only the system calls of `confine::ALLOWED`
    // (`VIGIL_BACKEND_SECCOMP=0` leaves the filter out, for debugging).
    if std::env::var_os("VIGIL_BACKEND_SECCOMP").is_none_or(|v| v != "0") {
        super::confine::confine()?;
    }
    let r = serve_loop(&mut h, ring_passed, term);
    // However the loop ended (the VMM gone, told to end, a reply that could not be sent, a
    // lie in the ring), a disk's writes the guest was told are done are written first.
    if h.disk_ring {
        if let Err(e) = h.drain_ring() {
            eprintln!("vigil backend: the write ring at exit: {e}");
        }
    }
    r
}

/// The main loop of [`serve`], until the VMM goes or the process is told to end.
fn serve_loop(h: &mut Handler, ring_passed: bool, term: Option<RawFd>) -> Result<(), String> {
    let mut buf = vec![0u8; MAX_MSG + 1];
    // The hello first, before any ring is touched (a VMM of another protocol lays them out
    // otherwise): the VMM sends it at once and waits for the answer.
    // SAFETY: receives at most `buf.len()` bytes into our own buffer (blocking).
    let n = unsafe { libc::recv(FD_SOCKET, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == 0 {
        return Ok(());
    }
    if n < 0 {
        return Err(format!("receiving the hello: {}", std::io::Error::last_os_error()));
    }
    let reply = h.handle(&buf[..n as usize]);
    // SAFETY: sends our own reply buffer on our socket.
    if unsafe { libc::send(FD_SOCKET, reply.as_ptr().cast(), reply.len(), libc::MSG_NOSIGNAL) } < 0 {
        return Err(format!("sending a reply: {}", std::io::Error::last_os_error()));
    }
    if !h.greeted {
        return Err(format!("the VMM's first message was no hello of ring protocol {}", wire::PROTOCOL));
    }
    loop {
        // Everything the VMM published goes out first: before any request is answered (so a
        // reply, a heartbeat's too, means the ring was drained up to when it was sent) and
        // before sleeping. Waiting frames are read into the receive ring.
        h.drain_ring()?;
        let room = h.fill_rx()?;
        if ring_passed {
            if let Some(ring) = &h.ring {
                if !ring.may_sleep(ring.tail()) {
                    continue;
                }
            }
            // The tap only while the receive ring has room for what it brings.
            let tap = if room { FD_TAP } else { -1 };
            let mut fds = [FD_SOCKET, FD_KICK, tap, term.unwrap_or(-1)].map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
            // SAFETY: `fds` is a live array of four pollfds (a negative fd is ignored); EINTR
            // just loops.
            unsafe { libc::poll(fds.as_mut_ptr(), 4, -1) };
            if let Some(ring) = &h.ring {
                ring.awake();
            }
            if fds[3].revents != 0 {
                h.drain_ring()?;
                return Ok(());
            }
            if fds[1].revents != 0 {
                super::shm::clear(FD_KICK);
            }
            if fds[0].revents == 0 {
                continue;
            }
            h.drain_ring()?;
        }
        // SAFETY: receives at most `buf.len()` bytes into our own buffer.
        let n = unsafe { libc::recv(FD_SOCKET, buf.as_mut_ptr().cast(), buf.len(), if ring_passed { libc::MSG_DONTWAIT } else { 0 }) };
        if n == 0 {
            // The VMM closed the socket (it ended, or died): what it published is written.
            h.drain_ring()?;
            return Ok(());
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted || e.kind() == std::io::ErrorKind::WouldBlock {
                continue;
            }
            // The VMM is gone (it died with a request of ours unread): nothing left to serve.
            if e.kind() == std::io::ErrorKind::ConnectionReset {
                h.drain_ring()?;
                return Ok(());
            }
            return Err(format!("receiving a request: {e}"));
        }
        let reply = h.handle(&buf[..n as usize]);
        // SAFETY: sends our own reply buffer on our socket.
        if unsafe { libc::send(FD_SOCKET, reply.as_ptr().cast(), reply.len(), libc::MSG_NOSIGNAL) } < 0 {
            return Err(format!("sending a reply: {}", std::io::Error::last_os_error()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::shm::{memfd, PROGRESS_BYTES};
    use std::os::fd::AsFd;

    fn handler(mem_size: u64) -> (Handler, Mapping, std::os::fd::OwnedFd, [RawFd; 2]) {
        let memfd_ = memfd(c"test-mem", mem_size).expect("memfd");
        let pfd = memfd(c"test-progress", PROGRESS_BYTES as u64).expect("memfd");
        let mut pair = [0; 2];
        // SAFETY: socketpair fills two descriptors.
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK, 0, pair.as_mut_ptr()) }, 0);
        let h = Handler::new(
            Mapping::map(memfd_.as_fd()).expect("map"),
            pair[0],
            Progress::new(Mapping::map(pfd.as_fd()).expect("map")).expect("progress"),
        );
        let mut h = h;
        let r = Reply::parse(&h.handle(&Request::Hello { seq: 0, version: wire::PROTOCOL }.encode())).expect("reply");
        assert_eq!(r.status, STATUS_OK, "{r:?}");
        let view = Mapping::map(memfd_.as_fd()).expect("map");
        (h, view, memfd_, pair)
    }

    /// Nothing is served before a hello, nor after a hello of another protocol (a VMM of
    /// another build): each is refused with the versions, and no ring is read or written.
    #[test]
    fn only_a_vmm_of_the_same_protocol_is_served() {
        let (h, _view, _fd, _pair) = handler(1 << 20);
        let ring_fd = memfd(c"test-ring", crate::backend::shm::RING_BYTES as u64).expect("memfd");
        let ring = FrameRing::new(Mapping::map(ring_fd.as_fd()).expect("map")).expect("ring");
        let vmm_side = FrameRing::new(Mapping::map(ring_fd.as_fd()).expect("map")).expect("ring");
        let mut h = Handler { greeted: false, ..h.with_ring(ring) };
        // An entry published in the transmit ring stays there until the hello.
        vmm_side.set_head(1);
        assert_eq!(h.drain_ring(), Ok(0));
        assert_eq!(h.fill_rx(), Ok(false));
        assert_eq!(vmm_side.tail(), 0, "the ring was read before the hello");
        vmm_side.set_head(0);
        let ping = Request::Ping { seq: 1 }.encode();
        let r = Reply::parse(&h.handle(&ping)).expect("reply");
        assert_eq!(r.status, STATUS_REFUSED);
        assert!(r.reason.contains("before the hello"), "{r:?}");
        let r = Reply::parse(&h.handle(&Request::Hello { seq: 2, version: wire::PROTOCOL + 1 }.encode())).expect("reply");
        assert_eq!(r.status, STATUS_REFUSED);
        assert!(r.reason.contains(&format!("protocol {}", wire::PROTOCOL + 1)), "{r:?}");
        assert_eq!(Reply::parse(&h.handle(&ping)).expect("reply").status, STATUS_REFUSED, "still not greeted");
        // A hello cut short is refused too.
        let mut short = Request::Hello { seq: 3, version: wire::PROTOCOL }.encode();
        short.truncate(18);
        short[12..16].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(Reply::parse(&h.handle(&short)).expect("reply").status, STATUS_REFUSED);
        assert_eq!(Reply::parse(&h.handle(&Request::Hello { seq: 4, version: wire::PROTOCOL }.encode())).expect("reply").status, STATUS_OK);
        assert_eq!(Reply::parse(&h.handle(&ping)).expect("reply").status, STATUS_OK);
    }

    #[test]
    fn frames_go_out_and_come_in_through_guest_memory() {
        let (mut h, view, _fd, pair) = handler(1 << 20);
        view.write(0x1000, &[0xab; 60]).expect("write");
        let r = Reply::parse(&h.handle(&Request::Tx { seq: 1, frames: vec![(0x1000, 60), (0x1000, 14)] }.encode())).expect("reply");
        assert_eq!((r.status, r.done), (STATUS_OK, 2));
        let mut got = [0u8; 100];
        // SAFETY: reads into our own buffer.
        assert_eq!(unsafe { libc::read(pair[1], got.as_mut_ptr().cast(), 100) }, 60);
        // The peer writes two frames; the backend puts them in guest buffers.
        for n in [42usize, 1514] {
            // SAFETY: writes our own buffer.
            unsafe { libc::write(pair[1], vec![n as u8; n].as_ptr().cast(), n) };
        }
        let r = Reply::parse(&h.handle(&Request::Rx { seq: 2, bufs: vec![(0x4000, 2048), (0x8000, 2048), (0xc000, 2048)] }.encode()))
            .expect("reply");
        assert_eq!((r.status, r.done), (STATUS_OK, 2));
        assert_eq!(h.progress.of(2, 3), vec![42, 1514]);
        let mut b = [0u8; 42];
        view.read(0x4000, &mut b).expect("read");
        assert_eq!(b, [42u8; 42]);
        // SAFETY: closing the test's own descriptors.
        unsafe {
            libc::close(pair[0]);
            libc::close(pair[1]);
        }
    }

    /// The block write ring: entries go to the disk in order; an entry whose length is not
    /// whole sectors (the ring's memory scribbled on), or whose sectors lie past the disk, is
    /// counted as a failed write and skipped; impossible counters are an error, never a panic.
    #[test]
    fn the_write_ring_is_written_in_order_and_garbage_in_it_is_refused() {
        use crate::backend::shm::{FrameRing, WRITE_RING_BYTES, WRITE_SLOT};
        let dir = std::env::temp_dir().join(format!("vigil-serve-write-ring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let disk = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.join("disk")).expect("disk");
        disk.set_len(64 * 512).expect("size");
        let (h, _view, _fd, pair) = handler(64 << 10);
        let h = Handler { tap: std::os::fd::AsRawFd::as_raw_fd(&disk), ..h };
        let rfd = memfd(c"test-write-ring", WRITE_RING_BYTES as u64).expect("memfd");
        let mut h = h.with_write_ring(FrameRing::for_writes(Mapping::map(rfd.as_fd()).expect("map")).expect("ring"));
        let vmm = FrameRing::for_writes(Mapping::map(rfd.as_fd()).expect("map")).expect("ring");
        vmm.put_write(0, 0, &[1; 1024]).expect("put");
        vmm.put_write(1, 2, &[2; 512]).expect("put");
        vmm.put_write(2, 10, &[3; 512]).expect("put");
        vmm.put_write(3, 63, &[4; 1024]).expect("put past the end");
        vmm.put_write(4, 1, &[5; 512]).expect("put");
        assert!(vmm.put_write(5, 0, &[0; 100]).is_err(), "not whole sectors");
        assert!(vmm.put_write(5, 0, &vec![0; WRITE_SLOT]).is_err(), "larger than a slot");
        // Entry 2's length scribbled over: 700 bytes.
        vmm.scribble(4096 + 2 * WRITE_SLOT as u64, &700u32.to_le_bytes());
        assert!(!vmm.publish(5));
        assert_eq!(h.drain_ring(), Ok(3));
        assert_eq!((vmm.tail(), vmm.failed()), (5, 2));
        let bytes = std::fs::read(dir.join("disk")).expect("read");
        assert!(bytes[..512].iter().all(|&b| b == 1) && bytes[512..1024].iter().all(|&b| b == 5), "the later write over the earlier");
        assert!(bytes[1024..1536].iter().all(|&b| b == 2) && bytes[10 * 512..11 * 512].iter().all(|&b| b == 0));
        vmm.set_tail(9);
        assert!(h.drain_ring().is_err(), "a tail past the head");
        // SAFETY: closing the test's own descriptors.
        unsafe {
            libc::close(pair[0]);
            libc::close(pair[1]);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The transmit ring: frames go out in order; a slot whose length is not a frame's (the
    /// ring's memory scribbled on) is skipped, and impossible counters are an error, never a
    /// panic or a read outside the ring.
    #[test]
    fn the_ring_is_drained_in_order_and_garbage_in_it_is_refused() {
        use crate::backend::shm::{FrameRing, RING_BYTES};
        let (h, _view, _fd, pair) = handler(64 << 10);
        let rfd = memfd(c"test-ring", RING_BYTES as u64).expect("memfd");
        let mut h = h.with_ring(FrameRing::new(Mapping::map(rfd.as_fd()).expect("map")).expect("ring"));
        let vmm = FrameRing::new(Mapping::map(rfd.as_fd()).expect("map")).expect("ring");
        for i in 0..5u8 {
            vmm.put(i as u64, &[i; 60]).expect("put");
        }
        // Entry 2's length scribbled over: 70,000 bytes.
        vmm.scribble(4096 + 2 * 2048, &70_000u32.to_le_bytes());
        assert!(!vmm.publish(5));
        assert_eq!(h.drain_ring(), Ok(4));
        assert_eq!((vmm.tail(), h.tx_dropped), (5, 1));
        let mut got = vec![];
        let mut b = [0u8; 100];
        // SAFETY: reads into our own buffer from the test's non-blocking socket.
        while unsafe { libc::read(pair[1], b.as_mut_ptr().cast(), 100) } == 60 {
            got.push(b[0]);
        }
        assert_eq!(got, [0, 1, 3, 4]);
        // Nothing published past the tail: the backend may sleep.
        assert!(vmm.may_sleep(5));
        assert!(vmm.publish(5), "a sleeping backend is kicked");
        vmm.awake();
        // A head far past the tail, or behind it.
        for (head, tail) in [(5 + 10_000, 5), (3, 5), (u64::MAX, 0)] {
            vmm.set_tail(tail);
            vmm.publish(head);
            assert!(h.drain_ring().is_err_and(|e| e.contains("transmit ring")), "head {head} tail {tail}");
        }
        // SAFETY: closing the test's own descriptors.
        unsafe {
            libc::close(pair[0]);
            libc::close(pair[1]);
        }
    }

    /// Requests naming memory past the guest's, and random bytes, are refused, never a panic.
    #[test]
    fn hostile_requests_are_refused() {
        let (mut h, _view, _fd, pair) = handler(64 << 10);
        for req in [
            Request::Tx { seq: 1, frames: vec![(u64::MAX - 10, 60)] },
            Request::Tx { seq: 1, frames: vec![(64 << 10, 14)] },
            Request::Rx { seq: 2, bufs: vec![((64 << 10) - 100, 2048)] },
        ] {
            let r = Reply::parse(&h.handle(&req.encode())).expect("reply");
            assert_eq!(r.status, STATUS_REFUSED, "{req:?}");
            assert!(r.reason.contains("outside guest memory"), "{}", r.reason);
        }
        let mut x: u64 = 0x1234_5678;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 120) as usize;
            let mut m: Vec<u8> = (0..len).map(|i| (x >> (i % 8)) as u8).collect();
            if m.len() >= 4 {
                m[0] = (x % 6) as u8;
                m[1..4].fill(0);
            }
            let r = Reply::parse(&h.handle(&m)).expect("a reply for anything");
            assert!(r.status == STATUS_OK || !r.reason.is_empty());
        }
        // SAFETY: closing the test's own descriptors.
        unsafe {
            libc::close(pair[0]);
            libc::close(pair[1]);
        }
    }
}
