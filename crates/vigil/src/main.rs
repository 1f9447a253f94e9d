//! `vigil` — the command line of vigil.
//!
//! Thin glue: each subcommand lives in its own module and returns an [`Outcome`] that becomes
//! the exit status. `vigil analyze FILE` loads a system description (the `model` crate),
//! analyses it (`rtc`), and prints a table, JSON (`--json`) or SVG plots of the curves
//! (`--plot DIR`). `vigil plan FILE` computes, for every fault scenario, the reconfiguration
//! (the `planner` crate). `vigil vm …` runs and controls unikernel VMs (the `vmm` crate);
//! `vigil store …` serves or supervises the control-plane store (the `store` crate);
//! `vigil backup` and `vigil arbiter` run a backup host and the fencing arbiter, and
//! `vigil vm run` a VM from its spec (the `agent` crate); `vigil bench …` and `vigil demo …`
//! are the `bench` crate's.
//!
//! Exit status: 0 every deadline holds, 1 a deadline is missed or a bound is unbounded,
//! 2 invalid input or another error (one line on stderr, `file:line:` first).

mod analyze;
mod cluster;
mod local;
mod plan;
mod replicate;
mod store;
mod table;
mod vm;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "vigil", version, about = "Keeps critical virtual machines running on time")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Analyse a system description: worst/best-case latencies, backlogs, utilisation, verdicts.
    Analyze(analyze::Args),
    /// Plan the reconfiguration for every fault scenario (hosts, and links with --links).
    Plan(plan::Args),
    /// Measure the analysis, the planner, the VMM, the store or replication: tables.
    Bench(bench::analysis::Args),
    /// Run, restore and control unikernel virtual machines (see `vigil vm --help`).
    Vm(vm::Args),
    /// Run a VM in local redundancy: N instances on this host, replies voted, faulty
    /// instances repaired from a healthy one's snapshot.
    Local(local::Args),
    /// The XenStore-compatible control-plane store: serve it, or supervise it.
    Store(store::Args),
    /// Be the backup host of a protected VM (`vigil vm run --protect`): keep its replica, take
    /// over when the primary dies.
    Backup(replicate::BackupArgs),
    /// Serve the fencing leases that decide which copy of a protected VM may release output.
    Arbiter(replicate::ArbiterArgs),
    /// The cluster key that authenticates replication, leases and the policy switch: make
    /// one, or print the bearer token of `POST /policy`.
    Key(replicate::KeyArgs),
    /// Bring up a cluster on this machine from a model: hosts as network namespaces, the
    /// store, the arbiter, an agent per host, the managers, every VM.
    Up(cluster::UpArgs),
    /// The cluster's hosts, VMs, plan in force and events (exit 0 when all is well).
    Status(cluster::StatusArgs),
    /// Fault injection: kill a host's agent and VMMs (SIGKILL) and cut its link.
    Fail(cluster::FailArgs),
    /// What the cluster measures of one VM (execution times, replication, chains, events), as JSON.
    Trace(cluster::TraceArgs),
    /// Stop the cluster and remove its namespaces.
    Down(cluster::DirArgs),
    /// Be the agent of one host: run what the manager places there.
    Agent(cluster::AgentArgs),
    /// Be a manager: elected leader, it executes the plan for every host failure.
    Manager(cluster::ManagerArgs),
    /// Be the field side of the model: periodic sources and timing sinks per chain.
    Field(cluster::FieldArgs),
    /// Be the keeper of a `vigil up` cluster: start its arbiter, field and managers again when
    /// they die (started by `vigil up`).
    Keep(cluster::FieldArgs),
    /// Demonstrations: `vigil demo failover`.
    Demo(bench::demo::Args),
    /// Be a device backend process (started by a VMM with its descriptors, never by hand).
    #[command(hide = true)]
    Backend(BackendArgs),
}

#[derive(clap::Args)]
struct BackendArgs {
    /// Which device: `net` or `blk`.
    device: String,
    /// The VM served (a label for `ps` and `vigil fail --component net --vm VM`).
    #[arg(long)]
    vm: Option<String>,
}

