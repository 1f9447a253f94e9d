//! What several of the store's integration tests share: a server in this process, a server in
//! a child process, and reading one message off a raw connection.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use store::server::{Config, Server};
use store::wire::{decode, Msg};

/// Serves a fresh store in a thread of this process (data under a temp directory named after
/// `test` and `name`); returns its socket.
pub fn start(test: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vigil-{test}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cfg = Config::local(dir.join("sock"), dir.join("data"));
    let server = Server::bind(&cfg).expect("server binds");
    std::thread::spawn(move || server.run());
    cfg.socket
}

/// The server half of a test that runs it in a child process (the test binary started again
/// with `env` naming the socket); does nothing when `env` is not set.
pub fn child_server(env: &str) {
    let Some(sock) = std::env::var_os(env) else { return };
    let sock = PathBuf::from(sock);
    let data = sock.with_extension("data");
    let cfg = Config { socket: sock, data, quota: Default::default(), etcd: None, etcd_lease_ttl: 0, volatile: Vec::new() };
    let server = Server::bind(&cfg).expect("server binds");
    let r = server.run();
    panic!("the server stopped: {r:?}");
}

/// Reads one message, or `None` at end of stream.
pub fn next(s: &mut UnixStream) -> Option<Msg> {
    let mut buf = Vec::new();
    loop {
        if let Ok(Some((m, _))) = decode(&buf) {
            return Some(m);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
