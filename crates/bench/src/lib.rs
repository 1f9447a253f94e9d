//! `bench` — vigil's benchmarks and demonstrations, as library calls the `vigil` binary maps
//! its `bench` and `demo` subcommands to.
//!
//! - [`analysis`]: `vigil bench analysis|plan|vmm|store|replication` (the dispatcher, and the
//!   analysis and planning measurements);
//! - [`vmm`], [`store`], [`replication`]: the VMM, the store and checkpoint replication measured
//!   against real KVM, real clients and real servers;
//! - [`cluster`]: the MMS reacting to host failures of a real cluster, manager failover, plan
//!   table computation;
//! - [`voting`]: local redundancy's cost (latency, throughput) and repair time;
//! - [`rt`]: the loaded-host experiment with real-time VMs (reservations, upcalls);
//! - [`service`]: a CPU-bound service in a VM, unloaded, loaded and reserved;
//! - [`demo`]: `vigil demo failover`.
//!
//! Every figure is a median or a range over repeated runs, printed as a table (or JSON).
//! It sets up its scenes with the `testbed` fixtures; nothing in vigil depends on it but the
//! binary.

pub mod analysis;
pub mod cluster;
pub mod demo;
pub mod replication;
pub mod rt;
pub mod service;
pub mod store;
pub mod tracking;
pub mod vmm;
pub mod voting;
