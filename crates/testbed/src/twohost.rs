//! A two-host testbed in network namespaces, for `vigil demo failover`, the failover tests and
//! `vigil bench replication`: a switch (a bridge, where the arbiter lives), host A and host B
//! (each with a bridge joining the VM's tap to the switch, and a direct replication link to
//! the other host), and a client.
//!
//! ```text
//!   client 10.99.0.100 ──┐
//!                        switch br0 10.99.0.254 (arbiter :7000)
//!   host A br 10.99.0.1 ─┤                      ├─ host B br 10.99.0.2
//!     └ tap vtap (VM 10.99.0.50)                   └ tap vtap (VM after a takeover)
//!   host A rep 10.98.0.1 ─────── replication link ─────── host B rep 10.98.0.2
//! ```
//! Everything is deleted when the [`Testbed`] is dropped.

use std::process::{Command, Output};

/// The VM's address and MAC, the same on either host.
pub const VM_IP: &str = "10.99.0.50";
pub const VM_MAC: &str = "52:54:00:99:00:50";
pub const CLIENT_IP: &str = "10.99.0.100";
pub const ARBITER: &str = "10.99.0.254:7000";
/// The tap device name on each host.
pub const TAP: &str = "vtap";

/// One of the two hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    A,
    B,
}

impl Host {
    /// The other host.
    pub fn other(self) -> Host {
        match self {
            Host::A => Host::B,
            Host::B => Host::A,
        }
    }
    /// Address on the replication link.
    pub fn rep_ip(self) -> &'static str {
        match self {
            Host::A => "10.98.0.1",
            Host::B => "10.98.0.2",
        }
    }
    /// Where this host's backup listens.
    pub fn backup_addr(self) -> String {
        format!("{}:7100", self.rep_ip())
    }
    pub fn name(self) -> &'static str {
        match self {
            Host::A => "host-a",
            Host::B => "host-b",
        }
    }

    /// `vigil backup` arguments for this host (listening on its replication address, the
    /// VM's tap); after a takeover it protects the VM with a backup on `then_protect`.
    pub fn backup_args(self, then_protect: Option<Host>) -> Vec<String> {
        let key = key_file().display().to_string();
        let mut a = strings(&[
            "backup",
            "--listen",
            &self.backup_addr(),
            "--arbiter",
            ARBITER,
            "--holder",
            self.name(),
            "--tap",
            TAP,
            "--key-file",
            &key,
        ]);
        if let Some(h) = then_protect {
            a.extend(strings(&["--protect", &h.backup_addr()]));
        }
        a
    }

    /// `vigil vm run` arguments that protect VM `vm` on this host with the backup at `backup`.
    pub fn protect_args(self, backup: &str, vm: &str) -> Vec<String> {
        let key = key_file().display().to_string();
        strings(&["--protect", backup, "--arbiter", ARBITER, "--holder", self.name(), "--name", vm, "--key-file", &key])
    }
}

/// `vigil arbiter` arguments serving leases on [`ARBITER`], its lease table in `state`.
pub fn arbiter_args(state: &std::path::Path) -> Vec<String> {
    let key = key_file().display().to_string();
    strings(&["arbiter", "--listen", ARBITER, "--state", &state.display().to_string(), "--key-file", &key])
}

/// The testbed's cluster key (32 random bytes, written once per boot of the machine).
pub fn key_file() -> std::path::PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = std::env::temp_dir().join("vigil-testbed.key");
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
        let mut k = [0u8; 32];
        let _ = std::fs::File::open("/dev/urandom").and_then(|mut u| std::io::Read::read_exact(&mut u, &mut k));
        let _ = f.write_all(&k);
    }
    path
}

