//! Real-time scheduling of a VM's vCPU thread: a hard reservation (runtime Q every period P:
//! the thread never runs more than Q per P, and gets Q per P however loaded the host is), or a
//! fixed SCHED_FIFO priority. A reservation is enforced by the kernel (Linux SCHED_DEADLINE, a
//! CBS) or, where a vCPU cannot run under SCHED_DEADLINE (nested PVM), by the VMM itself
//! (`vmm::server`: a periodic server over a SCHED_FIFO thread). Applied by the thread that
//! runs the vCPU to itself, after the VMM's other threads exist (they stay outside the
//! reservation; a SCHED_DEADLINE thread could not start threads anyway).

use serde::{Deserialize, Serialize};
use std::str::FromStr;

/// A CBS reservation: `runtime_us` of CPU every `period_us` (the deadline is the period).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub runtime_us: u64,
    pub period_us: u64,
}

impl FromStr for Reservation {
    type Err = String;
    /// `Q/P`, each a number with `ms` (the default) or `us`: `2ms/10ms`, `2/10`, `500us/2ms`.
    fn from_str(s: &str) -> Result<Reservation, String> {
        let bad = |why: &str| format!("reservation {s:?}: {why} (expected Q/P, e.g. 2ms/10ms)");
        let (q, p) = s.split_once('/').ok_or_else(|| bad("no '/'"))?;
        let us = |t: &str| -> Result<u64, String> {
            let t = t.trim();
            let (num, scale) = if let Some(n) = t.strip_suffix("us") { (n, 1.0) } else { (t.strip_suffix("ms").unwrap_or(t), 1000.0) };
            let v: f64 = num.trim().parse().map_err(|_| bad(&format!("{t:?} is not a time")))?;
            if !v.is_finite() || v <= 0.0 {
                return Err(bad(&format!("{t:?} is not positive")));
            }
            Ok((v * scale).round() as u64)
        };
        let r = Reservation { runtime_us: us(q)?, period_us: us(p)? };
        if r.runtime_us > r.period_us {
            return Err(bad("the runtime Q exceeds the period P"));
        }
        if r.period_us > 4_000_000 || r.runtime_us < 1 {
            return Err(bad("the period is at most 4 s and the runtime at least 1 µs"));
        }
        Ok(r)
    }
}

impl std::fmt::Display for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}us/{}us", self.runtime_us, self.period_us)
    }
}

impl Serialize for Reservation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Reservation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Who enforces a vCPU's reservation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enforcer {
    /// The kernel where it can run a vCPU under SCHED_DEADLINE, else the VMM.
    #[default]
    Auto,
    /// Linux SCHED_DEADLINE (a CBS with the kernel's admission control).
    Kernel,
    /// The VMM's periodic server (`vmm::server`) over SCHED_FIFO at [`SERVER_PRIORITY`] (or the
    /// given priority), with the admission control of [`admit_vmm`].
    Vmm,
}

impl FromStr for Enforcer {
    type Err = String;
    fn from_str(s: &str) -> Result<Enforcer, String> {
        match s {
            "auto" => Ok(Enforcer::Auto),
            "kernel" => Ok(Enforcer::Kernel),
            "vmm" => Ok(Enforcer::Vmm),
            _ => Err(format!("enforcer {s:?}: expected auto, kernel or vmm")),
        }
    }
}

impl Enforcer {
    /// `Auto` decided for this host.
    pub fn resolve(self) -> Enforcer {
        match self {
            Enforcer::Auto if deadline_vcpus_stall() => Enforcer::Vmm,
            Enforcer::Auto => Enforcer::Kernel,
            e => e,
        }
    }
}

/// The SCHED_FIFO priority of a vCPU under a VMM-enforced reservation: above the host's other
/// real-time work, which the reservation must not depend on.
pub const SERVER_PRIORITY: u8 = 90;

