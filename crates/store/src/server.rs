//! The thin driver: serves the [`Store`] state machine on a Unix socket, with the durable
//! [`Backend`] underneath. Every socket client is dom0 (privileged), as with Xen's xenstored.
//!
//! One reader and one writer thread per connection. Requests are applied to the state machine
//! one at a time under a lock, and their mutations written to the backend in that order; then,
//! outside the lock, one `fdatasync` makes every request written so far durable (group commit:
//! concurrent clients share a sync). Every reply and watch event — of reads too — is held back
//! until the sync covering all writes made before it completes, so no client ever sees state
//! that a crash could take back. If the backend fails, memory is ahead of disk: the server exits
//! (status 70) so that its supervisor restarts it from the durable state.
//!
//! With the etcd backend the log may be shared with other front ends: a request whose log slot
//! another front end took is undone, the missing entries applied, and the request handled again
//! (`commit`); a follower thread applies other front ends' entries as the etcd watch reports
//! them and releases domains whose lease expired.
//!
//! Nothing but the tree and the domains survives a restart: connections, watches and open
//! transactions are gone. Clients see the socket close; a transaction in flight was not
//! committed (its END gets no reply), and [`crate::Client`] reconnects, re-registers its watches
//! and tells the caller `EAGAIN`.

use crate::etcd::{follow, EtcdBackend, Signal};
use crate::log::{Backend, CatchUp, LogBackend};
use crate::state::{Checkpoint, ConnId, Errno, Mutation, Output, Quota, Store};
use crate::wire::{self, Msg, MsgType, HEADER_LEN, PAYLOAD_MAX};
use crate::{Error, Result};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where the server listens and keeps its data.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    /// Data directory of the embedded log backend (unused with `etcd`).
    pub data: PathBuf,
    pub quota: Quota,
    /// Keep the log in etcd instead: member endpoints (`host:port`) and a key prefix.
    pub etcd: Option<(Vec<String>, String)>,
    /// With `etcd`: TTL in seconds of the lease that ties the domains this front end introduces
    /// to its life (0: 10 s).
    pub etcd_lease_ttl: u64,
}

/// Encoded messages and the connections they go to.
type Outgoing = Vec<(ConnId, Vec<u8>)>;

struct Inner {
    store: Store,
    backend: Box<dyn Backend>,
    writers: HashMap<ConnId, Sender<Vec<u8>>>,
    /// Requests whose mutations were written to the backend, in order.
    written: u64,
    /// Messages waiting for the sync covering `written` as it was when they were produced.
    pending: VecDeque<(u64, Outgoing)>,
    /// The backend's log may be shared with other front ends (etcd): take a checkpoint before
    /// each mutating request, to undo it if another front end appended first.
    shared_log: bool,
}

/// Shared by the connection threads. Lock order: `sync` before `inner`.
struct Shared {
    inner: Mutex<Inner>,
    /// Held by the one thread syncing; others wait and usually find their request covered.
    sync: Mutex<()>,
    /// `written` as of the last completed sync.
    synced: AtomicU64,
}

fn fatal(e: &Error) -> ! {
    eprintln!("vigil store: {e}; exiting so that the supervisor restarts from the durable state");
    std::process::exit(70);
}

/// Group commit: one `fdatasync` makes every request written so far durable.
fn make_durable(shared: &Shared, seq: u64) {
    if shared.synced.load(Ordering::Acquire) >= seq {
        return;
    }
    let _one = shared.sync.lock().unwrap_or_else(|p| p.into_inner());
    if shared.synced.load(Ordering::Acquire) >= seq {
        return;
    }
    // Read the target and the file together: earlier log files were made durable by the
    // compaction that replaced them.
    let (target, file) = {
        let g = lock(&shared.inner);
        (g.written, g.backend.syncer())
    };
    match file {
        Ok(Some(f)) => {
            if let Err(e) = f.sync_data() {
                fatal(&Error::io("syncing the store log", "log", e));
            }
        }
        Ok(None) => {}
        Err(e) => fatal(&e),
    }
    shared.synced.store(target, Ordering::Release);
}

