//! The backend process's side: serves one VMM's network requests on the tap, reaching guest
//! memory through its memfd. Started by the VMM with its descriptors at fixed numbers.

use super::shm::{Mapping, Progress};
use super::wire::{self, Reply, Request, MAX_MSG, STATUS_OK, STATUS_REFUSED};
use std::os::fd::{BorrowedFd, RawFd};
use vmm_abi::FRAME_MAX;

/// The request socket (`SOCK_SEQPACKET`).
pub const FD_SOCKET: RawFd = 3;
/// Guest memory (memfd).
pub const FD_MEMORY: RawFd = 4;
/// The tap device.
pub const FD_TAP: RawFd = 5;
/// The progress page (memfd).
pub const FD_PROGRESS: RawFd = 6;

/// Serves one request at a time.
pub struct Handler {
    mem: Mapping,
    tap: RawFd,
    progress: Progress,
    /// Frames from the tap larger than [`FRAME_MAX`], dropped.
    pub dropped: u64,
}

impl Handler {
    pub fn new(mem: Mapping, tap: RawFd, progress: Progress) -> Handler {
        Handler { mem, tap, progress, dropped: 0 }
    }

    /// Serves one message and returns the reply's bytes; a malformed message (or one naming
    /// memory outside the guest's) is refused with its reason, never a panic.
    pub fn handle(&mut self, msg: &[u8]) -> Vec<u8> {
        let (op, seq) = (
            msg.get(0..4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            msg.get(4..8).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        let (done, status, reason) = match Request::parse(msg).and_then(|r| self.serve(r)) {
            Ok(done) => (done, STATUS_OK, String::new()),
            Err(reason) => (0, STATUS_REFUSED, reason),
        };
        Reply { op, seq, done, status, reason }.encode()
    }

    fn serve(&mut self, req: Request) -> Result<u32, String> {
        let seq = req.seq();
        match req {
            Request::Ping { .. } => Ok(0),
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

/// The backend process's main loop: takes its descriptors ([`FD_SOCKET`]...) and serves until
/// the VMM closes the socket (then `Ok`). A message that cannot be received is an error.
pub fn serve_net() -> Result<(), String> {
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
    let mut buf = vec![0u8; MAX_MSG + 1];
    loop {
        // SAFETY: receives at most `buf.len()` bytes into our own buffer.
        let n = unsafe { libc::recv(FD_SOCKET, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n == 0 {
            return Ok(());
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
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
        let view = Mapping::map(memfd_.as_fd()).expect("map");
        (h, view, memfd_, pair)
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