/// `vigil backend net|blk`: serves the VMM that started it until it closes the socket.
fn backend(a: &BackendArgs) -> anyhow::Result<u8> {
    if a.device != "net" && a.device != "blk" {
        anyhow::bail!("backend {:?}: `net` or `blk`", a.device);
    }
    vmm::backend::serve().map_err(|e| anyhow::anyhow!("{} backend of {}: {e}", a.device, a.vm.as_deref().unwrap_or("a VM")))?;
    Ok(0)
}

/// How a command ended, as far as the exit status is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every deadline holds.
    Ok = 0,
    /// A deadline is missed, or a bound is unbounded.
    Miss = 1,
    /// Invalid input (or another error).
    Invalid = 2,
}

/// The exit status of a command that returns its own (or 2 with the error).
fn status(r: anyhow::Result<u8>) -> ExitCode {
    match r {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("{}", describe(&e));
            ExitCode::from(Outcome::Invalid as u8)
        }
    }
}

/// An error and its causes on one line, each cause said once (an error's message often
/// includes its source's already).
pub(crate) fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string().replace('\n', " ");
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// Log lines (`tracing`) on stderr: info and up, or the level in `VIGIL_LOG`
/// (error, warn, info, debug, trace).
fn init_logging() {
    let level = std::env::var("VIGIL_LOG").ok().and_then(|l| l.parse().ok()).unwrap_or(tracing::Level::INFO);
    let level = if std::env::var_os("VIGIL_DEBUG").is_some() { tracing::Level::DEBUG } else { level };
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).with_target(false).with_max_level(level).init();
}

/// Commands that only print a report end quietly when their reader goes away (`vigil status |
/// head`), as Unix tools do; the long-running ones (servers, agents, VMMs) keep SIGPIPE ignored
/// so that a peer closing a socket is an error to handle, not their death.
fn printing_only(c: &Command) -> bool {
    matches!(c, Command::Analyze(_) | Command::Plan(_) | Command::Status(_) | Command::Trace(_))
}

/// For a short process that allocates and frees many curves (`vigil analyze`): glibc's
/// allocator keeps what is freed for reuse instead of returning it to the kernel. By default a
/// block of 128 KiB or more (the TOML reader's token lists, long curves) is mapped on its own
/// and unmapped when freed, and the heap's free top is trimmed: the next allocations then fault
/// the same memory back in page by page. On the pyCPA comparison's file this takes a fifth of
/// the page faults away. Does nothing on other C libraries.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // Blocks up to the largest threshold glibc accepts (32 MiB) come from the heap, and
        // the heap is trimmed only once 64 MiB at its top are free.
        // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if printing_only(&cli.command) {
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if matches!(cli.command, Command::Analyze(_)) {
        keep_freed_memory();
    }
    init_logging();
    let result = match cli.command {
        Command::Analyze(args) => analyze::run(&args),
        Command::Plan(args) => plan::run(&args),
        Command::Bench(args) => bench::analysis::run(&args).map(|()| Outcome::Ok),
        Command::Vm(args) => return status(vm::run(&args)),
        Command::Local(args) => return status(local::run(&args)),
        Command::Store(args) => store::run(&args),
        Command::Backup(args) => return status(replicate::backup(&args)),
        Command::Arbiter(args) => return status(replicate::arbiter(&args)),
        Command::Key(args) => return status(replicate::key(&args)),
        Command::Demo(args) => return status(bench::demo::run(&args)),
        Command::Up(args) => return status(cluster::up(&args)),
        Command::Status(args) => return status(cluster::status(&args)),
        Command::Fail(args) => return status(cluster::fail(&args)),
        Command::Trace(args) => return status(cluster::trace(&args)),
        Command::Down(args) => return status(cluster::down(&args)),
        Command::Agent(args) => return status(cluster::agent(&args)),
        Command::Manager(args) => return status(cluster::manager(&args)),
        Command::Field(args) => return status(cluster::field(&args)),
        Command::Keep(args) => return status(cluster::keep(&args)),
        Command::Backend(args) => return status(backend(&args)),
    };
    let outcome = result.unwrap_or_else(|e| {
        eprintln!("{}", describe(&e));
        Outcome::Invalid
    });
    ExitCode::from(outcome as u8)
}
