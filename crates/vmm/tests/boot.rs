//! Booting the counter guest on real KVM: output, exit status, faults, bad images, the disk.

mod common;

use common::{guest, scratch, skip_without_kvm, Console};
use vmm::{Stop, Vm, VmConfig};

fn run_counter(args: &[&str]) -> (Stop, String) {
    let console = Console::default();
    let mut config = VmConfig::new(guest("counter"), 16);
    config.args = args.iter().map(|s| s.to_string()).collect();
    let mut vm = Vm::create(config, console.boxed()).expect("create VM");
    let stop = vm.run(None).expect("run VM");
    (stop, console.text())
}

#[test]
fn counter_counts_prints_and_exits() {
    if skip_without_kvm("counter_counts_prints_and_exits") {
        return;
    }
    let (stop, out) = run_counter(&["count", "5"]);
    assert_eq!(stop, Stop::Exited(0), "output: {out}");
    assert_eq!(out, "count 1\ncount 2\ncount 3\ncount 4\ncount 5\ndone sum=15\n");
    let (stop, _) = run_counter(&["exit", "42"]);
    assert_eq!(stop, Stop::Exited(42));
    let (stop, out) = run_counter(&["heap", "30000"]);
    assert_eq!((stop, out.as_str()), (Stop::Exited(0), "heap ok 30000\n"));
}

#[test]
fn guest_faults_stop_the_guest_with_a_reason() {
    if skip_without_kvm("guest_faults_stop_the_guest_with_a_reason") {
        return;
    }
    let cases = [
        ("fault", "triple fault"),
        ("badport", "port 0x5ff: no device at this port"),
        ("badaddr", "outside guest memory"),
        ("disk", "the VM has no disk"),
    ];
    for (mode, reason) in cases {
        let (stop, out) = run_counter(&[mode]);
        match stop {
            Stop::Fault(r) => assert!(r.contains(reason), "{mode}: reason {r:?} lacks {reason:?}"),
            other => panic!("{mode}: expected a fault, got {other:?} (output {out})"),
        }
    }
    let (stop, out) = run_counter(&["panic"]);
    assert_eq!(stop, Stop::Exited(101));
    assert!(out.contains("guest panic: panicked at") && out.contains("asked to panic"), "{out}");
}

fn image_error(bytes: &[u8], mem_mib: u64) -> String {
    let dir = scratch("bad-image");
    let path = dir.join("image");
    std::fs::write(&path, bytes).expect("write image");
    match Vm::create(VmConfig::new(&path, mem_mib), Console::default().boxed()) {
        Ok(_) => panic!("a bad image was accepted"),
        Err(e) => e.to_string(),
    }
}

fn first_load_header(elf: &[u8]) -> usize {
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(elf[56..58].try_into().unwrap()) as usize;
    (0..phnum).map(|i| phoff + i * 56).find(|&o| elf[o..o + 4] == 1u32.to_le_bytes()).expect("a PT_LOAD")
}

#[test]
fn bad_images_are_refused_with_the_culprit_named() {
    if skip_without_kvm("bad_images_are_refused_with_the_culprit_named") {
        return;
    }
    let good = std::fs::read(guest("counter")).expect("read counter");
    let e = image_error(b"#!/bin/sh\necho not an image\n", 16);
    assert!(e.contains("not an ELF file") && e.contains("image"), "{e}");
    let mut elf32 = good.clone();
    elf32[4] = 1;
    assert!(image_error(&elf32, 16).contains("not ELF64"));
    let mut arm = good.clone();
    arm[18..20].copy_from_slice(&183u16.to_le_bytes());
    assert!(image_error(&arm, 16).contains("not x86-64"));
    let mut low = good.clone();
    let ph = first_load_header(&low);
    low[ph + 16..ph + 24].copy_from_slice(&0x1000u64.to_le_bytes());
    assert!(image_error(&low, 16).contains("outside the image area"));
    let mut huge = good.clone();
    let ph = first_load_header(&huge);
    huge[ph + 40..ph + 48].copy_from_slice(&(64u64 << 20).to_le_bytes());
    let e = image_error(&huge, 16);
    assert!(e.contains("segment") && e.contains("outside the image area"), "{e}");
    assert!(image_error(&good[..200], 16).contains("outside the file"));
    let e = match Vm::create(VmConfig::new("/nonexistent/image", 16), Console::default().boxed()) {
        Ok(_) => panic!("missing image accepted"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("/nonexistent/image"), "{e}");
}

#[test]
fn disk_reads_and_writes_sectors() {
    if skip_without_kvm("disk_reads_and_writes_sectors") {
        return;
    }
    let dir = scratch("disk");
    let disk = dir.join("disk.img");
    let mut data = vec![0u8; 8 * 512];
    for (i, b) in data.iter_mut().take(512).enumerate() {
        *b = (i % 251) as u8;
    }
    std::fs::write(&disk, &data).expect("write disk");
    let console = Console::default();
    let mut config = VmConfig::new(guest("counter"), 16);
    config.disk = Some(disk.clone());
    config.args = vec!["disk".into()];
    let mut vm = Vm::create(config, console.boxed()).expect("create VM");
    assert_eq!(vm.run(None).expect("run"), Stop::Exited(0), "{}", console.text());
    let sum: u64 = data[..512].iter().map(|b| *b as u64).sum();
    assert_eq!(console.text(), format!("disk sectors=8 sum={sum}\n"));
    let after = std::fs::read(&disk).expect("read disk");
    let mut reversed = data[..512].to_vec();
    reversed.reverse();
    assert_eq!(&after[512..1024], &reversed[..]);
}
