//! `compute`: a compute-bound workload that dirties a working set. Arguments:
//! `WS_MIB [PASSES] [REPORT_EVERY]` (default 16 MiB, 0 = forever, report every 10 passes).
//! Each pass writes one word into every 4 KiB page of the working set (so every page is
//! dirtied once per pass) and folds it into a checksum. Prints `compute: pass N sum S`.
#![no_std]
#![no_main]

extern crate alloc;

use guest_sdk::println;

guest_sdk::entry!(main);

fn main() -> u32 {
    let mut args = guest_sdk::args();
    let ws_mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let passes: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let every: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10).max(1);
    let words = ws_mib * (1 << 20) / 8;
    let mut ws = alloc::vec::Vec::new();
    if ws.try_reserve_exact(words).is_err() {
        println!("compute: cannot allocate {ws_mib} MiB");
        return 2;
    }
    ws.resize(words, 0u64);
    let start = guest_sdk::now_ns();
    let mut sum = 0u64;
    let mut pass = 0u64;
    while passes == 0 || pass < passes {
        pass += 1;
        for i in (0..words).step_by(512) {
            ws[i] = ws[i].wrapping_mul(6364136223846793005).wrapping_add(pass ^ i as u64);
            sum = sum.rotate_left(5) ^ ws[i];
        }
        if pass.is_multiple_of(every) {
            let ms = (guest_sdk::now_ns() - start) / 1_000_000;
            println!("compute: pass {pass} sum {sum:x} after {ms} ms");
        }
    }
    println!("compute: done {pass} passes sum {sum:x}");
    0
}
