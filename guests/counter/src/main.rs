//! `counter`: the minimal vigil test guest. Arguments (after `--` on the VMM's command line):
//!
//! - `count N [DELAY_MS]` (default `count 10`): prints `count i` for i in 1..=N, idling DELAY_MS
//!   between lines, then `done sum=S` and exits 0;
//! - `exit S`: exits with status S;
//! - `heap N`: N random allocations, frees and reallocations, each block filled with a
//!   pattern that is checked before it is freed; prints `heap ok N`;
//! - `clock N`: reads the clock N times (N port exits), prints `clock N calls T ns`;
//! - `dirty OFFSET_PAGES P1,P2,...`: writes one byte in each listed page of the heap (page
//!   numbers relative to heap start + OFFSET_PAGES), prints `dirtied K`, exits 0;
//! - `disk`: reads sector 0, writes its bytes reversed into sector 1, prints both checksums;
//! - `disklog N [DELAY_MS]`: for i in 1..=N writes sector i mod (disk sectors) filled with the
//!   byte i mod 256, prints `wrote i`, idles DELAY_MS; then `disklog done` (checkpoint tests);
//! - `rounds PAGES [ROUNDS] [DELAY_MS]`: in each round r = 1, 2, ... (ROUNDS, 0 = forever)
//!   writes one word into each page of a PAGES-page buffer, prints `round r`, idles DELAY_MS (default
//!   20): dirties a known number of pages per round (checkpoint benchmarks);
//! - `rdtsc N`: reads the TSC N times, prints `rdtsc N calls T ns` (what a trace mark's
//!   timestamp costs);
//! - `random PAGES [SEED]`: forever, in bursts of a random size (none to all of PAGES), writes
//!   bytes of random pages of a PAGES-page buffer (mostly 0 or 1 into one of 4 places, so that
//!   pages often return to an earlier content; sometimes the byte already there), idling 0–3 ms
//!   between bursts: a varying dirty rate (tracking tests);
//! - `marks N`: writes N job marks (start and end of N/2 jobs) into the trace ring, prints
//!   `marks done`, then idles until stopped (trace benchmarks and tests);
//! - `fault`: writes to an unmapped address (triple fault, there is no guest IDT);
//! - `panic`: panics;
//! - `badport`: writes to a port that no device owns;
//! - `badaddr`: asks the console to print from outside guest memory.
#![no_std]
#![no_main]

extern crate alloc;

use guest_sdk::{args, println};

guest_sdk::entry!(main);

