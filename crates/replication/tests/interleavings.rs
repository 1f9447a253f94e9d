//! The protocol state machines in a deterministic simulated world: a primary with a model VM
//! (memory of a few pages, network output held by epoch), a backup with its replica, the
//! arbiter's lease table, and a network that delays, loses and reorders messages. Crashes of
//! either side and restarts of the arbiter (which keeps only its durable state) are injected
//! at every step of a run, and random faults over many seeds; copies are paused and continued
//! (SIGSTOP, a frozen host) at chosen moments.
//!
//! Checked at every step:
//! - no split brain: whoever releases output holds the newest generation of the lease, live in
//!   real time (not by the arbiter's possibly restarted clock) at that moment;
//! - no acknowledged output lost: at a takeover, the replica's state is at least the state
//!   behind every output any client has seen;
//! - the backup applies only whole checkpoints, in order: after each commit its memory equals
//!   the primary's memory at that checkpoint, byte for byte — with the model VM's dirty pages
//!   found by the VMM's own tracker (`vmm::tracking::DirtyTracker`) over a model dirty log
//!   (with manual protection, as KVM here), its mode switched at random among the dirty log,
//!   comparing against the last checkpoint and the hybrid of both, some writes made by the "VMM" (unseen by the log) and some returning a page to
//!   an earlier content, and half the pages sent as XOR deltas against the sender's copy of
//!   the backup's replica (`replication::delta`), rebuilt by the backup against its replica
//!   after checking the base (a delta whose base is not the replica's is refused, never
//!   applied);
//! - and, without faults, output flows and a crashed primary is replaced within the timeout
//!   plus the lease.

use replication::backup::{self, Backup};
use replication::delta::{self, BackupCopy};
use replication::lease::{Answer, Request, Table};
use replication::policy;
use replication::primary::{self, Primary};
use replication::stored::{self, Observer, Record};
use replication::wire::{Msg, PAGE};
use replication::Timing;
use std::collections::{BTreeMap, HashSet};
use vmm::tracking::{DirtyLog, DirtyTracker, TrackingMode};

const MS: u64 = 1_000_000;
const CELLS: usize = 8;
const DISK: usize = 4;

#[derive(Clone, Copy, Debug)]
struct Faults {
    max_delay_ms: u64,
    loss: f64,
    reorder: bool,
    crash_primary_at: Option<u64>,
    crash_backup_at: Option<u64>,
    /// A fresh backup comes up this long after the backup crashed.
    new_backup_after_ms: Option<u64>,
    /// Cut the link between the hosts (both directions, not the arbiter) for this window.
    cut: Option<(u64, u64)>,
    /// Isolate the first primary's host (from the backup and the arbiter) for this window.
    isolate: Option<(u64, u64)>,
    apply_failure: f64,
    /// The arbiter is down in this window and restarts from its durable state at its end.
    arbiter_down: Option<(u64, u64)>,
    /// Pause these copies (by name) in these windows (ms).
    pauses: &'static [(&'static str, u64, u64)],
    /// Largest delay of a lease request, and of its answer (ms).
    arbiter_delay_ms: u64,
    /// Probability that the arbiter's answer is lost after it handled the request (the
    /// client's read times out while the arbiter's state has moved on).
    answer_loss: f64,
    /// Ask the first primary to hand the VM over to its backup from this time on (ms), every
    /// millisecond until it starts (a planned handover: live migration's last step).
    handover_at: Option<u64>,
}

