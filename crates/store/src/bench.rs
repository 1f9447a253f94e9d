//! Measurements of the store under load, for `vigil bench store` and the example
//! `bench_tx` (`cargo run --release -p store --example bench_tx`): transaction start and a
//! read-modify-write transaction on trees of a given size, and another client's read latency
//! while transactions run. A benchmark, not a test: it reports, it asserts nothing.
//!
//! The server runs in this process (one thread, as `vigil store serve` runs it) on a data
//! directory in `/dev/shm` where there is one, so that the figures are the store's, not the
//! disk's `fdatasync`.

use crate::log::{Backend, LogBackend};
use crate::perms::Perms;
use crate::server::{Config, Server};
use crate::state::Mutation;
use crate::wire::{self, decode, Msg, MsgType};
use crate::{Error, Result};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Transactions the busy client runs, at least, while the other client's reads are measured.
const DURING_TXS: u64 = 20;

/// Children per directory in [`populate`]'s layout.
const FANOUT: usize = 1000;

/// Writes a data directory holding `nodes` nodes (about), laid out as a XenStore host holds
/// them: `/local/domain/<d>/data/<k>` with 1,000 keys per domain, values of 16 bytes.
pub fn populate(data: &Path, nodes: usize) -> Result<()> {
    let mut b = LogBackend::open(data)?;
    b.load()?;
    let perms = Perms::owned_by(0);
    let put = |path: String, value: &[u8]| Mutation::Put { path, value: value.to_vec(), perms: perms.clone() };
    let mut snap = vec![put("/".into(), b""), put("/local".into(), b""), put("/local/domain".into(), b"")];
    let mut d = 0;
    while snap.len() < nodes {
        let home = format!("/local/domain/{d}");
        snap.push(put(home.clone(), b""));
        snap.push(put(format!("{home}/data"), b""));
        for k in 0..FANOUT.min(nodes.saturating_sub(snap.len()).max(1)) {
            snap.push(put(format!("{home}/data/k{k}"), b"0123456789abcdef"));
        }
        d += 1;
    }
    b.compact(&snap)
}

/// Latency figures of one kind of request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub count: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Summary {
    fn of(mut v: Vec<Duration>) -> Summary {
        if v.is_empty() {
            return Summary::default();
        }
        v.sort();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Summary { count: v.len(), p50: at(0.5), p99: at(0.99), max: v[v.len() - 1] }
    }
}

/// What [`transactions`] measured on a tree of `nodes` nodes.
#[derive(Debug, Clone)]
pub struct TxReport {
    pub nodes: usize,
    /// `TRANSACTION_START` (each followed by an aborting `TRANSACTION_END F`, not timed).
    pub start: Summary,
    /// Start, read a key, write it, commit: four round trips and one `fdatasync`.
    pub rmw: Summary,
    /// Another client's reads, nothing else running.
    pub read_idle: Summary,
    /// The same reads while a client runs read-modify-write transactions back to back and ten
    /// more transactions stay open (at least `rounds` reads, and until 20 transactions ran).
    pub read_during: Summary,
    /// Transactions the busy client committed or saw fail while those reads ran.
    pub txs_during: u64,
    /// Resident memory of this process before and after opening ten transactions (each of
    /// which read one node), in KiB.
    pub rss_before_open_kib: u64,
    pub rss_after_open_kib: u64,
}

/// A raw connection: one request, one reply.
struct Raw {
    s: UnixStream,
    buf: Vec<u8>,
    req: u32,
}

impl Raw {
    fn open(sock: &Path) -> Result<Raw> {
        let s = unixsock::connect(sock).map_err(|e| Error::io("connecting to", sock, e))?;
        Ok(Raw { s, buf: Vec::new(), req: 0 })
    }

