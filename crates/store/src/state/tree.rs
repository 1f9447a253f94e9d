//! The node tree, and a transaction's view of it.
//!
//! A node stores its name as a component in its parent's child map, never its full path, so
//! a tree's memory grows with its number of nodes, not with the square of its depth.
//!
//! A transaction does not copy the tree (xenstored's copy-on-touch): its [`Overlay`] holds only
//! the nodes it changed (shallow copies: value, permissions, child names) and the generation of
//! every live node it looked at. Nodes it did not change are read from the live tree, so
//! starting one is O(1) and its cost grows with what it touches; a commit is valid only if none
//! of the nodes it looked at changed since it first looked.

use crate::path;
use crate::perms::Perms;
use crate::state::{DomId, Mutation};
use std::collections::{BTreeMap, BTreeSet, HashMap};

#[derive(Debug, Clone)]
pub(super) struct Node {
    pub value: Vec<u8>,
    pub perms: Perms,
    pub children: Children,
    pub gen: u64,
}

impl Node {
    fn new(value: Vec<u8>, perms: Perms, gen: u64) -> Node {
        Node { value, perms, children: Children::Few(Vec::new()), gen }
    }
}

/// Children beyond which a node keeps them in a B-tree rather than a sorted vector.
const FEW: usize = 32;

/// A node's children by name, sorted. Few children live in a vector sized to them (a chain of
/// single children costs one small allocation per level, where a B-tree leaf would cost a
/// kilobyte); many in a B-tree (insertion stays O(log n)).
#[derive(Debug, Clone)]
pub(super) enum Children {
    Few(Vec<(Box<str>, Node)>),
    Many(BTreeMap<Box<str>, Node>),
}

impl Children {
    pub fn get(&self, name: &str) -> Option<&Node> {
        match self {
            Children::Few(v) => v.binary_search_by(|(k, _)| (**k).cmp(name)).ok().map(|i| &v[i].1),
            Children::Many(m) => m.get(name),
        }
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Node> {
        match self {
            Children::Few(v) => v.binary_search_by(|(k, _)| (**k).cmp(name)).ok().map(|i| &mut v[i].1),
            Children::Many(m) => m.get_mut(name),
        }
    }

    fn insert(&mut self, name: Box<str>, node: Node) {
        match self {
            Children::Few(v) => match v.binary_search_by(|(k, _)| (**k).cmp(&name)) {
                Ok(i) => v[i].1 = node,
                Err(i) => {
                    if v.len() < FEW {
                        v.reserve_exact(1);
                        v.insert(i, (name, node));
                    } else {
                        let mut m: BTreeMap<Box<str>, Node> = std::mem::take(v).into_iter().collect();
                        m.insert(name, node);
                        *self = Children::Many(m);
                    }
                }
            },
            Children::Many(m) => {
                m.insert(name, node);
            }
        }
    }

    fn remove(&mut self, name: &str) -> Option<Node> {
        match self {
            Children::Few(v) => {
                let i = v.binary_search_by(|(k, _)| (**k).cmp(name)).ok()?;
                let (_, n) = v.remove(i);
                v.shrink_to_fit();
                Some(n)
            }
            Children::Many(m) => m.remove(name),
        }
    }

    /// Names and nodes, sorted by name.
    pub fn iter(&self) -> ChildIter<'_> {
        match self {
            Children::Few(v) => Box::new(v.iter().map(|(k, n)| (&**k, n))),
            Children::Many(m) => Box::new(m.iter().map(|(k, n)| (&**k, n))),
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.iter().map(|(k, _)| k)
    }
}

/// The components of an absolute path (none for `/`).
fn components(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|c| !c.is_empty())
}

#[derive(Debug, Clone)]
pub(super) struct Tree {
    root: Node,
    /// Introduced domains and the domain each one targets.
    pub domains: BTreeMap<DomId, Option<DomId>>,
    pub gen: u64,
    /// Nodes (including `/`).
    count: usize,
    /// Nodes per owner, for the node quota.
    owned: HashMap<DomId, usize>,
}

