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
        ns.run("redis-benchmark", &["-h", GUEST_IP, "-p", "6379", "-q", "-n", "2000", "-c", "4", "-t", "set,get,incr,mset"]);
    assert!(ok, "redis-benchmark failed: {stderr}");
    for t in ["SET", "GET", "INCR", "MSET"] {
        // Progress lines end in \r, results in \n.
        let found = stdout.split(['\r', '\n']).any(|l| l.trim_start().starts_with(t) && l.contains("requests per second"));
        assert!(found, "no {t} result in:\n{stdout}");
    }
    assert_eq!(cli(&["GET", "greeting"]), "hello vm");

    assert!(ctl.call(Command::Quit).ok);
    assert_eq!(runner.join().expect("VM thread").expect("run"), Stop::Quit);
}
