//! The voter as a pure state machine: [`Event`]s in (client bytes, instance bytes, connections,
//! process exits, repair steps, the time), [`Action`]s out (voted replies to the clients,
//! input to the instances, connections to open and close, instances to stop, snapshot and
//! restore, and [`Report`]s of faults and repairs). No sockets, no clocks, no threads: the
//! driver ([`super::driver`]) does the I/O and passes the time in, and the tests here drive
//! every interleaving deterministically.
//!
//! The model. Every client connection carries a sequence of requests. The voter puts all
//! clients' requests into **one total order** and gives that same sequence to every instance
//! on one connection per instance, so every instance executes the same requests in the same
//! order (two clients incrementing one key get the same answers from every instance: replica
//! determinism, which separate connections per client would not give, since each instance
//! would interleave them as its own timing says). Every instance answers each request with
//! exactly one reply, in order. Reply `r` is *voted*: once a value has the quorum's votes it
//! is the reply of request `r`, sent to the client that asked, in order. The quorum is a
//! majority of the configured `n` instances (2 of 3; 2 of 2), lowered to the number of live
//! instances when fewer remain (degraded, reported). When no value can reach the quorum any
//! more (2 instances disagreeing, or 3 different answers) the [`Policy`] decides: take the
//! primary's (instance 0) reply, or suppress the reply and close that client's connection
//! (fail silent), and report. One consequence: per-connection state of the protocol (Redis's
//! `SELECT`, `MULTI`) is shared by all clients; the kv guest has none.
//!
//! Faults: an instance whose process ends or whose connection breaks has *crashed*; one that
//! leaves a request unanswered for `hang_timeout` has *hung*; one whose reply differs from the
//! voted one is *outvoted*; one whose bytes are no valid reply broke the *protocol*. A faulty
//! instance is stopped and repaired: a live *donor* gets no new input until it has answered
//! everything it was given and all of that is voted (quiescent), is snapshotted, gets its
//! backlog and serves on; the faulty instance is restored from the snapshot, connected again,
//! and given every request after the donor's position at the snapshot, which the voter keeps
//! until then. One repair runs at a time.

use super::resp;
use std::collections::VecDeque;

/// An instance's index, 0..n (0 is the primary).
pub type Instance = usize;
/// A client connection's identifier (chosen by the driver, never reused).
pub type Conn = u64;
/// Monotonic time in nanoseconds.
pub type Nanos = u64;

/// Most requests of one client not yet answered.
pub const MAX_OUTSTANDING: u64 = 1 << 16;
/// Most instances of one VM.
pub const MAX_INSTANCES: usize = 7;

/// What to do when no reply can reach the quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Send the primary's (instance 0's) reply; the other instances are outvoted.
    PreferPrimary,
    /// Send nothing: close the client's connection (fail silent) and raise the alarm.
    Suppress,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "prefer-primary" => Ok(Policy::PreferPrimary),
            "suppress" => Ok(Policy::Suppress),
            _ => Err(format!("unknown disagreement policy {s:?} (prefer-primary or suppress)")),
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Policy::PreferPrimary => "prefer-primary",
            Policy::Suppress => "suppress",
        })
    }
}

/// How the bytes of one connection divide into messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Redis protocol: requests and replies framed by [`resp`].
    Resp,
    /// Each bytes event is one message (datagrams).
    Datagram,
}

/// The voter's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Number of instances (1..=[`MAX_INSTANCES`]).
    pub n: usize,
    pub policy: Policy,
    pub framing: Framing,
    /// An instance that leaves a request unanswered this long has hung.
    pub hang_timeout: Nanos,
    /// Longest request and longest reply, in bytes.
    pub max_message: usize,
    /// Most bytes of requests kept (not yet given to every instance, or kept for an instance
    /// under repair); a client beyond it is disconnected.
    pub max_backlog: usize,
    /// Time between a failed repair and the next attempt.
    pub repair_backoff: Nanos,
    /// A donor whose snapshot is not done after this long has hung (a stopped VMM answers
    /// no snapshot, and a donor gets no requests meanwhile, so the hang timeout cannot see it).
    pub snapshot_timeout: Nanos,
    /// Mode 4 (local + remote): the group is protected by a backup on another host, which
    /// holds a donor's snapshot and the log of every request after it. While the backup is
    /// in step ([`Event::BackupLogged`]), a reply leaves only once its request is logged there.
    pub remote: bool,
    /// Mode 4: a new snapshot for the backup after this many requests (0: only when a backup
    /// connects), so that the log it replays at a takeover stays short,
    pub checkpoint_every: u64,
    /// but not sooner than this after the last one (each writes the donor's memory).
    pub checkpoint_min_interval: Nanos,
}

impl Config {
    pub fn new(n: usize, policy: Policy) -> Config {
        Config {
            n,
            policy,
            framing: Framing::Resp,
            hang_timeout: 500_000_000,
            max_message: 1 << 20,
            max_backlog: 16 << 20,
            repair_backoff: 1_000_000_000,
            snapshot_timeout: 2_000_000_000,
            remote: false,
            checkpoint_every: 50_000,
            checkpoint_min_interval: 2_000_000_000,
        }
    }
}

/// Why an instance is faulty.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Fault {
    /// Its process ended or its connection broke.
    Crashed { reason: String },
    /// It left request `seq` (of the total order; a request of client `conn`) unanswered for
    /// the hang timeout.
    Hung { conn: Conn, seq: u64 },
    /// Its reply to request `seq` (of client `conn`) differed from the voted one.
    Outvoted { conn: Conn, seq: u64 },
    /// It sent bytes that are no valid reply (or a reply to no request).
    Protocol { reason: String },
    /// As a donor, its snapshot was not done after `after_ms`.
    HungInSnapshot { after_ms: u64 },
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Crashed { reason } => write!(f, "crashed ({reason})"),
            Fault::Hung { conn, seq } => write!(f, "hung (no reply to request {seq}, of client {conn})"),
            Fault::Outvoted { conn, seq } => write!(f, "outvoted (reply to request {seq}, of client {conn})"),
            Fault::Protocol { reason } => write!(f, "protocol error ({reason})"),
            Fault::HungInSnapshot { after_ms } => write!(f, "hung (no snapshot after {after_ms} ms)"),
        }
    }
}

