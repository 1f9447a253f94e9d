//! Synthetic clusters for benchmarks and tests: `vms` VMs on `hosts` hosts (4 processors,
//! 128 GiB and a 10 Gbit/s port each), as a system description in the file format, so that a
//! benchmark measures what `vigil plan` does with a real file.
//!
//! Each VM has a CBS reservation (10–35 % of a processor, period 5, 10 or 20 ms) and one task;
//! 40 % are replicated to another host (checkpoints of 128 KiB–1 MiB every 50 or 100 ms),
//! 10 % run two local instances, the rest are normal; criticality 0–3; 1–8 GiB of memory.
//! Every other VM sends a message to another VM on another host, forming a two-VM chain.
//! Deadlines are the analysed worst case of the initial placement times 1.2–2, so the
//! initial placement meets them and a fault can break them.

use rtc::synthetic::Rng;
use rtc::system::{analyze, Options};
use std::fmt::Write;

const CORES: usize = 4;

struct VmGen {
    host: usize,
    cores: Vec<usize>,
    mode: &'static str,
    backup: Option<usize>,
    period_ms: i64,
    share_pct: i64,
    wcet_us: i64,
    input_period_ms: i64,
    criticality: i64,
    memory_gib: i64,
    checkpoint: (i64, i64),
}

