use super::*;

fn req(ty: MsgType, tx: u32, parts: &[&[u8]]) -> Msg {
    let mut p = Vec::new();
    for (i, x) in parts.iter().enumerate() {
        p.extend_from_slice(x);
        if !(ty == MsgType::Write && i == 1) {
            p.push(0);
        }
    }
    Msg::new(ty, 42, tx, p)
}

/// Sends and returns (reply payload or error name, events per connection).
/// A reply (payload or errno name) and the watch events (connection, path, token).
type Answer = (Result<Vec<u8>, String>, Vec<(ConnId, String, String)>);

fn call(s: &mut Store, c: ConnId, m: Msg) -> Answer {
    let out = s.handle(c, &m);
    let (to, reply) = &out.sends[0];
    assert_eq!(*to, c);
    assert_eq!(reply.req_id, 42);
    let r = if reply.ty == MsgType::Error as u32 {
        Err(String::from_utf8_lossy(&reply.payload).trim_end_matches('\0').to_string())
    } else {
        assert_eq!(reply.ty, m.ty);
        Ok(reply.payload.clone())
    };
    let evs = out.sends[1..]
        .iter()
        .map(|(c, m)| {
            assert_eq!(m.ty, MsgType::WatchEvent as u32);
            let parts = wire::split(&m.payload);
            (*c, String::from_utf8_lossy(parts[0]).into_owned(), String::from_utf8_lossy(parts[1]).into_owned())
        })
        .collect();
    (r, evs)
}

fn ok_(s: &mut Store, c: ConnId, m: Msg) {
    assert_eq!(call(s, c, m).0, Ok(b"OK\0".to_vec()));
}

fn err(s: &mut Store, c: ConnId, m: Msg) -> String {
    call(s, c, m).0.expect_err("an error")
}

fn write(s: &mut Store, c: ConnId, path: &str, v: &str) {
    ok_(s, c, req(MsgType::Write, 0, &[path.as_bytes(), v.as_bytes()]));
}

fn read(s: &mut Store, c: ConnId, tx: u32, path: &str) -> Result<Vec<u8>, String> {
    call(s, c, req(MsgType::Read, tx, &[path.as_bytes()])).0
}

#[test]
fn write_read_directory_rm() {
    let mut s = Store::default();
    let c = s.connect(0);
    write(&mut s, c, "/a/b/c", "1");
    write(&mut s, c, "/a/x", "2");
    assert_eq!(read(&mut s, c, 0, "/a/b/c"), Ok(b"1".to_vec()));
    assert_eq!(read(&mut s, c, 0, "/a/b"), Ok(vec![]));
    assert_eq!(call(&mut s, c, req(MsgType::Directory, 0, &[b"/a"])).0, Ok(b"b\0x\0".to_vec()));
    assert_eq!(read(&mut s, c, 0, "/nope"), Err("ENOENT".into()));
    ok_(&mut s, c, req(MsgType::Rm, 0, &[b"/a/b"]));
    assert_eq!(read(&mut s, c, 0, "/a/b/c"), Err("ENOENT".into()));
    // Removing a missing node whose parent exists is fine; without the parent it is ENOENT.
    ok_(&mut s, c, req(MsgType::Rm, 0, &[b"/a/b"]));
    assert_eq!(err(&mut s, c, req(MsgType::Rm, 0, &[b"/a/b/c"])), "ENOENT");
    assert_eq!(err(&mut s, c, req(MsgType::Rm, 0, &[b"/"])), "EINVAL");
    ok_(&mut s, c, req(MsgType::Mkdir, 0, &[b"/a/x"]));
    assert_eq!(read(&mut s, c, 0, "/a/x"), Ok(b"2".to_vec()), "mkdir keeps the value");
    assert_eq!(err(&mut s, c, req(MsgType::Read, 0, &[b"/a//x"])), "EINVAL");
    assert_eq!(err(&mut s, c, req(MsgType::Read, 0, &[b"/a/x/"])), "EINVAL");
    // Relative paths are under the domain's home.
    write(&mut s, c, "rel", "h");
    assert_eq!(read(&mut s, c, 0, "/local/domain/0/rel"), Ok(b"h".to_vec()));
}

