//! `vigil bench analysis`: how long a full analysis takes as systems grow, and what the curve
//! operations underneath cost. `vigil bench plan`: how long planning every single-host failure
//! takes for synthetic clusters, against what full re-analyses would cost. Prints tables (or
//! JSON); timings are medians of repeated runs.

use anyhow::Context;
use rtc::component::{self, Workload};
use rtc::models::{self, EventModel};
use rtc::q::Q;
use rtc::synthetic;
use rtc::system::{analyze, Options};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// What to measure.
    #[arg(value_enum, default_value = "analysis")]
    what: What,
    /// System sizes in tasks (3-hop chains over shared links, 10 tasks per processor).
    #[arg(long, value_delimiter = ',', default_values_t = vec![10, 100, 1000, 10000])]
    sizes: Vec<usize>,
    /// Repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Skip the (slower) runs with GPC completion curves.
    #[arg(long)]
    no_gpc_outputs: bool,
    /// Cluster sizes for `plan`, as VMSxHOSTS.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["50x5".to_string(), "200x20".to_string(), "1000x100".to_string()])]
    clusters: Vec<String>,
    /// `plan`: validate every plan by a full analysis (the default validates incrementally
    /// from the initial placement's analysis; both give the same plans).
    #[arg(long)]
    full_validation: bool,
    /// Also write each synthetic cluster to DIR/cluster-VMSxHOSTS.toml (for `vigil plan`).
    #[arg(long, value_name = "DIR")]
    save: Option<std::path::PathBuf>,
    /// `vmm`: directory with the release-built guests (and kv-native).
    #[arg(long, default_value = "target/release")]
    guests: std::path::PathBuf,
    /// `store`: operations per measurement.
    #[arg(long, default_value_t = 2000)]
    ops: usize,
    /// `store`: crashes and hangs injected (each); `monitoring`: rounds of marks on and off;
    /// `replication`: rounds of every policy, interleaved, medians shown (default 5; 1 for
    /// `replication`).
    #[arg(long)]
    rounds: Option<usize>,
    /// `policies`: the checkpoint policies to run (names, `analysed` included; default
    /// fixed:25, fixed:5, floating, network, adaptive, analysed).
    #[arg(long = "run-policies", value_delimiter = ',')]
    policies_names: Vec<String>,
    /// `policies`: seconds measured per policy.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// `policies`: another model than examples/substation.toml (with its VM `relay`, its chain
    /// `protection`, `policy = "adaptive"` in the relay's `[[run]]`, and `image = "kv"`).
    #[arg(long = "policies-model", value_name = "FILE")]
    policies_model: Option<PathBuf>,
    /// `policies`: the relay's checkpoints kept this many µs longer from half-way through each
    /// run (`VIGIL_INJECT_PAUSE_DIR`): how each policy copes when the pauses grow.
    #[arg(long = "inject-pause-us", default_value_t = 0)]
    inject_pause_us: u64,
    /// `replication`: the checkpoint policies to compare.
    #[arg(long, value_delimiter = ',', default_value = "fixed:25,fixed:100,floating,network,adaptive")]
    policies: Vec<replication::PolicySpec>,
    /// `cluster`: host kills to time.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// `migration`: the cache's memory and the working set it rewrites, MEMORY_MIB:WRITING_MIB.
    #[arg(long, value_delimiter = ',', default_value = "32:0,32:8,64:0,64:32")]
    cache: Vec<String>,
    /// `migration`: migrations per configuration and method.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// `replication`: failovers to time.
    #[arg(long, default_value_t = 3)]
    failovers: usize,
    /// `replication`: dirty tracking of the protected VMs (auto, log, compare, hybrid).
    #[arg(long, default_value = "auto")]
    tracking: vmm::TrackingChoice,
    /// `replication`: compression of checkpoint pages on the wire (auto, lz4, xor, off).
    #[arg(long, default_value = "auto")]
    compression: replication::compress::Compression,
    /// `replication`: limit the replication link to this many Mbit/s (tc), e.g. 1000.
    #[arg(long)]
    link_mbit: Option<u32>,
    /// `replication`: the replication link's MTU: 65535 behaves as loopback (65536), 9000 is
    /// a jumbo-frame link, 1500 plain Ethernet.
    #[arg(long, default_value_t = 65535, value_parser = clap::value_parser!(u32).range(1280..=65535))]
    link_mtu: u32,
    /// `replication`: seconds `compute` may run (beyond, its time is estimated from its
    /// progress).
    #[arg(long, default_value_t = 300)]
    compute_limit: u64,
    /// `replication`: only time failovers.
    #[arg(long)]
    failover_only: bool,
    /// `replication`: only measure the checkpoint path's throughput against the link's own.
    #[arg(long, conflicts_with = "failover_only")]
    throughput_only: bool,
    /// `components`: kv without a disk (the network backend alone).
    #[arg(long)]
    no_disk: bool,
    /// `components`: skip the real cluster's rows (hostB's whole management restarted at once
    /// against one component alone; `vigil up examples/crowded.toml` twice).
    #[arg(long)]
    no_cluster: bool,
    /// `store`: also start a one-member etcd (/usr/bin/etcd) and compare with etcd used directly.
    #[arg(long)]
    etcd: bool,
    /// `rt`: where the response-time CDF plots (SVG) go.
    #[arg(long, default_value = "target/bench-rt")]
    out: std::path::PathBuf,
    /// `rt`: skip the search for the smallest budget that works in practice.
    #[arg(long)]
    no_search: bool,
    /// `service`: repetitions of 10 clients × 10 requests per column.
    #[arg(long, default_value_t = 20)]
    repetitions: usize,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum What {
    /// The analysis of synthetic systems and the curve operations.
    Analysis,
    /// Planning every single-host failure of synthetic clusters.
    Plan,
    /// The VMM: exits, boot, snapshot/restore, dirty log, kv versus native (needs root, KVM).
    Vmm,
    /// The store server: operations per second, latency, supervision times.
    Store,
    /// The MMS: a host of a real cluster killed again and again (needs root, KVM).
    Cluster,
    /// Checkpoint replication: every workload unprotected and under every policy, pause
    /// against dirty pages, failover time (needs root, KVM).
    Replication,
    /// Local redundancy: voting's latency and throughput for 1-3 instances against one used
    /// directly, repair time (needs root, KVM, redis-tools; `--kills` repairs).
    Voting,
    /// Dirty-page tracking: the guest's cost of a write-protection fault, the host's cost of
    /// comparing pages (needs KVM).
    Tracking,
    /// The example's real-time chain through its protected VM under each checkpoint policy
    /// (`--policies`, `analysed` among them), on a real cluster (needs root, KVM).
    Policies,
    /// What job marks cost a guest: kv under redis-benchmark with marks on and off, and the
    /// VMM's read of a full trace ring (needs root, KVM).
    Monitoring,
    /// Drift detection on a real cluster: the example's relay made slower than its model while
    /// it runs (kv `DEBUG WORK`), timed to the alert and to the recomputed plan table
    /// (`--rounds`; needs root, KVM).
    Drift,
    /// The network backend as a supervised process against inside the VMM: kv's tail latency
    /// under redis-benchmark, a crash and a hang mid-run, recovery against a whole-VMM restart
    /// (needs root, KVM, redis-tools; `--rounds`, `--ops` requests per test, `--kills`).
    Components,
    /// Live migration: stop-and-copy against pre-copy, downtime and total time against the
    /// VM's memory and how much it rewrites (`--cache`, `--runs`; needs root, KVM).
    Migration,
    /// Real-time VMs on a loaded host: a rate-monotonic task set as host threads, in a VM
    /// unloaded, loaded, and loaded under the analysed and the smallest practical reservation;
    /// upcall latency (needs root, KVM; `--seconds` per column, `--out` for the CDF plots).
    Rt,
    /// A CPU-bound request/response service (kv's ROTATE) as a host process, in a VM
    /// unloaded, loaded, and loaded under a (3 ms, 5 ms) reservation (needs root, KVM).
    Service,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(repeat: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::with_capacity(repeat);
    let mut last = None;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        let r = f();
        times.push(t.elapsed());
        last = Some(r);
    }
    (median(times), last.expect("at least one run"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if let What::Plan = args.what {
        return plan(args);
    }
    if let What::Vmm = args.what {
        crate::vmm::run(&args.guests, args.json)?;
        return Ok(());
    }
    if let What::Tracking = args.what {
        return crate::tracking::run(&args.guests, args.json);
    }
    if let What::Replication = args.what {
        let opts = crate::replication::Options {
            failovers: args.failovers,
            failover_only: args.failover_only,
            throughput_only: args.throughput_only,
            json: args.json,
            tracking: args.tracking,
            compression: args.compression,
            link_mbit: args.link_mbit,
            link_mtu: args.link_mtu,
            compute_limit: Duration::from_secs(args.compute_limit),
            rounds: args.rounds.unwrap_or(1),
        };
        crate::replication::run(&args.policies, &opts)?;
        return Ok(());
    }
    if let What::Voting = args.what {
        return crate::voting::run(args.kills, args.json);
    }
    if let What::Cluster = args.what {
        return crate::cluster::run(args.kills, args.json);
    }
    if let What::Drift = args.what {
        return crate::cluster::drift(args.rounds.unwrap_or(5), args.json);
    }
    if let What::Migration = args.what {
        return crate::cluster::migration_bench(&args.cache, args.runs, args.json);
    }
    if let What::Policies = args.what {
        let names: Vec<String> = if args.policies_names.is_empty() {
            ["fixed:25", "fixed:5", "floating", "network", "adaptive", "analysed"].map(String::from).to_vec()
        } else {
            args.policies_names.clone()
        };
        return crate::cluster::policies(&names, args.seconds, args.json, args.policies_model.as_deref(), args.inject_pause_us);
    }
    if let What::Components = args.what {
        return crate::components::run(&crate::components::Options {
            guests: args.guests.clone(),
            rounds: args.rounds.unwrap_or(5),
            requests: args.ops,
            kills: args.kills,
            no_disk: args.no_disk,
            cluster: !args.no_cluster,
            json: args.json,
        });
    }
    if let What::Service = args.what {
        return crate::service::run(args.repetitions, args.json);
    }
    if let What::Rt = args.what {
        return crate::rt::run(&crate::rt::Options {
            seconds: args.seconds,
            out: args.out.clone(),
            json: args.json,
            no_search: args.no_search,
        });
    }
    if let What::Monitoring = args.what {
        return crate::vmm::monitoring(&args.guests, args.rounds.unwrap_or(5).max(1), args.json);
    }
    if let What::Store = args.what {
        return crate::store::run(args.ops, args.rounds.unwrap_or(5), args.etcd, args.json);
    }
    let mut rows = Vec::new();
    let mut prev: Option<(usize, f64)> = None;
    for &n in &args.sizes {
        let sys = synthetic::distributed_chains(n, 7);
        // Large systems are slow to repeat; one run says enough there.
        let repeat = if n >= 5000 { 1 } else { args.repeat };
        let (t, a) = time(repeat, || analyze(&sys, &Options::default()));
        let a = a.map_err(|e| anyhow::anyhow!("{e}"))?;
        // The GPC completion curves cost an order of magnitude more: compare up to 1,000 tasks.
        let tg = if args.no_gpc_outputs || n > 1000 {
            Duration::ZERO
        } else {
            time(repeat.min(3), || analyze(&sys, &Options { gpc_outputs: true, ..Options::default() })).0
        };
        let unbounded = a.tasks.iter().filter(|t| t.wcrt.is_none()).count();
        let procs = sys.resources.iter().filter(|r| r.name.starts_with("cpu")).count();
        let growth = prev.map(|(pn, pt)| (ms(t) / pt) / (n as f64 / pn as f64));
        rows.push(serde_json::json!({
            "tasks": sys.tasks.len(), "processors": procs, "links": sys.resources.len() - procs,
            "chains": sys.chains.len(), "analysis_ms": ms(t), "us_per_task": ms(t) * 1e3 / sys.tasks.len() as f64,
            "with_gpc_outputs_ms": (tg > Duration::ZERO).then(|| ms(tg)), "gpc_outputs_ratio": (tg > Duration::ZERO).then(|| ms(tg) / ms(t)),
            "growth_vs_linear": growth, "unbounded_tasks": unbounded, "iterations": a.iterations,
        }));
        prev = Some((n, ms(t)));
    }
    // The workload of the comparison with pyCPA (examples/pycpa/compare.py): independent tasks,
    // analysed alone and as `vigil analyze --json` does (file text in, JSON report out).
    // `vigil analyze` without plots needs no service curves, so the busy-window recurrences
    // analyse these processors (`Options::service_curves`); the curves' time beside it.
    let indep = synthetic::independent_fp(1000, 10, 7);
    let as_analyze = Options { service_curves: false, ..Options::default() };
    let (t_indep, a_indep) = time(args.repeat, || analyze(&indep, &as_analyze));
    let (t_indep_curves, _) = time(args.repeat, || analyze(&indep, &Options::default()));
    let text = system_toml(&indep);
    let here = std::path::Path::new(".");
    let (t_parse, loaded) = time(args.repeat, || model::parse(&text, "independent.toml", here));
    let loaded = loaded.map_err(|e| anyhow::anyhow!("{e}"))?;
    let a = a_indep.map_err(|e| anyhow::anyhow!("{e}"))?;
    let (t_report, json) = time(args.repeat, || serde_json::to_string_pretty(&model::report::Report::new(&loaded, &a)));
    json?;
    let (t_whole, _) = time(args.repeat, || -> anyhow::Result<String> {
        let l = model::parse(&text, "independent.toml", here).map_err(|e| anyhow::anyhow!("{e}"))?;
        let a = analyze(&l.system, &as_analyze).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(serde_json::to_string_pretty(&model::report::Report::new(&l, &a))?)
    });
    let indep_row = serde_json::json!({
        "tasks": indep.tasks.len(), "processors": indep.resources.len(), "analysis_ms": ms(t_indep),
        "analysis_by_curves_ms": ms(t_indep_curves),
        "unbounded_tasks": a.tasks.iter().filter(|t| t.wcrt.is_none()).count(),
        "file_bytes": text.len(), "parse_ms": ms(t_parse), "report_json_ms": ms(t_report), "file_to_json_ms": ms(t_whole),
    });
    let ops = curve_ops(args.repeat.max(20));
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "analysis": rows, "independent_fp": indep_row, "curve_operations": ops }))?
        );
        return Ok(());
    }
    println!("Full analysis of synthetic systems (3-hop chains: task, 100 Mbit/s link, task)");
    println!(
        "{:>7} {:>6} {:>6} {:>7} {:>12} {:>10} {:>14} {:>9} {:>16}",
        "tasks", "cpus", "links", "chains", "analysis", "µs/task", "+GPC outputs", "ratio", "growth/linear"
    );
    for r in &rows {
        let n = |k: &str| r[k].as_u64().unwrap_or_default();
        println!(
            "{:>7} {:>6} {:>6} {:>7} {:>9.1} ms {:>10.1} {:>14} {:>9} {:>16}",
            n("tasks"),
            n("processors"),
            n("links"),
            n("chains"),
            r["analysis_ms"].as_f64().unwrap_or_default(),
            r["us_per_task"].as_f64().unwrap_or_default(),
            r["with_gpc_outputs_ms"].as_f64().map(|v| format!("{v:.1} ms")).unwrap_or_else(|| "-".into()),
            r["gpc_outputs_ratio"].as_f64().map(|v| format!("{v:.2}x")).unwrap_or_else(|| "-".into()),
            r["growth_vs_linear"].as_f64().map(|g| format!("{g:.2}x")).unwrap_or_else(|| "-".into()),
        );
    }
    println!(
        "\n{} independent fixed-priority tasks on {} processors (the pyCPA comparison's workload, examples/pycpa): {:.1} ms \
         by the busy-window recurrences, {:.1} ms by curves ({:.1}x)",
        indep.tasks.len(),
        indep.resources.len(),
        ms(t_indep),
        ms(t_indep_curves),
        ms(t_indep_curves) / ms(t_indep)
    );
    println!(
        "  as `vigil analyze --json` does it, in-process: parse {:.1} ms ({} kB file), JSON report {:.1} ms; file to JSON {:.1} ms",
        ms(t_parse),
        text.len() / 1000,
        ms(t_report),
        ms(t_whole)
    );
    println!();
    println!("Curve operations (median of {} runs)", args.repeat.max(20));
    println!("{:<58} {:>10} {:>10}", "operation", "µs", "segments");
    for o in &ops {
        println!(
            "{:<58} {:>10.1} {:>10}",
            o["op"].as_str().unwrap_or_default(),
            o["us"].as_f64().unwrap_or_default(),
            o["segments"].as_u64().unwrap_or_default()
        );
    }
    Ok(())
}

