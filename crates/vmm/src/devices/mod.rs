//! The paravirtual devices behind the ports of `vmm-abi`: each turns one request block into
//! host I/O. A request that breaks the ABI yields `Err(reason)`, which stops the guest.

pub mod block;
pub mod clock;
pub mod console;
pub mod net;
