//! The disk mirror: guest disk writes on their way from the block device (on the vCPU thread)
//! to the replication driver's sender, bounded by bytes.
//!
//! A block request whose writes do not fit waits before it starts (the guest's disk I/O slows
//! to the pace at which the driver sends writes to the backup): the VMM puts the guest back on
//! its `out` instruction and serves control commands (checkpoints included) meanwhile, then
//! lets the guest issue it again. Only a request larger than the whole mirror waits inside
//! (after the mirror emptied), write by write. If the driver takes nothing for
//! [`MIRROR_STALL`], waiting ends: the queued writes are dropped, mirroring stops, and the
//! next checkpoint says so ([`crate::Checkpoint::disk_mirror_lost`]): the backup missed
//! writes, so the driver must drop it and synchronise a backup anew.

use crate::checkpoint::DiskWrite;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most bytes of disk writes queued toward the backup by default.
pub const MIRROR_LIMIT: usize = 64 << 20;

/// How long the block device waits for room when the driver takes nothing.
pub const MIRROR_STALL: Duration = Duration::from_secs(10);

struct Queue {
    writes: VecDeque<DiskWrite>,
    bytes: usize,
    /// Bytes ever taken by the receiver (progress).
    taken: u64,
    receiver_gone: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    changed: Condvar,
    limit: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A mirror channel holding at most `limit` bytes of write data (a single write larger than
/// the limit is taken when the queue is empty).
pub fn mirror_channel(limit: usize) -> (MirrorSender, MirrorReceiver) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue { writes: VecDeque::new(), bytes: 0, taken: 0, receiver_gone: false }),
        changed: Condvar::new(),
        limit,
    });
    (MirrorSender { shared: shared.clone() }, MirrorReceiver { shared })
}

/// Why a write could not be queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorError {
    /// The receiver was dropped.
    Gone,
    /// The queue stayed full: the receiver took nothing for `waited`.
    Stalled { queued: usize, waited: Duration },
}

impl std::fmt::Display for MirrorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MirrorError::Gone => write!(f, "the disk mirror's receiver is gone"),
            MirrorError::Stalled { queued, waited } => write!(
                f,
                "the disk mirror stayed full ({queued} bytes queued) and nothing was sent to the backup for {:.1} s",
                waited.as_secs_f64()
            ),
        }
    }
}

/// The block device's side.
#[derive(Clone)]
pub struct MirrorSender {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MirrorSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorSender").field("limit", &self.shared.limit).finish_non_exhaustive()
    }
}

