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
