//! The cluster's state in the control-plane store (DESIGN §7): where each record lives and
//! what it holds. Agents and the manager talk only through these nodes, so any of them can
//! restart and carry on; `xenstore-ls /vigil` shows the whole cluster.
//!
//! ```text
//! /vigil/hosts/<host>/heartbeat   agent's liveness counter, rewritten every period
//! /vigil/hosts/<host>/agent       AgentRecord: the agent process that holds the host
//! /vigil/hosts/<host>/fence       Fence: the host was declared failed at this generation
//! /vigil/vms/<vm>/desired         Desired: where each copy should run (written by the manager)
//! /vigil/vms/<vm>/actual/<host>   Actual: what the host's agent runs for the VM
//! /vigil/vms/<vm>/migration       Migration: the source's snapshot of a migrating VM is ready
//! /vigil/manager/leader           Leader: the manager that may act, and its generation
//! /vigil/manager/generation       the last generation handed out (only grows)
//! /vigil/manager/dashboard/<id>   the URL of that manager's dashboard
//! /vigil/plans/<n>                a plan of the current table (its failed hosts inside)
//! /vigil/plans/@meta              PlanMeta: which configuration the table was computed for
//! /vigil/progress                 Progress: the plan being executed and how far it got
//! /vigil/events/<seq>             Event: the cluster's event log (seq zero-padded)
//! /vigil/chains/<chain>           Measured: a chain's end-to-end latency as the field measures it
//! ```
//! Every value is one JSON document (or a decimal number for counters).

use crate::vm::{BackupSpec, VmSpec};
use serde::{Deserialize, Serialize};

pub const ROOT: &str = "/vigil";
pub const HOSTS: &str = "/vigil/hosts";
pub const VMS: &str = "/vigil/vms";
pub const LEADER: &str = "/vigil/manager/leader";
pub const GENERATION: &str = "/vigil/manager/generation";
pub const PLANS: &str = "/vigil/plans";
pub const PLAN_META: &str = "/vigil/plans/@meta";
pub const PROGRESS: &str = "/vigil/progress";
pub const EVENTS: &str = "/vigil/events";
pub const CHAINS: &str = "/vigil/chains";
/// `<id>` → the URL of that manager's dashboard.
pub const DASHBOARDS: &str = "/vigil/manager/dashboard";
/// The execution times (µs, by VM) the leader observed above the model's: a new leader analyses
/// and plans with them too.
pub const OBSERVED: &str = "/vigil/manager/observed";
/// The checkpoint intervals the leader chose for `policy = "analysed"` VMs from their measured
/// pauses (`manager::interval`), by VM.
pub const INTERVALS: &str = "/vigil/manager/intervals";

pub fn chain_path(chain: &str) -> String {
    format!("{CHAINS}/{chain}")
}

/// A chain's end-to-end latency measured by the field side (a periodic source's request to
/// the chain's VM, the sink timing the answer), over the last window and in total.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub vm: String,
    /// Requests answered, in total.
    pub samples: u64,
    /// Over the last window: how many, and their latency quantiles (ms).
    pub window: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub last_ms: f64,
    /// Answers later than the chain's deadline, and requests that failed (connection lost),
    /// in total.
    pub over_deadline: u64,
    pub failures: u64,
    pub deadline_ms: Option<f64>,
    /// When this was written (ms since the Unix epoch).
    pub at_ms: u64,
}

/// The store's volatile nodes ([`store::server::Volatile`]): the hosts' heartbeats, so that a
/// slow disk under the store delays neither an agent's lease renewal nor the manager's reading
/// of it (the agent would otherwise fence itself, and the manager restart every lease).
pub const VOLATILE_HEARTBEATS: &str = "/vigil/hosts/*/heartbeat";

