//! Test fixtures of vigil: what the integration tests, the benchmarks and the demonstrations
//! set up around the system under test, never part of it.
//!
//! - [`twohost`]: a two-host testbed in network namespaces (a switch, hosts A and B with a
//!   direct replication link, a client);
//! - [`Proc`]: a process started inside a namespace with its output in a log file;
//! - [`build_guest`]: guest images built from this workspace;
//! - [`redis`]: a long-lived `redis-cli` client, one TCP connection;
//! - [`tapns`]: one namespace with a tap, a `vigil vm run` process on it;
//! - [`etcd`]: a three-member etcd cluster on loopback;
//! - [`browser`]: headless Chromium through chromedriver (WebDriver).
//!
//! Only test code (as a dev-dependency) and the `bench` crate use it; no library of vigil does.

pub mod browser;
pub mod etcd;
mod guest;
mod proc;
pub mod redis;
pub mod tapns;
pub mod twohost;

pub use guest::build_guest;
pub use proc::Proc;

/// `tag` with the prefix in `VIGIL_TEST_NS` (empty if unset) before it: the tag of a test's
/// network namespaces, so that two checkouts running their namespace tests at once (each with
/// its own prefix, one or two characters) do not remove each other's.
pub fn ns_tag(tag: &str) -> String {
    format!("{}{tag}", std::env::var("VIGIL_TEST_NS").unwrap_or_default())
}

/// The root of this workspace (where `cargo build -p GUEST` works).
pub fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds guest `name` of this workspace (see [`build_guest`]).
pub fn guest(name: &str) -> Result<std::path::PathBuf, String> {
    build_guest(&workspace(), name)
}

/// The last `lines` lines (DEBUG lines left out) of every `*.log` file under `dir`, each under
/// its path: what a failed cluster test prints, since its directory goes with it.
pub fn log_tails(dir: &std::path::Path, lines: usize) -> String {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "log") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files);
    files.sort();
    let mut text = String::new();
    for f in files {
        let body = String::from_utf8_lossy(&std::fs::read(&f).unwrap_or_default()).into_owned();
        let kept: Vec<&str> = body.lines().filter(|l| !l.contains(" DEBUG ")).collect();
        text.push_str(&format!("\n==== {} ====\n", f.display()));
        for l in &kept[kept.len().saturating_sub(lines)..] {
            text.push_str(l);
            text.push('\n');
        }
    }
    text
}
