//! `agent` — vigil's host agent: everything that acts on one host.
//!
//! It owns:
//! - [`host`]: the agent's loop — the host's liveness lease, desired state in the store turned
//!   into running VMM processes, re-adoption after its own restart, self-fencing;
//! - [`cluster`]: the cluster's records in the store and where they live (shared with the
//!   manager);
//! - [`vm`]: running one VM from one [`VmSpec`] (image, memory, network, disk, domain,
//!   protection, CPU placement and scheduling), a backup host's side ([`vm::run_backup`]) and
//!   the fencing arbiter ([`vm::serve_arbiter`]);
//! - [`protection`]: the thin drivers that run `replication`'s primary and backup state
//!   machines over the `vmm` crate, TCP and threads, and their statistics and metrics;
//! - [`migration`]: pre-copy live migration of a running VM (protect it to the destination,
//!   then a planned handover);
//! - [`arbiter`]: the lease table of `replication::lease` served over TCP, and its client;
//! - [`fencing`]: the lease service a replicated VM's copies ask — the arbiter, or the VM's
//!   lease record in the store (no arbiter process when a store is there);
//! - [`domain`]: a VM's registration as a XenStore domain in the control-plane store;
//! - [`voter`]: local redundancy: N instances of a VM behind one address, replies voted,
//!   faulty instances repaired from a healthy one's snapshot;
//! - [`monitor`]: the guests' job marks read from their VMMs, turned into execution times;
//! - [`http`]: the small bounded HTTP server of vigil's endpoints (metrics, dashboard);
//! - [`supervisor`]: runs a host component (the store server) as a child process, heartbeats
//!   it and restarts it alone on a crash or hang.
//!
//! It does not own the protocols (`replication`, `store`), the machine (`vmm`), or decisions
//! about where VMs should run (the manager's).

pub mod arbiter;
pub mod auth;
pub mod cluster;
pub mod domain;
mod error;
pub mod fencing;
pub mod host;
pub mod http;
pub mod migration;
pub mod monitor;
pub mod protection;
pub mod realtime;
pub mod supervisor;
pub mod vm;
pub mod voter;

pub use error::{Error, Result};

/// Replaces the file at `path` with `bytes` atomically and durably: a temporary file beside it,
/// fsync, rename over it, fsync of the directory. A crash at any moment leaves the old
/// contents or the new, never a mix.
pub fn replace_file(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}
pub use vm::VmSpec;
