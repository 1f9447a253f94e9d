//! The MMS end to end (`vigil up`, `status`, `fail`, `down`), with real KVM, real processes
//! in network namespaces, and real clients (`redis-cli`):
//! - a host is SIGKILLed with its VMMs and its link cut: the manager fences it and executes
//!   the precomputed plan; the replicated VM's client loses no acknowledged write on the same
//!   TCP connection; the unreplicated VM is restarted where the plan says; every chain of the
//!   plan in force holds;
//! - the leading manager, an agent (its VMMs left running) and the store's server are killed:
//!   a standby leads with a higher generation, the agent is back and re-adopts its VMMs, the
//!   store comes back, no host is failed for it; then a host failure is handled by the new
//!   leader;
//! - the leading manager dies halfway through a plan (after its first desired record): the
//!   next leader finishes it from the progress record;
//! - distributed, on a 3-member etcd cluster with a store front end per host: a host cut off
//!   by a partition with its processes alive stops its VMs before the manager declares it
//!   failed, and ends when the link comes back; no acknowledged write is lost;
//! - a migration whose source's agent, then whole host, dies before the handover: the VM ends
//!   on the destination from its replica, no acknowledged write lost, the same connection;
//! - a plan that migrates a running VM off a live host (examples/crowded.toml): the VM moves
//!   with its state and its clients' TCP connections (stop-and-copy through a snapshot);
//! - bad input: a model that cannot run, `vigil fail` of an unknown host or without a
//!   cluster, an agent started twice for one host.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testbed::redis::{client_ports, RedisClient};

static SERIAL: Mutex<()> = Mutex::new(());

fn vigil(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vigil")).args(args).output().expect("run vigil")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn no_kvm(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return false;
    }
    eprintln!("{test}: skipped: /dev/kvm is absent on this host");
    true
}

fn workdir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../target/cluster-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("work dir");
    d
}

/// An example with the kv guest built from this workspace.
fn example(dir: &Path, name: &str) -> PathBuf {
    let kv = testbed::guest("kv").expect("the kv guest");
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(name)).expect("example");
    let p = dir.join(name);
    std::fs::write(&p, text.replace("image = \"kv\"", &format!("image = {:?}", kv.display().to_string()))).expect("model");
    p
}

/// A cluster brought up by `vigil up`, brought down when dropped.
struct Up {
    dir: PathBuf,
}

impl Up {
    fn start(name: &str, tag: &str) -> Up {
        Up::start_with(name, tag, &[])
    }

    fn start_with(name: &str, tag: &str, extra: &[&str]) -> Up {
        Up::start_env(name, tag, extra, &[])
    }

    /// With `env` set for `vigil up` (and so for every process it starts).
    fn start_env(name: &str, tag: &str, extra: &[&str], env: &[(&str, &str)]) -> Up {
        Up::start_model(name, tag, "substation.toml", extra, env)
    }

    fn start_model(name: &str, tag: &str, example_name: &str, extra: &[&str], env: &[(&str, &str)]) -> Up {
        Up::start_edited(name, tag, example_name, extra, env, |t| t)
    }

    /// With the example's text changed by `edit` first.
    fn start_edited(
        name: &str,
        tag: &str,
        example_name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        edit: impl Fn(String) -> String,
    ) -> Up {
        let dir = workdir(name);
        let m = example(&dir, example_name);
        std::fs::write(&m, edit(std::fs::read_to_string(&m).expect("model"))).expect("model");
        let cluster = dir.join("cluster");
        let tag = testbed::ns_tag(tag);
        let mut args =
            vec!["up", m.to_str().unwrap(), "--dir", cluster.to_str().unwrap(), "--tag", &tag, "--wait", "60", "--http-port", "0"];
        args.extend_from_slice(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_vigil")).args(&args).envs(env.iter().copied()).output().expect("run vigil");
        let up = Up { dir: cluster };
        assert!(
            out.status.success(),
            "vigil up: {}{}\nthe cluster's logs:{}",
            text(&out.stdout),
            text(&out.stderr),
            testbed::log_tails(&up.dir, 15)
        );
        up
    }

    fn d(&self) -> String {
        self.dir.display().to_string()
    }

    fn status(&self) -> (bool, serde_json::Value) {
        let out = vigil(&["status", "--json", "--dir", &self.d()]);
        let v =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status JSON: {e}: {}{}", text(&out.stdout), text(&out.stderr)));
        (out.status.code() == Some(0), v)
    }

    /// Waits (at most `secs`) until `f` holds for the status.
    fn wait(&self, what: &str, secs: u64, f: impl Fn(bool, &serde_json::Value) -> bool) -> serde_json::Value {
        let t = Instant::now();
        loop {
            let (ok, v) = self.status();
            if f(ok, &v) {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "waiting for {what}: {}",
                serde_json::to_string_pretty(&v).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn file(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.dir.join("cluster.json")).expect("cluster.json")).expect("cluster.json")
    }

    fn field_ns(&self) -> String {
        self.file()["field_ns"].as_str().expect("field ns").to_string()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = vigil(&["down", "--dir", &self.d()]);
        if std::thread::panicking() {
            eprintln!("the cluster's logs (in {}):{}", self.d(), testbed::log_tails(&self.dir, 15));
        }
    }
}

fn vm<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    st["vms"].as_array().and_then(|v| v.iter().find(|x| x["vm"] == name)).unwrap_or_else(|| panic!("VM {name} in {st}"))
}

/// A lead newer than generation `g` began (another manager's, or the same manager's after
/// its keeper restarted it: the election decides, not the id).
fn new_lead(v: &serde_json::Value, g: u64) -> bool {
    v["leader"]["generation"].as_u64().is_some_and(|n| n > g)
}

fn kill(pid: u64) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// Writes `SET k<i> v<i>` and `INCR ctr` on one connection until stopped.
fn drive(mut c: RedisClient, stop: Arc<AtomicBool>, done: Arc<AtomicU64>, errors: Arc<Mutex<Vec<String>>>) -> (RedisClient, u64) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let a = c.call(&format!("SET k{i} v{i}"));
        let b = c.call("INCR ctr");
        if a != "OK" || b != (i + 1).to_string() {
            errors.lock().expect("errors").push(format!("request {i}: SET answered {a:?}, INCR {b:?}"));
            break;
        }
        i += 1;
        done.store(i, Ordering::Relaxed);
    }
    (c, i)
}

/// A client writing `SET k<i> v<i>` and `INCR ctr` on one connection to `ip:6379`, from the
/// field namespace, on its own thread.
struct Writer {
    field: String,
    peer: String,
    port: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<(RedisClient, u64)>>,
}

impl Writer {
    /// Starts writing and waits for 30 acknowledged writes.
    fn start(field: &str, ip: &str) -> Writer {
        // The field side's probe is connected to the same VM too: ours is redis-cli's.
        let client = RedisClient::new(field, ip, 6379);
        let (stop, done, errors) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(Vec::new())));
        let (s, d, e) = (stop.clone(), done.clone(), errors.clone());
        let thread = Some(std::thread::spawn(move || drive(client, s, d, e)));
        let mut w = Writer { field: field.into(), peer: format!("{ip}:6379"), port: String::new(), stop, done, errors, thread };
        w.carry_on(30, Duration::from_secs(20));
        let mine = client_ports(field, &w.peer, "redis-cli");
        assert_eq!(mine.len(), 1, "redis-cli's one connection: {mine:?}");
        w.port = mine[0].clone();
        w
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `n` more writes were acknowledged (no error meanwhile).
    fn carry_on(&self, n: u64, limit: Duration) {
        let (before, t) = (self.done(), Instant::now());
        while self.done() < before + n {
            assert!(self.errors.lock().unwrap().is_empty(), "{:?}", self.errors.lock().unwrap());
            assert!(t.elapsed() < limit, "the client is stuck ({} writes acknowledged)", self.done());
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops writing, then checks on the same connection that every acknowledged write is
    /// there and the counter counted each once; returns how many there were.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let (mut c, n) = self.thread.take().expect("writer").join().expect("client");
        assert!(self.errors.lock().unwrap().is_empty(), "{:?}", self.errors.lock().unwrap());
        let now = client_ports(&self.field, &self.peer, "redis-cli");
        assert_eq!(now, vec![self.port.clone()], "the client's TCP connection survived");
        for i in (0..n).step_by(5).chain([n - 1]) {
            assert_eq!(c.call(&format!("GET k{i}")), format!("v{i}"), "acknowledged write k{i} lost ({n} writes)");
        }
        assert_eq!(c.call("GET ctr"), n.to_string());
        n
    }
}

