//! `vigil vm` end to end with real KVM: run, control over the API socket, snapshot, and restore
//! in a new process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

fn vigil() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vigil"))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds a guest in its own target directory (no lock shared with the outer cargo).
fn guest(name: &str) -> PathBuf {
    let target = workspace().join("target/guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace())
        .args(["build", "--release", "--quiet", "-p", name, "--target-dir"])
        .arg(&target)
        .output()
        .expect("cannot run cargo");
    assert!(out.status.success(), "building {name}: {}", String::from_utf8_lossy(&out.stderr));
    target.join("release").join(name)
}

fn no_kvm(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return false;
    }
    eprintln!("{test}: skipped: /dev/kvm is absent on this host");
    true
}

/// Waits (at most 5 s) for a VM's control socket, then 300 ms for the VM to run.
fn wait_for_socket(api: &Path) {
    for _ in 0..500 {
        if api.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
}

fn ctl(args: &[&str], api: &Path) -> String {
    let out = vigil().arg("vm").args(args).arg("--api").arg(api).output().expect("run vigil");
    assert!(out.status.success(), "vigil vm {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn run_pause_snapshot_and_restore_in_a_new_process() {
    if no_kvm("run_pause_snapshot_and_restore_in_a_new_process") {
        return;
    }
    let image = guest("counter");
    let dir = workspace().join(format!("target/vm-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let api = dir.join("api.sock");
    let snap = dir.join("snap");
    let mut child = vigil()
        .args(["vm", "run", "--mem", "16", "--image"])
        .arg(&image)
        .arg("--api")
        .arg(&api)
        .args(["--", "count", "200", "5"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start vigil vm run");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(l);
            }
        })
    };
    for _ in 0..2000 {
        if lines.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|l| l == "count 10") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    ctl(&["dirty-log", "start"], &api);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let dirty = ctl(&["dirty-log", "get"], &api);
    assert!(dirty.contains("\"dirty_pages\":["), "{dirty}");
    ctl(&["dirty-log", "stop"], &api);
    let refused = vigil().args(["vm", "dirty-log", "get", "--api"]).arg(&api).output().expect("run vigil");
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("dirty logging is off"));
    ctl(&["pause"], &api);
    assert!(ctl(&["status"], &api).contains("\"paused\":true"));
    ctl(&["snapshot", snap.to_str().expect("utf-8 path")], &api);
    ctl(&["quit"], &api);
    assert!(child.wait().expect("wait").success());
    reader.join().expect("reader");
    let before = lines.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let last: u64 = before.iter().filter_map(|l| l.strip_prefix("count ")?.parse().ok()).max().expect("counted");
    assert!((10..200).contains(&last), "last count {last}");

    let out = vigil().args(["vm", "restore"]).arg(&snap).output().expect("restore");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let expected: String = (last + 1..=200).map(|i| format!("count {i}\n")).collect::<String>() + "done sum=20100\n";
    assert_eq!(text, expected);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn exit_statuses_and_errors() {
    if no_kvm("exit_statuses_and_errors") {
        return;
    }
    let image = guest("counter");
    let run = |args: &[&str]| {
        vigil().args(["vm", "run", "--json", "--mem", "16", "--image"]).arg(&image).arg("--").args(args).output().expect("run")
    };
    let report = |out: &std::process::Output| -> serde_json::Value {
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {text}"))
    };
    // Exit statuses mean one thing each: the guest's own up to 123, 124 above it (the exact
    // status on stderr and in --json), 125 a VMM error, 126 a guest fault.
    for (status, code) in [(0u32, 0), (3, 3), (9, 9), (123, 123), (125, 124), (300, 124), (u32::MAX, 124)] {
        let out = run(&["exit", &status.to_string()]);
        assert_eq!(out.status.code(), Some(code), "guest status {status}");
        let r = report(&out);
        assert_eq!(
            (r["outcome"].as_str(), r["guest_status"].as_u64(), r["exit_status"].as_u64()),
            (Some("exited"), Some(status as u64), Some(code as u64))
        );
        if status != 0 {
            assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("guest exited with status {status}")), "{status}");
        }
    }
    let fault = run(&["fault"]);
    assert_eq!(fault.status.code(), Some(126));
    assert!(String::from_utf8_lossy(&fault.stderr).contains("guest fault: triple fault"));
    assert_eq!(report(&fault)["outcome"], "fault");
    let bad = vigil().args(["vm", "run", "--json", "--image", "Cargo.toml"]).output().expect("run");
    assert_eq!(bad.status.code(), Some(125));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("Cargo.toml: not an ELF file"), "{stderr}");
    assert_eq!(report(&bad)["outcome"], "error");
    let missing = vigil().args(["vm", "run", "--image", "/nonexistent/image"]).output().expect("run");
    assert_eq!(missing.status.code(), Some(125));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(stderr.matches("No such file").count(), 1, "the cause once: {stderr}");
    let none = vigil().args(["vm", "status", "--api", "/nonexistent/sock"]).output().expect("run");
    assert_eq!(none.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&none.stderr).contains("/nonexistent/sock"));
}

