//! Checkpoint replication primitives on real KVM: protection, checkpoints applied to a replica
//! while the guest runs, takeover by a VM built from the replica, held output released by
//! epoch, disk writes mirrored by epoch, and refusal of bad checkpoints.

mod common;

use common::{guest, scratch, skip_without_kvm, wait_for, Console, NetNs, GUEST_IP, HOST_IP, TAP};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vmm::checkpoint::{gratuitous_arp, ArpOp};
use vmm::{channel_pair, Checkpoint, Command, Controller, MemoryView, Replica, Stop, Vm, VmConfig};

const PAGE: usize = 4096;

fn checkpoint(ctl: &Controller, buffer: Option<Vec<u8>>) -> Checkpoint {
    let r = ctl.call(Command::Checkpoint { buffer });
    assert!(r.ok, "checkpoint: {r:?}");
    *r.checkpoint.expect("the reply carries the checkpoint")
}

/// Copies all of guest memory through the view into the replica, as the initial
/// synchronisation does while the guest runs.
fn initial_copy(view: &MemoryView, replica: &mut Replica) {
    let mut chunk = vec![0u8; 256 * PAGE];
    let pages = view.pages();
    let mut first = 0;
    while first < pages {
        let n = (pages - first).min(256);
        let buf = &mut chunk[..n as usize * PAGE];
        view.copy_range(first * PAGE as u64, buf).expect("view copy");
        replica.write_pages(first, buf).expect("replica write");
        first += n;
    }
}

fn snapshot_of(view: &MemoryView) -> Vec<u8> {
    let mut all = vec![0u8; view.size() as usize];
    view.copy_range(0, &mut all).expect("view copy");
    all
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(PAGE).zip(b.chunks(PAGE)).position(|(x, y)| x != y)
}

