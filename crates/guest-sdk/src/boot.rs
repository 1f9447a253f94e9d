//! The boot information page the VMM writes before the first instruction.

use core::sync::atomic::{AtomicU64, Ordering};
use vmm_abi::{BootInfo, ARGS_OFFSET, BOOT_INFO_ADDR, BOOT_MAGIC};

static BOOT: AtomicU64 = AtomicU64::new(0);

pub(crate) fn init(addr: u64) {
    let addr = if addr == 0 { BOOT_INFO_ADDR } else { addr };
    BOOT.store(addr, Ordering::Relaxed);
    if boot_info().magic != BOOT_MAGIC {
        crate::exit(103);
    }
}

/// The boot information page.
pub fn boot_info() -> &'static BootInfo {
    let addr = BOOT.load(Ordering::Relaxed);
    let addr = if addr == 0 { BOOT_INFO_ADDR } else { addr };
    // SAFETY: the VMM maps and fills the boot information page before the guest starts and
    // never changes it afterwards; it is aligned and lives as long as the guest.
    unsafe { &*(addr as *const BootInfo) }
}

/// The command-line arguments given to the VM (after `--`), in order.
pub fn args() -> impl Iterator<Item = &'static str> {
    let info = boot_info();
    let base = BOOT.load(Ordering::Relaxed) + ARGS_OFFSET;
    let len = info.args_len.min(vmm_abi::ARGS_MAX as u32) as usize;
    // SAFETY: the argument area is inside the boot information page (len is clamped to it).
    let bytes = unsafe { core::slice::from_raw_parts(base as *const u8, len) };
    bytes.split(|b| *b == 0).take(info.argc as usize).map(|s| core::str::from_utf8(s).unwrap_or(""))
}
