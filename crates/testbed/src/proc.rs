//! Processes started inside a namespace, with their output in a log file.

use crate::twohost::Testbed;

/// A process started in a namespace, its stdout and stderr in a log file; killed on drop.
pub struct Proc {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
}

impl Proc {
    /// Starts `program ARGS` in namespace `ns`, logging to `log`.
    pub fn spawn(ns: &str, program: impl AsRef<std::ffi::OsStr>, args: &[String], log: std::path::PathBuf) -> Result<Proc, String> {
        let f = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let f2 = f.try_clone().map_err(|e| format!("{}: {e}", log.display()))?;
        let child =
            Testbed::command(ns, program).args(args).stdout(f2).stderr(f).spawn().map_err(|e| format!("cannot start a process: {e}"))?;
        Ok(Proc { child, log })
    }

    /// What it has written so far.
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How often `needle` occurs in what it has written.
    pub fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }

    /// Waits until `needle` occurred `n` times (at most `secs` seconds, and not after the
    /// process ended); the error quotes the log.
    pub fn wait_for(&mut self, needle: &str, n: usize, secs: u64) -> Result<(), String> {
        let t = std::time::Instant::now();
        while self.count(needle) < n {
            let ended = matches!(self.child.try_wait(), Ok(Some(_)));
            if ended || t.elapsed() > std::time::Duration::from_secs(secs) {
                return Err(format!("waiting for {needle:?} x{n} in {}:\n{}", self.log.display(), self.text()));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(())
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
