//! The etcd backend against a real 3-member etcd cluster (Debian's etcd-server) on loopback,
//! started by the test: acknowledged writes and transactions survive the loss of one member and
//! the replacement of the store front end; a raw backend behind the log loses its append.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use store::etcd::EtcdBackend;
use store::log::Backend;
use store::server::{Config, Server};
use store::Client;
use testbed::etcd::LoopbackEtcd;

fn start_cluster(dir: &Path) -> LoopbackEtcd {
    LoopbackEtcd::start(dir, 31000 + (std::process::id() % 400) as u16 * 8, "vigil-test").expect("etcd starts")
}

#[test]
fn three_member_cluster_survives_one_member_and_a_new_front_end() {
    if !Path::new("/usr/bin/etcd").exists() {
        println!("SKIPPED: /usr/bin/etcd is absent (install Debian package etcd-server; scripts/test does)");
        return;
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("vigil-etcd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut cluster = start_cluster(&dir);
    let prefix = format!("vigil-test-{}", std::process::id());
    // Wait for a quorum: loading an empty log succeeds once the cluster answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut b = EtcdBackend::new(cluster.endpoints.clone(), &prefix).expect("backend");
        if b.load().is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "etcd cluster never became ready; logs in {}", dir.display());
        std::thread::sleep(Duration::from_millis(200));
    }

    let endpoints = cluster.endpoints.clone();
    let cfg = |name: &str| Config {
        socket: dir.join(name),
        data: dir.join("unused"),
        quota: Default::default(),
        etcd: Some((endpoints.clone(), prefix.clone())),
        etcd_lease_ttl: 0,
        volatile: Vec::new(),
    };
    let a = Server::bind(&cfg("a.sock")).expect("front end a");
    std::thread::spawn(move || a.run());
    let mut c = Client::connect(&dir.join("a.sock")).expect("client");
    for i in 0..20 {
        c.write(&format!("/e/k{i}"), i.to_string().as_bytes()).expect("write");
    }
    c.transaction(|tx| {
        tx.write("/e/tx/x", b"1")?;
        tx.write("/e/tx/y", b"2")
    })
    .expect("transaction");

    // Lose a member; the store keeps acknowledging writes through the other two.
    cluster.kill(0);
    for i in 20..40 {
        c.write(&format!("/e/k{i}"), i.to_string().as_bytes()).expect("write with one member down");
    }

    // A new front end recovers everything from etcd.
    let b = Server::bind(&cfg("b.sock")).expect("front end b recovers");
    assert!(b.nodes() >= 44, "{} nodes", b.nodes());
    std::thread::spawn(move || b.run());
    let mut c2 = Client::connect(&dir.join("b.sock")).expect("client b");
    for i in 0..40 {
        assert_eq!(c2.read(&format!("/e/k{i}")).expect("acknowledged write"), i.to_string().into_bytes());
    }
    assert_eq!(c2.read("/e/tx/y").expect("transaction"), b"2");

    // Two backends on one log: the one behind loses its next append (fencing).
    let mut b1 = EtcdBackend::new(cluster.endpoints.clone(), &format!("{prefix}-fence")).expect("backend");
    let mut b2 = EtcdBackend::new(cluster.endpoints.clone(), &format!("{prefix}-fence")).expect("backend");
    b1.load().expect("load");
    b2.load().expect("load");
    let m = store::state::Mutation::Introduce { domid: 3 };
    b1.append(std::slice::from_ref(&m)).expect("first append");
    assert!(b2.append(std::slice::from_ref(&m)).is_err(), "a backend behind the log loses its append");
    // Compaction keeps the state.
    b1.compact(std::slice::from_ref(&m)).expect("compact");
    // The backend behind (it lacks entry 1, now folded into the snapshot) reloads when it
    // catches up.
    assert_eq!(b2.catch_up().expect("catch up"), store::log::CatchUp::Reload(vec![vec![m.clone()]]));
    let mut b3 = EtcdBackend::new(cluster.endpoints.clone(), &format!("{prefix}-fence")).expect("backend");
    assert_eq!(b3.load().expect("load after compaction"), vec![vec![m.clone()]]);
    b3.append(std::slice::from_ref(&m)).expect("append after compaction");
    let _ = std::fs::remove_dir_all(&dir);
}
