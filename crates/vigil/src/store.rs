//! `vigil store ...`: runs vigil's XenStore-compatible store (the `store` crate) — `serve` one
//! server, or `supervise` one under a supervisor that heartbeats and restarts it.

use crate::Outcome;
use anyhow::Context;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Serve the store on a Unix socket (point xenstore-* tools at it with XENSTORED_PATH).
    Serve {
        /// Unix socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// Directory of the durable log and snapshot.
        #[arg(long)]
        data: PathBuf,
    },
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    match &args.command {
        Command::Serve { socket, data } => {
            let cfg = store::server::Config { socket: socket.clone(), data: data.clone(), quota: Default::default() };
            let server = store::server::Server::bind(&cfg).context("vigil store serve")?;
            eprintln!("vigil store: {} nodes recovered from {}, listening on {}", server.nodes(), data.display(), socket.display());
            server.run().context("vigil store serve")?;
            Ok(Outcome::Ok)
        }
    }
}
