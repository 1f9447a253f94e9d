//! `hostile`: a test-only guest that attacks the VMM (the threat model is Firecracker's: the
//! guest is untrusted). Modes (arguments after `--` on the VMM's command line):
//!
//! - `console-flood N SIZE`: N console writes of SIZE bytes (at most 64 KiB), then exits 0;
//! - `disk-flood MIB [DELAY_MS]`: after DELAY_MS, writes MIB MiB to the disk in requests of
//!   256 descriptors of 64 KiB (16 MiB per exit), then prints `disk-flood done MIB MiB in T ms`
//!   and exits 0;
//! - `net-flood EXITS [DELAY_MS]`: after DELAY_MS, EXITS transmit requests of 64 minimum-size
//!   (14-byte) frames each, then prints `net-flood done: N frames accepted` and exits 0;
//! - `edge`: requests at the edges of what the ABI allows (lengths 0 and 64 KiB, request
//!   blocks at the top of memory, the last sector, 2048-sector and 256-descriptor batches,
//!   frames of 14 and 1514 bytes, empty batches), then prints `edge ok` and exits 0;
//! - `invalid K`: prints `invalid K: WHAT` and breaks the ABI in way K (0..[`INVALID`]); the VMM
//!   must stop it with a guest fault; if it comes back it prints `survived` and exits 0;
//! - `fuzz SEED N`: N requests to random device ports with random request blocks (mostly
//!   pointing into a scratch area, some anywhere), then prints `fuzz done` and exits 0 (or
//!   dies of what the VMM wrote into its memory: a guest fault, never a VMM failure);
//! - `port-out PORT`: a 4-byte `out` to PORT (decimal or 0x hex), then exits 0;
//! - `jump-past-memory`: jumps to the first address past guest memory;
//! - `trace-scribble WRITTEN`: fills the trace ring with random bytes, sets its magic and its
//!   `written` count to WRITTEN (e.g. 0xffffffffffffffff), prints `scribbled`, then idles;
//! - `upcall-scribble SEED N`: N rounds of random upcall blocks (deadlines past, due, near, far
//!   and random; masked and pending at random; now and then a random magic, handler or stack
//!   pointer), each announced on the upcall port, then computing or idling; prints
//!   `upcall-scribble done` and exits 0 (or dies of a wild handler or stack: a guest fault).
#![no_std]
#![no_main]

extern crate alloc;

use core::arch::asm;
use guest_sdk::abi::*;
use guest_sdk::{args, println};

guest_sdk::entry!(main);

fn parse(s: Option<&str>, default: u64) -> u64 {
    let Some(s) = s else { return default };
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).unwrap_or(default),
        None => s.parse().unwrap_or(default),
    }
}

fn out32(port: u16, value: u32) {
    // SAFETY: a port write; what the VMM does with it is what this guest tests. No memory of
    // this program is touched except through request blocks it owns (memory clobber).
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) }
}

fn out16(port: u16, value: u16) {
    // SAFETY: as `out32`.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") value, options(nostack, preserves_flags)) }
}

fn out8(port: u16, value: u8) {
    // SAFETY: as `out32`.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) }
}

fn in32(port: u16) -> u32 {
    let v: u32;
    // SAFETY: a port read (which the ABI forbids: the VMM must stop the guest).
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack, preserves_flags)) };
    v
}

fn request<T>(port: u16, req: &mut T) {
    out32(port, req as *mut T as usize as u32);
}

/// Static buffers (the guest is single-threaded; every access goes through these helpers).
struct Static<T>(core::cell::UnsafeCell<T>);
// SAFETY: a guest is single-threaded and has no interrupts.
unsafe impl<T> Sync for Static<T> {}
impl<T> Static<T> {
    #[allow(clippy::mut_from_ref)]
    fn get(&self) -> &mut T {
        // SAFETY: single-threaded; callers never hold two references to one buffer.
        unsafe { &mut *self.0.get() }
    }
}

