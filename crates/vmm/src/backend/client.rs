//! The VMM's side: starts the backend process, passes it its descriptors, sends it requests
//! and waits for their replies, fills the network backend's transmit ring, and supervises it —
//! a crash (its exit, seen through a pidfd), a hang (no reply within the request timeout; a
//! transmit ring whose tail does not move for as long; heartbeats while the guest does no I/O)
//! or a lie (a reply or a ring tail that cannot be) gets it killed, started again and
//! reconnected, and the request in flight replayed from where the progress page says the dead
//! one stopped, and the ring from its tail.

use super::shm::{
    self, memfd, FrameRing, Mapping, Progress, PROGRESS_BYTES, RING_BYTES, RING_SLOT, RING_SLOTS, WRITE_RING_BYTES, WRITE_SECTORS,
};
use super::wire::{self, Reply, Request, MAX_MSG, STATUS_OK};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How to start a backend process (the program is given its descriptors 3 to 6, see
/// `serve::FD_SOCKET`...). `vigil vm run --net-backend process` runs `vigil backend net`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendProgram {
    pub program: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    /// Heartbeat period while the guest does no network I/O (ms).
    #[serde(default = "default_period")]
    pub period_ms: u64,
    /// A request unanswered this long means the backend hangs (ms); so does a transmit ring
    /// whose tail does not move for as long.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Network: transmit synchronously, a round trip per guest request, instead of through
    /// the transmit ring (what the backend did before the ring; `VIGIL_NET_TX_RING=0` sets it,
    /// for benchmarks comparing the two). Block: write synchronously, the vCPU waiting for
    /// each write, instead of through the write ring (`VIGIL_BLK_WRITE_RING=0`).
    #[serde(default)]
    pub sync_tx: bool,
    /// Network: receive synchronously, a round trip per guest request when the tap has a
    /// frame, instead of through the receive ring the backend fills ahead (the VMM chooses:
    /// [`crate::machine::net_receive_ring`]).
    #[serde(default)]
    pub sync_rx: bool,
}

fn default_period() -> u64 {
    50
}
fn default_timeout() -> u64 {
    150
}

impl BackendProgram {
    pub fn new(program: impl Into<PathBuf>, args: Vec<String>) -> BackendProgram {
        BackendProgram {
            program: program.into(),
            args,
            period_ms: default_period(),
            timeout_ms: default_timeout(),
            sync_tx: false,
            sync_rx: false,
        }
    }
}

/// One failure of the backend and its repair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    /// `crashed: …`, `hung: …` or `misbehaved: …`.
    pub cause: String,
    pub old_pid: u32,
    pub new_pid: u32,
    /// How long the request in flight waited before the failure was declared (µs; 0 when
    /// the monitor found it between requests).
    pub waited_us: u64,
    /// From the decision until the new process answered its first heartbeat (µs).
    pub restart_us: u64,
    /// Entries (frames) of the request in flight that the new process served again.
    pub replayed: u32,
    /// Entries the dead process had already served (not served again).
    pub salvaged: u32,
    /// Transmit ring entries the dead process had not finished, sent by the new one.
    #[serde(default)]
    pub ring: u32,
}

/// What `status` reports of a backend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub pid: u32,
    pub requests: u64,
    pub restarts: u64,
    /// The last incidents (at most 32).
    pub incidents: Vec<Incident>,
    /// Frames the VMM put in the transmit ring (none without one).
    #[serde(default)]
    pub ring_frames: u64,
    /// Times the ring was full and the vCPU waited for the backend to drain it.
    #[serde(default)]
    pub ring_full: u64,
    /// Ring entries dropped by the VMM: every new backend died on them ([`MAX_RESTARTS`]).
    #[serde(default)]
    pub ring_dropped: u64,
    /// Frames the VMM took from the receive ring (none without one).
    #[serde(default)]
    pub rx_ring_frames: u64,
}

/// Restarts one request may go through before the backend is given up on for it (the frames
/// are then dropped, like frames lost on a wire; the VM runs on).
const MAX_RESTARTS: u32 = 5;

/// Which device a backend serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Net,
    Block,
}

impl Device {
    fn name(self) -> &'static str {
        match self {
            Device::Net => "network",
            Device::Block => "block",
        }
    }
}

/// A supervised backend process.
pub struct Backend {
    shared: Arc<Shared>,
}

/// What one request asks of the backend.
#[derive(Clone, Copy)]
enum Work<'a> {
    Tx(&'a [(u64, u32)]),
    Rx(&'a [(u64, u32)]),
    Send(&'a [u8]),
    Block(&'a [wire::BlockEntry]),
}

impl<'a> Work<'a> {
    fn count(&self) -> usize {
        match self {
            Work::Tx(e) | Work::Rx(e) => e.len(),
            Work::Send(p) => wire::send_frames(p).count(),
            Work::Block(d) => d.len(),
        }
    }

    fn request(&self, seq: u32) -> Request {
        match *self {
            Work::Tx(e) => Request::Tx { seq, frames: e.to_vec() },
            Work::Rx(e) => Request::Rx { seq, bufs: e.to_vec() },
            Work::Send(p) => Request::Send { seq, payload: p.to_vec() },
            Work::Block(d) => Request::Block { seq, descs: d.to_vec() },
        }
    }

    /// The work left after the first `n` entries.
    fn skip(self, n: usize) -> Work<'a> {
        match self {
            Work::Tx(e) => Work::Tx(&e[n.min(e.len())..]),
            Work::Rx(e) => Work::Rx(&e[n.min(e.len())..]),
            Work::Send(p) => Work::Send(skip_frames(p, n)),
            Work::Block(d) => Work::Block(&d[n.min(d.len())..]),
        }
    }
}

/// What a request got done: per entry served, the frame length (receive) or 0; and whether a
/// block request stopped at a host I/O error (after the entries served).
#[derive(Debug, Default)]
pub struct Served {
    pub lens: Vec<u32>,
    pub io_error: bool,
}

/// Settles a backend's write ring from any thread ([`Backend::settler`]); does nothing once
/// the backend is gone.
#[derive(Clone)]
pub struct Settler {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Settler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Settler({} backend)", self.shared.device.name())
    }
}

impl Settler {
    /// As [`Backend::settle`].
    pub fn settle(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed) || self.shared.settle()
    }
}

struct Shared {
    device: Device,
    conn: Mutex<Conn>,
    stop: AtomicBool,
    status: Mutex<BackendStatus>,
    tx: Option<TxShared>,
    rx: Option<RxShared>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Shows the backend every entry pushed so far (kicks it when it may be asleep).
    fn publish(&self) {
        if let Some(tx) = &self.tx {
            let head = tx.head.lock().unwrap_or_else(|p| p.into_inner());
            tx.publish(*head);
        }
    }

    /// A heartbeat, answered once the backend drained the ring; a backend that fails it is
    /// replaced.
    fn drain(&self) {
        let mut conn = self.lock();
        conn.seq = conn.seq.wrapping_add(1);
        let seq = conn.seq;
        let start = Instant::now();
        let timeout = Duration::from_millis(conn.program.timeout_ms);
        match conn.round_trip(&Request::Ping { seq }.encode(), timeout) {
            Ok(_) => {
                conn.last_ok = Instant::now();
                conn.missed = 0;
            }
            Err(f) => {
                let old_pid = conn.pid();
                let _ = restart(self, &mut conn, old_pid, &f, start.elapsed(), 0, 0);
            }
        }
    }

    /// Every published entry done (see [`Backend::settle`]).
    fn settle(&self) -> bool {
        let Some(tx) = &self.tx else { return true };
        self.publish();
        for _ in 0..=MAX_RESTARTS {
            if tx.tail().is_ok_and(|t| t >= tx.published.load(Ordering::Acquire)) {
                return true;
            }
            self.drain();
        }
        tx.tail().is_ok_and(|t| t >= tx.published.load(Ordering::Acquire))
    }
}

/// The VMM's side of the receive ring: the backend produces, the VMM (the vCPU thread) is its
/// only consumer and checks every head the backend writes against its own tail.
struct RxShared {
    ring: FrameRing,
    /// The backend's kick (the ring was full and now has room).
    kick: OwnedFd,
    /// Ours: the backend kicks it when it published frames while the VMM waited.
    event: OwnedFd,
    /// The tail being consumed; its lock makes one consumer at a time. Taken before
    /// `Shared::conn`, never after it.
    tail: Mutex<u64>,
    /// The tail the backend has been shown.
    consumed: AtomicU64,
    /// The highest head read that checked: never below it, never more than a ring ahead of
    /// the tail.
    good_head: AtomicU64,
}

impl RxShared {
    /// The ring's head, checked: never below the last good head, never more than a ring ahead
    /// of the tail.
    fn head(&self) -> Result<u64, String> {
        checked_counter(
            &self.good_head,
            || self.ring.head(),
            || self.consumed.load(Ordering::Acquire) + RING_SLOTS,
            "the receive ring's head",
        )
    }
}

/// A counter the backend writes into shared memory, read as `read` gives it and accepted only
/// between the last good value (`good`, which it then advances) and `limit` — read after it,
/// so that a concurrent reader's progress never looks like a lie.
fn checked_counter(good: &AtomicU64, read: impl FnOnce() -> u64, limit: impl FnOnce() -> u64, what: &str) -> Result<u64, String> {
    let last = good.load(Ordering::Acquire);
    let v = read();
    let limit = limit();
    if v < last || v > limit {
        return Err(format!("{what} reads {v} (last {last}, at most {limit})"));
    }
    good.fetch_max(v, Ordering::AcqRel);
    Ok(v)
}

