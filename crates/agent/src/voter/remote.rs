//! Mode 4 (local + remote): the voted group protected *as one unit* by a backup on another
//! host. The backup holds a donor instance's snapshot (every instance holds the same state)
//! and the **log of every request after it**, in the group's total order; a voted reply leaves
//! only once its request is in that log ([`super::core`], `Config::remote`). At a takeover the
//! backup host restores N instances from the snapshot and replays the log: every instance
//! executes exactly the requests the failed host's instances executed, so every reply a
//! client saw is part of the state that continues (the instances are deterministic state
//! machines over their requests, which voting assumes already: a repair continues a donor's
//! snapshot with the requests after it in the same way).
//!
//! The wire (one TCP connection from the primary's voter to the backup's receiver, both
//! ways framed as `tag: u8, length: u32 (big-endian), payload`):
//!
//! ```text
//! B→A  N nonce(16)                         a new session's challenge
//! A→B  H tag(16) vm                        HMAC(cluster key, "vigil-voted-log", vm, nonce)
//! A→B  F name_len:u8 name offset:u64 data  a chunk of a snapshot file (memory.bin, vcpu0.bin, vm.json)
//! A→B  S position:u64 donor:u8             the snapshot is complete: the state after `position` requests
//! A→B  L from:u64 count:u64 requests       requests from..from+count of the total order
//! B→A  A upto:u64                          the backup holds a complete snapshot and every request before upto
//! B→A  E text                              the session is refused (bad key, bad frame)
//! ```
//!
//! The receiver keeps the replica in a directory: `current` (the complete snapshot's position
//! and directory), `snap-<position>/`, and `log` (records `from:u64 count:u64 len:u32 bytes`,
//! appended before they are acknowledged: a SIGKILLed receiver loses nothing it acknowledged;
//! a torn last record was never acknowledged and is ignored). A new session invalidates the
//! old replica before anything else (`current` removed): a takeover from a replica whose
//! primary had gone on without it would lose acknowledged replies.

use super::resp;
use crate::auth::Key;
use crate::{Error, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest frame (a snapshot chunk is at most [`CHUNK`]).
pub const MAX_FRAME: usize = 4 << 20;
/// Bytes of a snapshot file per frame (log frames go out between chunks).
pub const CHUNK: usize = 128 << 10;
/// The files of a snapshot (`vmm::snapshot`), `vm.json` last.
pub const SNAPSHOT_FILES: [&str; 3] = ["memory.bin", "vcpu0.bin", "vm.json"];
const CONTEXT: &[u8] = b"vigil-voted-log";

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Nonce([u8; 16]),
    Hello { tag: [u8; 16], vm: String },
    File { name: String, offset: u64, data: Vec<u8> },
    Snapshot { position: u64, donor: u8 },
    Log { from: u64, count: u64, bytes: Vec<u8> },
    Ack(u64),
    Refused(String),
}