/// Sends every queued message whose writes are durable, in order.
fn deliver(shared: &Shared) {
    let mut g = lock(&shared.inner);
    let synced = shared.synced.load(Ordering::Acquire);
    while g.pending.front().is_some_and(|(seq, _)| *seq <= synced) {
        let Some((_, sends)) = g.pending.pop_front() else { break };
        for (to, bytes) in sends {
            if let Some(w) = g.writers.get(&to) {
                let _ = w.send(bytes);
            }
        }
    }
}

/// A loaded store bound to its socket.
pub struct Server {
    listener: UnixListener,
    shared: Arc<Shared>,
    socket: PathBuf,
    stats: Arc<Stats>,
}

/// File descriptors kept free for the server's own use (log files, compaction, etcd
/// connections) when the connection limit is derived from `RLIMIT_NOFILE`.
const FD_RESERVE: u64 = 64;

/// Counters of a running server, for metrics ([`Stats::prometheus`]; also answered to
/// `XS_CONTROL metrics`).
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections open now.
    pub connections_open: AtomicU64,
    /// Connections accepted since start.
    pub connections_accepted: AtomicU64,
    /// Connections closed at once because the server was at its connection or descriptor limit.
    pub connections_refused: AtomicU64,
    /// `accept` failures (descriptor exhaustion included); the server keeps serving.
    pub accept_errors: AtomicU64,
    /// The connection limit in force (from `RLIMIT_NOFILE`).
    pub connections_max: AtomicU64,
}

impl Stats {
    /// The counters in Prometheus' text format.
    pub fn prometheus(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        for (name, kind, help, v) in [
            ("vigil_store_connections", "gauge", "Connections open now.", g(&self.connections_open)),
            ("vigil_store_connections_max", "gauge", "Connection limit (from RLIMIT_NOFILE).", g(&self.connections_max)),
            ("vigil_store_connections_accepted_total", "counter", "Connections accepted.", g(&self.connections_accepted)),
            (
                "vigil_store_connections_refused_total",
                "counter",
                "Connections closed at once at the connection or descriptor limit.",
                g(&self.connections_refused),
            ),
            ("vigil_store_accept_errors_total", "counter", "accept() failures (the server keeps serving).", g(&self.accept_errors)),
        ] {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
        }
        out
    }
}

/// Raises the soft limit on open files to the hard limit where allowed; returns the soft limit
/// in force afterwards.
pub fn raise_fd_limit() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes into the struct we pass, which lives on our stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    if r.rlim_cur < r.rlim_max {
        // An infinite hard limit is refused by the kernel above nr_open: try the common cap.
        for want in [r.rlim_max, 1 << 20] {
            let n = libc::rlimit { rlim_cur: want.min(r.rlim_max), rlim_max: r.rlim_max };
            // SAFETY: setrlimit only reads the struct we pass.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &n) } == 0 {
                r.rlim_cur = n.rlim_cur;
                break;
            }
        }
    }
    r.rlim_cur as u64
}

