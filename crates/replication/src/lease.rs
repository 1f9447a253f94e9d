//! Fencing: the arbiter's lease table, its line protocol, a TCP server and a client.
//!
//! One lease per protected VM decides which copy may release network output. The primary
//! renews it every few milliseconds and, with every renewal, registers which backup session
//! (if any) may take over. It releases output only while its lease is valid *by its own
//! clock, counted from when it sent the renewal* — so it stops before the arbiter lets the
//! lease expire. The backup may take the lease only when it has expired (the primary is
//! silent) and only for the backup session registered in it: a backup the primary has
//! dropped (and whose replica may be stale) can never take over. Together: two copies never
//! release output at once, and output released without a backup's acknowledgement can never
//! be contradicted by that backup taking over.
//!
//! The protocol is one line per request and per answer:
//! ```text
//! renew <vm> <holder> <ttl_us> <backup-session|->   →  granted <backup|-> | denied held <holder> <left_us>
//! takeover <vm> <holder> <session> <ttl_us>         →  granted - | denied held <holder> <left_us> | denied revoked | denied unknown
//! ```
//! The lease table lives in memory: vigil's replicated cluster store will hold it later.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A request to the arbiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Keep (or claim) the lease, registering the backup session allowed to take over.
    Renew { vm: String, holder: String, ttl_us: u64, backup: Option<u64> },
    /// Take the lease over as the registered backup `session` (only once it has expired).
    Takeover { vm: String, holder: String, session: u64, ttl_us: u64 },
}

/// The arbiter's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The lease is the requester's for the ttl; `backup` is the registered backup session.
    Granted { backup: Option<u64> },
    /// Someone else holds a live lease.
    Held { holder: String, left_us: u64 },
    /// The takeover's session is not (or no longer) the registered backup.
    Revoked,
    /// No lease for this VM.
    Unknown,
}

#[derive(Debug, Clone)]
struct Lease {
    holder: String,
    expires_us: u64,
    backup: Option<u64>,
}

/// The lease table: a pure state machine over the arbiter's clock (µs).
#[derive(Debug, Default)]
pub struct Table {
    leases: HashMap<String, Lease>,
}

impl Table {
    /// Handles one request at time `now_us`.
    pub fn handle(&mut self, now_us: u64, req: &Request) -> Answer {
        match req {
            Request::Renew { vm, holder, ttl_us, backup } => {
                if let Some(l) = self.leases.get(vm) {
                    if l.holder != *holder && l.expires_us > now_us {
                        return Answer::Held { holder: l.holder.clone(), left_us: l.expires_us - now_us };
                    }
                }
                let expires_us = now_us.saturating_add(*ttl_us);
                self.leases.insert(vm.clone(), Lease { holder: holder.clone(), expires_us, backup: *backup });
                Answer::Granted { backup: *backup }
            }
            Request::Takeover { vm, holder, session, ttl_us } => {
                let Some(l) = self.leases.get_mut(vm) else { return Answer::Unknown };
                if l.backup != Some(*session) {
                    return Answer::Revoked;
                }
                if l.holder != *holder && l.expires_us > now_us {
                    return Answer::Held { holder: l.holder.clone(), left_us: l.expires_us - now_us };
                }
                *l = Lease { holder: holder.clone(), expires_us: now_us.saturating_add(*ttl_us), backup: None };
                Answer::Granted { backup: None }
            }
        }
    }

    /// The last holder of `vm`'s lease (live or expired) and the backup session it registers.
    pub fn record(&self, vm: &str) -> Option<(&str, Option<u64>)> {
        self.leases.get(vm).map(|l| (l.holder.as_str(), l.backup))
    }

    /// The holder of `vm`'s lease at `now_us`, if it is live.
    pub fn holder(&self, vm: &str, now_us: u64) -> Option<&str> {
        self.leases.get(vm).filter(|l| l.expires_us > now_us).map(|l| l.holder.as_str())
    }
}

fn word_ok(w: &str) -> bool {
    !w.is_empty() && w.len() <= 200 && w.bytes().all(|b| b.is_ascii_graphic())
}

impl Request {
    /// The request as one protocol line (without the newline).
    pub fn to_line(&self) -> String {
        match self {
            Request::Renew { vm, holder, ttl_us, backup } => {
                format!("renew {vm} {holder} {ttl_us} {}", backup.map_or("-".into(), |b| b.to_string()))
            }
            Request::Takeover { vm, holder, session, ttl_us } => format!("takeover {vm} {holder} {session} {ttl_us}"),
        }
    }

