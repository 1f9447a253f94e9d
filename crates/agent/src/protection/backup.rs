//! The backup's driver: accepts the primary's connection, keeps the replica (memory and vCPU
//! in a `vmm::checkpoint::Replica`, the disk in a file) as [`replication::backup::Backup`] decides,
//! and on takeover builds the VM from the replica on this host, announces it, and continues
//! as a primary ([`super::primary`]).

use super::primary::{self, Outcome, Start};
use super::stats::{self, Shared, Stats};
use super::{handshake, spawn_arbiter, spawn_reader_recycling, Clock, Input, Side, Spare};
use crate::auth::Key;
use replication::backup::{Action, Backup, Event, Notice};
use replication::wire::{self, WireError};
use replication::{PolicySpec, Timing};
use std::collections::VecDeque;
use std::io::{BufWriter, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::checkpoint::Replica;
use vmm::devices::net::Tap;
use vmm::snapshot::RestoreOverrides;
use vmm::{Command, Vm, VmConfig};

/// How to run a backup.
pub struct Options {
    /// Address to listen on for the primary (HOST:PORT).
    pub listen: String,
    /// This host's name at the arbiter.
    pub holder: String,
    /// The arbiter's address.
    pub arbiter: String,
    /// The tap device the VM gets on this host after a takeover.
    pub tap: Option<String>,
    /// This host's copy of the VM's disk.
    pub disk: Option<PathBuf>,
    pub timing: Timing,
    /// Print a line per event worth seeing (commits are counted, not printed).
    pub stats_lines: bool,
    /// Metrics address (and, after a takeover, the policy switch).
    pub control: Option<String>,
    /// The VM's control socket after a takeover.
    pub api: Option<PathBuf>,
    /// After a takeover: the new backup to protect the VM with, and the policy.
    pub then_protect: Option<String>,
    pub then_policy: PolicySpec,
    /// After a takeover: where the primary keeps its replication state.
    pub state_file: Option<PathBuf>,
    /// The cluster's key (the arbiter and the primary authenticate with it).
    pub key: Key,
    /// After a takeover: the vCPU thread's real-time scheduling.
    pub vcpu_sched: crate::vm::Scheduling,
}

/// Connections authenticating at once; more are closed at once.
const MAX_HANDSHAKES: usize = 8;

struct Conn {
    id: u64,
    stream: TcpStream,
    w: BufWriter<TcpStream>,
}

/// Runs the backup until it takes over and the VM it then runs stops (or is fenced).
pub fn run(opts: Options) -> Result<Outcome, String> {
    let clock = Clock::new();
    let (tx, rx) = channel::<Input>();
    let listener = TcpListener::bind(&opts.listen).map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
    tracing::info!("backup: listening on {}", listener.local_addr().map(|a| a.to_string()).unwrap_or_default());
    let ltx = tx.clone();
    let key = opts.key.clone();
    std::thread::Builder::new()
        .name("repl-accept".into())
        .spawn(move || {
            // Each connection authenticates on its own thread (a bounded number at once), so
            // a peer that stalls holds up no one, and only an authenticated primary reaches
            // the loop (where it replaces the session: a restarted primary starts anew).
            let busy = Arc::new(AtomicUsize::new(0));
            let refusals = Arc::new(Mutex::new(Refusals::default()));
            for mut s in listener.incoming().flatten() {
                if busy.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    refusals.lock().unwrap_or_else(|e| e.into_inner()).refused("?", "too many connections authenticating at once");
                    continue;
                }
                let (ltx, key, busy, refusals) = (ltx.clone(), key.clone(), busy.clone(), refusals.clone());
                let _ = std::thread::Builder::new().name("repl-auth".into()).spawn(move || {
                    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                    match handshake(&mut s, &key, Side::Backup, Duration::from_secs(2)) {
                        Ok(()) => {
                            let _ = ltx.send(Input::Accepted { stream: s });
                        }
                        Err(e) => refusals.lock().unwrap_or_else(|e| e.into_inner()).refused(&peer, &e),
                    }
                    busy.fetch_sub(1, Ordering::SeqCst);
                });
            }
        })
        .map_err(|e| e.to_string())?;
    let arbiter = spawn_arbiter(&opts.arbiter, Duration::from_nanos(opts.timing.lease_ttl_ns), opts.key.clone(), clock, tx.clone());
    let stats: Shared = Arc::new(Mutex::new(Stats { vm: String::new(), role: "backup", ..Stats::default() }));
    let mut control_bound = false;
    if let Some(addr) = &opts.control {
        stats::serve(addr, stats.clone(), None).map_err(|e| format!("control address {addr}: {e}"))?;
        control_bound = true;
    }
    let standby = match &opts.tap {
        Some(name) => Some(Standby::open(name)?),
        None => None,
    };
    let mut standby = standby;
    let mut sm = Backup::new(&opts.holder, opts.timing);
    let mut st =
        State { replica: None, frames: Vec::new(), spare: Spare::default(), conn: None, next_conn: 1, suspected_at: None, handover: None };
    let mut actions: VecDeque<Action> = VecDeque::new();
    loop {
        while let Some(a) = actions.pop_front() {
            let now = clock.now();
            match a {
                Action::Reset { session, vm, mem_bytes, config } => {
                    st.replica = None;
                    st.frames = Vec::new();
                    let made = serde_json::from_slice::<VmConfig>(&config)
                        .map_err(|e| format!("the primary's VM configuration: {e}"))
                        .and_then(|c| {
                            if c.mem_mib.saturating_mul(1 << 20) != mem_bytes {
                                return Err(format!("the hello says {mem_bytes} bytes of memory, the configuration {} MiB", c.mem_mib));
                            }
                            if let Some(s) = &standby {
                                s.watch(c.net.mac);
                            }
                            Replica::new(c).map_err(|e| e.to_string())
                        });
                    match made {
                        Ok(r) => {
                            tracing::info!("backup: new session {session:x} for VM {vm} ({} MiB)", mem_bytes >> 20);
                            arbiter.watch(&vm);
                            stats.lock().unwrap_or_else(|e| e.into_inner()).vm = vm;
                            st.replica = Some(r);
                        }
                        Err(reason) => actions.extend(sm.handle(now, Event::Corrupt { reason })),
                    }
                }
                Action::WriteSync { first_page, data } => {
                    let r = match st.replica.as_mut() {
                        Some(r) => r.write_pages(first_page, &data).map_err(|e| e.to_string()),
                        None => Err("no replica".to_string()),
                    };
                    if let Err(reason) = r {
                        actions.extend(sm.handle(now, Event::Corrupt { reason }));
                    }
                }
                Action::WriteDisk { offset, data } => {
                    if let Err(reason) = write_disk(opts.disk.as_ref(), &[(offset, data)]) {
                        actions.extend(sm.handle(now, Event::Corrupt { reason }));
                    }
                }
                Action::Stage { pages, data, .. } => {
                    // Kept as received (no copy): applying copies each page once, into place.
                    st.frames.push((pages, data));
                }
                Action::StageDelta { epoch, pages, base_crcs, pages_crc, mut xor } => {
                    // Rebuilt against the replica as the last committed checkpoint left it
                    // (staged pages are applied only at the commit), after checking the base.
                    let rebuilt = match st.replica.as_ref() {
                        Some(r) => r.memory().as_slice().map_err(|e| e.to_string()).and_then(|mem| {
                            replication::delta::resolve(epoch, &pages, &base_crcs, pages_crc, &mut xor, mem).map_err(|e| e.to_string())
                        }),
                        None => Err(format!("delta pages of epoch {epoch} without a replica")),
                    };
                    match rebuilt {
                        Ok(()) => st.frames.push((pages, xor)),
                        Err(reason) => {
                            st.spare.put(xor);
                            actions.extend(sm.handle(now, Event::Corrupt { reason }));
                        }
                    }
                }
                Action::DiscardStaged => {
                    // Freed, not only emptied: a peer that never commits must not keep memory.
                    st.frames = Vec::new();
                }
                Action::Apply { epoch, guest_ns, vcpu, disk } => {
                    let result = match st.replica.as_mut() {
                        Some(r) => r
                            .apply_parts(epoch, &st.frames, &vcpu, guest_ns)
                            .map_err(|e| e.to_string())
                            .and_then(|_| write_disk(opts.disk.as_ref(), &disk)),
                        None => Err("no replica".to_string()),
                    };
                    for (_, data) in st.frames.drain(..) {
                        st.spare.put(data);
                    }
                    actions.extend(sm.handle(now, Event::Applied { epoch, result }));
                }
                Action::Send(m) => {
                    if let Some(c) = st.conn.as_mut() {
                        let r = wire::write_msg(&mut c.w, &m).and_then(|_| c.w.flush());
                        if let Err(e) = r {
                            let reason = format!("sending to the primary: {e}");
                            st.close();
                            actions.extend(sm.handle(now, Event::Disconnected { reason }));
                        }
                    }
                }
                Action::Disconnect { reason } => {
                    if st.conn.is_some() {
                        tracing::info!("backup: connection to the primary closed: {reason}");
                    }
                    st.close();
                }
                Action::Lease(req) => {
                    let _ = arbiter.send(req);
                }
                Action::TakeOver { epoch, granted_at, gen, replay, input } => {
                    let replica = st.replica.take().ok_or("internal: takeover without a replica")?;
                    let since = st.suspected_at.map(|t| Instant::now().duration_since(t).as_secs_f64() * 1e3).unwrap_or(0.0);
                    tracing::info!(
                        "backup: TAKING OVER from epoch {epoch} under lease generation {gen} ({since:.1} ms after suspecting the primary)"
                    );
                    stats.lock().unwrap_or_else(|e| e.into_inner()).takeovers += 1;
                    let vm_name = stats.lock().unwrap_or_else(|e| e.into_inner()).vm.clone();
                    let (tap, seen) = match standby.take().map(Standby::end) {
                        Some(Some((tap, seen))) => (Some(Some(tap)), seen),
                        Some(None) => (Some(None), Vec::new()),
                        None => (None, Vec::new()),
                    };
                    let grant = Grant { at: granted_at, gen, replay, input, seen, handover: st.handover.take() };
                    return take_over(replica, &opts, &vm_name, grant, clock, control_bound, tap);
                }
                Action::Abandon { reason } => {
                    tracing::info!("backup: replica abandoned: {reason}");
                    st.replica = None;
                }
                Action::Notice(n) => {
                    let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
                    match &n {
                        Notice::Committed { epoch, pages, .. } => {
                            s.checkpoints += 1;
                            s.pages_total += pages;
                            s.bytes_total += pages * wire::PAGE as u64;
                            s.protected = true;
                            s.last.epoch = *epoch;
                            s.last.dirty_pages = *pages;
                            if *epoch == 1 || s.checkpoints == 1 {
                                tracing::info!("backup: first checkpoint committed (epoch {epoch}): the VM is protected");
                            }
                        }
                        Notice::Refused { .. } => {
                            s.refused += 1;
                            tracing::info!("backup: {n:?}");
                        }
                        Notice::HandedOver { epoch, paused_ns } => {
                            st.handover = Some((Instant::now(), *paused_ns));
                            st.suspected_at = Some(Instant::now());
                            tracing::info!("backup: the primary handed the VM over after epoch {epoch}: taking over");
                        }
                        Notice::Suspecting { .. } => {
                            st.suspected_at = Some(Instant::now());
                            tracing::info!("backup: {n:?}");
                        }
                        _ => {
                            if opts.stats_lines || !matches!(n, Notice::LeaseHeld { .. }) {
                                tracing::info!("backup: {n:?}");
                            }
                        }
                    }
                }
            }
        }
        let now = clock.now();
        let wait = sm.next_wakeup(now).saturating_sub(now).min(5_000_000);
        let input = match rx.recv_timeout(Duration::from_nanos(wait)) {
            Ok(i) => Some(i),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return Err("internal: the driver's channel closed".into()),
        };
        let now = clock.now();
        let current = st.conn.as_ref().map(|c| c.id);
        let event = match input {
            None => Some(Event::Tick),
            Some(Input::Accepted { stream }) => {
                st.close();
                let id = st.next_conn;
                st.next_conn += 1;
                let _ = stream.set_nodelay(true);
                match (stream.try_clone(), stream.try_clone()) {
                    (Ok(r), Ok(w)) => {
                        spawn_reader_recycling(id, r, tx.clone(), st.spare.clone());
                        st.conn = Some(Conn { id, stream, w: BufWriter::new(w) });
                        Some(Event::Connected)
                    }
                    _ => None,
                }
            }
            Some(Input::Frame { conn, msg }) if Some(conn) == current => Some(match msg {
                Ok(m) => Event::Received(m),
                Err(WireError::Closed) => {
                    st.close();
                    Event::Disconnected { reason: "the primary closed the connection".into() }
                }
                Err(WireError::Io(e)) => {
                    st.close();
                    Event::Disconnected { reason: e }
                }
                Err(e) => Event::Corrupt { reason: e.to_string() },
            }),
            Some(Input::Lease { sent_at, answer }) => Some(Event::Lease { sent_at, answer }),
            Some(_) => None,
        };
        if let Some(ev) = event {
            actions.extend(sm.handle(now, ev));
        }
    }
}