/// The VMM's side of the transmit ring. The VMM is its only producer; it keeps its own head
/// and checks the tail the backend writes against it, never trusting the shared page.
struct TxShared {
    ring: FrameRing,
    kick: OwnedFd,
    /// The head being filled (not yet published beyond `published`); its lock makes one
    /// producer at a time. Taken before `Shared::conn`, never after it.
    head: Mutex<u64>,
    /// The head the backend has been shown.
    published: AtomicU64,
    /// The highest tail read that checked: never above `published`, never decreasing.
    good_tail: AtomicU64,
    /// When entries were last published into an empty ring (ns since `base`): a stall of the
    /// backend is timed from there.
    waiting_since: AtomicU64,
    /// Entries were published while the backend slept, without a kick ([`Backend::publish_lazy`]).
    owed: AtomicBool,
    base: Instant,
}

impl TxShared {
    /// The ring's tail, checked: between the last good tail and the published head (read in
    /// that order, so that a concurrent reader's progress never looks like a lie).
    fn tail(&self) -> Result<u64, String> {
        checked_counter(&self.good_tail, || self.ring.tail(), || self.published.load(Ordering::Acquire), "the transmit ring's tail")
    }

    /// Shows the backend every entry before `head`, kicking it when it may sleep.
    fn publish(&self, head: u64) {
        self.publish_maybe_kick(head, true);
    }

    /// As [`TxShared::publish`]; without `kick`, a backend asleep is left so (the kick owed,
    /// see [`Backend::publish_lazy`]) unless a quarter of the ring is waiting.
    fn publish_maybe_kick(&self, head: u64, kick: bool) {
        if self.ring.tail() >= self.published.load(Ordering::Acquire) {
            self.waiting_since.store(self.base.elapsed().as_nanos() as u64, Ordering::Release);
        }
        self.published.store(head, Ordering::Release);
        if self.ring.publish(head) {
            if kick || head.saturating_sub(self.good_tail.load(Ordering::Acquire)) >= RING_SLOTS / 4 {
                self.owed.store(false, Ordering::Release);
                shm::kick(self.kick.as_raw_fd());
            } else {
                self.owed.store(true, Ordering::Release);
            }
        }
    }

    /// Kicks the backend if a kick is owed; a stall of the backend is timed from this kick
    /// (the entries waited for it, not for the backend).
    fn kick_owed(&self) {
        if self.owed.swap(false, Ordering::AcqRel) {
            self.waiting_since.store(self.base.elapsed().as_nanos() as u64, Ordering::Release);
            shm::kick(self.kick.as_raw_fd());
        }
    }
}

struct Conn {
    program: BackendProgram,
    /// The descriptors handed to each process, duplicated above 63 (see `spawn`).
    mem: OwnedFd,
    tap: OwnedFd,
    progress_fd: OwnedFd,
    progress: Progress,
    /// The rings' descriptors (network), passed at 7 to 10: the transmit ring, the backend's
    /// kick, the receive ring, the VMM's receive event.
    ring_fds: [Option<OwnedFd>; 4],
    /// The ring's tail at the last restart and how many restarts in a row found it there.
    ring_stuck: (u64, u32),
    /// The signal the backend gets when the thread that started it ends.
    death_signal: i32,
    proc_: Option<Proc>,
    seq: u32,
    last_ok: Instant,
    /// Heartbeats missed in a row.
    missed: u32,
    generation: u64,
}

struct Proc {
    child: Child,
    pidfd: OwnedFd,
    sock: OwnedFd,
}

/// Why a round trip failed.
enum Fault {
    Crashed(String),
    Hung(Duration),
    Misbehaved(String),
}

impl Fault {
    fn describe(&self) -> String {
        match self {
            Fault::Crashed(s) => format!("crashed: {s}"),
            Fault::Hung(d) => format!("hung: no answer for {} ms", d.as_millis()),
            Fault::Misbehaved(s) => format!("misbehaved: {s}"),
        }
    }
}