impl Frame {
    pub fn encode(&self) -> Vec<u8> {
        let (tag, payload): (u8, Vec<u8>) = match self {
            Frame::Nonce(n) => (b'N', n.to_vec()),
            Frame::Hello { tag, vm } => (b'H', [&tag[..], vm.as_bytes()].concat()),
            Frame::File { name, offset, data } => {
                let mut p = vec![name.len() as u8];
                p.extend_from_slice(name.as_bytes());
                p.extend_from_slice(&offset.to_be_bytes());
                p.extend_from_slice(data);
                (b'F', p)
            }
            Frame::Snapshot { position, donor } => (b'S', [&position.to_be_bytes()[..], &[*donor]].concat()),
            Frame::Log { from, count, bytes } => (b'L', [&from.to_be_bytes()[..], &count.to_be_bytes(), bytes].concat()),
            Frame::Ack(upto) => (b'A', upto.to_be_bytes().to_vec()),
            Frame::Refused(t) => (b'E', t.as_bytes().to_vec()),
        };
        let mut out = Vec::with_capacity(5 + payload.len());
        out.push(tag);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// The first frame of `buf` and its length; `Ok(None)` while incomplete; `Err` names
    /// what is wrong.
    pub fn decode(buf: &[u8]) -> std::result::Result<Option<(Frame, usize)>, String> {
        if buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len > MAX_FRAME {
            return Err(format!("a frame of {len} bytes (at most {MAX_FRAME})"));
        }
        if buf.len() < 5 + len {
            return Ok(None);
        }
        let p = &buf[5..5 + len];
        let u64_at = |o: usize| -> std::result::Result<u64, String> {
            p.get(o..o + 8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes"))).ok_or_else(|| "a frame too short".to_string())
        };
        let frame = match buf[0] {
            b'N' => Frame::Nonce(p.try_into().map_err(|_| "a nonce of the wrong length".to_string())?),
            b'H' => {
                if p.len() < 16 {
                    return Err("a hello too short".into());
                }
                let vm = String::from_utf8(p[16..].to_vec()).map_err(|_| "a VM name not UTF-8".to_string())?;
                Frame::Hello { tag: p[..16].try_into().expect("16 bytes"), vm }
            }
            b'F' => {
                let n = *p.first().ok_or("an empty file frame")? as usize;
                let name = p.get(1..1 + n).ok_or("a file frame too short")?;
                let name = String::from_utf8(name.to_vec()).map_err(|_| "a file name not UTF-8".to_string())?;
                if !SNAPSHOT_FILES.contains(&name.as_str()) {
                    return Err(format!("file {name:?} is no part of a snapshot"));
                }
                Frame::File { name, offset: u64_at(1 + n)?, data: p[1 + n + 8..].to_vec() }
            }
            b'S' => {
                if p.len() != 9 {
                    return Err("a snapshot frame of the wrong length".into());
                }
                Frame::Snapshot { position: u64_at(0)?, donor: p[8] }
            }
            b'L' => Frame::Log { from: u64_at(0)?, count: u64_at(8)?, bytes: p.get(16..).ok_or("a log frame too short")?.to_vec() },
            b'A' => Frame::Ack(u64_at(0)?),
            b'E' => Frame::Refused(String::from_utf8_lossy(p).into_owned()),
            t => return Err(format!("unknown frame type {t}")),
        };
        Ok(Some((frame, 5 + len)))
    }
}

/// The hello's tag: proves the cluster key for this session's nonce and this VM.
pub fn hello_tag(key: &Key, vm: &str, nonce: &[u8; 16]) -> [u8; 16] {
    key.tag(&[CONTEXT, vm.as_bytes(), nonce])
}

/// Splits `bytes` into its requests (as the voter framed them).
fn split(bytes: &[u8]) -> std::result::Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match resp::request(&bytes[at..], usize::MAX) {
            Ok(Some(r)) => {
                out.push(&bytes[at..at + r.len]);
                at += r.len;
            }
            Ok(None) => return Err("a request cut short".into()),
            Err(e) => return Err(e.0.to_string()),
        }
    }
    Ok(out)
}

/// Where a voted VM's primary records the backup session it stopped waiting for (the nonce,
/// hex): a replica of that session may lack replies released since, and is never resumed.
pub fn dropped_path(vm: &str) -> String {
    format!("{}/{vm}/voted-dropped", crate::cluster::VMS)
}

/// Refuses a backup's replica that its primary dropped (`dropped`: the store's record).
pub fn check_not_dropped(dir: &Path, dropped: Option<&[u8]>) -> Result<()> {
    let session = std::fs::read(dir.join("session")).unwrap_or_default();
    if !session.is_empty() && dropped.is_some_and(|d| d == session.as_slice()) {
        return Err(Error::Spec {
            vm: dir.display().to_string(),
            reason: format!(
                "the replica of session {} was dropped by its primary, which then went on without it: it may lack acknowledged replies",
                String::from_utf8_lossy(&session)
            ),
        });
    }
    Ok(())
}

/// `current` of a replica whose base is the instances' fresh boot ([`Store::mark_fresh`]).
const FRESH: &str = "fresh";

/// A replica as a takeover uses it.
#[derive(Debug)]
pub struct Replica {
    /// The complete snapshot: the group's state after `position` requests; `None`: the
    /// instances booted afresh from their images (a local replica from a voter's fresh start,
    /// before its first snapshot: `position` is 0 and the log holds every request).
    pub snapshot: Option<PathBuf>,
    pub position: u64,
    /// The requests after it, in order.
    pub requests: Vec<Vec<u8>>,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |e| Error::io(what, path, e)
}