#[test]
fn replica_follows_checkpoints_and_takes_over() {
    if skip_without_kvm("replica_follows_checkpoints_and_takes_over") {
        return;
    }
    let console = Console::default();
    let mut config = VmConfig::new(guest("counter"), 32);
    config.args = vec!["count".into(), "150".into(), "4".into()];
    let mut vm = Vm::create(config.clone(), console.boxed()).expect("create VM");
    let (ctl, inbox) = channel_pair().expect("control channel");
    let runner = std::thread::spawn(move || {
        let stop = vm.run(Some(&inbox));
        (vm, stop)
    });
    wait_for("count 5", || console.text().contains("count 5\n"));
    assert!(ctl.call(Command::Protect { mirror: None, hold: true, input: None }).ok);
    // While protected, nobody else may collect dirty pages or seal epochs.
    let r = ctl.call(Command::DirtyLogGetAndClear);
    assert!(!r.ok && r.error.as_deref().unwrap_or("").contains("protected"), "{r:?}");
    assert!(!ctl.call(Command::Protect { mirror: None, hold: true, input: None }).ok, "protected twice");

    // Initial copy while the guest keeps counting.
    let view = ctl.call(Command::MemoryView).memory_view.expect("memory view");
    assert_eq!(view.size(), 32 << 20);
    let mut replica = Replica::new(config.clone()).expect("replica");
    initial_copy(&view, &mut replica);

    let mut buffer = None;
    let mut epoch = 0;
    let mut dirty_total = 0;
    for _ in 0..25 {
        std::thread::sleep(Duration::from_millis(12));
        let c = checkpoint(&ctl, buffer.take());
        assert_eq!(c.epoch, epoch + 1, "epochs count up by one");
        assert_eq!(c.data.len(), c.pages.len() * PAGE);
        assert!(c.pages.windows(2).all(|w| w[0] < w[1]), "pages ascending");
        assert!(c.pause_ns >= c.copy_ns && c.pause_ns > 0);
        dirty_total += c.pages.len();
        replica.apply(&c).expect("apply");
        epoch = c.epoch;
        buffer = Some(c.data);
    }
    assert!(dirty_total > 25, "the counting guest dirtied only {dirty_total} pages");
    assert!(!ctl.call(Command::Status).status.expect("status").paused, "a checkpoint left the VM paused");
    assert!(!console.text().contains("done"), "the guest finished before the last checkpoint");

    // Stop the primary; a checkpoint of a paused VM leaves it paused.
    assert!(ctl.call(Command::Pause).ok);
    let last = checkpoint(&ctl, buffer.take());
    assert_eq!(last.epoch, epoch + 1);
    replica.apply(&last).expect("apply");
    assert!(ctl.call(Command::Status).status.expect("status").paused, "the checkpoint resumed a paused VM");
    assert_eq!(ctl.call(Command::Status).status.expect("status").guest_ns, last.guest_ns);
    let primary = snapshot_of(&view);
    let replica_mem = replica.memory().as_slice().expect("replica memory");
    assert!(first_difference(&primary, replica_mem).is_none(), "page {:?} differs", first_difference(&primary, replica_mem));
    let empty = checkpoint(&ctl, None);
    assert!(empty.pages.is_empty(), "a paused VM dirtied {:?}", empty.pages);

    assert!(ctl.call(Command::Quit).ok);
    let (vm, stop) = runner.join().expect("VM thread");
    assert_eq!(stop.expect("run"), Stop::Quit);
    drop(vm);
    // The view keeps the mapping alive after the VM is gone.
    assert_eq!(snapshot_of(&view), primary);
    let before = console.text();

    // Takeover: the replica becomes a VM that carries on counting exactly where it stopped.
    let console2 = Console::default();
    let mut backup = Vm::from_replica(replica, &Default::default(), console2.boxed()).expect("from replica");
    assert!(backup.paused());
    assert_eq!(backup.status().guest_ns, last.guest_ns);
    backup.resume();
    assert_eq!(backup.run(None).expect("run backup"), Stop::Exited(0), "{}", console2.text());
    let expected: String = (1..=150).map(|i| format!("count {i}\n")).collect::<String>() + "done sum=11325\n";
    assert_eq!(before + &console2.text(), expected);
}

#[test]
fn initial_copy_under_heavy_writes_then_checkpoints_make_an_exact_replica() {
    if skip_without_kvm("initial_copy_under_heavy_writes_then_checkpoints_make_an_exact_replica") {
        return;
    }
    // compute rewrites every page of an 8 MiB working set over and over, so many pages change
    // while the view copies them.
    let console = Console::default();
    let mut config = VmConfig::new(guest("compute"), 64);
    config.args = vec!["8".into(), "0".into(), "1000".into()];
    let mut vm = Vm::create(config.clone(), console.boxed()).expect("create VM");
    let (ctl, inbox) = channel_pair().expect("control channel");
    let runner = std::thread::spawn(move || vm.run(Some(&inbox)));
    std::thread::sleep(Duration::from_millis(100));
    assert!(ctl.call(Command::Protect { mirror: None, hold: true, input: None }).ok);
    let view = ctl.call(Command::MemoryView).memory_view.expect("view");
    let mut replica = Replica::new(config).expect("replica");
    initial_copy(&view, &mut replica);
    let mut buffer = None;
    let mut dirty = vec![];
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(20));
        let c = checkpoint(&ctl, buffer.take());
        replica.apply(&c).expect("apply");
        dirty.push(c.pages.len());
        buffer = Some(c.data);
    }
    assert!(dirty.iter().any(|d| *d > 100), "compute dirtied only {dirty:?} pages per epoch");
    assert!(ctl.call(Command::Pause).ok);
    let last = checkpoint(&ctl, buffer);
    replica.apply(&last).expect("apply");
    let primary = snapshot_of(&view);
    let replica_mem = replica.memory().as_slice().expect("replica memory");
    assert!(first_difference(&primary, replica_mem).is_none(), "page {:?} differs", first_difference(&primary, replica_mem));
    assert!(ctl.call(Command::Quit).ok);
    assert_eq!(runner.join().expect("VM thread").expect("run"), Stop::Quit);
}

