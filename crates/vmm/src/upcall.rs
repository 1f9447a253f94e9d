//! Timer upcalls: the VMM's half of paravirtual preemption ([`vmm_abi::PORT_UPCALL`]).
//!
//! The guest keeps its handler and next deadline in the [`UpcallBlock`] (guest memory, so
//! snapshots, checkpoints and takeovers carry a pending upcall). Before every entry into the
//! guest the vCPU thread looks at the block: a due, unmasked deadline is delivered at once
//! ([`deliver`]: a frame of the interrupted registers pushed on the guest's stack, the vCPU
//! redirected to the handler); a future one arms a host timer ([`ThreadTimer`]) that signals
//! the vCPU thread at that moment, which brings it out of KVM_RUN (or out of an idle wait) to
//! deliver. The timer is derived state, armed again from the block after a restore.

use crate::{Error, Result};
use kvm_bindings::kvm_regs;
use vmm_abi::{UpcallBlock, UpcallFrame, FRAME_SIZE, UPCALL_MAGIC, UPCALL_RED_ZONE};

/// What the block asks for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// No handler or no deadline.
    Nothing,
    /// The deadline has passed but the guest masked upcalls: mark it pending.
    Masked,
    /// A deadline in the future (guest ns).
    At(u64),
    /// The deadline has passed: deliver.
    Now,
}

/// Reads what `block` asks for at guest time `now`.
pub(crate) fn due(block: &UpcallBlock, now: u64) -> Due {
    if block.magic != UPCALL_MAGIC || block.deadline_ns == u64::MAX {
        Due::Nothing
    } else if now >= block.deadline_ns {
        if block.masked != 0 {
            Due::Masked
        } else {
            Due::Now
        }
    } else {
        Due::At(block.deadline_ns)
    }
}

/// A delivery worked out: the frame to write at `frame_addr`, the registers to continue with,
/// and the block to write back.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub frame_addr: u64,
    pub frame: UpcallFrame,
    pub regs: kvm_regs,
    pub block: UpcallBlock,
}

/// Works out the delivery of the upcall of `block` to a vCPU interrupted with `regs`, at guest
/// time `now`, in `mem_size` bytes of memory. Pure: the caller writes the results. An error
/// (the guest's stack or handler outside its memory) is the guest's fault.
pub(crate) fn deliver(regs: &kvm_regs, block: &UpcallBlock, now: u64, mem_size: u64) -> std::result::Result<Delivery, String> {
    let below = regs.rsp.checked_sub(UPCALL_RED_ZONE + FRAME_SIZE as u64).map(|a| a & !15);
    let frame_addr = match below {
        // Page 0 is unmapped; anything else in memory may hold a guest's stack.
        Some(a) if a >= vmm_abi::PAGE_SIZE && a + FRAME_SIZE as u64 <= mem_size => a,
        _ => return Err(format!("upcall: no room for its frame below the guest's stack pointer 0x{:x}", regs.rsp)),
    };
    if block.handler == 0 || block.handler >= mem_size {
        return Err(format!("upcall: handler address 0x{:x} is outside guest memory", block.handler));
    }
    let frame = UpcallFrame {
        r15: regs.r15,
        r14: regs.r14,
        r13: regs.r13,
        r12: regs.r12,
        r11: regs.r11,
        r10: regs.r10,
        r9: regs.r9,
        r8: regs.r8,
        rbp: regs.rbp,
        rdi: regs.rdi,
        rsi: regs.rsi,
        rdx: regs.rdx,
        rcx: regs.rcx,
        rbx: regs.rbx,
        rax: regs.rax,
        rip: regs.rip,
        cs: crate::arch::USER_CS as u64,
        rflags: regs.rflags,
        rsp: regs.rsp,
        ss: crate::arch::USER_DS as u64,
        fxsave: [0; 512],
    };
    // The handler starts with a clean direction flag and no single-stepping, as after a call.
    let regs = kvm_regs { rip: block.handler, rsp: frame_addr, rdi: frame_addr, rflags: regs.rflags & !(0x100 | 0x400), ..*regs };
    let block = UpcallBlock {
        deadline_ns: u64::MAX,
        masked: 1,
        pending: 0,
        delivered: block.delivered.wrapping_add(1),
        fired_ns: block.deadline_ns,
        entered_ns: now,
        ..*block
    };
    Ok(Delivery { frame_addr, frame, regs, block })
}

/// A POSIX timer on CLOCK_MONOTONIC that sends the VMM's kick signal to one thread (the vCPU
/// thread that created it): the signal ends a KVM_RUN or an idle wait on that thread.
pub(crate) struct ThreadTimer {
    id: libc::timer_t,
    /// The absolute expiry set last (host monotonic ns), to skip redundant syscalls.
    armed_at: Option<u64>,
}

