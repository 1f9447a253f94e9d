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
    /// Run the VM a spec file describes (JSON `agent::VmSpec` with a `local` section, as the
    /// agent writes them for a VM of mode `local`): its address becomes the voter's (added to
    /// the spec's bridge), the instances' namespaces are `vl<pid>-<i>`, state in
    /// `<spec>.local/`.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["listen", "image"])]
    spec: Option<PathBuf>,
    /// The cluster store's socket: faults and repairs go to its event log.
    #[arg(long, value_name = "SOCKET")]
    store: Option<PathBuf>,
    /// Mode 4 (local + remote): be the voted group's backup as the spec file (JSON
    /// `agent::vm::BackupSpec` with a `local` section) says: keep the replica (the primary
    /// voter's snapshot and request log) in `<spec>.local/` until the agent starts the VM
    /// from it.
    #[arg(long, requires = "spec")]
    receive: bool,
    /// Start the instances from this replica (a `--receive` directory) and replay its log
    /// before the VM's address opens (a takeover; the agent sets it in the spec).
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// The VM's name (its instances' namespaces are `<netns-prefix><i>`).
    #[arg(long, default_value = "vm")]
    vm: String,
    /// Where clients connect: the VM's one address and port.
    #[arg(long, required_unless_present = "spec")]
    listen: Option<SocketAddr>,
    /// The guest's port (default: the port of --listen).
    #[arg(long)]
    port: Option<u16>,
    /// Number of instances (1-7).
    #[arg(long, short = 'n', default_value_t = 3)]
    instances: usize,
    /// Guest image of every instance.
    #[arg(long, required_unless_present = "spec")]
    image: Option<PathBuf>,
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
    #[arg(long, required_unless_present = "spec")]
    dir: Option<PathBuf>,
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

/// What to run: from the command line or from a spec file.
struct Plan {
    vm: String,
    listen: SocketAddr,
    port: u16,
    n: usize,
    image: PathBuf,
    mem: u64,
    args: Vec<String>,
    dir: PathBuf,
    prefix: String,
    policy: Policy,
    hang_timeout_ms: u64,
    /// The VM's address, added to this bridge while the voter runs.
    identity: Option<(std::net::Ipv4Addr, String)>,
    /// Mode 4: the backup's address and the cluster's key file; the replication state file.
    backup: Option<(String, PathBuf)>,
    state_file: Option<PathBuf>,
    resume: Option<PathBuf>,
    /// N-version: instances that run another image or more arguments.
    versions: Vec<agent::voter::InstanceVersion>,
}

fn plan(a: &Args) -> Result<Plan> {
    let Some(file) = &a.spec else {
        let (Some(listen), Some(image), Some(dir)) = (a.listen, a.image.clone(), a.dir.clone()) else {
            bail!("--listen, --image and --dir are needed without --spec");
        };
        return Ok(Plan {
            vm: a.vm.clone(),
            listen,
            port: a.port.unwrap_or(listen.port()),
            n: a.instances,
            image,
            mem: a.mem,
            args: a.args.clone(),
            dir,
            prefix: a.netns_prefix.clone(),
            policy: a.policy,
            hang_timeout_ms: a.hang_timeout_ms,
            identity: None,
            backup: None,
            state_file: None,
            resume: a.resume.clone(),
            versions: Vec::new(),
        });
    };
    let text = std::fs::read(file).with_context(|| format!("spec {}", file.display()))?;
    let spec: agent::VmSpec = serde_json::from_slice(&text).with_context(|| format!("spec {}: not a VM spec", file.display()))?;
    let Some(local) = spec.local.clone() else { bail!("spec {}: VM {} has no `local` section", file.display(), spec.name) };
    let Some(net) = spec.net.clone() else {
        bail!("spec {}: VM {} has no network (a voted VM needs its address)", file.display(), spec.name)
    };
    let Some(ip) = net.ip else { bail!("spec {}: VM {} has no address", file.display(), spec.name) };
    let mut dir = file.as_os_str().to_owned();
    dir.push(".local");
    Ok(Plan {
        vm: spec.name.clone(),
        listen: SocketAddr::new(ip.addr.into(), local.port),
        port: local.port,
        n: local.instances,
        image: spec.image.clone(),
        mem: spec.memory_mib,
        args: spec.args.clone(),
        dir: dir.into(),
        prefix: {
            driver::remove_stale_netns();
            format!("vl{}-", std::process::id())
        },
        policy: local.policy,
        hang_timeout_ms: local.hang_timeout_ms,
        identity: net.bridge.map(|b| (ip.addr, b)),
        backup: spec.protection.as_ref().map(|p| (p.backup.clone(), p.key_file.clone())),
        state_file: spec.protection.as_ref().and_then(|p| p.state_file.clone()),
        resume: a.resume.clone().or(local.resume.clone()),
        versions: local.versions.clone(),
    })
}

