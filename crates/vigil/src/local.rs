//! `vigil local`: a VM in local redundancy (mode `local`) on this host: N instances, each in
//! a network namespace of its own, voted behind the VM's one address (`agent::voter` does the
//! work).

use agent::voter::core::{Config, Policy};
use agent::voter::driver::{self, GroupSpec, InstanceSpec};
use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(ClapArgs)]
pub struct Args {
    /// The VM's name (its instances' namespaces are `<netns-prefix><i>`).
    #[arg(long, default_value = "vm")]
    vm: String,
    /// Where clients connect: the VM's one address and port.
    #[arg(long)]
    listen: SocketAddr,
    /// The guest's port (default: the port of --listen).
    #[arg(long)]
    port: Option<u16>,
    /// Number of instances (1-7).
    #[arg(long, short = 'n', default_value_t = 3)]
    instances: usize,
    /// Guest image of every instance.
    #[arg(long)]
    image: PathBuf,
    /// Another image for instance K (N-version), as K=PATH; repeatable.
    #[arg(long, value_name = "K=PATH")]
    image_of: Vec<String>,
    /// More guest arguments for instance K, as K=ARG; repeatable (e.g. `2=wrong=1000`).
    #[arg(long, value_name = "K=ARG")]
    arg_of: Vec<String>,
    /// Guest memory per instance, MiB.
    #[arg(long, default_value_t = 32)]
    mem: u64,
    /// When no reply can win a majority (2 instances disagreeing): `prefer-primary` (send
    /// instance 0's) or `suppress` (send nothing, close the client's connection).
    #[arg(long, default_value = "prefer-primary")]
    policy: Policy,
    /// An instance that leaves a request unanswered this long has hung (ms).
    #[arg(long, default_value_t = 500)]
    hang_timeout_ms: u64,
    /// Control sockets, snapshots, logs, events.jsonl and local.json.
    #[arg(long)]
    dir: PathBuf,
    /// Prefix of the instances' namespace names.
    #[arg(long, default_value = "vgl-")]
    netns_prefix: String,
    /// How long the guests may take to serve at start (ms).
    #[arg(long, default_value_t = 20_000)]
    ready_ms: u64,
    /// Arguments for every guest.
    #[arg(last = true)]
    args: Vec<String>,
}

fn indexed(items: &[String], n: usize, what: &str) -> Result<Vec<(usize, String)>> {
    let mut out = Vec::new();
    for item in items {
        let Some((k, v)) = item.split_once('=') else { bail!("--{what} {item:?}: expected K=VALUE") };
        let k: usize = k.parse().with_context(|| format!("--{what} {item:?}: K is an instance number"))?;
        if k >= n {
            bail!("--{what} {item:?}: there is no instance {k} (instances 0..{n})");
        }
        out.push((k, v.to_string()));
    }
    Ok(out)
}

/// Runs the voted VM until the process is ended; returns the exit status.
pub fn run(a: &Args) -> Result<u8> {
    let n = a.instances;
    if n == 0 || n > agent::voter::core::MAX_INSTANCES {
        bail!("-n {n}: a voted VM has 1 to {} instances", agent::voter::core::MAX_INSTANCES);
    }
    if !a.image.is_file() {
        bail!("image {}: no such file", a.image.display());
    }
    let mut instances: Vec<InstanceSpec> = (0..n)
        .map(|i| InstanceSpec { netns: format!("{}{i}", a.netns_prefix), image: a.image.clone(), mem_mib: a.mem, args: a.args.clone() })
        .collect();
    for (k, path) in indexed(&a.image_of, n, "image-of")? {
        if !std::path::Path::new(&path).is_file() {
            bail!("--image-of {k}={path}: no such file");
        }
        instances[k].image = path.into();
    }
    for (k, arg) in indexed(&a.arg_of, n, "arg-of")? {
        instances[k].args.push(arg);
    }
    let names: Vec<String> = instances.iter().map(|i| i.netns.clone()).collect();
    driver::exit_on_signal(move || {
        for ns in &names {
            driver::delete_netns(ns);
        }
    })?;
    let mut config = Config::new(n, a.policy);
    config.hang_timeout = a.hang_timeout_ms.max(1) * 1_000_000;
    for inst in &instances {
        driver::create_netns(&inst.netns)?;
    }
    let spec = GroupSpec {
        vm: a.vm.clone(),
        listen: a.listen,
        port: a.port.unwrap_or(a.listen.port()),
        instances: instances.clone(),
        vigil: std::env::current_exe().context("cannot find the vigil binary")?,
        dir: a.dir.clone(),
        config,
    };
    let result = driver::run(spec, Duration::from_millis(a.ready_ms));
    for inst in &instances {
        driver::delete_netns(&inst.netns);
    }
    result?;
    Ok(0)
}
