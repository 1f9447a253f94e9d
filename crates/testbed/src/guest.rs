//! Guest images built from the workspace for tests, demos and benchmarks.

use std::process::Command;

/// Builds the guest package `name` of the workspace at `workspace` (release, in
/// `target/guests`, its own target directory so that an outer cargo holds no lock on it) and
/// returns its image.
pub fn build_guest(workspace: &std::path::Path, name: &str) -> Result<std::path::PathBuf, String> {
    let target = workspace.join("target/guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace)
        .args(["build", "--release", "--quiet", "-p", name, "--target-dir"])
        .arg(&target)
        .output()
        .map_err(|e| format!("cannot run cargo to build guest {name}: {e}"))?;
    if !out.status.success() {
        return Err(format!("building guest {name}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(target.join("release").join(name))
}
