//! A three-member etcd cluster on loopback (Debian's `/usr/bin/etcd`), for the tests and
//! benchmarks that run the etcd backend against the real server. Members are killed when the
//! cluster is dropped.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Where Debian's etcd-server puts the binary.
pub const ETCD: &str = "/usr/bin/etcd";

pub struct LoopbackEtcd {
    pub members: Vec<Child>,
    /// `127.0.0.1:port` of each member's client URL.
    pub endpoints: Vec<String>,
}

impl LoopbackEtcd {
    /// Starts members `m0..m2` with data under `dir`, client ports `base..base+2` and peer ports
    /// `base+3..base+5`; member `i`'s stderr goes to `dir/m<i>.log`.
    pub fn start(dir: &Path, base: u16, token: &str) -> std::io::Result<LoopbackEtcd> {
        let peers: Vec<String> = (0..3).map(|i| format!("m{i}=http://127.0.0.1:{}", base + 3 + i)).collect();
        let mut cluster = LoopbackEtcd { members: Vec::new(), endpoints: Vec::new() };
        for i in 0..3u16 {
            let client = format!("http://127.0.0.1:{}", base + i);
            let peer = format!("http://127.0.0.1:{}", base + 3 + i);
            let log = std::fs::File::create(dir.join(format!("m{i}.log")))?;
            cluster.members.push(
                Command::new(ETCD)
                    .args(["--name", &format!("m{i}"), "--data-dir"])
                    .arg(dir.join(format!("m{i}")))
                    .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
                    .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
                    .args(["--initial-cluster", &peers.join(","), "--initial-cluster-state", "new"])
                    .args(["--initial-cluster-token", token, "--heartbeat-interval", "50", "--election-timeout", "500"])
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()?,
            );
            cluster.endpoints.push(format!("127.0.0.1:{}", base + i));
        }
        Ok(cluster)
    }

    /// Kills member `i` (SIGKILL) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(m) = self.members.get_mut(i) {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

impl Drop for LoopbackEtcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
