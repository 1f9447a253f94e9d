//! Mutated cluster descriptions never make the planner panic: whatever the model accepts, the
//! planner either plans for every scenario (up to two faults, links included) or reports an
//! error.

use planner::{plan_all, scenario, SearchOptions};
use rtc::synthetic::Rng;

const WORDS: [&str; 14] =
    ["hostA", "hostB", "hostC", "a0", "b1", "c0", "portA", "portC", "remote", "local", "normal", "0", "1GiB", "100ms"];

fn mutate(r: &mut Rng, text: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    for _ in 0..1 + r.below(2) {
        let i = r.below(lines.len());
        match r.below(4) {
            0 => {
                lines.remove(i);
            }
            1 => {
                // Replace a quoted value or a number with another word of the domain.
                if let Some((k, _)) = lines[i].split_once('=') {
                    let w = WORDS[r.below(WORDS.len())];
                    let v = if w.chars().all(|c| c.is_ascii_digit()) { w.to_string() } else { format!("\"{w}\"") };
                    lines[i] = format!("{k}= {v}");
                }
            }
            2 => {
                let j = r.below(lines.len());
                lines.swap(i, j);
            }
            _ => {
                let j = r.below(lines.len());
                let dup = lines[j].clone();
                lines.insert(i, dup);
            }
        }
    }
    lines.join("\n")
}

#[test]
fn mutated_clusters_never_panic() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/cluster.toml")).expect("example");
    let mut r = Rng(77);
    let (mut planned, mut rejected) = (0, 0);
    for _ in 0..400 {
        let t = mutate(&mut r, &text);
        let Ok(l) = model::parse(&t, "m.toml", std::path::Path::new(".")) else {
            rejected += 1;
            continue;
        };
        let Some(dep) = &l.deployment else { continue };
        let links: Vec<usize> = (0..l.system.resources.len()).filter(|&i| l.resources[i].kind == model::ItemKind::Link).collect();
        let scenarios = scenario::enumerate(dep, &links, 2, true);
        let opts = SearchOptions { exact_budget: 200, ..SearchOptions::default() };
        if plan_all(&l.system, dep, &scenarios, &opts).is_ok() {
            planned += 1;
        }
    }
    assert!(planned > 15 && rejected > 100, "planned {planned}, rejected {rejected}: the mutations should give both");
}