#[test]
fn bad_checkpoints_are_refused_and_leave_the_replica_untouched() {
    if skip_without_kvm("bad_checkpoints_are_refused_and_leave_the_replica_untouched") {
        return;
    }
    let mut config = VmConfig::new(guest("counter"), 8);
    config.args = vec!["count".into(), "3".into()];
    let mut vm = Vm::create(config.clone(), Console::default().boxed()).expect("create VM");
    assert!(vm.checkpoint(None).is_err(), "a checkpoint without protection");
    vm.protect(None, true).expect("protect");
    let first = vm.checkpoint(None).expect("checkpoint");
    let mut good = vm.checkpoint(None).expect("checkpoint");
    assert_eq!((first.epoch, good.epoch), (1, 2));
    good.pages = vec![3, 4];
    good.data = vec![0xab; 2 * PAGE];

    let mut replica = Replica::new(config).expect("replica");
    let e = Vm::from_replica(Replica::new(replica.config().clone()).expect("replica"), &Default::default(), Console::default().boxed())
        .err()
        .expect("takeover without a checkpoint")
        .to_string();
    assert!(e.contains("no checkpoint"), "{e}");
    replica.write_pages(0, &vec![0x11; 2 * PAGE]).expect("write pages");
    replica.write_page(9, &[0x22; PAGE]).expect("write page");
    replica.apply(&first).expect("apply epoch 1");
    let pages = replica.memory().pages();
    let snapshot = replica.memory().as_slice().expect("memory").to_vec();

    let refused = |replica: &mut Replica, c: &Checkpoint, words: &[&str]| {
        let e = replica.apply(c).expect_err("refused").to_string();
        for w in words {
            assert!(e.contains(w), "{e:?} does not mention {w:?}");
        }
        assert_eq!(replica.epoch(), 1);
        assert_eq!(replica.vcpu(), Some(&first.vcpu[..]));
        assert_eq!(replica.guest_ns(), first.guest_ns);
        assert!(replica.memory().as_slice().expect("memory") == &snapshot[..], "a refused checkpoint changed memory");
    };
    let with = |f: &dyn Fn(&mut Checkpoint)| {
        let mut c = good.clone();
        f(&mut c);
        c
    };
    refused(&mut replica, &with(&|c| c.pages = vec![3, pages]), &["epoch 2", &format!("page {pages}"), "outside"]);
    refused(&mut replica, &with(&|c| c.pages = vec![4, 3]), &["not above"]);
    refused(&mut replica, &with(&|c| c.pages = vec![5, 5]), &["not above"]);
    refused(&mut replica, &with(&|c| c.data.truncate(PAGE + 1)), &["4097 bytes", "2 pages"]);
    refused(&mut replica, &with(&|c| c.vcpu = b"garbage".to_vec()), &["vCPU", "magic"]);
    refused(&mut replica, &with(&|c| c.vcpu.truncate(100)), &["vCPU", "truncated"]);
    refused(&mut replica, &with(&|c| c.vcpu.push(0)), &["vCPU", "after the xsave"]);
    refused(&mut replica, &with(&|c| c.epoch = 3), &["epoch 3", "does not follow"]);
    refused(&mut replica, &with(&|c| c.epoch = 0), &["epoch 0"]);
    assert!(replica.write_pages(pages - 1, &[0; 2 * PAGE]).is_err());
    assert!(replica.write_pages(u64::MAX, &[0; PAGE]).is_err());
    assert!(replica.write_pages(0, &[0; 100]).is_err());
    assert!(replica.write_page(0, &[0; 2 * PAGE]).is_err());
    assert!(replica.memory().as_slice().expect("memory") == &snapshot[..]);

    replica.apply(&good).expect("the good one still applies");
    assert_eq!(replica.epoch(), 2);
    let mut page = vec![0u8; PAGE];
    replica.memory().read(4 * PAGE as u64, &mut page).expect("read");
    assert!(page.iter().all(|b| *b == 0xab));
}