pub fn heartbeat_path(host: &str) -> String {
    format!("{HOSTS}/{host}/heartbeat")
}
pub fn agent_path(host: &str) -> String {
    format!("{HOSTS}/{host}/agent")
}
pub fn fence_path(host: &str) -> String {
    format!("{HOSTS}/{host}/fence")
}
pub fn desired_path(vm: &str) -> String {
    format!("{VMS}/{vm}/desired")
}
pub fn actual_dir(vm: &str) -> String {
    format!("{VMS}/{vm}/actual")
}
pub fn actual_path(vm: &str, host: &str) -> String {
    format!("{VMS}/{vm}/actual/{host}")
}
pub fn plan_path(index: usize) -> String {
    format!("{PLANS}/{index}")
}
pub fn event_path(seq: u64) -> String {
    format!("{EVENTS}/{seq:010}")
}

/// The agent process holding a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub pid: u32,
    /// Random per agent start: tells a restarted agent from the one before.
    pub incarnation: u64,
}

/// A host declared failed by the manager of `generation`; its agent must stop acting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub generation: u64,
}

/// Where each copy of a VM should run. Written by the manager only; `generation` is the
/// manager generation that wrote it (an agent ignores a record older than one it acted on).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub generation: u64,
    /// The running copy (none: the VM is stopped).
    pub primary: Option<Placed>,
    /// The backup copy (remote-backup mode).
    #[serde(default)]
    pub backup: Option<PlacedBackup>,
}

/// The running copy of a VM on a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placed {
    pub host: String,
    pub spec: VmSpec,
    /// Restart it on this host when its VMM crashes (normal mode); a protected VM is
    /// recovered by its backup instead.
    #[serde(default)]
    pub restart: bool,
    /// The VM moves here from a live host: that host's agent snapshots it into `dir` and
    /// stops it, this one restores it (stop-and-copy migration).
    #[serde(default)]
    pub migrate_from: Option<MigrateFrom>,
    /// The VM moves from here to another live host by pre-copy ([`crate::migration`]): this
    /// host's agent protects it to the backup placed there, then hands it over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrate_to: Option<MigrateTo>,
}

/// Where a VM migrating by pre-copy goes: the destination host (which runs the VM's backup
/// while it is copied) and how the source protects the VM to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateTo {
    pub host: String,
    pub protection: crate::vm::Protection,
    /// When the manager asked for it (ms since the Unix epoch).
    #[serde(default)]
    pub since_ms: u64,
}

/// Where a migrating VM comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateFrom {
    pub host: String,
    pub dir: std::path::PathBuf,
}

/// A migration's source side done: the VM was paused and its snapshot written to `dir`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Migration {
    pub dir: std::path::PathBuf,
    pub from: String,
    /// When the VM was paused (ms since the Unix epoch) and how long the snapshot took.
    pub paused_at_ms: u64,
    pub snapshot_ms: f64,
}

pub fn migration_path(vm: &str) -> String {
    format!("{VMS}/{vm}/migration")
}

/// The backup copy of a VM on a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacedBackup {
    pub host: String,
    pub spec: BackupSpec,
}

/// What a copy is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyState {
    /// The VMM runs the VM.
    Running,
    /// Its process runs but the VM does not serve yet (a voted VM's voter waits for its
    /// instances' guests, or replays its replica's log).
    Starting,
    /// The backup keeps the replica.
    Backup,
    /// The VM ended by itself (its guest exited).
    Exited,
    /// The VMM failed to start or crashed; see `detail`.
    Failed,
}

/// What an agent runs for a VM on its host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Actual {
    pub state: CopyState,
    /// The VMM's process.
    pub pid: u32,
    /// Generation of the desired record this copy was started for.
    pub generation: u64,
    /// Times the agent restarted it.
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub detail: String,
    /// A replicated running copy: whether its backup holds a committed replica.
    #[serde(default)]
    pub protected: Option<bool>,
    /// A replicated running copy: its checkpoints over the last second.
    #[serde(default)]
    pub replication: Option<ReplicationFigures>,
    /// The guest's jobs over the last read of its marks (`agent::monitor::PERIOD`).
    #[serde(default)]
    pub jobs: Option<JobFigures>,
    /// A copy that took the VM over by a planned handover (the last step of a pre-copy
    /// migration): how long the VM stopped (ms). Absent after a takeover on a lost primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover_ms: Option<f64>,
}