/// Something the voter reports (to the event log, `vigil status`, the test).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "report")]
pub enum Report {
    Fault {
        instance: Instance,
        fault: Fault,
    },
    /// No reply could reach the quorum; `chosen` is the instance whose reply was sent (none:
    /// suppressed, the client's connection closed).
    Disagreement {
        conn: Conn,
        seq: u64,
        chosen: Option<Instance>,
    },
    /// Fewer instances are live than a majority of n: replies are voted by `quorum`.
    Degraded {
        live: usize,
        quorum: usize,
    },
    /// The instance serves again, restored from `donor`'s snapshot, `took` after its fault.
    Repaired {
        instance: Instance,
        donor: Instance,
        took: Nanos,
    },
    RepairFailed {
        instance: Instance,
        reason: String,
    },
    /// The client sent something that is no request; its connection was closed.
    ClientError {
        conn: Conn,
        reason: String,
    },
    /// Mode 4: the backup holds instance `donor`'s snapshot (after `position` requests) and the
    /// log from there: from now on a reply leaves only once its request is logged there.
    Protected {
        donor: Instance,
        position: u64,
    },
    /// Mode 4: the backup is gone; replies leave without it until a new one is in step.
    Unprotected {
        reason: String,
    },
    /// Mode 4: a snapshot for the backup failed (tried again after the repair backoff).
    CheckpointFailed {
        reason: String,
    },
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    ClientOpened(Conn),
    ClientBytes(Conn, Vec<u8>),
    /// The client will send nothing more (half close): its replies still go out, then it
    /// closes.
    ClientEof(Conn),
    /// The client is gone: its requests are still executed (the instances' states must
    /// stay equal), its replies dropped.
    ClientClosed(Conn),
    /// The driver's connection to the instance is open.
    InstanceConnected(Instance),
    InstanceBytes(Instance, Vec<u8>),
    /// The instance's connection could not be opened, ended or failed.
    InstanceLost(Instance, String),
    /// The instance's process ended.
    InstanceExited(Instance, String),
    /// The donor's snapshot (asked by [`Action::Snapshot`]) is written and the donor runs again.
    SnapshotTaken(Instance),
    SnapshotFailed(Instance, String),
    /// The instance runs again from the donor's snapshot ([`Action::Restore`]).
    Restored(Instance),
    RestoreFailed(Instance, String),
    /// Fault injection: send these bytes (one request) to instance `i` alone, outside the
    /// total order; its one reply is dropped unvoted.
    Inject(Instance, Vec<u8>),
    /// Mode 4: the connection to the backup is open (a new session: it holds nothing yet).
    BackupConnected,
    /// Mode 4: the backup holds the snapshot and every request before this one.
    BackupLogged(u64),
    /// Mode 4: the connection to the backup ended.
    BackupLost(String),
    /// Time passed (the driver ticks a few times per hang timeout).
    Tick,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    ToClient(Conn, Vec<u8>),
    /// Close the client's connection after what was sent to it.
    CloseClient(Conn),
    /// Open the connection to the instance; answer with [`Event::InstanceConnected`] or
    /// [`Event::InstanceLost`].
    Connect(Instance),
    ToInstance(Instance, Vec<u8>),
    Disconnect(Instance),
    /// Stop the instance's process (it is faulty).
    Stop(Instance),
    /// Snapshot the donor (pause, write, resume); answer with [`Event::SnapshotTaken`].
    Snapshot(Instance),
    /// Restore `instance` from `donor`'s snapshot; answer with [`Event::Restored`].
    Restore {
        instance: Instance,
        donor: Instance,
    },
    /// Mode 4: snapshot the donor (pause, write, resume) for the backup; answer with
    /// [`Event::SnapshotTaken`] or [`Event::SnapshotFailed`].
    Checkpoint(Instance),
    /// Mode 4: send the donor's snapshot (just taken by [`Action::Checkpoint`]) to the backup:
    /// it holds the state after the first `position` requests.
    ShipSnapshot {
        donor: Instance,
        position: u64,
    },
    /// Mode 4: send requests `from..from + count` (their bytes, one after the other) to the
    /// backup's log.
    Log {
        from: u64,
        count: u64,
        bytes: Vec<u8>,
    },
    /// Append requests `from..from + count` to the local replica only (no backup session
    /// logs them now: none, or a new one before its snapshot). The local replica stays
    /// complete whatever the backup does, so a voter restarted after a crash never loses a
    /// reply it released.
    LogLocal {
        from: u64,
        count: u64,
        bytes: Vec<u8>,
    },
    Report(Report),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Live,
    Faulty {
        since: Nanos,
        retry_at: Nanos,
    },
    /// Being restored from a snapshot.
    Restoring {
        since: Nanos,
    },
    /// Restored; its connection is opening.
    Joining {
        since: Nanos,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Quiescing,
    Snapshotting,
    Restoring,
    Joining,
}

/// Mode 4: where the backup is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backup {
    /// None connected (or not mode 4).
    Off,
    /// Connected; it has no complete snapshot yet: replies are not held.
    Syncing,
    /// It holds a snapshot and the log: replies wait for their request to be logged.
    Protected,
}

