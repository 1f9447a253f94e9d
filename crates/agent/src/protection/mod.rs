//! Protection of a VM by checkpoint replication: the thin I/O drivers that run the state
//! machines of [`replication::primary`] and [`replication::backup`] against a real VM (the
//! `vmm` crate), TCP connections and the arbiter.
//!
//! Each driver is one loop on one thread that owns the state machine. Everything that can
//! block — reading the peer's frames, sending a checkpoint, asking the arbiter, the VM itself
//! — runs on its own thread and reports to the loop through one channel of [`Input`]s, so the
//! loop only ever waits in one place and the order of events is the order the machine sees.
//!
//! Every replication connection starts with a mutual challenge–response under the cluster's
//! key ([`handshake`]) before the state machine hears of it: a peer without the key never
//! reaches a session, let alone replaces the live one.

pub mod backup;
pub mod primary;
pub mod stats;

use crate::auth::{self, Key, TAG};
use crate::fencing;
use replication::lease::Answer;
use replication::wire::{self, Msg, WireError};
use replication::PolicySpec;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

/// Nanoseconds since the driver started (the state machines' clock).
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Clock {
        Clock(Instant::now())
    }
    pub fn now(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// What the helper threads tell a driver loop.
pub enum Input {
    /// A frame (or a stream error) from connection `conn`.
    Frame { conn: u64, msg: Result<Msg, WireError> },
    /// A connection attempt finished.
    Connected { conn: u64, stream: Result<TcpStream, String> },
    /// A connection was accepted (backup).
    Accepted { stream: TcpStream },
    /// The arbiter answered a request sent at `sent_at`.
    Lease { sent_at: u64, answer: Result<Answer, String> },
    /// The sender of connection `conn` finished the initial synchronisation.
    SyncSent { conn: u64 },
    /// The sender of connection `conn` wrote checkpoint `epoch` in `transfer_ns`.
    /// (`wire_bytes`: its page frames' bytes, `encoding`: how they travelled.)
    Sent { conn: u64, epoch: u64, transfer_ns: u64, buffer: Vec<u8>, wire_bytes: u64, encoding: replication::compress::Encoding },
    /// A staging buffer readied for later checkpoints (its pages mapped) on a thread of its
    /// own, for the driver's spares.
    Spare { buffer: Vec<u8> },
    /// The sender of connection `conn` failed.
    SendFailed { conn: u64, reason: String },
    /// The VM stopped.
    VmStopped(Result<vmm::Stop, String>),
    /// The VM put the first frame of output into the open epoch.
    Output,
    /// An operator asked for another checkpoint policy.
    Policy(PolicySpec),
    /// The agent asks the VM's process to migrate it ([`crate::migration`]); the answer goes
    /// back on the sender.
    Migrate(crate::migration::Request, Sender<Result<String, String>>),
}

/// Reads frames from `stream` on a thread until it fails, tagging them with `conn`.
pub fn spawn_reader(conn: u64, stream: TcpStream, tx: Sender<Input>) {
    spawn_reader_recycling(conn, stream, tx, Spare::default())
}

/// Page buffers of applied checkpoints, handed back to the reader for the next frames (their
/// memory is mapped already: a fresh buffer costs a page fault per 4 KiB on these hosts).
#[derive(Clone, Default)]
pub struct Spare(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl Spare {
    /// Most buffers kept (of up to 4 MiB each).
    const MAX: usize = 16;

    /// Keeps `buf` for a later frame (unless enough are kept already).
    pub fn put(&self, buf: Vec<u8>) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() < Self::MAX {
            v.push(buf);
        }
    }

    fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }
}

/// As [`spawn_reader`], reading pages into buffers from `spare`.
pub fn spawn_reader_recycling(conn: u64, stream: TcpStream, tx: Sender<Input>, spare: Spare) {
    let _ = std::thread::Builder::new().name(format!("repl-read-{conn}")).spawn(move || {
        let mut r = std::io::BufReader::with_capacity(1 << 20, stream);
        loop {
            let mut local: Vec<Vec<u8>> = spare.take().into_iter().collect();
            let msg = wire::read_msg_recycling(&mut r, &mut local);
            for b in local {
                spare.put(b);
            }
            let end = msg.is_err();
            if tx.send(Input::Frame { conn, msg }).is_err() || end {
                return;
            }
        }
    });
}