/// `sys` (streams, processors and tasks only) in the file format, written as
/// `examples/pycpa/compare.py` writes its systems: times in integer µs.
fn system_toml(sys: &rtc::system::System) -> String {
    use rtc::system::Input;
    use std::fmt::Write;
    let us = |q: &Q| q.to_i64().map(|v| format!("{v}us")).unwrap_or_else(|| format!("{}us", q.to_f64()));
    let mut out = String::new();
    for r in &sys.resources {
        let _ = writeln!(out, "[[processor]]\nname = \"{}\"\npolicy = \"fp\"\n", r.name);
    }
    for s in &sys.streams {
        let model = match &s.model {
            EventModel::Pjd { period, jitter, .. } => format!("model = \"pjd\"\nperiod = \"{}\"\njitter = \"{}\"", us(period), us(jitter)),
            EventModel::Periodic { period } => format!("model = \"periodic\"\nperiod = \"{}\"", us(period)),
            other => format!("# not written: {other:?}"),
        };
        let _ = writeln!(out, "[[stream]]\nname = \"{}\"\n{model}\n", s.name);
    }
    for t in &sys.tasks {
        let Input::Stream(i) = t.input else { continue };
        let _ = writeln!(
            out,
            "[[task]]\nname = \"{}\"\non = \"{}\"\ninput = \"{}\"\nwcet = \"{}\"\npriority = {}\n",
            t.name,
            sys.resources[t.resource].name,
            sys.streams[i].name,
            us(&t.wcet),
            t.priority.unwrap_or_default()
        );
    }
    out
}

