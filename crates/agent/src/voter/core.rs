//! The voter as a pure state machine: [`Event`]s in (client bytes, instance bytes, connections,
//! process exits, repair steps, the time), [`Action`]s out (voted replies to the client, input
//! to the instances, connections to open and close, instances to stop, snapshot and restore,
//! and [`Report`]s of faults and repairs). No sockets, no clocks, no threads: the driver
//! ([`super::driver`]) does the I/O and passes the time in, and the tests here drive every
//! interleaving deterministically.
//!
//! The model. A client connection carries a sequence of requests; every request is given to
//! every live instance on that instance's own connection, and every instance answers each with
//! exactly one reply, in order. Reply `r` of the connection is *voted*: once a value has the
//! quorum's votes it is the connection's reply `r`, sent to the client in order. The quorum is a
//! majority of the configured `n` instances (2 of 3; 2 of 2), lowered to the number of live
//! instances when fewer remain (degraded, reported). When no value can reach the quorum any
//! more (2 instances disagreeing, or 3 different answers) the [`Policy`] decides: take the
//! primary's (instance 0) reply, or suppress the reply and close the client's connection (fail
//! silent), and report.
//!
//! Faults: an instance whose process ends or whose connection breaks has *crashed*; one that
//! leaves a request it was given unanswered for `hang_timeout` has *hung*; one whose reply
//! differs from the voted one is *outvoted*; one whose bytes are no valid reply broke the
//! *protocol*. A faulty instance is stopped and repaired: a live *donor* gets no new input
//! until it has answered everything it was given (quiescent), is snapshotted, gets its backlog
//! and serves on; the faulty instance is restored from the snapshot, connected again, and given
//! every request after the donor's position at the snapshot, which the voter keeps until then.
//! One repair runs at a time.

use super::resp;
use std::collections::VecDeque;

/// An instance's index, 0..n (0 is the primary).
pub type Instance = usize;
/// A client connection's identifier (chosen by the driver, never reused).
pub type Conn = u64;
/// Monotonic time in nanoseconds.
pub type Nanos = u64;

/// Most replies of one connection not yet sent or not yet answered by every instance.
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
    /// Most bytes of requests kept per connection (not yet answered by every instance, or kept
    /// for an instance under repair); a client beyond it is disconnected.
    pub max_backlog: usize,
    /// Time between a failed repair and the next attempt.
    pub repair_backoff: Nanos,
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
        }
    }
}

/// Why an instance is faulty.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Fault {
    /// Its process ended or its connection broke.
    Crashed { reason: String },
    /// It left reply `seq` of connection `conn` unanswered for the hang timeout.
    Hung { conn: Conn, seq: u64 },
    /// Its reply `seq` of connection `conn` differed from the voted one.
    Outvoted { conn: Conn, seq: u64 },
    /// It sent bytes that are no valid reply (or a reply to no request).
    Protocol { reason: String },
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Crashed { reason } => write!(f, "crashed ({reason})"),
            Fault::Hung { conn, seq } => write!(f, "hung (no reply {seq} on connection {conn})"),
            Fault::Outvoted { conn, seq } => write!(f, "outvoted (reply {seq} on connection {conn})"),
            Fault::Protocol { reason } => write!(f, "protocol error ({reason})"),
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
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    ClientOpened(Conn),
    ClientBytes(Conn, Vec<u8>),
    /// The client will send nothing more (half close): replies still go out, then it closes.
    ClientEof(Conn),
    ClientClosed(Conn),
    /// The driver's connection to the instance for the client connection is open.
    InstanceConnected(Instance, Conn),
    InstanceBytes(Instance, Conn, Vec<u8>),
    /// The instance's connection could not be opened, ended or failed.
    InstanceLost(Instance, Conn, String),
    /// The instance's process ended.
    InstanceExited(Instance, String),
    /// The donor's snapshot (asked by [`Action::Snapshot`]) is written and the donor runs again.
    SnapshotTaken(Instance),
    SnapshotFailed(Instance, String),
    /// The instance runs again from the donor's snapshot ([`Action::Restore`]).
    Restored(Instance),
    RestoreFailed(Instance, String),
    /// Time passed (the driver ticks a few times per hang timeout).
    Tick,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    ToClient(Conn, Vec<u8>),
    CloseClient(Conn),
    /// Open the instance's connection for this client connection; answer with
    /// [`Event::InstanceConnected`] or [`Event::InstanceLost`].
    Connect(Instance, Conn),
    ToInstance(Instance, Conn, Vec<u8>),
    Disconnect(Instance, Conn),
    /// Stop the instance's process (it is faulty).
    Stop(Instance),
    /// Snapshot the donor (pause, write, resume); answer with [`Event::SnapshotTaken`].
    Snapshot(Instance),
    /// Restore `instance` from `donor`'s snapshot; answer with [`Event::Restored`].
    Restore {
        instance: Instance,
        donor: Instance,
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
    /// Restored; its connections are opening.
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

#[derive(Debug, Clone, Copy)]
struct Repair {
    target: Instance,
    donor: Instance,
    stage: Stage,
}

/// One instance's side of one client connection.
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
}