impl Faults {
    fn none() -> Faults {
        Faults {
            max_delay_ms: 1,
            loss: 0.0,
            reorder: false,
            crash_primary_at: None,
            crash_backup_at: None,
            new_backup_after_ms: None,
            cut: None,
            isolate: None,
            apply_failure: 0.0,
            arbiter_down: None,
            pauses: &[],
            arbiter_delay_ms: 2,
            answer_loss: 0.0,
            handover_at: None,
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() % 1_000_000) as f64 / 1e6 < p
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// The model VM's dirty log: the cells the guest wrote while logging is on.
#[derive(Clone, Debug, Default)]
struct ModelLog {
    on: bool,
    bits: u64,
}

/// With manual protection, as this project's KVM has: a collection leaves the bits set (the
/// pages writable) until they are cleared.
impl DirtyLog for ModelLog {
    fn get(&mut self) -> Result<Vec<u64>, String> {
        if !self.on {
            return Err("the model's dirty log is off".into());
        }
        Ok(vec![self.bits])
    }
    fn manual(&self) -> bool {
        true
    }
    fn clear(&mut self, bits: &[u64]) -> Result<(), String> {
        self.bits &= !bits.first().copied().unwrap_or(0);
        Ok(())
    }
    fn set_enabled(&mut self, on: bool) -> Result<(), String> {
        self.on = on;
        self.bits = 0;
        Ok(())
    }
}

/// The model VM: memory cells (one per page), output held by epoch.
struct ModelVm {
    mem: [u64; CELLS],
    /// The cells as guest memory (each page holds its cell's value in its first 8 bytes), for
    /// the tracker's comparisons.
    bytes: Vec<u8>,
    /// Each cell's value before its last write (a write may put it back).
    prev: [u64; CELLS],
    log: ModelLog,
    /// Cells the "VMM" wrote (as received frames are), which the dirty log does not see.
    vmm_written: u64,
    /// The VMM's tracker while protected.
    tracker: Option<DirtyTracker>,
    /// Epochs closed in compare mode, and switches of mode.
    compare_epochs: u64,
    switches: u64,
    hybrid_epochs: u64,
    hot_max: u64,
    disk: [u64; DISK],
    state: u64,
    dirty: HashSet<usize>,
    holding: bool,
    /// Dirty pages and disk writes tracked (protected).
    tracking: bool,
    open: Vec<u64>,
    sealed: Vec<(u64, Vec<u64>)>,
    epoch: u64,
}

impl ModelVm {
    fn new(mem: [u64; CELLS], disk: [u64; DISK], state: u64) -> ModelVm {
        let mut bytes = vec![0u8; CELLS * PAGE];
        for (c, v) in mem.iter().enumerate() {
            bytes[c * PAGE..c * PAGE + 8].copy_from_slice(&v.to_le_bytes());
        }
        ModelVm {
            mem,
            bytes,
            prev: mem,
            log: ModelLog::default(),
            vmm_written: 0,
            tracker: None,
            compare_epochs: 0,
            switches: 0,
            hybrid_epochs: 0,
            hot_max: 0,
            disk,
            state,
            dirty: HashSet::new(),
            holding: false,
            tracking: false,
            open: vec![],
            sealed: vec![],
            epoch: 0,
        }
    }

    /// Starts tracking from a clean slate (protection: the dirty log on, a new tracker).
    fn start_tracking(&mut self) {
        self.tracking = true;
        self.dirty.clear();
        self.vmm_written = 0;
        self.log.set_enabled(true).expect("model log");
        let mut t = DirtyTracker::new(CELLS as u64, None);
        t.set_warm_pages(2, CELLS as u64);
        self.tracker = Some(t);
    }

    fn stop_tracking(&mut self) {
        self.tracking = false;
        self.tracker = None;
        self.log.on = false;
    }

    /// The dirty cells of the epoch a checkpoint closes, found by the tracker, which then
    /// tracks the next epoch in mode `next`.
    fn checkpoint_dirty(&mut self, next: TrackingMode, hot_limit: u64) -> Vec<usize> {
        let truth: Vec<usize> = self.dirty.drain().collect();
        let Some(t) = self.tracker.as_mut() else { return truth };
        t.set_hot_limit(hot_limit);
        let vmm = [std::mem::take(&mut self.vmm_written)];
        let closed = t.close_epoch(&self.bytes, &vmm, &mut self.log, |_| next).expect("tracker");
        self.compare_epochs += (closed.mode == Some(TrackingMode::Compare)) as u64;
        self.hybrid_epochs += (closed.mode == Some(TrackingMode::Hybrid)) as u64;
        self.hot_max = self.hot_max.max(t.hot_pages());
        self.switches += (closed.mode != closed.next) as u64;
        closed.pages.iter().map(|&p| p as usize).collect()
    }

    fn write_cell(&mut self, cell: usize, v: u64, by_vmm: bool) {
        self.prev[cell] = self.mem[cell];
        self.mem[cell] = v;
        self.bytes[cell * PAGE..cell * PAGE + 8].copy_from_slice(&v.to_le_bytes());
        if by_vmm {
            self.vmm_written |= 1 << cell;
        } else if self.log.on {
            self.log.bits |= 1 << cell;
        }
    }
    /// One step of guest work: a memory write, maybe a disk write (returned as its block),
    /// maybe network output (returned as the state it shows).
    fn work(&mut self, rng: &mut Rng) -> (Option<usize>, Option<u64>) {
        self.state += 1;
        let cell = (self.state as usize * 7) % CELLS;
        // Mostly a new value; sometimes the value before (a page back to an earlier content);
        // sometimes written by the VMM.
        let v = if rng.chance(0.15) { self.prev[cell] } else { self.state };
        self.write_cell(cell, v, rng.chance(0.1));
        self.dirty.insert(cell);
        let disk = rng.chance(0.1).then(|| {
            let b = self.state as usize % DISK;
            self.disk[b] = self.state;
            b
        });
        (disk, rng.chance(0.3).then_some(self.state))
    }
}

fn page(v: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    p[..8].copy_from_slice(&v.to_le_bytes());
    p
}
fn cell_of(data: &[u8]) -> u64 {
    u64::from_le_bytes(data[..8].try_into().expect("8 bytes"))
}

type Snap = ([u64; CELLS], [u64; DISK], u64);

struct PrimaryNode {
    name: String,
    sm: Primary,
    vm: ModelVm,
    /// Memory, disk and state at each checkpoint, for checking the replica.
    at_checkpoint: BTreeMap<u64, Snap>,
    /// Disk writes sent per epoch on the current connection.
    disk_sent: BTreeMap<u64, u64>,
    /// The sender: mirrored disk writes and checkpoint frames waiting to go out (as in the
    /// real driver, writes made after a checkpoint may overtake its frames).
    mirror: Vec<Msg>,
    outq: Vec<Msg>,
    /// Sync cells still to send (cell index, at time).
    sync_queue: Vec<usize>,
    sync_session: Option<u64>,
    /// The sender's copy of the backup's replica for the current session (made at its
    /// synchronisation): the base of XOR deltas.
    sent: Option<BackupCopy>,
    fenced: bool,
    /// Paused for good by a handover (until resumed if it fails).
    halted: bool,
}

struct BackupNode {
    name: String,
    sm: Backup,
    replica: [u64; CELLS],
    disk: [u64; DISK],
    replica_state: u64,
    staged: Vec<(usize, u64)>,
    committed_epochs: Vec<u64>,
    /// Pages received as XOR deltas and rebuilt, and deltas refused (their base was not the
    /// replica's page).
    deltas: u64,
    deltas_refused: u64,
}

enum Wire {
    ToBackup(Msg),
    ToPrimary(Msg),
}

/// The lease service: the arbiter's table, or the record in the store that each copy decides
/// on by its own observation (`replication::stored`).
enum Service {
    Arbiter(Table),
    Stored { record: Option<Record>, observers: BTreeMap<String, Observer> },
}

impl Service {
    fn record(&self, vm: &str) -> Option<(String, Option<u64>)> {
        match self {
            Service::Arbiter(t) => t.record(vm).map(|(h, b)| (h.to_string(), b)),
            Service::Stored { record, .. } => record.as_ref().map(|r| (r.holder.clone(), r.backup)),
        }
    }

    /// `arbiter_us` on the arbiter's clock; `real_us` when the store serves the transaction
    /// (the requester's observation counts from there: the earliest it could receive it).
    fn handle(&mut self, arbiter_us: u64, real_us: u64, node: &str, req: &Request) -> Answer {
        match self {
            Service::Arbiter(t) => t.handle(arbiter_us, req),
            Service::Stored { record, observers } => {
                let raw = record.as_ref().map(Record::encode);
                let unchanged = observers.entry(node.to_string()).or_default().saw(raw.as_deref(), real_us);
                let d = stored::decide(record.as_ref(), unchanged, req);
                if let Some(w) = d.write {
                    *record = Some(w);
                }
                d.answer
            }
        }
    }
}

struct World {
    now: u64,
    rng: Rng,
    /// Chooses each epoch's tracking mode (apart from `rng`, so the runs' other choices stay
    /// as they were).
    track_rng: Rng,
    /// Chooses which pages travel as XOR deltas (apart from `rng` likewise).
    delta_rng: Rng,
    faults: Faults,
    timing: Timing,
    arbiter: Service,
    /// When the arbiter last (re)started: its clock counts from here.
    arbiter_epoch: u64,
    /// Every grant in real time: generation → (holder, expiry).
    grants: BTreeMap<u64, (String, u64)>,
    primaries: Vec<PrimaryNode>,
    backup: Option<BackupNode>,
    /// The current connection id (None: no connection), and which primary it belongs to.
    conn: Option<(u64, String)>,
    next_conn: u64,
    inflight: Vec<(u64, u64, u64, Wire)>,             // (deliver_at, seq, conn, msg)
    lease_inflight: Vec<(u64, String, u64, Request)>, // (deliver_at, node, sent_at, req)
    lease_answers: Vec<(u64, String, u64, Answer)>,
    lease_errors: Vec<(u64, String, u64)>,
    seq: u64,
    /// Highest VM state behind any output a client saw.
    seen: u64,
    outputs_seen: u64,
    takeovers: Vec<u64>,
    log: Vec<String>,
    vm_name: String,
    /// The primary crashed while protected by a live backup.
    crashed_protected: bool,
    /// Outputs sent again at takeovers.
    replayed: u64,
    /// The handover was started, and completed (the source stopped).
    handover_started: bool,
    handed_over: Vec<u64>,
}

impl World {
    fn new(seed: u64, faults: Faults) -> World {
        let timing = Timing::default();
        let primary = Primary::new("vm", "host-a", timing, policy::PolicySpec::default().build());
        World {
            now: 0,
            rng: Rng(seed | 1),
            track_rng: Rng((seed ^ 0x7ac4_1e55_d1e7_0001) | 1),
            delta_rng: Rng((seed ^ 0xde17_a0de_17a0_0001) | 1),
            faults,
            timing,
            arbiter: Service::Arbiter(Table::default()),
            arbiter_epoch: 0,
            grants: BTreeMap::new(),
            primaries: vec![PrimaryNode {
                name: "host-a".into(),
                sm: primary,
                vm: ModelVm::new([0; CELLS], [0; DISK], 0),
                at_checkpoint: BTreeMap::new(),
                disk_sent: BTreeMap::new(),
                mirror: vec![],
                outq: vec![],
                sync_queue: vec![],
                sync_session: None,
                sent: None,
                fenced: false,
                halted: false,
            }],
            backup: Some(BackupNode::new("host-b", timing)),
            conn: None,
            next_conn: 1,
            inflight: vec![],
            lease_inflight: vec![],
            lease_answers: vec![],
            lease_errors: vec![],
            seq: 0,
            seen: 0,
            outputs_seen: 0,
            takeovers: vec![],
            log: vec![],
            vm_name: "vm".into(),
            crashed_protected: false,
            replayed: 0,
            handover_started: false,
            handed_over: vec![],
        }
    }

    /// The same world with the lease in the store instead of the arbiter.
    fn stored(mut self) -> World {
        self.arbiter = Service::Stored { record: None, observers: BTreeMap::new() };
        self
    }

    fn delay(&mut self) -> u64 {
        let d = self.rng.below(self.faults.max_delay_ms * MS + 1);
        if self.faults.reorder {
            d
        } else {
            // In order: never before the last message in flight.
            let last = self.inflight.iter().map(|m| m.0).max().unwrap_or(0);
            (self.now + d).max(last) - self.now
        }
    }

    fn cut(&self) -> bool {
        let within = |w: Option<(u64, u64)>| w.is_some_and(|(a, b)| self.now >= a * MS && self.now < b * MS);
        within(self.faults.cut) || within(self.faults.isolate) && self.conn.as_ref().is_some_and(|c| c.1 == "host-a")
    }

    fn isolated(&self, node: &str) -> bool {
        node == "host-a" && self.faults.isolate.is_some_and(|(a, b)| self.now >= a * MS && self.now < b * MS)
    }

    fn send(&mut self, w: Wire) {
        let Some((conn, _)) = self.conn else { return };
        if self.rng.chance(self.faults.loss) || self.cut() {
            return;
        }
        let at = self.now + self.delay();
        self.seq += 1;
        self.inflight.push((at, self.seq, conn, w));
    }

    fn primary_actions(&mut self, i: usize, actions: Vec<primary::Action>) {
        let mut queue: std::collections::VecDeque<primary::Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            let name = self.primaries[i].name.clone();
            if self.primaries[i].fenced {
                return;
            }
            match a {
                primary::Action::Connect => {
                    let ok = self.backup.is_some() && !self.cut() && self.conn.is_none();
                    let ev = if ok {
                        let id = self.next_conn;
                        self.next_conn += 1;
                        self.conn = Some((id, name.clone()));
                        let now = self.now;
                        if let Some(b) = self.backup.as_mut() {
                            let acts = b.sm.handle(now, backup::Event::Connected);
                            assert!(acts.iter().all(|a| matches!(a, backup::Action::Notice(_))));
                        }
                        primary::Event::Connected { session: self.rng.next() }
                    } else {
                        primary::Event::ConnectFailed { reason: "no backup".into() }
                    };
                    let now = self.now;
                    queue.extend(self.primaries[i].sm.handle(now, ev));
                }
                primary::Action::Hold => {
                    let vm = &mut self.primaries[i].vm;
                    vm.holding = true;
                    vm.start_tracking();
                }
                primary::Action::Track => self.primaries[i].vm.start_tracking(),
                primary::Action::PauseVm => {
                    self.log.push(format!("{} {name} paused for the handover", self.now / MS));
                    self.primaries[i].halted = true;
                }
                primary::Action::ResumeVm => {
                    self.log.push(format!("{} {name} resumed: the handover failed", self.now / MS));
                    self.primaries[i].halted = false;
                }
                primary::Action::HandedOver { epoch } => {
                    // The source stops for good (its process ends).
                    self.log.push(format!("{} {name} handed over after epoch {epoch}", self.now / MS));
                    self.primaries.remove(i);
                    self.handed_over.push(self.now);
                    return;
                }
                primary::Action::HoldOutput => self.primaries[i].vm.holding = true,
                primary::Action::StartSync { session } => {
                    self.send(Wire::ToBackup(Msg::Hello {
                        session,
                        vm: self.vm_name.clone(),
                        mem_bytes: (CELLS * PAGE) as u64,
                        config: vec![],
                    }));
                    let disk = self.primaries[i].vm.disk;
                    for (b, v) in disk.iter().enumerate() {
                        self.send(Wire::ToBackup(Msg::DiskSync { offset: b as u64, data: page(*v) }));
                    }
                    let p = &mut self.primaries[i];
                    p.disk_sent.clear();
                    p.mirror.clear();
                    p.outq.clear();
                    p.sync_queue = (0..CELLS).collect();
                    p.sync_session = Some(session);
                    // A new session starts without a base: never a delta against the copy of
                    // an older one.
                    p.sent = BackupCopy::new((CELLS * PAGE) as u64);
                }
                primary::Action::Checkpoint => {
                    let next = [TrackingMode::Log, TrackingMode::Compare, TrackingMode::Hybrid][self.track_rng.below(3) as usize];
                    // Sometimes output waits and the hot set is limited, as the VMM does.
                    let hot_limit = if self.track_rng.below(3) == 0 { self.track_rng.below(3) } else { u64::MAX };
                    let p = &mut self.primaries[i];
                    p.vm.epoch += 1;
                    let epoch = p.vm.epoch;
                    let open = std::mem::take(&mut p.vm.open);
                    let frames = open.len() as u64;
                    p.vm.sealed.push((epoch, open));
                    let mut dirty = p.vm.checkpoint_dirty(next, hot_limit);
                    dirty.sort();
                    p.at_checkpoint.insert(epoch, (p.vm.mem, p.vm.disk, p.vm.state));
                    let disk_writes = p.disk_sent.remove(&epoch).unwrap_or(0);
                    let pages: Vec<(usize, u64)> = dirty.iter().map(|&c| (c, p.vm.mem[c])).collect();
                    let state = p.vm.state;
                    for (c, v) in &pages {
                        let (list, data) = (vec![*c as u64], page(*v));
                        let as_delta = self.delta_rng.chance(0.5);
                        let msg = match p.sent.as_mut().filter(|s| s.complete()) {
                            Some(sent) if as_delta => {
                                let mut xor = Vec::new();
                                let base_crcs = delta::encode(epoch, &list, &data, sent.memory(), &mut xor).expect("encode");
                                let pages_crc = delta::pages_crc(epoch, &list, &data);
                                Msg::PagesDelta { epoch, pages: list.clone(), base_crcs, pages_crc, xor }
                            }
                            _ => Msg::Pages { epoch, pages: list.clone(), data: data.clone() },
                        };
                        if let Some(sent) = p.sent.as_mut() {
                            sent.record_pages(epoch, &list, &data).expect("record");
                        }
                        p.outq.push(msg);
                    }
                    // The epoch's output travels with the checkpoint (each output is the VM
                    // state it shows, as an 8-byte frame).
                    let sealed = &p.vm.sealed.last().expect("just sealed").1;
                    if !sealed.is_empty() {
                        let frames = sealed.iter().flat_map(|v| [&8u32.to_le_bytes()[..], &v.to_le_bytes()[..]].concat()).collect();
                        p.outq.push(Msg::Output { epoch, released: p.sm.released(), frames });
                    }
                    p.outq.push(Msg::Commit {
                        epoch,
                        guest_ns: state,
                        pages: pages.len() as u64,
                        disk_writes,
                        vcpu: state.to_le_bytes().to_vec(),
                    });
                    let now = self.now;
                    queue.extend(self.primaries[i].sm.handle(now, primary::Event::Staged { epoch, output_frames: frames }));
                }
                primary::Action::Release { epoch } => {
                    let vm = &mut self.primaries[i].vm;
                    let mut out = vec![];
                    vm.sealed.retain(|(e, f)| {
                        if *e <= epoch {
                            out.extend(f.iter().copied());
                            false
                        } else {
                            true
                        }
                    });
                    self.emit(&name, out);
                }
                primary::Action::Unhold => {
                    let vm = &mut self.primaries[i].vm;
                    vm.holding = false;
                    vm.stop_tracking();
                    let mut out: Vec<u64> = vm.sealed.drain(..).flat_map(|(_, f)| f).collect();
                    out.append(&mut vm.open);
                    self.emit(&name, out);
                }
                primary::Action::Send(m) => {
                    if self.conn.as_ref().is_some_and(|(_, o)| *o == name) {
                        self.send(Wire::ToBackup(m));
                    }
                }
                primary::Action::Disconnect { .. } => {
                    if self.conn.as_ref().is_some_and(|(_, o)| *o == name) {
                        self.disconnect("primary closed");
                    }
                    self.primaries[i].sync_queue.clear();
                }
                primary::Action::Lease(req) => {
                    let at = self.now + self.rng.below(self.faults.arbiter_delay_ms * MS);
                    self.lease_inflight.push((at, name.clone(), self.now, req));
                }
                primary::Action::Fenced { .. } => {
                    self.log.push(format!("{} {name} fenced", self.now / MS));
                    self.primaries[i].fenced = true;
                }
                primary::Action::Notice(n) => self.log.push(format!("{} {name} {n:?}", self.now / MS)),
            }
        }
    }

    fn emit(&mut self, node: &str, out: Vec<u64>) {
        if out.is_empty() {
            return;
        }
        // No split brain: only the holder of the newest generation, while it is live, lets
        // output out, or, when no backup is registered (so no one can take over), the last
        // holder.
        let newest = self.grants.last_key_value().map(|(_, (h, exp))| (h.as_str(), *exp));
        let live = newest.is_some_and(|(h, exp)| h == node && exp > self.now);
        let sole = self.arbiter.record(&self.vm_name) == Some((node.to_string(), None));
        assert!(live || sole, "t={} ms: {node} released output without holding the lease\n{}", self.now / MS, self.tail());
        for s in out {
            self.seen = self.seen.max(s);
            self.outputs_seen += 1;
        }
    }

    fn disconnect(&mut self, why: &str) {
        if let Some((_, owner)) = self.conn.take() {
            let now = self.now;
            if let Some(b) = self.backup.as_mut() {
                let acts = b.sm.handle(now, backup::Event::Disconnected { reason: why.into() });
                self.backup_actions(acts);
            }
            // A paused primary notices later (its heartbeats go unanswered).
            if let Some(i) = self.primaries.iter().position(|p| p.name == owner && !self.paused(&p.name)) {
                let acts = self.primaries[i].sm.handle(now, primary::Event::BackupLost { reason: why.into() });
                self.primary_actions(i, acts);
            }
        }
    }

    fn paused(&self, node: &str) -> bool {
        self.faults.pauses.iter().any(|(n, a, b)| *n == node && self.now >= a * MS && self.now < b * MS)
    }

    fn arbiter_down(&self) -> bool {
        self.faults.arbiter_down.is_some_and(|(a, b)| self.now >= a * MS && self.now < b * MS)
    }

    fn backup_actions(&mut self, actions: Vec<backup::Action>) {
        let mut queue: std::collections::VecDeque<backup::Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            let now = self.now;
            let fail = self.rng.chance(self.faults.apply_failure);
            let Some(b) = self.backup.as_mut() else { return };
            match a {
                backup::Action::Reset { .. } => {
                    b.replica = [0; CELLS];
                    b.disk = [0; DISK];
                    b.replica_state = 0;
                    b.staged.clear();
                    b.committed_epochs.clear();
                }
                backup::Action::WriteSync { first_page, data } => b.replica[first_page as usize] = cell_of(&data),
                backup::Action::Stage { pages, data, .. } => b.staged.push((pages[0] as usize, cell_of(&data))),
                backup::Action::StageDelta { epoch, pages, base_crcs, pages_crc, mut xor } => {
                    let replica: Vec<u8> = b.replica.iter().flat_map(|v| page(*v)).collect();
                    match delta::resolve(epoch, &pages, &base_crcs, pages_crc, &mut xor, &replica) {
                        Ok(()) => {
                            b.deltas += 1;
                            b.staged.push((pages[0] as usize, cell_of(&xor)));
                        }
                        Err(e) => {
                            b.deltas_refused += 1;
                            queue.extend(b.sm.handle(now, backup::Event::Corrupt { reason: e.to_string() }));
                        }
                    }
                }
                backup::Action::DiscardStaged => b.staged.clear(),
                backup::Action::WriteDisk { offset, data } => b.disk[offset as usize] = cell_of(&data),
                backup::Action::Apply { epoch, vcpu, disk, .. } => {
                    let result = if fail {
                        Err("injected validation failure".to_string())
                    } else {
                        for (c, v) in b.staged.drain(..) {
                            b.replica[c] = v;
                        }
                        for (o, d) in &disk {
                            b.disk[*o as usize] = cell_of(d);
                        }
                        b.replica_state = u64::from_le_bytes(vcpu[..8].try_into().expect("state"));
                        b.committed_epochs.push(epoch);
                        Ok(())
                    };
                    if result.is_ok() {
                        // The replica is exactly the primary's memory at that checkpoint.
                        let owner = self.conn.as_ref().map(|c| c.1.clone());
                        let p = self.primaries.iter().find(|p| Some(&p.name) == owner.as_ref()).expect("a connected primary");
                        let b = self.backup.as_ref().expect("backup");
                        assert_eq!(
                            Some(&(b.replica, b.disk, b.replica_state)),
                            p.at_checkpoint.get(&epoch),
                            "t={} ms: replica differs from the primary at epoch {epoch}\n{}",
                            now / MS,
                            self.tail()
                        );
                    }
                    let b = self.backup.as_mut().expect("backup");
                    queue.extend(b.sm.handle(now, backup::Event::Applied { epoch, result }));
                }
                backup::Action::Send(m) => self.send(Wire::ToPrimary(m)),
                backup::Action::Disconnect { reason } => self.disconnect(&reason),
                backup::Action::Lease(req) => {
                    let at = now + self.rng.below(self.faults.arbiter_delay_ms * MS);
                    let name = b.name.clone();
                    self.lease_inflight.push((at, name, now, req));
                }
                backup::Action::TakeOver { epoch, granted_at, gen, replay, .. } => {
                    let b = self.backup.take().expect("backup");
                    assert_eq!(b.committed_epochs.last(), Some(&epoch), "takes over from its last commit");
                    // Nothing a client saw is lost.
                    assert!(
                        b.replica_state >= self.seen,
                        "t={} ms: took over at state {} but clients saw output of state {}\n{}",
                        now / MS,
                        b.replica_state,
                        self.seen,
                        self.tail()
                    );
                    self.takeovers.push(now);
                    self.log.push(format!("{} {} takes over at epoch {epoch} state {}", now / MS, b.name, b.replica_state));
                    let mut sm = Primary::new("vm", &b.name, self.timing, policy::PolicySpec::default().build());
                    let acts = sm.after_takeover(now, granted_at, gen);
                    let mut vm = ModelVm::new(b.replica, b.disk, b.replica_state);
                    vm.epoch = epoch;
                    self.primaries.push(PrimaryNode {
                        name: b.name.clone(),
                        sm,
                        vm,
                        at_checkpoint: BTreeMap::new(),
                        disk_sent: BTreeMap::new(),
                        mirror: vec![],
                        outq: vec![],
                        sync_queue: vec![],
                        sync_session: None,
                        sent: None,
                        fenced: false,
                        halted: false,
                    });
                    let i = self.primaries.len() - 1;
                    // The output of committed epochs not known released goes out again: none
                    // of it may come from beyond the replica's state.
                    let again: Vec<u64> =
                        replay.chunks_exact(12).map(|f| u64::from_le_bytes(f[4..].try_into().expect("8 bytes"))).collect();
                    assert!(again.iter().all(|s| *s <= b.replica_state), "replayed output beyond the replica: {again:?}");
                    self.replayed += again.len() as u64;
                    self.emit(&b.name, again);
                    self.primary_actions(i, acts);
                    return;
                }
                backup::Action::Abandon { reason } => self.log.push(format!("{} backup abandons: {reason}", now / MS)),
                backup::Action::Notice(n) => self.log.push(format!("{} backup {n:?}", now / MS)),
            }
        }
    }

