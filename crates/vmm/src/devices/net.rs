//! The network device: Ethernet frames between the guest and a host tap device. The host I/O
//! is done here, or by a backend process of the VM's own when one is attached
//! ([`Tap::attach_backend`], [`crate::backend`]); the port handling, checks and held output stay
//! here either way.

use crate::memory::GuestMem;
use crate::{Error, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use vmm_abi::{NetBuf, NetRequest, FRAME_MAX, FRAME_MIN, NET_MAX_BUFS};

/// A tap device (layer 2, no packet-information header), non-blocking.
///
/// Output can be held back (for checkpoint replication: a client must never see output of
/// state the backup could not reproduce): while holding, transmitted frames collect in the
/// current epoch; [`Tap::seal`] closes an epoch and [`Tap::release`] sends the frames of
/// every sealed epoch up to a given one.
pub struct Tap {
    fd: OwnedFd,
    name: String,
    /// Frames dropped because the host sent something larger than a guest buffer.
    pub dropped: u64,
    hold: bool,
    held: Held,
    /// Called (on the vCPU thread) for the first frame held in each epoch: a replication
    /// driver learns at once that output is waiting.
    output_hook: Option<Box<dyn Fn() + Send>>,
    hook_armed: bool,
    /// The backend process doing the tap I/O, if any.
    backend: Option<crate::backend::Backend>,
    /// When frames went in and out at this device ([`FrameStamps`]).
    stamps: FrameStamps,
    /// Where a copy of every frame given to the guest goes, tagged with the open epoch (a
    /// protected VM's primary forwards them to its backup: [`InputLog`]).
    input_log: Option<InputLog>,
    /// Frames to give the guest before any from the host (a backup that took over gives the
    /// new copy the input the old primary received after the last checkpoint).
    pending: std::collections::VecDeque<Vec<u8>>,
}

/// Whether network devices timestamp their frames ([`FrameStamps`]); on unless the process
/// clears it (`VIGIL_FRAME_STAMPS=0` when a tap is opened, or a benchmark comparing).
pub static FRAME_STAMPS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Batches of frames kept before the oldest are dropped (counted as lost): 4 s of one batch
/// a millisecond each way, read four times a second by the agent's monitor.
pub const STAMP_CAPACITY: usize = 8192;

/// Timestamps of the frames that go in and out at a VM's network device, for monitoring
/// (arrivals per input stream, device-level latency): one host clock read (`CLOCK_MONOTONIC`)
/// per batch of frames moved by one guest request — at an exit the guest makes anyway, so no
/// exit is added and a burst of frames costs one read. Read (and emptied) by the VMM's `trace`
/// command.
#[derive(Debug, Default)]
pub struct FrameStamps {
    batches: std::collections::VecDeque<crate::control::FrameBatch>,
    lost: u64,
}

impl FrameStamps {
    fn stamp(&mut self, output: bool, frames: u32) {
        if frames == 0 || !FRAME_STAMPS.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if self.batches.len() == STAMP_CAPACITY {
            self.batches.pop_front();
            self.lost += 1;
        }
        self.batches.push_back(crate::control::FrameBatch { output, at_ns: monotonic_ns(), frames });
    }
}

/// The host's monotonic clock (ns).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime(2) writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Most bytes of input frames an [`InputLog`] keeps; beyond it the oldest are dropped (they
/// only spare a client a retransmission).
pub const INPUT_LOG_LIMIT: usize = 4 << 20;

/// The frames the guest received, each with the epoch it arrived in, on their way from the
/// vCPU thread to a replication driver. Lossy and bounded ([`INPUT_LOG_LIMIT`]): a frame
/// that does not reach the backup only costs a client a retransmission after a takeover.
#[derive(Clone, Default)]
pub struct InputLog(std::sync::Arc<std::sync::Mutex<InputQueue>>);

#[derive(Default)]
struct InputQueue {
    frames: std::collections::VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
    /// Called when a frame arrives in an empty log (the driver's sender sends at once).
    notify: Option<Box<dyn Fn() + Send>>,
}

impl std::fmt::Debug for InputLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InputLog")
    }
}

