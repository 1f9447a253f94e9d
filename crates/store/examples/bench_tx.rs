//! Transaction benchmark of the store (issue 14, item 3): transaction start and a
//! read-modify-write transaction at 1 k, 100 k and 1 M nodes, and another client's read
//! latency while transactions run. `cargo run --release -p store --example bench_tx [ROUNDS]
//! [NODES...]`.

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let mut sizes: Vec<usize> = args.filter_map(|a| a.parse().ok()).collect();
    if sizes.is_empty() {
        sizes = vec![1_000, 100_000, 1_000_000];
    }
    let mut reports = Vec::new();
    for n in sizes {
        match store::bench::transactions(n, rounds) {
            Ok(r) => reports.push(r),
            Err(e) => {
                eprintln!("bench_tx: {n} nodes: {e}");
                std::process::exit(1);
            }
        }
    }
    print!("{}", store::bench::table(&reports));
}