    fn tail(&self) -> String {
        self.log
            .iter()
            .rev()
            .take(std::env::var("SIM_TAIL").ok().and_then(|v| v.parse().ok()).unwrap_or(25))
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn step(&mut self) {
        if self.now == 0 {
            let acts = self.primaries[0].sm.start(0);
            self.primary_actions(0, acts);
        }
        self.now += MS / 2;
        let now = self.now;
        // A planned handover of the first primary.
        if self.faults.handover_at.is_some_and(|t| now >= t * MS) && !self.handover_started && now.is_multiple_of(MS) {
            if let Some(i) = self.primaries.iter().position(|p| p.name == "host-a" && !p.fenced && !self.paused(&p.name)) {
                if let Ok(acts) = self.primaries[i].sm.handover(now) {
                    self.handover_started = true;
                    self.log.push(format!("{} host-a starts a handover", now / MS));
                    self.primary_actions(i, acts);
                }
            }
        }
        // Crashes.
        if self.faults.crash_primary_at == Some(now / MS) && !self.primaries.is_empty() {
            let p = self.primaries.remove(0);
            // Protected: a backup holds a committed replica and the arbiter registers it
            // (only then may it take over).
            let registered = self.arbiter.record(&self.vm_name).is_some_and(|(h, b)| h == p.name && b.is_some());
            if p.sm.protected() && registered && self.backup.is_some() {
                self.crashed_protected = true;
            }
            self.log.push(format!("{} CRASH {}", now / MS, p.name));
            if self.conn.as_ref().is_some_and(|c| c.1 == p.name) {
                // The backup sees nothing at once (a dead host sends no FIN).
                self.conn = None;
            }
        }
        if self.faults.crash_backup_at == Some(now / MS) && self.backup.is_some() {
            self.backup = None;
            self.log.push(format!("{} CRASH backup", now / MS));
            if let Some((_, owner)) = self.conn.take() {
                if let Some(i) = self.primaries.iter().position(|p| p.name == owner) {
                    let acts = self.primaries[i].sm.handle(now, primary::Event::BackupLost { reason: "reset".into() });
                    self.primary_actions(i, acts);
                }
            }
        }
        if let (Some(at), Some(after)) = (self.faults.crash_backup_at, self.faults.new_backup_after_ms) {
            if now / MS == at + after && self.backup.is_none() && now.is_multiple_of(MS) {
                self.log.push(format!("{} new backup", now / MS));
                self.backup = Some(BackupNode::new("host-c", self.timing));
            }
        }
        // The arbiter: it restarts from its durable state (what it stored before answering)
        // with a fresh clock.
        if self.faults.arbiter_down.is_some_and(|(_, b)| now == b * MS) {
            if let Service::Arbiter(t) = &mut self.arbiter {
                *t = Table::restore(&t.encode()).expect("the durable state restores");
            }
            self.arbiter_epoch = now;
            self.log.push(format!("{} arbiter restarts", now / MS));
        }
        // With the lease in the store, the backup watches the record every 10 ms (a failed
        // read forgets what it saw).
        if now.is_multiple_of(10 * MS) {
            let down = self.arbiter_down();
            if let (Some(b), Service::Stored { record, observers }) = (self.backup.as_ref(), &mut self.arbiter) {
                if !self.faults.pauses.iter().any(|(n, a, e)| *n == b.name && now >= a * MS && now < e * MS) {
                    let o = observers.entry(b.name.clone()).or_default();
                    if down {
                        o.forget();
                    } else {
                        o.saw(record.as_ref().map(Record::encode).as_deref(), now / 1000);
                    }
                }
            }
        }
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.lease_inflight).into_iter().partition(|r| r.0 <= now);
        self.lease_inflight = rest;
        for (_, node, sent_at, req) in due {
            if self.isolated(&node) || self.arbiter_down() {
                // The driver's client times out (and forgets what it saw of the record).
                if let Service::Stored { observers, .. } = &mut self.arbiter {
                    observers.remove(&node);
                }
                self.lease_errors.push((now + 30 * MS, node, sent_at));
                continue;
            }
            let answer = self.arbiter.handle((now - self.arbiter_epoch) / 1000, now / 1000, &node, &req);
            if let Answer::Granted { gen, .. } = answer {
                let ttl = match &req {
                    Request::Renew { ttl_us, .. } | Request::Takeover { ttl_us, .. } => ttl_us * 1000,
                    Request::Handover { .. } => 0,
                };
                let e = self.grants.entry(gen).or_insert((node.clone(), 0));
                assert_eq!(e.0, node, "generation {gen} granted to two copies");
                e.1 = e.1.max(now + ttl);
            }
            self.log.push(format!("{} arbiter {} -> {}", now / MS, req.to_line(), answer.to_line()));
            if self.faults.answer_loss > 0.0 && self.rng.chance(self.faults.answer_loss) {
                self.log.push(format!("{} the answer to {node} is lost", now / MS));
                self.lease_errors.push((now + 30 * MS, node, sent_at));
                continue;
            }
            let at = now + self.rng.below(self.faults.arbiter_delay_ms * MS);
            self.lease_answers.push((at, node, sent_at, answer));
        }
        let (due, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.lease_errors).into_iter().partition(|r| r.0 <= now && !self.paused(&r.1));
        self.lease_errors = rest;
        for (_, node, sent_at) in due {
            if let Some(i) = self.primaries.iter().position(|p| p.name == node) {
                let acts = self.primaries[i].sm.handle(now, primary::Event::Lease { sent_at, answer: Err("timed out".into()) });
                self.primary_actions(i, acts);
            } else if self.backup.as_ref().is_some_and(|b| b.name == node) {
                let answer = Err("timed out".into());
                let acts = self.backup.as_mut().expect("backup").sm.handle(now, backup::Event::Lease { sent_at, answer });
                self.backup_actions(acts);
            }
        }
        let (due, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.lease_answers).into_iter().partition(|r| r.0 <= now && !self.paused(&r.1));
        self.lease_answers = rest;
        for (_, node, sent_at, answer) in due {
            if self.isolated(&node) {
                continue;
            }
            if let Some(i) = self.primaries.iter().position(|p| p.name == node) {
                let acts = self.primaries[i].sm.handle(now, primary::Event::Lease { sent_at, answer: Ok(answer) });
                self.primary_actions(i, acts);
            } else if self.backup.as_ref().is_some_and(|b| b.name == node) {
                let acts = self.backup.as_mut().expect("backup").sm.handle(now, backup::Event::Lease { sent_at, answer: Ok(answer) });
                self.backup_actions(acts);
            }
        }
        // The network.
        let mut due: Vec<_> = Vec::new();
        let mut rest = Vec::new();
        let owner_paused = self.conn.as_ref().is_some_and(|c| self.paused(&c.1));
        for m in std::mem::take(&mut self.inflight) {
            if m.0 <= now && !(owner_paused && matches!(m.3, Wire::ToPrimary(_))) {
                due.push(m)
            } else {
                rest.push(m)
            }
        }
        self.inflight = rest;
        due.sort_by_key(|m| (m.0, m.1));
        for (_, _, conn, w) in due {
            if self.conn.as_ref().map(|c| c.0) != Some(conn) {
                continue;
            }
            match w {
                Wire::ToBackup(m) => {
                    if let Some(b) = self.backup.as_mut() {
                        let acts = b.sm.handle(now, backup::Event::Received(m));
                        self.backup_actions(acts);
                    }
                }
                Wire::ToPrimary(m) => {
                    let owner = self.conn.as_ref().map(|c| c.1.clone());
                    if let Some(i) = self.primaries.iter().position(|p| Some(&p.name) == owner.as_ref()) {
                        let acts = self.primaries[i].sm.handle(now, primary::Event::Received(m));
                        self.primary_actions(i, acts);
                    }
                }
            }
        }
        // The VMs and their syncs.
        for i in 0..self.primaries.len() {
            if self.primaries[i].fenced || self.paused(&self.primaries[i].name) {
                continue;
            }
            let (disk, output) = if self.primaries[i].halted { (None, None) } else { self.primaries[i].vm.work(&mut self.rng) };
            let name = self.primaries[i].name.clone();
            if let Some(b) = disk {
                let vm = &self.primaries[i].vm;
                if vm.tracking && self.conn.as_ref().is_some_and(|c| c.1 == name) {
                    let epoch = vm.epoch + 1;
                    let data = page(vm.disk[b]);
                    *self.primaries[i].disk_sent.entry(epoch).or_default() += 1;
                    self.primaries[i].mirror.push(Msg::DiskWrite { epoch, offset: b as u64, data });
                }
            }
            if let Some(s) = output {
                let name = self.primaries[i].name.clone();
                let vm = &mut self.primaries[i].vm;
                if vm.holding {
                    vm.open.push(s);
                    let acts = self.primaries[i].sm.handle(now, primary::Event::Output);
                    self.primary_actions(i, acts);
                } else {
                    self.emit(&name, vec![s]);
                }
            }
            if let Some(c) = self.primaries[i].sync_queue.first().copied() {
                self.primaries[i].sync_queue.remove(0);
                let v = self.primaries[i].vm.mem[c];
                let name = self.primaries[i].name.clone();
                if self.conn.as_ref().is_some_and(|x| x.1 == name) {
                    self.send(Wire::ToBackup(Msg::Sync { first_page: c as u64, data: page(v) }));
                }
                if let Some(sent) = self.primaries[i].sent.as_mut() {
                    sent.record_range(c as u64, &page(v)).expect("record");
                }
                if self.primaries[i].sync_queue.is_empty() && self.primaries[i].sync_session.take().is_some() {
                    if self.conn.as_ref().is_some_and(|x| x.1 == name) {
                        self.send(Wire::ToBackup(Msg::SyncEnd { pages: CELLS as u64, disk_chunks: DISK as u64 }));
                    }
                    if let Some(sent) = self.primaries[i].sent.as_mut() {
                        sent.set_complete();
                    }
                    let acts = self.primaries[i].sm.handle(now, primary::Event::SyncSent);
                    self.primary_actions(i, acts);
                }
            }
            // The sender: mirrored writes first, then queued checkpoint frames.
            let mirror = std::mem::take(&mut self.primaries[i].mirror);
            let outq = std::mem::take(&mut self.primaries[i].outq);
            if self.conn.as_ref().is_some_and(|c| c.1 == name) {
                for m in mirror.into_iter().chain(outq) {
                    self.send(Wire::ToBackup(m));
                }
            }
            let acts = self.primaries[i].sm.handle(now, primary::Event::Tick);
            self.primary_actions(i, acts);
        }
        let backup_paused = self.backup.as_ref().is_some_and(|b| self.paused(&b.name));
        if let Some(b) = self.backup.as_mut().filter(|_| !backup_paused) {
            let acts = b.sm.handle(now, backup::Event::Tick);
            self.backup_actions(acts);
        }
    }