#[test]
fn binary_values_and_unknown_types() {
    let mut s = Store::default();
    let c = s.connect(0);
    write(&mut s, c, "/bin", "a\0b\u{ff}");
    assert_eq!(read(&mut s, c, 0, "/bin"), Ok("a\0b\u{ff}".as_bytes().to_vec()));
    let m = Msg { ty: 999, req_id: 42, tx_id: 0, payload: vec![] };
    assert_eq!(call(&mut s, c, m).0, Err("ENOSYS".into()));
    let m = Msg { ty: 20, req_id: 42, tx_id: 0, payload: vec![] };
    assert_eq!(call(&mut s, c, m).0, Err("ENOSYS".into()));
    assert_eq!(err(&mut s, c, req(MsgType::Read, 0, &[&[0xff, 0xfe]])), "EINVAL");
    assert_eq!(err(&mut s, c, Msg::new(MsgType::Read, 42, 0, b"/a".to_vec())), "EINVAL", "missing nul");
}

#[test]
fn permissions() {
    let mut s = Store::default();
    let d0 = s.connect(0);
    let d5 = s.connect(5);
    let d7 = s.connect(7);
    write(&mut s, d0, "/local/domain/5/x", "v");
    assert_eq!(err(&mut s, d5, req(MsgType::Read, 0, &[b"x"])), "EACCES");
    ok_(&mut s, d0, req(MsgType::SetPerms, 0, &[b"/local/domain/5", b"b5", b"r7"]));
    // Nodes below keep their own permissions; the directory is now owned by 5.
    assert_eq!(call(&mut s, d0, req(MsgType::GetPerms, 0, &[b"/local/domain/5"])).0, Ok(b"b5\0r7\0".to_vec()));
    write(&mut s, d5, "y", "mine");
    assert_eq!(call(&mut s, d5, req(MsgType::GetPerms, 0, &[b"y"])).0, Ok(b"b5\0r7\0".to_vec()));
    assert_eq!(read(&mut s, d7, 0, "/local/domain/5/y"), Ok(b"mine".to_vec()));
    assert_eq!(err(&mut s, d7, req(MsgType::Write, 0, &[b"/local/domain/5/y", b"no"])), "EACCES");
    assert_eq!(err(&mut s, d7, req(MsgType::Rm, 0, &[b"/local/domain/5/y"])), "EACCES");
    assert_eq!(err(&mut s, d5, req(MsgType::SetPerms, 0, &[b"y", b"b7"])), "EPERM");
    assert_eq!(err(&mut s, d5, req(MsgType::SetPerms, 0, &[b"y", b"x7"])), "EINVAL");
    assert_eq!(err(&mut s, d5, req(MsgType::Introduce, 0, &[b"9", b"0", b"1"])), "EACCES");
    // SET_TARGET gives 7 the rights of 5.
    ok_(&mut s, d0, req(MsgType::Introduce, 0, &[b"7", b"1", b"2"]));
    ok_(&mut s, d0, req(MsgType::SetTarget, 0, &[b"7", b"5"]));
    write(&mut s, d7, "/local/domain/5/y", "target");
}

#[test]
fn node_quota() {
    let mut s = Store::new(Quota { nodes_per_domain: 3, ..Quota::default() });
    let d0 = s.connect(0);
    let d5 = s.connect(5);
    ok_(&mut s, d0, req(MsgType::Mkdir, 0, &[b"/local/domain/5"]));
    ok_(&mut s, d0, req(MsgType::SetPerms, 0, &[b"/local/domain/5", b"b5"]));
    write(&mut s, d5, "a", "1");
    write(&mut s, d5, "b", "1");
    assert_eq!(err(&mut s, d5, req(MsgType::Write, 0, &[b"c", b"1"])), "ENOSPC");
}

