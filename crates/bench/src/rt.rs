//! `vigil bench rt`: the loaded-host experiment that motivates reservations for VMs (DESIGN §6),
//! reproduced on vigil's VMM.
//!
//! A task set S = {τ1 = (30 ms, 150 ms), τ2 = (50 ms, 200 ms)} (execution time, period), rate
//! monotonic, runs five ways, all on one CPU: as host threads under SCHED_FIFO; inside a VM
//! (the `rt` guest: preemptive scheduling on timer upcalls) on an unloaded host; the same VM
//! with two real-time host tasks τ3 = (50 ms, 120 ms) and τ4 = (20 ms, 80 ms) (SCHED_FIFO, the
//! same CPU) and no reservation; with the reservation the analysis gives for P = 50 ms; and with
//! the smallest reservation that works in practice (found by search). Without a reservation
//! the VM runs at a real-time priority below the host's tasks (so that the rest of the host's
//! work does not disturb the unloaded column); with one, the reservation is enforced as
//! `vigil vm run --reservation` enforces it on this host (the kernel's SCHED_DEADLINE, or the
//! VMM's periodic server on nested PVM). Every job does the same calibrated work (the guest
//! SDK's `rt::work` recurrence, calibrated once); response time = end − release.
//!
//! Prints per column and task min/avg/max/std of the response times, deadline misses, the
//! analysed bound beside the measured worst case, and ratios between columns; writes one SVG
//! with the response-time CDFs of each task (`--out`).

use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// (execution time, period) in ms.
const S: [(u64, u64); 2] = [(30, 150), (50, 200)];
pub(crate) const LOAD: [(u64, u64); 2] = [(50, 120), (20, 80)];
const PERIOD_MS: u64 = 50;

/// The guest SDK's `rt::work` recurrence, the same steps on the host.
#[inline(never)]
fn work(iterations: u64) -> u64 {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..iterations {
        x = std::hint::black_box(x.rotate_left(7) ^ i).wrapping_mul(0x2545_F491_4F6C_DD1D);
    }
    x
}

pub(crate) fn pin(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes inside it; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("cannot pin to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

pub(crate) fn fifo(priority: i32) -> Result<()> {
    let p = libc::sched_param { sched_priority: priority };
    // SAFETY: sets the calling thread's policy with a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) } != 0 {
        bail!("cannot run at SCHED_FIFO {priority} (needs root): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes into a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes into a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn sleep_until(ns: u64) {
    let ts = libc::timespec { tv_sec: (ns / 1_000_000_000) as i64, tv_nsec: (ns % 1_000_000_000) as i64 };
    while mono_ns() < ns {
        // SAFETY: an absolute sleep on CLOCK_MONOTONIC with a valid timespec; EINTR just ends
        // it early and the loop sleeps again.
        unsafe { libc::clock_nanosleep(libc::CLOCK_MONOTONIC, libc::TIMER_ABSTIME, &ts, std::ptr::null_mut()) };
    }
}

/// Periodic host tasks on `cpu`, rate-monotonic SCHED_FIFO priorities from `top` down, until
/// `stop`; `cpu_time` jobs spin on the thread's own CPU clock (exactly C of CPU), others do
/// `work` at `per_us`. Returns (task, release ns, end ns) per finished job.
pub(crate) fn host_tasks(
    tasks: &[(u64, u64)],
    cpu: usize,
    top: i32,
    per_us: Option<u64>,
    t0: u64,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<(usize, u64, u64)>>> {
    let mut order: Vec<usize> = (0..tasks.len()).collect();
    order.sort_by_key(|&i| tasks[i].1);
    order
        .into_iter()
        .enumerate()
        .map(|(rank, i)| {
            let (c, t) = tasks[i];
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                if pin(cpu).and_then(|()| fifo(top - rank as i32)).is_err() {
                    return out;
                }
                let mut release = t0;
                while !stop.load(Ordering::Relaxed) {
                    sleep_until(release);
                    match per_us {
                        Some(per_us) => {
                            std::hint::black_box(work(c * 1000 * per_us));
                        }
                        None => {
                            let until = thread_cpu_ns() + c * 1_000_000;
                            while thread_cpu_ns() < until {
                                std::hint::spin_loop();
                            }
                        }
                    }
                    out.push((i, release, mono_ns()));
                    release += t * 1_000_000;
                }
                out
            })
        })
        .collect()
}

/// Turns the kernel's real-time throttling off (`sched_rt_runtime_us` = -1) until dropped,
/// then puts the old value back. With it on, the real-time class of a CPU (the host's tasks and
/// the VM's SCHED_FIFO vCPU together) is stopped for 50 ms of every second once it has used
/// 950 ms: a blackout no reservation of the VM can hide. Real-time hosts run without it; the
/// experiment's real-time work is periodic and bounded, never a hog.
pub(crate) struct RtThrottleOff(Option<String>);

impl RtThrottleOff {
    pub(crate) fn new() -> RtThrottleOff {
        const F: &str = "/proc/sys/kernel/sched_rt_runtime_us";
        let old = std::fs::read_to_string(F).ok().map(|s| s.trim().to_string());
        if old.as_deref() != Some("-1") && std::fs::write(F, "-1").is_err() {
            eprintln!("note: cannot turn real-time throttling off (needs root): the loaded columns may see its 50 ms blackouts");
            return RtThrottleOff(None);
        }
        RtThrottleOff(old.filter(|o| o != "-1"))
    }
}

impl Drop for RtThrottleOff {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = std::fs::write("/proc/sys/kernel/sched_rt_runtime_us", old);
        }
    }
}