#[test]
fn a_failed_host_is_handled_by_its_plan_and_no_acknowledged_write_is_lost() {
    if no_kvm("a_failed_host_is_handled_by_its_plan_and_no_acknowledged_write_is_lost") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let up = Up::start("fail", "t1");
    // A replicated VM survives its host once its backup holds a committed replica.
    let st = up
        .wait("every VM serving where the model puts it, relay protected", 30, |ok, v| ok && vm(v, "relay")["replication"] == "protected");
    assert_eq!(vm(&st, "relay")["host"], "hostA");
    assert_eq!(vm(&st, "logger")["host"], "hostA");
    let field = up.field_ns();
    let writer = Writer::start(&field, "10.99.0.50");
    let t_kill = Instant::now();
    let out = vigil(&["fail", "hostA", "--dir", &up.d()]);
    assert!(out.status.success(), "vigil fail: {}", text(&out.stderr));
    // The client carries on (the backup on hostB took over).
    writer.carry_on(3, Duration::from_secs(20));
    let answered = t_kill.elapsed();
    let st = up.wait("the plan for hostA executed", 30, |ok, v| ok && v["failed"] == serde_json::json!(["hostA"]));
    up.wait("relay protected again (by its new backup)", 30, |_, v| vm(v, "relay")["replication"] == "protected");
    let settled = t_kill.elapsed();
    eprintln!("kill -> client answered again: {answered:?}; kill -> every VM serving per the plan: {settled:?}");
    // Where the plan says: relay activated on hostB, its new backup on hostC; logger restarted on hostC.
    assert_eq!(vm(&st, "relay")["host"], "hostB", "{st}");
    assert_eq!(vm(&st, "relay")["backup"], "hostC", "{st}");
    assert_eq!(vm(&st, "logger")["host"], "hostC", "{st}");
    for ch in st["plan"]["chains"].as_array().expect("chains") {
        assert_eq!(ch["status"], "ok", "{ch}");
    }
    let events: Vec<String> = st["events"].as_array().unwrap().iter().map(|e| e["what"].as_str().unwrap_or("").to_string()).collect();
    assert!(events.iter().any(|e| e.contains("host hostA failed")), "{events:?}");
    // The injected fault is in the log too, before its detection.
    let at = |needle: &str| {
        st["events"].as_array().unwrap().iter().find(|e| e["what"].as_str().unwrap_or("").contains(needle)).map(|e| e["at_ms"].as_u64())
    };
    let (injected, detected) = (at("host hostA: failure injected").flatten(), at("host hostA failed").flatten());
    assert!(injected.is_some_and(|i| detected.is_some_and(|d| i <= d)), "{events:?}");
    // The restarted logger answers on its address.
    let mut logger = RedisClient::new(&field, "10.99.0.52", 6379);
    assert_eq!(logger.call("PING"), "PONG");

    std::thread::sleep(Duration::from_millis(300));
    let n = writer.finish();
    eprintln!("{n} acknowledged writes, all present");
}