#[test]
fn watches_fire_once_initially_and_on_changes() {
    let mut s = Store::default();
    let a = s.connect(0);
    let b = s.connect(0);
    let (r, evs) = call(&mut s, a, req(MsgType::Watch, 0, &[b"/w", b"tok"]));
    assert_eq!(r, Ok(b"OK\0".to_vec()));
    assert_eq!(evs, vec![(a, "/w".into(), "tok".into())]);
    assert_eq!(err(&mut s, a, req(MsgType::Watch, 0, &[b"/w", b"tok"])), "EEXIST");
    let (_, evs) = call(&mut s, b, req(MsgType::Write, 0, &[b"/w/x/y", b"1"]));
    assert_eq!(evs, vec![(a, "/w/x/y".into(), "tok".into())]);
    let (_, evs) = call(&mut s, b, req(MsgType::Write, 0, &[b"/wx", b"1"]));
    assert!(evs.is_empty(), "/wx is not below /w");
    // A watch below a removed subtree fires with its own path.
    ok_(&mut s, a, req(MsgType::Watch, 0, &[b"/w/x/y/z", b"deep"]));
    let (_, evs) = call(&mut s, b, req(MsgType::Rm, 0, &[b"/w/x"]));
    assert_eq!(evs, vec![(a, "/w/x".into(), "tok".into()), (a, "/w/x/y/z".into(), "deep".into())]);
    ok_(&mut s, a, req(MsgType::Unwatch, 0, &[b"/w", b"tok"]));
    assert_eq!(err(&mut s, a, req(MsgType::Unwatch, 0, &[b"/w", b"tok"])), "ENOENT");
    // Relative watches report relative paths.
    let (_, evs) = call(&mut s, a, req(MsgType::Watch, 0, &[b"home", b"r"]));
    assert_eq!(evs, vec![(a, "home".into(), "r".into())]);
    let (_, evs) = call(&mut s, b, req(MsgType::Write, 0, &[b"/local/domain/0/home/k", b"1"]));
    assert_eq!(evs, vec![(a, "home/k".into(), "r".into())]);
    ok_(&mut s, a, req(MsgType::ResetWatches, 0, &[]));
    let (_, evs) = call(&mut s, b, req(MsgType::Write, 0, &[b"/local/domain/0/home/k", b"2"]));
    assert!(evs.is_empty());
}

#[test]
fn watch_events_respect_permissions_and_quota() {
    let mut s = Store::new(Quota { watches_per_conn: 1, ..Quota::default() });
    let d0 = s.connect(0);
    let d5 = s.connect(5);
    ok_(&mut s, d5, req(MsgType::Watch, 0, &[b"/secret", b"t"]));
    assert_eq!(err(&mut s, d5, req(MsgType::Watch, 0, &[b"/other", b"t"])), "E2BIG");
    let (_, evs) = call(&mut s, d0, req(MsgType::Write, 0, &[b"/secret", b"1"]));
    assert!(evs.is_empty(), "domain 5 cannot read /secret");
}

#[test]
fn special_watches() {
    let mut s = Store::default();
    let a = s.connect(0);
    ok_(&mut s, a, req(MsgType::Watch, 0, &[b"@introduceDomain", b"i"]));
    ok_(&mut s, a, req(MsgType::Watch, 0, &[b"@releaseDomain", b"r"]));
    let (_, evs) = call(&mut s, a, req(MsgType::Introduce, 0, &[b"3", b"100", b"4"]));
    assert_eq!(evs, vec![(a, "@introduceDomain".into(), "i".into())]);
    assert_eq!(call(&mut s, a, req(MsgType::IsDomainIntroduced, 0, &[b"3"])).0, Ok(b"T\0".to_vec()));
    assert_eq!(call(&mut s, a, req(MsgType::IsDomainIntroduced, 0, &[b"4"])).0, Ok(b"F\0".to_vec()));
    assert_eq!(call(&mut s, a, req(MsgType::GetDomainPath, 0, &[b"3"])).0, Ok(b"/local/domain/3\0".to_vec()));
    ok_(&mut s, a, req(MsgType::Resume, 0, &[b"3"]));
    let (_, evs) = call(&mut s, a, req(MsgType::Release, 0, &[b"3"]));
    assert_eq!(evs, vec![(a, "@releaseDomain".into(), "r".into())]);
    assert_eq!(err(&mut s, a, req(MsgType::Release, 0, &[b"3"])), "ENOENT");
    // The API vigil uses when VMs start and stop.
    let out = s.introduce_domain(8);
    assert_eq!(out.mutations, vec![Mutation::Introduce { domid: 8 }]);
    assert_eq!(out.sends.len(), 1);
    assert_eq!(s.release_domain(8).sends.len(), 1);
    assert!(s.release_domain(8).sends.is_empty());
}

