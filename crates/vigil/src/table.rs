//! Human-readable tables of a [`Report`]. Times are rounded here, for display only.

use model::report::Report;
use model::units::{human_time, trim_float};
use rtc::Q;

pub(crate) use model::text::table as render;

fn t(us: &Option<String>, none: &str) -> String {
    match us.as_ref().and_then(|s| s.parse::<Q>().ok()) {
        Some(q) => human_time(&q),
        None => none.to_string(),
    }
}

pub fn print(r: &Report) {
    let mut out = String::new();
    if !r.chains.is_empty() {
        let rows: Vec<Vec<String>> = r
            .chains
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    t(&c.worst_us, "unbounded"),
                    t(&Some(c.best_us.clone()), "-"),
                    t(&c.deadline_us, "-"),
                    t(&c.slack_us, "-"),
                    c.verdict.as_str().to_string(),
                ]
            })
            .collect();
        out += &render("Chains", &["name", "worst", "best", "deadline", "slack", "verdict"], &rows);
        out.push('\n');
    }
    let rows: Vec<Vec<String>> = r
        .tasks
        .iter()
        .map(|x| {
            vec![
                x.name.clone(),
                x.resource.clone(),
                t(&x.wcrt_us, "unbounded"),
                t(&Some(x.bcrt_us.clone()), "-"),
                x.backlog_events.map(|b| trim_float(b, 4)).unwrap_or_else(|| "unbounded".into()),
                t(&x.deadline_us, "-"),
                x.verdict.as_str().to_string(),
                x.method.clone(),
            ]
        })
        .collect();
    out += &render("Tasks", &["name", "on", "wcrt", "bcrt", "backlog (events)", "deadline", "verdict", "method"], &rows);
    out.push('\n');
    let rows: Vec<Vec<String>> = r
        .resources
        .iter()
        .map(|x| {
            vec![
                x.name.clone(),
                x.kind.name().to_string(),
                x.policy.to_string(),
                format!("{}%", trim_float(x.utilisation_percent, 4)),
                x.supply.unwrap_or("-").to_string(),
                match (&x.min_budget_exact_us, &x.min_budget_us) {
                    (Some(e), Some(g)) if e != g => {
                        // The exact value as a rational number of ms (e.g. 80/3 ms).
                        let exact = e.parse::<Q>().map(|q| format!("{} ms", q / Q::int(1000))).unwrap_or_default();
                        format!("{} (exact {exact})", t(&Some(g.clone()), "-"))
                    }
                    _ => t(&x.min_budget_us, "-"),
                },
            ]
        })
        .collect();
    out += &render("Resources", &["name", "kind", "policy", "utilisation", "supply model", "min budget"], &rows);
    for x in r.tasks.iter().filter_map(|x| x.problem.as_ref().map(|p| (x, p))) {
        out += &format!("\ntask {:?}: {}", x.0.name, x.1);
    }
    for x in r.resources.iter().filter_map(|x| x.problem.as_ref().map(|p| (x, p))) {
        out += &format!("\n{} {:?}: {}", x.0.kind.name(), x.0.name, x.1);
    }
    out += &format!("\n{}\n", if r.all_deadlines_met { "all deadlines met" } else { "DEADLINES NOT MET" });
    print!("{out}");
}

#[cfg(test)]
mod tests {
    use super::render;

    #[test]
    fn columns_align() {
        let s = render("T", &["a", "bb"], &[vec!["xyz".into(), "1".into()], vec!["µ".into(), "22".into()]]);
        assert_eq!(s, "T\na    bb\nxyz  1\nµ    22\n");
    }
}
