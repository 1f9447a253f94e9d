//! Shared by the VMM's integration tests: building guests, capturing the console, skipping
//! without KVM.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// True (after printing why) when /dev/kvm is absent: the only reason a test may skip.
pub fn skip_without_kvm(test: &str) -> bool {
    if vmm::kvm_available() {
        return false;
    }
    eprintln!("{test}: skipped: /dev/kvm is absent on this host");
    true
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the guest package `name` (release, in its own target directory so that the outer
/// `cargo test` holds no lock on it) and returns the image path.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(vec![]));
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    let target = workspace().join("target/guests");
    let image = target.join("release").join(name);
    if !built.iter().any(|b| b == name) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = std::process::Command::new(cargo)
            .current_dir(workspace())
            .args(["build", "--release", "--quiet", "-p", name, "--target-dir"])
            .arg(&target)
            .output()
            .expect("cannot run cargo to build a guest");
        assert!(out.status.success(), "building guest {name} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        built.push(name.to_owned());
    }
    image
}

/// A console sink the test can read while the VM writes.
#[derive(Clone, Default)]
pub struct Console(pub Arc<Mutex<Vec<u8>>>);

impl Console {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
    pub fn boxed(&self) -> Box<dyn Write + Send> {
        Box::new(self.clone())
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A fresh scratch directory under the target directory.
pub fn scratch(name: &str) -> PathBuf {
    let dir = workspace().join("target/vmm-tests").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cannot create a scratch directory");
    dir
}

/// Waits (bounded) until `cond` holds.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("timed out waiting for {what}");
}

/// A network namespace with a tap device `vtap0` at 10.77.0.1/24, deleted on drop. The VM
/// runs on a thread that has entered the namespace (so its tap lives there) and clients run
/// with `ip netns exec`.
pub struct NetNs {
    pub name: String,
}

pub const HOST_IP: &str = "10.77.0.1";
pub const GUEST_IP: &str = "10.77.0.2";
pub const TAP: &str = "vtap0";

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("cannot run ip (package iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        let name = format!("vigil-{tag}-{}", std::process::id());
        let _ = std::process::Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ns.exec_ip(&["link", "set", "lo", "up"]);
        ns.exec_ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]);
        ns.exec_ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
        ns.exec_ip(&["link", "set", TAP, "up"]);
        ns
    }

    fn exec_ip(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Moves the calling thread into the namespace; the handle does not delete it.
    pub fn enter_and_forget(self) {
        self.enter();
        std::mem::forget(self);
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) {
        let path = format!("/var/run/netns/{}", self.name);
        let f = std::fs::File::open(&path).expect("open netns");
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid namespace fd; it affects only the calling thread.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
    }

    /// Runs a command inside the namespace and returns (success, stdout, stderr).
    pub fn run(&self, cmd: &str, args: &[&str]) -> (bool, String, String) {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}