static DATA: Static<[u8; 64 << 10]> = Static(core::cell::UnsafeCell::new([0; 64 << 10]));
static SCRATCH: Static<[u64; 8192]> = Static(core::cell::UnsafeCell::new([0; 8192]));
static DESCS: Static<[BlockDesc; 256]> = Static(core::cell::UnsafeCell::new([BlockDesc { op: 0, sectors: 0, sector: 0, buf: 0 }; 256]));
static BUFS: Static<[NetBuf; 64]> = Static(core::cell::UnsafeCell::new([NetBuf { addr: 0, len: 0, _pad: 0 }; 64]));

fn addr_of<T>(x: &T) -> u64 {
    x as *const T as usize as u64
}

fn main() -> u32 {
    let mut a = args();
    let mode = a.next().unwrap_or("");
    match mode {
        "console-flood" => {
            let n = parse(a.next(), 1000);
            let size = parse(a.next(), CONSOLE_MAX).min(CONSOLE_MAX);
            let data = DATA.get();
            data.fill(b'x');
            data[data.len() - 1] = b'\n';
            let mut req = ConsoleRequest { addr: addr_of(data) + (data.len() as u64 - size), len: size };
            for _ in 0..n {
                request(PORT_CONSOLE, &mut req);
            }
            0
        }
        "disk-flood" => {
            let mib = parse(a.next(), 64);
            let delay = parse(a.next(), 0);
            guest_sdk::clock::sleep_ns(delay * 1_000_000);
            let sectors = guest_sdk::block::sectors();
            let per_desc = 128u32; // 64 KiB
            if sectors < per_desc as u64 {
                println!("disk-flood: the disk is too small ({sectors} sectors)");
                return 1;
            }
            let data = DATA.get();
            let descs = DESCS.get();
            let start = guest_sdk::now_ns();
            let mut written = 0u64;
            let mut at = 0u64;
            while written < mib << 20 {
                for (i, d) in descs.iter_mut().enumerate() {
                    data[0] = i as u8;
                    if at + per_desc as u64 > sectors {
                        at = 0;
                    }
                    *d = BlockDesc { op: BLOCK_WRITE, sectors: per_desc, sector: at, buf: addr_of(data) };
                    at += per_desc as u64;
                }
                let mut req = BlockRequest { count: 256, status: 0, descs: addr_of(descs) };
                request(PORT_BLOCK, &mut req);
                if req.status != BLOCK_OK {
                    println!("disk-flood: status {}", req.status);
                    return 1;
                }
                written += 256 * per_desc as u64 * SECTOR_SIZE;
            }
            println!("disk-flood done {} MiB in {} ms", written >> 20, (guest_sdk::now_ns() - start) / 1_000_000);
            0
        }
        "net-flood" => {
            let exits = parse(a.next(), 1000);
            let delay = parse(a.next(), 0);
            println!("net-flood in {delay} ms");
            guest_sdk::clock::sleep_ns(delay * 1_000_000);
            let Some(cfg) = guest_sdk::net::config() else {
                println!("net-flood: no network device");
                return 1;
            };
            let data = DATA.get();
            let bufs = BUFS.get();
            for (i, b) in bufs.iter_mut().enumerate() {
                let f = &mut data[i * 14..i * 14 + 14];
                f[..6].copy_from_slice(&[0xff; 6]);
                f[6..12].copy_from_slice(&cfg.mac);
                f[12..14].copy_from_slice(&[0x88, 0xb5]);
                *b = NetBuf { addr: addr_of(&f[0]), len: 14, _pad: 0 };
            }
            let mut sent = 0u64;
            for _ in 0..exits {
                let mut req = NetRequest { count: 64, done: 0, bufs: addr_of(bufs) };
                request(PORT_NET_TX, &mut req);
                sent += req.done as u64;
            }
            println!("net-flood done: {sent} frames accepted");
            0
        }
        "edge" => edge(),
        "invalid" => {
            let k = parse(a.next(), 0) as usize;
            let Some((what, f)) = INVALID.get(k) else {
                println!("invalid {k}: no such case (0..{})", INVALID.len());
                return 1;
            };
            println!("invalid {k}: {what}");
            guest_sdk::console::flush();
            f();
            println!("survived");
            0
        }
        "fuzz" => fuzz(parse(a.next(), 1), parse(a.next(), 10_000)),
        "port-out" => {
            let port = parse(a.next(), 0x7ff) as u16;
            out32(port, 0);
            println!("port-out 0x{port:x} returned");
            0
        }
        "trace-scribble" => {
            let written = parse(a.next(), u64::MAX);
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            for off in (TRACE_HEADER..TRACE_BYTES).step_by(8) {
                // SAFETY: the trace ring is guest memory the ABI reserves for the guest.
                unsafe { ((TRACE_ADDR + off) as *mut u64).write_volatile(rng.next()) };
            }
            // SAFETY: as above.
            unsafe { (TRACE_ADDR as *mut TraceHeader).write_volatile(TraceHeader { magic: TRACE_MAGIC, written }) };
            println!("scribbled");
            loop {
                guest_sdk::idle(u64::MAX);
            }
        }
        "upcall-scribble" => upcall_scribble(parse(a.next(), 1), parse(a.next(), 300)),
        "jump-past-memory" => {
            let top = guest_sdk::boot_info().mem_size;
            guest_sdk::console::flush();
            // SAFETY: deliberately leaves the program: the VMM must report what happens.
            unsafe { asm!("jmp {0}", in(reg) top, options(noreturn)) }
        }
        other => {
            println!("hostile: unknown mode {other:?}");
            2
        }
    }
}