/// Refused connections, logged at most once a second (a flood must not fill the log).
#[derive(Default)]
struct Refusals {
    last: Option<Instant>,
    unsaid: u64,
}

impl Refusals {
    fn refused(&mut self, peer: &str, why: &str) {
        if self.last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            self.unsaid += 1;
            return;
        }
        let more = std::mem::take(&mut self.unsaid);
        let more = if more > 0 { format!(" ({more} more refused before this one)") } else { String::new() };
        tracing::warn!("backup: connection from {peer} refused: {why}{more}");
        self.last = Some(Instant::now());
    }
}

struct State {
    replica: Option<Replica>,
    /// The staged checkpoint: page numbers and data as each frame brought them.
    frames: Vec<(Vec<u64>, Vec<u8>)>,
    /// Buffers of applied checkpoints for the reader to receive into.
    spare: Spare,
    conn: Option<Conn>,
    next_conn: u64,
    suspected_at: Option<Instant>,
    /// A planned handover's message: when it came, and how long the VM had been paused then.
    handover: Option<(Instant, u64)>,
}

impl State {
    fn close(&mut self) {
        if let Some(c) = self.conn.take() {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
    }
}

fn write_disk(disk: Option<&PathBuf>, writes: &[(u64, Vec<u8>)]) -> Result<(), String> {
    if writes.is_empty() {
        return Ok(());
    }
    let Some(path) = disk else {
        return Err("the primary mirrors a disk but this backup has no --disk".into());
    };
    let f = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| format!("disk {}: {e}", path.display()))?;
    for (offset, data) in writes {
        f.write_all_at(data, *offset).map_err(|e| format!("disk {} at {offset}: {e}", path.display()))?;
    }
    Ok(())
}

