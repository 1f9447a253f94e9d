//! The voter driven through its events: the cases one by one, then a seeded simulation of
//! counter servers with crashes, hangs and wrong answers at random moments and clients that
//! come and go, in which every reply a client gets must be right, none may be lost, and the
//! instances' states must end equal.

use super::*;
use std::collections::BTreeMap;

const S: Nanos = 1_000_000_000;

fn voter(n: usize, policy: Policy) -> Voter {
    let mut v = Voter::new(Config::new(n, policy)).expect("config");
    for a in v.start() {
        let Action::Connect(i) = a else { panic!("{a:?}") };
        assert!(v.handle(0, Event::InstanceConnected(i)).is_empty());
    }
    v
}

fn to_client(acts: &[Action]) -> Vec<u8> {
    acts.iter().filter_map(|a| if let Action::ToClient(_, b) = a { Some(b.clone()) } else { None }).flatten().collect()
}

fn reports(acts: &[Action]) -> Vec<Report> {
    acts.iter().filter_map(|a| if let Action::Report(r) = a { Some(r.clone()) } else { None }).collect()
}

fn bytes(i: Instance, b: &[u8]) -> Event {
    Event::InstanceBytes(i, b.to_vec())
}

#[test]
fn bad_config() {
    assert!(Voter::new(Config::new(0, Policy::Suppress)).is_err());
    assert!(Voter::new(Config::new(8, Policy::Suppress)).is_err());
    assert_eq!("prefer-primary".parse::<Policy>(), Ok(Policy::PreferPrimary));
    assert!("x".parse::<Policy>().unwrap_err().contains("prefer-primary or suppress"));
}

#[test]
fn majority_of_three_sends_once_in_order() {
    let mut v = voter(3, Policy::Suppress);
    v.handle(0, Event::ClientOpened(1));
    let acts = v.handle(1, Event::ClientBytes(1, b"PING\r\nGET a\r\n".to_vec()));
    assert_eq!(acts, (0..3).map(|i| Action::ToInstance(i, b"PING\r\nGET a\r\n".to_vec())).collect::<Vec<_>>());
    // Instance 1 answers both, instance 2 the first only: reply 0 is decided, reply 1 waits.
    assert!(to_client(&v.handle(2, bytes(1, b"+PONG\r\n$-1\r\n"))).is_empty());
    assert_eq!(to_client(&v.handle(3, bytes(2, b"+PONG\r\n"))), b"+PONG\r\n");
    // Split across events.
    assert!(to_client(&v.handle(4, bytes(0, b"+PONG\r\n$"))).is_empty());
    assert_eq!(to_client(&v.handle(5, bytes(0, b"-1\r\n"))), b"$-1\r\n");
    // The late third vote agrees: nothing more, no fault.
    let acts = v.handle(6, bytes(2, b"$-1\r\n"));
    assert!(acts.is_empty(), "{acts:?}");
    assert_eq!(v.counters.replies, 2);
}

#[test]
fn clients_share_one_total_order() {
    let mut v = voter(3, Policy::Suppress);
    v.handle(0, Event::ClientOpened(1));
    v.handle(0, Event::ClientOpened(2));
    v.handle(0, Event::ClientBytes(1, b"INCR k\r\n".to_vec()));
    v.handle(0, Event::ClientBytes(2, b"INCR k\r\n".to_vec()));
    v.handle(0, Event::ClientBytes(1, b"INCR k\r\n".to_vec()));
    for i in 0..3 {
        let acts = v.handle(1, bytes(i, b":1\r\n:2\r\n:3\r\n"));
        if i == 1 {
            assert_eq!(acts, vec![Action::ToClient(1, b":1\r\n:3\r\n".to_vec()), Action::ToClient(2, b":2\r\n".to_vec())]);
        }
    }
}

#[test]
fn a_wrong_answer_is_outvoted_and_repaired() {
    let mut v = voter(3, Policy::Suppress);
    v.handle(0, Event::ClientOpened(7));
    v.handle(0, Event::ClientBytes(7, b"INCR k\r\n".to_vec()));
    v.handle(1, bytes(2, b":99\r\n"));
    assert!(to_client(&v.handle(2, bytes(0, b":1\r\n"))).is_empty());
    let acts = v.handle(3, bytes(1, b":1\r\n"));
    assert_eq!(to_client(&acts), b":1\r\n");
    assert!(reports(&acts).contains(&Report::Fault { instance: 2, fault: Fault::Outvoted { conn: 7, seq: 0 } }));
    assert!(acts.contains(&Action::Stop(2)));
    assert!(acts.contains(&Action::Disconnect(2)));
    // The donor (0) has answered everything: snapshot at once.
    assert!(acts.contains(&Action::Snapshot(0)), "{acts:?}");
    // Requests while the snapshot is written go to instance 1 only; the donor gets them after.
    let acts = v.handle(4, Event::ClientBytes(7, b"INCR k\r\n".to_vec()));
    assert_eq!(acts, vec![Action::ToInstance(1, b"INCR k\r\n".to_vec())]);
    let acts = v.handle(5, Event::SnapshotTaken(0));
    assert_eq!(acts, vec![Action::ToInstance(0, b"INCR k\r\n".to_vec()), Action::Restore { instance: 2, donor: 0 }]);
    // Restored: instance 2 gets what came after the snapshot, on a new connection.
    let acts = v.handle(6, Event::Restored(2));
    assert_eq!(acts, vec![Action::Connect(2)]);
    let acts = v.handle(7, Event::InstanceConnected(2));
    assert_eq!(acts[0], Action::ToInstance(2, b"INCR k\r\n".to_vec()));
    assert!(matches!(acts[1], Action::Report(Report::Repaired { instance: 2, donor: 0, took: 4 })), "{acts:?}");
    assert!(v.is_live(2));
    for i in 0..3 {
        v.handle(8, bytes(i, b":2\r\n"));
    }
    assert_eq!(v.counters.replies, 2);
    assert_eq!(v.counters.faults, 1);
}