fn start(s: &mut Store, c: ConnId) -> u32 {
    let r = call(s, c, req(MsgType::TransactionStart, 0, &[b""])).0.expect("tx start");
    String::from_utf8(r).expect("utf8").trim_end_matches('\0').parse().expect("id")
}

fn end(s: &mut Store, c: ConnId, tx: u32, commit: bool) -> Answer {
    call(s, c, req(MsgType::TransactionEnd, tx, &[if commit { b"T" } else { b"F" }]))
}

#[test]
fn transactions_commit_abort_and_conflict() {
    let mut s = Store::default();
    let a = s.connect(0);
    let b = s.connect(0);
    ok_(&mut s, b, req(MsgType::Watch, 0, &[b"/t", b"w"]));
    write(&mut s, a, "/t/n", "0");
    let tx = start(&mut s, a);
    ok_(&mut s, a, req(MsgType::Write, tx, &[b"/t/n", b"1"]));
    ok_(&mut s, a, req(MsgType::Write, tx, &[b"/t/m/deep", b"2"]));
    assert_eq!(read(&mut s, a, tx, "/t/n"), Ok(b"1".to_vec()));
    assert_eq!(read(&mut s, a, 0, "/t/n"), Ok(b"0".to_vec()), "isolated until commit");
    let (r, evs) = end(&mut s, a, tx, true);
    assert_eq!(r, Ok(b"OK\0".to_vec()));
    assert_eq!(evs.len(), 2, "events fire at commit: {evs:?}");
    assert_eq!(read(&mut s, a, 0, "/t/m/deep"), Ok(b"2".to_vec()));
    // Abort.
    let tx = start(&mut s, a);
    ok_(&mut s, a, req(MsgType::Write, tx, &[b"/t/n", b"lost"]));
    assert!(end(&mut s, a, tx, false).1.is_empty());
    assert_eq!(read(&mut s, a, 0, "/t/n"), Ok(b"1".to_vec()));
    assert_eq!(err(&mut s, a, req(MsgType::Read, tx, &[b"/t/n"])), "ENOENT", "ended tx is gone");
    // Conflict: a read node changed under the transaction.
    let tx = start(&mut s, a);
    assert_eq!(read(&mut s, a, tx, "/t/n"), Ok(b"1".to_vec()));
    ok_(&mut s, a, req(MsgType::Write, tx, &[b"/t/other", b"x"]));
    write(&mut s, b, "/t/n", "concurrent");
    assert_eq!(end(&mut s, a, tx, true).0, Err("EAGAIN".into()));
    assert_eq!(read(&mut s, a, 0, "/t/other"), Err("ENOENT".into()), "nothing of a failed tx applies");
    // No conflict when unrelated nodes change.
    let tx = start(&mut s, a);
    assert_eq!(read(&mut s, a, tx, "/t/n"), Ok(b"concurrent".to_vec()));
    write(&mut s, b, "/elsewhere", "x");
    assert_eq!(end(&mut s, a, tx, true).0, Ok(b"OK\0".to_vec()));
    // A removal inside a transaction conflicts with a concurrent write below it.
    let tx = start(&mut s, a);
    ok_(&mut s, a, req(MsgType::Rm, tx, &[b"/t/m"]));
    write(&mut s, b, "/t/m/deep", "3");
    assert_eq!(end(&mut s, a, tx, true).0, Err("EAGAIN".into()));
    assert_eq!(err(&mut s, a, req(MsgType::TransactionEnd, 999, &[b"T"])), "ENOENT");
    // Xen: an unknown id in the header is ENOENT, a start inside an open one EBUSY.
    assert_eq!(err(&mut s, a, req(MsgType::TransactionStart, 5, &[b""])), "ENOENT");
    let tx = start(&mut s, a);
    assert_eq!(err(&mut s, a, req(MsgType::TransactionStart, tx, &[b""])), "EBUSY");
}

