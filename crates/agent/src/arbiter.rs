//! The fencing arbiter's I/O: the lease table of [`replication::lease`] served over TCP (one
//! line per request and answer, each carrying an HMAC tag under the cluster's key), its durable
//! state in a file, and the client the replication drivers use.
//!
//! A request line is `<request> <tag>` with the tag over the request; the answer line is
//! `<answer> <tag>` with the tag over the request *and* the answer, so an answer cannot be
//! replayed to another request. A line without a valid tag gets `error not authenticated`
//! and the connection is closed. (A replayed request can only renew a lease for the copy that
//! holds it, or repeat a takeover that the generation has already moved past: neither grants
//! anything to anyone new.)
//!
//! The table's durable state is written before the answer to any request that changed it goes
//! out — to a file (temporary file, synced, renamed) or to the cluster's store (one node per
//! VM under [`STORE_ROOT`], so that with the store on etcd the table is replicated and an
//! arbiter started on another host finds it) — and a restarted arbiter reads it back and waits
//! out the leases it may have granted ([`replication::lease::Table::restore`]).
//!
//! Bounded: lines of at most [`MAX_LINE`] bytes, at most [`MAX_CONNECTIONS`] connections (one
//! thread each), and a connection idle for [`IDLE`] is closed.

use crate::auth::{hex, unhex, Key};
use crate::{Error, Result};
use replication::lease::{Answer, Request, Table};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest request or answer line (bytes, without the newline).
pub const MAX_LINE: usize = 1024;
/// Connections served at once; more are answered `error busy` and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that sends nothing for this long is closed.
pub const IDLE: Duration = Duration::from_secs(30);

/// A running arbiter (its threads end with the process).
pub struct Arbiter {
    pub addr: SocketAddr,
}

/// Where the lease table's durable state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// A file.
    File(PathBuf),
    /// The cluster store at this socket, under [`STORE_ROOT`].
    Store(PathBuf),
}

/// The store path of the lease table: `ceiling` and `leases/<vm>`, each one line of
/// [`Table::encode`].
pub const STORE_ROOT: &str = "/vigil/arbiter";

impl std::str::FromStr for State {
    type Err = String;
    /// `store:SOCKET` or a file path.
    fn from_str(s: &str) -> Result<State, String> {
        match s.strip_prefix("store:") {
            Some("") => Err("store: needs the store's socket (store:/run/vigil/store.sock)".into()),
            Some(sock) => Ok(State::Store(sock.into())),
            None if s.is_empty() => Err("an empty path".into()),
            None => Ok(State::File(s.into())),
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            State::File(p) => write!(f, "{}", p.display()),
            State::Store(p) => write!(f, "store:{}", p.display()),
        }
    }
}

struct Durable {
    table: Table,
    state: State,
    store: Option<store::Client>,
    /// The lines last stored (store backend: only changed ones are written).
    stored_lines: std::collections::BTreeMap<String, String>,
    stored: u64,
}

impl Durable {
    /// Stores the table if it changed since it was last stored.
    fn sync(&mut self) -> std::io::Result<()> {
        if self.table.version() == self.stored {
            return Ok(());
        }
        let text = self.table.encode();
        match &self.state {
            State::File(path) => crate::replace_file(path, text.as_bytes())?,
            State::Store(sock) => {
                let lines = store_lines(&text);
                if self.store.is_none() {
                    self.store = Some(store::Client::connect(sock).map_err(std::io::Error::other)?);
                }
                let c = self.store.as_mut().expect("connected above");
                let changed: Vec<(&String, &String)> = lines.iter().filter(|(k, v)| self.stored_lines.get(*k) != Some(v)).collect();
                let r = c.transaction(|tx| {
                    for (k, v) in &changed {
                        tx.write(&format!("{STORE_ROOT}/{k}"), v.as_bytes())?;
                    }
                    Ok(())
                });
                if let Err(e) = r {
                    self.store = None;
                    return Err(std::io::Error::other(e));
                }
                self.stored_lines = lines;
            }
        }
        self.stored = self.table.version();
        Ok(())
    }
}

/// The table's text as store nodes: `ceiling` → its line, `leases/<vm>` → the VM's line.
fn store_lines(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["ceiling", ..] => Some(("ceiling".to_string(), l.to_string())),
            ["lease", vm, ..] => Some((format!("leases/{vm}"), l.to_string())),
            _ => None,
        })
        .collect()
}