/// The text of a synthetic cluster (see the module documentation).
pub fn cluster(vms: usize, hosts: usize, seed: u64) -> String {
    let hosts = hosts.max(2);
    let mut r = Rng(seed);
    let mut load = vec![[0i64; CORES]; hosts];
    let mut gens = Vec::with_capacity(vms);
    for v in 0..vms {
        let host = v % hosts;
        let mode = match r.int(0, 9) {
            0..=3 => "remote",
            4 => "local",
            _ => "normal",
        };
        let n = if mode == "local" { 2 } else { 1 };
        let mut share_pct = r.int(10, 35);
        let mut cores = Vec::new();
        for _ in 0..n {
            let c = (0..CORES).min_by_key(|&c| load[host][c]).unwrap_or(0);
            cores.push(c);
        }
        // Keep every processor at most 90 % loaded.
        for &c in &cores {
            let same = cores.iter().filter(|&&x| x == c).count() as i64;
            share_pct = share_pct.min((90 - load[host][c]) / same).max(1);
        }
        for &c in &cores {
            load[host][c] += share_pct;
        }
        let period_ms = [5, 10, 20][r.int(0, 2) as usize];
        // The task uses at most 60 % of the reservation in the long run.
        let input_period_ms = [10, 20, 40][r.int(0, 2) as usize];
        let budget_us = period_ms * share_pct * 10;
        let wcet_us = (budget_us * input_period_ms / period_ms * r.int(20, 60) / 100).max(50);
        gens.push(VmGen {
            host,
            cores,
            mode,
            backup: (mode == "remote").then(|| (host + 1 + r.int(0, hosts as i64 - 2) as usize) % hosts),
            period_ms,
            share_pct,
            wcet_us,
            input_period_ms,
            criticality: r.int(0, 3),
            memory_gib: r.int(1, 8),
            checkpoint: (r.int(1, 8) * 128, [50, 100][r.int(0, 1) as usize]),
        });
    }
    let mut pairs = Vec::new();
    for v in (0..vms).step_by(2) {
        let w = (v + 1 + 2 * r.int(0, (vms as i64 / 2).max(1) - 1) as usize) % vms;
        if gens[w].host != gens[v].host {
            pairs.push((v, w, r.int(200, 1500)));
        }
    }
    let text = |deadlines: Option<&Vec<String>>| -> String {
        let mut s = String::new();
        for h in 0..hosts {
            let procs: Vec<String> = (0..CORES).map(|c| format!("\"h{h}c{c}\"")).collect();
            let _ = writeln!(s, "[[host]]\nname = \"h{h}\"\nmemory = \"128GiB\"\nprocessors = [{}]\n", procs.join(", "));
            for c in 0..CORES {
                let _ = writeln!(s, "[[processor]]\nname = \"h{h}c{c}\"\n");
            }
            let _ = writeln!(s, "[[link]]\nname = \"port{h}\"\nhost = \"h{h}\"\nbandwidth = \"10Gbit/s\"\npolicy = \"fp\"\n");
        }
        for (v, g) in gens.iter().enumerate() {
            let inst: Vec<String> = g.cores.iter().map(|c| format!("\"h{}c{c}\"", g.host)).collect();
            let _ = writeln!(
                s,
                "[[vm]]\nname = \"vm{v}\"\ninstances = [{}]\nbudget = \"{}us\"\nperiod = \"{}ms\"\nmode = \"{}\"\ncriticality = {}\nmemory = \"{}GiB\"",
                inst.join(", "),
                g.period_ms * g.share_pct * 10,
                g.period_ms,
                g.mode,
                g.criticality,
                g.memory_gib
            );
            if let Some(b) = g.backup {
                let _ = writeln!(
                    s,
                    "backup = \"h{b}\"\ncheckpoint_size = \"{}KiB\"\ncheckpoint_interval = \"{}ms\"\ncheckpoint_priority = {}",
                    g.checkpoint.0,
                    g.checkpoint.1,
                    vms + v
                );
            }
            let _ = writeln!(s, "\n[[stream]]\nname = \"in{v}\"\nmodel = \"periodic\"\nperiod = \"{}ms\"\n", g.input_period_ms);
            let _ = writeln!(s, "[[task]]\nname = \"t{v}\"\non = \"vm{v}\"\ninput = \"in{v}\"\nwcet = \"{}us\"\npriority = 1\n", g.wcet_us);
        }
        let mut received = vec![0usize; gens.len()];
        for (k, &(v, w, bytes)) in pairs.iter().enumerate() {
            received[w] += 1;
            let _ = writeln!(
                s,
                "[[task]]\nname = \"m{k}\"\non = \"port{}\"\ninput = \"t{v}\"\nsize = \"{bytes}B\"\npriority = {}\n",
                gens[v].host,
                k + 1
            );
            let _ = writeln!(
                s,
                "[[task]]\nname = \"r{k}\"\non = \"vm{w}\"\ninput = \"m{k}\"\nwcet = \"100us\"\npriority = {}\n",
                1 + received[w]
            );
            let d = deadlines.map(|d| format!("\ndeadline = \"{}\"", d[k])).unwrap_or_default();
            let _ = writeln!(s, "[[chain]]\nname = \"c{k}\"\ntasks = [\"t{v}\", \"m{k}\", \"r{k}\"]{d}\n");
        }
        s
    };
    let first = text(None);
    let Ok(loaded) = model::parse(&first, "synthetic.toml", std::path::Path::new(".")) else { return first };
    let Ok(an) = analyze(&loaded.system, &Options { budget_step: rtc::Q::zero(), ..Options::default() }) else { return first };
    let deadlines: Vec<String> = an
        .chains
        .iter()
        .map(|c| {
            let w = c.worst.as_ref().map(|w| w.to_f64()).unwrap_or(100_000.0);
            format!("{}us", (w * r.int(120, 200) as f64 / 100.0).ceil() as i64)
        })
        .collect();
    text(Some(&deadlines))
}

#[cfg(test)]
mod tests {
    #[test]
    fn synthetic_clusters_are_valid_and_meet_their_deadlines() {
        for (vms, hosts) in [(10, 2), (50, 5)] {
            let text = super::cluster(vms, hosts, 3);
            let l = model::parse(&text, "synthetic.toml", std::path::Path::new(".")).expect("valid");
            let a = rtc::system::analyze(&l.system, &rtc::system::Options::default()).expect("analysable");
            assert!(a.all_deadlines_met(&l.system), "{vms} VMs on {hosts} hosts");
            assert_eq!(l.deployment.expect("hosts").vms.len(), vms);
        }
    }
}