#[test]
fn transaction_quota_and_disconnect() {
    let mut s = Store::new(Quota { transactions_per_conn: 2, ..Quota::default() });
    let a = s.connect(5);
    start(&mut s, a);
    start(&mut s, a);
    assert_eq!(err(&mut s, a, req(MsgType::TransactionStart, 0, &[b""])), "ENOSPC");
    // dom0 is not held to the quota (Xen applies it to unprivileged domains only).
    let d0 = s.connect(0);
    for _ in 0..5 {
        start(&mut s, d0);
    }
    s.disconnect(a);
    assert_eq!(err(&mut s, a, req(MsgType::Read, 0, &[b"/"])), "EINVAL");
}

#[test]
fn directory_part_pages_whole_names() {
    let mut s = Store::default();
    let c = s.connect(0);
    for i in 0..400 {
        ok_(&mut s, c, req(MsgType::Mkdir, 0, &[format!("/big/child-number-{i:04}").as_bytes()]));
    }
    assert_eq!(err(&mut s, c, req(MsgType::Directory, 0, &[b"/big"])), "E2BIG");
    let mut names = Vec::new();
    let mut offset = 0usize;
    loop {
        let r = call(&mut s, c, req(MsgType::DirectoryPart, 0, &[b"/big", offset.to_string().as_bytes()])).0.expect("part");
        assert!(r.len() <= PAYLOAD_MAX);
        let g = r.iter().position(|b| *b == 0).expect("gen");
        let body = &r[g + 1..];
        let done = body.ends_with(&[0, 0]) || body == [0];
        let list = if done { &body[..body.len() - 1] } else { body };
        offset += list.len();
        names.extend(wire::split(list).into_iter().map(|n| String::from_utf8_lossy(n).into_owned()));
        if done {
            break;
        }
    }
    assert_eq!(names.len(), 400);
    assert_eq!(names[399], "child-number-0399");
}

#[test]
fn snapshot_and_mutations_rebuild_the_store() {
    let mut s = Store::default();
    let c = s.connect(0);
    let mut log = Vec::new();
    let mut run = |s: &mut Store, m: Msg| {
        let out = s.handle(c, &m);
        log.extend(out.mutations);
    };
    run(&mut s, req(MsgType::Write, 0, &[b"/a/b", b"1"]));
    run(&mut s, req(MsgType::SetPerms, 0, &[b"/a", b"r3"]));
    run(&mut s, req(MsgType::Introduce, 0, &[b"3", b"1", b"1"]));
    run(&mut s, req(MsgType::Write, 0, &[b"/c", b"x"]));
    run(&mut s, req(MsgType::Rm, 0, &[b"/c"]));
    let mut replayed = Store::default();
    for m in &log {
        let m2 = Mutation::decode(&m.encode()).expect("decodes");
        assert_eq!(&m2, m);
        replayed.apply(&m2).expect("applies");
    }
    let mut from_snap = Store::default();
    for m in s.snapshot() {
        from_snap.apply(&m).expect("applies");
    }
    assert_eq!(replayed.snapshot(), s.snapshot());
    assert_eq!(from_snap.snapshot(), s.snapshot());
    assert!(replayed.is_introduced(3));
}

