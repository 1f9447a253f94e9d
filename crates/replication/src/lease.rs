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
//! **Generations (fencing tokens).** Every change of holder — a new copy claiming the lease,
//! a backup taking over — gives the lease the next generation. A copy learns its generation
//! from the grant and renews *under it*; a renewal under any other generation is answered
//! `superseded`, and that copy stops for good. So a copy that was paused (SIGSTOP, a frozen
//! host) and wakes up after someone else held the lease can never be granted it again,
//! whatever happened to the arbiter in between.
//!
//! **Surviving the arbiter's restarts.** What decides safety — per VM the holder, its
//! generation and the registered backup session, and the longest lease ever granted (the
//! *ceiling*) — is durable state ([`Table::encode`], [`Table::restore`]): the arbiter writes it
//! before it answers a request that changed it ([`Table::version`]). Expiry times are not
//! durable: a restored table treats every lease as possibly live for one ceiling
//! ([`Answer::Recovering`]), except that the recorded holder may renew under its generation at
//! once (no one else can hold that lease), so a restart of the arbiter does not interrupt a
//! healthy primary.
//!
//! The protocol is one line per request and per answer:
//! ```text
//! renew <vm> <holder> <gen|0> <ttl_us> <backup-session|->  →  granted <gen> <backup|-> | denied held <holder> <left_us>
//!                                                           | denied superseded <gen> <holder> | denied recovering <left_us>
//!                                                           | denied unknown
//! takeover <vm> <holder> <session> <ttl_us>                →  granted <gen> - | denied held <holder> <left_us> | denied revoked
//!                                                           | denied recovering <left_us> | denied unknown
//! handover <vm> <holder> <gen> <session>                    →  released | denied superseded <gen> <holder> | denied revoked
//!                                                           | denied unknown
//! ```
//!
//! **Planned handover (live migration).** The holder that paused its VM for good, once its
//! registered backup acknowledged the last checkpoint, gives the lease up early: `handover`
//! ends the lease now, keeping the registration, so that backup's takeover is granted at
//! once instead of after the lease runs out. It is asked only by a copy that will never
//! release output again, so ending its lease early cannot let two copies release at once;
//! nothing about it is durable (expiry times are not), and a lost `handover` only costs the
//! backup the wait for the expiry, as in a failure.
//! A renewal under generation 0 *claims* the lease for a new copy (granted once no other lease
//! is live). Leases last at most [`MAX_TTL_US`].

use crate::Error;
use std::collections::BTreeMap;

/// The longest lease the arbiter grants (µs): after a restart it waits at most this long.
pub const MAX_TTL_US: u64 = 60_000_000;

/// A request to the arbiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Keep the lease under generation `gen` (0: claim it for a new copy), registering the
    /// backup session allowed to take over.
    Renew { vm: String, holder: String, gen: u64, ttl_us: u64, backup: Option<u64> },
    /// Take the lease over as the registered backup `session` (only once it has expired).
    Takeover { vm: String, holder: String, session: u64, ttl_us: u64 },
    /// End the lease held under `gen` now, for the registered backup `session` to take over
    /// at once (the holder paused its VM for good: a planned handover).
    Handover { vm: String, holder: String, gen: u64, session: u64 },
}

/// The arbiter's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The lease is the requester's for the ttl under generation `gen`; `backup` is the
    /// registered backup session.
    Granted { gen: u64, backup: Option<u64> },
    /// Someone else holds a live lease.
    Held { holder: String, left_us: u64 },
    /// The lease has passed to generation `gen` (held by `holder`): the requester's copy is
    /// stale and must stop.
    Superseded { gen: u64, holder: String },
    /// The takeover's session is not (or no longer) the registered backup.
    Revoked,
    /// The arbiter restarted and waits out the leases it may have granted before.
    Recovering { left_us: u64 },
    /// No lease for this VM.
    Unknown,
    /// The lease ended early ([`Request::Handover`]): the registered backup may take over.
    Released,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Lease {
    holder: String,
    gen: u64,
    backup: Option<u64>,
    /// The backup session whose takeover made this generation, until the new holder renews:
    /// a repeated takeover by it (its grant was lost on the way) is granted again.
    took: Option<u64>,
    /// Not durable: 0 in a restored table.
    expires_us: u64,
}

/// The lease table: a pure state machine over the arbiter's clock (µs, from the arbiter's
/// start).
#[derive(Debug, Default)]
pub struct Table {
    leases: BTreeMap<String, Lease>,
    ceiling_us: u64,
    recovering_until_us: u64,
    version: u64,
}

