//! What running a VM needs beyond the analysis (the `[[run]]` items): the guest image and its
//! arguments, the memory the VMM gives it, its address, the port its clients use. `vigil up`
//! reads them; `vigil analyze` and `vigil plan` ignore them.
//!
//! ```toml
//! [[run]]
//! vm = "relay"            # a [[vm]] of the deployment
//! image = "kv"            # a guest of this workspace (built by `vigil up`) or a path
//! args = []               # handed to the guest
//! memory = "64MiB"        # what the VMM gives it (the [[vm]]'s memory is what the plan reserves)
//! ip = "10.99.0.50/24"    # its address on the cluster's LAN
//! port = 6379             # the TCP port its clients use (probed by `vigil status`)
//! policy = "adaptive"     # checkpoint policy in remote-backup mode
//! disk = "64MiB"          # a disk of its own on every host that holds a copy (mirrored to its backup)
//! blk_backend = "process" # the disk's host I/O in a supervised process (default "vmm")
//!
//! # N-version (modes local and local+remote): instance K of the voted VM (1-based, as in
//! # `vigil fail --instance relay#K`) runs another image, or the same with more arguments.
//! [[run.instance]]
//! number = 3
//! image = "kv"            # the run's image when left out
//! args = ["wrong=1000"]   # added to the run's args
//! ```

use crate::error::ModelError;
use crate::raw::Val;
use crate::validate::Ctx;
use serde::Deserialize;
use std::ops::Range;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRun {
    pub vm: String,
    pub image: Option<String>,
    pub args: Option<Vec<String>>,
    pub memory: Option<Val>,
    pub ip: Option<String>,
    pub port: Option<i64>,
    pub policy: Option<String>,
    pub net_backend: Option<String>,
    pub disk: Option<Val>,
    pub blk_backend: Option<String>,
    pub instance: Option<Vec<Spanned<RawInstance>>>,
}

impl RawRun {
    /// Moves the spans of its instances by `offset` (a file read in parts).
    pub(crate) fn shift(&mut self, offset: usize) {
        for i in self.instance.iter_mut().flatten() {
            let span = i.span();
            *i = Spanned::new(span.start + offset..span.end + offset, std::mem::take(i.get_mut()));
        }
    }
}

/// One `[[run.instance]]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInstance {
    pub number: Option<i64>,
    pub image: Option<String>,
    pub args: Option<Vec<String>>,
}

/// What one instance of a voted VM runs differently (N-version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// 0-based instance index (`number` − 1).
    pub instance: usize,
    /// Its image (a guest name or a path), instead of the run's.
    pub image: Option<String>,
    /// Added to the run's arguments.
    pub args: Vec<String>,
}

/// How one VM runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub vm: String,
    pub line: usize,
    /// A guest package name of this workspace, or a path to an image.
    pub image: String,
    pub args: Vec<String>,
    pub memory_mib: u64,
    /// Address and prefix length on the cluster's LAN, as written (`10.99.0.50/24`).
    pub ip: Option<(std::net::Ipv4Addr, u8)>,
    pub port: Option<u16>,
    /// Checkpoint policy name, checked by the replication crate when the VM starts.
    pub policy: Option<String>,
    /// The network backend runs as a process of its own (`net_backend = "process"`), not
    /// inside the VMM (`"vmm"`, the default).
    pub net_backend_process: bool,
    /// The size of its disk (MiB), if it has one: each host that runs or backs up the VM keeps
    /// its own copy (a new, zeroed one where it has none), mirrored to the backup with every
    /// checkpoint in remote-backup mode.
    pub disk_mib: Option<u64>,
    /// The disk's backend runs as a process of its own (`blk_backend = "process"`).
    pub blk_backend_process: bool,
    /// Instances that run another image or more arguments (N-version), by instance.
    pub versions: Vec<Version>,
}

impl Run {
    /// Every image the VM's instances run (the run's first).
    pub fn images(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.image.as_str()).chain(self.versions.iter().filter_map(|v| v.image.as_deref()))
    }
}

/// A value as written (for errors).
fn val_text(v: &Val) -> String {
    match v {
        Val::Str(s) => s.clone(),
        _ => String::new(),
    }
}

fn fail(ctx: &Ctx, name: &str, span: &Range<usize>, key: Option<&str>, msg: impl Into<String>) -> ModelError {
    ModelError::Invalid { file: ctx.file.to_string(), line: ctx.key_line(span, key), kind: "run", name: name.to_string(), msg: msg.into() }
}

/// What a `[[run]]` item is checked against: a VM of the deployment.
pub(crate) struct VmFacts {
    pub name: String,
    /// Bytes it reserves on a host.
    pub memory: f64,
    /// Its instances (more than one in local redundancy).
    pub instances: usize,
}

