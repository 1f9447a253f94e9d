//! XenStore paths: validation and canonicalisation (relative paths are under
//! `/local/domain/<domid>`), and the parent/child relation of `docs/misc/xenstore.txt`.

use crate::state::{DomId, Errno};

/// Longest absolute path accepted (`XENSTORE_ABS_PATH_MAX`).
pub const ABS_PATH_MAX: usize = 3072;
/// Longest path relative to a domain's home accepted (`XENSTORE_REL_PATH_MAX`).
pub const REL_PATH_MAX: usize = 2048;

/// The home of a domain: relative paths are resolved under it.
pub fn domain_path(domid: DomId) -> String {
    format!("/local/domain/{domid}")
}

fn valid_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'/' | b'_' | b'@' | b'-')
}

/// Validates `raw` (as sent by a client of domain `domid`) and returns the absolute path.
/// Errors with `EINVAL` on the empty path, doubled or trailing slashes, characters outside
/// `[A-Za-z0-9/_@-]`, or a length over the limits.
pub fn canonical(domid: DomId, raw: &str) -> Result<String, Errno> {
    if raw.is_empty() || !raw.bytes().all(valid_char) {
        return Err(Errno::EINVAL);
    }
    let abs = if raw.starts_with('/') {
        raw.to_string()
    } else {
        if raw.len() > REL_PATH_MAX {
            return Err(Errno::EINVAL);
        }
        format!("{}/{raw}", domain_path(domid))
    };
    if abs.len() > ABS_PATH_MAX || abs.contains("//") || (abs.len() > 1 && abs.ends_with('/')) {
        return Err(Errno::EINVAL);
    }
    Ok(abs)
}

/// Whether a watch path names a special event (`@introduceDomain`, `@releaseDomain`).
pub fn is_special(raw: &str) -> bool {
    raw.starts_with('@')
}

/// `child` is `parent`, or below it (every path is below `/`).
pub fn is_child(child: &str, parent: &str) -> bool {
    if parent == "/" {
        return child.starts_with('/');
    }
    child == parent || (child.len() > parent.len() && child.starts_with(parent) && child.as_bytes()[parent.len()] == b'/')
}

/// The parent of an absolute path (`None` for `/`).
pub fn parent(abs: &str) -> Option<&str> {
    if abs == "/" {
        return None;
    }
    match abs.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&abs[..i]),
        None => None,
    }
}

/// The last component of an absolute path.
pub fn leaf(abs: &str) -> &str {
    abs.rsplit('/').next().unwrap_or(abs)
}

/// Joins a parent and a leaf name.
pub fn join(parent: &str, leaf: &str) -> String {
    if parent == "/" {
        format!("/{leaf}")
    } else {
        format!("{parent}/{leaf}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonicalises_and_rejects() {
        assert_eq!(canonical(0, "/a/b").as_deref(), Ok("/a/b"));
        assert_eq!(canonical(3, "x/y").as_deref(), Ok("/local/domain/3/x/y"));
        assert_eq!(canonical(0, "/").as_deref(), Ok("/"));
        for bad in ["", "/a//b", "/a/", "/a b", "/a/ü", "/a.b", "a/"] {
            assert_eq!(canonical(0, bad), Err(Errno::EINVAL), "{bad:?}");
        }
        assert_eq!(canonical(0, &format!("/{}", "a".repeat(ABS_PATH_MAX))), Err(Errno::EINVAL));
        assert!(canonical(0, &format!("/{}", "a".repeat(ABS_PATH_MAX - 1))).is_ok());
        assert_eq!(canonical(0, &"a".repeat(REL_PATH_MAX + 1)), Err(Errno::EINVAL));
    }

    #[test]
    fn relations() {
        assert!(is_child("/a/b", "/a"));
        assert!(is_child("/a", "/a"));
        assert!(!is_child("/ab", "/a"));
        assert!(is_child("/ab", "/"));
        assert_eq!(parent("/a/b"), Some("/a"));
        assert_eq!(parent("/a"), Some("/"));
        assert_eq!(parent("/"), None);
        assert_eq!(leaf("/a/b"), "b");
        assert_eq!(join("/", "a"), "/a");
    }
}