    fn call(&mut self, ty: MsgType, tx_id: u32, payload: Vec<u8>) -> Result<Msg> {
        self.req += 1;
        let m = Msg::new(ty, self.req, tx_id, payload);
        self.s.write_all(&m.encode()).map_err(|e| Error::Protocol(format!("bench send: {e}")))?;
        loop {
            match decode(&self.buf) {
                Ok(Some((m, n))) => {
                    self.buf.drain(..n);
                    if m.ty == MsgType::WatchEvent as u32 {
                        continue;
                    }
                    if m.ty == MsgType::Error as u32 {
                        return Err(Error::Protocol(format!("bench: {ty:?} answered {}", String::from_utf8_lossy(&m.payload))));
                    }
                    return Ok(m);
                }
                Ok(None) => {}
                Err(e) => return Err(Error::Protocol(e.to_string())),
            }
            let mut chunk = [0u8; 8192];
            let n = self.s.read(&mut chunk).map_err(|e| Error::Protocol(format!("bench receive: {e}")))?;
            if n == 0 {
                return Err(Error::Protocol("bench: the server closed the connection".into()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn start(&mut self) -> Result<u32> {
        let r = self.call(MsgType::TransactionStart, 0, vec![0])?;
        String::from_utf8_lossy(&r.payload).trim_end_matches('\0').parse().map_err(|_| Error::Protocol("bench: bad transaction id".into()))
    }

    fn rmw(&mut self, key: &str) -> Result<bool> {
        let tx = self.start()?;
        let v = self.call(MsgType::Read, tx, wire::strings(&[key]))?.payload;
        let n: u64 = std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut p = wire::strings(&[key]);
        p.extend_from_slice((n + 1).to_string().as_bytes());
        self.call(MsgType::Write, tx, p)?;
        match self.call(MsgType::TransactionEnd, tx, wire::strings(&["T"])) {
            Ok(_) => Ok(true),
            Err(Error::Protocol(e)) if e.contains("EAGAIN") => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok()))
        .unwrap_or(0)
}

fn scratch(name: &str) -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    base.join(format!("vigil-bench-{name}-{}", std::process::id()))
}

/// Runs the transaction benchmark on a tree of about `nodes` nodes, `rounds` requests of each
/// kind. Leaves the server thread running (it dies with the process) and removes its data.
pub fn transactions(nodes: usize, rounds: usize) -> Result<TxReport> {
    let dir = scratch(&format!("tx{nodes}"));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    populate(&data, nodes)?;
    let cfg = Config::local(dir.join("sock"), data.clone());
    let server = Server::bind(&cfg)?;
    let nodes = server.nodes();
    std::thread::spawn(move || server.run());
    let sock = cfg.socket.clone();
    let key = "/local/domain/0/data/k1";
    let other_key = "/local/domain/0/data/k2";

    let mut a = Raw::open(&sock)?;
    let mut start = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        let tx = a.start()?;
        start.push(t.elapsed());
        a.call(MsgType::TransactionEnd, tx, wire::strings(&["F"]))?;
    }
    let mut rmw = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        a.rmw(key)?;
        rmw.push(t.elapsed());
    }

    let mut b = Raw::open(&sock)?;
    let mut read_idle = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        b.call(MsgType::Read, 0, wire::strings(&[other_key]))?;
        read_idle.push(t.elapsed());
    }

    // Ten open transactions (Xen's per-connection default), each having read one node.
    let rss_before_open_kib = rss_kib();
    let mut holder = Raw::open(&sock)?;
    for _ in 0..10 {
        let tx = holder.start()?;
        holder.call(MsgType::Read, tx, wire::strings(&[key]))?;
    }
    let rss_after_open_kib = rss_kib();

    // Reads go on until `rounds` are done and the other client has run at least
    // `DURING_TXS` transactions meanwhile, so that they overlap transactions however slow.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let (stop2, done2, sock2) = (Arc::clone(&stop), Arc::clone(&done), sock.clone());
    let busy = std::thread::spawn(move || -> Result<u64> {
        let mut c = Raw::open(&sock2)?;
        while !stop2.load(Ordering::Relaxed) {
            c.rmw(key)?;
            done2.fetch_add(1, Ordering::Relaxed);
        }
        Ok(done2.load(Ordering::Relaxed))
    });
    while done.load(Ordering::Relaxed) == 0 && !busy.is_finished() {
        std::thread::yield_now();
    }
    let mut read_during = Vec::with_capacity(rounds);
    while read_during.len() < rounds || (done.load(Ordering::Relaxed) < DURING_TXS && !busy.is_finished()) {
        let t = Instant::now();
        b.call(MsgType::Read, 0, wire::strings(&[other_key]))?;
        read_during.push(t.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let txs_during = busy.join().map_err(|_| Error::Protocol("bench: transaction thread panicked".into()))??;
    drop(holder);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(TxReport {
        nodes,
        start: Summary::of(start),
        rmw: Summary::of(rmw),
        read_idle: Summary::of(read_idle),
        read_during: Summary::of(read_during),
        txs_during,
        rss_before_open_kib,
        rss_after_open_kib,
    })
}

/// The reports as a table (times in µs).
pub fn table(reports: &[TxReport]) -> String {
    let us = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e6);
    let mut out = String::from(
        "nodes      tx start p50/p99/max µs   rmw tx p50/p99/max µs    other read idle p50/p99/max µs  during (reads, txs) p50/p99/max µs   RSS +10 open tx\n",
    );
    for r in reports {
        let s = |x: &Summary| format!("{}/{}/{}", us(x.p50), us(x.p99), us(x.max));
        out.push_str(&format!(
            "{:<10} {:<26} {:<24} {:<31} {:<35} {} KiB\n",
            r.nodes,
            s(&r.start),
            s(&r.rmw),
            s(&r.read_idle),
            format!("({}, {}) {}", r.read_during.count, r.txs_during, s(&r.read_during)),
            r.rss_after_open_kib as i64 - r.rss_before_open_kib as i64
        ));
    }
    out
}
