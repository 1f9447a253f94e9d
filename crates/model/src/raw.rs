//! The file as written: one struct per `[[table]]` kind, unknown keys refused.
//!
//! Values are kept as written ([`Val`]); units are parsed and checked in `validate`, which
//! knows the item and line to blame.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::fmt;
use toml::Spanned;

/// A scalar as written: a quantity with a unit is a string; plain numbers are kept to give a
/// helpful message (or, for `speed`, to be used).
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Int(i64),
    Float(f64),
    Str(String),
}

impl<'de> Deserialize<'de> for Val {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Val, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Val;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a quantity such as \"10ms\", \"1500B\" or \"100Mbit/s\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Val, E> {
                Ok(Val::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Val, E> {
                i64::try_from(v).map(Val::Int).map_err(|_| E::custom("number too large"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Val, E> {
                Ok(Val::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Val, E> {
                Ok(Val::Str(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Val, E> {
                Ok(Val::Str(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    #[serde(default)]
    pub host: Vec<Spanned<RawHost>>,
    #[serde(default)]
    pub processor: Vec<Spanned<RawProcessor>>,
    #[serde(default)]
    pub link: Vec<Spanned<RawLink>>,
    #[serde(default)]
    pub vm: Vec<Spanned<RawVm>>,
    #[serde(default)]
    pub stream: Vec<Spanned<RawStream>>,
    #[serde(default)]
    pub task: Vec<Spanned<RawTask>>,
    #[serde(default)]
    pub chain: Vec<Spanned<RawChain>>,
    /// How VMs run (`vigil up`), see `crate::run`.
    #[serde(default)]
    pub run: Vec<Spanned<crate::run::RawRun>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHost {
    pub name: String,
    pub memory: Option<Val>,
    pub processors: Option<Vec<String>>,
    pub loopback: Option<Val>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProcessor {
    pub name: String,
    pub policy: Option<String>,
    pub speed: Option<Val>,
    pub cycle: Option<Val>,
    pub latency: Option<Val>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLink {
    pub name: String,
    pub bandwidth: Option<Val>,
    pub policy: Option<String>,
    pub cycle: Option<Val>,
    pub latency: Option<Val>,
    /// The host whose network port this link is.
    pub host: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVm {
    pub name: String,
    pub host: Option<String>,
    pub budget: Option<Val>,
    pub period: Option<Val>,
    pub policy: Option<String>,
    pub supply: Option<String>,
    pub cycle: Option<Val>,
    // The VM as one task:
    pub input: Option<String>,
    pub wcet: Option<Val>,
    pub bcet: Option<Val>,
    pub priority: Option<i64>,
    pub deadline: Option<Val>,
    pub slot: Option<Val>,
    // Deployment (hosts, redundancy, replication):
    pub instances: Option<Vec<String>>,
    pub mode: Option<String>,
    pub criticality: Option<i64>,
    pub memory: Option<Val>,
    pub backup: Option<String>,
    pub checkpoint_size: Option<Val>,
    pub checkpoint_interval: Option<Val>,
    pub checkpoint_priority: Option<i64>,
    /// Local redundancy: the voter's delay bound per reply (a component of the analysis).
    pub voting_delay: Option<Val>,
    /// Longest pause of the VM for one checkpoint (its reservation loses that much service
    /// once per `checkpoint_interval`).
    pub checkpoint_pause: Option<Val>,
    /// Longest time a network output of the VM is held until the checkpoint that covers it is
    /// acknowledged (added to chains whose output leaves the VM).
    pub output_commit: Option<Val>,
    /// The backup's staging of a checkpoint and its acknowledgement's way back: the part of an
    /// output's hold after the checkpoint's transfer (the `analysed` policy counts it).
    pub checkpoint_ack: Option<Val>,
    /// VMs it must never share a host with (anti-affinity, symmetric).
    pub apart: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStream {
    pub name: String,
    pub model: Option<String>,
    pub period: Option<Val>,
    pub jitter: Option<Val>,
    pub min_distance: Option<Val>,
    pub burst: Option<i64>,
    pub times: Option<Vec<Val>>,
    pub file: Option<String>,
    pub window: Option<Val>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTask {
    pub name: String,
    pub on: Option<String>,
    pub input: Option<String>,
    pub wcet: Option<Val>,
    pub bcet: Option<Val>,
    pub size: Option<Val>,
    pub min_size: Option<Val>,
    pub priority: Option<i64>,
    pub deadline: Option<Val>,
    pub slot: Option<Val>,
    /// Most work of 1, 2, … consecutive activations (times).
    pub workload_upper: Option<Vec<Val>>,
    /// Least work of 1, 2, … consecutive activations (times).
    pub workload_lower: Option<Vec<Val>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawChain {
    pub name: String,
    pub tasks: Vec<String>,
    pub deadline: Option<Val>,
}