/// The shared-log path of a front end: a commit that lost its log slot is undone, the other
/// front end's entries are applied (firing this store's watches), and the commit is handled
/// again — validating against the newer state.
#[test]
fn rollback_apply_remote_and_revalidate() {
    let mut s = Store::default();
    let a = s.connect(0);
    let w = s.connect(0);
    write(&mut s, a, "/c", "0");
    ok_(&mut s, w, req(MsgType::Watch, 0, &[b"/c", b"t"]));
    let tx = start(&mut s, a);
    assert_eq!(read(&mut s, a, tx, "/c"), Ok(b"0".to_vec()));
    ok_(&mut s, a, req(MsgType::Write, tx, &[b"/c", b"1"]));
    let commit = req(MsgType::TransactionEnd, tx, &[b"T"]);
    let cp = s.checkpoint(a, &commit).expect("a commit takes a checkpoint");
    assert!(s.checkpoint(a, &req(MsgType::Read, 0, &[b"/c"])).is_none());
    assert!(s.checkpoint(a, &req(MsgType::Write, tx, &[b"/c", b"1"])).is_none(), "writes inside a transaction change nothing durable");
    let out = s.handle(a, &commit);
    assert_eq!(out.mutations.len(), 1);
    // The slot was taken by another front end's write of /c (and of a new /d/e).
    s.rollback(cp);
    assert_eq!(read(&mut s, a, 0, "/c"), Ok(b"0".to_vec()), "undone");
    let remote = vec![
        Mutation::Put { path: "/c".into(), value: b"5".to_vec(), perms: Perms::owned_by(0) },
        Mutation::Put { path: "/c/d".into(), value: vec![], perms: Perms::owned_by(0) },
        Mutation::Put { path: "/c/d/e".into(), value: b"x".to_vec(), perms: Perms::owned_by(0) },
    ];
    let sends = s.apply_remote(&remote).expect("applies");
    let paths: Vec<String> = sends.iter().map(|(_, m)| String::from_utf8_lossy(wire::split(&m.payload)[0]).into_owned()).collect();
    assert_eq!(paths, ["/c", "/c/d/e"], "one event per written node; a created parent fires nothing");
    // Handled again: the transaction read /c, which changed: EAGAIN.
    assert_eq!(call(&mut s, a, commit).0, Err("EAGAIN".into()));
    assert_eq!(read(&mut s, a, 0, "/c"), Ok(b"5".to_vec()));
    // Remote domain changes fire the special watches.
    ok_(&mut s, w, req(MsgType::Watch, 0, &[b"@releaseDomain", b"r"]));
    assert_eq!(s.apply_remote(&[Mutation::Introduce { domid: 4 }]).expect("applies").len(), 0);
    assert_eq!(s.domains(), [4]);
    assert_eq!(s.apply_remote(&[Mutation::Release { domid: 4 }]).expect("applies").len(), 1);
    assert!(s.domains().is_empty());
    // Reload after another front end's compaction: open transactions fail, watches fire once.
    let tx = start(&mut s, a);
    assert_eq!(read(&mut s, a, tx, "/c"), Ok(b"5".to_vec()));
    ok_(&mut s, a, req(MsgType::Write, tx, &[b"/c", b"6"]));
    let snap = s.snapshot();
    let sends =
        s.reload(&[snap, vec![Mutation::Put { path: "/z".into(), value: b"1".to_vec(), perms: Perms::owned_by(0) }]]).expect("reloads");
    assert_eq!(sends.len(), 2, "each watch of w fires once");
    assert_eq!(read(&mut s, a, 0, "/z"), Ok(b"1".to_vec()));
    assert_eq!(read(&mut s, a, 0, "/c/d/e"), Ok(b"x".to_vec()));
    assert_eq!(end(&mut s, a, tx, true).0, Err("EAGAIN".into()));
}

/// Xen 4.17's `write_node`: an unprivileged domain's node record (24-byte header, 8 bytes per
/// permission, value, child names) must stay under `quota_max_entry_size` (2048): `ENOSPC`.
#[test]
fn xen_quotas_node_size_for_unprivileged_domains() {
    let mut s = Store::default();
    let d0 = s.connect(0);
    let d5 = s.connect(5);
    ok_(&mut s, d0, req(MsgType::Mkdir, 0, &[b"/local/domain/5"]));
    ok_(&mut s, d0, req(MsgType::SetPerms, 0, &[b"/local/domain/5", b"b5"]));
    // 24 + 8 + 2015 = 2047 fits; one byte more does not.
    write(&mut s, d5, "v", &"x".repeat(2015));
    assert_eq!(err(&mut s, d5, req(MsgType::Write, 0, &[b"v", "x".repeat(2016).as_bytes()])), "ENOSPC");
    assert_eq!(err(&mut s, d5, req(MsgType::Write, 0, &[b"new", "x".repeat(3000).as_bytes()])), "ENOSPC");
    // dom0 has no such quota.
    write(&mut s, d0, "/local/domain/5/v", &"x".repeat(4000));
}

