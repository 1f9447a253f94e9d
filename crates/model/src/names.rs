//! The hash maps that look items up by name while a file is validated.
//!
//! Keys are names and small integers from the file being read; the standard library's SipHash
//! (built to resist chosen collisions from untrusted peers) was a quarter of validation for a
//! file of a thousand tasks. A description file is written by the user who runs vigil on it, so
//! a plain multiplicative hash serves.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A hash map keyed by names (or other small keys) of one description file.
pub(crate) type NameMap<K, V> = HashMap<K, V, BuildHasherDefault<NameHasher>>;

/// An empty [`NameMap`] with room for `n` entries.
pub(crate) fn with_capacity<K, V>(n: usize) -> NameMap<K, V> {
    NameMap::with_capacity_and_hasher(n, BuildHasherDefault::default())
}

/// Mixes 8 bytes at a time: xor, then a multiplication by an odd constant (which spreads every
/// bit into the high bits the map's probing reads), folded once at the end.
#[derive(Default, Clone, Copy)]
pub(crate) struct NameHasher(u64);

const K: u64 = 0x9e37_79b9_7f4a_7c15;

impl NameHasher {
    fn mix(&mut self, w: u64) {
        self.0 = (self.0 ^ w).wrapping_mul(K);
    }
}

impl Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.mix(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        // The length tells "ab" from "ab\0".
        self.mix(u64::from_le_bytes(last) ^ ((rest.len() as u64) << 56));
    }

    fn write_u8(&mut self, n: u8) {
        self.mix(n as u64);
    }

    fn write_u32(&mut self, n: u32) {
        self.mix(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_like_a_std_map() {
        let names: Vec<String> = (0..3000).map(|i| format!("t{}_{}", i / 10, i % 10)).chain(["".into(), "a".into(), "ab".into()]).collect();
        let mut m: NameMap<&str, usize> = with_capacity(4);
        for (i, n) in names.iter().enumerate() {
            assert_eq!(m.insert(n, i), None);
        }
        for (i, n) in names.iter().enumerate() {
            assert_eq!(m.get(n.as_str()), Some(&i));
        }
        assert_eq!(m.get("ab\0"), None);
        assert_eq!(m.get("t0_10"), None);
    }
}
