//! The manager's dashboard and Prometheus endpoint (`vigil manager --http ADDR`): a web page
//! that shows the cluster live — hosts, VMs with their placement and replication figures,
//! each chain's measured latency beside its analysed bound and deadline, the plan table (what
//! happens if each host fails), the event timeline, and the arrival and service curves of
//! every task under the plan in force — and `/metrics` for every host, VM and chain.
//!
//! Every manager serves it (a standby too: everything comes from the store). A background
//! thread reads the store twice a second into a snapshot; requests are answered from the
//! snapshot, so no client — however many, however hostile — puts load on the store, and the
//! server is [`agent::http`]'s (bounded, one thread per connection). The page is one HTML file
//! and one script, embedded in the binary: nothing to build or install.
//!
//! | path | what |
//! | --- | --- |
//! | `/` | the page |
//! | `/app.js` | its script |
//! | `/api/state` | the snapshot as JSON ([`crate::local::Status`] and what the page needs) |
//! | `/metrics` | Prometheus text |
//! | `/plot/<task>.svg` | the task's demand and service curves under the plan in force |

use crate::local::{status_of, Status};
use crate::table::{plan_name, StoredPlan};
use agent::http::{Request, Response};
use model::{Loaded, Placement, VmPlace};
use rtc::system::{Analysis, System};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");

/// How often the snapshot is refreshed from the store.
pub const REFRESH: Duration = Duration::from_millis(500);

/// The analysis the plots show: the system rewritten for the plan in force, and its result.
struct Curves {
    scenario: String,
    system: System,
    analysis: Analysis,
    /// Rendered plots, by task name (rendered on first request).
    svgs: BTreeMap<String, Arc<String>>,
}

/// What requests are answered from.
#[derive(Default)]
struct Snapshot {
    json: Arc<String>,
    metrics: Arc<String>,
    curves: Option<Curves>,
}

/// Binds `addr`, records the dashboard's URL in the store under this manager's id, and serves
/// it until the process ends. Returns the bound address.
pub fn serve(addr: &str, store: PathBuf, loaded: Loaded, id: String) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    // Until the store answers (a client keeps trying for 10 s), the page says so.
    let first = serde_json::json!({ "error": format!("no state read from the store at {} yet", store.display()), "served_by": id, "at_ms": now_ms() });
    let snap = Arc::new(Mutex::new(Snapshot { json: Arc::new(first.to_string()), ..Snapshot::default() }));
    let loaded = Arc::new(loaded);
    {
        let (snap, loaded, id) = (snap.clone(), loaded.clone(), id.clone());
        let url = format!("http://{bound}/");
        std::thread::Builder::new().name("dashboard-refresh".into()).spawn(move || refresh(&store, &loaded, &id, &url, &snap))?;
    }
    agent::http::serve(listener, "dashboard", move |req| answer(req, &snap, &loaded))?;
    Ok(bound)
}

fn answer(req: &Request, snap: &Mutex<Snapshot>, loaded: &Loaded) -> Response {
    if req.method != "GET" {
        return Response::text("405 Method Not Allowed", "the dashboard only answers GET\n");
    }
    match req.path.as_str() {
        "/" | "/index.html" => Response::ok("text/html; charset=utf-8", PAGE),
        "/app.js" => Response::ok("text/javascript; charset=utf-8", SCRIPT),
        "/api/state" => Response::ok("application/json", lock(snap).json.as_bytes().to_vec()),
        "/metrics" => Response::ok("text/plain; version=0.0.4", lock(snap).metrics.as_bytes().to_vec()),
        p => match p.strip_prefix("/plot/").and_then(|t| t.strip_suffix(".svg")) {
            Some(task) => match plot(snap, loaded, task) {
                Some(svg) => Response::ok("image/svg+xml", svg.as_bytes().to_vec()),
                None => Response::text("404 Not Found", format!("no task {task:?} in the analysis in force\n")),
            },
            None => Response::text("404 Not Found", "GET /, /api/state, /metrics or /plot/<task>.svg\n"),
        },
    }
}

