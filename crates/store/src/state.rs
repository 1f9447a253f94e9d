//! XenStore semantics as a pure state machine: no sockets, no files, no clocks.
//!
//! A driver calls [`Store::connect`] per client, feeds each request to [`Store::handle`], and
//! gets an [`Output`]: messages to send (the reply and watch events, possibly to other
//! connections) and [`Mutation`]s. The driver must make the mutations durable *before* it sends
//! anything, so that nothing is acknowledged that a crash could lose. [`Store::apply`] replays
//! mutations (recovery), and [`Store::snapshot`] lists the mutations that rebuild the current
//! state (compaction).
//!
//! Transactions are optimistic and copy on touch, as xenstored's: `TRANSACTION_START` copies
//! nothing; operations in the transaction see the live tree through an overlay of the nodes the
//! transaction changed, and record the generation of every node they look at; at
//! `TRANSACTION_END T` the transaction commits only if none of those nodes changed since
//! (otherwise `EAGAIN`), and its mutations are then applied to the live tree as one batch.

use crate::path::{self, canonical, is_child};
use crate::perms::{Access, Perm, Perms};
use crate::wire::{self, Msg, MsgType, PAYLOAD_MAX};
use std::collections::BTreeMap;
use std::fmt;
use tree::{NodeRef, Overlay, Tree, View};

/// A Xen domain id; 0 is the privileged control domain (every socket client is dom0).
pub type DomId = u32;
/// A connection, as numbered by [`Store::connect`].
pub type ConnId = u64;

/// The errno names XenStore sends in `XS_ERROR` replies (`xsd_errors` in `xs_wire.h`).
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    EINVAL,
    EACCES,
    EEXIST,
    EISDIR,
    ENOENT,
    ENOMEM,
    ENOSPC,
    EIO,
    ENOTEMPTY,
    ENOSYS,
    EROFS,
    EBUSY,
    EAGAIN,
    EISCONN,
    E2BIG,
    EPERM,
}

const ERRNOS: [Errno; 16] = [
    Errno::EINVAL,
    Errno::EACCES,
    Errno::EEXIST,
    Errno::EISDIR,
    Errno::ENOENT,
    Errno::ENOMEM,
    Errno::ENOSPC,
    Errno::EIO,
    Errno::ENOTEMPTY,
    Errno::ENOSYS,
    Errno::EROFS,
    Errno::EBUSY,
    Errno::EAGAIN,
    Errno::EISCONN,
    Errno::E2BIG,
    Errno::EPERM,
];

impl Errno {
    pub fn name(self) -> &'static str {
        match self {
            Errno::EINVAL => "EINVAL",
            Errno::EACCES => "EACCES",
            Errno::EEXIST => "EEXIST",
            Errno::EISDIR => "EISDIR",
            Errno::ENOENT => "ENOENT",
            Errno::ENOMEM => "ENOMEM",
            Errno::ENOSPC => "ENOSPC",
            Errno::EIO => "EIO",
            Errno::ENOTEMPTY => "ENOTEMPTY",
            Errno::ENOSYS => "ENOSYS",
            Errno::EROFS => "EROFS",
            Errno::EBUSY => "EBUSY",
            Errno::EAGAIN => "EAGAIN",
            Errno::EISCONN => "EISCONN",
            Errno::E2BIG => "E2BIG",
            Errno::EPERM => "EPERM",
        }
    }

    pub fn from_name(s: &str) -> Option<Errno> {
        ERRNOS.into_iter().find(|e| e.name() == s)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A durable change of state. Replaying the mutations of every acknowledged request, in order,
/// rebuilds the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Create or overwrite a node (its parent exists).
    Put { path: String, value: Vec<u8>, perms: Perms },
    /// Remove a node and everything below it.
    DelTree { path: String },
    /// A domain was introduced.
    Introduce { domid: DomId },
    /// A domain was released.
    Release { domid: DomId },
    /// `domid` acts with the rights of `target`.
    Target { domid: DomId, target: DomId },
}