    fn run(&mut self, ms: u64) {
        for _ in 0..ms * 2 {
            self.step();
        }
    }

    fn protected(&self) -> bool {
        self.primaries.iter().any(|p| !p.fenced && p.sm.protected())
    }
}

impl BackupNode {
    fn new(name: &str, timing: Timing) -> BackupNode {
        BackupNode {
            name: name.into(),
            sm: Backup::new(name, timing),
            replica: [0; CELLS],
            disk: [0; DISK],
            replica_state: 0,
            staged: vec![],
            committed_epochs: vec![],
            deltas: 0,
            deltas_refused: 0,
        }
    }
}

/// A world whose lease service is the arbiter or (`stored`) the record in the store.
fn world(stored: bool, seed: u64, faults: Faults) -> World {
    let w = World::new(seed, faults);
    if stored {
        w.stored()
    } else {
        w
    }
}

fn without_faults_output_flows_and_the_vm_stays_protected_in(stored: bool) {
    let mut w = world(stored, 1, Faults::none());
    w.run(2000);
    assert!(w.protected(), "{}", w.tail());
    let p = &w.primaries[0];
    assert!(p.vm.epoch > 20, "only {} checkpoints in 2 s", p.vm.epoch);
    assert!(w.outputs_seen > 100, "only {} outputs released", w.outputs_seen);
    assert!(p.vm.state - w.seen < 200, "output lags: state {} seen {}", p.vm.state, w.seen);
    assert!(w.takeovers.is_empty());
    // The tracker really switched between its modes along the way.
    assert!(p.vm.compare_epochs > 5 && p.vm.switches > 5, "{} compare epochs, {} switches", p.vm.compare_epochs, p.vm.switches);
    assert!(p.vm.hybrid_epochs > 5 && p.vm.hot_max > 0, "{} hybrid epochs, at most {} hot pages", p.vm.hybrid_epochs, p.vm.hot_max);
    // Pages travelled as XOR deltas, each rebuilt against the right base.
    let b = w.backup.as_ref().expect("backup");
    assert!(b.deltas > 20 && b.deltas_refused == 0, "{} deltas applied, {} refused", b.deltas, b.deltas_refused);
}