/// A VM's job execution times over the last read (a quarter second), from the marks its guest writes
/// (`agent::monitor`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobFigures {
    /// Jobs that ended in the window, and since monitoring began.
    pub jobs: u64,
    pub total_jobs: u64,
    pub exec_p50_us: f64,
    pub exec_p99_us: f64,
    pub exec_max_us: f64,
    /// The observed arrival curve: (window length in ms, the most jobs started in any window
    /// of that length over the last 2 s).
    #[serde(default)]
    pub arrivals: Vec<(f64, u64)>,
    /// The last (up to) 64 jobs, and their median execution time: what the manager compares
    /// with the model (a preempted job or two do not move it).
    #[serde(default)]
    pub recent_jobs: u64,
    #[serde(default)]
    pub recent_p50_us: f64,
    /// Marks overwritten before they were read.
    pub lost: u64,
    /// When the window ended (ms since the Unix epoch).
    pub at_ms: u64,
    /// Frames delivered to the guest and sent by it at its network device in the window
    /// (timestamped by the VMM, `vmm::devices::net::FrameStamps`).
    #[serde(default)]
    pub frames_in: u64,
    #[serde(default)]
    pub frames_out: u64,
    /// The observed arrival curve of the input frames: (window ms, the most frames delivered in
    /// any window of that length over the last 2 s).
    #[serde(default)]
    pub frame_arrivals: Vec<(f64, u64)>,
    /// Device-level latency in the window: from a frame delivered to the guest (the first since
    /// its last output) to the guest's next frame out, as the device saw them (before any hold
    /// for replication); how many, p50, p99 and largest (µs).
    #[serde(default)]
    pub device_samples: u64,
    #[serde(default)]
    pub device_p50_us: f64,
    #[serde(default)]
    pub device_p99_us: f64,
    #[serde(default)]
    pub device_max_us: f64,
    /// Frame batches the VMM dropped before they were read.
    #[serde(default)]
    pub frames_lost: u64,
}

/// A protected VM's replication over the last second, as its primary measured it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicationFigures {
    pub policy: String,
    /// The policy's current mode (e.g. `adaptive`'s interval choice).
    pub mode: String,
    /// Checkpoints acknowledged since the VM started.
    pub checkpoints: u64,
    pub per_second: f64,
    /// The VM's pause per checkpoint (mean and largest in the window).
    pub pause_mean_ms: f64,
    pub pause_max_ms: f64,
    pub bytes_per_second: f64,
    /// How long released output was held (mean and largest in the window).
    pub output_delay_mean_ms: f64,
    pub output_delay_max_ms: f64,
    /// The backup's staging and acknowledgement per checkpoint, after the checkpoint's last
    /// byte left (mean and largest in the window).
    #[serde(default)]
    pub ack_mean_ms: f64,
    #[serde(default)]
    pub ack_max_ms: f64,
    /// The 99th percentiles over the last 10 s (under the policy in force) of the pause, of the
    /// page copying within it (the part that grows with the dirty pages, hence with the
    /// interval), and of the backup's acknowledgement: what the manager adapts the `analysed`
    /// policy's interval to.
    #[serde(default)]
    pub pause_p99_ms: f64,
    #[serde(default)]
    pub copy_p99_ms: f64,
    #[serde(default)]
    pub ack_p99_ms: f64,
    /// When the window ended (ms since the Unix epoch).
    pub at_ms: u64,
}

/// The manager allowed to act.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leader {
    pub id: String,
    pub generation: u64,
    /// Rewritten every period while it leads.
    pub beat: u64,
}

/// Which configuration the plan table is for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanMeta {
    pub generation: u64,
    /// Hosts already failed when the table was computed.
    pub failed: Vec<String>,
    pub scenarios: usize,
    pub compute_ms: f64,
}