impl Mutation {
    /// Byte form used by the log.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Mutation::Put { path, value, perms } => {
                let mut v = format!("P{path}\0{}\0", perms.to_text()).into_bytes();
                v.extend_from_slice(value);
                v
            }
            Mutation::DelTree { path } => format!("D{path}").into_bytes(),
            Mutation::Introduce { domid } => format!("I{domid}").into_bytes(),
            Mutation::Release { domid } => format!("R{domid}").into_bytes(),
            Mutation::Target { domid, target } => format!("T{domid}\0{target}").into_bytes(),
        }
    }

    /// Inverse of [`Mutation::encode`]; `None` if the bytes are not a mutation.
    pub fn decode(b: &[u8]) -> Option<Mutation> {
        let (&tag, rest) = b.split_first()?;
        let text = |x: &[u8]| std::str::from_utf8(x).ok().map(str::to_string);
        let num = |x: &[u8]| std::str::from_utf8(x).ok()?.parse::<DomId>().ok();
        match tag {
            b'P' => {
                let mut it = rest.splitn(3, |c| *c == 0);
                let path = text(it.next()?)?;
                let perms = Perms::from_text(&text(it.next()?)?).ok()?;
                let value = it.next()?.to_vec();
                Some(Mutation::Put { path, value, perms })
            }
            b'D' => Some(Mutation::DelTree { path: text(rest)? }),
            b'I' => Some(Mutation::Introduce { domid: num(rest)? }),
            b'R' => Some(Mutation::Release { domid: num(rest)? }),
            b'T' => {
                let mut it = rest.splitn(2, |c| *c == 0);
                Some(Mutation::Target { domid: num(it.next()?)?, target: num(it.next()?)? })
            }
            _ => None,
        }
    }
}

/// Limits per domain/connection (the defaults of Xen's C xenstored).
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    /// Nodes an unprivileged domain may own (`ENOSPC` beyond).
    pub nodes_per_domain: usize,
    /// Watches per connection (`E2BIG` beyond).
    pub watches_per_conn: usize,
    /// Open transactions per connection (`ENOSPC` beyond).
    pub transactions_per_conn: usize,
    /// Size of a node's record (value, permissions and child names, as xenstored 4.17 counts
    /// them) an unprivileged domain may write (`ENOSPC` at or beyond).
    pub node_size: usize,
}

/// A node's size as xenstored 4.17 stores it: a 24-byte header, 8 bytes per permission, the
/// value, and the children's names with their nuls.
fn record_size(value: usize, perms: &Perms, children: usize) -> usize {
    24 + 8 * perms.entries().len() + value + children
}

impl Default for Quota {
    fn default() -> Self {
        Quota { nodes_per_domain: 1000, watches_per_conn: 128, transactions_per_conn: 10, node_size: 2048 }
    }
}

/// What the driver must do after a request.
#[derive(Debug, Default)]
pub struct Output {
    /// Mutations to make durable before sending anything.
    pub mutations: Vec<Mutation>,
    /// Messages to send, in order: the reply first, then watch events.
    pub sends: Vec<(ConnId, Msg)>,
}

/// A change that may fire watches.
#[derive(Debug, Clone)]
struct Event {
    path: String,
    /// A removal: watches below `path` fire too (with their own path).
    recursive: bool,
    /// Permissions of the node (before removal), to decide who may see the event.
    perms: Option<Perms>,
}

#[derive(Debug, Clone)]
struct Watch {
    /// As the client sent it (relative, absolute or `@special`).
    raw: String,
    /// Canonical absolute path, or the special name.
    abs: String,
    token: String,
}

#[derive(Debug, Clone)]
struct Tx {
    overlay: Overlay,
    mutations: Vec<Mutation>,
    events: Vec<Event>,
}

#[derive(Debug)]
struct Conn {
    domid: DomId,
    watches: Vec<Watch>,
    txs: BTreeMap<u32, Tx>,
}

/// The tree and the domains at one moment ([`Store::freeze`]).
pub struct Frozen {
    tree: Tree,
}

impl Frozen {
    /// The mutations that rebuild it, as [`Store::snapshot_iter`].
    pub fn mutations(&self) -> impl Iterator<Item = Mutation> + '_ {
        tree_mutations(&self.tree)
    }
}

fn tree_mutations(tree: &Tree) -> impl Iterator<Item = Mutation> + '_ {
    let domains = tree.domains.iter().flat_map(|(&domid, &target)| {
        std::iter::once(Mutation::Introduce { domid }).chain(target.map(|target| Mutation::Target { domid, target }))
    });
    tree.puts().chain(domains)
}

/// The whole store: the tree, the domains, and per-connection watches and transactions.
#[derive(Debug)]
pub struct Store {
    tree: Tree,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    next_tx: u32,
    quota: Quota,
}

