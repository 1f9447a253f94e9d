//! Fencing without an arbiter: each VM's lease is a record in the cluster's store, and every
//! copy decides the [`lease`](crate::lease) protocol's requests itself, in one store
//! transaction, by its own clock.
//!
//! There is no grantor whose clock leases expire by. Instead the holder *beats*: every renewal
//! rewrites the record with the next beat number. A contender (the registered backup, or a new
//! copy claiming the lease) watches the record and remembers, by its own monotonic clock, when
//! it first received the value it sees now ([`Observer`]); the lease has expired for it once
//! that value has stayed the same for the holder's ttl. It then takes the lease in a
//! transaction that reads the record again and writes the next generation — the store
//! (serialisable transactions, also across front ends on etcd) refuses it if the holder renewed
//! in between.
//!
//! **Why two copies never release at once.** The holder releases output only until its renewal
//! was *sent* plus the ttl (the primary state machine's rule, as with the arbiter). A contender
//! counts from when it *received* a read showing that renewal's beat, which is after the
//! renewal committed, which is after it was sent; so its ttl ends later than the holder's
//! validity (assuming the two clocks run at the same rate over one ttl, as the arbiter does).
//! A read that fails forgets the observation (the contender starts counting again), which
//! only delays a takeover; a store that loses its data answers renewals `unknown`, and a
//! damaged record is an error, never a grant.
//!
//! Generations, the registered backup session, the repeated takeover (`took`) and the planned
//! handover (`released`: the registered backup may take over at once) mean what they mean in
//! [`lease::Table`](crate::lease::Table), and the answers are the same [`Answer`]s, so the
//! primary and backup state machines cannot tell the two services apart.
//! [`Answer::Recovering`] is never given: the contender's own observation replaces the
//! arbiter's wait after a restart.
//!
//! The record is one line ([`Record::encode`]):
//! ```text
//! vigil-lease 1 <holder> <gen> <backup|-> <took|-> <beat> <ttl_us> live|released
//! ```

use crate::lease::{Answer, Request, MAX_TTL_US};
use crate::Error;

/// One VM's lease as kept in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub holder: String,
    /// The generation (fencing token); ≥ 1.
    pub gen: u64,
    /// The backup session allowed to take over.
    pub backup: Option<u64>,
    /// The backup session whose takeover made this generation, until the new holder renews.
    pub took: Option<u64>,
    /// Incremented by every write: what contenders watch.
    pub beat: u64,
    /// The holder's ttl (µs): how long a contender must see the record unchanged.
    pub ttl_us: u64,
    /// The holder handed the lease over (it will never release output again).
    pub released: bool,
}

impl Record {
    /// The record as its one line.
    pub fn encode(&self) -> String {
        let opt = |x: Option<u64>| x.map_or("-".into(), |b| b.to_string());
        format!(
            "vigil-lease 1 {} {} {} {} {} {} {}",
            self.holder,
            self.gen,
            opt(self.backup),
            opt(self.took),
            self.beat,
            self.ttl_us,
            if self.released { "released" } else { "live" }
        )
    }

    /// Parses a record; the error quotes what is wrong.
    pub fn parse(text: &str) -> Result<Record, Error> {
        let bad = |what: &str| Error::Lease(format!("lease record {:?}: {what}", text.chars().take(120).collect::<String>()));
        let w: Vec<&str> = text.split_whitespace().collect();
        let ["vigil-lease", "1", holder, gen, backup, took, beat, ttl, state] = w.as_slice() else {
            return Err(bad("expected `vigil-lease 1 HOLDER GEN BACKUP|- TOOK|- BEAT TTL_US live|released`"));
        };
        if holder.is_empty() || holder.len() > 200 {
            return Err(bad("bad holder"));
        }
        let session = |w: &str| if w == "-" { Ok(None) } else { w.parse().map(Some).map_err(|_| bad("bad session")) };
        Ok(Record {
            holder: holder.to_string(),
            gen: gen.parse().ok().filter(|g| *g > 0).ok_or_else(|| bad("bad generation"))?,
            backup: session(backup)?,
            took: session(took)?,
            beat: beat.parse().map_err(|_| bad("bad beat"))?,
            ttl_us: ttl.parse().ok().filter(|t| *t > 0 && *t <= MAX_TTL_US).ok_or_else(|| bad("bad ttl"))?,
            released: match *state {
                "live" => false,
                "released" => true,
                _ => return Err(bad("bad state")),
            },
        })
    }
}

/// What one copy has seen of one VM's record: the value and when (its own clock, µs) it first
/// received a read showing it.
#[derive(Debug, Default, Clone)]
pub struct Observer {
    seen: Option<(Option<String>, u64)>,
}

