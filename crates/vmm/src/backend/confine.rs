//! The backend process's seccomp-bpf allow-list, installed once its setup is done (descriptors
//! checked, guest memory, progress page and rings mapped): from then on it may only move bytes
//! between the descriptors it was given and memory it has, wait, allocate and exit. Any other
//! system call — opening a file, a socket, exec, ptrace, a new mapping of a file it was not
//! given (mmap of an fd is allowed: it has only the VMM's descriptors), kill, changing its
//! credentials — ends the process with SIGSYS, which its VMM sees as a crash and repairs like
//! any other (a new process, the request in flight and the rings replayed).
//!
//! Built with libc's BPF definitions (no seccomp crate). x86_64 only, like the VMM; an x32
//! system call number never matches an entry, so it is refused too.

/// The allowed system calls and what the backend uses them for.
pub const ALLOWED: &[(libc::c_long, &str)] = &[
    (libc::SYS_read, "read: frames from the tap, eventfd counters"),
    (libc::SYS_write, "write: frames to the tap, kicks, messages to stderr"),
    (libc::SYS_pread64, "pread64: block reads"),
    (libc::SYS_pwrite64, "pwrite64: block writes"),
    (libc::SYS_fdatasync, "fdatasync: block flushes"),
    (libc::SYS_fsync, "fsync: block flushes"),
    (libc::SYS_fstat, "fstat: the disk's size per block request"),
    (libc::SYS_newfstatat, "newfstatat: fstat as the C library may issue it"),
    (libc::SYS_statx, "statx: fstat as the C library may issue it"),
    (libc::SYS_recvfrom, "recvfrom: requests from the VMM"),
    (libc::SYS_sendto, "sendto: replies to the VMM"),
    (libc::SYS_poll, "poll: waiting for a request, a kick or a frame"),
    (libc::SYS_ppoll, "ppoll: as poll"),
    (libc::SYS_mmap, "mmap: the allocator"),
    (libc::SYS_munmap, "munmap: the allocator, unmapping at exit"),
    (libc::SYS_mremap, "mremap: the allocator"),
    (libc::SYS_madvise, "madvise: the allocator"),
    (libc::SYS_brk, "brk: the allocator"),
    (libc::SYS_futex, "futex: locks of the standard library (stderr)"),
    (libc::SYS_clock_gettime, "clock_gettime: when the vDSO falls back to the kernel"),
    (libc::SYS_sched_yield, "sched_yield: spinning locks"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn: returning from a signal handler"),
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask: thread and process exit"),
    (libc::SYS_sigaltstack, "sigaltstack: thread exit"),
    (libc::SYS_restart_syscall, "restart_syscall: a poll interrupted by a stop and continue"),
    (libc::SYS_close, "close: at exit"),
    (libc::SYS_exit, "exit: thread exit"),
    (libc::SYS_exit_group, "exit_group: the process's exit"),
];

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16, jt, jf, k }
}

/// The filter: the architecture must be x86_64, the call one of [`ALLOWED`]; anything else
/// kills the process.
pub fn program() -> Vec<libc::sock_filter> {
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    let n = ALLOWED.len();
    let mut p = vec![stmt(load, ARCH), jeq(AUDIT_ARCH_X86_64, 1, 0), stmt(ret, libc::SECCOMP_RET_KILL_PROCESS), stmt(load, NR)];
    for (i, (nr, _)) in ALLOWED.iter().enumerate() {
        // To the final ALLOW: past the rest of the list and the KILL.
        p.push(jeq(*nr as u32, (n - i) as u8, 0));
    }
    p.push(stmt(ret, libc::SECCOMP_RET_KILL_PROCESS));
    p.push(stmt(ret, libc::SECCOMP_RET_ALLOW));
    p
}

/// Installs the filter on every thread of the process (no new privileges first, as an
/// unprivileged filter requires).
pub fn confine() -> Result<(), String> {
    const _: () = assert!(ALLOWED.len() < 255, "jump offsets are 8 bits");
    let prog = program();
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr() as *mut libc::sock_filter };
    // SAFETY: prctl with constant integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!("PR_SET_NO_NEW_PRIVS: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: seccomp(2) reads the program through `fprog`, which points at `prog`, alive for
    // the call.
    let r = unsafe {
        libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, libc::SECCOMP_FILTER_FLAG_TSYNC, &fprog as *const libc::sock_fprog)
    };
    if r != 0 {
        return Err(format!("seccomp: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every allowed call jumps to the final ALLOW; the KILL sits just before it.
    #[test]
    fn every_allowed_call_reaches_allow() {
        let p = program();
        let allow = p.len() - 1;
        assert_eq!(p[allow].k, libc::SECCOMP_RET_ALLOW);
        assert_eq!(p[allow - 1].k, libc::SECCOMP_RET_KILL_PROCESS);
        for (i, (nr, what)) in ALLOWED.iter().enumerate() {
            let at = 4 + i;
            assert_eq!(p[at].k, *nr as u32, "{what}");
            assert_eq!(at + 1 + p[at].jt as usize, allow, "{what}");
        }
    }
}