#[test]
fn a_crash_is_masked() {
    let mut v = voter(3, Policy::Suppress);
    v.handle(0, Event::ClientOpened(1));
    v.handle(0, Event::ClientBytes(1, b"PING\r\n".to_vec()));
    v.handle(0, bytes(0, b"+PONG\r\n"));
    let acts = v.handle(1, Event::InstanceExited(1, "killed by signal 9".into()));
    assert!(acts.contains(&Action::Stop(1)));
    assert!(to_client(&acts).is_empty(), "one vote is no majority of 3");
    let acts = v.handle(2, bytes(2, b"+PONG\r\n"));
    assert_eq!(to_client(&acts), b"+PONG\r\n");
    // A second exit report of the same instance changes nothing.
    assert!(reports(&v.handle(3, Event::InstanceExited(1, "again".into()))).is_empty());
}

#[test]
fn a_hang_is_detected_after_the_timeout() {
    let mut v = voter(3, Policy::Suppress);
    v.handle(0, Event::ClientOpened(1));
    v.handle(0, Event::ClientBytes(1, b"PING\r\n".to_vec()));
    v.handle(1, bytes(0, b"+PONG\r\n"));
    assert_eq!(to_client(&v.handle(2, bytes(1, b"+PONG\r\n"))), b"+PONG\r\n");
    v.handle(3, Event::ClientBytes(1, b"PING\r\n".to_vec()));
    v.handle(4, bytes(0, b"+PONG\r\n"));
    // Instances 1 and 2 say nothing: at the timeout both have hung, 0 alone serves (degraded).
    assert!(v.handle(S / 4, Event::Tick).is_empty());
    let acts = v.handle(3 + S / 2 + 1, Event::Tick);
    let r = reports(&acts);
    assert!(r.contains(&Report::Fault { instance: 1, fault: Fault::Hung { conn: 1, seq: 1 } }), "{r:?}");
    assert!(r.contains(&Report::Fault { instance: 2, fault: Fault::Hung { conn: 1, seq: 0 } }), "{r:?}");
    assert!(r.iter().any(|r| matches!(r, Report::Degraded { live: 1, quorum: 1 })));
    assert_eq!(to_client(&acts), b"+PONG\r\n");
}

#[test]
fn two_instances_disagreeing_prefer_the_primary() {
    let mut v = voter(2, Policy::PreferPrimary);
    v.handle(0, Event::ClientOpened(1));
    v.handle(0, Event::ClientBytes(1, b"GET a\r\n".to_vec()));
    assert!(to_client(&v.handle(1, bytes(1, b"$1\r\nx\r\n"))).is_empty());
    let acts = v.handle(2, bytes(0, b"$-1\r\n"));
    assert_eq!(to_client(&acts), b"$-1\r\n");
    let r = reports(&acts);
    assert!(r.contains(&Report::Disagreement { conn: 1, seq: 0, chosen: Some(0) }));
    assert!(r.contains(&Report::Fault { instance: 1, fault: Fault::Outvoted { conn: 1, seq: 0 } }));
    assert!(acts.contains(&Action::Snapshot(0)), "the secondary is repaired from the primary");
}

#[test]
fn two_instances_disagreeing_suppress() {
    let mut v = voter(2, Policy::Suppress);
    v.handle(0, Event::ClientOpened(1));
    v.handle(0, Event::ClientOpened(2));
    v.handle(0, Event::ClientBytes(1, b"PING\r\nGET a\r\n".to_vec()));
    v.handle(0, Event::ClientBytes(2, b"PING\r\n".to_vec()));
    v.handle(0, bytes(0, b"+PONG\r\n$-1\r\n+PONG\r\n"));
    let acts = v.handle(1, bytes(1, b"+PONG\r\n$1\r\nx\r\n+PONG\r\n"));
    assert_eq!(
        acts,
        vec![
            Action::Report(Report::Disagreement { conn: 1, seq: 1, chosen: None }),
            Action::ToClient(1, b"+PONG\r\n".to_vec()),
            Action::CloseClient(1),
            Action::ToClient(2, b"+PONG\r\n".to_vec()),
        ],
        "the agreed reply goes out, the disputed one not; the other client is served on"
    );
    assert_eq!(v.connections(), 1);
    assert_eq!(v.live(), 2, "no one to blame: nothing stopped");
}

#[test]
fn three_different_answers_are_no_majority() {
    let mut v = voter(3, Policy::Suppress);
    v.handle(0, Event::ClientOpened(1));
    v.handle(0, Event::ClientBytes(1, b"GET a\r\n".to_vec()));
    v.handle(0, bytes(0, b":1\r\n"));
    v.handle(0, bytes(1, b":2\r\n"));
    let acts = v.handle(0, bytes(2, b":3\r\n"));
    assert!(to_client(&acts).is_empty());
    assert!(acts.contains(&Action::CloseClient(1)));
}

#[test]
fn a_bad_request_closes_after_the_earlier_replies() {
    let mut v = voter(1, Policy::Suppress);
    v.handle(0, Event::ClientOpened(1));
    let acts = v.handle(0, Event::ClientBytes(1, b"PING\r\n*x\r\n".to_vec()));
    assert_eq!(acts.len(), 2, "{acts:?}"); // PING given, the error reported
    assert!(matches!(&acts[1], Action::Report(Report::ClientError { reason, .. }) if reason == "invalid multibulk length"));
    let acts = v.handle(1, bytes(0, b"+PONG\r\n"));
    assert_eq!(acts, vec![Action::ToClient(1, b"+PONG\r\n".to_vec()), Action::CloseClient(1)]);
}

