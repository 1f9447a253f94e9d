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
}

fn fail(ctx: &Ctx, name: &str, span: &Range<usize>, key: Option<&str>, msg: impl Into<String>) -> ModelError {
    ModelError::Invalid { file: ctx.file.to_string(), line: ctx.key_line(span, key), kind: "run", name: name.to_string(), msg: msg.into() }
}

/// Checks the `[[run]]` items against the deployment's VMs.
pub(crate) fn build(raw: &[Spanned<RawRun>], ctx: &Ctx, vms: &[(String, f64)]) -> Result<Vec<Run>, ModelError> {
    let mut out: Vec<Run> = Vec::new();
    for item in raw {
        let span = item.span();
        let r = item.get_ref();
        let f = |key: Option<&str>, msg: String| fail(ctx, &r.vm, &span, key, msg);
        let Some(&(_, reserved)) = vms.iter().find(|(n, _)| *n == r.vm) else {
            let known: Vec<&str> = vms.iter().map(|(n, _)| n.as_str()).collect();
            return Err(f(Some("vm"), format!("no [[vm]] named {:?} with a host (known: {})", r.vm, known.join(", "))));
        };
        if let Some(prev) = out.iter().find(|x| x.vm == r.vm) {
            return Err(f(Some("vm"), format!("the VM already has a [[run]] item at line {}", prev.line)));
        }
        let image = r.image.clone().ok_or_else(|| f(None, "missing key `image` (a guest name such as \"kv\", or a path)".into()))?;
        if image.trim().is_empty() {
            return Err(f(Some("image"), "empty image".into()));
        }
        let memory_mib = match &r.memory {
            None => 64,
            Some(Val::Str(s)) => {
                let q = crate::units::size(s).map_err(|e| f(Some("memory"), e))?;
                let mib = q.to_f64() / (1u64 << 20) as f64;
                if !(1.0..=65536.0).contains(&mib) || mib.fract() != 0.0 {
                    return Err(f(Some("memory"), format!("{s}: a whole number of MiB from 1MiB to 64GiB")));
                }
                if mib * (1u64 << 20) as f64 > reserved {
                    return Err(f(
                        Some("memory"),
                        format!("{s} is more than the {} MiB its [[vm]] reserves on a host", reserved / (1u64 << 20) as f64),
                    ));
                }
                mib as u64
            }
            Some(_) => return Err(f(Some("memory"), "a quantity with a unit, such as \"64MiB\"".into())),
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
        out.push(Run {
            vm: r.vm.clone(),
            line: ctx.line_at(span.start),
            image,
            args: r.args.clone().unwrap_or_default(),
            memory_mib,
            ip,
            port,
            policy: r.policy.clone(),
            net_backend_process,
        });
    }
    Ok(out)
}
