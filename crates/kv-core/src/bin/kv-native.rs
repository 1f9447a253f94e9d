//! The kv server as a native Linux process (same `kv-core` logic as the `kv` guest), for the
//! VM-versus-native comparison of `vigil bench vmm`. Usage: `kv-native [ADDR:PORT]`
//! (default 127.0.0.1:6379). One thread per connection, one store behind a mutex.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

fn serve(mut conn: TcpStream, store: Arc<Mutex<kv_core::Store>>) {
    let _ = conn.set_nodelay(true);
    let mut input = Vec::new();
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        input.extend_from_slice(&buf[..n]);
        let r = store.lock().unwrap_or_else(|e| e.into_inner()).serve(&mut input, &mut out);
        if conn.write_all(&out).is_err() || r.is_err() {
            return;
        }
        out.clear();
    }
}

fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:6379".into());
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kv-native: cannot listen on {addr}: {e}");
            std::process::exit(2);
        }
    };
    let store = Arc::new(Mutex::new(kv_core::Store::new()));
    for conn in listener.incoming().flatten() {
        let store = store.clone();
        std::thread::spawn(move || serve(conn, store));
    }
}
