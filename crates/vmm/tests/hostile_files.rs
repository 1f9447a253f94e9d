//! Files a user did not write are untrusted: crafted guest images and snapshot directories
//! (oversize, truncated, symlinked, tampered paths, corrupted) are each refused with an error
//! naming the file, before memory is allocated for them, and writing a snapshot never follows
//! a planted symbolic link.

mod common;

use common::{guest, scratch, skip_without_kvm, Console};
use std::path::Path;
use std::time::Instant;
use vmm::snapshot::{Manifest, RestoreOverrides};
use vmm::{Vm, VmConfig};

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("status");
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok()).expect("VmRSS")
}

fn restore_err(dir: &Path, overrides: &RestoreOverrides) -> String {
    match Vm::restore(dir, overrides, Console::default().boxed()) {
        Ok(_) => panic!("{} restored", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// A fresh snapshot of a counter VM that has not run yet, in `dir`.
fn snapshot_into(dir: &Path) {
    let mut config = VmConfig::new(guest("counter"), 8);
    config.args = vec!["count".into(), "3".into()];
    let mut vm = Vm::create(config, Console::default().boxed()).expect("create VM");
    vm.snapshot(dir).expect("snapshot");
}

fn copy_snapshot(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).expect("dir");
    for f in ["vm.json", "memory.bin", "vcpu0.bin"] {
        std::fs::copy(from.join(f), to.join(f)).expect("copy");
    }
}

/// Rewrites `vm.json` as an attacker who knows the format would: changed, with a valid
/// checksum of its own.
fn tamper(dir: &Path, f: impl FnOnce(&mut Manifest)) {
    let mut m: Manifest = serde_json::from_slice(&std::fs::read(dir.join("vm.json")).expect("read")).expect("json");
    f(&mut m);
    std::fs::write(dir.join("vm.json"), m.to_json().expect("json")).expect("write");
}

#[test]
fn crafted_snapshots_are_refused_naming_the_file() {
    if skip_without_kvm("crafted_snapshots_are_refused_naming_the_file") {
        return;
    }
    let root = scratch("hostile-snapshots");
    let good = root.join("good");
    snapshot_into(&good);
    let none = RestoreOverrides::default();
    let mut ok = Vm::restore(&good, &none, Console::default().boxed()).expect("the untouched snapshot restores");
    ok.resume();
    assert_eq!(ok.run(None).expect("run"), vmm::Stop::Exited(0));
    let t = root.join("t");

    // A size beyond the ABI's limit: refused before any memory is allocated or read (the
    // 6 GiB memory.bin is sparse).
    copy_snapshot(&good, &t);
    tamper(&t, |m| m.config.mem_mib = 6144);
    std::fs::OpenOptions::new().write(true).open(t.join("memory.bin")).expect("open").set_len(6 << 30).expect("grow");
    let (rss, start) = (rss_kib(), Instant::now());
    let e = restore_err(&t, &none);
    assert!(e.contains("vm.json") && e.contains("outside 4..=4096 MiB"), "{e}");
    let grew = rss_kib().saturating_sub(rss);
    assert!(grew < 64 << 10 && start.elapsed().as_secs() < 2, "grew {grew} KiB in {:?}", start.elapsed());

    // memory.bin of another size than vm.json says, or larger than any guest memory.
    copy_snapshot(&good, &t);
    std::fs::OpenOptions::new().write(true).open(t.join("memory.bin")).expect("open").set_len(12 << 20).expect("grow");
    let e = restore_err(&t, &none);
    assert!(e.contains("memory.bin has 12582912 bytes, vm.json says 8388608"), "{e}");
    std::fs::OpenOptions::new().write(true).open(t.join("memory.bin")).expect("open").set_len(6 << 30).expect("grow");
    let e = restore_err(&t, &none);
    assert!(e.contains("memory.bin: 6442450944 bytes (at most 4294967296)"), "{e}");

    // Corruption: one byte of memory, of the vCPU state, of the manifest.
    copy_snapshot(&good, &t);
    let mut mem = std::fs::read(t.join("memory.bin")).expect("read");
    mem[0x20_0100] ^= 1;
    std::fs::write(t.join("memory.bin"), &mem).expect("write");
    let e = restore_err(&t, &none);
    assert!(e.contains("memory.bin: checksum mismatch"), "{e}");
    copy_snapshot(&good, &t);
    let mut cpu = std::fs::read(t.join("vcpu0.bin")).expect("read");
    cpu[20] ^= 1;
    std::fs::write(t.join("vcpu0.bin"), &cpu).expect("write");
    let e = restore_err(&t, &none);
    assert!(e.contains("vcpu0.bin: checksum mismatch"), "{e}");
    copy_snapshot(&good, &t);
    let text = std::fs::read_to_string(t.join("vm.json")).expect("read");
    std::fs::write(t.join("vm.json"), text.replace("\"guest_ns\": 0", "\"guest_ns\": 1")).expect("write");
    let e = restore_err(&t, &none);
    assert!(e.contains("vm.json: checksum mismatch"), "{e}");

    // Host paths from the snapshot are not taken unless the command line confirms them.
    copy_snapshot(&good, &t);
    let victim = root.join("victim");
    std::fs::write(&victim, b"host data").expect("victim");
    tamper(&t, |m| m.config.disk = Some(victim.clone()));
    let e = restore_err(&t, &none);
    assert!(e.contains("vm.json names the disk") && e.contains("--disk"), "{e}");
    assert_eq!(std::fs::read(&victim).expect("victim"), b"host data");
    copy_snapshot(&good, &t);
    tamper(&t, |m| m.config.tap = Some("eth0".into()));
    let e = restore_err(&t, &none);
    assert!(e.contains("vm.json names the tap device \"eth0\"") && e.contains("--tap"), "{e}");

    // Symbolic links, non-regular files, oversize files.
    copy_snapshot(&good, &t);
    std::fs::rename(t.join("vm.json"), root.join("elsewhere.json")).expect("move");
    std::os::unix::fs::symlink(root.join("elsewhere.json"), t.join("vm.json")).expect("symlink");
    let e = restore_err(&t, &none);
    assert!(e.contains("vm.json: is a symbolic link"), "{e}");
    copy_snapshot(&good, &t);
    std::fs::remove_file(t.join("memory.bin")).expect("rm");
    std::fs::create_dir(t.join("memory.bin")).expect("mkdir");
    let e = restore_err(&t, &none);
    assert!(e.contains("memory.bin: not a regular file"), "{e}");
    copy_snapshot(&good, &t);
    std::fs::write(t.join("vm.json"), vec![b' '; 2 << 20]).expect("write");
    let e = restore_err(&t, &none);
    assert!(e.contains("vm.json: 2097152 bytes (at most 1048576)"), "{e}");
    copy_snapshot(&good, &t);
    std::fs::write(t.join("vcpu0.bin"), vec![0u8; 1 << 20]).expect("write");
    let e = restore_err(&t, &none);
    assert!(e.contains("vcpu0.bin: 1048576 bytes (at most 65536)"), "{e}");
    copy_snapshot(&good, &t);
    std::fs::remove_file(t.join("vcpu0.bin")).expect("rm");
    let e = restore_err(&t, &none);
    assert!(e.contains("vcpu0.bin: cannot open"), "{e}");

    // State KVM refuses (CR0 with paging but no protection, checksums made to match): the
    // error names vcpu0.bin and gives the cause once.
    copy_snapshot(&good, &t);
    let mut cpu = std::fs::read(t.join("vcpu0.bin")).expect("read");
    let cr0 = 12 + 4 + 144 + 4 + 224;
    cpu[cr0..cr0 + 8].copy_from_slice(&0x8000_0000u64.to_le_bytes());
    std::fs::write(t.join("vcpu0.bin"), &cpu).expect("write");
    tamper(&t, |m| m.checksums.vcpu = crc(&cpu));
    let e = restore_err(&t, &none);
    assert!(e.contains("vcpu0.bin: KVM refused the saved vCPU state: KVM_SET_SREGS"), "{e}");
    assert_eq!(e.matches("os error").count(), 1, "{e}");
    let _ = std::fs::remove_dir_all(&root);
}

fn crc(data: &[u8]) -> u32 {
    // CRC-32 (IEEE, reflected, as crc32fast computes it), bit by bit.
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xedb8_8320 } else { c >> 1 };
        }
    }
    !c
}