/// The tap device held open while the backup waits, its frames discarded, so that its carrier
/// (and the bridge port it is on) is up when the VM takes it over: a carrier that comes up only
/// at the takeover can keep the bridge from forwarding for up to a second (Linux rate-limits
/// link-state changes).
struct Standby {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<(Tap, Kept)>,
    /// The VM's MAC address, once a session named it (frames to it are kept).
    mac: Arc<Mutex<Option<[u8; 6]>>>,
}

/// The frames the standby kept, with when each arrived.
type Kept = VecDeque<(Instant, Vec<u8>)>;

/// How long the standby keeps a frame addressed to the VM, and how many bytes at most.
const STANDBY_KEEP: Duration = Duration::from_millis(300);
const STANDBY_BYTES: usize = 4 << 20;

/// Whether `frame` is an IPv4 TCP segment to `mac` that carries an acknowledgement and no
/// SYN or RST: one the new copy may be given again at a takeover without harm (TCP drops a
/// segment it already has by its sequence number).
fn tcp_to(frame: &[u8], mac: &[u8; 6]) -> bool {
    if frame.len() < 14 + 20 + 20 || frame[..6] != mac[..] || frame[12..14] != [0x08, 0x00] {
        return false;
    }
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != 6 || ip.len() < ihl + 20 {
        return false;
    }
    let flags = ip[ihl + 13];
    flags & 0x10 != 0 && flags & 0x06 == 0
}

