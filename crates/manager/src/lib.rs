//! `manager` — the management unit of vigil's MMS (DESIGN §7): the one component that decides
//! where VMs run.
//!
//! It owns:
//! - [`election`]: leader election through the store (one manager acts, a standby takes over;
//!   generations that only grow);
//! - [`detector`]: host failure detection from the agents' lease heartbeats, a pure state
//!   machine;
//! - [`drift`]: the running VMs' measured execution times against the model's WCETs (alerts,
//!   and the model with the observed values that the plan table is then computed from);
//! - [`interval`]: the `analysed` checkpoint policy chosen again from the measured pauses and
//!   acknowledgements while the VMs run;
//! - [`table`]: the plan table — a `planner` plan for every fault scenario of the current
//!   configuration, in memory and in the store;
//! - [`runtime`]: the cluster's network layout and each VM copy's `VmSpec` from the model;
//! - [`field`]: the model's field side — periodic sources and timing sinks that measure each
//!   chain's end-to-end latency through its running VM;
//! - [`dashboard`]: the web page and Prometheus metrics every manager serves (from the store);
//! - [`daemon`]: the loop that ties them: fence, look up, drive the agents through the
//!   desired state, recompute in the background.
//!
//! It does not run VMs (the agents do), analyse or plan (`rtc`, `planner`), or keep state
//! anywhere but the store.

pub mod daemon;
pub mod dashboard;
pub mod detector;
pub mod drift;
pub mod election;
pub mod field;
pub mod interval;
pub mod local;
pub mod runtime;
pub mod table;
