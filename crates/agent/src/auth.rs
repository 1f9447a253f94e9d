//! Peer authentication on vigil's network channels (the arbiter's lease lines, the
//! replication connection): a shared secret key per cluster, HMAC-SHA-256 tags truncated to
//! 128 bits, compared in constant time.
//!
//! The key is a file of 16 to 4096 bytes (any bytes; `vigil up` writes 32 random ones with
//! mode 0600). A peer without it cannot obtain a lease, renew one, or open a replication
//! session; it is answered with an error and never disturbs a live session.

use crate::{Error, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Write;
use std::path::Path;

/// Bytes of a tag on the wire.
pub const TAG: usize = 16;

/// A cluster's shared secret.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

impl Key {
    /// Reads a key file; the error names the file.
    pub fn load(path: &Path) -> Result<Key> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io("key file", path, e))?;
        if !meta.is_file() || meta.len() > 4096 {
            return Err(Error::Key(format!("key file {}: must be a regular file of 16 to 4096 bytes", path.display())));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io("key file", path, e))?;
        Key::from_bytes(bytes).map_err(|e| Error::Key(format!("key file {}: {e}", path.display())))
    }

    /// A key from its bytes (16 to 4096 of them).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Key, String> {
        if !(16..=4096).contains(&bytes.len()) {
            return Err(format!("a key has 16 to 4096 bytes, this one {}", bytes.len()));
        }
        Ok(Key(bytes))
    }

    /// Writes a new random 32-byte key to `path` (mode 0600), unless the file exists.
    pub fn generate(path: &Path) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(Error::io("cannot create key file", path, e)),
        };
        let mut k = [0u8; 32];
        random(&mut k).map_err(|e| Error::io("cannot read /dev/urandom for", path, e))?;
        f.write_all(&k).and_then(|_| f.sync_all()).map_err(|e| Error::io("cannot write key file", path, e))
    }

    fn hmac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        for p in parts {
            // Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
            m.update(&(p.len() as u64).to_le_bytes());
            m.update(p);
        }
        m
    }

    /// The tag of `parts` (in order).
    pub fn tag(&self, parts: &[&[u8]]) -> [u8; TAG] {
        let full = self.hmac(parts).finalize().into_bytes();
        let mut t = [0u8; TAG];
        t.copy_from_slice(&full[..TAG]);
        t
    }

    /// Whether `tag` is the tag of `parts` (constant time).
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        tag.len() == TAG && self.hmac(parts).verify_truncated_left(tag).is_ok()
    }
}

impl Key {
    /// The bearer token of the replication control endpoint's `POST /policy` (a tag of a
    /// fixed label: anyone with the key can compute it, no one without).
    pub fn control_token(&self) -> String {
        hex(&self.tag(&[b"vigil-control-token"]))
    }
}

/// Whether `a` and `b` are equal, in time that does not depend on where they differ.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Fills `buf` from the kernel's random source.
pub fn random(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses lower- or upper-case hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_verify_only_with_the_same_key_and_parts() {
        let k = Key::from_bytes(vec![7; 32]).expect("key");
        let other = Key::from_bytes(vec![8; 32]).expect("key");
        let t = k.tag(&[b"renew kv a 1 90000 -"]);
        assert!(k.verify(&[b"renew kv a 1 90000 -"], &t));
        assert!(!other.verify(&[b"renew kv a 1 90000 -"], &t));
        assert!(!k.verify(&[b"renew kv a 2 90000 -"], &t));
        assert!(!k.verify(&[b"ab", b"c"], &k.tag(&[b"a", b"bc"])));
        assert!(!k.verify(&[b"x"], &t[..8]));
        assert_eq!(unhex(&hex(&t)).as_deref(), Some(&t[..]));
        assert_eq!(unhex("zz"), None);
        assert!(Key::from_bytes(vec![1; 15]).is_err());
    }

    #[test]
    fn key_files_are_created_once_and_checked() {
        let dir = std::env::temp_dir().join(format!("vigil-key-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let p = dir.join("key");
        let _ = std::fs::remove_file(&p);
        Key::generate(&p).expect("generate");
        let a = std::fs::read(&p).expect("read");
        Key::generate(&p).expect("again");
        assert_eq!(std::fs::read(&p).expect("read"), a, "an existing key is kept");
        assert!(Key::load(&p).is_ok());
        std::fs::write(dir.join("short"), b"short").expect("write");
        let e = Key::load(&dir.join("short")).unwrap_err().to_string();
        assert!(e.contains("short") && e.contains("16 to 4096"), "{e}");
        let e = Key::load(&dir.join("missing")).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
