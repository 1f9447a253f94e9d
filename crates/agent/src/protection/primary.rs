//! The primary's driver: runs a VM under protection, performing the actions of
//! [`replication::primary::Primary`] with the VMM (protect, checkpoint, release, unprotect), a TCP
//! connection to the backup (a reader thread and a sender thread that streams memory, disk
//! writes and checkpoints in order), and the arbiter.
//!
//! The sender keeps the order the backup relies on: the disk writes of an epoch are taken
//! from the VMM's mirror channel and written before that epoch's checkpoint, and the commit
//! frame says how many there were.

use super::stats::{self, EpochStats, Shared, Stats};
use super::{handshake, random_id, spawn_arbiter, spawn_reader, Clock, Input, Side};
use crate::auth::Key;
use replication::compress::{Chooser, Compression, Encoding, Sample};
use replication::delta::BackupCopy;
use replication::primary::{Action, Event, Notice, Primary};
use replication::wire::{self, Msg, PAGE};
use replication::PolicySpec;
use replication::Timing;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufWriter, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::checkpoint::Checkpoint;
use vmm::memory::MemoryView;
use vmm::{Command, Controller, Inbox, MirrorReceiver, MirrorSender, Stop, Vm};

/// How to protect a VM.
pub struct Options {
    /// The VM's name (its lease at the arbiter).
    pub vm: String,
    /// This host's name at the arbiter.
    pub holder: String,
    /// The backup's address (HOST:PORT); `None`: run unprotected (after a takeover with no
    /// new backup).
    pub backup: Option<String>,
    /// The arbiter's address (HOST:PORT).
    pub arbiter: String,
    pub policy: PolicySpec,
    pub timing: Timing,
    /// Print a JSON line per checkpoint on stderr ([`EpochStats`]).
    pub stats_lines: bool,
    /// Serve metrics and the policy switch on this address.
    pub control: Option<String>,
    /// The VM's disk file (mirrored and synchronised to the backup), if it has one.
    pub disk: Option<PathBuf>,
    /// Keep the replication state ([`ReplicationState`], JSON) in this file for the agent.
    pub state_file: Option<PathBuf>,
    /// The cluster's key (the arbiter and the backup authenticate with it).
    pub key: Key,
    /// The vCPU thread's real-time scheduling (applied by that thread when it starts).
    pub vcpu_sched: crate::vm::Scheduling,
    /// Whether checkpoint pages travel compressed (`replication::compress`).
    pub compression: replication::compress::Compression,
    /// This copy took over by a planned handover, the VM stopped this long (ms): reported in
    /// the replication state.
    pub handover_ms: Option<f64>,
}

/// Whether a VM is protected, as its driver last reported it, and the replication figures of
/// the last second (the agent reads it and publishes it in the VM's `actual` record).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReplicationState {
    pub protected: bool,
    pub detail: String,
    #[serde(default)]
    pub figures: Option<crate::cluster::ReplicationFigures>,
    /// This copy took the VM over by a planned handover (live migration); the VM stopped
    /// this long (ms), from its pause at the source to running here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover_ms: Option<f64>,
    /// The checkpoint policy the driver runs now (it may have been switched while it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The backup address the driver protects the VM to now (it may have been replaced while
    /// it runs: a migration's destination, or the plan's backup after a takeover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
}

impl ReplicationState {
    /// Writes it to `path` atomically ([`crate::replace_file`]).
    pub fn save(&self, path: &std::path::Path) {
        let ok = serde_json::to_vec(self).ok().is_some_and(|b| crate::replace_file(path, &b).is_ok());
        if !ok {
            tracing::warn!("cannot write the replication state to {}", path.display());
        }
    }

    pub fn load(path: &std::path::Path) -> Option<ReplicationState> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

/// How the driver ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The VM stopped (exit, fault or quit).
    Stopped(Stop),
    /// Another copy took the lease: this VM was stopped.
    Fenced { holder: String },
    /// A planned handover: the backup runs the VM from `epoch` on; this copy was stopped.
    HandedOver { epoch: u64 },
}

/// How the driver starts.
pub enum Start {
    /// A new primary: output is held until the arbiter grants the lease.
    Fresh,
    /// A backup that just took over; the lease was granted at `granted_at` (by `clock`) under
    /// generation `gen`.
    TakeOver { granted_at: u64, gen: u64 },
    /// A VM that ran unprotected until now (a migration's source): its output is not held
    /// while the backup synchronises.
    Running,
}

enum Out {
    Msg(Msg),
    Sync {
        view: MemoryView,
        disk: Option<PathBuf>,
        /// The disk's write ring, settled before the disk is read.
        settle: Option<vmm::backend::Settler>,
    },
    /// A checkpoint, and the highest epoch whose output was released when it was taken.
    Checkpoint(Box<Checkpoint>, u64),
    /// The VM received input: forward it.
    Input,
}

struct Link {
    id: u64,
    stream: TcpStream,
    out: Sender<Out>,
}

/// Runs `vm` (on its own thread, controlled through `ctl`/`inbox`) under protection until it
/// stops or is fenced. `clock` is the state machine's clock (shared with a backup driver
/// that took over).
pub fn run(vm: Vm, ctl: Controller, inbox: Inbox, opts: Options, start: Start, clock: Clock) -> Result<Outcome, String> {
    let (tx, rx) = channel::<Input>();
    let running = spawn_vcpu(vm, inbox, opts.vcpu_sched.clone(), tx.clone())?;
    run_attached(running, ctl, opts, start, clock, tx, rx)
}

/// A VM whose vCPU runs on its own thread ([`spawn_vcpu`]): what a driver needs to know of it.
pub struct Running {
    /// Its configuration (JSON), for the backup's replica.
    pub config: Vec<u8>,
    pub has_net: bool,
}

/// Starts `vm`'s vCPU on its own thread (under `sched`); it reports [`Input::Output`] (the
/// first held frame of each epoch) and [`Input::VmStopped`] on `tx`.
pub fn spawn_vcpu(vm: Vm, inbox: Inbox, sched: crate::vm::Scheduling, tx: Sender<Input>) -> Result<Running, String> {
    let vm_tx = tx.clone();
    let mut vm = vm;
    let config = serde_json::to_vec(vm.config()).map_err(|e| format!("the VM's configuration: {e}"))?;
    let has_net = vm.config().tap.is_some();
    let hook_tx = tx;
    vm.set_output_hook(Box::new(move || {
        let _ = hook_tx.send(Input::Output);
    }));
    std::thread::Builder::new()
        .name("vcpu0".into())
        .spawn(move || {
            let r = sched.apply_to_vcpu(&mut vm).and_then(|()| vm.run(Some(&inbox)).map_err(|e| e.to_string()));
            let _ = vm_tx.send(Input::VmStopped(r));
        })
        .map_err(|e| format!("cannot start the vCPU thread: {e}"))?;
    Ok(Running { config, has_net })
}

