//! `counter`: the minimal vigil test guest. Arguments (after `--` on the VMM's command line):
//!
//! - `count N [DELAY_MS]` (default `count 10`): prints `count i` for i in 1..=N, idling DELAY_MS
//!   between lines, then `done sum=S` and exits 0;
//! - `exit S`: exits with status S;
//! - `clock N`: reads the clock N times (N port exits), prints `clock N calls T ns`;
//! - `dirty OFFSET_PAGES P1,P2,...`: writes one byte in each listed page of the heap (page
//!   numbers relative to heap start + OFFSET_PAGES), prints `dirtied K`, exits 0;
//! - `disk`: reads sector 0, writes its bytes reversed into sector 1, prints both checksums;
//! - `fault`: writes to an unmapped address (triple fault, there is no guest IDT);
//! - `panic`: panics;
//! - `badport`: writes to a port that no device owns;
//! - `badaddr`: asks the console to print from outside guest memory.
#![no_std]
#![no_main]

use guest_sdk::{args, println};

guest_sdk::entry!(main);

fn parse(s: Option<&str>, default: u64) -> u64 {
    s.and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn main() -> u32 {
    let mut a = args();
    match a.next().unwrap_or("count") {
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
