//! A small supervisor: runs one component (the store server) as a child process, heartbeats it
//! over its socket with `XS_CONTROL check` every period, and restarts only that component when
//! it crashes (its exit is seen at once by a thread blocked in `waitpid`) or hangs (`misses`
//! heartbeats in a row go unanswered; the child is then killed with SIGKILL). Every incident is
//! reported with its detection and recovery times. A replacement that cannot start (it exits,
//! or does not answer in time: the store's etcd front end on a host cut off from etcd) is
//! started again after a pause that doubles up to [`MAX_RETRY_PAUSE`], for as long as it takes:
//! a supervisor never gives its component up.

use crate::{Error, Result};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};
use store::wire::{self, decode, Msg, MsgType};

/// What to run and how to watch it.
#[derive(Debug, Clone)]
pub struct Config {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// The child's socket, where heartbeats go.
    pub socket: PathBuf,
    /// Time between heartbeats (and the time a heartbeat may take).
    pub period: Duration,
    /// Consecutive missed heartbeats that mean "hung".
    pub misses: u32,
    /// How long a new child may take to answer its first heartbeat.
    pub start_timeout: Duration,
}

/// The longest pause between attempts to start a replacement.
pub const MAX_RETRY_PAUSE: Duration = Duration::from_secs(2);
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// A replacement that could not start yet.
#[derive(Debug)]
struct Pending {
    cause: Cause,
    old_pid: u32,
    detected_at: Instant,
    /// The next attempt, and the pause after it fails too.
    next_at: Instant,
    pause: Duration,
}

/// Why a child was restarted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// The child exited (or was killed by someone else).
    Crashed(String),
    /// The child stopped answering heartbeats.
    Hung { missed: u32 },
}

/// One failure and its repair.
#[derive(Debug, Clone)]
pub struct Incident {
    pub cause: Cause,
    pub old_pid: u32,
    pub new_pid: u32,
    /// When the supervisor knew.
    pub detected_at: Instant,
    /// From detection until the new child answered a heartbeat.
    pub recovery: Duration,
}

/// A running, supervised child.
pub struct Supervisor {
    cfg: Config,
    pid: u32,
    exited: Receiver<(u32, std::io::Result<ExitStatus>)>,
    exited_tx: std::sync::mpsc::Sender<(u32, std::io::Result<ExitStatus>)>,
    hb: Option<UnixStream>,
    missed: u32,
    next_req: u32,
    restarts: u64,
    /// Set while no child runs: the last replacement could not start.
    pending: Option<Pending>,
}

impl Supervisor {
    /// Starts the child and waits for its first heartbeat.
    pub fn start(cfg: Config) -> Result<Supervisor> {
        let (tx, rx) = channel();
        let mut s = Supervisor { cfg, pid: 0, exited: rx, exited_tx: tx, hb: None, missed: 0, next_req: 1, restarts: 0, pending: None };
        s.spawn()?;
        s.wait_ready()?;
        Ok(s)
    }