/// A repair of `target` from `donor`'s snapshot, or (`target` none) a snapshot of `donor`
/// for the backup (mode 4).
#[derive(Debug, Clone, Copy)]
struct Repair {
    target: Option<Instance>,
    donor: Instance,
    stage: Stage,
    /// When the stage began.
    since: Nanos,
}

/// The voter's connection to one instance.
#[derive(Debug, Default)]
struct Link {
    open: bool,
    /// Requests given but not yet sent (the connection is not open yet).
    queue: Vec<u8>,
    queued: u64,
    /// Next request to give.
    next: u64,
    /// Replies received.
    got: u64,
    rbuf: Vec<u8>,
    /// When each sent, unanswered request was sent.
    sent_at: VecDeque<Nanos>,
    /// Injected requests: each one's reply comes after this many replies, and is dropped.
    injected: VecDeque<u64>,
}

#[derive(Debug)]
struct Slot {
    conn: Conn,
    /// Decided by this instance alone while that donor was paused (`lowered_quorum`).
    alone: Option<(Instance, Instance)>,
    votes: Vec<Option<Vec<u8>>>,
    decided: Option<Vec<u8>>,
    /// No reply could be decided and the policy suppressed it.
    suppressed: bool,
}

impl Slot {
    fn resolved(&self) -> bool {
        self.decided.is_some() || self.suppressed
    }
}

#[derive(Debug, Default)]
struct Client {
    inbuf: Vec<u8>,
    /// Requests not yet answered.
    pending: u64,
    eof: bool,
}

/// Counters, for statistics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub requests: u64,
    pub replies: u64,
    pub faults: u64,
    pub disagreements: u64,
    pub repairs: u64,
}

/// The voter of one VM's instances.
pub struct Voter {
    cfg: Config,
    states: Vec<State>,
    clients: std::collections::BTreeMap<Conn, Client>,
    /// The total order: requests from `req_base` on (kept while an instance still needs
    /// them), `total` so far.
    reqs: VecDeque<Vec<u8>>,
    req_base: u64,
    req_bytes: usize,
    total: u64,
    /// Replies from `slot_base` on; `emitted` is the next to send.
    slots: VecDeque<Slot>,
    slot_base: u64,
    emitted: u64,
    links: Vec<Option<Link>>,
    /// Where an instance under repair starts (the donor's position at the snapshot).
    hold: Vec<Option<u64>>,
    repair: Option<Repair>,
    degraded: bool,
    /// Mode 4: the backup, the requests it has logged (all before this one), where its log
    /// of this session starts (none: no snapshot sent yet), whether it needs a new snapshot
    /// (and from when), and the position of the last snapshot sent.
    backup: Backup,
    logged: u64,
    log_from: Option<u64>,
    want_checkpoint: Option<Nanos>,
    /// The local replica holds a snapshot: every request is logged to it from now on, with a
    /// backup session or without ([`Action::LogLocal`]).
    local_log: bool,
    last_checkpoint: u64,
    last_donor: Instance,
    last_checkpoint_at: Nanos,
    /// Replies before this one left while the backup synchronised; `announced`: it holds
    /// their requests too (protected).
    protected_from: u64,
    announced: bool,
    now: Nanos,
    out: Vec<Action>,
    pub counters: Counters,
}

impl Voter {
    /// A voter for `cfg.n` live instances; `Err` for an `n` outside 1..=[`MAX_INSTANCES`].
    pub fn new(cfg: Config) -> Result<Voter, String> {
        if cfg.n == 0 || cfg.n > MAX_INSTANCES {
            return Err(format!("{} instances: a voted VM has 1 to {MAX_INSTANCES}", cfg.n));
        }
        Ok(Voter {
            states: vec![State::Live; cfg.n],
            links: (0..cfg.n).map(|_| None).collect(),
            hold: vec![None; cfg.n],
            cfg,
            clients: Default::default(),
            reqs: VecDeque::new(),
            req_base: 0,
            req_bytes: 0,
            total: 0,
            slots: VecDeque::new(),
            slot_base: 0,
            emitted: 0,
            repair: None,
            degraded: false,
            backup: Backup::Off,
            logged: 0,
            log_from: None,
            want_checkpoint: None,
            local_log: false,
            last_checkpoint: 0,
            last_donor: 0,
            last_checkpoint_at: 0,
            protected_from: 0,
            announced: false,
            now: 0,
            out: Vec::new(),
            counters: Counters::default(),
        })
    }

    /// The first actions: connect to every instance.
    pub fn start(&mut self) -> Vec<Action> {
        for i in 0..self.cfg.n {
            if self.links[i].is_none() && self.is_live(i) {
                self.links[i] = Some(Link::default());
                self.out.push(Action::Connect(i));
            }
        }
        std::mem::take(&mut self.out)
    }

    /// The local replica holds the instances' state before the first request (a voter
    /// resuming a replica: its snapshot): every request is logged to it from the start.
    pub fn log_locally(&mut self) {
        self.local_log = true;
    }

    /// Whether the instance serves (takes part in votes).
    pub fn is_live(&self, i: Instance) -> bool {
        matches!(self.states.get(i), Some(State::Live))
    }

    /// Instances that are live.
    pub fn live(&self) -> usize {
        self.states.iter().filter(|s| matches!(s, State::Live)).count()
    }

    /// The instance under repair, if any.
    pub fn repairing(&self) -> Option<Instance> {
        self.repair.and_then(|r| r.target)
    }

    /// Mode 4: whether the backup holds a snapshot and the log (replies wait for it).
    pub fn protected(&self) -> bool {
        self.backup == Backup::Protected && self.announced
    }

    /// Requests whose replies are not yet decided and sent (the driver paces a replay by it).
    pub fn unanswered(&self) -> u64 {
        self.total - self.emitted
    }

    /// Open client connections.
    pub fn connections(&self) -> usize {
        self.clients.len()
    }