impl Table {
    /// Handles one request at time `now_us`.
    pub fn handle(&mut self, now_us: u64, req: &Request) -> Answer {
        match req {
            Request::Renew { vm, holder, gen, ttl_us, backup } => {
                if *gen != 0 {
                    let Some(l) = self.leases.get(vm) else { return Answer::Unknown };
                    if l.gen != *gen || l.holder != *holder {
                        return Answer::Superseded { gen: l.gen, holder: l.holder.clone() };
                    }
                    // The recorded holder under its generation: no one else can hold this
                    // lease, so it is served even while recovering.
                    self.raise_ceiling(*ttl_us);
                    let l = self.leases.get_mut(vm).expect("checked above");
                    l.expires_us = now_us.saturating_add(*ttl_us);
                    if l.backup != *backup || l.took.is_some() {
                        l.backup = *backup;
                        l.took = None;
                        self.version += 1;
                    }
                    return Answer::Granted { gen: *gen, backup: *backup };
                }
                if now_us < self.recovering_until_us {
                    return Answer::Recovering { left_us: self.recovering_until_us - now_us };
                }
                let last = self.leases.get(vm);
                if let Some(l) = last.filter(|l| l.expires_us > now_us) {
                    return Answer::Held { holder: l.holder.clone(), left_us: l.expires_us - now_us };
                }
                let gen = last.map_or(0, |l| l.gen) + 1;
                self.raise_ceiling(*ttl_us);
                let expires_us = now_us.saturating_add(*ttl_us);
                self.leases.insert(vm.clone(), Lease { holder: holder.clone(), gen, backup: *backup, took: None, expires_us });
                self.version += 1;
                Answer::Granted { gen, backup: *backup }
            }
            Request::Takeover { vm, holder, session, ttl_us } => {
                let Some(l) = self.leases.get_mut(vm) else { return Answer::Unknown };
                if l.took == Some(*session) && l.holder == *holder {
                    // The same takeover again: its grant did not reach the backup. The lease
                    // is this copy's under the generation that grant made (served even while
                    // recovering, like a renewal by the recorded holder).
                    l.expires_us = now_us.saturating_add(*ttl_us);
                    let gen = l.gen;
                    self.raise_ceiling(*ttl_us);
                    return Answer::Granted { gen, backup: None };
                }
                if l.backup != Some(*session) {
                    return Answer::Revoked;
                }
                if now_us < self.recovering_until_us {
                    return Answer::Recovering { left_us: self.recovering_until_us - now_us };
                }
                if l.expires_us > now_us {
                    return Answer::Held { holder: l.holder.clone(), left_us: l.expires_us - now_us };
                }
                let gen = l.gen + 1;
                self.raise_ceiling(*ttl_us);
                let expires_us = now_us.saturating_add(*ttl_us);
                self.leases.insert(vm.clone(), Lease { holder: holder.clone(), gen, backup: None, took: Some(*session), expires_us });
                self.version += 1;
                Answer::Granted { gen, backup: None }
            }
            Request::Handover { vm, holder, gen, session } => {
                let Some(l) = self.leases.get_mut(vm) else { return Answer::Unknown };
                if l.gen != *gen || l.holder != *holder {
                    return Answer::Superseded { gen: l.gen, holder: l.holder.clone() };
                }
                if l.backup != Some(*session) {
                    return Answer::Revoked;
                }
                l.expires_us = l.expires_us.min(now_us);
                Answer::Released
            }
        }
    }

    fn raise_ceiling(&mut self, ttl_us: u64) {
        if ttl_us > self.ceiling_us {
            self.ceiling_us = ttl_us;
            self.version += 1;
        }
    }

    /// Counts changes of the durable state: when it moved, [`Table::encode`] must be stored
    /// before the answer goes out.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The durable state as text: one `ceiling <us>` line, then one
    /// `lease <vm> <holder> <gen> <backup|-> <took|->` line per VM (version 1 had no `took`).
    pub fn encode(&self) -> String {
        let mut s = format!("vigil-leases 2\nceiling {}\n", self.ceiling_us);
        let opt = |x: Option<u64>| x.map_or("-".into(), |b| b.to_string());
        for (vm, l) in &self.leases {
            s.push_str(&format!("lease {vm} {} {} {} {}\n", l.holder, l.gen, opt(l.backup), opt(l.took)));
        }
        s
    }

