//! The voter's thin I/O driver: runs a voted VM's N instances (each `vigil vm run` in a
//! network namespace of its own, all with the same guest address and MAC, so a snapshot of
//! one continues as another), listens on the VM's one address, and carries bytes, process
//! exits, snapshots and restores between the world and [`super::core::Voter`].
//!
//! The voter keeps one connection to each instance (all clients' requests in one order, see
//! [`super::core`]). Threads: one owns the voter (it ticks every 10 ms); one accepts clients;
//! one reads and one writes each socket (a peer that stops reading never blocks the voter: at most
//! [`MAX_QUEUED`] bytes wait for it, then it is closed, and writes time out); one per instance
//! opens its connection inside the instance's namespace; one waits for each VMM process; snapshot
//! and readiness after a restore run on worker threads, so the voter serves on meanwhile. At
//! most [`MAX_CLIENTS`] clients at once (one more is closed at once).
//!
//! What the driver reports (faults, repairs) goes to `tracing`, to `<dir>/events.jsonl` (one
//! JSON object a line) and the instances' state to `<dir>/local.json`.

use super::core::{Action, Config, Conn, Event, Instance, Nanos, Report, Voter};
use crate::{Error, Result};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

/// Most client connections at once.
pub const MAX_CLIENTS: usize = 64;
/// Most datagram sources at once (a source silent for [`SOURCE_IDLE`] is forgotten).
pub const MAX_SOURCES: usize = 64;
pub const SOURCE_IDLE: Duration = Duration::from_secs(60);
/// Datagram sources are the voter's clients from this identifier on.
const SOURCE_BASE: Conn = 1 << 40;
/// A takeover's replay is fed as clients from this identifier on, each a chunk of requests
/// (the voter bounds one client's unanswered requests).
const REPLAY_BASE: Conn = 1 << 50;
const REPLAY_CHUNK: usize = 20_000;
/// Mode 4: a backup that acknowledges nothing for this long is dropped.
pub const ACK_TIMEOUT: Duration = Duration::from_millis(500);
/// The guest's address inside each instance's namespace (and the host side of its tap).
pub const GUEST_IP: &str = "10.250.0.2";
pub const HOST_IP: &str = "10.250.0.1";
pub const GUEST_MAC: &str = "52:54:00:fa:00:02";
pub const TAP: &str = "vt0";
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const CONNECT_ATTEMPTS: usize = 3;

/// One instance: its namespace and how its VMM is started.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InstanceSpec {
    /// Network namespace (a name under /run/netns).
    pub netns: String,
    /// Guest image (instances may run different images: N-version).
    pub image: PathBuf,
    pub mem_mib: u64,
    /// Arguments for the guest.
    pub args: Vec<String>,
}

/// A voted VM.
#[derive(Debug)]
pub struct GroupSpec {
    pub vm: String,
    /// The VM's address, where clients connect.
    pub listen: SocketAddr,
    /// The guest's port.
    pub port: u16,
    pub instances: Vec<InstanceSpec>,
    /// The `vigil` binary (for `vm run` and `vm restore`).
    pub vigil: PathBuf,
    /// Control sockets, snapshots, logs, events, state.
    pub dir: PathBuf,
    pub config: Config,
    /// The cluster store: faults and repairs go to its event log too (`vigil status`).
    pub store: Option<PathBuf>,
    /// Mode 4: the backup's address (`super::remote`) and the cluster's key.
    pub backup: Option<(String, crate::auth::Key)>,
    /// A takeover: the instances start from this replica's snapshot and its log is replayed
    /// before the VM's address opens.
    pub resume: Option<super::remote::Replica>,
    /// Once the address is open, announce it on this interface (gratuitous ARP).
    pub announce: Option<(std::net::Ipv4Addr, String)>,
    /// Mode 4: whether the group is protected, for the agent (`ReplicationState`).
    pub state_file: Option<PathBuf>,
    /// Keep a replica here too (a snapshot, the log after it, `super::remote::Store`), so
    /// that a voter restarted after a crash continues the instances' state (`resume`). Every
    /// request is in its log before any instance gets it.
    pub replica: Option<PathBuf>,
}

/// A thread that appends what it is sent to the store's event log (a store that does not
/// answer delays only this thread; the voter never waits for it).
fn store_logger(socket: PathBuf, vm: String) -> Sender<String> {
    let (tx, rx) = channel::<String>();
    let _ = std::thread::Builder::new().name("voter-events".into()).spawn(move || {
        let mut client: Option<store::Client> = None;
        for what in rx {
            if client.is_none() {
                client = store::Client::connect(&socket).ok();
            }
            let Some(c) = client.as_mut() else { continue };
            if crate::cluster::log_event(c, &crate::cluster::Event::now(&format!("voter:{vm}"), what)).is_err() {
                client = None;
            }
        }
    });
    tx
}

/// Creates instance `netns` with the tap [`TAP`] (host side [`HOST_IP`]/24), replacing an
/// old one of that name.
pub fn create_netns(netns: &str) -> Result<()> {
    let _ = Command::new("ip").args(["netns", "del", netns]).output();
    let steps: [&[&str]; 5] = [
        &["netns", "add", netns],
        &["-n", netns, "link", "set", "lo", "up"],
        &["-n", netns, "tuntap", "add", "dev", TAP, "mode", "tap"],
        &["-n", netns, "addr", "add", &format!("{HOST_IP}/24"), "dev", TAP],
        &["-n", netns, "link", "set", TAP, "up"],
    ];
    for args in steps {
        let out = Command::new("ip").args(args).output().map_err(|e| Error::io("cannot run", "ip", e))?;
        if !out.status.success() {
            return Err(Error::Spec {
                vm: netns.into(),
                reason: format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()),
            });
        }
    }
    Ok(())
}

