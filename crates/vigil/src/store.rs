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

/// Where and how a store server runs (`serve` and `supervise` take the same).
#[derive(clap::Args, Clone)]
struct ServeArgs {
    /// Unix socket to listen on.
    #[arg(long)]
    socket: PathBuf,
    /// Directory of the durable log and snapshot.
    #[arg(long)]
    data: PathBuf,
    /// Keep the log in this etcd cluster instead (comma-separated host:port client endpoints).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Key prefix in etcd.
    #[arg(long, default_value = "vigil/store")]
    etcd_prefix: String,
    /// With --etcd: seconds after the death of this front end until the domains it
    /// introduced are released (the TTL of its etcd lease).
    #[arg(long, default_value_t = 10)]
    etcd_lease_ttl: u64,
    /// A volatile node pattern (repeatable): its reads and writes are answered without waiting
    /// for the disk, and a crash may take back its last writes (for heartbeats). `*` stands
    /// for one path component: `/vigil/hosts/*/heartbeat`.
    #[arg(long, value_name = "PATTERN")]
    volatile: Vec<String>,
}

impl ServeArgs {
    /// The same options as `vigil store serve` arguments.
    fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec!["--socket".into(), self.socket.clone().into(), "--data".into(), self.data.clone().into()];
        if !self.etcd.is_empty() {
            a.extend(["--etcd".into(), self.etcd.join(",").into(), "--etcd-prefix".into(), self.etcd_prefix.clone().into()]);
            a.extend(["--etcd-lease-ttl".into(), self.etcd_lease_ttl.to_string().into()]);
        }
        for v in &self.volatile {
            a.extend(["--volatile".into(), v.into()]);
        }
        a
    }
}

#[derive(clap::Subcommand)]
enum Command {
    /// Serve the store on a Unix socket (point xenstore-* tools at it with XENSTORED_PATH).
    Serve(ServeArgs),
    /// Run `vigil store serve` as a supervised child: heartbeat it, restart it on crash or hang.
    Supervise {
        #[command(flatten)]
        serve: ServeArgs,
        /// Milliseconds between heartbeats.
        #[arg(long, default_value_t = 100)]
        period_ms: u64,
        /// Missed heartbeats in a row that mean the store hangs.
        #[arg(long, default_value_t = 3)]
        misses: u32,
    },
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    match &args.command {
        Command::Serve(ServeArgs { socket, data, etcd, etcd_prefix, etcd_lease_ttl, volatile }) => {
            let etcd = (!etcd.is_empty()).then(|| (etcd.clone(), etcd_prefix.clone()));
            let cfg = store::server::Config {
                socket: socket.clone(),
                data: data.clone(),
                quota: Default::default(),
                etcd,
                etcd_lease_ttl: *etcd_lease_ttl,
                volatile: volatile.clone(),
            };
            let server = store::server::Server::bind(&cfg).context("vigil store serve")?;
            tracing::info!("vigil store: {} nodes recovered from {}, listening on {}", server.nodes(), data.display(), socket.display());
            server.run().context("vigil store serve")?;
            Ok(Outcome::Ok)
        }
        Command::Supervise { serve, period_ms, misses } => {
            let mut args: Vec<std::ffi::OsString> = vec!["store".into(), "serve".into()];
            args.extend(serve.to_args());
            let cfg = agent::supervisor::Config {
                program: std::env::current_exe().context("locating the vigil binary")?,
                args,
                socket: serve.socket.clone(),
                period: std::time::Duration::from_millis((*period_ms).max(1)),
                misses: (*misses).max(1),
                start_timeout: std::time::Duration::from_secs(30),
            };
            let sup = agent::supervisor::Supervisor::start(cfg).context("vigil store supervise")?;
            tracing::info!("vigil store supervise: store running as pid {}", sup.pid());
            let stop = std::sync::atomic::AtomicBool::new(false);
            sup.run(&stop, |i| {
                tracing::warn!(
                    "vigil store supervise: pid {} {:?}; restarted as pid {} in {:.1} ms",
                    i.old_pid,
                    i.cause,
                    i.new_pid,
                    i.recovery.as_secs_f64() * 1e3
                )
            })
            .context("vigil store supervise")?;
            Ok(Outcome::Ok)
        }
    }
}