/// `vigil vm run --store SOCKET --domid N` introduces the VM in the control-plane store when it
/// starts and releases it when it stops: a store client sees @introduceDomain, the domain's
/// nodes while it runs, then @releaseDomain and the nodes gone.
#[test]
fn a_vm_is_introduced_and_released_in_the_store() {
    if no_kvm("a_vm_is_introduced_and_released_in_the_store") {
        return;
    }
    let image = guest("counter");
    let dir = std::env::temp_dir().join(format!("vigil-vm-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let cfg = store::server::Config::local(dir.join("store.sock"), dir.join("data"));
    let server = store::server::Server::bind(&cfg).expect("store binds");
    std::thread::spawn(move || server.run());
    let mut watcher = store::Client::connect(&cfg.socket).expect("watcher connects");
    watcher.watch("@introduceDomain", "intro").expect("watch");
    watcher.watch("@releaseDomain", "release").expect("watch");
    watcher.watch("/local/domain/5/state", "state").expect("watch");
    let mut events = Vec::new();
    let drain = |c: &mut store::Client, events: &mut Vec<String>| {
        while let Some(e) = c.next_event(std::time::Duration::from_millis(300)).expect("events") {
            events.push(format!("{} {}", e.token, e.path));
        }
    };
    drain(&mut watcher, &mut events);
    events.clear(); // the firings that come with setting a watch
    let out = vigil()
        .args(["vm", "run", "--mem", "16", "--store"])
        .arg(&cfg.socket)
        .args(["--domid", "5", "--image"])
        .arg(&image)
        .args(["--", "exit", "7"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
    drain(&mut watcher, &mut events);
    let pos = |e: &str| events.iter().position(|x| x == e).unwrap_or_else(|| panic!("{e:?} not in {events:?}"));
    assert!(pos("state /local/domain/5/state") < pos("intro @introduceDomain"));
    assert!(pos("intro @introduceDomain") < pos("release @releaseDomain"));
    assert_eq!(watcher.try_read("/local/domain/5").expect("read"), None, "the domain's nodes are removed");
    // Without a store the VM does not start (a VMM error, 125).
    let out =
        vigil().args(["vm", "run", "--store", "/nonexistent/store.sock", "--domid", "5", "--image"]).arg(&image).output().expect("run");
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/store.sock"), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--reservation Q/P`: the vCPU of a guest that never stops computing gets Q/P of a CPU
/// (measured from the vCPU thread's own CPU time in `vigil vm status`) and makes progress;
/// enforced by the kernel (SCHED_DEADLINE) on hardware KVM, by the VMM's periodic server on
/// nested PVM (where the kernel's is refused with the reason); a reservation the host cannot
/// admit is refused with the kernel's reason.
#[test]
fn a_reservation_is_enforced_by_the_kernel_or_by_the_vmm() {
    if no_kvm("a_reservation_is_enforced_by_the_kernel_or_by_the_vmm") {
        return;
    }
    let image = guest("compute");
    let pvm = agent::realtime::deadline_vcpus_stall();
    if pvm {
        // Nested PVM: a vCPU under SCHED_DEADLINE makes no progress here, so the kernel's
        // reservation is refused before the guest runs, with the reason.
        let out = vigil()
            .args(["vm", "run", "--mem", "16", "--reservation", "2ms/10ms", "--enforcer", "kernel", "--image"])
            .arg(&image)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("nested PVM backend") && err.contains("--enforcer vmm"), "{err}");
    }
    let out = vigil()
        .args(["vm", "run", "--mem", "16", "--reservation", "2ms/10ms", "--enforcer", "kernel", "--priority", "5", "--image"])
        .arg(&image)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("a priority applies only"), "{out:?}");
    let dir = workspace().join(format!("target/vm-rt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let api = dir.join("api.sock");
    let console = dir.join("console.txt");
    let mut child = vigil()
        .args(["vm", "run", "--mem", "16", "--reservation", "2ms/10ms", "--image"])
        .arg(&image)
        .arg("--api")
        .arg(&api)
        .args(["--", "1", "0", "100"])
        .stdout(std::fs::File::create(&console).expect("console file"))
        .spawn()
        .expect("start vigil vm run");
    let status = |api: &Path| -> serde_json::Value {
        let out: serde_json::Value = serde_json::from_str(&ctl(&["status"], api)).expect("json");
        out["status"]["vcpu"].clone()
    };
    wait_for_socket(&api);
    let a = status(&api);
    let t = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let b = status(&api);
    let wall = t.elapsed().as_nanos() as f64;
    let _ = child.kill();
    let _ = child.wait();
    if pvm {
        assert_eq!(a["policy"], "fifo", "{a}");
        assert_eq!((a["server"]["budget_us"].as_u64(), a["server"]["period_us"].as_u64()), (Some(2000), Some(10000)), "{a}");
        let throttles = b["server"]["throttles"].as_u64().unwrap_or(0) - a["server"]["throttles"].as_u64().unwrap_or(0);
        assert!(throttles >= 100, "the server throttled the hog {throttles} times in 2 s: {b}");
        eprintln!("the VMM's server: {}", b["server"]);
    } else {
        assert_eq!(a["policy"], "deadline", "{a}");
        assert_eq!((a["runtime_us"].as_u64(), a["period_us"].as_u64()), (Some(2000), Some(10000)), "{a}");
    }
    let share = (b["cpu_ns"].as_u64().unwrap() - a["cpu_ns"].as_u64().unwrap()) as f64 / wall;
    eprintln!("the vCPU under 2ms/10ms used {:.1} % of a CPU", share * 100.0);
    assert!((0.14..=0.22).contains(&share), "a 2ms/10ms reservation gave {:.1} % of a CPU", share * 100.0);
    assert!(b["timeslices"].as_u64() > a["timeslices"].as_u64(), "the vCPU ran: {a} {b}");
    let passes = std::fs::read_to_string(&console).unwrap_or_default().matches("compute: pass").count();
    assert!(passes >= 2, "the guest made no progress under its reservation: {passes} reports");
    if pvm {
        // The reservation goes with the VM: snapshot, restore in a new process with
        // --reservation, and the restored vCPU is held to its share again.
        let mut child = vigil()
            .args(["vm", "run", "--mem", "16", "--reservation", "2ms/10ms", "--image"])
            .arg(&image)
            .arg("--api")
            .arg(&api)
            .args(["--", "1", "0", "100"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start vigil vm run");
        wait_for_socket(&api);
        let snap = dir.join("snap");
        ctl(&["snapshot", snap.to_str().expect("utf-8 path")], &api);
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&api);
        let mut restored = vigil()
            .args(["vm", "restore", "--reservation", "2ms/10ms", "--api"])
            .arg(&api)
            .arg(&snap)
            .stdout(Stdio::null())
            .spawn()
            .expect("restore");
        wait_for_socket(&api);
        let a = status(&api);
        let t = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_secs(1));
        let b = status(&api);
        let wall = t.elapsed().as_nanos() as f64;
        let _ = restored.kill();
        let _ = restored.wait();
        assert_eq!(a["server"]["budget_us"].as_u64(), Some(2000), "{a}");
        let share = (b["cpu_ns"].as_u64().unwrap() - a["cpu_ns"].as_u64().unwrap()) as f64 / wall;
        eprintln!("restored from a snapshot, the vCPU under 2ms/10ms used {:.1} % of a CPU", share * 100.0);
        assert!((0.14..=0.22).contains(&share), "a restored 2ms/10ms reservation gave {:.1} % of a CPU", share * 100.0);
        // The VMM's own admission control: with the host's real-time share taken by other
        // reservations (threads of this test), the VM is refused before it runs, with figures.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let filler = agent::realtime::VmmFiller::fill("1ms/10ms");
        let out = vigil().args(["vm", "run", "--mem", "16", "--reservation", "2ms/10ms", "--image"]).arg(&image).output().expect("run");
        drop(filler);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("refused by admission control") && err.contains("20.0 % was asked for"), "{err}");
        eprintln!("{}", err.trim());
        return;
    }

    // Fill the host's deadline bandwidth from this process (the dead VM's is released by its
    // zero-lag time, within a period), then ask for more.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let filler = agent::realtime::Filler::fill();
    let mut refused = vigil()
        .args(["vm", "run", "--mem", "16", "--reservation", "2ms/10ms", "--image"])
        .arg(&image)
        .args(["--", "1", "1000000000", "1000000000"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let t = std::time::Instant::now();
    while refused.try_wait().expect("wait").is_none() {
        if t.elapsed() > std::time::Duration::from_secs(10) {
            let _ = refused.kill();
            panic!("a reservation beyond the host's bandwidth was admitted");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = refused.wait_with_output().expect("output");
    drop(filler);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("refused by admission control") && err.contains("20.0 %"), "{err}");
    let out = vigil().args(["vm", "run", "--mem", "16", "--reservation", "12ms/10ms", "--image"]).arg(&image).output().expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("exceeds the period"), "{}", String::from_utf8_lossy(&out.stderr));
}