impl Tree {
    pub fn new() -> Tree {
        let root = Node::new(Vec::new(), Perms::owned_by(0), 0);
        Tree { root, domains: BTreeMap::new(), gen: 0, count: 1, owned: HashMap::from([(0, 1)]) }
    }

    pub fn get(&self, path: &str) -> Option<&Node> {
        let mut n = &self.root;
        for c in components(path) {
            n = n.children.get(c)?;
        }
        Some(n)
    }

    fn get_mut(&mut self, path: &str) -> Option<&mut Node> {
        let mut n = &mut self.root;
        for c in components(path) {
            n = n.children.get_mut(c)?;
        }
        Some(n)
    }

    pub fn gen_of(&self, path: &str) -> u64 {
        self.get(path).map_or(0, |n| n.gen)
    }

    pub fn bump(&mut self) -> u64 {
        self.gen += 1;
        self.gen
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn owned(&self, domid: DomId) -> usize {
        self.owned.get(&domid).copied().unwrap_or(0)
    }

    fn own(&mut self, domid: DomId, delta: isize) {
        let n = self.owned.entry(domid).or_insert(0);
        *n = n.saturating_add_signed(delta);
    }

    /// Marks the root changed (a reload).
    pub fn touch_root(&mut self, gen: u64) {
        self.root.gen = gen;
    }

    /// Applies one mutation; `Err` if it does not fit the tree (a Put without parent).
    pub fn apply(&mut self, m: &Mutation) -> Result<(), String> {
        match m {
            Mutation::Put { path, value, perms } => {
                let gen = self.bump();
                if let Some(n) = self.get_mut(path) {
                    let old = n.perms.owner();
                    n.value.clone_from(value);
                    n.perms = perms.clone();
                    n.gen = gen;
                    if old != perms.owner() {
                        self.own(old, -1);
                        self.own(perms.owner(), 1);
                    }
                    return Ok(());
                }
                let parent = path::parent(path).ok_or_else(|| format!("put of {path:?} without parent"))?;
                let p = self.get_mut(parent).ok_or_else(|| format!("put of {path:?}: parent missing"))?;
                p.children.insert(path::leaf(path).into(), Node::new(value.clone(), perms.clone(), gen));
                p.gen = gen;
                self.count += 1;
                self.own(perms.owner(), 1);
            }
            Mutation::DelTree { path } => {
                let gen = self.bump();
                let parent = path::parent(path).ok_or_else(|| "removal of /".to_string())?;
                let removed = self.get_mut(parent).and_then(|p| {
                    p.gen = gen;
                    p.children.remove(path::leaf(path))
                });
                if let Some(n) = removed {
                    let mut stack = vec![&n];
                    while let Some(x) = stack.pop() {
                        self.count -= 1;
                        let o = x.perms.owner();
                        let e = self.owned.entry(o).or_insert(1);
                        *e = e.saturating_sub(1);
                        stack.extend(x.children.iter().map(|(_, n)| n));
                    }
                }
            }
            Mutation::Introduce { domid } => {
                self.domains.entry(*domid).or_insert(None);
            }
            Mutation::Release { domid } => {
                self.domains.remove(domid);
            }
            Mutation::Target { domid, target } => {
                self.domains.insert(*domid, Some(*target));
            }
        }
        Ok(())
    }

    /// Every node as a `Put`, parents before children, made one at a time (what is held at
    /// once is the path to the current node).
    pub fn puts(&self) -> Puts<'_> {
        Puts { root: Some(&self.root), stack: Vec::new() }
    }
}

/// Children of one node, in name order.
type ChildIter<'a> = Box<dyn DoubleEndedIterator<Item = (&'a str, &'a Node)> + 'a>;

/// The iterator of [`Tree::puts`]: depth first, children in name order.
pub(super) struct Puts<'a> {
    root: Option<&'a Node>,
    stack: Vec<(String, ChildIter<'a>)>,
}

