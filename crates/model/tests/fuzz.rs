//! Robustness: thousands of random mutations of the example files (lines deleted, duplicated,
//! swapped; numbers replaced by 0, -1, huge values or garbage; text truncated) must never make
//! `model::parse` panic — and the systems that still parse must not make `rtc`'s analysis panic.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
}

const NUMBERS: &[&str] =
    &["0", "-1", "-0.5", "99999999999999999999", "1e400", "1/0", "0.0000000001", "abc", "", "nan", "7/3", "1000000", "2.5"];
const UNITS: &[&str] = &["ms", "us", "s", "ns", "parsecs", "", "B", "KiB", "Mbit/s", "µs", "/s"];
const JUNK: &[&str] = &[
    "[[task]]",
    "[[vm]]",
    "[[stream]]",
    "name = \"x\"",
    "= =",
    "\"",
    "[",
    "tasks = [\"filter\"]",
    "input = \"filter\"",
    "on = \"cpu0\"",
    "priority = 1",
    "policy = \"tdma\"",
    "model = \"trace\"",
    "times = []",
];

fn examples() -> (PathBuf, Vec<(String, String)>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).expect("examples/ exists") {
        let p = e.expect("dir entry").path();
        if p.extension().is_some_and(|x| x == "toml") {
            out.push((p.display().to_string(), std::fs::read_to_string(&p).expect("readable example")));
        }
    }
    out.sort();
    assert!(out.len() >= 6, "expected the example files in {}", dir.display());
    (dir, out)
}

/// Replaces one run of digits (with its decimal point and unit) in `line`.
fn mutate_number(rng: &mut Rng, line: &str) -> String {
    let starts: Vec<usize> = line
        .char_indices()
        .filter(|(i, c)| c.is_ascii_digit() && !line[..*i].ends_with(|p: char| p.is_ascii_digit() || p == '.'))
        .map(|(i, _)| i)
        .collect();
    if starts.is_empty() {
        return format!("{line}{}", rng.pick(UNITS));
    }
    let s = rng.pick(&starts);
    let e = s + line[s..].find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(line.len() - s);
    let mut repl = rng.pick(NUMBERS).to_string();
    if rng.below(3) == 0 {
        // Also change the unit that follows.
        let ue = e + line[e..].find(|c: char| !c.is_alphabetic() && c != 'µ' && c != '/').unwrap_or(line.len() - e);
        repl.push_str(rng.pick(UNITS));
        return format!("{}{}{}", &line[..s], repl, &line[ue..]);
    }
    format!("{}{}{}", &line[..s], repl, &line[e..])
}

fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        if lines.is_empty() {
            lines.push(rng.pick(JUNK).to_string());
        }
        let n = lines.len();
        let i = rng.below(n);
        match rng.below(8) {
            0 => {
                lines.remove(i);
            }
            1 => {
                let l = lines[i].clone();
                lines.insert(i, l);
            }
            2 => lines.swap(i, rng.below(n)),
            3 | 4 => lines[i] = mutate_number(rng, &lines[i]),
            5 => lines.insert(i, rng.pick(JUNK).to_string()),
            6 => {
                // Truncate the whole text at a character boundary.
                let joined = lines.join("\n");
                let mut cut = rng.below(joined.len() + 1);
                while !joined.is_char_boundary(cut) {
                    cut -= 1;
                }
                lines = joined[..cut].lines().map(String::from).collect();
            }
            _ => {
                // Copy a line from elsewhere (moves keys between items).
                let l = lines[rng.below(n)].clone();
                lines[i] = l;
            }
        }
    }
    lines.join("\n")
}

#[test]
fn mutated_examples_never_panic() {
    let (dir, files) = examples();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut parsed = 0usize;
    let mut analysed: HashSet<String> = HashSet::new();
    // The analysis of a mutant can be expensive (that is allowed, panicking is not): analyse a
    // bounded number of distinct ones.
    const MAX_ANALYSED: usize = 3000;
    let mut failures = Vec::new();
    for round in 0..800 {
        for (name, text) in &files {
            let m = mutate(&mut rng, text);
            let res = catch_unwind(AssertUnwindSafe(|| model::parse(&m, name, &dir)));
            match res {
                Err(_) => failures.push(format!("parse panicked (round {round}, {name}):\n{m}")),
                Ok(Err(e)) => {
                    let msg = e.to_string();
                    if std::env::var_os("FUZZ_SHOW_ERRORS").is_some() {
                        eprintln!("{msg}");
                    }
                    if !msg.starts_with(name.as_str()) || msg.contains('\n') {
                        failures.push(format!("error is not one line starting with the file name: {msg}"));
                    }
                }
                Ok(Ok(l)) => {
                    parsed += 1;
                    if analysed.len() < MAX_ANALYSED && analysed.insert(m.clone()) {
                        let opts = rtc::system::Options::default();
                        if catch_unwind(AssertUnwindSafe(|| rtc::system::analyze(&l.system, &opts))).is_err() {
                            failures.push(format!("analyze panicked (round {round}, {name}):\n{m}"));
                        }
                    }
                }
            }
            if failures.len() > 3 {
                break;
            }
        }
    }
    eprintln!("{parsed} of {} mutants parsed, {} analysed", 800 * files.len(), analysed.len());
    assert!(failures.is_empty(), "{} failure(s); first:\n{}", failures.len(), failures[0]);
    assert!(parsed > 100, "too few mutants parsed ({parsed}) for the analysis to be exercised");
}

#[test]
fn garbage_never_panics() {
    let mut rng = Rng(42);
    let alphabet: Vec<char> = "[]=\"'#\n .,-0123456789abcdefghijklmnopqrstuvwxyzµ{}/".chars().collect();
    for _ in 0..2000 {
        let len = rng.below(200);
        let s: String = (0..len).map(|_| rng.pick(&alphabet)).collect();
        let r = catch_unwind(|| model::parse(&s, "g.toml", Path::new(".")));
        assert!(r.is_ok(), "parse panicked on {s:?}");
    }
}