/// Whether this host's KVM is the nested PVM backend (`kvm_pvm` loaded), on which a vCPU
/// thread under SCHED_DEADLINE makes no progress: measured, a guest computing for 19 ms did not
/// finish in 10 s under any reservation (2ms/10ms to 900ms/1000ms), its thread spinning in the
/// kernel, while SCHED_FIFO works.
pub fn deadline_vcpus_stall() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Puts the calling vCPU thread under `r`, refusing on a KVM backend where a vCPU under
/// SCHED_DEADLINE stalls ([`deadline_vcpus_stall`]).
pub fn reserve_vcpu(r: Reservation) -> Result<(), String> {
    if deadline_vcpus_stall() {
        return Err(format!(
            "reservation {r}: refused on this host: its KVM is the nested PVM backend (kvm_pvm), where a vCPU under \
             SCHED_DEADLINE makes no progress (use --enforcer vmm, or a host with hardware KVM)"
        ));
    }
    reserve(r)
}

/// Puts the calling thread under `r`; the error says why the kernel refused, in its terms.
pub fn reserve(r: Reservation) -> Result<(), String> {
    let attr = vmm::sched::SchedAttr {
        policy: vmm::sched::SCHED_DEADLINE,
        runtime: r.runtime_us * 1000,
        deadline: r.period_us * 1000,
        period: r.period_us * 1000,
        ..Default::default()
    };
    let Err(e) = vmm::sched::set(attr) else { return Ok(()) };
    Err(match e.raw_os_error() {
        Some(libc::EBUSY) => format!(
            "reservation {r} refused by admission control: the host has not {:.1} % of a CPU left for deadline tasks ({})",
            r.runtime_us as f64 * 100.0 / r.period_us as f64,
            rt_limit()
        ),
        Some(libc::EPERM) => format!("reservation {r}: not permitted (SCHED_DEADLINE needs root or CAP_SYS_NICE)"),
        Some(libc::ENOSYS) => format!("reservation {r}: this kernel has no sched_setattr (SCHED_DEADLINE needs Linux 3.14 or later)"),
        Some(libc::EINVAL) => format!("reservation {r}: the kernel refused these parameters ({e}); the runtime must be at least 1 µs"),
        _ => format!("reservation {r}: {e}"),
    })
}

/// Where the VMM-enforced reservations of this host are registered (one line per vCPU thread:
/// `pid tid runtime_us period_us cpu,cpu,...`), for their admission control; the environment
/// variable `VIGIL_RESERVATIONS` names another file (tests).
pub fn registry() -> std::path::PathBuf {
    std::env::var_os("VIGIL_RESERVATIONS").map(Into::into).unwrap_or_else(|| "/run/vigil/vmm-reservations".into())
}

/// The share of each CPU the kernel lets real-time tasks have (sched_rt_runtime_us /
/// sched_rt_period_us; 1 when unlimited).
fn rt_share() -> f64 {
    let read = |f: &str| std::fs::read_to_string(format!("/proc/sys/kernel/{f}")).ok().and_then(|t| t.trim().parse::<i64>().ok());
    match (read("sched_rt_runtime_us"), read("sched_rt_period_us")) {
        (Some(rt), Some(p)) if rt >= 0 && p > 0 => rt as f64 / p as f64,
        _ => 1.0,
    }
}

/// The CPUs the calling thread may run on.
fn affinity() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above, for the calling thread (0).
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Vec::new();
    }
    // SAFETY: CPU_ISSET reads inside the set.
    (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
}

