//! The network and block backends as processes of their own (`vigil vm run --net-backend
//! process`, `--blk-backend process`) under real clients: killed (SIGKILL) or stopped
//! (SIGSTOP, a hang) at random moments while `redis-cli` clients write and check every
//! acknowledged reply. Nothing acknowledged may be lost, no request may run twice (each
//! client's INCR counts exactly its requests), every client keeps its one TCP connection, and
//! the VM keeps running. With the block backend, kv logs every request on its disk before it
//! replies: a new VM on the same disk must find every acknowledged write there — also when the
//! VMM was killed while its block backend was stopped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testbed::redis::{client_ports, RedisClient};
use testbed::tapns::{TapNs, GUEST_IP};

fn no_kvm(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return false;
    }
    eprintln!("{test}: skipped: /dev/kvm is absent on this host");
    true
}

/// A short directory (control sockets have a path limit of 108 bytes).
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vigil-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `which`: `net_backend` or `blk_backend`, the backend that fails.
fn chaos(test: &str, which: &str, signal: i32, faults: usize) {
    if no_kvm(test) {
        return;
    }
    let image = testbed::guest("kv").expect("kv guest");
    let tag = format!("{}-{}", &which[..3], if signal == libc::SIGKILL { "kill" } else { "stop" });
    let ns = TapNs::new(&tag).expect("namespace");
    let dir = scratch(&tag);
    std::fs::create_dir_all(&dir).expect("scratch");
    let disk = dir.join("disk");
    std::fs::write(&disk, vec![0u8; 16 << 20]).expect("disk");
    let disk_arg = disk.display().to_string();
    let vigil = Path::new(env!("CARGO_BIN_EXE_vigil"));
    let extra: Vec<&str> =
        if which == "net_backend" { vec!["--net-backend", "process"] } else { vec!["--disk", &disk_arg, "--blk-backend", "process"] };
    let mut vm = ns.start_vm_with(vigil, &image, &extra, "vm", &dir).expect("start the VM");
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1;
    eprintln!("{test}: seed {seed}");
    let mut rng = Rng(seed);

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|c| {
            let (ns_name, stop) = (ns.name.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut cli = RedisClient::new(&ns_name, GUEST_IP, 6379);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    assert_eq!(cli.call(&format!("SET c{c}:k{i} v{i}")), "OK", "client {c}: SET number {i}");
                    // A request served twice (or lost after its reply) would break the count.
                    assert_eq!(cli.call(&format!("INCR c{c}:n")), i.to_string(), "client {c}: INCR number {i}");
                }
                (cli, i)
            })
        })
        .collect();
    let peer = format!("{GUEST_IP}:6379");
    let t = Instant::now();
    let ports_before = loop {
        let p = client_ports(&ns.name, &peer, "redis-cli");
        if p.len() == 3 {
            break p;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "three redis-cli connections: {p:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(100));

    let mut restarts_seen = 0u64;
    for k in 0..faults {
        std::thread::sleep(Duration::from_millis(50 + rng.next() % 350));
        let pid = vm.backend_pid_of(which);
        assert!(pid != 0, "fault {k}: no backend pid in the VM's status");
        // SAFETY: kill(2) of the backend process the VM reports (its pid, alive: the VMM has
        // not reaped it, so it cannot be reused).
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0, "kill {pid}");
        let t = Instant::now();
        loop {
            let st = vm.status();
            let restarts = st[which]["restarts"].as_u64().unwrap_or(0);
            if restarts > restarts_seen && st[which]["pid"].as_u64() != Some(pid as u64) {
                restarts_seen = restarts;
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "fault {k}: backend {pid} not replaced within 5 s: {st}");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(vm.running(), "fault {k}: the VMM ended:\n{}", vm.proc_.text());
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let mut done = Vec::new();
    for (c, h) in clients.into_iter().enumerate() {
        let (cli, n) = h.join().unwrap_or_else(|_| panic!("client {c} failed; VM log:\n{}", vm.proc_.text()));
        done.push((cli, n));
    }
    let ports_after = client_ports(&ns.name, &peer, "redis-cli");
    assert_eq!(ports_before.iter().collect::<std::collections::BTreeSet<_>>(), ports_after.iter().collect(), "connections survive");

    // Every acknowledged write is there, once.
    let mut check = RedisClient::new(&ns.name, GUEST_IP, 6379);
    let mut total = 0;
    for (c, (_, n)) in done.iter().enumerate() {
        assert_eq!(check.call(&format!("GET c{c}:n")), n.to_string(), "client {c}'s count");
        for i in 1..=*n {
            assert_eq!(check.call(&format!("GET c{c}:k{i}")), format!("v{i}"), "client {c}: key {i}");
        }
        total += n;
    }
    let st = vm.status();
    let incidents = st[which]["incidents"].as_array().cloned().unwrap_or_default();
    let want = if signal == libc::SIGKILL { "crashed" } else { "hung" };
    assert!(incidents.iter().all(|i| i["cause"].as_str().is_some_and(|c| c.starts_with(want))), "{incidents:?}");
    assert!(vm.running(), "the VMM ended:\n{}", vm.proc_.text());
    eprintln!(
        "{test}: {faults} faults, {total} acknowledged writes checked, {} restarts; incidents: {}",
        restarts_seen,
        serde_json::to_string(&incidents).unwrap_or_default()
    );
    drop(check);
    drop(vm);
    if which == "blk_backend" {
        // Every acknowledged write is on the disk: a new VM replays kv's log from it.
        let _vm2 = ns.start_vm_with(vigil, &image, &["--disk", &disk_arg], "vm2", &dir).expect("restart on the disk");
        let mut check = RedisClient::new(&ns.name, GUEST_IP, 6379);
        for (c, (_, n)) in done.iter().enumerate() {
            assert_eq!(check.call(&format!("GET c{c}:n")), n.to_string(), "client {c}'s count, replayed from the disk");
            for i in (1..=*n).step_by(7).chain([*n]) {
                assert_eq!(check.call(&format!("GET c{c}:k{i}")), format!("v{i}"), "client {c}: key {i}, replayed from the disk");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn net_backend_killed_at_random_moments_loses_nothing_acknowledged() {
    chaos("net_backend_killed_at_random_moments_loses_nothing_acknowledged", "net_backend", libc::SIGKILL, 12);
}

#[test]
fn net_backend_hung_at_random_moments_is_detected_and_replaced() {
    chaos("net_backend_hung_at_random_moments_is_detected_and_replaced", "net_backend", libc::SIGSTOP, 6);
}

#[test]
fn blk_backend_killed_at_random_moments_loses_no_acknowledged_write() {
    chaos("blk_backend_killed_at_random_moments_loses_no_acknowledged_write", "blk_backend", libc::SIGKILL, 10);
}

#[test]
fn blk_backend_hung_at_random_moments_is_detected_and_replaced() {
    chaos("blk_backend_hung_at_random_moments_is_detected_and_replaced", "blk_backend", libc::SIGSTOP, 5);
}

/// A VMM killed while its block backend is stopped (SIGSTOP, before the VMM noticed the hang):
/// the backend's death signal (SIGTERM) waits pending, and the backend holds the disk and what
/// its write ring holds. A VMM started on the disk continues it, so that it writes them and
/// exits: the new VM opens the disk at once and finds every write a client was answered for.
#[test]
fn a_vmm_killed_while_its_blk_backend_is_stopped_hands_the_disk_over() {
    let test = "a_vmm_killed_while_its_blk_backend_is_stopped_hands_the_disk_over";
    if no_kvm(test) {
        return;
    }
    let image = testbed::guest("kv").expect("kv guest");
    let ns = TapNs::new("blk-orph").expect("namespace");
    let dir = scratch("blk-orph");
    std::fs::create_dir_all(&dir).expect("scratch");
    let disk = dir.join("disk");
    std::fs::write(&disk, vec![0u8; 16 << 20]).expect("disk");
    let disk_arg = disk.display().to_string();
    let vigil = Path::new(env!("CARGO_BIN_EXE_vigil"));
    let mut vm = ns.start_vm_with(vigil, &image, &["--disk", &disk_arg, "--blk-backend", "process"], "vm", &dir).expect("start the VM");
    // A client writing as fast as it is answered, until the VMM is gone: what it was answered
    // for counts.
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let client = {
        let (ns_name, acked) = (ns.name.clone(), acked.clone());
        std::thread::spawn(move || {
            let mut cli = RedisClient::new(&ns_name, GUEST_IP, 6379);
            for i in 1u64.. {
                if cli.try_call(&format!("SET k{i} v{i}"), Duration::from_secs(3)).as_deref() != Some("OK") {
                    break;
                }
                acked.store(i, Ordering::Release);
            }
        })
    };
    let t = Instant::now();
    while acked.load(Ordering::Acquire) < 200 {
        assert!(t.elapsed() < Duration::from_secs(20), "the client is not answered");
        std::thread::sleep(Duration::from_millis(10));
    }
    let backend = vm.backend_pid_of("blk_backend");
    assert!(backend != 0, "no block backend in the VM's status");
    // SAFETY: kill(2) of the backend the VM reports (alive: its VMM has not reaped it).
    assert_eq!(unsafe { libc::kill(backend as i32, libc::SIGSTOP) }, 0);
    std::thread::sleep(Duration::from_millis(20));
    vm.proc_.kill();
    client.join().expect("client");
    let n = acked.load(Ordering::Acquire);
    let t = Instant::now();
    let vm2 = ns.start_vm_with(vigil, &image, &["--disk", &disk_arg], "vm2", &dir);
    let took = t.elapsed();
    // The old backend has ended (a zombie until whoever inherited it reaps it).
    let state = std::fs::read_to_string(format!("/proc/{backend}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("State:")).map(|s| s.trim().to_string()));
    let backend_left = state.as_deref().is_some_and(|s| !s.starts_with('Z'));
    eprintln!("{test}: the old backend {backend}: {state:?}");
    if backend_left {
        // SAFETY: as above; it must not outlive the test.
        unsafe { libc::kill(backend as i32, libc::SIGKILL) };
    }
    let _vm2 = vm2.expect("a VM on the disk its stopped backend held");
    assert!(!backend_left, "the stopped backend of the killed VMM is still there");
    let mut check = RedisClient::new(&ns.name, GUEST_IP, 6379);
    for i in 1..=n {
        assert_eq!(check.call(&format!("GET k{i}")), format!("v{i}"), "key {i} of {n} acknowledged, replayed from the disk");
    }
    eprintln!("{test}: {n} acknowledged writes replayed; the new VM started in {took:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
