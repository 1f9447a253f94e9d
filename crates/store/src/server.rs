//! The thin driver: serves the [`Store`] state machine on a Unix socket, with the durable
//! [`Backend`] underneath. Every socket client is dom0 (privileged), as with Xen's xenstored.
//!
//! One thread runs an event loop (`epoll`, level-triggered) over the listener and every
//! connection, so a connection costs memory (its buffers and its state-machine entry), not a
//! thread. Each round reads what the ready connections sent, applies their complete requests to
//! the state machine one at a time, writes their mutations to the backend in that order, then
//! one `fdatasync` makes the whole round durable (group commit: every connection and every
//! pipelined request of a round share a sync). Every reply and watch event — of reads too — is
//! held back until the sync covering all writes made before it completes, so no client ever sees
//! state that a crash could take back.
//!
//! Memory per connection is bounded ([`Limits`]): while a connection's queued output exceeds
//! `out_queue_bytes`, the server reads no more of its requests (its replies cannot pile up) and
//! drops the watch events due to it; once its queue has drained, each of its watches fires once
//! with its own path, as after a reconnect, so the watcher re-reads and misses no change. If the backend fails, memory is ahead of disk: the server exits
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

use crate::epoll::{self, Epoll, Wake};
use crate::etcd::{follow, EtcdBackend, Signal};
use crate::log::{Backend, CatchUp, LogBackend};
use crate::state::{Checkpoint, ConnId, Errno, Mutation, Output, Quota, Store};
use crate::wire::{self, Msg, MsgType, HEADER_LEN, PAYLOAD_MAX};
use crate::{Error, Result};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Volatile nodes ([`Volatile`]): patterns of absolute paths, `*` standing for one
    /// component (`/vigil/hosts/*/heartbeat`).
    pub volatile: Vec<String>,
}

impl Config {
    /// A store on the embedded log in `data`, listening on `socket`, with the default quota
    /// and no volatile nodes.
    pub fn local(socket: impl Into<PathBuf>, data: impl Into<PathBuf>) -> Config {
        Config { socket: socket.into(), data: data.into(), quota: Quota::default(), etcd: None, etcd_lease_ttl: 0, volatile: Vec::new() }
    }
}

/// Nodes whose writer and readers need not wait for the disk: heartbeats, which only say "still
/// alive" and are rewritten every period.
///
/// A write of a volatile node outside a transaction is applied and logged like any other, but
/// its reply leaves before the `fdatasync` that makes it durable; a read of one outside a
/// transaction, and the supervisor's `XS_CONTROL check`, are answered likewise. Each such reply
/// still waits for every earlier reply of its connection (replies stay in order; a watch event
/// queued before it may come after it, as events may anyway). So a slow
/// disk delays neither a heartbeat nor the reading of one, and nothing else changes: every
/// other reply — reads of other nodes, and watch events — still waits for the sync covering
/// every write made before it. What a crash of the store may take back is the last writes of a
/// volatile node (its value goes back to an older one): a reader that judges liveness by a
/// heartbeat *changing* only sees one more change.
#[derive(Debug, Clone, Default)]
pub struct Volatile {
    patterns: Vec<Vec<String>>,
}

impl Volatile {
    /// Parses the patterns; the error names the bad one.
    pub fn new(patterns: &[String]) -> Result<Volatile> {
        let mut out = Vec::new();
        for p in patterns {
            let parts: Vec<String> = p.strip_prefix('/').unwrap_or("").split('/').map(str::to_string).collect();
            if !p.starts_with('/') || parts.iter().any(|c| c.is_empty() || (c.contains('*') && c != "*")) {
                return Err(Error::Config(format!(
                    "volatile node pattern {p:?}: expected an absolute path of non-empty components, `*` standing for one whole component"
                )));
            }
            out.push(parts);
        }
        Ok(Volatile { patterns: out })
    }