/// Requests at the edges of what the ABI allows; every one must be served.
fn edge() -> u32 {
    let info = guest_sdk::boot_info();
    let top = info.mem_size;
    // Console: nothing, and 64 KiB ending at the top of memory.
    let mut req = ConsoleRequest { addr: top, len: 0 };
    request(PORT_CONSOLE, &mut req);
    let data = DATA.get();
    data.fill(b'e');
    data[data.len() - 1] = b'\n';
    let mut req = ConsoleRequest { addr: addr_of(data), len: CONSOLE_MAX };
    request(PORT_CONSOLE, &mut req);
    // A clock block in the last 8 bytes of memory (the unused slot above the initial stack).
    out32(PORT_CLOCK, (top - 8) as u32);
    // Idle: a deadline in the past, and one 1 ms ahead.
    let mut idle = IdleRequest { deadline_ns: 0, now_ns: 0, events: 0, rx: 0 };
    request(PORT_IDLE, &mut idle);
    let mut idle = IdleRequest { deadline_ns: guest_sdk::now_ns() + 1_000_000, now_ns: 0, events: 0, rx: 0 };
    request(PORT_IDLE, &mut idle);
    // Block: the last sector, 2048 sectors at once, 256 descriptors, an empty batch, flush.
    let sectors = info.disk_sectors;
    if sectors >= 2048 {
        let descs = DESCS.get();
        descs[0] = BlockDesc { op: BLOCK_READ, sectors: 1, sector: sectors - 1, buf: addr_of(data) };
        descs[1] = BlockDesc { op: BLOCK_WRITE, sectors: 1, sector: sectors - 1, buf: addr_of(data) };
        // Into the last MiB of the heap (unused: this program allocates little).
        let heap_end = info.heap_start + info.heap_size;
        descs[2] = BlockDesc { op: BLOCK_READ, sectors: 2048, sector: sectors - 2048, buf: heap_end - 2048 * 512 };
        descs[3] = BlockDesc { op: BLOCK_FLUSH, sectors: 0, sector: 0, buf: 0 };
        let mut req = BlockRequest { count: 4, status: 9, descs: addr_of(descs) };
        request(PORT_BLOCK, &mut req);
        if req.status != BLOCK_OK {
            println!("edge: block status {}", req.status);
            return 1;
        }
        for (i, d) in descs.iter_mut().enumerate() {
            *d = BlockDesc { op: BLOCK_READ, sectors: 1, sector: i as u64, buf: addr_of(data) };
        }
        let mut req = BlockRequest { count: 256, status: 9, descs: addr_of(descs) };
        request(PORT_BLOCK, &mut req);
        let mut empty = BlockRequest { count: 0, status: 9, descs: 0 };
        request(PORT_BLOCK, &mut empty);
        if req.status != BLOCK_OK || empty.status != BLOCK_OK {
            println!("edge: block status {} / {}", req.status, empty.status);
            return 1;
        }
    }
    // Network: frames of every size class from 14 to 1514 bytes, an empty batch, a receive
    // of 64 buffers.
    if info.has_net != 0 {
        let bufs = BUFS.get();
        let mut n = 0;
        for len in (14..=1514).step_by(100).chain([1514]) {
            bufs[n] = NetBuf { addr: addr_of(data), len, _pad: 0 };
            n += 1;
        }
        data[..6].copy_from_slice(&[0xff; 6]);
        data[12..14].copy_from_slice(&[0x88, 0xb5]);
        let mut req = NetRequest { count: n as u32, done: 0, bufs: addr_of(bufs) };
        request(PORT_NET_TX, &mut req);
        let mut empty = NetRequest { count: 0, done: 0, bufs: 0 };
        request(PORT_NET_TX, &mut empty);
        let frames = SCRATCH.get();
        for (i, b) in bufs.iter_mut().enumerate() {
            *b = NetBuf { addr: addr_of(frames) + (i as u64 % 40) * 1536, len: 1514, _pad: 0 };
        }
        let mut rx = NetRequest { count: 40, done: 0, bufs: addr_of(bufs) };
        request(PORT_NET_RX, &mut rx);
    }
    println!("edge ok");
    0
}

