use rtc::system::{analyze, Options};
use std::time::Instant;
fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let gpc = std::env::args().nth(2).is_none();
    let sys = rtc::synthetic::distributed_chains(n, 7);
    let t = Instant::now();
    let a = analyze(&sys, &Options { gpc_outputs: gpc, ..Options::default() }).unwrap();
    let el = t.elapsed();
    let unb = a.tasks.iter().filter(|t| t.wcrt.is_none()).count();
    let pboo = a.chains.iter().filter(|c| c.pboo.is_some()).count();
    println!("{n} tasks: {:?} (unbounded {unb}, pboo {pboo}, iterations {})", el, a.iterations);
}