/// Reads the replica in `dir` (a receiver's): its snapshot and the logged requests after it
/// (a torn last record, never acknowledged, is ignored).
pub fn read_replica(dir: &Path) -> Result<Replica> {
    let bad = |reason: String| Error::Spec { vm: dir.display().to_string(), reason };
    let current = std::fs::read_to_string(dir.join("current")).map_err(|e| bad(format!("no complete snapshot ({e})")))?;
    let (position, snapshot) = if current.trim() == FRESH {
        (0, None)
    } else {
        let position: u64 = current.trim().parse().map_err(|_| bad(format!("current: {current:?} is no position")))?;
        (position, Some(dir.join(format!("snap-{position}"))))
    };
    let log = std::fs::read(dir.join("log")).map_err(io("cannot read", &dir.join("log")))?;
    let mut requests = Vec::new();
    let mut next = position;
    let mut at = 0;
    while at + 20 <= log.len() {
        let from = u64::from_be_bytes(log[at..at + 8].try_into().expect("8"));
        let count = u64::from_be_bytes(log[at + 8..at + 16].try_into().expect("8"));
        let len = u32::from_be_bytes(log[at + 16..at + 20].try_into().expect("4")) as usize;
        let Some(bytes) = log.get(at + 20..at + 20 + len) else { break };
        at += 20 + len;
        if from + count <= next {
            continue;
        }
        if from > next {
            return Err(bad(format!("the log has a gap: requests {next}..{from} missing")));
        }
        let reqs = split(bytes).map_err(|e| bad(format!("log record at request {from}: {e}")))?;
        if reqs.len() as u64 != count {
            return Err(bad(format!("log record at request {from}: {} requests, {count} announced", reqs.len())));
        }
        for r in reqs.into_iter().skip((next - from) as usize) {
            requests.push(r.to_vec());
        }
        next = from + count;
    }
    Ok(Replica { snapshot, position, requests })
}