fn lock(m: &Mutex<Snapshot>) -> std::sync::MutexGuard<'_, Snapshot> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn plot(snap: &Mutex<Snapshot>, loaded: &Loaded, task: &str) -> Option<Arc<String>> {
    let mut s = lock(snap);
    let c = s.curves.as_mut()?;
    if let Some(svg) = c.svgs.get(task) {
        return Some(svg.clone());
    }
    let i = c.system.tasks.iter().position(|t| t.name == task)?;
    let svg = Arc::new(model::plot::task_svg(loaded, &c.system, &c.analysis, i));
    c.svgs.insert(task.to_string(), svg.clone());
    Some(svg)
}

fn refresh(store: &std::path::Path, loaded: &Loaded, id: &str, url: &str, snap: &Mutex<Snapshot>) {
    let mut client: Option<store::Client> = None;
    let mut recorded = false;
    loop {
        if client.is_none() {
            match store::Client::connect(store) {
                Ok(mut c) => {
                    c.set_retry_for(REFRESH);
                    c.set_request_timeout(Duration::from_secs(1));
                    client = Some(c);
                }
                Err(e) => publish_error(snap, id, &format!("cannot reach the store at {}: {e}", store.display())),
            }
        }
        if let Some(c) = client.as_mut() {
            if !recorded {
                recorded = c.write(&format!("{}/{id}", agent::cluster::DASHBOARDS), url.as_bytes()).is_ok();
            }
            match status_of(c, loaded) {
                Ok(st) => publish(snap, loaded, id, st),
                Err(e) => {
                    publish_error(snap, id, &format!("reading the store: {e}"));
                    client = None;
                }
            }
        }
        std::thread::sleep(REFRESH);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn publish_error(snap: &Mutex<Snapshot>, id: &str, error: &str) {
    tracing::warn!("dashboard of {id}: {error}");
    let mut s = lock(snap);
    // Keep the last state the page had, marked stale.
    let mut v: serde_json::Value = serde_json::from_str(&s.json).unwrap_or_else(|_| serde_json::json!({}));
    v["error"] = serde_json::Value::String(error.to_string());
    v["served_by"] = serde_json::Value::String(id.to_string());
    v["at_ms"] = now_ms().into();
    s.json = Arc::new(v.to_string());
}

fn publish(snap: &Mutex<Snapshot>, loaded: &Loaded, id: &str, st: Status) {
    let scenario = plan_name(&st.failed);
    // The analysis behind the plots follows the plan in force.
    let stale = lock(snap).curves.as_ref().is_none_or(|c| c.scenario != scenario);
    let curves =
        if stale { analyse(loaded, st.plan.as_ref()).map(|(system, analysis)| (system, analysis, scenario.clone())) } else { None };
    let metrics = Arc::new(prometheus(&st));
    let mut s = lock(snap);
    if let Some((system, analysis, scenario)) = curves {
        s.curves = Some(Curves { scenario, system, analysis, svgs: BTreeMap::new() });
    }
    let tasks: Vec<serde_json::Value> = s
        .curves
        .as_ref()
        .map(|c| {
            c.system
                .tasks
                .iter()
                .zip(&c.analysis.tasks)
                .map(|(t, r)| {
                    serde_json::json!({
                        "task": t.name,
                        "resource": c.system.resources.get(t.resource).map(|r| r.name.clone()),
                        "wcrt_ms": r.wcrt.as_ref().map(|w| w.to_f64() / 1e3),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let json = serde_json::json!({
        "served_by": id,
        "at_ms": now_ms(),
        "scenario": scenario,
        "status": st,
        "tasks": tasks,
    });
    s.json = Arc::new(json.to_string());
    s.metrics = metrics;
}

/// The model's system rewritten for `plan`'s placement (the initial placement without a
/// plan), and its analysis.
pub(crate) fn analyse(loaded: &Loaded, plan: Option<&StoredPlan>) -> Option<(System, Analysis)> {
    let dep = loaded.deployment.as_ref()?;
    let sys = &loaded.system;
    let place = match plan {
        Some(p) => placement(loaded, p)?,
        None => dep.initial(),
    };
    let mut placed = sys.clone();
    dep.apply(sys, &place, &mut placed);
    // The plots draw each task's service curve.
    let opts = rtc::system::Options { service_curves: true, ..planner::eval::planning_options() };
    match rtc::system::analyze(&placed, &opts) {
        Ok(a) => Some((placed, a)),
        Err(e) => {
            tracing::warn!("dashboard: cannot analyse the plan in force: {e}");
            None
        }
    }
}

/// The placement a stored plan describes (names back to indices).
fn placement(loaded: &Loaded, plan: &StoredPlan) -> Option<Placement> {
    let dep = loaded.deployment.as_ref()?;
    let resource = |name: &str| loaded.system.resources.iter().position(|r| r.name == name);
    let host = |name: &str| dep.hosts.iter().position(|h| h.name == name);
    let mut vms = Vec::with_capacity(dep.vms.len());
    for v in &dep.vms {
        let Some(t) = plan.target(&v.name) else {
            vms.push(VmPlace { instances: v.instances.clone(), backup: v.backup });
            continue;
        };
        let instances = if t.host.is_none() { Vec::new() } else { t.processors.iter().map(|p| resource(p)).collect::<Option<Vec<_>>>()? };
        let backup = match &t.backup {
            Some(b) => Some(host(b)?),
            None => None,
        };
        vms.push(VmPlace { instances, backup });
    }
    Some(Placement { vms })
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The Prometheus text exposition of a status.
pub fn prometheus(st: &Status) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP vigil_{name} {help}\n# TYPE vigil_{name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "vigil_{name} {v}");
            } else {
                let _ = writeln!(out, "vigil_{name}{{{labels}}} {v}");
            }
        }
    };
    let b = |x: bool| if x { 1.0 } else { 0.0 };
    family(
        "cluster_ok",
        "gauge",
        "1 when every VM serves where the plan puts it and every chain of the plan holds.",
        vec![(String::new(), b(st.ok))],
    );
    family(
        "manager_generation",
        "gauge",
        "Generation of the leading manager.",
        st.leader.iter().map(|l| (format!("leader=\"{}\"", label(&l.id)), l.generation as f64)).collect(),
    );
    family("failed_hosts", "gauge", "Hosts declared failed.", vec![(String::new(), st.failed.len() as f64)]);
    family("plan_scenarios", "gauge", "Fault scenarios in the plan table.", vec![(String::new(), st.plans.len() as f64)]);
    let host = |h: &str| format!("host=\"{}\"", label(h));
    family(
        "host_up",
        "gauge",
        "1 while the host's agent renews its lease and the host is not fenced.",
        st.hosts.iter().map(|h| (host(&h.host), b(h.heartbeat.is_some() && !h.fenced && !st.failed.contains(&h.host)))).collect(),
    );
    family(
        "host_fenced",
        "gauge",
        "1 once the manager declared the host failed.",
        st.hosts.iter().map(|h| (host(&h.host), b(h.fenced))).collect(),
    );
    family(
        "host_heartbeat",
        "counter",
        "The agent's liveness counter.",
        st.hosts.iter().filter_map(|h| h.heartbeat.map(|x| (host(&h.host), x as f64))).collect(),
    );
    let vm = |v: &crate::local::VmStatus| {
        format!("vm=\"{}\",host=\"{}\",mode=\"{}\"", label(&v.vm), label(v.host.as_deref().unwrap_or("")), label(&v.mode))
    };
    family(
        "vm_serving",
        "gauge",
        "1 while the VM's running copy runs where the plan puts it.",
        st.vms.iter().map(|v| (vm(v), b(v.serving))).collect(),
    );
    family(
        "vm_protected",
        "gauge",
        "Remote-backup VMs: 1 while the backup holds a committed replica.",
        st.vms.iter().filter(|v| v.replication != "-").map(|v| (vm(v), b(v.replication == "protected"))).collect(),
    );
    let figures = |f: fn(&agent::cluster::ReplicationFigures) -> f64| -> Vec<(String, f64)> {
        st.vms.iter().filter_map(|v| v.figures.as_ref().map(|x| (vm(v), f(x)))).collect()
    };
    family("vm_checkpoints_per_second", "gauge", "Checkpoints acknowledged per second (last second).", figures(|f| f.per_second));
    family("vm_checkpoints_total", "counter", "Checkpoints acknowledged.", figures(|f| f.checkpoints as f64));
    family("vm_checkpoint_pause_seconds", "gauge", "Mean pause per checkpoint (last second).", figures(|f| f.pause_mean_ms / 1e3));
    family("vm_checkpoint_pause_max_seconds", "gauge", "Longest pause (last second).", figures(|f| f.pause_max_ms / 1e3));
    family(
        "vm_output_delay_seconds",
        "gauge",
        "Mean hold time of released output (last second).",
        figures(|f| f.output_delay_mean_ms / 1e3),
    );
    family(
        "vm_output_delay_max_seconds",
        "gauge",
        "Longest hold time of released output (last second).",
        figures(|f| f.output_delay_max_ms / 1e3),
    );
    family("vm_replication_bytes_per_second", "gauge", "Checkpoint bytes sent per second (last second).", figures(|f| f.bytes_per_second));
    family("vm_checkpoint_pause_p99_seconds", "gauge", "99th percentile of the pauses (last second).", figures(|f| f.pause_p99_ms / 1e3));
    family(
        "vm_checkpoint_ack_p99_seconds",
        "gauge",
        "99th percentile of the backup's staging and acknowledgement after a checkpoint's transfer (last second).",
        figures(|f| f.ack_p99_ms / 1e3),
    );
    let jobs = |f: fn(&agent::cluster::JobFigures) -> f64| -> Vec<(String, f64)> {
        st.vms.iter().filter_map(|v| v.jobs.as_ref().map(|x| (vm(v), f(x)))).collect()
    };
    family(
        "vm_frames_in",
        "gauge",
        "Frames delivered to the VM at its network device (last read, a quarter second).",
        jobs(|f| f.frames_in as f64),
    );
    family("vm_frames_out", "gauge", "Frames the VM sent at its network device (last read).", jobs(|f| f.frames_out as f64));
    family(
        "vm_device_latency_max_seconds",
        "gauge",
        "Longest time from a frame into the VM to its next frame out, at the device (last read).",
        jobs(|f| f.device_max_us / 1e6),
    );
    let bound = |chain: &str| st.plan.as_ref().and_then(|p| p.chains.iter().find(|c| c.chain == chain));
    let chain = |c: &str, m: &agent::cluster::Measured| format!("chain=\"{}\",vm=\"{}\"", label(c), label(&m.vm));
    let mut lat = Vec::new();
    for (c, m) in &st.measured {
        for (q, v) in [("0.5", m.p50_ms), ("0.99", m.p99_ms), ("1", m.max_ms)] {
            lat.push((format!("{},quantile=\"{q}\"", chain(c, m)), v / 1e3));
        }
    }
    family("chain_latency_seconds", "gauge", "A chain's measured end-to-end latency over the last window.", lat);
    family(
        "chain_bound_seconds",
        "gauge",
        "A chain's analysed worst-case latency under the plan in force.",
        st.measured.iter().filter_map(|(c, m)| bound(c).and_then(|b| b.worst_ms).map(|w| (chain(c, m), w / 1e3))).collect(),
    );
    family(
        "chain_deadline_seconds",
        "gauge",
        "A chain's deadline.",
        st.measured.iter().filter_map(|(c, m)| m.deadline_ms.map(|d| (chain(c, m), d / 1e3))).collect(),
    );
    family(
        "chain_requests_total",
        "counter",
        "Requests answered.",
        st.measured.iter().map(|(c, m)| (chain(c, m), m.samples as f64)).collect(),
    );
    family(
        "chain_over_deadline_total",
        "counter",
        "Answers later than the deadline.",
        st.measured.iter().map(|(c, m)| (chain(c, m), m.over_deadline as f64)).collect(),
    );
    family(
        "chain_failures_total",
        "counter",
        "Requests that failed.",
        st.measured.iter().map(|(c, m)| (chain(c, m), m.failures as f64)).collect(),
    );
    family(
        "chain_above_bound",
        "gauge",
        "1 when the measured latency exceeds the analysed bound (a bug in the model or the analysis).",
        st.measured.iter().map(|(c, m)| (chain(c, m), b(st.above_bound.contains(c)))).collect(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_is_well_formed_and_escapes_labels() {
        let mut st = Status {
            leader: None,
            hosts: vec![crate::local::HostStatus { host: "h\"1".into(), heartbeat: Some(7), fenced: false, agent_pid: Some(1) }],
            vms: Vec::new(),
            failed: Vec::new(),
            plan: None,
            coverage: BTreeMap::new(),
            plans: Vec::new(),
            dashboards: BTreeMap::new(),
            events: Vec::new(),
            measured: BTreeMap::new(),
            deviations: Vec::new(),
            above_bound: Vec::new(),
            ok: true,
        };
        st.measured
            .insert("c".into(), agent::cluster::Measured { vm: "v".into(), p50_ms: 2.0, deadline_ms: Some(10.0), ..Default::default() });
        let text = prometheus(&st);
        assert!(text.contains("vigil_host_up{host=\"h\\\"1\"} 1"), "{text}");
        assert!(text.contains("vigil_chain_latency_seconds{chain=\"c\",vm=\"v\",quantile=\"0.5\"} 0.002"), "{text}");
        assert!(text.contains("vigil_chain_deadline_seconds{chain=\"c\",vm=\"v\"} 0.01"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("vigil_") && value.parse::<f64>().is_ok(), "{line}");
        }
    }

    /// Without a store (down, or never there) the page still answers: the last state, marked
    /// stale with the reason; every path still gets an answer.
    #[test]
    fn without_a_store_the_dashboard_says_so_and_keeps_answering() {
        use std::io::{Read, Write};
        let loaded = model::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/substation.toml"))).unwrap();
        let store = std::env::temp_dir().join(format!("vigil-no-store-{}.sock", std::process::id()));
        let addr = serve("127.0.0.1:0", store, loaded, "m9".into()).expect("serve");
        let get = |path: &str| {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes()).unwrap();
            let mut out = String::new();
            let _ = c.read_to_string(&mut out);
            out
        };
        assert!(get("/api/state").contains("no state read from the store"), "a valid state from the start");
        let t = std::time::Instant::now();
        loop {
            let state = get("/api/state");
            if state.contains("cannot reach the store") {
                assert!(state.starts_with("HTTP/1.0 200") && state.contains("\"served_by\":\"m9\""), "{state}");
                break;
            }
            assert!(t.elapsed() < std::time::Duration::from_secs(15), "{state}");
            std::thread::sleep(REFRESH / 5);
        }
        assert!(get("/").contains("<title>vigil"));
        assert!(get("/metrics").starts_with("HTTP/1.0 200"));
        assert!(get("/plot/protect.svg").starts_with("HTTP/1.0 404"), "no analysis without a state");
    }

    #[test]
    fn the_placement_of_a_plan_round_trips_the_initial_one() {
        let loaded = model::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/substation.toml"))).unwrap();
        let table = crate::table::Table::compute(&loaded, &[], 1, 1).unwrap();
        let none = table.lookup(&[]).unwrap();
        let dep = loaded.deployment.as_ref().unwrap();
        assert_eq!(placement(&loaded, none).unwrap(), dep.initial());
        // Every plan of the table can be analysed for the plots.
        for p in table.plans.values() {
            let (sys, a) = analyse(&loaded, Some(p)).unwrap_or_else(|| panic!("plan {}", p.scenario));
            let svg = model::plot::task_svg(&loaded, &sys, &a, 0);
            assert!(svg.starts_with("<svg"));
        }
    }
}
