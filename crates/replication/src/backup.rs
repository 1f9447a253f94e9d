//! The backup's side of the protocol as a pure state machine (events in, actions out, time
//! passed in). The driver keeps the replica (memory, vCPU state, disk) and the staging buffer
//! of the checkpoint being received; this machine decides what to do with each message.
//!
//! A checkpoint is applied only when it has arrived whole: its epoch is the one after the
//! last committed epoch, its [`Msg::Commit`] counts match the pages and disk writes received,
//! and the driver's validation of the contents passes. Anything else is refused with a
//! reason and the last committed state is kept. Disk writes are held until their epoch
//! commits. When the primary falls silent for the timeout, the backup asks the arbiter for
//! the lease as the registered backup session, and takes over from the last committed
//! checkpoint once it has it (uncommitted disk writes are dropped).
//!
//! The backup also keeps the network output of its last committed epochs that the primary
//! had not yet reported released ([`Msg::Output`]), and hands it to the driver with the
//! takeover to send again at once: a reply the dead primary never released reaches the
//! client now, not at its TCP stack's next retransmission (a second, for smoltcp). A TCP peer
//! drops what it already had; a datagram may arrive twice.

use crate::lease::{Answer, Request};
use crate::wire::Msg;
use crate::Timing;
use std::collections::VecDeque;

/// Most bytes of network output kept for sending again after a takeover (staged for one
/// epoch, and kept over the committed epochs). Beyond it the oldest is dropped: the guest's
/// own retransmissions cover it.
pub const MAX_OUTPUT: usize = 64 << 20;

/// Most bytes of disk writes held for epochs not yet committed; beyond it the checkpoint is
/// refused (protection ends with the reason, and the primary synchronises a backup anew).
pub const DISK_HOLD_LIMIT: usize = 256 << 20;

/// Most bytes of network input kept for epochs not yet committed; beyond it the oldest is
/// dropped (it only spares a client a retransmission after a takeover).
pub const MAX_INPUT: usize = 16 << 20;

/// What happened, as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Time passed (call at least at [`Backup::next_wakeup`]).
    Tick,
    /// A primary connected.
    Connected,
    /// A message from the primary.
    Received(Msg),
    /// The primary's stream is damaged (bad checksum, truncated frame...): refuse and drop it.
    Corrupt { reason: String },
    /// The connection to the primary broke.
    Disconnected { reason: String },
    /// The driver applied (or failed to apply) the checkpoint of [`Action::Apply`].
    Applied { epoch: u64, result: Result<(), String> },
    /// The arbiter answered the takeover request sent at `sent_at`.
    Lease { sent_at: u64, answer: Result<Answer, String> },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A new session: discard any replica and staging; prepare an empty replica for `config`.
    Reset { session: u64, vm: String, mem_bytes: u64, config: Vec<u8> },
    /// Write initial-synchronisation memory into the replica.
    WriteSync { first_page: u64, data: Vec<u8> },
    /// Write initial-synchronisation disk contents to the disk.
    WriteDisk { offset: u64, data: Vec<u8> },
    /// Stage dirty pages of the checkpoint being received.
    Stage { epoch: u64, pages: Vec<u64>, data: Vec<u8> },
    /// Stage dirty pages sent as their XOR against the replica: rebuild them against the
    /// replica's pages as it stands (the last committed checkpoint) with
    /// [`crate::delta::resolve`], which checks the base and the result, then stage them as
    /// [`Action::Stage`]; on any mismatch report [`Event::Corrupt`] (never apply a delta to
    /// another base).
    StageDelta { epoch: u64, pages: Vec<u64>, base_crcs: Vec<u32>, pages_crc: u32, xor: Vec<u8> },
    /// Discard the staged pages (the checkpoint was refused).
    DiscardStaged,
    /// Apply the staged pages, the vCPU state and the clock to the replica, then write the
    /// epoch's disk writes (in order) to the disk; report [`Event::Applied`]. Validate
    /// everything before changing anything.
    Apply { epoch: u64, guest_ns: u64, vcpu: Vec<u8>, disk: Vec<(u64, Vec<u8>)> },
    /// Send a message to the primary.
    Send(Msg),
    /// Close the connection to the primary.
    Disconnect { reason: String },
    /// Send a request to the arbiter; report [`Event::Lease`].
    Lease(Request),
    /// Build the VM from the replica (committed through `epoch`), attach its network on this
    /// host, announce its addresses and run it; the arbiter granted the lease at `granted_at`.
    /// `replay` is the output of the committed epochs the primary had not reported released:
    /// send it again at once.
    /// `input` is the network input the VM received after that checkpoint (the replica has not
    /// seen it): the driver gives it to the VM before it runs.
    TakeOver { epoch: u64, granted_at: u64, gen: u64, replay: Vec<u8>, input: Vec<u8> },
    /// The replica can never be used (the primary dropped this backup, or never completed a
    /// checkpoint); wait for a new session.
    Abandon { reason: String },
    /// A change worth telling the operator.
    Notice(Notice),
}