impl Standby {
    /// Keeps the VM's tap open (its carrier and bridge port up) and reads what reaches it. On
    /// a network that delivers the VM's frames to this host too (a switch that floods them),
    /// the TCP segments addressed to the VM in the last [`STANDBY_KEEP`] are kept: at a
    /// takeover the new copy gets them, so a client's request the dead primary never read is
    /// answered without the client's retransmission.
    fn open(name: &str) -> Result<Standby, String> {
        let tap = Tap::open(name).map_err(|e| e.to_string())?;
        let (stop, stopped) = channel::<()>();
        let mac: Arc<Mutex<Option<[u8; 6]>>> = Arc::new(Mutex::new(None));
        let vm_mac = mac.clone();
        let thread = std::thread::Builder::new()
            .name("tap-standby".into())
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                let mut kept: Kept = VecDeque::new();
                let mut bytes = 0usize;
                while stopped.try_recv().is_err() {
                    let mut p = libc::pollfd { fd: tap.raw_fd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: polls one valid pollfd for at most 5 ms.
                    if unsafe { libc::poll(&mut p, 1, 5) } > 0 {
                        let mac = *vm_mac.lock().unwrap_or_else(|e| e.into_inner());
                        loop {
                            // SAFETY: reads into our own buffer of its length from the tap's fd.
                            let n = unsafe { libc::read(tap.raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                            if n <= 0 {
                                break;
                            }
                            let f = &buf[..n as usize];
                            if mac.is_some_and(|m| tcp_to(f, &m)) && f.len() <= vmm_abi::FRAME_MAX as usize {
                                bytes += f.len();
                                kept.push_back((Instant::now(), f.to_vec()));
                            }
                        }
                    }
                    while kept.front().is_some_and(|(t, _)| t.elapsed() > STANDBY_KEEP) || bytes > STANDBY_BYTES {
                        let Some((_, f)) = kept.pop_front() else { break };
                        bytes -= f.len();
                    }
                }
                (tap, kept)
            })
            .map_err(|e| e.to_string())?;
        Ok(Standby { stop, thread, mac })
    }

    /// The VM's MAC address (from a new session's configuration).
    fn watch(&self, mac: [u8; 6]) {
        *self.mac.lock().unwrap_or_else(|e| e.into_inner()) = Some(mac);
    }

    /// The tap, and the TCP segments to the VM kept (as frames: 4-byte LE length and bytes).
    fn end(self) -> Option<(Tap, Vec<u8>)> {
        let _ = self.stop.send(());
        let (tap, kept) = self.thread.join().ok()?;
        let frames = kept.into_iter().flat_map(|(_, f)| (f.len() as u32).to_le_bytes().into_iter().chain(f)).collect();
        Some((tap, frames))
    }
}

/// The lease a takeover was granted (when, by `clock`, and under which generation), and the
/// committed output to send again.
struct Grant {
    at: u64,
    gen: u64,
    replay: Vec<u8>,
    /// The input the VM received after the committed checkpoint, for the new copy.
    input: Vec<u8>,
    /// The TCP segments to the VM that reached this host's tap lately (a flooding network).
    seen: Vec<u8>,
    /// A planned handover: when its message came, and how long the VM had been paused then.
    handover: Option<(Instant, u64)>,
}

fn take_over(
    replica: Replica,
    opts: &Options,
    vm_name: &str,
    grant: Grant,
    clock: Clock,
    control_bound: bool,
    tap: Option<Option<Tap>>,
) -> Result<Outcome, String> {
    let t0 = Instant::now();
    let overrides = RestoreOverrides { tap: opts.tap.clone(), disk: opts.disk.clone(), backend_program: std::env::current_exe().ok() };
    let vm = Vm::from_replica_with_tap(replica, &overrides, Box::new(std::io::stdout()), tap.flatten());
    let mut vm = vm.map_err(|e| format!("takeover: {e}"))?;
    // The requests that reached the old primary after its last committed checkpoint: the
    // guest gets them first (TCP drops what it already had), and answers without waiting for
    // its clients to resend them.
    match vm.inject_input(&grant.input) {
        0 => {}
        n => tracing::info!("backup: gave the VM {n} frames of input received after the committed checkpoint"),
    }
    // Then what the network delivered here too (requests the primary may never have read).
    match vm.inject_input(&grant.seen) {
        0 => {}
        n => tracing::info!("backup: gave the VM {n} TCP segments that reached this host in the last {} ms", STANDBY_KEEP.as_millis()),
    }
    vm.resume();
    // A handover's downtime: the VM's pause at the source until the message left, plus here
    // from the message to now (the message's way over the link is not counted).
    let handover_ms = grant.handover.map(|(at, paused_ns)| paused_ns as f64 / 1e6 + at.elapsed().as_secs_f64() * 1e3);
    if let Some(ms) = handover_ms {
        tracing::info!("backup: handover done: the VM stopped for {ms:.1} ms (paused at the source → running here)");
    }
    if vm.announce(1).is_err() {
        tracing::info!("backup: the VM has no network address to announce");
    }
    // What the old primary may not have released of the committed epochs, at once: a client
    // owed a reply gets it now (TCP drops what it already had).
    match vm.send_frames(&grant.replay) {
        Ok(0) => {}
        Ok(n) => tracing::info!("backup: sent again {n} frames of output from the last committed epochs"),
        Err(e) => tracing::warn!("backup: cannot send the last committed epochs' output again: {e}"),
    }
    let (ctl, inbox) = vmm::channel_pair().map_err(|e| e.to_string())?;
    let _api = match &opts.api {
        Some(p) => Some(vmm::api::serve(p, ctl.clone()).map_err(|e| e.to_string())?),
        None => None,
    };
    tracing::info!("backup: the VM runs on this host ({:.1} ms to build it)", t0.elapsed().as_secs_f64() * 1e3);
    // Announce again a little later, for switches that missed the first frames.
    let actl = ctl.clone();
    std::thread::spawn(move || {
        for ms in [20, 100, 500] {
            std::thread::sleep(Duration::from_millis(ms));
            let _ = actl.call(Command::Announce { count: 1 });
        }
    });
    let popts = primary::Options {
        vm: vm_name.to_owned(),
        holder: opts.holder.clone(),
        backup: opts.then_protect.clone(),
        arbiter: opts.arbiter.clone(),
        policy: opts.then_policy,
        timing: opts.timing,
        stats_lines: opts.stats_lines,
        control: if control_bound { None } else { opts.control.clone() },
        disk: opts.disk.clone(),
        state_file: opts.state_file.clone(),
        key: opts.key.clone(),
        vcpu_sched: opts.vcpu_sched.clone(),
        compression: Default::default(),
        handover_ms,
    };
    // The VM can be migrated on from here (`crate::migration`): its process serves the
    // migration socket beside its control socket.
    let (tx, rx) = channel::<Input>();
    let running = primary::spawn_vcpu(vm, inbox, opts.vcpu_sched.clone(), tx.clone())?;
    let _mig = match &opts.api {
        Some(p) => {
            let path = crate::migration::socket_path(p);
            Some(crate::migration::serve(&path, tx.clone()).map_err(|e| format!("migration socket {}: {e}", path.display()))?)
        }
        None => None,
    };
    primary::run_attached(running, ctl, popts, Start::TakeOver { granted_at: grant.at, gen: grant.gen }, clock, tx, rx)
}
