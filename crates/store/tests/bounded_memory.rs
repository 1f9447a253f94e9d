//! Bounded memory under hostile clients (issue 14, item 2). The server runs in a child process
//! (this test binary, re-executed) so that its resident memory can be read from `/proc` before
//! and after: a watcher that never reads its events, a client that pipelines requests and never
//! reads the replies, and a deep tree.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use store::wire::{decode, Msg, MsgType};
use store::Client;

mod common;
use common::next;

const CHILD_ENV: &str = "VIGIL_STORE_MEM_TEST_SOCKET";

/// Not a test on its own: the server half, run in a child process by the tests below.
#[test]
fn child_server() {
    common::child_server(CHILD_ENV);
}

struct Served {
    child: Child,
    sock: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The data lives in /dev/shm (memory): remove it.
        if let Some(dir) = self.sock.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Served {
    fn start(name: &str) -> Served {
        Served::start_with(name, 0)
    }

    /// A server whose data directory holds about `nodes` nodes at start.
    fn start_with(name: &str, nodes: usize) -> Served {
        // Data on tmpfs where there is one: these tests measure memory, not the disk.
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("vigil-mem-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let sock = dir.join("sock");
        if nodes > 0 {
            store::bench::populate(&sock.with_extension("data"), nodes).expect("populate");
        }
        let exe = std::env::current_exe().expect("test binary");
        let child = Command::new(exe)
            .args(["--exact", "child_server", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &sock)
            .spawn()
            .expect("server child starts");
        let s = Served { child, sock };
        Client::connect(&s.sock).expect("server answers");
        s
    }

    /// Resident memory of the server process, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("server status");
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok()).expect("VmRSS")
    }

    fn metric(&self, name: &str) -> u64 {
        let mut s = UnixStream::connect(&self.sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        s.write_all(&Msg::new(MsgType::Control, 1, 0, b"metrics\0".to_vec()).encode()).expect("send");
        let m = next(&mut s).expect("metrics reply");
        let text = String::from_utf8_lossy(&m.payload).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim_end_matches('\0').parse().ok())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    }
}

/// Reads whole messages until `quiet` passes without data.
fn drain(s: &mut UnixStream, quiet: Duration) -> Vec<Msg> {
    s.set_read_timeout(Some(quiet)).expect("timeout");
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        while let Ok(Some((m, n))) = decode(&buf) {
            out.push(m);
            buf.drain(..n);
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return out,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[test]
fn watcher_that_never_reads() {
    let srv = Served::start("watcher");
    let mut writer = Client::connect(&srv.sock).expect("writer");
    writer.write("/w/x", b"0").expect("write");
    // A watcher with a long token (each event is about 1 KiB) that never reads.
    let token = "t".repeat(1000);
    let mut watcher = UnixStream::connect(&srv.sock).expect("watcher");
    watcher.write_all(&Msg::new(MsgType::Watch, 1, 0, format!("/w\0{token}\0").into_bytes()).encode()).expect("watch");
    std::thread::sleep(Duration::from_millis(200));
    let before = srv.rss_kib();
    let writes = 30_000;
    for i in 0..writes {
        writer.write("/w/x", i.to_string().as_bytes()).expect("write");
    }
    let after = srv.rss_kib();
    println!("slow watcher: {writes} events of ~1 KiB; server RSS {before} -> {after} KiB");
    // Unbounded, the queue would hold about 30 MB of events.
    assert!(after < before + 8 * 1024, "RSS grew from {before} to {after} KiB");
    let dropped = srv.metric("vigil_store_watch_events_dropped_total");
    let queued = srv.metric("vigil_store_output_queued_bytes");
    println!("slow watcher: {dropped} events dropped; {queued} bytes queued");
    assert!(dropped > 0);
    assert!(queued <= 300 * 1024, "{queued} bytes queued");

    // When the watcher reads at last, it gets what was queued, then its watch fires again with
    // its own path (so it re-reads and misses nothing), and then new changes as usual.
    let got = drain(&mut watcher, Duration::from_millis(500));
    let paths: Vec<String> = got.iter().map(|m| String::from_utf8_lossy(&m.payload).split('\0').next().unwrap_or("").to_string()).collect();
    assert!(got.len() > 2 && got.len() < writes, "{} messages", got.len());
    assert_eq!(paths.last().map(String::as_str), Some("/w"), "the last one is the resync event");
    writer.write("/w/x", b"after").expect("write");
    let more = drain(&mut watcher, Duration::from_millis(500));
    assert_eq!(more.len(), 1, "events flow again");
    assert!(more[0].payload.starts_with(b"/w/x\0"));
}

#[test]
fn pipelining_client_that_never_reads() {
    let srv = Served::start("pipeline");
    let mut c = Client::connect(&srv.sock).expect("client");
    c.write("/big", &vec![b'v'; 4000]).expect("write");
    std::thread::sleep(Duration::from_millis(200));
    let before = srv.rss_kib();
    // 50,000 reads of a 4 KB node, never reading a reply: the server stops reading this
    // connection once its replies pile up, so the sender blocks (here: times out).
    let mut hog = UnixStream::connect(&srv.sock).expect("hog");
    hog.set_write_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let req = Msg::new(MsgType::Read, 0, 0, b"/big\0".to_vec());
    let mut sent = 0u32;
    let started = Instant::now();
    for i in 0..50_000u32 {
        let mut m = req.clone();
        m.req_id = i;
        if hog.write_all(&m.encode()).is_err() {
            break;
        }
        sent += 1;
    }
    let after = srv.rss_kib();
    println!(
        "pipelining non-reader: {sent} of 50000 requests accepted before the sender blocked ({:.1} s); server RSS {before} -> {after} KiB",
        started.elapsed().as_secs_f64()
    );
    assert!(sent < 50_000, "the server kept reading a connection whose replies piled up");
    assert!(after < before + 8 * 1024, "RSS grew from {before} to {after} KiB");
    // Everyone else is served meanwhile.
    assert_eq!(c.read("/big").expect("read").len(), 4000);
    assert!(srv.metric("vigil_store_connections_paused_total") >= 1);
    // The hog gets its replies, in order, once it reads.
    let got = drain(&mut hog, Duration::from_millis(500));
    assert!(!got.is_empty());
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.req_id, i as u32);
        assert_eq!(m.payload.len(), 4000);
    }
}

/// Threads of the server process.
fn threads(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("server status");
    status.lines().find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok()).expect("Threads")
}