/// Operator-visible changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A checkpoint was committed.
    Committed { epoch: u64, pages: u64, disk_writes: u64 },
    /// A checkpoint or message was refused.
    Refused { epoch: u64, reason: String },
    /// The primary has been silent for the timeout; asking for the lease.
    Suspecting { silent_ns: u64 },
    /// The primary is heard again.
    PrimaryBack,
    /// The primary handed the VM over after `epoch` (a planned handover): asking for the lease.
    HandedOver { epoch: u64, paused_ns: u64 },
    /// The arbiter says the primary's lease is still live.
    LeaseHeld { holder: String },
    /// The lease cannot be had now for another reason (the arbiter is unreachable, waits
    /// after a restart, or lost its state): said once until it answers normally again.
    ArbiterTrouble { reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No session.
    Waiting,
    /// A session; `committed` is the last committed epoch (None until the first commit).
    Replica { session: u64, committed: Option<u64> },
    /// Asking the arbiter for the lease.
    Suspecting { session: u64, committed: u64 },
    /// Took over: the driver runs the VM now.
    Active,
}

/// The backup's protocol state.
#[derive(Debug)]
pub struct Backup {
    vm: String,
    holder: String,
    timing: Timing,
    phase: Phase,
    connected: bool,
    /// Epoch and page count of the checkpoint being staged.
    staging: Option<(u64, u64)>,
    /// Pages of the VM's memory (from the hello): no checkpoint stages more.
    mem_pages: u64,
    /// Network output of the checkpoint being received, then of the committed epochs not
    /// known released (epoch, frames), and the highest epoch the primary reported released.
    staged_output: Vec<u8>,
    kept_output: VecDeque<(u64, Vec<u8>)>,
    /// Network input the VM received in epochs not yet committed here ([`Msg::Input`]), and its
    /// bytes.
    input: VecDeque<(u64, Vec<u8>)>,
    input_bytes: usize,
    released: u64,
    /// Disk writes not yet committed: (epoch, offset, data).
    disk: Vec<(u64, u64, Vec<u8>)>,
    /// Bytes of data in `disk` (counted from the last time it was empty).
    disk_bytes: usize,
    /// Disk writes in the checkpoint being applied.
    committed_writes: u64,
    /// Initial synchronisation: pages and disk chunks received, and whether it ended.
    sync_pages: u64,
    sync_chunks: u64,
    sync_done: bool,
    last_heard: u64,
    last_sent: u64,
    heartbeat_seq: u64,
    lease_pending: bool,
    next_try: u64,
    arbiter_trouble: bool,
}

impl Backup {
    /// A backup known to the arbiter as `holder`.
    pub fn new(holder: &str, timing: Timing) -> Backup {
        Backup {
            vm: String::new(),
            holder: holder.to_owned(),
            timing,
            phase: Phase::Waiting,
            connected: false,
            staging: None,
            mem_pages: 0,
            staged_output: Vec::new(),
            kept_output: VecDeque::new(),
            input: VecDeque::new(),
            input_bytes: 0,
            released: 0,
            disk: Vec::new(),
            disk_bytes: 0,
            committed_writes: 0,
            sync_pages: 0,
            sync_chunks: 0,
            sync_done: false,
            last_heard: 0,
            last_sent: 0,
            heartbeat_seq: 0,
            lease_pending: false,
            next_try: 0,
            arbiter_trouble: false,
        }
    }

    /// The last committed epoch of the current session.
    pub fn committed(&self) -> Option<u64> {
        match self.phase {
            Phase::Replica { committed, .. } => committed,
            Phase::Suspecting { committed, .. } => Some(committed),
            _ => None,
        }
    }

    /// Whether the backup took over.
    pub fn active(&self) -> bool {
        self.phase == Phase::Active
    }

