//! The primary's side of the protocol as a pure state machine: events in, actions out, time
//! passed in by the caller (ns on a monotonic clock). No I/O; the driver ([`crate::driver`])
//! performs the actions and feeds back what happened.
//!
//! Per epoch: the driver pauses the VM, stages the dirty pages and vCPU state, seals the
//! epoch's network output, resumes the VM ([`Action::Checkpoint`] → [`Event::Staged`]) and
//! streams the checkpoint; the backup's acknowledgement lets the output of that epoch out
//! ([`Action::Release`]). At most one checkpoint is unacknowledged. Output is released only
//! while the arbiter's lease is valid by this side's clock and registers the backup that
//! acknowledged it (see [`crate::lease`]); without a backup, once the arbiter confirms that
//! no backup may take over, output flows unheld and the VM runs unprotected.

use crate::lease::{Answer, Request};
use crate::policy::{Done, Policy, View};
use crate::wire::Msg;
use crate::Timing;

/// What happened, as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Time passed (the driver calls this at least at [`Primary::next_wakeup`]).
    Tick,
    /// A connection to the backup is up; `session` is a fresh random id for it.
    Connected { session: u64 },
    /// Connecting to the backup failed.
    ConnectFailed { reason: String },
    /// All of memory went out for the initial synchronisation.
    SyncSent,
    /// A checkpoint was staged (the VM runs again) and queued for sending; it closed network
    /// epoch `epoch`, in which the VM sent `output_frames` frames.
    Staged { epoch: u64, output_frames: u64 },
    /// A message from the backup.
    Received(Msg),
    /// The connection to the backup broke.
    BackupLost { reason: String },
    /// The VM sent network output into the open epoch.
    Output,
    /// The arbiter answered a lease request sent at `sent_at` (or could not be reached).
    Lease { sent_at: u64, answer: Result<Answer, String> },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Connect to the backup; report [`Event::Connected`] or [`Event::ConnectFailed`].
    Connect,
    /// Hold the VM's network output back by epoch and log dirty pages (and mirror disk writes).
    Hold,
    /// Log dirty pages and mirror disk writes, output not held (a new backup synchronises).
    Track,
    /// Start holding the output of a VM already tracked ([`Action::Track`]).
    HoldOutput,
    /// Send a hello for `session`, then all of guest memory while the VM runs; report
    /// [`Event::SyncSent`].
    StartSync { session: u64 },
    /// Take a checkpoint; report [`Event::Staged`].
    Checkpoint,
    /// Send the held output of every epoch up to `epoch`.
    Release { epoch: u64 },
    /// Stop holding output (send what is held) and stop logging: the VM runs unprotected.
    Unhold,
    /// Send a message to the backup.
    Send(Msg),
    /// Close the backup connection.
    Disconnect { reason: String },
    /// Send a request to the arbiter; report [`Event::Lease`].
    Lease(Request),
    /// Another copy holds the lease: stop the VM now and never release output again.
    Fenced { holder: String },
    /// A change worth telling the operator (and the metrics).
    Notice(Notice),
    /// Pause the VM for the last checkpoint of a handover (it stays paused).
    PauseVm,
    /// Resume the VM paused for a handover that failed (the backup was lost first).
    ResumeVm,
    /// The handover is done: the arbiter ended this copy's lease, and the backup was told to
    /// take over from `epoch` ([`Msg::Handover`], sent just before). Stop the VM for good.
    HandedOver { epoch: u64 },
}

/// A planned handover to the backup (live migration), as far as it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handover {
    None,
    /// Asked for: the last checkpoint is taken once the one in flight is acknowledged.
    Asked,
    /// The VM is paused for good and its last checkpoint was taken (`epoch` once staged).
    Last {
        epoch: Option<u64>,
    },
    /// The backup acknowledged the last checkpoint: the arbiter is asked to end the lease.
    Releasing {
        epoch: u64,
        session: u64,
    },
    /// The lease ended and the backup was told to take over (at `at`): waiting for it to
    /// close the connection, which it does when it takes over (no heartbeats meanwhile).
    Told {
        epoch: u64,
        at: u64,
    },
    /// The connection is gone: renewing the lease under this copy's generation without the
    /// backup tells whether the backup took over (superseded: done) or never can (granted:
    /// the VM resumes here).
    Confirming {
        epoch: u64,
    },
}

