//! A long-lived `redis-cli` (Debian's redis-tools) inside a namespace: one TCP connection to
//! a server, one request per line, its answers read back line by line.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

pub struct RedisClient {
    stdin: ChildStdin,
    lines: Receiver<String>,
    child: Child,
}

impl RedisClient {
    /// Connects to `ip:port` from namespace `ns`.
    pub fn new(ns: &str, ip: &str, port: u16) -> RedisClient {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "redis-cli", "-h", ip, "-p", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("redis-cli (package redis-tools)");
        let stdin = child.stdin.take().expect("stdin");
        let (tx, lines) = channel();
        for out in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            });
        }
        RedisClient { stdin, lines, child }
    }

    /// Sends one request and waits at most `timeout` for its one-line answer; `None` if it
    /// cannot be sent or no answer came (benchmarks, which must not abort: panics abort there).
    pub fn try_call(&mut self, cmd: &str, timeout: Duration) -> Option<String> {
        writeln!(self.stdin, "{cmd}").ok()?;
        self.stdin.flush().ok()?;
        self.lines.recv_timeout(timeout).ok()
    }

    /// Sends one request and waits (at most 20 s) for its one-line answer.
    pub fn call(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").expect("write to redis-cli");
        self.stdin.flush().expect("flush");
        self.lines.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("no answer to {cmd:?} within 20 s"))
    }
}

impl Drop for RedisClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The local address (`ip:port`) of the established TCP connection from namespace `ns` to
/// `peer` (`ip:port`); empty when there is none (the first, when there are several).
pub fn local_port(ns: &str, peer: &str) -> String {
    local_ports(ns, peer).into_iter().next().unwrap_or_default()
}

/// The local addresses of every established TCP connection from namespace `ns` to `peer`.
pub fn local_ports(ns: &str, peer: &str) -> Vec<String> {
    client_ports(ns, peer, "")
}

/// The local addresses of the established TCP connections from namespace `ns` to `peer` that
/// belong to a process named `process` (every process when empty): tells a `redis-cli` client
/// from other clients of the same server.
pub fn client_ports(ns: &str, peer: &str, process: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "exec", ns, "ss", "-Htnp", "state", "established"]).output().expect("ss");
    let owner = format!("((\"{process}\",");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 4 && w[3] == peer && (process.is_empty() || l.contains(&owner))).then(|| w[2].to_string())
        })
        .collect()
}