impl MirrorSender {
    /// Queues `w`, waiting while it does not fit. Fails when the receiver is gone, or after
    /// `stall` during which the receiver took nothing (the queue is emptied then).
    pub fn send(&self, w: DiskWrite, stall: Duration) -> Result<(), MirrorError> {
        let len = w.data.len();
        let mut q = self.shared.lock();
        let (mut since, mut seen) = (Instant::now(), q.taken);
        loop {
            if q.receiver_gone {
                return Err(MirrorError::Gone);
            }
            if q.bytes == 0 || q.bytes.saturating_add(len) <= self.shared.limit {
                q.bytes += len;
                q.writes.push_back(w);
                return Ok(());
            }
            if q.taken != seen {
                (since, seen) = (Instant::now(), q.taken);
            }
            let waited = since.elapsed();
            if waited >= stall {
                let queued = q.bytes;
                q.writes.clear();
                q.bytes = 0;
                return Err(MirrorError::Stalled { queued, waited });
            }
            q = self.shared.changed.wait_timeout(q, stall - waited).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Waits up to `wait` until writes of `need` bytes fit (an empty mirror takes any
    /// amount): `Ok(true)` when they do.
    pub fn wait_room(&self, need: usize, wait: Duration) -> Result<bool, MirrorError> {
        let deadline = Instant::now() + wait;
        let mut q = self.shared.lock();
        loop {
            if q.receiver_gone {
                return Err(MirrorError::Gone);
            }
            if q.bytes == 0 || q.bytes.saturating_add(need) <= self.shared.limit {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            q = self.shared.changed.wait_timeout(q, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Bytes the receiver has taken so far (progress).
    pub fn taken(&self) -> u64 {
        self.shared.lock().taken
    }

    /// Drops every queued write (mirroring has stopped).
    pub fn drop_queued(&self) -> usize {
        let mut q = self.shared.lock();
        let bytes = q.bytes;
        q.writes.clear();
        q.bytes = 0;
        bytes
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.shared.lock().bytes
    }
}

/// The replication driver's side.
pub struct MirrorReceiver {
    shared: Arc<Shared>,
}

impl MirrorReceiver {
    /// The oldest queued write, if any.
    pub fn try_recv(&self) -> Option<DiskWrite> {
        let mut q = self.shared.lock();
        let w = q.writes.pop_front()?;
        q.bytes -= w.data.len();
        q.taken += w.data.len() as u64;
        drop(q);
        self.shared.changed.notify_all();
        Some(w)
    }

    /// Drops every queued write (no backup will need them: a new one is synchronised from
    /// the disk itself); returns how many bytes they held.
    pub fn clear(&self) -> usize {
        let mut q = self.shared.lock();
        let bytes = q.bytes;
        q.taken += bytes as u64;
        q.writes.clear();
        q.bytes = 0;
        drop(q);
        self.shared.changed.notify_all();
        bytes
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.shared.lock().bytes
    }

    /// The most bytes the queue holds.
    pub fn limit(&self) -> usize {
        self.shared.limit
    }
}

impl Drop for MirrorReceiver {
    fn drop(&mut self) {
        // Gone and emptied under one lock: a sender woken by the emptying must find the
        // receiver gone, not room (a write queued then would be lost unannounced; the unit
        // test below failed that way once under load).
        let mut q = self.shared.lock();
        q.receiver_gone = true;
        q.taken += q.bytes as u64;
        q.writes.clear();
        q.bytes = 0;
        drop(q);
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(n: usize) -> DiskWrite {
        DiskWrite { epoch: 1, offset: 0, data: vec![0; n] }
    }

    #[test]
    fn a_full_mirror_waits_for_room_and_never_exceeds_its_limit() {
        let (tx, rx) = mirror_channel(4096);
        for _ in 0..8 {
            tx.send(write(512), MIRROR_STALL).expect("fits");
        }
        assert_eq!(rx.queued_bytes(), 4096);
        let sender = {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                tx.send(write(1024), MIRROR_STALL).expect("room came");
                t.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(rx.queued_bytes(), 4096, "the sender waits");
        rx.try_recv().expect("one");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(rx.queued_bytes(), 3584, "512 bytes of room are not enough for 1024");
        rx.try_recv().expect("two");
        let waited = sender.join().expect("sender");
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert_eq!(rx.queued_bytes(), 4096);
        // A write larger than the limit goes in alone.
        rx.clear();
        tx.send(write(10_000), MIRROR_STALL).expect("alone");
    }

    #[test]
    fn a_stalled_mirror_gives_up_and_a_dropped_receiver_is_seen() {
        let (tx, rx) = mirror_channel(1024);
        tx.send(write(1024), MIRROR_STALL).expect("fits");
        let e = tx.send(write(1), Duration::from_millis(50)).expect_err("stalled");
        assert!(matches!(e, MirrorError::Stalled { queued: 1024, .. }), "{e:?}");
        assert!(e.to_string().contains("nothing was sent to the backup"));
        assert_eq!(rx.queued_bytes(), 0, "emptied");
        tx.send(write(1024), MIRROR_STALL).expect("fits again");
        let waiting = {
            let tx = tx.clone();
            std::thread::spawn(move || tx.send(write(1), MIRROR_STALL))
        };
        std::thread::sleep(Duration::from_millis(50));
        drop(rx);
        assert_eq!(waiting.join().expect("thread"), Err(MirrorError::Gone));
    }
}