#[test]
fn half_close_and_empty_lines() {
    let mut v = voter(3, Policy::Suppress);
    v.handle(0, Event::ClientOpened(1));
    // An empty line asks for no reply and is not passed on.
    let acts = v.handle(0, Event::ClientBytes(1, b"\r\nPING\r\n".to_vec()));
    assert!(acts.iter().all(|a| matches!(a, Action::ToInstance(_, b) if b == b"PING\r\n")));
    assert!(v.handle(0, Event::ClientEof(1)).is_empty());
    v.handle(0, bytes(0, b"+PONG\r\n"));
    let acts = v.handle(0, bytes(1, b"+PONG\r\n"));
    assert_eq!(acts, vec![Action::ToClient(1, b"+PONG\r\n".to_vec()), Action::CloseClient(1)]);
}

#[test]
fn a_gone_client_s_requests_still_run_everywhere() {
    let mut v = voter(3, Policy::Suppress);
    v.handle(0, Event::ClientOpened(1));
    v.handle(0, Event::ClientBytes(1, b"INCR k\r\n".to_vec()));
    v.handle(0, Event::ClientClosed(1));
    v.handle(0, bytes(0, b":1\r\n"));
    let acts = v.handle(0, bytes(1, b":1\r\n"));
    assert!(acts.is_empty(), "no reply to a gone client: {acts:?}");
    assert!(v.handle(0, bytes(2, b":1\r\n")).is_empty());
}

#[test]
fn hostile_instance_bytes_are_a_protocol_fault() {
    let mut v = voter(3, Policy::Suppress);
    v.handle(0, Event::ClientOpened(1));
    let acts = v.handle(0, bytes(1, b"+unasked\r\n"));
    assert!(matches!(&reports(&acts)[0], Report::Fault { instance: 1, fault: Fault::Protocol { .. } }));
    v.handle(0, Event::ClientBytes(1, b"PING\r\n".to_vec()));
    let acts = v.handle(0, bytes(2, b"?garbage\r\n"));
    assert!(matches!(&reports(&acts)[0], Report::Fault { instance: 2, fault: Fault::Protocol { .. } }));
}

#[test]
fn the_backlog_is_bounded() {
    let mut cfg = Config::new(3, Policy::Suppress);
    cfg.max_backlog = 100;
    let mut v = Voter::new(cfg).expect("config");
    v.start();
    v.handle(0, Event::ClientOpened(1));
    // The connections are not open: the requests are kept for them.
    let acts = v.handle(0, Event::ClientBytes(1, b"PING\r\n".repeat(30)));
    assert!(
        reports(&acts).iter().any(|r| matches!(r, Report::ClientError { reason, .. } if reason == "too many requests outstanding")),
        "{acts:?}"
    );
}

#[test]
fn datagrams_are_voted_per_message() {
    let mut cfg = Config::new(3, Policy::Suppress);
    cfg.framing = Framing::Datagram;
    let mut v = Voter::new(cfg).expect("config");
    for a in v.start() {
        let Action::Connect(i) = a else { continue };
        v.handle(0, Event::InstanceConnected(i));
    }
    v.handle(0, Event::ClientOpened(1));
    v.handle(0, Event::ClientBytes(1, b"sensor 1".to_vec()));
    v.handle(0, bytes(0, b"act 1"));
    let acts = v.handle(0, bytes(1, b"act 1"));
    assert_eq!(acts, vec![Action::ToClient(1, b"act 1".to_vec())]);
}

// ---- The simulation -------------------------------------------------------------------

/// A counter server: `INCR key` answers the key's new value; a wrong instance answers one
/// more than it should, every `wrong_every` replies.
#[derive(Clone, Default, Debug)]
struct Server {
    counts: BTreeMap<Vec<u8>, i64>,
    served: u64,
    wrong_every: u64,
    hung: bool,
}

impl Server {
    fn serve(&mut self, inbuf: &mut Vec<u8>) -> Vec<u8> {
        let mut out = Vec::new();
        while let Ok(Some(r)) = resp::request(inbuf, 1 << 20) {
            let req: Vec<u8> = inbuf.drain(..r.len).collect();
            let key = req.split(|c| *c == b' ').nth(1).unwrap_or(b"").to_vec();
            let v = self.counts.entry(key).or_default();
            *v += 1;
            self.served += 1;
            let wrong = self.wrong_every > 0 && self.served.is_multiple_of(self.wrong_every);
            out.extend_from_slice(format!(":{}\r\n", *v + wrong as i64).as_bytes());
        }
        out
    }
}

struct Sim {
    rng: u64,
    v: Voter,
    now: Nanos,
    servers: Vec<Option<Server>>,
    /// Bytes on their way to each server (None: no connection).
    links: Vec<Option<Vec<u8>>>,
    snapshots: BTreeMap<Instance, Server>,
    /// Client → replies received (the values), requests sent.
    clients: BTreeMap<Conn, (Vec<i64>, u64)>,
    /// The three clients in use (a closed one is replaced by a new one).
    active: [Conn; 3],
    closed: Vec<Conn>,
    pending: VecDeque<Event>,
    stopped: Vec<Instance>,
    /// The instance made faulty and not yet stopped (one fault at a time: the voter masks one).
    injected: Option<Instance>,
    seed: u64,
    log: Vec<String>,
    /// Mode 4: frames on their way to the backup, in order; the snapshot being taken (the
    /// donor's counter); the backup's replica: its snapshot's counter and position, and the
    /// end of its log (requests are all `INCR k`, so a count stands for the log).
    backup: bool,
    wire: VecDeque<Wire>,
    checkpoint: Option<i64>,
    replica: Option<(i64, u64)>,
    log_end: u64,
    /// The voter's local replica (the driver's `remote::Store` on its own host): written as
    /// the actions come (a snapshot shipped, the requests logged), never lost with the backup.
    local: Option<(i64, u64)>,
    local_end: u64,
    local_checks: u64,
    /// The largest value a client was sent.
    max_seen: i64,
    protected_checks: u64,
}

