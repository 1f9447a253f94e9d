//! `vigil analyze FILE [--json] [--plot DIR] [--intervals]`.

use crate::{table, Outcome};
use anyhow::Context;
use model::plot;
use model::report::Report;
use rtc::system::{analyze, Options};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// System description (TOML, see docs/model-format.md).
    pub file: PathBuf,
    /// Print the report as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Write one SVG per task (DIR/<task>.svg) with its arrival and service curves.
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,
    /// Grid of the minimal VM budgets (a time such as 1us, 10us, 0.5ms); the exact minimum is
    /// reported beside it. 0 skips the search.
    #[arg(long, value_name = "TIME", default_value = "1us", value_parser = budget_step)]
    pub budget_step: rtc::Q,
    /// For every VM with a remote backup: the longest fixed checkpoint interval whose pauses
    /// and held output keep every deadline (what `policy = "analysed"` runs).
    #[arg(long)]
    pub intervals: bool,
    /// Substitute what the running cluster (`vigil up --dir DIR`) measured: each VM's job
    /// execution time (the median of its recent jobs) where it exceeds the declared WCET.
    #[arg(long, value_name = "DIR")]
    pub observed: Option<PathBuf>,
}

fn budget_step(s: &str) -> Result<rtc::Q, String> {
    if s.trim() == "0" {
        return Ok(rtc::Q::zero());
    }
    model::units::time(s).and_then(|q| if q.is_positive() { Ok(q) } else { Err(format!("{s:?}: the budget step must be positive (or 0)")) })
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    // Invalid input is reported as one line (file:line first) and is not an `anyhow` error
    // chain, so print it here.
    let loaded = match model::load(&args.file) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return Ok(Outcome::Invalid);
        }
    };
    let loaded = match &args.observed {
        Some(dir) => observed(loaded, dir)?,
        None => loaded,
    };
    // Service curves are only drawn: without plots, the busy-window recurrences may replace them.
    let opts = Options { budget_step: args.budget_step.clone(), service_curves: args.plot.is_some(), ..Options::default() };
    let analysis = match analyze(&loaded.system, &opts) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{}", loaded.locate(&e));
            return Ok(Outcome::Invalid);
        }
    };
    let report = Report::new(&loaded, &analysis);
    if args.json {
        print_json(&report)?;
    } else {
        table::print(&report);
    }
    if let Some(dir) = &args.plot {
        let written = plot::write_all(dir, &loaded, &analysis).map_err(anyhow::Error::msg)?;
        if !args.json {
            println!("\nwrote {} plot(s) to {}", written, dir.display());
        }
    }
    if args.intervals && !args.json {
        print_intervals(&loaded);
    }
    let outcome = if report.all_deadlines_met { Outcome::Ok } else { Outcome::Miss };
    // The process ends after this command: freeing thousands of curves one by one would only
    // cost time (a few % of `vigil analyze` on 1,000 tasks).
    std::mem::forget((loaded, analysis, report));
    Ok(outcome)
}

/// The report as pretty JSON and a newline on stdout, serialised straight into a buffer of the
/// locked stdout (the report of 1,000 tasks is half a megabyte: no string of it is built first).
fn print_json(report: &Report) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    serde_json::to_writer_pretty(&mut out, report).context("cannot serialise the report")?;
    out.write_all(b"\n").and_then(|()| out.flush()).context("cannot write the report")?;
    Ok(())
}

/// The model with the execution times the cluster in `dir` measured, where they exceed the
/// declared WCETs (`manager::drift`); each substitution is said on stderr.
fn observed(loaded: model::Loaded, dir: &std::path::Path) -> anyhow::Result<model::Loaded> {
    let cf = manager::local::ClusterFile::load(dir).map_err(anyhow::Error::msg)?;
    let st = manager::local::status(&cf).map_err(anyhow::Error::msg)?;
    let mut observed = manager::drift::Observed::default();
    for v in &st.vms {
        let Some(j) = &v.jobs else { continue };
        if let Some(w) = v.wcet_us.filter(|&w| j.recent_jobs >= manager::drift::MIN_JOBS && j.recent_p50_us > w) {
            eprintln!("observed: VM {}: execution time {:.0} µs (declared {w:.0} µs)", v.vm, j.recent_p50_us);
            observed.exec_us.insert(v.vm.clone(), j.recent_p50_us);
        }
        // Arrivals beyond what the model allows (under its initial placement) go in too.
        let allowed = manager::drift::allowed_arrivals(&loaded, None, &v.vm);
        if j.arrivals.iter().any(|&(w, n)| allowed.iter().any(|&(aw, a)| aw == w && n > a)) {
            observed.add_arrivals(&v.vm, &j.arrivals);
        }
    }
    if observed.exec_us.is_empty() {
        eprintln!("observed: every VM's measured execution time is within its model");
    }
    let (model, changed) = observed.model(&loaded);
    for c in &changed {
        eprintln!("observed: {c}");
    }
    if changed.is_empty() {
        eprintln!("observed: every VM's measured arrivals are within its model");
    }
    Ok(model)
}