#[test]
fn the_manager_an_agent_and_the_store_restart_without_a_failover() {
    if no_kvm("the_manager_an_agent_and_the_store_restart_without_a_failover") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Every VM's network backend runs as a process of its own; control has a disk, whose
    // backend is a process too.
    let up = Up::start_edited("restart", "t2", "substation.toml", &[], &[], |t| {
        let control = "vm = \"control\"\n";
        assert!(t.contains(control), "examples/substation.toml changed");
        t.replace("[[run]]\n", "[[run]]\nnet_backend = \"process\"\n")
            .replace(control, &format!("{control}disk = \"16MiB\"\nblk_backend = \"process\"\n"))
    });
    let st = up.wait("every VM serving, control protected", 30, |ok, v| ok && vm(v, "control")["replication"] == "protected");
    let g1 = st["leader"]["generation"].as_u64().expect("generation");
    let leader = st["leader"]["id"].as_str().unwrap().to_string();
    let pids_before: Vec<String> =
        ["relay", "control", "logger"].iter().map(|n| vm(&st, n)["detail"].as_str().unwrap().to_string()).collect();
    let field = up.field_ns();
    let mut c = RedisClient::new(&field, "10.99.0.51", 6379);
    assert_eq!(c.call("SET before restarts"), "OK");

    // 1. The leading manager dies: another lead begins, with a higher generation (the standby's,
    // or the killed one's if its keeper restarted it and it won the election first).
    kill(up.file()["pids"][format!("manager:{leader}")].as_u64().expect("manager pid"));
    let st = up.wait("a new leader", 10, |_, v| new_lead(v, g1));
    assert!(st["leader"]["generation"].as_u64().unwrap() > g1);

    let d = up.d();
    // 2. hostB's agent dies (`vigil fail --component agent`), then hangs (--hang), with its
    // VMMs running: each time it is started again and re-adopts them.
    let agent_pid = |v: &serde_json::Value| {
        v["hosts"].as_array().unwrap().iter().find(|h| h["host"] == "hostB").and_then(|h| h["agent_pid"].as_u64()).unwrap()
    };
    for hang in [false, true] {
        let agent = agent_pid(&up.status().1);
        let mut args = vec!["fail", "--component", "agent", "--host", "hostB", "--dir", &d];
        if hang {
            args.push("--hang");
        }
        let out = vigil(&args);
        assert!(out.status.success(), "vigil fail --component agent: {}", text(&out.stderr));
        up.wait("hostB's agent back", 10, |_, v| {
            v["hosts"].as_array().unwrap().iter().any(|h| h["host"] == "hostB" && h["agent_pid"].as_u64().is_some_and(|p| p != agent))
        });
    }

    // 2b. control's network backend (on hostB) crashes, then hangs, and so does its disk's:
    // its VMM starts each again; the client's connection and the VM's protection carry on.
    assert_eq!(vm(&up.status().1, "control")["host"], "hostB");
    for component in ["net", "blk"] {
        for hang in [false, true] {
            let mut args = vec!["fail", "--component", component, "--host", "hostB", "--vm", "control", "--dir", &d];
            if hang {
                args.push("--hang");
            }
            let out = vigil(&args);
            assert!(out.status.success(), "vigil fail --component {component}: {}", text(&out.stderr));
            assert_eq!(c.call(&format!("SET {component}-backend-{hang} survived")), "OK");
        }
    }
    // hostA's VMs have no disk.
    let out = vigil(&["fail", "--component", "blk", "--host", "hostA", "--dir", &d]);
    assert!(!out.status.success() && text(&out.stderr).contains("runs no blk backend process"), "{}", text(&out.stderr));

    // 3. The store's server dies (its supervisor starts it again).
    let out = vigil(&["fail", "--component", "store", "--host", "hostB", "--dir", &d]);
    assert!(out.status.success(), "vigil fail --component store: {}", text(&out.stderr));
    std::thread::sleep(Duration::from_millis(1500));
    let st = up.wait("the cluster as before", 10, |ok, _| ok);
    assert_eq!(st["failed"], serde_json::json!([]), "no host was failed for these restarts: {st}");
    let pids_after: Vec<String> =
        ["relay", "control", "logger"].iter().map(|n| vm(&st, n)["detail"].as_str().unwrap().to_string()).collect();
    assert_eq!(pids_before, pids_after, "the VMMs kept running");
    assert_eq!(c.call("GET before"), "restarts", "the VM kept its state and its connection");
    assert_eq!(c.call("GET net-backend-true"), "survived");
    assert_eq!(c.call("GET blk-backend-true"), "survived");
    up.wait("control protected after its backend's failures", 10, |ok, v| ok && vm(v, "control")["replication"] == "protected");

    // 4. The keeper dies, then the field: the keeper's standby keeps now and starts it (and
    // the manager killed in step 1) again. (No arbiter runs: replicated VMs hold their leases
    // in the store, whose restart in step 3 changed nothing.)
    let f = up.file();
    let keeper = f["pids"]["keeper"].as_u64().expect("the keeper recorded itself");
    assert!(f["pids"]["keeper-standby"].as_u64().is_some(), "a standby keeper: {f}");
    kill(keeper);
    let t = std::time::Instant::now();
    while up.file()["pids"]["keeper"].as_u64() == Some(keeper) || up.file()["pids"]["keeper-standby"].as_u64().is_none() {
        assert!(t.elapsed() < Duration::from_secs(5), "the standby keeper did not take over: {}", up.file());
        std::thread::sleep(Duration::from_millis(20));
    }
    let f = up.file();
    assert!(f["pids"]["arbiter"].is_null(), "an arbiter runs: {f}");
    let field_pid = f["pids"]["field"].as_u64().unwrap();
    kill(field_pid);
    let t = std::time::Instant::now();
    loop {
        let f = up.file();
        let restarted = |name: &str| f["kept"][name]["restarts"].as_u64().unwrap_or(0) >= 1;
        if restarted("field") && restarted(&format!("manager:{leader}")) {
            assert_ne!(f["pids"]["field"].as_u64(), Some(field_pid));
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the keeper did not start them again: {f}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // (The keeper logs the restarts just after it records them in the cluster file.)
    up.wait("control protected, the restarts logged", 15, |ok, v| {
        let events = v["events"].to_string();
        ok && vm(v, "control")["replication"] == "protected"
            && events.contains("field had died; the keeper started it again")
            && events.contains("its standby (pid")
    });
    assert_eq!(c.call("GET before"), "restarts");

    // A host the cluster does not have.
    let out = vigil(&["fail", "hostZ", "--dir", &up.d()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown host \"hostZ\" (hosts: hostA, hostB, hostC)"), "{}", text(&out.stderr));

    // 5. The new leader handles a host failure.
    assert!(vigil(&["fail", "hostB", "--dir", &up.d()]).status.success());
    let st = up.wait("the plan for hostB executed", 30, |ok, v| ok && v["failed"] == serde_json::json!(["hostB"]));
    assert_eq!(vm(&st, "control")["host"], "hostC", "{st}");
    assert_eq!(c.call("GET before"), "restarts", "control's state survived its host");
    assert_eq!(c.call("SET after takeover"), "OK");

    // control's disk on hostC (its backup's copy, kept in step by the checkpoints, written by
    // the VM since the takeover) holds kv's log of every write: a new VM replays it.
    drop(c);
    let disk = up.dir.join("hosts/hostC/control.disk");
    drop(up);
    replay_disk(
        &disk,
        &[("before", "restarts"), ("net-backend-true", "survived"), ("blk-backend-false", "survived"), ("after", "takeover")],
    );
}

/// A stall of the store's disk — every sync 300 ms longer for 3 s, as when other processes
/// write much to the same disk (a bulk writer on this machine's disk makes `fdatasync` take
/// 130–500 ms; in a CI run the store once stalled 300 ms) — fences nobody and fails no host:
/// the agents renew the hosts' leases without waiting for the disk (heartbeats are volatile
/// nodes of the store, renewed by a thread of their own), the manager reads them without
/// waiting either, and the respawners' heartbeats do not depend on the store. Before, each
/// agent's loop renewed between store calls that each waited for a sync: agents fenced
/// themselves and their VMs were started again. A host failure afterwards is handled as ever.
#[test]
fn a_stall_of_the_stores_disk_fences_nobody() {
    if no_kvm("a_stall_of_the_stores_disk_fences_nobody") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let up = Up::start("slow-disk", "t11");
    let st = up.wait("every VM serving, control protected", 30, |ok, v| ok && vm(v, "control")["replication"] == "protected");
    let pids_before: Vec<String> =
        ["relay", "control", "logger"].iter().map(|n| vm(&st, n)["detail"].as_str().unwrap().to_string()).collect();
    let field = up.field_ns();
    let mut c = RedisClient::new(&field, "10.99.0.51", 6379);
    assert_eq!(c.call("SET k before-the-stall"), "OK");
    let slow = |ms: &str| {
        let out = vigil(&["fail", "--component", "store", "--host", "hostB", "--slow-disk", ms, "--dir", &up.d()]);
        assert!(out.status.success(), "vigil fail --slow-disk: {}", text(&out.stderr));
    };
    slow("300");
    std::thread::sleep(Duration::from_secs(3));
    slow("0");
    let agent_logs = |what: &str| -> Vec<String> {
        std::fs::read_dir(&up.dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("agent-"))
            .flat_map(|e| std::fs::read_to_string(e.path()).unwrap_or_default().lines().map(str::to_string).collect::<Vec<_>>())
            .filter(|l| l.contains(what))
            .collect()
    };
    assert_eq!(agent_logs("self-fencing"), Vec::<String>::new(), "an agent fenced itself");
    assert_eq!(agent_logs("hung"), Vec::<String>::new(), "an agent was taken for hung");
    let st = up.wait("the cluster as before", 15, |ok, v| ok && vm(v, "control")["replication"] == "protected");
    assert_eq!(st["failed"], serde_json::json!([]), "a host was failed for a slow disk: {st}");
    let pids_after: Vec<String> =
        ["relay", "control", "logger"].iter().map(|n| vm(&st, n)["detail"].as_str().unwrap().to_string()).collect();
    assert_eq!(pids_before, pids_after, "the VMMs kept running");
    assert_eq!(c.call("GET k"), "before-the-stall");

    assert!(vigil(&["fail", "hostB", "--dir", &up.d()]).status.success());
    let st = up.wait("the plan for hostB executed", 30, |ok, v| ok && v["failed"] == serde_json::json!(["hostB"]));
    assert_eq!(vm(&st, "control")["host"], "hostC", "{st}");
    assert_eq!(c.call("GET k"), "before-the-stall", "control's state survived its host");

    // Bad input: only the store has a disk to slow, and a delay is bounded.
    let out = vigil(&["fail", "--component", "agent", "--host", "hostA", "--slow-disk", "300", "--dir", &up.d()]);
    assert!(!out.status.success() && text(&out.stderr).contains("--slow-disk goes with --component store"), "{}", text(&out.stderr));
    let out = vigil(&["fail", "--component", "store", "--host", "hostA", "--slow-disk", "99999", "--dir", &up.d()]);
    assert!(!out.status.success() && text(&out.stderr).contains("0 to 10000"), "{}", text(&out.stderr));
}

/// Starts kv on a copy of `disk` (a cluster's copy of a VM's disk, the cluster down) and checks
/// that replaying its log gives every `(key, value)`.
fn replay_disk(disk: &Path, want: &[(&str, &str)]) {
    let copy = disk.with_extension("checked");
    std::fs::copy(disk, &copy).unwrap_or_else(|e| panic!("{}: {e}", disk.display()));
    let ns = testbed::tapns::TapNs::new("rdisk").expect("namespace");
    let image = testbed::guest("kv").expect("kv guest");
    let copy_arg = copy.display().to_string();
    let _vm = ns
        .start_vm_with(Path::new(env!("CARGO_BIN_EXE_vigil")), &image, &["--disk", &copy_arg], "replay", disk.parent().unwrap())
        .expect("a VM on the disk");
    let mut r = RedisClient::new(&ns.name, testbed::tapns::GUEST_IP, 6379);
    for (k, v) in want {
        assert_eq!(r.call(&format!("GET {k}")), *v, "{k}, replayed from {}", disk.display());
    }
}

#[test]
fn a_manager_that_dies_halfway_through_a_plan_is_finished_by_the_next_leader() {
    if no_kvm("a_manager_that_dies_halfway_through_a_plan_is_finished_by_the_next_leader") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The manager that leads with generation 1 dies (aborts) right after the first desired
    // record of a plan.
    let up = Up::start_env("halfway", "t4", &[], &[("VIGIL_MANAGER_CRASH", "g1:1")]);
    up.wait("every VM serving, relay protected", 30, |ok, v| ok && vm(v, "relay")["replication"] == "protected");
    let g = up.status().1["leader"]["generation"].as_u64().unwrap();
    let mut c = RedisClient::new(&up.field_ns(), "10.99.0.50", 6379);
    assert_eq!(c.call("SET before halfway"), "OK");
    assert!(vigil(&["fail", "hostA", "--dir", &up.d()]).status.success());
    let st = up.wait("the plan for hostA finished by another manager", 30, |ok, v| {
        ok && v["failed"] == serde_json::json!(["hostA"]) && v["leader"]["generation"].as_u64().is_some_and(|n| n > g)
    });
    let events: Vec<String> = st["events"].as_array().unwrap().iter().map(|e| e["what"].as_str().unwrap_or("").to_string()).collect();
    assert!(events.iter().any(|e| e.starts_with("finishing plan hostA (1/")), "{events:?}");
    assert_eq!(vm(&st, "relay")["host"], "hostB", "{st}");
    assert_eq!(vm(&st, "logger")["host"], "hostC", "{st}");
    assert_eq!(c.call("GET before"), "halfway");
}

#[test]
fn a_plan_that_migrates_a_running_vm_carries_its_state_and_its_connections() {
    if no_kvm("a_plan_that_migrates_a_running_vm_carries_its_state_and_its_connections") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // examples/crowded.toml: when hostA fails, the plan migrates the cache (normal mode, on
    // the live hostB) to hostC to make room for the relay's activation on hostB. The cache
    // has a disk: the migration carries it.
    let up = Up::start_edited("migrate", "t5", "crowded.toml", &[], &[], |t| with_disk(quiet_cache(t), "cache"));
    up.wait("every VM serving, relay protected", 30, |ok, v| ok && vm(v, "relay")["replication"] == "protected");
    let writer = Writer::start(&up.field_ns(), "10.99.0.51");
    assert!(vigil(&["fail", "hostA", "--dir", &up.d()]).status.success());
    let st = up.wait("the cache migrated to hostC", 30, |ok, v| {
        // (The manager logs the migration's end just after it rewrites the VM's record.)
        ok && vm(v, "cache")["host"] == "hostC"
            && v["failed"] == serde_json::json!(["hostA"])
            && v["events"].to_string().contains("cache: migrated from hostB to hostC by pre-copy")
    });
    assert_eq!(vm(&st, "relay")["host"], "hostB", "{st}");
    assert!(st["deviations"].as_array().is_some_and(Vec::is_empty), "{st}");
    let events: Vec<String> = st["events"].as_array().unwrap().iter().map(|e| e["what"].as_str().unwrap_or("").to_string()).collect();
    // Pre-copy: protected to hostC while it ran on hostB, then handed over.
    assert!(events.iter().any(|e| e.contains("cache: pre-copy migration to hostC started")), "{events:?}");
    assert!(events.iter().any(|e| e.contains("cache: migrated from hostB to hostC by pre-copy")), "{events:?}");
    assert!(!events.iter().any(|e| e.contains("paused and snapshotted")), "no stop-and-copy: {events:?}");
    writer.carry_on(5, Duration::from_secs(20));
    let n = writer.finish();
    // Every acknowledged write is on the cache's disk on hostC.
    let disk = up.dir.join("hosts/hostC/cache.disk");
    drop(up);
    let (last, ctr) = (format!("k{}", n - 1), n.to_string());
    replay_disk(&disk, &[("k0", "v0"), (&last, &format!("v{}", n - 1)), ("ctr", &ctr)]);
}

/// Found by `vigil bench migration` (stop-and-copy): a VM that came by a snapshot and was
/// then started again on its new host after its agent stopped it to fence itself (the store
/// stalled) was restored from that snapshot once more — an older state under the same address.
/// It must start afresh instead, as any unreplicated VM restarted does.
#[test]
fn a_vm_moved_by_its_snapshot_never_comes_back_to_that_snapshot() {
    if no_kvm("a_vm_moved_by_its_snapshot_never_comes_back_to_that_snapshot") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The cache has a disk: the snapshot carries it.
    let up = Up::start_edited("snapshot-once", "t9", "crowded.toml", &[], &[("VIGIL_MIGRATION", "stop-and-copy")], |t| {
        with_disk(quiet_cache(t), "cache")
    });
    up.wait("every VM serving, relay protected", 30, |ok, v| ok && vm(v, "relay")["replication"] == "protected");
    let field = up.field_ns();
    assert_eq!(RedisClient::new(&field, "10.99.0.51", 6379).call("SET k before-the-move"), "OK");
    assert!(vigil(&["fail", "hostA", "--dir", &up.d()]).status.success());
    // (The source's agent logs its snapshot just after the destination may start from it.)
    let st = up.wait("the cache moved to hostC", 30, |ok, v| {
        ok && vm(v, "cache")["host"] == "hostC" && v["events"].to_string().contains("paused and snapshotted")
    });
    let mut c = RedisClient::new(&field, "10.99.0.51", 6379);
    assert_eq!(c.call("GET k"), "before-the-move", "the snapshot carried the state");
    assert_eq!(c.call("SET k after-the-move"), "OK");
    // The store hangs (its supervisor replaces it): no agent can renew its lease, so each
    // stops its VMs (self-fencing) and starts them again from their specs once the store
    // answers.
    let detail = vm(&st, "cache")["detail"].as_str().unwrap_or_default().to_string();
    let pid: u64 = detail.split_whitespace().skip_while(|w| *w != "pid").nth(1).and_then(|p| p.parse().ok()).expect("the cache's pid");
    let out = vigil(&["fail", "--component", "store", "--host", "hostC", "--hang", "--dir", &up.d()]);
    assert!(out.status.success(), "vigil fail --component store --hang: {}", text(&out.stderr));
    up.wait("the cache started again", 30, |_, v| {
        vm(v, "cache")["detail"].as_str().is_some_and(|d| !d.contains(&format!("pid {pid} ")) && d.contains("running"))
    });
    let t = Instant::now();
    let got = loop {
        let out = Command::new("ip")
            .args(["netns", "exec", &field, "timeout", "2", "redis-cli", "-h", "10.99.0.51", "GET", "k"])
            .output()
            .expect("redis-cli");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !text.contains("Could not connect") {
            break text;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the restarted cache does not answer: {text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_ne!(got, "before-the-move", "the cache came back to its old snapshot");
    assert_eq!(got, "after-the-move", "the cache started afresh replays its disk, which came with the snapshot");
    let events = up.status().1["events"].to_string();
    assert!(events.contains("starting afresh"), "{events}");
}

/// An agent that dies right after it started a copy, before recording it (found in the mode 4
/// test, where the respawner had replaced a hung agent at that moment): the new agent must not
/// leave that process running beside the copy it starts (the orphan held the port, the new
/// copy crash-looped on "Address already in use").
#[test]
fn an_agent_that_dies_before_recording_a_copy_leaves_no_orphan() {
    if no_kvm("an_agent_that_dies_before_recording_a_copy_leaves_no_orphan") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let up = Up::start_env("orphan", "ta", &[], &[("VIGIL_AGENT_CRASH_AFTER_SPAWN", "hostB:relay")]);
    let st = up.wait("every VM serving, relay protected", 60, |ok, v| ok && vm(v, "relay")["replication"] == "protected");
    // One backup of the relay runs on hostB, and it never had to fight for its port.
    let host_b = up.file()["host_ns"]["hostB"].as_str().unwrap().to_string();
    let backups = processes(&ns_pids(&host_b), "relay.backup.json");
    assert_eq!(backups.len(), 1, "copies of relay's backup on hostB: {backups:?}");
    let log = std::fs::read_to_string(up.dir.join("hosts/hostB/relay.backup.log")).unwrap_or_default();
    assert!(!log.contains("Address already in use"), "{log}");
    let events = st["events"].to_string();
    assert!(events.contains("never recorded"), "the orphan was not found: {events}");
}

#[test]
fn a_migration_whose_source_dies_midway_ends_at_the_destination_with_every_write() {
    if no_kvm("a_migration_whose_source_dies_midway_ends_at_the_destination_with_every_write") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The source's agent waits 4 s with the cache protected to hostC before the handover:
    // the window in which the source is killed.
    let up = Up::start_edited("migrate-dies", "t6", "crowded.toml", &[], &[("VIGIL_HANDOVER_DELAY_MS", "4000")], quiet_cache);
    up.wait("every VM serving, relay protected", 30, |ok, v| ok && vm(v, "relay")["replication"] == "protected");
    let writer = Writer::start(&up.field_ns(), "10.99.0.51");
    assert!(vigil(&["fail", "hostA", "--dir", &up.d()]).status.success());
    let events = |v: &serde_json::Value| -> Vec<String> {
        v["events"].as_array().unwrap().iter().map(|e| e["what"].as_str().unwrap_or("").to_string()).collect()
    };
    up.wait("the cache protected to hostC", 30, |_, v| {
        vm(v, "cache")["host"] == "hostB"
            && vm(v, "cache")["replication"] == "protected"
            && events(v).iter().any(|e| e.contains("cache: pre-copy migration to hostC started"))
    });
    writer.carry_on(5, Duration::from_secs(20));
    // 1. The source's agent dies (its VMMs run on): a new one takes the migration over.
    let agent = up.status().1["hosts"].as_array().unwrap().iter().find(|h| h["host"] == "hostB").unwrap()["agent_pid"].as_u64().unwrap();
    kill(agent);
    up.wait("hostB's agent back", 10, |_, v| {
        v["hosts"].as_array().unwrap().iter().any(|h| h["host"] == "hostB" && h["agent_pid"].as_u64().is_some_and(|p| p != agent))
    });
    writer.carry_on(5, Duration::from_secs(20));
    // 2. The source's host dies before the handover: the destination holds a committed
    // replica and takes the VM over by itself (the arbiter's lease); the manager finishes the
    // migration from the desired record.
    assert!(vigil(&["fail", "hostB", "--dir", &up.d()]).status.success());
    let st = up.wait("the cache running on hostC", 30, |_, v| vm(v, "cache")["host"] == "hostC" && vm(v, "cache")["serving"] == true);
    let ev = events(&st);
    assert!(!ev.iter().any(|e| e.contains("cache: handed over") || e.contains("handing over")), "the handover never happened: {ev:?}");
    // Every acknowledged write is there, on the same connection: one copy served throughout.
    writer.carry_on(5, Duration::from_secs(20));
    writer.finish();
}

/// A replicated VM whose backup's host fails keeps running where it is, and the plan's new
/// backup (elsewhere) protects it again: the running primary is told its new backup (found
/// missing: the relay's primary kept calling the dead hostB's address, unprotected for good).
#[test]
fn a_primary_whose_backup_host_fails_is_protected_again_by_the_plans_new_backup() {
    if no_kvm("a_primary_whose_backup_host_fails_is_protected_again_by_the_plans_new_backup") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let up = Up::start("backup-lost", "tc");
    up.wait("relay protected", 30, |ok, v| ok && vm(v, "relay")["replication"] == "protected" && vm(v, "relay")["backup"] == "hostB");
    let writer = Writer::start(&up.field_ns(), "10.99.0.50");
    // examples/substation.toml: hostB's failure leaves the relay on hostA with a new backup on
    // hostC (`vigil plan`).
    assert!(vigil(&["fail", "hostB", "--dir", &up.d()]).status.success());
    let st = up.wait("the relay protected by its new backup on hostC", 30, |_, v| {
        v["failed"] == serde_json::json!(["hostB"]) && vm(v, "relay")["backup"] == "hostC" && vm(v, "relay")["replication"] == "protected"
    });
    assert_eq!(vm(&st, "relay")["host"], "hostA", "{st}");
    writer.carry_on(5, Duration::from_secs(20));
    writer.finish();
}

/// examples/crowded.toml with the cache replicated to hostA (and its job marks off): hostA's
/// failure makes the plan move it off the live hostB to hostC (its backup lost, a new one on
/// hostB); hostB's failure activates it on hostC, not on hostA where its replica is
/// (`vigil plan` of it; `manager::runtime`'s tests).
fn replicated_cache(text: String) -> String {
    let cache = "memory = \"64MiB\"\n[[vm]]\nname = \"logger\"";
    assert!(text.contains(cache), "examples/crowded.toml's cache changed");
    let replicated = "memory = \"64MiB\"\nmode = \"remote\"\nbackup = \"hostA\"\ncheckpoint_size = \"1MiB\"\n\
         checkpoint_interval = \"50ms\"\ncheckpoint_priority = 21\n[[vm]]\nname = \"logger\"";
    quiet_cache(text.replacen(cache, replicated, 1))
}

/// Runs crowded.toml with its cache replicated, fails `host`, and checks that the cache ends
/// on hostC protected by a backup on `then`, having migrated there by pre-copy, with every
/// acknowledged write of a client on one TCP connection (and `expect` among the events).
fn replicated_vm_moved_by_its_plan(name: &str, tag: &str, host: &str, then: &str, expect: &str) {
    let up = Up::start_edited(name, tag, "crowded.toml", &[], &[], replicated_cache);
    up.wait("every VM serving, both protected", 30, |ok, v| {
        ok && vm(v, "relay")["replication"] == "protected" && vm(v, "cache")["replication"] == "protected"
    });
    let writer = Writer::start(&up.field_ns(), "10.99.0.51");
    assert!(vigil(&["fail", host, "--dir", &up.d()]).status.success());
    let st = up.wait("the cache on hostC, protected again", 60, |ok, v| {
        ok && vm(v, "cache")["host"] == "hostC" && vm(v, "cache")["backup"] == then && vm(v, "cache")["replication"] == "protected"
    });
    assert!(st["deviations"].as_array().is_some_and(Vec::is_empty), "{st}");
    let events: Vec<String> = st["events"].as_array().unwrap().iter().map(|e| e["what"].as_str().unwrap_or("").to_string()).collect();
    assert!(events.iter().any(|e| e.contains(expect)), "{expect:?} in {events:?}");
    assert!(events.iter().any(|e| e.contains("cache: pre-copy migration to hostC started")), "{events:?}");
    assert!(events.iter().any(|e| e.contains("by pre-copy (handed over")), "{events:?}");
    writer.carry_on(5, Duration::from_secs(20));
    writer.finish();
}

#[test]
fn a_replicated_vm_the_plan_moves_off_a_live_host_migrates_with_every_write() {
    if no_kvm("a_replicated_vm_the_plan_moves_off_a_live_host_migrates_with_every_write") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    replicated_vm_moved_by_its_plan("migrate-r", "ta", "hostA", "hostB", "migration to hostC started (synchronising (backup replaced))");
}

#[test]
fn a_replicated_vm_activated_away_from_its_replica_takes_over_there_and_migrates_on() {
    if no_kvm("a_replicated_vm_activated_away_from_its_replica_takes_over_there_and_migrates_on") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    replicated_vm_moved_by_its_plan("activate-away", "tb", "hostB", "hostA", "cache: the backup runs the VM now");
}

/// examples/crowded.toml with the cache's job marks off (kv `trace=0`): the tests' client
/// writes to it as fast as it answers, far above the model's 5 ms period, and the monitoring
/// would (rightly) substitute that into the model and re-plan — these tests are about the
/// migration the declared model's plan makes.
/// The model with a 16 MiB disk for `vm` (its `[[run]]`), its backend a process.
fn with_disk(text: String, vm: &str) -> String {
    let run = format!("vm = \"{vm}\"\n");
    assert!(text.contains(&run), "no [[run]] for {vm}");
    text.replace(&run, &format!("{run}disk = \"16MiB\"\nblk_backend = \"process\"\n"))
}

fn quiet_cache(text: String) -> String {
    let cache = "vm = \"cache\"\n";
    assert!(text.contains(cache), "examples/crowded.toml's cache changed");
    text.replace(cache, &format!("{cache}args = [\"trace=0\"]\n"))
}

/// The processes of a host's namespace whose command line contains `needle`.
fn processes(ns_pids: &[u32], needle: &str) -> Vec<u32> {
    ns_pids
        .iter()
        .copied()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(needle))
        })
        .collect()
}

fn ns_pids(ns: &str) -> Vec<u32> {
    let out = Command::new("ip").args(["netns", "pids", ns]).output().expect("ip netns pids");
    text(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

#[test]
fn distributed_on_etcd_a_partitioned_host_stops_before_its_vms_run_elsewhere() {
    if no_kvm("distributed_on_etcd_a_partitioned_host_stops_before_its_vms_run_elsewhere") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // etcd commits (fsync on every member) on a loaded 2-core machine: a longer lease than the
    // embedded store needs, so that a slow commit is not taken for a failed host.
    let up = Up::start_with("etcd", "t3", &["--etcd", "--lease-ms", "1000", "--period-ms", "100"]);
    let file = up.file();
    assert_eq!(file["etcd"].as_array().map(Vec::len), Some(3), "three etcd members: {file}");
    assert_eq!(file["host_store"].as_object().map(|m| m.len()), Some(3), "a store front end per host: {file}");
    up.wait("every VM serving, relay protected", 60, |ok, v| ok && vm(v, "relay")["replication"] == "protected");
    let writer = Writer::start(&up.field_ns(), "10.99.0.50");
    let host_a = file["host_ns"]["hostA"].as_str().unwrap().to_string();
    assert!(!processes(&ns_pids(&host_a), "vm run").is_empty(), "hostA runs VMMs");

    // hostA is cut off: its agent cannot renew its lease in the store (its front end cannot
    // reach etcd), the relay's primary cannot renew at the arbiter.
    assert!(vigil(&["fail", "hostA", "--partition", "--dir", &up.d()]).status.success());
    let st = up.wait("the plan for hostA executed", 30, |_, v| v["failed"] == serde_json::json!(["hostA"]));
    // By the time the manager acted, hostA's own agent had stopped its VMs (self-fencing).
    let left = processes(&ns_pids(&host_a), "--spec");
    assert!(left.is_empty(), "hostA's VMMs still run when the plan executes: {left:?}\n{st}");
    writer.carry_on(3, Duration::from_secs(20));
    let st = up.wait("every VM serving where the plan says", 30, |ok, v| ok && v["failed"] == serde_json::json!(["hostA"]));
    assert_eq!(vm(&st, "relay")["host"], "hostB", "{st}");
    assert_eq!(vm(&st, "logger")["host"], "hostC", "{st}");

    // hostA's agent replaced meanwhile (its respawner takes a loop blocked on the cut-off
    // store for hung, as on a loaded machine): the new agent, started after the fence, must
    // heed it all the same — the fence ends the host's life in this boot, not one agent's.
    // (It took the fence for one of an earlier failure and held the host on.)
    let agents = processes(&ns_pids(&host_a), " agent ")
        .into_iter()
        .filter(|&p| !std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains("--respawn")));
    for p in agents.collect::<Vec<_>>() {
        let _ = Command::new("kill").args(["-KILL", &p.to_string()]).status();
    }
    std::thread::sleep(Duration::from_millis(300));
    // The link comes back: hostA's agent finds its host fenced and ends; nothing of hostA
    // answers for the relay (its address is served by hostB only).
    assert!(vigil(&["fail", "hostA", "--heal", "--dir", &up.d()]).status.success());
    let t = Instant::now();
    while !processes(&ns_pids(&host_a), " agent ").is_empty() {
        assert!(t.elapsed() < Duration::from_secs(15), "hostA's agent still runs after the link came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(processes(&ns_pids(&host_a), "--spec").is_empty());
    std::thread::sleep(Duration::from_millis(300));
    writer.finish();
}

/// Found by the etcd test under load: a host whose agent fenced itself (it could not renew the
/// host's lease for half of it) but was never declared failed started its replicated VM again
/// afresh once the store answered — beside the VM its backup had taken over, or voiding the
/// backup's replica with a new session: acknowledged writes were lost. A replicated primary
/// stopped by self-fencing is its backup's to take over.
#[test]
fn on_etcd_a_host_that_fenced_itself_leaves_its_replicated_vm_to_its_backup() {
    if no_kvm("on_etcd_a_host_that_fenced_itself_leaves_its_replicated_vm_to_its_backup") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A 3-s lease: etcd's commits on this 2-core machine must not fence hosts by themselves.
    let up = Up::start_with("selffence", "t10", &["--etcd", "--lease-ms", "3000", "--period-ms", "100"]);
    up.wait("every VM serving, relay protected", 60, |ok, v| ok && vm(v, "relay")["replication"] == "protected");
    let writer = Writer::start(&up.field_ns(), "10.99.0.50");
    // hostA is cut off for 2.2 s: longer than half its lease (its agent stops its VMs), shorter
    // than the lease (the manager does not declare it failed). The relay's backup on hostB
    // takes the VM over meanwhile.
    assert!(vigil(&["fail", "hostA", "--partition", "--dir", &up.d()]).status.success());
    std::thread::sleep(Duration::from_millis(2200));
    assert!(vigil(&["fail", "hostA", "--heal", "--dir", &up.d()]).status.success());
    // Taken over by the backup (or, if the manager declared hostA failed after all, by the
    // plan for hostA). (The manager logs the adoption just after it rewrites the VM's record.)
    let st = up.wait("the relay on hostB, its takeover logged", 30, |ok, v| {
        ok && vm(v, "relay")["host"] == "hostB"
            && (v["events"].to_string().contains("relay: its backup on hostB took over while hostA lives")
                || v["failed"] == serde_json::json!(["hostA"]))
    });
    // One copy of the relay runs: on hostB (hostA's agent did not start one again).
    std::thread::sleep(Duration::from_millis(1500));
    let host_a = up.file()["host_ns"]["hostA"].as_str().unwrap().to_string();
    let relay_on_a = processes(&ns_pids(&host_a), "relay.primary.json");
    assert!(relay_on_a.is_empty(), "hostA runs the relay again: {relay_on_a:?}\n{}", st["events"]);
    writer.carry_on(30, Duration::from_secs(20));
    writer.finish();
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = workdir("bad");
    let nothing = dir.join("none");
    let out = vigil(&["fail", "hostA", "--dir", &nothing.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("is a cluster up?"), "{}", text(&out.stderr));
    let out = vigil(&["status", "--dir", &nothing.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));

    // A model without [[run]] items; a model whose image is missing.
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let out = vigil(&["up", &ex.join("cluster.toml").display().to_string(), "--dir", &dir.join("c1").display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    let e = text(&out.stderr);
    assert!(e.contains("no [[run]] items") || e.contains("needs root") || e.contains("needs /dev/kvm"), "{e}");
    let m = std::fs::read_to_string(ex.join("substation.toml")).unwrap().replace("image = \"kv\"", "image = \"/nonexistent/guest\"");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, m).unwrap();
    let out = vigil(&["up", &bad.display().to_string(), "--dir", &dir.join("c2").display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    let e = text(&out.stderr);
    assert!(
        e.contains("bad.toml:") && e.contains("run \"relay\"") && e.contains("not found")
            || e.contains("needs root")
            || e.contains("needs /dev/kvm"),
        "{e}"
    );

    // An agent started twice for one host (same state directory): the second is refused.
    let state = dir.join("state");
    let store = dir.join("no-store.sock");
    let args = ["agent", "--host", "hostA", "--store", store.to_str().unwrap(), "--state", state.to_str().unwrap()];
    let mut first = Command::new(env!("CARGO_BIN_EXE_vigil")).args(args).spawn().expect("first agent");
    std::thread::sleep(Duration::from_millis(500));
    let out = vigil(&args);
    let _ = first.kill();
    let _ = first.wait();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("host hostA already has an agent"), "{}", text(&out.stderr));
}

/// `curl -s URL` (a client no one here wrote): status code and body.
fn curl(url: &str, extra: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "10", "-w", "\n%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl (package curl)");
    let t = text(&out.stdout);
    let (body, code) = t.rsplit_once('\n').unwrap_or(("", ""));
    (code.to_string(), body.to_string())
}

#[test]
fn the_dashboard_shows_the_cluster_in_a_real_browser_and_follows_a_host_failure() {
    if no_kvm("the_dashboard_shows_the_cluster_in_a_real_browser_and_follows_a_host_failure") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The browser first: its start loads the machine, which must not stall the cluster's VMs
    // (a stall of ~100 ms makes a backup take over).
    let browser = testbed::browser::Browser::start().expect("headless chromium (packages chromium, chromium-driver)");
    browser.goto("about:blank").expect("a blank page");
    let up = Up::start("dashboard", "t6");
    let st = up.wait("every VM serving, relay protected with figures, chains measured", 30, |ok, v| {
        ok && vm(v, "relay")["replication"] == "protected"
            && vm(v, "relay")["figures"]["checkpoints"].as_u64() > Some(0)
            && v["measured"].as_object().is_some_and(|m| m.len() == 2)
    });
    // The dashboard's snapshot follows the store within its refresh period.
    std::thread::sleep(Duration::from_millis(1200));
    // Every manager serves a dashboard (a standby too) and says where in the store.
    let urls = st["dashboards"].as_object().expect("dashboards");
    assert_eq!(urls.len(), 2, "{st}");
    let url = urls["m0"].as_str().expect("m0's URL").to_string();

    // Prometheus metrics for every host, VM and chain, read with curl.
    let (code, metrics) = curl(&format!("{url}metrics"), &[]);
    assert_eq!(code, "200", "{metrics}");
    for host in ["hostA", "hostB", "hostC"] {
        assert!(metrics.contains(&format!("vigil_host_up{{host=\"{host}\"}} 1")), "{metrics}");
    }
    for needle in [
        "vigil_cluster_ok 1",
        "vigil_vm_serving{vm=\"logger\",host=\"hostA\",mode=\"normal\"} 1",
        "vigil_vm_protected{vm=\"relay\",host=\"hostA\",mode=\"remote\"} 1",
        "vigil_vm_checkpoints_per_second{vm=\"relay\"",
        "vigil_chain_latency_seconds{chain=\"protection\",vm=\"relay\",quantile=\"0.99\"}",
        "vigil_chain_bound_seconds{chain=\"regulation\",vm=\"control\"}",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from:\n{metrics}");
    }
    // Bad requests get errors, not the page.
    assert_eq!(curl(&format!("{url}nothing"), &[]).0, "404");
    assert_eq!(curl(&format!("{url}api/state"), &["-X", "POST", "-d", "x"]).0, "405");
    assert_eq!(curl(&format!("{url}plot/no-such-task.svg"), &[]).0, "404");
    let mut raw = std::net::TcpStream::connect(url.trim_start_matches("http://").trim_end_matches('/')).expect("connect");
    use std::io::{Read, Write};
    raw.write_all(b"\x16\x03\x01garbage\r\n\r\n").expect("write");
    let mut answer = String::new();
    let _ = raw.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.0 400"), "{answer}");

    // The page in headless Chromium.
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    browser.goto(&url).expect("open the dashboard");
    let count =
        |b: &testbed::browser::Browser, css: &str| b.script(&format!("return document.querySelectorAll({css:?}).length")).ok()?.as_u64();
    browser
        .wait_for("the example cluster on the page", Duration::from_secs(20), |b| {
            let ok = b.text("#verdict").ok()? == "ok";
            let hosts = count(b, "#hosts tr[data-state=up]")? == 3;
            let vms = count(b, "#vms tbody tr")? == 3;
            let plans = count(b, "#plans tbody tr")? == 4;
            let chains = b.text("#chains tr[data-chain=protection]").ok()?.contains("relay");
            let protected = b.text("#vms tr[data-vm=relay]").ok()?.contains("protected");
            // The plot of the selected task is drawn (an SVG the browser decoded).
            let plot =
                b.script("const i = document.querySelector('#plot img'); return !!i && i.complete && i.naturalWidth > 0").ok()? == true;
            (ok && hosts && vms && plans && chains && protected && plot).then_some(())
        })
        .unwrap();
    assert_eq!(browser.text("#scenario").unwrap(), "none");
    browser.screenshot(&artifacts.join("dashboard-before.png")).expect("screenshot");

    // A host fails: the page follows (host failed, plan hostA in force, VMs moved).
    let out = vigil(&["fail", "hostA", "--dir", &up.d()]);
    assert!(out.status.success(), "vigil fail: {}", text(&out.stderr));
    browser
        .wait_for("the page to show hostA failed and its plan in force", Duration::from_secs(30), |b| {
            let failed = count(b, "#hosts tr[data-host=hostA][data-state=failed]")? == 1;
            let scenario = b.text("#scenario").ok()? == "hostA";
            let relay = b.text("#vms tr[data-vm=relay] td.host").ok()? == "hostB";
            let logger = b.text("#vms tr[data-vm=logger] td.host").ok()? == "hostC";
            let event = b.text("#events").ok()?.contains("host hostA failed");
            let in_force = b.text("#plans tr.inforce").ok()?.starts_with("hostA (in force)");
            (failed && scenario && relay && logger && event && in_force).then_some(())
        })
        .unwrap();
    browser.screenshot(&artifacts.join("dashboard-after-hostA-failed.png")).expect("screenshot");
    let (_, metrics) = curl(&format!("{url}metrics"), &[]);
    assert!(metrics.contains("vigil_host_fenced{host=\"hostA\"} 1") && metrics.contains("vigil_failed_hosts 1"), "{metrics}");
    eprintln!("screenshots in {}", artifacts.display());
}

/// The monitoring loop: the relay's guest is started with 2 ms of work per request (`work_us`)
/// while the model declares 800 µs for its task. Its job marks (read by the VMM without an
/// exit per mark) show it; the manager raises an alert naming the VM and by how much, the
/// analysis with the observed execution time shows the protection chain missing its deadline,
/// and the plan table is recomputed from it.
#[test]
fn a_vm_slower_than_its_model_is_detected_and_the_plan_table_follows() {
    if no_kvm("a_vm_slower_than_its_model_is_detected_and_the_plan_table_follows") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let up = Up::start_edited("drift", "t7", "substation.toml", &[], &[], |t| {
        t.replacen("port = 6379\npolicy = \"adaptive\"", "port = 6379\npolicy = \"adaptive\"\nargs = [\"work_us=2000\"]", 1)
    });
    let events = |v: &serde_json::Value| -> Vec<String> {
        v["events"].as_array().map(|e| e.iter().filter_map(|x| x["what"].as_str().map(String::from)).collect()).unwrap_or_default()
    };
    let before = up.wait("the plan table", 30, |_, v| v["plans"].as_array().is_some_and(|p| !p.is_empty()))["plans"].clone();
    // (The status reads the plan table before the events: the event of a table saved in
    // between comes with the old table, once; seen in a run. So the new table is waited for.)
    let st = up.wait("the alert and the recomputed table", 30, |_, v| {
        let e = events(v);
        e.iter().any(|x| x.contains("ALERT: VM relay"))
            && e.iter().any(|x| x.contains("with the observed execution times of relay"))
            && vm(v, "relay")["jobs"]["recent_jobs"].as_u64() > Some(0)
            && v["plans"] != before
    });
    let e = events(&st);
    // (Not an arrival burst's alert, which jitter under load can add first.)
    let alert = e.iter().find(|x| x.starts_with("ALERT: VM relay: measured execution time")).unwrap_or_else(|| panic!("{e:?}"));
    assert!(alert.contains("exceeds the WCET 800 µs of task protect by"), "{alert}");
    // The measured execution time is at least the guest's 2 ms of work (more when the VM is
    // paused for checkpoints or the host preempts it in the middle of a job).
    let jobs = &vm(&st, "relay")["jobs"];
    let median = jobs["recent_p50_us"].as_f64().expect("job figures");
    assert!((1900.0..100_000.0).contains(&median), "{jobs}");
    assert_eq!(vm(&st, "relay")["wcet_us"].as_f64(), Some(800.0));
    // The other VMs' jobs take what their model says: no execution-time alert for them (their
    // arrivals may be alerted: the field's requests jitter on a loaded host, while the model
    // says strictly periodic).
    // (On a host busy with other work the vCPUs are preempted mid-job often enough to move
    // even the median: then this is not checked.)
    let load: f64 = std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next()?.parse().ok()).unwrap_or(0.0);
    if load < 3.0 {
        assert!(!e.iter().any(|x| x.contains("ALERT: VM control: measured") || x.contains("ALERT: VM logger: measured")), "{e:?}");
    } else {
        eprintln!("load average {load}: the other VMs' execution times are not checked");
    }
    // The new analysis: where the VMs run now, the protection chain misses its deadline.
    assert!(
        e.iter().any(|x| x.starts_with("with the observed execution times and arrivals, where the VMs run now: chain protection: bound")
            && x.contains("MISSES its deadline 15.00 ms")),
        "{e:?}"
    );
    // And the plan table is not the one computed from the declared model any more.
    assert_ne!(st["plans"], before, "the plan table changed: {e:?}");
    // The CLI: `vigil trace relay` (as JSON) and `vigil analyze --observed`.
    let out = vigil(&["trace", "relay", "--dir", &up.d()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).expect("trace JSON");
    assert_eq!(t["wcet_us"].as_f64(), Some(800.0), "{t}");
    assert!(t["jobs"]["recent_p50_us"].as_f64() > Some(800.0), "{t}");
    let arrivals = t["arrivals"].as_array().expect("arrival curve");
    assert_eq!(arrivals.len(), 10, "{t}");
    assert!(arrivals.iter().all(|a| a["allowed"].as_u64().is_some()), "{t}");
    assert!(t["events"].as_array().unwrap().iter().any(|e| e["what"].as_str().unwrap_or("").contains("ALERT: VM relay")), "{t}");
    assert!(!vigil(&["trace", "ghost", "--dir", &up.d()]).status.success());
    let model = up.file()["model"].as_str().expect("model path").to_string();
    let plain = vigil(&["analyze", &model]);
    assert_eq!(plain.status.code(), Some(0), "{}", text(&plain.stdout));
    let observed = vigil(&["analyze", &model, "--observed", &up.d()]);
    assert_eq!(observed.status.code(), Some(1), "the observed model misses a deadline: {}", text(&observed.stdout));
    assert!(text(&observed.stderr).contains("observed: VM relay: execution time"), "{}", text(&observed.stderr));
    // What the field measures through the slow relay is above the bound of the plan in force:
    // said loudly.
    up.wait("the chain's above-bound alert", 15, |_, v| {
        events(v).iter().any(|x| x.starts_with("ALERT: chain protection (VM relay): measured"))
    });
    // Arrivals: a client no one here wrote floods control (modelled as a 20 ms periodic
    // stream) with requests: more jobs start in a window than its arrival curve allows.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &up.field_ns(),
            "redis-benchmark",
            "-h",
            "10.99.0.51",
            "-p",
            "6379",
            "-n",
            "3000",
            "-c",
            "4",
            "-t",
            "set",
            "-q",
        ])
        .output()
        .expect("redis-benchmark (package redis-tools)");
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The flood's burst on control: far more than a jitter's one or two extra requests (which
    // the field's requests show on a loaded host, for any VM).
    let flood = |x: &String| {
        x.contains("ALERT: VM control")
            && x.contains("jobs started within")
            && x.rsplit("— ").next().and_then(|n| n.split_whitespace().next()?.parse::<u64>().ok()) >= Some(5)
    };
    let st2 = up.wait("the burst alert", 10, |_, v| events(v).iter().any(flood));
    let burst = events(&st2).into_iter().find(flood).unwrap();
    assert!(burst.contains("the arrival curve of task regulate's input"), "{burst}");
    // The observed arrivals go into the model: the stream into control gets the jitter they
    // need, and the plan table is computed again with it.
    let st3 = up.wait("the observed arrivals substituted and the table recomputed", 40, |_, v| {
        let e = events(v);
        e.iter().any(|x| x.starts_with("with the observed arrivals: stream") && x.contains("(into control): period"))
            && e.iter().any(|x| x.starts_with("plan table recomputed") && x.contains("arrivals at control"))
    });
    eprintln!("{}", events(&st3).into_iter().find(|x| x.starts_with("with the observed arrivals: stream")).unwrap());
    eprintln!("{burst}");
    // And the alert time: from the relay's start to the alert, and to the new table.
    let at = |needle: &str| {
        st["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["what"].as_str().is_some_and(|w| w.contains(needle)))
            .and_then(|x| x["at_ms"].as_u64())
            .unwrap()
    };
    let started = at("started the primary of relay");
    eprintln!(
        "relay started -> alert: {} ms; -> plan table recomputed: {} ms",
        at("ALERT: VM relay") - started,
        at("with the observed execution times of relay") - started
    );
    // The leader dies: its successor plans with the observed execution times from the start
    // (they are in the store), so the plan table stays the observed model's and the relay's
    // drift is not news to it.
    let (_, st) = up.status();
    let leader = st["leader"]["id"].as_str().unwrap().to_string();
    let g = st["leader"]["generation"].as_u64().expect("generation");
    let plans = st["plans"].clone();
    kill(up.file()["pids"][format!("manager:{leader}")].as_u64().expect("manager pid"));
    // The relay's last known time: from the last alert of the old leader.
    let number_after = |x: &str, key: &str| x.split(key).nth(1).and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok());
    let known =
        events(&st).iter().filter_map(|x| number_after(x, "ALERT: VM relay: measured execution time ")).last().expect("the relay's alert");
    let alerts_before = events(&st).len();
    up.wait("a new leader", 15, |_, v| new_lead(v, g));
    std::thread::sleep(std::time::Duration::from_secs(3));
    let (_, st2) = up.status();
    let e = events(&st2);
    // Any alert for the relay from the new leader must be news: a time grown by more than 10 %.
    let since = e.iter().rposition(|x| x.starts_with("manager leads with generation")).unwrap_or(alerts_before.min(e.len()));
    for x in e[since..].iter().filter(|x| x.contains("ALERT: VM relay: measured execution time")) {
        let t = number_after(x, "measured execution time ").expect("a time");
        assert!(t > known * 1.1, "the new leader re-learned the relay's execution time ({t} µs, known {known} µs): {e:?}");
    }
    // (Other VMs' observed times may come first in the list: under load they can drift too.)
    assert!(
        e[since..].iter().any(|x| x.starts_with("planning with the execution times observed before this leader:") && x.contains("relay ")),
        "{e:?}"
    );
    assert_ne!(st2["plans"], before, "the plan table went back to the declared model");
    let _ = plans;
}

/// The relay's primary VMM is stopped (SIGSTOP) long enough for its backup to take over, then
/// continued: it is fenced (its lease superseded), its host lives on. The manager adopts the
/// takeover — the relay runs on the backup's host with a new backup, as the plan for its host's
/// failure places it — and the client on its one TCP connection loses no acknowledged write.
/// (Before, the VM stayed "not serving" with its desired state naming the fenced copy.)
#[test]
fn a_takeover_while_the_primary_host_lives_is_adopted() {
    if no_kvm("a_takeover_while_the_primary_host_lives_is_adopted") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let up = Up::start("takeover", "t8");
    let st = up.wait("relay protected", 30, |ok, v| ok && vm(v, "relay")["replication"] == "protected");
    let detail = vm(&st, "relay")["detail"].as_str().unwrap_or("").to_string();
    let pid: u64 = detail.split_whitespace().skip_while(|w| *w != "pid").nth(1).and_then(|p| p.parse().ok()).expect("relay's pid");
    let writer = Writer::start(&up.field_ns(), "10.99.0.50");
    let _ = Command::new("kill").args(["-STOP", &pid.to_string()]).status();
    std::thread::sleep(Duration::from_millis(600));
    let _ = Command::new("kill").args(["-CONT", &pid.to_string()]).status();
    writer.carry_on(3, Duration::from_secs(20));
    let st = up.wait("relay adopted on hostB with a new backup", 30, |ok, v| {
        ok && vm(v, "relay")["host"] == "hostB" && vm(v, "relay")["replication"] == "protected"
    });
    assert_eq!(vm(&st, "relay")["backup"], "hostC", "{st}");
    assert!(st["failed"].as_array().is_some_and(|f| f.is_empty()), "no host failed: {st}");
    let events: Vec<String> = st["events"].as_array().unwrap().iter().map(|e| e["what"].as_str().unwrap_or("").to_string()).collect();
    assert!(events.iter().any(|e| e.contains("relay: its backup on hostB took over while hostA lives")), "{events:?}");
    std::thread::sleep(Duration::from_millis(300));
    let n = writer.finish();
    eprintln!("{n} acknowledged writes, all present");
}

/// The `analysed` checkpoint policy follows the measured pauses (`manager::interval`). The
/// relay runs `policy = "analysed"` in a model with room to adapt (its chain's deadline 40 ms,
/// its reservation the whole processor, its task's WCET 300 µs): from the declared pause and
/// acknowledgement the manager chooses the longest interval that keeps the deadline (fixed:33.4;
/// fixed:25 when intervals were candidates). Every checkpoint of the relay is made 4 ms
/// longer (`VIGIL_INJECT_PAUSE_DIR`: the VM stays paused, as for a guest dirtying much more
/// memory — which on this machine also stalls everything else): with the measured pauses no
/// interval as long keeps the deadline, so the manager chooses a shorter one, says
/// why (old → new, the measured values) in the event log, writes it into the relay's desired
/// record, and the relay's agent switches the running driver to it — no new synchronisation,
/// the same backup, still protected — and the chain keeps its deadline. The choice is checked
/// against the analysis independently. Without the injected pause the interval grows again.
#[test]
fn the_analysed_checkpoint_interval_follows_the_measured_pauses() {
    if no_kvm("the_analysed_checkpoint_interval_follows_the_measured_pauses") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let inject = workdir("interval-inject");
    std::fs::write(inject.join("relay"), "4000").expect("injection");
    let edit = |t: String| {
        t.replacen("port = 6379\npolicy = \"adaptive\"", "port = 6379\npolicy = \"analysed\"", 1)
            .replacen("budget = \"3ms\"", "budget = \"5ms\"", 1)
            .replacen("deadline = \"15ms\"", "deadline = \"40ms\"", 1)
            .replacen("wcet = \"800us\"", "wcet = \"300us\"", 1)
    };
    let inject_dir = inject.display().to_string();
    let up = Up::start_edited("interval", "t9", "substation.toml", &[], &[("VIGIL_INJECT_PAUSE_DIR", &inject_dir)], edit);
    let model_file = up.file()["model"].as_str().expect("model path").to_string();
    let loaded = model::load(Path::new(&model_file)).expect("the model");
    let events = |v: &serde_json::Value| -> Vec<String> {
        v["events"].as_array().map(|e| e.iter().filter_map(|x| x["what"].as_str().map(String::from)).collect()).unwrap_or_default()
    };
    let number_after = |x: &str, key: &str| x.split(key).nth(1).and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok());
    // "relay: checkpoint interval fixed:A → fixed:B (…": A and B in ms.
    let switch = |x: &str| -> Option<(f64, f64)> {
        let rest = x.strip_prefix("relay: checkpoint interval fixed:")?;
        let (a, rest) = rest.split_once(" → fixed:")?;
        Some((a.parse().ok()?, rest.split_whitespace().next()?.parse().ok()?))
    };
    let st = up.wait("the relay protected", 30, |_, v| vm(v, "relay")["replication"] == "protected");
    // The interval chosen from the declared values (`vigil analyze --intervals` of this model).
    let first = events(&st).iter().find_map(|x| {
        x.strip_prefix("relay: analysed checkpoint policy fixed:").and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
    });
    let first = first.unwrap_or_else(|| panic!("no analysed policy for the relay: {:?}", events(&st)));
    let declared = model::replication::largest_fixed_interval(&loaded, "relay", None).expect("the analysis").interval.expect("an interval");
    assert_eq!(first, declared.to_f64() / 1000.0, "the manager's choice is the analysis's");
    let backups = |v: &serde_json::Value| events(v).iter().filter(|x| x.contains("started the backup of relay")).count();
    let relay_pid = vm(&st, "relay")["detail"].as_str().unwrap_or("").to_string();
    // The pauses as measured, 4 ms longer than declared: a shorter interval.
    let shrunk = |v: &serde_json::Value| {
        events(v).iter().any(|x| switch(x).is_some_and(|(a, b)| a == first && b < a) && x.contains("too long for it"))
    };
    let t = Instant::now();
    let st = loop {
        let (_, v) = up.status();
        if shrunk(&v) || t.elapsed() > Duration::from_secs(60) {
            break v;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Whether fixed:`t_ms` keeps every deadline with a measured pause `p_ms` and backup
    // acknowledgement `a_ms` (checked here, independently of the manager).
    let us = |ms: f64| rtc::Q::int((ms * 1000.0).round() as i64);
    let holds_with = |t_ms: f64, p_ms: f64, a_ms: f64| {
        let m = model::replication::Measured { pause: us(p_ms), copy: rtc::Q::zero(), ack: us(a_ms), at: us(first) };
        matches!(
            model::replication::fixed_interval_with(&loaded, "relay", &us(t_ms), Some(m.pause_at(&us(t_ms))), Some(us(a_ms))),
            Ok(Some((true, _)))
        )
    };
    if !shrunk(&st) {
        // Only a host stalling far beyond the injected pause excuses it: the measured values
        // then leave no interval at all, as the manager's alert says — checked here against
        // the analysis with the alert's own values (seen in CI at load 3.1: an acknowledgement
        // of 28 ms).
        let load: f64 =
            std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next()?.parse().ok()).unwrap_or(0.0);
        let e = events(&st);
        let none: Vec<&String> = e.iter().filter(|x| x.starts_with("ALERT: relay: no fixed checkpoint interval")).collect();
        let last = none.last().unwrap_or_else(|| panic!("no shorter interval within 60 s and no alert (load {load}): {e:?}"));
        let p_ms = number_after(last, "the measured pause ").expect("the measured pause");
        let a_ms = number_after(last, "backup acknowledgement ").expect("the measured acknowledgement");
        for c in model::replication::CANDIDATES_US.iter().map(|&c| c as f64 / 1000.0).filter(|&c| c < first) {
            // (The alert gives the values analysed, in whole µs.)
            assert!(!holds_with(c, p_ms, a_ms), "fixed:{c} holds with the alert's values: {last}");
        }
        eprintln!("SKIPPED the rest: the host stalls (load {load}): with the measured values no interval holds: {last}");
        return;
    }
    let e = events(&st);
    let chosen = e.iter().find(|x| switch(x).is_some_and(|(a, b)| a == first && b < a)).unwrap().clone();
    eprintln!("{chosen}");
    let (_, to) = switch(&chosen).unwrap();
    let pause = number_after(&chosen, "99th percentiles of the pause ").expect("the measured pause");
    assert!(pause >= 4.0, "the injected pause is measured: {chosen}");
    // Checked independently: with the values the manager analysed (margin included, given in
    // whole µs: with 10 µs, a choice at the edge failed here in CI), the new interval keeps
    // every deadline and no longer candidate up to the interval it replaced does (the copying
    // part of the pause is not given, so the grid step above it is checked by the unit tests,
    // not here).
    let analysed = chosen.split("analysed now with ").nth(1).expect("the analysed values");
    let p_ms: f64 = analysed.split(" ms").next().unwrap().parse().unwrap();
    let a_ms: f64 = analysed.split(" and ").nth(1).and_then(|r| r.split(" ms").next()).unwrap().parse().unwrap();
    let holds = |t_ms: f64| holds_with(t_ms, p_ms, a_ms);
    assert!(holds(to), "{chosen}");
    for longer in model::replication::CANDIDATES_US.iter().map(|&c| c as f64 / 1000.0).filter(|&c| c > to && c > p_ms) {
        assert!(!holds(longer) || longer > first, "fixed:{longer} would hold too: {chosen}");
    }
    // The relay's agent switched the running driver (the same process, no new backup).
    let policy = format!("fixed:{to}");
    let st = up.wait("the relay running the new interval", 15, |_, v| {
        vm(v, "relay")["figures"]["policy"] == policy.as_str()
            && events(v).iter().any(|x| x.starts_with(&format!("relay: checkpoint policy fixed:{first} → {policy} on the running copy")))
    });
    assert_eq!(vm(&st, "relay")["detail"].as_str().unwrap_or(""), relay_pid, "the same primary");
    assert_eq!(vm(&st, "relay")["replication"], "protected");
    let before = backups(&st);
    // The chain keeps its deadline under the new interval (5 s of the field's requests).
    let late = |v: &serde_json::Value| v["measured"]["protection"]["over_deadline"].as_u64().unwrap_or(0);
    let samples = |v: &serde_json::Value| v["measured"]["protection"]["samples"].as_u64().unwrap_or(0);
    // Counted from two of the field's reports (1 s apart) after the switch: a report read at
    // the switch may not yet hold the requests late under the interval before it (with the
    // injected pause, fixed:33.4's hold passes 40 ms; that is why it was replaced).
    std::thread::sleep(Duration::from_secs(2));
    let (_, st) = up.status();
    let (late0, n0) = (late(&st), samples(&st));
    std::thread::sleep(Duration::from_secs(5));
    let (_, st2) = up.status();
    assert!(samples(&st2) > n0 + 100, "the field's requests: {}", st2["measured"]);
    // (No reservation is enforced on a machine with fewer CPUs than the model's processors, so
    // a host this busy with other work preempts the VMs beyond any bound: above a load average
    // of 4 a few late requests, at most 2 % of the window's, are reported, not failed.)
    let load: f64 = std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next()?.parse().ok()).unwrap_or(0.0);
    let (late_n, window_n) = (late(&st2) - late0, samples(&st2) - n0);
    if load < 4.0 {
        assert_eq!(late_n, 0, "late requests under {policy}: {}", st2["measured"]);
    } else {
        assert!(late_n * 50 <= window_n, "late requests under {policy} at load {load}: {}", st2["measured"]);
        eprintln!("load average {load}: {late_n} of {window_n} requests late under {policy}");
    }
    assert_eq!(backups(&st2), before, "no new backup: {:?}", events(&st2));
    // (Under load a late acknowledgement can make it re-synchronise for a moment.)
    up.wait("the relay protected", 10, |_, v| vm(v, "relay")["replication"] == "protected");
    // The frames at the relay's network device, timestamped by its VMM (`vmm::devices::net::
    // FrameStamps`): the field's requests in, the answers out, the device-level latency between.
    let jobs = &vm(&st2, "relay")["jobs"];
    assert!(jobs["frames_in"].as_u64() > Some(0) && jobs["frames_out"].as_u64() > Some(0), "{jobs}");
    assert!(jobs["device_samples"].as_u64() > Some(0) && jobs["device_max_us"].as_f64() > Some(0.0), "{jobs}");
    assert!(jobs["device_p50_us"].as_f64() < Some(1e6), "{jobs}");
    assert_eq!(jobs["frame_arrivals"].as_array().map(Vec::len), Some(10), "{jobs}");
    eprintln!("relay at its device: {jobs}");
    // `vigil status` shows it (or a shorter one: the manager may have shrunk it again since).
    let t = Instant::now();
    loop {
        let out = vigil(&["status", "--dir", &up.d()]);
        let shown = text(&out.stdout);
        if shown.contains(&format!("protected {policy}"))
            || (shown.contains("protected fixed:") && !shown.contains(&format!("fixed:{first}")))
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{}", text(&out.stdout));
        std::thread::sleep(Duration::from_millis(100));
    }
    // The leader dies: its successor carries on from the interval in force (kept in the store),
    // not from the declared values.
    let (_, st) = up.status();
    let leader = st["leader"]["id"].as_str().unwrap().to_string();
    let g = st["leader"]["generation"].as_u64().expect("generation");
    kill(up.file()["pids"][format!("manager:{leader}")].as_u64().expect("manager pid"));
    // (The interval in force then: the one chosen above, or a shorter one the manager chose
    // since from newer measurements — seen in CI. Never the declared one.)
    let known = |v: &serde_json::Value| {
        events(v).iter().rev().find_map(|x| {
            let rest = x.strip_prefix("checkpoint intervals chosen before this leader: relay fixed:")?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
    };
    let st = up.wait("a new leader that knows the interval", 15, |_, v| new_lead(v, g) && known(v).is_some_and(|t| t <= to));
    let to = known(&st).expect("the interval the new leader knows");
    let policy = format!("fixed:{to}");
    // The pause back to what it was: after a while (GROW_AFTER) a longer interval again —
    // unless the host stalls meanwhile (then the measured pauses or acknowledgements, not the
    // injection, say no: the event log shows which).
    std::fs::write(inject.join("relay"), "0").expect("injection");
    let grown = |v: &serde_json::Value| {
        events(v).into_iter().find(|x| switch(x).is_some_and(|(a, b)| a == to && b > a) && x.contains("allow a longer one"))
    };
    let t = Instant::now();
    let st = loop {
        let (_, v) = up.status();
        if grown(&v).is_some() || t.elapsed() > Duration::from_secs(60) {
            break v;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    match grown(&st) {
        Some(back) => eprintln!("{back}"),
        None => {
            // Only a stalling host excuses it: windows whose percentiles leave no interval (or
            // keep the short one) after the injection ended, or a takeover.
            let e = events(&st);
            let stalled = e.iter().rev().take_while(|x| !x.starts_with("relay: checkpoint policy")).any(|x| {
                x.starts_with("ALERT: relay: no fixed checkpoint interval")
                    || x.starts_with(&format!("relay: checkpoint interval {policy} kept"))
            }) || backups(&st) != before;
            assert!(stalled, "no longer interval within 60 s of the pauses' return, and no stall to explain it: {e:?}");
            eprintln!(
                "the host stalled after the injection ended (load {:?}): the interval stayed {policy}",
                std::fs::read_to_string("/proc/loadavg")
            );
        }
    }
    let _ = std::fs::remove_dir_all(&inject);
}
