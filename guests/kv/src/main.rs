//! `kv`: a Redis-protocol key-value server (the logic is `kv-core`) on TCP port 6379 (or the
//! first argument), over smoltcp on the VM's network device. Prints `kv: serving on IP:PORT`
//! once it accepts connections. A second argument `BUSY_MIB` adds background computation
//! (a mixed workload): whenever no request is waiting, kv rewrites a slice of a working set
//! of that many MiB instead of idling. An argument `wrong=N` makes one reply in N wrong (a
//! design fault, for the N-version tests of local redundancy); `DEBUG DIRTY MIB` changes the
//! background working set while it runs (load injection: more dirty pages per checkpoint),
//! `DEBUG WORK US` the busy work per request (drift injection: a guest that becomes slower than
//! its model). With a disk, requests are logged there before their replies
//! go out and replayed at start ([`disklog`]).
//!
//! Options (anywhere among the arguments): `work_us=N` adds N µs of busy work (TSC-timed) to
//! each batch of requests a connection delivers — a calibrated execution time, raised to make
//! a VM exceed the WCET its model declares; `trace=0` stops the job marks (on by default: each
//! batch is one job, marked started and ended in the trace ring, which the VMM reads without
//! an exit).
#![no_std]
#![no_main]

extern crate alloc;

mod disklog;

use alloc::vec;
use alloc::vec::Vec;
use guest_sdk::netstack::Stack;
use guest_sdk::println;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

guest_sdk::entry!(main);

/// Most connections at once (each has 2 × 32 KiB of socket buffers).
const MAX_CONNS: usize = 128;
const BUF: usize = 32 * 1024;
/// Sockets kept listening, so that simultaneous connection attempts all find one.
const LISTENERS: usize = 64;

struct Conn {
    handle: SocketHandle,
    input: Vec<u8>,
    output: Vec<u8>,
    closing: bool,
}

fn listen(stack: &mut Stack, port: u16) -> Option<Conn> {
    let mut s = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; BUF]), tcp::SocketBuffer::new(vec![0; BUF]));
    s.set_nagle_enabled(false);
    s.set_ack_delay(None);
    s.listen(port).ok()?;
    Some(Conn { handle: stack.sockets.add(s), input: Vec::new(), output: Vec::new(), closing: false })
}