    /// Handles one event at time `now`.
    pub fn handle(&mut self, now: u64, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        if self.phase == Phase::Active {
            return out;
        }
        match event {
            Event::Tick => {}
            Event::Connected => {
                self.connected = true;
                self.last_heard = now;
                self.last_sent = now;
            }
            Event::Received(msg) => {
                if self.connected {
                    self.heard(now, &mut out);
                    self.received(msg, &mut out);
                }
            }
            Event::Corrupt { reason } => {
                let epoch = self.expected_epoch().unwrap_or(0);
                self.refuse(epoch, reason, &mut out);
            }
            Event::Disconnected { reason: _ } => {
                // Nothing of an unfinished checkpoint is kept (a new session starts anew, a
                // takeover uses only the committed replica).
                self.connected = false;
                self.discard_staging(&mut out);
                self.disk = Vec::new();
                self.staged_output = Vec::new();
            }
            Event::Applied { epoch, result } => match (result, self.phase) {
                (Ok(()), Phase::Replica { session, .. }) => {
                    let pages = self.staging.take().map_or(0, |(_, n)| n);
                    self.phase = Phase::Replica { session, committed: Some(epoch) };
                    self.keep_output(epoch);
                    out.push(Action::Send(Msg::Ack { epoch }));
                    self.last_sent = now;
                    let writes = self.committed_writes;
                    out.push(Action::Notice(Notice::Committed { epoch, pages, disk_writes: writes }));
                }
                (Ok(()), _) => {}
                (Err(reason), _) => self.refuse(epoch, reason, &mut out),
            },
            Event::Lease { sent_at, answer } => {
                self.lease_pending = false;
                // A grant that arrives after the primary was heard again still stands: the
                // arbiter moved the lease to this backup, so the primary is fenced and only
                // this copy can keep the VM alive (its replica holds everything the primary
                // released: it released only what this backup acknowledged).
                let granted = matches!(answer, Ok(Answer::Granted { .. }));
                let phase = match self.phase {
                    Phase::Replica { session, committed: Some(committed) } if granted => Phase::Suspecting { session, committed },
                    p => p,
                };
                if let Phase::Suspecting { committed, .. } = phase {
                    if matches!(answer, Ok(Answer::Granted { .. } | Answer::Held { .. } | Answer::Revoked)) {
                        self.arbiter_trouble = false;
                    }
                    match answer {
                        Ok(Answer::Granted { gen, .. }) => {
                            self.phase = Phase::Active;
                            self.disk.clear();
                            self.discard_staging(&mut out);
                            out.push(Action::Disconnect { reason: "taking over".into() });
                            let released = self.released;
                            let replay = self.kept_output.drain(..).filter(|(e, _)| *e > released).flat_map(|(_, f)| f).collect();
                            // The input the replica has not seen: what arrived after the
                            // committed checkpoint's epoch.
                            let input = self.input.drain(..).filter(|(e, _)| *e > committed).flat_map(|(_, f)| f).collect();
                            self.input_bytes = 0;
                            out.push(Action::TakeOver { epoch: committed, granted_at: sent_at, gen, replay, input });
                            return out;
                        }
                        Ok(Answer::Held { holder, left_us }) => {
                            out.push(Action::Notice(Notice::LeaseHeld { holder }));
                            self.next_try = now.saturating_add(left_us.saturating_mul(1000).min(self.timing.lease_renew_ns));
                        }
                        Ok(Answer::Revoked) => {
                            self.abandon("the primary dropped this backup (the arbiter no longer registers its session)", &mut out);
                        }
                        Ok(Answer::Recovering { left_us }) => {
                            self.next_try = now.saturating_add(left_us.saturating_mul(1000)).saturating_add(1);
                            let reason = format!("the arbiter restarted and waits {} ms before granting leases", left_us / 1000);
                            self.trouble(reason, &mut out);
                        }
                        Ok(Answer::Unknown) => {
                            self.next_try = now.saturating_add(self.timing.lease_renew_ns / 4);
                            self.trouble("the arbiter has no record of this VM's lease (was its state lost?)".into(), &mut out);
                        }
                        Ok(Answer::Released) => {
                            self.next_try = now.saturating_add(self.timing.lease_renew_ns / 4);
                            self.trouble("unexpected answer: released".into(), &mut out);
                        }
                        Ok(Answer::Superseded { holder, .. }) => {
                            // Not an answer to a takeover; keep asking.
                            self.next_try = now.saturating_add(self.timing.lease_renew_ns / 4);
                            self.trouble(format!("unexpected answer: superseded by {holder}"), &mut out);
                        }
                        Err(reason) => {
                            self.next_try = now.saturating_add(self.timing.lease_renew_ns / 4);
                            self.trouble(reason, &mut out);
                        }
                    }
                }
            }
        }
        self.poll(now, &mut out);
        out
    }

    fn trouble(&mut self, reason: String, out: &mut Vec<Action>) {
        if !self.arbiter_trouble {
            self.arbiter_trouble = true;
            out.push(Action::Notice(Notice::ArbiterTrouble { reason }));
        }
    }

    fn heard(&mut self, now: u64, out: &mut Vec<Action>) {
        self.last_heard = now;
        if let Phase::Suspecting { session, committed } = self.phase {
            self.phase = Phase::Replica { session, committed: Some(committed) };
            out.push(Action::Notice(Notice::PrimaryBack));
        }
    }

    fn expected_epoch(&self) -> Option<u64> {
        match self.phase {
            Phase::Replica { committed: Some(c), .. } => Some(c + 1),
            _ => self.staging.map(|(e, _)| e),
        }
    }