/// Reads the table's text back: `None` when nothing was ever stored.
fn load(state: &State) -> Result<Option<String>> {
    match state {
        State::File(path) => match std::fs::read_to_string(path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("cannot read the lease table", path, e)),
        },
        State::Store(sock) => {
            let mut c = store::Client::connect(sock)?;
            let Some(ceiling) = c.try_read(&format!("{STORE_ROOT}/ceiling"))? else { return Ok(None) };
            let mut text = format!("vigil-leases 2\n{}\n", String::from_utf8_lossy(&ceiling));
            let vms = match c.directory(&format!("{STORE_ROOT}/leases")) {
                Ok(v) => v,
                Err(store::Error::Store { errno: store::Errno::ENOENT, .. }) => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            for vm in vms {
                if let Some(line) = c.try_read(&format!("{STORE_ROOT}/leases/{vm}"))? {
                    text.push_str(&String::from_utf8_lossy(&line));
                    text.push('\n');
                }
            }
            Ok(Some(text))
        }
    }
}

/// Loads the lease table from `state` (a new, empty one if nothing was stored yet, which is
/// stored at once) and serves it on `listener`.
pub fn serve(listener: TcpListener, state: &State, key: Key) -> Result<Arbiter> {
    let addr = listener.local_addr().map_err(|e| Error::Cluster(format!("arbiter socket: {e}")))?;
    let (table, recovered) = match load(state)? {
        Some(text) => (Table::restore(&text).map_err(|e| Error::Cluster(format!("lease table {state}: {e}")))?, true),
        None => (Table::default(), false),
    };
    let mut durable = Durable { table, state: state.clone(), store: None, stored_lines: Default::default(), stored: u64::MAX };
    durable.sync().map_err(|e| Error::Cluster(format!("cannot store the lease table in {state}: {e}")))?;
    if recovered {
        tracing::info!("arbiter: lease table restored from {state}; waiting out the leases granted before the restart");
    }
    let durable = Arc::new(Mutex::new(durable));
    let key = Arc::new(key);
    let epoch = Instant::now();
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("arbiter".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    open.fetch_sub(1, Ordering::SeqCst);
                    let _ = conn.write_all(b"error busy: too many connections\n");
                    continue;
                }
                let (durable, key, open) = (durable.clone(), key.clone(), open.clone());
                let spawned = std::thread::Builder::new().name("arbiter-conn".into()).spawn(move || {
                    serve_connection(conn, &durable, &key, epoch);
                    open.fetch_sub(1, Ordering::SeqCst);
                });
                if spawned.is_err() {
                    tracing::warn!("arbiter: cannot start a thread for a connection");
                }
            }
        })
        .map_err(|e| Error::Cluster(format!("cannot start the arbiter's thread: {e}")))?;
    Ok(Arbiter { addr })
}

/// Reads one line of at most `max` bytes (without its newline). `Ok(None)` at the end of the
/// stream; an error for a longer line.
pub fn read_line(r: &mut impl BufRead, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = r.by_ref().take(max as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a line longer than {max} bytes")));
    }
    Ok(Some(line))
}

fn serve_connection(conn: TcpStream, durable: &Mutex<Durable>, key: &Key, epoch: Instant) {
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(IDLE));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let Ok(mut out) = conn.try_clone() else { return };
    let mut r = BufReader::with_capacity(MAX_LINE + 1, conn);
    loop {
        let line = match read_line(&mut r, MAX_LINE) {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                let _ = out.write_all(format!("error {e}\n").as_bytes());
                return;
            }
        };
        let Ok(line) = String::from_utf8(line) else {
            let _ = out.write_all(b"error not UTF-8\n");
            continue;
        };
        let Some((request, tag)) = line.trim_end().rsplit_once(' ') else {
            let _ = out.write_all(b"error not authenticated\n");
            return;
        };
        if !unhex(tag).is_some_and(|t| key.verify(&[b"vigil-lease-request", request.as_bytes()], &t)) {
            let _ = out.write_all(b"error not authenticated\n");
            return;
        }
        let answer = match Request::parse(request) {
            Ok(req) => {
                let now = epoch.elapsed().as_micros() as u64;
                let mut d = durable.lock().unwrap_or_else(|e| e.into_inner());
                let answer = d.table.handle(now, &req);
                match d.sync() {
                    Ok(()) => answer.to_line(),
                    Err(e) => {
                        tracing::warn!("arbiter: cannot store the lease table in {}: {e}", d.state);
                        format!("error cannot store the lease table: {e}")
                    }
                }
            }
            Err(e) => format!("error {e}"),
        };
        let tag = key.tag(&[b"vigil-lease-answer", request.as_bytes(), answer.as_bytes()]);
        if out.write_all(format!("{answer} {}\n", hex(&tag)).as_bytes()).is_err() {
            return;
        }
    }
}

