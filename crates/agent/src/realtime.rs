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
    /// given priority): no host-wide admission control, the analysis of the host's model is it.
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
