//! Protection of a VM by checkpoint replication: the thin I/O drivers that run the state
//! machines of [`replication::primary`] and [`replication::backup`] against a real VM (the
//! `vmm` crate), TCP connections and the arbiter.
//!
//! Each driver is one loop on one thread that owns the state machine. Everything that can
//! block — reading the peer's frames, sending a checkpoint, asking the arbiter, the VM itself
//! — runs on its own thread and reports to the loop through one channel of [`Input`]s, so the
//! loop only ever waits in one place and the order of events is the order the machine sees.

pub mod backup;
pub mod primary;
pub mod stats;

use crate::arbiter;
use replication::lease::{Answer, Request};
use replication::wire::{self, Msg, WireError};
use replication::PolicySpec;
use std::net::TcpStream;
use std::sync::mpsc::{channel, Receiver, Sender};
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
    Sent { conn: u64, epoch: u64, transfer_ns: u64, buffer: Vec<u8> },
    /// The sender of connection `conn` failed.
    SendFailed { conn: u64, reason: String },
    /// The VM stopped.
    VmStopped(Result<vmm::Stop, String>),
    /// The VM put the first frame of output into the open epoch.
    Output,
    /// An operator asked for another checkpoint policy.
    Policy(PolicySpec),
}

/// Reads frames from `stream` on a thread until it fails, tagging them with `conn`.
pub fn spawn_reader(conn: u64, stream: TcpStream, tx: Sender<Input>) {
    let _ = std::thread::Builder::new().name(format!("repl-read-{conn}")).spawn(move || {
        let mut r = std::io::BufReader::with_capacity(1 << 20, stream);
        loop {
            let msg = wire::read_msg(&mut r);
            let end = msg.is_err();
            if tx.send(Input::Frame { conn, msg }).is_err() || end {
                return;
            }
        }
    });
}

/// Sends arbiter requests from a thread (one at a time, with a timeout) and reports answers.
pub fn spawn_arbiter(addr: &str, timeout: Duration, clock: Clock, tx: Sender<Input>) -> Sender<Request> {
    let (rtx, rrx): (Sender<Request>, Receiver<Request>) = channel();
    let mut client = arbiter::Client::new(addr, timeout);
    let _ = std::thread::Builder::new().name("repl-arbiter".into()).spawn(move || {
        for req in rrx {
            let sent_at = clock.now();
            let answer = client.request(&req);
            if tx.send(Input::Lease { sent_at, answer }).is_err() {
                return;
            }
        }
    });
    rtx
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
