//! XenStore paths: validation and canonicalisation (relative paths are under
//! `/local/domain/<domid>`), and the parent/child relation of `docs/misc/xenstore.txt`.

use crate::state::{DomId, Errno};

/// Longest absolute path of the protocol (`XENSTORE_ABS_PATH_MAX`); special watch names are
/// held to it. Node paths obey the tighter rule of [`canonical`].
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

/// Length of a `/local/domain/<domid>/` prefix of `abs` (up to five digits, as xenstored's
/// `sscanf("/local/domain/%5u/")`), else 0.
fn local_prefix(abs: &str) -> usize {
    let Some(rest) = abs.strip_prefix("/local/domain/") else { return 0 };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if (1..=5).contains(&digits) && rest.as_bytes().get(digits) == Some(&b'/') {
        "/local/domain/".len() + digits + 1
    } else {
        0
    }
}

/// Validates `raw` (as sent by a client of domain `domid`) and returns the absolute path.
/// Errors with `EINVAL` on the empty path, a path starting with `@` (special names are only
/// for watches), doubled or trailing slashes, characters outside `[A-Za-z0-9/_@-]`, or a
/// length over Xen 4.17's limit: at most [`REL_PATH_MAX`] bytes after a `/local/domain/<id>/`
/// prefix, or in all for any other path (xenstored's `is_valid_nodename`).
pub fn canonical(domid: DomId, raw: &str) -> Result<String, Errno> {
    if raw.is_empty() || !raw.bytes().all(valid_char) || is_special(raw) {
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
    if abs.len() > local_prefix(&abs) + REL_PATH_MAX || abs.contains("//") || (abs.len() > 1 && abs.ends_with('/')) {
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
        for bad in ["", "/a//b", "/a/", "/a b", "/a/ü", "/a.b", "a/", "@foo", "@releaseDomain"] {
            assert_eq!(canonical(0, bad), Err(Errno::EINVAL), "{bad:?}");
        }
        assert_eq!(canonical(0, "a@b").as_deref(), Ok("/local/domain/0/a@b"));
        // Xen 4.17: 2048 bytes in all, or after a /local/domain/<id>/ prefix.
        assert_eq!(canonical(0, &format!("/{}", "a".repeat(REL_PATH_MAX))), Err(Errno::EINVAL));
        assert!(canonical(0, &format!("/{}", "a".repeat(REL_PATH_MAX - 1))).is_ok());
        let home = "/local/domain/12/";
        assert!(canonical(0, &format!("{home}{}", "a".repeat(REL_PATH_MAX))).is_ok());
        assert_eq!(canonical(0, &format!("{home}{}", "a".repeat(REL_PATH_MAX + 1))), Err(Errno::EINVAL));
        assert!(canonical(7, &"a".repeat(REL_PATH_MAX)).is_ok());
        assert_eq!(canonical(0, &"a".repeat(REL_PATH_MAX + 1)), Err(Errno::EINVAL));
        assert_eq!(local_prefix("/local/domain/123456/x"), 0);
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