    fn received(&mut self, msg: Msg, out: &mut Vec<Action>) {
        match msg {
            Msg::Hello { session, vm, mem_bytes, config } => {
                if self.lease_pending && self.committed().is_some() {
                    // The replica may be about to be needed: the arbiter may grant the takeover
                    // it was asked for. A new session waits until it has answered.
                    return self.refuse(0, "a takeover request is pending at the arbiter; try again".into(), out);
                }
                self.vm = vm.clone();
                self.mem_pages = mem_bytes / crate::wire::PAGE as u64;
                self.phase = Phase::Replica { session, committed: None };
                self.staging = None;
                self.disk.clear();
                self.staged_output = Vec::new();
                self.kept_output.clear();
                self.input.clear();
                self.input_bytes = 0;
                self.released = 0;
                (self.sync_pages, self.sync_chunks, self.sync_done) = (0, 0, false);
                out.push(Action::Reset { session, vm, mem_bytes, config });
            }
            Msg::Heartbeat { .. } => {}
            Msg::Handover { epoch, paused_ns } => match self.phase {
                Phase::Replica { session, committed: Some(c) } if c == epoch && self.staging.is_none() => {
                    // The primary paused the VM for good after this epoch and gave its lease
                    // up: take over now rather than after a silence.
                    self.phase = Phase::Suspecting { session, committed: c };
                    self.next_try = 0;
                    out.push(Action::Notice(Notice::HandedOver { epoch, paused_ns }));
                }
                _ => self.refuse(epoch, format!("a handover after epoch {epoch}, which is not the last committed one"), out),
            },
            Msg::Sync { first_page, data } => match self.phase {
                Phase::Replica { committed: None, .. } if !self.sync_done => {
                    self.sync_pages += (data.len() / crate::wire::PAGE) as u64;
                    out.push(Action::WriteSync { first_page, data })
                }
                _ => self.refuse(0, "initial-synchronisation memory outside the synchronisation".into(), out),
            },
            Msg::DiskSync { offset, data } => match self.phase {
                Phase::Replica { committed: None, .. } if !self.sync_done => {
                    self.sync_chunks += 1;
                    out.push(Action::WriteDisk { offset, data })
                }
                _ => self.refuse(0, "initial-synchronisation disk contents outside the synchronisation".into(), out),
            },
            Msg::SyncEnd { pages, disk_chunks } => match self.phase {
                Phase::Replica { committed: None, .. } if !self.sync_done => {
                    if (pages, disk_chunks) != (self.sync_pages, self.sync_chunks) {
                        let reason = format!(
                            "incomplete synchronisation: {} of {pages} pages and {} of {disk_chunks} disk chunks arrived",
                            self.sync_pages, self.sync_chunks
                        );
                        return self.refuse(0, reason, out);
                    }
                    self.sync_done = true;
                }
                _ => self.refuse(0, "end of synchronisation outside the synchronisation".into(), out),
            },
            Msg::DiskWrite { epoch, offset, data } => {
                if !matches!(self.phase, Phase::Replica { .. }) {
                    return self.refuse(epoch, "disk write before a hello".into(), out);
                }
                if self.expected_epoch().is_some_and(|e| epoch < e) {
                    return self.refuse(epoch, format!("disk write for epoch {epoch}, which is already committed"), out);
                }
                if self.disk.is_empty() {
                    self.disk_bytes = 0;
                }
                self.disk_bytes = self.disk_bytes.saturating_add(data.len());
                if self.disk_bytes > DISK_HOLD_LIMIT {
                    let reason = format!(
                        "disk writes of uncommitted epochs exceed {} MiB held (epoch {epoch}): the primary writes faster than checkpoints commit",
                        DISK_HOLD_LIMIT >> 20
                    );
                    return self.refuse(epoch, reason, out);
                }
                self.disk.push((epoch, offset, data));
            }
            Msg::Pages { epoch, pages, data } => match self.may_stage(epoch, pages.len()) {
                Ok(()) => out.push(Action::Stage { epoch, pages, data }),
                Err(reason) => self.refuse(epoch, reason, out),
            },
            Msg::PagesDelta { epoch, pages, base_crcs, pages_crc, xor } => match self.may_stage(epoch, pages.len()) {
                Ok(()) => out.push(Action::StageDelta { epoch, pages, base_crcs, pages_crc, xor }),
                Err(reason) => self.refuse(epoch, reason, out),
            },
            Msg::Commit { epoch, guest_ns, pages, disk_writes, vcpu } => {
                if !matches!(self.phase, Phase::Replica { .. }) {
                    return self.refuse(epoch, "commit before a hello".into(), out);
                }
                if !self.sync_done {
                    return self.refuse(epoch, "checkpoint before the end of the synchronisation".into(), out);
                }
                if let Some(e) = self.expected_epoch() {
                    if e != epoch {
                        return self.refuse(epoch, format!("commit of epoch {epoch} out of order (expected epoch {e})"), out);
                    }
                }
                let staged = self.staging.map_or(0, |(_, n)| n);
                if staged != pages {
                    return self.refuse(epoch, format!("incomplete checkpoint: {staged} of {pages} pages arrived"), out);
                }
                // Writes of later epochs may already be here (the primary's sender streams
                // writes as they happen); they stay held.
                let mine = self.disk.iter().filter(|(e, _, _)| *e == epoch).count() as u64;
                if mine != disk_writes {
                    return self.refuse(epoch, format!("incomplete checkpoint: {mine} of {disk_writes} disk writes arrived"), out);
                }
                // Writes tagged before the first committed epoch belong to the synchronisation.
                let (commit, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.disk).into_iter().partition(|(e, _, _)| *e <= epoch);
                self.disk_bytes = keep.iter().map(|(_, _, d)| d.len()).sum();
                self.disk = keep;
                self.committed_writes = commit.len() as u64;
                self.staging = Some((epoch, staged));
                out.push(Action::Apply { epoch, guest_ns, vcpu, disk: commit.into_iter().map(|(_, o, d)| (o, d)).collect() });
            }
            Msg::Output { epoch, released, frames } => {
                if !matches!(self.phase, Phase::Replica { .. }) || !self.sync_done {
                    return self.refuse(epoch, "network output before the end of the synchronisation".into(), out);
                }
                if let Some(e) = self.expected_epoch().filter(|e| *e != epoch) {
                    return self.refuse(epoch, format!("output of epoch {epoch} out of order (expected epoch {e})"), out);
                }
                if self.staged_output.len() + frames.len() > MAX_OUTPUT {
                    return self.refuse(epoch, format!("epoch {epoch} has more than {} MiB of network output", MAX_OUTPUT >> 20), out);
                }
                self.released = self.released.max(released);
                self.staged_output.extend_from_slice(&frames);
            }
            Msg::Input { epoch, frames } => {
                // Input of an epoch already committed here is in the replica: not kept.
                let committed = match self.phase {
                    Phase::Replica { committed, .. } => committed,
                    _ => return,
                };
                if committed.is_some_and(|c| epoch <= c) || frames.is_empty() {
                    return;
                }
                self.input_bytes += frames.len();
                self.input.push_back((epoch, frames));
                while self.input_bytes > MAX_INPUT {
                    let Some((_, f)) = self.input.pop_front() else { break };
                    self.input_bytes -= f.len();
                }
            }
            other => self.refuse(0, format!("unexpected {} message from the primary", other.kind()), out),
        }
    }