/// Xen applies the watch and transaction quotas to unprivileged domains only.
#[test]
fn xen_quotas_watch_and_transaction_for_unprivileged_only() {
    let mut s = Store::new(Quota { watches_per_conn: 2, transactions_per_conn: 1, ..Quota::default() });
    let d0 = s.connect(0);
    let d5 = s.connect(5);
    for p in [&b"/a"[..], b"/b", b"/c"] {
        ok_(&mut s, d0, req(MsgType::Watch, 0, &[p, b"t"]));
    }
    ok_(&mut s, d5, req(MsgType::Watch, 0, &[b"/a", b"t"]));
    ok_(&mut s, d5, req(MsgType::Watch, 0, &[b"/b", b"t"]));
    assert_eq!(err(&mut s, d5, req(MsgType::Watch, 0, &[b"/c", b"t"])), "E2BIG");
    start(&mut s, d5);
    assert_eq!(err(&mut s, d5, req(MsgType::TransactionStart, 0, &[b""])), "ENOSPC");
    start(&mut s, d0);
    start(&mut s, d0);
}

mod overlay {
    //! A transaction sees the live tree through an overlay of what it changed: inside one, with
    //! no concurrent change, every read must equal what the same operations give outside a
    //! transaction, and the commit must leave the same tree.
    use super::*;
    use proptest::prelude::*;

    const PATHS: [&str; 9] = ["/a", "/a/b", "/a/b/c", "/a/d", "/e", "/e/f", "/a/b/c/g", "/a/d/h", "/e/f/i"];

    #[derive(Debug, Clone)]
    enum Op {
        Write(usize, u8),
        Mkdir(usize),
        Rm(usize),
        Chmod(usize, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        let p = 0..PATHS.len();
        prop_oneof![
            (p.clone(), any::<u8>()).prop_map(|(i, v)| Op::Write(i, v)),
            p.clone().prop_map(Op::Mkdir),
            p.clone().prop_map(Op::Rm),
            (p, 0..3u8).prop_map(|(i, d)| Op::Chmod(i, d)),
        ]
    }

    fn msg(o: &Op, tx: u32) -> Msg {
        match o {
            Op::Write(i, v) => req(MsgType::Write, tx, &[PATHS[*i].as_bytes(), &[b'a' + v % 26]]),
            Op::Mkdir(i) => req(MsgType::Mkdir, tx, &[PATHS[*i].as_bytes()]),
            Op::Rm(i) => req(MsgType::Rm, tx, &[PATHS[*i].as_bytes()]),
            Op::Chmod(i, d) => req(MsgType::SetPerms, tx, &[PATHS[*i].as_bytes(), format!("b{d}").as_bytes(), b"r9"]),
        }
    }

    /// Every read of every path (and of `/`), as answered in `tx`.
    fn reads(s: &mut Store, c: ConnId, tx: u32) -> Vec<Answer> {
        let mut out = Vec::new();
        for p in PATHS.iter().chain(["/"].iter()) {
            for ty in [MsgType::Read, MsgType::Directory, MsgType::GetPerms] {
                out.push(call(s, c, req(ty, tx, &[p.as_bytes()])));
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
        #[test]
        fn transaction_view_equals_direct_application(setup in proptest::collection::vec(op(), 0..12), ops in proptest::collection::vec(op(), 1..20)) {
            let mut a = Store::default();
            let mut b = Store::default();
            let ca = a.connect(0);
            let cb = b.connect(0);
            for o in &setup {
                let (ra, _) = call(&mut a, ca, msg(o, 0));
                let (rb, _) = call(&mut b, cb, msg(o, 0));
                prop_assert_eq!(ra, rb);
            }
            let tx = start(&mut a, ca);
            for o in &ops {
                let ra = call(&mut a, ca, msg(o, tx)).0;
                let rb = call(&mut b, cb, msg(o, 0)).0;
                prop_assert_eq!(ra, rb, "{:?}", o);
                let va: Vec<_> = reads(&mut a, ca, tx).into_iter().map(|x| x.0).collect();
                let vb: Vec<_> = reads(&mut b, cb, 0).into_iter().map(|x| x.0).collect();
                prop_assert_eq!(va, vb);
            }
            prop_assert_eq!(end(&mut a, ca, tx, true).0, Ok(b"OK\0".to_vec()));
            prop_assert_eq!(a.snapshot(), b.snapshot());
            prop_assert_eq!(a.len(), b.len());
        }
    }
}