/// Admission control of a reservation the VMM enforces, for the calling thread (the vCPU's):
/// under a lock of the host's registry ([`registry`]), entries of threads that ended are
/// dropped, and the reservation is admitted when the reservations whose CPUs overlap the
/// thread's, with it, take at most the kernel's real-time share of those CPUs; it is then
/// registered for as long as the thread lives. The refusal names what is taken and what is left.
pub fn admit_vmm(r: Reservation) -> Result<(), String> {
    use std::io::{Read, Seek, Write};
    let path = registry();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("reservation {r}: cannot create {}: {e}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("reservation {r}: cannot open {}: {e}", path.display()))?;
    // SAFETY: flock(2) on a descriptor we own; released when it is closed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) } != 0 {
        return Err(format!("reservation {r}: cannot lock {}: {}", path.display(), std::io::Error::last_os_error()));
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(|e| format!("reservation {r}: cannot read {}: {e}", path.display()))?;
    let alive = |pid: &str, tid: &str| std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists();
    let mine = affinity();
    let (mut taken, mut kept) = (0.0, Vec::new());
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let [pid, tid, q, p, cpus] = w[..] else { continue };
        let (Ok(q), Ok(p)) = (q.parse::<f64>(), p.parse::<f64>()) else { continue };
        if !alive(pid, tid) || p <= 0.0 {
            continue;
        }
        let theirs: Vec<usize> = cpus.split(',').filter_map(|c| c.parse().ok()).collect();
        if theirs.iter().any(|c| mine.contains(c)) {
            taken += q / p;
        }
        kept.push(line.to_string());
    }
    let share = r.runtime_us as f64 / r.period_us as f64;
    let capacity = rt_share() * mine.len().max(1) as f64;
    if taken + share > capacity + 1e-9 {
        return Err(format!(
            "reservation {r} refused by admission control: the reservations the VMM enforces on CPUs {mine:?} take {:.1} % of a CPU of the {:.1} % real-time tasks may have there (sched_rt_runtime_us / sched_rt_period_us of each of those {} CPUs); {:.1} % is left, {:.1} % was asked for",
            taken * 100.0,
            capacity * 100.0,
            mine.len(),
            ((capacity - taken) * 100.0).max(0.0),
            share * 100.0
        ));
    }
    // SAFETY: getpid and gettid have no preconditions.
    let (pid, tid) = unsafe { (libc::getpid(), libc::gettid()) };
    let cpus: Vec<String> = mine.iter().map(|c| c.to_string()).collect();
    kept.push(format!("{pid} {tid} {} {} {}", r.runtime_us, r.period_us, cpus.join(",")));
    let out = kept.join("\n") + "\n";
    f.set_len(0)
        .and_then(|()| f.rewind())
        .and_then(|()| f.write_all(out.as_bytes()))
        .map_err(|e| format!("reservation {r}: cannot write {}: {e}", path.display()))?;
    Ok(())
}

/// The host's real-time limit, as the kernel states it.
fn rt_limit() -> String {
    let read = |f: &str| std::fs::read_to_string(format!("/proc/sys/kernel/{f}")).ok().and_then(|t| t.trim().parse::<i64>().ok());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    match (read("sched_rt_runtime_us"), read("sched_rt_period_us")) {
        (Some(rt), Some(p)) if rt >= 0 && p > 0 => format!(
            "at most {:.0} % of each of its {cpus} CPUs goes to real-time and deadline tasks, by sched_rt_runtime_us / sched_rt_period_us, and the reservations already admitted take the rest",
            rt as f64 * 100.0 / p as f64
        ),
        _ => format!("{cpus} CPUs; the reservations already admitted take what is left"),
    }
}