#[test]
fn disk_writes_are_mirrored_with_their_epoch() {
    if skip_without_kvm("disk_writes_are_mirrored_with_their_epoch") {
        return;
    }
    mirrored_writes(vmm::mirror::MIRROR_LIMIT, "ckpt-disk");
}

/// A mirror with room for two writes: requests that do not fit wait (the guest is put back on
/// its `out`, checkpoints are taken meanwhile), and still every write is mirrored exactly
/// once, in order, tagged with its epoch, and lands on the disk.
#[test]
fn a_full_disk_mirror_delays_writes_without_losing_or_repeating_any() {
    if skip_without_kvm("a_full_disk_mirror_delays_writes_without_losing_or_repeating_any") {
        return;
    }
    mirrored_writes(1024, "ckpt-disk-full");
}

fn mirrored_writes(limit: usize, tag: &str) {
    let dir = scratch(tag);
    let disk = dir.join("disk.img");
    let sectors = 16u64;
    std::fs::write(&disk, vec![0u8; sectors as usize * 512]).expect("disk");
    let console = Console::default();
    let mut config = VmConfig::new(guest("counter"), 16);
    config.disk = Some(disk.clone());
    let n = 40u64;
    config.args = vec!["disklog".into(), n.to_string(), "3".into()];
    let mut vm = Vm::create(config, console.boxed()).expect("create VM");
    let (tx, rx) = vmm::mirror_channel(limit);
    vm.protect(Some(tx), true).expect("protect");
    let (ctl, inbox) = channel_pair().expect("control channel");
    let runner = std::thread::spawn(move || {
        let stop = vm.run(Some(&inbox));
        (vm, stop)
    });
    let mut writes = vec![];
    let mut pending = vec![];
    let mut epochs_with_writes = 0;
    let mut buffer = None;
    loop {
        std::thread::sleep(Duration::from_millis(7));
        let r = ctl.call(Command::Checkpoint { buffer: buffer.take() });
        let c = match r.checkpoint {
            Some(c) => c,
            None if r.error.as_deref() == Some("the VM has stopped") => break,
            None => panic!("checkpoint failed: {r:?}"),
        };
        // When checkpoint k is taken, every write of epoch k is in the channel already, and
        // none of an earlier epoch arrives later (writes of epoch k+1 may follow at once: the
        // guest runs on).
        pending.extend(std::iter::from_fn(|| rx.try_recv()));
        let tags: Vec<u64> = pending.iter().map(|w| w.epoch).collect();
        assert!(tags.windows(2).all(|t| t[0] <= t[1]), "epochs out of order: {tags:?}");
        assert!(tags.iter().all(|e| (c.epoch..=c.epoch + 1).contains(e)), "after checkpoint {}: writes tagged {tags:?}", c.epoch);
        let closed = pending.iter().take_while(|w| w.epoch == c.epoch).count();
        epochs_with_writes += (closed > 0) as u32;
        writes.extend(pending.drain(..closed));
        buffer = Some(c.data);
    }
    let (mut vm, stop) = runner.join().expect("VM thread");
    assert_eq!(stop.expect("run"), Stop::Exited(0), "{}", console.text());
    // The last epoch, closed by a checkpoint of the stopped VM.
    let c = vm.checkpoint(None).expect("checkpoint after the run");
    pending.extend(std::iter::from_fn(|| rx.try_recv()));
    assert!(
        pending.iter().all(|w| w.epoch == c.epoch),
        "last epoch {}: {:?}",
        c.epoch,
        pending.iter().map(|w| w.epoch).collect::<Vec<_>>()
    );
    writes.append(&mut pending);
    assert!(console.text().contains("disklog done"));
    assert_eq!(writes.len() as u64, n, "mirrored writes");
    for (w, i) in writes.iter().zip(1..=n) {
        assert_eq!(w.offset, (i % sectors) * 512, "write {i}");
        assert_eq!(w.data, vec![i as u8; 512], "write {i}");
    }
    assert!(epochs_with_writes >= 3, "the writes fell into {epochs_with_writes} epochs");
    let on_disk = std::fs::read(&disk).expect("disk");
    for s in 0..sectors {
        let last = (1..=n).filter(|i| i % sectors == s).max().expect("written");
        assert!(on_disk[s as usize * 512..][..512].iter().all(|b| *b == last as u8), "sector {s}");
    }
}