impl ThreadTimer {
    /// A timer that signals the calling thread.
    pub(crate) fn for_this_thread() -> Result<ThreadTimer> {
        // SAFETY: an all-zero sigevent is valid; the fields the kernel reads are set below.
        let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
        ev.sigev_notify = libc::SIGEV_THREAD_ID;
        ev.sigev_signo = crate::control::kick_signal();
        // SAFETY: gettid has no preconditions.
        ev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `ev` and `id` are live; the kernel writes the new timer's id into `id`.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut id) } != 0 {
            return Err(Error::Os(format!("timer_create: {}", std::io::Error::last_os_error())));
        }
        Ok(ThreadTimer { id, armed_at: None })
    }

    /// Makes sure the timer fires no later than host monotonic time `at_ns` (`now_ns` is the
    /// time now): a setting still pending at or before `at_ns` stands (firing early is
    /// harmless, the caller looks again and sets it again), anything else is replaced. One
    /// syscall per firing, not per call.
    pub(crate) fn fire_by(&mut self, at_ns: u64, now_ns: u64) {
        if matches!(self.armed_at, Some(a) if a > now_ns && a <= at_ns) {
            return;
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: (at_ns / 1_000_000_000).min(i64::MAX as u64) as i64,
                tv_nsec: (at_ns % 1_000_000_000).max(1) as i64,
            },
        };
        // SAFETY: `self.id` is a live timer of this process; `spec` is a valid itimerspec.
        unsafe { libc::timer_settime(self.id, libc::TIMER_ABSTIME, &spec, std::ptr::null_mut()) };
        self.armed_at = Some(at_ns);
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: deletes our own timer once.
        unsafe { libc::timer_delete(self.id) };
    }
}

/// Host CLOCK_MONOTONIC now, in ns.
pub(crate) fn host_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes into a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(deadline: u64) -> UpcallBlock {
        UpcallBlock { magic: UPCALL_MAGIC, handler: 0x20_1000, deadline_ns: deadline, ..Default::default() }
    }

    #[test]
    fn only_a_registered_unmasked_deadline_is_delivered() {
        assert_eq!(due(&UpcallBlock::default(), 10), Due::Nothing);
        assert_eq!(due(&block(u64::MAX), 10), Due::Nothing);
        assert_eq!(due(&UpcallBlock { masked: 1, ..block(5) }, 10), Due::Masked);
        assert_eq!(due(&UpcallBlock { masked: 1, ..block(20) }, 10), Due::At(20), "armed while masked");
        assert_eq!(due(&block(20), 10), Due::At(20));
        assert_eq!(due(&block(10), 10), Due::Now);
    }

    #[test]
    fn a_delivery_saves_every_register_below_the_red_zone_and_consumes_the_deadline() {
        let regs =
            kvm_regs { rax: 1, rbx: 2, rcx: 3, rdi: 4, r15: 15, rip: 0x20_0500, rsp: 0x40_0008, rflags: 0x3546, ..Default::default() };
        let d = deliver(&regs, &block(100), 107, 8 << 20).expect("delivery");
        assert_eq!(d.frame_addr % 16, 0);
        assert!(d.frame_addr + FRAME_SIZE as u64 + UPCALL_RED_ZONE <= regs.rsp);
        assert_eq!((d.frame.rax, d.frame.rbx, d.frame.rcx, d.frame.rdi, d.frame.r15), (1, 2, 3, 4, 15));
        assert_eq!((d.frame.rip, d.frame.rsp, d.frame.rflags), (regs.rip, regs.rsp, regs.rflags));
        assert_eq!((d.regs.rip, d.regs.rsp, d.regs.rdi), (0x20_1000, d.frame_addr, d.frame_addr));
        assert_eq!(d.regs.rflags & 0x500, 0, "TF and DF cleared");
        assert_eq!(
            (d.block.deadline_ns, d.block.masked, d.block.delivered, d.block.fired_ns, d.block.entered_ns),
            (u64::MAX, 1, 1, 100, 107)
        );
    }

    #[test]
    fn a_wild_stack_or_handler_is_the_guests_fault() {
        let regs = kvm_regs { rsp: 0x100, ..Default::default() };
        assert!(deliver(&regs, &block(1), 1, 8 << 20).unwrap_err().contains("no room"));
        let regs = kvm_regs { rsp: 1 << 40, ..Default::default() };
        assert!(deliver(&regs, &block(1), 1, 8 << 20).unwrap_err().contains("no room"));
        let regs = kvm_regs { rsp: 0x40_0000, ..Default::default() };
        let wild = UpcallBlock { handler: 1 << 40, ..block(1) };
        assert!(deliver(&regs, &wild, 1, 8 << 20).unwrap_err().contains("handler"));
    }
}
