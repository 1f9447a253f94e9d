//! The agent's error type.

use std::path::PathBuf;

/// What can go wrong in the agent; each names the VM, file or component concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system, socket or process operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    /// A VM specification that cannot run (a bad address, a missing image, ...).
    #[error("VM {vm}: {reason}")]
    Spec { vm: String, reason: String },
    /// The VMM refused or failed.
    #[error("VM {vm}: {source}")]
    Vmm { vm: String, source: vmm::Error },
    /// Replication of a VM failed (its driver stopped with this reason).
    #[error("VM {vm}: replication: {reason}")]
    Replication { vm: String, reason: String },
    /// Bad replication settings.
    #[error(transparent)]
    Settings(#[from] replication::Error),
    /// The store refused or could not be reached.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// A cluster record that cannot be read or written, or a cluster rule broken (a second
    /// agent for one host, a fenced host).
    #[error("cluster: {0}")]
    Cluster(String),
    /// A key file that cannot serve as the cluster's key.
    #[error("{0}")]
    Key(String),
    /// A supervised child could not be started or controlled.
    #[error("supervisor: {0}")]
    Supervisor(String),
}

impl Error {
    /// The exit status of a VM's process that ends with this error: invalid input (a VM
    /// specification, replication settings) or a VMM that could not run the VM
    /// ([`crate::vm::status`]).
    pub fn exit_status(&self) -> u8 {
        match self {
            Error::Spec { .. } | Error::Settings(_) => crate::vm::status::INVALID,
            _ => crate::vm::status::VMM_ERROR,
        }
    }

    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { what, path: path.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
