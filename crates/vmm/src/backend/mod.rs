//! Device backends as their own processes: the network and block backends (`vigil backend net|blk`).
//!
//! Owns the split between the VMM and a backend process and what keeps it safe: the VMM keeps
//! the guest-facing device (the ports of `vmm-abi` and their request blocks, checked as
//! before), output held per epoch for replication, the dirty-page bitmap, and the descriptors
//! (guest memory as a memfd, the tap, a progress page). The backend process maps guest memory
//! and does the device's host I/O: it copies transmitted frames from guest memory to the tap and
//! received frames from the tap into guest buffers. One backend process per VM, started and
//! supervised by its VMM ([`Backend`]): a crash or hang is detected, the process is killed
//! and started again with the same descriptors, and the request in flight is replayed from the
//! progress page, so the guest sees a delay. The network's frames go through shared rings
//! ([`shm::FrameRing`]) rather than requests, so the vCPU rarely waits for the backend: the
//! VMM copies transmitted frames into a transmit ring and goes on, and takes received frames
//! from a receive ring the backend fills ahead; a new backend sends the transmit ring from its
//! tail. The backend runs under a seccomp allow-list ([`confine`]). It does not own the guest
//! ABI (unchanged).
//!
//! Every message ([`wire`]) is parsed and every guest address bounds-checked on both sides; the
//! VMM trusts nothing the backend writes (replies, progress page, ring counters and slots)
//! beyond what it checked.

mod client;
pub mod confine;
pub mod serve;
pub mod shm;
pub mod wire;

pub use client::{Backend, BackendProgram, BackendStatus, Device, Incident, Settler};
pub use serve::serve;