#[test]
fn writing_a_snapshot_never_follows_a_planted_link() {
    if skip_without_kvm("writing_a_snapshot_never_follows_a_planted_link") {
        return;
    }
    let root = scratch("hostile-snapshot-links");
    let dir = root.join("snap");
    std::fs::create_dir_all(&dir).expect("dir");
    let victims: Vec<_> = ["vm.json", "memory.bin", "vcpu0.bin"].iter().map(|f| (f, root.join(format!("victim-{f}")))).collect();
    for (f, v) in &victims {
        std::fs::write(v, b"host file").expect("victim");
        std::os::unix::fs::symlink(v, dir.join(f)).expect("plant");
    }
    snapshot_into(&dir);
    for (f, v) in &victims {
        assert_eq!(std::fs::read(v).expect("victim"), b"host file", "{f} was written through the link");
        assert!(std::fs::symlink_metadata(dir.join(f)).expect("meta").file_type().is_file(), "{f}");
    }
    Vm::restore(&dir, &RestoreOverrides::default(), Console::default().boxed()).expect("restores");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn crafted_images_are_refused_naming_the_file() {
    if skip_without_kvm("crafted_images_are_refused_naming_the_file") {
        return;
    }
    let root = scratch("hostile-images");
    let create = |image: &Path| match Vm::create(VmConfig::new(image, 8), Console::default().boxed()) {
        Ok(_) => panic!("{} accepted", image.display()),
        Err(e) => e.to_string(),
    };
    // Not a regular file: /dev/zero would otherwise be read until memory runs out.
    let (rss, start) = (rss_kib(), Instant::now());
    let e = create(Path::new("/dev/zero"));
    assert!(e.contains("/dev/zero: not a regular file"), "{e}");
    assert!(rss_kib().saturating_sub(rss) < 16 << 10 && start.elapsed().as_secs() < 2);
    let e = create(&root);
    assert!(e.contains("not a regular file"), "{e}");
    // Larger than the largest guest memory (sparse).
    let big = root.join("big.elf");
    std::fs::File::create(&big).expect("create").set_len(5 << 30).expect("grow");
    let e = create(&big);
    assert!(e.contains("big.elf: 5368709120 bytes, more than the largest guest memory"), "{e}");
    // Truncated, and a program header offset that overflows.
    let good = std::fs::read(guest("counter")).expect("image");
    let cut = root.join("cut.elf");
    std::fs::write(&cut, &good[..100]).expect("write");
    let e = create(&cut);
    assert!(e.contains("cut.elf") && e.contains("outside the file"), "{e}");
    let mut over = good.clone();
    over[32..40].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
    let overflow = root.join("overflow.elf");
    std::fs::write(&overflow, &over).expect("write");
    let e = create(&overflow);
    assert!(e.contains("overflow.elf: program header 0 lies outside the file"), "{e}");
    // A user's own symbolic link to a good image is fine.
    let link = root.join("link.elf");
    std::os::unix::fs::symlink(guest("counter"), &link).expect("symlink");
    Vm::create(VmConfig::new(&link, 8), Console::default().boxed()).expect("a link the user made");
    let _ = std::fs::remove_dir_all(&root);
}