/// Ways to break the ABI; each must end in a guest fault.
static INVALID: &[(&str, fn())] = &[
    ("unknown port", || out32(0x600, 0)),
    ("in instead of out", || {
        in32(PORT_CLOCK);
    }),
    ("1-byte out", || out8(PORT_CLOCK, 0)),
    ("2-byte out", || out16(PORT_CLOCK, 0)),
    ("unaligned request block", || out32(PORT_CLOCK, addr_of(SCRATCH.get()) as u32 + 3)),
    ("request block past memory", || out32(PORT_CLOCK, guest_sdk::boot_info().mem_size as u32)),
    ("request block straddling the end of memory", || out32(PORT_IDLE, guest_sdk::boot_info().mem_size as u32 - 8)),
    ("console write over 64 KiB", || {
        let mut r = ConsoleRequest { addr: addr_of(DATA.get()), len: CONSOLE_MAX + 1 };
        request(PORT_CONSOLE, &mut r);
    }),
    ("console write from past memory", || {
        let mut r = ConsoleRequest { addr: guest_sdk::boot_info().mem_size - 1, len: 2 };
        request(PORT_CONSOLE, &mut r);
    }),
    ("console write with an address that wraps", || {
        let mut r = ConsoleRequest { addr: u64::MAX - 1, len: 4 };
        request(PORT_CONSOLE, &mut r);
    }),
    ("block request with 257 descriptors", || block(257, BlockDesc { op: BLOCK_READ, sectors: 1, sector: 0, buf: addr_of(DATA.get()) })),
    ("block descriptor of 2049 sectors", || block(1, BlockDesc { op: BLOCK_READ, sectors: 2049, sector: 0, buf: 0x20_0000 })),
    ("block descriptor past the disk", || {
        block(1, BlockDesc { op: BLOCK_READ, sectors: 1, sector: guest_sdk::block::sectors(), buf: addr_of(DATA.get()) })
    }),
    ("block descriptor whose sector range wraps", || {
        block(1, BlockDesc { op: BLOCK_READ, sectors: 8, sector: u64::MAX - 3, buf: 0x20_0000 })
    }),
    ("block descriptor with operation 7", || block(1, BlockDesc { op: 7, sectors: 1, sector: 0, buf: addr_of(DATA.get()) })),
    ("block buffer past memory", || {
        block(1, BlockDesc { op: BLOCK_READ, sectors: 8, sector: 0, buf: guest_sdk::boot_info().mem_size - 512 })
    }),
    ("block descriptors past memory", || {
        let mut r = BlockRequest { count: 2, status: 0, descs: guest_sdk::boot_info().mem_size - 24 };
        request(PORT_BLOCK, &mut r);
    }),
    ("transmit of 65 frames", || net(PORT_NET_TX, 65, 60)),
    ("transmit of a 13-byte frame", || net(PORT_NET_TX, 1, 13)),
    ("transmit of a 1515-byte frame", || net(PORT_NET_TX, 1, 1515)),
    ("receive into a 1513-byte buffer", || net(PORT_NET_RX, 1, 1513)),
    ("idle with a receive block on a VM without network", || {
        let mut r = IdleRequest { deadline_ns: 0, now_ns: 0, events: 0, rx: addr_of(BUFS.get()) };
        request(PORT_IDLE, &mut r);
    }),
    ("4-byte out to port 0x7fd", || out32(0x7fd, 0)),
    ("4-byte out to port 0x7ff", || out32(0x7ff, 0)),
    ("hlt in user mode", || {
        // SAFETY: a privileged instruction from user mode: a #GP, then a triple fault.
        unsafe { asm!("hlt", options(nostack)) }
    }),
    ("write to an unmapped page", || {
        // SAFETY: deliberately faults (page 0 is unmapped).
        unsafe { core::ptr::write_volatile(8 as *mut u64, 1) }
    }),
];

