//! Local redundancy (DESIGN §2, mode `local`): N instances of one VM on one host, fed the same
//! input, their output voted, a faulty instance repaired from a healthy one's snapshot.
//!
//! - [`resp`]: where Redis-protocol requests and replies begin and end;
//! - [`core`]: the voter and its repair protocol as a pure state machine (events in, actions
//!   out, time passed in);
//! - [`driver`]: the thin I/O around it: the VM's one TCP listening address, a connection to
//!   every instance per client connection (each instance in its own network namespace, all
//!   with the same guest address), the instances' VMM processes, snapshot and restore through
//!   their control sockets.
//!
//! Why here (the agent's side, a process of its own per voted VM) and not in the VMM: a VMM
//! runs one VM and knows nothing of its siblings; the voter must see all N, and must vote on
//! *replies*, which exist only above TCP (the instances' TCP stacks segment, acknowledge and
//! time their frames differently, so frames cannot be compared). It owns no VM: a crashed VMM
//! is one fault it masks; a crashed voter takes the VM's address down until it is restarted,
//! like a crashed VMM of a normal-mode VM.

pub mod core;
pub mod driver;
pub mod remote;
pub mod resp;

/// A VM's local redundancy, as its [`crate::VmSpec`] gives it (`vigil up`, model mode
/// `local`): the VM's address is the spec's network address, the guest's port `port`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocalSpec {
    pub instances: usize,
    pub port: u16,
    #[serde(default = "prefer_primary")]
    pub policy: core::Policy,
    #[serde(default = "hang_timeout_ms")]
    pub hang_timeout_ms: u64,
    /// A takeover in mode 4 (local + remote): the replica (a receiver's directory,
    /// [`remote`]) the instances start from. Set by the agent of the backup's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<std::path::PathBuf>,
    /// N-version: instances that run another image, or the spec's with more arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<InstanceVersion>,
}

/// What one instance of a voted VM runs differently from the spec (N-version programming).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstanceVersion {
    /// 0-based instance index.
    pub instance: usize,
    /// Its image, instead of the spec's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<std::path::PathBuf>,
    /// Added to the spec's guest arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
}

fn prefer_primary() -> core::Policy {
    core::Policy::PreferPrimary
}

fn hang_timeout_ms() -> u64 {
    500
}
