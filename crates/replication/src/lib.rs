//! Remus-style checkpoint replication of a VM to a backup host (DESIGN §4).
//!
//! Owns the protocol between a primary and its backup and everything that decides it:
//! - [`primary`] and [`backup`]: each side as a pure state machine (events in, actions out,
//!   time passed in), tested deterministically through delays, losses, reordering and crashes;
//! - [`wire`]: the checksummed frames on the TCP connection;
//! - [`policy`]: when to checkpoint (`fixed:T`, `floating`, `network`, `adaptive`);
//! - [`lease`]: fencing — the arbiter's lease table and its line protocol;
//! - [`stored`]: fencing without an arbiter — the lease as a record in the cluster's store,
//!   decided by each copy in a store transaction;
//! - [`compress`]: when to compress a checkpoint's pages on the wire, and how;
//! - [`delta`]: checkpoint pages as their XOR against the backup's copy, checked at both ends.
//!
//! It does no I/O and does not own the VM: the drivers in the `agent` crate perform the
//! actions with the `vmm` crate (pause, dirty pages, held output, replica), sockets and
//! threads, and serve the arbiter.

pub mod backup;
pub mod compress;
pub mod delta;
pub mod lease;
pub mod policy;
pub mod primary;
pub mod stored;
pub mod wire;

pub use policy::PolicySpec;

/// What can be wrong with replication's settings and protocol lines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A checkpoint policy that does not parse.
    #[error("checkpoint policy {name:?}: {reason}")]
    Policy { name: String, reason: String },
    /// Heartbeat and lease timing that break the protocol's assumptions.
    #[error("{0}")]
    Timing(String),
    /// A lease request or answer that does not parse.
    #[error("{0}")]
    Lease(String),
    /// A compression setting that does not parse.
    #[error("{0}")]
    Compression(String),
}

/// Timing of heartbeats, failure detection and the lease, shared by both sides (ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Send a heartbeat after this long without sending anything.
    pub heartbeat_ns: u64,
    /// The peer is suspected after this long without hearing from it.
    pub timeout_ns: u64,
    /// Lease duration granted by the arbiter.
    pub lease_ttl_ns: u64,
    /// The primary renews its lease this often (well under the ttl).
    pub lease_renew_ns: u64,
    /// The primary tries to reach a backup again after this long.
    pub reconnect_ns: u64,
}

impl Default for Timing {
    fn default() -> Self {
        const MS: u64 = 1_000_000;
        Timing { heartbeat_ns: 10 * MS, timeout_ns: 60 * MS, lease_ttl_ns: 90 * MS, lease_renew_ns: 20 * MS, reconnect_ns: 200 * MS }
    }
}

impl Timing {
    /// Checks the relations the protocol relies on.
    pub fn validate(&self) -> Result<(), Error> {
        if self.heartbeat_ns == 0 || self.heartbeat_ns >= self.timeout_ns {
            return Err(Error::Timing(format!(
                "the heartbeat interval ({} ms) must be positive and below the timeout ({} ms)",
                self.heartbeat_ns / 1_000_000,
                self.timeout_ns / 1_000_000
            )));
        }
        if self.lease_renew_ns == 0 || self.lease_renew_ns * 2 > self.lease_ttl_ns {
            return Err(Error::Timing(format!(
                "the lease renewal interval ({} ms) must be positive and at most half the lease ({} ms)",
                self.lease_renew_ns / 1_000_000,
                self.lease_ttl_ns / 1_000_000
            )));
        }
        Ok(())
    }
}
