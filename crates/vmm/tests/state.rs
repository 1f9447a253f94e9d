//! Dirty-page tracking, pause/resume and snapshot/restore on real KVM.

mod common;

use common::{guest, scratch, skip_without_kvm, wait_for, Console};
use vmm::{channel_pair, Command, Stop, Vm, VmConfig};

fn heap_start_page(vm: &Vm) -> u64 {
    let info: vmm_abi::BootInfo = vm.memory().read_obj(vmm_abi::BOOT_INFO_ADDR).expect("boot page");
    assert_eq!(info.magic, vmm_abi::BOOT_MAGIC);
    info.heap_start / vmm_abi::PAGE_SIZE
}

#[test]
fn dirty_log_is_exact_for_pages_the_guest_writes() {
    if skip_without_kvm("dirty_log_is_exact_for_pages_the_guest_writes") {
        return;
    }
    let written = [1u64, 5, 9, 200, 201, 300];
    let console = Console::default();
    let mut config = VmConfig::new(guest("counter"), 16);
    config.dirty_log = true;
    let list: Vec<String> = written.iter().map(|p| p.to_string()).collect();
    config.args = vec!["dirty".into(), "256".into(), list.join(",")];
    let mut vm = Vm::create(config, console.boxed()).expect("create VM");
    let base = heap_start_page(&vm) + 256;
    assert_eq!(vm.run(None).expect("run"), Stop::Exited(0), "{}", console.text());
    assert_eq!(console.text(), "dirtied 6\n");
    let dirty = vm.dirty_pages_get_and_clear().expect("dirty log");
    let in_region: Vec<u64> = dirty.iter().filter(|p| (base..base + 512).contains(p)).map(|p| p - base).collect();
    assert_eq!(in_region, written, "dirty pages in the written region");
    // The image's stack and data pages are dirty too, the untouched heap is not.
    assert!(dirty.len() < 64, "{} pages dirty", dirty.len());
    let again = vm.dirty_pages_get_and_clear().expect("dirty log");
    assert!(again.is_empty(), "get-and-clear left {again:?}");
    // Without logging the collection is refused, not silently empty.
    vm.set_dirty_logging(false).expect("stop logging");
    assert!(vm.dirty_pages_get_and_clear().is_err());
}

#[test]
fn pages_the_vmm_writes_count_as_dirty() {
    if skip_without_kvm("pages_the_vmm_writes_count_as_dirty") {
        return;
    }
    let dir = scratch("vmm-dirty");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![7u8; 4096]).expect("write disk");
    let console = Console::default();
    let mut config = VmConfig::new(guest("counter"), 16);
    config.disk = Some(disk);
    config.dirty_log = true;
    config.args = vec!["disk".into()];
    let mut vm = Vm::create(config, console.boxed()).expect("create VM");
    assert_eq!(vm.run(None).expect("run"), Stop::Exited(0), "{}", console.text());
    // The sector was read into a stack buffer by the VMM; find the page holding 512 sevens.
    let dirty = vm.dirty_pages_get_and_clear().expect("dirty log");
    let mem = vm.memory();
    let top = mem.size() / 4096;
    let holder = (top - 256..top).find(|p| {
        let mut page = vec![0u8; 4096];
        mem.read(p * 4096, &mut page).is_ok() && page.windows(512).any(|w| w.iter().all(|b| *b == 7))
    });
    let holder = holder.expect("the sector read is in guest memory");
    assert!(dirty.contains(&holder), "page {holder} written by the VMM is not in {dirty:?}");
}

#[test]
fn snapshot_restore_round_trip_continues_output_and_clock() {
    if skip_without_kvm("snapshot_restore_round_trip_continues_output_and_clock") {
        return;
    }
    let dir = scratch("snapshot");
    let console = Console::default();
    let mut config = VmConfig::new(guest("counter"), 16);
    config.args = vec!["count".into(), "60".into(), "5".into()];
    let mut vm = Vm::create(config, console.boxed()).expect("create VM");
    let (ctl, inbox) = channel_pair().expect("control channel");
    let runner = std::thread::spawn(move || {
        let stop = vm.run(Some(&inbox));
        (vm, stop)
    });
    wait_for("count 10", || console.text().contains("count 10\n"));
    let r = ctl.call(Command::Pause);
    assert!(r.ok, "{r:?}");
    let paused_at = ctl.call(Command::Status).status.expect("status");
    assert!(paused_at.paused);
    std::thread::sleep(std::time::Duration::from_millis(30));
    let still = ctl.call(Command::Status).status.expect("status");
    assert_eq!(still.guest_ns, paused_at.guest_ns, "the guest clock ran while paused");
    let r = ctl.call(Command::Snapshot { dir: dir.clone() });
    assert!(r.ok, "{r:?}");
    let before = console.text();
    let r = ctl.call(Command::Quit);
    assert!(r.ok);
    let (_vm, stop) = runner.join().expect("VM thread");
    assert_eq!(stop.expect("run"), Stop::Quit);
    let last: u64 = before.lines().filter_map(|l| l.strip_prefix("count ")).filter_map(|n| n.parse().ok()).max().expect("counted");
    assert!(last < 60, "the guest finished before the snapshot");

    let console2 = Console::default();
    let mut restored = Vm::restore(&dir, &Default::default(), console2.boxed()).expect("restore");
    assert!(restored.paused());
    assert_eq!(restored.status().guest_ns, paused_at.guest_ns, "guest time at restore");
    restored.resume();
    assert_eq!(restored.run(None).expect("run restored"), Stop::Exited(0), "{}", console2.text());
    let after = console2.text();
    let expected: String = (last + 1..=60).map(|i| format!("count {i}\n")).collect::<String>() + "done sum=1830\n";
    assert_eq!(after, expected);
}

#[test]
fn corrupt_snapshots_are_refused() {
    if skip_without_kvm("corrupt_snapshots_are_refused") {
        return;
    }
    let dir = scratch("snapshot-bad");
    let mut config = VmConfig::new(guest("counter"), 8);
    config.args = vec!["count".into(), "3".into()];
    let mut vm = Vm::create(config, Console::default().boxed()).expect("create VM");
    vm.snapshot(&dir).expect("snapshot before the first instruction");
    let mut ok = Vm::restore(&dir, &Default::default(), Console::default().boxed()).expect("restore");
    ok.resume();
    assert_eq!(ok.run(None).expect("run"), Stop::Exited(0));
    std::fs::write(dir.join("vcpu0.bin"), b"VIGILCPU\x01\x00\x00\x00short").expect("corrupt");
    let e = Vm::restore(&dir, &Default::default(), Console::default().boxed()).err().expect("refused").to_string();
    assert!(e.contains("vcpu0.bin") && e.contains("truncated"), "{e}");
    std::fs::write(dir.join("memory.bin"), b"tiny").expect("corrupt");
    let e = Vm::restore(&dir, &Default::default(), Console::default().boxed()).err().expect("refused").to_string();
    assert!(e.contains("memory.bin has 4 bytes"), "{e}");
    std::fs::write(dir.join("vm.json"), b"{").expect("corrupt");
    let e = Vm::restore(&dir, &Default::default(), Console::default().boxed()).err().expect("refused").to_string();
    assert!(e.contains("vm.json"), "{e}");
}