fn a_crashed_primary_is_replaced_within_timeout_plus_lease_in(stored: bool) {
    let mut w = world(stored, 2, Faults { crash_primary_at: Some(700), ..Faults::none() });
    w.run(1500);
    assert_eq!(w.takeovers.len(), 1, "{}", w.tail());
    let t = w.takeovers[0] - 700 * MS;
    let limit = w.timing.timeout_ns.max(w.timing.lease_ttl_ns) + w.timing.lease_renew_ns + 10 * MS;
    assert!(t <= limit, "takeover {} ms after the crash (limit {} ms)", t / MS, limit / MS);
    // The new primary's output flows (unprotected: no backup left).
    let before = w.outputs_seen;
    w.run(300);
    assert!(w.outputs_seen > before);
}

fn a_crashed_backup_leaves_the_primary_running_and_a_new_backup_protects_it_again_in(stored: bool) {
    let mut w = world(stored, 3, Faults { crash_backup_at: Some(600), new_backup_after_ms: Some(400), ..Faults::none() });
    w.run(900);
    assert!(!w.protected());
    let before = w.outputs_seen;
    w.run(80);
    assert!(w.outputs_seen > before, "the unprotected primary's output flows\n{}", w.tail());
    w.run(1000);
    assert!(w.protected(), "protected again by the new backup\n{}", w.tail());
    assert!(w.takeovers.is_empty());
}

