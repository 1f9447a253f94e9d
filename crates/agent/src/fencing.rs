//! The lease service a replicated VM's copies ask for the right to release output: the
//! standalone arbiter over TCP ([`crate::arbiter`]), or — whenever a cluster store is there —
//! the VM's lease record in the store, decided by the copy itself ([`replication::stored`]).
//!
//! With the store there is no arbiter process at all: what fences a copy is the store's
//! serialisable transactions (on etcd with `vigil up --etcd`: replicated, so the lease survives
//! the loss of any host and of any single process), and each copy's own clock. A copy cut off
//! from the store cannot renew and stops releasing output when its lease runs out by its own
//! clock, before anyone else can see the record unchanged for the lease's time (self-fencing).
//!
//! The record of VM `v` is `/vigil/leases/v` ([`STORE_ROOT`]), one line of
//! [`replication::stored::Record`]. The driver watches the record of the VM it backs up every
//! [`WATCH_EVERY`], so that when the primary dies its takeover waits only what is left of the
//! lease, not a whole lease from its first look.

use crate::arbiter;
use crate::auth::Key;
use replication::lease::{Answer, Request};
use replication::stored::{self, Observer, Record};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// Where the lease records live in the store.
pub const STORE_ROOT: &str = "/vigil/leases";
/// How often a backup reads the record of the VM it backs up.
pub const WATCH_EVERY: Duration = Duration::from_millis(10);

/// Which lease service a copy asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Service {
    /// The standalone arbiter at HOST:PORT.
    Arbiter(String),
    /// The lease records in the store at this socket.
    Store(PathBuf),
    /// The lease records in the store of whichever agent runs the copy (a cluster's spec says
    /// this; the agent writes its own store's socket before it starts the copy).
    AgentStore,
}

impl std::str::FromStr for Service {
    type Err = String;
    /// `store:SOCKET`, `store`, or HOST:PORT of an arbiter.
    fn from_str(s: &str) -> Result<Service, String> {
        match s.strip_prefix("store:") {
            Some("") => Err("store: needs the store's socket (store:/run/vigil/store.sock)".into()),
            Some(sock) => Ok(Service::Store(sock.into())),
            None if s == "store" => Ok(Service::AgentStore),
            None if s.contains(':') => Ok(Service::Arbiter(s.into())),
            None => Err(format!("lease service {s:?}: expected HOST:PORT of an arbiter, `store:SOCKET`, or `store`")),
        }
    }
}

/// What the lease thread is asked to do.
enum Command {
    Ask(Request),
    Watch(String),
}

/// The sending side of a lease thread.
#[derive(Clone)]
pub struct Lease(Sender<Command>);

impl Lease {
    /// Asks `req`; the answer comes back on the driver's channel. `false`: the lease thread
    /// is gone (the driver is ending).
    pub fn send(&self, req: Request) -> bool {
        self.0.send(Command::Ask(req)).is_ok()
    }

    /// Keeps watching `vm`'s record (a backup learns its VM's name from the primary's hello).
    pub fn watch(&self, vm: &str) {
        let _ = self.0.send(Command::Watch(vm.to_string()));
    }
}

/// The store side of the lease: the records of the VMs this copy asks about, and what it has
/// seen of them.
pub struct StoreLeases {
    socket: PathBuf,
    client: Option<store::Client>,
    timeout: Duration,
    epoch: Instant,
    seen: BTreeMap<String, Observer>,
}