impl InputLog {
    fn push(&self, epoch: u64, frame: &[u8]) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let was_empty = g.frames.is_empty();
        g.bytes += frame.len();
        g.frames.push_back((epoch, frame.to_vec()));
        while g.bytes > INPUT_LOG_LIMIT {
            let Some((_, f)) = g.frames.pop_front() else { break };
            g.bytes -= f.len();
        }
        if was_empty {
            if let Some(n) = &g.notify {
                n();
            }
        }
    }

    /// Takes every frame logged so far, oldest first.
    pub fn take(&self) -> Vec<(u64, Vec<u8>)> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.bytes = 0;
        g.frames.drain(..).collect()
    }

    /// Sets what is called when a frame arrives in an empty log.
    pub fn set_notify(&self, notify: Option<Box<dyn Fn() + Send>>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).notify = notify;
    }
}

/// Most bytes of memory that held-back output takes at once (frames and their per-frame
/// overhead: frames are packed into [`HOLD_CHUNK`]-byte chunks, and every chunk counts
/// whole); beyond it frames are dropped (TCP resends them).
pub const HOLD_LIMIT: usize = 64 << 20;

/// Size of one chunk of held frames: each frame takes 2 bytes of length and its bytes.
pub const HOLD_CHUNK: usize = 64 << 10;

/// The frames of one output epoch, packed into chunks (`[len: u16 LE][frame]`...), so that
/// many small frames cost their bytes, not an allocation each.
#[derive(Default)]
struct EpochFrames {
    chunks: Vec<Vec<u8>>,
    frames: u64,
    bytes: u64,
}

impl EpochFrames {
    fn frames(&self) -> impl Iterator<Item = &[u8]> {
        self.chunks.iter().flat_map(|c| {
            let mut rest = &c[..];
            std::iter::from_fn(move || {
                let (len, tail) = rest.split_at_checked(2)?;
                let n = u16::from_le_bytes([len[0], len[1]]) as usize;
                let (frame, tail) = tail.split_at_checked(n)?;
                rest = tail;
                Some(frame)
            })
        })
    }
}

/// Output held back by epoch (see [`Tap`]), its memory bounded by [`HOLD_LIMIT`].
pub(crate) struct Held {
    current: EpochFrames,
    sealed: std::collections::VecDeque<(u64, EpochFrames)>,
    next_epoch: u64,
    /// Bytes of chunks allocated (sealed or not).
    bytes: usize,
    limit: usize,
    /// Frames dropped because the limit was reached.
    pub dropped: u64,
}

impl Held {
    pub(crate) fn new(limit: usize) -> Held {
        Held { current: EpochFrames::default(), sealed: Default::default(), next_epoch: 1, bytes: 0, limit, dropped: 0 }
    }

    /// Holds `frame` (at most 65535 bytes) in the open epoch; false (and counted) when the
    /// limit leaves no room.
    pub(crate) fn push(&mut self, frame: &[u8]) -> bool {
        let need = 2 + frame.len();
        let Ok(len) = u16::try_from(frame.len()) else {
            self.dropped += 1;
            return false;
        };
        if self.current.chunks.last().is_none_or(|c| c.len() + need > HOLD_CHUNK) {
            if self.bytes + HOLD_CHUNK > self.limit {
                self.dropped += 1;
                return false;
            }
            self.current.chunks.push(Vec::with_capacity(HOLD_CHUNK));
            self.bytes += HOLD_CHUNK;
        }
        let Some(chunk) = self.current.chunks.last_mut() else { return false };
        chunk.extend_from_slice(&len.to_le_bytes());
        chunk.extend_from_slice(frame);
        self.current.frames += 1;
        self.current.bytes += frame.len() as u64;
        true
    }

    /// Closes the open epoch: its number, frames and bytes.
    pub(crate) fn seal(&mut self) -> (u64, u64, u64) {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let e = std::mem::take(&mut self.current);
        let counts = (epoch, e.frames, e.bytes);
        self.sealed.push_back((epoch, e));
        counts
    }

    /// Hands the frames of every sealed epoch up to `epoch` to `send`, frees them, and returns
    /// how many there were.
    pub(crate) fn release(&mut self, epoch: u64, mut send: impl FnMut(&[u8])) -> usize {
        let mut sent = 0;
        while self.sealed.front().is_some_and(|(e, _)| *e <= epoch) {
            let Some((_, frames)) = self.sealed.pop_front() else { break };
            for f in frames.frames() {
                send(f);
                sent += 1;
            }
            self.bytes -= frames.chunks.len() * HOLD_CHUNK;
        }
        sent
    }