impl Observer {
    /// A read of the record (`None`: no record) received at `now_us`; returns for how long
    /// this copy has seen exactly this value.
    pub fn saw(&mut self, raw: Option<&str>, now_us: u64) -> u64 {
        match &self.seen {
            Some((v, since)) if v.as_deref() == raw => now_us.saturating_sub(*since),
            _ => {
                self.seen = Some((raw.map(str::to_owned), now_us));
                0
            }
        }
    }

    /// A read failed: what was seen no longer counts (the next value starts from zero).
    pub fn forget(&mut self) {
        self.seen = None;
    }
}

/// What a request does to the record: the answer, and the record to write first (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub answer: Answer,
    pub write: Option<Record>,
}

/// Decides `req` on the record as read in the transaction (`None`: none), which the
/// requester has seen unchanged for `unchanged_us`. Pure: the caller writes
/// [`Decision::write`] in the same transaction and sends the answer only once it committed.
pub fn decide(record: Option<&Record>, unchanged_us: u64, req: &Request) -> Decision {
    let answer_only = |answer| Decision { answer, write: None };
    // The lease is free for a contender: handed over, or unchanged for the holder's ttl.
    let free = |r: &Record| r.released || unchanged_us >= r.ttl_us;
    let held = |r: &Record| Answer::Held { holder: r.holder.clone(), left_us: r.ttl_us.saturating_sub(unchanged_us).max(1) };
    match req {
        Request::Renew { holder, gen, ttl_us, backup, .. } => match record {
            None if *gen != 0 => answer_only(Answer::Unknown),
            None => {
                let write =
                    Record { holder: holder.clone(), gen: 1, backup: *backup, took: None, beat: 0, ttl_us: *ttl_us, released: false };
                Decision { answer: Answer::Granted { gen: 1, backup: *backup }, write: Some(write) }
            }
            Some(r) if *gen != 0 => {
                if r.gen != *gen || r.holder != *holder {
                    return answer_only(Answer::Superseded { gen: r.gen, holder: r.holder.clone() });
                }
                let write = Record { backup: *backup, took: None, beat: r.beat + 1, ttl_us: *ttl_us, released: false, ..r.clone() };
                Decision { answer: Answer::Granted { gen: *gen, backup: *backup }, write: Some(write) }
            }
            Some(r) if !free(r) => answer_only(held(r)),
            Some(r) => {
                let gen = r.gen + 1;
                let write =
                    Record { holder: holder.clone(), gen, backup: *backup, took: None, beat: r.beat + 1, ttl_us: *ttl_us, released: false };
                Decision { answer: Answer::Granted { gen, backup: *backup }, write: Some(write) }
            }
        },
        Request::Takeover { holder, session, ttl_us, .. } => {
            let Some(r) = record else { return answer_only(Answer::Unknown) };
            if r.took == Some(*session) && r.holder == *holder {
                // The same takeover again (its answer was lost): this copy holds the lease.
                let write = Record { beat: r.beat + 1, ttl_us: *ttl_us, ..r.clone() };
                return Decision { answer: Answer::Granted { gen: r.gen, backup: None }, write: Some(write) };
            }
            if r.backup != Some(*session) {
                return answer_only(Answer::Revoked);
            }
            if !free(r) {
                return answer_only(held(r));
            }
            let gen = r.gen + 1;
            let write = Record {
                holder: holder.clone(),
                gen,
                backup: None,
                took: Some(*session),
                beat: r.beat + 1,
                ttl_us: *ttl_us,
                released: false,
            };
            Decision { answer: Answer::Granted { gen, backup: None }, write: Some(write) }
        }
        Request::Handover { holder, gen, session, .. } => {
            let Some(r) = record else { return answer_only(Answer::Unknown) };
            if r.gen != *gen || r.holder != *holder {
                return answer_only(Answer::Superseded { gen: r.gen, holder: r.holder.clone() });
            }
            if r.backup != Some(*session) {
                return answer_only(Answer::Revoked);
            }
            Decision { answer: Answer::Released, write: Some(Record { beat: r.beat + 1, released: true, ..r.clone() }) }
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

    /// A store of one record and a clock: `ask` runs the whole transaction as a copy would.
    struct World {
        record: Option<Record>,
    }

    impl World {
        fn ask(&mut self, who: &mut Observer, now: u64, req: &Request) -> Answer {
            let raw = self.record.as_ref().map(Record::encode);
            let unchanged = who.saw(raw.as_deref(), now);
            let parsed = raw.as_deref().map(|t| Record::parse(t).expect("parses"));
            let d = decide(parsed.as_ref(), unchanged, req);
            if let Some(w) = d.write {
                self.record = Some(w);
            }
            d.answer
        }
    }

    #[test]
    fn a_backup_takes_over_only_after_seeing_the_record_unchanged_for_the_ttl() {
        let mut w = World { record: None };
        let (mut a, mut b) = (Observer::default(), Observer::default());
        assert_eq!(w.ask(&mut b, 0, &takeover("b", 7)), Answer::Unknown);
        assert_eq!(w.ask(&mut a, 0, &renew("a", 0, Some(7))), Answer::Granted { gen: 1, backup: Some(7) });
        // b sees the record for the first time at 10: it must wait a whole ttl from then.
        assert_eq!(w.ask(&mut b, 10, &takeover("b", 7)), Answer::Held { holder: "a".into(), left_us: 100 });
        assert_eq!(w.ask(&mut a, 50, &renew("a", 1, Some(7))), Answer::Granted { gen: 1, backup: Some(7) });
        // The renewal changed the beat: b counts again from 60.
        assert_eq!(w.ask(&mut b, 60, &takeover("b", 7)), Answer::Held { holder: "a".into(), left_us: 100 });
        assert_eq!(w.ask(&mut b, 159, &takeover("b", 7)), Answer::Held { holder: "a".into(), left_us: 1 });
        assert_eq!(w.ask(&mut b, 160, &takeover("b", 7)), Answer::Granted { gen: 2, backup: None });
        // The old holder is superseded for good; the takeover asked again is granted again.
        assert_eq!(w.ask(&mut a, 170, &renew("a", 1, Some(7))), Answer::Superseded { gen: 2, holder: "b".into() });
        assert_eq!(w.ask(&mut b, 171, &takeover("b", 7)), Answer::Granted { gen: 2, backup: None });
        // Another session is not the registered backup.
        assert_eq!(w.ask(&mut a, 400, &takeover("a", 8)), Answer::Revoked);
    }

    #[test]
    fn a_forgotten_observation_only_delays() {
        let mut w = World { record: None };
        let (mut a, mut b) = (Observer::default(), Observer::default());
        w.ask(&mut a, 0, &renew("a", 0, Some(7)));
        assert!(matches!(w.ask(&mut b, 0, &takeover("b", 7)), Answer::Held { .. }));
        b.forget();
        assert!(matches!(w.ask(&mut b, 150, &takeover("b", 7)), Answer::Held { left_us: 100, .. }));
        assert_eq!(w.ask(&mut b, 250, &takeover("b", 7)), Answer::Granted { gen: 2, backup: None });
    }

    #[test]
    fn a_handover_frees_the_lease_for_the_registered_backup_at_once() {
        let mut w = World { record: None };
        let (mut a, mut b, mut c) = (Observer::default(), Observer::default(), Observer::default());
        w.ask(&mut a, 0, &renew("a", 0, Some(7)));
        let handover = |gen, session| Request::Handover { vm: "kv".into(), holder: "a".into(), gen, session };
        assert_eq!(w.ask(&mut a, 1, &handover(2, 7)), Answer::Superseded { gen: 1, holder: "a".into() });
        assert_eq!(w.ask(&mut a, 1, &handover(1, 8)), Answer::Revoked);
        assert_eq!(w.ask(&mut a, 2, &handover(1, 7)), Answer::Released);
        assert_eq!(w.ask(&mut c, 3, &takeover("c", 9)), Answer::Revoked, "only the registered backup");
        assert_eq!(w.ask(&mut b, 3, &takeover("b", 7)), Answer::Granted { gen: 2, backup: None });
    }

    #[test]
    fn a_new_copy_claims_a_lease_only_once_it_is_free() {
        let mut w = World { record: None };
        let (mut a, mut z) = (Observer::default(), Observer::default());
        w.ask(&mut a, 0, &renew("a", 0, None));
        assert!(matches!(w.ask(&mut z, 5, &renew("z", 0, None)), Answer::Held { .. }));
        assert_eq!(w.ask(&mut z, 105, &renew("z", 0, None)), Answer::Granted { gen: 2, backup: None });
        // A renewal of a lease the store has no record of (its data lost) is not granted.
        let mut empty = World { record: None };
        assert_eq!(empty.ask(&mut a, 0, &renew("a", 3, None)), Answer::Unknown);
    }

    #[test]
    fn records_round_trip_and_damaged_ones_are_named() {
        let r = Record { holder: "hostA".into(), gen: 3, backup: Some(9), took: None, beat: 12, ttl_us: 120_000, released: false };
        assert_eq!(Record::parse(&r.encode()), Ok(r.clone()));
        let r2 = Record { took: Some(4), backup: None, released: true, ..r };
        assert_eq!(Record::parse(&r2.encode()), Ok(r2));
        for bad in [
            "",
            "vigil-lease 1 a 0 - - 1 100 live",
            "vigil-lease 1 a 1 - - 1 0 live",
            "vigil-lease 1 a 1 x - 1 100 live",
            "vigil-lease 2 a 1 - - 1 100 live",
            "vigil-lease 1 a 1 - - 1 100 maybe",
        ] {
            let e = Record::parse(bad).unwrap_err().to_string();
            assert!(e.contains("lease record"), "{bad:?}: {e}");
        }
    }
}
