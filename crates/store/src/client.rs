//! A typed, blocking XenStore client over the Unix socket, for tests and vigil's components.
//!
//! **Reconnect.** When the connection breaks (server killed, restarted by its supervisor), the
//! client reconnects with backoff for up to [`Client::set_retry_for`] (default 10 s),
//! re-registers its watches — each fires once again, as on any `XS_WATCH`, so a watcher never
//! misses a change made while it was disconnected — and then retries the request.
//!
//! **No request applied twice.** Outside transactions, every request is idempotent in its end
//! state (`write` of the same value, `mkdir`, `rm`, `set_perms`, reads), so retrying one whose
//! reply was lost is safe: if the first attempt was applied, the second changes nothing more. A
//! retried write can, however, land after another client's later write of the same node — use a
//! transaction when that matters.
//!
//! Transactions are exactly-once: [`Client::transaction_once`] writes a marker node
//! `/vigil/clients/<client-id>` = `<sequence number>` inside the transaction. If the connection
//! breaks before `TRANSACTION_END` is answered, the client reconnects and reads the marker: the
//! transaction committed if and only if the marker holds its sequence number (only this client
//! writes it, and a commit is atomic and durable). The caller gets `Ok` or `EAGAIN` — never an
//! unknown outcome — and [`Client::transaction`] reruns the closure on `EAGAIN`.

use crate::state::Errno;
use crate::wire::{self, decode, Msg, MsgType};
use crate::{Error, Result};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Why one attempt failed.
enum Fail {
    /// The connection broke: the request's outcome is unknown.
    Lost,
    /// The server answered with an error.
    Errno(Errno),
}

/// A watch event: the path that changed and the watch's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub path: String,
    pub token: String,
}

/// A client of one store socket.
pub struct Client {
    socket: PathBuf,
    stream: Option<UnixStream>,
    buf: Vec<u8>,
    next_req: u32,
    watches: Vec<(String, String)>,
    events: VecDeque<WatchEvent>,
    retry_for: Duration,
    request_timeout: Duration,
    id: String,
    tx_seq: u64,
    reconnects: u64,
}

static CLIENTS: AtomicU64 = AtomicU64::new(0);

impl Client {
    /// Connects (retrying for up to the default 10 s while the server starts).
    pub fn connect(socket: &Path) -> Result<Client> {
        Client::connect_within(socket, Duration::from_secs(10))
    }

