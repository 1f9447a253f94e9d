//! The field side of the model (`vigil field`): for each chain served by a running VM, a
//! periodic source that sends the VM a request at the rate of the chain's input stream (the
//! sensor) and a sink that times the answer (the actuator), so the chain's end-to-end latency
//! is measured and compared with its analysed bound and its deadline. The VMs run the `kv`
//! guest (Redis protocol): each request is `INCR <chain>`, a state change that replication
//! must carry.

use agent::cluster::{self, Measured};
use model::Loaded;
use rtc::models::EventModel;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One chain to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub chain: String,
    pub vm: String,
    pub addr: SocketAddr,
    pub period: Duration,
    pub deadline_ms: Option<f64>,
}

/// The chains of the model that a VM with an address and a port serves: the VM of the
/// chain's first task inside a VM, probed at the period of the chain's input stream.
pub fn probes(loaded: &Loaded) -> Vec<Probe> {
    let (Some(dep), sys) = (&loaded.deployment, &loaded.system) else { return Vec::new() };
    let mut out = Vec::new();
    for ch in &sys.chains {
        let Some(vm) = ch.tasks.iter().find_map(|&t| dep.vm_of_task[t]).map(|v| dep.vms[v].name.clone()) else { continue };
        let Some(run) = loaded.runs.iter().find(|r| r.vm == vm) else { continue };
        let (Some((ip, _)), Some(port)) = (run.ip, run.port) else { continue };
        // The chain's input: follow the first task's inputs back to a stream.
        let mut t = ch.tasks[0];
        let stream = loop {
            match sys.tasks[t].input {
                rtc::system::Input::Stream(s) => break s,
                rtc::system::Input::Task(p) => t = p,
            }
        };
        let us = match &sys.streams[stream].model {
            EventModel::Periodic { period } | EventModel::Pjd { period, .. } | EventModel::Bursty { period, .. } => period.to_f64(),
            EventModel::Sporadic { min_distance } => min_distance.to_f64(),
            EventModel::Trace { .. } => 10_000.0,
        };
        out.push(Probe {
            chain: ch.name.clone(),
            vm,
            addr: SocketAddr::from((ip, port)),
            period: Duration::from_micros(us.max(1000.0) as u64),
            deadline_ms: ch.deadline.as_ref().map(|d| d.to_f64() / 1000.0),
        });
    }
    out
}

/// Runs every probe on its own thread until the process ends, writing each chain's figures
/// to the store every `report`.
pub fn run(store: &Path, probes: Vec<Probe>, report: Duration) -> ! {
    for p in probes {
        let store: PathBuf = store.to_path_buf();
        std::thread::spawn(move || measure(&store, &p, report));
    }
    loop {
        std::thread::park();
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn measure(store: &Path, p: &Probe, report: Duration) {
    let mut client = loop {
        match store::Client::connect(store) {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!("field {}: store: {e}", p.chain);
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    let mut m = Measured { vm: p.vm.clone(), deadline_ms: p.deadline_ms, ..Measured::default() };
    let mut window: Vec<f64> = Vec::new();
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let mut last_report = Instant::now();
    let request = format!("*2\r\n$4\r\nINCR\r\n${}\r\n{}\r\n", p.chain.len(), p.chain);
    let mut next = Instant::now();
    loop {
        if conn.is_none() {
            conn = TcpStream::connect_timeout(&p.addr, Duration::from_secs(1)).ok().and_then(|s| {
                s.set_nodelay(true).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                let r = BufReader::new(s.try_clone().ok()?);
                Some((s, r))
            });
            if conn.is_none() {
                m.failures += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if let Some((w, r)) = conn.as_mut() {
            let t0 = Instant::now();
            let mut line = String::new();
            let ok = w.write_all(request.as_bytes()).is_ok() && r.read_line(&mut line).is_ok_and(|n| n > 0) && line.starts_with(':');
            if ok {
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                m.samples += 1;
                m.last_ms = ms;
                if p.deadline_ms.is_some_and(|d| ms > d) {
                    m.over_deadline += 1;
                }
                window.push(ms);
            } else {
                m.failures += 1;
                conn = None;
            }
        }
        if last_report.elapsed() >= report {
            window.sort_by(f64::total_cmp);
            m.window = window.len() as u64;
            m.p50_ms = quantile(&window, 0.5);
            m.p99_ms = quantile(&window, 0.99);
            m.max_ms = window.last().copied().unwrap_or(0.0);
            m.at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            if let Err(e) = cluster::write(&mut client, &cluster::chain_path(&p.chain), &m) {
                tracing::warn!("field {}: {e}", p.chain);
            }
            window.clear();
            last_report = Instant::now();
        }
        next += p.period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}
