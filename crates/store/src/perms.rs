//! Node permissions: a non-empty list of `<access><domid>` entries (`n`, `r`, `w`, `b`). The
//! first entry names the owner and the access of every domain not listed; the owner, dom0 and a
//! domain targeting the owner (`SET_TARGET`) have full access.

use crate::state::{DomId, Errno};
use std::fmt;

/// What a domain may do with a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    None,
    Read,
    Write,
    Both,
}

impl Access {
    pub fn can_read(self) -> bool {
        matches!(self, Access::Read | Access::Both)
    }
    pub fn can_write(self) -> bool {
        matches!(self, Access::Write | Access::Both)
    }
    fn letter(self) -> char {
        match self {
            Access::None => 'n',
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Both => 'b',
        }
    }
}

/// One permission entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perm {
    pub domid: DomId,
    pub access: Access,
}

impl Perm {
    /// Parses `r5`, `b0`, ...; `EINVAL` otherwise.
    pub fn parse(s: &str) -> Result<Perm, Errno> {
        let mut chars = s.chars();
        let access = match chars.next() {
            Some('n') => Access::None,
            Some('r') => Access::Read,
            Some('w') => Access::Write,
            Some('b') => Access::Both,
            _ => return Err(Errno::EINVAL),
        };
        let rest = chars.as_str();
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Errno::EINVAL);
        }
        let domid = rest.parse::<DomId>().map_err(|_| Errno::EINVAL)?;
        Ok(Perm { domid, access })
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.access.letter(), self.domid)
    }
}

/// The permissions of a node; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Perms(Vec<Perm>);

impl Perms {
    /// Owned by `owner`, no access for others.
    pub fn owned_by(owner: DomId) -> Perms {
        Perms(vec![Perm { domid: owner, access: Access::None }])
    }

    pub fn new(entries: Vec<Perm>) -> Result<Perms, Errno> {
        if entries.is_empty() {
            return Err(Errno::EINVAL);
        }
        Ok(Perms(entries))
    }

    pub fn owner(&self) -> DomId {
        self.0[0].domid
    }

    pub fn entries(&self) -> &[Perm] {
        &self.0
    }

    /// The same permissions with another owner (a node created by an unprivileged domain).
    pub fn with_owner(&self, owner: DomId) -> Perms {
        let mut p = self.0.clone();
        p[0].domid = owner;
        Perms(p)
    }

    /// What `domid` (which targets `target`, if any) may do. dom0 is privileged.
    pub fn access(&self, domid: DomId, target: Option<DomId>) -> Access {
        if domid == 0 || domid == self.owner() || target == Some(self.owner()) {
            return Access::Both;
        }
        let lookup = |d: DomId| self.0[1..].iter().find(|p| p.domid == d).map(|p| p.access);
        lookup(domid).or_else(|| target.and_then(lookup)).unwrap_or(self.0[0].access)
    }

    /// Wire form: every entry followed by a nul.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for p in &self.0 {
            out.extend_from_slice(p.to_string().as_bytes());
            out.push(0);
        }
        out
    }

    /// Compact text form for the log: entries separated by commas.
    pub fn to_text(&self) -> String {
        self.0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")
    }

    pub fn from_text(s: &str) -> Result<Perms, Errno> {
        Perms::new(s.split(',').map(Perm::parse).collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rules() {
        let p = Perms::new(vec![Perm::parse("r5").unwrap(), Perm::parse("w7").unwrap(), Perm::parse("n9").unwrap()]).unwrap();
        assert_eq!(p.access(0, None), Access::Both);
        assert_eq!(p.access(5, None), Access::Both);
        assert_eq!(p.access(7, None), Access::Write);
        assert_eq!(p.access(9, None), Access::None);
        assert_eq!(p.access(8, None), Access::Read);
        assert_eq!(p.access(8, Some(5)), Access::Both);
        assert_eq!(p.access(8, Some(7)), Access::Write);
        assert_eq!(p.encode(), b"r5\0w7\0n9\0");
        assert_eq!(Perms::from_text(&p.to_text()), Ok(p));
        for bad in ["", "x1", "r", "r-1", "r1a", "r99999999999"] {
            assert!(Perm::parse(bad).is_err(), "{bad}");
        }
    }
}
