//! One network namespace with a tap device: a VM (a `vigil vm run` process started inside it)
//! on the tap and its clients beside it. Deleted when dropped.
//!
//! ```text
//!   namespace: vtap0 10.78.0.1/24 ── VM 10.78.0.2
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

pub const HOST_IP: &str = "10.78.0.1";
pub const GUEST_IP: &str = "10.78.0.2";
pub const TAP: &str = "vtap0";

pub struct TapNs {
    pub name: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip (package iproute2): {e}"))?;
    if !out.status.success() {
        return Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

impl TapNs {
    /// Creates namespace `vigil-TAG-PID` with the tap up at [`HOST_IP`].
    pub fn new(tag: &str) -> Result<TapNs, String> {
        let name = format!("vigil-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name])?;
        let ns = TapNs { name };
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["tuntap", "add", "dev", TAP, "mode", "tap"],
            vec!["addr", "add", "10.78.0.1/24", "dev", TAP],
            vec!["link", "set", TAP, "up"],
        ] {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(&args);
            ip(&all)?;
        }
        Ok(ns)
    }

    /// `program` to be run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `cmd ARGS` inside the namespace: (success, stdout, stderr).
    pub fn run(&self, cmd: &str, args: &[&str]) -> (bool, String, String) {
        match self.command(cmd).args(args).output() {
            Ok(out) => {
                (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
            }
            Err(e) => (false, String::new(), format!("cannot run {cmd}: {e}")),
        }
    }

    /// Starts `vigil vm run` of `image` (the kv guest: `kv: serving` is awaited) on the tap,
    /// with the network backend `backend` (`vmm` or `process`), its control socket and log in
    /// `dir`.
    pub fn start_vm(&self, vigil: &Path, image: &Path, backend: &str, dir: &Path) -> Result<VmProc, String> {
        self.start_vm_with(vigil, image, &["--net-backend", backend], &format!("vm-{backend}"), dir)
    }

    /// As [`TapNs::start_vm`], with `extra` arguments for `vigil vm run` (the backends, a
    /// disk), its socket and log named after `label`.
    pub fn start_vm_with(&self, vigil: &Path, image: &Path, extra: &[&str], label: &str, dir: &Path) -> Result<VmProc, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let api = dir.join(format!("{label}.sock"));
        let _ = std::fs::remove_file(&api);
        let args: Vec<String> = ["vm", "run", "--mem", "64", "--tap", TAP, "--ip", "10.78.0.2/24", "--gateway", HOST_IP]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .chain(["--image".into(), image.display().to_string(), "--api".into(), api.display().to_string()])
            .collect();
        let mut p = crate::Proc::spawn(&self.name, vigil, &args, dir.join(format!("{label}.log")))?;
        p.wait_for("kv: serving on", 1, 20)?;
        Ok(VmProc { proc_: p, api, vigil: vigil.to_path_buf() })
    }
}

impl Drop for TapNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A `vigil vm run` process (killed when dropped).
pub struct VmProc {
    pub proc_: crate::Proc,
    pub api: PathBuf,
    vigil: PathBuf,
}

impl VmProc {
    /// `vigil vm status` as JSON (`Null` when it does not answer).
    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(&self.vigil).args(["vm", "status", "--api"]).arg(&self.api).output();
        out.ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .map_or(serde_json::Value::Null, |v| v["status"].clone())
    }

    /// The pid of its network backend process (0 when it has none or does not answer).
    pub fn backend_pid(&self) -> u32 {
        self.backend_pid_of("net_backend")
    }

    /// The pid of its backend `which` (`net_backend`, `blk_backend`; 0 when none).
    pub fn backend_pid_of(&self, which: &str) -> u32 {
        self.status()[which]["pid"].as_u64().unwrap_or(0) as u32
    }

    /// Whether the VMM process still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.proc_.child.try_wait(), Ok(None))
    }
}
