//! `vigil plan FILE [--faults K] [--links] [--json]`: a reconfiguration plan for every fault
//! scenario, checked by the analysis.

use crate::table::render;
use crate::Outcome;
use anyhow::Context;
use planner::{plan_all, scenario, Coverage, PlanError, SearchOptions};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// System description with hosts (TOML, see docs/model-format.md).
    pub file: PathBuf,
    /// Plan for every set of up to K failed hosts (and links, with --links).
    #[arg(long, default_value_t = 1, value_name = "K")]
    pub faults: usize,
    /// Also plan for link failures (host ports and fixed links).
    #[arg(long)]
    pub links: bool,
    /// Print the plans as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Most placements the exact search evaluates per scenario before settling for the best
    /// found (0: greedy only).
    #[arg(long, default_value_t = SearchOptions::default().exact_budget, value_name = "N")]
    pub budget: usize,
}

pub fn run(args: &Args) -> anyhow::Result<Outcome> {
    let loaded = match model::load(&args.file) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return Ok(Outcome::Invalid);
        }
    };
    let Some(dep) = &loaded.deployment else {
        eprintln!("{}: {}", args.file.display(), PlanError::NoHosts);
        return Ok(Outcome::Invalid);
    };
    if args.faults == 0 {
        eprintln!("--faults must be at least 1");
        return Ok(Outcome::Invalid);
    }
    let links: Vec<usize> = loaded.resources.iter().enumerate().filter(|(_, i)| i.kind == model::ItemKind::Link).map(|(r, _)| r).collect();
    let scenarios = scenario::enumerate(dep, &links, args.faults, args.links);
    let opts = SearchOptions { exact_budget: args.budget, ..SearchOptions::default() };
    let start = Instant::now();
    let table = match plan_all(&loaded.system, dep, &scenarios, &opts) {
        Ok(t) => t,
        Err(PlanError::Analysis(e)) => {
            eprintln!("{}", loaded.locate(&e));
            return Ok(Outcome::Invalid);
        }
        Err(e) => return Err(e.into()),
    };
    let took = start.elapsed();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&table).context("cannot serialise the plans")?);
    } else {
        let mut out = String::new();
        for p in &table.plans {
            let how = match (p.search, p.coverage) {
                ("quick pass", Coverage::Covered) => "heuristic: quick pass only".to_string(),
                ("quick pass", _) => "quick pass only: a better plan may exist; heuristic".to_string(),
                ("budget exhausted", _) => format!("heuristic: the search stopped at --budget {}", args.budget),
                _ => p.method.to_string(),
            };
            let copied = model::units::human_size(&p.cost.bytes);
            out += &format!("Scenario {}: {} ({how}, {} moves, {copied} copied)\n", p.scenario, coverage_name(p.coverage), p.moves);
            if p.actions.is_empty() {
                let nothing_lost = p.given_up.is_empty() && p.missed.is_empty() && p.lost.is_empty();
                out += if nothing_lost { "  (no action needed)\n" } else { "  (no action: what survived stays as it is)\n" };
            }
            for (k, a) in p.actions.iter().enumerate() {
                out += &format!("  {}. {a}\n", k + 1);
            }
            for g in &p.given_up {
                out += &format!("  gives up: {}\n", given_up(g));
            }
            for m in &p.missed {
                out += &format!("  still missed: {m}\n");
            }
            for m in &p.lost {
                out += &format!("  lost with a failed fixed link: {m}\n");
            }
            let rows: Vec<Vec<String>> = p
                .chains
                .iter()
                .map(|c| {
                    vec![
                        c.chain.clone(),
                        c.worst_ms.map(ms).unwrap_or_else(|| "-".into()),
                        c.deadline_ms.map(ms).unwrap_or_else(|| "-".into()),
                        c.slack_ms.map(ms).unwrap_or_else(|| "-".into()),
                        c.status.to_string(),
                    ]
                })
                .collect();
            if !rows.is_empty() {
                let t =
                    render("", &["  chain", "worst", "deadline", "slack", "status"], &rows.iter().map(|r| indent(r)).collect::<Vec<_>>());
                out += t.trim_start_matches('\n');
            }
            out.push('\n');
        }
        let count = |c: Coverage| table.plans.iter().filter(|p| p.coverage == c).count();
        let optimal = table.plans.iter().filter(|p| p.method == "optimal").count();
        out += &format!(
            "Summary: {} scenarios: {} covered, {} degraded, {} uncoverable; {} optimal, {} heuristic; \
             {} placements evaluated ({} from memo, {} tasks re-analysed, {} reused) in {:.0} ms\n",
            table.plans.len(),
            count(Coverage::Covered),
            count(Coverage::Degraded),
            count(Coverage::Uncoverable),
            optimal,
            table.plans.len() - optimal,
            table.stats.evaluations,
            table.stats.memo_hits,
            table.stats.tasks_reanalysed,
            table.stats.tasks_reused,
            took.as_secs_f64() * 1000.0
        );
        for p in table.plans.iter().filter(|p| p.coverage != Coverage::Covered) {
            out += &format!("  {}: {}\n", p.scenario, coverage_name(p.coverage));
        }
        print!("{out}");
    }
    Ok(if table.plans.iter().all(|p| p.coverage == Coverage::Covered) { Outcome::Ok } else { Outcome::Miss })
}

fn indent(r: &[String]) -> Vec<String> {
    let mut r = r.to_vec();
    r[0] = format!("  {}", r[0]);
    r
}

fn ms(x: f64) -> String {
    format!("{} ms", model::units::trim_float(x, 4))
}

fn coverage_name(c: Coverage) -> &'static str {
    match c {
        Coverage::Covered => "covered",
        Coverage::Degraded => "DEGRADED",
        Coverage::Uncoverable => "UNCOVERABLE",
    }
}

fn given_up(g: &planner::GivenUp) -> String {
    match g {
        planner::GivenUp::Vm { vm, criticality, displaced: false } => format!("VM {vm} stopped (criticality {criticality})"),
        planner::GivenUp::Vm { vm, criticality, displaced: true } => {
            format!("VM {vm} not restarted: its host failed and the plan has no place for it (criticality {criticality})")
        }
        planner::GivenUp::FaultTolerance { vm, criticality } => format!("VM {vm} runs without a backup (criticality {criticality})"),
        planner::GivenUp::State { vm } => format!("VM {vm} lost its state (host and backup failed); restarted fresh"),
        planner::GivenUp::Chain { chain } => format!("chain {chain} (passes through a stopped VM)"),
    }
}