    /// Whether the node at absolute path `path` is volatile.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else { return false };
        self.patterns.iter().any(|pat| {
            let mut comps = rest.split('/');
            pat.iter().all(|want| comps.next().is_some_and(|c| (want == "*" && !c.is_empty()) || want == c)) && comps.next().is_none()
        })
    }

    /// Whether `msg`'s reply may leave before the disk has what came before it: a read or
    /// write of a volatile node outside a transaction, a `check`, and every step of a
    /// transaction but its end. What a transaction reads counts only if it commits, and the
    /// reply to its end waits for the sync that covers both its writes and every write its
    /// reads saw — so a transaction costs one wait for the disk, not one per request.
    fn answers_at_once(&self, msg: &Msg) -> bool {
        let path = || wire::split(&msg.payload).first().and_then(|p| std::str::from_utf8(p).ok()).unwrap_or("");
        match MsgType::from_u32(msg.ty) {
            Some(MsgType::Control) => msg.payload.starts_with(b"check\0"),
            Some(MsgType::TransactionStart) => true,
            Some(MsgType::TransactionEnd) => false,
            Some(
                MsgType::Read
                | MsgType::Write
                | MsgType::Mkdir
                | MsgType::Rm
                | MsgType::Directory
                | MsgType::DirectoryPart
                | MsgType::GetPerms
                | MsgType::SetPerms,
            ) if msg.tx_id != 0 => true,
            Some(MsgType::Read | MsgType::Write) if !self.patterns.is_empty() => self.matches(path()),
            _ => false,
        }
    }
}

/// Encoded messages and the connections they go to.
type Outgoing = Vec<(ConnId, Vec<u8>)>;

/// Messages held until the backend is durable up to `upto`.
struct Held {
    upto: u64,
    /// A reply that answers at once ([`Volatile`]): `upto` is its connection's previous
    /// message's, lower than the entries queued before it.
    at_once: bool,
    sends: Outgoing,
    /// Bytes its connection is charged beyond the reply's own until it leaves: the request,
    /// whose record waits in the log's queue for the same sync.
    charge: usize,
}

impl Held {
    fn new(upto: u64, sends: Outgoing) -> Held {
        Held { upto, at_once: false, sends, charge: 0 }
    }
}

struct Inner {
    store: Store,
    backend: Box<dyn Backend>,
    /// Requests whose mutations were written to the backend, in order.
    written: u64,
    /// Messages waiting for the sync covering the position given (`written` as it was when they
    /// were produced; for a reply that answers at once, its connection's previous message's).
    pending: VecDeque<Held>,
    /// How many of `pending` answer at once (they may be deliverable behind others).
    pending_at_once: usize,
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
    /// Wakes the event loop when another thread (the etcd follower, the syncer) queued or
    /// released messages.
    wake: Wake,
    /// The position the event loop wants durable; the syncer thread waits on `want_changed`.
    want: Mutex<u64>,
    want_changed: std::sync::Condvar,
    /// Fault injection: every sync of the log takes this many ms longer (a slow disk, for tests:
    /// [`Server::set_sync_delay`]).
    sync_delay_ms: AtomicU64,
}

/// The syncer thread: makes the backend durable up to what the event loop wants, then wakes the
/// loop to deliver what waited for it. The loop goes on reading and applying requests while a
/// sync runs (the next group of writes forms meanwhile), so a slow disk delays only the replies
/// that wait for it, never a reply that answers at once ([`Volatile`]).
fn syncer(shared: &Shared) {
    loop {
        let target = {
            let mut want = shared.want.lock().unwrap_or_else(|p| p.into_inner());
            while *want <= shared.synced.load(Ordering::Acquire) {
                want = shared.want_changed.wait(want).unwrap_or_else(|p| p.into_inner());
            }
            *want
        };
        make_durable(shared, target);
        compact_if_due(shared);
        shared.wake.wake();
    }
}

/// Compacts the embedded log when it has grown enough ([`LogBackend::rotate`]): the request
/// loop waits only while the next log is switched in and the tree copied, not for the disk.
/// No sync runs meanwhile (this holds `sync`), as the rotation requires; the replies waiting
/// for the records the snapshot covers are released when it is durable.
fn compact_if_due(shared: &Shared) {
    let _one = shared.sync.lock().unwrap_or_else(|p| p.into_inner());
    let (next, dir) = {
        let mut g = lock(&shared.inner);
        if !g.backend.wants_compaction() {
            return;
        }
        match g.backend.as_log() {
            Some(log) => log.next_log(),
            None => return,
        }
    };
    let t = Instant::now();
    let file = crate::log::create_log(&dir, &next).unwrap_or_else(|e| fatal(&e));
    let (frozen, covered, upto) = {
        let mut g = lock(&shared.inner);
        let g = &mut *g;
        let Some(log) = g.backend.as_log() else { return };
        let (covered, _) = log.rotate(file).unwrap_or_else(|e| fatal(&e));
        (g.store.freeze(), covered, g.written)
    };
    let bytes = crate::log::write_snapshot(&dir, covered, &mut frozen.mutations()).unwrap_or_else(|e| fatal(&e));
    if let Some(log) = lock(&shared.inner).backend.as_log() {
        log.snapshot_written(bytes);
    }
    shared.synced.fetch_max(upto, Ordering::AcqRel);
    if t.elapsed() >= Duration::from_millis(100) {
        tracing::warn!("store: compacting the log took {:.0} ms (requests went on meanwhile)", t.elapsed().as_secs_f64() * 1e3);
    }
}

