//! The runtime of a vigil unikernel guest (`no_std`).
//!
//! Owns what a compiled Rust program needs to run on vigil's VMM without an operating system:
//! the `_start` entry (stack alignment, then the program's `main` through [`entry!`]), a heap
//! allocator over the region the boot information page gives, `memcpy`/`memset`/`memmove`/
//! `memcmp`/`bcmp`, a panic handler that reports on the console and exits with status 101, and
//! typed wrappers for every paravirtual device ([`console`], [`clock`], [`idle`], [`block`],
//! [`net`], [`exit`]), and with the `net-stack` feature a smoltcp interface over the network
//! device ([`netstack`]). It does not own the ABI numbers (`vmm-abi`).
//!
//! Paravirtual preemption: timer upcalls and context switches ([`upcall`]), and on them a
//! real-time runtime of periodic tasks under rate-monotonic or EDF scheduling ([`rt`]).
//!
//! The guest runs in 64-bit user mode with IOPL 3, single-threaded and without interrupts (an
//! upcall is delivered only to a guest that asked for one, and its handler must not touch the
//! console or the heap), so the global state here needs no locking.
#![no_std]

extern crate alloc;

pub mod block;
pub mod boot;
pub mod clock;
pub mod console;
mod heap;
mod mem;
pub mod net;
#[cfg(feature = "net-stack")]
pub mod netstack;
mod port;
pub mod rt;
mod start;
pub mod trace;
pub mod upcall;

pub use boot::{args, boot_info};
pub use clock::{idle, now_ns};
pub use vmm_abi as abi;

/// Ends the guest with `status` (0..=255 reach the host).
pub fn exit(status: u32) -> ! {
    console::flush();
    port::out(abi::PORT_EXIT, status);
    // The VMM never resumes a guest after exit; stop here if it ever did.
    loop {
        core::hint::spin_loop();
    }
}

/// Declares the guest's main function: `fn main() -> u32`, its return value is the exit status.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        extern "Rust" fn __vigil_guest_main() -> u32 {
            let f: fn() -> u32 = $main;
            f()
        }
    };
}

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    use core::fmt::Write;
    let _ = writeln!(console::Console, "guest panic: {info}");
    exit(101)
}

/// The stable toolchain's precompiled `core`/`alloc` refer to this symbol; a guest never unwinds.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// Referenced by precompiled unwinding paths that a guest never takes.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    exit(102)
}
