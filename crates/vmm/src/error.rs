//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in the VMM itself (not in the guest: a misbehaving guest ends
/// its run with [`crate::Stop::Fault`] instead).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM: {op}: {errno}")]
    Kvm { op: &'static str, errno: kvm_ioctls::Error },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("guest image {path}: {reason}")]
    Image { path: PathBuf, reason: String },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("tap device {name}: {reason}")]
    Tap { name: String, reason: String },
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("snapshot {dir}: {reason}")]
    Snapshot { dir: PathBuf, reason: String },
    #[error("control API {path}: {reason}")]
    Api { path: PathBuf, reason: String },
    #[error("checkpoint of epoch {epoch}: {reason}")]
    Checkpoint { epoch: u64, reason: String },
    #[error("replica: {0}")]
    Replica(String),
    #[error("{0}")]
    Os(String),
    #[error("KVM refused the vCPU state: {0}")]
    VcpuRejected(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |errno| Error::Kvm { op, errno }
}

pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { what, path, source }
}
