//! `rtc` — Modular Performance Analysis with Real-Time Calculus, exact and without I/O.
//!
//! Owns: exact rationals ([`q`]), ultimately pseudo-periodic piecewise-linear curves and their
//! (min,+)/(max,+) operators ([`curve`]), event, resource and workload models ([`models`]), the
//! greedy processing component and scheduling policies ([`component`]), and the analysis of a
//! whole network of components ([`system`]).
//!
//! Does not own: file formats, names, reports or any I/O (see the `model` crate and the `vigil`
//! binary). Every bound here is computed with exact arithmetic and is never optimistic.

pub mod component;
pub mod curve;
pub mod q;

pub use curve::{Curve, CurveError, Seg};
pub use q::Q;
pub mod models;
mod network;
pub mod synthetic;
pub mod system;