/// `vigil vm run` arguments giving the VM its network on the testbed (tap, address, MAC).
pub fn vm_net_args() -> Vec<String> {
    strings(&["--tap", TAP, "--ip", &format!("{VM_IP}/24"), "--mac", VM_MAC])
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// The namespaces and links; removed on drop.
pub struct Testbed {
    pub switch: String,
    pub a: String,
    pub b: String,
    pub client: String,
}

fn ip(args: &[&str]) -> Result<Output, String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip (package iproute2): {e}"))?;
    if !out.status.success() {
        return Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(out)
}

impl Testbed {
    /// Builds the testbed; `tag` keeps concurrent testbeds apart (at most 6 characters).
    pub fn new(tag: &str) -> Result<Testbed, String> {
        let tag = &crate::ns_tag(tag);
        let tb = Testbed { switch: format!("vg{tag}-sw"), a: format!("vg{tag}-a"), b: format!("vg{tag}-b"), client: format!("vg{tag}-c") };
        tb.remove();
        for ns in [&tb.switch, &tb.a, &tb.b, &tb.client] {
            ip(&["netns", "add", ns])?;
            tb.exec(ns, &["link", "set", "lo", "up"])?;
        }
        tb.exec(&tb.switch, &["link", "add", "br0", "type", "bridge"])?;
        tb.exec(&tb.switch, &["addr", "add", "10.99.0.254/24", "dev", "br0"])?;
        tb.exec(&tb.switch, &["link", "set", "br0", "up"])?;
        // The client.
        tb.veth(&tb.client, "eth0", &tb.switch, "to-client")?;
        tb.exec(&tb.switch, &["link", "set", "to-client", "master", "br0"])?;
        tb.exec(&tb.client, &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"])?;
        // The hosts.
        for (h, ns, lan) in [(Host::A, &tb.a, "10.99.0.1/24"), (Host::B, &tb.b, "10.99.0.2/24")] {
            let port = format!("to-{}", h.name());
            tb.veth(ns, "uplink", &tb.switch, &port)?;
            tb.exec(&tb.switch, &["link", "set", &port, "master", "br0"])?;
            tb.exec(ns, &["link", "add", "hostbr", "type", "bridge"])?;
            tb.exec(ns, &["link", "set", "uplink", "master", "hostbr"])?;
            tb.exec(ns, &["tuntap", "add", "dev", TAP, "mode", "tap"])?;
            tb.exec(ns, &["link", "set", TAP, "master", "hostbr"])?;
            tb.exec(ns, &["link", "set", TAP, "up"])?;
            tb.exec(ns, &["addr", "add", lan, "dev", "hostbr"])?;
            tb.exec(ns, &["link", "set", "hostbr", "up"])?;
        }
        tb.veth(&tb.a, "rep", &tb.b, "rep")?;
        tb.exec(&tb.a, &["addr", "add", "10.98.0.1/24", "dev", "rep"])?;
        tb.exec(&tb.b, &["addr", "add", "10.98.0.2/24", "dev", "rep"])?;
        Ok(tb)
    }

    /// Makes the LAN deliver every frame to every port (`on`: bridges that forget at once
    /// where a MAC is, hubs), so the backup host's tap sees the client's frames to the VM too;
    /// `off`: learning bridges again (the default).
    pub fn flood(&self, on: bool) -> Result<(), String> {
        let ageing = if on { "0" } else { "30000" };
        self.exec(&self.switch, &["link", "set", "dev", "br0", "type", "bridge", "ageing_time", ageing])?;
        for ns in [&self.a, &self.b] {
            self.exec(ns, &["link", "set", "dev", "hostbr", "type", "bridge", "ageing_time", ageing])?;
        }
        Ok(())
    }

    fn veth(&self, ns1: &str, n1: &str, ns2: &str, n2: &str) -> Result<(), String> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp1 = format!("vgt{}x{n}", std::process::id() % 100000);
        let tmp2 = format!("vgu{}x{n}", std::process::id() % 100000);
        ip(&["link", "add", &tmp1, "type", "veth", "peer", "name", &tmp2])?;
        ip(&["link", "set", &tmp1, "netns", ns1])?;
        ip(&["link", "set", &tmp2, "netns", ns2])?;
        self.exec(ns1, &["link", "set", &tmp1, "name", n1])?;
        self.exec(ns2, &["link", "set", &tmp2, "name", n2])?;
        self.exec(ns1, &["link", "set", n1, "up"])?;
        self.exec(ns2, &["link", "set", n2, "up"])?;
        Ok(())
    }

    /// Runs `ip ARGS` in namespace `ns`.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", ns, "ip"];
        all.extend_from_slice(args);
        ip(&all).map(|_| ())
    }

    /// A host's namespace.
    pub fn ns(&self, h: Host) -> &str {
        match h {
            Host::A => &self.a,
            Host::B => &self.b,
        }
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Sets the MTU of the replication link on both hosts (1,500 as created; up to 65,535 on a
    /// veth, loopback's 65,536 being the same in effect). Measured here with iperf3, one TCP
    /// stream: 1.6–1.9 GB/s at 1,500, 2.0–2.7 GB/s at 9,000 (jumbo frames), 3.9–4.3 GB/s at
    /// 65,535 (a steady stream; bursts of a checkpoint's size gain far less, docs/replication.md).
    pub fn set_replication_mtu(&self, mtu: u32) -> Result<(), String> {
        for ns in [&self.a, &self.b] {
            self.exec(ns, &["link", "set", "dev", "rep", "mtu", &mtu.to_string()])?;
        }
        Ok(())
    }

    /// Moves the calling thread (only it: network namespaces are per thread) into host `h`'s
    /// namespace, so that the sockets it opens next are that host's.
    pub fn enter(&self, h: Host) -> Result<(), String> {
        use std::os::fd::AsRawFd;
        let path = format!("/var/run/netns/{}", self.ns(h));
        let f = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: setns with a valid namespace descriptor; it moves only the calling thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns into {path}: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Cuts (or restores) the replication link between the hosts.
    pub fn set_replication_link(&self, up: bool) -> Result<(), String> {
        self.exec(&self.a, &["link", "set", "rep", if up { "up" } else { "down" }])
    }

    fn remove(&self) {
        for ns in [&self.switch, &self.a, &self.b, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.remove();
    }
}