    /// Checks that `count` pages of `epoch` may be staged now, and counts them.
    fn may_stage(&mut self, epoch: u64, count: usize) -> Result<(), String> {
        if !matches!(self.phase, Phase::Replica { .. }) {
            return Err("pages before a hello".into());
        }
        if !self.sync_done {
            return Err("checkpoint pages before the end of the synchronisation".into());
        }
        if let Some(e) = self.expected_epoch() {
            if e != epoch {
                return Err(format!("pages of epoch {epoch} out of order (expected epoch {e})"));
            }
        }
        let n = self.staging.map_or(0, |(_, n)| n) + count as u64;
        if n > self.mem_pages {
            return Err(format!("epoch {epoch} stages {n} pages, more than the VM's {} pages", self.mem_pages));
        }
        self.staging = Some((epoch, n));
        Ok(())
    }

    /// Keeps the just-committed epoch's output; forgets what is known released and, beyond
    /// [`MAX_OUTPUT`], the oldest.
    fn keep_output(&mut self, epoch: u64) {
        // The input of committed epochs is in the replica now.
        while self.input.front().is_some_and(|(e, _)| *e <= epoch) {
            let (_, f) = self.input.pop_front().expect("checked");
            self.input_bytes -= f.len();
        }
        let frames = std::mem::take(&mut self.staged_output);
        if !frames.is_empty() {
            self.kept_output.push_back((epoch, frames));
        }
        let released = self.released;
        self.kept_output.retain(|(e, _)| *e > released);
        let mut total: usize = self.kept_output.iter().map(|(_, f)| f.len()).sum();
        while total > MAX_OUTPUT {
            let Some((_, f)) = self.kept_output.pop_front() else { break };
            total -= f.len();
        }
    }

    fn discard_staging(&mut self, out: &mut Vec<Action>) {
        if self.staging.take().is_some() {
            out.push(Action::DiscardStaged);
        }
    }

    fn refuse(&mut self, epoch: u64, reason: String, out: &mut Vec<Action>) {
        self.discard_staging(out);
        self.staged_output = Vec::new();
        self.disk.clear();
        out.push(Action::Send(Msg::Refuse { epoch, reason: reason.clone() }));
        out.push(Action::Disconnect { reason: reason.clone() });
        out.push(Action::Notice(Notice::Refused { epoch, reason }));
        self.connected = false;
    }

    fn abandon(&mut self, reason: &str, out: &mut Vec<Action>) {
        self.phase = Phase::Waiting;
        self.disk.clear();
        self.discard_staging(out);
        out.push(Action::Abandon { reason: reason.into() });
    }

    fn poll(&mut self, now: u64, out: &mut Vec<Action>) {
        let silent = now.saturating_sub(self.last_heard);
        match self.phase {
            Phase::Replica { session, committed } if silent > self.timing.timeout_ns => match committed {
                Some(committed) => {
                    self.phase = Phase::Suspecting { session, committed };
                    self.next_try = now;
                    out.push(Action::Notice(Notice::Suspecting { silent_ns: silent }));
                }
                None => self.abandon("the primary fell silent before the first checkpoint: there is no state to take over", out),
            },
            Phase::Replica { .. } if self.connected && now.saturating_sub(self.last_sent) >= self.timing.heartbeat_ns => {
                self.last_sent = now;
                self.heartbeat_seq += 1;
                out.push(Action::Send(Msg::Heartbeat { seq: self.heartbeat_seq }));
            }
            _ => {}
        }
        if let Phase::Suspecting { session, .. } = self.phase {
            if !self.lease_pending && now >= self.next_try {
                self.lease_pending = true;
                out.push(Action::Lease(Request::Takeover {
                    vm: self.vm.clone(),
                    holder: self.holder.clone(),
                    session,
                    ttl_us: self.timing.lease_ttl_ns / 1000,
                }));
            }
        }
    }