/// Sends lease requests to `service` (an arbiter's HOST:PORT, or `store:SOCKET`: the VM's lease
/// record in the store, [`crate::fencing`]) from a thread, one at a time with a timeout, and
/// reports answers.
pub fn spawn_arbiter(service: &str, timeout: Duration, key: Key, clock: Clock, tx: Sender<Input>) -> fencing::Lease {
    // Checked when the spec was read (`VmSpec::check`, `run_backup`): a bad one here answers
    // every request with its error.
    let service = service.parse::<fencing::Service>();
    fencing::spawn(service, timeout, key, move || clock.now(), tx, |sent_at, answer| Input::Lease { sent_at, answer })
}

/// A random 64-bit id (sessions).
pub fn random_id() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64) ^ std::process::id() as u64;
    u64::from_le_bytes(b) ^ t.rotate_left(32)
}

/// The two sides of a replication connection's authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Primary,
    Backup,
}

const MAGIC: &[u8; 8] = b"VIGILRP1";

/// Mutual authentication of a new replication connection under the cluster's key, within
/// `timeout`: the backup sends a magic and a fresh nonce, the primary answers with its own
/// nonce and a tag over both, the backup answers with a tag over both in the other order.
/// Each side proves it holds the key on a challenge the other chose; nothing of the session
/// flows before both succeeded.
pub fn handshake(stream: &mut TcpStream, key: &Key, side: Side, timeout: Duration) -> Result<(), String> {
    let old = stream.read_timeout().ok().flatten();
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let r = exchange(stream, key, side);
    stream.set_read_timeout(old).map_err(|e| e.to_string())?;
    r
}

fn exchange(s: &mut TcpStream, key: &Key, side: Side) -> Result<(), String> {
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "the peer closed the connection during authentication (another cluster's key?)".to_string(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "the peer did not authenticate in time".to_string(),
        _ => format!("authentication: {e}"),
    };
    let mut mine = [0u8; 16];
    auth::random(&mut mine).map_err(io)?;
    match side {
        Side::Backup => {
            let mut hello = [0u8; 24];
            hello[..8].copy_from_slice(MAGIC);
            hello[8..].copy_from_slice(&mine);
            s.write_all(&hello).map_err(io)?;
            let mut answer = [0u8; 16 + TAG];
            s.read_exact(&mut answer).map_err(io)?;
            let theirs = &answer[..16];
            if !key.verify(&[b"vigil-repl-primary", &mine, theirs], &answer[16..]) {
                return Err("the peer is not authenticated (wrong key, or not a vigil primary)".into());
            }
            s.write_all(&key.tag(&[b"vigil-repl-backup", theirs, &mine])).map_err(io)
        }
        Side::Primary => {
            let mut hello = [0u8; 24];
            s.read_exact(&mut hello).map_err(io)?;
            if &hello[..8] != MAGIC {
                return Err("the peer is not a vigil backup".into());
            }
            let theirs = &hello[8..];
            let mut answer = [0u8; 16 + TAG];
            answer[..16].copy_from_slice(&mine);
            answer[16..].copy_from_slice(&key.tag(&[b"vigil-repl-primary", theirs, &mine]));
            s.write_all(&answer).map_err(io)?;
            let mut tag = [0u8; TAG];
            s.read_exact(&mut tag).map_err(io)?;
            if !key.verify(&[b"vigil-repl-backup", &mine, theirs], &tag) {
                return Err("the backup is not authenticated (wrong key)".into());
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(kp: Key, kb: Key) -> (Result<(), String>, Result<(), String>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let b = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            handshake(&mut s, &kb, Side::Backup, Duration::from_secs(2))
        });
        let mut s = TcpStream::connect(addr).expect("connect");
        let p = handshake(&mut s, &kp, Side::Primary, Duration::from_secs(2));
        drop(s);
        (p, b.join().expect("join"))
    }

    #[test]
    fn only_peers_with_the_same_key_get_through() {
        let k = |b| Key::from_bytes(vec![b; 32]).expect("key");
        assert_eq!(pair(k(1), k(1)), (Ok(()), Ok(())));
        let (p, b) = pair(k(1), k(2));
        assert!(b.is_err_and(|e| e.contains("not authenticated")));
        assert!(p.is_err(), "the primary learns it too");
        // A peer that says nothing is timed out.
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let _idle = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (mut s, _) = l.accept().expect("accept");
        let t = std::time::Instant::now();
        let e = handshake(&mut s, &k(1), Side::Backup, Duration::from_millis(200)).unwrap_err();
        assert!(e.contains("in time"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