    fn frames(&self) -> usize {
        (self.current.frames + self.sealed.iter().map(|(_, f)| f.frames).sum::<u64>()) as usize
    }
}

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Opens (or creates) the tap device `name` through /dev/net/tun.
    pub fn open(name: &str) -> Result<Self> {
        let err = |reason: String| Error::Tap { name: name.to_owned(), reason };
        if name.is_empty() || name.len() >= 16 || name.contains('/') {
            return Err(err("interface names have 1 to 15 characters".into()));
        }
        // SAFETY: a plain open(2) of a constant NUL-terminated path.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(err(format!("cannot open /dev/net/tun: {}", std::io::Error::last_os_error())));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq { name: [0; 16], flags: IFF_TAP | IFF_NO_PI, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` has the layout of.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) };
        if r < 0 {
            return Err(err(format!("TUNSETIFF: {}", std::io::Error::last_os_error())));
        }
        Ok(Tap {
            fd,
            name: name.to_owned(),
            dropped: 0,
            hold: false,
            held: Held::new(HOLD_LIMIT),
            output_hook: None,
            hook_armed: true,
            backend: None,
            input_log: None,
            pending: Default::default(),
            stamps: FrameStamps::default(),
        }
        .stamping_from_env())
    }

    fn stamping_from_env(self) -> Self {
        if std::env::var_os("VIGIL_FRAME_STAMPS").is_some_and(|v| v == "0") {
            FRAME_STAMPS.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        self
    }

    /// The frame batches stamped since the last call, oldest first, and how many were dropped
    /// unread.
    pub fn take_stamps(&mut self) -> (Vec<crate::control::FrameBatch>, u64) {
        let lost = std::mem::take(&mut self.stamps.lost);
        (self.stamps.batches.drain(..).collect(), lost)
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// File descriptor (for poll).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Handles a transmit request at `addr`: sends each buffer as one frame.
    pub fn transmit(&mut self, mem: &mut GuestMem, addr: u64) -> Result<(), String> {
        let done = self.transmit_frames(mem, addr)?;
        self.stamps.stamp(true, done);
        Ok(())
    }

    fn transmit_frames(&mut self, mem: &mut GuestMem, addr: u64) -> Result<u32, String> {
        let req: NetRequest = mem.read_obj(addr)?;
        let bufs = read_bufs(mem, &req)?;
        let mut frame = [0u8; FRAME_MAX as usize];
        let mut done = 0;
        for (i, b) in bufs.iter().enumerate() {
            if !(FRAME_MIN..=FRAME_MAX).contains(&b.len) {
                return Err(format!("transmit buffer {i}: frame of {} bytes (must be {FRAME_MIN}..={FRAME_MAX})", b.len));
            }
            if let (Some(backend), false) = (&self.backend, self.hold) {
                mem.check(b.addr, b.len as u64).map_err(|e| format!("transmit buffer {i}: {e}"))?;
                if backend.has_ring() {
                    // Copied into the transmit ring: the vCPU goes on, the backend sends it.
                    let f = &mut frame[..b.len as usize];
                    mem.read(b.addr, f).map_err(|e| format!("transmit buffer {i}: {e}"))?;
                    if !backend.push(f) {
                        break;
                    }
                    done += 1;
                    continue;
                }
                if i + 1 == bufs.len() {
                    // All checked: the backend copies them from guest memory to the tap.
                    let frames: Vec<(u64, u32)> = bufs.iter().map(|b| (b.addr, b.len)).collect();
                    done = backend.tx(&frames);
                }
                continue;
            }
            let f = &mut frame[..b.len as usize];
            mem.read(b.addr, f).map_err(|e| format!("transmit buffer {i}: {e}"))?;
            if self.hold {
                if self.hook_armed {
                    self.hook_armed = false;
                    if let Some(hook) = &self.output_hook {
                        hook();
                    }
                }
                // Beyond the limit the frame is dropped, like a frame lost on a wire.
                self.held.push(f);
                done += 1;
                continue;
            }
            // SAFETY: writes `f.len()` initialised bytes from a live buffer to our own fd.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), f.as_ptr().cast(), f.len()) };
            if n < 0 {
                // Full queue or link down: the frame is lost, as on a real wire.
                break;
            }
            done += 1;
        }
        if let (Some(backend), false) = (&self.backend, self.hold) {
            backend.publish();
        }
        mem.write_obj(addr, &NetRequest { done, ..req })?;
        Ok(done)
    }

    /// Handles a receive request at `addr`: fills buffers with waiting frames.
    pub fn receive(&mut self, mem: &mut GuestMem, addr: u64) -> Result<(), String> {
        let done = self.receive_frames(mem, addr)?;
        self.stamps.stamp(false, done);
        Ok(())
    }

    fn receive_frames(&mut self, mem: &mut GuestMem, addr: u64) -> Result<u32, String> {
        let req: NetRequest = mem.read_obj(addr)?;
        let mut bufs = read_bufs(mem, &req)?;
        if !self.pending.is_empty() {
            let mut done = 0u32;
            for (i, b) in bufs.iter_mut().enumerate() {
                if b.len < FRAME_MAX {
                    return Err(format!("receive buffer {i}: capacity {} is below {FRAME_MAX}", b.len));
                }
                let Some(f) = self.pending.pop_front() else { break };
                mem.write(b.addr, &f)?;
                b.len = f.len() as u32;
                self.log_input(&f);
                done += 1;
            }
            return finish(mem, addr, req, &bufs[..done as usize], done);
        }
        if let Some(backend) = &self.backend {
            for (i, b) in bufs.iter().enumerate() {
                if b.len < FRAME_MAX {
                    return Err(format!("receive buffer {i}: capacity {} is below {FRAME_MAX}", b.len));
                }
                mem.check(b.addr, b.len as u64).map_err(|e| format!("receive buffer {i}: {e}"))?;
            }
            if backend.has_rx_ring() {
                // The backend read the frames ahead into the receive ring: the VMM copies them
                // into the guest's buffers itself, so `mem.write` marks the pages written.
                let mut slot = [0u8; crate::backend::shm::RING_SLOT];
                let mut done = 0;
                for b in bufs.iter_mut() {
                    let Some(n) = backend.rx_take(&mut slot) else { break };
                    mem.write(b.addr, &slot[..n])?;
                    b.len = n as u32;
                    if let Some(log) = &self.input_log {
                        log.push(self.held.next_epoch, &slot[..n]);
                    }
                    done += 1;
                }
                backend.rx_done();
                return finish(mem, addr, req, &bufs[..done], done as u32);
            }
            // Nothing waiting (the VMM polls the tap it shares with the backend): no round trip.
            if !self.readable() {
                return finish(mem, addr, req, &[], 0);
            }
            let lens = backend.rx(&bufs.iter().map(|b| (b.addr, b.len)).collect::<Vec<_>>());
            // The backend may have written (a frame of at most FRAME_MAX bytes) into any buffer
            // it was given: all of them go into the dirty bitmap, for replication.
            for b in &bufs {
                mem.mark_written(b.addr, FRAME_MAX as u64);
            }
            let done = lens.len().min(bufs.len());
            for (b, l) in bufs.iter_mut().zip(&lens) {
                b.len = *l;
            }
            if let Some(log) = &self.input_log {
                let epoch = self.held.next_epoch;
                for b in &bufs[..done] {
                    let mut f = vec![0u8; b.len as usize];
                    if mem.read(b.addr, &mut f).is_ok() {
                        log.push(epoch, &f);
                    }
                }
            }
            return finish(mem, addr, req, &bufs[..done], done as u32);
        }
        let mut frame = [0u8; 65536];
        let mut done = 0u32;
        for (i, b) in bufs.iter_mut().enumerate() {
            if b.len < FRAME_MAX {
                return Err(format!("receive buffer {i}: capacity {} is below {FRAME_MAX}", b.len));
            }
            mem.check(b.addr, b.len as u64).map_err(|e| format!("receive buffer {i}: {e}"))?;
            loop {
                // SAFETY: reads into our own stack buffer of the given length.
                let n = unsafe { libc::read(self.fd.as_raw_fd(), frame.as_mut_ptr().cast(), frame.len()) };
                if n <= 0 {
                    return finish(mem, addr, req, &bufs[..done as usize], done);
                }
                let n = n as usize;
                if n > FRAME_MAX as usize {
                    self.dropped += 1;
                    continue;
                }
                mem.write(b.addr, &frame[..n])?;
                b.len = n as u32;
                if let Some(log) = &self.input_log {
                    log.push(self.held.next_epoch, &frame[..n]);
                }
                done += 1;
                break;
            }
        }
        finish(mem, addr, req, &bufs, done)
    }

    fn log_input(&self, frame: &[u8]) {
        if let Some(log) = &self.input_log {
            log.push(self.held.next_epoch, frame);
        }
    }

    /// Reads every frame waiting at the tap into the input log (none without a log); returns
    /// how many. For a VM paused for good: its guest will never read them.
    pub fn drain_to_log(&mut self) -> u64 {
        let Some(log) = self.input_log.clone() else { return 0 };
        let mut frame = [0u8; 65536];
        let mut n = 0;
        if let Some(backend) = self.backend.as_ref().filter(|b| b.has_rx_ring()) {
            let mut slot = [0u8; crate::backend::shm::RING_SLOT];
            while let Some(len) = backend.rx_take(&mut slot) {
                log.push(self.held.next_epoch, &slot[..len]);
                n += 1;
            }
            backend.rx_done();
        }
        loop {
            // SAFETY: reads into our own stack buffer of the given length.
            let r = unsafe { libc::read(self.fd.as_raw_fd(), frame.as_mut_ptr().cast(), frame.len()) };
            if r <= 0 {
                return n;
            }
            if r as usize <= FRAME_MAX as usize {
                log.push(self.held.next_epoch, &frame[..r as usize]);
                n += 1;
            }
        }
    }

    /// Whether injected frames wait for the guest.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Logs a copy of every frame given to the guest from now on (`None`: stops).
    pub fn set_input_log(&mut self, log: Option<InputLog>) {
        self.input_log = log;
    }

    /// Gives the guest `frames` (each a 4-byte LE length and its bytes, at most [`FRAME_MAX`]
    /// each) before anything from the host; returns how many.
    pub fn inject(&mut self, mut frames: &[u8]) -> usize {
        let mut n = 0;
        while frames.len() >= 4 {
            let len = u32::from_le_bytes([frames[0], frames[1], frames[2], frames[3]]) as usize;
            let Some(f) = frames.get(4..4 + len) else { break };
            if (1..=FRAME_MAX as usize).contains(&len) {
                self.pending.push_back(f.to_vec());
                n += 1;
            }
            frames = &frames[4 + len..];
        }
        n
    }

    /// Starts holding output back.
    pub fn hold(&mut self) {
        self.hold = true;
        self.hook_armed = true;
    }

    /// Closes the current epoch of held output and returns its number (1, 2, ...).
    pub fn seal(&mut self) -> u64 {
        self.seal_counted().0
    }

    /// Closes the current epoch as [`Tap::seal`] does and also returns how many frames and
    /// bytes it holds.
    pub fn seal_counted(&mut self) -> (u64, u64, u64) {
        self.hook_armed = true;
        self.held.seal()
    }

    /// Closes the current epoch as [`Tap::seal_counted`] does and also returns a copy of its
    /// frames, each as a 4-byte little-endian length and its bytes (what a backup keeps to
    /// send again after a takeover: [`Tap::send_frames`]).
    pub fn seal_copied(&mut self) -> (u64, u64, u64, Vec<u8>) {
        let current = &self.held.current;
        let mut copy = Vec::with_capacity((current.bytes + 4 * current.frames) as usize);
        for f in current.frames() {
            copy.extend_from_slice(&(f.len() as u32).to_le_bytes());
            copy.extend_from_slice(f);
        }
        let (epoch, frames, bytes) = self.seal_counted();
        (epoch, frames, bytes, copy)
    }

    /// Sends frames encoded as [`Tap::seal_copied`] returns them, at once (bypassing any
    /// hold); returns how many. An encoding that does not parse sends nothing past the fault.
    pub fn send_frames(&self, mut frames: &[u8]) -> Result<usize> {
        let mut sent = 0;
        while frames.len() >= 4 {
            let n = u32::from_le_bytes([frames[0], frames[1], frames[2], frames[3]]) as usize;
            let Some(f) = frames.get(4..4 + n) else { break };
            self.send_frame(f)?;
            sent += 1;
            frames = &frames[4 + n..];
        }
        Ok(sent)
    }

    /// The number the epoch being filled now will get when it is sealed.
    pub fn open_epoch(&self) -> u64 {
        self.held.next_epoch
    }

    /// Makes the epoch being filled now number `epoch`, if that is higher than its number
    /// (so that output epochs line up with checkpoint epochs).
    pub fn raise_open_epoch(&mut self, epoch: u64) {
        self.held.next_epoch = self.held.next_epoch.max(epoch);
    }

    /// Frames dropped because more than [`HOLD_LIMIT`] bytes were held.
    pub fn hold_dropped(&self) -> u64 {
        self.held.dropped
    }

    /// Whether output is being held.
    pub fn holding(&self) -> bool {
        self.hold
    }

    /// Writes one frame from the VMM itself (not the guest) to the tap at once, bypassing any
    /// hold (announcements after a takeover).
    pub fn send_frame(&self, frame: &[u8]) -> Result<()> {
        if let Some(backend) = self.backend.as_ref().filter(|b| b.has_ring()) {
            let queued = (FRAME_MIN as usize..=FRAME_MAX as usize).contains(&frame.len()) && backend.push(frame);
            backend.publish();
            if !queued {
                return Err(Error::Tap {
                    name: self.name.clone(),
                    reason: format!("the backend could not take a frame of {} bytes", frame.len()),
                });
            }
            return Ok(());
        }
        if let Some(backend) = &self.backend {
            let mut p = Vec::with_capacity(frame.len() + 2);
            if let Ok(n) = u16::try_from(frame.len()) {
                p.extend_from_slice(&n.to_le_bytes());
                p.extend_from_slice(frame);
            }
            if backend.send(&p) != 1 {
                return Err(Error::Tap {
                    name: self.name.clone(),
                    reason: format!("the backend could not send a frame of {} bytes", frame.len()),
                });
            }
            return Ok(());
        }
        // SAFETY: writes `frame.len()` initialised bytes from a live buffer to our own fd.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n != frame.len() as isize {
            return Err(Error::Tap {
                name: self.name.clone(),
                reason: format!("cannot send a frame: {}", std::io::Error::last_os_error()),
            });
        }
        Ok(())
    }

    /// Sends the held frames of every sealed epoch up to `epoch`; returns how many.
    pub fn release(&mut self, epoch: u64) -> usize {
        if let Some(backend) = self.backend.as_ref().filter(|b| b.has_ring()) {
            // Only now, the backup having acknowledged the epoch, do these frames reach the
            // backend: through the ring, in order with everything transmitted after them.
            let n = self.held.release(epoch, |f| {
                backend.push(f);
            });
            backend.publish();
            return n;
        }
        if let Some(backend) = &self.backend {
            let mut batch = Batch::new(backend);
            let n = self.held.release(epoch, |f| batch.push(f));
            batch.flush();
            return n;
        }
        let fd = self.fd.as_raw_fd();
        self.held.release(epoch, |f| {
            // SAFETY: writes `f.len()` initialised bytes from a live buffer to our own fd.
            unsafe { libc::write(fd, f.as_ptr().cast(), f.len()) };
        })
    }

    /// Stops holding: seals and releases everything held.
    pub fn unhold(&mut self) -> usize {
        let e = self.seal();
        self.hold = false;
        self.release(e)
    }

    /// Sets the function called for the first frame held in each epoch.
    pub fn set_output_hook(&mut self, hook: Option<Box<dyn Fn() + Send>>) {
        self.output_hook = hook;
        self.hook_armed = true;
    }

    /// Frames held back (sealed or not).
    pub fn held_frames(&self) -> usize {
        self.held.frames()
    }

    /// Hands the tap's I/O to a backend process started from `program`, on guest memory
    /// `mem` (which must be shared: [`GuestMem::new_shared`]).
    pub fn attach_backend(&mut self, mem: &GuestMem, program: &crate::backend::BackendProgram) -> Result<()> {
        let err = |reason: String| Error::Tap { name: self.name.clone(), reason };
        let memfd = mem.memfd().ok_or_else(|| err("a network backend process needs shared guest memory".into()))?;
        let mut program = program.clone();
        if std::env::var_os("VIGIL_NET_TX_RING").is_some_and(|v| v == "0") {
            program.sync_tx = true;
        }
        let backend = crate::backend::Backend::start(crate::backend::Device::Net, &program, memfd, std::os::fd::AsFd::as_fd(&self.fd))
            .map_err(|e| err(format!("network backend: {e}")))?;
        self.backend = Some(backend);
        Ok(())
    }

    /// The backend process's state, when the I/O is done by one.
    pub fn backend_status(&self) -> Option<crate::backend::BackendStatus> {
        self.backend.as_ref().map(|b| b.status())
    }

    /// The descriptor that becomes readable when a frame arrives: the tap, or the receive
    /// ring's event when a backend process reads the tap ahead. Wait on it between
    /// [`Tap::prepare_wait`] and [`Tap::end_wait`].
    pub fn wait_fd(&self) -> RawFd {
        self.backend.as_ref().and_then(|b| b.rx_event_fd()).unwrap_or(self.fd.as_raw_fd())
    }

    /// About to wait on [`Tap::wait_fd`]: false when a frame already waits (do not wait).
    pub fn prepare_wait(&self) -> bool {
        self.pending.is_empty() && self.backend.as_ref().is_none_or(|b| b.rx_prepare_wait())
    }

    /// Done waiting on [`Tap::wait_fd`]; `woken`: it was readable.
    pub fn end_wait(&self, woken: bool) {
        if let Some(b) = &self.backend {
            b.rx_end_wait(woken);
        }
    }

    /// Whether a frame is waiting.
    pub fn readable(&self) -> bool {
        if !self.pending.is_empty() {
            return true;
        }
        if let Some(b) = self.backend.as_ref().filter(|b| b.has_rx_ring()) {
            return b.rx_pending();
        }
        let mut p = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: polls one valid pollfd without blocking.
        unsafe { libc::poll(&mut p, 1, 0) > 0 && p.revents & libc::POLLIN != 0 }
    }
}

