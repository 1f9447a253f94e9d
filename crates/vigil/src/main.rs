//! `vigil` — the command line of vigil.
//!
//! Thin glue: each subcommand lives in its own module and returns an [`Outcome`] that becomes
//! the exit status. `vigil analyze FILE` loads a system description (the `model` crate),
//! analyses it (`rtc`), and prints a table, JSON (`--json`) or SVG plots of the curves
//! (`--plot DIR`). `vigil plan FILE` computes, for every fault scenario, the reconfiguration
//! (the `planner` crate). `vigil vm …` runs and controls unikernel VMs (the `vmm` crate);
//! `vigil store …` serves or supervises the control-plane store (the `store` crate).
//!
//! Exit status: 0 every deadline holds, 1 a deadline is missed or a bound is unbounded,
//! 2 invalid input or another error (one line on stderr, `file:line:` first).

mod analyze;
mod bench;
mod bench_replication;
mod bench_store;
mod bench_vmm;
mod demo;
mod plan;
mod plot;
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
    Bench(bench::Args),
    /// Run, restore and control unikernel virtual machines (see `vigil vm --help`).
    Vm(vm::Args),
    /// The XenStore-compatible control-plane store: serve it, or supervise it.
    Store(store::Args),
    /// Be the backup host of a protected VM (`vigil vm run --protect`): keep its replica, take
    /// over when the primary dies.
    Backup(replicate::BackupArgs),
    /// Serve the fencing leases that decide which copy of a protected VM may release output.
    Arbiter(replicate::ArbiterArgs),
    /// Demonstrations: `vigil demo failover`.
    Demo(demo::Args),
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

/// The exit status of a command that runs a VM (its own status, or 2 with the error).
fn status(r: anyhow::Result<u8>) -> ExitCode {
    match r {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("{}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(Outcome::Invalid as u8)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Analyze(args) => analyze::run(&args),
        Command::Plan(args) => plan::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Vm(args) => return status(vm::run(&args)),
        Command::Store(args) => store::run(&args),
        Command::Backup(args) => return status(replicate::backup(&args)),
        Command::Arbiter(args) => return status(replicate::arbiter(&args)),
        Command::Demo(args) => return status(demo::run(&args)),
    };
    let outcome = result.unwrap_or_else(|e| {
        eprintln!("{}", format!("{e:#}").replace('\n', " "));
        Outcome::Invalid
    });
    ExitCode::from(outcome as u8)
}