    /// The votes needed for a reply now.
    pub fn quorum(&self) -> usize {
        (self.cfg.n / 2 + 1).min(self.live()).max(1)
    }

    /// Takes one event at time `now`; returns what to do, in order.
    pub fn handle(&mut self, now: Nanos, ev: Event) -> Vec<Action> {
        self.now = self.now.max(now);
        match ev {
            Event::ClientOpened(c) => {
                self.clients.insert(c, Client::default());
            }
            Event::ClientBytes(c, b) => self.client_bytes(c, b),
            Event::ClientEof(c) => {
                if let Some(cl) = self.clients.get_mut(&c) {
                    cl.eof = true;
                }
                self.maybe_close(c);
            }
            Event::ClientClosed(c) => {
                self.clients.remove(&c);
            }
            Event::InstanceConnected(i) => self.instance_connected(i),
            Event::InstanceBytes(i, b) => self.instance_bytes(i, b),
            Event::InstanceLost(i, why) => {
                if self.links.get(i).is_some_and(Option::is_some) {
                    self.fault(i, Fault::Crashed { reason: format!("connection: {why}") });
                }
            }
            Event::InstanceExited(i, why) => self.fault(i, Fault::Crashed { reason: why }),
            Event::SnapshotTaken(d) => self.snapshot_taken(d),
            Event::SnapshotFailed(d, why) => {
                if matches!(self.repair, Some(r) if r.donor == d && r.stage == Stage::Snapshotting) {
                    self.repair_failed(format!("snapshot of instance {d}: {why}"));
                }
            }
            Event::Restored(i) => self.restored(i),
            Event::BackupConnected if self.cfg.remote => {
                self.backup = Backup::Syncing;
                self.log_from = None;
                self.want_checkpoint = Some(self.now);
            }
            Event::BackupConnected => {}
            Event::BackupLogged(upto) => {
                if self.backup == Backup::Syncing && self.log_from.is_some() {
                    // Replies are held from now on; the group is protected once the backup
                    // also holds the requests of the replies released while it synchronised.
                    self.backup = Backup::Protected;
                    self.announced = false;
                    self.protected_from = self.emitted;
                    // What an earlier backup acknowledged says nothing of this one (its
                    // snapshot's position may be earlier: the donor's, not the newest request).
                    self.logged = 0;
                }
                if self.backup == Backup::Protected {
                    self.logged = self.logged.max(upto.min(self.total));
                    if !self.announced && self.logged >= self.protected_from {
                        self.announced = true;
                        self.out.push(Action::Report(Report::Protected { donor: self.last_donor, position: self.last_checkpoint }));
                    }
                    self.emit();
                    self.check_quiescent();
                }
            }
            Event::BackupLost(why) => {
                if self.backup != Backup::Off {
                    if self.protected() {
                        self.out.push(Action::Report(Report::Unprotected { reason: why }));
                    }
                    self.backup = Backup::Off;
                    self.log_from = None;
                    self.want_checkpoint = None;
                    // What waited for the backup's log goes out now.
                    self.emit();
                    self.check_quiescent();
                }
            }
            Event::RestoreFailed(i, why) => {
                if matches!(self.repair, Some(r) if r.target == Some(i) && r.stage == Stage::Restoring) {
                    self.repair_failed(format!("restore: {why}"));
                }
            }
            Event::Inject(i, b) => {
                if let Some(l) = self.links.get_mut(i).and_then(Option::as_mut).filter(|l| l.open && l.queued == 0) {
                    l.injected.push_back(l.next);
                    self.out.push(Action::ToInstance(i, b));
                }
            }
            Event::Tick => self.tick(),
        }
        // (A donor may become quiet by any event: its connection opening, a fault elsewhere.)
        self.check_quiescent();
        self.maybe_start_repair();
        std::mem::take(&mut self.out)
    }

    /// Checks the invariants the state machine keeps (tests).
    #[cfg(test)]
    fn check(&self) -> Result<(), String> {
        let q = self.quorum();
        if self.slot_base + self.slots.len() as u64 != self.total || self.emitted < self.slot_base {
            return Err(format!("slots out of step: {}", self.debug()));
        }
        for (k, slot) in self.slots.iter().enumerate() {
            if slot.resolved() {
                continue;
            }
            for i in 0..self.cfg.n {
                let Some(v) = slot.votes[i].as_ref().filter(|_| self.is_voting(i)) else { continue };
                let count = (0..self.cfg.n).filter(|&j| self.is_voting(j) && slot.votes[j].as_ref() == Some(v)).count();
                if count >= q {
                    return Err(format!("reply {} has a quorum and is undecided: {}", self.slot_base + k as u64, self.debug()));
                }
            }
        }
        Ok(())
    }

    #[cfg(test)]
    fn debug(&self) -> String {
        let slot = self.slots.get((self.emitted - self.slot_base) as usize).map(|s| format!("{:?}", s));
        let links: Vec<_> = self.links.iter().map(|l| l.as_ref().map(|l| (l.open, l.next, l.got, l.queued, l.rbuf.len()))).collect();
        format!(
            "emitted {} slot_base {} total {} req_base {} slot {slot:?} links {links:?} states {:?} repair {:?} hold {:?}",
            self.emitted, self.slot_base, self.total, self.req_base, self.states, self.repair, self.hold
        )
    }

    fn client_error(&mut self, c: Conn, reason: &str) {
        self.out.push(Action::Report(Report::ClientError { conn: c, reason: reason.to_string() }));
        if let Some(cl) = self.clients.get_mut(&c) {
            cl.inbuf.clear();
            cl.eof = true;
        }
        // The replies to the requests before it still go out; then the connection closes.
        self.maybe_close(c);
    }