/// The plan under execution: a manager that dies halfway is finished by the next leader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub scenario: String,
    /// Hosts failed, this scenario included.
    pub failed: Vec<String>,
    /// Actions of the plan done so far (the next one to do).
    pub done: usize,
    pub total: usize,
    pub generation: u64,
    /// Where the placement in force differs from the plan's (so the plan's analysis does not
    /// cover it).
    #[serde(default)]
    pub deviations: Vec<String>,
}

/// One line of the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Wall-clock time, ms since the Unix epoch.
    pub at_ms: u64,
    pub source: String,
    pub what: String,
}

impl Event {
    pub fn now(source: &str, what: impl Into<String>) -> Event {
        let at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Event { at_ms, source: source.into(), what: what.into() }
    }
}

/// Reads a JSON record; `None` when the node does not exist.
pub fn read<T: serde::de::DeserializeOwned>(c: &mut store::Client, path: &str) -> crate::Result<Option<T>> {
    match c.try_read(path)? {
        None => Ok(None),
        Some(bytes) => {
            serde_json::from_slice(&bytes).map(Some).map_err(|e| crate::Error::Cluster(format!("{path}: not a valid record: {e}")))
        }
    }
}

/// Writes a JSON record.
pub fn write<T: Serialize>(c: &mut store::Client, path: &str, value: &T) -> crate::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(|e| crate::Error::Cluster(format!("{path}: {e}")))?;
    c.write(path, &bytes)?;
    Ok(())
}

/// Appends an event to the log (sequence numbers from a counter node, in a transaction).
pub fn log_event(c: &mut store::Client, ev: &Event) -> crate::Result<u64> {
    log_event_keeping(c, ev, EVENTS_KEPT)
}

/// Events the store keeps: logging one more removes the oldest (the log is bounded, and
/// reading it — `vigil status`, the dashboard — lists its directory).
pub const EVENTS_KEPT: u64 = 1000;

/// [`log_event`], keeping the last `keep` events.
pub fn log_event_keeping(c: &mut store::Client, ev: &Event, keep: u64) -> crate::Result<u64> {
    let bytes = serde_json::to_vec(ev).map_err(|e| crate::Error::Cluster(e.to_string()))?;
    let seq = c.transaction(|tx| {
        let next = tx.try_read(&format!("{EVENTS}/@next"))?.and_then(|v| String::from_utf8(v).ok()?.parse::<u64>().ok()).unwrap_or(0);
        tx.write(&format!("{EVENTS}/@next"), (next + 1).to_string().as_bytes())?;
        tx.write(&event_path(next), &bytes)?;
        if let Some(old) = next.checked_sub(keep.max(1)) {
            if tx.try_read(&event_path(old))?.is_some() {
                tx.rm(&event_path(old))?;
            }
        }
        Ok(next)
    })?;
    Ok(seq)
}

/// The event log, oldest first (at most the last `limit`).
pub fn events(c: &mut store::Client, limit: usize) -> crate::Result<Vec<Event>> {
    let mut names: Vec<String> = match c.directory(EVENTS) {
        Ok(n) => n.into_iter().filter(|n| !n.starts_with('@')).collect(),
        Err(store::Error::Store { errno: store::Errno::ENOENT, .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    names.sort();
    let skip = names.len().saturating_sub(limit);
    let mut out = Vec::new();
    for n in &names[skip..] {
        if let Some(e) = read::<Event>(c, &format!("{EVENTS}/{n}"))? {
            out.push(e);
        }
    }
    Ok(out)
}

/// The children of a directory node (none when it does not exist).
pub fn children(c: &mut store::Client, path: &str) -> crate::Result<Vec<String>> {
    match c.directory(path) {
        Ok(n) => Ok(n),
        Err(store::Error::Store { errno: store::Errno::ENOENT, .. }) => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// A counter node's value (0 when missing or not a number).
pub fn read_counter(c: &mut store::Client, path: &str) -> crate::Result<Option<u64>> {
    Ok(c.try_read(path)?.and_then(|v| String::from_utf8(v).ok()?.trim().parse().ok()))
}