/// Blocks SIGTERM and SIGINT in this thread and every thread it starts from now on, and
/// starts a thread that, on either, runs `cleanup` and ends the process with status 0 (the
/// VMMs die with it). Call before any other thread starts.
pub fn exit_on_signal(cleanup: impl FnOnce() + Send + 'static) -> Result<()> {
    // SAFETY: plain signal-set manipulation on local values; the mask applies to this thread
    // and is inherited by the threads it starts.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::Builder::new()
        .name("voter-signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait on a set of blocked signals, writing into a local.
            unsafe { libc::sigwait(&set, &mut sig) };
            tracing::info!("signal {sig}: stopping");
            cleanup();
            std::process::exit(0);
        })
        .map_err(|e| Error::io("cannot start a thread for", "signals", e))?;
    Ok(())
}

/// Removes the namespaces `vl<PID>-<i>` of `vigil local --spec` processes that have ended
/// (SIGKILLed voters cannot remove their own).
pub fn remove_stale_netns() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else { return };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("vl").and_then(|r| r.split_once('-')).and_then(|(p, _)| p.parse::<u32>().ok()) else { continue };
        if !process_runs(pid) {
            delete_netns(&name);
        }
    }
}

/// Removes an instance's namespace.
pub fn delete_netns(netns: &str) {
    let _ = Command::new("ip").args(["netns", "del", netns]).output();
}

/// Runs `f` on a new thread inside network namespace `netns` (sockets it creates stay there).
fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::io::Result<std::thread::JoinHandle<T>> {
    let path = Path::new("/run/netns").join(netns);
    let file = std::fs::File::open(&path)?;
    std::thread::Builder::new().name(format!("netns-{netns}")).spawn(move || {
        // SAFETY: setns on this thread only (network namespaces are per thread); the file
        // descriptor is open for the call. On failure the thread stays where it was and the
        // connections it opens fail to reach the guest, which is reported as a lost instance.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            tracing::error!("setns into {}: {}", path.display(), std::io::Error::last_os_error());
        }
        f()
    })
}

enum Msg {
    Event(Event),
    Accepted(Conn, TcpStream),
    /// A datagram to the VM's address from this source.
    Datagram(SocketAddr, Vec<u8>),
    Connected(Instance, TcpStream),
    /// Bytes or an end from a link with this id.
    Link(u64, Instance, Option<Vec<u8>>, String),
    /// An instance's process (of this incarnation) ended.
    Exited(Instance, u64, String),
    /// Mode 4: the backup's sessions and acknowledgements.
    Backup(super::remote::FromBackup),
}

struct Proc {
    pid: u32,
    incarnation: u64,
}

/// The instances' state, as `<dir>/local.json` has it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GroupState {
    pub vm: String,
    pub listen: SocketAddr,
    pub instances: Vec<InstanceState>,
    pub repairs: u64,
    pub faults: u64,
    pub replies: u64,
    /// The VM's address is open (every guest serves; a replica's log is replayed).
    #[serde(default)]
    pub serving: bool,
    /// The voter's pid (a state left by an earlier voter is not this one's).
    #[serde(default)]
    pub voter_pid: u32,
    /// Mode 4: how long the backup took to hold a batch of logged requests (the last window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_ack_ms: Option<AckFigures>,
}

/// Times from sending requests to the backup's log to its acknowledgement, ms.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct AckFigures {
    pub batches: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

fn figures(ms: &mut Vec<f64>) -> Option<AckFigures> {
    if ms.is_empty() {
        return None;
    }
    ms.sort_by(f64::total_cmp);
    let q = |x: f64| ms[((ms.len() - 1) as f64 * x).round() as usize];
    let f = AckFigures { batches: ms.len(), p50: q(0.5), p99: q(0.99), max: ms[ms.len() - 1] };
    ms.clear();
    Some(f)
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InstanceState {
    pub netns: String,
    pub pid: u32,
    pub live: bool,
    pub incarnation: u64,
}

fn api_path(dir: &Path, i: Instance) -> PathBuf {
    dir.join(format!("i{i}.sock"))
}

fn start_vmm(spec: &GroupSpec, i: Instance, restore_from: Option<&Path>) -> Result<Child> {
    let inst = &spec.instances[i];
    let api = api_path(&spec.dir, i);
    let _ = std::fs::remove_file(&api);
    let log_path = spec.dir.join(format!("i{i}.log"));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(|e| Error::io("cannot open", &log_path, e))?;
    let log2 = log.try_clone().map_err(|e| Error::io("cannot open", &log_path, e))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &inst.netns]).arg(&spec.vigil).args(["vm"]);
    match restore_from {
        Some(dir) => {
            cmd.arg("restore").arg(dir).args(["--tap", TAP, "--api"]).arg(&api);
        }
        None => {
            cmd.args(["run", "--image"]).arg(&inst.image).args(["--mem", &inst.mem_mib.to_string(), "--tap", TAP]);
            cmd.args(["--ip", &format!("{GUEST_IP}/24"), "--mac", GUEST_MAC, "--api"]).arg(&api).arg("--").args(&inst.args);
        }
    }
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    // SAFETY: only async-signal-safe calls (prctl, sigemptyset, pthread_sigmask) between fork
    // and exec. The VMM dies with the voter
    // (the signal follows the thread that forks it: always the voter's own thread, which lives
    // as long as the process).
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            // The voter blocks SIGTERM and SIGINT (a thread waits for them); the VMM does not.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| Error::io("cannot start", &spec.vigil, e))
}

/// Waits until the instance's control socket answers (the VMM runs).
fn wait_api(api: &Path, limit: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        if vmm::api::call(api, &vmm::Command::Status).is_ok_and(|r| r.ok) {
            return Ok(());
        }
        if t.elapsed() > limit {
            return Err(Error::Spec { vm: api.display().to_string(), reason: "the VMM's control socket did not answer".into() });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The voter's control socket (`<dir>/voter.sock`), for fault injection: one line
/// `inject K REQUEST` (at most 256 bytes) sends REQUEST (an inline Redis request) to instance
/// K alone, its reply dropped (`vigil fail --instance VM#K --wrong N` sends
/// `DEBUG WRONG-ANSWERS N`). Answers `ok` or `error: …`; one client at a time, 2 s each.
fn control(path: &Path, n: usize, tx: Sender<Msg>) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = unixsock::bind(path).map_err(|e| Error::io("cannot listen on", path, e))?;
    std::thread::Builder::new()
        .name("voter-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while line.len() <= 256 && matches!(conn.read(&mut byte), Ok(1)) && byte[0] != b'\n' {
                    line.push(byte[0]);
                }
                let answer = match parse_control(&line, n) {
                    Ok((k, req)) => {
                        let _ = tx.send(Msg::Event(Event::Inject(k, req)));
                        "ok".to_string()
                    }
                    Err(e) => format!("error: {e}"),
                };
                let _ = writeln!(conn, "{answer}");
            }
        })
        .map_err(|e| Error::io("cannot start a thread for", path, e))?;
    Ok(())
}

