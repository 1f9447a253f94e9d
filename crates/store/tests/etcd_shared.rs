//! Several store front ends on one etcd cluster (a real 3-member cluster of Debian's
//! etcd-server on loopback): writes through one are read through the other, watches set on one
//! fire for writes through the other, concurrent transactions through both stay serialisable
//! (each commits or gets `EAGAIN`, and the counter they increment equals the commits), and a
//! domain introduced through a front end that is SIGKILLed is released once its lease expires.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use store::etcd::EtcdBackend;
use store::log::Backend;
use store::server::{Config, Server};
use store::{Client, Errno, Error};
use testbed::etcd::LoopbackEtcd;

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for m in &mut self.0 {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

fn start_cluster(dir: &Path) -> (LoopbackEtcd, Vec<String>) {
    let cluster = LoopbackEtcd::start(dir, 34400 + (std::process::id() % 300) as u16 * 8, "vigil-shared").expect("etcd starts");
    let endpoints = cluster.endpoints.clone();
    (cluster, endpoints)
}

fn config(dir: &Path, name: &str, endpoints: &[String], prefix: &str, ttl: u64) -> Config {
    Config {
        socket: dir.join(name),
        data: dir.join("unused"),
        quota: Default::default(),
        etcd: Some((endpoints.to_vec(), prefix.to_string())),
        etcd_lease_ttl: ttl,
        volatile: Vec::new(),
    }
}

/// Not a test by itself: the front end that the main test runs as a separate process (so that
/// it can be SIGKILLed), when `VIGIL_ETCD_CHILD` = `socket|endpoints|prefix` is set.
#[test]
fn child_front_end() {
    let Ok(spec) = std::env::var("VIGIL_ETCD_CHILD") else { return };
    let f: Vec<&str> = spec.split('|').collect();
    let endpoints: Vec<String> = f[1].split(',').map(String::from).collect();
    let cfg = Config {
        socket: PathBuf::from(f[0]),
        data: PathBuf::from("/nonexistent"),
        quota: Default::default(),
        etcd: Some((endpoints, f[2].to_string())),
        etcd_lease_ttl: 2,
        volatile: Vec::new(),
    };
    Server::bind(&cfg).expect("child front end").run().expect("child front end runs");
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

fn next_event(c: &mut Client, path: &str) -> Duration {
    let start = Instant::now();
    loop {
        let e = c.next_event(Duration::from_secs(5)).expect("event").unwrap_or_else(|| panic!("no watch event for {path}"));
        if e.path == path {
            return start.elapsed();
        }
    }
}

#[test]
fn two_front_ends_on_one_cluster() {
    if !Path::new("/usr/bin/etcd").exists() {
        println!("SKIPPED: /usr/bin/etcd is absent (install Debian package etcd-server; scripts/test does)");
        return;
    }
    let t0 = Instant::now();
    let dir: PathBuf = std::env::temp_dir().join(format!("vigil-etcd-shared-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (_cluster, endpoints) = start_cluster(&dir);
    let prefix = format!("vigil-shared-{}", std::process::id());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut b = EtcdBackend::new(endpoints.clone(), &prefix).expect("backend");
        if b.load().is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "etcd cluster never became ready; logs in {}", dir.display());
        std::thread::sleep(Duration::from_millis(200));
    }

    let a = Server::bind(&config(&dir, "a.sock", &endpoints, &prefix, 0)).expect("front end a");
    std::thread::spawn(move || a.run());
    let b = Server::bind(&config(&dir, "b.sock", &endpoints, &prefix, 0)).expect("front end b");
    std::thread::spawn(move || b.run());
    let mut ca = Client::connect(&dir.join("a.sock")).expect("client a");
    let mut cb = Client::connect(&dir.join("b.sock")).expect("client b");

    // A write through A is read through B (B follows the log through the etcd watch).
    ca.write("/s/x", b"1").expect("write through a");
    let lag = wait_for("write through a visible through b", Duration::from_secs(5), || {
        cb.try_read("/s/x").expect("read through b").as_deref() == Some(&b"1"[..])
    });
    // And the other way round; B's write goes after A's entry in the log.
    cb.write("/s/y", b"2").expect("write through b");
    wait_for("write through b visible through a", Duration::from_secs(5), || {
        ca.try_read("/s/y").expect("read through a").as_deref() == Some(&b"2"[..])
    });

    // A watch set through B fires for a write through A.
    cb.watch("/s/w", "w").expect("watch through b");
    next_event(&mut cb, "/s/w"); // the initial event
    ca.write("/s/w/a", b"x").expect("write through a");
    let watch_lag = next_event(&mut cb, "/s/w/a");

    // Concurrent read-modify-write transactions through A and B.
    ca.write("/s/counter", b"0").expect("counter");
    wait_for("counter on b", Duration::from_secs(5), || cb.try_read("/s/counter").expect("read").is_some());
    let run = |sock: PathBuf| {
        std::thread::spawn(move || {
            let mut c = Client::connect(&sock).expect("client");
            let (mut commits, mut eagain) = (0u64, 0u64);
            for _ in 0..40 {
                let r = c.transaction_once(|tx| {
                    let n: u64 = String::from_utf8_lossy(&tx.read("/s/counter")?).parse().unwrap_or(0);
                    tx.write("/s/counter", (n + 1).to_string().as_bytes())
                });
                match r {
                    Ok(()) => commits += 1,
                    Err(Error::Store { errno: Errno::EAGAIN, .. }) => eagain += 1,
                    Err(e) => panic!("transaction: {e}"),
                }
            }
            (commits, eagain)
        })
    };
    let (ta, tb) = (run(dir.join("a.sock")), run(dir.join("b.sock")));
    let (a_commits, a_eagain) = ta.join().expect("transactions through a");
    let (b_commits, b_eagain) = tb.join().expect("transactions through b");
    let commits = a_commits + b_commits;
    for c in [&mut ca, &mut cb] {
        wait_for("counter converges", Duration::from_secs(5), || {
            c.read("/s/counter").expect("counter") == commits.to_string().into_bytes()
        });
    }
    assert!(a_commits > 0 && b_commits > 0, "a {a_commits}, b {b_commits}");

    // A domain introduced through a front end that dies is released when its lease expires.
    let child_sock = dir.join("c.sock");
    let mut child = Procs(vec![Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "child_front_end", "--nocapture", "--test-threads=1"])
        .env("VIGIL_ETCD_CHILD", format!("{}|{}|{prefix}", child_sock.display(), endpoints.join(",")))
        .stdout(Stdio::null())
        .spawn()
        .expect("child front end")]);
    let mut cc = Client::connect(&child_sock).expect("client of the child front end");
    cb.watch("@introduceDomain", "in").expect("watch");
    cb.watch("@releaseDomain", "rel").expect("watch");
    next_event(&mut cb, "@introduceDomain");
    next_event(&mut cb, "@releaseDomain");
    cc.introduce(7).expect("introduce through the child");
    next_event(&mut cb, "@introduceDomain");
    // The lease (TTL 2 s) is kept alive: nothing is released while the child lives.
    let e = cb.next_event(Duration::from_secs(3)).expect("events");
    assert!(e.is_none(), "event while the introducing front end lives: {e:?}");
    let _ = child.0[0].kill(); // SIGKILL
    let _ = child.0[0].wait();
    let killed = Instant::now();
    next_event(&mut cb, "@releaseDomain");
    let release = killed.elapsed();
    assert!(release < Duration::from_secs(6), "released {release:?} after SIGKILL");
    // Released in the shared log: A sees it too, and only one release was appended.
    let mut ca2 = Client::connect(&dir.join("a.sock")).expect("client a");
    ca2.watch("@releaseDomain", "rel").expect("watch");
    next_event(&mut ca2, "@releaseDomain");
    assert!(ca2.next_event(Duration::from_millis(300)).expect("events").is_none());
    println!(
        "figures: read-after-write lag a->b {lag:?}, watch lag {watch_lag:?}; transactions a {a_commits} ok / {a_eagain} EAGAIN, \
         b {b_commits} ok / {b_eagain} EAGAIN; domain released {release:?} after SIGKILL (lease TTL 2 s); test {:?}",
        t0.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