enum Wire {
    Ship(i64, u64),
    Log(u64, u64),
}

impl Sim {
    fn count(s: &Server) -> i64 {
        s.counts.values().sum()
    }

    /// The backup takes the frames sent so far (a random part of them); its one
    /// acknowledgement comes back.
    fn deliver(&mut self) -> Option<Event> {
        if self.wire.is_empty() {
            return None;
        }
        let n = 1 + self.rand(self.wire.len() as u64) as usize;
        for _ in 0..n {
            self.take_frame();
        }
        self.replica.map(|_| Event::BackupLogged(self.log_end))
    }

    fn take_frame(&mut self) {
        let Some(frame) = self.wire.pop_front() else { return };
        match frame {
            Wire::Ship(count, pos) => {
                assert_eq!(
                    count as u64,
                    pos,
                    "seed {}: a snapshot after {pos} requests counts {count}\n{}",
                    self.seed,
                    self.log
                        .iter()
                        .filter(|l| l.contains("Checkpoint")
                            || l.contains("Ship")
                            || l.contains("Snapshot")
                            || l.contains("backup")
                            || l.contains("Backup"))
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                self.replica = Some((count, pos));
                self.log_end = self.log_end.max(pos);
            }
            Wire::Log(from, n) => {
                if self.replica.is_some() || from <= self.log_end {
                    assert!(from <= self.log_end || self.replica.is_none(), "seed {}: a gap in the log", self.seed);
                }
                self.log_end = self.log_end.max(from + n);
            }
        }
    }

    fn log_local(&mut self, from: u64, count: u64) {
        if self.local.is_some() {
            assert!(from <= self.local_end, "seed {}: a gap in the local log: {from} after {}", self.seed, self.local_end);
            self.local_end = self.local_end.max(from + count);
        }
    }

    /// Once the local replica holds a snapshot, it holds every increment a client has seen
    /// (a voter restarted now, after a crash, loses none), the backup connected or not.
    fn check_local(&mut self) {
        let Some((count, pos)) = self.local else { return };
        let covered = count + (self.local_end - pos) as i64;
        assert!(
            covered >= self.max_seen,
            "seed {}: a client saw {}, the local replica holds {covered} ({count} + log {pos}..{})\n{}",
            self.seed,
            self.max_seen,
            self.local_end,
            self.log[self.log.len().saturating_sub(60)..].join("\n")
        );
        self.local_checks += 1;
    }

    /// While the voter says it is protected, a takeover now (the replica's snapshot and its
    /// log replayed) would hold every increment a client has seen.
    fn check_replica(&mut self) {
        if !self.backup || !self.v.protected() {
            return;
        }
        let (count, pos) = self.replica.expect("protected without a replica");
        let covered = count + (self.log_end - pos) as i64;
        assert!(
            covered >= self.max_seen,
            "seed {}: a client saw {}, the replica holds {covered} ({count} + log {pos}..{})\n{}",
            self.seed,
            self.max_seen,
            self.log_end,
            self.log[self.log.len().saturating_sub(60)..].join("\n")
        );
        self.protected_checks += 1;
    }

    fn rand(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n
    }

    fn apply(&mut self, acts: Vec<Action>) {
        for a in acts {
            match a {
                Action::ToClient(c, b) => {
                    assert!(!self.closed.contains(&c), "a reply to closed client {c}");
                    let text = String::from_utf8(b).expect("text");
                    let cl = self.clients.get_mut(&c).expect("client");
                    cl.0.extend(text.split("\r\n").filter(|x| !x.is_empty()).map(|x| x[1..].parse::<i64>().expect("integer")));
                    self.max_seen = self.max_seen.max(cl.0.iter().copied().max().unwrap_or(0));
                }
                Action::CloseClient(c) => {
                    panic!("client {c} closed, seed {}: {:?}", self.seed, &self.log[self.log.len().saturating_sub(20)..])
                }
                Action::Connect(i) => {
                    if self.servers[i].is_some() {
                        self.links[i] = Some(Vec::new());
                        self.pending.push_back(Event::InstanceConnected(i));
                    } else {
                        self.pending.push_back(Event::InstanceLost(i, "refused".into()));
                    }
                }
                Action::ToInstance(i, b) => {
                    if let Some(l) = self.links[i].as_mut() {
                        l.extend_from_slice(&b)
                    }
                }
                Action::Disconnect(i) => self.links[i] = None,
                Action::Stop(i) => {
                    if self.injected == Some(i) {
                        self.injected = None;
                    }
                    self.servers[i] = None;
                    self.links[i] = None;
                    self.stopped.push(i);
                }
                Action::Snapshot(d) => {
                    let s = self.servers[d].clone().expect("donor runs");
                    self.snapshots.insert(d, s);
                    self.pending.push_back(Event::SnapshotTaken(d));
                }
                Action::Restore { instance, donor } => {
                    let mut s = self.snapshots[&donor].clone();
                    s.wrong_every = 0;
                    s.hung = false;
                    self.servers[instance] = Some(s);
                    self.pending.push_back(Event::Restored(instance));
                }
                Action::Checkpoint(d) => match &self.servers[d] {
                    // A hung donor answers no snapshot (the voter's snapshot timeout finds it).
                    Some(s) if s.hung => {}
                    Some(s) => {
                        self.checkpoint = Some(Self::count(s));
                        self.pending.push_back(Event::SnapshotTaken(d));
                    }
                    None => self.pending.push_back(Event::SnapshotFailed(d, "gone".into())),
                },
                Action::ShipSnapshot { position, .. } => {
                    let count = self.checkpoint.take().expect("a snapshot was taken");
                    self.wire.push_back(Wire::Ship(count, position));
                    self.local = Some((count, position));
                    self.local_end = self.local_end.max(position);
                }
                Action::Log { from, count, bytes } => {
                    assert_eq!(resp_count(&bytes), count, "seed {}", self.seed);
                    self.wire.push_back(Wire::Log(from, count));
                    self.log_local(from, count);
                }
                Action::LogLocal { from, count, bytes } => {
                    assert_eq!(resp_count(&bytes), count, "seed {}", self.seed);
                    assert!(self.local.is_some(), "seed {}: logged locally before any snapshot", self.seed);
                    self.log_local(from, count);
                }
                Action::Report(r) => {
                    self.log.push(format!("{} {r:?}", self.now / 1_000_000));
                    // (A disagreement with a reply chosen is a paused donor's late vote differing
                    // from the one instance that decided meanwhile — the fault injected after the
                    // repair reached the donor's backlog; under `Suppress` no other disagreement
                    // names a chosen reply. The clients' values are checked all the same.)
                    assert!(
                        !matches!(r, Report::Disagreement { chosen: None, .. } | Report::ClientError { .. } | Report::RepairFailed { .. }),
                        "{r:?}, seed {}, {:?}",
                        self.seed,
                        &self.log[self.log.len().saturating_sub(20)..]
                    );
                }
            }
        }
    }

    fn serve_one(&mut self, i: Instance) -> Option<Event> {
        let s = self.servers[i].as_mut().filter(|s| !s.hung)?;
        let out = s.serve(self.links[i].as_mut()?);
        (!out.is_empty()).then_some(Event::InstanceBytes(i, out))
    }

    fn run(&mut self, ev: Event) {
        let e = format!("{ev:?}");
        let acts = self.v.handle(self.now, ev);
        self.log.push(format!("{} {} -> {acts:?}", self.now / 1_000_000, &e[..e.len().min(60)]));
        if let Err(e) = self.v.check() {
            panic!("seed {}: {e}\n{}", self.seed, self.log[self.log.len().saturating_sub(30)..].join("\n"));
        }
        self.apply(acts);
        self.check_replica();
        self.check_local();
    }

    fn step(&mut self) {
        self.now += 1_000_000; // 1 ms
        let ev = if let Some(e) = self.pending.pop_front() {
            e
        } else {
            match self.rand(10) {
                0 if self.rand(2) == 0 => {
                    // A client that has all its replies closes; a new one takes its place.
                    let k = self.rand(3) as usize;
                    let c = self.active[k];
                    match self.clients.get(&c) {
                        Some((got, sent)) if got.len() as u64 == *sent => {
                            self.closed.push(c);
                            self.active[k] = self.active.iter().max().copied().unwrap_or(0) + 1;
                            Event::ClientClosed(c)
                        }
                        _ => Event::Tick,
                    }
                }
                0..=3 => {
                    // A client sends INCR on the one shared key.
                    let c = self.active[self.rand(3) as usize];
                    if let std::collections::btree_map::Entry::Vacant(e) = self.clients.entry(c) {
                        e.insert((Vec::new(), 0));
                        self.run(Event::ClientOpened(c));
                    }
                    self.clients.get_mut(&c).expect("client").1 += 1;
                    Event::ClientBytes(c, b"INCR k\r\n".to_vec())
                }
                4..=6 => {
                    let i = self.rand(3) as usize;
                    self.serve_one(i).unwrap_or(Event::Tick)
                }
                7 if self.backup => {
                    if self.rand(300) == 0 {
                        // The backup's connection breaks; a new session later voids its replica.
                        self.wire.clear();
                        self.log.push(format!("{} backup lost", self.now / 1_000_000));
                        self.pending.push_back(Event::BackupConnected);
                        self.replica = None;
                        self.log_end = 0;
                        Event::BackupLost("reset".into())
                    } else {
                        self.deliver().unwrap_or(Event::Tick)
                    }
                }
                7 => {
                    let i = self.rand(3) as usize;
                    self.serve_one(i).unwrap_or(Event::Tick)
                }
                8 if self.rand(20) == 0 && self.v.live() == 3 && self.v.repairing().is_none() && self.injected.is_none() => {
                    // A fault, now and then, when all three serve.
                    let i = self.rand(3) as usize;
                    self.injected = Some(i);
                    self.log.push(format!("{} inject {i}", self.now / 1_000_000));
                    match self.rand(3) {
                        0 => {
                            self.servers[i] = None;
                            self.links[i] = None;
                            Event::InstanceExited(i, "killed".into())
                        }
                        1 => {
                            self.servers[i].as_mut().expect("live").hung = true;
                            Event::Tick
                        }
                        _ => {
                            self.servers[i].as_mut().expect("live").wrong_every = 3;
                            Event::Tick
                        }
                    }
                }
                _ => Event::Tick,
            }
        };
        self.run(ev);
    }
}

/// Every reply a client gets is right (the shared counter's values, each once, increasing
/// per client), none is lost; every fault is repaired; the instances' states end equal.
#[test]
fn simulation_never_shows_a_wrong_or_lost_reply() {
    simulate(false);
}

/// The same with a backup (mode 4, and the voter's local replica): frames to it delayed at
/// random, its connection lost now and then, a snapshot every 50 requests; whenever the voter
/// says it is protected, the backup's snapshot and log hold every increment any client has
/// seen (a takeover at that moment loses nothing acknowledged).
#[test]
fn simulation_with_a_backup_loses_nothing_acknowledged() {
    simulate(true);
}

fn resp_count(bytes: &[u8]) -> u64 {
    let mut n = 0;
    let mut at = 0;
    while let Ok(Some(r)) = resp::request(&bytes[at..], 1 << 20) {
        at += r.len;
        n += 1;
    }
    assert_eq!(at, bytes.len(), "whole requests");
    n
}

fn simulate(backup: bool) {
    // VIGIL_SIM_SEEDS=N runs more seeds (200 by default).
    let seeds = std::env::var("VIGIL_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(200u64);
    for seed in 1..=seeds {
        let mut cfg = Config::new(3, Policy::Suppress);
        cfg.hang_timeout = S;
        cfg.remote = backup;
        cfg.checkpoint_every = 50;
        cfg.checkpoint_min_interval = 0;
        let mut v = Voter::new(cfg).expect("config");
        let start = v.start();
        let mut sim = Sim {
            rng: seed.wrapping_mul(0x9e3779b97f4a7c15) | 1,
            v,
            now: 0,
            servers: vec![Some(Server::default()), Some(Server::default()), Some(Server::default())],
            links: vec![None, None, None],
            snapshots: BTreeMap::new(),
            clients: BTreeMap::new(),
            active: [0, 1, 2],
            closed: Vec::new(),
            pending: VecDeque::new(),
            stopped: Vec::new(),
            injected: None,
            seed,
            log: Vec::new(),
            backup,
            wire: VecDeque::new(),
            checkpoint: None,
            replica: None,
            log_end: 0,
            local: None,
            local_end: 0,
            local_checks: 0,
            max_seen: 0,
            protected_checks: 0,
        };
        sim.apply(start);
        if backup {
            sim.pending.push_back(Event::BackupConnected);
        }
        for _ in 0..3000 {
            sim.step();
        }
        // Quiet: no new requests or faults, servers answer everything, hangs time out.
        for s in sim.servers.iter_mut().flatten() {
            s.wrong_every = 0;
        }
        for _ in 0..3000 {
            sim.now += 1_000_000;
            let ev = match sim.pending.pop_front() {
                Some(e) => e,
                None => (0..3).find_map(|i| sim.serve_one(i)).or_else(|| sim.deliver()).unwrap_or(Event::Tick),
            };
            sim.run(ev);
        }
        let mut all: Vec<i64> = Vec::new();
        let mut total = 0;
        for (c, (got, sent)) in &sim.clients {
            assert_eq!(got.len() as u64, *sent, "seed {seed}, client {c}: replies lost");
            assert!(got.windows(2).all(|w| w[0] < w[1]), "seed {seed}, client {c}: {got:?}");
            all.extend(got);
            total += sent;
        }
        all.sort();
        // Gone clients' requests ran too (their replies dropped): the values seen are distinct.
        all.dedup();
        assert_eq!(all.len() as u64, total, "seed {seed}: a value seen twice");
        assert_eq!(sim.v.live(), 3, "seed {seed}: every fault repaired (stopped {:?})", sim.stopped);
        let states: Vec<_> = sim.servers.iter().map(|s| s.as_ref().map(|s| s.counts.clone())).collect();
        assert!(states.iter().all(|x| *x == states[0]), "seed {seed}: states differ: {states:?}");
        assert!(sim.closed.len() > 3, "seed {seed}: clients came and went");
        assert!(sim.stopped.len() >= 2, "seed {seed}: faults were injected");
        if backup {
            assert!(sim.v.protected(), "seed {seed}: protected at the end");
            assert!(sim.protected_checks > 100, "seed {seed}: only {} checks while protected", sim.protected_checks);
            let (count, pos) = sim.replica.expect("a replica");
            let final_count = sim.servers[0].as_ref().map(Sim::count).unwrap_or(0);
            assert_eq!(count + (sim.log_end - pos) as i64, final_count, "seed {seed}: the replica holds every request");
            let (count, pos) = sim.local.expect("a local replica");
            assert_eq!(count + (sim.local_end - pos) as i64, final_count, "seed {seed}: the local replica holds every request");
            assert!(sim.local_checks > 1000, "seed {seed}: only {} checks of the local replica", sim.local_checks);
        }
    }
}

#[test]
fn an_injected_request_goes_to_one_instance_and_its_reply_is_not_voted() {
    let mut v = voter(3, Policy::Suppress);
    v.handle(0, Event::ClientOpened(1));
    v.handle(0, Event::ClientBytes(1, b"INCR k\r\n".to_vec()));
    let acts = v.handle(0, Event::Inject(2, b"DEBUG WRONG-ANSWERS 1\r\n".to_vec()));
    assert_eq!(acts, vec![Action::ToInstance(2, b"DEBUG WRONG-ANSWERS 1\r\n".to_vec())]);
    v.handle(0, Event::ClientBytes(1, b"INCR k\r\n".to_vec()));
    v.handle(0, bytes(0, b":1\r\n:2\r\n"));
    let acts = v.handle(0, bytes(2, b":1\r\n+OK\r\n:3\r\n"));
    assert_eq!(to_client(&acts), b":1\r\n", "the +OK is no vote: instance 2's next reply is request 1's");
    let acts = v.handle(0, bytes(1, b":1\r\n:2\r\n"));
    assert_eq!(to_client(&acts), b":2\r\n");
    assert!(reports(&acts).contains(&Report::Fault { instance: 2, fault: Fault::Outvoted { conn: 1, seq: 1 } }), "{acts:?}");
}

fn remote_voter(every: u64) -> Voter {
    let mut cfg = Config::new(3, Policy::Suppress);
    cfg.remote = true;
    cfg.checkpoint_every = every;
    cfg.checkpoint_min_interval = 0;
    let mut v = Voter::new(cfg).expect("config");
    for a in v.start() {
        let Action::Connect(i) = a else { panic!("{a:?}") };
        v.handle(0, Event::InstanceConnected(i));
    }
    v
}

/// Mode 4: the backup gets a donor's snapshot, then the log from its position; once it holds
/// both, a voted reply leaves only when its request is logged there; without the backup,
/// replies flow (unprotected) and the held ones go out.
#[test]
fn mode_4_replies_wait_for_their_requests_in_the_backups_log() {
    let mut v = remote_voter(0);
    v.handle(0, Event::ClientOpened(1));
    assert_eq!(v.handle(0, Event::BackupConnected), vec![Action::Checkpoint(2)]);
    // While instance 2 is snapshotted, the others get the request (and vote it: unprotected).
    let acts = v.handle(1, Event::ClientBytes(1, b"INCR k\r\n".to_vec()));
    assert_eq!(acts, vec![Action::ToInstance(0, b"INCR k\r\n".to_vec()), Action::ToInstance(1, b"INCR k\r\n".to_vec())]);
    v.handle(2, bytes(1, b":1\r\n"));
    assert_eq!(to_client(&v.handle(2, bytes(0, b":1\r\n"))), b":1\r\n");
    let acts = v.handle(3, Event::SnapshotTaken(2));
    assert_eq!(
        acts,
        vec![
            Action::ShipSnapshot { donor: 2, position: 0 },
            Action::Log { from: 0, count: 1, bytes: b"INCR k\r\n".to_vec() },
            Action::ToInstance(2, b"INCR k\r\n".to_vec()),
        ]
    );
    assert!(!v.protected());
    assert_eq!(reports(&v.handle(4, Event::BackupLogged(1))), vec![Report::Protected { donor: 2, position: 0 }]);
    assert!(v.protected());
    v.handle(4, bytes(2, b":1\r\n"));
    // Protected: logged first, voted, held until the backup has it.
    let acts = v.handle(5, Event::ClientBytes(1, b"INCR k\r\nGET k\r\n".to_vec()));
    assert_eq!(acts[0], Action::Log { from: 1, count: 2, bytes: b"INCR k\r\nGET k\r\n".to_vec() });
    for i in 0..3 {
        assert!(to_client(&v.handle(6, bytes(i, b":2\r\n$1\r\n2\r\n"))).is_empty(), "not logged yet");
    }
    assert_eq!(to_client(&v.handle(7, Event::BackupLogged(2))), b":2\r\n");
    assert_eq!(to_client(&v.handle(8, Event::BackupLogged(3))), b"$1\r\n2\r\n");
    // An acknowledgement beyond what exists changes nothing.
    assert!(v.handle(8, Event::BackupLogged(99)).is_empty());
    // Held replies go out when the backup is lost; from then on replies are not held.
    v.handle(9, Event::ClientBytes(1, b"INCR k\r\n".to_vec()));
    for i in 0..3 {
        v.handle(9, bytes(i, b":3\r\n"));
    }
    let acts = v.handle(10, Event::BackupLost("reset".into()));
    assert_eq!(to_client(&acts), b":3\r\n");
    assert_eq!(reports(&acts), vec![Report::Unprotected { reason: "reset".into() }]);
    let acts = v.handle(11, Event::ClientBytes(1, b"PING\r\n".to_vec()));
    assert!(!acts.iter().any(|a| matches!(a, Action::Log { .. })), "no log without a backup: {acts:?}");
    for i in 1..3 {
        v.handle(12, bytes(i, b"+PONG\r\n"));
    }
    assert_eq!(v.counters.replies, 5);
    // A new backup: a new snapshot (its position is everything instance 2 was given).
    assert_eq!(v.handle(13, Event::BackupConnected), vec![Action::Checkpoint(2)]);
    assert_eq!(v.handle(14, Event::SnapshotTaken(2)), vec![Action::ShipSnapshot { donor: 2, position: 5 }]);
}

/// Mode 4: a new snapshot after `checkpoint_every` requests, shipped while the log goes on
/// (no log from its position again); a snapshot for the backup that fails is tried again;
/// a donor that fails hands it to another instance.
#[test]
fn mode_4_snapshots_again_and_survives_a_failing_donor() {
    let mut v = remote_voter(2);
    v.handle(0, Event::ClientOpened(1));
    assert_eq!(v.handle(0, Event::BackupConnected), vec![Action::Checkpoint(2)]);
    v.handle(1, Event::SnapshotTaken(2));
    v.handle(1, Event::BackupLogged(0));
    assert!(v.protected());
    let acts = v.handle(2, Event::ClientBytes(1, b"INCR k\r\nINCR k\r\n".to_vec()));
    assert!(acts.contains(&Action::Log { from: 0, count: 2, bytes: b"INCR k\r\nINCR k\r\n".to_vec() }));
    v.handle(3, Event::BackupLogged(2));
    v.handle(3, bytes(1, b":1\r\n:2\r\n"));
    v.handle(3, bytes(0, b":1\r\n:2\r\n"));
    // Instance 2 answers: it is quiet, its snapshot is taken.
    let acts = v.handle(4, bytes(2, b":1\r\n:2\r\n"));
    assert!(acts.contains(&Action::Checkpoint(2)), "{acts:?}");
    // The snapshot fails: reported, tried again after the backoff.
    let acts = v.handle(5, Event::SnapshotFailed(2, "disk full".into()));
    assert_eq!(reports(&acts), vec![Report::CheckpointFailed { reason: "snapshot of instance 2: disk full".into() }]);
    assert!(v.handle(6, Event::Tick).is_empty());
    let acts = v.handle(5 + S, Event::Tick);
    assert_eq!(acts, vec![Action::Checkpoint(2)]);
    // The donor crashes while snapshotted: its repair comes first (from instance 1), then
    // the backup's snapshot.
    let acts = v.handle(5 + S, Event::InstanceExited(2, "killed".into()));
    assert!(acts.contains(&Action::Snapshot(0)), "{acts:?}");
    assert_eq!(v.handle(6 + S, Event::SnapshotTaken(0)), vec![Action::Restore { instance: 2, donor: 0 }]);
    assert_eq!(v.handle(7 + S, Event::Restored(2)), vec![Action::Connect(2)]);
    let acts = v.handle(8 + S, Event::InstanceConnected(2));
    assert!(acts.contains(&Action::Checkpoint(2)), "{acts:?}");
    let acts = v.handle(9 + S, Event::SnapshotTaken(2));
    assert_eq!(acts, vec![Action::ShipSnapshot { donor: 2, position: 2 }], "the log goes on");
    assert!(v.protected());
}

/// A repair's donor is paused for its snapshot: with one of three instances faulty, the one
/// left decides alone meanwhile (replies never wait for the snapshot), and the donor's reply
/// is compared when it comes. Without a fault (three live), nothing is lowered.
#[test]
fn replies_do_not_wait_for_a_repairs_donor() {
    let mut v = voter(3, Policy::Suppress);
    v.handle(0, Event::ClientOpened(1));
    v.handle(0, Event::ClientBytes(1, b"INCR k\r\n".to_vec()));
    v.handle(1, bytes(0, b":1\r\n"));
    v.handle(1, bytes(1, b":1\r\n"));
    let acts = v.handle(2, Event::InstanceExited(2, "killed".into()));
    assert!(acts.contains(&Action::Snapshot(0)), "{acts:?}");
    // Instance 0 is being snapshotted: instance 1's reply goes out alone.
    let acts = v.handle(3, Event::ClientBytes(1, b"INCR k\r\n".to_vec()));
    assert_eq!(acts, vec![Action::ToInstance(1, b"INCR k\r\n".to_vec())]);
    assert_eq!(to_client(&v.handle(4, bytes(1, b":2\r\n"))), b":2\r\n");
    // The donor's late reply agrees: no fault; a different one would be its fault.
    let acts = v.handle(5, Event::SnapshotTaken(0));
    assert!(acts.contains(&Action::ToInstance(0, b"INCR k\r\n".to_vec())), "{acts:?}");
    assert!(reports(&v.handle(6, bytes(0, b":2\r\n"))).is_empty());
    assert_eq!(v.counters.faults, 1);
}

/// A donor stopped before its snapshot (SIGSTOP) answers no snapshot and, given no requests,
/// cannot be seen hung by the hang timeout: its snapshot's own timeout faults it.
#[test]
fn a_donor_that_never_snapshots_has_hung() {
    let mut v = remote_voter(0);
    assert_eq!(v.handle(0, Event::BackupConnected), vec![Action::Checkpoint(2)]);
    assert!(v.handle(S, Event::Tick).is_empty());
    let acts = v.handle(2 * S + 1, Event::Tick);
    assert_eq!(reports(&acts)[0], Report::Fault { instance: 2, fault: Fault::HungInSnapshot { after_ms: 2000 } });
    assert!(acts.contains(&Action::Stop(2)));
    // The repair comes first, then the replica's snapshot of another donor.
    assert!(acts.contains(&Action::Snapshot(0)), "{acts:?}");
}

/// One instance, the replica's snapshot asked before its connection is open: the snapshot is
/// taken once it opens (a quiescing donor gets no requests, so no reply would ever prompt it:
/// `vigil bench voting` hung so with N = 1).
#[test]
fn a_snapshot_asked_before_the_donor_connects_is_taken_when_it_does() {
    let mut cfg = Config::new(1, Policy::PreferPrimary);
    cfg.remote = true;
    let mut v = Voter::new(cfg).expect("config");
    assert_eq!(v.start(), vec![Action::Connect(0)]);
    assert!(v.handle(0, Event::BackupConnected).is_empty(), "not connected yet");
    assert_eq!(v.handle(1, Event::InstanceConnected(0)), vec![Action::Checkpoint(0)]);
}

/// The replica's snapshots come after `checkpoint_every` requests, but never sooner than
/// `checkpoint_min_interval` after the last one.
#[test]
fn replica_snapshots_are_spaced() {
    let mut cfg = Config::new(3, Policy::Suppress);
    cfg.remote = true;
    cfg.checkpoint_every = 2;
    cfg.checkpoint_min_interval = S;
    let mut v = Voter::new(cfg).expect("config");
    for a in v.start() {
        let Action::Connect(i) = a else { panic!("{a:?}") };
        v.handle(0, Event::InstanceConnected(i));
    }
    v.handle(0, Event::ClientOpened(1));
    assert_eq!(v.handle(0, Event::BackupConnected), vec![Action::Checkpoint(2)]);
    v.handle(1, Event::SnapshotTaken(2));
    v.handle(1, Event::BackupLogged(0));
    v.handle(2, Event::ClientBytes(1, b"PING\r\nPING\r\nPING\r\n".to_vec()));
    for i in 0..3 {
        v.handle(3, bytes(i, b"+PONG\r\n+PONG\r\n+PONG\r\n"));
    }
    assert!(!v.handle(S / 2, Event::Tick).iter().any(|a| matches!(a, Action::Checkpoint(_))), "too soon");
    assert_eq!(v.handle(S + 1, Event::Tick), vec![Action::Checkpoint(2)]);
}