impl StoreLeases {
    /// A client of the store at `socket`; each store request gives up after `timeout`.
    pub fn new(socket: PathBuf, timeout: Duration) -> StoreLeases {
        StoreLeases { socket, client: None, timeout, epoch: Instant::now(), seen: BTreeMap::new() }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn client(&mut self) -> Result<&mut store::Client, String> {
        if self.client.is_none() {
            let c =
                store::Client::connect_within(&self.socket, self.timeout).map_err(|e| format!("store {}: {e}", self.socket.display()))?;
            self.client = Some(c);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    /// Reads `vm`'s record and notes what it saw; a failed read forgets.
    pub fn watch(&mut self, vm: &str) {
        let path = format!("{STORE_ROOT}/{vm}");
        let read = self.client().and_then(|c| c.try_read(&path).map_err(|e| e.to_string()));
        let now = self.now_us();
        let o = self.seen.entry(vm.to_string()).or_default();
        match read {
            Ok(raw) => {
                o.saw(raw.as_deref().map(String::from_utf8_lossy).as_deref(), now);
            }
            Err(_) => {
                o.forget();
                self.client = None;
            }
        }
    }

    /// Decides `req`: on a plain read when it changes nothing (a contender told to wait, a
    /// stale copy told it is superseded), else in one store transaction that reads the record
    /// again (the answer is sent only once it committed).
    pub fn request(&mut self, req: &Request) -> Result<Answer, String> {
        let vm = match req {
            Request::Renew { vm, .. } | Request::Takeover { vm, .. } | Request::Handover { vm, .. } => vm.clone(),
        };
        let path = format!("{STORE_ROOT}/{vm}");
        let epoch = self.epoch;
        let mut observer = self.seen.remove(&vm).unwrap_or_default();
        // A read first: most of a waiting contender's requests end here, and a read-only
        // decision cannot conflict with the holder's renewals.
        let read = self.client().and_then(|c| c.try_read(&path).map_err(|e| e.to_string()));
        if let Ok(raw) = &read {
            let text = raw.as_deref().map(String::from_utf8_lossy);
            let unchanged = observer.saw(text.as_deref(), epoch.elapsed().as_micros() as u64);
            if let Ok(record) = text.as_deref().map(Record::parse).transpose() {
                let d = stored::decide(record.as_ref(), unchanged, req);
                if d.write.is_none() {
                    self.seen.insert(vm, observer);
                    return Ok(d.answer);
                }
            }
        }
        let r = match self.client() {
            Ok(c) => c
                .transaction(|tx| {
                    let raw = tx.try_read(&path)?;
                    let now = epoch.elapsed().as_micros() as u64;
                    let text = raw.as_deref().map(String::from_utf8_lossy);
                    let unchanged = observer.saw(text.as_deref(), now);
                    let record = match text.as_deref().map(Record::parse).transpose() {
                        Ok(r) => r,
                        Err(e) => return Ok(Err(format!("{path}: {e}"))),
                    };
                    let d = stored::decide(record.as_ref(), unchanged, req);
                    if let Some(w) = &d.write {
                        tx.write(&path, w.encode().as_bytes())?;
                    }
                    Ok(Ok(d.answer))
                })
                .map_err(|e| format!("store {}: {e}", self.socket.display()))
                .and_then(|r| r),
            Err(e) => Err(e),
        };
        if r.is_err() {
            observer.forget();
            self.client = None;
        }
        self.seen.insert(vm, observer);
        r
    }
}

/// Starts the thread that asks `service` one request at a time (each within `timeout`) and
/// reports every answer on `tx` as `wrap(sent_at, answer)`, `sent_at` on `clock` (ns).
pub fn spawn<I: Send + 'static>(
    service: Result<Service, String>,
    timeout: Duration,
    key: Key,
    clock: impl Fn() -> u64 + Send + 'static,
    tx: Sender<I>,
    wrap: impl Fn(u64, Result<Answer, String>) -> I + Send + 'static,
) -> Lease {
    let (ctx, crx): (Sender<Command>, Receiver<Command>) = channel();
    enum Backend {
        Arbiter(arbiter::Client),
        Store(StoreLeases, Vec<String>),
        None(String),
    }
    let mut backend = match service {
        Ok(Service::Arbiter(addr)) => Backend::Arbiter(arbiter::Client::new(&addr, timeout, key)),
        Ok(Service::Store(sock)) => Backend::Store(StoreLeases::new(sock, timeout), Vec::new()),
        Ok(Service::AgentStore) => {
            Backend::None("the lease service `store` is the agent's store: this copy was not started by an agent".into())
        }
        Err(e) => Backend::None(e),
    };
    let _ = std::thread::Builder::new().name("repl-lease".into()).spawn(move || {
        let mut next_watch = Instant::now();
        loop {
            let wait = next_watch.saturating_duration_since(Instant::now());
            let cmd = match crx.recv_timeout(wait) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            match (cmd, &mut backend) {
                (Some(Command::Ask(req)), b) => {
                    let sent_at = clock();
                    let answer = match b {
                        Backend::Arbiter(c) => c.request(&req),
                        Backend::Store(s, _) => s.request(&req),
                        Backend::None(why) => Err(why.clone()),
                    };
                    if tx.send(wrap(sent_at, answer)).is_err() {
                        return;
                    }
                }
                (Some(Command::Watch(vm)), Backend::Store(_, watched)) => {
                    if !watched.contains(&vm) {
                        watched.push(vm);
                    }
                }
                (Some(Command::Watch(_)), _) => {}
                (None, Backend::Store(s, watched)) => {
                    for vm in watched.iter() {
                        s.watch(vm);
                    }
                }
                (None, _) => {}
            }
            if Instant::now() >= next_watch {
                next_watch = Instant::now() + WATCH_EVERY;
            }
        }
    });
    Lease(ctx)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A store server in a new directory, on a thread; its socket (shared with the arbiter's tests).
    pub(crate) fn store(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vigil-fencing-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        let cfg = store::server::Config::local(d.join("sock"), d.join("data"));
        let server = store::server::Server::bind(&cfg).expect("store");
        std::thread::spawn(move || server.run());
        cfg.socket
    }

    fn renew(holder: &str, gen: u64, backup: Option<u64>) -> Request {
        Request::Renew { vm: "kv".into(), holder: holder.into(), gen, ttl_us: 100_000, backup }
    }

    #[test]
    fn two_copies_share_one_lease_through_the_store() {
        let sock = store("share");
        let mut a = StoreLeases::new(sock.clone(), Duration::from_secs(2));
        let mut b = StoreLeases::new(sock.clone(), Duration::from_secs(2));
        assert_eq!(a.request(&renew("a", 0, Some(7))), Ok(Answer::Granted { gen: 1, backup: Some(7) }));
        let take = Request::Takeover { vm: "kv".into(), holder: "b".into(), session: 7, ttl_us: 100_000 };
        // b watches while a renews: the lease never looks free to it.
        let mut last_renewal = Instant::now();
        for _ in 0..15 {
            last_renewal = Instant::now();
            assert_eq!(a.request(&renew("a", 1, Some(7))), Ok(Answer::Granted { gen: 1, backup: Some(7) }));
            b.watch("kv");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(matches!(b.request(&take), Ok(Answer::Held { .. })));
        // a stops renewing (dies): b takes over once it has seen the record unchanged for the ttl.
        let t = Instant::now();
        let granted = loop {
            b.watch("kv");
            match b.request(&take) {
                Ok(Answer::Held { .. }) => std::thread::sleep(Duration::from_millis(10)),
                other => break other,
            }
            assert!(t.elapsed() < Duration::from_secs(2));
        };
        assert_eq!(granted, Ok(Answer::Granted { gen: 2, backup: None }));
        // Not before the holder's lease, counted from when it sent its last renewal, ran out.
        assert!(last_renewal.elapsed() >= Duration::from_millis(100), "took over {:?} after the last renewal", last_renewal.elapsed());
        assert_eq!(a.request(&renew("a", 1, Some(7))), Ok(Answer::Superseded { gen: 2, holder: "b".into() }));
        // What the store holds is one readable line.
        let mut c = store::Client::connect(&sock).expect("client");
        let line = String::from_utf8(c.read(&format!("{STORE_ROOT}/kv")).expect("record")).expect("text");
        assert!(line.starts_with("vigil-lease 1 b 2 - 7 "), "{line}");
        // A damaged record is an error, never a grant.
        c.write(&format!("{STORE_ROOT}/kv"), b"garbage").expect("write");
        let e = b.request(&renew("b", 2, None)).unwrap_err();
        assert!(e.contains("/vigil/leases/kv") && e.contains("lease record"), "{e}");
    }

    #[test]
    fn an_unreachable_store_is_an_error_not_a_wait() {
        let mut a = StoreLeases::new("/nonexistent/vigil.sock".into(), Duration::from_millis(100));
        let t = Instant::now();
        assert!(a.request(&renew("a", 0, None)).is_err());
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!("store".parse::<Service>(), Ok(Service::AgentStore));
        assert_eq!("store:/s".parse::<Service>(), Ok(Service::Store("/s".into())));
        assert_eq!("10.0.0.1:7000".parse::<Service>(), Ok(Service::Arbiter("10.0.0.1:7000".into())));
        assert!("nonsense".parse::<Service>().is_err() && "store:".parse::<Service>().is_err());
    }
}
