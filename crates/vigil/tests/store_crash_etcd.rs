//! SIGKILL of the real `vigil store serve --etcd ...` process at random moments while a client
//! writes, with the log in a 3-member etcd cluster on loopback (Debian's etcd-server) that also
//! loses a member: every acknowledged write is present afterwards.

use agent::supervisor::{Cause, Config, Supervisor};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::Client;
use testbed::etcd::LoopbackEtcd;

#[test]
fn sigkill_of_the_store_on_etcd_loses_nothing_acknowledged() {
    if !Path::new("/usr/bin/etcd").exists() {
        println!("SKIPPED: /usr/bin/etcd is absent (install Debian package etcd-server; scripts/test does)");
        return;
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("vigil-store-crash-etcd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut cluster = LoopbackEtcd::start(&dir, 35000 + (std::process::id() % 400) as u16 * 8, "vigil-crash").expect("etcd starts");
    let endpoints = cluster.endpoints.clone();
    let socket = dir.join("sock");
    let cfg = Config {
        program: env!("CARGO_BIN_EXE_vigil").into(),
        args: vec![
            "store".into(),
            "serve".into(),
            "--socket".into(),
            socket.clone().into(),
            "--data".into(),
            dir.join("unused").into(),
            "--etcd".into(),
            endpoints.join(",").into(),
        ],
        socket: socket.clone(),
        period: Duration::from_millis(50),
        misses: 20,
        start_timeout: Duration::from_secs(60),
    };
    // The store cannot start before etcd has a quorum; the supervisor retries until it does.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sup = loop {
        match Supervisor::start(cfg.clone()) {
            Ok(s) => break s,
            Err(e) => assert!(Instant::now() < deadline, "store on etcd never started: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (socket, stop) = (socket.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut c = Client::connect(&socket).expect("connects");
            c.set_retry_for(Duration::from_secs(30));
            let mut acked = Vec::new();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("/e/k{k}");
                c.write(&key, k.to_string().as_bytes()).expect("write acknowledged eventually");
                acked.push((key, k));
                k += 1;
            }
            acked
        })
    };
    let mut x = 0x51_7cc1_b727_220au64;
    for round in 0..4 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_millis(100 + x % 200));
        if round == 2 {
            // Lose one etcd member as well.
            cluster.kill(1);
        }
        let st = Command::new("kill").args(["-KILL", &sup.pid().to_string()]).status().expect("kill runs");
        assert!(st.success());
        let i = sup.next_incident(Duration::from_secs(60)).expect("supervisor").expect("no replacement answered within 60 s");
        assert!(matches!(&i.cause, Cause::Crashed(s) if s.contains("SIGKILL")), "{i:?}");
    }
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let acked = writer.join().expect("writer");
    let mut c = Client::connect(&socket).expect("checker");
    for (key, k) in &acked {
        assert_eq!(c.read(key).expect("acknowledged write present"), k.to_string().into_bytes(), "{key}");
    }
    eprintln!("4 kills of the store, 1 of an etcd member: {} acknowledged writes all present", acked.len());
    assert!(!acked.is_empty());
    sup.shutdown();
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
