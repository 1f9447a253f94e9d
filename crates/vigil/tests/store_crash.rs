//! Fault injection on the real `vigil store serve` process: SIGKILL at random moments while
//! clients write and run transactions, under the store's supervisor. Afterwards every
//! acknowledged write is present, every transaction is either committed exactly once or was
//! reported EAGAIN, and watches fire again after reconnecting. A SIGSTOP'ed (hung) server is
//! detected by missed heartbeats and replaced.

use agent::supervisor::{Cause, Config, Supervisor};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use store::{Client, Errno};

fn setup(name: &str) -> (PathBuf, Config) {
    let dir = std::env::temp_dir().join(format!("vigil-store-crash-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket = dir.join("sock");
    let cfg = Config {
        program: env!("CARGO_BIN_EXE_vigil").into(),
        args: vec!["store".into(), "serve".into(), "--socket".into(), socket.clone().into(), "--data".into(), dir.join("data").into()],
        socket,
        period: Duration::from_millis(20),
        misses: 3,
        start_timeout: Duration::from_secs(10),
    };
    (dir, cfg)
}

/// A small deterministic generator for the kill schedule (xorshift).
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn sigkill(pid: u32) {
    let st = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill runs");
    assert!(st.success());
}

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let (_dir, cfg) = setup("kill");
    let socket = cfg.socket.clone();
    let mut sup = Supervisor::start(cfg).expect("store starts");
    let stop = Arc::new(AtomicBool::new(false));

    // Writers: each key written once; remember what was acknowledged.
    let mut writers = Vec::new();
    for w in 0..2 {
        let (socket, stop) = (socket.clone(), Arc::clone(&stop));
        writers.push(std::thread::spawn(move || {
            let mut c = Client::connect(&socket).expect("writer connects");
            let mut acked = Vec::new();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("/crash/w{w}/k{k}");
                c.write(&key, k.to_string().as_bytes()).expect("write acknowledged eventually");
                acked.push((key, k));
                k += 1;
            }
            (acked, c.reconnects())
        }));
    }
    // Transactions: a counter and one log entry per committed attempt.
    let mut txers = Vec::new();
    for t in 0..2 {
        let (socket, stop) = (socket.clone(), Arc::clone(&stop));
        txers.push(std::thread::spawn(move || {
            let mut c = Client::connect(&socket).expect("tx client connects");
            let (mut committed, mut eagain) = (Vec::new(), Vec::new());
            let mut a = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let attempt = format!("t{t}-{a}");
                a += 1;
                let r = c.transaction_once(|tx| {
                    let n: u64 = tx.try_read("/crash/tx/count")?.and_then(|v| String::from_utf8(v).ok()?.parse().ok()).unwrap_or(0);
                    tx.write("/crash/tx/count", (n + 1).to_string().as_bytes())?;
                    tx.write(&format!("/crash/tx/log/{attempt}"), b"1")
                });
                match r {
                    Ok(()) => committed.push(attempt),
                    Err(store::Error::Store { errno: Errno::EAGAIN, .. }) => eagain.push(attempt),
                    Err(e) => panic!("transaction {attempt}: {e}"),
                }
            }
            (committed, eagain)
        }));
    }
    // A watcher, connected before the kills: it must see writes made after the last restart.
    let seen = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (socket, seen) = (socket.clone(), Arc::clone(&seen));
        std::thread::spawn(move || {
            let mut c = Client::connect(&socket).expect("watcher connects");
            c.watch("/crash/final", "fin").expect("watch");
            let mut events = 0;
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while std::time::Instant::now() < deadline {
                if let Some(e) = c.next_event(Duration::from_millis(50)).expect("events") {
                    events += 1;
                    assert_eq!(e.token, "fin");
                    if e.path == "/crash/final/after-restart" {
                        seen.store(true, Ordering::Relaxed);
                        break;
                    }
                }
            }
            (events, c.reconnects())
        })
    };

    // Kill the server at random moments; the supervisor restarts it.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let kills = 6;
    let mut incidents = Vec::new();
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(30 + rng.below(150)));
        sigkill(sup.pid());
        incidents.push(sup.next_incident(Duration::from_secs(60)).expect("supervisor").expect("no replacement answered within 60 s"));
    }
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);

    let mut check = Client::connect(&socket).expect("checker connects");
    // One more restart after the load: the watcher must see a write made after it.
    sigkill(sup.pid());
    sup.next_incident(Duration::from_secs(60)).expect("supervisor").expect("no replacement answered within 60 s");
    let mut i = 0;
    while !seen.load(Ordering::Relaxed) {
        check.write("/crash/final/after-restart", i.to_string().as_bytes()).expect("write after restart");
        std::thread::sleep(Duration::from_millis(20));
        i += 1;
        assert!(i < 1000, "the watcher never saw a write made after the restart");
    }

    let mut total_acked = 0;
    for w in writers {
        let (acked, _) = w.join().expect("writer thread");
        total_acked += acked.len();
        for (key, k) in acked {
            assert_eq!(check.read(&key).expect("acknowledged write present"), k.to_string().into_bytes(), "{key}");
        }
    }
    let (mut committed, mut eagain) = (Vec::new(), Vec::new());
    for t in txers {
        let (c, e) = t.join().expect("tx thread");
        committed.extend(c);
        eagain.extend(e);
    }
    let count: usize = String::from_utf8(check.read("/crash/tx/count").expect("count")).expect("utf8").parse().expect("number");
    assert_eq!(count, committed.len(), "every committed transaction applied exactly once");
    let mut logged = check.directory("/crash/tx/log").expect("log");
    logged.sort();
    committed.sort();
    assert_eq!(logged, committed, "exactly the committed transactions are in the store; none reported EAGAIN is");
    let mut closer = Client::connect(&socket).expect("connects");
    closer.transaction(|tx| tx.write("/crash/closer", b"1")).expect("transaction");
    assert_eq!(check.directory("/vigil/clients").expect("markers").len(), 3, "two tx clients and this one");
    closer.close().expect("close removes the marker");
    assert_eq!(check.directory("/vigil/clients").expect("markers").len(), 2);
    let (events, watcher_reconnects) = watcher.join().expect("watcher thread");
    assert!(watcher_reconnects >= 1 && events >= 2, "{watcher_reconnects} reconnects, {events} events");
    assert_eq!(incidents.len(), kills);
    assert!(incidents.iter().all(|i| matches!(&i.cause, Cause::Crashed(s) if s.contains("SIGKILL"))), "{incidents:?}");
    eprintln!(
        "{kills} kills: {total_acked} acknowledged writes, {} committed and {} EAGAIN transactions, watcher reconnected {watcher_reconnects} times",
        committed.len(),
        eagain.len()
    );
    assert!(total_acked > 0 && !committed.is_empty());
}