/// A replica on disk (a snapshot, the log after it): the backup's (one session at a time), or
/// the voter's own local one, which a restarted voter resumes from (`driver`).
pub struct Store {
    dir: PathBuf,
    log: std::fs::File,
    /// This session: the complete snapshot's position, the next request the log expects.
    snapshot: Option<u64>,
    log_end: Option<u64>,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("log")).map_err(io("cannot open", dir))?;
        Ok(Store { dir: dir.to_path_buf(), log, snapshot: None, log_end: None })
    }

    /// The state before request 0 is the instances' fresh boot from their images: the replica
    /// is complete from here on with the log alone (a voter's fresh start keeps every request
    /// from the first, so that a crash before its first snapshot loses nothing). Call on an
    /// empty replica ([`Store::reset`]).
    pub fn mark_fresh(&mut self) -> Result<()> {
        crate::replace_file(&self.dir.join("current"), FRESH.as_bytes()).map_err(io("cannot write", &self.dir))?;
        self.snapshot = Some(0);
        self.log_end = Some(0);
        Ok(())
    }

    /// A new session: the old replica is void before anything of the new one is kept.
    pub fn reset(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(self.dir.join("current"));
        let _ = std::fs::remove_file(self.dir.join("session"));
        self.log.set_len(0).map_err(io("cannot truncate", &self.dir.join("log")))?;
        for e in std::fs::read_dir(&self.dir).map_err(io("cannot read", &self.dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("snap-") || name == "incoming" {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        self.snapshot = None;
        self.log_end = None;
        Ok(())
    }

    fn file(&mut self, name: &str, offset: u64, data: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let dir = self.dir.join("incoming");
        std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        let path = dir.join(name);
        let f = std::fs::OpenOptions::new().create(true).write(true).truncate(offset == 0).open(&path).map_err(io("cannot open", &path))?;
        f.write_all_at(data, offset).map_err(io("cannot write", &path))
    }

    /// The snapshot of `from` (its files linked, not copied) is the replica's, at `position`.
    pub fn link_snapshot(&mut self, from: &Path, position: u64) -> Result<()> {
        let dir = self.dir.join("incoming");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        for name in SNAPSHOT_FILES {
            std::fs::hard_link(from.join(name), dir.join(name)).map_err(io("cannot link", &from.join(name)))?;
        }
        self.snapshot_done(position)
    }

    /// The snapshot received is complete: the state after `position` requests (it holds
    /// every request before, logged or not).
    fn snapshot_done(&mut self, position: u64) -> Result<()> {
        let to = self.dir.join(format!("snap-{position}"));
        let _ = std::fs::remove_dir_all(&to);
        std::fs::rename(self.dir.join("incoming"), &to).map_err(io("cannot rename", &to))?;
        crate::replace_file(&self.dir.join("current"), position.to_string().as_bytes()).map_err(io("cannot write", &self.dir))?;
        for e in std::fs::read_dir(&self.dir).map_err(io("cannot read", &self.dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("snap-") && name != format!("snap-{position}") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        self.snapshot = Some(position);
        self.log_end = Some(self.log_end.unwrap_or(position).max(position));
        self.compact(position)
    }

    /// Drops the log's records wholly before `position` (the snapshot holds them).
    fn compact(&mut self, position: u64) -> Result<()> {
        let path = self.dir.join("log");
        let log = std::fs::read(&path).map_err(io("cannot read", &path))?;
        let mut keep = Vec::new();
        let mut at = 0;
        while at + 20 <= log.len() {
            let from = u64::from_be_bytes(log[at..at + 8].try_into().expect("8"));
            let count = u64::from_be_bytes(log[at + 8..at + 16].try_into().expect("8"));
            let len = u32::from_be_bytes(log[at + 16..at + 20].try_into().expect("4")) as usize;
            if at + 20 + len > log.len() {
                break;
            }
            if from + count > position {
                keep.extend_from_slice(&log[at..at + 20 + len]);
            }
            at += 20 + len;
        }
        crate::replace_file(&path, &keep).map_err(io("cannot write", &path))?;
        self.log = std::fs::OpenOptions::new().append(true).open(&path).map_err(io("cannot open", &path))?;
        Ok(())
    }

    /// Appends requests `from..from + count` (those it holds already are skipped).
    pub fn append(&mut self, from: u64, count: u64, bytes: &[u8]) -> std::result::Result<(), String> {
        if let Some(end) = self.log_end {
            if from > end {
                return Err(format!("log from request {from}, expected {end}"));
            }
            if from + count <= end {
                return Ok(());
            }
            if from < end {
                let reqs = split(bytes)?;
                let rest: Vec<u8> = reqs[(end - from) as usize..].concat();
                return self.append(end, from + count - end, &rest);
            }
        }
        let mut rec = Vec::with_capacity(20 + bytes.len());
        rec.extend_from_slice(&from.to_be_bytes());
        rec.extend_from_slice(&count.to_be_bytes());
        rec.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        rec.extend_from_slice(bytes);
        self.log.write_all(&rec).map_err(|e| format!("cannot write the log: {e}"))?;
        self.log_end = Some(from + count);
        Ok(())
    }

    /// What the replica holds: every request before this one (with a complete snapshot).
    pub fn acked(&self) -> Option<u64> {
        let s = self.snapshot?;
        Some(self.log_end.unwrap_or(s).max(s))
    }
}

/// Serves as a voted group's backup: accepts the primary voter's sessions on `listen` (a new
/// one replaces the old) and keeps the replica in `dir`. Returns only on a setup error.
pub fn serve_backup(listen: SocketAddr, dir: &Path, vm: &str, key: Key) -> Result<()> {
    // A replica left by an earlier receiver is void: its primary may have gone on without it.
    let mut st = Store::open(dir)?;
    st.reset()?;
    let store = Arc::new(Mutex::new(st));
    let listener = TcpListener::bind(listen).map_err(|e| Error::io("cannot listen on", listen.to_string(), e))?;
    tracing::info!("{vm}: backup of the voted group on {listen}, replica in {}", dir.display());
    let current: Arc<Mutex<Option<TcpStream>>> = Arc::new(Mutex::new(None));
    for s in listener.incoming() {
        let Ok(s) = s else { continue };
        let _ = s.set_nodelay(true);
        if let Ok(mut cur) = current.lock() {
            if let Some(old) = cur.take() {
                let _ = old.shutdown(std::net::Shutdown::Both);
            }
            *cur = s.try_clone().ok();
        }
        let (store, vm, key) = (store.clone(), vm.to_string(), key.clone());
        let _ = std::thread::Builder::new().name("backup-session".into()).spawn(move || {
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let mut st = match store.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            match session(s, &mut st, &vm, &key) {
                Ok(()) => tracing::info!("{vm}: the session from {peer} ended"),
                Err(e) => tracing::warn!("{vm}: the session from {peer}: {e}"),
            }
        });
    }
    Ok(())
}

fn session(mut s: TcpStream, st: &mut Store, vm: &str, key: &Key) -> std::result::Result<(), String> {
    let mut nonce = [0u8; 16];
    crate::auth::random(&mut nonce).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.write_all(&Frame::Nonce(nonce).encode()).map_err(|e| e.to_string())?;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 256 << 10];
    let mut authenticated = false;
    loop {
        // Every complete frame, then one acknowledgement for them all.
        let mut progressed = false;
        loop {
            let (frame, used) = match Frame::decode(&buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    let _ = s.write_all(&Frame::Refused(e.clone()).encode());
                    return Err(e);
                }
            };
            buf.drain(..used);
            match frame {
                Frame::Hello { tag, vm: name } if !authenticated => {
                    if name != vm || !key.verify(&[CONTEXT, name.as_bytes(), &nonce], &tag) {
                        let why = format!("refused: a hello for {name:?} without the cluster's key");
                        let _ = s.write_all(&Frame::Refused(why.clone()).encode());
                        return Err(why);
                    }
                    authenticated = true;
                    // No timeout from now on: an idle primary sends nothing.
                    s.set_read_timeout(None).map_err(|e| e.to_string())?;
                    st.reset().map_err(|e| e.to_string())?;
                    crate::replace_file(&st.dir.join("session"), crate::auth::hex(&nonce).as_bytes()).map_err(|e| e.to_string())?;
                    tracing::info!("{vm}: a new session: the old replica is void");
                }
                _ if !authenticated => return Err("a frame before the hello".into()),
                Frame::File { name, offset, data } => st.file(&name, offset, &data).map_err(|e| e.to_string())?,
                Frame::Snapshot { position, donor } => {
                    st.snapshot_done(position).map_err(|e| e.to_string())?;
                    tracing::info!("{vm}: holds instance {donor}'s snapshot after {position} requests");
                    progressed = true;
                }
                Frame::Log { from, count, bytes } => {
                    st.append(from, count, &bytes)?;
                    progressed = true;
                }
                other => return Err(format!("unexpected {other:?}")),
            }
        }
        if progressed {
            if let Some(upto) = st.acked() {
                s.write_all(&Frame::Ack(upto).encode()).map_err(|e| format!("ack: {e}"))?;
            }
        }
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What the primary's voter sends its backup, tagged with the session it belongs to (what
/// belongs to an ended session is dropped).
pub enum ToBackup {
    Log {
        session: u64,
        from: u64,
        count: u64,
        bytes: Vec<u8>,
    },
    /// Send this snapshot directory's files, then its end; the directory is removed after.
    Snapshot {
        session: u64,
        dir: PathBuf,
        position: u64,
        donor: u8,
    },
    /// End this session (the voter gave up waiting for its acknowledgements).
    Drop {
        session: u64,
    },
}

/// What the sender reports.
#[derive(Debug)]
pub enum FromBackup {
    /// A session is open (authenticated; the backup's nonce names it): the backup holds
    /// nothing of it yet.
    Up(u64, [u8; 16]),
    Acked(u64, u64),
    Down(u64, String),
}

/// The primary's side: connects to the backup at `addr` (again and again, each connection a
/// new session), sends what it is given for the current session (log frames first, the
/// snapshot's chunks between them, so that a snapshot never holds the log up by more than a
/// chunk), and reports sessions and acknowledgements through `report`.
pub fn start_sender(
    addr: String,
    vm: String,
    key: Key,
    report: impl Fn(FromBackup) + Send + Sync + 'static,
) -> std::sync::mpsc::Sender<ToBackup> {
    let (tx, rx) = std::sync::mpsc::channel::<ToBackup>();
    let report = Arc::new(report);
    let _ = std::thread::Builder::new().name("backup-send".into()).spawn(move || {
        let mut session = 0u64;
        let mut warned = false;
        loop {
            session += 1;
            let (s, nonce) = match connect(&addr, &vm, &key) {
                Ok(s) => s,
                Err(e) => {
                    if !warned {
                        tracing::warn!("{vm}: backup {addr}: {e} (trying again)");
                        warned = true;
                    }
                    // Drop what came for no session.
                    while rx.try_recv().is_ok() {}
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            };
            warned = false;
            let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
            {
                let (mut r, report, down, session) = (s.try_clone().expect("a TCP stream clones"), report.clone(), down.clone(), session);
                let _ = std::thread::Builder::new().name("backup-acks".into()).spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let why = 'read: loop {
                        match r.read(&mut chunk) {
                            Ok(0) => break "closed by the backup".to_string(),
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            Err(e) => break e.to_string(),
                        }
                        let mut last = None;
                        loop {
                            match Frame::decode(&buf) {
                                Ok(Some((Frame::Ack(upto), used))) => {
                                    buf.drain(..used);
                                    last = Some(upto);
                                }
                                Ok(Some((Frame::Refused(t), _))) => break 'read format!("refused: {t}"),
                                Ok(Some((f, _))) => break 'read format!("unexpected {f:?} from the backup"),
                                Ok(None) => break,
                                Err(e) => break 'read e,
                            }
                        }
                        if let Some(upto) = last {
                            report(FromBackup::Acked(session, upto));
                        }
                    };
                    report(FromBackup::Down(session, why));
                    down.store(true, std::sync::atomic::Ordering::SeqCst);
                    let _ = r.shutdown(std::net::Shutdown::Both);
                });
            }
            report(FromBackup::Up(session, nonce));
            let why = send_session(s, session, &rx, &down);
            report(FromBackup::Down(session, why));
        }
    });
    tx
}

fn connect(addr: &str, vm: &str, key: &Key) -> std::result::Result<(TcpStream, [u8; 16]), String> {
    use std::net::ToSocketAddrs;
    let a = addr.to_socket_addrs().map_err(|e| e.to_string())?.next().ok_or("no address")?;
    let mut s = TcpStream::connect_timeout(&a, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64];
    let nonce = loop {
        if let Some((f, _)) = Frame::decode(&buf)? {
            match f {
                Frame::Nonce(n) => break n,
                other => return Err(format!("the backup sent {other:?}")),
            }
        }
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed by the backup".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    s.write_all(&Frame::Hello { tag: hello_tag(key, vm, &nonce), vm: vm.to_string() }.encode()).map_err(|e| e.to_string())?;
    s.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok((s, nonce))
}

/// One session's writes, until it fails.
fn send_session(mut s: TcpStream, session: u64, rx: &std::sync::mpsc::Receiver<ToBackup>, down: &std::sync::atomic::AtomicBool) -> String {
    struct Shipping {
        dir: PathBuf,
        file: usize,
        offset: u64,
        position: u64,
        donor: u8,
    }
    let mut ship: Option<Shipping> = None;
    loop {
        if down.load(std::sync::atomic::Ordering::SeqCst) {
            return "the connection ended".into();
        }
        let msg = if ship.is_some() {
            rx.try_recv().ok()
        } else {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(m) => Some(m),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return "the voter ended".into(),
            }
        };
        match msg {
            Some(ToBackup::Log { session: k, from, count, bytes }) if k == session => {
                if let Err(e) = s.write_all(&Frame::Log { from, count, bytes }.encode()) {
                    return format!("write: {e}");
                }
            }
            Some(ToBackup::Snapshot { session: k, dir, position, donor }) if k == session => {
                if let Some(old) = ship.take() {
                    let _ = std::fs::remove_dir_all(&old.dir);
                }
                ship = Some(Shipping { dir, file: 0, offset: 0, position, donor });
            }
            Some(ToBackup::Snapshot { dir, .. }) => {
                let _ = std::fs::remove_dir_all(&dir);
            }
            Some(ToBackup::Drop { session: k }) if k == session => {
                let _ = s.shutdown(std::net::Shutdown::Both);
                return "dropped: no acknowledgement in time".into();
            }
            Some(ToBackup::Drop { .. }) => {}
            Some(ToBackup::Log { .. }) => {}
            None => {
                // One chunk of the snapshot being shipped.
                let Some(sh) = ship.as_mut() else { continue };
                let Some(name) = SNAPSHOT_FILES.get(sh.file) else {
                    let done = Frame::Snapshot { position: sh.position, donor: sh.donor }.encode();
                    let dir = sh.dir.clone();
                    ship = None;
                    let _ = std::fs::remove_dir_all(&dir);
                    if let Err(e) = s.write_all(&done) {
                        return format!("write: {e}");
                    }
                    continue;
                };
                let path = sh.dir.join(name);
                let data = std::fs::File::open(&path).and_then(|f| {
                    use std::os::unix::fs::FileExt;
                    let mut b = vec![0u8; CHUNK];
                    let n = f.read_at(&mut b, sh.offset)?;
                    b.truncate(n);
                    Ok(b)
                });
                match data {
                    Err(e) => return format!("snapshot {}: {e}", path.display()),
                    Ok(b) if b.is_empty() && sh.offset > 0 => {
                        sh.file += 1;
                        sh.offset = 0;
                    }
                    Ok(b) => {
                        let f = Frame::File { name: name.to_string(), offset: sh.offset, data: b.clone() }.encode();
                        if let Err(e) = s.write_all(&f) {
                            return format!("write: {e}");
                        }
                        if b.is_empty() {
                            sh.file += 1;
                            sh.offset = 0;
                        } else {
                            sh.offset += b.len() as u64;
                        }
                    }
                }
            }
        }
    }
}

/// Announces that `ip` is now on interface `ifname` (a gratuitous ARP request, twice), so
/// that the LAN's neighbour caches follow a VM whose voter moved to this host.
pub fn gratuitous_arp(ifname: &str, ip: std::net::Ipv4Addr) -> std::io::Result<()> {
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "interface name too long"));
    }
    // SAFETY: a raw packet socket and two ioctls on a zeroed ifreq whose name is a
    // NUL-terminated copy of `ifname`; the frame and the address are local buffers of the
    // lengths passed; the descriptor is closed on every path.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ARP as u16).to_be() as i32);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let close = |e: std::io::Error| {
            libc::close(fd);
            e
        };
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(ifname.bytes()) {
            *d = s as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut ifr) < 0 {
            return Err(close(std::io::Error::last_os_error()));
        }
        let mut mac = [0u8; 6];
        for (m, b) in mac.iter_mut().zip(ifr.ifr_ifru.ifru_hwaddr.sa_data.iter()) {
            *m = *b as u8;
        }
        if libc::ioctl(fd, libc::SIOCGIFINDEX, &mut ifr) < 0 {
            return Err(close(std::io::Error::last_os_error()));
        }
        let index = ifr.ifr_ifru.ifru_ifindex;
        let mut frame = Vec::with_capacity(42);
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&ip.octets());
        frame.extend_from_slice(&[0; 6]);
        frame.extend_from_slice(&ip.octets());
        let mut to: libc::sockaddr_ll = std::mem::zeroed();
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
        to.sll_ifindex = index;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        for _ in 0..2 {
            let n = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if n < 0 {
                return Err(close(std::io::Error::last_os_error()));
            }
        }
        libc::close(fd);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_named() {
        let frames = [
            Frame::Nonce([7; 16]),
            Frame::Hello { tag: [1; 16], vm: "relay".into() },
            Frame::File { name: "memory.bin".into(), offset: 4096, data: vec![9; 100] },
            Frame::Snapshot { position: 17, donor: 2 },
            Frame::Log { from: 17, count: 2, bytes: b"PING\r\nINCR a\r\n".to_vec() },
            Frame::Ack(19),
            Frame::Refused("no".into()),
        ];
        for f in frames {
            let b = f.encode();
            for k in 0..b.len() {
                assert_eq!(Frame::decode(&b[..k]), Ok(None), "{f:?} cut at {k}");
            }
            assert_eq!(Frame::decode(&b), Ok(Some((f, b.len()))));
        }
        let mut evil = Frame::File { name: "../x".into(), offset: 0, data: vec![] }.encode();
        assert!(Frame::decode(&evil).unwrap_err().contains("no part of a snapshot"));
        evil[0] = b'Z';
        assert!(Frame::decode(&evil).unwrap_err().contains("unknown frame"));
        assert!(Frame::decode(&[b'L', 0xff, 0xff, 0xff, 0xff]).unwrap_err().contains("at most"));
        assert!(Frame::decode(&[b'S', 0, 0, 0, 1, 0]).is_err());
        // Random bytes never panic.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20_000 {
            let len = (x % 40) as usize;
            let b: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    [b'N', b'H', b'F', b'S', b'L', b'A', 0, 1, 5, 16][(x % 10) as usize]
                })
                .collect();
            let _ = Frame::decode(&b);
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vigil-remote-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_replica_is_the_snapshot_and_the_log_after_it() {
        let dir = tmp("replica");
        let mut st = Store::open(&dir).unwrap();
        st.reset().unwrap();
        // Log frames may come before the snapshot's end (they overtake its chunks).
        st.append(3, 2, b"INCR a\r\nINCR b\r\n").unwrap();
        assert_eq!(st.acked(), None, "no acknowledgement without a snapshot");
        assert!(read_replica(&dir).is_err());
        st.file("vm.json", 0, b"{}").unwrap();
        st.snapshot_done(3).unwrap();
        assert_eq!(st.acked(), Some(5));
        assert!(st.append(6, 1, b"PING\r\n").unwrap_err().contains("expected 5"));
        // Requests it holds already are skipped.
        st.append(4, 2, b"INCR b\r\nGET a\r\n").unwrap();
        st.append(3, 1, b"INCR a\r\n").unwrap();
        assert_eq!(st.acked(), Some(6));
        let r = read_replica(&dir).unwrap();
        assert_eq!((r.position, r.requests.len()), (3, 3));
        assert_eq!(r.requests[2], b"GET a\r\n");
        assert!(r.snapshot.as_ref().is_some_and(|s| s.join("vm.json").is_file()));
        // A later snapshot inside a record: its requests before the position are skipped.
        st.file("vm.json", 0, b"{}").unwrap();
        st.snapshot_done(4).unwrap();
        let r = read_replica(&dir).unwrap();
        assert_eq!(r.position, 4);
        assert_eq!(r.requests, vec![b"INCR b\r\n".to_vec(), b"GET a\r\n".to_vec()]);
        assert!(!dir.join("snap-3").exists());
        // A torn last record (the receiver killed while writing) is ignored.
        let mut f = std::fs::OpenOptions::new().append(true).open(dir.join("log")).unwrap();
        f.write_all(&[0, 0, 0, 0, 0, 0, 0, 6, 0, 0]).unwrap();
        assert_eq!(read_replica(&dir).unwrap().requests.len(), 2);
        // A replica its primary dropped is refused; another session's is not.
        std::fs::write(dir.join("session"), b"00ff").unwrap();
        assert!(check_not_dropped(&dir, Some(b"00ff")).unwrap_err().to_string().contains("dropped by its primary"));
        assert!(check_not_dropped(&dir, Some(b"0100")).is_ok());
        assert!(check_not_dropped(&dir, None).is_ok());
        // A new session voids the replica at once.
        st.reset().unwrap();
        assert!(read_replica(&dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A voter's fresh start: the replica is complete from the first request on, with the
    /// instances' fresh boot as its base (it used to be empty until the first snapshot, and a
    /// voter killed before that restarted without the state its clients had seen); the first
    /// snapshot then replaces the base.
    #[test]
    fn a_fresh_start_is_a_replica_from_the_first_request() {
        let dir = tmp("fresh");
        let mut st = Store::open(&dir).unwrap();
        st.reset().unwrap();
        st.mark_fresh().unwrap();
        assert_eq!(st.acked(), Some(0));
        assert!(st.append(1, 1, b"INCR a\r\n").unwrap_err().contains("expected 0"));
        st.append(0, 2, b"INCR a\r\nINCR a\r\n").unwrap();
        st.append(2, 1, b"GET a\r\n").unwrap();
        let r = read_replica(&dir).unwrap();
        assert_eq!((r.snapshot.as_ref(), r.position), (None, 0));
        assert_eq!(r.requests, vec![b"INCR a\r\n".to_vec(), b"INCR a\r\n".to_vec(), b"GET a\r\n".to_vec()]);
        // The first snapshot (after request 2) takes over, the log before it is dropped.
        st.file("vm.json", 0, b"{}").unwrap();
        st.snapshot_done(2).unwrap();
        let r = read_replica(&dir).unwrap();
        assert_eq!(r.position, 2);
        assert!(r.snapshot.is_some_and(|s| s.join("vm.json").is_file()));
        assert_eq!(r.requests, vec![b"GET a\r\n".to_vec()]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
