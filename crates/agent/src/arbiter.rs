//! The fencing arbiter's I/O: the lease table of [`replication::lease`] served over TCP (one
//! line per request and answer), and the client the replication drivers use.

use replication::lease::{Answer, Request, Table};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running arbiter (its threads end with the process).
pub struct Arbiter {
    pub addr: SocketAddr,
}

/// Serves the lease table on `listener`, one thread per connection.
pub fn serve(listener: TcpListener) -> std::io::Result<Arbiter> {
    let addr = listener.local_addr()?;
    let table = Arc::new(Mutex::new(Table::default()));
    let epoch = Instant::now();
    std::thread::Builder::new().name("arbiter".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let table = table.clone();
            let _ = std::thread::Builder::new().name("arbiter-conn".into()).spawn(move || {
                let _ = conn.set_nodelay(true);
                let Ok(mut out) = conn.try_clone() else { return };
                for line in BufReader::new(conn).lines() {
                    let Ok(line) = line else { return };
                    let answer = match Request::parse(&line) {
                        Ok(req) => {
                            let now = epoch.elapsed().as_micros() as u64;
                            table.lock().unwrap_or_else(|e| e.into_inner()).handle(now, &req).to_line()
                        }
                        Err(e) => format!("error {e}"),
                    };
                    if out.write_all(format!("{answer}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    })?;
    Ok(Arbiter { addr })
}

/// A connection to the arbiter; reconnects on the next request after an error.
pub struct Client {
    addr: String,
    conn: Option<(TcpStream, BufReader<TcpStream>)>,
    timeout: Duration,
}

impl Client {
    /// A client for the arbiter at `addr` (host:port); connects lazily.
    pub fn new(addr: &str, timeout: Duration) -> Client {
        Client { addr: addr.to_owned(), conn: None, timeout }
    }

    /// Sends a request and waits (at most the timeout) for the answer.
    pub fn request(&mut self, req: &Request) -> Result<Answer, String> {
        let r = self.try_request(req);
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn try_request(&mut self, req: &Request) -> Result<Answer, String> {
        if self.conn.is_none() {
            use std::net::ToSocketAddrs;
            let addr = self
                .addr
                .to_socket_addrs()
                .map_err(|e| format!("arbiter {}: {e}", self.addr))?
                .next()
                .ok_or_else(|| format!("arbiter {}: no address", self.addr))?;
            let s = TcpStream::connect_timeout(&addr, self.timeout).map_err(|e| format!("arbiter {}: {e}", self.addr))?;
            let _ = s.set_nodelay(true);
            s.set_read_timeout(Some(self.timeout)).map_err(|e| e.to_string())?;
            let r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
            self.conn = Some((s, r));
        }
        let Some((w, r)) = self.conn.as_mut() else { return Err("not connected".into()) };
        w.write_all(format!("{}\n", req.to_line()).as_bytes()).map_err(|e| format!("arbiter {}: {e}", self.addr))?;
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => Err(format!("arbiter {}: connection closed", self.addr)),
            Ok(_) => Answer::parse(line.trim_end()).map_err(|e| format!("arbiter {}: {e}", self.addr)),
            Err(e) => Err(format!("arbiter {}: {e}", self.addr)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_answers_over_tcp() {
        let a = serve(TcpListener::bind("127.0.0.1:0").expect("bind")).expect("serve");
        let mut c = Client::new(&a.addr.to_string(), Duration::from_secs(2));
        assert_eq!(
            c.request(&Request::Renew { vm: "v".into(), holder: "a".into(), ttl_us: 10_000_000, backup: Some(4) }),
            Ok(Answer::Granted { backup: Some(4) })
        );
        let mut d = Client::new(&a.addr.to_string(), Duration::from_secs(2));
        let r = d.request(&Request::Takeover { vm: "v".into(), holder: "b".into(), session: 4, ttl_us: 1 });
        assert!(matches!(r, Ok(Answer::Held { .. })), "{r:?}");
        let mut raw = TcpStream::connect(a.addr).expect("connect");
        raw.write_all(b"hello\n").expect("write");
        let mut line = String::new();
        BufReader::new(raw).read_line(&mut line).expect("read");
        assert!(line.starts_with("error bad request"), "{line}");
    }
}