#[test]
fn ten_thousand_connections_cost_memory_not_threads() {
    let n = 10_000;
    if store::server::raise_fd_limit() < n + 200 {
        println!("SKIPPED: the descriptor limit is below {}", n + 200);
        return;
    }
    let srv = Served::start("conns");
    let mut c = Client::connect(&srv.sock).expect("client");
    c.write("/k", b"v").expect("write");
    let (rss0, threads0) = (srv.rss_kib(), threads(srv.child.id()));
    let mut conns = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut s = UnixStream::connect(&srv.sock).expect("connect");
        // Every tenth connection makes a round trip, so that all are really being served.
        if i % 10 == 0 {
            s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            s.write_all(&Msg::new(MsgType::Read, i as u32, 0, b"/k\0".to_vec()).encode()).expect("send");
            assert_eq!(next(&mut s).expect("reply").payload, b"v");
        }
        conns.push(s);
    }
    let (rss1, threads1) = (srv.rss_kib(), threads(srv.child.id()));
    assert_eq!(srv.metric("vigil_store_connections"), n + 1 + 1, "every connection is open (plus the client and this one)");
    println!(
        "{n} connections: server threads {threads0} -> {threads1}, RSS {rss0} -> {rss1} KiB ({:.2} KiB per connection)",
        (rss1 - rss0) as f64 / n as f64
    );
    assert_eq!(threads1, threads0, "connections cost no threads");
    assert_eq!(c.read("/k").expect("still serving"), b"v");
}

fn raw_call(s: &mut UnixStream, ty: MsgType, tx: u32, payload: &[u8]) -> Msg {
    s.write_all(&Msg::new(ty, 1, tx, payload.to_vec()).encode()).expect("send");
    loop {
        let m = next(s).expect("reply");
        if m.ty != MsgType::WatchEvent as u32 {
            return m;
        }
    }
}

