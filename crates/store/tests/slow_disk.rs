//! A slow disk under the store (every `fdatasync` made 300 ms longer, as when other processes
//! keep the disk busy): replies that need the disk wait for it, those of volatile nodes and
//! `XS_CONTROL check` do not — and still leave in order on their connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use store::server::{Config, Server};
use store::wire::{decode, strings, Msg, MsgType};
use store::Client;

const DELAY: Duration = Duration::from_millis(300);

fn start(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vigil-slow-disk-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cfg = Config { volatile: vec!["/hosts/*/heartbeat".into()], ..Config::local(dir.join("sock"), dir.join("data")) };
    let server = Server::bind(&cfg).expect("server binds");
    server.set_sync_delay(DELAY);
    std::thread::spawn(move || server.run());
    cfg.socket
}

/// Every message on `s` until `n` have come.
fn replies(s: &mut UnixStream, n: usize) -> Vec<Msg> {
    let (mut buf, mut out) = (Vec::new(), Vec::new());
    while out.len() < n {
        match decode(&buf) {
            Ok(Some((m, used))) => {
                buf.drain(..used);
                out.push(m);
            }
            Ok(None) => {
                let mut chunk = [0u8; 4096];
                let got = s.read(&mut chunk).expect("reading replies");
                assert!(got > 0, "the server closed the connection");
                buf.extend_from_slice(&chunk[..got]);
            }
            Err(e) => panic!("garbage from the server: {e:?}"),
        }
    }
    out
}

#[test]
fn heartbeats_and_checks_do_not_wait_for_a_slow_disk() {
    let sock = start("heartbeats");
    let mut writer = Client::connect(&sock).unwrap();
    let mut beater = Client::connect(&sock).unwrap();
    // A write of an ordinary node waits for the disk.
    let t = Instant::now();
    writer.write("/vigil/state", b"1").unwrap();
    assert!(t.elapsed() >= DELAY, "an ordinary write was answered before its sync: {:?}", t.elapsed());

    // While one ordinary write waits for its sync, the heartbeat is rewritten and read again
    // and again, and the supervisor's check is answered.
    let slow = std::thread::spawn(move || {
        let t = Instant::now();
        writer.write("/vigil/state", b"2").unwrap();
        t.elapsed()
    });
    let t = Instant::now();
    let mut beats = 0;
    while !slow.is_finished() {
        beats += 1;
        beater.write("/hosts/a/heartbeat", beats.to_string().as_bytes()).unwrap();
        assert_eq!(beater.read("/hosts/a/heartbeat").unwrap(), beats.to_string().as_bytes());
    }
    let slow_took = slow.join().unwrap();
    assert!(slow_took >= DELAY, "{slow_took:?}");
    assert!(beats >= 10, "only {beats} heartbeats written and read back during a {slow_took:?} sync (in {:?})", t.elapsed());

    // A read of an ordinary node waits for what was written before it: a reader never sees what
    // a crash could take back.
    let mut other = Client::connect(&sock).unwrap();
    let mut writer = Client::connect(&sock).unwrap();
    let w = std::thread::spawn(move || writer.write("/vigil/state", b"3").unwrap());
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    let v = other.read("/vigil/state").unwrap();
    assert_eq!(v, b"3", "a read after a write saw the state before it");
    assert!(t.elapsed() >= DELAY / 2, "an ordinary read was answered before the sync it waits for: {:?}", t.elapsed());
    w.join().unwrap();

    // A write of a volatile node inside a transaction is an ordinary write.
    let t = Instant::now();
    beater.transaction_once(|tx| tx.write("/hosts/a/heartbeat", b"in-tx")).unwrap();
    assert!(t.elapsed() >= DELAY, "a transaction did not wait for its sync: {:?}", t.elapsed());
    // And `ping` (XS_CONTROL check, the supervisor's heartbeat) is answered at once.
    let mut writer = Client::connect(&sock).unwrap();
    let w = std::thread::spawn(move || writer.write("/vigil/state", b"4").unwrap());
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    for _ in 0..10 {
        beater.ping().unwrap();
    }
    assert!(t.elapsed() < DELAY / 2, "10 checks waited for the disk: {:?}", t.elapsed());
    w.join().unwrap();
}

