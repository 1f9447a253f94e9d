//! Fencing: the arbiter's lease table and its line protocol (the TCP server and client are in
//! the `agent` crate).
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

use crate::Error;
use std::collections::HashMap;

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
    pub fn parse(line: &str) -> Result<Request, Error> {
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |s: &str, what: &str| s.parse::<u64>().map_err(|_| Error::Lease(format!("{what} {s:?} is not a number")));
        let names = |vm: &str, holder: &str| {
            if word_ok(vm) && word_ok(holder) {
                Ok(())
            } else {
                Err(Error::Lease("names are 1 to 200 printable characters".into()))
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
            _ => Err(Error::Lease(format!(
                "bad request {line:?} (expected `renew VM HOLDER TTL_US BACKUP|-` or `takeover VM HOLDER SESSION TTL_US`)"
            ))),
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
    pub fn parse(line: &str) -> Result<Answer, Error> {
        let bad = || Error::Lease(format!("bad answer {line:?}"));
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["granted", "-"] => Ok(Answer::Granted { backup: None }),
            ["granted", b] => b.parse().map(|b| Answer::Granted { backup: Some(b) }).map_err(|_| bad()),
            ["denied", "held", h, left] => left.parse().map(|left_us| Answer::Held { holder: h.to_string(), left_us }).map_err(|_| bad()),
            ["denied", "revoked"] => Ok(Answer::Revoked),
            ["denied", "unknown"] => Ok(Answer::Unknown),
            _ => Err(bad()),
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
        assert!(Request::parse("renew kv a x -").unwrap_err().to_string().contains("ttl"));
        assert!(Request::parse("steal kv").unwrap_err().to_string().contains("bad request"));
        assert!(Answer::parse("granted x").is_err());
    }
}
