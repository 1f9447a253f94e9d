//! Leader election through the store: at most one manager acts at a time, and a standby takes
//! over when the leader dies.
//!
//! The leader record (`/vigil/manager/leader`: id, generation, beat) is rewritten by its
//! holder every period. A standby remembers, by its own monotonic clock, when it last saw the
//! record change; once it has stayed the same for the lease, the standby takes over in one
//! store transaction: it increments `/vigil/manager/generation` (a number that only grows and
//! lives in the store, so it survives the restart of any manager and of the store itself) and
//! writes itself as leader with that generation. A leader acts only while its last successful
//! renewal started less than half a lease ago, so it has stopped before anyone can take over.
//! Everything the manager writes carries its generation; agents ignore older ones.

use agent::cluster::{self, Leader};
use std::time::{Duration, Instant};

/// What this manager is after a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// It leads with this generation (and may act until half a lease after the renewal).
    Leader { generation: u64, took_over: bool },
    /// Another manager leads (or nobody yet, within the lease of the last one).
    Standby { leader: Option<String> },
}

/// One manager's side of the election.
pub struct Election {
    id: String,
    lease: Duration,
    generation: Option<u64>,
    /// The leader record as last read, and since when it has been the same.
    seen: Option<(Option<Vec<u8>>, Instant)>,
    last_renewal: Option<Instant>,
}

enum Decision {
    Renewed(u64),
    Took(u64),
    Follow(Option<String>),
    Lost(Option<String>),
}

impl Election {
    pub fn new(id: impl Into<String>, lease: Duration) -> Election {
        Election { id: id.into(), lease, generation: None, seen: None, last_renewal: None }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether this manager may act now: it leads, and its last renewal started less than half
    /// a lease ago.
    pub fn may_act(&self) -> bool {
        self.generation.is_some() && self.last_renewal.is_some_and(|t| t.elapsed() < self.lease / 2)
    }

    /// Renews the lead, or watches the leader and takes over when its lease has expired.
    pub fn step(&mut self, store: &mut store::Client) -> agent::Result<Role> {
        let started = Instant::now();
        let raw = store.try_read(cluster::LEADER)?;
        match &self.seen {
            Some((prev, _)) if *prev == raw => {}
            _ => self.seen = Some((raw.clone(), started)),
        }
        let expired = raw.is_none() || self.seen.as_ref().is_some_and(|(_, since)| since.elapsed() > self.lease);
        let (id, mine) = (self.id.clone(), self.generation);
        let decision = store.transaction(|tx| {
            let now_raw = tx.try_read(cluster::LEADER)?;
            let cur: Option<Leader> = now_raw.as_ref().and_then(|b| serde_json::from_slice(b).ok());
            if let (Some(l), Some(g)) = (&cur, mine) {
                if l.id == id && l.generation == g {
                    let next = Leader { beat: l.beat + 1, ..l.clone() };
                    tx.write(cluster::LEADER, &serde_json::to_vec(&next).unwrap_or_default())?;
                    return Ok(Decision::Renewed(g));
                }
                return Ok(Decision::Lost(Some(l.id.clone())));
            }
            if mine.is_some() {
                return Ok(Decision::Lost(None));
            }
            // Take over only what we have watched expire (the record unchanged since).
            if expired && now_raw == raw {
                let last =
                    tx.try_read(cluster::GENERATION)?.and_then(|v| String::from_utf8(v).ok()?.trim().parse::<u64>().ok()).unwrap_or(0);
                let g = last + 1;
                tx.write(cluster::GENERATION, g.to_string().as_bytes())?;
                let rec = Leader { id: id.clone(), generation: g, beat: 0 };
                tx.write(cluster::LEADER, &serde_json::to_vec(&rec).unwrap_or_default())?;
                return Ok(Decision::Took(g));
            }
            Ok(Decision::Follow(cur.map(|l| l.id)))
        });
        let decision = match decision {
            Ok(d) => d,
            Err(e) => {
                // A store that does not answer: a leader keeps its role only until its lease
                // runs out (may_act turns false by itself).
                return Err(e.into());
            }
        };
        Ok(match decision {
            Decision::Renewed(g) => {
                self.last_renewal = Some(started);
                Role::Leader { generation: g, took_over: false }
            }
            Decision::Took(g) => {
                self.generation = Some(g);
                self.last_renewal = Some(started);
                self.seen = None;
                tracing::info!("manager {}: leading with generation {g}", self.id);
                Role::Leader { generation: g, took_over: true }
            }
            Decision::Follow(leader) => Role::Standby { leader },
            Decision::Lost(leader) => {
                tracing::warn!("manager {}: lost the lead (to {leader:?})", self.id);
                self.generation = None;
                self.last_renewal = None;
                Role::Standby { leader }
            }
        })
    }
}