/// Frames packed into backend `OP_SEND` messages of at most `MAX_PAYLOAD` bytes.
struct Batch<'a> {
    backend: &'a crate::backend::Backend,
    payload: Vec<u8>,
}

impl<'a> Batch<'a> {
    fn new(backend: &'a crate::backend::Backend) -> Self {
        Batch { backend, payload: Vec::new() }
    }

    fn push(&mut self, f: &[u8]) {
        let Ok(n) = u16::try_from(f.len()) else { return };
        if self.payload.len() + 2 + f.len() > crate::backend::wire::MAX_PAYLOAD {
            self.flush();
        }
        self.payload.extend_from_slice(&n.to_le_bytes());
        self.payload.extend_from_slice(f);
    }

    fn flush(&mut self) {
        if !self.payload.is_empty() {
            self.backend.send(&self.payload);
            self.payload.clear();
        }
    }
}

fn read_bufs(mem: &GuestMem, req: &NetRequest) -> Result<Vec<NetBuf>, String> {
    if req.count > NET_MAX_BUFS {
        return Err(format!("network request with {} buffers (at most {NET_MAX_BUFS})", req.count));
    }
    (0..req.count as u64).map(|i| mem.read_obj(req.bufs + i * std::mem::size_of::<NetBuf>() as u64)).collect()
}