/// Frames seen on the host side of a tap (AF_PACKET), for checking what reaches the wire.
struct Sniffer {
    fd: std::os::fd::OwnedFd,
}

impl Sniffer {
    /// Opens a capture on `iface` in the calling thread's network namespace.
    fn open(iface: &str) -> Sniffer {
        use std::os::fd::FromRawFd;
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, proto) };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor owned by nothing else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(iface).expect("name");
        // SAFETY: a NUL-terminated interface name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0, "no interface {iface}");
        // SAFETY: a zeroed sockaddr_ll is valid; we fill the family, protocol and index.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto as u16;
        sa.sll_ifindex = index as i32;
        use std::os::fd::AsRawFd;
        // SAFETY: binds our socket to a live sockaddr_ll of the given size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        Sniffer { fd }
    }

    /// Frames captured so far whose source MAC is `mac` (frames the VM sent).
    fn from(&self, mac: [u8; 6]) -> Vec<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let mut out = vec![];
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: reads into our own buffer of the given length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                return out;
            }
            let f = &buf[..n as usize];
            if f.len() >= 12 && f[6..12] == mac {
                out.push(f.to_vec());
            }
        }
    }
}

fn kv_config(image: std::path::PathBuf) -> VmConfig {
    let mut config = VmConfig::new(image, 64);
    config.tap = Some(TAP.into());
    config.net.ip = GUEST_IP.parse().expect("ip");
    config.net.prefix_len = 24;
    config.net.gateway = HOST_IP.parse().expect("ip");
    config
}