/// The log is compacted by the server's syncer thread while requests go on (docs/store.md):
/// SIGKILL at random moments while writes of 3.2 KB values make the log pass its 1 MiB
/// threshold every few hundred writes — kills land before, during and after compactions — and
/// every acknowledged write is there afterwards, with its value.
#[test]
fn sigkill_during_compactions_loses_nothing_acknowledged() {
    let (dir, cfg) = setup("compact");
    let socket = cfg.socket.clone();
    let mut sup = Supervisor::start(cfg).expect("store starts");
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2 {
        let (socket, stop) = (socket.clone(), Arc::clone(&stop));
        writers.push(std::thread::spawn(move || {
            let mut c = Client::connect(&socket).expect("writer connects");
            let mut acked = Vec::new();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Rewriting 8 keys: the log grows, the snapshot stays small, so compactions
                // come often.
                let key = format!("/compact/w{w}/k{}", k % 8);
                let value = format!("{k:016}").repeat(200);
                c.write(&key, value.as_bytes()).expect("write acknowledged eventually");
                acked.push((key, k));
                k += 1;
            }
            acked
        }));
    }
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let kills = 8;
    let mut snapshots = 0;
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(40 + rng.below(200)));
        snapshots += usize::from(dir.join("data/snapshot").exists());
        sigkill(sup.pid());
        sup.next_incident(Duration::from_secs(60)).expect("supervisor").expect("no replacement answered within 60 s");
    }
    stop.store(true, Ordering::Relaxed);
    let mut check = Client::connect(&socket).expect("checker connects");
    let mut last = std::collections::BTreeMap::new();
    let mut total = 0;
    for w in writers {
        for (key, k) in w.join().expect("writer thread") {
            last.insert(key, k);
            total += 1;
        }
    }
    for (key, k) in &last {
        let got = check.read(key).expect("acknowledged write present");
        assert_eq!(got, format!("{k:016}").repeat(200).into_bytes(), "{key}: not the last acknowledged value");
    }
    let logs = std::fs::read_dir(dir.join("data"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("log.")?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    eprintln!("{kills} kills: {total} acknowledged writes of 3.2 KB, the log at file {logs}");
    assert!(total > 200 && logs >= 3 && snapshots > 0, "too few compactions to say anything: {total} writes, log file {logs}");
}

#[test]
fn hung_store_is_detected_by_heartbeats_and_replaced() {
    let (_dir, cfg) = setup("hang");
    let socket = cfg.socket.clone();
    let mut sup = Supervisor::start(cfg).expect("store starts");
    let mut c = Client::connect(&socket).expect("connects");
    c.write("/h/before", b"1").expect("write");
    let old = sup.pid();
    let st = std::process::Command::new("kill").args(["-STOP", &old.to_string()]).status().expect("kill runs");
    assert!(st.success());
    let incident = sup.next_incident(Duration::from_secs(60)).expect("supervisor").expect("no replacement answered within 60 s");
    assert_eq!(incident.cause, Cause::Hung { missed: 3 });
    assert_ne!(incident.new_pid, old);
    c.set_request_timeout(Duration::from_millis(500));
    assert_eq!(c.read("/h/before").expect("read after restart"), b"1");
    c.write("/h/after", b"2").expect("write after restart");
}

/// Found by the etcd cluster test under load: a host's store front end restarted while its
/// host was cut off from etcd could not start (it exits when no etcd member answers), and its
/// supervisor gave up for good — the host never had a store again, not even once the link was
/// back. A replacement that cannot start is tried again (with a growing pause) until one does.
#[test]
fn a_replacement_that_cannot_start_yet_is_tried_again_until_one_does() {
    let (dir, cfg) = setup("retry");
    let socket = cfg.socket.clone();
    let mut sup = Supervisor::start(cfg).expect("store starts");
    let mut c = Client::connect(&socket).expect("connects");
    c.write("/r/before", b"1").expect("write");
    // The server's data directory becomes unusable (a file in its place): a new server exits
    // at once.
    let data = dir.join("data");
    let aside = dir.join("data.aside");
    std::fs::rename(&data, &aside).expect("move the data aside");
    std::fs::write(&data, b"not a directory").expect("a file in its place");
    let old = sup.pid();
    sigkill(old);
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        assert!(sup.step().expect("the supervisor goes on while no replacement can start").is_none());
    }
    // Usable again: the next attempt starts a server, with the data written before.
    std::fs::remove_file(&data).expect("remove the file");
    std::fs::rename(&aside, &data).expect("the data back");
    let incident = loop {
        if let Some(i) = sup.step().expect("supervisor") {
            break i;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no server started within 8.5 s of the data's return");
    };
    assert!(matches!(&incident.cause, Cause::Crashed(s) if s.contains("SIGKILL")), "{incident:?}");
    assert_ne!(incident.new_pid, old);
    assert!(incident.recovery >= Duration::from_millis(1500), "{incident:?}");
    c.set_request_timeout(Duration::from_millis(500));
    assert_eq!(c.read("/r/before").expect("read after the restart"), b"1");
}