fn block(count: u32, d: BlockDesc) {
    let descs = DESCS.get();
    descs.fill(d);
    let mut r = BlockRequest { count, status: 0, descs: addr_of(descs) };
    request(PORT_BLOCK, &mut r);
}

fn net(port: u16, count: u32, len: u32) {
    let bufs = BUFS.get();
    let data = DATA.get();
    data[..6].copy_from_slice(&[0xff; 6]);
    bufs.fill(NetBuf { addr: addr_of(data), len, _pad: 0 });
    let mut r = NetRequest { count, done: 0, bufs: addr_of(bufs) };
    request(port, &mut r);
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Mostly below `small`, sometimes anywhere (addresses, lengths, counts).
    fn pick(&mut self, small: u64, top: u64) -> u64 {
        match self.next() % 16 {
            0 => self.next(),
            1 => top - (self.next() % 64),
            2 => self.next() % top,
            3 => u64::MAX - (self.next() % 8),
            _ => self.next() % small,
        }
    }
}

/// Random requests: ports, request blocks and the addresses, sizes and counts inside them,
/// mostly plausible (so that a run goes deep before the first invalid one ends it), sometimes
/// anything.
/// Random upcall blocks; the SDK's entry (a dispatch that resumes what it interrupted) is the
/// handler unless a round sets a wild one.
fn upcall_scribble(seed: u64, n: u64) -> u32 {
    fn resume_it(frame: *mut UpcallFrame, _: usize) -> *mut UpcallFrame {
        frame
    }
    let mut r = Rng(seed | 1);
    guest_sdk::upcall::register(resume_it);
    let block = UPCALL_ADDR as *mut UpcallBlock;
    // SAFETY: the upcall block is guest memory the ABI reserves for the guest.
    let good = unsafe { (*block).handler };
    for _ in 0..n {
        let now = guest_sdk::now_ns();
        let deadline = match r.next() % 6 {
            0 => 0,
            1 => now,
            2 => now + r.next() % 300_000,
            3 => u64::MAX,
            4 => u64::MAX - 1,
            _ => r.next(),
        };
        let b = UpcallBlock {
            magic: if r.next() % 40 == 0 { r.next() } else { UPCALL_MAGIC },
            handler: if r.next() % 400 == 0 { r.next() } else { good },
            deadline_ns: deadline,
            masked: if r.next() % 3 == 0 { r.next() } else { 0 },
            pending: r.next() % 2,
            delivered: r.next(),
            fired_ns: r.next(),
            entered_ns: r.next(),
        };
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(block, b) };
        out32(PORT_UPCALL, r.next() as u32);
        match r.next() % 8 {
            0 => {
                guest_sdk::idle(now + r.next() % 200_000);
            }
            1 => {
                // Unmask by resuming this very context.
                guest_sdk::upcall::switch_out(1);
            }
            2 if r.next() % 20 == 0 => {
                // An upcall due while the stack pointer is nowhere useful.
                // Too low for a frame (the VMM must refuse, not write the GDT), or past memory.
                let top = guest_sdk::boot_info().mem_size;
                let sp = if r.next() % 2 == 0 { 0x1000 + r.next() % 0x300 } else { top + r.next() % 0x10000 };
                // SAFETY: deliberately breaks the stack for the VMM to deal with; nothing
                // returns here unless the VMM ignores the upcall (masked or not due yet).
                unsafe {
                    asm!(
                        "mov {save}, rsp", "mov rsp, {sp}", "2:", "dec {n}", "jnz 2b", "mov rsp, {save}",
                        save = out(reg) _, sp = in(reg) sp, n = inout(reg) 2_000_000u64 => _,
                    )
                };
            }
            _ => {
                let mut x = r.next();
                for _ in 0..(r.next() % 200_000) {
                    x = core::hint::black_box(x.rotate_left(3) ^ 0x55);
                }
            }
        }
    }
    guest_sdk::upcall::mask();
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*block).deadline_ns), u64::MAX) };
    println!("upcall-scribble done");
    0
}

