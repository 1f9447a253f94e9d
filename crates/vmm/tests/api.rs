//! The control API against hostile clients, on a real VM: an idle client blocks no one, a
//! line without end is cut off at the limit, bytes that are no request get an error reply,
//! too many clients are told so, and `net-release` is refused while the VM is protected.

mod common;

use common::{guest, scratch, skip_without_kvm, Console};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use vmm::{api, channel_pair, Command, Vm, VmConfig};

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("status");
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok()).expect("VmRSS")
}

fn reply_line(conn: &UnixStream) -> String {
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).expect("reply");
    line
}

fn request(conn: &mut UnixStream, bytes: &[u8]) -> String {
    conn.write_all(bytes).expect("send");
    reply_line(conn)
}

fn status_within(api: &Path, limit: Duration) -> Duration {
    let t = Instant::now();
    let r = api::call(api, &Command::Status).expect("status");
    assert!(r.ok && r.status.is_some(), "{r:?}");
    let took = t.elapsed();
    assert!(took < limit, "status took {took:?}");
    took
}

#[test]
fn hostile_clients_neither_block_nor_bloat_the_api() {
    if skip_without_kvm("hostile_clients_neither_block_nor_bloat_the_api") {
        return;
    }
    let dir = scratch("api");
    let sock = dir.join("api.sock");
    let mut config = VmConfig::new(guest("counter"), 16);
    config.args = vec!["count".into(), "100000".into(), "10".into()];
    let mut vm = Vm::create(config, Console::default().boxed()).expect("create VM");
    let (ctl, inbox) = channel_pair().expect("control channel");
    let _server = api::serve(&sock, ctl.clone()).expect("serve");
    let runner = std::thread::spawn(move || vm.run(Some(&inbox)));

    // An idle client (connected, silent) does not block another one.
    let idle = UnixStream::connect(&sock).expect("connect");
    status_within(&sock, Duration::from_secs(2));

    // Invalid UTF-8, random bytes, a NUL, unknown JSON: each line gets an error, and the
    // connection still serves a good request afterwards.
    let mut c = UnixStream::connect(&sock).expect("connect");
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut random = vec![];
    for _ in 0..300 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x as u8;
        random.push(if b == b'\n' { 0xff } else { b });
    }
    random.push(b'\n');
    for bad in [&b"\xff\xfe\xc3\x28\n"[..], &random, b"\0\n", b"{\"cmd\":\"fly\"}\n", b"{\"cmd\":\"announce\",\"count\":1000000}\n"] {
        let r = request(&mut c, bad);
        assert!(r.starts_with("{\"ok\":false,\"error\":"), "{bad:?}: {r}");
    }
    assert!(request(&mut c, b"{\"cmd\":\"status\"}\n").starts_with("{\"ok\":true"));

    // A line without end: cut off at the limit with an error, the memory stays bounded.
    let before = rss_kib();
    let mut long = UnixStream::connect(&sock).expect("connect");
    long.set_write_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0usize;
    while sent < 256 << 20 {
        match long.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let mut answer = String::new();
    let _ = long.read_to_string(&mut answer);
    assert!(answer.contains("longer than 65536 bytes"), "sent {sent} bytes, answer {answer:?}");
    let grew = rss_kib().saturating_sub(before);
    eprintln!("a line without end: the server took {sent} bytes before answering and closing; the process grew by {grew} KiB");
    assert!(grew < 16 << 10, "RSS grew by {grew} KiB for a {sent}-byte line");
    assert!(sent < 64 << 20, "the server read {sent} bytes of one line before closing");

    // Too many clients: the ones beyond the limit are told so at once; the idle ones are
    // closed after the idle timeout, after which new clients are served again.
    let crowd: Vec<UnixStream> = (0..api::MAX_CLIENTS + 2).map(|_| UnixStream::connect(&sock).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(200));
    let r = api::call(&sock, &Command::Status).expect("a reply");
    assert!(!r.ok && r.error.as_deref().is_some_and(|e| e.contains("too many")), "{r:?}");
    let t = Instant::now();
    let mut served = false;
    while t.elapsed() < api::IDLE_TIMEOUT + Duration::from_secs(5) {
        if api::call(&sock, &Command::Status).is_ok_and(|r| r.ok) {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(served, "no client served after the idle ones timed out");
    let mut idle = idle;
    let mut closing = String::new();
    let _ = idle.read_to_string(&mut closing);
    assert!(closing.contains("no complete request"), "{closing:?}");
    drop(crowd);

    // net-release is refused while the VM is protected (as net-unhold is), accepted after.
    assert!(ctl.call(Command::Protect { mirror: None, hold: false, input: None }).ok);
    let r = api::call(&sock, &Command::NetRelease { epoch: 1 }).expect("reply");
    assert!(!r.ok && r.error.as_deref().is_some_and(|e| e.contains("protected")), "{r:?}");
    let r = api::call(&sock, &Command::NetUnhold).expect("reply");
    assert!(!r.ok && r.error.as_deref().is_some_and(|e| e.contains("protected")), "{r:?}");
    assert!(ctl.call(Command::Unprotect).ok);
    let r = api::call(&sock, &Command::NetRelease { epoch: 1 }).expect("reply");
    assert!(!r.ok && r.error.as_deref().is_some_and(|e| e.contains("no network device")), "{r:?}");

    assert!(api::call(&sock, &Command::Quit).expect("quit").ok);
    runner.join().expect("vCPU thread").expect("run");
    let _ = std::fs::remove_dir_all(&dir);
}
