//! Live replication statistics: one JSON line per epoch (with `--stats`), and the same figures as
//! Prometheus metrics on a small HTTP endpoint that also lets an operator switch the
//! checkpoint policy while the VM runs (`POST /policy` with the policy name as the body).

use crate::http::{Request, Response};
use replication::PolicySpec;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

/// Figures of one checkpoint, as the primary saw them; with `--stats` each is printed as one
/// JSON line on stderr (the record, never text to be parsed back).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochStats {
    pub epoch: u64,
    /// Time the driver waited for the VM to pause, copy and resume (an upper bound of the
    /// guest's stop), and the VMM's own measure of it.
    pub pause_ns: u64,
    pub vmm_pause_ns: u64,
    pub copy_ns: u64,
    pub dirty_pages: u64,
    pub bytes: u64,
    /// From handing the checkpoint to the sender to its last byte on the socket.
    pub transfer_ns: u64,
    /// From the start of the checkpoint to the backup's acknowledgement.
    pub ack_ns: u64,
    /// How long the oldest output of the epoch waited before it was released.
    pub output_delay_ns: Option<u64>,
    pub output_frames: u64,
    pub mode: std::borrow::Cow<'static, str>,
    /// How the epoch's dirty pages were found (`log` or `compare`, `vmm::tracking`), and how
    /// the next epoch's will be.
    #[serde(default)]
    pub tracking: Option<vmm::TrackingMode>,
    #[serde(default)]
    pub next_tracking: Option<vmm::TrackingMode>,
    /// Of the VMM's pause, finding the dirty pages (collecting the log or comparing memory),
    /// and switching the tracking.
    #[serde(default)]
    pub find_ns: u64,
    #[serde(default)]
    pub switch_ns: u64,
    /// Hybrid tracking's hot pages (writable, compared) after the checkpoint.
    #[serde(default)]
    pub hot_pages: u64,
    /// Bytes of the page frames on the wire, whether they were compressed, and whether as
    /// XOR deltas against the backup's copy (`replication::delta`).
    #[serde(default)]
    pub wire_bytes: u64,
    #[serde(default)]
    pub compressed: bool,
    #[serde(default)]
    pub delta: bool,
}

impl EpochStats {
    /// The backup's part of the acknowledgement: from the checkpoint's last byte on the
    /// socket to the acknowledgement (its reading, staging and applying, and the answer's way
    /// back), i.e. `ack_ns` less the pause and the transfer.
    pub fn backup_ack_ns(&self) -> u64 {
        self.ack_ns.saturating_sub(self.pause_ns + self.transfer_ns)
    }

    /// Key of the JSON line (`{"checkpoint": {...}}`), so that readers of a mixed log find it.
    pub const KEY: &'static str = "checkpoint";

    /// Prints the record as one JSON line on stderr (what `--stats` asks for: data, not a log).
    pub fn emit(&self) {
        let line = serde_json::json!({ Self::KEY: self });
        eprintln!("{line}");
    }

    /// The records in `text` (the lines [`EpochStats::emit`] printed; other lines are skipped).
    pub fn parse_all(text: &str) -> Vec<EpochStats> {
        text.lines()
            .filter_map(|l| l.find('{').map(|i| &l[i..]))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|mut v| v.get_mut(Self::KEY).map(serde_json::Value::take))
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect()
    }
}

/// Everything the metrics endpoint shows.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub vm: String,
    pub role: &'static str,
    pub protected: bool,
    pub policy: String,
    pub mode: &'static str,
    pub checkpoints: u64,
    pub pause_ns_total: u64,
    pub bytes_total: u64,
    pub pages_total: u64,
    pub output_delay_ns_total: u64,
    pub released_with_output: u64,
    pub refused: u64,
    pub takeovers: u64,
    /// Acknowledged epochs tracked by comparing memory.
    pub compare_epochs: u64,
    /// Page frame bytes on the wire, and checkpoints sent compressed.
    pub wire_bytes_total: u64,
    pub compressed: u64,
    /// Checkpoints sent as XOR deltas (counted in `compressed` too).
    pub delta: u64,
    pub last: EpochStats,
}

