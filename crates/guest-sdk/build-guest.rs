// Shared build script of every guest under guests/ (each one's build.rs `include!`s this file):
// link the package's binaries as a static, non-PIE image without the C runtime, laid out by the
// guest SDK's linker script at the VMM's load address.
fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let script = std::path::Path::new(&manifest).join("../../crates/guest-sdk/link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    for arg in ["-nostartfiles", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none"] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
}
