//! Timer upcalls and context switches: the guest's half of paravirtual preemption
//! ([`vmm_abi::PORT_UPCALL`]).
//!
//! A guest registers one dispatch function. It is called with a saved context (an
//! [`UpcallFrame`], on the stack of the code that was running) in two cases: the VMM delivered
//! an upcall ([`REASON_TIMER`]; the frame is the interrupted code), or the running code gave
//! the CPU up with [`switch_out`] (its own reason; the frame resumes just after that call). It
//! returns the frame to continue — the same one, or another context's: a frame is a complete
//! user-mode context (all registers, flags, stack and FPU/SSE state), so returning another
//! task's frame switches task. [`resume`] switches to the frame's stack first, then unmasks
//! upcalls, then restores with `iretq`, so an upcall that arrives in between interrupts the
//! resumed context on its own stack and nothing is lost.
//!
//! The dispatch function runs with upcalls masked, on the stack of the context it was called
//! from. It must not touch state the interrupted code may be in the middle of changing (the
//! console buffer, the heap): a scheduler keeps its own preallocated state.

use core::sync::atomic::{compiler_fence, Ordering};
use vmm_abi::{UpcallBlock, UpcallFrame, FRAME_FXSAVE, FRAME_SIZE, PORT_UPCALL, UPCALL_ADDR, UPCALL_MAGIC, UPCALL_MASKED};

const _: () = assert!(vmm_abi::UPCALL_PENDING == UPCALL_MASKED + 8, "the resume sequence reads `pending` next to `masked`");

/// The dispatch reason of a VMM upcall.
pub const REASON_TIMER: usize = 0;

/// What the guest registers: called with the saved context and the reason, returns the
/// context to continue.
pub type Dispatch = fn(frame: *mut UpcallFrame, reason: usize) -> *mut UpcallFrame;

static mut DISPATCH: Option<Dispatch> = None;

fn block() -> *mut UpcallBlock {
    UPCALL_ADDR as *mut UpcallBlock
}

/// The upcall block as the VMM last wrote it (counts, the last upcall's deadline and delivery
/// time).
pub fn state() -> UpcallBlock {
    // SAFETY: the block is guest memory reserved by the ABI; the VMM writes it only while the
    // vCPU is stopped.
    unsafe { core::ptr::read_volatile(block()) }
}

/// Registers `dispatch` and the SDK's entry as the handler, with upcalls masked (the first
/// [`resume`] unmasks them) and no deadline.
pub fn register(dispatch: Dispatch) {
    // SAFETY: single vCPU; the VMM reads the block only between runs.
    unsafe {
        DISPATCH = Some(dispatch);
        let b = block();
        core::ptr::write_volatile(
            b,
            UpcallBlock {
                magic: UPCALL_MAGIC,
                handler: upcall_entry as *const () as u64,
                deadline_ns: u64::MAX,
                masked: 1,
                ..core::ptr::read_volatile(b)
            },
        );
    }
    crate::port::out(PORT_UPCALL, 0);
}

/// Asks for an upcall when the guest clock reaches `deadline_ns` (`u64::MAX`: none), replacing
/// the previous request. One exit (the VMM arms its timer).
pub fn arm(deadline_ns: u64) {
    // SAFETY: as in `register`.
    unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*block()).deadline_ns), deadline_ns) };
    compiler_fence(Ordering::SeqCst);
    crate::port::out(PORT_UPCALL, 0);
}

/// Masks upcalls (a due one waits until [`resume`] unmasks).
pub fn mask() {
    // SAFETY: as in `register`.
    unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*block()).masked), 1) };
    compiler_fence(Ordering::SeqCst);
}

#[no_mangle]
extern "C" fn __vigil_dispatch(frame: *mut UpcallFrame, reason: usize) -> *mut UpcallFrame {
    // SAFETY: written once by `register` before any upcall or switch can happen.
    match unsafe { DISPATCH } {
        Some(d) => d(frame, reason),
        None => frame,
    }
}

extern "C" {
    fn upcall_entry();
    fn __vigil_resume(frame: *mut UpcallFrame) -> !;
    fn __vigil_switch_out(reason: usize);
}

