//! `store` — vigil's control-plane configuration store, speaking XenStore.
//!
//! It owns:
//! - [`state`]: XenStore semantics as a pure state machine without I/O — hierarchical nodes,
//!   per-domain permissions, watches (including `@introduceDomain` / `@releaseDomain`),
//!   optimistic transactions, quotas. Requests in, replies + watch events + mutations out.
//! - [`wire`]: the XenStore wire protocol (16-byte little-endian header, payload ≤ 4096 bytes),
//!   a framing decoder that never panics on malformed input.
//! - [`path`] and [`perms`]: path validation/canonicalisation and permission strings.
//! - [`log`]: the embedded durable backend — an append-only, checksummed, fsync'ed log of
//!   mutations, replayed on start and compacted into a snapshot.
//! - [`etcd`]: the replicated backend — the same log kept in an etcd cluster through its v3
//!   JSON gateway, one etcd transaction per acknowledged request; several front ends may share
//!   it (each follows the others' appends), and introduced domains live on etcd leases.
//! - [`server`]: the thin driver serving the state machine on a Unix socket (the one Xen's
//!   `libxenstore` reaches through `XENSTORED_PATH`).
//! - [`bench`]: measurements (transactions on large trees, other clients' latency meanwhile).
//! - [`client`]: a typed client with reconnect and retry (exactly-once transactions).
//!
//! It does not own: the shared-memory ring transport used by real guests (there is no Xen
//! hypervisor under vigil), running etcd itself, supervising the server (the `agent` crate's
//! supervisor does), or the policy of what vigil writes where.

pub mod bench;
pub mod client;
mod epoll;
pub mod etcd;
pub mod log;
pub mod path;
pub mod perms;
pub mod server;
pub mod state;
pub mod wire;

pub use client::Client;
pub use state::{ConnId, DomId, Errno, Store};

use std::path::PathBuf;

/// Errors of the store crate. Protocol-level failures that a XenStore client sees as an errno
/// string are [`Errno`]s; this enum is for the Rust API and the drivers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system or socket operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    /// The store answered a request with a XenStore error.
    #[error("{op} {path}: {errno}")]
    Store { op: &'static str, path: String, errno: Errno },
    /// A message on the wire violated the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A log or snapshot file is corrupt somewhere other than its tail.
    #[error("corrupt store file {}: {what} at byte {offset}", path.display())]
    Corrupt { path: PathBuf, offset: u64, what: String },
    /// The server could not be reached before the deadline.
    #[error("store at {} unreachable for {secs:.1} s: {last}", path.display())]
    Unreachable { path: PathBuf, secs: f64, last: String },
    /// No etcd member answered a request (or the cluster refused it).
    #[error("etcd: {0}")]
    Etcd(String),
    /// The server's configuration is wrong (the message names what).
    #[error("{0}")]
    Config(String),
}

impl Error {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { what, path: path.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
