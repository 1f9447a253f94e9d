//! vigil's virtual machine monitor on Linux KVM (rust-vmm crates).
//!
//! Owns one machine: guest memory, the vCPU set up to start directly in 64-bit user mode with
//! IOPL 3 on identity-mapped pages (the design for this project's nested-PVM hosts, see
//! DESIGN §3), loading a static ELF unikernel image, the boot information page, the
//! paravirtual devices behind the ports of `vmm-abi` (console, clock, exit, idle, block, network
//! over a tap device), pause/resume, snapshot and restore, dirty-page tracking (KVM's log or
//! comparing against the last checkpoint, chosen per epoch: [`tracking`]), the primitives of
//! checkpoint replication (protection, checkpoints, replicas, takeover: [`checkpoint`]), and the
//! control API over a Unix socket, and the network backend as a process of its own
//! ([`backend`]). It does not own the replication protocol (the `replication`
//! crate drives these primitives), scheduling reservations, or the guests themselves.
//!
//! A misbehaving guest never makes the VMM fail: every malformed request, crash or unexpected
//! exit ends the run with [`Stop::Fault`] and a reason.

pub mod api;
mod arch;
pub mod backend;
pub mod checkpoint;
pub mod control;
pub mod devices;
mod error;
pub mod loader;
mod machine;
pub mod memory;
pub mod mirror;
pub mod sched;
pub mod server;
pub mod snapshot;
pub mod tracking;
mod upcall;

pub use checkpoint::{Checkpoint, DiskWrite, Replica};
pub use control::{channel_pair, Command, Controller, Inbox, Reply};
pub use error::{Error, Result};
pub use machine::{net_receive_ring, pages_of, NetConfig, Status, Stop, Vm, VmConfig};
pub use memory::MemoryView;
pub use mirror::{mirror_channel, MirrorReceiver, MirrorSender};
pub use tracking::{TrackingChoice, TrackingMode};

/// Whether this host has KVM (tests skip only when it does not).
pub fn kvm_available() -> bool {
    std::path::Path::new("/dev/kvm").exists()
}
