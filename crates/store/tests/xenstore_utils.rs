//! Debian's xenstore-utils (libxenstore 4.17), unchanged, against vigil's store server started
//! by the test on a Unix socket named by `XENSTORED_PATH`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

mod common;

fn start(name: &str) -> PathBuf {
    common::start("xsutils", name)
}

fn tools_present() -> bool {
    let ok = Path::new("/usr/bin/xenstore-read").exists();
    if !ok {
        println!("SKIPPED: /usr/bin/xenstore-read is absent (install Debian package xenstore-utils; scripts/test does)");
    }
    ok
}

fn tool(sock: &Path, name: &str, args: &[&str]) -> Output {
    Command::new(format!("/usr/bin/{name}"))
        .args(args)
        .env("XENSTORED_PATH", sock)
        .env_remove("XENSTORE_DOMAIN_INTERFACE")
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"))
}

fn ok(sock: &Path, name: &str, args: &[&str]) -> String {
    let o = tool(sock, name, args);
    assert!(o.status.success(), "{name} {args:?}: {} {}", o.status, String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn read_write_ls_list_exists_rm_chmod() {
    if !tools_present() {
        return;
    }
    let s = start("basic");
    ok(&s, "xenstore-write", &["/vm/1/name", "guest one", "/vm/1/state", "running"]);
    assert_eq!(ok(&s, "xenstore-read", &["/vm/1/name"]), "guest one\n");
    assert_eq!(ok(&s, "xenstore-list", &["/vm/1"]), "name\nstate\n");
    assert_eq!(ok(&s, "xenstore-ls", &["/vm"]), "1 = \"\"\n name = \"guest one\"\n state = \"running\"\n");
    assert!(tool(&s, "xenstore-exists", &["/vm/1/name"]).status.success());
    assert!(!tool(&s, "xenstore-exists", &["/vm/2"]).status.success());
    let o = tool(&s, "xenstore-read", &["/vm/2"]);
    assert!(!o.status.success(), "reading a missing node fails");
    ok(&s, "xenstore-chmod", &["/vm/1/name", "r5", "w6"]);
    let perms = ok(&s, "xenstore-ls", &["-p", "/vm/1"]);
    assert!(perms.contains("(r5,w6)"), "{perms}");
    ok(&s, "xenstore-rm", &["/vm/1/state"]);
    assert_eq!(ok(&s, "xenstore-list", &["/vm/1"]), "name\n");
    ok(&s, "xenstore-rm", &["/vm"]);
    assert!(!tool(&s, "xenstore-exists", &["/vm/1/name"]).status.success());
    // Relative paths land under dom0's home.
    ok(&s, "xenstore-write", &["rel/key", "v"]);
    assert_eq!(ok(&s, "xenstore-read", &["/local/domain/0/rel/key"]), "v\n");
    // Invalid paths are refused by the server (EINVAL), not crashed on.
    assert!(!tool(&s, "xenstore-write", &["/bad path", "v"]).status.success());
    assert!(!tool(&s, "xenstore-read", &["/a//b"]).status.success());
    assert_eq!(ok(&s, "xenstore-read", &["/local/domain/0/rel/key"]), "v\n", "server still serves");
}

#[test]
fn many_children_through_directory_part() {
    if !tools_present() {
        return;
    }
    let s = start("big");
    let mut args = Vec::new();
    for i in 0..300 {
        args.push(format!("/big/a-rather-long-child-name-{i:04}"));
        args.push(String::new());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&s, "xenstore-write", &refs);
    let list = ok(&s, "xenstore-list", &["/big"]);
    assert_eq!(list.lines().count(), 300, "more than 4096 bytes of names are listed whole");
}

#[test]
fn watch_fires_initially_and_on_change() {
    if !tools_present() {
        return;
    }
    let s = start("watch");
    ok(&s, "xenstore-write", &["/w/x", "0"]);
    #[allow(clippy::zombie_processes)] // waited for by wait_with_output below
    let child = Command::new("/usr/bin/xenstore-watch")
        .args(["-n", "3", "/w"])
        .env("XENSTORED_PATH", &s)
        .env_remove("XENSTORE_DOMAIN_INTERFACE")
        .stdout(Stdio::piped())
        .spawn()
        .expect("xenstore-watch starts");
    // Write until the watcher has seen its initial event and two changes (it exits after 3).
    let mut waited = Duration::ZERO;
    let mut i = 0;
    let out = loop {
        if let Ok(Some(_)) = child_status(&child) {
            break child.wait_with_output().expect("watch output");
        }
        i += 1;
        ok(&s, "xenstore-write", &[&format!("/w/x{}", i % 2), &i.to_string()]);
        std::thread::sleep(Duration::from_millis(20));
        waited += Duration::from_millis(20);
        assert!(waited < Duration::from_secs(20), "xenstore-watch never saw 3 events");
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0], "/w", "the initial event carries the watched path");
    assert!(lines[1].starts_with("/w/x"), "{text}");
}

fn child_status(c: &std::process::Child) -> std::io::Result<Option<i32>> {
    // `try_wait` needs &mut; poll /proc instead to keep the Child for wait_with_output.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", c.id()))?;
    Ok(stat.split(") ").nth(1).and_then(|s| s.chars().next()).filter(|c| *c == 'Z').map(|_| 0))
}

#[test]
fn introduce_and_release_fire_special_watches_seen_by_xenstore_watch() {
    if !tools_present() {
        return;
    }
    let s = start("special");
    #[allow(clippy::zombie_processes)] // waited for by wait_with_output below
    let child = Command::new("/usr/bin/xenstore-watch")
        .args(["-n", "3", "@releaseDomain"])
        .env("XENSTORED_PATH", &s)
        .env_remove("XENSTORE_DOMAIN_INTERFACE")
        .stdout(Stdio::piped())
        .spawn()
        .expect("xenstore-watch starts");
    let mut c = store::Client::connect(&s).expect("client");
    // Introduce and release domains until the watcher has its initial event and two releases.
    let mut domid = 1;
    loop {
        if let Ok(Some(_)) = child_status(&child) {
            break;
        }
        c.introduce(domid).expect("introduce");
        c.release(domid).expect("release");
        domid += 1;
        assert!(domid < 1000, "xenstore-watch never saw 3 @releaseDomain events");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("watch output");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "@releaseDomain\n@releaseDomain\n@releaseDomain\n");
}