    /// Parses a protocol line; the error says what is wrong with it.
    pub fn parse(line: &str) -> Result<Request, String> {
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |s: &str, what: &str| s.parse::<u64>().map_err(|_| format!("{what} {s:?} is not a number"));
        let names = |vm: &str, holder: &str| {
            if word_ok(vm) && word_ok(holder) {
                Ok(())
            } else {
                Err("names are 1 to 200 printable characters".to_string())
            }
        };
        match w.as_slice() {
            ["renew", vm, holder, ttl, backup] => {
                names(vm, holder)?;
                let backup = if *backup == "-" { None } else { Some(num(backup, "backup session")?) };
                Ok(Request::Renew { vm: vm.to_string(), holder: holder.to_string(), ttl_us: num(ttl, "ttl")?, backup })
            }
            ["takeover", vm, holder, session, ttl] => {
                names(vm, holder)?;
                Ok(Request::Takeover {
                    vm: vm.to_string(),
                    holder: holder.to_string(),
                    session: num(session, "session")?,
                    ttl_us: num(ttl, "ttl")?,
                })
            }
            _ => Err(format!("bad request {:?} (expected `renew VM HOLDER TTL_US BACKUP|-` or `takeover VM HOLDER SESSION TTL_US`)", line)),
        }
    }
}

impl Answer {
    /// The answer as one protocol line.
    pub fn to_line(&self) -> String {
        match self {
            Answer::Granted { backup } => format!("granted {}", backup.map_or("-".into(), |b| b.to_string())),
            Answer::Held { holder, left_us } => format!("denied held {holder} {left_us}"),
            Answer::Revoked => "denied revoked".into(),
            Answer::Unknown => "denied unknown".into(),
        }
    }

    /// Parses an answer line.
    pub fn parse(line: &str) -> Result<Answer, String> {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["granted", "-"] => Ok(Answer::Granted { backup: None }),
            ["granted", b] => b.parse().map(|b| Answer::Granted { backup: Some(b) }).map_err(|_| format!("bad answer {line:?}")),
            ["denied", "held", h, left] => {
                left.parse().map(|left_us| Answer::Held { holder: h.to_string(), left_us }).map_err(|_| format!("bad answer {line:?}"))
            }
            ["denied", "revoked"] => Ok(Answer::Revoked),
            ["denied", "unknown"] => Ok(Answer::Unknown),
            _ => Err(format!("bad answer {line:?}")),
        }
    }
}

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

    fn renew(holder: &str, backup: Option<u64>) -> Request {
        Request::Renew { vm: "kv".into(), holder: holder.into(), ttl_us: 100, backup }
    }
    fn takeover(holder: &str, session: u64) -> Request {
        Request::Takeover { vm: "kv".into(), holder: holder.into(), session, ttl_us: 100 }
    }

    #[test]
    fn a_backup_takes_over_only_an_expired_lease_that_names_it() {
        let mut t = Table::default();
        assert_eq!(t.handle(0, &takeover("b", 7)), Answer::Unknown);
        assert_eq!(t.handle(0, &renew("a", Some(7))), Answer::Granted { backup: Some(7) });
        assert_eq!(t.handle(50, &takeover("b", 7)), Answer::Held { holder: "a".into(), left_us: 50 });
        assert_eq!(t.handle(150, &takeover("b", 8)), Answer::Revoked, "another session");
        assert_eq!(t.handle(150, &takeover("b", 7)), Answer::Granted { backup: None });
        assert_eq!(t.holder("kv", 151), Some("b"));
        // The old primary is fenced: its renewal is refused while the new lease lives.
        assert_eq!(t.handle(160, &renew("a", Some(7))), Answer::Held { holder: "b".into(), left_us: 90 });
        // A second takeover by the same session cannot happen: the registration is gone.
        assert_eq!(t.handle(300, &takeover("b", 7)), Answer::Revoked);
    }

    #[test]
    fn a_dropped_backup_can_never_take_over() {
        let mut t = Table::default();
        t.handle(0, &renew("a", Some(7)));
        assert_eq!(t.handle(10, &renew("a", None)), Answer::Granted { backup: None });
        assert_eq!(t.handle(1000, &takeover("b", 7)), Answer::Revoked);
    }

    #[test]
    fn lines_round_trip_and_bad_lines_are_explained() {
        for r in [renew("a", Some(3)), renew("a", None), takeover("b", 9)] {
            assert_eq!(Request::parse(&r.to_line()), Ok(r));
        }
        for a in [
            Answer::Granted { backup: Some(1) },
            Answer::Granted { backup: None },
            Answer::Held { holder: "x".into(), left_us: 5 },
            Answer::Revoked,
            Answer::Unknown,
        ] {
            assert_eq!(Answer::parse(&a.to_line()), Ok(a));
        }
        assert!(Request::parse("renew kv a x -").unwrap_err().contains("ttl"));
        assert!(Request::parse("steal kv").unwrap_err().contains("bad request"));
        assert!(Answer::parse("granted x").is_err());
    }

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