/// The state before a request, to undo it ([`Store::checkpoint`], [`Store::rollback`]).
#[derive(Debug)]
pub struct Checkpoint {
    tree: Tree,
    tx: Option<(ConnId, u32, Tx)>,
}

/// One operation's view: either the live tree, or a transaction's overlay with its read set.
struct Ctx<'a> {
    view: View<'a>,
    mutations: &'a mut Vec<Mutation>,
    events: &'a mut Vec<Event>,
    domid: DomId,
    target: Option<DomId>,
    quota: Quota,
}

/// What an operation needs to know of a node before it changes anything.
struct Info {
    perms: Perms,
    value: Vec<u8>,
}

impl Ctx<'_> {
    fn touch(&mut self, path: &str) {
        self.view.touch(path);
    }

    /// The node at `path` in this view (recording that the operation looked at it).
    fn node(&mut self, path: &str) -> Option<Info> {
        self.view.touch(path);
        self.view.get(path).map(|n| Info { perms: n.perms().clone(), value: n.value().to_vec() })
    }

    fn exists(&mut self, path: &str) -> bool {
        self.view.touch(path);
        self.view.get(path).is_some()
    }

    fn access(&self, perms: &Perms) -> Access {
        perms.access(self.domid, self.target)
    }

    /// Checks that `path` exists and may be read; then `self.view.get(path)` has it.
    fn readable(&mut self, path: &str) -> Result<NodeRef<'_>, Errno> {
        self.view.touch(path);
        let n = self.view.get(path).ok_or(Errno::ENOENT)?;
        if n.perms().access(self.domid, self.target).can_read() {
            Ok(n)
        } else {
            Err(Errno::EACCES)
        }
    }

    /// Bytes of the child names of `path` with their nuls (for the node size quota).
    fn children_bytes(&self, path: &str) -> usize {
        self.view.get(path).map_or(0, NodeRef::children_bytes)
    }

    fn record(&mut self, m: Mutation) -> Result<(), Errno> {
        self.view.apply(&m).map_err(|_| Errno::EINVAL)?;
        self.mutations.push(m);
        Ok(())
    }

    /// WRITE (`value` is `Some`) or MKDIR (`None`).
    fn write(&mut self, path: &str, value: Option<Vec<u8>>) -> Result<(), Errno> {
        if let Some(n) = self.node(path) {
            let Some(value) = value else { return Ok(()) };
            if !self.access(&n.perms).can_write() {
                return Err(Errno::EACCES);
            }
            if self.domid != 0 && record_size(value.len(), &n.perms, self.children_bytes(path)) >= self.quota.node_size {
                return Err(Errno::ENOSPC);
            }
            self.record(Mutation::Put { path: path.to_string(), value, perms: n.perms.clone() })?;
            self.events.push(Event { path: path.to_string(), recursive: false, perms: Some(n.perms) });
            return Ok(());
        }
        // Create the node and its missing parents, inheriting the nearest existing ancestor's
        // permissions (owned by the creator when unprivileged).
        let mut missing = vec![path.to_string()];
        let mut anc = path::parent(path).ok_or(Errno::EINVAL)?.to_string();
        let anc_node = loop {
            match self.node(&anc) {
                Some(n) => break n,
                None => {
                    missing.push(anc.clone());
                    anc = path::parent(&anc).ok_or(Errno::EINVAL)?.to_string();
                }
            }
        };
        if !self.access(&anc_node.perms).can_write() {
            return Err(Errno::EACCES);
        }
        let perms = if self.domid == 0 { anc_node.perms.clone() } else { anc_node.perms.with_owner(self.domid) };
        if self.domid != 0 {
            if self.view.owned(self.domid) + missing.len() > self.quota.nodes_per_domain {
                return Err(Errno::ENOSPC);
            }
            let value_len = value.as_ref().map_or(0, Vec::len);
            let top = missing.last().map(|p| path::leaf(p).len() + 1).unwrap_or(0);
            let anc_children = self.children_bytes(&anc);
            if record_size(value_len, &perms, 0) >= self.quota.node_size
                || record_size(anc_node.value.len(), &anc_node.perms, anc_children + top) >= self.quota.node_size
            {
                return Err(Errno::ENOSPC);
            }
        }
        let mut value = value.unwrap_or_default();
        for p in missing.iter().rev() {
            let v = if p == path { std::mem::take(&mut value) } else { Vec::new() };
            self.record(Mutation::Put { path: p.clone(), value: v, perms: perms.clone() })?;
        }
        self.events.push(Event { path: path.to_string(), recursive: false, perms: Some(perms) });
        Ok(())
    }

    fn rm(&mut self, path: &str) -> Result<(), Errno> {
        let parent = path::parent(path).ok_or(Errno::EINVAL)?.to_string();
        let Some(n) = self.node(path) else {
            return if self.exists(&parent) { Ok(()) } else { Err(Errno::ENOENT) };
        };
        if !self.access(&n.perms).can_write() {
            return Err(Errno::EACCES);
        }
        self.touch(&parent);
        if matches!(self.view, View::Tx(..)) {
            for p in self.view.subtree(path) {
                self.touch(&p);
            }
        }
        self.record(Mutation::DelTree { path: path.to_string() })?;
        self.events.push(Event { path: path.to_string(), recursive: true, perms: Some(n.perms) });
        Ok(())
    }

    fn set_perms(&mut self, path: &str, perms: Perms) -> Result<(), Errno> {
        let n = self.node(path).ok_or(Errno::ENOENT)?;
        if !self.access(&n.perms).can_write() {
            return Err(Errno::EACCES);
        }
        if self.domid != 0 && perms.owner() != n.perms.owner() {
            return Err(Errno::EPERM);
        }
        self.record(Mutation::Put { path: path.to_string(), value: n.value, perms: perms.clone() })?;
        self.events.push(Event { path: path.to_string(), recursive: false, perms: Some(perms) });
        Ok(())
    }
}

