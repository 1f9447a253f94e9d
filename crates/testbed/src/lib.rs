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