/// Keeps every other thread of the host off one CPU until dropped (their affinities are put
/// back then): what a real-time host does with cpusets or `isolcpus`. Needed on kernels with
/// the fair deadline server (Linux 6.12 and later), which gives waiting SCHED_OTHER threads up to
/// 50 ms of every second *above* SCHED_FIFO: a blackout for a VMM-enforced reservation. Per-CPU
/// kernel threads cannot move and stay.
pub(crate) struct IsolatedCpu {
    moved: Vec<(i32, libc::cpu_set_t)>,
}

impl IsolatedCpu {
    pub(crate) fn new(cpu: usize) -> IsolatedCpu {
        let me = std::process::id().to_string();
        let mut moved = Vec::new();
        let Ok(procs) = std::fs::read_dir("/proc") else { return IsolatedCpu { moved } };
        for p in procs.flatten() {
            let pid = p.file_name().to_string_lossy().into_owned();
            if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else { continue };
            for t in tasks.flatten() {
                let Ok(tid) = t.file_name().to_string_lossy().parse::<i32>() else { continue };
                // SAFETY: zeroed cpu_set_t values are valid; the calls read and write only them.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    if libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 || !libc::CPU_ISSET(cpu, &set) {
                        continue;
                    }
                    let mut without = set;
                    libc::CPU_CLR(cpu, &mut without);
                    if libc::CPU_COUNT(&without) == 0 {
                        continue;
                    }
                    if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &without) == 0 {
                        moved.push((tid, set));
                    }
                }
            }
        }
        IsolatedCpu { moved }
    }
}

impl Drop for IsolatedCpu {
    fn drop(&mut self) {
        for (tid, set) in self.moved.drain(..) {
            // SAFETY: puts back the affinity read from this thread (it may have ended: ESRCH).
            unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        }
    }
}