fn ok() -> Vec<u8> {
    b"OK\0".to_vec()
}

fn utf8(b: &[u8]) -> Result<&str, Errno> {
    std::str::from_utf8(b).map_err(|_| Errno::EINVAL)
}

fn domid_arg(b: &[u8]) -> Result<DomId, Errno> {
    let s = utf8(b)?;
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return Err(Errno::EINVAL);
    }
    s.parse::<DomId>().ok().filter(|d| *d <= 0xffff).ok_or(Errno::EINVAL)
}

/// The single nul-terminated string argument of a request.
fn one_arg(payload: &[u8]) -> Result<&str, Errno> {
    match payload.split_last() {
        Some((0, body)) if !body.contains(&0) => utf8(body),
        _ => Err(Errno::EINVAL),
    }
}

impl Default for Store {
    fn default() -> Self {
        Store::new(Quota::default())
    }
}

impl Store {
    pub fn new(quota: Quota) -> Store {
        Store { tree: Tree::new(), conns: BTreeMap::new(), next_conn: 1, next_tx: 1, quota }
    }

    /// Replays one mutation (recovery). `Err` names what did not fit.
    pub fn apply(&mut self, m: &Mutation) -> Result<(), String> {
        self.tree.apply(m)
    }

    /// Mutations that rebuild the current tree and domains from an empty store.
    pub fn snapshot(&self) -> Vec<Mutation> {
        self.snapshot_iter().collect()
    }