fn a_cut_between_the_hosts_causes_no_split_brain_in(stored: bool) {
    let mut w = world(stored, 4, Faults { cut: Some((500, 900)), ..Faults::none() });
    w.run(2500);
    // The primary kept the lease, so the backup could not take over; it was dropped and a
    // new session protects the VM again after the link heals.
    assert!(w.takeovers.is_empty(), "{}", w.tail());
    assert!(w.protected(), "{}", w.tail());
}

fn an_isolated_primary_stops_releasing_before_the_backup_takes_over_in(stored: bool) {
    let mut w = world(stored, 5, Faults { isolate: Some((500, 900)), ..Faults::none() });
    w.run(1500);
    assert_eq!(w.takeovers.len(), 1, "{}", w.tail());
    assert!(w.primaries[0].fenced, "the old primary learns it was deposed\n{}", w.tail());
    assert!(w.log.iter().any(|l| l.contains("ArbiterUnreachable")));
}

fn crashes_at_every_step_in(stored: bool) {
    // A short run, crashing one side at each half-millisecond step in turn.
    for side in 0..2 {
        for t in 1..=400u64 {
            let crash = t;
            let f = if side == 0 {
                Faults { crash_primary_at: Some(crash), max_delay_ms: 2, ..Faults::none() }
            } else {
                Faults { crash_backup_at: Some(crash), new_backup_after_ms: Some(50), max_delay_ms: 2, ..Faults::none() }
            };
            let mut w = world(stored, 100 + t, f);
            w.run(crash + 400);
            if side == 1 {
                assert!(w.takeovers.is_empty());
            }
        }
    }
}

fn random_delay_loss_reordering_and_crashes_in(stored: bool) {
    let mut takeovers = 0;
    let mut refused = 0;
    let mut clean_crashes = 0;
    let mut replayed = 0;
    for seed in 0..600u64 {
        let mut r = Rng(seed * 7919 + 13);
        let f = Faults {
            max_delay_ms: 1 + r.below(30),
            loss: [0.0, 0.001, 0.01, 0.05][r.below(4) as usize],
            reorder: r.chance(0.4),
            crash_primary_at: r.chance(0.5).then(|| 50 + r.below(800)),
            crash_backup_at: r.chance(0.3).then(|| 50 + r.below(800)),
            new_backup_after_ms: r.chance(0.5).then(|| r.below(300)),
            cut: r.chance(0.3).then(|| {
                let a = r.below(800);
                (a, a + r.below(300))
            }),
            isolate: r.chance(0.2).then(|| {
                let a = r.below(800);
                (a, a + r.below(400))
            }),
            apply_failure: [0.0, 0.02][r.below(2) as usize],
            arbiter_down: r.chance(0.3).then(|| {
                let a = 20 + r.below(800);
                (a, a + 1 + r.below(300))
            }),
            pauses: &[],
            arbiter_delay_ms: 2,
            answer_loss: 0.0,
            handover_at: None,
        };
        let mut w = world(stored, seed + 1, f);
        w.run(1200);
        takeovers += w.takeovers.len();
        replayed += w.replayed;
        // A primary that crashes while protected, with the backup reachable, is replaced.
        let clean = w.crashed_protected
            && f.crash_backup_at.is_none()
            && f.cut.is_none()
            && f.isolate.is_none()
            && f.loss == 0.0
            && f.arbiter_down.is_none_or(|(_, b)| b < 900);
        if clean {
            clean_crashes += 1;
            assert_eq!(w.takeovers.len(), 1, "seed {seed} {f:?}\n{}", w.tail());
        }
        refused += w.log.iter().filter(|l| l.contains("Refused")).count();
    }
    // The faults did bite.
    assert!(clean_crashes >= 8 && takeovers >= 50, "{clean_crashes} clean crashes, {takeovers} takeovers");
    assert!(replayed > 20, "only {replayed} outputs sent again at takeovers");
    assert!(refused > 20, "only {refused} refusals");
}