/// Protects a VM that already runs ([`spawn_vcpu`]; its reports arrive on `rx`, which `tx`
/// feeds) until it stops, is fenced or handed over.
pub fn run_attached(
    vm: Running,
    ctl: Controller,
    opts: Options,
    start: Start,
    clock: Clock,
    tx: Sender<Input>,
    rx: Receiver<Input>,
) -> Result<Outcome, String> {
    let mut driver = Driver::new(ctl, opts, clock, tx, vm.config)?;
    driver.has_net = vm.has_net;
    driver.run(rx, start)
}

struct Driver {
    ctl: Controller,
    opts: Options,
    clock: Clock,
    tx: Sender<Input>,
    arbiter: crate::fencing::Lease,
    stats: Shared,
    link: Option<Link>,
    next_conn: u64,
    connecting: Option<u64>,
    mirror_tx: MirrorSender,
    mirror_rx: Arc<Mutex<MirrorReceiver>>,
    /// The frames the VM receives, forwarded to the backup as they arrive.
    input: vmm::devices::net::InputLog,
    spare: Vec<Vec<u8>>,
    pending: BTreeMap<u64, EpochStats>,
    /// The VM's configuration (JSON), for the backup's replica.
    config: Vec<u8>,
    /// Print every action and its duration (`VIGIL_DEBUG` set).
    debug: bool,
    /// The senders' leave to keep the link alive ([`Voice`]).
    voice: Voice,
    /// Whether the VM has a network device (output to release).
    has_net: bool,
    protected_logged: bool,
    /// What the state file says (written when protection changes and once a second).
    state: ReplicationState,
    window: Window,
    /// Actions from a request outside the state machine's events (a handover), done next.
    queued: Vec<Action>,
    /// When a handover was asked for (its duration is logged).
    handover_started: Option<Instant>,
    /// The connection of a finished handover, closed once the backup took over.
    closing: Option<(u64, TcpStream)>,
    injected: Injected,
    recent: Recent,
}

/// Fault injection for tests and benchmarks: with `VIGIL_INJECT_PAUSE_DIR=DIR`, each checkpoint
/// of VM `vm` keeps the VM paused for the number of µs in the file `DIR/<vm>` longer (read at
/// most every 200 ms; no file or 0: nothing), as a guest dirtying more memory or a slower host
/// would. Used to make pauses grow while a VM runs (`manager::interval`).
#[derive(Default)]
struct Injected {
    dir: Option<PathBuf>,
    read_at: Option<Instant>,
    pause: Duration,
}

impl Injected {
    fn from_env() -> Injected {
        Injected { dir: std::env::var_os("VIGIL_INJECT_PAUSE_DIR").map(PathBuf::from), ..Injected::default() }
    }

    fn pause(&mut self, vm: &str) -> Duration {
        let Some(dir) = &self.dir else { return Duration::ZERO };
        if self.read_at.is_none_or(|t| t.elapsed() >= Duration::from_millis(200)) {
            self.read_at = Some(Instant::now());
            let us = std::fs::read_to_string(dir.join(vm)).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
            self.pause = Duration::from_micros(us.min(1_000_000));
        }
        self.pause
    }
}

/// Checkpoints acknowledged and output released since the window began.
struct Window {
    since: std::time::Instant,
    checkpoints: u64,
    pause_ns: u64,
    pause_max_ns: u64,
    bytes: u64,
    released: u64,
    delay_ns: u64,
    delay_max_ns: u64,
    /// The backup's part of each acknowledgement: from the checkpoint's last byte on the
    /// socket to its acknowledgement (the model's `checkpoint_ack`).
    ack_ns: u64,
    ack_max_ns: u64,
}

/// The last [`Recent::SPAN`] of checkpoints (pause, page copying within it, the backup's
/// acknowledgement), for their 99th percentiles: over seconds, not one window, so that a
/// long interval's few checkpoints a second still leave a percentile below the maximum.
#[derive(Default)]
struct Recent {
    samples: VecDeque<(Instant, u64, u64, u64)>,
}

impl Recent {
    const SPAN: Duration = Duration::from_secs(10);
    const MAX: usize = 8192;

    fn add(&mut self, e: &EpochStats) {
        let now = Instant::now();
        if self.samples.len() == Self::MAX {
            self.samples.pop_front();
        }
        self.samples.push_back((now, e.pause_ns, e.copy_ns, e.backup_ack_ns()));
        while self.samples.front().is_some_and(|s| now.duration_since(s.0) > Self::SPAN) {
            self.samples.pop_front();
        }
    }

    /// The 99th percentiles of pause, copying and acknowledgement (ns).
    fn p99(&self) -> (u64, u64, u64) {
        let q = |f: fn(&(Instant, u64, u64, u64)) -> u64| quantile(&mut self.samples.iter().map(f).collect::<Vec<_>>(), 0.99);
        (q(|s| s.1), q(|s| s.2), q(|s| s.3))
    }
}