    /// [`Store::snapshot`], one mutation at a time (compaction writes them as they come).
    pub fn snapshot_iter(&self) -> impl Iterator<Item = Mutation> + '_ {
        tree_mutations(&self.tree)
    }

    /// A copy of the tree and the domains as they are now, to write a snapshot from without
    /// holding the store (the server's syncer thread compacts the log this way).
    pub fn freeze(&self) -> Frozen {
        Frozen { tree: self.tree.clone() }
    }

    /// Number of nodes (including `/`).
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Value of a node, for tests and local inspection (no permission check).
    pub fn value(&self, path: &str) -> Option<&[u8]> {
        self.tree.get(path).map(|n| n.value.as_slice())
    }

    /// A new connection of domain `domid` (0 for socket clients).
    pub fn connect(&mut self, domid: DomId) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(id, Conn { domid, watches: Vec::new(), txs: BTreeMap::new() });
        id
    }

    /// Forgets a connection: its watches and open transactions (aborted).
    pub fn disconnect(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
    }

    /// One event per watch of `conn`, each with the watch's own path (as when it was set): what
    /// a driver sends after it had to drop events for `conn`, so that the watcher re-reads.
    pub fn watch_resync(&self, conn: ConnId) -> Vec<Msg> {
        let Some(c) = self.conns.get(&conn) else { return Vec::new() };
        c.watches.iter().map(|w| watch_event(c.domid, w, &w.abs)).collect()
    }

    /// Whether domain `domid` is introduced.
    pub fn is_introduced(&self, domid: DomId) -> bool {
        domid == 0 || self.tree.domains.contains_key(&domid)
    }

    /// What [`Store::rollback`] needs to undo a request that mutates: the tree, and for a
    /// `TRANSACTION_END` the transaction itself. `None` for requests that change nothing
    /// durable (reads, watches, `TRANSACTION_START`), which need no undo. Costs a copy of the
    /// tree (O(nodes)); only a front end sharing its log with others takes one.
    pub fn checkpoint(&self, conn: ConnId, msg: &Msg) -> Option<Checkpoint> {
        use MsgType as T;
        match MsgType::from_u32(msg.ty)? {
            T::Write | T::Mkdir | T::Rm | T::SetPerms if msg.tx_id != 0 => None,
            T::Write | T::Mkdir | T::Rm | T::SetPerms | T::Introduce | T::Release | T::SetTarget => {
                Some(Checkpoint { tree: self.tree.clone(), tx: None })
            }
            T::TransactionEnd => {
                let tx = self.conns.get(&conn).and_then(|c| c.txs.get(&msg.tx_id)).cloned();
                Some(Checkpoint { tree: self.tree.clone(), tx: tx.map(|t| (conn, msg.tx_id, t)) })
            }
            _ => None,
        }
    }

    /// A checkpoint of the tree alone (before an internal change such as [`Store::release_domain`]).
    pub fn checkpoint_tree(&self) -> Checkpoint {
        Checkpoint { tree: self.tree.clone(), tx: None }
    }

    /// Undoes everything since `cp` was taken: the request's mutations were not made durable
    /// (another front end took the log slot), so it will be handled again after catching up.
    pub fn rollback(&mut self, cp: Checkpoint) {
        self.tree = cp.tree;
        if let Some((conn, id, tx)) = cp.tx {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.txs.insert(id, tx);
            }
        }
    }

    /// Applies a batch that another front end appended to the shared log and returns the watch
    /// events it causes for this store's connections. Events are derived from the mutations:
    /// one per node written (a node created only as the missing parent of another node of the
    /// batch fires nothing), one per removed subtree, `@introduceDomain` / `@releaseDomain`.
    pub fn apply_remote(&mut self, batch: &[Mutation]) -> Result<Vec<(ConnId, Msg)>, String> {
        let mut events = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            match m {
                Mutation::Put { path, perms, .. } => {
                    let created = self.tree.get(path).is_none();
                    let parent_of_later =
                        batch[i + 1..].iter().any(|n| matches!(n, Mutation::Put { path: q, .. } if path::parent(q) == Some(path.as_str())));
                    if !(created && parent_of_later) {
                        events.push(Event { path: path.clone(), recursive: false, perms: Some(perms.clone()) });
                    }
                }
                Mutation::DelTree { path } => {
                    let perms = self.tree.get(path).map(|n| n.perms.clone());
                    events.push(Event { path: path.clone(), recursive: true, perms });
                }
                Mutation::Introduce { domid } if !self.tree.domains.contains_key(domid) => {
                    events.push(Event { path: "@introduceDomain".into(), recursive: false, perms: None });
                }
                Mutation::Release { domid } if self.tree.domains.contains_key(domid) => {
                    events.push(Event { path: "@releaseDomain".into(), recursive: false, perms: None });
                }
                _ => {}
            }
            self.tree.apply(m)?;
        }
        let mut sends = Vec::new();
        self.fire(&events, &mut sends);
        Ok(sends)
    }

    /// Replaces the tree with the one `batches` rebuild (another front end compacted log
    /// entries this store had not applied). Connections, watches and open transactions stay:
    /// every node gets a newer generation, so an open transaction that looked at any existing
    /// node fails with `EAGAIN`, and every watch fires once with its own path, as after a
    /// reconnect, so that watchers re-read.
    pub fn reload(&mut self, batches: &[Vec<Mutation>]) -> Result<Vec<(ConnId, Msg)>, String> {
        let mut tree = Tree::new();
        tree.gen = self.tree.gen;
        for m in batches.iter().flatten() {
            tree.apply(m)?;
        }
        let gen = tree.bump();
        tree.touch_root(gen);
        self.tree = tree;
        let mut sends = Vec::new();
        for (&id, c) in &self.conns {
            for w in &c.watches {
                sends.push((id, watch_event(c.domid, w, &w.abs)));
            }
        }
        Ok(sends)
    }

    /// Domains introduced so far (dom0 excluded).
    pub fn domains(&self) -> Vec<DomId> {
        self.tree.domains.keys().copied().collect()
    }

    /// vigil's hook when a VM starts: introduces the domain and fires `@introduceDomain`.
    pub fn introduce_domain(&mut self, domid: DomId) -> Output {
        let mut out = Output::default();
        if domid != 0 && !self.tree.domains.contains_key(&domid) {
            let m = Mutation::Introduce { domid };
            let _ = self.tree.apply(&m);
            out.mutations.push(m);
            self.fire(&[Event { path: "@introduceDomain".into(), recursive: false, perms: None }], &mut out.sends);
        }
        out
    }

    /// vigil's hook when a VM stops: releases the domain and fires `@releaseDomain`.
    pub fn release_domain(&mut self, domid: DomId) -> Output {
        let mut out = Output::default();
        if self.tree.domains.contains_key(&domid) {
            let m = Mutation::Release { domid };
            let _ = self.tree.apply(&m);
            out.mutations.push(m);
            self.fire(&[Event { path: "@releaseDomain".into(), recursive: false, perms: None }], &mut out.sends);
        }
        out
    }

    /// Handles one request of `conn`. Never panics, whatever the message.
    pub fn handle(&mut self, conn: ConnId, msg: &Msg) -> Output {
        let mut out = Output::default();
        let mut events = Vec::new();
        let mut after = Vec::new();
        let reply = match self.dispatch(conn, msg, &mut out.mutations, &mut events, &mut after) {
            Ok(payload) => Msg { ty: msg.ty, req_id: msg.req_id, tx_id: msg.tx_id, payload },
            Err(e) => Msg::new(MsgType::Error, msg.req_id, msg.tx_id, wire::strings(&[e.name()])),
        };
        if reply.payload.len() > PAYLOAD_MAX {
            let e = Msg::new(MsgType::Error, msg.req_id, msg.tx_id, wire::strings(&[Errno::E2BIG.name()]));
            out.sends.push((conn, e));
        } else {
            out.sends.push((conn, reply));
        }
        out.sends.extend(after);
        self.fire(&events, &mut out.sends);
        out
    }

    fn fire(&self, events: &[Event], sends: &mut Vec<(ConnId, Msg)>) {
        for ev in events {
            for (&id, c) in &self.conns {
                let target = self.tree.domains.get(&c.domid).copied().flatten();
                if let Some(p) = &ev.perms {
                    if !p.access(c.domid, target).can_read() {
                        continue;
                    }
                }
                for w in &c.watches {
                    let hit = if path::is_special(&ev.path) {
                        (w.abs == ev.path).then(|| ev.path.clone())
                    } else if is_child(&ev.path, &w.abs) {
                        Some(ev.path.clone())
                    } else if ev.recursive && is_child(&w.abs, &ev.path) {
                        Some(w.abs.clone())
                    } else {
                        None
                    };
                    if let Some(p) = hit {
                        sends.push((id, watch_event(c.domid, w, &p)));
                    }
                }
            }
        }
    }

    fn dispatch(
        &mut self,
        conn: ConnId,
        msg: &Msg,
        mutations: &mut Vec<Mutation>,
        events: &mut Vec<Event>,
        after: &mut Vec<(ConnId, Msg)>,
    ) -> Result<Vec<u8>, Errno> {
        // Xen: types it has no handler for (WATCH_EVENT and ERROR included) get ENOSYS.
        let ty = MsgType::from_u32(msg.ty).filter(|t| !matches!(t, MsgType::WatchEvent | MsgType::Error)).ok_or(Errno::ENOSYS)?;
        let quota = self.quota;
        let c = self.conns.get_mut(&conn).ok_or(Errno::EINVAL)?;
        let domid = c.domid;
        let target = self.tree.domains.get(&domid).copied().flatten();
        let privileged = domid == 0;
        // Xen looks the transaction up for every type but WATCH and UNWATCH: an unknown id is
        // ENOENT (TRANSACTION_START inside a known one is EBUSY, below).
        if msg.tx_id != 0 && !matches!(ty, MsgType::Watch | MsgType::Unwatch) && !c.txs.contains_key(&msg.tx_id) {
            return Err(Errno::ENOENT);
        }
        let p = &msg.payload;
        use MsgType as T;
        match ty {
            T::Read | T::Directory | T::GetPerms | T::Write | T::Mkdir | T::Rm | T::SetPerms | T::DirectoryPart => {
                let parts = wire::split(p);
                let path_arg = match ty {
                    T::Write => {
                        let i = p.iter().position(|b| *b == 0).ok_or(Errno::EINVAL)?;
                        utf8(&p[..i])?
                    }
                    T::SetPerms | T::DirectoryPart => utf8(parts[0])?,
                    _ => one_arg(p)?,
                };
                let path = canonical(domid, path_arg)?;
                let (view, tx_muts, tx_events) = if msg.tx_id == 0 {
                    (View::Live(&mut self.tree), mutations, events)
                } else {
                    let tx = c.txs.get_mut(&msg.tx_id).ok_or(Errno::ENOENT)?;
                    (View::Tx(&self.tree, &mut tx.overlay), &mut tx.mutations, &mut tx.events)
                };
                let mut cx = Ctx { view, mutations: tx_muts, events: tx_events, domid, target, quota };
                match ty {
                    T::Read => Ok(cx.readable(&path)?.value().to_vec()),
                    T::Directory => Ok(wire::strings(&cx.readable(&path)?.children())),
                    T::DirectoryPart => {
                        let offset: usize = parts.get(1).and_then(|o| utf8(o).ok()?.parse().ok()).ok_or(Errno::EINVAL)?;
                        let n = cx.readable(&path)?;
                        let all = wire::strings(&n.children());
                        if offset > all.len() {
                            return Err(Errno::EINVAL);
                        }
                        let mut out = format!("{}\0", n.gen()).into_bytes();
                        let room = PAYLOAD_MAX - out.len() - 1;
                        let rest = &all[offset..];
                        if rest.len() <= room {
                            out.extend_from_slice(rest);
                            out.push(0);
                        } else {
                            // Whole names only: cut after the last nul that fits.
                            let cut = rest[..room].iter().rposition(|b| *b == 0).map_or(0, |i| i + 1);
                            out.extend_from_slice(&rest[..cut]);
                        }
                        Ok(out)
                    }
                    T::GetPerms => Ok(cx.readable(&path)?.perms().encode()),
                    T::Write => {
                        let i = p.iter().position(|b| *b == 0).ok_or(Errno::EINVAL)?;
                        cx.write(&path, Some(p[i + 1..].to_vec())).map(|_| ok())
                    }
                    T::Mkdir => cx.write(&path, None).map(|_| ok()),
                    T::Rm => cx.rm(&path).map(|_| ok()),
                    _ => {
                        let entries = parts[1..].iter().map(|e| Perm::parse(utf8(e)?)).collect::<Result<Vec<_>, _>>()?;
                        cx.set_perms(&path, Perms::new(entries)?).map(|_| ok())
                    }
                }
            }
            T::Watch | T::Unwatch => {
                let parts = wire::split(p);
                if parts.len() < 2 {
                    return Err(Errno::EINVAL);
                }
                let raw = utf8(parts[0])?.to_string();
                let token = utf8(parts[1])?.to_string();
                let abs = if path::is_special(&raw) {
                    if raw.len() > path::ABS_PATH_MAX || raw.contains('\0') {
                        return Err(Errno::EINVAL);
                    }
                    raw.clone()
                } else {
                    canonical(domid, &raw)?
                };
                // Xen compares canonical paths: `x` and `/local/domain/<id>/x` are one watch.
                let pos = c.watches.iter().position(|w| w.abs == abs && w.token == token);
                if ty == T::Unwatch {
                    let i = pos.ok_or(Errno::ENOENT)?;
                    c.watches.remove(i);
                    return Ok(ok());
                }
                if pos.is_some() {
                    return Err(Errno::EEXIST);
                }
                if !privileged && c.watches.len() >= quota.watches_per_conn {
                    return Err(Errno::E2BIG);
                }
                let w = Watch { raw: raw.clone(), abs, token };
                // The initial event, with the path as the client gave it.
                after.push((conn, watch_event(domid, &w, &w.abs.clone())));
                c.watches.push(w);
                Ok(ok())
            }
            T::TransactionStart => {
                if msg.tx_id != 0 {
                    return Err(Errno::EBUSY);
                }
                if !privileged && c.txs.len() >= quota.transactions_per_conn {
                    return Err(Errno::ENOSPC);
                }
                let mut id = self.next_tx;
                while id == 0 || c.txs.contains_key(&id) {
                    id = id.wrapping_add(1);
                }
                self.next_tx = id.wrapping_add(1);
                // Copy on touch: nothing is copied now (O(1)).
                let tx = Tx { overlay: Overlay::default(), mutations: Vec::new(), events: Vec::new() };
                c.txs.insert(id, tx);
                Ok(format!("{id}\0").into_bytes())
            }
            T::TransactionEnd => {
                let commit = match one_arg(p)? {
                    "T" => true,
                    "F" => false,
                    _ => return Err(Errno::EINVAL),
                };
                let tx = c.txs.remove(&msg.tx_id).ok_or(Errno::ENOENT)?;
                if !commit {
                    return Ok(ok());
                }
                if tx.overlay.touched.iter().any(|(p, g)| self.tree.gen_of(p) != *g) {
                    return Err(Errno::EAGAIN);
                }
                for m in &tx.mutations {
                    self.tree.apply(m).map_err(|_| Errno::EAGAIN)?;
                }
                mutations.extend(tx.mutations);
                events.extend(tx.events);
                Ok(ok())
            }
            T::Introduce | T::Release | T::Resume | T::SetTarget => {
                if !privileged {
                    return Err(Errno::EACCES);
                }
                let parts = wire::split(p);
                let d = domid_arg(parts[0])?;
                match ty {
                    T::Introduce => {
                        if d == 0 || parts.len() < 3 {
                            return Err(Errno::EINVAL);
                        }
                        // mfn and event channel are recorded by real xenstored; vigil has no ring.
                        utf8(parts[1])?.parse::<i64>().map_err(|_| Errno::EINVAL)?;
                        // Xen: `port <= 0` is EINVAL.
                        utf8(parts[2])?.parse::<u32>().ok().filter(|p| *p > 0).ok_or(Errno::EINVAL)?;
                        if !self.tree.domains.contains_key(&d) {
                            let m = Mutation::Introduce { domid: d };
                            let _ = self.tree.apply(&m);
                            mutations.push(m);
                            events.push(Event { path: "@introduceDomain".into(), recursive: false, perms: None });
                        }
                    }
                    T::Release => {
                        if !self.tree.domains.contains_key(&d) {
                            return Err(Errno::ENOENT);
                        }
                        let m = Mutation::Release { domid: d };
                        let _ = self.tree.apply(&m);
                        mutations.push(m);
                        events.push(Event { path: "@releaseDomain".into(), recursive: false, perms: None });
                    }
                    T::Resume => {
                        if !self.tree.domains.contains_key(&d) {
                            return Err(Errno::ENOENT);
                        }
                    }
                    _ => {
                        let t = domid_arg(parts.get(1).ok_or(Errno::EINVAL)?)?;
                        if !self.tree.domains.contains_key(&d) {
                            return Err(Errno::ENOENT);
                        }
                        let m = Mutation::Target { domid: d, target: t };
                        let _ = self.tree.apply(&m);
                        mutations.push(m);
                    }
                }
                Ok(ok())
            }
            T::GetDomainPath => Ok(wire::strings(&[path::domain_path(domid_arg(one_arg(p)?.as_bytes())?)])),
            T::IsDomainIntroduced => {
                let d = domid_arg(one_arg(p)?.as_bytes())?;
                Ok(if d == 0 || self.tree.domains.contains_key(&d) { b"T\0".to_vec() } else { b"F\0".to_vec() })
            }
            T::ResetWatches => {
                c.watches.clear();
                c.txs.clear();
                Ok(ok())
            }
            T::Control => {
                let parts = wire::split(p);
                match utf8(parts[0])? {
                    "check" | "print" | "log" => Ok(ok()),
                    "help" => Ok(b"check\nhelp\nlog\nprint\n\0".to_vec()),
                    _ => Err(Errno::EINVAL),
                }
            }
            T::WatchEvent | T::Error => Err(Errno::ENOSYS),
        }
    }
}

fn watch_event(domid: DomId, w: &Watch, abs: &str) -> Msg {
    let shown = if w.raw.starts_with('/') || path::is_special(&w.raw) {
        abs.to_string()
    } else {
        let home = format!("{}/", path::domain_path(domid));
        abs.strip_prefix(&home).unwrap_or(abs).to_string()
    };
    Msg::new(MsgType::WatchEvent, 0, 0, wire::strings(&[shown.as_str(), w.token.as_str()]))
}

mod tree;

#[cfg(test)]
mod tests;
