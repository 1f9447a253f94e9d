//! `_start`: the VMM enters here in user mode with rsp = stack_top - 8 and rdi = the boot
//! information page.

core::arch::global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "  xor ebp, ebp",
    "  and rsp, -16",
    "  call {entry}",
    "  ud2",
    entry = sym entry,
);

extern "Rust" {
    fn __vigil_guest_main() -> u32;
}

extern "C" fn entry(boot: u64) -> ! {
    crate::boot::init(boot);
    crate::heap::init();
    // SAFETY: `__vigil_guest_main` is defined by the guest's `entry!` macro with this signature.
    let status = unsafe { __vigil_guest_main() };
    crate::exit(status)
}