fn curve_ops(repeat: usize) -> Vec<serde_json::Value> {
    let q = Q::int;
    let pjd = |p: i64, j: i64| EventModel::Pjd { period: q(p), jitter: q(j), min_distance: q(0) }.curves().expect("valid model");
    let a = pjd(10_000, 3_000);
    let b = pjd(25_000, 0);
    let full = models::dedicated(&q(1));
    let cbs = models::periodic_resource(&q(2_000), &q(5_000), models::SupplyModel::WorstCase).expect("valid reservation");
    let demand = a.0.scale(&q(1_500));
    let mut out = Vec::new();
    let mut op = |name: &str, f: &mut dyn FnMut() -> usize| {
        let mut times = Vec::with_capacity(repeat);
        let mut segs = 0;
        for _ in 0..repeat {
            let t = Instant::now();
            segs = f();
            times.push(t.elapsed());
        }
        out.push(serde_json::json!({ "op": name, "us": median(times).as_secs_f64() * 1e6, "segments": segs }));
    };
    op("PJD arrival curves (P=10ms, J=3ms)", &mut || pjd(10_000, 3_000).0.segments().len());
    op("min of two staircases (10 ms, 25 ms)", &mut || a.0.min(&b.0).map(|c| c.segments().len()).unwrap_or(0));
    op("sum of two staircases (10 ms, 25 ms)", &mut || a.0.add(&b.0).map(|c| c.segments().len()).unwrap_or(0));
    op("min-plus convolution: demand ⊗ CBS supply", &mut || demand.conv(&cbs.1).map(|c| c.segments().len()).unwrap_or(0));
    op("min-plus deconvolution: demand ⊘ CBS supply", &mut || demand.deconv(&cbs.1).map(|c| c.segments().len()).unwrap_or(0));
    op("horizontal deviation (delay): demand vs CBS supply", &mut || demand.hdev(&cbs.1).map(|_| 1).unwrap_or(0));
    op("vertical deviation (backlog): demand vs CBS supply", &mut || demand.vdev(&cbs.1).map(|_| 1).unwrap_or(0));
    op("remaining service after one task (full processor)", &mut || {
        component::remaining_service(&(demand.clone(), a.1.scale(&q(1_000))), &full).map(|r| r.1.segments().len()).unwrap_or(0)
    });
    op("fixed-priority task on a CBS reservation (GPC)", &mut || {
        let w = Workload::constant(q(1_500), q(1_000));
        component::task_on_service(&a, &w, &cbs, false).map(|_| 1).unwrap_or(0)
    });
    op("same, with GPC completion curves", &mut || {
        let w = Workload::constant(q(1_500), q(1_000));
        component::task_on_service(&a, &w, &cbs, true).map(|b| b.output.0.segments().len()).unwrap_or(0)
    });
    out
}

