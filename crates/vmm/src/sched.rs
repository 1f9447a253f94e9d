//! The calling thread's scheduling attributes through sched_setattr(2)/sched_getattr(2) (the
//! libc crate has no wrapper): what the agent uses to put a vCPU thread under a reservation and
//! the VMM to report how its vCPU thread is scheduled.

/// `struct sched_attr` of sched_setattr(2) (times in ns).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SchedAttr {
    pub size: u32,
    pub policy: u32,
    pub flags: u64,
    pub nice: i32,
    pub priority: u32,
    pub runtime: u64,
    pub deadline: u64,
    pub period: u64,
}

/// SCHED_DEADLINE.
pub const SCHED_DEADLINE: u32 = 6;

/// Sets the calling thread's attributes (`size` is filled in).
pub fn set(mut attr: SchedAttr) -> std::io::Result<()> {
    attr.size = std::mem::size_of::<SchedAttr>() as u32;
    // SAFETY: sched_setattr(2) on the calling thread (pid 0) reads `attr`, a live, fully
    // initialised struct sched_attr whose `size` field is its size.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The calling thread's attributes.
pub fn get() -> Option<SchedAttr> {
    let mut a = SchedAttr::default();
    // SAFETY: sched_getattr(2) on the calling thread writes at most the given size into `a`, a
    // live struct of that size.
    let rc = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut a as *mut SchedAttr, std::mem::size_of::<SchedAttr>() as u32, 0) };
    (rc == 0).then_some(a)
}