fn ip(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip").args(args).output().context("cannot run ip (package iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `vigil local --receive --spec FILE`: a voted group's backup (mode 4).
fn receive(a: &Args, file: &std::path::Path) -> Result<u8> {
    let text = std::fs::read(file).with_context(|| format!("spec {}", file.display()))?;
    let spec: agent::vm::BackupSpec =
        serde_json::from_slice(&text).with_context(|| format!("spec {}: not a backup spec", file.display()))?;
    if spec.local.is_none() {
        bail!("spec {}: no `local` section: not the backup of a voted VM (use vigil backup)", file.display());
    }
    let listen: SocketAddr = spec.listen.parse().with_context(|| format!("spec {}: listen {:?}", file.display(), spec.listen))?;
    let key = agent::auth::Key::load(&spec.key_file)?;
    let mut dir = file.as_os_str().to_owned();
    dir.push(".local");
    agent::voter::remote::serve_backup(listen, std::path::Path::new(&dir), &a.vm, key)?;
    Ok(0)
}

/// Runs the voted VM until the process is ended; returns the exit status.
pub fn run(a: &Args) -> Result<u8> {
    if a.receive {
        let Some(file) = &a.spec else { bail!("--receive needs --spec") };
        return receive(a, file);
    }
    let p = plan(a)?;
    let n = p.n;
    if n == 0 || n > agent::voter::core::MAX_INSTANCES {
        bail!("-n {n}: a voted VM has 1 to {} instances", agent::voter::core::MAX_INSTANCES);
    }
    if !p.image.is_file() {
        bail!("image {}: no such file", p.image.display());
    }
    let mut instances: Vec<InstanceSpec> = (0..n)
        .map(|i| InstanceSpec { netns: format!("{}{i}", p.prefix), image: p.image.clone(), mem_mib: p.mem, args: p.args.clone() })
        .collect();
    // N-version from the spec (the model's `[[run.instance]]`), then from the command line.
    for v in &p.versions {
        let Some(inst) = instances.get_mut(v.instance) else {
            bail!("VM {}: a version for instance {} of {n}", p.vm, v.instance + 1);
        };
        if let Some(image) = &v.image {
            if !image.is_file() {
                bail!("VM {} instance {}: image {}: no such file", p.vm, v.instance + 1, image.display());
            }
            inst.image = image.clone();
        }
        inst.args.extend(v.args.iter().cloned());
    }
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
    let identity = p.identity.clone();
    let cleanup = move || {
        for ns in &names {
            driver::delete_netns(ns);
        }
        if let Some((addr, bridge)) = &identity {
            let _ = ip(&["addr", "del", &format!("{addr}/32"), "dev", bridge]);
        }
    };
    driver::exit_on_signal(cleanup.clone())?;
    if let Some((addr, bridge)) = &p.identity {
        // The VM's one network identity, on the host's bridge: clients reach the voter there.
        let _ = ip(&["addr", "del", &format!("{addr}/32"), "dev", bridge]);
        ip(&["addr", "add", &format!("{addr}/32"), "dev", bridge])?;
    }
    let mut config = Config::new(n, p.policy);
    config.hang_timeout = p.hang_timeout_ms.max(1) * 1_000_000;
    // A replica is kept (the local one, and the remote backup's in mode 4): a reply waits
    // until its request is in it.
    config.remote = true;
    let backup = match &p.backup {
        Some((addr, key)) => Some((addr.clone(), agent::auth::Key::load(key)?)),
        None => None,
    };
    // A takeover, or a restart after the voter crashed: the replica is read before anything
    // starts (a bad one is an error, named). The local one is moved aside first (a new one
    // starts in its place).
    let replica = p.dir.join("replica");
    let resume = match &p.resume {
        Some(dir) => {
            let old = p.dir.join("replica.old");
            let dir = if *dir == replica && !replica.join("current").is_file() && old.join("current").is_file() {
                // The voter before this one ended before it had a replica of its own (while
                // its instances were restored: it served nothing): the one it resumed is the
                // state.
                old
            } else if *dir == replica {
                let _ = std::fs::remove_dir_all(&old);
                std::fs::rename(&replica, &old).with_context(|| format!("the replica in {}", replica.display()))?;
                old
            } else {
                // A backup's replica (a takeover): never one its primary went on without.
                if let Some(sock) = &a.store {
                    let mut c = store::Client::connect(sock).context("the cluster store")?;
                    let dropped = c.try_read(&agent::voter::remote::dropped_path(&p.vm)).context("the cluster store")?;
                    if let Err(e) = agent::voter::remote::check_not_dropped(dir, dropped.as_deref()) {
                        // Void, so that no restart of this voter tries it again (the agent
                        // resumes the replica the last voter resumed when it has none of its own).
                        let _ = std::fs::remove_file(dir.join("current"));
                        let what = format!("{}: not taken over from its replica: {e}; it starts without its state", p.vm);
                        let _ = agent::cluster::log_event(&mut c, &agent::cluster::Event::now(&format!("voter:{}", p.vm), what));
                        bail!("{e}");
                    }
                }
                dir.clone()
            };
            Some(agent::voter::remote::read_replica(&dir).with_context(|| format!("the replica in {}", dir.display()))?)
        }
        None => {
            // A fresh start: an earlier life's replica is no state of this one (a restart
            // takes `replica.old` only when the voter that set it aside had none of its own).
            let _ = std::fs::remove_dir_all(p.dir.join("replica.old"));
            None
        }
    };
    for inst in &instances {
        driver::create_netns(&inst.netns)?;
    }
    let spec = GroupSpec {
        vm: p.vm.clone(),
        listen: p.listen,
        port: p.port,
        instances: instances.clone(),
        vigil: std::env::current_exe().context("cannot find the vigil binary")?,
        dir: p.dir.clone(),
        config,
        store: a.store.clone(),
        backup,
        resume,
        announce: p.identity.clone(),
        state_file: p.state_file.clone(),
        replica: Some(replica),
    };
    let result = driver::run(spec, Duration::from_millis(a.ready_ms));
    cleanup();
    result?;
    Ok(0)
}