#[derive(Debug)]
struct Slot {
    votes: Vec<Option<Vec<u8>>>,
    decided: Option<Vec<u8>>,
}

#[derive(Debug)]
struct ConnState {
    inbuf: Vec<u8>,
    /// Requests from `req_base` on.
    reqs: VecDeque<Vec<u8>>,
    req_base: u64,
    req_bytes: usize,
    /// Requests so far (with a reply).
    total: u64,
    /// Replies from `slot_base` on.
    slots: VecDeque<Slot>,
    slot_base: u64,
    /// Next reply to send to the client.
    emitted: u64,
    links: Vec<Option<Link>>,
    /// Where an instance under repair starts (the donor's position at the snapshot).
    hold: Vec<Option<u64>>,
    eof: bool,
    /// The client is gone; the connection stays until every instance has been given and has
    /// answered its requests (an instance under repair catches up on them, so that its state
    /// is the others').
    gone: bool,
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
    conns: std::collections::BTreeMap<Conn, ConnState>,
    repair: Option<Repair>,
    degraded: bool,
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
            cfg,
            conns: Default::default(),
            repair: None,
            degraded: false,
            now: 0,
            out: Vec::new(),
            counters: Counters::default(),
        })
    }

    /// Whether the instance serves (takes part in votes).
    pub fn is_live(&self, i: Instance) -> bool {
        matches!(self.states.get(i), Some(State::Live))
    }

    /// Instances that are live.
    pub fn live(&self) -> usize {
        self.states.iter().filter(|s| matches!(s, State::Live)).count()
    }

    /// Whether a repair is under way.
    pub fn repairing(&self) -> Option<Instance> {
        self.repair.map(|r| r.target)
    }

    /// Open client connections.
    pub fn connections(&self) -> usize {
        self.conns.values().filter(|cs| !cs.gone).count()
    }

    /// The votes needed for a reply now.
    pub fn quorum(&self) -> usize {
        (self.cfg.n / 2 + 1).min(self.live()).max(1)
    }

    /// Takes one event at time `now`; returns what to do, in order.
    pub fn handle(&mut self, now: Nanos, ev: Event) -> Vec<Action> {
        self.now = self.now.max(now);
        match ev {
            Event::ClientOpened(c) => self.client_opened(c),
            Event::ClientBytes(c, b) => self.client_bytes(c, b),
            Event::ClientEof(c) => {
                if let Some(cs) = self.conns.get_mut(&c) {
                    cs.eof = true;
                }
                self.maybe_close(c);
            }
            Event::ClientClosed(c) => self.drop_conn(c),
            Event::InstanceConnected(i, c) => self.instance_connected(i, c),
            Event::InstanceBytes(i, c, b) => self.instance_bytes(i, c, b),
            Event::InstanceLost(i, c, why) => {
                let has = self.conns.get(&c).is_some_and(|cs| cs.links.get(i).is_some_and(Option::is_some));
                if has {
                    self.fault(i, Fault::Crashed { reason: format!("connection {c}: {why}") });
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
            Event::RestoreFailed(i, why) => {
                if matches!(self.repair, Some(r) if r.target == i && r.stage == Stage::Restoring) {
                    self.repair_failed(format!("restore: {why}"));
                }
            }
            Event::Tick => self.tick(),
        }
        self.maybe_start_repair();
        let gone: Vec<Conn> = self.conns.iter().filter(|(_, cs)| cs.gone).map(|(c, _)| *c).collect();
        for c in gone {
            self.reap(c);
        }
        std::mem::take(&mut self.out)
    }

    /// Checks the invariants the state machine keeps (tests).
    #[cfg(test)]
    fn check(&self) -> Result<(), String> {
        let q = self.quorum();
        for (c, cs) in &self.conns {
            if cs.slot_base + cs.slots.len() as u64 != cs.total || cs.emitted < cs.slot_base {
                return Err(format!("connection {c}: slots out of step: {}", self.debug_conn(*c)));
            }
            for (k, slot) in cs.slots.iter().enumerate() {
                if slot.decided.is_some() {
                    continue;
                }
                for i in 0..self.cfg.n {
                    let Some(v) = slot.votes[i].as_ref().filter(|_| self.is_voting(i)) else { continue };
                    let count = (0..self.cfg.n).filter(|&j| self.is_voting(j) && slot.votes[j].as_ref() == Some(v)).count();
                    if count >= q {
                        return Err(format!(
                            "connection {c}: reply {} has a quorum and is undecided: {}",
                            cs.slot_base + k as u64,
                            self.debug_conn(*c)
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    #[cfg(test)]
    fn debug_conn(&self, c: Conn) -> String {
        let Some(cs) = self.conns.get(&c) else { return "no connection".into() };
        let slot = cs.slots.get((cs.emitted - cs.slot_base) as usize).map(|s| format!("{:?}", s));
        let links: Vec<_> = cs.links.iter().map(|l| l.as_ref().map(|l| (l.open, l.next, l.got, l.queued, l.rbuf.len()))).collect();
        format!(
            "emitted {} slot_base {} total {} req_base {} slot {slot:?} links {links:?} states {:?} repair {:?}",
            cs.emitted, cs.slot_base, cs.total, cs.req_base, self.states, self.repair
        )
    }

    fn client_opened(&mut self, c: Conn) {
        let n = self.cfg.n;
        let mut cs = ConnState {
            inbuf: Vec::new(),
            reqs: VecDeque::new(),
            req_base: 0,
            req_bytes: 0,
            total: 0,
            slots: VecDeque::new(),
            slot_base: 0,
            emitted: 0,
            links: (0..n).map(|_| None).collect(),
            hold: vec![None; n],
            eof: false,
            gone: false,
        };
        for i in 0..n {
            match self.states[i] {
                State::Live | State::Joining { .. } => {
                    cs.links[i] = Some(Link::default());
                    self.out.push(Action::Connect(i, c));
                }
                State::Restoring { .. } => cs.hold[i] = Some(0),
                State::Faulty { .. } => {}
            }
        }
        self.conns.insert(c, cs);
    }

    fn client_error(&mut self, c: Conn, reason: &str) {
        self.out.push(Action::Report(Report::ClientError { conn: c, reason: reason.to_string() }));
        if let Some(cs) = self.conns.get_mut(&c) {
            cs.inbuf.clear();
            cs.eof = true;
        }
        // The replies to the requests before it still go out; then the connection closes.
        self.maybe_close(c);
    }

    fn client_bytes(&mut self, c: Conn, b: Vec<u8>) {
        let (framing, max) = (self.cfg.framing, self.cfg.max_message);
        let Some(cs) = self.conns.get_mut(&c) else { return };
        if cs.eof {
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
                cs.inbuf.extend_from_slice(&b);
                loop {
                    match resp::request(&cs.inbuf, max) {
                        Ok(Some(r)) => {
                            let req: Vec<u8> = cs.inbuf.drain(..r.len).collect();
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
        for r in reqs {
            let too_much = self
                .conns
                .get(&c)
                .is_some_and(|cs| cs.req_bytes + r.len() > self.cfg.max_backlog || cs.total - cs.slot_base >= MAX_OUTSTANDING);
            if too_much {
                err = Some("too many requests outstanding");
                break;
            }
            self.push_request(c, r);
        }
        if pushed {
            // One write per instance for all the requests of this read.
            let quiescing = self.quiescing_donor();
            let total = self.conns.get(&c).map_or(0, |cs| cs.total);
            for i in 0..self.cfg.n {
                if Some(i) != quiescing && matches!(self.states[i], State::Live | State::Joining { .. }) {
                    self.give(i, c, total);
                }
            }
            self.trim(c);
        }
        if let Some(e) = err {
            self.client_error(c, e);
        }
    }

    fn push_request(&mut self, c: Conn, req: Vec<u8>) {
        let n = self.cfg.n;
        let Some(cs) = self.conns.get_mut(&c) else { return };
        cs.total += 1;
        cs.req_bytes += req.len();
        cs.reqs.push_back(req);
        cs.slots.push_back(Slot { votes: vec![None; n], decided: None });
        self.counters.requests += 1;
    }

    fn quiescing_donor(&self) -> Option<Instance> {
        match self.repair {
            Some(r) if matches!(r.stage, Stage::Quiescing | Stage::Snapshotting) => Some(r.donor),
            _ => None,
        }
    }

    /// Gives instance `i` the connection's requests up to (not including) `upto`.
    fn give(&mut self, i: Instance, c: Conn, upto: u64) {
        let now = self.now;
        let Some(cs) = self.conns.get_mut(&c) else { return };
        let Some(link) = cs.links[i].as_mut() else { return };
        let mut bytes = Vec::new();
        let mut count = 0;
        #[cfg(test)]
        if link.next < cs.req_base {
            panic!("instance {i} connection {c}: request {} forgotten (base {}), states {:?} repair {:?} hold {:?} gone {}", link.next, cs.req_base, self.states, self.repair, cs.hold, cs.gone);
        }
        while link.next < upto {
            let Some(r) = cs.reqs.get((link.next - cs.req_base) as usize) else { break };
            bytes.extend_from_slice(r);
            link.next += 1;
            count += 1;
        }
        if count == 0 {
            return;
        }
        if link.open {
            link.sent_at.extend(std::iter::repeat(now).take(count as usize));
            self.out.push(Action::ToInstance(i, c, bytes));
        } else {
            link.queue.extend_from_slice(&bytes);
            link.queued += count;
        }
    }

    fn instance_connected(&mut self, i: Instance, c: Conn) {
        let now = self.now;
        let Some(cs) = self.conns.get_mut(&c) else {
            self.out.push(Action::Disconnect(i, c));
            return;
        };
        let Some(link) = cs.links.get_mut(i).and_then(Option::as_mut) else {
            self.out.push(Action::Disconnect(i, c));
            return;
        };
        link.open = true;
        if !link.queue.is_empty() {
            link.sent_at.extend(std::iter::repeat(now).take(link.queued as usize));
            link.queued = 0;
            self.out.push(Action::ToInstance(i, c, std::mem::take(&mut link.queue)));
        }
        self.maybe_joined(i);
    }

    fn maybe_joined(&mut self, i: Instance) {
        let State::Joining { since } = self.states[i] else { return };
        let all_open = self.conns.values().all(|cs| cs.links[i].as_ref().is_none_or(|l| l.open));
        if !all_open {
            return;
        }
        self.states[i] = State::Live;
        let donor = self.repair.map(|r| r.donor).unwrap_or(0);
        self.repair = None;
        self.counters.repairs += 1;
        self.out.push(Action::Report(Report::Repaired { instance: i, donor, took: self.now.saturating_sub(since) }));
        self.check_degraded();
    }

    fn instance_bytes(&mut self, i: Instance, c: Conn, b: Vec<u8>) {
        if !matches!(self.states.get(i), Some(State::Live | State::Joining { .. })) {
            return;
        }
        let (framing, max) = (self.cfg.framing, self.cfg.max_message);
        let Some(cs) = self.conns.get_mut(&c) else { return };
        let Some(link) = cs.links[i].as_mut() else { return };
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
            let Some(link) = self.conns.get_mut(&c).and_then(|cs| cs.links[i].as_mut()) else { return };
            if link.got >= link.next - link.queued {
                self.fault(i, Fault::Protocol { reason: format!("a reply on connection {c} to no request") });
                return;
            }
            let seq = link.got;
            link.got += 1;
            link.sent_at.pop_front();
            self.vote(i, c, seq, f);
            if !self.is_voting(i) {
                return;
            }
        }
        if let Some(reason) = bad {
            self.fault(i, Fault::Protocol { reason });
            return;
        }
        self.emit(c);
        self.check_quiescent();
    }

    fn is_voting(&self, i: Instance) -> bool {
        matches!(self.states[i], State::Live | State::Joining { .. })
    }

    fn vote(&mut self, i: Instance, c: Conn, seq: u64, value: Vec<u8>) {
        let Some(cs) = self.conns.get_mut(&c) else { return };
        if seq < cs.slot_base {
            return; // decided and every live instance had answered: nothing to compare
        }
        let Some(slot) = cs.slots.get_mut((seq - cs.slot_base) as usize) else { return };
        match &slot.decided {
            Some(d) if *d != value => {
                self.fault(i, Fault::Outvoted { conn: c, seq });
            }
            Some(_) => slot.votes[i] = Some(value),
            None => {
                slot.votes[i] = Some(value);
                self.decide(c, seq);
            }
        }
    }

    /// Decides reply `seq` of connection `c` if it can be decided now.
    fn decide(&mut self, c: Conn, seq: u64) {
        let quorum = self.quorum();
        let (n, policy) = (self.cfg.n, self.cfg.policy);
        let voting: Vec<bool> = (0..n).map(|i| self.is_voting(i)).collect();
        let live: Vec<bool> = (0..n).map(|i| self.is_live(i)).collect();
        let Some(cs) = self.conns.get_mut(&c) else { return };
        if seq < cs.slot_base {
            return;
        }
        let Some(slot) = cs.slots.get_mut((seq - cs.slot_base) as usize) else { return };
        if slot.decided.is_some() {
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
        // Live instances that will still answer it (a quiescing donor is given the request
        // after its snapshot; an instance restored after it never answers it).
        let pending = (0..n).filter(|&i| live[i] && slot.votes[i].is_none() && cs.links[i].as_ref().is_some_and(|l| l.got <= seq)).count();
        let all_agree = (0..n).all(|i| !voting[i] || slot.votes[i].is_none() || slot.votes[i] == slot.votes[who]);
        let chosen = if count >= quorum {
            Some(who)
        } else if count + pending >= quorum {
            return; // wait for more votes
        } else if all_agree {
            // Every instance that can answer it did, and all agree (the others failed before
            // answering): the best there is.
            Some(who)
        } else {
            // No majority can form any more.
            self.counters.disagreements += 1;
            let primary = (policy == Policy::PreferPrimary && slot.votes[0].is_some() && voting[0]).then_some(0);
            self.out.push(Action::Report(Report::Disagreement { conn: c, seq, chosen: primary }));
            if primary.is_none() {
                if cs.gone {
                    // Nobody to suppress it from: the instances' states differ and stay so.
                    slot.decided = slot.votes[who].clone();
                    return;
                }
                self.drop_conn_with_close(c);
                return;
            }
            primary
        };
        let Some(w) = chosen else { return };
        let value = slot.votes[w].clone();
        let losers: Vec<Instance> = (0..n).filter(|&i| voting[i] && slot.votes[i].is_some() && slot.votes[i] != value).collect();
        slot.decided = value;
        for i in losers {
            self.fault(i, Fault::Outvoted { conn: c, seq });
        }
        self.emit(c);
    }

    /// Sends the decided replies in order, forgets what every live instance has answered.
    fn emit(&mut self, c: Conn) {
        let n = self.cfg.n;
        let live: Vec<bool> = (0..n).map(|i| self.is_live(i)).collect();
        let Some(cs) = self.conns.get_mut(&c) else { return };
        let mut bytes = Vec::new();
        while let Some(slot) = cs.slots.get((cs.emitted - cs.slot_base) as usize) {
            let Some(d) = &slot.decided else { break };
            bytes.extend_from_slice(d);
            cs.emitted += 1;
            self.counters.replies += 1;
        }
        if !bytes.is_empty() && !cs.gone {
            self.out.push(Action::ToClient(c, bytes));
        }
        while cs.slot_base < cs.emitted {
            let seq = cs.slot_base;
            // Kept until every live instance has answered (a quiescing donor's backlog too), so
            // that every reply is compared.
            let all = (0..n).all(|i| !live[i] || cs.links[i].as_ref().is_none_or(|l| l.got > seq));
            if !all {
                break;
            }
            cs.slots.pop_front();
            cs.slot_base += 1;
        }
        self.trim(c);
        self.maybe_close(c);
        self.reap(c);
    }

    /// Forgets the requests no instance needs any more.
    fn trim(&mut self, c: Conn) {
        let n = self.cfg.n;
        let states = self.states.clone();
        let Some(cs) = self.conns.get_mut(&c) else { return };
        let mut need = cs.total;
        for i in 0..n {
            let p = match states[i] {
                State::Live | State::Joining { .. } => cs.links[i].as_ref().map(|l| l.next),
                State::Restoring { .. } => cs.hold[i],
                State::Faulty { .. } => None,
            };
            if let Some(p) = p {
                need = need.min(p);
            }
        }
        while cs.req_base < need {
            if let Some(r) = cs.reqs.pop_front() {
                cs.req_bytes -= r.len();
            }
            cs.req_base += 1;
        }
    }

    fn maybe_close(&mut self, c: Conn) {
        let Some(cs) = self.conns.get(&c) else { return };
        if cs.eof && !cs.gone && cs.emitted == cs.total {
            self.drop_conn_with_close(c);
        }
    }

    fn drop_conn_with_close(&mut self, c: Conn) {
        if self.conns.get(&c).is_some_and(|cs| !cs.gone) {
            self.out.push(Action::CloseClient(c));
            self.drop_conn(c);
        }
    }

    fn drop_conn(&mut self, c: Conn) {
        let Some(cs) = self.conns.get_mut(&c) else { return };
        cs.gone = true;
        cs.eof = true;
        cs.inbuf.clear();
        self.reap(c);
    }

    /// Forgets a connection whose client is gone once no instance needs it any more; closes
    /// each instance's side as soon as that instance has answered everything.
    fn reap(&mut self, c: Conn) {
        let states = self.states.clone();
        let Some(cs) = self.conns.get_mut(&c) else { return };
        if !cs.gone {
            return;
        }
        let total = cs.total;
        let mut all = true;
        for (i, state) in states.iter().enumerate() {
            let done = match state {
                State::Live | State::Joining { .. } => cs.links[i].as_ref().is_none_or(|l| l.next == total && l.got == total && l.open),
                State::Restoring { .. } => cs.hold[i].is_none(),
                State::Faulty { .. } => true,
            };
            if done {
                if cs.links[i].take().is_some() {
                    self.out.push(Action::Disconnect(i, c));
                }
            } else {
                all = false;
            }
        }
        if !all {
            return;
        }
        self.conns.remove(&c);
        self.check_quiescent();
        if let Some(r) = self.repair {
            if r.stage == Stage::Joining {
                self.maybe_joined(r.target);
            }
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
        if let Some(r) = self.repair {
            if r.target == i {
                self.repair = None;
                self.out.push(Action::Report(Report::RepairFailed { instance: i, reason: "it failed again while joining".into() }));
                self.states[i] = State::Faulty { since: self.now, retry_at: self.now + self.cfg.repair_backoff };
            } else if r.donor == i {
                // The donor failed: the repair starts again with another donor.
                let t = r.target;
                self.repair = None;
                self.states[t] = State::Faulty { since: self.now, retry_at: self.now };
                for cs in self.conns.values_mut() {
                    cs.hold[t] = None;
                }
            }
        }
        let conns: Vec<Conn> = self.conns.keys().copied().collect();
        for &c in &conns {
            if let Some(cs) = self.conns.get_mut(&c) {
                if cs.links[i].take().is_some() {
                    self.out.push(Action::Disconnect(i, c));
                }
                cs.hold[i] = None;
                // Its votes are void (a restored incarnation votes afresh).
                for slot in cs.slots.iter_mut() {
                    slot.votes[i] = None;
                }
            }
        }
        self.out.push(Action::Stop(i));
        self.check_degraded();
        // What waited on i may be decidable now.
        for &c in &conns {
            let undecided: Vec<u64> = match self.conns.get(&c) {
                Some(cs) => (cs.emitted..cs.total).collect(),
                None => continue,
            };
            for seq in undecided {
                self.decide(c, seq);
            }
            self.emit(c);
        }
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
        let Some(target) = (0..self.cfg.n).find(|&i| matches!(self.states[i], State::Faulty { retry_at, .. } if retry_at <= now)) else {
            return;
        };
        let Some(donor) = (0..self.cfg.n).find(|&i| self.is_live(i)) else { return };
        self.repair = Some(Repair { target, donor, stage: Stage::Quiescing });
        self.check_quiescent();
    }

    /// A quiescing donor that has answered all it was given is snapshotted.
    fn check_quiescent(&mut self) {
        let Some(r) = self.repair else { return };
        if r.stage != Stage::Quiescing {
            return;
        }
        // The donor has answered all it was given, and every one of those replies is voted:
        // an instance restored from it never has to answer anything before its position.
        let quiet = self.conns.values().all(|cs| cs.links[r.donor].as_ref().is_none_or(|l| l.got == l.next && cs.emitted >= l.next));
        if quiet {
            self.repair = Some(Repair { stage: Stage::Snapshotting, ..r });
            self.out.push(Action::Snapshot(r.donor));
        }
    }

    fn snapshot_taken(&mut self, d: Instance) {
        let Some(r) = self.repair.filter(|r| r.donor == d && r.stage == Stage::Snapshotting) else { return };
        let since = match self.states[r.target] {
            State::Faulty { since, .. } => since,
            _ => self.now,
        };
        self.states[r.target] = State::Restoring { since };
        self.repair = Some(Repair { stage: Stage::Restoring, ..r });
        let conns: Vec<Conn> = self.conns.keys().copied().collect();
        for c in conns {
            let Some(cs) = self.conns.get_mut(&c) else { continue };
            // The snapshot holds the donor's state after the requests it was given. A live
            // donor has a link on every connection but those of gone clients it has answered
            // completely.
            cs.hold[r.target] = Some(cs.links[d].as_ref().map_or(cs.total, |l| l.next));
            let total = cs.total;
            self.give(d, c, total);
        }
        self.out.push(Action::Restore { instance: r.target, donor: d });
    }

    fn restored(&mut self, i: Instance) {
        let Some(r) = self.repair.filter(|r| r.target == i && r.stage == Stage::Restoring) else { return };
        let since = match self.states[i] {
            State::Restoring { since } => since,
            _ => self.now,
        };
        self.states[i] = State::Joining { since };
        self.repair = Some(Repair { stage: Stage::Joining, ..r });
        let conns: Vec<Conn> = self.conns.keys().copied().collect();
        for c in conns {
            let Some(cs) = self.conns.get_mut(&c) else { continue };
            let from = cs.hold[i].take().unwrap_or(cs.total);
            cs.links[i] = Some(Link { next: from, got: from, ..Link::default() });
            let total = cs.total;
            self.out.push(Action::Connect(i, c));
            self.give(i, c, total);
            self.trim(c);
        }
        self.maybe_joined(i);
    }

    fn repair_failed(&mut self, reason: String) {
        let Some(r) = self.repair.take() else { return };
        self.out.push(Action::Report(Report::RepairFailed { instance: r.target, reason }));
        let since = match self.states[r.target] {
            State::Faulty { since, .. } | State::Restoring { since } | State::Joining { since } => since,
            State::Live => self.now,
        };
        self.states[r.target] = State::Faulty { since, retry_at: self.now + self.cfg.repair_backoff };
        let conns: Vec<Conn> = self.conns.keys().copied().collect();
        for c in conns {
            if let Some(cs) = self.conns.get_mut(&c) {
                cs.hold[r.target] = None;
                let total = cs.total;
                self.give(r.donor, c, total);
                self.trim(c);
            }
        }
        self.out.push(Action::Stop(r.target));
    }

    fn tick(&mut self) {
        let (now, timeout) = (self.now, self.cfg.hang_timeout);
        let mut hung = Vec::new();
        for (&c, cs) in &self.conns {
            for (i, l) in cs.links.iter().enumerate() {
                let Some(l) = l else { continue };
                if let Some(&t) = l.sent_at.front() {
                    if now.saturating_sub(t) > timeout && self.is_voting(i) {
                        hung.push((i, c, l.got));
                    }
                }
            }
        }
        for (i, c, seq) in hung {
            self.fault(i, Fault::Hung { conn: c, seq });
        }
    }
}

#[cfg(test)]
mod tests;
