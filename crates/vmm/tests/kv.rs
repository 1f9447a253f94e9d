//! The kv guest serving real redis-cli and redis-benchmark over a tap device in a network
//! namespace the test creates.

mod common;

use common::{guest, skip_without_kvm, wait_for, Console, NetNs, GUEST_IP, HOST_IP, TAP};
use vmm::{channel_pair, Command, Stop, Vm, VmConfig};

#[test]
fn kv_serves_redis_cli_and_redis_benchmark() {
    if skip_without_kvm("kv_serves_redis_cli_and_redis_benchmark") {
        return;
    }
    let image = guest("kv");
    let ns = NetNs::new("kv");
    let console = Console::default();
    let (ctl, inbox) = channel_pair().expect("control channel");
    let out = console.clone();
    let ns_name = ns.name.clone();
    let runner = std::thread::spawn(move || {
        NetNs { name: ns_name.clone() }.enter_and_forget();
        let mut config = VmConfig::new(image, 64);
        config.tap = Some(TAP.into());
        config.net.ip = GUEST_IP.parse().expect("ip");
        config.net.prefix_len = 24;
        config.net.gateway = HOST_IP.parse().expect("ip");
        let mut vm = Vm::create(config, out.boxed()).expect("create VM");
        vm.run(Some(&inbox))
    });
    wait_for("kv to serve", || console.text().contains("kv: serving on 10.77.0.2:6379"));

    let cli = |args: &[&str]| {
        let mut all = vec!["-h", GUEST_IP, "-p", "6379"];
        all.extend_from_slice(args);
        let (ok, stdout, stderr) = ns.run("redis-cli", &all);
        assert!(ok, "redis-cli {args:?}: {stderr}");
        stdout.trim_end().to_string()
    };
    assert_eq!(cli(&["PING"]), "PONG");
    assert_eq!(cli(&["SET", "greeting", "hello vm"]), "OK");
    assert_eq!(cli(&["GET", "greeting"]), "hello vm");
    assert_eq!(cli(&["INCR", "n"]), "1");
    assert_eq!(cli(&["INCR", "n"]), "2");
    assert_eq!(cli(&["MSET", "a", "1", "b", "2"]), "OK");
    assert_eq!(cli(&["MGET", "a", "b", "nope"]), "1\n2");
    assert_eq!(cli(&["DEL", "a", "nope"]), "1");
    assert_eq!(cli(&["GET", "a"]), "");

    let (ok, stdout, stderr) =
        ns.run("redis-benchmark", &["-h", GUEST_IP, "-p", "6379", "-q", "-n", "10000", "-c", "50", "-t", "ping,set,get,incr,mset"]);
    assert!(ok, "redis-benchmark failed: {stderr}");
    // PING_INLINE and PING_MBULK: an inline and a multi-bulk PING (the first reset the
    // connection once, in the drift test).
    for t in ["PING_INLINE", "PING_MBULK", "SET", "GET", "INCR", "MSET"] {
        // Progress lines end in \r, results in \n.
        let found = stdout.split(['\r', '\n']).any(|l| l.trim_start().starts_with(t) && l.contains("requests per second"));
        assert!(found, "no {t} result in:\n{stdout}");
    }
    assert_eq!(cli(&["GET", "greeting"]), "hello vm");

    assert!(ctl.call(Command::Quit).ok);
    assert_eq!(runner.join().expect("VM thread").expect("run"), Stop::Quit);
}

#[test]
fn stream_sends_the_promised_bytes_and_compute_runs() {
    if skip_without_kvm("stream_sends_the_promised_bytes_and_compute_runs") {
        return;
    }
    let image = guest("stream");
    let ns = NetNs::new("stream");
    let console = Console::default();
    let (ctl, inbox) = channel_pair().expect("control channel");
    let out = console.clone();
    let ns_name = ns.name.clone();
    let runner = std::thread::spawn(move || {
        NetNs { name: ns_name }.enter_and_forget();
        let mut config = VmConfig::new(image, 64);
        config.tap = Some(TAP.into());
        config.net.ip = GUEST_IP.parse().expect("ip");
        config.net.prefix_len = 24;
        config.args = vec!["5".into()];
        let mut vm = Vm::create(config, out.boxed()).expect("create VM");
        vm.run(Some(&inbox))
    });
    wait_for("stream to serve", || console.text().contains("stream: serving on 10.77.0.2:5001"));
    let (ok, stdout, stderr) = ns.run("bash", &["-c", &format!("cat < /dev/tcp/{GUEST_IP}/5001 | cksum")]);
    assert!(ok, "{stderr}");
    let expected: Vec<u8> = (0..5_000_000u32).map(|i| ((i % 65536) % 251) as u8).collect();
    let dir = common::scratch("stream");
    std::fs::write(dir.join("expected"), &expected).expect("write");
    let (_, want, _) = ns.run("bash", &["-c", &format!("cksum < {}", dir.join("expected").display())]);
    assert_eq!(stdout, want, "the stream's bytes");
    wait_for("stream to report", || console.text().contains("stream: sent 5000000 bytes"));
    assert!(ctl.call(Command::Quit).ok);
    assert_eq!(runner.join().expect("VM thread").expect("run"), Stop::Quit);

    let console = Console::default();
    let mut config = VmConfig::new(guest("compute"), 32);
    config.args = vec!["4".into(), "20".into(), "10".into()];
    let mut vm = Vm::create(config, console.boxed()).expect("create VM");
    assert_eq!(vm.run(None).expect("run"), Stop::Exited(0));
    assert!(console.text().contains("compute: done 20 passes"), "{}", console.text());
}

