//! Talking to a running VM from another thread: commands go through a channel, and a kick
//! (eventfd + signal) brings the vCPU thread out of KVM_RUN or out of an idle wait.

use std::cell::Cell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, Once};

use crate::{Error, Result};

/// A request to the VM.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    /// Stop the vCPU at the next instruction boundary; the clock stops too.
    Pause,
    /// Continue after a pause.
    Resume,
    /// Write a snapshot into a directory (pauses first; stays paused).
    Snapshot { dir: PathBuf },
    /// Report the state.
    Status,
    /// Start KVM dirty logging (and clear what was collected).
    DirtyLogStart,
    /// Stop KVM dirty logging.
    DirtyLogStop,
    /// Return and clear the pages dirtied since the last call.
    DirtyLogGetAndClear,
    /// Hold the VM's network output back from now on (checkpoint replication).
    NetHold,
    /// Close the current epoch of held output; the reply carries its number.
    NetSeal,
    /// Send the held output of every sealed epoch up to `epoch`.
    NetRelease { epoch: u64 },
    /// Stop holding: send everything held.
    NetUnhold,
    /// Send the held output of every epoch up to `epoch` of a protected VM, which the backup
    /// acknowledged (the replication driver's `net-release`). In-process only: over the API,
    /// `net-release` is refused while the VM is protected.
    #[serde(skip)]
    ReleaseAcked { epoch: u64 },
    /// Start protection (checkpoint replication, see [`crate::checkpoint`]): dirty logging
    /// on (from a clean slate), network output held if `hold` (with a tap), and every guest
    /// disk write also sent on `mirror` (with a disk), and every frame given to the guest
    /// copied to `input` (with a tap). In-process only.
    #[serde(skip)]
    Protect { mirror: Option<crate::mirror::MirrorSender>, hold: bool, input: Option<crate::devices::net::InputLog> },
    /// Start holding the output of a VM protected with `hold: false`. In-process only.
    #[serde(skip)]
    HoldOutput,
    /// Moves the frames waiting at the tap into the input log (a VM paused for good at a
    /// planned handover: what reached it during the final pause goes to the destination).
    /// In-process only.
    #[serde(skip)]
    DrainInput,
    /// End protection: dirty logging off, all held output sent, no more disk mirroring.
    Unprotect,
    /// Take a checkpoint of the protected VM: the reply's `checkpoint`. `buffer` is an old
    /// checkpoint's `data` to reuse (copying into a buffer whose pages are already mapped is
    /// several times faster). In-process only.
    #[serde(skip)]
    Checkpoint { buffer: Option<Vec<u8>> },
    /// How dirty pages are found (`{"cmd":"tracking","choice":"auto"|"log"|"compare"}`), from
    /// the next checkpoint's epoch on if protected, else from the next protection on.
    Tracking { choice: crate::tracking::TrackingChoice },
    /// A view of all of guest memory for another thread (the reply's `memory_view`).
    /// In-process only.
    #[serde(skip)]
    MemoryView,
    /// The guest's job marks written since the last `trace` (the reply's `trace`; see
    /// [`vmm_abi::TRACE_ADDR`]).
    Trace,
    /// Announce the VM's MAC and IP address on its tap (gratuitous ARP request and reply,
    /// `count` times each, at most [`crate::checkpoint::MAX_ANNOUNCE`]) after a takeover; the
    /// reply's `value` is the frames sent.
    Announce { count: u32 },
    /// End the VM.
    Quit,
}

/// The VM's answer.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status: Option<crate::Status>,
    /// Dirty page numbers (guest-physical address / 4096), ascending.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dirty_pages: Option<Vec<u64>>,
    /// The epoch a `net-seal` closed, or frames sent by `net-release`/`net-unhold`/`announce`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub value: Option<u64>,
    /// What `Command::Trace` read.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub trace: Option<Trace>,
    /// What `Command::Checkpoint` took (in-process only).
    #[serde(skip)]
    pub checkpoint: Option<Box<crate::checkpoint::Checkpoint>>,
    /// What `Command::MemoryView` returns (in-process only).
    #[serde(skip)]
    pub memory_view: Option<crate::memory::MemoryView>,
    /// With `Command::MemoryView`: what settles the disk's write ring from another thread,
    /// when a block backend process keeps one (in-process only).
    #[serde(skip)]
    pub disk_settler: Option<crate::backend::Settler>,
}

impl Reply {
    /// Success, nothing more to say.
    pub fn ok() -> Self {
        Reply { ok: true, ..Default::default() }
    }
    /// Failure with a reason.
    pub fn err(e: impl ToString) -> Self {
        Reply { ok: false, error: Some(e.to_string()), ..Default::default() }
    }
}

/// Job marks read from the guest's trace ring.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Trace {
    /// The vCPU's TSC frequency (kHz): marks' `tsc` ÷ this = milliseconds.
    pub tsc_khz: u32,
    /// Marks the guest wrote that were overwritten before this read.
    pub lost: u64,
    /// The marks, oldest first (at most [`vmm_abi::TRACE_CAPACITY`]).
    pub marks: Vec<Mark>,
    /// Frames in and out at the VM's network device since the last read, in batches (one per
    /// guest request), oldest first; batches dropped unread.
    #[serde(default)]
    pub frames: Vec<FrameBatch>,
    #[serde(default)]
    pub frames_lost: u64,
}

