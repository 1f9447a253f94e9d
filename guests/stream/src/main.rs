//! `stream`: a network-bound workload. Arguments: `MB [PORT]` (default 100 MB, port 5001).
//! Each client that connects receives MB megabytes (a repeating byte pattern), then the
//! connection is closed. Prints `stream: serving on IP:PORT`, and `stream: sent N bytes` per
//! connection.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;
use guest_sdk::netstack::Stack;
use guest_sdk::println;
use smoltcp::socket::tcp;

guest_sdk::entry!(main);

fn main() -> u32 {
    let mut args = guest_sdk::args();
    let mb: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let port: u16 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5001);
    let Some(mut stack) = Stack::new() else {
        println!("stream: no network device");
        return 2;
    };
    let total = mb * 1_000_000;
    let pattern: alloc::vec::Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let ip = guest_sdk::boot_info().ipv4;
    println!("stream: serving on {}.{}.{}.{}:{port}", ip[0], ip[1], ip[2], ip[3]);
    loop {
        let mut s = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; 4096]), tcp::SocketBuffer::new(vec![0; 256 * 1024]));
        s.set_nagle_enabled(false);
        if s.listen(port).is_err() {
            println!("stream: cannot listen on port {port}");
            return 2;
        }
        let h = stack.sockets.add(s);
        let mut sent = 0u64;
        let mut done = false;
        loop {
            stack.poll();
            let s = stack.sockets.get_mut::<tcp::Socket>(h);
            let mut progress = false;
            if s.can_send() && sent < total {
                let off = (sent % 65536) as usize;
                let want = ((total - sent) as usize).min(65536 - off);
                if let Ok(n) = s.send_slice(&pattern[off..off + want]) {
                    sent += n as u64;
                    progress = n > 0;
                }
            }
            if sent == total && !done && s.may_send() {
                s.close();
                done = true;
            }
            if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) && (done || sent > 0 || !s.is_open()) {
                if sent > 0 {
                    println!("stream: sent {sent} bytes");
                }
                stack.sockets.remove(h);
                break;
            }
            if !progress {
                stack.wait();
            }
        }
    }
}