    /// When the driver must call [`Backup::handle`] with [`Event::Tick`] at the latest.
    pub fn next_wakeup(&self, now: u64) -> u64 {
        let mut w = now.saturating_add(self.timing.heartbeat_ns);
        if let Phase::Replica { .. } = self.phase {
            w = w.min(self.last_heard.saturating_add(self.timing.timeout_ns + 1));
        }
        if let Phase::Suspecting { .. } = self.phase {
            if !self.lease_pending {
                w = w.min(self.next_try);
            }
        }
        w.max(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synced() -> Backup {
        let mut b = Backup::new("b", Timing::default());
        b.handle(0, Event::Connected);
        b.handle(1, Event::Received(Msg::Hello { session: 9, vm: "vm".into(), mem_bytes: 8192, config: vec![] }));
        b.handle(2, Event::Received(Msg::Sync { first_page: 0, data: vec![0; 8192] }));
        b.handle(3, Event::Received(Msg::SyncEnd { pages: 2, disk_chunks: 0 }));
        b
    }

    fn commit(epoch: u64, pages: u64, disk_writes: u64) -> Event {
        Event::Received(Msg::Commit { epoch, guest_ns: 0, pages, disk_writes, vcpu: vec![1] })
    }

    fn refused(out: &[Action]) -> Option<String> {
        out.iter().find_map(|a| match a {
            Action::Send(Msg::Refuse { reason, .. }) => Some(reason.clone()),
            _ => None,
        })
    }

    fn apply(b: &mut Backup, epoch: u64) {
        b.handle(10 * epoch, Event::Received(Msg::Pages { epoch, pages: vec![1], data: vec![7; 4096] }));
        let out = b.handle(10 * epoch + 1, commit(epoch, 1, 0));
        assert!(out.iter().any(|a| matches!(a, Action::Apply { epoch: e, .. } if *e == epoch)), "{out:?}");
        let out = b.handle(10 * epoch + 2, Event::Applied { epoch, result: Ok(()) });
        assert!(out.contains(&Action::Send(Msg::Ack { epoch })));
    }

    #[test]
    fn whole_checkpoints_in_order_are_applied_and_acknowledged() {
        let mut b = synced();
        apply(&mut b, 5);
        apply(&mut b, 6);
        assert_eq!(b.committed(), Some(6));
    }

    #[test]
    fn a_truncated_checkpoint_is_refused_and_the_last_commit_kept() {
        let mut b = synced();
        apply(&mut b, 1);
        b.handle(20, Event::Received(Msg::Pages { epoch: 2, pages: vec![1], data: vec![7; 4096] }));
        let out = b.handle(21, commit(2, 3, 0));
        assert!(refused(&out).is_some_and(|r| r.contains("1 of 3 pages")), "{out:?}");
        assert!(out.contains(&Action::DiscardStaged));
        assert!(!out.iter().any(|a| matches!(a, Action::Apply { .. })));
        assert_eq!(b.committed(), Some(1));
    }

    #[test]
    fn a_checkpoint_of_more_pages_than_the_vm_has_is_refused_and_freed() {
        let mut b = synced();
        apply(&mut b, 1);
        // The VM has 2 pages (8192 bytes): a third page in one epoch is refused.
        b.handle(20, Event::Received(Msg::Pages { epoch: 2, pages: vec![0, 1], data: vec![7; 8192] }));
        let out = b.handle(21, Event::Received(Msg::Pages { epoch: 2, pages: vec![1], data: vec![7; 4096] }));
        assert!(refused(&out).is_some_and(|r| r.contains("3 pages, more than the VM's 2")), "{out:?}");
        assert!(out.contains(&Action::DiscardStaged));
        assert_eq!(b.committed(), Some(1));
    }

    #[test]
    fn a_missing_disk_write_is_refused() {
        let mut b = synced();
        apply(&mut b, 1);
        b.handle(20, Event::Received(Msg::DiskWrite { epoch: 2, offset: 0, data: vec![1; 512] }));
        // A write of the next epoch may come early; it does not count for this one.
        b.handle(21, Event::Received(Msg::DiskWrite { epoch: 3, offset: 512, data: vec![2; 512] }));
        let out = b.handle(22, commit(2, 0, 2));
        assert!(refused(&out).is_some_and(|r| r.contains("1 of 2 disk writes")), "{out:?}");
        assert_eq!(b.committed(), Some(1));
    }

    /// The backup holds uncommitted disk writes in memory: a primary that streams writes for
    /// an epoch that never commits is refused at the limit, not followed until memory runs out.
    #[test]
    fn uncommitted_disk_writes_are_bounded() {
        let mut b = synced();
        apply(&mut b, 1);
        let chunk = 1 << 20;
        for i in 0..DISK_HOLD_LIMIT / chunk {
            let out = b.handle(20, Event::Received(Msg::DiskWrite { epoch: 2, offset: 0, data: vec![1; chunk] }));
            assert!(refused(&out).is_none(), "write {i}: {out:?}");
        }
        let out = b.handle(21, Event::Received(Msg::DiskWrite { epoch: 2, offset: 0, data: vec![1; 512] }));
        assert!(refused(&out).is_some_and(|r| r.contains("exceed 256 MiB held (epoch 2)")), "{out:?}");
        assert_eq!(b.committed(), Some(1));
        // Committed writes no longer count.
        let mut b = synced();
        apply(&mut b, 1);
        for e in 2..6u64 {
            for _ in 0..DISK_HOLD_LIMIT / chunk / 2 {
                b.handle(20, Event::Received(Msg::DiskWrite { epoch: e, offset: 0, data: vec![1; chunk] }));
            }
            b.handle(10 * e, Event::Received(Msg::Pages { epoch: e, pages: vec![1], data: vec![7; 4096] }));
            let out = b.handle(10 * e + 1, commit(e, 1, (DISK_HOLD_LIMIT / chunk / 2) as u64));
            assert!(out.iter().any(|a| matches!(a, Action::Apply { .. })), "epoch {e}: {out:?}");
            b.handle(10 * e + 2, Event::Applied { epoch: e, result: Ok(()) });
        }
        assert_eq!(b.committed(), Some(5));
    }

    #[test]
    fn out_of_order_and_corrupt_checkpoints_are_refused() {
        let mut b = synced();
        apply(&mut b, 1);
        let out = b.handle(20, Event::Received(Msg::Pages { epoch: 3, pages: vec![1], data: vec![7; 4096] }));
        assert!(refused(&out).is_some_and(|r| r.contains("out of order (expected epoch 2)")), "{out:?}");
        assert_eq!(b.committed(), Some(1));
        let mut b = synced();
        apply(&mut b, 1);
        let out = b.handle(20, Event::Corrupt { reason: "bad checksum on a pages frame".into() });
        assert!(refused(&out).is_some_and(|r| r.contains("bad checksum")), "{out:?}");
        let out = b.handle(21, Event::Applied { epoch: 2, result: Err("page 99999 is outside guest memory".into()) });
        assert!(refused(&out).is_some_and(|r| r.contains("outside guest memory")), "{out:?}");
        assert_eq!(b.committed(), Some(1));
    }

    #[test]
    fn delta_pages_are_staged_for_the_driver_to_rebuild_and_checked_like_pages() {
        let mut b = synced();
        apply(&mut b, 1);
        let delta = |epoch| Msg::PagesDelta { epoch, pages: vec![1], base_crcs: vec![0], pages_crc: 0, xor: vec![0; 4096] };
        let out = b.handle(20, Event::Received(delta(2)));
        assert!(matches!(&out[..], [Action::StageDelta { epoch: 2, .. }]), "{out:?}");
        // The driver found the base is not the replica's: refused, staging discarded.
        let out = b.handle(21, Event::Corrupt { reason: "delta pages of epoch 2: page 1 of the replica is not the base".into() });
        assert!(refused(&out).is_some_and(|r| r.contains("page 1 of the replica")), "{out:?}");
        assert!(out.contains(&Action::DiscardStaged));
        assert_eq!(b.committed(), Some(1));
        let mut b = synced();
        apply(&mut b, 1);
        let out = b.handle(20, Event::Received(delta(3)));
        assert!(refused(&out).is_some_and(|r| r.contains("out of order (expected epoch 2)")), "{out:?}");
    }

    #[test]
    fn checkpoints_before_the_end_of_the_synchronisation_are_refused() {
        let mut b = Backup::new("b", Timing::default());
        b.handle(0, Event::Connected);
        b.handle(1, Event::Received(Msg::Hello { session: 9, vm: "vm".into(), mem_bytes: 8192, config: vec![] }));
        b.handle(2, Event::Received(Msg::Sync { first_page: 0, data: vec![0; 4096] }));
        let out = b.handle(3, Event::Received(Msg::SyncEnd { pages: 2, disk_chunks: 0 }));
        assert!(refused(&out).is_some_and(|r| r.contains("1 of 2 pages")), "{out:?}");
    }

    #[test]
    fn a_silent_primary_leads_to_a_takeover_only_with_the_lease() {
        let t = Timing::default();
        let mut b = synced();
        apply(&mut b, 1);
        let out = b.handle(100 + t.timeout_ns, Event::Tick);
        let Some(Action::Lease(Request::Takeover { session: 9, .. })) = out.iter().find(|a| matches!(a, Action::Lease(_))) else {
            panic!("no takeover request: {out:?}");
        };
        let out = b.handle(200 + t.timeout_ns, Event::Lease { sent_at: 150, answer: Ok(Answer::Held { holder: "a".into(), left_us: 10 }) });
        assert!(!out.iter().any(|a| matches!(a, Action::TakeOver { .. })));
        let out = b.handle(300 + t.timeout_ns, Event::Lease { sent_at: 250, answer: Ok(Answer::Granted { gen: 2, backup: None }) });
        assert!(out.contains(&Action::TakeOver { epoch: 1, granted_at: 250, gen: 2, replay: vec![], input: vec![] }), "{out:?}");
        assert!(b.active());
    }

    #[test]
    fn a_takeover_sends_again_the_committed_output_not_known_released() {
        let t = Timing::default();
        let mut b = synced();
        let output = |b: &mut Backup, now, epoch, released, byte: u8| {
            let frames = [&4u32.to_le_bytes()[..], &[byte; 4]].concat();
            let out = b.handle(now, Event::Received(Msg::Output { epoch, released, frames }));
            assert!(refused(&out).is_none(), "{out:?}");
        };
        // Epoch 1's output (released by the time epoch 3 is sent), epoch 2's and epoch 3's
        // (not known released), and epoch 4's, which never commits.
        for (e, released) in [(1, 0), (2, 0), (3, 1), (4, 1)] {
            output(&mut b, 10 * e, e, released, e as u8);
            if e < 4 {
                apply(&mut b, e);
            }
        }
        let out = b.handle(100 + t.timeout_ns, Event::Tick);
        assert!(out.iter().any(|a| matches!(a, Action::Lease(_))));
        let out = b.handle(300 + t.timeout_ns, Event::Lease { sent_at: 250, answer: Ok(Answer::Granted { gen: 2, backup: None }) });
        let Some(Action::TakeOver { epoch: 3, replay, .. }) = out.iter().find(|a| matches!(a, Action::TakeOver { .. })) else {
            panic!("{out:?}");
        };
        let want: Vec<u8> = [2u8, 3].iter().flat_map(|e| [&4u32.to_le_bytes()[..], &[*e; 4]].concat()).collect();
        assert_eq!(*replay, want);
        // Output for the wrong epoch is refused.
        let mut b = synced();
        apply(&mut b, 1);
        let out = b.handle(50, Event::Received(Msg::Output { epoch: 5, released: 0, frames: vec![] }));
        assert!(refused(&out).is_some_and(|r| r.contains("out of order")), "{out:?}");
    }

    #[test]
    fn a_takeover_gives_the_vm_the_input_received_after_the_committed_checkpoint() {
        let t = Timing::default();
        let mut b = synced();
        let input = |b: &mut Backup, now, epoch, byte: u8| {
            let frames = [&4u32.to_le_bytes()[..], &[byte; 4]].concat();
            let out = b.handle(now, Event::Received(Msg::Input { epoch, frames }));
            assert!(refused(&out).is_none(), "{out:?}");
        };
        // Input of epochs 1 and 2 (committed: in the replica), 3 (its checkpoint never
        // arrives) and 4; epoch 1's input arrives again late (after its commit).
        input(&mut b, 5, 1, 1);
        apply(&mut b, 1);
        input(&mut b, 11, 2, 2);
        input(&mut b, 12, 1, 9);
        apply(&mut b, 2);
        input(&mut b, 21, 3, 3);
        input(&mut b, 22, 4, 4);
        let out = b.handle(100 + t.timeout_ns, Event::Tick);
        assert!(out.iter().any(|a| matches!(a, Action::Lease(_))));
        let out = b.handle(300 + t.timeout_ns, Event::Lease { sent_at: 250, answer: Ok(Answer::Granted { gen: 2, backup: None }) });
        let Some(Action::TakeOver { epoch: 2, input, .. }) = out.iter().find(|a| matches!(a, Action::TakeOver { .. })) else {
            panic!("{out:?}");
        };
        let want: Vec<u8> = [3u8, 4].iter().flat_map(|e| [&4u32.to_le_bytes()[..], &[*e; 4]].concat()).collect();
        assert_eq!(*input, want);
        // Bounded: the oldest goes first.
        let mut b = synced();
        let big = [&(60_000u32).to_le_bytes()[..], &vec![7u8; 60_000]].concat();
        for i in 0..(2 * MAX_INPUT / 60_000) as u64 {
            b.handle(i, Event::Received(Msg::Input { epoch: 1 + i, frames: big.clone() }));
        }
        assert!(b.input_bytes <= MAX_INPUT && b.input.front().is_some_and(|(e, _)| *e > 1));
    }

    /// Found by `vigil bench replication` on a loaded host: the primary stalls past the
    /// timeout, the backup asks for the lease, the primary is heard again, then the grant
    /// arrives. Dropping it would leave the VM with no copy at all (the primary is fenced by
    /// the grant): the backup must take over.
    #[test]
    fn a_handover_after_the_last_committed_epoch_asks_for_the_lease_at_once() {
        let mut b = synced();
        apply(&mut b, 1);
        apply(&mut b, 2);
        let mut wrong = synced();
        apply(&mut wrong, 1);
        apply(&mut wrong, 2);
        let out = wrong.handle(30, Event::Received(Msg::Handover { epoch: 1, paused_ns: 0 }));
        assert!(refused(&out).is_some_and(|r| r.contains("not the last committed")), "{out:?}");
        let out = b.handle(31, Event::Received(Msg::Handover { epoch: 2, paused_ns: 0 }));
        assert!(out.iter().any(|a| matches!(a, Action::Lease(Request::Takeover { session: 9, .. }))), "{out:?}");
        let out = b.handle(32, Event::Lease { sent_at: 31, answer: Ok(Answer::Granted { gen: 2, backup: None }) });
        assert!(out.iter().any(|a| matches!(a, Action::TakeOver { epoch: 2, .. })), "{out:?}");
    }

    #[test]
    fn a_grant_that_arrives_after_the_primary_was_heard_again_is_taken() {
        let t = Timing::default();
        let mut b = synced();
        apply(&mut b, 1);
        let out = b.handle(100 + t.timeout_ns, Event::Tick);
        assert!(out.iter().any(|a| matches!(a, Action::Lease(Request::Takeover { .. }))), "{out:?}");
        let out = b.handle(110 + t.timeout_ns, Event::Received(Msg::Heartbeat { seq: 5 }));
        assert!(out.contains(&Action::Notice(Notice::PrimaryBack)));
        // A new session cannot start while the request is out.
        let hello = Msg::Hello { session: 10, vm: "vm".into(), mem_bytes: 8192, config: vec![] };
        let out = b.handle(111 + t.timeout_ns, Event::Received(hello));
        assert!(refused(&out).is_some_and(|r| r.contains("takeover request is pending")), "{out:?}");
        let out = b.handle(120 + t.timeout_ns, Event::Lease { sent_at: 100, answer: Ok(Answer::Granted { gen: 2, backup: None }) });
        assert!(out.iter().any(|a| matches!(a, Action::TakeOver { epoch: 1, gen: 2, .. })), "{out:?}");
        assert!(b.active());
    }
}