    /// Connects, retrying for up to `d`, which is also how long later requests keep
    /// reconnecting and wait for a reply (see [`Client::set_retry_for`]).
    pub fn connect_within(socket: &Path, d: Duration) -> Result<Client> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let id = format!("{}-{nanos}-{}", std::process::id(), CLIENTS.fetch_add(1, Ordering::Relaxed));
        let mut c = Client {
            socket: socket.to_path_buf(),
            stream: None,
            buf: Vec::new(),
            next_req: 1,
            watches: Vec::new(),
            events: VecDeque::new(),
            retry_for: d,
            request_timeout: d,
            id,
            tx_seq: 0,
            reconnects: 0,
        };
        c.reconnect()?;
        Ok(c)
    }

    /// How long to keep reconnecting before giving up with [`Error::Unreachable`].
    pub fn set_retry_for(&mut self, d: Duration) {
        self.retry_for = d;
    }

    /// How long to wait for a reply before treating the connection as broken (a hung store).
    pub fn set_request_timeout(&mut self, d: Duration) {
        self.request_timeout = d;
    }

    /// How many times the connection was re-established.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    fn reconnect(&mut self) -> Result<()> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(1);
        let had = self.stream.take().is_some();
        self.buf.clear();
        loop {
            match unixsock::connect(&self.socket) {
                Ok(s) => {
                    self.stream = Some(s);
                    if had {
                        self.reconnects += 1;
                    }
                    // Re-register watches; their initial events tell the caller to re-read.
                    let watches = self.watches.clone();
                    let mut ok = true;
                    for (p, t) in &watches {
                        match self.attempt(MsgType::Watch, 0, wire::strings(&[p, t])) {
                            Ok(_) | Err(Fail::Errno(Errno::EEXIST)) => {}
                            Err(Fail::Errno(e)) => return Err(Error::Store { op: "watch", path: p.clone(), errno: e }),
                            Err(Fail::Lost) => {
                                ok = false;
                                break;
                            }
                        }
                    }
                    if ok {
                        return Ok(());
                    }
                    self.stream = None;
                }
                Err(e) if start.elapsed() >= self.retry_for => {
                    return Err(Error::Unreachable { path: self.socket.clone(), secs: start.elapsed().as_secs_f64(), last: e.to_string() });
                }
                Err(_) => {}
            }
            if start.elapsed() >= self.retry_for {
                return Err(Error::Unreachable {
                    path: self.socket.clone(),
                    secs: start.elapsed().as_secs_f64(),
                    last: "connection lost while re-registering watches".into(),
                });
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// Reads one message (blocking, or until `timeout`); `Ok(None)` on timeout.
    fn recv(&mut self, timeout: Option<Duration>) -> std::result::Result<Option<Msg>, String> {
        loop {
            match decode(&self.buf) {
                Ok(Some((m, used))) => {
                    self.buf.drain(..used);
                    return Ok(Some(m));
                }
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            let s = self.stream.as_mut().ok_or("not connected")?;
            s.set_read_timeout(timeout).map_err(|e| e.to_string())?;
            let mut chunk = [0u8; 8192];
            match s.read(&mut chunk) {
                Ok(0) => return Err("connection closed by the store".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    fn queue_event(&mut self, m: &Msg) {
        let parts = wire::split(&m.payload);
        if parts.len() >= 2 {
            let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            self.events.push_back(WatchEvent { path: s(parts[0]), token: s(parts[1]) });
        }
    }

    /// One attempt on the current connection.
    fn attempt(&mut self, ty: MsgType, tx: u32, payload: Vec<u8>) -> std::result::Result<Vec<u8>, Fail> {
        let req_id = self.next_req;
        self.next_req = self.next_req.wrapping_add(1);
        let bytes = Msg::new(ty, req_id, tx, payload).encode();
        let s = self.stream.as_mut().ok_or(Fail::Lost)?;
        s.write_all(&bytes).map_err(|_| Fail::Lost)?;
        loop {
            let m = self.recv(Some(self.request_timeout)).map_err(|_| Fail::Lost)?.ok_or(Fail::Lost)?;
            if m.ty == MsgType::WatchEvent as u32 {
                self.queue_event(&m);
                continue;
            }
            if m.req_id != req_id {
                continue;
            }
            if m.ty == MsgType::Error as u32 {
                let name = String::from_utf8_lossy(&m.payload);
                return Err(Fail::Errno(Errno::from_name(name.trim_end_matches('\0')).unwrap_or(Errno::EINVAL)));
            }
            return Ok(m.payload);
        }
    }

    /// A request outside transactions: retried across reconnects (idempotent ones only), for
    /// at most the retry time in all — a store that accepts connections but never answers (a
    /// front end cut off from its etcd cluster) is unreachable too.
    fn request(&mut self, op: &'static str, path: &str, ty: MsgType, payload: Vec<u8>) -> Result<Vec<u8>> {
        let start = Instant::now();
        loop {
            match self.attempt(ty, 0, payload.clone()) {
                Ok(p) => return Ok(p),
                Err(Fail::Errno(errno)) => return Err(Error::Store { op, path: path.to_string(), errno }),
                Err(Fail::Lost) if start.elapsed() >= self.retry_for => {
                    return Err(Error::Unreachable {
                        path: self.socket.clone(),
                        secs: start.elapsed().as_secs_f64(),
                        last: format!("{op} {path}: no answer"),
                    })
                }
                Err(Fail::Lost) => self.reconnect()?,
            }
        }
    }

    pub fn read(&mut self, path: &str) -> Result<Vec<u8>> {
        self.request("read", path, MsgType::Read, wire::strings(&[path]))
    }

    /// `read`, with `ENOENT` as `None`.
    pub fn try_read(&mut self, path: &str) -> Result<Option<Vec<u8>>> {
        match self.read(path) {
            Ok(v) => Ok(Some(v)),
            Err(Error::Store { errno: Errno::ENOENT, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn write(&mut self, path: &str, value: &[u8]) -> Result<()> {
        let mut p = wire::strings(&[path]);
        p.extend_from_slice(value);
        self.request("write", path, MsgType::Write, p).map(|_| ())
    }

    pub fn mkdir(&mut self, path: &str) -> Result<()> {
        self.request("mkdir", path, MsgType::Mkdir, wire::strings(&[path])).map(|_| ())
    }

    pub fn rm(&mut self, path: &str) -> Result<()> {
        self.request("rm", path, MsgType::Rm, wire::strings(&[path])).map(|_| ())
    }

    /// Children of `path`; lists longer than one payload are fetched with `DIRECTORY_PART`
    /// (restarting if the node changes in between, as libxenstore does).
    pub fn directory(&mut self, path: &str) -> Result<Vec<String>> {
        match self.request("directory", path, MsgType::Directory, wire::strings(&[path])) {
            Ok(p) => Ok(names(&p)),
            Err(Error::Store { errno: Errno::E2BIG, .. }) => self.directory_parts(path),
            Err(e) => Err(e),
        }
    }

    fn directory_parts(&mut self, path: &str) -> Result<Vec<String>> {
        'again: for _ in 0..100 {
            let mut all = Vec::new();
            let mut gen: Option<Vec<u8>> = None;
            loop {
                let off = all.len().to_string();
                let p = self.request("directory_part", path, MsgType::DirectoryPart, wire::strings(&[path, off.as_str()]))?;
                let Some(g) = p.iter().position(|b| *b == 0) else {
                    return Err(Error::Protocol("DIRECTORY_PART reply without generation".into()));
                };
                if gen.get_or_insert_with(|| p[..g].to_vec()) != &p[..g] {
                    continue 'again;
                }
                let body = &p[g + 1..];
                let done = body == [0] || body.ends_with(&[0, 0]);
                all.extend_from_slice(if done { &body[..body.len() - 1] } else { body });
                if done {
                    return Ok(names(&all));
                }
                if body.is_empty() {
                    return Err(Error::Protocol("DIRECTORY_PART made no progress".into()));
                }
            }
        }
        Err(Error::Store { op: "directory", path: path.to_string(), errno: Errno::EAGAIN })
    }

    /// Permission strings (`b0`, `r5`, ...), owner first.
    pub fn get_perms(&mut self, path: &str) -> Result<Vec<String>> {
        let p = self.request("get_perms", path, MsgType::GetPerms, wire::strings(&[path]))?;
        Ok(names(&p))
    }

    pub fn set_perms(&mut self, path: &str, perms: &[&str]) -> Result<()> {
        let mut items = vec![path];
        items.extend_from_slice(perms);
        self.request("set_perms", path, MsgType::SetPerms, wire::strings(&items)).map(|_| ())
    }

    /// Introduces domain `domid` (fires `@introduceDomain`).
    pub fn introduce(&mut self, domid: u32) -> Result<()> {
        let d = domid.to_string();
        // vigil has no shared ring or event channel: mfn 0 and port 1 are placeholders (Xen,
        // and so the store, refuse port 0).
        self.request("introduce", &d, MsgType::Introduce, wire::strings(&[d.as_str(), "0", "1"])).map(|_| ())
    }

    /// Releases domain `domid` (fires `@releaseDomain`).
    pub fn release(&mut self, domid: u32) -> Result<()> {
        let d = domid.to_string();
        self.request("release", &d, MsgType::Release, wire::strings(&[d.as_str()])).map(|_| ())
    }

    /// `XS_CONTROL check`: a round trip through the store's request loop (the heartbeat).
    pub fn ping(&mut self) -> Result<()> {
        self.request("control", "check", MsgType::Control, wire::strings(&["check"])).map(|_| ())
    }

    /// `XS_CONTROL` with these arguments (`metrics`, `sync-delay MS`, ...): the reply's text.
    pub fn control(&mut self, args: &[&str]) -> Result<String> {
        let reply = self.request("control", args.first().copied().unwrap_or(""), MsgType::Control, wire::strings(args))?;
        Ok(String::from_utf8_lossy(reply.strip_suffix(&[0]).unwrap_or(&reply)).into_owned())
    }

    /// Adds a watch; it fires once right away and again after every reconnect.
    pub fn watch(&mut self, path: &str, token: &str) -> Result<()> {
        self.request("watch", path, MsgType::Watch, wire::strings(&[path, token]))?;
        self.watches.push((path.to_string(), token.to_string()));
        Ok(())
    }

    pub fn unwatch(&mut self, path: &str, token: &str) -> Result<()> {
        self.watches.retain(|(p, t)| !(p == path && t == token));
        self.request("unwatch", path, MsgType::Unwatch, wire::strings(&[path, token])).map(|_| ())
    }

    /// The next watch event, waiting up to `timeout` (reconnecting if the store went away).
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<WatchEvent>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.recv(Some(left)) {
                Ok(Some(m)) if m.ty == MsgType::WatchEvent as u32 => self.queue_event(&m),
                Ok(_) => {}
                Err(_) => self.reconnect()?,
            }
        }
    }

    /// Runs `f` in one transaction and commits it: `Ok` if it committed (exactly once), or
    /// `Err(Store { errno: EAGAIN })` if it did not (a conflict, or the store restarted before
    /// the commit). Errors from `f` abort the transaction and are returned.
    pub fn transaction_once<T>(&mut self, mut f: impl FnMut(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        let eagain = || Error::Store { op: "transaction", path: String::new(), errno: Errno::EAGAIN };
        let id = match self.attempt(MsgType::TransactionStart, 0, vec![0]) {
            Ok(p) => String::from_utf8_lossy(&p)
                .trim_end_matches('\0')
                .parse::<u32>()
                .map_err(|_| Error::Protocol("bad transaction id".into()))?,
            Err(Fail::Errno(errno)) => return Err(Error::Store { op: "transaction_start", path: String::new(), errno }),
            Err(Fail::Lost) => {
                self.reconnect()?;
                return Err(eagain());
            }
        };
        self.tx_seq += 1;
        let seq = self.tx_seq.to_string();
        let marker = format!("/vigil/clients/{}", self.id);
        let mut tx = Tx { client: self, id, lost: false };
        let result = f(&mut tx).and_then(|r| tx.write(&marker, seq.as_bytes()).map(|_| r));
        let lost = tx.lost;
        if lost {
            self.reconnect()?;
            return Err(eagain());
        }
        let value = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = self.attempt(MsgType::TransactionEnd, id, b"F\0".to_vec());
                return Err(e);
            }
        };
        match self.attempt(MsgType::TransactionEnd, id, b"T\0".to_vec()) {
            Ok(_) => Ok(value),
            Err(Fail::Errno(Errno::EAGAIN)) => Err(eagain()),
            Err(Fail::Errno(errno)) => Err(Error::Store { op: "transaction_end", path: String::new(), errno }),
            Err(Fail::Lost) => {
                // Outcome unknown: the marker decides.
                self.reconnect()?;
                if self.try_read(&marker)?.as_deref() == Some(seq.as_bytes()) {
                    Ok(value)
                } else {
                    Err(eagain())
                }
            }
        }
    }

    /// Removes this client's transaction marker (see the module doc) and disconnects. A client
    /// that is dropped without `close` leaves its marker node behind.
    pub fn close(mut self) -> Result<()> {
        if self.tx_seq > 0 {
            let marker = format!("/vigil/clients/{}", self.id);
            self.rm(&marker)?;
        }
        Ok(())
    }

    /// [`Client::transaction_once`], rerun on `EAGAIN` (up to 100 times, within the retry time).
    pub fn transaction<T>(&mut self, mut f: impl FnMut(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        let mut last = None;
        let start = Instant::now();
        for _ in 0..100 {
            match self.transaction_once(&mut f) {
                Err(Error::Store { errno: Errno::EAGAIN, .. }) => last = Some(Errno::EAGAIN),
                r => return r,
            }
            if start.elapsed() >= self.retry_for {
                break;
            }
        }
        Err(Error::Store { op: "transaction", path: String::new(), errno: last.unwrap_or(Errno::EAGAIN) })
    }
}

fn names(p: &[u8]) -> Vec<String> {
    if p.is_empty() {
        return Vec::new();
    }
    wire::split(p).into_iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect()
}

/// Operations inside a transaction. A broken connection makes every further operation fail
/// with `EAGAIN` (the store aborted the transaction when it lost the connection).
pub struct Tx<'a> {
    client: &'a mut Client,
    id: u32,
    lost: bool,
}

impl Tx<'_> {
    fn op(&mut self, op: &'static str, path: &str, ty: MsgType, payload: Vec<u8>) -> Result<Vec<u8>> {
        if self.lost {
            return Err(Error::Store { op, path: path.to_string(), errno: Errno::EAGAIN });
        }
        match self.client.attempt(ty, self.id, payload) {
            Ok(p) => Ok(p),
            Err(Fail::Errno(errno)) => Err(Error::Store { op, path: path.to_string(), errno }),
            Err(Fail::Lost) => {
                self.lost = true;
                Err(Error::Store { op, path: path.to_string(), errno: Errno::EAGAIN })
            }
        }
    }

    pub fn read(&mut self, path: &str) -> Result<Vec<u8>> {
        self.op("read", path, MsgType::Read, wire::strings(&[path]))
    }

    pub fn try_read(&mut self, path: &str) -> Result<Option<Vec<u8>>> {
        match self.read(path) {
            Ok(v) => Ok(Some(v)),
            Err(Error::Store { errno: Errno::ENOENT, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn write(&mut self, path: &str, value: &[u8]) -> Result<()> {
        let mut p = wire::strings(&[path]);
        p.extend_from_slice(value);
        self.op("write", path, MsgType::Write, p).map(|_| ())
    }

    pub fn rm(&mut self, path: &str) -> Result<()> {
        self.op("rm", path, MsgType::Rm, wire::strings(&[path])).map(|_| ())
    }

    pub fn directory(&mut self, path: &str) -> Result<Vec<String>> {
        let p = self.op("directory", path, MsgType::Directory, wire::strings(&[path]))?;
        Ok(names(&p))
    }
}