impl Stats {
    /// The Prometheus text exposition.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let l = format!("vm=\"{}\",role=\"{}\"", self.vm, self.role);
        let s = |ns: u64| ns as f64 / 1e9;
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP vigil_replication_{name} {help}\n# TYPE vigil_replication_{name} {kind}\nvigil_replication_{name}{{{l}}} {value}"
            );
        };
        metric("protected", "gauge", "1 while a backup holds a committed replica.", (self.protected as u8).to_string());
        metric("checkpoints_total", "counter", "Checkpoints acknowledged.", self.checkpoints.to_string());
        metric("pause_seconds_total", "counter", "Time the VM spent paused for checkpoints.", s(self.pause_ns_total).to_string());
        metric("bytes_total", "counter", "Checkpoint page bytes sent to the backup.", self.bytes_total.to_string());
        metric(
            "wire_bytes_total",
            "counter",
            "Bytes of checkpoint page frames on the wire (after compression).",
            self.wire_bytes_total.to_string(),
        );
        metric("compressed_total", "counter", "Checkpoints whose pages travelled compressed.", self.compressed.to_string());
        metric(
            "delta_total",
            "counter",
            "Checkpoints whose pages travelled as XOR deltas against the backup's copy (compressed).",
            self.delta.to_string(),
        );
        metric("dirty_pages_total", "counter", "Dirty pages checkpointed.", self.pages_total.to_string());
        metric(
            "output_delay_seconds_total",
            "counter",
            "Sum over epochs with output of how long it was held.",
            s(self.output_delay_ns_total).to_string(),
        );
        metric("epochs_with_output_total", "counter", "Released epochs that held output.", self.released_with_output.to_string());
        metric("refused_total", "counter", "Checkpoints the backup refused.", self.refused.to_string());
        metric("takeovers_total", "counter", "Takeovers by this backup.", self.takeovers.to_string());
        let e = &self.last;
        metric("last_epoch", "gauge", "Epoch of the last acknowledged checkpoint.", e.epoch.to_string());
        metric("last_pause_seconds", "gauge", "Pause of the last checkpoint.", s(e.pause_ns).to_string());
        metric("last_copy_seconds", "gauge", "Page copying within the last pause.", s(e.copy_ns).to_string());
        metric("last_dirty_pages", "gauge", "Dirty pages of the last checkpoint.", e.dirty_pages.to_string());
        metric("last_find_seconds", "gauge", "Finding the dirty pages within the last pause.", s(e.find_ns).to_string());
        metric(
            "compare_epochs_total",
            "counter",
            "Acknowledged epochs whose dirty pages were found by comparing memory (the rest used the dirty log).",
            self.compare_epochs.to_string(),
        );
        metric("last_transfer_seconds", "gauge", "Transfer time of the last checkpoint.", s(e.transfer_ns).to_string());
        metric("last_ack_seconds", "gauge", "Start to acknowledgement of the last checkpoint.", s(e.ack_ns).to_string());
        metric(
            "last_output_delay_seconds",
            "gauge",
            "Hold time of the last released output.",
            s(e.output_delay_ns.unwrap_or(0)).to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP vigil_replication_tracking How the next epoch's dirty pages are found.\n# TYPE vigil_replication_tracking gauge\nvigil_replication_tracking{{{l},mode=\"{}\"}} 1",
            e.next_tracking.map_or("none".to_string(), |m| m.to_string())
        );
        let _ = writeln!(
            out,
            "# HELP vigil_replication_policy The checkpoint policy and its mode.\n# TYPE vigil_replication_policy gauge\nvigil_replication_policy{{{l},policy=\"{}\",mode=\"{}\"}} 1",
            self.policy, self.mode
        );
        out
    }
}

/// Shared statistics.
pub type Shared = Arc<Mutex<Stats>>;

/// Serves `GET /metrics` (Prometheus text) and, when `policy` is given, `POST /policy` (the
/// body names the new checkpoint policy) on `addr`. Switching the policy needs the header
/// `Authorization: Bearer <token>` with the cluster key's [`crate::auth::Key::control_token`];
/// reading metrics needs nothing. The server is [`crate::http`]'s: bounded, one thread per
/// connection, so one slow client never holds up another.
pub fn serve(addr: &str, stats: Shared, policy: Option<(Sender<PolicySpec>, crate::auth::Key)>) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let policy = policy.map(|(tx, key)| (Mutex::new(tx), key.control_token()));
    crate::http::serve(listener, "metrics", move |req| answer(req, &stats, policy.as_ref()))?;
    Ok(bound)
}

fn answer(req: &Request, stats: &Shared, policy: Option<&(Mutex<Sender<PolicySpec>>, String)>) -> Response {
    const PROMETHEUS: &str = "text/plain; version=0.0.4";
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/metrics") => Response::ok(PROMETHEUS, stats.lock().unwrap_or_else(|e| e.into_inner()).prometheus()),
        ("POST", "/policy") => {
            let Some((tx, token)) = policy else { return Response::text("409 Conflict", "no policy to change here\n") };
            let given = req.authorization.as_deref().and_then(|a| a.strip_prefix("Bearer ")).unwrap_or("");
            if !crate::auth::same(given.as_bytes(), token.as_bytes()) {
                return Response::text(
                    "401 Unauthorized",
                    "switching the policy needs `Authorization: Bearer <token>` (`vigil key token`)\n",
                );
            }
            let name = String::from_utf8_lossy(&req.body).trim().to_string();
            match name.parse::<PolicySpec>() {
                Ok(spec) => {
                    let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(spec);
                    Response::text("200 OK", format!("policy {spec}\n"))
                }
                Err(e) => Response::text("400 Bad Request", format!("{e}\n")),
            }
        }
        _ => Response::text("404 Not Found", "GET /metrics or POST /policy\n"),
    }
}