/// Nodes store a path component, not their full path: memory grows with the number of nodes,
/// not with the square of the depth. Forty paths 1,000 levels deep (40,000 nodes).
#[test]
fn deep_paths_cost_linear_memory() {
    let srv = Served::start("deep");
    let mut s = UnixStream::connect(&srv.sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let before = srv.rss_kib();
    for i in 0..40 {
        let path = format!("/d{i}{}", "/a".repeat(1000));
        let m = raw_call(&mut s, MsgType::Write, 0, format!("{path}\0v").as_bytes());
        assert_eq!(m.payload, b"OK\0", "{}", String::from_utf8_lossy(&m.payload));
    }
    let after = srv.rss_kib();
    println!("40 writes 1,001 levels deep: server RSS {before} -> {after} KiB");
    // Full paths per node would hold 40 x 1,001 x ~1 KB = ~40 MB; components hold ~200 bytes
    // a node, plus what one request's mutations (one full path per created node) take, plus a
    // copy of the tree while the log is compacted (the snapshot is written from the copy, on
    // the syncer thread, while requests go on).
    assert!(after < before + 28 * 1024, "RSS grew from {before} to {after} KiB");
    let m = raw_call(&mut s, MsgType::Read, 0, format!("/d39{}\0", "/a".repeat(1000)).as_bytes());
    assert_eq!(m.payload, b"v");
}

/// Starting a transaction copies nothing (copy on touch): ten open transactions on a
/// 100,000-node tree cost next to no memory, and other clients are served meanwhile.
#[test]
fn transactions_on_a_large_tree_copy_nothing() {
    let srv = Served::start_with("tx", 100_000);
    let mut c = Client::connect(&srv.sock).expect("client");
    let key = "/local/domain/0/data/k1";
    assert_eq!(c.read(key).expect("populated"), b"0123456789abcdef");
    let mut s = UnixStream::connect(&srv.sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let before = srv.rss_kib();
    let mut txs = Vec::new();
    for i in 0..10 {
        let m = raw_call(&mut s, MsgType::TransactionStart, 0, b"\0");
        let tx: u32 = String::from_utf8_lossy(&m.payload).trim_end_matches('\0').parse().expect("tx id");
        let m = raw_call(&mut s, MsgType::Read, tx, format!("/local/domain/{i}/data/k5\0").as_bytes());
        assert_eq!(m.payload, b"0123456789abcdef");
        raw_call(&mut s, MsgType::Write, tx, format!("/local/domain/{i}/data/k6\0tx{i}").as_bytes());
        txs.push(tx);
    }
    let after = srv.rss_kib();
    println!("10 open transactions on {} nodes: server RSS {before} -> {after} KiB", 100_000);
    // A copy of the tree per transaction would be tens of MB each.
    assert!(after < before + 2 * 1024, "RSS grew from {before} to {after} KiB");
    // Another client reads and writes meanwhile; the transactions then commit (they touched
    // nothing that changed) and their writes are visible.
    c.write(key, b"changed").expect("write beside open transactions");
    for (i, tx) in txs.into_iter().enumerate() {
        let m = raw_call(&mut s, MsgType::TransactionEnd, tx, b"T\0");
        assert_eq!(m.payload, b"OK\0");
        assert_eq!(c.read(&format!("/local/domain/{i}/data/k6")).expect("read"), format!("tx{i}").as_bytes());
    }
}

#[test]
fn a_writer_pipelining_during_a_slow_sync_is_paused() {
    let srv = Served::start("slowsync");
    let mut c = Client::connect(&srv.sock).expect("client");
    c.write("/k", b"v").expect("write");
    // Every sync 2 s longer: a write's reply, and its record in the log, wait that long.
    c.control(&["sync-delay", "2000"]).expect("sync-delay");
    std::thread::sleep(Duration::from_millis(200));
    let before = srv.rss_kib();
    // 20,000 writes of 4 KB values (80 MB) pipelined and never answered in time: the records
    // queued for the log count against the connection's bound as its replies do, so the
    // server stops reading it after a few hundred KB.
    let mut hog = UnixStream::connect(&srv.sock).expect("hog");
    hog.set_write_timeout(Some(Duration::from_millis(1500))).expect("timeout");
    let mut payload = b"/hog\0".to_vec();
    payload.extend(std::iter::repeat_n(b'w', 4000));
    let mut sent = 0u32;
    for i in 0..20_000u32 {
        if hog.write_all(&Msg::new(MsgType::Write, i, 0, payload.clone()).encode()).is_err() {
            break;
        }
        sent += 1;
    }
    let after = srv.rss_kib();
    println!("pipelining writer during a 2 s sync: {sent} of 20000 writes accepted; server RSS {before} -> {after} KiB");
    // 256 KB of writes, plus what the socket buffers hold.
    assert!(sent < 400, "the server read {sent} writes (of 4 KB) from a writer whose writes wait for the disk");
    assert!(after < before + 8 * 1024, "RSS grew from {before} to {after} KiB");
    // The supervisor's check is still answered at once.
    let t = Instant::now();
    c.control(&["check"]).expect("check");
    assert!(t.elapsed() < Duration::from_millis(1000), "check took {:?}", t.elapsed());
    c.control(&["sync-delay", "0"]).expect("sync-delay off");
}
