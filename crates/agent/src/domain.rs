//! A VM's registration in the control-plane store as a XenStore domain: introduced
//! (`@introduceDomain`, `/local/domain/<domid>/{name,state}`) when it starts, released
//! (`@releaseDomain`, its nodes removed) when it stops.

use crate::{Error, Result};
use std::path::PathBuf;

/// Where a VM is announced: the store's socket and the VM's domain id (1 and up).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DomainSpec {
    pub store: PathBuf,
    pub domid: u32,
}

/// The VM's domain in the store, released when dropped.
pub struct Domain {
    client: store::Client,
    domid: u32,
}

impl Domain {
    /// Introduces domain `spec.domid` named `name` in the store at `spec.store`.
    pub fn introduce(spec: &DomainSpec, name: &str) -> Result<Domain> {
        if spec.domid == 0 {
            return Err(Error::Spec { vm: name.into(), reason: "domain id 0 is the control domain; use 1 and up".into() });
        }
        let mut client = store::Client::connect(&spec.store)?;
        let base = format!("/local/domain/{}", spec.domid);
        client.write(&format!("{base}/name"), name.as_bytes())?;
        client.write(&format!("{base}/state"), b"running")?;
        client.introduce(spec.domid)?;
        Ok(Domain { client, domid: spec.domid })
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let base = format!("/local/domain/{}", self.domid);
        let released = self.client.release(self.domid).and_then(|_| self.client.rm(&base));
        if let Err(e) = released {
            tracing::warn!("store: cannot release domain {}: {e}", self.domid);
        }
    }
}