    fn client_bytes(&mut self, c: Conn, b: Vec<u8>) {
        let (framing, max) = (self.cfg.framing, self.cfg.max_message);
        let Some(cl) = self.clients.get_mut(&c) else { return };
        if cl.eof {
            return;
        }
        let mut reqs = Vec::new();
        let mut err = None;
        match framing {
            Framing::Datagram => {
                if b.len() > max {
                    err = Some("message too large");
                } else {
                    reqs.push(b);
                }
            }
            Framing::Resp => {
                cl.inbuf.extend_from_slice(&b);
                loop {
                    match resp::request(&cl.inbuf, max) {
                        Ok(Some(r)) => {
                            let req: Vec<u8> = cl.inbuf.drain(..r.len).collect();
                            if r.replies {
                                reqs.push(req);
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            err = Some(e.0);
                            break;
                        }
                    }
                }
            }
        }
        let pushed = !reqs.is_empty();
        let first = self.total;
        let mut log = Vec::new();
        for r in reqs {
            let pending = self.clients.get(&c).map_or(0, |cl| cl.pending);
            if self.req_bytes + r.len() > self.cfg.max_backlog || pending >= MAX_OUTSTANDING {
                err = Some("too many requests outstanding");
                break;
            }
            self.req_bytes += r.len();
            if self.log_from.is_some() || self.local_log {
                log.extend_from_slice(&r);
            }
            self.reqs.push_back(r);
            self.total += 1;
            self.slots.push_back(Slot { conn: c, alone: None, votes: vec![None; self.cfg.n], decided: None, suppressed: false });
            self.counters.requests += 1;
            if let Some(cl) = self.clients.get_mut(&c) {
                cl.pending += 1;
            }
        }
        if self.log_from.is_some() && self.total > first {
            // Mode 4: to the backup's log as they join the order, before any instance answers.
            self.out.push(Action::Log { from: first, count: self.total - first, bytes: log });
            let every = self.cfg.checkpoint_every;
            let running = self.repair.is_some_and(|r| r.target.is_none());
            if every > 0 && self.total - self.last_checkpoint >= every && self.want_checkpoint.is_none() && !running {
                self.want_checkpoint = Some(self.now.max(self.last_checkpoint_at + self.cfg.checkpoint_min_interval));
            }
        } else if self.local_log && self.total > first {
            self.out.push(Action::LogLocal { from: first, count: self.total - first, bytes: log });
        }
        if pushed {
            // One write per instance for all the requests of this read.
            let quiescing = self.quiescing_donor();
            for i in 0..self.cfg.n {
                if Some(i) != quiescing && matches!(self.states[i], State::Live | State::Joining { .. }) {
                    self.give(i, self.total);
                }
            }
            self.trim();
        }
        if let Some(e) = err {
            self.client_error(c, e);
        }
    }

    fn quiescing_donor(&self) -> Option<Instance> {
        match self.repair {
            Some(r) if matches!(r.stage, Stage::Quiescing | Stage::Snapshotting) => Some(r.donor),
            _ => None,
        }
    }

    /// Gives instance `i` the requests up to (not including) `upto`.
    fn give(&mut self, i: Instance, upto: u64) {
        let now = self.now;
        let Some(link) = self.links[i].as_mut() else { return };
        #[cfg(test)]
        if link.next < self.req_base {
            panic!("instance {i}: request {} forgotten (base {})", link.next, self.req_base);
        }
        let mut bytes = Vec::new();
        let mut count = 0;
        while link.next < upto {
            let Some(r) = self.reqs.get((link.next - self.req_base) as usize) else { break };
            bytes.extend_from_slice(r);
            link.next += 1;
            count += 1;
        }
        if count == 0 {
            return;
        }
        if link.open {
            link.sent_at.extend(std::iter::repeat_n(now, count as usize));
            self.out.push(Action::ToInstance(i, bytes));
        } else {
            link.queue.extend_from_slice(&bytes);
            link.queued += count;
        }
    }

    fn instance_connected(&mut self, i: Instance) {
        let now = self.now;
        let Some(link) = self.links.get_mut(i).and_then(Option::as_mut) else {
            self.out.push(Action::Disconnect(i));
            return;
        };
        link.open = true;
        if !link.queue.is_empty() {
            link.sent_at.extend(std::iter::repeat_n(now, link.queued as usize));
            link.queued = 0;
            self.out.push(Action::ToInstance(i, std::mem::take(&mut link.queue)));
        }
        self.maybe_joined(i);
    }

    fn maybe_joined(&mut self, i: Instance) {
        let State::Joining { since } = self.states[i] else { return };
        if !self.links[i].as_ref().is_some_and(|l| l.open) {
            return;
        }
        self.states[i] = State::Live;
        let donor = self.repair.map(|r| r.donor).unwrap_or(0);
        self.repair = None;
        self.counters.repairs += 1;
        self.out.push(Action::Report(Report::Repaired { instance: i, donor, took: self.now.saturating_sub(since) }));
        self.check_degraded();
    }

    fn instance_bytes(&mut self, i: Instance, b: Vec<u8>) {
        if !self.is_voting(i) {
            return;
        }
        let (framing, max) = (self.cfg.framing, self.cfg.max_message);
        let Some(link) = self.links[i].as_mut() else { return };
        let mut frames = Vec::new();
        let mut bad = None;
        match framing {
            Framing::Datagram => frames.push(b),
            Framing::Resp => {
                link.rbuf.extend_from_slice(&b);
                loop {
                    match resp::reply(&link.rbuf, max) {
                        Ok(Some(n)) => frames.push(link.rbuf.drain(..n).collect::<Vec<u8>>()),
                        Ok(None) => break,
                        Err(e) => {
                            bad = Some(e.0.to_string());
                            break;
                        }
                    }
                }
            }
        }
        for f in frames {
            let Some(link) = self.links[i].as_mut() else { return };
            if link.injected.front() == Some(&link.got) {
                link.injected.pop_front();
                continue;
            }
            if link.got >= link.next - link.queued {
                self.fault(i, Fault::Protocol { reason: "a reply to no request".into() });
                return;
            }
            let seq = link.got;
            link.got += 1;
            link.sent_at.pop_front();
            self.vote(i, seq, f);
            if !self.is_voting(i) {
                return;
            }
        }
        if let Some(reason) = bad {
            self.fault(i, Fault::Protocol { reason });
            return;
        }
        self.emit();
        self.check_quiescent();
    }

    fn is_voting(&self, i: Instance) -> bool {
        matches!(self.states[i], State::Live | State::Joining { .. })
    }

    fn vote(&mut self, i: Instance, seq: u64, value: Vec<u8>) {
        if seq < self.slot_base {
            return; // decided and every live instance had answered: nothing to compare
        }
        let Some(slot) = self.slots.get_mut((seq - self.slot_base) as usize) else { return };
        let conn = slot.conn;
        match &slot.decided {
            Some(d) if *d != value => {
                // Decided without it while it was paused: two instances disagree, and the one
                // that decided was chosen (the primary, for N = 2 prefer-primary).
                if let Some((chosen, _)) = slot.alone.filter(|&(_, d)| d == i) {
                    self.counters.disagreements += 1;
                    self.out.push(Action::Report(Report::Disagreement { conn, seq, chosen: Some(chosen) }));
                }
                self.fault(i, Fault::Outvoted { conn, seq })
            }
            Some(_) => slot.votes[i] = Some(value),
            None if slot.suppressed => slot.votes[i] = Some(value),
            None => {
                slot.votes[i] = Some(value);
                self.decide(seq);
            }
        }
    }

    /// Decides reply `seq` if it can be decided now (the caller sends what is decided, so
    /// that the replies of one read go out in one write per client).
    fn decide(&mut self, seq: u64) {
        let quorum = self.quorum();
        let lowered = self.lowered_quorum();
        let (n, policy) = (self.cfg.n, self.cfg.policy);
        let voting: Vec<bool> = (0..n).map(|i| self.is_voting(i)).collect();
        let live: Vec<bool> = (0..n).map(|i| self.is_live(i)).collect();
        if seq < self.slot_base {
            return;
        }
        let links = &self.links;
        let Some(slot) = self.slots.get_mut((seq - self.slot_base) as usize) else { return };
        if slot.resolved() {
            return;
        }
        // The largest group of equal votes, from instances that vote.
        let mut best: Option<(usize, Instance)> = None;
        for i in 0..n {
            let Some(v) = slot.votes[i].as_ref().filter(|_| voting[i]) else { continue };
            let count = (0..n).filter(|&j| voting[j] && slot.votes[j].as_ref() == Some(v)).count();
            if best.is_none_or(|(b, _)| count > b) {
                best = Some((count, i));
            }
        }
        let Some((count, who)) = best else { return };
        // While a donor is paused for a snapshot, the others may decide without it (its vote is
        // still compared when it comes): see `lowered_quorum`.
        let full_quorum = quorum;
        let (quorum, paused) = match lowered {
            Some((d, q)) if slot.votes[d].is_none() => (q, Some(d)),
            _ => (quorum, None),
        };
        // Live instances that will still answer it (a quiescing donor is given the request
        // after its snapshot; an instance restored after it never answers it).
        let pending = (0..n)
            .filter(|&i| Some(i) != paused && live[i] && slot.votes[i].is_none() && links[i].as_ref().is_some_and(|l| l.got <= seq))
            .count();
        let all_agree = (0..n).all(|i| !voting[i] || slot.votes[i].is_none() || slot.votes[i] == slot.votes[who]);
        let conn = slot.conn;
        let chosen = if count >= quorum {
            who
        } else if count + pending >= quorum {
            return; // wait for more votes
        } else if all_agree {
            // Every instance that can answer it did, and all agree (the others failed before
            // answering): the best there is.
            who
        } else {
            // No majority can form any more.
            self.counters.disagreements += 1;
            let primary = (policy == Policy::PreferPrimary && slot.votes[0].is_some() && voting[0]).then_some(0);
            self.out.push(Action::Report(Report::Disagreement { conn, seq, chosen: primary }));
            match primary {
                Some(p) => p,
                None => {
                    // The client's connection closes when the replies before it are sent.
                    slot.suppressed = true;
                    return;
                }
            }
        };
        if let Some(d) = paused.filter(|_| count < full_quorum) {
            slot.alone = Some((chosen, d));
        }
        let value = slot.votes[chosen].clone();
        let losers: Vec<Instance> = (0..n).filter(|&i| voting[i] && slot.votes[i].is_some() && slot.votes[i] != value).collect();
        slot.decided = value;
        for i in losers {
            self.fault(i, Fault::Outvoted { conn, seq });
        }
    }

    /// The donor being quiesced and snapshotted, and the votes the other live instances need
    /// meanwhile, when they may decide without it: during a repair (one instance is faulty
    /// already; within the single-fault hypothesis the others are correct, so a reply of the
    /// one that is left may go: replies never wait for the donor's snapshot), or during a
    /// snapshot for the replica when the donor is not the primary and the policy prefers the
    /// primary (N = 2: the primary's reply is the one the policy would send anyway). With three
    /// instances all live the other two are a majority: nothing is lowered. The donor's reply
    /// is compared when it comes, and a difference is reported as its fault.
    fn lowered_quorum(&self) -> Option<(Instance, usize)> {
        let r = self.repair?;
        if !matches!(r.stage, Stage::Quiescing | Stage::Snapshotting) {
            return None;
        }
        let others = self.live().saturating_sub(1);
        let allowed = r.target.is_some() || (self.cfg.policy == Policy::PreferPrimary && r.donor != 0);
        (allowed && others > 0).then(|| (r.donor, self.quorum().min(others)))
    }

    /// Sends the decided replies in order, forgets what every live instance has answered.
    fn emit(&mut self) {
        let n = self.cfg.n;
        let mut out: Vec<(Conn, Vec<u8>)> = Vec::new();
        while let Some(slot) = self.slots.get((self.emitted - self.slot_base) as usize) {
            if !slot.resolved() {
                break;
            }
            if self.backup == Backup::Protected && self.emitted >= self.logged {
                break; // mode 4: its request is not logged at the backup yet
            }
            if slot.suppressed && self.clients.remove(&slot.conn).is_some() {
                if let Some(k) = out.iter().position(|(c, _)| *c == slot.conn) {
                    let (c, b) = out.remove(k);
                    self.out.push(Action::ToClient(c, b));
                }
                self.out.push(Action::CloseClient(slot.conn));
            }
            if let (Some(d), Some(cl)) = (&slot.decided, self.clients.get_mut(&slot.conn)) {
                cl.pending = cl.pending.saturating_sub(1);
                match out.iter_mut().find(|(c, _)| *c == slot.conn) {
                    Some((_, b)) => b.extend_from_slice(d),
                    None => out.push((slot.conn, d.clone())),
                }
                self.counters.replies += 1;
            }
            self.emitted += 1;
        }
        let touched: Vec<Conn> = out.iter().map(|(c, _)| *c).collect();
        for (c, b) in out {
            self.out.push(Action::ToClient(c, b));
        }
        while self.slot_base < self.emitted {
            let seq = self.slot_base;
            // Kept until every live instance has answered (a quiescing donor's backlog too), so
            // that every reply is compared.
            let all = (0..n).all(|i| !self.is_live(i) || self.links[i].as_ref().is_none_or(|l| l.got > seq));
            if !all {
                break;
            }
            self.slots.pop_front();
            self.slot_base += 1;
        }
        self.trim();
        for c in touched {
            self.maybe_close(c);
        }
    }

    /// Forgets the requests no instance needs any more.
    fn trim(&mut self) {
        let mut need = self.total;
        for i in 0..self.cfg.n {
            let p = match self.states[i] {
                State::Live | State::Joining { .. } => self.links[i].as_ref().map(|l| l.next),
                State::Restoring { .. } => self.hold[i],
                State::Faulty { .. } => None,
            };
            if let Some(p) = p {
                need = need.min(p);
            }
        }
        while self.req_base < need {
            if let Some(r) = self.reqs.pop_front() {
                self.req_bytes -= r.len();
            }
            self.req_base += 1;
        }
    }

    fn maybe_close(&mut self, c: Conn) {
        if self.clients.get(&c).is_some_and(|cl| cl.eof && cl.pending == 0) {
            self.clients.remove(&c);
            self.out.push(Action::CloseClient(c));
        }
    }

    /// Marks `i` faulty (once), stops it, re-decides what waits on it.
    fn fault(&mut self, i: Instance, fault: Fault) {
        let Some(&state) = self.states.get(i) else { return };
        if !matches!(state, State::Live | State::Joining { .. }) {
            return;
        }
        self.counters.faults += 1;
        self.out.push(Action::Report(Report::Fault { instance: i, fault }));
        self.states[i] = State::Faulty { since: self.now, retry_at: self.now };
        if let Some(r) = self.repair.filter(|r| r.target.is_none()) {
            if r.donor == i {
                // The backup's snapshot is taken from another donor.
                self.repair = None;
                self.want_checkpoint = self.want_checkpoint.or(Some(self.now)).filter(|_| self.backup != Backup::Off);
            }
        } else if let Some(r) = self.repair {
            let Some(target) = r.target else { unreachable!("a checkpoint is handled above") };
            if target == i {
                self.repair = None;
                self.out.push(Action::Report(Report::RepairFailed { instance: i, reason: "it failed again while joining".into() }));
                self.states[i] = State::Faulty { since: self.now, retry_at: self.now + self.cfg.repair_backoff };
            } else if r.donor == i {
                // The donor failed: the repair starts again with another donor.
                let t = target;
                self.repair = None;
                if matches!(self.states[t], State::Restoring { .. } | State::Joining { .. }) {
                    self.out.push(Action::Stop(t));
                }
                self.states[t] = State::Faulty { since: self.now, retry_at: self.now };
                self.hold[t] = None;
                if self.links[t].take().is_some() {
                    self.out.push(Action::Disconnect(t));
                }
            }
        }
        if self.links[i].take().is_some() {
            self.out.push(Action::Disconnect(i));
        }
        self.hold[i] = None;
        // Its votes are void (a restored incarnation votes afresh).
        for slot in self.slots.iter_mut() {
            slot.votes[i] = None;
        }
        self.out.push(Action::Stop(i));
        self.check_degraded();
        // What waited on i may be decidable now.
        for seq in self.emitted..self.total {
            self.decide(seq);
        }
        self.emit();
        self.check_quiescent();
    }

    fn check_degraded(&mut self) {
        let degraded = self.live() < self.cfg.n / 2 + 1;
        if degraded && !self.degraded {
            self.out.push(Action::Report(Report::Degraded { live: self.live(), quorum: self.quorum() }));
        }
        self.degraded = degraded;
    }

    fn maybe_start_repair(&mut self) {
        if self.repair.is_some() {
            return;
        }
        let now = self.now;
        let target = (0..self.cfg.n).find(|&i| matches!(self.states[i], State::Faulty { retry_at, .. } if retry_at <= now));
        let checkpoint = self.backup != Backup::Off && self.want_checkpoint.is_some_and(|t| t <= now);
        if target.is_none() && !checkpoint {
            return;
        }
        // A repair's donor is the first live instance; a snapshot for the replica is taken of
        // the last (not the primary, whose reply the N = 2 policy prefers: `lowered_quorum`).
        let donor =
            if target.is_some() { (0..self.cfg.n).find(|&i| self.is_live(i)) } else { (0..self.cfg.n).rev().find(|&i| self.is_live(i)) };
        let Some(donor) = donor else { return };
        if target.is_none() {
            self.want_checkpoint = None;
        }
        self.repair = Some(Repair { target, donor, stage: Stage::Quiescing, since: self.now });
        self.check_quiescent();
    }

    /// A quiescing donor that has answered all it was given, all of it voted, is snapshotted:
    /// an instance restored from it never has to answer anything before its position.
    fn check_quiescent(&mut self) {
        let Some(r) = self.repair else { return };
        if r.stage != Stage::Quiescing {
            return;
        }
        // (A snapshot for the backup needs no reply voted: it is the donor's state after
        // exactly the requests it answered.)
        let quiet =
            self.links[r.donor].as_ref().is_some_and(|l| l.open && l.got == l.next && (r.target.is_none() || self.emitted >= l.next));
        if quiet {
            self.repair = Some(Repair { stage: Stage::Snapshotting, since: self.now, ..r });
            self.out.push(if r.target.is_some() { Action::Snapshot(r.donor) } else { Action::Checkpoint(r.donor) });
        }
    }

    fn snapshot_taken(&mut self, d: Instance) {
        let Some(r) = self.repair.filter(|r| r.donor == d && r.stage == Stage::Snapshotting) else { return };
        let Some(target) = r.target else {
            // Mode 4: the snapshot goes to the backup, then (the first of this session) the
            // requests from its position on; later ones follow as they come.
            let p = self.links[d].as_ref().map_or(self.total, |l| l.next);
            self.repair = None;
            if self.backup != Backup::Off {
                self.out.push(Action::ShipSnapshot { donor: d, position: p });
                if self.log_from.is_none() {
                    let bytes: Vec<u8> = self.reqs.iter().skip((p - self.req_base) as usize).flatten().copied().collect();
                    if self.total > p {
                        self.out.push(Action::Log { from: p, count: self.total - p, bytes });
                    }
                    self.log_from = Some(p);
                }
                self.last_checkpoint = p;
                self.last_checkpoint_at = self.now;
                self.last_donor = d;
                self.local_log = true;
            }
            self.give(d, self.total);
            self.trim();
            return;
        };
        let since = match self.states[target] {
            State::Faulty { since, .. } => since,
            _ => self.now,
        };
        self.states[target] = State::Restoring { since };
        self.repair = Some(Repair { stage: Stage::Restoring, ..r });
        // The snapshot holds the donor's state after the requests it was given.
        self.hold[target] = Some(self.links[d].as_ref().map_or(self.total, |l| l.next));
        self.give(d, self.total);
        self.out.push(Action::Restore { instance: target, donor: d });
    }

    fn restored(&mut self, i: Instance) {
        let Some(r) = self.repair.filter(|r| r.target == Some(i) && r.stage == Stage::Restoring) else { return };
        let since = match self.states[i] {
            State::Restoring { since } => since,
            _ => self.now,
        };
        self.states[i] = State::Joining { since };
        self.repair = Some(Repair { stage: Stage::Joining, ..r });
        let from = self.hold[i].take().unwrap_or(self.total);
        self.links[i] = Some(Link { next: from, got: from, ..Link::default() });
        self.out.push(Action::Connect(i));
        self.give(i, self.total);
        self.trim();
    }

    fn repair_failed(&mut self, reason: String) {
        let Some(r) = self.repair.take() else { return };
        let Some(target) = r.target else {
            // Mode 4: the backup's snapshot, tried again later.
            self.out.push(Action::Report(Report::CheckpointFailed { reason }));
            if self.backup != Backup::Off {
                self.want_checkpoint = Some(self.now + self.cfg.repair_backoff);
            }
            self.give(r.donor, self.total);
            self.trim();
            return;
        };
        self.out.push(Action::Report(Report::RepairFailed { instance: target, reason }));
        let since = match self.states[target] {
            State::Faulty { since, .. } | State::Restoring { since } | State::Joining { since } => since,
            State::Live => self.now,
        };
        self.states[target] = State::Faulty { since, retry_at: self.now + self.cfg.repair_backoff };
        self.hold[target] = None;
        if self.links[target].take().is_some() {
            self.out.push(Action::Disconnect(target));
        }
        self.give(r.donor, self.total);
        self.trim();
        self.out.push(Action::Stop(target));
    }

    fn tick(&mut self) {
        let (now, timeout) = (self.now, self.cfg.hang_timeout);
        let mut hung = Vec::new();
        for (i, l) in self.links.iter().enumerate() {
            let Some(l) = l else { continue };
            if let Some(&t) = l.sent_at.front() {
                if now.saturating_sub(t) > timeout && self.is_voting(i) {
                    let seq = l.got;
                    let conn = self.slots.get(seq.wrapping_sub(self.slot_base) as usize).map_or(0, |s| s.conn);
                    hung.push((i, conn, seq));
                }
            }
        }
        for (i, conn, seq) in hung {
            self.fault(i, Fault::Hung { conn, seq });
        }
        if let Some(r) = self.repair.filter(|r| r.stage == Stage::Snapshotting) {
            let after = now.saturating_sub(r.since);
            if after > self.cfg.snapshot_timeout {
                self.fault(r.donor, Fault::HungInSnapshot { after_ms: after / 1_000_000 });
            }
        }
    }
}

#[cfg(test)]
mod tests;