/// Frames moved by one guest request at the network device, and when (the host's
/// `CLOCK_MONOTONIC`, ns) — `crate::devices::net::FrameStamps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrameBatch {
    /// Sent by the guest (true) or delivered to it (false).
    pub output: bool,
    pub at_ns: u64,
    pub frames: u32,
}

/// One mark ([`vmm_abi::TraceRecord`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mark {
    pub kind: u32,
    pub id: u32,
    pub tsc: u64,
}

type Request = (Command, Sender<Reply>);

/// The sending side, cloneable, used by the API server (or a test).
#[derive(Clone)]
pub struct Controller {
    tx: Sender<Request>,
    shared: Arc<Shared>,
}

/// The receiving side, owned by the vCPU thread.
pub struct Inbox {
    pub(crate) rx: Receiver<Request>,
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    /// Wakes an idle wait.
    pub(crate) event: OwnedFd,
    /// pthread_t of the vCPU thread (`None`: not running). A kick signals the thread while
    /// holding this lock, and the thread clears it (taking the lock) before it ends, so a
    /// signal never goes to a thread that has ended.
    thread: Mutex<Option<libc::pthread_t>>,
}

/// Creates a connected controller and inbox.
pub fn channel_pair() -> Result<(Controller, Inbox)> {
    install_kick_handler();
    // SAFETY: eventfd(2) with constant flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Os(format!("eventfd: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    let event = unsafe { OwnedFd::from_raw_fd(fd) };
    let shared = Arc::new(Shared { event, thread: Mutex::new(None) });
    let (tx, rx) = channel();
    Ok((Controller { tx, shared: shared.clone() }, Inbox { rx, shared }))
}

impl Controller {
    /// Sends a command and waits for the reply.
    pub fn call(&self, cmd: Command) -> Reply {
        let (rtx, rrx) = channel();
        if self.tx.send((cmd, rtx)).is_err() {
            return Reply::err("the VM has stopped");
        }
        self.shared.kick();
        // Kick again while no reply comes: a kick that raced with the vCPU thread's start (no
        // thread to signal yet, the eventfd drained) must not leave the command waiting for
        // the guest's next exit, which an idle guest may never make.
        loop {
            match rrx.recv_timeout(std::time::Duration::from_millis(20)) {
                Ok(r) => return r,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => self.shared.kick(),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Reply::err("the VM has stopped"),
            }
        }
    }
}

impl Shared {
    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.event.as_raw_fd(), (&one as *const u64).cast(), 8) };
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = *thread {
            // SAFETY: `t` is the pthread_t of the vCPU thread, stored by `Inbox::attach` on that
            // thread and cleared by `Inbox::detach` under this same lock before the thread ends;
            // we hold the lock, so the thread is alive during the call.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd.
        unsafe { libc::read(self.event.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

impl Inbox {
    /// Registers the calling thread as the vCPU thread, with `run` the vCPU's kvm_run page.
    pub(crate) fn attach(&self, run: *mut kvm_bindings::kvm_run) {
        register_vcpu(run);
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *self.shared.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(me);
    }

    /// Unregisters the vCPU thread.
    pub(crate) fn detach(&self) {
        *self.shared.thread.lock().unwrap_or_else(|e| e.into_inner()) = None;
        register_vcpu(std::ptr::null_mut());
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.detach();
    }
}

thread_local! {
    /// The kvm_run page of the vCPU running on this thread, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

pub(crate) fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int) {
    // Setting immediate_exit makes a KVM_RUN that is about to start return EINTR at once; one
    // already running returns EINTR because of the signal itself.
    let run = KVM_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: `run` is this thread's mapped kvm_run page (registered by `attach`, cleared by
        // `detach` before the vCPU is dropped); a byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

/// Registers `run` (or nothing: null) as the kvm_run page of the vCPU on the calling thread, for
/// the kick signal's handler, which is installed if it was not.
pub(crate) fn register_vcpu(run: *mut kvm_bindings::kvm_run) {
    install_kick_handler();
    KVM_RUN.with(|c| c.set(run));
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs a handler that only performs a byte store; no SA_RESTART, so a
        // blocking call of the vCPU thread (ppoll) returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_process_commands_stay_out_of_the_json_api() {
        for cmd in ["protect", "checkpoint", "memory-view"] {
            let json = format!(r#"{{"cmd":"{cmd}"}}"#);
            assert!(serde_json::from_str::<Command>(&json).is_err(), "{cmd} parsed");
        }
        assert!(serde_json::from_str::<Command>(r#"{"cmd":"release-acked","epoch":1}"#).is_err());
        assert!(matches!(serde_json::from_str(r#"{"cmd":"unprotect"}"#), Ok(Command::Unprotect)));
        assert!(matches!(serde_json::from_str(r#"{"cmd":"announce","count":3}"#), Ok(Command::Announce { count: 3 })));
        let reply = Reply { checkpoint: Some(Box::default()), ..Reply::ok() };
        assert_eq!(serde_json::to_string(&reply).expect("json"), r#"{"ok":true}"#);
    }
}