#[test]
fn held_network_output_reaches_clients_only_when_released() {
    if skip_without_kvm("held_network_output_reaches_clients_only_when_released") {
        return;
    }
    let image = guest("kv");
    let ns = NetNs::new("hold");
    let console = Console::default();
    let (ctl, inbox) = channel_pair().expect("control channel");
    let out = console.clone();
    let ns_name = ns.name.clone();
    let runner = std::thread::spawn(move || {
        NetNs { name: ns_name }.enter_and_forget();
        let mut config = VmConfig::new(image, 64);
        config.tap = Some(TAP.into());
        config.net.ip = GUEST_IP.parse().expect("ip");
        config.net.prefix_len = 24;
        let mut vm = Vm::create(config, out.boxed()).expect("create VM");
        vm.run(Some(&inbox))
    });
    wait_for("kv to serve", || console.text().contains("kv: serving"));
    assert!(ctl.call(Command::NetHold).ok);
    let mut client = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "redis-cli", "-h", GUEST_IP, "SET", "k", "held"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli");
    // The guest answers ARP and the handshake, but nothing leaves the VMM: the client waits.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(client.try_wait().expect("poll client").is_none(), "the client got an answer while output was held");
    // Release epoch by epoch (as checkpoint acknowledgements would) until the client is done.
    let mut released = 0;
    for _ in 0..1000 {
        if client.try_wait().expect("poll client").is_some() {
            break;
        }
        let epoch = ctl.call(Command::NetSeal).value.expect("epoch");
        released += ctl.call(Command::NetRelease { epoch }).value.expect("released");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let done = client.wait_with_output().expect("client output");
    assert_eq!(String::from_utf8_lossy(&done.stdout).trim(), "OK");
    assert!(released > 0);
    assert!(ctl.call(Command::NetUnhold).ok);
    assert!(ctl.call(Command::Quit).ok);
    assert_eq!(runner.join().expect("VM thread").expect("run"), Stop::Quit);
}

#[test]
fn kv_state_and_an_open_connection_survive_snapshot_and_restore() {
    if skip_without_kvm("kv_state_and_an_open_connection_survive_snapshot_and_restore") {
        return;
    }
    let image = guest("kv");
    let ns = NetNs::new("kvsnap");
    let snap = common::scratch("kv-snapshot");
    let console = Console::default();
    let (ctl, inbox) = channel_pair().expect("control channel");
    let out = console.clone();
    let ns_name = ns.name.clone();
    let snap_dir = snap.clone();
    let runner = std::thread::spawn(move || {
        NetNs { name: ns_name }.enter_and_forget();
        let mut config = VmConfig::new(image, 64);
        config.tap = Some(TAP.into());
        config.net.ip = GUEST_IP.parse().expect("ip");
        config.net.prefix_len = 24;
        let mut vm = Vm::create(config, out.boxed()).expect("create VM");
        let first = vm.run(Some(&inbox)).expect("run");
        drop(vm);
        // A new VM from the snapshot, on the same tap (the old one is gone).
        // The snapshot's tap is used when the caller confirms it (as `--tap` does).
        let confirm = vmm::snapshot::RestoreOverrides { tap: Some(TAP.into()), ..Default::default() };
        let mut restored = Vm::restore(&snap_dir, &confirm, out.boxed()).expect("restore");
        restored.resume();
        let (ctl2, inbox2) = channel_pair().expect("control channel");
        (first, ctl2, std::thread::spawn(move || restored.run(Some(&inbox2))))
    });
    wait_for("kv to serve", || console.text().contains("kv: serving"));
    let cli = |args: &[&str]| {
        let mut all = vec!["-h", GUEST_IP];
        all.extend_from_slice(args);
        let (ok, stdout, stderr) = ns.run("redis-cli", &all);
        assert!(ok, "redis-cli {args:?}: {stderr}");
        stdout.trim_end().to_string()
    };
    assert_eq!(cli(&["SET", "survivor", "yes"]), "OK");
    assert_eq!(cli(&["INCRBY", "n", "41"]), "41");
    // A connection opened before the snapshot (this test thread joins the namespace).
    ns.enter();
    let mut conn = std::net::TcpStream::connect((GUEST_IP, 6379)).expect("connect");
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("timeout");
    let mut ask = |req: &[u8], want: &[u8]| {
        use std::io::{Read, Write};
        conn.write_all(req).expect("send");
        let mut got = vec![0; want.len()];
        conn.read_exact(&mut got).expect("reply");
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
    };
    ask(b"*3\r\n$3\r\nSET\r\n$4\r\nconn\r\n$6\r\nbefore\r\n", b"+OK\r\n");
    assert!(ctl.call(Command::Snapshot { dir: snap.clone() }).ok);
    assert!(ctl.call(Command::Quit).ok);
    let (first, ctl2, restored) = runner.join().expect("VM thread");
    assert_eq!(first, Stop::Quit);
    assert_eq!(cli(&["GET", "survivor"]), "yes");
    assert_eq!(cli(&["INCR", "n"]), "42");
    ask(b"*2\r\n$3\r\nGET\r\n$4\r\nconn\r\n", b"$6\r\nbefore\r\n");
    assert!(ctl2.call(Command::Quit).ok);
    assert_eq!(restored.join().expect("restored VM").expect("run"), Stop::Quit);
}