/// The `q` quantile of `v` (sorted in place), 0 when empty.
fn quantile(v: &mut [u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

impl Window {
    /// How often the state file gets the window's figures.
    const LENGTH: Duration = Duration::from_secs(1);

    fn add(&mut self, e: &EpochStats) {
        self.checkpoints += 1;
        self.pause_ns += e.pause_ns;
        self.pause_max_ns = self.pause_max_ns.max(e.pause_ns);
        self.bytes += e.bytes;
        let ack = e.backup_ack_ns();
        self.ack_ns += ack;
        self.ack_max_ns = self.ack_max_ns.max(ack);
    }

    fn new() -> Window {
        Window {
            since: std::time::Instant::now(),
            checkpoints: 0,
            pause_ns: 0,
            pause_max_ns: 0,
            bytes: 0,
            released: 0,
            delay_ns: 0,
            delay_max_ns: 0,
            ack_ns: 0,
            ack_max_ns: 0,
        }
    }

    fn figures(&self, policy: &str, mode: &str, total: u64, recent: &Recent) -> crate::cluster::ReplicationFigures {
        let (pause_p99, copy_p99, ack_p99) = recent.p99();
        let secs = self.since.elapsed().as_secs_f64().max(1e-3);
        let ms = |ns: u64| ns as f64 / 1e6;
        crate::cluster::ReplicationFigures {
            policy: policy.to_string(),
            mode: mode.to_string(),
            checkpoints: total,
            per_second: self.checkpoints as f64 / secs,
            pause_mean_ms: if self.checkpoints > 0 { ms(self.pause_ns) / self.checkpoints as f64 } else { 0.0 },
            pause_max_ms: ms(self.pause_max_ns),
            bytes_per_second: self.bytes as f64 / secs,
            output_delay_mean_ms: if self.released > 0 { ms(self.delay_ns) / self.released as f64 } else { 0.0 },
            output_delay_max_ms: ms(self.delay_max_ns),
            ack_mean_ms: if self.checkpoints > 0 { ms(self.ack_ns) / self.checkpoints as f64 } else { 0.0 },
            ack_max_ms: ms(self.ack_max_ns),
            pause_p99_ms: ms(pause_p99),
            copy_p99_ms: ms(copy_p99),
            ack_p99_ms: ms(ack_p99),
            at_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        }
    }
}

impl Driver {
    fn new(ctl: Controller, opts: Options, clock: Clock, tx: Sender<Input>, config: Vec<u8>) -> Result<Driver, String> {
        let arbiter = spawn_arbiter(&opts.arbiter, Duration::from_nanos(opts.timing.lease_ttl_ns), opts.key.clone(), clock, tx.clone());
        let handover_ms = opts.handover_ms;
        let policy = Some(opts.policy.to_string());
        let backup = opts.backup.clone();
        let stats: Shared = Arc::new(Mutex::new(Stats {
            vm: opts.vm.clone(),
            role: "primary",
            policy: opts.policy.to_string(),
            mode: opts.policy.build().mode(),
            ..Stats::default()
        }));
        if let Some(addr) = &opts.control {
            let (ptx, prx) = channel::<PolicySpec>();
            let fwd = tx.clone();
            std::thread::spawn(move || {
                for name in prx {
                    let _ = fwd.send(Input::Policy(name));
                }
            });
            let bound =
                stats::serve(addr, stats.clone(), Some((ptx, opts.key.clone()))).map_err(|e| format!("control address {addr}: {e}"))?;
            tracing::info!("{}: metrics on http://{bound}/metrics", opts.vm);
        }
        let (mirror_tx, mirror_rx) = vmm::mirror_channel(vmm::mirror::MIRROR_LIMIT);
        Ok(Driver {
            ctl,
            opts,
            clock,
            tx,
            arbiter,
            stats,
            link: None,
            next_conn: 1,
            connecting: None,
            mirror_tx,
            mirror_rx: Arc::new(Mutex::new(mirror_rx)),
            input: Default::default(),
            spare: Vec::new(),
            pending: BTreeMap::new(),
            config,
            debug: std::env::var_os("VIGIL_DEBUG").is_some(),
            voice: Voice::new(clock),
            has_net: true,
            protected_logged: false,
            state: ReplicationState { protected: false, detail: "not yet protected".into(), figures: None, handover_ms, policy, backup },
            window: Window::new(),
            queued: Vec::new(),
            handover_started: None,
            closing: None,
            injected: Injected::from_env(),
            recent: Recent::default(),
        })
    }

    fn log(&self, what: impl std::fmt::Display) {
        tracing::info!("{}: {what}", self.opts.vm);
    }

    fn run(mut self, rx: Receiver<Input>, start: Start) -> Result<Outcome, String> {
        let timing = self.opts.timing;
        let policy = self.opts.policy.build();
        let mut sm = Primary::new(&self.opts.vm, &self.opts.holder, timing, policy);
        let now = self.clock.now();
        let mut actions: VecDeque<Action> = match start {
            Start::Fresh => sm.start(now),
            Start::TakeOver { granted_at, gen } => sm.after_takeover(now, granted_at, gen),
            Start::Running => sm.start_running(now),
        }
        .into();
        loop {
            while let Some(a) = actions.pop_front() {
                self.voice.renew(timing.heartbeat_ns, sm.silent());
                let t0 = Instant::now();
                let what = if self.debug { format!("{a:?}") } else { String::new() };
                if let Some(outcome) = self.act(&mut sm, a, &mut actions)? {
                    if let Some((id, stream)) = self.closing.take() {
                        // The handover message is queued on the sender (its channel now
                        // closed: it ends once the message is written); the backup closes the
                        // connection when it takes over. Wait for that, a little.
                        let deadline = Instant::now() + Duration::from_millis(1000);
                        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                            match rx.recv_timeout(left) {
                                Ok(Input::Frame { conn, msg: Err(_) }) if conn == id => break,
                                Ok(_) => {}
                                Err(_) => break,
                            }
                        }
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                    return Ok(outcome);
                }
                if self.debug {
                    tracing::debug!(
                        "{:.3} {:.3} ms: {}",
                        self.clock.now() as f64 / 1e6,
                        t0.elapsed().as_secs_f64() * 1e3,
                        &what[..what.len().min(100)]
                    );
                }
            }
            let now = self.clock.now();
            let wait = sm.next_wakeup(now).saturating_sub(now).min(5_000_000);
            // Leave to speak for as long as this loop may wait, and a heartbeat beyond.
            self.voice.renew(wait.saturating_add(timing.heartbeat_ns), sm.silent());
            let input = match rx.recv_timeout(Duration::from_nanos(wait)) {
                Ok(i) => Some(i),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return Err("internal: the driver's channel closed".into()),
            };
            let now = self.clock.now();
            let event = match input {
                None => Some(Event::Tick),
                Some(i) => match self.input(&mut sm, i)? {
                    Ok(ev) => ev,
                    Err(outcome) => {
                        self.finish(&mut sm, &rx);
                        return Ok(outcome);
                    }
                },
            };
            if let Some(ev) = event {
                actions.extend(sm.handle(now, ev));
            }
            actions.extend(self.queued.drain(..));
        }
    }

    /// The VM stopped: tell the arbiter that no backup may take over a VM that ended, and wait
    /// (a little) for its answer.
    fn finish(&mut self, sm: &mut Primary, rx: &Receiver<Input>) {
        for a in sm.stop(self.clock.now()) {
            match a {
                Action::Disconnect { .. } => {
                    if let Some(l) = self.link.take() {
                        let _ = l.stream.shutdown(Shutdown::Both);
                    }
                }
                Action::Lease(req) => {
                    let _ = self.arbiter.send(req);
                }
                _ => {}
            }
        }
        let deadline = Instant::now() + Duration::from_nanos(self.opts.timing.lease_ttl_ns);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(Input::Lease { .. }) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// Turns a helper thread's report into a state-machine event (or the end).
    fn input(&mut self, sm: &mut Primary, input: Input) -> Result<Result<Option<Event>, Outcome>, String> {
        let current = self.link.as_ref().map(|l| l.id);
        Ok(Ok(match input {
            Input::Frame { conn, msg } if Some(conn) == current => Some(match msg {
                Ok(m) => Event::Received(m),
                Err(e) => Event::BackupLost { reason: format!("backup connection: {e}") },
            }),
            Input::Frame { .. } | Input::Accepted { .. } => None,
            Input::Connected { conn, stream } if Some(conn) == self.connecting => {
                self.connecting = None;
                match stream {
                    Ok(stream) => {
                        self.attach(conn, stream)?;
                        Some(Event::Connected { session: random_id() })
                    }
                    Err(reason) => Some(Event::ConnectFailed { reason }),
                }
            }
            Input::Connected { .. } => None,
            Input::Lease { sent_at, answer } => Some(Event::Lease { sent_at, answer }),
            Input::SyncSent { conn } if Some(conn) == current => Some(Event::SyncSent),
            Input::SyncSent { .. } => None,
            Input::Sent { conn: _, epoch, transfer_ns, buffer, wire_bytes, encoding } => {
                // An empty one is being readied elsewhere ([`Input::Spare`]).
                if buffer.capacity() > 0 {
                    self.spare.push(buffer);
                }
                if let Some(e) = self.pending.get_mut(&epoch) {
                    e.transfer_ns = transfer_ns;
                    e.wire_bytes = wire_bytes;
                    e.compressed = encoding.compressed();
                    e.delta = encoding == Encoding::Xor;
                }
                None
            }
            Input::Spare { buffer } => {
                self.spare.push(buffer);
                None
            }
            Input::SendFailed { conn, reason } if Some(conn) == current => Some(Event::BackupLost { reason }),
            Input::SendFailed { .. } => None,
            Input::VmStopped(r) => {
                let stop = r?;
                self.log(format!("the VM stopped: {stop:?}"));
                return Ok(Err(Outcome::Stopped(stop)));
            }
            Input::Output => Some(Event::Output),
            Input::Policy(spec) => {
                self.switch_policy(sm, spec);
                None
            }
            Input::Migrate(req, answer) => {
                let reply = match req {
                    crate::migration::Request::Protect(p) if self.opts.backup.is_none() => {
                        // Unprotected (a copy that took over, with no backup planned): the
                        // migration's destination becomes its backup; the state machine
                        // connects to it at its next attempt.
                        self.log(format!("migrating: protecting the VM to {} (pre-copy rounds)", p.backup));
                        self.opts.backup = Some(p.backup.clone());
                        if self.opts.state_file.is_none() {
                            self.opts.state_file = p.state_file.clone();
                        }
                        self.state.backup = self.opts.backup.clone();
                        self.save_state();
                        Ok("synchronising".to_string())
                    }
                    crate::migration::Request::Protect(p) if Some(&p.backup) == self.opts.backup.as_ref() => {
                        Ok(if sm.protected() { "protected".to_string() } else { "synchronising".to_string() })
                    }
                    crate::migration::Request::Protect(p) => {
                        // Another backup for a protected VM: a replicated VM the plan moves
                        // (the migration's destination), or the plan's backup for a copy that
                        // took over with another one in its spec. The old one is dropped as a
                        // lost backup is (deregistered from the lease at once, so it can no
                        // longer take over; output held until the lease confirms it), and the
                        // new one synchronises; the VM runs unprotected meanwhile, as after any
                        // loss of its backup.
                        let old = self.opts.backup.replace(p.backup.clone()).unwrap_or_default();
                        self.state.backup = self.opts.backup.clone();
                        self.save_state();
                        let reason = format!("the backup at {old} is replaced by {}", p.backup);
                        self.log(format!("{reason} (a new synchronisation)"));
                        self.queued.extend(sm.handle(self.clock.now(), Event::BackupLost { reason }));
                        Ok("synchronising (backup replaced)".to_string())
                    }
                    crate::migration::Request::Handover { to: Some(to) } if self.opts.backup.as_ref() != Some(&to) => Err(format!(
                        "protected to {}, not to the migration's destination {to}: no handover",
                        self.opts.backup.as_deref().unwrap_or("no backup")
                    )),
                    crate::migration::Request::Handover { .. } => match sm.handover(self.clock.now()) {
                        Ok(actions) => {
                            self.handover_started = Some(Instant::now());
                            self.log("handing the VM over to its backup (pre-copy migration's last step)");
                            self.queued.extend(actions);
                            Ok("handing over".to_string())
                        }
                        Err(e) if sm.handing_over() => Ok(format!("handing over ({e})")),
                        Err(e) => Err(e),
                    },
                    crate::migration::Request::Policy { policy } => match policy.parse::<PolicySpec>() {
                        Ok(spec) => {
                            self.switch_policy(sm, spec);
                            Ok(format!("policy {spec}"))
                        }
                        Err(e) => Err(e.to_string()),
                    },
                    crate::migration::Request::Status => Ok(if sm.handing_over() {
                        "handing over"
                    } else if sm.protected() {
                        "protected"
                    } else {
                        "synchronising"
                    }
                    .into()),
                };
                let _ = answer.send(reply);
                None
            }
        }))
    }

    fn attach(&mut self, id: u64, stream: TcpStream) -> Result<(), String> {
        let _ = stream.set_nodelay(true);
        let reader = stream.try_clone().map_err(|e| format!("backup connection: {e}"))?;
        let writer = stream.try_clone().map_err(|e| format!("backup connection: {e}"))?;
        spawn_reader(id, reader, self.tx.clone());
        let keepalive = Duration::from_nanos(self.opts.timing.heartbeat_ns);
        let out = spawn_sender(
            id,
            writer,
            self.mirror_rx.clone(),
            self.input.clone(),
            self.tx.clone(),
            self.opts.compression,
            keepalive,
            self.voice.clone(),
        );
        // Input goes to the backup the moment the VM receives it, not at the sender's next tick.
        let wake = Mutex::new(out.clone());
        self.input.set_notify(Some(Box::new(move || {
            let _ = wake.lock().unwrap_or_else(|e| e.into_inner()).send(Out::Input);
        })));
        self.link = Some(Link { id, stream, out });
        Ok(())
    }

    fn call(&self, cmd: Command) -> Result<vmm::Reply, String> {
        // Only the command's name: a checkpoint command carries a buffer of megabytes.
        let what = match &cmd {
            Command::Protect { .. } => "protect",
            Command::DrainInput => "drain-input",
            Command::Unprotect => "unprotect",
            Command::Checkpoint { .. } => "checkpoint",
            Command::MemoryView => "memory-view",
            Command::ReleaseAcked { .. } => "release",
            Command::Quit => "quit",
            _ => "command",
        };
        let r = self.ctl.call(cmd);
        if r.ok {
            Ok(r)
        } else {
            Err(format!("VM command {what}: {}", r.error.unwrap_or_default()))
        }
    }

    fn act(&mut self, sm: &mut Primary, action: Action, more: &mut VecDeque<Action>) -> Result<Option<Outcome>, String> {
        match action {
            Action::Connect => {
                let id = self.next_conn;
                self.next_conn += 1;
                self.connecting = Some(id);
                let tx = self.tx.clone();
                let addr = self.opts.backup.clone();
                let key = self.opts.key.clone();
                std::thread::spawn(move || {
                    let stream = match addr {
                        None => Err("no backup configured".to_string()),
                        Some(a) => connect(&a, Duration::from_millis(500)).and_then(|mut s| {
                            handshake(&mut s, &key, Side::Primary, Duration::from_millis(500)).map_err(|e| format!("backup {a}: {e}"))?;
                            Ok(s)
                        }),
                    };
                    let _ = tx.send(Input::Connected { conn: id, stream });
                });
            }
            Action::Hold | Action::Track => {
                let mirror = self.opts.disk.as_ref().map(|_| self.mirror_tx.clone());
                // `VIGIL_FORWARD_INPUT=0` turns the forwarding off (to measure what it brings).
                let forward = std::env::var("VIGIL_FORWARD_INPUT").map_or(true, |v| v != "0");
                let input = forward.then(|| self.input.clone());
                self.call(Command::Protect { mirror, hold: matches!(action, Action::Hold), input })?;
            }
            Action::HoldOutput => {
                self.call(Command::HoldOutput)?;
            }
            Action::StartSync { session } => {
                let reply = self.call(Command::MemoryView)?;
                let view = reply.memory_view.ok_or("the VM returned no memory view")?;
                let settle = reply.disk_settler;
                let config = self.config.clone();
                if let Some(l) = &self.link {
                    let hello = Msg::Hello { session, vm: self.opts.vm.clone(), mem_bytes: view.size(), config };
                    let _ = l.out.send(Out::Msg(hello));
                    let _ = l.out.send(Out::Sync { view, disk: self.opts.disk.clone(), settle });
                }
            }
            Action::Checkpoint => {
                let t0 = Instant::now();
                let buffer = self.spare.pop();
                // Fault injection: a longer pause (the VM stopped, as by a slow copy).
                let extra = self.injected.pause(&self.opts.vm);
                if !extra.is_zero() {
                    self.call(Command::Pause)?;
                    std::thread::sleep(extra);
                }
                let reply = self.call(Command::Checkpoint { buffer })?;
                if !extra.is_zero() {
                    self.call(Command::Resume)?;
                }
                let pause_ns = t0.elapsed().as_nanos() as u64;
                let mut c = reply.checkpoint.ok_or("the VM returned no checkpoint")?;
                let (epoch, output_frames) = (c.epoch, c.output_frames);
                let mirror_lost = c.disk_mirror_lost.take();
                let e = EpochStats {
                    epoch,
                    pause_ns,
                    vmm_pause_ns: c.pause_ns,
                    copy_ns: c.copy_ns,
                    dirty_pages: c.pages.len() as u64,
                    bytes: c.data.len() as u64,
                    output_frames,
                    mode: sm.policy().1.into(),
                    tracking: c.tracking,
                    next_tracking: c.next_tracking,
                    find_ns: c.find_ns,
                    switch_ns: c.switch_ns,
                    hot_pages: c.hot_pages,
                    ..EpochStats::default()
                };
                self.pending.insert(epoch, e);
                while self.pending.len() > 64 {
                    self.pending.pop_first();
                }
                match &self.link {
                    Some(l) if mirror_lost.is_none() => {
                        let _ = l.out.send(Out::Checkpoint(c, sm.released()));
                    }
                    _ => self.spare.push(c.data),
                }
                more.extend(sm.handle(self.clock.now(), Event::Staged { epoch, output_frames }));
                if let Some(reason) = mirror_lost {
                    // The backup missed disk writes: drop it; protection starts anew.
                    more.extend(sm.handle(self.clock.now(), Event::BackupLost { reason: format!("disk mirror: {reason}") }));
                }
            }
            Action::Release { epoch } => {
                if self.has_net {
                    self.call(Command::ReleaseAcked { epoch })?;
                }
            }
            Action::Unhold => {
                self.call(Command::Unprotect)?;
            }
            Action::Send(m) => {
                if matches!(m, Msg::Handover { .. }) {
                    // What reached the VM during its final pause goes to the destination first
                    // (as input, before the message that tells it to take over).
                    match self.call(Command::DrainInput).map(|r| r.value.unwrap_or(0)) {
                        Ok(0) => {}
                        Ok(n) => self.log(format!("handover: {n} frames that arrived during the final pause go to the destination")),
                        Err(e) => self.log(format!("handover: the frames of the final pause stay here: {e}")),
                    }
                }
                if let Some(l) = &self.link {
                    let _ = l.out.send(Out::Msg(m));
                }
            }
            Action::Disconnect { reason } => {
                if let Some(l) = self.link.take() {
                    let _ = l.stream.shutdown(Shutdown::Both);
                    self.log(format!("backup connection closed: {reason}"));
                }
                // No backup needs the queued disk writes now (a new one synchronises from the
                // disk), and a full mirror would keep the guest waiting.
                self.mirror_rx.lock().unwrap_or_else(|e| e.into_inner()).clear();
            }
            Action::Lease(req) => {
                let _ = self.arbiter.send(req);
            }
            Action::Fenced { holder } => {
                self.log(format!("fenced: {holder} holds the lease; stopping this copy"));
                let _ = self.ctl.call(Command::Quit);
                return Ok(Some(Outcome::Fenced { holder }));
            }
            Action::Notice(n) => self.notice(n),
            Action::PauseVm => {
                self.call(Command::Pause)?;
            }
            Action::ResumeVm => {
                self.log("the handover did not complete (the backup was lost, or the arbiter does not register it): the VM runs on here");
                self.handover_started = None;
                self.call(Command::Resume)?;
            }
            Action::HandedOver { epoch } => {
                // The handover message went to the sender before this: close our side once
                // it is written, and wait (a little) for the backup to close its side, which
                // it does when it takes over.
                let took = self.handover_started.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
                self.closing = self.link.take().map(|Link { id, stream, out }| {
                    drop(out);
                    (id, stream)
                });
                self.log(format!("handed over to the backup after epoch {epoch} ({took:.1} ms after it was asked); stopping this copy"));
                self.state.protected = false;
                self.state.detail = format!("handed over to the backup after epoch {epoch}");
                self.save_state();
                let _ = self.ctl.call(Command::Quit);
                return Ok(Some(Outcome::HandedOver { epoch }));
            }
        }
        Ok(None)
    }

    /// Runs `spec` from the next checkpoint on (the protection goes on: no new
    /// synchronisation), and says so in the statistics and the replication state.
    fn switch_policy(&mut self, sm: &mut Primary, spec: PolicySpec) {
        let before = sm.policy().0;
        sm.set_policy(spec.build());
        self.log(format!("checkpoint policy now {spec} (was {before})"));
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).policy = spec.to_string();
        self.state.policy = Some(spec.to_string());
        // The figures of a window (and the percentiles) are of one policy.
        self.window = Window::new();
        self.recent = Recent::default();
        self.save_state();
    }

    fn save_state(&self) {
        if let Some(f) = &self.opts.state_file {
            self.state.save(f);
        }
    }

    fn notice(&mut self, n: Notice) {
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        match n {
            Notice::Syncing { session } => {
                drop(stats);
                self.log(format!("synchronising a new backup (session {session:x})"));
            }
            Notice::Protected { session } => {
                stats.protected = true;
                drop(stats);
                self.state.protected = true;
                self.state.detail = format!("session {session:x}");
                self.save_state();
                self.log(format!("protected: the backup holds a committed replica (session {session:x})"));
                self.protected_logged = true;
            }
            Notice::Unprotected { reason } => {
                stats.protected = false;
                drop(stats);
                self.state.protected = false;
                self.state.detail = reason.clone();
                self.save_state();
                self.log(format!("UNPROTECTED: {reason}; the VM keeps running and accepts a new backup"));
            }
            Notice::Acked { epoch, duration_ns, mode } => {
                stats.mode = mode;
                if let Some(e) = self.pending.get_mut(&epoch) {
                    e.ack_ns = duration_ns;
                    stats.checkpoints += 1;
                    stats.pause_ns_total += e.pause_ns;
                    stats.bytes_total += e.bytes;
                    stats.pages_total += e.dirty_pages;
                    stats.compare_epochs += (e.tracking == Some(vmm::TrackingMode::Compare)) as u64;
                    stats.wire_bytes_total += e.wire_bytes;
                    stats.compressed += e.compressed as u64;
                    stats.delta += e.delta as u64;
                    stats.last = e.clone();
                    self.window.add(e);
                    self.recent.add(e);
                }
                if self.window.since.elapsed() >= Window::LENGTH {
                    self.state.figures = Some(self.window.figures(&stats.policy, stats.mode, stats.checkpoints, &self.recent));
                    self.window = Window::new();
                    drop(stats);
                    self.save_state();
                }
            }
            Notice::Released { epoch, delay_ns } => {
                if let Some(d) = delay_ns {
                    stats.output_delay_ns_total += d;
                    stats.released_with_output += 1;
                    self.window.released += 1;
                    self.window.delay_ns += d;
                    self.window.delay_max_ns = self.window.delay_max_ns.max(d);
                }
                if let Some(mut e) = self.pending.remove(&epoch) {
                    e.output_delay_ns = delay_ns;
                    if stats.last.epoch == epoch {
                        stats.last.output_delay_ns = delay_ns;
                    }
                    if self.opts.stats_lines {
                        drop(stats);
                        e.emit();
                    }
                }
                self.pending.retain(|k, _| *k > epoch);
            }
            Notice::ArbiterUnreachable { reason } => {
                drop(stats);
                self.log(format!("no lease from the arbiter ({reason}): output waits (said once, until the arbiter grants again)"));
            }
            Notice::ArbiterBack => {
                drop(stats);
                self.log("the arbiter grants the lease again");
            }
        }
    }
}

fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, String> {
    let sa =
        addr.to_socket_addrs().map_err(|e| format!("backup {addr}: {e}"))?.next().ok_or_else(|| format!("backup {addr}: no address"))?;
    TcpStream::connect_timeout(&sa, timeout).map_err(|e| format!("backup {addr}: {e}"))
}

/// The driver's leave for its sender threads to keep the link alive on its behalf: renewed
/// by the driver loop on every pass for one heartbeat interval, withdrawn when the state
/// machine is silent on purpose. A driver stuck in a VMM call stops renewing it, so its
/// silence still reaches the backup (which then suspects it and asks the arbiter) a
/// heartbeat interval later, as before there was a keepalive.
#[derive(Clone)]
struct Voice {
    clock: Clock,
    until: Arc<std::sync::atomic::AtomicU64>,
}

impl Voice {
    fn new(clock: Clock) -> Voice {
        Voice { clock, until: Arc::new(std::sync::atomic::AtomicU64::new(0)) }
    }

    /// Leave for `ns` from now, or none when `silent`.
    fn renew(&self, ns: u64, silent: bool) {
        let until = if silent { 0 } else { self.clock.now().saturating_add(ns) };
        self.until.store(until, std::sync::atomic::Ordering::Relaxed);
    }

    fn may_speak(&self) -> bool {
        self.clock.now() < self.until.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The sender thread of one connection. While `voice` allows it, it never leaves the link
/// silent for longer than `keepalive` while it waits for work: the backup's silence timeout
/// runs from the last frame it read, and the state machine's own heartbeats stop while a
/// checkpoint is taken (the checkpoint's frames are the word then, but they come only once the
/// pause and the first frame's encoding are done).
#[allow(clippy::too_many_arguments)]
fn spawn_sender(
    conn: u64,
    stream: TcpStream,
    mirror: Arc<Mutex<MirrorReceiver>>,
    input: vmm::devices::net::InputLog,
    tx: Sender<Input>,
    compression: Compression,
    keepalive: Duration,
    voice: Voice,
) -> Sender<Out> {
    let (otx, orx) = channel::<Out>();
    let _ = std::thread::Builder::new().name(format!("repl-send-{conn}")).spawn(move || {
        let mut chooser = Chooser::new(compression);
        // The copy of the backup's replica, kept only when deltas may be chosen.
        let keep_copy = matches!(compression, Compression::Xor | Compression::Auto);
        let mut s = Sender_ {
            w: BufWriter::with_capacity(1 << 20, stream),
            mirror,
            input,
            counts: HashMap::new(),
            synced: false,
            encoder: wire::Encoder::default(),
            keep_copy,
            mem_bytes: 0,
            largest: 0,
        };
        // When the link last carried anything (a flush after a write); after a handover the
        // primary is silent on purpose (a backup that missed the handover message times out
        // and takes over), so no keepalive then.
        let mut last_word = Instant::now();
        let mut handed_over = false;
        let result = (|| -> Result<(), String> {
            loop {
                let next = orx.recv_timeout(Duration::from_millis(2));
                if next.is_ok() {
                    last_word = Instant::now();
                }
                match next {
                    Ok(Out::Msg(m)) => {
                        // A heartbeat (or a hello) goes ahead of queued disk writes: it needs
                        // no order with them, and behind a full mirror on a slow link it
                        // would arrive seconds late.
                        handed_over |= matches!(m, Msg::Handover { .. });
                        wire::write_msg(&mut s.w, &m).map_err(|e| e.to_string())?;
                        s.w.flush().map_err(|e| e.to_string())?;
                    }
                    Ok(Out::Sync { view, disk, settle }) => {
                        s.sync(&view, disk.as_deref(), settle.as_ref())?;
                        let _ = tx.send(Input::SyncSent { conn });
                    }
                    Ok(Out::Checkpoint(c, released)) => {
                        let t0 = Instant::now();
                        s.send_input()?;
                        s.drain_mirror()?;
                        wire::write_output(&mut s.w, c.epoch, released, &c.output).map_err(|e| e.to_string())?;
                        let disk_writes = s.counts.remove(&c.epoch).unwrap_or(0);
                        let commit = Msg::Commit {
                            epoch: c.epoch,
                            guest_ns: c.guest_ns,
                            pages: c.pages.len() as u64,
                            disk_writes,
                            vcpu: c.vcpu.clone(),
                        };
                        let encoding = chooser.next(s.encoder.delta_ready());
                        let t1 = Instant::now();
                        let mut counted = Counting { inner: &mut s.w, ns: 0 };
                        let wire_bytes =
                            wire::write_checkpoint_encoded(&mut counted, c.epoch, &c.pages, &c.data, &commit, encoding, &mut s.encoder)
                                .map_err(|e| e.to_string())?;
                        let write_ns = counted.ns;
                        s.w.flush().map_err(|e| e.to_string())?;
                        let pages_ns = t1.elapsed().as_nanos() as u64;
                        let transfer_ns = t0.elapsed().as_nanos() as u64;
                        // Time writing is the link's; the rest of writing the pages, encoding
                        // them (and keeping the copy of the backup's pages).
                        let compressed = encoding.compressed();
                        chooser.observe(&Sample {
                            raw: c.data.len() as u64,
                            wire: wire_bytes,
                            compress_ns: if compressed { pages_ns.saturating_sub(write_ns) } else { 0 },
                            send_ns: if compressed { write_ns } else { pages_ns },
                            encoding,
                        });
                        // The buffer goes back to the driver for a later pause, with room for
                        // twice the largest checkpoint so far (at most the VM's memory), its
                        // pages mapped beforehand rather than by that pause's copy. Growing it
                        // takes a page fault per 4 KiB (about 100 ms for 64 MiB here): on a
                        // thread of its own, so that this one keeps the link alive meanwhile
                        // and the checkpoint's figures arrive before its acknowledgement.
                        s.largest = s.largest.max(c.data.len());
                        let want = (2 * s.largest).min(s.mem_bytes.max(s.largest));
                        let buffer = if c.data.capacity() >= want {
                            c.data
                        } else {
                            let (mut grown, tx) = (c.data, tx.clone());
                            let _ = std::thread::Builder::new().name("repl-staging".into()).spawn(move || {
                                vmm::checkpoint::prepare_staging(&mut grown, want);
                                let _ = tx.send(Input::Spare { buffer: grown });
                            });
                            Vec::new()
                        };
                        let _ = tx.send(Input::Sent { conn, epoch: c.epoch, transfer_ns, buffer, wire_bytes, encoding });
                    }
                    Ok(Out::Input) => {
                        s.send_input()?;
                        s.w.flush().map_err(|e| e.to_string())?;
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        s.send_input()?;
                        // A slice at a time, so that a checkpoint waits behind at most one.
                        s.drain_mirror_upto(Some(1 << 20))?;
                        if !handed_over && last_word.elapsed() >= keepalive && voice.may_speak() {
                            wire::write_msg(&mut s.w, &Msg::Heartbeat { seq: 0 }).map_err(|e| e.to_string())?;
                            last_word = Instant::now();
                        }
                        s.w.flush().map_err(|e| e.to_string())?;
                    }
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                }
            }
        })();
        if let Err(reason) = result {
            let _ = tx.send(Input::SendFailed { conn, reason: format!("sending to the backup: {reason}") });
        }
    });
    otx
}

#[cfg(test)]
mod sender_tests {
    use super::*;

    /// Nothing to send for 300 ms: the backup still hears a heartbeat every `keepalive`, while
    /// the driver's leave lasts; after it ends, and after a handover message, nothing.
    #[test]
    fn an_idle_sender_keeps_the_link_alive_until_a_handover() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let stream = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut backup, _) = listener.accept().expect("accept");
        let (_mirror_tx, mirror_rx) = vmm::mirror_channel(vmm::mirror::MIRROR_LIMIT);
        let (tx, _rx) = channel();
        let voice = Voice::new(Clock::new());
        voice.renew(10_000_000_000, false);
        let out = spawn_sender(
            1,
            stream,
            Arc::new(Mutex::new(mirror_rx)),
            vmm::devices::net::InputLog::default(),
            tx,
            Compression::Off,
            Duration::from_millis(10),
            voice.clone(),
        );
        backup.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let t = Instant::now();
        let mut heard = 0;
        while t.elapsed() < Duration::from_millis(300) {
            match wire::read_msg(&mut backup) {
                Ok(Msg::Heartbeat { .. }) => heard += 1,
                other => panic!("the backup read {other:?}"),
            }
        }
        // 30 intervals of 10 ms; the thread wakes every 2 ms, the host may be loaded.
        assert!(heard >= 10, "{heard} heartbeats in 300 ms of silence");
        // A driver that stops renewing the leave (stuck in a VMM call): silence, so the backup
        // can suspect it.
        voice.renew(0, false);
        backup.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
        let t = Instant::now();
        let mut quiet = false;
        while !quiet && t.elapsed() < Duration::from_secs(2) {
            match wire::read_msg(&mut backup) {
                Ok(Msg::Heartbeat { .. }) => {}
                Ok(m) => panic!("the backup read {m:?}"),
                Err(_) => quiet = true,
            }
        }
        assert!(quiet, "heartbeats went on for 2 s after the driver's leave ended");
        // The leave again, then a handover: the handover message, then nothing.
        backup.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        voice.renew(10_000_000_000, false);
        // After a handover the primary is silent on purpose (the leave stays: the sender
        // itself knows).
        out.send(Out::Msg(Msg::Handover { epoch: 7, paused_ns: 0 })).expect("send");
        loop {
            match wire::read_msg(&mut backup) {
                Ok(Msg::Heartbeat { .. }) => continue,
                Ok(Msg::Handover { epoch: 7, .. }) => break,
                other => panic!("the backup read {other:?}"),
            }
        }
        backup.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
        match wire::read_msg(&mut backup) {
            Err(_) => {}
            Ok(m) => panic!("after the handover the backup read {m:?}"),
        }
        drop(out);
    }
}

struct Sender_ {
    w: BufWriter<TcpStream>,
    mirror: Arc<Mutex<MirrorReceiver>>,
    input: vmm::devices::net::InputLog,
    /// Disk writes sent per epoch on this connection.
    counts: HashMap<u64, u64>,
    /// Whether the synchronisation started (disk writes go out only after it: the ones
    /// before are in what it reads).
    synced: bool,
    /// Encoding buffers, and this session's copy of the backup's replica: every page as last
    /// sent (made by the synchronisation, complete at its end), the base of XOR deltas.
    encoder: wire::Encoder,
    /// Whether to keep that copy (compression `xor` or `auto`).
    keep_copy: bool,
    /// The VM's memory (bytes, from the synchronisation) and the largest checkpoint sent on
    /// this connection (page bytes): the staging buffers are readied for twice that.
    mem_bytes: usize,
    largest: usize,
}

impl Sender_ {
    /// Forwards the frames the VM received since the last call, one message per epoch.
    fn send_input(&mut self) -> Result<(), String> {
        let mut frames: Vec<u8> = Vec::new();
        let mut epoch = None;
        for (e, f) in self.input.take() {
            if epoch.is_some_and(|x| x != e) || frames.len() + f.len() > 1 << 20 {
                let m = Msg::Input { epoch: epoch.unwrap_or(e), frames: std::mem::take(&mut frames) };
                wire::write_msg(&mut self.w, &m).map_err(|e| e.to_string())?;
            }
            epoch = Some(e);
            frames.extend_from_slice(&(f.len() as u32).to_le_bytes());
            frames.extend_from_slice(&f);
        }
        if let Some(e) = epoch {
            wire::write_msg(&mut self.w, &Msg::Input { epoch: e, frames }).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Sends the disk writes queued now (not those the guest adds meanwhile: a guest that
    /// writes as fast as the link carries would keep a drain going for ever).
    fn drain_mirror(&mut self) -> Result<(), String> {
        self.drain_mirror_upto(None)
    }

    /// Sends queued disk writes: about `limit` bytes of them, or those queued now.
    fn drain_mirror_upto(&mut self, limit: Option<usize>) -> Result<(), String> {
        let mut taken = 0;
        let rx = self.mirror.lock().unwrap_or_else(|e| e.into_inner());
        let limit = limit.unwrap_or_else(|| rx.queued_bytes());
        if !self.synced {
            // What the guest writes before the synchronisation is in what it reads: drop it
            // (the mirror is bounded, and a full one makes the guest wait).
            rx.clear();
            return Ok(());
        }
        while let Some(d) = rx.try_recv() {
            taken += d.data.len();
            *self.counts.entry(d.epoch).or_default() += 1;
            wire::write_msg(&mut self.w, &Msg::DiskWrite { epoch: d.epoch, offset: d.offset, data: d.data }).map_err(|e| e.to_string())?;
            if taken >= limit {
                break;
            }
        }
        Ok(())
    }

    /// All of memory, then all of the disk, while the VM runs; then the counts.
    fn sync(&mut self, view: &MemoryView, disk: Option<&std::path::Path>, settle: Option<&vmm::backend::Settler>) -> Result<(), String> {
        self.mem_bytes = view.size() as usize;
        // Writes queued before the synchronisation are in what it reads: on the file, once a
        // block backend's write ring holds none of them (the guest was told they are done
        // when they entered it).
        self.mirror.lock().unwrap_or_else(|e| e.into_inner()).clear();
        if settle.is_some_and(|s| !s.settle()) {
            return Err("the disk's block backend could not write the guest's last writes: no synchronisation".into());
        }
        self.counts.clear();
        self.synced = true;
        // A new session: a new copy, with no base until this synchronisation has sent every
        // page (never the copy of an older session).
        self.encoder.copy = None;
        if self.keep_copy {
            self.encoder.copy = BackupCopy::new(view.size());
            if self.encoder.copy.is_none() {
                tracing::warn!("guest memory of {} bytes is not whole pages: no XOR deltas this session", view.size());
            }
        }
        const CHUNK: u64 = 256;
        let pages = view.pages();
        let mut first = 0;
        while first < pages {
            let n = CHUNK.min(pages - first);
            let mut data = vec![0u8; n as usize * PAGE];
            view.copy_range(first * PAGE as u64, &mut data).map_err(|e| e.to_string())?;
            if let Some(copy) = self.encoder.copy.as_mut() {
                copy.record_range(first, &data).map_err(|e| e.to_string())?;
            }
            wire::write_msg(&mut self.w, &Msg::Sync { first_page: first, data }).map_err(|e| e.to_string())?;
            first += n;
            // Disk writes the guest makes meanwhile go out too (the backup holds them until
            // their epoch commits, after the synchronisation), as many bytes as the chunk: a
            // guest waiting for room in the mirror must not wait for the whole memory.
            self.drain_mirror_upto(Some(n as usize * PAGE))?;
        }
        let mut chunks = 0;
        if let Some(path) = disk {
            let f = std::fs::File::open(path).map_err(|e| format!("disk {}: {e}", path.display()))?;
            let len = f.metadata().map_err(|e| format!("disk {}: {e}", path.display()))?.len();
            let mut off = 0;
            while off < len {
                let n = (len - off).min(1 << 20) as usize;
                let mut data = vec![0u8; n];
                f.read_exact_at(&mut data, off).map_err(|e| format!("disk {}: {e}", path.display()))?;
                wire::write_msg(&mut self.w, &Msg::DiskSync { offset: off, data }).map_err(|e| e.to_string())?;
                chunks += 1;
                off += n as u64;
                // Writes made after this chunk was read follow it; at most as many bytes as
                // the chunk, so that a guest writing without pause shares the link with the
                // synchronisation instead of starving it (the rest stays queued, in order).
                self.drain_mirror_upto(Some(n))?;
            }
        }
        wire::write_msg(&mut self.w, &Msg::SyncEnd { pages, disk_chunks: chunks }).map_err(|e| e.to_string())?;
        if let Some(copy) = self.encoder.copy.as_mut() {
            copy.set_complete();
        }
        self.w.flush().map_err(|e| e.to_string())
    }
}

/// A writer that adds up the time spent in its inner writer (the socket's share of sending a
/// checkpoint, as opposed to compressing it).
struct Counting<'a, W: Write> {
    inner: &'a mut W,
    ns: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let t = Instant::now();
        let r = self.inner.write(b);
        self.ns += t.elapsed().as_nanos() as u64;
        r
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let t = Instant::now();
        let r = self.inner.flush();
        self.ns += t.elapsed().as_nanos() as u64;
        r
    }
}
