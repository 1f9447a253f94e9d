//! The job-trace ring (`vmm_abi::TRACE_ADDR`) on real VMs: marks written by the guest without
//! an exit are read by the `trace` command, at most a ring's worth, with what was overwritten
//! counted as lost; a read takes each mark once; a guest that scribbles over the ring gets at
//! most a ring of nonsense back, never a failure of the VMM.

mod common;

use common::{guest, skip_without_kvm, Console};
use std::time::{Duration, Instant};
use vmm::{channel_pair, Command, Controller, Vm, VmConfig};
use vmm_abi::{MARK_END, MARK_START, TRACE_CAPACITY};

fn start(image: &str, args: &[&str]) -> (Controller, Console, std::thread::JoinHandle<vmm::Result<vmm::Stop>>) {
    let mut config = VmConfig::new(guest(image), 16);
    config.args = args.iter().map(|a| a.to_string()).collect();
    let console = Console::default();
    let mut vm = Vm::create(config, console.boxed()).expect("create VM");
    let (ctl, inbox) = channel_pair().expect("control channel");
    let runner = std::thread::spawn(move || vm.run(Some(&inbox)));
    (ctl, console, runner)
}

fn wait_for(console: &Console, text: &str) {
    let t = Instant::now();
    while !console.text().contains(text) {
        assert!(t.elapsed() < Duration::from_secs(20), "waiting for {text:?}: {}", console.text());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn marks_are_read_once_and_overwritten_ones_are_counted() {
    if skip_without_kvm("marks_are_read_once_and_overwritten_ones_are_counted") {
        return;
    }
    let (ctl, console, runner) = start("counter", &["marks", "10"]);
    wait_for(&console, "marks done");
    let t = ctl.call(Command::Trace).trace.expect("a trace");
    assert!(t.tsc_khz > 0, "{t:?}");
    assert_eq!(t.lost, 0);
    let kinds: Vec<(u32, u32)> = t.marks.iter().map(|m| (m.kind, m.id)).collect();
    let want: Vec<(u32, u32)> = (0..5).flat_map(|i| [(MARK_START, i), (MARK_END, i)]).collect();
    assert_eq!(kinds, want);
    assert!(t.marks.windows(2).all(|w| w[0].tsc <= w[1].tsc), "the TSC only grows");
    assert!(ctl.call(Command::Trace).trace.expect("a trace").marks.is_empty(), "each mark once");
    ctl.call(Command::Quit);
    runner.join().expect("join").expect("run");

    // More marks than the ring holds: the newest ring's worth, the rest counted as lost.
    let (ctl, console, runner) = start("counter", &["marks", "100000"]);
    wait_for(&console, "marks done");
    let t = ctl.call(Command::Trace).trace.expect("a trace");
    assert_eq!(t.marks.len() as u64, TRACE_CAPACITY);
    assert_eq!(t.lost, 100_000 - TRACE_CAPACITY);
    assert_eq!(t.marks.last().map(|m| (m.kind, m.id)), Some((MARK_END, 49_999)));
    ctl.call(Command::Quit);
    runner.join().expect("join").expect("run");
}

#[test]
fn a_scribbled_ring_gives_at_most_a_ring_of_marks() {
    if skip_without_kvm("a_scribbled_ring_gives_at_most_a_ring_of_marks") {
        return;
    }
    for written in ["0xffffffffffffffff", "5", "0"] {
        let (ctl, console, runner) = start("hostile", &["trace-scribble", written]);
        wait_for(&console, "scribbled");
        for _ in 0..3 {
            let r = ctl.call(Command::Trace);
            assert!(r.ok, "{r:?}");
            assert!(r.trace.expect("a trace").marks.len() as u64 <= TRACE_CAPACITY);
        }
        // The VM still answers.
        assert!(ctl.call(Command::Status).ok);
        ctl.call(Command::Quit);
        runner.join().expect("join").expect("run");
    }
}
