//! Descriptor exhaustion (issue 14, item 1): the server runs in a child process under
//! `prlimit --nofile=N:N` (soft = hard, so it cannot raise the limit) and gets more connections
//! than the limit allows. It must refuse the surplus, keep serving the clients it has, accept
//! again once descriptors free up, and count all of it in its metrics.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use store::wire::{decode, Msg, MsgType};
use store::Client;

mod common;

const CHILD_ENV: &str = "VIGIL_STORE_FD_TEST_SOCKET";
const LIMIT: u32 = 64;

/// Not a test on its own: the server half, run in a child process by `refuses_beyond_fd_limit`.
#[test]
fn child_server() {
    common::child_server(CHILD_ENV);
}

fn metrics(sock: &Path) -> Option<String> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(&Msg::new(MsgType::Control, 1, 0, b"metrics\0".to_vec()).encode()).ok()?;
    let mut buf = Vec::new();
    loop {
        if let Ok(Some((m, _))) = decode(&buf) {
            return Some(String::from_utf8_lossy(&m.payload).into_owned());
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap_or_else(|| panic!("{name} in {text}"))
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn refuses_beyond_fd_limit() {
    if !Path::new("/usr/bin/prlimit").exists() {
        println!("SKIPPED: /usr/bin/prlimit is absent (util-linux)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("vigil-fd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let sock = dir.join("sock");
    let exe = std::env::current_exe().expect("test binary");
    let child = Command::new("/usr/bin/prlimit")
        .arg(format!("--nofile={LIMIT}:{LIMIT}"))
        .arg(&exe)
        .args(["--exact", "child_server", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &sock)
        .spawn()
        .expect("prlimit starts");
    let mut child = Kill(child);
    let mut good = Client::connect(&sock).expect("client");
    good.write("/fd/before", b"1").expect("write");
    let mut w = Client::connect(&sock).expect("watcher");
    w.watch("/fd/after", "t").expect("watch");
    let initial = w.next_event(Duration::from_secs(5)).expect("event").expect("the initial event");
    assert_eq!(initial.path, "/fd/after");

    // Three times the limit: many are refused (closed at once), none stops the server.
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..3 * LIMIT {
        let Ok(mut s) = UnixStream::connect(&sock) else {
            refused += 1;
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let path = format!("/fd/c{i}\0");
        if s.write_all(&Msg::new(MsgType::Read, i, 0, path.into_bytes()).encode()).is_err() {
            refused += 1;
            continue;
        }
        let mut h = [0u8; 16];
        match s.read_exact(&mut h) {
            Ok(()) => held.push(s),
            Err(_) => refused += 1,
        }
        assert!(child.0.try_wait().expect("child status").is_none(), "the server exited after {i} connections");
    }
    assert!(refused > 0, "more connections than descriptors, yet none refused");
    assert!(!held.is_empty());
    // The clients it had are still served, watches included.
    good.write("/fd/after", b"2").expect("write after the flood");
    assert_eq!(good.read("/fd/before").expect("read"), b"1");
    let ev = w.next_event(Duration::from_secs(5)).expect("event").expect("an event for /fd/after");
    assert_eq!(ev.path, "/fd/after");
    assert_eq!(good.reconnects(), 0, "the good client kept its connection");

    // Descriptors free up: new connections are served again, and the metrics tell the story.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        if let Some(t) = metrics(&sock) {
            break t;
        }
        assert!(Instant::now() < deadline, "no new connection accepted after the flood ended");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(metric(&text, "vigil_store_connections_refused_total") + metric(&text, "vigil_store_accept_errors_total") > 0, "{text}");
    assert!(metric(&text, "vigil_store_connections_max") < u64::from(LIMIT), "{text}");
    assert!(metric(&text, "vigil_store_connections") >= 2, "{text}");
    assert!(child.0.try_wait().expect("child status").is_none(), "the server is still running");
}
