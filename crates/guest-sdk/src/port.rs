//! The one instruction every device call ends in.

/// `out dx, eax`: hands `value` (a request block address or an exit status) to the VMM.
#[inline(always)]
pub(crate) fn out(port: u16, value: u32) {
    // SAFETY: the guest runs with IOPL 3, so `out` traps to the VMM instead of faulting; the
    // VMM reads or writes only the request block `value` points to, which the caller keeps
    // alive and does not otherwise access during the call (the memory clobber orders it).
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) }
}

/// Sends the request block `req` to `port`; the VMM updates it in place.
pub(crate) fn request<T>(port: u16, req: &mut T) {
    let addr = req as *mut T as usize;
    // Guest memory lies below 4 GiB (vmm_abi::MAX_MEM), so the address fits in eax.
    out(port, addr as u32);
}