#[test]
fn output_after_checkpoint_k_waits_for_release_of_k_plus_1() {
    if skip_without_kvm("output_after_checkpoint_k_waits_for_release_of_k_plus_1") {
        return;
    }
    let image = guest("kv");
    let ns = NetNs::new("ckpt-hold");
    let console = Console::default();
    let (ctl, inbox) = channel_pair().expect("control channel");
    let out = console.clone();
    let ns_name = ns.name.clone();
    let config = kv_config(image);
    let mac = config.net.mac;
    let runner = std::thread::spawn(move || {
        NetNs { name: ns_name }.enter_and_forget();
        let mut vm = Vm::create(config, out.boxed()).expect("create VM");
        vm.run(Some(&inbox))
    });
    wait_for("kv to serve", || console.text().contains("kv: serving"));
    ns.enter();
    let sniff = Sniffer::open(TAP);
    assert!(ctl.call(Command::Protect { mirror: None, hold: true, input: None }).ok);
    let k = checkpoint(&ctl, None);
    assert!(ctl.call(Command::ReleaseAcked { epoch: k.epoch }).ok);
    std::thread::sleep(Duration::from_millis(50));
    sniff.from(mac);

    // A client talks to the guest after checkpoint k: the guest answers (ARP, SYN-ACK) in
    // epoch k+1, and nothing of it reaches the wire.
    let mut client = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "redis-cli", "-h", GUEST_IP, "SET", "k", "v"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli");
    std::thread::sleep(Duration::from_millis(300));
    assert!(sniff.from(mac).is_empty(), "output of epoch {} on the wire before any checkpoint", k.epoch + 1);
    let k1 = checkpoint(&ctl, None);
    assert_eq!(k1.epoch, k.epoch + 1);
    assert!(k1.output_frames > 0 && k1.output_bytes >= 42 * k1.output_frames, "{k1:?}");
    // Sealed is not released; releasing k again sends nothing.
    assert_eq!(ctl.call(Command::ReleaseAcked { epoch: k.epoch }).value, Some(0));
    std::thread::sleep(Duration::from_millis(200));
    assert!(sniff.from(mac).is_empty(), "sealed output of epoch {} on the wire before its release", k1.epoch);
    assert!(client.try_wait().expect("poll").is_none(), "the client got an answer while output was held");
    // Releasing k+1 puts exactly its frames on the wire (later output stays held).
    assert_eq!(ctl.call(Command::ReleaseAcked { epoch: k1.epoch }).value, Some(k1.output_frames));
    let mut seen = vec![];
    wait_for("released frames on the wire", || {
        seen.extend(sniff.from(mac));
        seen.len() as u64 >= k1.output_frames
    });
    std::thread::sleep(Duration::from_millis(100));
    seen.extend(sniff.from(mac));
    assert_eq!(seen.len() as u64, k1.output_frames);
    assert_eq!(seen.iter().map(|f| f.len() as u64).sum::<u64>(), k1.output_bytes);

    // Checkpoint and release (as acknowledgements would) until the client has its answer.
    for _ in 0..500 {
        if client.try_wait().expect("poll").is_some() {
            break;
        }
        let c = checkpoint(&ctl, None);
        assert!(ctl.call(Command::ReleaseAcked { epoch: c.epoch }).ok);
        std::thread::sleep(Duration::from_millis(5));
    }
    let done = client.wait_with_output().expect("client");
    assert_eq!(String::from_utf8_lossy(&done.stdout).trim(), "OK");
    // Unprotect sends what is still held and allows manual epochs again.
    assert!(ctl.call(Command::Unprotect).ok);
    assert!(ctl.call(Command::NetSeal).ok);
    assert!(ctl.call(Command::Quit).ok);
    assert_eq!(runner.join().expect("VM thread").expect("run"), Stop::Quit);
}

