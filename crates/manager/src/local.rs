//! The embedded cluster on one machine (`vigil up`): hosts as network namespaces joined by a
//! bridge, the store under its supervisor, an agent per host, the manager (and standbys), all
//! as detached processes (no fencing arbiter: replicated VMs hold their leases in the store,
//! `agent::fencing`); `vigil status`, `vigil fail HOST` and
//! `vigil down` find them through the cluster file `<dir>/cluster.json`.
//!
//! ```text
//!   field ns   10.99.0.100 ──┐            (clients, sensors, actuators)
//!   switch ns  br0 10.99.0.254 (with --etcd: the etcd members and the managers' store)
//!   host i ns  uplink ── hostbr 10.99.0.<i+1> ── vt<k> (VM k's tap; VM addresses from [[run]])
//! ```

use crate::runtime::Layout;
use agent::vm::TimingSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The LAN prefix of the embedded cluster.
pub const LAN: [u8; 3] = [10, 99, 0];
pub const FIELD_IP: &str = "10.99.0.100";
pub const BRIDGE: &str = "hostbr";

/// What `vigil up` started, kept in `<dir>/cluster.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterFile {
    pub model: PathBuf,
    pub dir: PathBuf,
    pub store: PathBuf,
    pub tag: String,
    pub switch_ns: String,
    pub field_ns: String,
    /// Host name → its namespace.
    pub host_ns: BTreeMap<String, String>,
    pub host_ip: BTreeMap<String, Ipv4Addr>,
    /// Process name → pid (store, agent:<host>, manager:<n>, field, etcd members).
    pub pids: BTreeMap<String, u32>,
    pub images: BTreeMap<String, PathBuf>,
    pub lease_ms: u64,
    pub period_ms: u64,
    /// Distributed mode: each host's own store front end (the managers' is `store`), all on
    /// the etcd cluster at these endpoints.
    #[serde(default)]
    pub host_store: BTreeMap<String, PathBuf>,
    #[serde(default)]
    pub etcd: Vec<String>,
    /// Processes the keeper (`vigil keep`) starts again when they die: the field, the
    /// managers (as systemd's `Restart=always` would on real hosts). A host's
    /// agent is not among them: a dead host is the manager's business.
    #[serde(default)]
    pub kept: BTreeMap<String, Kept>,
}

/// How to start a kept process again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    pub ns: Option<String>,
    pub args: Vec<String>,
    pub log: PathBuf,
    #[serde(default)]
    pub restarts: u32,
}

impl ClusterFile {
    /// The store socket the agent of `host` uses.
    pub fn store_of(&self, host: &str) -> PathBuf {
        self.host_store.get(host).cloned().unwrap_or_else(|| self.store.clone())
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join("cluster.json")
    }

    pub fn load(dir: &Path) -> Result<ClusterFile, String> {
        let p = Self::path(dir);
        let text =
            std::fs::read(&p).map_err(|e| format!("{}: {e} (is a cluster up? `vigil up MODEL --dir {}`)", p.display(), dir.display()))?;
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", p.display()))
    }

    /// Writes it atomically ([`agent::replace_file`]).
    pub fn save(&self) -> Result<(), String> {
        let p = Self::path(&self.dir);
        agent::replace_file(&p, &serde_json::to_vec_pretty(self).unwrap_or_default()).map_err(|e| format!("{}: {e}", p.display()))
    }

    /// Starts a process the keeper will start again if it dies.
    fn spawn_kept(&mut self, name: &str, exe: &Path, ns: Option<&str>, args: Vec<String>, log: PathBuf) -> Result<(), String> {
        let pid = spawn_detached(ns, exe, &args, &log)?;
        self.pids.insert(name.to_string(), pid);
        self.kept.insert(name.to_string(), Kept { ns: ns.map(String::from), args, log, restarts: 0 });
        Ok(())
    }

    /// The cluster's key (written by `vigil up`).
    pub fn key_file(&self) -> PathBuf {
        self.dir.join("cluster.key")
    }

    /// The layout the manager places VMs with.
    pub fn layout(&self) -> Layout {
        Layout {
            host_ip: self.host_ip.clone(),
            // Fencing leases in the store: each host's copies use their agent's store.
            arbiter: "store".into(),
            key_file: self.key_file(),
            bridge: BRIDGE.into(),
            images: self.images.clone(),
            run_dir: self.dir.join("run"),
            // A little more patient than replication's defaults (60 ms timeout, 90 ms lease):
            // on a small machine running the whole cluster, a stall of the host must not drop
            // a backup; a takeover still completes well before a client's first TCP
            // retransmission (200 ms).
            timing: TimingSpec { heartbeat_ms: 10, timeout_ms: 100, lease_ms: 120, renew_ms: 20 },
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            analysed: BTreeMap::new(),
            // `VIGIL_MIGRATION=stop-and-copy` (`vigil bench migration` compares the two).
            migration: std::env::var("VIGIL_MIGRATION").ok().and_then(|m| m.parse().ok()).unwrap_or_default(),
        }
    }
}