/// Planning all single-host failures of synthetic clusters (see `planner::synthetic`).
fn plan(args: &Args) -> anyhow::Result<()> {
    use planner::{plan_all, scenario, synthetic, Coverage, SearchOptions};
    let mut rows = Vec::new();
    for spec in &args.clusters {
        let (vms, hosts) = spec
            .split_once('x')
            .and_then(|(v, h)| Some((v.parse::<usize>().ok()?, h.parse::<usize>().ok()?)))
            .ok_or_else(|| anyhow::anyhow!("cluster size {spec:?}: write VMSxHOSTS, e.g. 200x20"))?;
        let text = synthetic::cluster(vms, hosts, 11);
        if let Some(dir) = &args.save {
            let f = dir.join(format!("cluster-{vms}x{hosts}.toml"));
            std::fs::write(&f, &text).with_context(|| format!("cannot write {}", f.display()))?;
        }
        let loaded = model::parse(&text, "synthetic.toml", std::path::Path::new(".")).map_err(|e| anyhow::anyhow!("{e}"))?;
        let dep = loaded.deployment.as_ref().ok_or_else(|| anyhow::anyhow!("synthetic cluster without hosts"))?;
        let scenarios = scenario::enumerate(dep, &[], 1, false);
        let repeat = if vms >= 1000 { 1.max(args.repeat.min(3)) } else { args.repeat };
        let opts = SearchOptions { full_validation: args.full_validation, ..SearchOptions::default() };
        let (t, table) = time(repeat, || plan_all(&loaded.system, dep, &scenarios, &opts));
        let table = table.map_err(|e| anyhow::anyhow!("{e}"))?;
        let (t_full, _) = time(repeat, || analyze(&loaded.system, &planner::eval::planning_options()));
        let st = table.stats;
        let analysed = st.evaluations - st.memo_hits;
        let count = |c: Coverage| table.plans.iter().filter(|p| p.coverage == c).count();
        rows.push(serde_json::json!({
            "vms": vms, "hosts": hosts, "tasks": loaded.system.tasks.len(), "scenarios": scenarios.len(),
            "plan_ms": ms(t), "ms_per_scenario": ms(t) / scenarios.len() as f64,
            "evaluations": st.evaluations, "memo_hits": st.memo_hits,
            "tasks_reanalysed": st.tasks_reanalysed, "tasks_reused": st.tasks_reused,
            "full_analysis_ms": ms(t_full),
            "speedup_vs_full_reanalysis": ms(t_full) * analysed as f64 / ms(t),
            "optimal": table.plans.iter().filter(|p| p.method == "optimal").count(),
            "covered": count(Coverage::Covered), "degraded": count(Coverage::Degraded), "uncoverable": count(Coverage::Uncoverable),
        }));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "plan": rows }))?);
        return Ok(());
    }
    println!("Planning every single-host failure of synthetic clusters (median of runs)");
    println!(
        "{:>5} {:>6} {:>6} {:>9} {:>11} {:>9} {:>6} {:>10} {:>8} {:>13} {:>10} {:>8} {:>22}",
        "VMs",
        "hosts",
        "tasks",
        "scenarios",
        "plan",
        "/scenario",
        "evals",
        "memo hits",
        "reused",
        "1 full anal.",
        "vs full",
        "optimal",
        "covered/degraded/unc."
    );
    for r in &rows {
        let n = |k: &str| r[k].as_u64().unwrap_or_default();
        let f = |k: &str| r[k].as_f64().unwrap_or_default();
        let reused = n("tasks_reused") as f64 / (n("tasks_reused") + n("tasks_reanalysed")).max(1) as f64;
        println!(
            "{:>5} {:>6} {:>6} {:>9} {:>8.1} ms {:>6.1} ms {:>6} {:>10} {:>7.1}% {:>10.2} ms {:>9.1}x {:>8} {:>22}",
            n("vms"),
            n("hosts"),
            n("tasks"),
            n("scenarios"),
            f("plan_ms"),
            f("ms_per_scenario"),
            n("evaluations"),
            n("memo_hits"),
            reused * 100.0,
            f("full_analysis_ms"),
            f("speedup_vs_full_reanalysis"),
            n("optimal"),
            format!("{}/{}/{}", n("covered"), n("degraded"), n("uncoverable")),
        );
    }
    println!("\n\"vs full\": (placements analysed × one full analysis) / planning time — what incremental re-analysis saves.");
    Ok(())
}