/// `inject K REQUEST` → (K, REQUEST as one framed request).
fn parse_control(line: &[u8], n: usize) -> std::result::Result<(Instance, Vec<u8>), String> {
    if line.len() > 256 {
        return Err("line longer than 256 bytes".into());
    }
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_string())?.trim();
    let mut words = text.splitn(3, ' ');
    let (Some("inject"), Some(k), Some(req)) = (words.next(), words.next(), words.next()) else {
        return Err(format!("expected `inject K REQUEST`, got {text:?}"));
    };
    let k: Instance = k.parse().ok().filter(|&k| k < n).ok_or_else(|| format!("no instance {k:?} (0..{n})"))?;
    let mut req = req.as_bytes().to_vec();
    req.extend_from_slice(b"\r\n");
    match super::resp::request(&req, 256) {
        Ok(Some(r)) if r.len == req.len() && r.replies => Ok((k, req)),
        _ => Err(format!("{text:?}: not one request")),
    }
}

/// Whether `pid` is a process that has not ended (a zombie has ended).
fn process_runs(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

fn watch(tx: Sender<Msg>, i: Instance, incarnation: u64, mut child: Child) {
    let _ = std::thread::Builder::new().name(format!("vmm-wait-{i}")).spawn(move || {
        let why = match child.wait() {
            Ok(s) => format!("its VMM ended: {s}"),
            Err(e) => format!("cannot wait for its VMM: {e}"),
        };
        let _ = tx.send(Msg::Exited(i, incarnation, why));
    });
}

/// Most bytes queued for one socket's writer; a peer that takes no more is closed.
const MAX_QUEUED: usize = 16 << 20;

enum Out {
    Data(Vec<u8>),
    /// Write what is queued, then close.
    Close,
}

/// One socket's writes, on a thread of their own: a peer that does not read (a stopped
/// instance, a slow client) never blocks the voter.
struct Writer {
    tx: Sender<Out>,
    queued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    sock: TcpStream,
}

impl Writer {
    fn new(sock: TcpStream, on_error: impl FnOnce(String) + Send + 'static) -> std::io::Result<Writer> {
        let (tx, rx) = channel::<Out>();
        let queued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (mut w, q) = (sock.try_clone()?, queued.clone());
        std::thread::Builder::new().name("voter-write".into()).spawn(move || {
            for out in rx {
                match out {
                    Out::Data(b) => {
                        if let Err(e) = w.write_all(&b) {
                            let _ = w.shutdown(Shutdown::Both);
                            on_error(format!("write: {e}"));
                            return;
                        }
                        q.fetch_sub(b.len(), std::sync::atomic::Ordering::Relaxed);
                    }
                    Out::Close => break,
                }
            }
            let _ = w.shutdown(Shutdown::Both);
        })?;
        Ok(Writer { tx, queued, sock })
    }

    /// Queues bytes; `false` when the peer has too much unread already.
    fn send(&self, b: Vec<u8>) -> bool {
        let q = self.queued.fetch_add(b.len(), std::sync::atomic::Ordering::Relaxed);
        q + b.len() <= MAX_QUEUED && self.tx.send(Out::Data(b)).is_ok()
    }

    /// Closes after what is queued.
    fn close(self) {
        let _ = self.tx.send(Out::Close);
    }

    /// Closes now (the reader sees the end at once).
    fn abort(self) {
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

fn reader(tx: Sender<Msg>, mut s: TcpStream, what: impl Fn(Option<Vec<u8>>, String) -> Msg + Send + 'static) {
    let _ = std::thread::Builder::new().name("voter-read".into()).spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    let _ = tx.send(what(None, "closed".into()));
                    return;
                }
                Ok(n) => {
                    if tx.send(what(Some(buf[..n].to_vec()), String::new())).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.send(what(None, e.to_string()));
                    return;
                }
            }
        }
    });
}