fn main() -> u32 {
    let (mut work_us, mut trace) = (0u64, true);
    // `wrong=N`: one reply in N is wrong (N-version tests of local redundancy).
    let mut wrong = 0u64;
    let mut positional = alloc::vec::Vec::new();
    for a in guest_sdk::args() {
        match a.split_once('=') {
            Some(("work_us", v)) => match v.parse() {
                Ok(n) => work_us = n,
                Err(_) => {
                    println!("kv: work_us={v}: not a number of microseconds");
                    return 2;
                }
            },
            Some(("trace", v)) => trace = v != "0",
            Some(("wrong", v)) => match v.parse() {
                Ok(n) => wrong = n,
                Err(_) => {
                    println!("kv: wrong={v}: not a number");
                    return 2;
                }
            },
            Some((k, _)) => {
                println!("kv: unknown option {k:?} (work_us=N, trace=0|1, wrong=N)");
                return 2;
            }
            None => positional.push(a),
        }
    }
    let mut args = positional.into_iter();
    let port = args.next().and_then(|p| p.parse().ok()).unwrap_or(6379u16);
    let busy_mib: usize = args.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if work_us > 0 {
        guest_sdk::trace::tsc_per_us();
    }
    let mut job = 0u32;
    let mut busy: Vec<u64> = Vec::new();
    if busy.try_reserve_exact(busy_mib << 17).is_err() {
        println!("kv: cannot allocate {busy_mib} MiB of working set");
        return 2;
    }
    busy.resize(busy_mib << 17, 0);
    let mut busy_at = 0usize;
    let mut busy_pass = 0u64;
    let mut store = kv_core::Store::new();
    if wrong > 0 {
        println!("kv: one reply in {wrong} is wrong");
        store.inject_wrong_answers(wrong);
    }
    let mut log = disklog::DiskLog::open(&mut store);
    let Some(mut stack) = Stack::new() else {
        println!("kv: no network device");
        return 2;
    };
    let mut conns: Vec<Conn> = Vec::new();
    let ip = guest_sdk::boot_info().ipv4;
    println!("kv: serving on {}.{}.{}.{}:{port}", ip[0], ip[1], ip[2], ip[3]);
    loop {
        stack.poll();
        let mut progress = false;
        conns.retain_mut(|c| {
            let s = stack.sockets.get_mut::<tcp::Socket>(c.handle);
            if s.can_recv() {
                let _ = s.recv(|buf| {
                    c.input.extend_from_slice(buf);
                    (buf.len(), ())
                });
                let before = log.as_ref().map(|_| c.input.clone());
                job = job.wrapping_add(1);
                if trace {
                    guest_sdk::trace::start(job);
                }
                guest_sdk::trace::spin_us(work_us);
                if store.serve(&mut c.input, &mut c.output).is_err() {
                    c.closing = true;
                }
                if let Some(us) = store.take_work_request() {
                    // `DEBUG WORK US`: from the next request on (a drift of the guest's timing).
                    if us > 0 {
                        guest_sdk::trace::tsc_per_us();
                    }
                    work_us = us;
                    println!("kv: {us} us of busy work per request");
                }
                if let Some(mib) = store.take_dirty_request() {
                    // `DEBUG DIRTY MIB`: a new background working set (0: none).
                    let words = (mib as usize) << 17;
                    if words > busy.len() && busy.try_reserve_exact(words - busy.len()).is_err() {
                        println!("kv: cannot allocate {mib} MiB of working set");
                    } else {
                        busy.resize(words, 0);
                        busy_at = 0;
                        println!("kv: rewriting a working set of {mib} MiB in the background");
                    }
                }
                if trace {
                    guest_sdk::trace::end(job);
                }
                if let (Some(log), Some(before)) = (log.as_mut(), before) {
                    let used = before.len() - c.input.len();
                    if used > 0 {
                        log.append(&before[..used]);
                    }
                }
                progress = true;
            }
            if !c.output.is_empty() && s.can_send() {
                if let Ok(n) = s.send_slice(&c.output) {
                    c.output.drain(..n);
                    progress = true;
                }
            }
            if c.closing && c.output.is_empty() {
                s.close();
            }
            match s.state() {
                tcp::State::CloseWait if c.output.is_empty() => {
                    s.close();
                    true
                }
                tcp::State::Closed | tcp::State::TimeWait => {
                    stack.sockets.remove(c.handle);
                    false
                }
                _ => true,
            }
        });
        let listening = conns.iter().filter(|c| stack.sockets.get::<tcp::Socket>(c.handle).state() == tcp::State::Listen).count();
        for _ in listening..LISTENERS.min(MAX_CONNS.saturating_sub(conns.len())) {
            match listen(&mut stack, port) {
                Some(c) => conns.push(c),
                None => {
                    println!("kv: cannot listen on port {port}");
                    return 2;
                }
            }
        }
        if progress {
            stack.poll();
        } else if !busy.is_empty() {
            // Background work: one word per page over 1/16 of the working set, then poll.
            let slice = (busy.len() / 16).max(512);
            let end = (busy_at + slice).min(busy.len());
            for i in (busy_at..end).step_by(512) {
                busy[i] = busy[i].wrapping_mul(6364136223846793005).wrapping_add(busy_pass ^ i as u64);
            }
            busy_at = if end >= busy.len() {
                busy_pass += 1;
                0
            } else {
                end
            };
            stack.poll_busy();
        } else {
            stack.wait();
        }
    }
}