core::arch::global_asm!(
    // The VMM enters here with rsp = rdi = the frame (16-byte aligned), upcalls masked.
    ".global upcall_entry",
    "upcall_entry:",
    "  fxsave64 [rdi + {fx}]",
    "  xor esi, esi",
    "  call {dispatch}",
    "  mov rdi, rax",
    "  jmp __vigil_resume",
    // rdi = a frame: onto its stack, unmask, restore everything, iretq.
    ".global __vigil_resume",
    "__vigil_resume:",
    "  mov rsp, rdi",
    "  mov rax, {masked}",
    "  mov qword ptr [rax], 0",
    // An upcall that came due while masked: exit now, so that it is delivered here (on the
    // resumed context's stack, before it continues).
    "  cmp qword ptr [rax + 8], 0",
    "  je 2f",
    "  mov edx, {port}",
    "  out dx, eax",
    "2:",
    "  fxrstor64 [rsp + {fx}]",
    "  pop r15", "  pop r14", "  pop r13", "  pop r12", "  pop r11", "  pop r10", "  pop r9", "  pop r8",
    "  pop rbp", "  pop rdi", "  pop rsi", "  pop rdx", "  pop rcx", "  pop rbx", "  pop rax",
    "  iretq",
    // extern "C" fn(reason): mask, save a frame that returns to the caller, dispatch.
    ".global __vigil_switch_out",
    "__vigil_switch_out:",
    "  mov rax, {masked}",
    "  mov qword ptr [rax], 1",
    "  mov rax, rsp",
    "  sub rsp, {size}",
    "  and rsp, -16",
    "  mov [rsp + 0], r15", "  mov [rsp + 8], r14", "  mov [rsp + 16], r13", "  mov [rsp + 24], r12",
    "  mov [rsp + 32], r11", "  mov [rsp + 40], r10", "  mov [rsp + 48], r9", "  mov [rsp + 56], r8",
    "  mov [rsp + 64], rbp", "  mov [rsp + 72], rdi", "  mov [rsp + 80], rsi", "  mov [rsp + 88], rdx",
    "  mov [rsp + 96], rcx", "  mov [rsp + 104], rbx", "  mov qword ptr [rsp + 112], 0",
    "  mov rcx, [rax]", "  mov [rsp + 120], rcx",
    "  mov rcx, cs", "  mov [rsp + 128], rcx",
    "  pushfq", "  pop rcx", "  mov [rsp + 136], rcx",
    "  lea rcx, [rax + 8]", "  mov [rsp + 144], rcx",
    "  mov rcx, ss", "  mov [rsp + 152], rcx",
    "  fxsave64 [rsp + {fx}]",
    "  mov rsi, rdi",
    "  mov rdi, rsp",
    "  call {dispatch}",
    "  mov rdi, rax",
    "  jmp __vigil_resume",
    fx = const FRAME_FXSAVE,
    size = const FRAME_SIZE,
    masked = const UPCALL_ADDR + UPCALL_MASKED,
    port = const PORT_UPCALL as u32,
    dispatch = sym __vigil_dispatch,
);

/// Continues the context saved in `frame` (unmasking upcalls once on its stack).
///
/// # Safety
/// `frame` must be a frame saved by an upcall or [`switch_out`], or made by [`new_frame`],
/// not resumed since, whose stack is still intact.
pub unsafe fn resume(frame: *mut UpcallFrame) -> ! {
    // SAFETY: the caller's contract.
    unsafe { __vigil_resume(frame) }
}

/// Gives the CPU up: saves the calling context as a frame and calls the dispatch function with
/// `reason`; returns when something resumes that frame.
pub fn switch_out(reason: usize) {
    // SAFETY: the assembly saves every register the caller expects preserved in the frame and
    // comes back here only through that frame.
    unsafe { __vigil_switch_out(reason) }
}

/// A fresh context on the stack whose top is `stack_top`: resuming it calls `entry(arg)` as if
/// called from a function (rsp ≡ 8 mod 16), with this context's flags and FPU/SSE state.
///
/// # Safety
/// `stack_top` must be the end of writable memory used by nothing else, with room for a frame
/// and for what `entry` uses.
pub unsafe fn new_frame(stack_top: u64, entry: extern "C" fn(usize) -> !, arg: usize) -> *mut UpcallFrame {
    let top = stack_top & !15;
    let frame = ((top - 64 - FRAME_SIZE as u64) & !15) as *mut UpcallFrame;
    let (cs, ss, rflags): (u64, u64, u64);
    // SAFETY: reads segment selectors and flags; no memory effects beyond the push/pop pair.
    unsafe { core::arch::asm!("mov {0}, cs", "mov {1}, ss", "pushfq", "pop {2}", out(reg) cs, out(reg) ss, out(reg) rflags) };
    // SAFETY: the caller's contract: `frame` lies in the given stack.
    unsafe {
        core::ptr::write_bytes(frame as *mut u8, 0, FRAME_SIZE);
        (*frame).rip = entry as *const () as u64;
        (*frame).rdi = arg as u64;
        (*frame).rsp = top - 8;
        (*frame).cs = cs;
        (*frame).ss = ss;
        (*frame).rflags = rflags & !0x400;
        core::arch::asm!("fxsave64 [{0}]", in(reg) core::ptr::addr_of_mut!((*frame).fxsave) as u64);
    }
    frame
}