#[test]
fn replies_that_answer_at_once_keep_their_connections_order() {
    let sock = start("order");
    let mut s = UnixStream::connect(&sock).unwrap();
    // Pipelined: an ordinary write, a heartbeat, a check, a heartbeat read. Each reply waits
    // for the one before it on this connection, so all four come after the sync, in order.
    let mut out = Vec::new();
    let reqs = [
        Msg::new(MsgType::Write, 1, 0, b"/vigil/x\0value".to_vec()),
        Msg::new(MsgType::Write, 2, 0, b"/hosts/b/heartbeat\x007".to_vec()),
        Msg::new(MsgType::Control, 3, 0, strings(&["check"])),
        Msg::new(MsgType::Read, 4, 0, strings(&["/hosts/b/heartbeat"])),
    ];
    for m in &reqs {
        out.extend(m.encode());
    }
    let t = Instant::now();
    s.write_all(&out).unwrap();
    let got = replies(&mut s, 4);
    assert!(t.elapsed() >= DELAY, "replies came before the first one's sync: {:?}", t.elapsed());
    let ids: Vec<u32> = got.iter().map(|m| m.req_id).collect();
    assert_eq!(ids, [1, 2, 3, 4], "replies out of order: {got:?}");
    assert!(got.iter().all(|m| m.ty != MsgType::Error as u32), "{got:?}");
    assert_eq!(got[3].payload, b"7");

    // Alone, the same heartbeat requests are answered before the disk is: a pipelined burst of
    // 50 comes back in order within one sync.
    let mut out = Vec::new();
    for i in 0..50u32 {
        out.extend(Msg::new(MsgType::Write, 100 + i, 0, format!("/hosts/b/heartbeat\0{i}").into_bytes()).encode());
    }
    let t = Instant::now();
    s.write_all(&out).unwrap();
    let got = replies(&mut s, 50);
    assert!(t.elapsed() < DELAY, "50 heartbeats waited for the disk: {:?}", t.elapsed());
    assert_eq!(got.iter().map(|m| m.req_id).collect::<Vec<_>>(), (100..150).collect::<Vec<_>>());
}

/// A client that sends a write and closes its sending side still gets the reply, which waits
/// for the disk (the connection stays open until it is delivered).
#[test]
fn a_half_closed_connection_gets_the_replies_that_wait_for_the_disk() {
    let sock = start("half-closed");
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(&Msg::new(MsgType::Write, 9, 0, b"/vigil/y\0value".to_vec()).encode()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let got = replies(&mut s, 1);
    assert_eq!((got[0].req_id, got[0].ty), (9, MsgType::Write as u32), "{got:?}");
}

/// A client that pipelines more writes than its bound lets the server read during slow syncs
/// (it is paused, with requests read and waiting) gets every reply, in order, once the disk
/// caught up: the replies that un-pause it also resume the requests it sent meanwhile.
#[test]
fn a_paused_pipelining_writer_gets_every_reply() {
    let sock = start("paused-writer");
    let mut s = UnixStream::connect(&sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let n = 300u32;
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let mut payload = b"/paused\0".to_vec();
        payload.extend(std::iter::repeat_n(b'p', 4000));
        for i in 0..n {
            w.write_all(&Msg::new(MsgType::Write, i, 0, payload.clone()).encode()).expect("send");
        }
    });
    let t = Instant::now();
    let got = replies(&mut s, n as usize);
    writer.join().expect("writer");
    for (i, m) in got.iter().enumerate() {
        assert_eq!((m.ty, m.req_id), (MsgType::Write as u32, i as u32), "reply {i}");
    }
    println!("{n} pipelined writes of 4 KB answered in {:?} with every sync {DELAY:?} longer", t.elapsed());
}
