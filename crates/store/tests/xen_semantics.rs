//! The semantic differences from Xen listed in issue 14 (item 6), each as a request on a real
//! socket with the answer Xen gives. The expected answers come from Xen 4.17.2's C xenstored
//! (the version of Debian's xenstore-utils; `tools/xenstore/` in the Xen tree) — the function
//! that decides each is named beside it. Socket clients are dom0, as in Xen; the rows about
//! unprivileged domains are tested on the state machine (`state::tests::xen_quotas_*`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;
use store::wire::{decode, Msg, MsgType};

mod common;

fn start(name: &str) -> PathBuf {
    common::start("xensem", name)
}

struct Conn {
    s: UnixStream,
    buf: Vec<u8>,
    req: u32,
}

impl Conn {
    fn open(sock: &PathBuf) -> Conn {
        let s = UnixStream::connect(sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        Conn { s, buf: Vec::new(), req: 0 }
    }

    /// Sends one request and returns its reply (watch events are skipped): `Ok(payload)` or
    /// `Err(errno name)`.
    fn call(&mut self, ty: u32, tx_id: u32, payload: &[u8]) -> Result<Vec<u8>, String> {
        self.req += 1;
        let req_id = self.req;
        self.s.write_all(&Msg { ty, req_id, tx_id, payload: payload.to_vec() }.encode()).expect("send");
        loop {
            while let Ok(Some((m, n))) = decode(&self.buf) {
                self.buf.drain(..n);
                if m.ty == MsgType::WatchEvent as u32 {
                    continue;
                }
                assert_eq!(m.req_id, req_id);
                return if m.ty == MsgType::Error as u32 {
                    Err(String::from_utf8_lossy(&m.payload).trim_end_matches('\0').to_string())
                } else {
                    assert_eq!(m.ty, ty);
                    Ok(m.payload)
                };
            }
            let mut chunk = [0u8; 8192];
            let n = self.s.read(&mut chunk).expect("reply");
            assert!(n > 0, "the server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn write(&mut self, path: &str, value: &[u8]) -> Result<Vec<u8>, String> {
        let mut p = format!("{path}\0").into_bytes();
        p.extend_from_slice(value);
        self.call(MsgType::Write as u32, 0, &p)
    }
}

fn args(parts: &[&str]) -> Vec<u8> {
    parts.iter().flat_map(|p| format!("{p}\0").into_bytes()).collect()
}

const OK: Result<&[u8], &str> = Ok(b"OK\0");

fn same(got: Result<Vec<u8>, String>, want: Result<&[u8], &str>) {
    assert_eq!(got.as_ref().map(Vec::as_slice).map_err(String::as_str), want);
}

/// `is_valid_nodename` requires a leading `/` after `canonicalize` left `@...` as it is:
/// special names are for watches only.
#[test]
fn write_of_special_names_is_einval() {
    let sock = start("special");
    let mut c = Conn::open(&sock);
    for p in ["@foo", "@releaseDomain", "@introduceDomain"] {
        same(c.write(p, b"x"), Err("EINVAL"));
        same(c.call(MsgType::Mkdir as u32, 0, &args(&[p])), Err("EINVAL"));
        same(c.call(MsgType::Read as u32, 0, &args(&[p])), Err("EINVAL"));
    }
    same(c.call(MsgType::Read as u32, 0, &args(&["/local/domain/0/@foo"])), Err("ENOENT"));
    same(c.call(MsgType::Watch as u32, 0, &args(&["@releaseDomain", "t"])), OK);
}

/// `do_watch` / `do_unwatch` compare the canonical path: a relative path and the absolute path
/// it stands for are the same watch.
#[test]
fn watch_paths_compare_canonically() {
    let sock = start("watch");
    let mut c = Conn::open(&sock);
    same(c.call(MsgType::Watch as u32, 0, &args(&["x", "t"])), OK);
    same(c.call(MsgType::Watch as u32, 0, &args(&["/local/domain/0/x", "t"])), Err("EEXIST"));
    same(c.call(MsgType::Watch as u32, 0, &args(&["/local/domain/0/x", "other"])), OK);
    same(c.call(MsgType::Unwatch as u32, 0, &args(&["/local/domain/0/x", "t"])), OK);
    same(c.call(MsgType::Unwatch as u32, 0, &args(&["x", "t"])), Err("ENOENT"));
    same(c.call(MsgType::Unwatch as u32, 0, &args(&["x", "other"])), OK);
}

/// `domain_watch` counts 0 for a privileged connection and `do_transaction_start` checks the
/// quota only `if (domain_is_unprivileged(conn) && ...)`: dom0 has no such quotas.
#[test]
fn dom0_is_not_held_to_watch_and_transaction_quotas() {
    let sock = start("quota");
    let mut c = Conn::open(&sock);
    for i in 0..200 {
        same(c.call(MsgType::Watch as u32, 0, &args(&[&format!("/w{i}"), "t"])), OK);
    }
    for _ in 0..30 {
        let id = c.call(MsgType::TransactionStart as u32, 0, b"\0").expect("dom0 starts a transaction beyond 10");
        assert!(id.ends_with(b"\0"));
    }
}

/// `process_message`: a type without a handler — unknown, the removed `XS_RESTRICT` (20),
/// `XS_WATCH_EVENT` and `XS_ERROR` sent by a client, and the 4.18 feature/quota calls — is
/// `ENOSYS`. The connection stays usable.
#[test]
fn unknown_types_are_enosys() {
    let sock = start("enosys");
    let mut c = Conn::open(&sock);
    for ty in [15u32, 16, 20, 23, 24, 25, 26, 999, u32::MAX] {
        same(c.call(ty, 0, b"x\0"), Err("ENOSYS"));
    }
    same(c.write("/still", b"ok"), OK);
}

/// `is_valid_nodename`: `strlen(node) > local_off + quota_max_path_len` is invalid, where the
/// limit is `XENSTORE_REL_PATH_MAX` (2048) and `local_off` the length of a
/// `/local/domain/<id>/` prefix.
#[test]
fn path_length_limit_is_xen_4_17s() {
    let sock = start("pathlen");
    let mut c = Conn::open(&sock);
    let name = |len: usize| format!("/{}", "a".repeat(len - 1));
    same(c.write(&name(2048), b""), OK);
    same(c.write(&name(2049), b""), Err("EINVAL"));
    same(c.write(&name(3072), b""), Err("EINVAL"));
    same(c.call(MsgType::Read as u32, 0, &args(&[&name(2049)])), Err("EINVAL"));
    let home = "/local/domain/3/";
    same(c.write(&format!("{home}{}", "b".repeat(2048)), b""), OK);
    same(c.write(&format!("{home}{}", "b".repeat(2049)), b""), Err("EINVAL"));
    same(c.write(&"c".repeat(2048), b""), OK);
}

/// `process_message` looks the transaction up first (`transaction_lookup`: unknown id is
/// `ENOENT`), and `do_transaction_start` refuses a nested one (`EBUSY`).
#[test]
fn transaction_ids_in_the_header() {
    let sock = start("txid");
    let mut c = Conn::open(&sock);
    same(c.call(MsgType::TransactionStart as u32, 4242, b"\0"), Err("ENOENT"));
    let id = c.call(MsgType::TransactionStart as u32, 0, b"\0").expect("start");
    let id: u32 = String::from_utf8_lossy(&id).trim_end_matches('\0').parse().expect("id");
    same(c.call(MsgType::TransactionStart as u32, id, b"\0"), Err("EBUSY"));
    same(c.call(MsgType::GetDomainPath as u32, 4242, &args(&["3"])), Err("ENOENT"));
    same(c.call(MsgType::Read as u32, 4242, &args(&["/"])), Err("ENOENT"));
    // WATCH ignores the transaction id (XS_FLAG_NOTID).
    same(c.call(MsgType::Watch as u32, 4242, &args(&["/x", "t"])), OK);
}

/// `do_introduce`: `if (port <= 0) return EINVAL;`.
#[test]
fn introduce_with_port_0_is_einval() {
    let sock = start("introduce");
    let mut c = Conn::open(&sock);
    same(c.call(MsgType::Introduce as u32, 0, &args(&["5", "1234", "0"])), Err("EINVAL"));
    same(c.call(MsgType::IsDomainIntroduced as u32, 0, &args(&["5"])), Ok(b"F\0"));
    same(c.call(MsgType::Introduce as u32, 0, &args(&["5", "1234", "7"])), OK);
    same(c.call(MsgType::IsDomainIntroduced as u32, 0, &args(&["5"])), Ok(b"T\0"));
}

/// `write_node` checks `quota_max_entry_size` only `if (domain_is_unprivileged(conn))`: dom0
/// may write values up to the payload limit.
#[test]
fn dom0_values_have_no_size_quota() {
    let sock = start("size");
    let mut c = Conn::open(&sock);
    same(c.write("/big", &[b'v'; 4000]), OK);
    assert_eq!(c.call(MsgType::Read as u32, 0, &args(&["/big"])).expect("read").len(), 4000);
}