    /// A table from [`Table::encode`]'s text, recovering: until one ceiling has passed on the
    /// new clock, nothing is granted except renewals by the recorded holders. Errors name the
    /// line.
    pub fn restore(text: &str) -> Result<Table, Error> {
        let mut t = Table::default();
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, "vigil-leases 1" | "vigil-leases 2")) => {}
            _ => return Err(Error::Lease("line 1: not a lease table (expected `vigil-leases 2`)".into())),
        }
        for (i, line) in lines {
            let bad = |what: &str| Error::Lease(format!("line {}: {what}: {line:?}", i + 1));
            let w: Vec<&str> = line.split_whitespace().collect();
            match w.as_slice() {
                [] => {}
                ["ceiling", us] => {
                    t.ceiling_us = us.parse().ok().filter(|u| *u <= MAX_TTL_US).ok_or_else(|| bad("bad ceiling"))?;
                }
                // Lines of either version may meet (the store keeps one line per VM, written
                // by whichever arbiter last changed it).
                ["lease", vm, holder, gen, backup, rest @ ..] if rest.len() <= 1 => {
                    if !word_ok(vm) || !word_ok(holder) {
                        return Err(bad("bad name"));
                    }
                    let gen = gen.parse().ok().filter(|g| *g > 0).ok_or_else(|| bad("bad generation"))?;
                    let session = |w: &str| if w == "-" { Ok(None) } else { w.parse().map(Some).map_err(|_| bad("bad backup session")) };
                    let backup = session(backup)?;
                    let took = rest.first().map_or(Ok(None), |w| session(w))?;
                    if t.leases.insert(vm.to_string(), Lease { holder: holder.to_string(), gen, backup, took, expires_us: 0 }).is_some() {
                        return Err(bad("a second lease for the same VM"));
                    }
                }
                _ => return Err(bad("unexpected line")),
            }
        }
        t.recovering_until_us = t.ceiling_us.saturating_add(1000);
        Ok(t)
    }

    /// The last holder of `vm`'s lease (live or expired) and the backup session it registers.
    pub fn record(&self, vm: &str) -> Option<(&str, Option<u64>)> {
        self.leases.get(vm).map(|l| (l.holder.as_str(), l.backup))
    }

    /// The generation of `vm`'s lease (0: never granted).
    pub fn generation(&self, vm: &str) -> u64 {
        self.leases.get(vm).map_or(0, |l| l.gen)
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
            Request::Renew { vm, holder, gen, ttl_us, backup } => {
                format!("renew {vm} {holder} {gen} {ttl_us} {}", backup.map_or("-".into(), |b| b.to_string()))
            }
            Request::Takeover { vm, holder, session, ttl_us } => format!("takeover {vm} {holder} {session} {ttl_us}"),
            Request::Handover { vm, holder, gen, session } => format!("handover {vm} {holder} {gen} {session}"),
        }
    }

    /// Parses a protocol line; the error says what is wrong with it.
    pub fn parse(line: &str) -> Result<Request, Error> {
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |s: &str, what: &str| s.parse::<u64>().map_err(|_| Error::Lease(format!("{what} {s:?} is not a number")));
        let ttl = |s: &str| {
            let t = num(s, "ttl")?;
            if t == 0 || t > MAX_TTL_US {
                return Err(Error::Lease(format!("ttl {t} µs outside 1..={MAX_TTL_US}")));
            }
            Ok(t)
        };
        let names = |vm: &str, holder: &str| {
            if word_ok(vm) && word_ok(holder) {
                Ok(())
            } else {
                Err(Error::Lease("names are 1 to 200 printable characters".into()))
            }
        };
        match w.as_slice() {
            ["renew", vm, holder, gen, t, backup] => {
                names(vm, holder)?;
                let backup = if *backup == "-" { None } else { Some(num(backup, "backup session")?) };
                Ok(Request::Renew { vm: vm.to_string(), holder: holder.to_string(), gen: num(gen, "generation")?, ttl_us: ttl(t)?, backup })
            }
            ["takeover", vm, holder, session, t] => {
                names(vm, holder)?;
                Ok(Request::Takeover { vm: vm.to_string(), holder: holder.to_string(), session: num(session, "session")?, ttl_us: ttl(t)? })
            }
            ["handover", vm, holder, gen, session] => {
                names(vm, holder)?;
                let gen = num(gen, "generation")?;
                if gen == 0 {
                    return Err(Error::Lease("a handover names the generation the holder was granted (not 0)".into()));
                }
                Ok(Request::Handover { vm: vm.to_string(), holder: holder.to_string(), gen, session: num(session, "session")? })
            }
            _ => {
                let shown: String = line.chars().take(80).collect();
                Err(Error::Lease(format!(
                    "bad request {shown:?} (expected `renew VM HOLDER GEN TTL_US BACKUP|-` `takeover VM HOLDER SESSION TTL_US` or `handover VM HOLDER GEN SESSION`)"
                )))
            }
        }
    }
}

