//! Malformed traffic on a real socket: the server answers with the protocol error or closes
//! that one connection, and keeps serving everyone else.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;
use store::wire::{Msg, MsgType};
use store::Client;

mod common;
use common::next;

fn start(name: &str) -> PathBuf {
    common::start("malformed", name)
}

fn raw(sock: &PathBuf) -> UnixStream {
    let s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s
}

/// Reads one message, or `None` at end of stream.
fn error_name(m: &Msg) -> String {
    assert_eq!(m.ty, MsgType::Error as u32, "{m:?}");
    String::from_utf8_lossy(&m.payload).trim_end_matches('\0').to_string()
}

#[test]
fn protocol_errors_and_disconnects() {
    let sock = start("errors");
    let mut good = Client::connect(&sock).expect("client");
    good.write("/ok", b"1").expect("write");

    // Oversized payload: E2BIG, then the connection is closed.
    let mut s = raw(&sock);
    let mut h = Msg::new(MsgType::Write, 9, 0, vec![]).encode();
    h[12..16].copy_from_slice(&100_000u32.to_le_bytes());
    s.write_all(&h).expect("send");
    let m = next(&mut s).expect("a reply");
    assert_eq!((m.req_id, error_name(&m).as_str()), (9, "E2BIG"));
    assert!(next(&mut s).is_none(), "connection closed");

    // Unknown type, bad paths, non-UTF-8: errors, and the connection stays usable.
    let mut s = raw(&sock);
    for (ty, payload, want) in [
        (999u32, b"x\0".to_vec(), "ENOSYS"),
        (20, vec![], "ENOSYS"),
        (MsgType::Read as u32, b"/a b\0".to_vec(), "EINVAL"),
        (MsgType::Read as u32, vec![b'/', 0xff, 0xfe, 0], "EINVAL"),
        (MsgType::Read as u32, b"/ok".to_vec(), "EINVAL"),
        (MsgType::Write as u32, b"/no-nul".to_vec(), "EINVAL"),
        (MsgType::TransactionEnd as u32, b"T\0".to_vec(), "ENOENT"),
        (MsgType::WatchEvent as u32, b"/a\0t\0".to_vec(), "ENOSYS"),
        (MsgType::Read as u32, format!("/{}\0", "a".repeat(4000)).into_bytes(), "EINVAL"),
    ] {
        s.write_all(&Msg { ty, req_id: 7, tx_id: 0, payload }.encode()).expect("send");
        let m = next(&mut s).expect("a reply");
        assert_eq!(error_name(&m), want, "type {ty}");
        assert_eq!(m.req_id, 7);
    }
    s.write_all(&Msg::new(MsgType::Read, 8, 0, b"/ok\0".to_vec()).encode()).expect("send");
    assert_eq!(next(&mut s).expect("reply").payload, b"1");

    // Truncated header, then hang up.
    let mut s = raw(&sock);
    s.write_all(&[1, 0, 0]).expect("send");
    drop(s);
    // Random garbage on a few connections.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..20 {
        let mut s = raw(&sock);
        let mut bytes = Vec::new();
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.push(x as u8);
        }
        // Keep lengths small sometimes so that garbage reaches the state machine.
        bytes[12..16].copy_from_slice(&((x % 64) as u32).to_le_bytes());
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        while next(&mut s).is_some() {}
    }
    assert_eq!(good.read("/ok").expect("still serving"), b"1");
    assert_eq!(good.reconnects(), 0);
}