/// Operator-visible changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Synchronising a new backup (session).
    Syncing { session: u64 },
    /// The backup holds a committed replica: the VM is protected.
    Protected { session: u64 },
    /// No backup: the VM runs unprotected.
    Unprotected { reason: String },
    /// A checkpoint was acknowledged `duration_ns` after it started.
    Acked { epoch: u64, duration_ns: u64, mode: &'static str },
    /// Output of epochs up to `epoch` went out; the oldest of it had waited `delay_ns`.
    Released { epoch: u64, delay_ns: Option<u64> },
    /// The arbiter could not be reached or cannot grant the lease yet (said once, until
    /// [`Notice::ArbiterBack`]).
    ArbiterUnreachable { reason: String },
    /// The arbiter granted the lease again after trouble.
    ArbiterBack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// No backup; try again at the given time.
    Idle {
        retry_at: u64,
    },
    Connecting,
    /// Hello and memory are going out; no checkpoint acknowledged yet.
    Syncing {
        session: u64,
        sync_sent: bool,
    },
    Protected {
        session: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Inflight {
    epoch: u64,
    started: u64,
    output_frames: u64,
}

/// The primary's protocol state.
#[derive(Debug)]
pub struct Primary {
    vm: String,
    holder: String,
    timing: Timing,
    policy: Box<dyn Policy>,
    link: Link,
    holding: bool,
    /// Dirty pages and disk writes tracked (the VMM protects the VM).
    tracking: bool,
    checkpointing: bool,
    inflight: Option<Inflight>,
    /// Highest epoch sealed, acknowledged, released.
    sealed: u64,
    acked: u64,
    released: u64,
    /// First output of each sealed-but-unreleased epoch (epoch, time).
    output_times: Vec<(u64, u64)>,
    last_start: u64,
    output_since: Option<u64>,
    last_heard: u64,
    last_sent: u64,
    heartbeat_seq: u64,
    lease_valid_until: u64,
    lease_pending: bool,
    next_renew: u64,
    /// The backup registration the arbiter last confirmed (`None`: unknown yet).
    registered: Option<Option<u64>>,
    /// The backup session whose protection was announced ([`Notice::Protected`]).
    announced: Option<u64>,
    ever_granted: bool,
    /// The lease's generation granted to this copy (0: none yet).
    gen: u64,
    /// The arbiter's trouble was reported (reported once until it grants again).
    arbiter_trouble: bool,
    fenced: bool,
    stopped: bool,
    handover: Handover,
    /// When the VM was paused for a handover's last checkpoint.
    paused_at: u64,
}

impl Primary {
    /// A primary for VM `vm`, known to the arbiter as `holder`. Call [`Primary::start`] next.
    pub fn new(vm: &str, holder: &str, timing: Timing, policy: Box<dyn Policy>) -> Primary {
        Primary {
            vm: vm.to_owned(),
            holder: holder.to_owned(),
            timing,
            policy,
            link: Link::Idle { retry_at: 0 },
            holding: false,
            tracking: false,
            checkpointing: false,
            inflight: None,
            sealed: 0,
            acked: 0,
            released: 0,
            output_times: Vec::new(),
            last_start: 0,
            output_since: None,
            last_heard: 0,
            last_sent: 0,
            heartbeat_seq: 0,
            lease_valid_until: 0,
            lease_pending: false,
            next_renew: 0,
            registered: None,
            announced: None,
            ever_granted: false,
            gen: 0,
            arbiter_trouble: false,
            fenced: false,
            stopped: false,
            handover: Handover::None,
            paused_at: 0,
        }
    }

    /// Starts a planned handover to the backup (live migration's last step): once the
    /// checkpoint in flight is acknowledged, the VM is paused for good and a last checkpoint
    /// taken; once the backup acknowledges it, the arbiter ends this copy's lease early and
    /// the backup is told to take over ([`Action::HandedOver`]). Only a protected VM (a backup
    /// with a committed replica) can be handed over. If the backup is lost before it
    /// acknowledged the last checkpoint, the VM is resumed here; if it is lost after, this
    /// copy renews its lease without the backup first (so that the backup can no longer take
    /// over) and resumes only if that is granted — exactly one copy runs in every case.
    pub fn handover(&mut self, now: u64) -> Result<Vec<Action>, String> {
        if self.fenced || self.stopped {
            return Err("the VM is stopped".into());
        }
        if self.handover != Handover::None {
            return Err("a handover is in progress".into());
        }
        if !self.protected() || self.gen == 0 {
            return Err("not protected yet: no backup with a committed replica is registered in the lease".into());
        }
        if self.registered != Some(self.wanted()) {
            // Found by `vigil bench migration`: a handover asked for right after protection,
            // before the arbiter registered the backup, was refused (revoked) for ever.
            return Err("the arbiter has not registered the backup yet".into());
        }
        self.handover = Handover::Asked;
        let mut out = Vec::new();
        self.poll(now, &mut out);
        Ok(out)
    }

    /// Whether a handover is in progress.
    pub fn handing_over(&self) -> bool {
        self.handover != Handover::None
    }

    /// Whether this copy is silent on purpose: the backup was told to take over, and one that
    /// missed the message must time out (nothing may be sent to it, not even a heartbeat).
    pub fn silent(&self) -> bool {
        matches!(self.handover, Handover::Told { .. })
    }

    /// Starts protection: output is held until the arbiter grants the lease, and a backup is
    /// sought at once.
    pub fn start(&mut self, now: u64) -> Vec<Action> {
        self.holding = true;
        self.tracking = true;
        self.last_start = now;
        let mut out = vec![Action::Hold];
        self.poll(now, &mut out);
        out
    }

    /// Starts protecting a VM that has been running unprotected (a migration's source, whose
    /// output already flowed): the lease is claimed and a backup sought at once, but output is
    /// not held — the new backup cannot take over before its first commit, and output is held
    /// from the checkpoint that ends its synchronisation on, as for any new backup.
    pub fn start_running(&mut self, now: u64) -> Vec<Action> {
        self.last_start = now;
        let mut out = Vec::new();
        self.poll(now, &mut out);
        out
    }

    /// Continues as the primary after a takeover: the lease was granted at `granted_at` under
    /// generation `gen` with no backup registered, so the VM runs unprotected until a new
    /// backup joins.
    pub fn after_takeover(&mut self, now: u64, granted_at: u64, gen: u64) -> Vec<Action> {
        self.gen = gen;
        self.lease_valid_until = granted_at.saturating_add(self.timing.lease_ttl_ns);
        self.registered = Some(None);
        self.ever_granted = true;
        self.next_renew = granted_at.saturating_add(self.timing.lease_renew_ns);
        self.holding = false;
        self.tracking = false;
        self.last_start = now;
        let mut out = vec![Action::Notice(Notice::Unprotected { reason: "took over; no backup yet".into() })];
        self.poll(now, &mut out);
        out
    }

    /// The VM stopped on its own (it exited, or was told to quit): drop the backup and
    /// register "no backup" at the arbiter, so that the backup does not take over a VM that
    /// ended on purpose. Nothing else happens afterwards.
    pub fn stop(&mut self, _now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if self.connected() || self.link == Link::Connecting {
            out.push(Action::Disconnect { reason: "the VM stopped".into() });
        }
        self.link = Link::Idle { retry_at: u64::MAX };
        self.inflight = None;
        self.stopped = true;
        out.push(Action::Lease(Request::Renew {
            vm: self.vm.clone(),
            holder: self.holder.clone(),
            gen: self.gen,
            ttl_us: self.timing.lease_ttl_ns / 1000,
            backup: None,
        }));
        out
    }

    /// The lease's generation this copy holds (0: not granted yet).
    pub fn generation(&self) -> u64 {
        self.gen
    }

    /// Replaces the checkpoint policy (takes effect from the next checkpoint).
    pub fn set_policy(&mut self, policy: Box<dyn Policy>) {
        self.policy = policy;
    }

    /// The current policy's name and mode.
    pub fn policy(&self) -> (String, &'static str) {
        (self.policy.name(), self.policy.mode())
    }

    /// Whether a backup holds a committed replica and is registered in the lease, so that it
    /// can take over (a backup that acknowledged its first checkpoint is registered with the
    /// next renewal, about one round trip later).
    pub fn protected(&self) -> bool {
        matches!(self.link, Link::Protected { session } if self.registered == Some(Some(session)))
    }

    /// Announces protection once it holds ([`Primary::protected`]), once per backup session.
    fn announce(&mut self, out: &mut Vec<Action>) {
        if let Link::Protected { session } = self.link {
            if self.protected() && self.announced != Some(session) {
                self.announced = Some(session);
                out.push(Action::Notice(Notice::Protected { session }));
            }
        }
    }

    /// Whether the lease was lost to another copy.
    pub fn fenced(&self) -> bool {
        self.fenced
    }

    /// Highest epoch whose output was released.
    pub fn released(&self) -> u64 {
        self.released
    }

    /// Handles one event at time `now`.
    pub fn handle(&mut self, now: u64, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        if self.fenced || self.stopped {
            return out;
        }
        if let (Handover::Confirming { epoch }, Event::Lease { answer: Ok(a), .. }) = (self.handover, &event) {
            match a {
                Answer::Superseded { .. } => {
                    // The backup took over: the VM runs there now.
                    self.lease_pending = false;
                    self.stopped = true;
                    out.push(Action::HandedOver { epoch });
                    return out;
                }
                Answer::Granted { .. } => {
                    // Renewed without the backup: it never took over and never can now.
                    self.handover = Handover::None;
                    self.link = Link::Idle { retry_at: now.saturating_add(self.timing.reconnect_ns) };
                    out.push(Action::ResumeVm);
                }
                _ => {}
            }
        }
        match event {
            Event::Tick => {}
            Event::Connected { session } => {
                if self.link == Link::Connecting {
                    // Dirty pages and disk writes are tracked from now on, but output keeps
                    // flowing while the new backup synchronises: until it holds a committed
                    // replica it is not registered with the arbiter and cannot take over, so
                    // nothing released now can be contradicted. Output is held from the
                    // checkpoint that ends the synchronisation.
                    self.link = Link::Syncing { session, sync_sent: false };
                    self.last_heard = now;
                    self.last_sent = now;
                    if !self.tracking {
                        self.tracking = true;
                        out.push(Action::Track);
                    }
                    out.push(Action::StartSync { session });
                    out.push(Action::Notice(Notice::Syncing { session }));
                } else {
                    out.push(Action::Disconnect { reason: "not expecting a connection".into() });
                }
            }
            Event::ConnectFailed { reason: _ } => {
                if self.link == Link::Connecting {
                    self.link = Link::Idle { retry_at: now.saturating_add(self.timing.reconnect_ns) };
                }
            }
            Event::SyncSent => {
                if let Link::Syncing { session, .. } = self.link {
                    self.link = Link::Syncing { session, sync_sent: true };
                }
            }
            Event::Staged { epoch, output_frames } => {
                self.checkpointing = false;
                if self.handover == (Handover::Last { epoch: None }) {
                    self.handover = Handover::Last { epoch: Some(epoch) };
                }
                self.sealed = self.sealed.max(epoch);
                if let Some(t) = self.output_since.take() {
                    self.output_times.push((epoch, t));
                }
                if self.connected() {
                    self.inflight = Some(Inflight { epoch, started: self.last_start, output_frames });
                }
            }
            Event::Received(msg) => self.received(now, msg, &mut out),
            Event::BackupLost { reason } => self.lose_backup(now, reason, &mut out),
            Event::Output => {
                if self.holding && self.output_since.is_none() {
                    self.output_since = Some(now);
                }
            }
            Event::Lease { answer: Ok(Answer::Released), .. } => {
                self.lease_pending = false;
                match self.handover {
                    Handover::Releasing { epoch, .. } => {
                        self.lease_valid_until = 0;
                        self.handover = Handover::Told { epoch, at: now };
                        out.push(Action::Send(Msg::Handover { epoch, paused_ns: now.saturating_sub(self.paused_at) }));
                        return out;
                    }
                    _ => {
                        // The handover was abandoned (the backup was lost) after the arbiter
                        // ended the lease: renew it at once (under this generation, without
                        // the backup) or learn that the backup took over.
                        self.lease_valid_until = 0;
                        self.next_renew = now;
                    }
                }
            }
            Event::Lease { answer: Ok(Answer::Revoked | Answer::Unknown), .. } if matches!(self.handover, Handover::Releasing { .. }) => {
                // The arbiter does not register this backup (its state was lost, or another
                // registration came first): the backup can never take over, so the VM runs
                // on here, protected as before; the handover may be asked for again.
                self.lease_pending = false;
                self.handover = Handover::None;
                self.next_renew = now;
                out.push(Action::ResumeVm);
            }
            Event::Lease { sent_at, answer } => {
                self.lease_pending = false;
                if answer.is_ok() && self.arbiter_trouble && matches!(answer, Ok(Answer::Granted { .. })) {
                    self.arbiter_trouble = false;
                    out.push(Action::Notice(Notice::ArbiterBack));
                }
                match answer {
                    Ok(Answer::Granted { gen, .. }) if self.gen != 0 && gen != self.gen => {
                        // Cannot come from a correct arbiter: never release under another
                        // generation than the one this copy was granted.
                        self.fenced = true;
                        out.push(Action::Fenced { holder: format!("generation {gen} (this copy holds {})", self.gen) });
                        return out;
                    }
                    Ok(Answer::Granted { gen, backup }) => {
                        self.gen = gen;
                        self.lease_valid_until = sent_at.saturating_add(self.timing.lease_ttl_ns);
                        self.registered = Some(backup);
                        self.ever_granted = true;
                        self.next_renew = if backup == self.wanted() { sent_at.saturating_add(self.timing.lease_renew_ns) } else { now };
                        self.announce(&mut out);
                    }
                    Ok(Answer::Held { left_us, .. }) if !self.ever_granted => {
                        // Another copy's lease has not run out yet (a previous run): wait.
                        self.next_renew = now.saturating_add(left_us.saturating_mul(1000)).saturating_add(1);
                    }
                    Ok(Answer::Held { holder, .. }) => {
                        self.fenced = true;
                        out.push(Action::Fenced { holder });
                        return out;
                    }
                    Ok(Answer::Superseded { gen, holder }) => {
                        self.fenced = true;
                        out.push(Action::Fenced {
                            holder: format!("{holder} (lease generation {gen} superseded this copy's {})", self.gen),
                        });
                        return out;
                    }
                    Ok(Answer::Recovering { left_us }) => {
                        self.next_renew = now.saturating_add(left_us.saturating_mul(1000)).saturating_add(1);
                        self.trouble(format!("the arbiter restarted and waits {} ms before granting leases", left_us / 1000), &mut out);
                    }
                    Ok(Answer::Revoked) => self.next_renew = now.saturating_add(self.timing.lease_renew_ns / 4),
                    Ok(Answer::Released) => {}
                    Ok(Answer::Unknown) => {
                        // A renewal under a generation the arbiter has no record of: its
                        // state was lost. Output waits; keep asking.
                        self.next_renew = now.saturating_add(self.timing.lease_renew_ns / 4);
                        self.trouble("the arbiter has no record of this VM's lease (was its state lost?)".into(), &mut out);
                    }
                    Err(reason) => {
                        self.next_renew = now.saturating_add(self.timing.lease_renew_ns / 4);
                        self.trouble(reason, &mut out);
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
            out.push(Action::Notice(Notice::ArbiterUnreachable { reason }));
        }
    }

    fn connected(&self) -> bool {
        matches!(self.link, Link::Syncing { .. } | Link::Protected { .. })
    }

    fn session(&self) -> Option<u64> {
        match self.link {
            Link::Syncing { session, .. } | Link::Protected { session } => Some(session),
            _ => None,
        }
    }

    /// The backup the arbiter should register.
    fn wanted(&self) -> Option<u64> {
        // Only a backup with a committed replica is registered (may take over).
        match self.link {
            Link::Protected { session } => Some(session),
            _ => None,
        }
    }

    fn received(&mut self, now: u64, msg: Msg, out: &mut Vec<Action>) {
        if !self.connected() {
            return;
        }
        self.last_heard = now;
        match msg {
            Msg::Heartbeat { .. } => {}
            Msg::Ack { epoch } => match self.inflight {
                Some(f) if f.epoch == epoch => {
                    self.inflight = None;
                    self.acked = epoch;
                    let done = Done { epoch, duration_ns: now.saturating_sub(f.started), output_frames: f.output_frames };
                    self.policy.done(&done);
                    out.push(Action::Notice(Notice::Acked { epoch, duration_ns: done.duration_ns, mode: self.policy.mode() }));
                    if let Link::Syncing { session, .. } = self.link {
                        self.link = Link::Protected { session };
                        self.announce(out);
                    }
                    if let (Handover::Last { epoch: Some(last) }, Link::Protected { session }) = (self.handover, self.link) {
                        if last == epoch {
                            // The backup holds everything the VM will ever do here.
                            self.handover = Handover::Releasing { epoch, session };
                        }
                    }
                }
                _ => self.lose_backup(now, format!("acknowledgement of epoch {epoch}, which is not in flight"), out),
            },
            Msg::Refuse { epoch, reason } => self.lose_backup(now, format!("the backup refused epoch {epoch}: {reason}"), out),
            other => self.lose_backup(now, format!("unexpected {} message from the backup", other.kind()), out),
        }
    }

    fn lose_backup(&mut self, now: u64, reason: String, out: &mut Vec<Action>) {
        match std::mem::replace(&mut self.handover, Handover::None) {
            Handover::None | Handover::Asked => {}
            // Paused for a handover that cannot finish: run on here. Output stays held until
            // the arbiter confirms the backup is deregistered (or says it took over: then
            // this copy is fenced), as whenever a backup is lost.
            Handover::Last { .. } | Handover::Releasing { .. } => out.push(Action::ResumeVm),
            // Told to take over, the backup closes the connection when it does (or it died):
            // the arbiter tells which, before anything runs again here.
            Handover::Told { epoch, .. } | Handover::Confirming { epoch } => {
                self.handover = Handover::Confirming { epoch };
                if self.connected() {
                    out.push(Action::Disconnect { reason: reason.clone() });
                }
                self.link = Link::Idle { retry_at: u64::MAX };
                self.inflight = None;
                self.next_renew = now;
                return;
            }
        }
        if self.connected() || self.link == Link::Connecting {
            out.push(Action::Disconnect { reason: reason.clone() });
            out.push(Action::Notice(Notice::Unprotected { reason }));
        }
        self.link = Link::Idle { retry_at: now.saturating_add(self.timing.reconnect_ns) };
        self.inflight = None;
        // Deregister the backup at once, so held output can go.
        self.next_renew = now;
    }

    fn poll(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.fenced {
            return;
        }
        // A backup told to take over that neither closes the connection nor takes over in
        // twice the timeout and the lease: ask the arbiter (as if it were lost).
        if let Handover::Told { at, .. } = self.handover {
            if now.saturating_sub(at) > 2 * (self.timing.timeout_ns + self.timing.lease_ttl_ns) {
                self.lose_backup(now, "the backup did not take over".into(), out);
            }
        }
        // The lease: while handing over, this copy asks to end it instead of renewing it, and
        // asks nothing while the backup takes over.
        if matches!(self.handover, Handover::Told { .. }) {
        } else if let Handover::Releasing { session, .. } = self.handover {
            if !self.lease_pending {
                self.lease_pending = true;
                out.push(Action::Lease(Request::Handover { vm: self.vm.clone(), holder: self.holder.clone(), gen: self.gen, session }));
            }
        } else if !self.lease_pending && now >= self.next_renew {
            self.lease_pending = true;
            out.push(Action::Lease(Request::Renew {
                vm: self.vm.clone(),
                holder: self.holder.clone(),
                gen: self.gen,
                ttl_us: self.timing.lease_ttl_ns / 1000,
                backup: self.wanted(),
            }));
        }
        // The backup link.
        match self.link {
            Link::Idle { retry_at } if now >= retry_at => {
                self.link = Link::Connecting;
                out.push(Action::Connect);
            }
            Link::Syncing { .. } | Link::Protected { .. } if matches!(self.handover, Handover::Told { .. }) => {
                // Silent: a backup that missed the handover message times out and takes over.
            }
            Link::Syncing { .. } | Link::Protected { .. } => {
                if now.saturating_sub(self.last_heard) > self.timing.timeout_ns {
                    let ms = now.saturating_sub(self.last_heard) as f64 / 1e6;
                    self.lose_backup(now, format!("no word from the backup for {ms:.0} ms"), out);
                } else if now.saturating_sub(self.last_sent) >= self.timing.heartbeat_ns {
                    self.last_sent = now;
                    self.heartbeat_seq += 1;
                    out.push(Action::Send(Msg::Heartbeat { seq: self.heartbeat_seq }));
                }
            }
            _ => {}
        }
        // The last checkpoint of a handover: the VM paused for good first.
        if self.handover == Handover::Asked && !self.checkpointing && self.inflight.is_none() {
            self.handover = Handover::Last { epoch: None };
            self.paused_at = now;
            self.checkpointing = true;
            self.last_start = now;
            self.last_sent = now;
            out.push(Action::PauseVm);
            out.push(Action::Checkpoint);
        }
        // The next checkpoint.
        let ready = match self.link {
            _ if self.handover != Handover::None => false,
            Link::Syncing { sync_sent, .. } => sync_sent && self.acked_all(),
            Link::Protected { .. } => {
                let view = View { now, last_start: self.last_start, output_since: self.output_since };
                self.acked_all() && now >= self.policy.next(&view)
            }
            _ => false,
        };
        if ready && !self.checkpointing && self.inflight.is_none() {
            if !self.holding {
                // The checkpoint that ends a synchronisation: output from here on waits for
                // the acknowledgement of its epoch.
                self.holding = true;
                out.push(Action::HoldOutput);
            }
            self.checkpointing = true;
            self.last_start = now;
            self.last_sent = now;
            out.push(Action::Checkpoint);
        }
        self.release(now, out);
    }

    fn acked_all(&self) -> bool {
        self.inflight.is_none()
    }

    fn release(&mut self, now: u64, out: &mut Vec<Action>) {
        if matches!(self.handover, Handover::Releasing { .. } | Handover::Told { .. } | Handover::Confirming { .. }) {
            // The backup will send the last epochs' output when it takes over.
            return;
        }
        if now >= self.lease_valid_until || self.registered != Some(self.wanted()) {
            return;
        }
        let upto = match self.session() {
            Some(_) => self.acked,
            None => self.sealed,
        };
        if upto > self.released {
            self.released = upto;
            let oldest = self.output_times.iter().filter(|(e, _)| *e <= upto).map(|(_, t)| *t).min();
            self.output_times.retain(|(e, _)| *e > upto);
            out.push(Action::Release { epoch: upto });
            out.push(Action::Notice(Notice::Released { epoch: upto, delay_ns: oldest.map(|t| now.saturating_sub(t)) }));
        }
        if self.session().is_none() && (self.holding || self.tracking) && !self.checkpointing {
            self.holding = false;
            self.tracking = false;
            self.output_since = None;
            self.output_times.clear();
            out.push(Action::Unhold);
        }
    }

    /// When the driver must call [`Primary::handle`] with [`Event::Tick`] at the latest.
    pub fn next_wakeup(&self, now: u64) -> u64 {
        let t = &self.timing;
        let mut w = now.saturating_add(t.heartbeat_ns);
        if !self.lease_pending {
            w = w.min(self.next_renew);
        }
        if let Link::Idle { retry_at } = self.link {
            w = w.min(retry_at);
        }
        if let Link::Protected { .. } = self.link {
            if self.inflight.is_none() && !self.checkpointing {
                let view = View { now, last_start: self.last_start, output_since: self.output_since };
                w = w.min(self.policy.next(&view));
            }
        }
        w.max(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_vm_deregisters_its_backup_and_does_nothing_more() {
        let mut p = Primary::new("vm", "a", Timing::default(), Box::new(crate::policy::Adaptive::default()));
        p.start(0);
        p.handle(1, Event::Connected { session: 7 });
        let out = p.stop(2);
        assert!(out.contains(&Action::Disconnect { reason: "the VM stopped".into() }));
        assert!(out.iter().any(|a| matches!(a, Action::Lease(Request::Renew { backup: None, .. }))));
        assert!(p.handle(1_000_000_000, Event::Tick).is_empty());
    }

    /// A protected primary with lease generation 1 and backup session 5 registered.
    fn protected() -> Primary {
        let mut p = Primary::new("vm", "a", Timing::default(), Box::new(crate::policy::Adaptive::default()));
        p.start(0);
        p.handle(1, Event::Lease { sent_at: 0, answer: Ok(Answer::Granted { gen: 1, backup: None }) });
        p.handle(2, Event::Connected { session: 5 });
        let out = p.handle(3, Event::SyncSent);
        assert!(out.contains(&Action::Checkpoint), "{out:?}");
        p.handle(4, Event::Staged { epoch: 1, output_frames: 0 });
        let out = p.handle(5, Event::Received(Msg::Ack { epoch: 1 }));
        assert!(!p.protected() && !out.iter().any(|a| matches!(a, Action::Notice(Notice::Protected { .. }))), "not registered yet");
        let out = p.handle(6, Event::Lease { sent_at: 5, answer: Ok(Answer::Granted { gen: 1, backup: Some(5) }) });
        assert!(p.protected());
        assert!(out.contains(&Action::Notice(Notice::Protected { session: 5 })), "{out:?}");
        p
    }

    #[test]
    fn a_handover_pauses_takes_a_last_checkpoint_ends_the_lease_and_tells_the_backup() {
        let mut p = Primary::new("vm", "a", Timing::default(), Box::new(crate::policy::Adaptive::default()));
        p.start(0);
        assert!(p.handover(1).unwrap_err().contains("not protected"));
        let mut p = protected();
        let out = p.handover(10).expect("protected");
        assert_eq!(out.iter().filter(|a| matches!(a, Action::PauseVm | Action::Checkpoint)).count(), 2, "{out:?}");
        assert!(p.handover(11).is_err(), "one at a time");
        p.handle(12, Event::Staged { epoch: 2, output_frames: 1 });
        // No more checkpoints; the acknowledgement of the last asks the arbiter to end the lease.
        let out = p.handle(13, Event::Tick);
        assert!(!out.contains(&Action::Checkpoint), "{out:?}");
        let out = p.handle(14, Event::Received(Msg::Ack { epoch: 2 }));
        assert!(out.contains(&Action::Lease(Request::Handover { vm: "vm".into(), holder: "a".into(), gen: 1, session: 5 })), "{out:?}");
        assert!(!out.iter().any(|a| matches!(a, Action::Release { .. })), "the backup sends the last output: {out:?}");
        let out = p.handle(15, Event::Lease { sent_at: 14, answer: Ok(Answer::Released) });
        assert_eq!(out, vec![Action::Send(Msg::Handover { epoch: 2, paused_ns: 5 })]);
        // Silent now (no heartbeats, no lease requests) until the backup closes the connection.
        let hb = Timing::default().heartbeat_ns;
        assert!(p.handle(16 + hb * 3, Event::Tick).is_empty());
        let out = p.handle(17 + hb * 3, Event::BackupLost { reason: "closed".into() });
        assert!(out.iter().any(|a| matches!(a, Action::Lease(Request::Renew { gen: 1, backup: None, .. }))), "{out:?}");
        assert!(!out.contains(&Action::ResumeVm), "{out:?}");
        let out = p.handle(20 + hb * 3, Event::Lease { sent_at: 18, answer: Ok(Answer::Superseded { gen: 2, holder: "b".into() }) });
        assert_eq!(out, vec![Action::HandedOver { epoch: 2 }]);
        assert!(p.handle(21 + hb * 3, Event::Tick).is_empty());
    }

    #[test]
    fn a_backup_that_dies_once_told_to_take_over_leaves_the_vm_here() {
        let mut p = protected();
        p.handover(10).expect("protected");
        p.handle(12, Event::Staged { epoch: 2, output_frames: 1 });
        p.handle(14, Event::Received(Msg::Ack { epoch: 2 }));
        p.handle(15, Event::Lease { sent_at: 14, answer: Ok(Answer::Released) });
        let out = p.handle(16, Event::BackupLost { reason: "reset".into() });
        assert!(!out.contains(&Action::ResumeVm), "not before the arbiter says: {out:?}");
        let out = p.handle(18, Event::Lease { sent_at: 16, answer: Ok(Answer::Granted { gen: 1, backup: None }) });
        assert!(out.contains(&Action::ResumeVm), "{out:?}");
        assert!(out.iter().any(|a| matches!(a, Action::Release { .. })), "its held output goes: {out:?}");
        assert!(!p.handing_over());
    }

    #[test]
    fn a_running_vm_protected_for_a_migration_keeps_its_output_flowing_until_the_first_checkpoint() {
        let mut p = Primary::new("vm", "a", Timing::default(), Box::new(crate::policy::Adaptive::default()));
        let out = p.start_running(0);
        assert!(!out.iter().any(|a| matches!(a, Action::Hold | Action::HoldOutput)), "{out:?}");
        assert!(out.iter().any(|a| matches!(a, Action::Lease(Request::Renew { gen: 0, .. }))), "the lease is claimed: {out:?}");
        p.handle(1, Event::Lease { sent_at: 0, answer: Ok(Answer::Granted { gen: 1, backup: None }) });
        let out = p.handle(2, Event::Connected { session: 5 });
        assert!(out.contains(&Action::Track) && !out.contains(&Action::Hold), "{out:?}");
        let out = p.handle(3, Event::SyncSent);
        assert_eq!(out.iter().filter(|a| matches!(a, Action::HoldOutput | Action::Checkpoint)).count(), 2, "{out:?}");
    }

    #[test]
    fn a_handover_waits_for_the_backups_registration_and_a_refused_one_resumes_the_vm() {
        let mut p = Primary::new("vm", "a", Timing::default(), Box::new(crate::policy::Adaptive::default()));
        p.start(0);
        p.handle(1, Event::Lease { sent_at: 0, answer: Ok(Answer::Granted { gen: 1, backup: None }) });
        p.handle(2, Event::Connected { session: 5 });
        p.handle(3, Event::SyncSent);
        p.handle(4, Event::Staged { epoch: 1, output_frames: 0 });
        p.handle(5, Event::Received(Msg::Ack { epoch: 1 }));
        assert!(!p.protected(), "the backup holds a replica but is not registered yet");
        assert!(p.handover(6).unwrap_err().contains("not protected"), "the lease does not register the backup yet");
        let mut p = protected();
        p.handover(10).expect("registered");
        p.handle(12, Event::Staged { epoch: 2, output_frames: 0 });
        p.handle(14, Event::Received(Msg::Ack { epoch: 2 }));
        let out = p.handle(15, Event::Lease { sent_at: 14, answer: Ok(Answer::Revoked) });
        assert!(out.contains(&Action::ResumeVm), "{out:?}");
        assert!(!p.handing_over() && p.protected());
    }

    #[test]
    fn a_handover_whose_backup_is_lost_resumes_the_vm_and_deregisters_the_backup() {
        for acked in [false, true] {
            let mut p = protected();
            p.handover(10).expect("protected");
            p.handle(12, Event::Staged { epoch: 2, output_frames: 1 });
            if acked {
                p.handle(14, Event::Received(Msg::Ack { epoch: 2 }));
            }
            let out = p.handle(20, Event::BackupLost { reason: "gone".into() });
            assert!(out.contains(&Action::ResumeVm), "{out:?}");
            // The arbiter's answer to the handover may still come: the lease is renewed
            // without the backup before any output goes.
            let out = p.handle(21, Event::Lease { sent_at: 14, answer: Ok(Answer::Released) });
            assert!(out.iter().any(|a| matches!(a, Action::Lease(Request::Renew { gen: 1, backup: None, .. }))) || !acked, "{out:?}");
            assert!(!out.iter().any(|a| matches!(a, Action::Release { .. })), "{out:?}");
            assert!(!p.handing_over());
        }
    }
}