impl Answer {
    /// The answer as one protocol line.
    pub fn to_line(&self) -> String {
        match self {
            Answer::Granted { gen, backup } => format!("granted {gen} {}", backup.map_or("-".into(), |b| b.to_string())),
            Answer::Held { holder, left_us } => format!("denied held {holder} {left_us}"),
            Answer::Superseded { gen, holder } => format!("denied superseded {gen} {holder}"),
            Answer::Revoked => "denied revoked".into(),
            Answer::Recovering { left_us } => format!("denied recovering {left_us}"),
            Answer::Unknown => "denied unknown".into(),
            Answer::Released => "released".into(),
        }
    }

    /// Parses an answer line.
    pub fn parse(line: &str) -> Result<Answer, Error> {
        let bad = || Error::Lease(format!("bad answer {:?}", line.chars().take(80).collect::<String>()));
        let n = |s: &str| s.parse::<u64>().map_err(|_| bad());
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["granted", g, "-"] => Ok(Answer::Granted { gen: n(g)?, backup: None }),
            ["granted", g, b] => Ok(Answer::Granted { gen: n(g)?, backup: Some(n(b)?) }),
            ["denied", "held", h, left] => Ok(Answer::Held { holder: h.to_string(), left_us: n(left)? }),
            ["denied", "superseded", g, h] => Ok(Answer::Superseded { gen: n(g)?, holder: h.to_string() }),
            ["denied", "revoked"] => Ok(Answer::Revoked),
            ["denied", "recovering", left] => Ok(Answer::Recovering { left_us: n(left)? }),
            ["denied", "unknown"] => Ok(Answer::Unknown),
            ["released"] => Ok(Answer::Released),
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn renew(holder: &str, gen: u64, backup: Option<u64>) -> Request {
        Request::Renew { vm: "kv".into(), holder: holder.into(), gen, ttl_us: 100, backup }
    }
    fn takeover(holder: &str, session: u64) -> Request {
        Request::Takeover { vm: "kv".into(), holder: holder.into(), session, ttl_us: 100 }
    }

    #[test]
    fn a_backup_takes_over_only_an_expired_lease_that_names_it() {
        let mut t = Table::default();
        assert_eq!(t.handle(0, &takeover("b", 7)), Answer::Unknown);
        assert_eq!(t.handle(0, &renew("a", 0, Some(7))), Answer::Granted { gen: 1, backup: Some(7) });
        assert_eq!(t.handle(50, &takeover("b", 7)), Answer::Held { holder: "a".into(), left_us: 50 });
        assert_eq!(t.handle(150, &takeover("b", 8)), Answer::Revoked, "another session");
        assert_eq!(t.handle(150, &takeover("b", 7)), Answer::Granted { gen: 2, backup: None });
        assert_eq!(t.holder("kv", 151), Some("b"));
        // The old primary is fenced: its generation is gone, now and forever.
        assert_eq!(t.handle(160, &renew("a", 1, Some(7))), Answer::Superseded { gen: 2, holder: "b".into() });
        assert_eq!(t.handle(10_000, &renew("a", 1, Some(7))), Answer::Superseded { gen: 2, holder: "b".into() });
        // Another session can never take over again: the registration is gone.
        assert_eq!(t.handle(300, &takeover("c", 8)), Answer::Revoked);
    }

    /// Found with the dashboard test on a loaded host: the arbiter granted the takeover, but
    /// its answer reached the backup after the backup's read timeout; the backup asked again
    /// and was told `Revoked` (its registration was consumed by the grant it never saw), so it
    /// abandoned the replica while the primary was fenced by that same grant: the VM was lost.
    /// A takeover is idempotent for the session that made it: asking again is granted again,
    /// under the same generation, and it survives a restart of the arbiter.
    #[test]
    fn a_takeover_whose_grant_was_lost_is_granted_again_to_the_same_session() {
        let mut t = Table::default();
        t.handle(0, &renew("a", 0, Some(7)));
        assert_eq!(t.handle(150, &takeover("b", 7)), Answer::Granted { gen: 2, backup: None });
        // The answer is lost; the backup asks again, later.
        assert_eq!(t.handle(170, &takeover("b", 7)), Answer::Granted { gen: 2, backup: None });
        assert_eq!(t.holder("kv", 260), Some("b"), "the repeated grant extends the lease");
        // Through a restart of the arbiter too (even after its lease expired: nobody else
        // could have taken it since, the generation is the one the grant made).
        let mut r = Table::restore(&t.encode()).expect("restore");
        assert_eq!(r.handle(5, &takeover("b", 7)), Answer::Granted { gen: 2, backup: None });
        // Not for another holder name with the same session, nor once the copy renewed and
        // registered a backup of its own, nor after someone else claimed the lease.
        assert_eq!(t.handle(180, &takeover("x", 7)), Answer::Revoked);
        assert_eq!(t.handle(190, &renew("b", 2, Some(9))), Answer::Granted { gen: 2, backup: Some(9) });
        assert_eq!(t.handle(200, &takeover("b", 7)), Answer::Revoked);
        let mut u = Table::default();
        u.handle(0, &renew("a", 0, Some(7)));
        u.handle(150, &takeover("b", 7));
        assert_eq!(u.handle(10_000, &renew("c", 0, None)), Answer::Granted { gen: 3, backup: None });
        assert_eq!(u.handle(10_001, &takeover("b", 7)), Answer::Revoked);
    }

    /// A planned handover ends the holder's lease at once for its registered backup, and for
    /// no one else; a stale copy cannot hand over what it no longer holds.
    #[test]
    fn a_handover_lets_the_registered_backup_take_over_at_once() {
        let mut t = Table::default();
        t.handle(0, &renew("a", 0, Some(7)));
        let handover = |holder: &str, gen, session| Request::Handover { vm: "kv".into(), holder: holder.into(), gen, session };
        assert_eq!(t.handle(10, &handover("a", 1, 8)), Answer::Revoked, "not the registered backup");
        assert_eq!(t.handle(10, &handover("a", 2, 7)), Answer::Superseded { gen: 1, holder: "a".into() });
        assert_eq!(t.handle(10, &handover("x", 1, 7)), Answer::Superseded { gen: 1, holder: "a".into() });
        assert_eq!(t.handle(20, &takeover("b", 7)), Answer::Held { holder: "a".into(), left_us: 80 });
        assert_eq!(t.handle(20, &handover("a", 1, 7)), Answer::Released);
        assert_eq!(t.holder("kv", 20), None);
        assert_eq!(t.handle(20, &takeover("b", 8)), Answer::Revoked, "only the registered session");
        assert_eq!(t.handle(21, &takeover("b", 7)), Answer::Granted { gen: 2, backup: None });
        // The old holder is fenced, and cannot hand over again.
        assert_eq!(t.handle(22, &renew("a", 1, Some(7))), Answer::Superseded { gen: 2, holder: "b".into() });
        assert_eq!(t.handle(22, &handover("a", 1, 7)), Answer::Superseded { gen: 2, holder: "b".into() });
        assert_eq!(Request::parse("handover kv a 0 7").unwrap_err().to_string().contains("not 0"), true);
        assert_eq!(Request::parse(&handover("a", 3, 7).to_line()), Ok(handover("a", 3, 7)));
        assert_eq!(Answer::parse("released"), Ok(Answer::Released));
    }

    #[test]
    fn a_dropped_backup_can_never_take_over() {
        let mut t = Table::default();
        t.handle(0, &renew("a", 0, Some(7)));
        assert_eq!(t.handle(10, &renew("a", 1, None)), Answer::Granted { gen: 1, backup: None });
        assert_eq!(t.handle(1000, &takeover("b", 7)), Answer::Revoked);
    }

    #[test]
    fn a_claim_waits_for_a_live_lease_even_from_the_same_host_and_starts_a_new_generation() {
        let mut t = Table::default();
        t.handle(0, &renew("a", 0, None));
        assert_eq!(t.handle(40, &renew("a", 0, None)), Answer::Held { holder: "a".into(), left_us: 60 });
        assert_eq!(t.handle(100, &renew("a", 0, None)), Answer::Granted { gen: 2, backup: None });
        assert_eq!(t.handle(110, &renew("a", 1, None)), Answer::Superseded { gen: 2, holder: "a".into() });
    }

    /// The reported loss: A stopped, B took over, B stopped, the arbiter restarted, A
    /// continued. The restored table knows A's generation is gone.
    #[test]
    fn a_restarted_table_never_grants_a_stale_generation_and_waits_out_the_ceiling() {
        let mut t = Table::default();
        t.handle(0, &renew("a", 0, Some(7)));
        t.handle(200, &takeover("b", 7));
        // The new holder's first renewal ends the takeover's retry window (durable); later
        // plain renewals change nothing durable.
        t.handle(240, &renew("b", 2, None));
        let v = t.version();
        t.handle(250, &renew("b", 2, None));
        assert_eq!(t.version(), v, "a plain renewal changes nothing durable");
        let mut r = Table::restore(&t.encode()).expect("restore");
        assert_eq!(r.encode(), t.encode());
        assert_eq!(r.handle(0, &renew("a", 1, Some(7))), Answer::Superseded { gen: 2, holder: "b".into() });
        assert_eq!(r.handle(5_000, &renew("a", 1, Some(7))), Answer::Superseded { gen: 2, holder: "b".into() });
        // A new claim waits out the longest lease ever granted (100 µs + the margin) ...
        assert!(matches!(r.handle(0, &renew("c", 0, None)), Answer::Recovering { left_us: 1100 }));
        // ... but the recorded holder keeps its lease through the restart.
        assert_eq!(r.handle(1, &renew("b", 2, None)), Answer::Granted { gen: 2, backup: None });
        assert_eq!(r.handle(1050, &renew("b", 2, None)), Answer::Granted { gen: 2, backup: None });
        assert_eq!(r.handle(1120, &renew("c", 0, None)), Answer::Held { holder: "b".into(), left_us: 30 });
        assert_eq!(r.handle(1150, &renew("c", 0, None)), Answer::Granted { gen: 3, backup: None });
    }

    #[test]
    fn a_restarted_table_lets_the_registered_backup_take_over_after_the_wait() {
        let mut t = Table::default();
        t.handle(0, &renew("a", 0, Some(7)));
        let mut r = Table::restore(&t.encode()).expect("restore");
        assert_eq!(r.handle(10, &takeover("b", 8)), Answer::Revoked);
        assert_eq!(r.handle(10, &takeover("b", 7)), Answer::Recovering { left_us: 1090 });
        assert_eq!(r.handle(1100, &takeover("b", 7)), Answer::Granted { gen: 2, backup: None });
    }

    #[test]
    fn lines_round_trip_and_bad_lines_are_explained() {
        for r in [renew("a", 3, Some(3)), renew("a", 0, None), takeover("b", 9)] {
            assert_eq!(Request::parse(&r.to_line()), Ok(r));
        }
        for a in [
            Answer::Granted { gen: 4, backup: Some(1) },
            Answer::Granted { gen: 1, backup: None },
            Answer::Held { holder: "x".into(), left_us: 5 },
            Answer::Superseded { gen: 9, holder: "y".into() },
            Answer::Revoked,
            Answer::Recovering { left_us: 7 },
            Answer::Unknown,
        ] {
            assert_eq!(Answer::parse(&a.to_line()), Ok(a));
        }
        assert!(Request::parse("renew kv a 0 x -").unwrap_err().to_string().contains("ttl"));
        assert!(Request::parse("renew kv a 0 0 -").unwrap_err().to_string().contains("outside"));
        assert!(Request::parse("renew kv a 0 60000001 -").unwrap_err().to_string().contains("outside"));
        assert!(Request::parse("steal kv").unwrap_err().to_string().contains("bad request"));
        assert!(Answer::parse("granted x").is_err());
        // Lines of both versions in one table (the store keeps each VM's last line).
        let mixed = Table::restore("vigil-leases 2\nceiling 5\nlease a x 1 -\nlease b y 2 3 4\n").expect("mixed versions");
        assert_eq!((mixed.generation("a"), mixed.generation("b")), (1, 2));
        for (text, what) in [
            ("", "line 1"),
            ("vigil-leases 1\nceiling x\n", "line 2: bad ceiling"),
            ("vigil-leases 1\nlease kv a 0 -\n", "line 2: bad generation"),
            ("vigil-leases 1\nlease kv a 1 -\nlease kv b 2 -\n", "line 3: a second lease"),
            ("vigil-leases 2\nlease kv a 1 - - 3\n", "line 2: unexpected"),
            ("vigil-leases 2\nlease kv a 1 - x\n", "line 2: bad backup session"),
            ("vigil-leases 1\nsteal\n", "line 2: unexpected"),
        ] {
            let e = Table::restore(text).unwrap_err().to_string();
            assert!(e.contains(what), "{text:?}: {e}");
        }
    }
}
