//! Deterministic simulation of the state machine: clients increment shared counters in
//! transactions, interleaved in every order proptest picks. Optimistic concurrency must make the
//! result equal to the number of successful commits (no lost update, no double apply), and
//! replaying the emitted mutations (what the log holds) must rebuild exactly the live state.

use proptest::prelude::*;
use store::state::{Mutation, Store};
use store::wire::{Msg, MsgType};
use store::ConnId;

#[derive(Clone, Copy, Debug)]
enum Step {
    Start,
    Read,
    Write,
    End,
}

struct Client {
    conn: ConnId,
    step: Step,
    tx: u32,
    seen: u64,
    key: String,
    committed: u64,
    remaining: u32,
}

fn msg(ty: MsgType, tx: u32, payload: Vec<u8>) -> Msg {
    Msg::new(ty, 1, tx, payload)
}

impl Client {
    /// Advances by one request; returns false when done.
    fn step(&mut self, s: &mut Store, log: &mut Vec<Mutation>) -> bool {
        if self.remaining == 0 {
            return false;
        }
        let m = match self.step {
            Step::Start => msg(MsgType::TransactionStart, 0, vec![0]),
            Step::Read => msg(MsgType::Read, self.tx, format!("{}\0", self.key).into_bytes()),
            Step::Write => {
                let mut p = format!("{}\0", self.key).into_bytes();
                p.extend_from_slice((self.seen + 1).to_string().as_bytes());
                msg(MsgType::Write, self.tx, p)
            }
            Step::End => msg(MsgType::TransactionEnd, self.tx, b"T\0".to_vec()),
        };
        let out = s.handle(self.conn, &m);
        log.extend(out.mutations);
        let reply = &out.sends[0].1;
        let err = reply.ty == MsgType::Error as u32;
        let text = String::from_utf8_lossy(&reply.payload).trim_end_matches('\0').to_string();
        self.step = match self.step {
            Step::Start => {
                assert!(!err, "start: {text}");
                self.tx = text.parse().expect("tx id");
                Step::Read
            }
            Step::Read => {
                self.seen = if err { 0 } else { text.parse().expect("a number") };
                Step::Write
            }
            Step::Write => {
                assert!(!err, "write in tx: {text}");
                Step::End
            }
            Step::End => {
                if err {
                    assert_eq!(text, "EAGAIN");
                } else {
                    self.committed += 1;
                    self.remaining -= 1;
                }
                Step::Start
            }
        };
        true
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn transactions_serialise_under_any_interleaving(
        schedule in proptest::collection::vec(0usize..3, 0..200),
        shared in proptest::bool::ANY,
    ) {
        let mut s = Store::default();
        let mut log = Vec::new();
        let mut clients: Vec<Client> = (0..3)
            .map(|i| Client {
                conn: s.connect(0),
                step: Step::Start,
                tx: 0,
                seen: 0,
                key: if shared || i < 2 { "/counter".to_string() } else { "/other".to_string() },
                committed: 0,
                remaining: 4,
            })
            .collect();
        for i in schedule {
            clients[i].step(&mut s, &mut log);
        }
        // Finish round-robin; a lone client always commits, so this ends.
        let mut guard = 0;
        loop {
            let mut any = false;
            for c in clients.iter_mut() {
                any |= c.step(&mut s, &mut log);
            }
            if !any {
                break;
            }
            guard += 1;
            prop_assert!(guard < 10_000);
        }
        let expect = |key: &str| clients.iter().filter(|c| c.key == key).map(|c| c.committed).sum::<u64>();
        let value = |key: &str| s.value(key).map(|v| String::from_utf8_lossy(v).parse::<u64>().expect("number"));
        prop_assert_eq!(value("/counter"), Some(expect("/counter")));
        if !shared {
            prop_assert_eq!(value("/other"), Some(expect("/other")));
        }
        let mut replayed = Store::default();
        for m in &log {
            replayed.apply(m).expect("replays");
        }
        prop_assert_eq!(replayed.snapshot(), s.snapshot());
    }
}