/// Checks the `[[run]]` items against the deployment's VMs.
pub(crate) fn build(raw: &[Spanned<RawRun>], ctx: &Ctx, vms: &[VmFacts]) -> Result<Vec<Run>, ModelError> {
    let mut out: Vec<Run> = Vec::new();
    for item in raw {
        let span = item.span();
        let r = item.get_ref();
        let f = |key: Option<&str>, msg: String| fail(ctx, &r.vm, &span, key, msg);
        let Some(facts) = vms.iter().find(|v| v.name == r.vm) else {
            let known: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
            return Err(f(Some("vm"), format!("no [[vm]] named {:?} with a host (known: {})", r.vm, known.join(", "))));
        };
        if let Some(prev) = out.iter().find(|x| x.vm == r.vm) {
            return Err(f(Some("vm"), format!("the VM already has a [[run]] item at line {}", prev.line)));
        }
        let image = r.image.clone().ok_or_else(|| f(None, "missing key `image` (a guest name such as \"kv\", or a path)".into()))?;
        if image.trim().is_empty() {
            return Err(f(Some("image"), "empty image".into()));
        }
        // A size in whole MiB, 1MiB to 64GiB.
        let mib = |key: &str, v: &Val| -> Result<u64, ModelError> {
            let Val::Str(s) = v else { return Err(f(Some(key), "a quantity with a unit, such as \"64MiB\"".into())) };
            let q = crate::units::size(s).map_err(|e| f(Some(key), e))?;
            let mib = q.to_f64() / (1u64 << 20) as f64;
            if !(1.0..=65536.0).contains(&mib) || mib.fract() != 0.0 {
                return Err(f(Some(key), format!("{s}: a whole number of MiB from 1MiB to 64GiB")));
            }
            Ok(mib as u64)
        };
        let memory_mib = match &r.memory {
            None => 64,
            Some(v) => {
                let m = mib("memory", v)?;
                if (m << 20) as f64 > facts.memory {
                    return Err(f(
                        Some("memory"),
                        format!(
                            "{} is more than the {} MiB its [[vm]] reserves on a host",
                            val_text(v),
                            facts.memory / (1u64 << 20) as f64
                        ),
                    ));
                }
                m
            }
        };
        let disk_mib = match &r.disk {
            None => None,
            Some(_) if facts.instances > 1 => {
                return Err(f(
                    Some("disk"),
                    format!(
                        "the VM runs {} voted instances, which cannot share one disk (a disk per instance is not supported)",
                        facts.instances
                    ),
                ))
            }
            Some(v) => Some(mib("disk", v)?),
        };
        let blk_backend_process = match r.blk_backend.as_deref() {
            None | Some("vmm") => false,
            Some("process") if disk_mib.is_none() => {
                return Err(f(Some("blk_backend"), "the VM has no disk: give the [[run]] a `disk` (its size) first".into()))
            }
            Some("process") => true,
            Some(other) => return Err(f(Some("blk_backend"), format!("{other:?}: \"vmm\" or \"process\""))),
        };
        let ip = match &r.ip {
            None => None,
            Some(s) => {
                let (a, p) = s.split_once('/').unwrap_or((s, "24"));
                let addr = a.parse().map_err(|_| f(Some("ip"), format!("{s:?} is not an IPv4 address")))?;
                let prefix = p
                    .parse::<u8>()
                    .ok()
                    .filter(|p| (8..=30).contains(p))
                    .ok_or_else(|| f(Some("ip"), format!("{s:?}: prefix length 8 to 30")))?;
                if let Some(other) = out.iter().find(|x| x.ip.map(|i| i.0) == Some(addr)) {
                    return Err(f(Some("ip"), format!("{a} is VM {:?}'s address too", other.vm)));
                }
                Some((addr, prefix))
            }
        };
        let port = match r.port {
            None => None,
            Some(p) => Some(u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| f(Some("port"), format!("{p} is not a TCP port")))?),
        };
        let net_backend_process = match r.net_backend.as_deref() {
            None | Some("vmm") => false,
            Some("process") => true,
            Some(other) => return Err(f(Some("net_backend"), format!("{other:?}: \"vmm\" or \"process\""))),
        };
        let mut versions: Vec<Version> = Vec::new();
        for inst in r.instance.iter().flatten() {
            let ispan = inst.span();
            let i = inst.get_ref();
            let fi = |key: Option<&str>, msg: String| fail(ctx, &r.vm, &ispan, key, format!("[[run.instance]]: {msg}"));
            let n = facts.instances;
            if n < 2 {
                return Err(fi(None, "the VM runs one instance: give its [[vm]] `instances` (mode local or local+remote) first".into()));
            }
            let number = i.number.ok_or_else(|| fi(None, format!("missing key `number` (which instance: 1 to {n})")))?;
            let k = usize::try_from(number)
                .ok()
                .filter(|k| (1..=n).contains(k))
                .ok_or_else(|| fi(Some("number"), format!("{number}: the VM has {n} instances, numbered 1 to {n}")))?;
            if versions.iter().any(|v| v.instance == k - 1) {
                return Err(fi(Some("number"), format!("instance {k} is given twice")));
            }
            if i.image.as_deref().is_some_and(|im| im.trim().is_empty()) {
                return Err(fi(Some("image"), "empty image".into()));
            }
            if i.image.is_none() && i.args.as_ref().is_none_or(Vec::is_empty) {
                return Err(fi(None, format!("instance {k} runs like the others: give it an `image` or `args`")));
            }
            versions.push(Version { instance: k - 1, image: i.image.clone(), args: i.args.clone().unwrap_or_default() });
        }
        versions.sort_by_key(|v| v.instance);
        out.push(Run {
            versions,
            vm: r.vm.clone(),
            line: ctx.line_at(span.start),
            image,
            args: r.args.clone().unwrap_or_default(),
            memory_mib,
            ip,
            port,
            policy: r.policy.clone(),
            net_backend_process,
            disk_mib,
            blk_backend_process,
        });
    }
    Ok(out)
}