    /// The current child's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How many times the child was restarted.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.cfg.program);
        cmd.args(&self.cfg.args);
        // The child dies with the supervisor (more precisely: with the thread that spawned it),
        // so that stopping the supervisor never leaves an unsupervised store behind.
        // SAFETY: the closure runs between fork and exec; it only calls prctl(2), which is
        // async-signal-safe, and allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child: Child = cmd.spawn().map_err(|e| Error::io("starting supervised", &self.cfg.program, e))?;
        self.pid = child.id();
        let tx = self.exited_tx.clone();
        std::thread::spawn(move || {
            let pid = child.id();
            let _ = tx.send((pid, child.wait()));
        });
        self.hb = None;
        self.missed = 0;
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < self.cfg.start_timeout {
            if let Ok((pid, st)) = self.exited.try_recv() {
                if pid == self.pid {
                    self.pid = 0;
                    return Err(Error::Supervisor(format!(
                        "{} (pid {pid}) exited while starting: {}",
                        self.cfg.program.display(),
                        describe(&st)
                    )));
                }
            }
            if self.heartbeat(Duration::from_millis(100)) {
                return Ok(());
            }
            self.hb = None;
            std::thread::sleep(Duration::from_millis(1));
        }
        Err(Error::Supervisor(format!(
            "{} (pid {}) did not answer on {} within {:?}",
            self.cfg.program.display(),
            self.pid,
            self.cfg.socket.display(),
            self.cfg.start_timeout
        )))
    }

    /// One `XS_CONTROL check` round trip on the heartbeat connection.
    fn heartbeat(&mut self, timeout: Duration) -> bool {
        let req_id = self.next_req;
        self.next_req = self.next_req.wrapping_add(1);
        let run = |hb: &mut Option<UnixStream>| -> std::io::Result<bool> {
            if hb.is_none() {
                *hb = Some(unixsock::connect(&self.cfg.socket)?);
            }
            let Some(s) = hb.as_mut() else { return Ok(false) };
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            s.write_all(&Msg::new(MsgType::Control, req_id, 0, wire::strings(&["check"])).encode())?;
            let deadline = Instant::now() + timeout;
            let mut buf = Vec::new();
            loop {
                if let Ok(Some((m, _))) = decode(&buf) {
                    return Ok(m.req_id == req_id && m.ty == MsgType::Control as u32);
                }
                if Instant::now() >= deadline {
                    return Ok(false);
                }
                let mut chunk = [0u8; 256];
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    return Ok(false);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        let mut hb = self.hb.take();
        let ok = matches!(run(&mut hb), Ok(true));
        if ok {
            self.hb = hb;
        }
        ok
    }

    fn kill(&self) {
        if self.pid == 0 {
            return;
        }
        // SAFETY: kill(2) with a pid we spawned and whose exit we have not yet reaped (the wait
        // thread has not reported it), so the pid still names our child; no memory is touched.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
        }
    }

    /// Kills the running child and reaps it (its socket must be free for the next one).
    fn kill_and_reap(&mut self) -> Result<()> {
        let old_pid = self.pid;
        if old_pid == 0 {
            return Ok(());
        }
        self.kill();
        loop {
            match self.exited.recv_timeout(Duration::from_secs(5)) {
                Ok((pid, _)) if pid == old_pid => break,
                Ok(_) => {}
                Err(_) => return Err(Error::Supervisor(format!("pid {old_pid} survived SIGKILL"))),
            }
        }
        self.pid = 0;
        Ok(())
    }

    fn restart(&mut self, cause: Cause, detected_at: Instant) -> Result<Option<Incident>> {
        let old_pid = self.pid;
        if matches!(cause, Cause::Hung { .. }) {
            self.kill_and_reap()?;
        }
        self.pid = 0;
        self.attempt(Pending { cause, old_pid, detected_at, next_at: Instant::now(), pause: FIRST_RETRY_PAUSE })
    }

    /// Starts a replacement; if it cannot start, it is tried again after the pending pause.
    fn attempt(&mut self, p: Pending) -> Result<Option<Incident>> {
        let started = self.spawn().and_then(|()| self.wait_ready());
        match started {
            Ok(()) => {
                self.restarts += 1;
                let (cause, old_pid, detected_at) = (p.cause, p.old_pid, p.detected_at);
                Ok(Some(Incident { cause, old_pid, new_pid: self.pid, detected_at, recovery: detected_at.elapsed() }))
            }
            Err(e) => {
                // A child that did not answer in time is still running: not the next one's
                // way.
                self.kill_and_reap()?;
                tracing::warn!("supervisor: {e}; trying again in {} ms", p.pause.as_millis());
                let pause = (p.pause * 2).min(MAX_RETRY_PAUSE);
                self.pending = Some(Pending { next_at: Instant::now() + p.pause, pause, ..p });
                Ok(None)
            }
        }
    }

    /// Whether a child runs (false while a replacement could not start yet).
    pub fn running(&self) -> bool {
        self.pending.is_none()
    }

    /// Supervises for one heartbeat period: returns an incident if the child was restarted.
    pub fn step(&mut self) -> Result<Option<Incident>> {
        if let Some(p) = self.pending.take() {
            let wait = p.next_at.saturating_duration_since(Instant::now());
            if wait > self.cfg.period {
                std::thread::sleep(self.cfg.period);
                self.pending = Some(p);
                return Ok(None);
            }
            std::thread::sleep(wait);
            return self.attempt(p);
        }
        let period_end = Instant::now() + self.cfg.period;
        // Wait out the period, but wake up at once if the child exits.
        match self.exited.recv_timeout(self.cfg.period) {
            Ok((pid, st)) if pid == self.pid => {
                let at = Instant::now();
                return self.restart(Cause::Crashed(describe(&st)), at);
            }
            Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Err(Error::Supervisor("wait thread vanished".into())),
        }
        let left = period_end.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        if self.heartbeat(left.max(self.cfg.period)) {
            self.missed = 0;
            return Ok(None);
        }
        // A failed heartbeat may be a crash whose exit is about to be reported.
        if let Ok((pid, st)) = self.exited.recv_timeout(Duration::from_millis(1)) {
            if pid == self.pid {
                let at = Instant::now();
                return self.restart(Cause::Crashed(describe(&st)), at);
            }
        }
        self.missed += 1;
        if self.missed >= self.cfg.misses {
            let missed = self.missed;
            return self.restart(Cause::Hung { missed }, Instant::now());
        }
        Ok(None)
    }

    /// Supervises until the next incident, for at most `limit`: `None` if none came (a
    /// replacement that cannot start is retried for ever; a caller must not wait for ever).
    pub fn next_incident(&mut self, limit: Duration) -> Result<Option<Incident>> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(i) = self.step()? {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// Supervises until `stop` is set, reporting each incident; then stops the child.
    pub fn run(mut self, stop: &AtomicBool, mut report: impl FnMut(&Incident)) -> Result<()> {
        while !stop.load(Ordering::Relaxed) {
            if let Some(i) = self.step()? {
                report(&i);
            }
        }
        self.shutdown();
        Ok(())
    }

    /// Kills the child and reaps it.
    pub fn shutdown(&mut self) {
        if self.pid == 0 {
            return;
        }
        self.kill();
        let pid = self.pid;
        while let Ok((p, _)) = self.exited.recv_timeout(Duration::from_secs(5)) {
            if p == pid {
                break;
            }
        }
        self.pid = 0;
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Ok((p, _)) = self.exited.try_recv() {
            if p == self.pid {
                return;
            }
        }
        self.shutdown();
    }
}

fn describe(st: &std::io::Result<ExitStatus>) -> String {
    match st {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
    }
}
