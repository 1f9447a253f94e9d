//! Malformed and random traffic never panics the framing decoder or the state machine, and
//! every request gets exactly one reply with its req_id.

use proptest::prelude::*;
use store::wire::{self, decode, Msg, HEADER_LEN, PAYLOAD_MAX};
use store::Store;

fn interesting_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        "[/a-z0-9@_-]{0,20}".prop_map(|s| {
            let mut v = s.into_bytes();
            v.push(0);
            v
        }),
        ("[/a-c]{1,6}", "[a-z]{0,5}").prop_map(|(p, v)| {
            let mut b = p.into_bytes();
            b.push(0);
            b.extend(v.into_bytes());
            b
        }),
        ("[/a-c]{1,6}", "[nrwbx][0-9]{0,3}").prop_map(|(p, v)| {
            let mut b = p.into_bytes();
            b.push(0);
            b.extend(v.into_bytes());
            b.push(0);
            b
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut rest = &bytes[..];
        while let Ok(Some((m, used))) = decode(rest) {
            prop_assert!(used >= HEADER_LEN && m.payload.len() <= PAYLOAD_MAX);
            rest = &rest[used..];
        }
    }

    #[test]
    fn state_machine_answers_everything(
        msgs in proptest::collection::vec((0u32..26, 0u32..4, interesting_payload()), 1..40),
        domid in prop_oneof![Just(0u32), Just(5u32)],
    ) {
        let mut s = Store::default();
        let c = s.connect(domid);
        let other = s.connect(0);
        for (i, (ty, tx, payload)) in msgs.into_iter().enumerate() {
            let m = Msg { ty, req_id: i as u32, tx_id: tx, payload };
            let out = s.handle(c, &m);
            prop_assert_eq!(out.sends[0].0, c);
            prop_assert_eq!(out.sends[0].1.req_id, i as u32);
            prop_assert!(out.sends.iter().all(|(to, m)| (*to == c || *to == other) && m.payload.len() <= PAYLOAD_MAX));
            let reply = &out.sends[0].1;
            if reply.ty == wire::MsgType::Error as u32 {
                let name = String::from_utf8_lossy(&reply.payload);
                prop_assert!(store::Errno::from_name(name.trim_end_matches('\0')).is_some(), "{}", name);
            }
        }
    }
}