fn lan() -> String {
    format!("{}.{}.{}", LAN[0], LAN[1], LAN[2])
}

/// Runs `ip ARGS`; the error quotes it.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip (package iproute2): {e}"))?;
    if !out.status.success() {
        return Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

fn ns_ip(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// A veth pair between two namespaces, named `n1` in `ns1` and `n2` in `ns2`, both up.
fn veth(ns1: &str, n1: &str, ns2: &str, n2: &str, tag: &str) -> Result<(), String> {
    let t1 = format!("vgx{tag}{}", std::process::id() % 10000);
    let t2 = format!("vgy{tag}{}", std::process::id() % 10000);
    ip(&["link", "add", &t1, "type", "veth", "peer", "name", &t2])?;
    ip(&["link", "set", &t1, "netns", ns1])?;
    ip(&["link", "set", &t2, "netns", ns2])?;
    ns_ip(ns1, &["link", "set", &t1, "name", n1])?;
    ns_ip(ns2, &["link", "set", &t2, "name", n2])?;
    ns_ip(ns1, &["link", "set", n1, "up"])?;
    ns_ip(ns2, &["link", "set", n2, "up"])
}

/// Builds the namespaces of a cluster of `hosts`; returns (switch, field, host → ns, host → ip).
pub fn build_network(
    tag: &str,
    hosts: &[String],
) -> Result<(String, String, BTreeMap<String, String>, BTreeMap<String, Ipv4Addr>), String> {
    if hosts.len() > 90 {
        return Err(format!("{} hosts: the embedded cluster has room for 90", hosts.len()));
    }
    let sw = format!("vg{tag}-sw");
    let field = format!("vg{tag}-f");
    remove_network(tag, hosts.len());
    ip(&["netns", "add", &sw])?;
    ns_ip(&sw, &["link", "set", "lo", "up"])?;
    ns_ip(&sw, &["link", "add", "br0", "type", "bridge"])?;
    ns_ip(&sw, &["link", "set", "br0", "address", "02:99:00:00:00:fe"])?;
    ns_ip(&sw, &["addr", "add", &format!("{}.254/24", lan()), "dev", "br0"])?;
    ns_ip(&sw, &["link", "set", "br0", "up"])?;
    ip(&["netns", "add", &field])?;
    ns_ip(&field, &["link", "set", "lo", "up"])?;
    veth(&field, "eth0", &sw, "to-field", tag)?;
    ns_ip(&sw, &["link", "set", "to-field", "master", "br0"])?;
    ns_ip(&field, &["addr", "add", &format!("{FIELD_IP}/24"), "dev", "eth0"])?;
    let mut host_ns = BTreeMap::new();
    let mut host_ip = BTreeMap::new();
    for (i, h) in hosts.iter().enumerate() {
        let ns = format!("vg{tag}-h{i}");
        let addr = Ipv4Addr::new(LAN[0], LAN[1], LAN[2], 1 + i as u8);
        ip(&["netns", "add", &ns])?;
        ns_ip(&ns, &["link", "set", "lo", "up"])?;
        let port = format!("to-h{i}");
        veth(&ns, "uplink", &sw, &port, tag)?;
        ns_ip(&sw, &["link", "set", &port, "master", "br0"])?;
        ns_ip(&ns, &["link", "add", BRIDGE, "type", "bridge"])?;
        // A fixed address: a bridge whose address is not set takes its lowest port's, which
        // changes as VM taps join, and the other hosts' ARP caches then point at a tap.
        ns_ip(&ns, &["link", "set", BRIDGE, "address", &format!("02:99:00:00:01:{:02x}", i + 1)])?;
        ns_ip(&ns, &["link", "set", "uplink", "master", BRIDGE])?;
        ns_ip(&ns, &["addr", "add", &format!("{addr}/24"), "dev", BRIDGE])?;
        ns_ip(&ns, &["link", "set", BRIDGE, "up"])?;
        host_ns.insert(h.clone(), ns);
        host_ip.insert(h.clone(), addr);
    }
    Ok((sw, field, host_ns, host_ip))
}

/// Removes the namespaces of cluster `tag` (those that exist).
pub fn remove_network(tag: &str, hosts: usize) {
    let mut names = vec![format!("vg{tag}-sw"), format!("vg{tag}-f")];
    names.extend((0..hosts.max(16)).map(|i| format!("vg{tag}-h{i}")));
    for n in names {
        if Path::new("/run/netns").join(&n).exists() {
            let _ = Command::new("ip").args(["netns", "del", &n]).output();
        }
    }
}

/// Starts `program ARGS` (inside namespace `ns` if given) in its own session, detached, its
/// output in `log`; returns its pid.
pub fn spawn_detached(ns: Option<&str>, program: &Path, args: &[String], log: &Path) -> Result<u32, String> {
    use std::os::unix::process::CommandExt;
    let f = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let f2 = f.try_clone().map_err(|e| format!("{}: {e}", log.display()))?;
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args).stdin(Stdio::null()).stdout(f).stderr(f2);
    // SAFETY: between fork and exec the closure only calls setsid(2), which is
    // async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    let pid = child.id();
    // Not our business to wait for it: it is reaped by whoever adopts it when we exit; a
    // thread reaps it if it ends while we still run.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(pid)
}

/// SIGKILLs `pid` if it is alive.
pub fn kill(pid: u32) {
    if pid != 0 {
        // SAFETY: kill(2) on a pid; no memory involved.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// What `vigil up` needs.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub model: PathBuf,
    pub dir: PathBuf,
    /// Keeps concurrent clusters' namespaces apart (at most 4 characters).
    pub tag: String,
    /// The `vigil` executable every process runs.
    pub exe: PathBuf,
    /// Managers to start (one leads, the others stand by).
    pub managers: usize,
    pub faults: usize,
    pub lease_ms: u64,
    pub period_ms: u64,
    /// How long to wait for every VM to run.
    pub wait: std::time::Duration,
    /// Distributed mode: a three-member etcd cluster on the switch, a store front end per
    /// host (in the host's namespace, so it reaches etcd over the host's link) and one for the
    /// managers.
    pub etcd: bool,
    /// The managers' dashboards on 127.0.0.1:PORT+i (manager i); `Some(0)`: any free ports.
    pub http_port: Option<u16>,
}

/// Debian's etcd-server.
pub const ETCD: &str = "/usr/bin/etcd";

fn pids_in(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// Finds each `[[run]]` image: a path as written, `target/release/NAME`, or a guest of the
/// workspace in the current directory, built with cargo.
pub fn resolve_images(loaded: &model::Loaded) -> Result<BTreeMap<String, PathBuf>, String> {
    let mut out = BTreeMap::new();
    for (r, image) in loaded.runs.iter().flat_map(|r| r.images().map(move |i| (r, i.to_string()))) {
        if out.contains_key(&image) {
            continue;
        }
        let as_path = Path::new(&image);
        let release = Path::new("target/release").join(&image);
        let found = if as_path.is_file() {
            Some(as_path.to_path_buf())
        } else if release.is_file() {
            Some(release)
        } else if Path::new("guests").join(&image).join("Cargo.toml").is_file() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            eprintln!("vigil up: building guest {image} (cargo build --release -p {image})");
            let st = Command::new(cargo).args(["build", "--release", "--quiet", "-p", &image]).status();
            match st {
                Ok(s) if s.success() && release.is_file() => Some(release),
                _ => None,
            }
        } else {
            None
        };
        let p = found.ok_or_else(|| {
            format!(
                "{}:{}: run {:?}: image {image:?} not found (a path, target/release/{image}, or a guest of this workspace)",
                loaded.file, r.line, r.vm
            )
        })?;
        out.insert(image, std::fs::canonicalize(&p).unwrap_or(p));
    }
    Ok(out)
}

/// Brings a cluster up; returns its file once every VM with a `[[run]]` item runs.
pub fn up(o: &UpOptions) -> Result<ClusterFile, String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("vigil up needs root (it creates network namespaces and tap devices)".into());
    }
    if !Path::new("/dev/kvm").exists() {
        return Err("vigil up needs /dev/kvm (the VMs run on KVM)".into());
    }
    if o.tag.is_empty() || o.tag.len() > 4 || !o.tag.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(format!("--tag {:?}: 1 to 4 letters or digits", o.tag));
    }
    let loaded = model::load(&o.model).map_err(|e| e.to_string())?;
    let dep = loaded.deployment.as_ref().ok_or_else(|| format!("{}: no [[host]] items: nothing to run", o.model.display()))?;
    if loaded.runs.is_empty() {
        return Err(format!("{}: no [[run]] items: no VM says how it runs (image, address)", o.model.display()));
    }
    if let Ok(old) = ClusterFile::load(&o.dir) {
        if old.pids.values().any(|&p| agent::host::alive(p)) {
            return Err(format!("a cluster is already up in {} (`vigil down --dir {0}` first)", o.dir.display()));
        }
    }
    let images = resolve_images(&loaded)?;
    let model = std::fs::canonicalize(&o.model).map_err(|e| format!("{}: {e}", o.model.display()))?;
    std::fs::create_dir_all(o.dir.join("run")).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    let dir = std::fs::canonicalize(&o.dir).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    // A new cluster: the hosts' state from an earlier one in this directory (specs, replicas,
    // the generations they ran under, which start again from 1) is no state of this one.
    let _ = std::fs::remove_dir_all(dir.join("hosts"));
    let hosts: Vec<String> = dep.hosts.iter().map(|h| h.name.clone()).collect();
    let (switch_ns, field_ns, host_ns, host_ip) = build_network(&o.tag, &hosts)?;
    let store = dir.join("store.sock");
    let mut cf = ClusterFile {
        model,
        dir: dir.clone(),
        store: store.clone(),
        tag: o.tag.clone(),
        switch_ns: switch_ns.clone(),
        field_ns,
        host_ns: host_ns.clone(),
        host_ip,
        pids: BTreeMap::new(),
        images,
        lease_ms: o.lease_ms,
        period_ms: o.period_ms,
        host_store: BTreeMap::new(),
        etcd: Vec::new(),
        kept: BTreeMap::new(),
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let _ = std::fs::remove_dir_all(dir.join("store-data"));
    let mut etcd_args: Vec<String> = Vec::new();
    if o.etcd {
        if !Path::new(ETCD).is_file() {
            return Err(format!("--etcd needs {ETCD} (Debian package etcd-server)"));
        }
        let peers: Vec<String> = (0..3).map(|i| format!("m{i}=http://{}.254:{}", lan(), 2380 + 100 * i)).collect();
        let _ = std::fs::remove_dir_all(dir.join("etcd"));
        for i in 0..3u16 {
            let client = format!("http://{}.254:{}", lan(), 2379 + 100 * i);
            let peer = format!("http://{}.254:{}", lan(), 2380 + 100 * i);
            let data = dir.join("etcd").join(format!("m{i}"));
            let mut args = s(&["--name", &format!("m{i}"), "--data-dir", &data.display().to_string()]);
            args.extend(s(&["--listen-client-urls", &client, "--advertise-client-urls", &client]));
            args.extend(s(&["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer]));
            args.extend(s(&["--initial-cluster", &peers.join(","), "--initial-cluster-state", "new"]));
            args.extend(s(&[
                "--initial-cluster-token",
                &format!("vigil-{}", o.tag),
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ]));
            let pid = spawn_detached(Some(&switch_ns), Path::new(ETCD), &args, &dir.join(format!("etcd-m{i}.log")))?;
            cf.pids.insert(format!("etcd:m{i}"), pid);
            cf.etcd.push(format!("{}.254:{}", lan(), 2379 + 100 * i));
        }
        etcd_args = s(&["--etcd", &cf.etcd.join(","), "--etcd-prefix", &format!("vigil/{}", o.tag)]);
    }
    let mut store_args =
        s(&["store", "supervise", "--socket", &store.display().to_string(), "--data", &dir.join("store-data").display().to_string()]);
    store_args.extend(etcd_args.iter().cloned());
    store_args.extend(s(&["--volatile", agent::cluster::VOLATILE_HEARTBEATS]));
    // With etcd the managers' front end sits on the switch (it reaches etcd there).
    let store_ns = o.etcd.then_some(switch_ns.as_str());
    let pid = spawn_detached(store_ns, &o.exe, &store_args, &dir.join("store.log"))?;
    cf.pids.insert("store".into(), pid);
    if o.etcd {
        for (h, ns) in &host_ns {
            let hd = dir.join("hosts").join(h);
            std::fs::create_dir_all(&hd).map_err(|e| format!("{}: {e}", hd.display()))?;
            let sock = hd.join("store.sock");
            let _ = std::fs::remove_dir_all(hd.join("store-data"));
            let mut a =
                s(&["store", "supervise", "--socket", &sock.display().to_string(), "--data", &hd.join("store-data").display().to_string()]);
            a.extend(etcd_args.iter().cloned());
            a.extend(s(&["--volatile", agent::cluster::VOLATILE_HEARTBEATS]));
            let pid = spawn_detached(Some(ns), &o.exe, &a, &dir.join(format!("store-{h}.log")))?;
            cf.pids.insert(format!("store:{h}"), pid);
            cf.host_store.insert(h.clone(), sock);
        }
    }
    cf.save()?;
    let mut client =
        store::Client::connect(&store).map_err(|e| format!("the store did not come up: {e} (see {})", dir.join("store.log").display()))?;
    let _ = client.rm(agent::cluster::ROOT);
    agent::auth::Key::generate(&cf.key_file()).map_err(|e| e.to_string())?;
    for (h, ns) in &host_ns {
        let state = dir.join("hosts").join(h);
        std::fs::create_dir_all(&state).map_err(|e| format!("{}: {e}", state.display()))?;
        let args = s(&[
            "agent",
            "--host",
            h,
            "--store",
            &cf.store_of(h).display().to_string(),
            "--state",
            &state.display().to_string(),
            "--period-ms",
            &o.period_ms.to_string(),
            "--lease-ms",
            &o.lease_ms.to_string(),
            "--respawn",
        ]);
        let pid = spawn_detached(Some(ns), &o.exe, &args, &dir.join(format!("agent-{h}.log")))?;
        cf.pids.insert(format!("agent:{h}"), pid);
    }
    let field_ns = cf.field_ns.clone();
    cf.spawn_kept("field", &o.exe, Some(&field_ns), s(&["field", "--dir", &dir.display().to_string()]), dir.join("field.log"))?;
    for m in 0..o.managers.max(1) {
        let mut args = s(&["manager", "--dir", &dir.display().to_string(), "--id", &format!("m{m}"), "--faults", &o.faults.to_string()]);
        if let Some(port) = o.http_port {
            let port = if port == 0 { 0 } else { port.saturating_add(m as u16) };
            args.extend(s(&["--http", &format!("127.0.0.1:{port}")]));
        }
        cf.spawn_kept(&format!("manager:m{m}"), &o.exe, None, args, dir.join(format!("manager-m{m}.log")))?;
    }
    cf.save()?;
    // The keeper records itself (and its standby) in cluster.json: from now on it is the only
    // writer of the file.
    spawn_detached(None, &o.exe, &s(&["keep", "--dir", &dir.display().to_string()]), &dir.join("keeper.log"))?;
    let start = std::time::Instant::now();
    loop {
        let st = status(&cf)?;
        if st.vms.iter().all(|v| v.serving) {
            return Ok(cf);
        }
        if start.elapsed() > o.wait {
            let waiting: Vec<String> = st.vms.iter().filter(|v| !v.serving).map(|v| format!("{} ({})", v.vm, v.detail)).collect();
            return Err(format!(
                "not every VM runs after {:.0} s: {} (logs in {})",
                o.wait.as_secs_f64(),
                waiting.join(", "),
                dir.display()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Stops everything of the cluster in `dir` and removes its namespaces.
pub fn down(dir: &Path) -> Result<(), String> {
    let cf = ClusterFile::load(dir)?;
    // The keepers first, or they would start again what is stopped next (the standby first: the
    // keeper would start it again; a standby that took the keeper's place finds no file).
    let _ = std::fs::rename(ClusterFile::path(dir), dir.join("cluster.json.down"));
    for name in [KEEPER_STANDBY, KEEPER] {
        if let Some(&k) = cf.pids.get(name) {
            kill(k);
        }
    }
    for &p in cf.pids.values() {
        kill(p);
    }
    // Every process in the cluster's namespaces, until none is left: an agent killed in one
    // pass may have started a VM's process just after that pass listed the namespace's
    // processes (seen after a test brought a cluster down while a plan started a backup: the
    // backup outlived its cluster).
    let namespaces: Vec<&String> = cf.host_ns.values().chain([&cf.switch_ns, &cf.field_ns]).collect();
    for _ in 0..50 {
        let left: Vec<u32> = namespaces.iter().flat_map(|ns| pids_in(ns)).collect();
        if left.is_empty() {
            break;
        }
        left.into_iter().for_each(kill);
        std::thread::sleep(std::time::Duration::from_millis(40));
    }
    remove_network(&cf.tag, cf.host_ns.len());
    // The namespaces of voted VMs' instances (their voters were killed above).
    agent::voter::driver::remove_stale_netns();
    let _ = std::fs::remove_file(dir.join("cluster.json.down"));
    Ok(())
}

/// Whether process `pid` runs (exists and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

/// `cluster.json`'s names of the keeper and of its standby.
pub const KEEPER: &str = "keeper";
pub const KEEPER_STANDBY: &str = "keeper-standby";

/// The keeper of the cluster in `dir` (`vigil keep`): every `period`, starts again each kept
/// process that died (same namespace and arguments; its log goes on in `<log>.<n>`), counts
/// the restart in `cluster.json` and in the store's event log. Returns when `cluster.json` is
/// gone (`vigil down`).
///
/// Keepers come in pairs, so that something restarts the keeper too: the one holding
/// `<dir>/keeper.lock` (an exclusive `flock`, released by the kernel when its holder dies)
/// keeps, and keeps a standby `vigil keep` started; the standby waits for the lock. When the
/// keeper dies, the standby takes the lock, records itself as the keeper, starts a new
/// standby and keeps. Only the lock's holder writes `cluster.json` (after `vigil up`).
pub fn keep(dir: &Path, exe: &Path, period: std::time::Duration) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let lock_path = dir.join("keeper.lock");
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    loop {
        // SAFETY: flock(2) on a descriptor we own; it blocks until the lock is ours.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("{}: {e}", lock_path.display()));
        }
    }
    let me = std::process::id();
    let mut first = true;
    loop {
        if !first {
            std::thread::sleep(period);
        }
        let Ok(mut cf) = ClusterFile::load(dir) else { return Ok(()) };
        let mut changed = Vec::new();
        if cf.pids.get(KEEPER) != Some(&me) {
            if let Some(was) = cf.pids.insert(KEEPER.into(), me).filter(|p| *p != 0) {
                eprintln!("keeper: the keeper (pid {was}) had died; its standby (pid {me}) keeps now");
                changed.push(format!("keeper (pid {was}) had died; its standby (pid {me}) keeps now"));
            }
            cf.pids.remove(KEEPER_STANDBY);
            cf.save()?;
        }
        first = false;
        if !cf.pids.get(KEEPER_STANDBY).is_some_and(|&p| p != me && alive(p)) {
            let args = vec!["keep".to_string(), "--dir".to_string(), dir.display().to_string()];
            match spawn_detached(None, exe, &args, &dir.join("keeper-standby.log")) {
                Ok(pid) => {
                    cf.pids.insert(KEEPER_STANDBY.into(), pid);
                    cf.save()?;
                }
                Err(e) => eprintln!("keeper: cannot start a standby: {e}"),
            }
        }
        for (name, k) in cf.kept.clone() {
            if cf.pids.get(&name).is_some_and(|&p| alive(p)) {
                continue;
            }
            let n = k.restarts + 1;
            let log = PathBuf::from(format!("{}.{n}", k.log.display()));
            match spawn_detached(k.ns.as_deref(), exe, &k.args, &log) {
                Ok(pid) => {
                    let was = cf.pids.insert(name.clone(), pid).unwrap_or(0);
                    if let Some(e) = cf.kept.get_mut(&name) {
                        e.restarts = n;
                    }
                    eprintln!("keeper: {name} (pid {was}) had died; started again as pid {pid} (restart {n}, log {})", log.display());
                    changed.push(format!("{name} had died; the keeper started it again (restart {n})"));
                }
                Err(e) => eprintln!("keeper: cannot start {name} again: {e}"),
            }
        }
        if !changed.is_empty() {
            cf.save()?;
            if let Ok(mut c) = store::Client::connect(&cf.store) {
                let at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                for what in changed {
                    let _ = agent::cluster::log_event(&mut c, &agent::cluster::Event { at_ms, source: "keeper".into(), what });
                }
            }
        }
    }
}

/// Fault injection: SIGKILL of every process of `host` (its agent and its VMMs) and its link
/// to the switch cut; with `partition`, only the link is cut (its processes live on, cut off).
///
/// The fault goes into the event log, dated when the processes were killed (the moment the
/// benchmarks measure from): `host hostA: failure injected: …`.
pub fn fail(dir: &Path, host: &str, partition: bool) -> Result<Vec<u32>, String> {
    let cf = ClusterFile::load(dir)?;
    let ns = host_ns(&cf, host)?;
    let pids = if partition { Vec::new() } else { pids_in(ns) };
    let at = agent::cluster::Event::now("vigil fail", String::new()).at_ms;
    for &p in &pids {
        kill(p);
    }
    ns_ip(ns, &["link", "set", "uplink", "down"])?;
    let what = if partition {
        format!("host {host}: failure injected: its link cut, its processes run on")
    } else {
        format!("host {host}: failure injected: {} process(es) SIGKILLed, its link cut", pids.len())
    };
    // The injection happened whatever the store says; an unreachable store only loses the note.
    let note =
        store::Client::connect_within(&cf.store, std::time::Duration::from_millis(500)).map_err(|e| e.to_string()).and_then(|mut c| {
            c.set_retry_for(std::time::Duration::from_millis(500));
            c.set_request_timeout(std::time::Duration::from_millis(500));
            agent::cluster::log_event(&mut c, &agent::cluster::Event { at_ms: at, source: "vigil fail".into(), what })
                .map_err(|e| e.to_string())
        });
    if let Err(e) = note {
        eprintln!("vigil fail: the fault is not in the event log: {e}");
    }
    Ok(pids)
}

/// The pids of the processes in `host`'s namespace.
pub fn host_pids(cf: &ClusterFile, host: &str) -> Result<Vec<u32>, String> {
    Ok(pids_in(host_ns(cf, host)?))
}

/// Restores the link of a host cut off by [`fail`].
pub fn heal(dir: &Path, host: &str) -> Result<(), String> {
    let cf = ClusterFile::load(dir)?;
    ns_ip(host_ns(&cf, host)?, &["link", "set", "uplink", "up"])
}

fn host_ns<'a>(cf: &'a ClusterFile, host: &str) -> Result<&'a String, String> {
    cf.host_ns
        .get(host)
        .ok_or_else(|| format!("unknown host {host:?} (hosts: {})", cf.host_ns.keys().cloned().collect::<Vec<_>>().join(", ")))
}

/// The newest events `vigil status` returns (of the store's last `agent::cluster::EVENTS_KEPT`).
pub const STATUS_EVENTS: usize = 200;

/// One VM in `vigil status`.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    pub vm: String,
    pub mode: String,
    pub host: Option<String>,
    pub backup: Option<String>,
    /// Its running copy runs where the desired state puts it.
    pub serving: bool,
    /// Remote-backup mode: `protected` (its backup holds a committed replica) or
    /// `unprotected`; `-` otherwise.
    pub replication: String,
    /// A protected VM's checkpoints over the last second.
    pub figures: Option<agent::cluster::ReplicationFigures>,
    /// Its jobs' measured execution times (the last quarter second), and the WCET the model
    /// declares for them (µs; `manager::drift`).
    pub jobs: Option<agent::cluster::JobFigures>,
    pub wcet_us: Option<f64>,
    pub detail: String,
}

/// One host in `vigil status`.
#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    pub host: String,
    pub heartbeat: Option<u64>,
    pub fenced: bool,
    pub agent_pid: Option<u32>,
}

/// `vigil status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub leader: Option<agent::cluster::Leader>,
    pub hosts: Vec<HostStatus>,
    pub vms: Vec<VmStatus>,
    pub failed: Vec<String>,
    /// The plan in force (for the failed hosts) and its chains.
    pub plan: Option<crate::table::StoredPlan>,
    /// Scenarios of the table and how each is covered.
    pub coverage: BTreeMap<String, String>,
    /// The whole plan table: what happens if each scenario's hosts fail.
    pub plans: Vec<crate::table::StoredPlan>,
    /// The managers' dashboards (URLs), as each manager recorded it.
    pub dashboards: BTreeMap<String, String>,
    pub events: Vec<agent::cluster::Event>,
    /// Each probed chain's measured latency, beside its bound in the plan in force.
    pub measured: BTreeMap<String, agent::cluster::Measured>,
    /// Where the placement in force differs from the plan's (not covered by its analysis).
    pub deviations: Vec<String>,
    /// Chains whose measured latency (the last window's maximum) exceeds their analysed bound
    /// in the plan in force: the model misses something that runs (replication's output delay,
    /// the VMM's overhead, a loaded host).
    pub above_bound: Vec<String>,
    /// Every VM serves where the plan puts it and every chain of the plan holds.
    pub ok: bool,
}

/// Reads the cluster's state from its store.
pub fn status(cf: &ClusterFile) -> Result<Status, String> {
    let mut c = store::Client::connect(&cf.store).map_err(|e| e.to_string())?;
    c.set_retry_for(std::time::Duration::from_secs(2));
    let loaded = model::load(&cf.model).map_err(|e| e.to_string())?;
    status_of(&mut c, &loaded)
}

/// The state of the cluster that runs `loaded`, read from its store through `c`.
pub fn status_of(c: &mut store::Client, loaded: &model::Loaded) -> Result<Status, String> {
    use agent::cluster::{self, Actual, AgentRecord, CopyState, Desired, Fence, Progress};
    let e = |e: agent::Error| e.to_string();
    let mut hosts = Vec::new();
    let names: Vec<String> = loaded.deployment.as_ref().map(|d| d.hosts.iter().map(|h| h.name.clone()).collect()).unwrap_or_default();
    for h in &names {
        hosts.push(HostStatus {
            host: h.clone(),
            heartbeat: cluster::read_counter(c, &cluster::heartbeat_path(h)).map_err(e)?,
            fenced: cluster::read::<Fence>(c, &cluster::fence_path(h)).map_err(e)?.is_some(),
            agent_pid: cluster::read::<AgentRecord>(c, &cluster::agent_path(h)).map_err(e)?.map(|a| a.pid),
        });
    }
    let progress: Option<Progress> = cluster::read(c, cluster::PROGRESS).map_err(e)?;
    let failed = progress.as_ref().map(|p| p.failed.clone()).unwrap_or_default();
    let table = crate::table::Table::load(c).map_err(e)?;
    let plan = table.lookup(&failed).cloned();
    let mut vms = Vec::new();
    let dep = loaded.deployment.as_ref();
    for r in &loaded.runs {
        let mode =
            dep.and_then(|d| d.vms.iter().find(|v| v.name == r.vm)).map(|v| format!("{:?}", v.mode).to_lowercase()).unwrap_or_default();
        let d: Option<Desired> = cluster::read(c, &cluster::desired_path(&r.vm)).map_err(e)?;
        let host = d.as_ref().and_then(|d| d.primary.as_ref().map(|p| p.host.clone()));
        let backup = d.as_ref().and_then(|d| d.backup.as_ref().map(|b| b.host.clone()));
        let actual: Option<Actual> = match &host {
            Some(h) => cluster::read(c, &cluster::actual_path(&r.vm, h)).map_err(e)?,
            None => None,
        };
        // A failed host's records are stale: nothing it reports counts.
        let serving = actual.as_ref().is_some_and(|a| a.state == CopyState::Running) && host.as_ref().is_some_and(|h| !failed.contains(h));
        let detail = match (&d, &actual) {
            (None, _) => "not placed yet".to_string(),
            (Some(_), None) if host.is_none() => "stopped by the plan".to_string(),
            (Some(_), None) => "not started yet".to_string(),
            (Some(_), Some(a)) => format!(
                "{:?} pid {} restarts {}{}",
                a.state,
                a.pid,
                a.restarts,
                if a.detail.is_empty() { String::new() } else { format!(" ({})", a.detail) }
            )
            .to_lowercase(),
        };
        let replication = match actual.as_ref().and_then(|a| a.protected) {
            Some(true) => "protected",
            Some(false) => "unprotected",
            None if backup.is_some() => "unprotected",
            None => "-",
        }
        .to_string();
        vms.push(VmStatus {
            vm: r.vm.clone(),
            mode,
            host,
            backup,
            serving: serving || d.as_ref().is_some_and(|d| d.primary.is_none()),
            replication,
            figures: actual.as_ref().and_then(|a| a.replication.clone()),
            jobs: actual.as_ref().and_then(|a| a.jobs.clone()),
            wcet_us: crate::drift::compared_task(loaded, &r.vm).map(|(_, w)| w),
            detail,
        });
    }
    let coverage = table.plans.values().map(|p| (crate::table::plan_name(&p.failed), p.coverage.clone())).collect();
    let chains_ok = plan.as_ref().is_none_or(|p| p.chains.iter().all(|ch| ch.status == "ok"));
    let deviations = progress.as_ref().map(|p| p.deviations.clone()).unwrap_or_default();
    let plan_done = progress.as_ref().is_none_or(|p| p.done >= p.total);
    let ok = vms.iter().all(|v| v.serving) && chains_ok && plan.is_some() && deviations.is_empty() && plan_done;
    let mut measured = BTreeMap::new();
    for ch in &loaded.system.chains {
        if let Some(m) = cluster::read::<agent::cluster::Measured>(c, &cluster::chain_path(&ch.name)).map_err(e)? {
            measured.insert(ch.name.clone(), m);
        }
    }
    let above_bound = plan
        .as_ref()
        .map(|p| {
            p.chains
                .iter()
                .filter(|ch| measured.get(&ch.chain).zip(ch.worst_ms).is_some_and(|(m, w): (&agent::cluster::Measured, f64)| m.max_ms > w))
                .map(|ch| ch.chain.clone())
                .collect()
        })
        .unwrap_or_default();
    Ok(Status {
        leader: cluster::read(c, cluster::LEADER).map_err(e)?,
        hosts,
        vms,
        failed,
        plan,
        coverage,
        plans: table.plans.values().cloned().collect(),
        dashboards: cluster::children(c, cluster::DASHBOARDS)
            .map_err(e)?
            .into_iter()
            .filter_map(|id| {
                c.try_read(&format!("{}/{id}", cluster::DASHBOARDS)).ok().flatten().map(|u| (id, String::from_utf8_lossy(&u).into_owned()))
            })
            .collect(),
        events: cluster::events(c, STATUS_EVENTS).map_err(e)?,
        measured,
        deviations,
        above_bound,
        ok,
    })
}