/// Opens the VM's address (TCP and UDP): clients' connections and datagrams go to the voter.
fn open_address(spec: &GroupSpec, tx: &Sender<Msg>) -> Result<UdpSocket> {
    let listener = TcpListener::bind(spec.listen).map_err(|e| Error::io("cannot listen on", spec.listen.to_string(), e))?;
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("voter-accept".into())
            .spawn(move || {
                let mut next: Conn = 1;
                for s in listener.incoming() {
                    let Ok(s) = s else { continue };
                    let _ = s.set_nodelay(true);
                    let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
                    if tx.send(Msg::Accepted(next, s)).is_err() {
                        return;
                    }
                    next += 1;
                }
            })
            .map_err(|e| Error::io("cannot start a thread for", spec.listen.to_string(), e))?;
    }
    // Datagrams to the same address and port: each a request (or several) of the client that
    // is its source, in the same total order as the TCP clients'; each voted reply goes back
    // to the source as one datagram.
    let udp = UdpSocket::bind(spec.listen).map_err(|e| Error::io("cannot listen (UDP) on", spec.listen.to_string(), e))?;
    {
        let (tx, r) = (tx.clone(), udp.try_clone().map_err(|e| Error::io("cannot use", spec.listen.to_string(), e))?);
        std::thread::Builder::new()
            .name("voter-udp".into())
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    match r.recv_from(&mut buf) {
                        Ok((n, src)) => {
                            if tx.send(Msg::Datagram(src, buf[..n].to_vec())).is_err() {
                                return;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
            .map_err(|e| Error::io("cannot start a thread for", spec.listen.to_string(), e))?;
    }
    Ok(udp)
}

/// Starts the instances, waits until each guest accepts connections (`ready` limit), then
/// serves clients until the process ends. Returns only on a setup error.
pub fn run(mut spec: GroupSpec, ready: Duration) -> Result<()> {
    let n = spec.instances.len();
    if n != spec.config.n {
        return Err(Error::Spec { vm: spec.vm.clone(), reason: format!("{} instances given for n = {}", n, spec.config.n) });
    }
    let mut voter = Voter::new(spec.config.clone()).map_err(|reason| Error::Spec { vm: spec.vm.clone(), reason })?;
    std::fs::create_dir_all(&spec.dir).map_err(|e| Error::io("cannot create", &spec.dir, e))?;
    let (tx, rx) = channel::<Msg>();
    // The instances.
    let mut procs = Vec::new();
    let snapshot = spec.resume.as_ref().and_then(|r| r.snapshot.clone());
    for i in 0..n {
        let child = start_vmm(&spec, i, snapshot.as_deref())?;
        procs.push(Proc { pid: child.id(), incarnation: 0 });
        watch(tx.clone(), i, 0, child);
    }
    // Connectors, one per instance, inside its namespace.
    let target: SocketAddr = SocketAddr::new(GUEST_IP.parse().expect("constant address"), spec.port);
    let mut connectors: Vec<Sender<()>> = Vec::new();
    for (i, inst) in spec.instances.iter().enumerate() {
        let (ctx, crx) = channel::<()>();
        let tx = tx.clone();
        in_netns(&inst.netns, move || {
            for () in crx {
                // A guest just restored may take a moment to answer: a few attempts.
                let mut last = None;
                for _ in 0..CONNECT_ATTEMPTS {
                    match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
                            last = Some(Ok(s));
                            break;
                        }
                        Err(e) => last = Some(Err(e)),
                    }
                }
                let _ = match last {
                    Some(Ok(s)) => tx.send(Msg::Connected(i, s)),
                    Some(Err(e)) => tx.send(Msg::Event(Event::InstanceLost(i, format!("cannot connect to {target}: {e}")))),
                    None => Ok(()),
                };
            }
        })
        .map_err(|e| Error::io("cannot enter the namespace of", &inst.netns, e))?;
        connectors.push(ctx);
    }
    // Every guest serving before the VM's address opens.
    let t = Instant::now();
    for (i, inst) in spec.instances.iter().enumerate() {
        loop {
            let ok = in_netns(&inst.netns, move || TcpStream::connect_timeout(&target, CONNECT_TIMEOUT).is_ok())
                .map_err(|e| Error::io("cannot enter the namespace of", &inst.netns, e))?
                .join()
                .unwrap_or(false);
            if ok {
                break;
            }
            if t.elapsed() > ready {
                return Err(Error::Spec {
                    vm: spec.vm.clone(),
                    reason: format!(
                        "instance {i} does not serve on {target} after {ready:?} (see {})",
                        spec.dir.join(format!("i{i}.log")).display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Fault injection only: the VM serves without it.
    if let Err(e) = control(&spec.dir.join("voter.sock"), n, tx.clone()) {
        tracing::warn!("{}: no control socket: {e}", spec.vm);
    }
    let store_events = spec.store.clone().map(|s| store_logger(s, spec.vm.clone()));
    let backup_tx = spec.backup.clone().map(|(addr, key)| {
        let tx = tx.clone();
        super::remote::start_sender(addr, spec.vm.clone(), key, move |m| {
            let _ = tx.send(Msg::Backup(m));
        })
    });
    // A takeover's replay: the log's requests, in chunks, before any client's.
    let replay_count = spec.resume.as_ref().map_or(0, |r| r.requests.len());
    let mut replay = std::collections::VecDeque::new();
    if let Some(r) = spec.resume.as_mut() {
        let mut chunk = Vec::new();
        let mut count = 0;
        for req in std::mem::take(&mut r.requests) {
            chunk.extend_from_slice(&req);
            count += 1;
            if count == REPLAY_CHUNK || chunk.len() > 1 << 20 {
                replay.push_back(std::mem::take(&mut chunk));
                count = 0;
            }
        }
        if !chunk.is_empty() {
            replay.push_back(chunk);
        }
    }
    // The local replica starts as the replica resumed (its snapshot linked, the state before
    // this voter's first request; the replay is logged after it), or on a fresh start as the
    // instances' fresh boot, so that it holds every request from the start: a crash before
    // this voter's first snapshot loses nothing.
    let mut log_locally = false;
    let local = match &spec.replica {
        Some(dir) => {
            let mut st = super::remote::Store::open(dir)?;
            st.reset()?;
            let base = match spec.resume.as_ref().map(|r| &r.snapshot) {
                Some(Some(snapshot)) => st.link_snapshot(snapshot, 0),
                Some(None) | None => st.mark_fresh(),
            };
            match base {
                Ok(()) => log_locally = true,
                Err(e) => {
                    tracing::warn!("{}: the local replica starts at the first snapshot: {e}", spec.vm);
                    st.reset()?;
                }
            }
            Some(st)
        }
        None => None,
    };
    if log_locally {
        voter.log_locally();
    }
    let mut d = Driver {
        store_events,
        local,
        log_sent: Default::default(),
        backup_nonce: [0; 16],
        pending_drop: None,
        pending_up: None,
        marker_client: None,
        ack_ms: Vec::new(),
        ack_report: Instant::now(),
        ack_figures: None,
        backup_tx,
        backup_session: 0,
        checkpoints: 0,
        checkpoint_dir: None,
        replay,
        replayed: 0,
        replay_count,
        next_replay: REPLAY_BASE,
        udp: None,
        spec,
        tx,
        procs,
        connectors,
        clients: HashMap::new(),
        links: HashMap::new(),
        next_link: 1,
        start: Instant::now(),
        events: None,
        sources: HashMap::new(),
        source_of: HashMap::new(),
        next_source: SOURCE_BASE,
    };
    d.write_state(&voter);
    for a in voter.start() {
        d.act(&voter, a);
    }
    // Without a remote backup the local replica is the voter's backup, acknowledging at once.
    if d.local.is_some() && d.backup_tx.is_none() {
        d.feed(&mut voter, Event::BackupConnected);
    }
    d.serve(&mut voter, rx)
}

struct Driver {
    spec: GroupSpec,
    tx: Sender<Msg>,
    procs: Vec<Proc>,
    connectors: Vec<Sender<()>>,
    clients: HashMap<Conn, Writer>,
    /// Instance → (link id, writer).
    links: HashMap<Instance, (u64, Writer)>,
    next_link: u64,
    start: Instant,
    events: Option<std::fs::File>,
    store_events: Option<Sender<String>>,
    /// The VM's address, once open (after a takeover's replay).
    udp: Option<UdpSocket>,
    /// The local replica (a restarted voter resumes from it).
    local: Option<super::remote::Store>,
    /// Mode 4: the current session's nonce; a session dropped and not yet recorded in the
    /// store (why, its nonce), and a new one waiting for that; the store client for it.
    backup_nonce: [u8; 16],
    pending_drop: Option<(String, [u8; 16])>,
    pending_up: Option<(u64, [u8; 16])>,
    marker_client: Option<store::Client>,
    /// Mode 4: requests sent to the backup's log (the end of each batch, when), the times to
    /// its acknowledgement since the last report, and the last report's figures.
    log_sent: std::collections::VecDeque<(u64, Instant)>,
    ack_ms: Vec<f64>,
    ack_report: Instant,
    ack_figures: Option<AckFigures>,
    /// Mode 4: the backup's sender, its current session, snapshots taken for it.
    backup_tx: Option<Sender<super::remote::ToBackup>>,
    backup_session: u64,
    checkpoints: u64,
    checkpoint_dir: Option<PathBuf>,
    /// A takeover's requests still to replay (chunks), and how many were.
    replay: std::collections::VecDeque<Vec<u8>>,
    replayed: usize,
    replay_count: usize,
    next_replay: Conn,
    /// Datagram source → (its client identifier, when it last sent).
    sources: HashMap<SocketAddr, (Conn, Instant)>,
    source_of: HashMap<Conn, SocketAddr>,
    next_source: Conn,
}

impl Driver {
    fn now(&self) -> Nanos {
        self.start.elapsed().as_nanos() as Nanos
    }

    fn serve(&mut self, voter: &mut Voter, rx: Receiver<Msg>) -> Result<()> {
        let mut last_tick = Instant::now();
        let t0 = Instant::now();
        loop {
            let mut events = Vec::new();
            // A takeover's replay, paced by the instances' answers; then the address opens.
            if self.udp.is_none() && voter.unanswered() < REPLAY_CHUNK as u64 {
                if let Some(chunk) = self.replay.pop_front() {
                    let c = self.next_replay;
                    self.next_replay += 1;
                    self.replayed += 1;
                    events.extend([Event::ClientOpened(c), Event::ClientBytes(c, chunk), Event::ClientClosed(c)]);
                } else if voter.unanswered() == 0 {
                    self.udp = Some(open_address(&self.spec, &self.tx)?);
                    self.write_state(voter);
                    let what = match &self.spec.resume {
                        Some(r) => format!(
                            "{} instances restored from its snapshot (after request {}) and {} logged requests replayed; serving in {} ms",
                            self.spec.instances.len(),
                            r.position,
                            self.replay_count,
                            t0.elapsed().as_millis()
                        ),
                        None => format!("{} instances voted", self.spec.instances.len()),
                    };
                    tracing::info!("{}: {what} behind {} (TCP and UDP)", self.spec.vm, self.spec.listen);
                    if self.spec.resume.is_some() {
                        if let Some(tx) = &self.store_events {
                            let _ = tx.send(format!("{}: continues from the replica: {what}", self.spec.vm));
                        }
                    }
                    if let Some((ip, ifname)) = self.spec.announce.clone() {
                        let vm = self.spec.vm.clone();
                        let _ = std::thread::Builder::new().name("voter-arp".into()).spawn(move || {
                            // Again a little later: a frame lost while the bridge learns is no matter.
                            for wait in [0, 100, 400] {
                                std::thread::sleep(Duration::from_millis(wait));
                                if let Err(e) = super::remote::gratuitous_arp(&ifname, ip) {
                                    tracing::warn!("{vm}: gratuitous ARP for {ip} on {ifname}: {e}");
                                    return;
                                }
                            }
                        });
                    }
                }
            }
            let msg = rx.recv_timeout(Duration::from_millis(if self.udp.is_none() { 1 } else { 10 }));
            match msg {
                Ok(Msg::Event(e)) => events.push(e),
                Ok(Msg::Accepted(c, s)) => {
                    if self.clients.len() >= MAX_CLIENTS {
                        tracing::warn!("{}: a client over the limit of {MAX_CLIENTS} closed", self.spec.vm);
                        let _ = s.shutdown(Shutdown::Both);
                    } else {
                        let tx = self.tx.clone();
                        let w = s.try_clone().and_then(|w| {
                            Writer::new(w, move |_| {
                                let _ = tx.send(Msg::Event(Event::ClientClosed(c)));
                            })
                        });
                        if let Ok(w) = w {
                            reader(self.tx.clone(), s, move |b, _| match b {
                                Some(b) => Msg::Event(Event::ClientBytes(c, b)),
                                None => Msg::Event(Event::ClientEof(c)),
                            });
                            self.clients.insert(c, w);
                            events.push(Event::ClientOpened(c));
                        }
                    }
                }
                Ok(Msg::Datagram(src, b)) => {
                    let known = self.sources.get_mut(&src).map(|(c, seen)| {
                        *seen = Instant::now();
                        *c
                    });
                    let c = match known {
                        Some(c) => Some(c),
                        None if self.sources.len() < MAX_SOURCES => {
                            let c = self.next_source;
                            self.next_source += 1;
                            self.sources.insert(src, (c, Instant::now()));
                            self.source_of.insert(c, src);
                            events.push(Event::ClientOpened(c));
                            Some(c)
                        }
                        None => {
                            tracing::warn!("{}: a datagram from {src} dropped: {MAX_SOURCES} sources already", self.spec.vm);
                            None
                        }
                    };
                    if let Some(c) = c {
                        events.push(Event::ClientBytes(c, b));
                    }
                }
                Ok(Msg::Connected(i, s)) => {
                    let id = self.next_link;
                    self.next_link += 1;
                    let tx = self.tx.clone();
                    let w = s.try_clone().and_then(|w| {
                        Writer::new(w, move |why| {
                            let _ = tx.send(Msg::Link(id, i, None, why));
                        })
                    });
                    match w {
                        Ok(w) => {
                            reader(self.tx.clone(), s, move |b, why| Msg::Link(id, i, b, why));
                            if let Some((_, old)) = self.links.insert(i, (id, w)) {
                                old.abort();
                            }
                            events.push(Event::InstanceConnected(i));
                        }
                        Err(e) => events.push(Event::InstanceLost(i, e.to_string())),
                    }
                }
                Ok(Msg::Link(id, i, b, why)) => {
                    if self.links.get(&i).is_some_and(|l| l.0 == id) {
                        match b {
                            Some(b) => events.push(Event::InstanceBytes(i, b)),
                            None => {
                                if let Some((_, w)) = self.links.remove(&i) {
                                    w.abort();
                                }
                                events.push(Event::InstanceLost(i, why));
                            }
                        }
                    }
                }
                Ok(Msg::Exited(i, inc, why)) => {
                    if self.procs[i].incarnation == inc {
                        events.push(Event::InstanceExited(i, why));
                    }
                }
                Ok(Msg::Backup(m)) => match m {
                    super::remote::FromBackup::Up(k, nonce) if self.pending_drop.is_some() => {
                        // Connected again before the drop of the last session is recorded.
                        self.pending_up = Some((k, nonce));
                    }
                    super::remote::FromBackup::Up(k, nonce) => {
                        self.backup_session = k;
                        self.backup_nonce = nonce;
                        tracing::info!("{}: the backup is connected (session {k})", self.spec.vm);
                        events.push(Event::BackupConnected);
                    }
                    super::remote::FromBackup::Acked(k, upto) if k == self.backup_session => {
                        // How long the backup took to hold each batch of requests (a reply's
                        // hold in mode 4: `output_commit` in the model).
                        while self.log_sent.front().is_some_and(|&(end, _)| end <= upto) {
                            let (_, t) = self.log_sent.pop_front().expect("front");
                            self.ack_ms.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                        if self.ack_ms.len() >= 4096 || (self.ack_report.elapsed() > Duration::from_secs(1) && !self.ack_ms.is_empty()) {
                            self.ack_figures = figures(&mut self.ack_ms);
                            self.ack_report = Instant::now();
                            self.write_state(voter);
                        }
                        events.push(Event::BackupLogged(upto));
                    }
                    super::remote::FromBackup::Down(k, why) if k == self.backup_session => self.begin_drop(why),
                    _ => {}
                },
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
            if last_tick.elapsed() >= Duration::from_millis(10) {
                last_tick = Instant::now();
                // Mode 4: a backup that acknowledges nothing for ACK_TIMEOUT (its host died
                // silently, its link is cut) is dropped, so that replies do not wait for ever.
                if self.backup_session != 0 && self.log_sent.front().is_some_and(|(_, t)| t.elapsed() > ACK_TIMEOUT) {
                    if let Some(tx) = &self.backup_tx {
                        let _ = tx.send(super::remote::ToBackup::Drop { session: self.backup_session });
                    }
                    self.begin_drop(format!("no acknowledgement for {} ms", ACK_TIMEOUT.as_millis()));
                }
                if let Some(e) = self.finish_drop() {
                    events.push(e);
                }
                events.push(Event::Tick);
                let idle: Vec<SocketAddr> = self.sources.iter().filter(|(_, (_, t))| t.elapsed() > SOURCE_IDLE).map(|(a, _)| *a).collect();
                for a in idle {
                    if let Some((c, _)) = self.sources.remove(&a) {
                        self.source_of.remove(&c);
                        events.push(Event::ClientClosed(c));
                    }
                }
            }
            for e in events {
                self.feed(voter, e);
            }
        }
    }

    /// The backup's session ended or was given up: its acknowledgements count no more, and the
    /// replies it held may go once the drop is recorded (`finish_drop`). The local replica
    /// stays: every request goes on to its log (`Action::LogLocal`), so a voter restarted
    /// while the group is unprotected continues every reply it released.
    fn begin_drop(&mut self, why: String) {
        self.backup_session = 0;
        self.log_sent.clear();
        self.pending_drop = Some((why, self.backup_nonce));
    }

    /// Records the dropped session in the store (`remote::dropped_path`) before the voter may
    /// release what the backup never acknowledged: a takeover never resumes from a replica
    /// its primary went on without. Until the store takes it, replies keep waiting (tried
    /// again every tick). Then the session's loss, and a new session waiting, go to the voter.
    fn finish_drop(&mut self) -> Option<Event> {
        let (why, nonce) = self.pending_drop.clone()?;
        if let Some(sock) = &self.spec.store {
            if self.marker_client.is_none() {
                self.marker_client = store::Client::connect(sock).ok().map(|mut c| {
                    c.set_retry_for(Duration::ZERO);
                    c.set_request_timeout(Duration::from_millis(500));
                    c
                });
            }
            let hex = crate::auth::hex(&nonce);
            let ok =
                self.marker_client.as_mut().is_some_and(|c| c.write(&super::remote::dropped_path(&self.spec.vm), hex.as_bytes()).is_ok());
            if !ok {
                self.marker_client = None;
                tracing::warn!("{}: cannot record the dropped backup session in the store: replies wait", self.spec.vm);
                return None;
            }
        }
        self.pending_drop = None;
        if let Some((k, nonce)) = self.pending_up.take() {
            // (Delivered after the loss, as a new connection.)
            let _ = self.tx.send(Msg::Backup(super::remote::FromBackup::Up(k, nonce)));
        }
        Some(Event::BackupLost(why))
    }

    /// Hands the voter one event and does what it says (and what that causes, in order).
    fn feed(&mut self, voter: &mut Voter, e: Event) {
        let mut queue = std::collections::VecDeque::from([e]);
        while let Some(e) = queue.pop_front() {
            let now = self.now();
            for a in voter.handle(now, e) {
                if let Some(back) = self.act(voter, a) {
                    queue.push_back(back);
                }
            }
        }
    }

    /// Does one action; an event it causes at once (a failed write) is returned.
    fn act(&mut self, voter: &Voter, a: Action) -> Option<Event> {
        match a {
            Action::ToClient(c, b) if c >= SOURCE_BASE => {
                if let Some(src) = self.source_of.get(&c) {
                    if let Some(Err(e)) = self.udp.as_ref().map(|u| u.send_to(&b, src)) {
                        tracing::warn!("{}: a reply to {src} not sent: {e}", self.spec.vm);
                    }
                }
            }
            Action::CloseClient(c) if c >= SOURCE_BASE => {
                if let Some(src) = self.source_of.remove(&c) {
                    self.sources.remove(&src);
                }
            }
            Action::ToClient(c, b) => {
                if let Some(w) = self.clients.get(&c) {
                    if !w.send(b) {
                        if let Some(w) = self.clients.remove(&c) {
                            w.abort();
                        }
                        return Some(Event::ClientClosed(c));
                    }
                }
            }
            Action::CloseClient(c) => {
                if let Some(w) = self.clients.remove(&c) {
                    w.close();
                }
            }
            Action::Connect(i) => {
                let _ = self.connectors[i].send(());
            }
            Action::ToInstance(i, b) => {
                if let Some((_, w)) = self.links.get(&i) {
                    if !w.send(b) {
                        if let Some((_, w)) = self.links.remove(&i) {
                            w.abort();
                        }
                        return Some(Event::InstanceLost(i, format!("more than {MAX_QUEUED} bytes unread")));
                    }
                }
            }
            Action::Disconnect(i) => {
                if let Some((_, w)) = self.links.remove(&i) {
                    w.abort();
                }
            }
            Action::Stop(i) => {
                // SIGKILL also ends a stopped (hung) process; the waiter thread reaps it.
                let pid = self.procs[i].pid as libc::pid_t;
                // SAFETY: kill(2) on the pid of a child this driver started and has not reaped
                // (its waiter reaps it only after it ends, so the pid is not reused before).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                // A new incarnation number: the old process's exit is no news.
                self.procs[i].incarnation += 1;
                self.write_state(voter);
            }
            Action::Snapshot(d) => {
                let (api, dir, tx) = (api_path(&self.spec.dir, d), self.spec.dir.join(format!("snap-{d}")), self.tx.clone());
                let _ = std::thread::Builder::new().name("voter-snapshot".into()).spawn(move || {
                    let _ = std::fs::remove_dir_all(&dir);
                    let r = vmm::api::call(&api, &vmm::Command::Snapshot { dir: dir.clone() });
                    let resumed = vmm::api::call(&api, &vmm::Command::Resume);
                    let ev = match (r, resumed) {
                        (Ok(r), Ok(q)) if r.ok && q.ok => Event::SnapshotTaken(d),
                        (Ok(r), _) if !r.ok => Event::SnapshotFailed(d, r.error.unwrap_or_default()),
                        (Err(e), _) | (_, Err(e)) => Event::SnapshotFailed(d, e.to_string()),
                        (_, Ok(q)) => Event::SnapshotFailed(d, format!("resume: {}", q.error.unwrap_or_default())),
                    };
                    let _ = tx.send(Msg::Event(ev));
                });
            }
            Action::Restore { instance, donor } => {
                // The stopped process must have let go of the tap (its exit closes it).
                let old = self.procs[instance].pid;
                let t = Instant::now();
                while t.elapsed() < Duration::from_millis(500) && process_runs(old) {
                    std::thread::sleep(Duration::from_millis(2));
                }
                let dir = self.spec.dir.join(format!("snap-{donor}"));
                match start_vmm(&self.spec, instance, Some(&dir)) {
                    Err(e) => return Some(Event::RestoreFailed(instance, e.to_string())),
                    Ok(child) => {
                        let inc = self.procs[instance].incarnation + 1;
                        self.procs[instance] = Proc { pid: child.id(), incarnation: inc };
                        watch(self.tx.clone(), instance, inc, child);
                        let (api, tx) = (api_path(&self.spec.dir, instance), self.tx.clone());
                        let _ = std::thread::Builder::new().name("voter-restore".into()).spawn(move || {
                            let ev = match wait_api(&api, Duration::from_secs(10)) {
                                Ok(()) => Event::Restored(instance),
                                Err(e) => Event::RestoreFailed(instance, e.to_string()),
                            };
                            let _ = tx.send(Msg::Event(ev));
                        });
                    }
                }
            }
            Action::Checkpoint(d) => {
                // Mode 4: a snapshot for the backup, in a directory of its own (the sender
                // removes it once shipped).
                self.checkpoints += 1;
                let (api, dir, tx) =
                    (api_path(&self.spec.dir, d), self.spec.dir.join(format!("ckpt-{}", self.checkpoints)), self.tx.clone());
                self.checkpoint_dir = Some(dir.clone());
                let _ = std::thread::Builder::new().name("voter-checkpoint".into()).spawn(move || {
                    let _ = std::fs::remove_dir_all(&dir);
                    let t = Instant::now();
                    let r = vmm::api::call(&api, &vmm::Command::Snapshot { dir: dir.clone() });
                    let resumed = vmm::api::call(&api, &vmm::Command::Resume);
                    let ev = match (r, resumed) {
                        (Ok(r), Ok(q)) if r.ok && q.ok => {
                            tracing::info!("snapshot of instance {d} for the backup in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
                            Event::SnapshotTaken(d)
                        }
                        (Ok(r), _) if !r.ok => Event::SnapshotFailed(d, r.error.unwrap_or_default()),
                        (Err(e), _) | (_, Err(e)) => Event::SnapshotFailed(d, e.to_string()),
                        (_, Ok(q)) => Event::SnapshotFailed(d, format!("resume: {}", q.error.unwrap_or_default())),
                    };
                    let _ = tx.send(Msg::Event(ev));
                });
            }
            Action::ShipSnapshot { donor, position } => {
                let dir = self.checkpoint_dir.take()?;
                let local = self.local.as_mut().map(|st| st.link_snapshot(&dir, position));
                if let Some(Err(e)) = &local {
                    tracing::error!("{}: the local replica: {e}", self.spec.vm);
                    self.local = None;
                }
                match &self.backup_tx {
                    Some(tx) => {
                        let _ =
                            tx.send(super::remote::ToBackup::Snapshot { session: self.backup_session, dir, position, donor: donor as u8 });
                    }
                    None => {
                        let _ = std::fs::remove_dir_all(&dir);
                        return match self.local.as_ref().and_then(|st| st.acked()) {
                            Some(upto) => Some(Event::BackupLogged(upto)),
                            None => Some(Event::BackupLost("the local replica failed".into())),
                        };
                    }
                }
            }
            Action::Log { from, count, bytes } => {
                if self.backup_tx.is_some() {
                    self.log_sent.push_back((from + count, Instant::now()));
                    if self.log_sent.len() > 100_000 {
                        self.log_sent.pop_front();
                    }
                }
                // The local replica first: synchronously, before any instance gets them.
                if let Some(st) = self.local.as_mut() {
                    if let Err(e) = st.append(from, count, &bytes) {
                        tracing::error!("{}: the local replica: {e}", self.spec.vm);
                        self.local = None;
                    }
                }
                match &self.backup_tx {
                    Some(tx) => {
                        let _ = tx.send(super::remote::ToBackup::Log { session: self.backup_session, from, count, bytes });
                    }
                    None => {
                        return match self.local.as_ref().and_then(|st| st.acked()) {
                            Some(upto) => Some(Event::BackupLogged(upto)),
                            None => Some(Event::BackupLost("the local replica failed".into())),
                        };
                    }
                }
            }
            Action::LogLocal { from, count, bytes } => {
                if let Some(st) = self.local.as_mut() {
                    if let Err(e) = st.append(from, count, &bytes) {
                        tracing::error!("{}: the local replica: {e}", self.spec.vm);
                        self.local = None;
                    }
                }
            }
            Action::Report(r) => self.report(voter, &r),
        }
        None
    }

    fn report(&mut self, voter: &Voter, r: &Report) {
        match r {
            Report::Fault { .. } | Report::Disagreement { .. } | Report::Degraded { .. } | Report::RepairFailed { .. } => {
                tracing::warn!("{}: {r:?}", self.spec.vm)
            }
            _ => tracing::info!("{}: {r:?}", self.spec.vm),
        }
        if self.events.is_none() {
            let path = self.spec.dir.join("events.jsonl");
            self.events = std::fs::OpenOptions::new().create(true).append(true).open(path).ok();
        }
        if let Some(tx) = &self.store_events {
            let what = match r {
                Report::Fault { instance, fault } => format!("{}#{}: {fault}; repairing", self.spec.vm, instance + 1),
                Report::Repaired { instance, donor, took } => {
                    format!("{}#{}: repaired from #{}'s snapshot in {} ms", self.spec.vm, instance + 1, donor + 1, took / 1_000_000)
                }
                Report::Protected { donor, position } if self.backup_tx.is_some() => format!(
                    "{}: protected: the backup holds #{}'s snapshot (after request {position}) and the log after it",
                    self.spec.vm,
                    donor + 1
                ),
                Report::Protected { donor, position } => format!(
                    "{}: its local replica holds #{}'s snapshot (after request {position}) and the log after it",
                    self.spec.vm,
                    donor + 1
                ),
                Report::Unprotected { reason } => format!("{}: unprotected: the backup is gone ({reason})", self.spec.vm),
                other => format!("{}: {other:?}", self.spec.vm),
            };
            let _ = tx.send(what);
        }
        if let (Some(path), Report::Protected { .. } | Report::Unprotected { .. }) = (&self.spec.state_file, r) {
            let st = crate::protection::primary::ReplicationState {
                protected: voter.protected(),
                detail: format!("{r:?}"),
                figures: None,
                handover_ms: None,
                // (No checkpoint policy and no backup to replace: the agent never switches
                // them here.)
                policy: None,
                backup: None,
            };
            st.save(path);
        }
        if let Some(f) = self.events.as_mut() {
            let line = serde_json::json!({ "at_ms": self.start.elapsed().as_millis() as u64, "vm": self.spec.vm, "event": r });
            let _ = writeln!(f, "{line}");
        }
        self.write_state(voter);
    }

    fn write_state(&self, voter: &Voter) {
        let state = GroupState {
            vm: self.spec.vm.clone(),
            listen: self.spec.listen,
            instances: (0..self.spec.instances.len())
                .map(|i| InstanceState {
                    netns: self.spec.instances[i].netns.clone(),
                    pid: self.procs[i].pid,
                    live: voter.is_live(i),
                    incarnation: self.procs[i].incarnation,
                })
                .collect(),
            repairs: voter.counters.repairs,
            faults: voter.counters.faults,
            replies: voter.counters.replies,
            serving: self.udp.is_some(),
            voter_pid: std::process::id(),
            log_ack_ms: self.ack_figures,
        };
        if let Ok(text) = serde_json::to_vec_pretty(&state) {
            let _ = crate::replace_file(&self.spec.dir.join("local.json"), &text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_lines() {
        assert_eq!(parse_control(b"inject 2 DEBUG WRONG-ANSWERS 100", 3), Ok((2, b"DEBUG WRONG-ANSWERS 100\r\n".to_vec())));
        assert!(parse_control(b"inject 3 PING", 3).unwrap_err().contains("no instance"));
        assert!(parse_control(b"inject x PING", 3).is_err());
        assert!(parse_control(b"wrong 1", 3).unwrap_err().contains("expected"));
        assert!(parse_control(b"inject 1 PING\r\nPING", 3).is_err(), "one request only");
        assert!(parse_control(&[b'a'; 300], 3).is_err());
        assert!(parse_control(&[0xff, 0xfe], 3).is_err());
    }
}