/// Logs at most one line per `period` for a repeated condition (`last` holds the last time).
fn rate_limited(last: &mut Option<Instant>, period: Duration, msg: impl FnOnce() -> String) {
    let due = match last {
        Some(t) => t.elapsed() >= period,
        None => true,
    };
    if due {
        eprintln!("vigil store: {}", msg());
        *last = Some(Instant::now());
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panic in another connection thread must not stop the store; the state machine never
    // leaves a half-applied request behind (it applies whole mutations), so recover the guard.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Applies what other front ends appended to a shared log and queues the watch events it
/// fires for this front end's connections.
fn catch_up(g: &mut Inner) -> Result<()> {
    let corrupt = |what| Error::Corrupt { path: "etcd:log".into(), offset: 0, what };
    let sends = match g.backend.catch_up()? {
        CatchUp::Entries(batches) => {
            let mut sends = Vec::new();
            for batch in batches {
                sends.extend(g.store.apply_remote(&batch).map_err(corrupt)?);
            }
            sends
        }
        CatchUp::Reload(batches) => {
            eprintln!("vigil store: another front end compacted entries this one lacked; reloading the state");
            g.store.reload(&batches).map_err(corrupt)?
        }
    };
    let seq = g.written;
    g.pending.push_back((seq, sends.into_iter().map(|(to, m)| (to, m.encode())).collect()));
    Ok(())
}

/// Runs `f` (one request, or an internal change) on the store and makes its mutations durable,
/// in the backend's order. With a shared log, `f` returns a checkpoint taken before it changed
/// anything; if another front end took the log slot, the change is undone, the new entries are
/// applied (their watch events queued first) and `f` runs again on the newer state — so a
/// transaction validates against everything committed before it, and fails with `EAGAIN` if
/// that touched its read set.
fn commit(g: &mut Inner, mut f: impl FnMut(&mut Store, bool) -> (Option<Checkpoint>, Output)) -> Output {
    loop {
        let (cp, out) = f(&mut g.store, g.shared_log);
        if out.mutations.is_empty() {
            return out;
        }
        // The lease key goes first: a front end that sees the domain introduced in the log
        // also finds its key, unless the lease has expired.
        for m in &out.mutations {
            if let Mutation::Introduce { domid } = m {
                if let Err(e) = g.backend.hold_domain(*domid) {
                    fatal(&e);
                }
            }
        }
        match g.backend.try_write(&out.mutations) {
            Ok(true) => {}
            Ok(false) => {
                let Some(cp) = cp else { fatal(&Error::Etcd("log slot lost by a request without a checkpoint".into())) };
                g.store.rollback(cp);
                if let Err(e) = catch_up(g) {
                    fatal(&e);
                }
                continue;
            }
            Err(e) => fatal(&e),
        }
        g.written += 1;
        for m in &out.mutations {
            if let Mutation::Release { domid } = m {
                if let Err(e) = g.backend.drop_domain(*domid) {
                    eprintln!("vigil store: removing the lease key of released domain {domid}: {e}");
                }
            }
        }
        if g.backend.wants_compaction() {
            let snap = g.store.snapshot();
            if let Err(e) = g.backend.compact(&snap) {
                fatal(&e);
            }
        }
        return out;
    }
}

/// The follower's step: apply what other front ends appended, then (when `reap`) release the
/// domains whose lease key is gone (their front end died and the lease expired).
fn follow_step(shared: &Shared, signal: Signal, reap: bool) {
    let seq = {
        let mut g = lock(&shared.inner);
        let g = &mut *g;
        // Skip the range request when the watch named only entries applied already (this front
        // end's own appends, mostly).
        let lacking = match (signal.newest, g.backend.applied_upto()) {
            (Some(newest), Some(have)) => newest > have,
            _ => true,
        };
        match if lacking { catch_up(g) } else { Ok(()) } {
            Ok(()) => {}
            Err(e @ Error::Etcd(_)) => eprintln!("vigil store: following the etcd log: {e}"),
            Err(e) => fatal(&e),
        }
        if reap {
            match g.backend.held_domains() {
                Ok(Some(held)) => {
                    for d in g.store.domains() {
                        if !held.contains(&d) {
                            let out = commit(g, |s, _| (Some(s.checkpoint_tree()), s.release_domain(d)));
                            let seq = g.written;
                            g.pending.push_back((seq, out.sends.into_iter().map(|(to, m)| (to, m.encode())).collect()));
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => eprintln!("vigil store: reading domain leases: {e}"),
            }
        }
        g.written
    };
    make_durable(shared, seq);
    deliver(shared);
}

/// Rebuilds a store from the backend's history.
pub fn recover(backend: &mut dyn Backend, quota: Quota, data: &Path) -> Result<Store> {
    let mut store = Store::new(quota);
    for (i, batch) in backend.load()?.into_iter().enumerate() {
        for m in &batch {
            store.apply(m).map_err(|what| Error::Corrupt { path: data.to_path_buf(), offset: i as u64, what })?;
        }
    }
    Ok(store)
}

impl Server {
    /// Loads the data directory and binds the socket (replacing a stale socket file).
    pub fn bind(cfg: &Config) -> Result<Server> {
        let mut backend: Box<dyn Backend> = match &cfg.etcd {
            Some((endpoints, prefix)) => {
                let mut b = EtcdBackend::new(endpoints.clone(), prefix)?;
                if cfg.etcd_lease_ttl > 0 {
                    b.set_lease_ttl(cfg.etcd_lease_ttl);
                }
                Box::new(b)
            }
            None => Box::new(LogBackend::open(&cfg.data)?),
        };
        let store = recover(backend.as_mut(), cfg.quota, &cfg.data)?;
        if let Ok(meta) = std::fs::symlink_metadata(&cfg.socket) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(Error::io("refusing to replace non-socket", &cfg.socket, std::io::ErrorKind::AlreadyExists.into()));
            }
            std::fs::remove_file(&cfg.socket).map_err(|e| Error::io("removing stale socket", &cfg.socket, e))?;
        }
        let listener = UnixListener::bind(&cfg.socket).map_err(|e| Error::io("binding", &cfg.socket, e))?;
        let shared_log = cfg.etcd.is_some();
        let inner = Inner { store, backend, writers: HashMap::new(), written: 0, pending: VecDeque::new(), shared_log };
        let shared = Arc::new(Shared { inner: Mutex::new(inner), sync: Mutex::new(()), synced: AtomicU64::new(0) });
        if let Some((endpoints, prefix)) = &cfg.etcd {
            // Follow the shared log: apply what other front ends append, fire watches, reap
            // domains whose lease expired (on a DELETE event, and at least every second).
            let (endpoints, prefix, follower) = (endpoints.clone(), prefix.clone(), Arc::clone(&shared));
            std::thread::spawn(move || {
                let period = Duration::from_secs(1);
                let mut last_reap = Instant::now();
                follow(endpoints, &prefix, period, |signal| {
                    let reap = signal.deleted || last_reap.elapsed() >= period;
                    if reap {
                        last_reap = Instant::now();
                    }
                    follow_step(&follower, signal, reap);
                })
            });
        }
        let stats = Arc::new(Stats::default());
        // Two descriptors per connection (the stream and its writer's clone).
        let fds = raise_fd_limit();
        let max = fds.saturating_sub(FD_RESERVE.min(fds / 4)) / 2;
        stats.connections_max.store(max.max(1), Ordering::Relaxed);
        Ok(Server { listener, shared, socket: cfg.socket.clone(), stats })
    }

    /// The server's counters (connections, refusals), live while it runs.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// Number of nodes after recovery (for the start-up message).
    pub fn nodes(&self) -> usize {
        lock(&self.shared.inner).store.len()
    }

    /// Accepts connections forever. Resource exhaustion never stops it: at the connection limit
    /// (derived from `RLIMIT_NOFILE`, leaving descriptors for the log) a new connection is
    /// closed at once; when `accept` fails for lack of descriptors, a spare descriptor is
    /// released to accept and close the waiting connection; every such event is counted and
    /// logged (at most once a second).
    pub fn run(self) -> Result<()> {
        let stats = &self.stats;
        let mut spare = std::fs::File::open("/dev/null").ok();
        let mut last_log = None;
        let period = Duration::from_secs(1);
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    let exhausted = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                    rate_limited(&mut last_log, period, || {
                        format!("accepting on {}: {e}; refusing new connections until descriptors free up", self.socket.display())
                    });
                    if exhausted && spare.take().is_some() {
                        if self.listener.accept().is_ok() {
                            stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                        }
                        spare = std::fs::File::open("/dev/null").ok();
                    } else {
                        // ENOMEM, ENOBUFS, or no spare: let the pressure pass.
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    continue;
                }
            };
            let open = stats.connections_open.load(Ordering::Relaxed);
            if open >= stats.connections_max.load(Ordering::Relaxed) {
                stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                rate_limited(&mut last_log, period, || format!("{open} connections open, at the limit; refusing new ones"));
                continue;
            }
            stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
            stats.connections_open.fetch_add(1, Ordering::Relaxed);
            let (shared, st) = (Arc::clone(&self.shared), Arc::clone(stats));
            let spawned = std::thread::Builder::new().name("store-conn".into()).spawn(move || {
                serve_conn(shared, stream, &st);
                st.connections_open.fetch_sub(1, Ordering::Relaxed);
            });
            if let Err(e) = spawned {
                stats.connections_open.fetch_sub(1, Ordering::Relaxed);
                stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                rate_limited(&mut last_log, period, || format!("starting a connection thread: {e}; refusing the connection"));
            }
        }
    }
}

fn serve_conn(shared: Arc<Shared>, stream: UnixStream, stats: &Stats) {
    let Ok(mut out) = stream.try_clone() else { return };
    let (tx, rx) = channel::<Vec<u8>>();
    let conn = {
        let mut g = lock(&shared.inner);
        let id = g.store.connect(0);
        g.writers.insert(id, tx);
        id
    };
    let writer = std::thread::Builder::new().name("store-out".into()).spawn(move || {
        for bytes in rx {
            if out.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = out.shutdown(std::net::Shutdown::Both);
    });
    let Ok(writer) = writer else {
        let mut g = lock(&shared.inner);
        g.store.disconnect(conn);
        g.writers.remove(&conn);
        return;
    };
    let mut stream = stream;
    loop {
        let mut h = [0u8; HEADER_LEN];
        if stream.read_exact(&mut h).is_err() {
            break;
        }
        let (ty, req_id, tx_id, len) = wire::parse_header(&h);
        if len as usize > PAYLOAD_MAX {
            // The stream cannot be resynchronised: answer and close, as xenstored does.
            let e = Msg::new(MsgType::Error, req_id, tx_id, wire::strings(&[Errno::E2BIG.name()]));
            if let Some(w) = lock(&shared.inner).writers.get(&conn) {
                let _ = w.send(e.encode());
            }
            break;
        }
        let mut payload = vec![0u8; len as usize];
        if stream.read_exact(&mut payload).is_err() {
            break;
        }
        let msg = Msg { ty, req_id, tx_id, payload };
        if ty == MsgType::Control as u32 && msg.payload.starts_with(b"metrics\0") {
            // vigil's extension: the server's counters, in Prometheus' text format.
            let mut text = stats.prometheus().into_bytes();
            text.truncate(PAYLOAD_MAX - 1);
            text.push(0);
            if let Some(w) = lock(&shared.inner).writers.get(&conn) {
                let _ = w.send(Msg { ty, req_id, tx_id, payload: text }.encode());
            }
            continue;
        }
        let seq = {
            let mut g = lock(&shared.inner);
            let g = &mut *g;
            let out = commit(g, |s, shared_log| (if shared_log { s.checkpoint(conn, &msg) } else { None }, s.handle(conn, &msg)));
            // Replies wait for the sync that covers every write made so far (reads included:
            // nothing is shown that a crash could take back).
            let seq = g.written;
            g.pending.push_back((seq, out.sends.into_iter().map(|(to, m)| (to, m.encode())).collect()));
            seq
        };
        make_durable(&shared, seq);
        deliver(&shared);
    }
    {
        let mut g = lock(&shared.inner);
        g.store.disconnect(conn);
        g.writers.remove(&conn);
    }
    // The writer drains what is queued (an error reply, say), then shuts the socket down.
    let _ = writer.join();
}