/// Iterations of `work` per µs on this CPU: the fastest of 40 trials.
fn calibrate_host(cpu: usize) -> Result<u64> {
    std::thread::spawn(move || -> Result<u64> {
        pin(cpu)?;
        fifo(50)?;
        let mut best = 0;
        for _ in 0..40 {
            let t = Instant::now();
            work(200_000);
            best = best.max(200_000 / (t.elapsed().as_micros() as u64).max(1));
        }
        Ok(best)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("calibration thread panicked"))?
}

/// How the guest's vCPU thread is scheduled in a column.
#[derive(Clone, Copy)]
enum Vcpu {
    /// SCHED_FIFO at this priority, no reservation.
    Fifo(i32),
    /// A reservation of Q µs every [`PERIOD_MS`].
    Reserved(u64),
}

/// One run of the `rt` guest (releases aligned on the reservation's periods): its console
/// text, and what the VMM's server measured.
fn guest_run(image: &Path, cpu: usize, vcpu: Vcpu, cal: Option<u64>, seconds: u64) -> Result<(String, Option<vmm::server::ServerStats>)> {
    let mut config = vmm::VmConfig::new(image, 16);
    config.args = vec!["rm".into(), format!("ms={}", seconds * 1000), format!("align={PERIOD_MS}")];
    config.args.extend(S.iter().map(|(c, t)| format!("{c}/{t}")));
    if let Some(c) = cal {
        config.args.push(format!("cal={c}"));
    }
    let console = Console::default();
    let mut vm = vmm::Vm::create(config, Box::new(console.clone())).context("create the rt VM")?;
    let (stop, server) = std::thread::spawn(move || -> Result<(vmm::Stop, Option<vmm::server::ServerStats>)> {
        pin(cpu)?;
        match vcpu {
            Vcpu::Fifo(p) => fifo(p)?,
            Vcpu::Reserved(q) => {
                // The VMM's server on every host, so that the reservation's periods are the
                // guest clock's (release-synchronous with the guest's aligned releases).
                let sched = agent::vm::Scheduling {
                    reservation: Some(agent::realtime::Reservation { runtime_us: q, period_us: PERIOD_MS * 1000 }),
                    enforcer: agent::realtime::Enforcer::Vmm,
                    ..Default::default()
                };
                sched.apply_to_vcpu(&mut vm).map_err(anyhow::Error::msg)?;
            }
        }
        let stop = vm.run(None)?;
        Ok((stop, vm.reservation_stats()))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("vCPU thread panicked"))??;
    if stop != vmm::Stop::Exited(0) {
        bail!("the rt guest ended with {stop:?}: {}", console.text());
    }
    Ok((console.text(), server))
}

use crate::vmm::Console;

/// Response times and execution times (ms) per task from the guest's `job` lines.
fn guest_jobs(out: &str) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let (mut r, mut e) = (vec![Vec::new(); S.len()], vec![Vec::new(); S.len()]);
    for l in out.lines().filter_map(|l| l.strip_prefix("job ")) {
        let v: Vec<u64> = l.split(' ').filter_map(|x| x.parse().ok()).collect();
        if let [task, _, release, _, end, exec] = v[..] {
            if let (Some(rt), Some(et)) = (r.get_mut(task as usize), e.get_mut(task as usize)) {
                rt.push((end - release) as f64 / 1000.0);
                et.push(exec as f64 / 1000.0);
            }
        }
    }
    (r, e)
}

fn cal_of(out: &str) -> Option<u64> {
    out.lines().find_map(|l| l.strip_prefix("rt: cal ")).and_then(|c| c.trim().parse().ok())
}

/// A column: its name, response times per task, the analysed bound per task (if any).
struct Column {
    name: String,
    responses: Vec<Vec<f64>>,
    bounds: Option<Vec<f64>>,
}

#[derive(serde::Serialize)]
struct Stats {
    jobs: usize,
    min: f64,
    avg: f64,
    max: f64,
    std: f64,
    misses: usize,
}

fn stats(v: &[f64], deadline: f64) -> Stats {
    if v.is_empty() {
        return Stats { jobs: 0, min: f64::NAN, avg: f64::NAN, max: f64::NAN, std: f64::NAN, misses: 0 };
    }
    let n = v.len() as f64;
    let avg = v.iter().sum::<f64>() / n;
    let std = (v.iter().map(|x| (x - avg).powi(2)).sum::<f64>() / n).sqrt();
    Stats {
        jobs: v.len(),
        min: v.iter().cloned().fold(f64::INFINITY, f64::min),
        avg,
        max: v.iter().cloned().fold(0.0, f64::max),
        std,
        misses: v.iter().filter(|&&x| x > deadline).count(),
    }
}

/// The analysis of S with execution times `wcet_us` in a VM with a reservation of `q_us`
/// every [`PERIOD_MS`] under `supply` (`worst-case` or `synchronous`): each task's bound (ms)
/// and the minimal budgets under both supply models (ms, exact).
fn analysed(q_us: u64, supply: &str, wcet_us: &[u64]) -> Result<(Vec<Option<f64>>, Vec<(String, Option<f64>)>)> {
    let mut m = String::new();
    let _ = writeln!(m, "[[processor]]\nname = \"cpu\"\n\n[[vm]]\nname = \"guest\"\nhost = \"cpu\"\nbudget = \"{q_us}us\"\nperiod = \"{PERIOD_MS}ms\"\nsupply = \"{supply}\"\n");
    for (i, ((_, t), c)) in S.iter().zip(wcet_us).enumerate() {
        let _ = writeln!(m, "[[stream]]\nname = \"s{i}\"\nmodel = \"periodic\"\nperiod = \"{t}ms\"\n");
        let _ = writeln!(
            m,
            "[[task]]\nname = \"tau{}\"\non = \"guest\"\ninput = \"s{i}\"\nwcet = \"{c}us\"\npriority = {}\ndeadline = \"{t}ms\"\n",
            i + 1,
            i + 1
        );
    }
    let loaded = model::parse(&m, "bench-rt.toml", Path::new(".")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let a = rtc::system::analyze(&loaded.system, &rtc::system::Options::default()).map_err(|e| anyhow::anyhow!("{}", loaded.locate(&e)))?;
    let r = model::report::Report::new(&loaded, &a);
    let bounds = r.tasks.iter().map(|t| t.wcrt_ms).collect();
    let mins = r
        .resources
        .iter()
        .find(|x| x.name == "guest")
        .map(|x| x.min_budgets.iter().map(|m| (m.supply.to_string(), m.exact_ms)).collect())
        .unwrap_or_default();
    Ok((bounds, mins))
}

/// Response-time CDFs of task `task`, one line per column.
fn cdf_svg(columns: &[Column], task: usize) -> String {
    let (w, h, l, b) = (720.0, 420.0, 60.0, 40.0);
    let xmax = columns.iter().flat_map(|c| c.responses[task].iter().cloned()).fold(1.0f64, f64::max) * 1.05;
    let colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"];
    let mut s = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#);
    let _ = write!(
        s,
        r#"<text x="{}" y="18" text-anchor="middle">τ{} = ({} ms, {} ms): response-time CDF</text>"#,
        w / 2.0,
        task + 1,
        S[task].0,
        S[task].1
    );
    let (pw, ph) = (w - l - 20.0, h - b - 40.0);
    let _ = write!(s, r##"<rect x="{l}" y="30" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##);
    for k in 0..=5 {
        let x = l + pw * k as f64 / 5.0;
        let _ = write!(s, r#"<text x="{x}" y="{}" text-anchor="middle">{:.0}</text>"#, 30.0 + ph + 16.0, xmax * k as f64 / 5.0);
        let y = 30.0 + ph - ph * k as f64 / 5.0;
        let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="end">{:.1}</text>"#, l - 6.0, y + 4.0, k as f64 / 5.0);
    }
    let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="middle">response time (ms)</text>"#, l + pw / 2.0, h - 6.0);
    for (ci, c) in columns.iter().enumerate() {
        let mut v = c.responses[task].clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let colour = colours[ci % colours.len()];
        let mut pts = String::new();
        for (k, x) in v.iter().enumerate() {
            let px = l + pw * x / xmax;
            let y0 = 30.0 + ph - ph * k as f64 / v.len() as f64;
            let y1 = 30.0 + ph - ph * (k + 1) as f64 / v.len() as f64;
            let _ = write!(pts, "{px:.1},{y0:.1} {px:.1},{y1:.1} ");
        }
        let _ = write!(s, r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>"#);
        let y = 30.0 + ph - 10.0 - 16.0 * (columns.len() - 1 - ci) as f64;
        let _ = write!(s, r#"<text x="{}" y="{y}" fill="{colour}" text-anchor="end">{}</text>"#, l + pw - 10.0, c.name);
    }
    s.push_str("</svg>\n");
    s
}

/// Options of the experiment.
pub struct Options {
    pub seconds: u64,
    pub out: PathBuf,
    pub json: bool,
    /// Skip the search for the smallest practical budget.
    pub no_search: bool,
}

/// Runs the experiment and prints its tables.
pub fn run(opts: &Options) -> Result<()> {
    if !vmm::kvm_available() {
        bail!("vigil bench rt needs /dev/kvm");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = cpus - 1;
    let image = testbed::guest("rt").map_err(anyhow::Error::msg)?;
    let seconds = opts.seconds.max(2);
    eprintln!("vigil bench rt: S = τ1 (30 ms, 150 ms), τ2 (50 ms, 200 ms) on CPU {cpu}, {seconds} s per column");
    let find = |mins: &[(String, Option<f64>)], m: &str| mins.iter().find(|(s, _)| s == m).and_then(|x| x.1);

    // The host's timer latency: the floor under upcalls, and how late the VMM's server can
    // notice a spent budget (it pays the overrun back in the next period, so a period's
    // supply can fall short of Q by that much).
    let _isolated = IsolatedCpu::new(cpu);
    let timer = host_timer_latency(cpu)?;
    let margin_us = timer[2].div_ceil(1000);
    let nominal: Vec<u64> = S.iter().map(|(c, _)| c * 1000).collect();
    let (_, mins) = analysed(PERIOD_MS * 1000, "synchronous", &nominal)?;
    let (nominal_sync, nominal_worst) = (find(&mins, "release-synchronous"), find(&mins, "worst-case"));

    let mut columns = Vec::new();
    // 1. Host threads.
    let per_us = calibrate_host(cpu)?;
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = mono_ns() + 20_000_000;
    let threads = host_tasks(&S, cpu, 60, Some(per_us), t0, stop.clone());
    std::thread::sleep(Duration::from_secs(seconds) + Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    let mut host = vec![Vec::new(); S.len()];
    for t in threads {
        for (i, release, end) in t.join().map_err(|_| anyhow::anyhow!("host task panicked"))? {
            host[i].push((end - release) as f64 / 1e6);
        }
    }
    if host.iter().any(|v| v.is_empty()) {
        bail!("the host tasks did not run (SCHED_FIFO needs root)");
    }
    columns.push(Column { name: "host (FIFO)".into(), responses: host, bounds: None });

    // 2. The guest on an unloaded host: its calibration is used by every later run, and its
    // jobs' measured execution times (what the VMM adds included) are what the analysis of
    // the reserved columns uses.
    let (out, _) = guest_run(&image, cpu, Vcpu::Fifo(1), None, seconds)?;
    let cal = cal_of(&out).context("the rt guest printed no calibration")?;
    let (responses, execs) = guest_jobs(&out);
    let wcet_us: Vec<u64> = execs.iter().map(|e| (e.iter().cloned().fold(0.0, f64::max) * 1000.0).ceil() as u64).collect();
    columns.push(Column { name: "guest, unloaded".into(), responses, bounds: None });
    let (_, mins) = analysed(PERIOD_MS * 1000, "synchronous", &wcet_us)?;
    let measured_sync = find(&mins, "release-synchronous").context("no release-synchronous budget for the measured execution times")?;
    let q_analysed = (measured_sync * 1000.0).ceil() as u64 + margin_us;
    // The bound of a column reserved Q: the analysis with the measured execution times and a
    // supply of Q less the enforcement margin every period, release-synchronous.
    // (None: no bound, e.g. Q less the margin does not cover the tasks' utilisation.)
    let bounds = |q: u64| -> Result<Option<Vec<f64>>> {
        Ok(analysed(q.saturating_sub(margin_us).max(1), "synchronous", &wcet_us)
            .ok()
            .and_then(|a| a.0.into_iter().collect::<Option<Vec<f64>>>()))
    };

    let mut overruns = Vec::new();
    let out_dir = &opts.out;
    let mut loaded_run = |vcpu: Vcpu, seconds: u64| -> Result<Vec<Vec<f64>>> {
        let _throttle = RtThrottleOff::new();
        let stop = Arc::new(AtomicBool::new(false));
        let load = host_tasks(&LOAD, cpu, 30, None, mono_ns(), stop.clone());
        let out = guest_run(&image, cpu, vcpu, Some(cal), seconds);
        stop.store(true, Ordering::Relaxed);
        for t in load {
            let _ = t.join();
        }
        let (out, server) = out?;
        if let Some(s) = &server {
            overruns.push(s.max_overrun_us);
        }
        // Every run's jobs and its server's figures, for a closer look.
        let name = match vcpu {
            Vcpu::Fifo(_) => "loaded".to_string(),
            Vcpu::Reserved(q) => format!("loaded-q{q}us"),
        };
        let _ = std::fs::create_dir_all(out_dir);
        let _ = std::fs::write(out_dir.join(format!("rt-{name}.txt")), format!("{out}server: {server:?}\n"));
        Ok(guest_jobs(&out).0)
    };
    // 3. Loaded, no reservation (the VM below the host's real-time tasks).
    columns.push(Column { name: "guest, loaded".into(), responses: loaded_run(Vcpu::Fifo(1), seconds)?, bounds: None });
    // 4. Loaded, the analysed reservation.
    columns.push(Column {
        name: format!("guest, loaded, Q = {:.3} ms (analysed)", q_analysed as f64 / 1000.0),
        responses: loaded_run(Vcpu::Reserved(q_analysed), seconds)?,
        bounds: bounds(q_analysed)?,
    });
    // 5. The smallest budget with no deadline miss, by bisection on a 0.5 ms grid.
    let mut practical = None;
    if !opts.no_search {
        let utilisation: f64 = S.iter().map(|(c, t)| *c as f64 / *t as f64).sum();
        let (mut lo, mut hi) = (((utilisation * PERIOD_MS as f64 * 1000.0) / 500.0).floor() as u64 * 500, q_analysed.div_ceil(500) * 500);
        let probe = (seconds / 2).max(3);
        while hi - lo > 500 {
            let mid = ((lo + hi) / 2 / 500 * 500).max(lo + 500);
            let r = loaded_run(Vcpu::Reserved(mid), probe)?;
            let ok = r.iter().zip(S.iter()).all(|(v, (_, t))| !v.is_empty() && v.iter().all(|&x| x <= *t as f64));
            eprintln!("  Q = {:.1} ms: {}", mid as f64 / 1000.0, if ok { "no miss" } else { "misses" });
            if ok {
                hi = mid
            } else {
                lo = mid
            }
        }
        practical = Some(hi);
        columns.push(Column {
            name: format!("guest, loaded, Q = {:.1} ms (smallest without a miss)", hi as f64 / 1000.0),
            responses: loaded_run(Vcpu::Reserved(hi), seconds)?,
            bounds: bounds(hi)?,
        });
    }
    let max_overrun = overruns.iter().copied().max().unwrap_or(0);

    // Upcall latency beside the host's own timer latency.
    let up = guest_upcall(&image, cpu)?;

    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;
    let mut files = Vec::new();
    for task in 0..S.len() {
        let f = opts.out.join(format!("rt-tau{}-cdf.svg", task + 1));
        std::fs::write(&f, cdf_svg(&columns, task)).with_context(|| format!("cannot write {}", f.display()))?;
        files.push(f);
    }

    let table: Vec<(String, Vec<Stats>, Option<Vec<f64>>)> = columns
        .iter()
        .map(|c| (c.name.clone(), c.responses.iter().zip(S.iter()).map(|(v, (_, t))| stats(v, *t as f64)).collect(), c.bounds.clone()))
        .collect();
    let above: Vec<String> = table
        .iter()
        .filter_map(|(n, st, b)| b.as_ref().map(|b| (n, st, b)))
        .flat_map(|(n, st, b)| {
            st.iter()
                .zip(b)
                .enumerate()
                .filter(|(_, (s, b))| s.max > **b)
                .map(move |(i, (s, b))| format!("{n} τ{}: {:.1} ms > {b:.1} ms", i + 1, s.max))
        })
        .collect();
    if opts.json {
        let v = serde_json::json!({
            "cpu": cpu, "seconds": seconds, "calibration_per_us": {"host": per_us, "guest": cal},
            "min_budget_ms_nominal": {"release_synchronous": nominal_sync, "worst_case": nominal_worst},
            "measured_wcet_us": wcet_us, "enforcement_margin_us": margin_us, "max_overrun_us": max_overrun,
            "min_budget_ms_measured": {"release_synchronous": measured_sync, "analysed_with_margin": q_analysed as f64 / 1000.0},
            "practical_budget_ms": practical.map(|q| q as f64 / 1000.0),
            "columns": table.iter().map(|(n, s, b)| serde_json::json!({"name": n, "tasks": s, "bounds_ms": b})).collect::<Vec<_>>(),
            "above_bound": above,
            "upcall_latency_ns": up, "host_timer_latency_ns": timer,
            "plots": files,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let opt = |q: Option<f64>| q.map_or("—".to_string(), |q| format!("{q:.3}"));
    println!("Task set S rate monotonic, P = {PERIOD_MS} ms; load τ3 (50 ms, 120 ms), τ4 (20 ms, 80 ms) SCHED_FIFO; CPU {cpu}; {seconds} s per column");
    println!(
        "minimal budget for P = {PERIOD_MS} ms with the nominal execution times (30, 50 ms): release-synchronous {} ms, worst-case {} ms",
        opt(nominal_sync),
        opt(nominal_worst)
    );
    println!(
        "measured execution times in the VM (max, unloaded): τ1 {:.3} ms, τ2 {:.3} ms → minimal release-synchronous budget {measured_sync:.3} ms; \
         + enforcement margin {margin_us} µs (the host's worst timer latency; largest overrun seen {max_overrun} µs) = analysed Q {:.3} ms",
        wcet_us[0] as f64 / 1000.0,
        wcet_us[1] as f64 / 1000.0,
        q_analysed as f64 / 1000.0
    );
    if let Some(p) = practical {
        println!(
            "smallest budget without a miss in practice: {:.1} ms (nominal analysis {} ms, analysed with measured times {:.3} ms)",
            p as f64 / 1000.0,
            opt(nominal_sync),
            q_analysed as f64 / 1000.0
        );
    }
    println!();
    println!("| column | task | jobs | min ms | avg ms | max ms | std ms | misses | analysed bound ms |");
    println!("| --- | --- | --: | --: | --: | --: | --: | --: | --: |");
    for (name, st, b) in &table {
        for (i, s) in st.iter().enumerate() {
            let bound = b.as_ref().map_or("—".to_string(), |b| format!("{:.1}", b[i]));
            println!(
                "| {name} | τ{} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {} | {bound} |",
                i + 1,
                s.jobs,
                s.min,
                s.avg,
                s.max,
                s.std,
                s.misses
            );
        }
    }
    println!();
    println!("ratios of the worst case (max) to the host column:");
    for (name, st, _) in &table[1..] {
        let r: Vec<String> =
            st.iter().zip(&table[0].1).enumerate().map(|(i, (s, h))| format!("τ{} {:.2}×", i + 1, s.max / h.max)).collect();
        println!("  {name}: {}", r.join(", "));
    }
    if above.is_empty() {
        println!("every measured worst case under a reservation is within its analysed bound");
    } else {
        println!("ABOVE THE ANALYSED BOUND: {}", above.join("; "));
    }
    if max_overrun > margin_us {
        println!("NOTE: the server overran a budget by {max_overrun} µs, more than the {margin_us} µs margin the bounds assume");
    }
    println!();
    println!(
        "upcall latency (deadline → handler, guest clock, {} upcalls): p50 {} µs, p99 {} µs, max {} µs; the host's own timer latency (SCHED_FIFO thread, clock_nanosleep): p50 {} µs, p99 {} µs, max {} µs",
        up[0],
        up[1] / 1000,
        up[2] / 1000,
        up[3] / 1000,
        timer[0] / 1000,
        timer[1] / 1000,
        timer[2] / 1000
    );
    for f in files {
        println!("plot: {}", f.display());
    }
    Ok(())
}

/// `[n, p50, p99, max]` of the guest's upcall latency (ns).
fn guest_upcall(image: &Path, cpu: usize) -> Result<[u64; 4]> {
    let mut config = vmm::VmConfig::new(image, 16);
    config.args = vec!["upcall".into(), "500".into()];
    let console = Console::default();
    let mut vm = vmm::Vm::create(config, Box::new(console.clone()))?;
    std::thread::spawn(move || -> Result<vmm::Stop> {
        pin(cpu)?;
        fifo(10)?;
        Ok(vm.run(None)?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("vCPU thread panicked"))??;
    let text = console.text();
    let line = text.lines().find(|l| l.starts_with("rt: upcall latency")).with_context(|| format!("no latency line: {text}"))?;
    let field = |k: &str| line.split(' ').find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok([field("n="), field("p50="), field("p99="), field("max=")])
}

/// `[p50, p99, max]` of how late a SCHED_FIFO host thread wakes from an absolute
/// clock_nanosleep 1–2 ms ahead (ns): the floor under any timer-driven upcall.
fn host_timer_latency(cpu: usize) -> Result<[u64; 3]> {
    std::thread::spawn(move || -> Result<[u64; 3]> {
        pin(cpu)?;
        fifo(10)?;
        let mut late = Vec::with_capacity(500);
        for k in 0..500u64 {
            let at = mono_ns() + 1_000_000 + (k * 7919 % 1000) * 1000;
            sleep_until(at);
            late.push(mono_ns() - at);
        }
        late.sort_unstable();
        Ok([late[250], late[495], late[499]])
    })
    .join()
    .map_err(|_| anyhow::anyhow!("timer thread panicked"))?
}