fn dup_high(fd: BorrowedFd<'_>, what: &str) -> Result<OwnedFd, String> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we borrow; the result is checked and owned.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 64) };
    if n < 0 {
        return Err(format!("duplicating the {what} descriptor: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `n` is a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

impl Backend {
    /// Starts the backend `program` for `device` on guest memory `mem` (a memfd) and the
    /// device's descriptor `dev` (the tap, or the disk file), waits for its first heartbeat,
    /// and starts supervising it.
    pub fn start(device: Device, program: &BackendProgram, mem: BorrowedFd<'_>, dev: BorrowedFd<'_>) -> Result<Backend, String> {
        let tap = dev;
        let progress_fd = memfd(c"vigil-backend-progress", PROGRESS_BYTES as u64)?;
        let progress = Progress::new(Mapping::map(progress_fd.as_fd())?)?;
        let mut ring_fds: [Option<OwnedFd>; 4] = Default::default();
        let rings = match device {
            Device::Net => !(program.sync_tx && program.sync_rx),
            Device::Block => !program.sync_tx,
        };
        let kick = if rings { Some(shm::eventfd()?) } else { None };
        if let Some(k) = &kick {
            ring_fds[1] = Some(dup_high(k.as_fd(), "kick")?);
        }
        let mut tx = None;
        if let (Some(k), false) = (&kick, program.sync_tx) {
            // The network's transmit ring, or the disk's write ring: the same protocol.
            let (ring_fd, ring) = match device {
                Device::Net => {
                    let fd = memfd(c"vigil-backend-tx-ring", RING_BYTES as u64)?;
                    let ring = FrameRing::new(Mapping::map(fd.as_fd())?)?;
                    (fd, ring)
                }
                Device::Block => {
                    let fd = memfd(c"vigil-backend-write-ring", WRITE_RING_BYTES as u64)?;
                    let ring = FrameRing::for_writes(Mapping::map(fd.as_fd())?)?;
                    (fd, ring)
                }
            };
            ring_fds[0] = Some(dup_high(ring_fd.as_fd(), "transmit ring")?);
            tx = Some(TxShared {
                ring,
                kick: dup_high(k.as_fd(), "kick")?,
                head: Mutex::new(0),
                published: AtomicU64::new(0),
                good_tail: AtomicU64::new(0),
                waiting_since: AtomicU64::new(0),
                owed: AtomicBool::new(false),
                base: Instant::now(),
            });
        }
        let mut rx = None;
        if let (Some(k), false, Device::Net) = (&kick, program.sync_rx, device) {
            let ring_fd = memfd(c"vigil-backend-rx-ring", RING_BYTES as u64)?;
            let event = shm::eventfd()?;
            ring_fds[2] = Some(dup_high(ring_fd.as_fd(), "receive ring")?);
            ring_fds[3] = Some(dup_high(event.as_fd(), "receive event")?);
            rx = Some(RxShared {
                ring: FrameRing::new(Mapping::map(ring_fd.as_fd())?)?,
                kick: dup_high(k.as_fd(), "kick")?,
                event,
                tail: Mutex::new(0),
                consumed: AtomicU64::new(0),
                good_head: AtomicU64::new(0),
            });
        }
        let mut conn = Conn {
            program: program.clone(),
            mem: dup_high(mem, "guest memory")?,
            tap: dup_high(tap, "tap")?,
            progress_fd: dup_high(progress_fd.as_fd(), "progress page")?,
            progress,
            ring_fds,
            ring_stuck: (0, 0),
            // A disk's writes acknowledged to the guest may wait in the ring: a backend whose
            // VMM dies writes them first (SIGTERM, which it handles), and exits.
            death_signal: if device == Device::Block && tx.is_some() { libc::SIGTERM } else { libc::SIGKILL },
            proc_: None,
            seq: 0,
            last_ok: Instant::now(),
            missed: 0,
            generation: 0,
        };
        conn.spawn()?;
        let pid = conn.pid();
        let shared = Arc::new(Shared {
            device,
            conn: Mutex::new(conn),
            stop: AtomicBool::new(false),
            status: Mutex::new(BackendStatus { pid, ..Default::default() }),
            tx,
            rx,
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name(format!("{}-backend-monitor", device.name()))
            .spawn(move || monitor(&s))
            .map_err(|e| format!("starting the backend's monitor: {e}"))?;
        Ok(Backend { shared })
    }

    /// The backend's pid, restarts and incidents.
    pub fn status(&self) -> BackendStatus {
        self.shared.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Whether frames go out through the transmit ring ([`Backend::push`]) rather than
    /// [`Backend::tx`] and [`Backend::send`].
    pub fn has_ring(&self) -> bool {
        self.shared.tx.is_some()
    }

    /// Puts `frame` (a checked frame, at most `FRAME_MAX` bytes) in the transmit ring, after
    /// those before it; [`Backend::publish`] shows them to the backend. When the ring is full
    /// the caller waits until the backend drained it (a round trip: the backend answers after
    /// draining), replacing a backend that fails meanwhile. False when the frame could not
    /// be queued (no ring, or no backend could be brought back): dropped, as on a wire.
    pub fn push(&self, frame: &[u8]) -> bool {
        self.push_entry(|ring, index| ring.put(index, frame))
    }

    /// Puts a guest write of `data` (whole sectors) at `sector` in the block write ring, in
    /// entries of at most [`WRITE_SECTORS`] sectors; [`Backend::publish`] shows them to the
    /// backend (which writes them in order). Waits while the ring is full, as
    /// [`Backend::push`]. False when some could not be queued (no backend could be brought
    /// back): the write failed.
    pub fn queue_write(&self, sector: u64, data: &[u8]) -> bool {
        let chunk = WRITE_SECTORS * vmm_abi::SECTOR_SIZE as usize;
        data.chunks(chunk).enumerate().all(|(i, part)| {
            let at = sector + (i * WRITE_SECTORS) as u64;
            self.push_entry(|ring, index| ring.put_write(index, at, part))
        })
    }

    /// Writes of the block write ring the backend could not do, so far (as its control page
    /// says).
    pub fn write_failures(&self) -> u64 {
        self.shared.tx.as_ref().map_or(0, |tx| tx.ring.failed())
    }

    /// Waits until every entry published in the ring is done (a disk's writes are on it),
    /// replacing the backend while it fails to (at most [`MAX_RESTARTS`] times); false if
    /// entries are left.
    pub fn settle(&self) -> bool {
        self.shared.settle()
    }

    /// One entry into the ring (`put` writes entry `index`), waiting for room as [`Backend::push`].
    fn push_entry(&self, put: impl Fn(&FrameRing, u64) -> Result<(), String>) -> bool {
        let Some(tx) = &self.shared.tx else { return false };
        let mut head = tx.head.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..=MAX_RESTARTS + 1 {
            match tx.tail() {
                Ok(t) if *head - t < RING_SLOTS => {
                    if put(&tx.ring, *head).is_err() {
                        return false;
                    }
                    *head += 1;
                    if let Ok(mut s) = self.shared.status.lock() {
                        s.ring_frames += 1;
                    }
                    return true;
                }
                Ok(_) => {
                    // Full: what is queued must be visible before waiting for it to drain.
                    tx.publish(*head);
                    if let Ok(mut s) = self.shared.status.lock() {
                        s.ring_full += 1;
                    }
                    self.drain();
                }
                Err(e) => self.replace(Fault::Misbehaved(e)),
            }
        }
        false
    }

    /// Shows the backend every frame pushed so far (kicks it when it may be asleep).
    pub fn publish(&self) {
        self.shared.publish();
    }

    /// Waits until the backend drained the transmit ring (a heartbeat: it answers after
    /// draining), replacing it when it fails to answer.
    pub fn drain(&self) {
        self.shared.drain();
    }

    /// As [`Backend::publish`], but a backend asleep is not woken for it (unless a quarter of
    /// the ring waits): a disk's writes, which the guest was told are done, can wait for the
    /// guest's idle call ([`Backend::kick_owed`]), for the next round trip (the backend
    /// writes the ring before any reply) or for the monitor (within 10 ms), so that a burst of
    /// writes costs the backend one wakeup.
    pub fn publish_lazy(&self) {
        if let Some(tx) = &self.shared.tx {
            let head = tx.head.lock().unwrap_or_else(|p| p.into_inner());
            tx.publish_maybe_kick(*head, false);
        }
    }

    /// Wakes the backend if entries wait for it unkicked ([`Backend::publish_lazy`]).
    pub fn kick_owed(&self) {
        if let Some(tx) = &self.shared.tx {
            tx.kick_owed();
        }
    }

    /// A handle that settles this backend's write ring from another thread (the protection's
    /// synchronisation reads the disk file while the VM runs).
    pub fn settler(&self) -> Settler {
        Settler { shared: self.shared.clone() }
    }

    /// Whether received frames come through the receive ring ([`Backend::rx_take`]) rather
    /// than [`Backend::rx`].
    pub fn has_rx_ring(&self) -> bool {
        self.shared.rx.is_some()
    }

    /// Copies the next received frame into `buf` and returns its length; `None` when none
    /// waits. A head or a slot that cannot be (the backend scribbled on the ring) gets the
    /// backend replaced; a bad slot is skipped.
    pub fn rx_take(&self, buf: &mut [u8; RING_SLOT]) -> Option<usize> {
        let rx = self.shared.rx.as_ref()?;
        let mut tail = rx.tail.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let head = match rx.head() {
                Ok(h) => h,
                Err(e) => {
                    self.replace(Fault::Misbehaved(e));
                    return None;
                }
            };
            if *tail >= head {
                return None;
            }
            let r = rx.ring.get(*tail, buf).map(|f| f.len());
            *tail += 1;
            match r {
                Ok(n) => {
                    if let Ok(mut s) = self.shared.status.lock() {
                        s.rx_ring_frames += 1;
                    }
                    return Some(n);
                }
                Err(e) => self.replace(Fault::Misbehaved(e)),
            }
        }
    }

    /// Shows the backend the frames taken so far are consumed (their slots free), kicking it
    /// when the ring was full (it stopped reading the tap).
    pub fn rx_done(&self) {
        let Some(rx) = &self.shared.rx else { return };
        let tail = *rx.tail.lock().unwrap_or_else(|p| p.into_inner());
        let old = rx.consumed.swap(tail, Ordering::AcqRel);
        if old == tail {
            return;
        }
        rx.ring.set_tail(tail);
        if rx.good_head.load(Ordering::Acquire) >= old + RING_SLOTS {
            shm::kick(rx.kick.as_raw_fd());
        }
    }

    /// Whether the receive ring holds a frame not yet taken (false without a ring).
    pub fn rx_pending(&self) -> bool {
        self.shared.rx.as_ref().is_some_and(|rx| rx.ring.head() > rx.consumed.load(Ordering::Acquire))
    }

    /// The eventfd that becomes readable when the backend published frames while the VMM
    /// waited ([`Backend::rx_prepare_wait`]).
    pub fn rx_event_fd(&self) -> Option<RawFd> {
        self.shared.rx.as_ref().map(|rx| rx.event.as_raw_fd())
    }

    /// About to wait on [`Backend::rx_event_fd`]: false when a frame already waits (do not).
    pub fn rx_prepare_wait(&self) -> bool {
        self.shared.rx.as_ref().is_none_or(|rx| rx.ring.may_sleep(rx.consumed.load(Ordering::Acquire)))
    }

    /// Done waiting; `woken`: the event fd was readable (it is then cleared).
    pub fn rx_end_wait(&self, woken: bool) {
        if let Some(rx) = &self.shared.rx {
            rx.ring.awake();
            if woken {
                shm::clear(rx.event.as_raw_fd());
            }
        }
    }

    /// Replaces the backend for `fault` found outside a request.
    fn replace(&self, fault: Fault) {
        let mut conn = self.lock();
        let old_pid = conn.pid();
        let _ = restart(&self.shared, &mut conn, old_pid, &fault, Duration::ZERO, 0, 0);
    }

    /// Sends the frames at `frames` (guest address, length); returns how many went out.
    pub fn tx(&self, frames: &[(u64, u32)]) -> u32 {
        self.request(Work::Tx(frames)).lens.len() as u32
    }

    /// Fills the guest buffers `bufs` (address, capacity) with waiting frames; returns the
    /// length of each frame delivered, in buffer order.
    pub fn rx(&self, bufs: &[(u64, u32)]) -> Vec<u32> {
        self.request(Work::Rx(bufs)).lens
    }

    /// Sends frames packed as `[len: u16 LE][frame]`... (at most `wire::MAX_PAYLOAD` bytes).
    pub fn send(&self, payload: &[u8]) -> u32 {
        self.request(Work::Send(payload)).lens.len() as u32
    }

    /// Runs block descriptors (checked by the caller); `Ok(())` when all ran, `Err(i)` when
    /// descriptor `i` failed (a host I/O error, or the backend could not be brought back).
    pub fn block(&self, descs: &[wire::BlockEntry]) -> Result<(), usize> {
        let s = self.request(Work::Block(descs));
        if s.io_error || s.lens.len() < descs.len() {
            return Err(s.lens.len());
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Conn> {
        self.shared.lock()
    }

    /// One request, replayed across restarts of the backend: returns what was served.
    fn request(&self, work: Work<'_>) -> Served {
        let mut conn = self.lock();
        let mut served = Served::default();
        let mut work = work;
        let mut waited_since = Instant::now();
        let name = self.shared.device.name();
        for _ in 0..=MAX_RESTARTS {
            conn.seq = conn.seq.wrapping_add(1);
            let seq = conn.seq;
            let count = work.count();
            let timeout = Duration::from_millis(conn.program.timeout_ms);
            let fault = match conn.round_trip(&work.request(seq).encode(), timeout) {
                Ok(r) if r.status == wire::STATUS_IO_ERROR && matches!(work, Work::Block(_)) && (r.done as usize) < count => {
                    served.lens.extend(std::iter::repeat_n(0, r.done as usize));
                    served.io_error = true;
                    conn.last_ok = Instant::now();
                    self.count_request();
                    return served;
                }
                Ok(r) if r.status != STATUS_OK => Fault::Misbehaved(format!("refused a request: {}", r.reason)),
                Ok(r) if r.done as usize > count => Fault::Misbehaved(format!("claims {} of {count} entries done", r.done)),
                Ok(r) => match check_done(&conn.progress, work, seq, r.done as usize) {
                    Ok(lens) => {
                        served.lens.extend(lens);
                        conn.last_ok = Instant::now();
                        conn.missed = 0;
                        self.count_request();
                        return served;
                    }
                    Err(e) => Fault::Misbehaved(e),
                },
                Err(f) => f,
            };
            let waited = waited_since.elapsed();
            // Dead first (a slow one must not go on serving), then read how far it got.
            let old_pid = conn.pid();
            conn.kill();
            // What the dead process got done before it failed is not done again.
            let salvaged = match work {
                Work::Rx(entries) => {
                    let lens = conn.progress.of(seq, count);
                    let ok = lens.iter().zip(entries).take_while(|(l, (_, cap))| (1..=*cap).contains(*l)).count();
                    served.lens.extend(&lens[..ok]);
                    ok
                }
                _ => {
                    let n = conn.progress.done(seq, count);
                    served.lens.extend(std::iter::repeat_n(0, n));
                    n
                }
            };
            work = work.skip(salvaged);
            let replay = work.count();
            if let Err(e) = restart(&self.shared, &mut conn, old_pid, &fault, waited, replay as u32, salvaged as u32) {
                eprintln!("vmm: {name} backend: cannot restart after it {}: {e}", fault.describe());
                return served;
            }
            if replay == 0 {
                self.count_request();
                return served;
            }
            waited_since = Instant::now();
        }
        eprintln!("vmm: {name} backend: a request failed after {MAX_RESTARTS} restarts; given up (frames dropped, a block request fails)");
        served
    }

    fn count_request(&self) {
        if let Ok(mut s) = self.shared.status.lock() {
            s.requests += 1;
        }
    }
}

/// The lengths of the `done` entries a reply says were served, checked against the progress
/// page (receive: each length must fit its buffer).
fn check_done(progress: &Progress, work: Work<'_>, seq: u32, done: usize) -> Result<Vec<u32>, String> {
    let Work::Rx(entries) = work else { return Ok(vec![0; done]) };
    let lens = progress.of(seq, done);
    if lens.len() != done {
        return Err(format!("replied {done} frames received but recorded {}", lens.len()));
    }
    for (i, (l, (_, cap))) in lens.iter().zip(entries).enumerate() {
        if !(1..=*cap).contains(l) {
            return Err(format!("frame {i}: {l} bytes in a buffer of {cap}"));
        }
    }
    Ok(lens)
}

fn skip_frames(mut p: &[u8], n: usize) -> &[u8] {
    for _ in 0..n {
        let Some(len) = p.get(0..2) else { return &[] };
        let l = 2 + u16::from_le_bytes([len[0], len[1]]) as usize;
        p = p.get(l..).unwrap_or(&[]);
    }
    p
}

/// Starts a new process after `old_pid` failed (already killed and reaped) and records the
/// incident.
fn restart(
    shared: &Shared,
    conn: &mut Conn,
    old_pid: u32,
    fault: &Fault,
    waited: Duration,
    replayed: u32,
    salvaged: u32,
) -> Result<(), String> {
    let t0 = Instant::now();
    conn.kill();
    // The transmit ring: no process touches it now. A tail that cannot be goes back to the
    // last good one (those entries go out again); entries that killed every new process
    // MAX_RESTARTS times in a row are dropped, one at a time.
    let mut ring = 0;
    let mut ring_dropped = 0;
    if let Some(tx) = &shared.tx {
        let tail = tx.tail().unwrap_or_else(|e| {
            eprintln!("vmm: {} backend: {e}; the ring goes on from the last good tail", shared.device.name());
            let good = tx.good_tail.load(Ordering::Acquire);
            tx.ring.set_tail(good);
            good
        });
        // The shared head is the VMM's: a dead backend that wrote one past what was published
        // would have the next one write stale slots of an earlier lap. (Read before
        // `published`, which the producer stores first: only a scribble puts it ahead, and it
        // is replaced only if still the same, so a concurrent publish is never undone.)
        let shown = tx.ring.head();
        let head = tx.published.load(Ordering::Acquire);
        if shown > head {
            eprintln!("vmm: {} backend: the ring's head reads {shown}, {head} published; reset", shared.device.name());
            tx.ring.replace_head(shown, head);
        }
        let mut tail = tail;
        // A disk's write is never dropped (the guest was told it is done): the ring waits,
        // and the guest waits once it is full.
        if head > tail && shared.device == Device::Net {
            conn.ring_stuck = if conn.ring_stuck.0 == tail { (tail, conn.ring_stuck.1 + 1) } else { (tail, 1) };
            if conn.ring_stuck.1 > MAX_RESTARTS {
                eprintln!("vmm: {} backend: ring entry {tail} failed {MAX_RESTARTS} backends in a row; dropped", shared.device.name());
                tail += 1;
                tx.ring.set_tail(tail);
                tx.good_tail.fetch_max(tail, Ordering::AcqRel);
                conn.ring_stuck = (tail, 0);
                ring_dropped = 1;
            }
        }
        ring = (head - tail) as u32;
    }
    // The receive ring: frames the dead process published stay for the guest; a head that
    // cannot be goes back to the last good one.
    if let Some(rx) = &shared.rx {
        if let Err(e) = rx.head() {
            eprintln!("vmm: {} backend: {e}; the receive ring goes on from the last good head", shared.device.name());
            rx.ring.set_head(rx.good_head.load(Ordering::Acquire));
        }
    }
    let r = conn.spawn();
    let incident = Incident {
        cause: fault.describe(),
        old_pid,
        new_pid: conn.pid(),
        waited_us: waited.as_micros() as u64,
        restart_us: t0.elapsed().as_micros() as u64,
        replayed,
        salvaged,
        ring,
    };
    eprintln!(
        "vmm: {} backend pid {old_pid} {}; restarted as pid {} in {:.1} ms ({replayed} entries replayed, {salvaged} salvaged, {ring} in the transmit ring)",
        shared.device.name(),
        incident.cause,
        incident.new_pid,
        incident.restart_us as f64 / 1e3
    );
    if let Ok(mut s) = shared.status.lock() {
        s.pid = incident.new_pid;
        s.restarts += 1;
        s.ring_dropped += ring_dropped;
        if s.incidents.len() >= 32 {
            s.incidents.remove(0);
        }
        s.incidents.push(incident);
    }
    r
}

/// Watches the backend between requests: its exit at once (pidfd), a hang by a transmit ring
/// whose tail stands still for the request timeout with entries in it, or by heartbeats (only
/// when neither a request nor the ring made progress within the period); a ring tail that
/// cannot be is a lie.
fn monitor(shared: &Arc<Shared>) {
    // The ring's tail when last seen and since when it has not moved with entries waiting.
    let mut watch = (0u64, Instant::now());
    // The receive ring's head when last seen, and since when frames have waited at the tap
    // with room in the ring and that head standing still.
    let mut rx_seen = 0u64;
    let mut rx_since = Instant::now();
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let (pidfd, generation, period, tap) = {
            let conn = shared.conn.lock().unwrap_or_else(|p| p.into_inner());
            let period = Duration::from_millis(conn.program.period_ms.max(1));
            (conn.proc_.as_ref().and_then(|p| p.pidfd.try_clone().ok()), conn.generation, period, conn.tap.as_raw_fd())
        };
        // Frames wait at the tap while the receive ring has room: the backend should be
        // reading them.
        let rx_backlog = || {
            shared
                .rx
                .as_ref()
                .is_some_and(|rx| rx.ring.head() < rx.consumed.load(Ordering::Acquire) + RING_SLOTS && poll_in(&[tap], Duration::ZERO)[0])
        };
        // With ring entries or frames at the tap waiting, look again soon: a stall is then
        // timed closely, not from up to a period later.
        let pending = shared.tx.as_ref().is_some_and(|tx| tx.ring.tail() < tx.published.load(Ordering::Acquire)) || rx_backlog();
        // Entries published without a kick wait at most until this look.
        if let Some(tx) = &shared.tx {
            tx.kick_owed();
        }
        let wait = if pending { period.min(Duration::from_millis(10)) } else { period };
        let exited = match &pidfd {
            Some(fd) => poll_in(&[fd.as_raw_fd()], wait).first().copied().unwrap_or(false),
            None => {
                std::thread::sleep(period);
                true
            }
        };
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut conn) = shared.conn.try_lock() else { continue };
        if conn.generation != generation {
            continue;
        }
        if exited {
            let why = conn.exit_status();
            let old_pid = conn.pid();
            let _ = restart(shared, &mut conn, old_pid, &Fault::Crashed(why), Duration::ZERO, 0, 0);
            continue;
        }
        if let Some(tx) = &shared.tx {
            // (A kick owed since this thread's last look is given before the stall is judged.)
            tx.kick_owed();
            let fault = match tx.tail() {
                Err(e) => Some(Fault::Misbehaved(e)),
                Ok(t) => {
                    let head = tx.published.load(Ordering::Acquire);
                    if t != watch.0 {
                        conn.last_ok = Instant::now();
                        conn.missed = 0;
                    }
                    if t != watch.0 || head == t {
                        watch = (t, Instant::now());
                        None
                    } else {
                        // Stalled since the later of the tail's last change seen and the last
                        // publish into an empty ring (never earlier than it really began).
                        let published = tx.base + Duration::from_nanos(tx.waiting_since.load(Ordering::Acquire));
                        let stalled = watch.1.max(published).elapsed();
                        if stalled >= Duration::from_millis(conn.program.timeout_ms) {
                            Some(Fault::Hung(stalled))
                        } else {
                            None
                        }
                    }
                }
            };
            if let Some(f) = fault {
                let old_pid = conn.pid();
                let waited = if let Fault::Hung(d) = f { d } else { Duration::ZERO };
                let _ = restart(shared, &mut conn, old_pid, &f, waited, 0, 0);
                watch = (tx.good_tail.load(Ordering::Acquire), Instant::now());
                continue;
            }
        }
        if let Some(rx) = &shared.rx {
            match rx.head() {
                Err(e) => {
                    let old_pid = conn.pid();
                    let _ = restart(shared, &mut conn, old_pid, &Fault::Misbehaved(e), Duration::ZERO, 0, 0);
                    continue;
                }
                // Frames received since the last look: alive.
                Ok(h) if h != rx_seen => {
                    rx_seen = h;
                    rx_since = Instant::now();
                    conn.last_ok = Instant::now();
                    conn.missed = 0;
                }
                Ok(_) if !rx_backlog() => rx_since = Instant::now(),
                Ok(_) if rx_since.elapsed() >= Duration::from_millis(conn.program.timeout_ms) => {
                    let (old_pid, stalled) = (conn.pid(), rx_since.elapsed());
                    let _ = restart(shared, &mut conn, old_pid, &Fault::Hung(stalled), stalled, 0, 0);
                    rx_since = Instant::now();
                    continue;
                }
                Ok(_) => {}
            }
        }
        if conn.last_ok.elapsed() < period {
            continue;
        }
        conn.seq = conn.seq.wrapping_add(1);
        let seq = conn.seq;
        match conn.round_trip(&Request::Ping { seq }.encode(), period) {
            Ok(_) => {
                conn.last_ok = Instant::now();
                conn.missed = 0;
            }
            Err(Fault::Crashed(why)) => {
                let old_pid = conn.pid();
                let _ = restart(shared, &mut conn, old_pid, &Fault::Crashed(why), Duration::ZERO, 0, 0);
            }
            Err(_) => {
                conn.missed += 1;
                if conn.missed >= 3 {
                    let missed = conn.missed;
                    let old_pid = conn.pid();
                    let _ = restart(shared, &mut conn, old_pid, &Fault::Hung(period * missed), period * missed, 0, 0);
                }
            }
        }
    }
}

/// Which of `fds` became readable within `timeout`.
fn poll_in(fds: &[RawFd], timeout: Duration) -> Vec<bool> {
    let mut p: Vec<libc::pollfd> = fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `p` is a live array of `p.len()` pollfds.
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return vec![false; fds.len()];
    }
    p.iter().map(|x| x.revents != 0).collect()
}

impl Conn {
    fn pid(&self) -> u32 {
        self.proc_.as_ref().map_or(0, |p| p.child.id())
    }

    /// How the process ended; it is given up to 20 ms to finish dying (its socket closes
    /// before its exit is reported), so that the cause says which signal killed it.
    fn exit_status(&mut self) -> String {
        if let Some(p) = &self.proc_ {
            poll_in(&[p.pidfd.as_raw_fd()], Duration::from_millis(20));
        }
        match self.proc_.as_mut().map(|p| p.child.try_wait()) {
            Some(Ok(Some(st))) => st.to_string(),
            _ => "exited".into(),
        }
    }

    /// Sends `msg` and waits up to `timeout` for the reply of the same sequence number.
    fn round_trip(&mut self, msg: &[u8], timeout: Duration) -> Result<Reply, Fault> {
        let Some(p) = self.proc_.as_ref() else { return Err(Fault::Crashed("not running".into())) };
        let (sock, pidfd) = (p.sock.as_raw_fd(), p.pidfd.as_raw_fd());
        // SAFETY: sends our own buffer on our socket; MSG_NOSIGNAL turns a dead peer into EPIPE.
        let n = unsafe { libc::send(sock, msg.as_ptr().cast(), msg.len(), libc::MSG_NOSIGNAL) };
        if n != msg.len() as isize {
            return Err(Fault::Crashed(format!("send: {}", std::io::Error::last_os_error())));
        }
        let start = Instant::now();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            let ready = poll_in(&[sock, pidfd], left);
            if ready[0] {
                let mut buf = vec![0u8; MAX_MSG + 1];
                // SAFETY: receives into our own buffer of that length.
                let n = unsafe { libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
                if n == 0 {
                    return Err(Fault::Crashed(self.exit_status()));
                }
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(Fault::Crashed(format!("recv: {e}")));
                }
                let reply = Reply::parse(&buf[..n as usize]).map_err(|e| Fault::Misbehaved(format!("a malformed reply: {e}")))?;
                let want_seq = u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]);
                let want_op = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
                if reply.seq != want_seq || reply.op != want_op {
                    return Err(Fault::Misbehaved(format!(
                        "a reply to request {} (op {}) for request {want_seq} (op {want_op})",
                        reply.seq, reply.op
                    )));
                }
                return Ok(reply);
            }
            if ready[1] {
                return Err(Fault::Crashed(self.exit_status()));
            }
            if start.elapsed() >= timeout {
                return Err(Fault::Hung(start.elapsed()));
            }
        }
    }

    /// Kills the process (a hung one too: SIGKILL ends a stopped process) and reaps it.
    fn kill(&mut self) {
        if let Some(mut p) = self.proc_.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// Starts a process with its descriptors at 3 (socket), 4 (guest memory), 5 (tap),
    /// 6 (progress page), 7 to 10 (network: the transmit ring, the backend's kick, the receive
    /// ring, the VMM's receive event), and waits for its first heartbeat (answered once it
    /// drained the transmit ring).
    fn spawn(&mut self) -> Result<(), String> {
        self.generation += 1;
        let mut pair = [0; 2];
        // SAFETY: socketpair fills two descriptors, checked below.
        if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, pair.as_mut_ptr()) } != 0 {
            return Err(format!("socketpair: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: both descriptors were just created and are owned by nothing else.
        let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
        let theirs = dup_high(theirs.as_fd(), "socket")?;
        let mut fds = [theirs.as_raw_fd(), self.mem.as_raw_fd(), self.tap.as_raw_fd(), self.progress_fd.as_raw_fd(), -1, -1, -1, -1];
        let death_signal = self.death_signal;
        for (i, fd) in self.ring_fds.iter().enumerate() {
            fds[4 + i] = fd.as_ref().map_or(-1, |f| f.as_raw_fd());
        }
        let mut cmd = Command::new(&self.program.program);
        // Its stdout is unused (messages go to stderr, the VMM's log).
        cmd.args(&self.program.args).stdin(Stdio::null()).stdout(Stdio::null());
        // SAFETY: between fork and exec the closure only calls dup2(2), close(2), sigprocmask(2) and prctl(2), which are
        // async-signal-safe, and allocates nothing. The sources are all above 63, so no target
        // (3..=10) overwrites a source still to be duplicated; dup2 clears close-on-exec on the
        // targets. Without rings, 7 to 10 stay closed (the parent's are close-on-exec).
        unsafe {
            cmd.pre_exec(move || {
                for (i, fd) in fds.iter().enumerate() {
                    if *fd >= 0 && libc::dup2(*fd, super::serve::FD_SOCKET + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // A descriptor not passed is closed, whatever the parent had open there.
                    if *fd < 0 {
                        libc::close(super::serve::FD_SOCKET + i as i32);
                    }
                }
                // The backend dies with the VMM (with the thread that started it, which lives
                // as long as the VM or restarts it). SIGTERM (a disk's backend) stays blocked
                // across exec until the backend has its handler, which writes the ring first.
                if death_signal == libc::SIGTERM {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, libc::SIGTERM);
                    libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("starting {}: {e}", self.program.program.display()))?;
        drop(theirs);
        // SAFETY: pidfd_open of our own child's pid (not yet reaped); the result is checked.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) } as RawFd;
        if pidfd < 0 {
            let e = std::io::Error::last_os_error();
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("pidfd_open: {e}"));
        }
        // SAFETY: a new descriptor owned by nothing else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        // SAFETY: FD_CLOEXEC on our own descriptor.
        unsafe { libc::fcntl(pidfd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        self.proc_ = Some(Proc { child, pidfd, sock: ours });
        // Both sides must be of the same protocol (the program may be another build's).
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        match self.round_trip(&Request::Hello { seq, version: wire::PROTOCOL }.encode(), Duration::from_secs(5)) {
            Ok(r) if r.status == wire::STATUS_OK => {}
            Ok(r) => {
                self.kill();
                return Err(format!(
                    "the backend program {} does not take the VMM's ring protocol {}: {}",
                    self.program.program.display(),
                    wire::PROTOCOL,
                    r.reason
                ));
            }
            Err(f) => {
                self.kill();
                return Err(format!("the new backend {}", f.describe()));
            }
        }
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        match self.round_trip(&Request::Ping { seq }.encode(), Duration::from_secs(5)) {
            Ok(_) => {
                self.last_ok = Instant::now();
                self.missed = 0;
                Ok(())
            }
            Err(f) => {
                self.kill();
                Err(format!("the new backend {}", f.describe()))
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // A disk's acknowledged writes are written, through new backends if need be.
        if self.shared.device == Device::Block && !self.settle() {
            eprintln!("vmm: block backend: writes left in the ring at exit (no backend could write them)");
        }
        // Frames the guest transmitted still go out (a heartbeat is answered once the ring is
        // drained), within one request timeout.
        if let Some(tx) = &self.shared.tx {
            if tx.tail().is_ok_and(|t| t < tx.published.load(Ordering::Acquire)) {
                let mut conn = self.lock();
                conn.seq = conn.seq.wrapping_add(1);
                let (seq, timeout) = (conn.seq, Duration::from_millis(conn.program.timeout_ms));
                let _ = conn.round_trip(&Request::Ping { seq }.encode(), timeout);
            }
        }
        self.lock().kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::serve::{FD_PROGRESS, FD_SOCKET};

    /// Whether this process was started as a backend (descriptor 3 a seqpacket socket).
    fn started_as_backend() -> bool {
        let mut ty: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes one int into `ty`; a descriptor that is no socket fails.
        let r = unsafe { libc::getsockopt(FD_SOCKET, libc::SOL_SOCKET, libc::SO_TYPE, (&mut ty as *mut libc::c_int).cast(), &mut len) };
        r == 0 && ty == libc::SOCK_SEQPACKET
    }

    /// A backend that answers heartbeats and misbehaves on every other request, the way
    /// `mode` says. Runs (as its own test) only in a process started by `Backend`.
    fn fake(mode: &str) {
        if !started_as_backend() {
            return;
        }
        if mode == "real" {
            let r = crate::backend::serve();
            if let Err(e) = &r {
                // (Straight to descriptor 2: the test harness captures eprintln.)
                let msg = format!("fake backend (real): {e}\n");
                // SAFETY: writes our own buffer to stderr.
                unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
            }
            std::process::exit(if r.is_ok() { 0 } else { 2 });
        }
        if mode == "forbidden" {
            crate::backend::confine::confine().expect("seccomp");
        }
        // SAFETY: descriptor 6 is the progress page the VMM passed.
        let progress = Progress::new(Mapping::map(unsafe { BorrowedFd::borrow_raw(FD_PROGRESS) }).expect("map")).expect("page");
        // SAFETY: descriptor 7 is the transmit ring the VMM passed (network).
        let ring =
            Mapping::map(unsafe { BorrowedFd::borrow_raw(crate::backend::serve::FD_RING) }).ok().and_then(|m| FrameRing::new(m).ok());
        // SAFETY: descriptor 9 is the receive ring the VMM passed (network).
        let rx_ring =
            Mapping::map(unsafe { BorrowedFd::borrow_raw(crate::backend::serve::FD_RX_RING) }).ok().and_then(|m| FrameRing::new(m).ok());
        let mut buf = vec![0u8; MAX_MSG + 1];
        let mut n_req = 0u32;
        loop {
            // SAFETY: receives into our own buffer.
            let n = unsafe { libc::recv(FD_SOCKET, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                std::process::exit(0);
            }
            let m = &buf[..n as usize];
            let (op, seq, count) = (
                u32::from_le_bytes([m[0], m[1], m[2], m[3]]),
                u32::from_le_bytes([m[4], m[5], m[6], m[7]]),
                u32::from_le_bytes([m[8], m[9], m[10], m[11]]),
            );
            let ok = |done: u32| Reply { op, seq, done, status: STATUS_OK, reason: String::new() }.encode();
            let reply = if op == wire::OP_HELLO && mode == "other_protocol" {
                // A backend of another build, as an older one answers a request it does not know.
                Reply { op, seq, done: 0, status: wire::STATUS_REFUSED, reason: format!("unknown operation {op}") }.encode()
            } else if op == wire::OP_HELLO {
                ok(0)
            } else if op == wire::OP_PING && mode == "scribble" {
                // A buggy backend writing garbage over the ring: a tail past the head (or
                // far past it), slots full of junk.
                if let Some(r) = &ring {
                    r.set_tail(if seq % 2 == 0 { u64::MAX } else { r.head() + 1000 });
                    for i in 0..8u64 {
                        r.scribble(4096 + i * 2048, &[0xa5; 64]);
                    }
                }
                if let Some(r) = &rx_ring {
                    r.set_head(if seq % 2 == 0 { u64::MAX } else { r.tail() + 1000 });
                }
                ok(0)
            } else if op == wire::OP_PING {
                ok(0)
            } else {
                n_req += 1;
                match mode {
                    "crash" => std::process::exit(3),
                    // SAFETY: socket(2) with constant arguments, refused by the filter.
                    "forbidden" => vec![unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) } as u8],
                    "silent" => loop {
                        std::thread::sleep(Duration::from_secs(1));
                    },
                    _ => match n_req % 6 {
                        0 => vec![0xff; 7],
                        1 => Reply { op, seq: seq.wrapping_add(1), done: 0, status: STATUS_OK, reason: String::new() }.encode(),
                        2 => ok(count + 5),
                        3 => Reply { op, seq, done: 0, status: 9, reason: String::new() }.encode(),
                        4 => {
                            // Claims frames received, with lengths past their buffers.
                            progress.begin(seq);
                            for i in 0..count as usize {
                                progress.record(i, 99_999);
                            }
                            ok(count)
                        }
                        _ => ok(count.saturating_sub(1)),
                    },
                }
            };
            // SAFETY: sends our own buffer on our socket.
            unsafe { libc::send(FD_SOCKET, reply.as_ptr().cast(), reply.len(), libc::MSG_NOSIGNAL) };
        }
    }

    #[test]
    fn fake_backend_garbage() {
        fake("garbage");
    }
    #[test]
    fn fake_backend_crash() {
        fake("crash");
    }
    #[test]
    fn fake_backend_silent() {
        fake("silent");
    }
    #[test]
    fn fake_backend_real() {
        fake("real");
    }
    #[test]
    fn fake_backend_scribble() {
        fake("scribble");
    }
    #[test]
    fn fake_backend_forbidden() {
        fake("forbidden");
    }
    #[test]
    fn fake_backend_other_protocol() {
        fake("other_protocol");
    }

    /// A backend program that does not take this VMM's ring protocol (another build of vigil)
    /// is refused at its start, naming the program and the protocol, before any request.
    #[test]
    fn a_backend_of_another_protocol_is_refused_by_name() {
        let mem = memfd(c"test-guest", 1 << 20).expect("memfd");
        let mut pair = [0; 2];
        // SAFETY: socketpair fills two descriptors.
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, pair.as_mut_ptr()) }, 0);
        // SAFETY: both are new and ours.
        let (tap, _peer) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
        let p = program("other_protocol");
        let e = Backend::start(Device::Net, &p, mem.as_fd(), tap.as_fd()).err().expect("refused");
        assert!(e.contains(&format!("ring protocol {}", wire::PROTOCOL)) && e.contains(&p.program.display().to_string()), "{e}");
        assert!(e.contains("unknown operation"), "{e}");
    }

    /// A backend under the seccomp filter that makes a forbidden system call (a socket) dies
    /// of SIGSYS, and is replaced like any crashed backend; the VMM gives the request up after
    /// a few restarts.
    #[test]
    fn a_forbidden_system_call_kills_the_backend_and_it_is_replaced() {
        let mem = memfd(c"test-guest", 1 << 20).expect("memfd");
        let mut pair = [0; 2];
        // SAFETY: socketpair fills two descriptors.
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, pair.as_mut_ptr()) }, 0);
        // SAFETY: both are new and ours.
        let (tap, _peer) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
        let b = Backend::start(Device::Net, &program("forbidden"), mem.as_fd(), tap.as_fd()).expect("start");
        assert_eq!(b.tx(&[(0x1000, 60)]), 0);
        let st = b.status();
        assert!(st.restarts >= 3, "{st:?}");
        // Each one crashed, of SIGSYS where its exit was collected in time to say so.
        assert!(st.incidents.iter().all(|i| i.cause.starts_with("crashed")), "{st:?}");
        assert!(st.incidents.iter().any(|i| i.cause.contains("SIGSYS")), "{st:?}");
        assert!(st.pid != 0, "a backend runs again: {st:?}");
    }

    fn program(mode: &str) -> BackendProgram {
        let exe = std::env::current_exe().expect("test binary");
        let test = format!("backend::client::tests::fake_backend_{mode}");
        BackendProgram {
            period_ms: 20,
            timeout_ms: 50,
            ..BackendProgram::new(exe, vec!["--exact".into(), test, "--test-threads=1".into(), "-q".into()])
        }
    }

    /// A backend that answers garbage, crashes on every request or never answers costs the VM
    /// its frames, never the VMM: each failure is detected, the backend replaced, and after
    /// a few restarts the request is given up (frames dropped, as on a wire).
    #[test]
    fn a_misbehaving_backend_never_takes_the_vmm_down() {
        let mem = memfd(c"test-guest", 1 << 20).expect("memfd");
        let mut pair = [0; 2];
        // SAFETY: socketpair fills two descriptors.
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, pair.as_mut_ptr()) }, 0);
        // SAFETY: both are new and ours.
        let (tap, _peer) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
        for (mode, cause) in [("garbage", "misbehaved"), ("crash", "crashed"), ("silent", "hung")] {
            let b = Backend::start(Device::Net, &program(mode), mem.as_fd(), tap.as_fd()).expect("start");
            for round in 0..2 {
                let lens = b.rx(&[(0x1000, 2048), (0x2000, 2048)]);
                assert!(lens.len() <= 2 && lens.iter().all(|l| (1..=2048).contains(l)), "{mode} round {round}: {lens:?}");
                assert!(b.tx(&[(0x1000, 60)]) <= 1);
                let mut p = 60u16.to_le_bytes().to_vec();
                p.extend([0u8; 60]);
                assert!(b.send(&p) <= 1);
            }
            let st = b.status();
            assert!(st.restarts >= 3, "{mode}: {st:?}");
            assert!(st.incidents.iter().any(|i| i.cause.starts_with(cause)), "{mode}: {st:?}");
        }
        // A program that never answers its first heartbeat is refused with a reason.
        let e = Backend::start(Device::Net, &BackendProgram::new("/bin/true", vec![]), mem.as_fd(), tap.as_fd()).err().expect("refused");
        assert!(e.contains("the new backend crashed"), "{e}");
    }
}

#[cfg(test)]
mod ring_tests {
    use super::tests_support::*;
    use super::*;

    /// Frames `0..n` sent and drained, then the backend stopped (SIGSTOP, waited for): its pid.
    fn sent_then_stopped(b: &Backend, n: u32) -> u32 {
        push_range(b, 0..n);
        b.drain();
        let pid = b.status().pid;
        signal(pid, libc::SIGSTOP);
        wait_stopped(pid);
        pid
    }

    /// SIGKILL of a backend with frames queued in its transmit ring (stopped first, so that
    /// they stay queued): the next process sends exactly those, none lost, none twice.
    #[test]
    fn frames_queued_in_the_ring_survive_a_sigkill_exactly_once() {
        let t = Tap::new();
        let b = Backend::start(Device::Net, &program("real", 50, 5_000), t.mem.as_fd(), t.tap.as_fd()).expect("start");
        let reader = t.reader(200);
        let pid = sent_then_stopped(&b, 50);
        push_range(&b, 50..150);
        signal(pid, libc::SIGKILL);
        wait_restarts(&b, 1);
        push_range(&b, 150..200);
        b.drain();
        let got = reader.join().expect("reader");
        assert_eq!(got, (0..200).collect::<Vec<u32>>());
        let st = b.status();
        assert_eq!(st.incidents.len(), 1, "{st:?}");
        assert!(st.incidents[0].cause.starts_with("crashed"), "{st:?}");
        assert_eq!(st.incidents[0].ring, 100, "{st:?}");
        assert_eq!((st.ring_frames, st.ring_dropped), (200, 0), "{st:?}");
    }

    /// SIGKILLs at random moments while frames stream through the ring: none is lost; a
    /// frame goes out twice only when a kill lands between its write and the tail's store.
    #[test]
    fn frames_stream_through_random_sigkills_without_loss() {
        let t = Tap::new();
        let b = Arc::new(Backend::start(Device::Net, &program("real", 50, 5_000), t.mem.as_fd(), t.tap.as_fd()).expect("start"));
        const N: u32 = 3000;
        let reader = t.reader(N as usize);
        let pusher = {
            let b = b.clone();
            std::thread::spawn(move || {
                for i in 0..N {
                    assert!(b.push(&frame(i)), "frame {i} not queued");
                    if i % 8 == 7 {
                        b.publish();
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                b.publish();
            })
        };
        let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ std::process::id() as u64;
        let mut kills = 0;
        while !pusher.is_finished() && kills < 15 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            std::thread::sleep(Duration::from_millis(5 + x % 30));
            let before = b.status().restarts;
            signal(b.status().pid, libc::SIGKILL);
            kills += 1;
            wait_restarts(&b, before + 1);
        }
        pusher.join().expect("pusher");
        b.drain();
        let got = reader.join().expect("reader");
        let mut unique = got.clone();
        unique.dedup();
        assert_eq!(unique, (0..N).collect::<Vec<u32>>(), "lost or reordered frames after {kills} kills");
        let twice = got.len() - unique.len();
        assert!(twice <= kills, "{twice} frames sent twice in {kills} kills");
        eprintln!("{kills} kills, {twice} frames sent twice, status {:?}", b.status().incidents.iter().map(|i| i.ring).collect::<Vec<_>>());
    }

    /// A stopped backend (SIGSTOP) with a full ring: the vCPU's wait for room times out, the
    /// backend is declared hung, replaced, and the ring replayed; every frame goes out once.
    #[test]
    fn a_hung_backend_with_a_full_ring_is_replaced() {
        let t = Tap::new();
        let b = Backend::start(Device::Net, &program("real", 20, 100), t.mem.as_fd(), t.tap.as_fd()).expect("start");
        let reader = t.reader(600);
        // (The stopped process is the supervisor's to replace: its pid is not needed here.)
        sent_then_stopped(&b, 50);
        let start = Instant::now();
        push_range(&b, 50..600);
        b.drain();
        assert!(start.elapsed() >= Duration::from_millis(100), "{:?}", start.elapsed());
        let got = reader.join().expect("reader");
        assert_eq!(got, (0..600).collect::<Vec<u32>>());
        let st = b.status();
        assert!(st.incidents.iter().any(|i| i.cause.starts_with("hung")), "{st:?}");
        assert!(st.ring_full >= 1 && st.ring_dropped == 0, "{st:?}");
    }

    /// Frames the backend read ahead into the receive ring reach the VMM in order; frames that
    /// arrive while it is stopped wait in the tap and the next process, after a SIGKILL, reads
    /// them: none lost, none twice.
    #[test]
    fn received_frames_survive_a_sigkill_of_the_backend() {
        let t = Tap::new();
        let b = Backend::start(Device::Net, &program("real", 50, 5_000), t.mem.as_fd(), t.tap.as_fd()).expect("start");
        let send = |r: std::ops::Range<u32>| {
            let peer = t.peer.try_clone().expect("dup");
            std::thread::spawn(move || {
                for i in r {
                    let f = frame(i);
                    // SAFETY: writes our own buffer to our socket (blocking while its queue is full).
                    assert_eq!(unsafe { libc::write(peer.as_raw_fd(), f.as_ptr().cast(), f.len()) }, 60);
                }
            })
        };
        let take = |n: usize, got: &mut Vec<u32>| {
            let mut slot = [0u8; RING_SLOT];
            let t0 = Instant::now();
            while got.len() < n && t0.elapsed() < Duration::from_secs(5) {
                match b.rx_take(&mut slot) {
                    Some(len) => {
                        assert_eq!(len, 60);
                        got.push(u32::from_le_bytes([slot[0], slot[1], slot[2], slot[3]]));
                    }
                    None => {
                        b.rx_done();
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            b.rx_done();
        };
        let mut got = vec![];
        send(0..100).join().expect("sender");
        take(100, &mut got);
        let pid = b.status().pid;
        signal(pid, libc::SIGSTOP);
        wait_stopped(pid);
        let sender = send(100..150);
        std::thread::sleep(Duration::from_millis(20));
        signal(pid, libc::SIGKILL);
        wait_restarts(&b, 1);
        sender.join().expect("sender");
        take(150, &mut got);
        assert_eq!(got, (0..150).collect::<Vec<u32>>());
        assert_eq!(b.status().rx_ring_frames, 150);
    }

    /// A stopped backend while frames wait at the tap (the receive ring has room): the monitor
    /// declares it hung after the request timeout, not after missed heartbeats, and the next
    /// process reads the frames.
    #[test]
    fn a_hung_backend_with_frames_waiting_at_the_tap_is_replaced() {
        let t = Tap::new();
        let b = Backend::start(Device::Net, &program("real", 50, 100), t.mem.as_fd(), t.tap.as_fd()).expect("start");
        let pid = b.status().pid;
        signal(pid, libc::SIGSTOP);
        wait_stopped(pid);
        let at = Instant::now();
        let f = frame(7);
        // SAFETY: writes our own buffer to our socket.
        assert_eq!(unsafe { libc::write(t.peer.as_raw_fd(), f.as_ptr().cast(), f.len()) }, 60);
        wait_restarts(&b, 1);
        let took = at.elapsed();
        let st = b.status();
        assert!(st.incidents[0].cause.starts_with("hung"), "{st:?}");
        assert!(took >= Duration::from_millis(100) && took < Duration::from_millis(1000), "{took:?}");
        let mut slot = [0u8; RING_SLOT];
        let t0 = Instant::now();
        let got = loop {
            if let Some(n) = b.rx_take(&mut slot) {
                break n;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "no frame after the restart");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!((got, slot[0]), (60, 7));
        eprintln!("hang detected and repaired in {took:?}");
    }

    /// A backend that writes garbage over the ring (a tail past the head, junk in the slots)
    /// is replaced each time it is caught; the VMM never panics, and frames the ring cannot
    /// take are dropped, as on a wire.
    #[test]
    fn a_backend_scribbling_on_the_ring_never_takes_the_vmm_down() {
        let t = Tap::new();
        let b = Backend::start(Device::Net, &program("scribble", 20, 50), t.mem.as_fd(), t.tap.as_fd()).expect("start");
        for i in 0..20 {
            b.push(&frame(i));
            b.publish();
        }
        let mut slot = [0u8; RING_SLOT];
        for _ in 0..5 {
            assert_eq!(b.rx_take(&mut slot), None);
            b.rx_done();
        }
        std::thread::sleep(Duration::from_millis(100));
        let st = b.status();
        assert!(st.restarts >= 3, "{st:?}");
        assert!(st.incidents.iter().any(|i| i.cause.contains("receive ring's head")), "{st:?}");
        assert!(st.incidents.iter().any(|i| i.cause.starts_with("misbehaved") && i.cause.contains("tail")), "{st:?}");
        drop(b);
        // The real backend after it: a ring reset to its last good tail works again.
        let b = Backend::start(Device::Net, &program("real", 50, 5_000), t.mem.as_fd(), t.tap.as_fd()).expect("start");
        let reader = t.reader(10);
        push_range(&b, 0..10);
        b.drain();
        assert_eq!(reader.join().expect("reader"), (0..10).collect::<Vec<u32>>());
    }
}

/// What the ring tests share: a guest memory, a "tap" (a datagram socket pair whose peer
/// reads the frames), the test binary as a backend.
#[cfg(test)]
mod tests_support {
    use super::*;

    pub struct Tap {
        pub mem: OwnedFd,
        pub tap: OwnedFd,
        pub peer: OwnedFd,
    }

    impl Tap {
        pub fn new() -> Tap {
            let mem = memfd(c"test-guest", 1 << 20).expect("memfd");
            let mut pair = [0; 2];
            // SAFETY: socketpair fills two descriptors.
            assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0, pair.as_mut_ptr()) }, 0);
            // SAFETY: both are new and ours.
            let (tap, peer) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
            Tap { mem, tap, peer }
        }

        /// A thread reading frame numbers at the peer until `n` came or none for 3 s.
        pub fn reader(&self, n: usize) -> std::thread::JoinHandle<Vec<u32>> {
            let peer = self.peer.try_clone().expect("dup");
            std::thread::spawn(move || {
                let mut got = vec![];
                let mut buf = [0u8; 2048];
                let timeout = |tv: libc::timeval| {
                    // SAFETY: sets a receive timeout from a live timeval on our own socket.
                    unsafe {
                        libc::setsockopt(
                            peer.as_raw_fd(),
                            libc::SOL_SOCKET,
                            libc::SO_RCVTIMEO,
                            (&tv as *const libc::timeval).cast(),
                            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                        )
                    }
                };
                timeout(libc::timeval { tv_sec: 3, tv_usec: 0 });
                while got.len() < n + 50 {
                    // SAFETY: reads into our own buffer.
                    let r = unsafe { libc::read(peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    if r < 4 {
                        break;
                    }
                    got.push(u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]));
                    if got.len() >= n && got.last() == Some(&(n as u32 - 1)) {
                        // Anything more would be a duplicate: wait briefly for it.
                        timeout(libc::timeval { tv_sec: 0, tv_usec: 200_000 });
                    }
                }
                got
            })
        }
    }

    pub fn program(mode: &str, period_ms: u64, timeout_ms: u64) -> BackendProgram {
        let exe = std::env::current_exe().expect("test binary");
        let test = format!("backend::client::tests::fake_backend_{mode}");
        BackendProgram {
            period_ms,
            timeout_ms,
            ..BackendProgram::new(exe, vec!["--exact".into(), test, "--test-threads=1".into(), "-q".into()])
        }
    }

    /// A 60-byte frame carrying `i`.
    pub fn frame(i: u32) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[..4].copy_from_slice(&i.to_le_bytes());
        f
    }

    pub fn push_range(b: &Backend, r: std::ops::Range<u32>) {
        for i in r {
            assert!(b.push(&frame(i)), "frame {i} not queued");
        }
        b.publish();
    }

    pub fn signal(pid: u32, sig: i32) {
        assert!(pid != 0);
        // SAFETY: kill(2) of the backend this test's VMM side started (its child).
        unsafe { libc::kill(pid as i32, sig) };
    }

    /// Waits until process `pid` is stopped (a signal takes effect asynchronously).
    pub fn wait_stopped(pid: u32) {
        let t = Instant::now();
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T')) {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "{pid} not stopped: {stat}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn wait_restarts(b: &Backend, n: u64) {
        let t = Instant::now();
        while b.status().restarts < n {
            assert!(t.elapsed() < Duration::from_secs(5), "no restart: {:?}", b.status());
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod write_ring_tests {
    use super::tests_support::*;
    use super::*;
    use vmm_abi::SECTOR_SIZE;

    /// A disk file of `sectors` zeroed sectors, removed on drop.
    struct Disk {
        path: PathBuf,
        file: std::fs::File,
    }

    impl Disk {
        fn new(name: &str, sectors: u64) -> Disk {
            let path = std::env::temp_dir().join(format!("vigil-write-ring-{name}-{}", std::process::id()));
            let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).expect("disk");
            file.set_len(sectors * SECTOR_SIZE).expect("size");
            Disk { path, file }
        }

        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.path).expect("read the disk")
        }
    }

    impl Drop for Disk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// The real backend on a new disk of `sectors` sectors (dropped in this order: the
    /// backend settles its ring before the disk file goes).
    fn started(name: &str, sectors: u64) -> (Backend, Tap, Disk) {
        let disk = Disk::new(name, sectors);
        let t = Tap::new();
        let b = Backend::start(Device::Block, &program("real", 50, 5_000), t.mem.as_fd(), disk.file.as_fd()).expect("start");
        (b, t, disk)
    }

    /// Write `i`: 1 to 20 sectors (up to three ring entries) at a sector of its own, each byte
    /// `i`; the expected disk updated.
    fn write(b: &Backend, expected: &mut [u8], i: u32) {
        let sectors = 1 + (i as u64 * 7) % 20;
        let sector = (i as u64 * 13) % 400;
        let data = vec![i as u8; (sectors * SECTOR_SIZE) as usize];
        assert!(b.queue_write(sector, &data), "write {i} not queued");
        let at = (sector * SECTOR_SIZE) as usize;
        expected[at..at + data.len()].copy_from_slice(&data);
    }

    /// Guest writes queued in the ring while the backend is stopped, then SIGKILLed: the next
    /// process writes every one, in order (later writes over earlier ones to the same
    /// sectors), and the disk holds exactly what the guest wrote.
    #[test]
    fn writes_queued_in_the_ring_survive_a_sigkill_of_the_backend() {
        let (b, _t, disk) = started("kill", 512);
        assert!(b.has_ring());
        let mut expected = vec![0u8; 512 * SECTOR_SIZE as usize];
        for i in 0..40 {
            write(&b, &mut expected, i);
        }
        b.publish();
        b.drain();
        let pid = b.status().pid;
        signal(pid, libc::SIGSTOP);
        wait_stopped(pid);
        for i in 40..140 {
            write(&b, &mut expected, i);
            b.publish();
        }
        signal(pid, libc::SIGKILL);
        wait_restarts(&b, 1);
        for i in 140..200 {
            write(&b, &mut expected, i);
        }
        assert!(b.settle());
        assert!(disk.bytes() == expected, "the disk differs from the guest's writes");
        let st = b.status();
        assert!(st.incidents.len() == 1 && st.incidents[0].cause.starts_with("crashed"), "{st:?}");
        assert!(st.incidents[0].ring > 0, "writes were waiting in the ring: {st:?}");
        assert_eq!((st.ring_dropped, b.write_failures()), (0, 0), "{st:?}");
    }

    /// A backend told to end (SIGTERM: what it gets when its VMM dies) writes what waits in
    /// the ring first.
    #[test]
    fn a_backend_told_to_end_writes_the_ring_first() {
        let (b, _t, disk) = started("term", 512);
        let mut expected = vec![0u8; 512 * SECTOR_SIZE as usize];
        let pid = b.status().pid;
        signal(pid, libc::SIGSTOP);
        wait_stopped(pid);
        for i in 0..100 {
            write(&b, &mut expected, i);
        }
        b.publish();
        signal(pid, libc::SIGTERM);
        signal(pid, libc::SIGCONT);
        wait_restarts(&b, 1);
        // The process that ended wrote them all: nothing was left for the next one.
        assert!(disk.bytes() == expected, "the disk differs from the guest's writes");
        let st = b.status();
        assert_eq!(st.incidents[0].ring, 0, "{st:?}");
    }

    /// The protection's thread settles the ring while the vCPU's writes are queued but not
    /// yet published: they are published and written before it returns.
    #[test]
    fn another_thread_settles_the_ring_with_what_was_queued() {
        let (b, _t, disk) = started("settler", 512);
        let mut expected = vec![0u8; 512 * SECTOR_SIZE as usize];
        for i in 0..50 {
            write(&b, &mut expected, i);
        }
        let s = b.settler();
        assert!(std::thread::spawn(move || s.settle()).join().expect("thread"));
        assert!(disk.bytes() == expected, "the disk differs from the guest's writes");
        let s = b.settler();
        drop(b);
        assert!(s.settle(), "a settler outliving its backend does nothing");
    }

    /// Writes published without a kick (`publish_lazy`) reach the disk anyway: at the guest's
    /// idle call (`kick_owed`), or by the monitor's next look when the guest never idles.
    #[test]
    fn writes_published_without_a_kick_reach_the_disk() {
        let (b, _t, disk) = started("lazy", 512);
        let mut expected = vec![0u8; 512 * SECTOR_SIZE as usize];
        let written = |expected: &[u8]| {
            let t = Instant::now();
            while disk.bytes() != expected {
                assert!(t.elapsed() < Duration::from_secs(2), "not written");
                std::thread::sleep(Duration::from_millis(1));
            }
            t.elapsed()
        };
        std::thread::sleep(Duration::from_millis(20));
        write(&b, &mut expected, 1);
        b.publish_lazy();
        b.kick_owed();
        written(&expected);
        // No idle call: the monitor kicks it (its period is 50 ms here).
        std::thread::sleep(Duration::from_millis(20));
        write(&b, &mut expected, 2);
        b.publish_lazy();
        let took = written(&expected);
        assert!(took < Duration::from_millis(500), "{took:?}");
        assert_eq!(b.status().restarts, 0, "no false hang");
    }

    /// A write the backend cannot do (here: sectors past the end of the disk, as a host error
    /// would) is counted, never retried forever, and the ring goes on.
    #[test]
    fn a_write_the_host_refuses_is_counted_and_the_ring_goes_on() {
        let (b, _t, disk) = started("fail", 64);
        assert!(b.queue_write(60, &vec![1u8; 8 * SECTOR_SIZE as usize]));
        assert!(b.queue_write(0, &vec![2u8; SECTOR_SIZE as usize]));
        assert!(b.settle());
        assert_eq!(b.write_failures(), 1);
        assert_eq!(disk.bytes()[..SECTOR_SIZE as usize], vec![2u8; SECTOR_SIZE as usize][..]);
        assert_eq!(b.status().restarts, 0);
    }
}