/// Asks the syncer to make the backend durable up to `seq`.
fn want_durable(shared: &Shared, seq: u64) {
    if shared.synced.load(Ordering::Acquire) >= seq {
        return;
    }
    let mut want = shared.want.lock().unwrap_or_else(|p| p.into_inner());
    if *want < seq {
        *want = seq;
        shared.want_changed.notify_one();
    }
}

fn fatal(e: &Error) -> ! {
    tracing::warn!("vigil store: {e}; exiting so that the supervisor restarts from the durable state");
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
            let delay = shared.sync_delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                std::thread::sleep(Duration::from_millis(delay));
            }
            let t = std::time::Instant::now();
            if let Err(e) = f.sync() {
                fatal(&e);
            }
            // A slow disk stalls every writer (the agents' lease renewals too): said.
            if t.elapsed() >= std::time::Duration::from_millis(100) {
                tracing::warn!("store: fdatasync of the log took {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(None) => {}
        Err(e) => fatal(&e),
    }
    shared.synced.store(target, Ordering::Release);
}

/// A loaded store bound to its socket.
pub struct Server {
    listener: UnixListener,
    shared: Arc<Shared>,
    socket: PathBuf,
    stats: Arc<Stats>,
    limits: Limits,
    volatile: Volatile,
}

/// Bounds on what one connection may make the server hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of replies and watch events queued for a connection beyond which the server stops
    /// reading its requests and drops the watch events due to it (each of its watches fires once
    /// again when the queue has drained).
    pub out_queue_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { out_queue_bytes: 256 * 1024 }
    }
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
    /// Watch events not queued because their connection's output queue was full.
    pub watch_events_dropped: AtomicU64,
    /// Times a connection was paused (not read) because its output queue was full.
    pub connections_paused: AtomicU64,
    /// Bytes of replies and events queued for all connections now.
    pub output_queued_bytes: AtomicU64,
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
            (
                "vigil_store_watch_events_dropped_total",
                "counter",
                "Watch events dropped at a full output queue.",
                g(&self.watch_events_dropped),
            ),
            (
                "vigil_store_connections_paused_total",
                "counter",
                "Connections not read while their output queue was full.",
                g(&self.connections_paused),
            ),
            ("vigil_store_output_queued_bytes", "gauge", "Bytes queued for all connections.", g(&self.output_queued_bytes)),
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
    r.rlim_cur
}

