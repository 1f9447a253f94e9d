//! `rtc` — Modular Performance Analysis with Real-Time Calculus, exact and without I/O.
//!
//! Owns: exact rationals ([`q`]), ultimately pseudo-periodic piecewise-linear curves and their
//! (min,+)/(max,+) operators ([`curve`]), event, resource and workload models ([`models`]), the
//! greedy processing component and scheduling policies ([`component`]), the analysis of a whole
//! network of components with chains and reservations ([`system`], implemented in `network`),
//! its incremental re-analysis after a change ([`incremental`]),
//! and synthetic systems for benchmarks ([`synthetic`]).
//!
//! Does not own: file formats, names, reports or any I/O (see the `model` crate and the `vigil`
//! binary). Every bound here is computed with exact arithmetic and is never optimistic; what is
//! exact and what is only safe is listed in `docs/analysis.md`.

mod busy_window;
pub mod component;
pub mod curve;
pub mod incremental;
pub mod models;
mod network;
pub mod q;
pub mod synthetic;
pub mod system;

pub use curve::{Curve, CurveError, Seg};
pub use q::Q;