fn parse(s: Option<&str>, default: u64) -> u64 {
    s.and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn main() -> u32 {
    let mut a = args();
    match a.next().unwrap_or("count") {
        "rdtsc" => {
            let n = parse(a.next(), 100_000);
            let t0 = guest_sdk::now_ns();
            let mut x = 0u64;
            for _ in 0..n {
                x = x.wrapping_add(guest_sdk::trace::tsc());
            }
            let t1 = guest_sdk::now_ns();
            println!("rdtsc {n} calls {} ns (x {})", t1 - t0, x & 1);
            0
        }
        "marks" => {
            let n = parse(a.next(), 1000);
            for i in 0..n / 2 {
                guest_sdk::trace::start(i as u32);
                guest_sdk::trace::end(i as u32);
            }
            println!("marks done");
            loop {
                guest_sdk::idle(u64::MAX);
            }
        }
        "count" => {
            let n = parse(a.next(), 10);
            let delay = parse(a.next(), 0) * 1_000_000;
            let mut sum = 0u64;
            let mut last = guest_sdk::now_ns();
            for i in 1..=n {
                sum += i;
                println!("count {i}");
                if delay > 0 {
                    guest_sdk::clock::sleep_ns(delay);
                }
                let now = guest_sdk::now_ns();
                if now < last {
                    println!("clock went backwards: {last} -> {now}");
                    return 1;
                }
                last = now;
            }
            println!("done sum={sum}");
            0
        }
        "exit" => parse(a.next(), 0) as u32,
        "heap" => heap_check(parse(a.next(), 20_000)),
        "clock" => {
            let n = parse(a.next(), 10_000).max(1);
            let start = guest_sdk::now_ns();
            for _ in 0..n {
                core::hint::black_box(guest_sdk::now_ns());
            }
            println!("clock {n} calls {} ns", guest_sdk::now_ns() - start);
            0
        }
        "dirty" => {
            let info = guest_sdk::boot_info();
            let base = info.heap_start + parse(a.next(), 0) * 4096;
            let mut k = 0;
            for p in a.next().unwrap_or("").split(',').filter(|s| !s.is_empty()) {
                let page = parse(Some(p), 0);
                let addr = base + page * 4096;
                if addr + 4096 > info.heap_start + info.heap_size {
                    println!("page {page} outside the heap");
                    return 2;
                }
                // SAFETY: the address is inside the heap region, which this mode never
                // allocates from, so nothing else refers to it.
                unsafe { core::ptr::write_volatile((addr + 8) as *mut u64, 0x5157_0000 + page) };
                k += 1;
            }
            println!("dirtied {k}");
            0
        }
        "disk" => {
            let mut s0 = [0u8; 512];
            if guest_sdk::block::read(0, &mut s0).is_err() {
                println!("disk read failed");
                return 3;
            }
            let mut s1 = s0;
            s1.reverse();
            if guest_sdk::block::write(1, &s1).is_err() || guest_sdk::block::flush().is_err() {
                println!("disk write failed");
                return 3;
            }
            let sum: u64 = s0.iter().map(|b| *b as u64).sum();
            println!("disk sectors={} sum={sum}", guest_sdk::block::sectors());
            0
        }
        "disklog" => {
            let n = parse(a.next(), 10);
            let delay = parse(a.next(), 0) * 1_000_000;
            let sectors = guest_sdk::block::sectors();
            if sectors == 0 {
                println!("disklog: no disk");
                return 3;
            }
            for i in 1..=n {
                let buf = [i as u8; 512];
                if guest_sdk::block::write(i % sectors, &buf).is_err() {
                    println!("disk write failed");
                    return 3;
                }
                println!("wrote {i}");
                if delay > 0 {
                    guest_sdk::clock::sleep_ns(delay);
                }
            }
            println!("disklog done");
            0
        }
        "rounds" => {
            let pages = parse(a.next(), 64) as usize;
            let rounds = parse(a.next(), 0);
            let delay = parse(a.next(), 20) * 1_000_000;
            let mut ws = alloc::vec::Vec::new();
            if ws.try_reserve_exact(pages * 512).is_err() {
                println!("rounds: cannot allocate {pages} pages");
                return 2;
            }
            ws.resize(pages * 512, 0u64);
            let mut r = 0;
            while rounds == 0 || r < rounds {
                r += 1;
                for p in 0..pages {
                    // Volatile, so that every round really writes every page.
                    // SAFETY: `p * 512 < ws.len()`, a valid, aligned element of `ws`.
                    unsafe { core::ptr::write_volatile(ws.as_mut_ptr().add(p * 512), r) };
                }
                println!("round {r}");
                guest_sdk::clock::sleep_ns(delay);
            }
            0
        }
        "random" => {
            let pages = parse(a.next(), 256).max(1) as usize;
            let mut x = parse(a.next(), 1) | 1;
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let mut ws = alloc::vec::Vec::new();
            if ws.try_reserve_exact(pages * 4096).is_err() {
                println!("random: cannot allocate {pages} pages");
                return 2;
            }
            ws.resize(pages * 4096, 0u8);
            println!("random: writing");
            loop {
                let burst = match next() % 4 {
                    0 => 0,
                    1 => next() % 8,
                    2 => next() % (pages as u64 / 4 + 1),
                    _ => next() % (pages as u64 + 1),
                };
                for _ in 0..burst {
                    // Mostly one of 4 bytes of a page set to 0 or 1, so that pages often return
                    // to an earlier content (what a stale copy to compare against would miss).
                    let page = (next() % pages as u64) as usize;
                    let (at, v) = match next() % 8 {
                        0 => (page * 4096 + (next() % 4096) as usize, next() as u8),
                        1 => (page * 4096, ws[page * 4096]),
                        _ => (page * 4096 + (next() % 4) as usize * 8, (next() % 2) as u8),
                    };
                    // SAFETY: `at < ws.len()`; volatile so that a write of the same value happens.
                    unsafe { core::ptr::write_volatile(ws.as_mut_ptr().add(at), v) };
                }
                guest_sdk::clock::sleep_ns(next() % 3_000_000);
            }
        }
        "fault" => {
            // SAFETY: deliberately invalid: page 0 is unmapped (the dangling pointer is address 8),
            // the fault is the test.
            unsafe { core::ptr::write_volatile(core::ptr::dangling_mut::<u64>(), 1) };
            0
        }
        "panic" => panic!("asked to panic"),
        "badport" => {
            // SAFETY: deliberately talks to a port no device owns; the VMM must stop the guest.
            unsafe { core::arch::asm!("out dx, eax", in("dx") 0x5ffu16, in("eax") 0u32) };
            0
        }
        "badaddr" => {
            let req = [0xffff_f000u64, 16];
            // SAFETY: deliberately hands the console an address outside guest memory.
            unsafe { core::arch::asm!("out dx, eax", in("dx") guest_sdk::abi::PORT_CONSOLE, in("eax") req.as_ptr() as u32) };
            0
        }
        other => {
            println!("unknown mode {other}");
            2
        }
    }
}

/// Exercises the guest SDK's allocator: random sizes and alignments, interleaved frees and
/// reallocations; every live block keeps its own byte pattern.
fn heap_check(n: u64) -> u32 {
    use alloc::vec::Vec;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut live: Vec<(Vec<u8>, u8)> = Vec::new();
    for i in 0..n {
        let r = next();
        if (r % 3 != 0 && live.len() < 400) || live.is_empty() {
            let size = if r % 50 == 0 { (r >> 8) as usize % 100_000 } else { (r >> 8) as usize % 300 };
            let tag = (i % 251) as u8;
            live.push((alloc::vec![tag; size], tag));
        } else {
            let k = (r >> 8) as usize % live.len();
            let (v, tag) = live.swap_remove(k);
            if v.iter().any(|b| *b != tag) {
                println!("heap corrupted at step {i}");
                return 4;
            }
            if r % 5 == 0 {
                let mut v = v;
                v.resize(v.len() * 2 + 1, tag);
                live.push((v, tag));
            }
        }
    }
    for (v, tag) in &live {
        if v.iter().any(|b| b != tag) {
            println!("heap corrupted at the end");
            return 4;
        }
    }
    println!("heap ok {n}");
    0
}