/// Logs at most one line per `period` for a repeated condition (`last` holds the last time).
fn rate_limited(last: &mut Option<Instant>, period: Duration, msg: impl FnOnce() -> String) {
    let due = match last {
        Some(t) => t.elapsed() >= period,
        None => true,
    };
    if due {
        tracing::warn!("vigil store: {}", msg());
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
            tracing::warn!("vigil store: another front end compacted entries this one lacked; reloading the state");
            g.store.reload(&batches).map_err(corrupt)?
        }
    };
    let seq = g.written;
    g.pending.push_back(Held::new(seq, sends.into_iter().map(|(to, m)| (to, m.encode())).collect()));
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
                    tracing::warn!("vigil store: removing the lease key of released domain {domid}: {e}");
                }
            }
        }
        // The embedded log is compacted by the syncer thread, apart from the requests.
        if g.backend.wants_compaction() && g.backend.as_log().is_none() {
            let Inner { store, backend, .. } = &mut *g;
            let t = std::time::Instant::now();
            if let Err(e) = backend.compact_from(&mut store.snapshot_iter()) {
                fatal(&e);
            }
            // Every request waits for it (it holds the store): a long one is said.
            if t.elapsed() >= std::time::Duration::from_millis(100) {
                tracing::warn!("store: compacting the log took {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
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
            Err(e @ Error::Etcd(_)) => tracing::warn!("vigil store: following the etcd log: {e}"),
            Err(e) => fatal(&e),
        }
        if reap {
            match g.backend.held_domains() {
                Ok(Some(held)) => {
                    for d in g.store.domains() {
                        if !held.contains(&d) {
                            let out = commit(g, |s, _| (Some(s.checkpoint_tree()), s.release_domain(d)));
                            let seq = g.written;
                            g.pending.push_back(Held::new(seq, out.sends.into_iter().map(|(to, m)| (to, m.encode())).collect()));
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("vigil store: reading domain leases: {e}"),
            }
        }
        g.written
    };
    make_durable(shared, seq);
    shared.wake.wake();
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
        let listener = unixsock::bind(&cfg.socket).map_err(|e| Error::io("binding", &cfg.socket, e))?;
        let shared_log = cfg.etcd.is_some();
        let volatile = Volatile::new(&cfg.volatile)?;
        let inner = Inner { store, backend, written: 0, pending: VecDeque::new(), pending_at_once: 0, shared_log };
        let wake = Wake::new().map_err(|e| Error::io("creating an eventfd for", &cfg.socket, e))?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            sync: Mutex::new(()),
            synced: AtomicU64::new(0),
            wake,
            want: Mutex::new(0),
            want_changed: std::sync::Condvar::new(),
            sync_delay_ms: AtomicU64::new(0),
        });
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
        let fds = raise_fd_limit();
        let max = fds.saturating_sub(FD_RESERVE.min(fds / 4));
        stats.connections_max.store(max.max(1), Ordering::Relaxed);
        Ok(Server { listener, shared, socket: cfg.socket.clone(), stats, limits: Limits::default(), volatile })
    }

    /// The server's counters (connections, refusals), live while it runs.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// Number of nodes after recovery (for the start-up message).
    pub fn nodes(&self) -> usize {
        lock(&self.shared.inner).store.len()
    }

    /// Fault injection: from now on every sync of the log takes `delay` longer, as on a disk
    /// that other writers keep busy (also `XS_CONTROL sync-delay MS`).
    pub fn set_sync_delay(&self, delay: Duration) {
        self.shared.sync_delay_ms.store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// vigil's `XS_CONTROL` extensions, answered by the server rather than the state machine:
    /// `metrics` (the counters, in Prometheus' text format) and `sync-delay MS` (fault
    /// injection: every later sync of the log takes MS longer, 0 ends it; at most 10 s). Every
    /// client of the socket is privileged (dom0), as with xenstored's own controls.
    fn control(&self, msg: &Msg) -> Option<String> {
        if msg.ty != MsgType::Control as u32 {
            return None;
        }
        let parts = wire::split(&msg.payload);
        match parts.as_slice() {
            [b"metrics", ..] => Some(self.stats.prometheus()),
            [b"sync-delay", ms] => Some(match std::str::from_utf8(ms).ok().and_then(|m| m.parse::<u64>().ok()).filter(|&m| m <= 10_000) {
                Some(ms) => {
                    self.set_sync_delay(Duration::from_millis(ms));
                    tracing::warn!("store: every sync of the log delayed by {ms} ms (XS_CONTROL sync-delay)");
                    "OK".into()
                }
                None => "error: sync-delay takes milliseconds, 0 to 10000".into(),
            }),
            _ => None,
        }
    }

    /// Changes the per-connection bounds (before [`Server::run`]).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Serves forever on one thread (see the module documentation). Resource exhaustion never
    /// stops it: at the connection limit (derived from `RLIMIT_NOFILE`, leaving descriptors for
    /// the log) a new connection is closed at once; when `accept` fails for lack of descriptors,
    /// a spare descriptor is released to accept and close the waiting connection; every such
    /// event is counted and logged (at most once a second). Returns only if the event loop
    /// cannot be set up.
    pub fn run(self) -> Result<()> {
        let ep = Epoll::new().map_err(|e| Error::io("creating an epoll instance for", &self.socket, e))?;
        let setup = |e| Error::io("registering the listener of", &self.socket, e);
        self.listener.set_nonblocking(true).map_err(setup)?;
        ep.add(self.listener.as_raw_fd(), epoll::IN, LISTENER).map_err(setup)?;
        ep.add(self.shared.wake.raw(), epoll::IN, WAKE).map_err(setup)?;
        let shared = Arc::clone(&self.shared);
        std::thread::Builder::new()
            .name("store-syncer".into())
            .spawn(move || syncer(&shared))
            .map_err(|e| Error::io("starting the syncer thread of", &self.socket, e))?;
        let mut lp = Loop {
            ep,
            server: &self,
            conns: HashMap::new(),
            ready: BTreeSet::new(),
            dirty: BTreeSet::new(),
            overflowed: BTreeSet::new(),
            spare: std::fs::File::open("/dev/null").ok(),
            accept_paused_until: None,
            last_log: None,
            scratch: vec![0u8; 64 * 1024],
        };
        let mut buf = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        let mut events = Vec::with_capacity(buf.len());
        loop {
            let timeout = match lp.accept_paused_until {
                _ if !lp.ready.is_empty() => 0,
                Some(t) => t.saturating_duration_since(Instant::now()).as_millis().min(1000) as i32,
                None => -1,
            };
            if let Err(e) = lp.ep.wait(&mut events, &mut buf, timeout) {
                rate_limited(&mut lp.last_log, Duration::from_secs(1), || format!("epoll_wait: {e}"));
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            if lp.accept_paused_until.is_some_and(|t| Instant::now() >= t)
                && lp.ep.modify(self.listener.as_raw_fd(), epoll::IN, LISTENER).is_ok()
            {
                lp.accept_paused_until = None;
            }
            for ev in &events {
                match ev.key {
                    LISTENER => lp.accept_all(),
                    WAKE => self.shared.wake.drain(),
                    id => lp.on_event(id, ev.events),
                }
            }
            if let Some(seq) = lp.process() {
                want_durable(&self.shared, seq);
            }
            lp.deliver();
        }
    }
}

const LISTENER: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;
/// Requests of one connection handled per round before the others get their turn.
const ROUND_REQUESTS: usize = 64;
/// Unprocessed input buffered per connection before the server stops reading it.
const IN_BUFFER: usize = 2 * (HEADER_LEN + PAYLOAD_MAX);

/// One client connection as the event loop sees it.
struct Conn {
    stream: UnixStream,
    /// Received bytes not yet framed into requests.
    inbuf: Vec<u8>,
    /// Encoded messages to send, the first one `sent` bytes in.
    out: VecDeque<Vec<u8>>,
    sent: usize,
    out_bytes: usize,
    /// Bytes of replies to its requests still waiting for the disk, and of those requests
    /// (their records wait in the log's queue), counted with `out_bytes` against the
    /// connection's bound: a client that pipelines during a slow sync is paused.
    held_bytes: usize,
    /// The position its last queued reply waits for (a reply that answers at once waits for
    /// this, so that replies leave in order).
    last_upto: u64,
    /// Watch events were dropped: fire every watch once when the queue has drained.
    overflowed: bool,
    /// The client closed its sending side (or sent an unframeable header): answer what was
    /// received, then close.
    read_closed: bool,
    /// Readiness the connection is registered for.
    interest: u32,
}

struct Loop<'a> {
    ep: Epoll,
    server: &'a Server,
    conns: HashMap<ConnId, Conn>,
    /// Connections with buffered input that may hold complete requests.
    ready: BTreeSet<ConnId>,
    /// Connections whose registration or life may change after this round.
    dirty: BTreeSet<ConnId>,
    /// Connections whose watch events were dropped (each watch fires again once drained).
    overflowed: BTreeSet<ConnId>,
    spare: Option<std::fs::File>,
    /// `accept` failed without a remedy: the listener is unwatched until then.
    accept_paused_until: Option<Instant>,
    last_log: Option<Instant>,
    scratch: Vec<u8>,
}

impl Conn {
    /// The peer is gone (reset): nothing more can be read or delivered; the queued output is
    /// dropped and no longer counted.
    fn discard(&mut self, stats: &Stats) {
        stats.output_queued_bytes.fetch_sub(self.out_bytes as u64, Ordering::Relaxed);
        self.out.clear();
        self.out_bytes = 0;
        self.sent = 0;
        self.read_closed = true;
        self.inbuf.clear();
    }

    fn paused(&self, limits: &Limits) -> bool {
        self.out_bytes + self.held_bytes >= limits.out_queue_bytes
    }

    fn wanted(&self, limits: &Limits) -> u32 {
        let mut w = 0;
        if !self.read_closed && !self.paused(limits) && self.inbuf.len() < IN_BUFFER {
            w |= epoll::IN;
        }
        if !self.out.is_empty() {
            w |= epoll::OUT;
        }
        w
    }
}

impl Loop<'_> {
    fn stats(&self) -> &Stats {
        &self.server.stats
    }

    fn accept_all(&mut self) {
        let period = Duration::from_secs(1);
        loop {
            let stream = match self.server.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.stats().accept_errors.fetch_add(1, Ordering::Relaxed);
                    let exhausted = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                    let sock = self.server.socket.display().to_string();
                    rate_limited(&mut self.last_log, period, || {
                        format!("accepting on {sock}: {e}; refusing new connections until descriptors free up")
                    });
                    if exhausted && self.spare.take().is_some() {
                        if self.server.listener.accept().is_ok() {
                            self.stats().connections_refused.fetch_add(1, Ordering::Relaxed);
                        }
                        self.spare = std::fs::File::open("/dev/null").ok();
                        continue;
                    }
                    // ENOMEM, ENOBUFS, or no spare: stop watching the listener for a while (it
                    // stays readable, so the loop would spin), and leave the rest waiting.
                    if self.ep.modify(self.server.listener.as_raw_fd(), 0, LISTENER).is_ok() {
                        self.accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
                    }
                    return;
                }
            };
            let open = self.conns.len() as u64;
            if open >= self.stats().connections_max.load(Ordering::Relaxed) {
                self.stats().connections_refused.fetch_add(1, Ordering::Relaxed);
                rate_limited(&mut self.last_log, period, || format!("{open} connections open, at the limit; refusing new ones"));
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let id = lock(&self.server.shared.inner).store.connect(0);
            if let Err(e) = self.ep.add(stream.as_raw_fd(), epoll::IN, id) {
                lock(&self.server.shared.inner).store.disconnect(id);
                self.stats().connections_refused.fetch_add(1, Ordering::Relaxed);
                rate_limited(&mut self.last_log, period, || format!("registering a connection: {e}; refusing it"));
                continue;
            }
            self.stats().connections_accepted.fetch_add(1, Ordering::Relaxed);
            self.stats().connections_open.fetch_add(1, Ordering::Relaxed);
            let conn = Conn {
                stream,
                inbuf: Vec::new(),
                out: VecDeque::new(),
                sent: 0,
                out_bytes: 0,
                held_bytes: 0,
                last_upto: 0,
                overflowed: false,
                read_closed: false,
                interest: epoll::IN,
            };
            self.conns.insert(id, conn);
        }
    }

    fn on_event(&mut self, id: ConnId, events: u32) {
        self.dirty.insert(id);
        if events & (epoll::OUT | epoll::HUP | epoll::ERR) != 0 {
            self.flush(id);
        }
        let Some(c) = self.conns.get_mut(&id) else { return };
        if events & epoll::ERR != 0 && events & epoll::IN == 0 {
            self.close(id);
            return;
        }
        if events & (epoll::IN | epoll::HUP) != 0 && !c.read_closed {
            let fd = c.stream.as_raw_fd();
            while c.inbuf.len() < IN_BUFFER {
                match epoll::recv(fd, &mut self.scratch) {
                    Ok(0) => {
                        c.read_closed = true;
                        break;
                    }
                    Ok(n) => c.inbuf.extend_from_slice(&self.scratch[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        // Reset by the peer: nothing more can be delivered either.
                        c.discard(&self.server.stats);
                        break;
                    }
                }
            }
            self.ready.insert(id);
        }
    }

    /// Handles the complete requests of the ready connections (at most [`ROUND_REQUESTS`] each);
    /// returns the backend position the round's replies wait for.
    fn process(&mut self) -> Option<u64> {
        if self.ready.is_empty() {
            return None;
        }
        let limits = self.server.limits;
        let shared = &self.server.shared;
        let mut g = lock(&shared.inner);
        let g = &mut *g;
        let mut again = BTreeSet::new();
        for &id in &self.ready {
            let Some(c) = self.conns.get_mut(&id) else { continue };
            self.dirty.insert(id);
            let mut used = 0;
            let mut handled = 0;
            while handled < ROUND_REQUESTS && !c.paused(&limits) {
                let frame = match wire::decode(&c.inbuf[used..]) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(_) => {
                        // The stream cannot be resynchronised: answer and close, as xenstored does.
                        let mut h = [0u8; HEADER_LEN];
                        h.copy_from_slice(&c.inbuf[used..used + HEADER_LEN]);
                        let (_, req_id, tx_id, _) = wire::parse_header(&h);
                        let e = Msg::new(MsgType::Error, req_id, tx_id, wire::strings(&[Errno::E2BIG.name()]));
                        let e = e.encode();
                        (c.held_bytes, c.last_upto) = (c.held_bytes + e.len(), g.written);
                        g.pending.push_back(Held::new(g.written, vec![(id, e)]));
                        c.read_closed = true;
                        used = c.inbuf.len();
                        break;
                    }
                };
                let (msg, n) = frame;
                used += n;
                handled += 1;
                if let Some(text) = self.server.control(&msg) {
                    let mut text = text.into_bytes();
                    text.truncate(PAYLOAD_MAX - 1);
                    text.push(0);
                    let reply = Msg { ty: msg.ty, req_id: msg.req_id, tx_id: msg.tx_id, payload: text }.encode();
                    (c.held_bytes, c.last_upto) = (c.held_bytes + reply.len(), g.written);
                    g.pending.push_back(Held::new(g.written, vec![(id, reply)]));
                    continue;
                }
                let at_once = self.server.volatile.answers_at_once(&msg);
                let before = g.written;
                let out = commit(g, |s, shared_log| (if shared_log { s.checkpoint(id, &msg) } else { None }, s.handle(id, &msg)));
                // Replies wait for the sync that covers every write made so far (reads included:
                // nothing is shown that a crash could take back) — but for those of volatile
                // nodes, which wait only for their connection's previous message.
                let seq = g.written;
                let mut sends: Outgoing = out.sends.into_iter().map(|(to, m)| (to, m.encode())).collect();
                let reply = (!sends.is_empty()).then(|| sends.remove(0));
                if let Some((to, bytes)) = reply {
                    c.held_bytes += bytes.len();
                    if at_once {
                        g.pending.push_back(Held { upto: c.last_upto, at_once: true, sends: vec![(to, bytes)], charge: 0 });
                        g.pending_at_once += 1;
                    } else {
                        c.last_upto = seq;
                        // A request that wrote: its record waits in the log's queue too.
                        let charge = if seq > before { msg.payload.len() } else { 0 };
                        c.held_bytes += charge;
                        g.pending.push_back(Held { charge, ..Held::new(seq, vec![(to, bytes)]) });
                    }
                }
                if !sends.is_empty() {
                    g.pending.push_back(Held::new(seq, sends));
                }
            }
            c.inbuf.drain(..used);
            if c.inbuf.is_empty() && c.inbuf.capacity() > IN_BUFFER {
                c.inbuf = Vec::new();
            }
            if handled == ROUND_REQUESTS && !c.paused(&limits) {
                again.insert(id);
            }
        }
        self.ready = again;
        Some(g.written)
    }

    /// Moves every message whose writes are durable to its connection's queue (dropping watch
    /// events at a full queue), sends what the sockets take, and closes finished connections.
    fn deliver(&mut self) {
        let limits = self.server.limits;
        let mut touched = BTreeSet::new();
        {
            let shared = &self.server.shared;
            let mut g = lock(&shared.inner);
            let synced = shared.synced.load(Ordering::Acquire);
            // Every entry the disk now covers, in queue order: a prefix, then (if any answer at
            // once) those further back. A connection's entries wait for non-decreasing
            // positions, so what leaves of each is a prefix of its own, in order.
            let mut due = Vec::new();
            while g.pending.front().is_some_and(|h| h.upto <= synced) {
                due.extend(g.pending.pop_front());
            }
            if g.pending_at_once > 0 {
                let mut i = 0;
                while i < g.pending.len() {
                    if g.pending[i].at_once && g.pending[i].upto <= synced {
                        due.extend(g.pending.remove(i));
                    } else {
                        i += 1;
                    }
                }
            }
            g.pending_at_once -= due.iter().filter(|h| h.at_once).count();
            for Held { sends, charge, .. } in due {
                for (to, bytes) in sends {
                    let Some(c) = self.conns.get_mut(&to) else { continue };
                    let event = bytes[..4] == (MsgType::WatchEvent as u32).to_le_bytes();
                    // A reply takes its request's charge off: that alone may un-pause it.
                    let paused_before = c.paused(&limits);
                    if !event {
                        c.held_bytes = c.held_bytes.saturating_sub(bytes.len() + charge);
                    }
                    if event && (c.overflowed || c.paused(&limits)) {
                        c.overflowed = true;
                        self.overflowed.insert(to);
                        self.server.stats.watch_events_dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let was_paused = c.paused(&limits);
                    c.out_bytes += bytes.len();
                    self.server.stats.output_queued_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    c.out.push_back(bytes);
                    if !was_paused && c.paused(&limits) {
                        self.server.stats.connections_paused.fetch_add(1, Ordering::Relaxed);
                    }
                    if paused_before && !c.paused(&limits) && !c.inbuf.is_empty() {
                        // Resume the requests it sent while paused (`flush` sees it unpaused).
                        self.ready.insert(to);
                    }
                    touched.insert(to);
                }
            }
            // Watchers whose events were dropped and whose queue has drained: every watch fires
            // once with its own path, so that they re-read.
            let drained: Vec<ConnId> =
                self.overflowed.iter().copied().filter(|id| self.conns.get(id).is_none_or(|c| c.out.is_empty())).collect();
            for id in drained {
                self.overflowed.remove(&id);
                if let Some(c) = self.conns.get_mut(&id) {
                    c.overflowed = false;
                    for m in g.store.watch_resync(id) {
                        let bytes = m.encode();
                        c.out_bytes += bytes.len();
                        self.server.stats.output_queued_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        c.out.push_back(bytes);
                    }
                    touched.insert(id);
                }
            }
        }
        for &id in &touched {
            self.flush(id);
        }
        // Close connections that are done, and register the rest for what they wait for.
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.extend(touched);
        for id in dirty {
            self.settle(id);
        }
    }

    /// Sends what the socket takes without blocking.
    fn flush(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        let limits = self.server.limits;
        let was_paused = c.paused(&limits);
        let fd = c.stream.as_raw_fd();
        while let Some(front) = c.out.front() {
            match epoll::send(fd, &front[c.sent..]) {
                Ok(n) => {
                    c.sent += n;
                    if c.sent == front.len() {
                        let len = front.len();
                        c.out.pop_front();
                        c.sent = 0;
                        c.out_bytes -= len;
                        self.server.stats.output_queued_bytes.fetch_sub(len as u64, Ordering::Relaxed);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // The peer is gone: nothing more can be delivered.
                    c.discard(&self.server.stats);
                    break;
                }
            }
        }
        if was_paused && !c.paused(&limits) && !c.inbuf.is_empty() {
            // Resume the requests it sent while paused.
            self.ready.insert(id);
        }
    }

    /// Closes a connection that has nothing left to do, or updates its registration.
    fn settle(&mut self, id: ConnId) {
        let limits = self.server.limits;
        let Some(c) = self.conns.get_mut(&id) else { return };
        let pending_input = !c.inbuf.is_empty() && self.ready.contains(&id);
        // (Replies still waiting for the disk keep it open: they are delivered first.)
        if c.read_closed && c.out.is_empty() && c.held_bytes == 0 && !pending_input && !c.overflowed {
            self.close(id);
            return;
        }
        let want = c.wanted(&limits);
        if want != c.interest && self.ep.modify(c.stream.as_raw_fd(), want, id).is_ok() {
            c.interest = want;
        }
    }

    fn close(&mut self, id: ConnId) {
        let Some(c) = self.conns.remove(&id) else { return };
        let _ = self.ep.delete(c.stream.as_raw_fd());
        self.server.stats.output_queued_bytes.fetch_sub(c.out_bytes as u64, Ordering::Relaxed);
        self.server.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
        self.ready.remove(&id);
        lock(&self.server.shared.inner).store.disconnect(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volatile_patterns_match_whole_components() {
        let v = Volatile::new(&["/vigil/hosts/*/heartbeat".into(), "/beat".into()]).unwrap();
        assert!(v.matches("/vigil/hosts/a/heartbeat"));
        assert!(v.matches("/beat"));
        for no in ["/vigil/hosts/a", "/vigil/hosts/a/heartbeat/x", "/vigil/hosts//heartbeat", "vigil/hosts/a/heartbeat", "/beatx", ""] {
            assert!(!v.matches(no), "{no:?} matched");
        }
        let write = |tx, path: &str| Msg::new(MsgType::Write, 1, tx, format!("{path}\0v").into_bytes());
        assert!(v.answers_at_once(&write(0, "/beat")));
        assert!(!v.answers_at_once(&write(0, "/other")));
        // Inside a transaction every step but the end answers at once; the end waits.
        assert!(v.answers_at_once(&write(7, "/other")));
        assert!(v.answers_at_once(&Msg::new(MsgType::TransactionStart, 1, 0, b"\0".to_vec())));
        assert!(!v.answers_at_once(&Msg::new(MsgType::TransactionEnd, 1, 7, b"T\0".to_vec())));
        // Not transactional whatever its id says: waits.
        assert!(!v.answers_at_once(&Msg::new(MsgType::Introduce, 1, 7, b"5\0".to_vec())));
        assert!(v.answers_at_once(&Msg::new(MsgType::Control, 1, 0, b"check\0".to_vec())));
        assert!(!v.answers_at_once(&Msg::new(MsgType::Control, 1, 0, b"print\0x\0".to_vec())));
        assert!(!v.answers_at_once(&Msg::new(MsgType::Read, 1, 0, Vec::new())));
    }

    #[test]
    fn bad_volatile_patterns_are_refused_by_name() {
        for bad in ["relative/x", "/a//b", "/a/b*", "/", "/a/"] {
            let err = Volatile::new(&[bad.to_string()]).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }
}