impl Iterator for Puts<'_> {
    type Item = Mutation;

    fn next(&mut self) -> Option<Mutation> {
        let put = |path: String, n: &Node| Mutation::Put { path, value: n.value.clone(), perms: n.perms.clone() };
        if let Some(root) = self.root.take() {
            self.stack.push(("/".to_string(), root.children.iter()));
            return Some(put("/".to_string(), root));
        }
        loop {
            let (parent, children) = self.stack.last_mut()?;
            match children.next() {
                Some((name, n)) => {
                    let p = path::join(parent, name);
                    self.stack.push((p.clone(), n.children.iter()));
                    return Some(put(p, n));
                }
                None => {
                    self.stack.pop();
                }
            }
        }
    }
}

/// A node a transaction changed: its own data and its children's names (their subtrees stay
/// where they are, in the live tree or the overlay).
#[derive(Debug, Clone)]
pub(super) struct Shallow {
    value: Vec<u8>,
    perms: Perms,
    children: BTreeSet<Box<str>>,
    gen: u64,
}

/// What a transaction changed and what it looked at.
#[derive(Debug, Clone, Default)]
pub(super) struct Overlay {
    /// Changed nodes by path; `None`: removed with its subtree.
    changed: HashMap<String, Option<Shallow>>,
    /// Generation in the live tree of every node looked at, when first looked at.
    pub touched: HashMap<String, u64>,
    /// Generations of the transaction's own changes (counting down from the top, apart from
    /// the live tree's).
    gen: u64,
    /// Change of each owner's node count.
    owned: HashMap<DomId, isize>,
}

/// A node as one view sees it.
#[derive(Clone, Copy)]
pub(super) enum NodeRef<'a> {
    Live(&'a Node),
    Tx(&'a Shallow),
}

impl<'a> NodeRef<'a> {
    pub fn value(self) -> &'a [u8] {
        match self {
            NodeRef::Live(n) => &n.value,
            NodeRef::Tx(n) => &n.value,
        }
    }

    pub fn perms(self) -> &'a Perms {
        match self {
            NodeRef::Live(n) => &n.perms,
            NodeRef::Tx(n) => &n.perms,
        }
    }

    pub fn gen(self) -> u64 {
        match self {
            NodeRef::Live(n) => n.gen,
            NodeRef::Tx(n) => n.gen,
        }
    }

    /// Child names, sorted.
    pub fn children(self) -> Vec<&'a str> {
        match self {
            NodeRef::Live(n) => n.children.names().collect(),
            NodeRef::Tx(n) => n.children.iter().map(|c| &**c).collect(),
        }
    }

    /// Bytes of the child names with their nuls (for the node size quota).
    pub fn children_bytes(self) -> usize {
        match self {
            NodeRef::Live(n) => n.children.names().map(|c| c.len() + 1).sum(),
            NodeRef::Tx(n) => n.children.iter().map(|c| c.len() + 1).sum(),
        }
    }

    fn shallow(self) -> Shallow {
        match self {
            NodeRef::Live(n) => Shallow {
                value: n.value.clone(),
                perms: n.perms.clone(),
                children: n.children.names().map(Box::from).collect(),
                gen: n.gen,
            },
            NodeRef::Tx(n) => n.clone(),
        }
    }
}

/// Where one operation runs: the live tree, or a transaction's overlay on it.
pub(super) enum View<'a> {
    Live(&'a mut Tree),
    Tx(&'a Tree, &'a mut Overlay),
}