fn a_handover_moves_the_vm_to_its_backup_with_a_short_stop_in(stored: bool) {
    let mut w = world(stored, 7, Faults { handover_at: Some(800), ..Faults::none() });
    w.run(800);
    assert!(w.protected());
    w.run(400);
    assert_eq!(w.handed_over.len(), 1, "{}", w.tail());
    assert_eq!(w.takeovers.len(), 1, "{}", w.tail());
    // The backup takes over at once, not after a silence (timeout) and the lease; the source
    // stops once the arbiter says so.
    let stop = w.takeovers[0] - 800 * MS;
    assert!(stop < w.timing.timeout_ns, "took over {} ms after the handover began\n{}", stop / MS, w.tail());
    assert!(w.handed_over[0] >= w.takeovers[0]);
    let before = w.outputs_seen;
    w.run(200);
    assert!(w.outputs_seen > before, "the new copy's output flows\n{}", w.tail());
}

/// A handover at a random moment under random delays, losses, reordering, crashes of either
/// side, cuts, isolation and arbiter restarts: the world's checks hold at every step (no two
/// copies release output, nothing a client saw is lost, the replica is the primary's memory
/// at each commit), and without faults the VM always ends on the backup's host.
fn handovers_under_random_faults_never_split_and_lose_nothing_in(stored: bool) {
    let (mut moved, mut resumed, mut clean) = (0, 0, 0);
    for seed in 0..400u64 {
        let mut r = Rng(seed * 104_729 + 7);
        let faulty = r.chance(0.7);
        let f = if faulty {
            Faults {
                max_delay_ms: 1 + r.below(20),
                loss: [0.0, 0.001, 0.01][r.below(3) as usize],
                reorder: r.chance(0.4),
                crash_primary_at: r.chance(0.3).then(|| 400 + r.below(800)),
                crash_backup_at: r.chance(0.3).then(|| 400 + r.below(800)),
                new_backup_after_ms: r.chance(0.5).then(|| r.below(300)),
                cut: r.chance(0.3).then(|| {
                    let a = 400 + r.below(800);
                    (a, a + r.below(300))
                }),
                isolate: r.chance(0.2).then(|| {
                    let a = 400 + r.below(800);
                    (a, a + r.below(400))
                }),
                apply_failure: [0.0, 0.02][r.below(2) as usize],
                arbiter_down: r.chance(0.3).then(|| {
                    let a = 400 + r.below(800);
                    (a, a + 1 + r.below(300))
                }),
                pauses: &[],
                arbiter_delay_ms: 1 + r.below(5),
                answer_loss: [0.0, 0.1][r.below(2) as usize],
                handover_at: Some(400 + r.below(800)),
            }
        } else {
            Faults { max_delay_ms: 1 + r.below(5), handover_at: Some(400 + r.below(800)), ..Faults::none() }
        };
        let mut w = world(stored, seed + 11, f);
        w.run(2000);
        moved += w.handed_over.len();
        resumed += w.log.iter().filter(|l| l.contains("resumed: the handover failed")).count();
        if !faulty {
            clean += 1;
            assert_eq!((w.handed_over.len(), w.takeovers.len()), (1, 1), "seed {seed} {f:?}\n{}", w.tail());
        }
        // Unless the primary crashed (then an unprotected VM is lost, handover or not), some
        // copy runs the VM at the end: a handover never loses it.
        if f.crash_primary_at.is_none() {
            assert!(w.primaries.iter().any(|p| !p.fenced), "seed {seed}: no copy runs the VM\n{}", w.tail());
        }
    }
    assert!(clean >= 60 && moved >= 150, "{clean} clean runs, {moved} handovers");
    assert!(resumed >= 1, "no handover ever failed and resumed its VM");
}

/// The reported loss of acknowledged writes: the primary is paused, the backup takes over and
/// serves, the new primary is paused too, the arbiter restarts, and the old primary continues.
/// The restarted arbiter must not hand the lease to the stale copy.
fn a_restarted_arbiter_never_hands_the_lease_to_a_stale_primary_in(stored: bool) {
    let f = Faults { pauses: &[("host-a", 300, 1200), ("host-b", 700, 2000)], arbiter_down: Some((800, 850)), ..Faults::none() };
    let mut w = world(stored, 11, f);
    w.run(1600);
    assert_eq!(w.takeovers.len(), 1, "{}", w.tail());
    assert!(w.takeovers[0] < 700 * MS, "host-b took over before it was paused\n{}", w.tail());
    assert!(w.primaries[0].fenced, "the stale primary stops when it wakes\n{}", w.tail());
    assert!(w.log.iter().any(|l| l.contains("renew vm host-a 1") && l.contains("denied superseded 2 host-b")), "{}", w.tail());
    // host-b wakes up and carries on under its generation.
    w.run(800);
    let before = w.outputs_seen;
    w.run(200);
    assert!(w.outputs_seen > before, "{}", w.tail());
}

/// The VM is not lost when its primary dies while the arbiter is down: once the arbiter is
/// back and has waited out the leases it may have granted, the backup takes over, and it
/// said once (not at every retry) why it could not yet.
fn the_primary_dies_while_the_arbiter_is_down_and_the_backup_takes_over_when_it_returns_in(stored: bool) {
    let f = Faults { arbiter_down: Some((500, 900)), crash_primary_at: Some(600), ..Faults::none() };
    let mut w = world(stored, 12, f);
    w.run(1500);
    assert_eq!(w.takeovers.len(), 1, "{}", w.tail());
    let after = w.takeovers[0] - 900 * MS;
    let limit = 30 * MS + w.timing.lease_ttl_ns + 2 * w.timing.lease_renew_ns;
    assert!(after <= limit, "took over {} ms after the arbiter returned (limit {} ms)\n{}", after / MS, limit / MS, w.tail());
    let said = w.log.iter().filter(|l| l.contains("backup ArbiterTrouble")).count();
    assert_eq!(said, 1, "{}", w.tail());
    let primary_said = w.log.iter().filter(|l| l.contains("host-a ArbiterUnreachable")).count();
    assert!(primary_said <= 1, "the primary repeated itself {primary_said} times");
}

fn arbiter_restarts_at_every_step_in(stored: bool) {
    let mut replaced = 0;
    for t in 1..=300u64 {
        let down = (t, t + 1 + (t * 37) % 250);
        let crash = (t % 3 == 0).then_some(t + (t * 13) % 300);
        let f = Faults { arbiter_down: Some(down), crash_primary_at: crash, max_delay_ms: 2, ..Faults::none() };
        let mut w = world(stored, 500 + t, f);
        w.run(down.1 + 900);
        if crash.is_some() && w.crashed_protected {
            assert_eq!(w.takeovers.len(), 1, "t={t} {f:?}\n{}", w.tail());
            replaced += 1;
        } else if crash.is_none() {
            assert!(w.takeovers.is_empty(), "t={t}: a takeover without a failure\n{}", w.tail());
            assert!(w.protected(), "t={t}: protection resumes after the restart\n{}", w.tail());
        }
    }
    assert!(replaced >= 50, "only {replaced} runs crashed a protected primary");
}