fn fuzz(seed: u64, n: u64) -> u32 {
    let mut r = Rng(seed | 1);
    let info = guest_sdk::boot_info();
    let top = info.mem_size;
    let scratch = SCRATCH.get();
    let base = addr_of(scratch);
    let data = addr_of(DATA.get());
    let ports: &[u16] = if info.has_net != 0 {
        &[PORT_CONSOLE, PORT_CLOCK, PORT_IDLE, PORT_BLOCK, PORT_NET_TX, PORT_NET_RX]
    } else {
        &[PORT_CONSOLE, PORT_CLOCK, PORT_IDLE, PORT_BLOCK]
    };
    let mut done = 0u64;
    for _ in 0..n {
        let port = if r.next() % 200 == 0 { (r.next() % 0x800) as u16 } else { ports[(r.next() % ports.len() as u64) as usize] };
        if port == PORT_EXIT {
            continue;
        }
        let wild = r.next() % 100 == 0;
        // The request block at `base`, what it points to at `base + 4096`.
        let table = base + 4096;
        match port {
            PORT_CONSOLE => {
                scratch[0] = data + r.next() % 4096;
                scratch[1] = if wild { r.pick(70_000, top) } else { r.next() % 200 };
            }
            PORT_IDLE => {
                scratch[0] = guest_sdk::now_ns() + r.next() % 100_000;
                scratch[3] = 0;
            }
            PORT_BLOCK => {
                let count = if wild { r.pick(300, top) } else { r.next() % 4 };
                scratch[0] = count;
                scratch[1] = table;
                for i in 0..8 {
                    let sectors = if wild { r.pick(3000, top) } else { 1 + r.next() % 8 };
                    let sector = if wild {
                        r.pick(info.disk_sectors + 8, top)
                    } else {
                        r.next() % info.disk_sectors.max(1).saturating_sub(8).max(1)
                    };
                    let buf = if wild { r.pick(top, top) } else { data + (r.next() % 8) * 4096 };
                    scratch[512 + i * 3] = (r.next() % if wild { 4 } else { 3 }) | (sectors << 32);
                    scratch[512 + i * 3 + 1] = sector;
                    scratch[512 + i * 3 + 2] = buf;
                }
            }
            PORT_NET_TX | PORT_NET_RX => {
                let count = if wild { r.pick(80, top) } else { 1 + r.next() % 8 };
                scratch[0] = count;
                scratch[1] = table;
                for i in 0..8 {
                    let len = if wild {
                        r.pick(3000, top)
                    } else if port == PORT_NET_TX {
                        14 + r.next() % 1500
                    } else {
                        1514
                    };
                    scratch[512 + i * 2] = data + (i as u64) * 1536;
                    scratch[512 + i * 2 + 1] = len;
                }
            }
            _ => scratch[0] = r.next(),
        }
        let value = if wild && r.next() % 4 == 0 { r.next() as u32 } else { base as u32 };
        out32(port, value);
        done += 1;
    }
    println!("fuzz done: {done} requests");
    0
}