/// Runs the calling thread under SCHED_FIFO at `priority` (1..=99).
pub fn fifo(priority: u8) -> Result<(), String> {
    let param = libc::sched_param { sched_priority: i32::from(priority) };
    // SAFETY: `param` is a valid sched_param; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        return Err(format!("cannot run at SCHED_FIFO priority {priority}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_parse_with_units_and_bad_ones_are_explained() {
        assert_eq!("2ms/10ms".parse(), Ok(Reservation { runtime_us: 2000, period_us: 10000 }));
        assert_eq!("2/10".parse(), Ok(Reservation { runtime_us: 2000, period_us: 10000 }));
        assert_eq!("500us/2ms".parse(), Ok(Reservation { runtime_us: 500, period_us: 2000 }));
        assert_eq!("28ms/50ms".parse::<Reservation>().map(|r| r.to_string()), Ok("28000us/50000us".into()));
        for (s, want) in
            [("10/2", "exceeds the period"), ("2ms", "no '/'"), ("x/10", "not a time"), ("0/10", "not positive"), ("1/5000", "at most 4 s")]
        {
            let e = s.parse::<Reservation>().unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    /// The VMM-enforced reservations' own admission control: threads of this test take 30 %
    /// each until the CPUs' real-time share is used up; the next is refused with the figures;
    /// once those threads end, their entries are dropped and the reservation is admitted.
    #[test]
    fn vmm_reservations_are_admitted_until_the_real_time_share_is_used_up() {
        let dir = std::env::temp_dir().join(format!("vigil-registry-{}", std::process::id()));
        std::env::set_var("VIGIL_RESERVATIONS", dir.join("reservations"));
        let filler = VmmFiller::fill("3ms/10ms");
        assert!(filler.admitted >= 1, "none admitted");
        let e = std::thread::spawn(|| admit_vmm("3ms/10ms".parse().expect("r"))).join().expect("join").unwrap_err();
        assert!(e.contains("refused by admission control") && e.contains("30.0 % was asked for"), "{e}");
        drop(filler);
        std::thread::spawn(|| admit_vmm("3ms/10ms".parse().expect("r"))).join().expect("join").expect("admitted once the others ended");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Needs root (the tests run as root here, and in CI); the kernel's answer is checked, not
    /// assumed.
    #[test]
    fn a_thread_gets_its_reservation_and_admission_control_says_no_when_full() {
        let r = std::thread::spawn(|| reserve("2ms/10ms".parse().expect("r"))).join().expect("join");
        if let Err(e) = &r {
            assert!(e.contains("not permitted"), "{e}");
            eprintln!("skipped: {e}");
            return;
        }
        // Fill the host's deadline bandwidth, then ask for more: refused by admission control.
        let filler = Filler::fill();
        let e = std::thread::spawn(|| reserve("200ms/1000ms".parse().expect("r"))).join().expect("join").unwrap_err();
        assert!(e.contains("refused by admission control") && e.contains("20.0 %"), "{e}");
        drop(filler);
    }
}

/// Threads holding VMM-enforced reservation entries ([`admit_vmm`]) of `share` each until
/// dropped, as many as the host admits. For tests of that admission control.
pub struct VmmFiller {
    pub admitted: usize,
    stop: Option<std::sync::mpsc::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl VmmFiller {
    pub fn fill(share: &str) -> VmmFiller {
        let r: Reservation = share.parse().expect("a reservation");
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let (mut threads, mut admitted) = (Vec::new(), 0);
        for _ in 0..1000 {
            let rx = rx.clone();
            let (tx, got) = std::sync::mpsc::channel();
            threads.push(std::thread::spawn(move || {
                let ok = admit_vmm(r).is_ok();
                let _ = tx.send(ok);
                if ok {
                    let _ = rx.lock().map(|r| r.recv());
                }
            }));
            if !got.recv().unwrap_or(false) {
                break;
            }
            admitted += 1;
        }
        VmmFiller { admitted, stop: Some(stop), threads }
    }
}

impl Drop for VmmFiller {
    fn drop(&mut self) {
        self.stop.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Threads holding deadline reservations until dropped, as many as the host admits (100 ms
/// then 10 ms of every second each): what is left is under 1 % of a CPU. For tests of
/// admission control.
pub struct Filler {
    stop: Option<std::sync::mpsc::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Filler {
    pub fn fill() -> Filler {
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let mut threads = Vec::new();
        for chunk in ["100ms/1000ms", "10ms/1000ms"] {
            for _ in 0..200 {
                let rx = rx.clone();
                let (tx, got) = std::sync::mpsc::channel();
                threads.push(std::thread::spawn(move || {
                    let ok = reserve(chunk.parse().expect("chunk")).is_ok();
                    let _ = tx.send(ok);
                    if ok {
                        let _ = rx.lock().map(|r| r.recv());
                    }
                }));
                if !got.recv().unwrap_or(false) {
                    break;
                }
            }
        }
        Filler { stop: Some(stop), threads }
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        self.stop.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