/// A connection to the arbiter; reconnects on the next request after an error.
pub struct Client {
    addr: String,
    conn: Option<(TcpStream, BufReader<TcpStream>)>,
    timeout: Duration,
    key: Key,
}

impl Client {
    /// A client for the arbiter at `addr` (host:port); connects lazily.
    pub fn new(addr: &str, timeout: Duration, key: Key) -> Client {
        Client { addr: addr.to_owned(), conn: None, timeout, key }
    }

    /// Sends a request and waits (at most the timeout) for the answer.
    pub fn request(&mut self, req: &Request) -> Result<Answer, String> {
        let r = self.try_request(req);
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn try_request(&mut self, req: &Request) -> Result<Answer, String> {
        let fail = |e: &dyn std::fmt::Display| format!("arbiter {}: {e}", self.addr);
        if self.conn.is_none() {
            use std::net::ToSocketAddrs;
            let addr = self.addr.to_socket_addrs().map_err(|e| fail(&e))?.next().ok_or_else(|| fail(&"no address"))?;
            let s = TcpStream::connect_timeout(&addr, self.timeout).map_err(|e| fail(&e))?;
            let _ = s.set_nodelay(true);
            s.set_read_timeout(Some(self.timeout)).map_err(|e| fail(&e))?;
            let r = BufReader::new(s.try_clone().map_err(|e| fail(&e))?);
            self.conn = Some((s, r));
        }
        let request = req.to_line();
        let tag = self.key.tag(&[b"vigil-lease-request", request.as_bytes()]);
        let Some((w, r)) = self.conn.as_mut() else { return Err(fail(&"not connected")) };
        w.write_all(format!("{request} {}\n", hex(&tag)).as_bytes()).map_err(|e| fail(&e))?;
        let line = match read_line(r, MAX_LINE) {
            Ok(Some(l)) => String::from_utf8(l).map_err(|_| fail(&"an answer that is not UTF-8"))?,
            Ok(None) => return Err(fail(&"connection closed")),
            Err(e) => return Err(fail(&e)),
        };
        if let Some(e) = line.strip_prefix("error ") {
            let e = e.rsplit_once(' ').filter(|(_, t)| t.len() == 32).map_or(e, |(m, _)| m);
            return Err(fail(&e));
        }
        let (answer, tag) = line.rsplit_once(' ').ok_or_else(|| fail(&"an answer without a tag"))?;
        if !unhex(tag).is_some_and(|t| self.key.verify(&[b"vigil-lease-answer", request.as_bytes(), answer.as_bytes()], &t)) {
            return Err(fail(&"an answer that is not authenticated (another cluster's key?)"));
        }
        Answer::parse(answer).map_err(|e| fail(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key::from_bytes(vec![b; 32]).expect("key")
    }

    fn state(name: &str) -> State {
        State::File(dir(name).join("leases"))
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vigil-arbiter-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn raw(addr: SocketAddr, send: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        s.write_all(send).expect("write");
        let mut line = String::new();
        let _ = BufReader::new(s).read_line(&mut line);
        line
    }

    #[test]
    fn the_server_answers_over_tcp_and_keeps_its_table_across_restarts() {
        let path = state("restart");
        let a = serve(TcpListener::bind("127.0.0.1:0").expect("bind"), &path, key(1)).expect("serve");
        let mut c = Client::new(&a.addr.to_string(), Duration::from_secs(2), key(1));
        let renew = |gen| Request::Renew { vm: "v".into(), holder: "a".into(), gen, ttl_us: 300_000, backup: Some(4) };
        assert_eq!(c.request(&renew(0)), Ok(Answer::Granted { gen: 1, backup: Some(4) }));
        let mut d = Client::new(&a.addr.to_string(), Duration::from_secs(2), key(1));
        let r = d.request(&Request::Takeover { vm: "v".into(), holder: "b".into(), session: 4, ttl_us: 1 });
        assert!(matches!(r, Ok(Answer::Held { .. })), "{r:?}");
        // "Restart": a second server on the same file.
        let b = serve(TcpListener::bind("127.0.0.1:0").expect("bind"), &path, key(1)).expect("serve again");
        let mut c2 = Client::new(&b.addr.to_string(), Duration::from_secs(2), key(1));
        assert_eq!(c2.request(&renew(1)), Ok(Answer::Granted { gen: 1, backup: Some(4) }), "the holder keeps its lease");
        let claim = Request::Renew { vm: "v".into(), holder: "z".into(), gen: 0, ttl_us: 1000, backup: None };
        assert!(matches!(c2.request(&claim), Ok(Answer::Recovering { .. })));
        // A damaged table is named, with its line.
        let State::File(file) = &path else { unreachable!() };
        std::fs::write(file, "vigil-leases 1\nlease v a zero -\n").expect("write");
        let e = serve(TcpListener::bind("127.0.0.1:0").expect("bind"), &path, key(1)).err().expect("refused").to_string();
        assert!(e.contains("leases") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn unauthenticated_oversized_and_garbage_lines_get_errors() {
        let a = serve(TcpListener::bind("127.0.0.1:0").expect("bind"), &state("hostile"), key(1)).expect("serve");
        assert!(raw(a.addr, b"hello\n").starts_with("error not authenticated"));
        assert!(raw(a.addr, b"renew v a 0 1000 - 00112233445566778899aabbccddeeff\n").starts_with("error not authenticated"));
        assert!(raw(a.addr, &[0xff, 0xfe, b'\n']).starts_with("error not UTF-8"));
        let long = vec![b'x'; 100_000];
        assert!(raw(a.addr, &long).starts_with("error a line longer than 1024 bytes"));
        // Another cluster's key: the client says so.
        let mut c = Client::new(&a.addr.to_string(), Duration::from_secs(2), key(2));
        let e = c.request(&Request::Renew { vm: "v".into(), holder: "a".into(), gen: 0, ttl_us: 1000, backup: None }).unwrap_err();
        assert!(e.contains("not authenticated"), "{e}");
        // A bad request with a good tag is explained.
        let k = key(1);
        let bad = "steal v";
        let tag = hex(&k.tag(&[b"vigil-lease-request", bad.as_bytes()]));
        assert!(raw(a.addr, format!("{bad} {tag}\n").as_bytes()).starts_with("error bad request"));
    }

    #[test]
    fn connections_are_bounded_and_idle_ones_do_not_block_others() {
        let a = serve(TcpListener::bind("127.0.0.1:0").expect("bind"), &state("bounded"), key(1)).expect("serve");
        let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS).map(|_| TcpStream::connect(a.addr).expect("connect")).collect();
        std::thread::sleep(Duration::from_millis(200));
        assert!(raw(a.addr, b"").starts_with("error busy"), "one too many");
        drop(idle);
        std::thread::sleep(Duration::from_millis(200));
        let mut c = Client::new(&a.addr.to_string(), Duration::from_secs(2), key(1));
        let r = c.request(&Request::Renew { vm: "v".into(), holder: "a".into(), gen: 0, ttl_us: 1000, backup: None });
        assert!(matches!(r, Ok(Answer::Granted { .. })), "{r:?}");
    }

    /// The table kept in the cluster store: a second arbiter (another host, after the first
    /// died) finds the generations and registrations there.
    #[test]
    fn the_table_in_the_store_survives_the_arbiter() {
        let socket = crate::fencing::tests::store("arbiter-table");
        let state: State = format!("store:{}", socket.display()).parse().expect("state");
        let a = serve(TcpListener::bind("127.0.0.1:0").expect("bind"), &state, key(1)).expect("serve");
        let mut c = Client::new(&a.addr.to_string(), Duration::from_secs(2), key(1));
        for vm in ["v", "w"] {
            let r = c.request(&Request::Renew { vm: vm.into(), holder: "a".into(), gen: 0, ttl_us: 300_000, backup: Some(4) });
            assert_eq!(r, Ok(Answer::Granted { gen: 1, backup: Some(4) }));
        }
        let b = serve(TcpListener::bind("127.0.0.1:0").expect("bind"), &state, key(1)).expect("serve again");
        let mut c2 = Client::new(&b.addr.to_string(), Duration::from_secs(2), key(1));
        let stale = Request::Renew { vm: "w".into(), holder: "z".into(), gen: 7, ttl_us: 1000, backup: None };
        assert_eq!(c2.request(&stale), Ok(Answer::Superseded { gen: 1, holder: "a".into() }));
        let claim = Request::Renew { vm: "v".into(), holder: "z".into(), gen: 0, ttl_us: 1000, backup: None };
        assert!(matches!(c2.request(&claim), Ok(Answer::Recovering { .. })));
        assert!("store:".parse::<State>().is_err());
    }
}