#[test]
fn kv_fails_over_to_the_replica_with_state_and_connection() {
    if skip_without_kvm("kv_fails_over_to_the_replica_with_state_and_connection") {
        return;
    }
    let image = guest("kv");
    let ns = NetNs::new("ckpt-kv");
    let console = Console::default();
    let (ctl, inbox) = channel_pair().expect("control channel");
    let out = console.clone();
    let ns_name = ns.name.clone();
    let config = kv_config(image);
    let c2 = config.clone();
    let runner = std::thread::spawn(move || {
        NetNs { name: ns_name }.enter_and_forget();
        let mut vm = Vm::create(c2, out.boxed()).expect("create VM");
        vm.run(Some(&inbox))
    });
    wait_for("kv to serve", || console.text().contains("kv: serving"));
    let cli = |args: &[&str]| {
        let mut all = vec!["-h", GUEST_IP];
        all.extend_from_slice(args);
        let (ok, stdout, stderr) = ns.run("redis-cli", &all);
        assert!(ok, "redis-cli {args:?}: {stderr}");
        stdout.trim_end().to_string()
    };
    assert_eq!(cli(&["SET", "early", "before protection"]), "OK");

    // Protect, copy memory while kv runs, then checkpoint + apply + release every few ms.
    assert!(ctl.call(Command::Protect { mirror: None, hold: true, input: None }).ok);
    let view = ctl.call(Command::MemoryView).memory_view.expect("view");
    let mut replica = Replica::new(config.clone()).expect("replica");
    initial_copy(&view, &mut replica);
    let stop = Arc::new(AtomicBool::new(false));
    let (ctl2, stop2) = (ctl.clone(), stop.clone());
    let replication = std::thread::spawn(move || {
        let mut buffer = None;
        let mut outputs = 0;
        while !stop2.load(Ordering::Acquire) {
            let mut c = checkpoint(&ctl2, buffer.take());
            replica.apply(&c).expect("apply");
            // The backup has it: release the epoch's output.
            assert!(ctl2.call(Command::ReleaseAcked { epoch: c.epoch }).ok);
            outputs += c.output_frames;
            buffer = Some(std::mem::take(&mut c.data));
            std::thread::sleep(Duration::from_millis(4));
        }
        (replica, outputs)
    });
    assert_eq!(cli(&["SET", "survivor", "yes"]), "OK");
    assert_eq!(cli(&["INCRBY", "n", "41"]), "41");
    ns.enter();
    let mut conn = std::net::TcpStream::connect((GUEST_IP, 6379)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut ask = |req: &[u8], want: &[u8]| {
        use std::io::{Read, Write};
        conn.write_all(req).expect("send");
        let mut got = vec![0; want.len()];
        conn.read_exact(&mut got).expect("reply");
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
    };
    ask(b"*3\r\n$3\r\nSET\r\n$4\r\nconn\r\n$6\r\nbefore\r\n", b"+OK\r\n");

    // The primary dies: whatever it did after the last acknowledged checkpoint is lost.
    stop.store(true, Ordering::Release);
    let (replica, outputs) = replication.join().expect("replication thread");
    assert!(outputs > 0);
    assert!(replica.epoch() > 1);
    assert!(ctl.call(Command::Quit).ok);
    assert_eq!(runner.join().expect("VM thread").expect("run"), Stop::Quit);

    // The backup takes over on this host's tap and announces itself.
    let sniff = Sniffer::open(TAP);
    let (bctl, binbox) = channel_pair().expect("control channel");
    let ns_name = ns.name.clone();
    let console2 = Console::default();
    let out2 = console2.clone();
    let backup = std::thread::spawn(move || {
        NetNs { name: ns_name }.enter_and_forget();
        let mut vm = Vm::from_replica(replica, &Default::default(), out2.boxed()).expect("from replica");
        vm.resume();
        vm.run(Some(&binbox))
    });
    let r = bctl.call(Command::Announce { count: 2 });
    assert_eq!(r.value, Some(4), "{r:?}");
    let mac = config.net.mac;
    let ip: std::net::Ipv4Addr = GUEST_IP.parse().expect("ip");
    let mut arps = vec![];
    wait_for("gratuitous ARP on the wire", || {
        arps.extend(sniff.from(mac).into_iter().filter(|f| f[12..14] == [0x08, 0x06]));
        arps.len() >= 4
    });
    assert!(arps.iter().any(|f| f[..] == gratuitous_arp(mac, ip, ArpOp::Request)[..]));
    assert!(arps.iter().any(|f| f[..] == gratuitous_arp(mac, ip, ArpOp::Reply)[..]));

    assert_eq!(cli(&["GET", "survivor"]), "yes");
    assert_eq!(cli(&["GET", "early"]), "before protection");
    assert_eq!(cli(&["INCR", "n"]), "42");
    ask(b"*2\r\n$3\r\nGET\r\n$4\r\nconn\r\n", b"$6\r\nbefore\r\n");
    assert!(bctl.call(Command::Quit).ok);
    assert_eq!(backup.join().expect("backup thread").expect("run"), Stop::Quit);
}

/// Dirty tracking (`vmm::tracking`) on real KVM: a guest writing random bytes of random pages at
/// a varying rate (some writes leaving a page as it was); epochs under log, compare and hybrid
/// mode and the automatic choice, with switches forced between them at chosen epochs. After every epoch
/// the primary is paused and its memory compared with the replica byte for byte.
#[test]
fn replica_equals_primary_after_every_epoch_in_every_tracking_mode_and_switch() {
    if skip_without_kvm("replica_equals_primary_after_every_epoch_in_every_tracking_mode_and_switch") {
        return;
    }
    use vmm::{TrackingChoice, TrackingMode};
    let console = Console::default();
    let mut config = VmConfig::new(guest("counter"), 32);
    config.args = vec!["random".into(), "2048".into(), "7".into()];
    config.tracking = TrackingChoice::Fixed(TrackingMode::Log);
    let mut vm = Vm::create(config.clone(), console.boxed()).expect("create VM");
    let (ctl, inbox) = channel_pair().expect("control channel");
    let runner = std::thread::spawn(move || vm.run(Some(&inbox)));
    wait_for("random: writing", || console.text().contains("random: writing"));
    assert!(ctl.call(Command::Protect { mirror: None, hold: true, input: None }).ok);
    let view = ctl.call(Command::MemoryView).memory_view.expect("memory view");
    let mut replica = Replica::new(config.clone()).expect("replica");
    initial_copy(&view, &mut replica);
    // The mode asked for before each epoch: runs of each mode and single-epoch switches.
    let log = TrackingChoice::Fixed(TrackingMode::Log);
    let compare = TrackingChoice::Fixed(TrackingMode::Compare);
    // The first switch to compare mode waits for the shadow's warm-up (8,192 pages, 1,024 a
    // checkpoint); later ones find most of it current.
    let mut plan = vec![log; 3];
    plan.extend([compare; 12]);
    plan.extend([log, compare, log, compare, compare, log, log, compare]);
    plan.extend([TrackingChoice::Auto; 6]);
    plan.extend([compare, log, compare]);
    let hybrid = TrackingChoice::Fixed(TrackingMode::Hybrid);
    plan.extend([hybrid; 8]);
    plan.extend([log, hybrid, hybrid, compare, hybrid, hybrid, hybrid, log]);
    plan.extend([TrackingChoice::Auto; 4]);
    let mut buffer = None;
    let mut seen = std::collections::HashSet::new();
    let mut switches = 0;
    let mut dirty = vec![];
    let mut hot = 0;
    for (i, choice) in plan.iter().enumerate() {
        assert!(ctl.call(Command::Tracking { choice: *choice }).ok);
        std::thread::sleep(Duration::from_millis(5 + (i as u64 * 7) % 20));
        // Pause first, so that the memory compared is the memory at the checkpoint.
        assert!(ctl.call(Command::Pause).ok);
        let c = checkpoint(&ctl, buffer.take());
        replica.apply(&c).expect("apply");
        let primary = snapshot_of(&view);
        let replica_mem = replica.memory().as_slice().expect("replica memory");
        assert!(
            first_difference(&primary, replica_mem).is_none(),
            "epoch {} ({:?}, then {:?}): page {:?} differs",
            c.epoch,
            c.tracking,
            c.next_tracking,
            first_difference(&primary, replica_mem)
        );
        seen.insert(c.tracking.expect("mode"));
        switches += (c.tracking != c.next_tracking) as u32;
        dirty.push(c.pages.len());
        hot = hot.max(c.hot_pages);
        assert!(ctl.call(Command::Resume).ok);
        buffer = Some(c.data);
    }
    assert!(seen.contains(&TrackingMode::Log) && seen.contains(&TrackingMode::Compare), "modes seen: {seen:?}");
    // This host's KVM offers manual dirty-log protection (checked: `manual_protect`), so
    // hybrid epochs ran too.
    assert!(seen.contains(&TrackingMode::Hybrid), "modes seen: {seen:?}");
    assert!(hot > 10, "hybrid mode kept at most {hot} pages hot");
    assert!(switches >= 6, "only {switches} switches");
    assert!(dirty.iter().filter(|d| **d > 50).count() > 5, "the guest dirtied too little: {dirty:?}");
    assert!(ctl.call(Command::Quit).ok);
    assert_eq!(runner.join().expect("VM thread").expect("run"), Stop::Quit);
}