impl View<'_> {
    pub fn get(&self, path: &str) -> Option<NodeRef<'_>> {
        match self {
            View::Live(t) => t.get(path).map(NodeRef::Live),
            View::Tx(live, o) => {
                if o.changed.is_empty() {
                    return live.get(path).map(NodeRef::Live);
                }
                if let Some(e) = o.changed.get(path) {
                    return e.as_ref().map(NodeRef::Tx);
                }
                // The nearest changed ancestor decides whether the live node is visible.
                let mut p = path;
                while let Some(parent) = path::parent(p) {
                    if let Some(e) = o.changed.get(parent) {
                        match e {
                            Some(s) if s.children.contains(path::leaf(p)) => break,
                            _ => return None,
                        }
                    }
                    p = parent;
                }
                live.get(path).map(NodeRef::Live)
            }
        }
    }

    /// Records the live generation of `path` the first time a transaction looks at it.
    pub fn touch(&mut self, path: &str) {
        if let View::Tx(live, o) = self {
            if !o.touched.contains_key(path) {
                o.touched.insert(path.to_string(), live.gen_of(path));
            }
        }
    }

    /// Nodes owned by `domid` in this view.
    pub fn owned(&self, domid: DomId) -> usize {
        match self {
            View::Live(t) => t.owned(domid),
            View::Tx(live, o) => live.owned(domid).saturating_add_signed(o.owned.get(&domid).copied().unwrap_or(0)),
        }
    }

    /// Paths of `path` and every node below it, in this view.
    pub fn subtree(&self, path: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![path.to_string()];
        while let Some(p) = stack.pop() {
            if let Some(n) = self.get(&p) {
                stack.extend(n.children().into_iter().map(|c| path::join(&p, c)));
                out.push(p);
            }
        }
        out
    }

    pub fn apply(&mut self, m: &Mutation) -> Result<(), String> {
        let (live, o) = match self {
            View::Live(t) => return t.apply(m),
            View::Tx(live, o) => (&**live, &mut **o),
        };
        o.gen = o.gen.wrapping_sub(1);
        let gen = o.gen;
        match m {
            Mutation::Put { path, value, perms } => {
                let view = View::Tx(live, &mut *o);
                let old = view.get(path).map(NodeRef::shallow);
                let parent = match &old {
                    Some(_) => None,
                    None => {
                        let parent = path::parent(path).ok_or_else(|| format!("put of {path:?} without parent"))?;
                        let p = view.get(parent).ok_or_else(|| format!("put of {path:?}: parent missing"))?;
                        Some((parent.to_string(), p.shallow()))
                    }
                };
                let node = match old {
                    Some(mut n) => {
                        let before = n.perms.owner();
                        if before != perms.owner() {
                            *o.owned.entry(before).or_insert(0) -= 1;
                            *o.owned.entry(perms.owner()).or_insert(0) += 1;
                        }
                        n.value.clone_from(value);
                        n.perms = perms.clone();
                        n.gen = gen;
                        n
                    }
                    None => {
                        *o.owned.entry(perms.owner()).or_insert(0) += 1;
                        Shallow { value: value.clone(), perms: perms.clone(), children: BTreeSet::new(), gen }
                    }
                };
                if let Some((ppath, mut p)) = parent {
                    p.children.insert(path::leaf(path).into());
                    p.gen = gen;
                    o.changed.insert(ppath, Some(p));
                }
                o.changed.insert(path.clone(), Some(node));
            }
            Mutation::DelTree { path } => {
                let parent = path::parent(path).ok_or_else(|| "removal of /".to_string())?;
                let view = View::Tx(live, &mut *o);
                let mut owners = Vec::new();
                for p in view.subtree(path) {
                    if let Some(n) = view.get(&p) {
                        owners.push(n.perms().owner());
                    }
                }
                let p = view.get(parent).map(NodeRef::shallow);
                for d in owners {
                    *o.owned.entry(d).or_insert(0) -= 1;
                }
                if let Some(mut p) = p {
                    p.children.remove(path::leaf(path));
                    p.gen = gen;
                    o.changed.insert(parent.to_string(), Some(p));
                }
                let below = format!("{path}/");
                o.changed.retain(|k, _| !k.starts_with(&below));
                o.changed.insert(path.clone(), None);
            }
            Mutation::Introduce { .. } | Mutation::Release { .. } | Mutation::Target { .. } => {
                return Err("domain change inside a transaction".into());
            }
        }
        Ok(())
    }
}