fn print_intervals(l: &model::Loaded) {
    let vms: Vec<String> = l.deployment.iter().flat_map(|d| &d.vms).filter(|v| v.checkpoint.is_some()).map(|v| v.name.clone()).collect();
    let ms = |q: &rtc::Q| model::units::human_time(q);
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| match model::replication::largest_fixed_interval(l, vm, None) {
            Ok(c) => vec![
                vm.clone(),
                ms(&c.pause),
                c.interval.as_ref().map_or("none keeps every deadline".into(), |t| format!("fixed:{}", trim_ms(t))),
                c.commit.as_ref().map_or("-".into(), ms),
            ],
            Err(e) => vec![vm.clone(), "-".into(), e, "-".into()],
        })
        .collect();
    println!();
    print!(
        "{}",
        model::text::table("Checkpoint intervals (longest that keeps every deadline)", &["vm", "pause", "policy", "output hold"], &rows)
    );
}

/// A time in µs as milliseconds for a policy name (`2.5`, `50`).
fn trim_ms(us: &rtc::Q) -> String {
    model::units::trim_float(us.to_f64() / 1000.0, 3)
}

#[cfg(test)]
pub(crate) mod tests {
    use rtc::system::{Analysis, Bounds, ChainResult, Input, ResourceResult, TaskResult};
    use rtc::Q;

    /// A made-up analysis of the right shape (source stream curves as input, the resource's
    /// full rate as service, response time = WCET), to exercise reporting and plotting.
    pub fn fake(l: &model::Loaded) -> Analysis {
        let s = &l.system;
        let tasks = s
            .tasks
            .iter()
            .map(|t| {
                let mut src = t.input;
                while let Input::Task(j) = src {
                    src = s.tasks[j].input;
                }
                let Input::Stream(k) = src else { unreachable!() };
                let (upper, lower) = s.streams[k].model.curves().unwrap();
                let (su, sl) = rtc::models::dedicated(&Q::one());
                TaskResult {
                    wcrt: Some(t.wcet.clone()),
                    bcrt: t.bcet.clone(),
                    backlog: Some(Q::one()),
                    backlog_work: Some(t.wcet.clone()),
                    input: Bounds { upper: upper.clone(), lower: lower.clone() },
                    output: Bounds { upper, lower },
                    service: Bounds { upper: su, lower: sl },
                    service_exact_until: None,
                    method: "fake",
                    problem: None,
                }
            })
            .collect();
        let chains = s
            .chains
            .iter()
            .map(|c| {
                let w = c.tasks.iter().fold(Q::zero(), |a, &t| a + &s.tasks[t].wcet);
                ChainResult {
                    worst: Some(w.clone()),
                    best: Q::zero(),
                    per_hop: Some(w.clone()),
                    pboo: None,
                    deadline: c.deadline.clone(),
                    slack: c.deadline.as_ref().map(|d| d - &w),
                    meets_deadline: c.deadline.as_ref().map(|d| &w <= d),
                }
            })
            .collect();
        let resources = s
            .resources
            .iter()
            .map(|_| ResourceResult {
                utilisation: Q::new(1, 2).unwrap(),
                capacity: Q::one(),
                supply: None,
                min_budget: None,
                min_budgets: Vec::new(),
                backlog: None,
                problem: None,
            })
            .collect();
        Analysis { tasks, chains, resources, iterations: 1 }
    }

    #[test]
    fn table_json_and_plots_of_every_example() {
        let keep = std::env::var_os("VIGIL_KEEP_PLOTS");
        let dir = keep.clone().map(Into::into).unwrap_or_else(|| std::env::temp_dir().join(format!("vigil-plots-{}", std::process::id())));
        for f in ["simple", "control-loop", "overload-miss", "edf", "tdma", "trace"] {
            let l = model::load(format!("{}/../../examples/{f}.toml", env!("CARGO_MANIFEST_DIR"))).unwrap();
            let a = fake(&l);
            let r = model::report::Report::new(&l, &a);
            crate::table::print(&r);
            let v: serde_json::Value = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
            assert_eq!(v["tasks"].as_array().unwrap().len(), l.system.tasks.len());
            assert!(v["tasks"][0]["wcrt_us"].is_string() && v["tasks"][0]["wcrt_ms"].is_f64());
            let n = model::plot::write_all(&dir, &l, &a).unwrap();
            assert_eq!(n, l.system.tasks.len());
            for t in &l.system.tasks {
                let svg = std::fs::read_to_string(dir.join(format!("{}.svg", t.name))).unwrap();
                assert!(svg.contains("<path") && svg.contains("service lower"), "{f}: {}", t.name);
            }
        }
        if keep.is_none() {
            std::fs::remove_dir_all(&dir).ok();
        }
    }
}