fn finish(mem: &mut GuestMem, addr: u64, req: NetRequest, filled: &[NetBuf], done: u32) -> Result<u32, String> {
    for (i, b) in filled.iter().enumerate() {
        mem.write_obj(req.bufs + i as u64 * std::mem::size_of::<NetBuf>() as u64, b)?;
    }
    mem.write_obj(addr, &NetRequest { done, ..req })?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The case that held 268 MB against a 64 MiB limit: many minimum-size frames. Memory is
    /// counted with its overhead, so the limit bounds what is allocated.
    #[test]
    fn small_frames_are_held_within_the_limit_and_released_in_order() {
        let limit = 1 << 20;
        let mut h = Held::new(limit);
        let mut pushed = 0u32;
        for i in 0..200_000u32 {
            let frame = [i as u8; 14];
            if h.push(&frame) {
                pushed += 1;
            }
        }
        assert!(h.bytes <= limit, "{} bytes held", h.bytes);
        let allocated: usize = h.current.chunks.iter().map(|c| c.capacity()).sum();
        assert!(allocated <= limit, "{allocated} bytes allocated");
        assert_eq!(pushed as usize, (limit / HOLD_CHUNK) * (HOLD_CHUNK / 16));
        assert_eq!(h.dropped, 200_000 - pushed as u64);
        let (epoch, frames, bytes) = h.seal();
        assert_eq!((epoch, frames, bytes), (1, pushed as u64, 14 * pushed as u64));
        assert!(!h.push(&[1; 1514]), "still full until released");
        let mut seen = 0u32;
        let released = h.release(1, |f| {
            assert_eq!(f, &[seen as u8; 14]);
            seen += 1;
        });
        assert_eq!((released, seen), (pushed as usize, pushed));
        assert_eq!(h.bytes, 0);
        assert!(h.push(&[9; 1514]) && h.push(&[8; 14]));
        h.seal();
        let mut lens = vec![];
        h.release(2, |f| lens.push(f.len()));
        assert_eq!(lens, [1514, 14]);
    }
}