/// A primary that stalls for about the timeout (a loaded host) and comes back: whatever the
/// arbiter decided, some copy keeps running the VM — if the backup was granted the lease
/// after the primary was heard again, the backup takes over (the primary is fenced).
fn a_stalled_primary_that_comes_back_never_leaves_the_vm_without_a_copy_in(stored: bool) {
    static PAUSES: std::sync::OnceLock<Vec<[(&'static str, u64, u64); 1]>> = std::sync::OnceLock::new();
    let pauses = PAUSES.get_or_init(|| (40..200).step_by(2).map(|len| [("host-a", 300, 300 + len)]).collect());
    let mut takeovers = 0;
    for (i, p) in pauses.iter().enumerate() {
        for seed in 0..3 {
            let f = Faults { pauses: p, max_delay_ms: 2, arbiter_delay_ms: 15, ..Faults::none() };
            let mut w = world(stored, 900 + i as u64 * 7 + seed, f);
            w.run(1200);
            takeovers += w.takeovers.len();
            let alive: Vec<_> = w.primaries.iter().filter(|p| !p.fenced).map(|p| p.name.clone()).collect();
            assert_eq!(alive.len(), 1, "pause {:?} seed {seed}: copies running {alive:?}\n{}", p, w.tail());
            let before = w.outputs_seen;
            w.run(200);
            assert!(w.outputs_seen > before, "pause {:?} seed {seed}: no output after the stall\n{}", p, w.tail());
        }
    }
    assert!(takeovers > 10, "the stalls did cause takeovers ({takeovers})");
}

/// Found on a loaded host (the dashboard test): the arbiter granted the backup's takeover but
/// the answer reached it after its read timeout; asking again, it was told its registration
/// was gone and abandoned the replica, while the grant had fenced the primary: no copy ran the
/// VM. With answers lost at random (and stalls that cause takeovers), some copy always runs
/// the VM and output keeps flowing.
fn lost_arbiter_answers_never_leave_the_vm_without_a_copy_in(stored: bool) {
    static PAUSES: std::sync::OnceLock<Vec<[(&'static str, u64, u64); 1]>> = std::sync::OnceLock::new();
    let pauses = PAUSES.get_or_init(|| (60..200).step_by(4).map(|len| [("host-a", 300, 300 + len)]).collect());
    let (mut takeovers, mut lost_grants) = (0, 0);
    for (i, p) in pauses.iter().enumerate() {
        for seed in 0..4 {
            let f = Faults { pauses: p, max_delay_ms: 2, arbiter_delay_ms: 15, answer_loss: 0.3, ..Faults::none() };
            let mut w = world(stored, 5_000 + i as u64 * 11 + seed, f);
            w.run(1200);
            takeovers += w.takeovers.len();
            lost_grants += w.log.iter().filter(|l| l.contains("is lost")).count();
            // Some copy runs the VM (a copy whose every claim went unanswered may still wait,
            // its output held: the world's checks see that no two copies ever release).
            let alive: Vec<_> = w.primaries.iter().filter(|p| !p.fenced).map(|p| p.name.clone()).collect();
            assert!(!alive.is_empty(), "pause {:?} seed {seed}: no copy runs the VM\n{}", p, w.tail());
            let before = w.outputs_seen;
            w.run(300);
            assert!(w.outputs_seen > before, "pause {:?} seed {seed}: no output after the stall\n{}", p, w.tail());
        }
    }
    assert!(takeovers > 10 && lost_grants > 10, "the faults happened ({takeovers} takeovers, {lost_grants} answers lost)");
}

#[test]
fn without_faults_output_flows_and_the_vm_stays_protected() {
    without_faults_output_flows_and_the_vm_stays_protected_in(false)
}

#[test]
fn without_faults_output_flows_and_the_vm_stays_protected_with_the_lease_in_the_store() {
    without_faults_output_flows_and_the_vm_stays_protected_in(true)
}

#[test]
fn a_crashed_primary_is_replaced_within_timeout_plus_lease() {
    a_crashed_primary_is_replaced_within_timeout_plus_lease_in(false)
}

#[test]
fn a_crashed_primary_is_replaced_within_timeout_plus_lease_with_the_lease_in_the_store() {
    a_crashed_primary_is_replaced_within_timeout_plus_lease_in(true)
}

#[test]
fn a_crashed_backup_leaves_the_primary_running_and_a_new_backup_protects_it_again() {
    a_crashed_backup_leaves_the_primary_running_and_a_new_backup_protects_it_again_in(false)
}

#[test]
fn a_crashed_backup_leaves_the_primary_running_and_a_new_backup_protects_it_again_with_the_lease_in_the_store() {
    a_crashed_backup_leaves_the_primary_running_and_a_new_backup_protects_it_again_in(true)
}

#[test]
fn a_cut_between_the_hosts_causes_no_split_brain() {
    a_cut_between_the_hosts_causes_no_split_brain_in(false)
}

#[test]
fn a_cut_between_the_hosts_causes_no_split_brain_with_the_lease_in_the_store() {
    a_cut_between_the_hosts_causes_no_split_brain_in(true)
}

#[test]
fn an_isolated_primary_stops_releasing_before_the_backup_takes_over() {
    an_isolated_primary_stops_releasing_before_the_backup_takes_over_in(false)
}

#[test]
fn an_isolated_primary_stops_releasing_before_the_backup_takes_over_with_the_lease_in_the_store() {
    an_isolated_primary_stops_releasing_before_the_backup_takes_over_in(true)
}

#[test]
fn crashes_at_every_step() {
    crashes_at_every_step_in(false)
}

#[test]
fn crashes_at_every_step_with_the_lease_in_the_store() {
    crashes_at_every_step_in(true)
}

#[test]
fn random_delay_loss_reordering_and_crashes() {
    random_delay_loss_reordering_and_crashes_in(false)
}

#[test]
fn random_delay_loss_reordering_and_crashes_with_the_lease_in_the_store() {
    random_delay_loss_reordering_and_crashes_in(true)
}

#[test]
fn a_handover_moves_the_vm_to_its_backup_with_a_short_stop() {
    a_handover_moves_the_vm_to_its_backup_with_a_short_stop_in(false)
}

#[test]
fn a_handover_moves_the_vm_to_its_backup_with_a_short_stop_with_the_lease_in_the_store() {
    a_handover_moves_the_vm_to_its_backup_with_a_short_stop_in(true)
}

#[test]
fn handovers_under_random_faults_never_split_and_lose_nothing() {
    handovers_under_random_faults_never_split_and_lose_nothing_in(false)
}

#[test]
fn handovers_under_random_faults_never_split_and_lose_nothing_with_the_lease_in_the_store() {
    handovers_under_random_faults_never_split_and_lose_nothing_in(true)
}

#[test]
fn a_restarted_arbiter_never_hands_the_lease_to_a_stale_primary() {
    a_restarted_arbiter_never_hands_the_lease_to_a_stale_primary_in(false)
}

#[test]
fn a_restarted_arbiter_never_hands_the_lease_to_a_stale_primary_with_the_lease_in_the_store() {
    a_restarted_arbiter_never_hands_the_lease_to_a_stale_primary_in(true)
}

#[test]
fn the_primary_dies_while_the_arbiter_is_down_and_the_backup_takes_over_when_it_returns() {
    the_primary_dies_while_the_arbiter_is_down_and_the_backup_takes_over_when_it_returns_in(false)
}

#[test]
fn the_primary_dies_while_the_arbiter_is_down_and_the_backup_takes_over_when_it_returns_with_the_lease_in_the_store() {
    the_primary_dies_while_the_arbiter_is_down_and_the_backup_takes_over_when_it_returns_in(true)
}

#[test]
fn arbiter_restarts_at_every_step() {
    arbiter_restarts_at_every_step_in(false)
}

#[test]
fn arbiter_restarts_at_every_step_with_the_lease_in_the_store() {
    arbiter_restarts_at_every_step_in(true)
}

#[test]
fn a_stalled_primary_that_comes_back_never_leaves_the_vm_without_a_copy() {
    a_stalled_primary_that_comes_back_never_leaves_the_vm_without_a_copy_in(false)
}

#[test]
fn a_stalled_primary_that_comes_back_never_leaves_the_vm_without_a_copy_with_the_lease_in_the_store() {
    a_stalled_primary_that_comes_back_never_leaves_the_vm_without_a_copy_in(true)
}

#[test]
fn lost_arbiter_answers_never_leave_the_vm_without_a_copy() {
    lost_arbiter_answers_never_leave_the_vm_without_a_copy_in(false)
}

#[test]
fn lost_arbiter_answers_never_leave_the_vm_without_a_copy_with_the_lease_in_the_store() {
    lost_arbiter_answers_never_leave_the_vm_without_a_copy_in(true)
}
