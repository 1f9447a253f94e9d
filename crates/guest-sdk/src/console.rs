//! Console output, buffered: one port exit per line (or per full buffer), not per byte.

use core::cell::UnsafeCell;
use vmm_abi::{ConsoleRequest, PORT_CONSOLE};

const BUF: usize = 4096;

struct Buffer {
    data: UnsafeCell<([u8; BUF], usize)>,
}
// SAFETY: a guest is single-threaded and has no interrupts.
unsafe impl Sync for Buffer {}
static OUT: Buffer = Buffer { data: UnsafeCell::new(([0; BUF], 0)) };

/// Writes bytes straight to the console (one exit).
pub fn write_raw(bytes: &[u8]) {
    for chunk in bytes.chunks(vmm_abi::CONSOLE_MAX as usize) {
        let mut req = ConsoleRequest { addr: chunk.as_ptr() as u64, len: chunk.len() as u64 };
        crate::port::request(PORT_CONSOLE, &mut req);
    }
}

/// Sends whatever is buffered.
pub fn flush() {
    // SAFETY: single-threaded; no other reference to the buffer is alive during this call.
    let (buf, len) = unsafe { &mut *OUT.data.get() };
    if *len > 0 {
        write_raw(&buf[..*len]);
        *len = 0;
    }
}

/// The console as a `core::fmt::Write` sink; output is sent at each newline.
pub struct Console;

impl core::fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            // SAFETY: single-threaded; the reference ends before `flush` takes its own.
            let full = unsafe {
                let (buf, len) = &mut *OUT.data.get();
                buf[*len] = b;
                *len += 1;
                *len == BUF
            };
            if full || b == b'\n' {
                flush();
            }
        }
        Ok(())
    }
}

/// `print!` to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{ let _ = core::fmt::Write::write_fmt(&mut $crate::console::Console, format_args!($($arg)*)); }};
}

/// `println!` to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{ $crate::print!($($arg)*); $crate::print!("\n"); }};
}
