//! `vigil` — the command line of vigil.
//!
//! Thin glue: each subcommand lives in its own module and returns an [`Outcome`] that becomes
//! the exit status. `vigil analyze FILE` loads a system description (the `model` crate),
//! analyses it (`rtc`), and prints a table, JSON (`--json`) or SVG plots of the curves
//! (`--plot DIR`).
//!
//! Exit status: 0 every deadline holds, 1 a deadline is missed or a bound is unbounded,
//! 2 invalid input or another error (one line on stderr, `file:line:` first).

mod analyze;
mod bench;
mod bench_store;
mod plot;
mod store;
mod table;

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
    /// Measure the analysis: time per system size and per curve operation (tables).
    Bench(bench::Args),
    /// The XenStore-compatible control-plane store: serve it, or supervise it.
    Store(store::Args),
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Analyze(args) => analyze::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Store(args) => store::run(&args),
    };
    let outcome = result.unwrap_or_else(|e| {
        eprintln!("{}", format!("{e:#}").replace('\n', " "));
        Outcome::Invalid
    });
    ExitCode::from(outcome as u8)
}
