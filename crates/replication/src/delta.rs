//! XOR deltas of checkpoint pages against the backup's copy of each page.
//!
//! The backup applies a session's checkpoints in order, so the sender knows the backup's
//! replica exactly: the session's synchronisation, then every page sent since. It keeps that
//! copy ([`BackupCopy`]) and may send a page as (new XOR previous): words the guest did not
//! change become zeros, and LZ4 compresses pages with unchanged non-zero content too.
//!
//! A delta applied to anything but the base it was computed against would write a wrong
//! page into the replica without anyone noticing, so each frame carries the CRC-32 of every
//! base page and one of the result ([`pages_crc`]: the epoch, the page numbers and the new
//! pages), and [`resolve`] checks both against the replica before the pages are staged. A
//! mismatch refuses the checkpoint (naming the epoch and the page); the session breaks and
//! the primary synchronises a backup from scratch. A new session's sender starts without a
//! copy: deltas only follow that session's own synchronisation.

use crate::wire::{WireError, PAGE};

/// The sender's copy of the backup's replica memory: each page as this session last sent
/// it (by the synchronisation, then by checkpoints).
#[derive(Debug)]
pub struct BackupCopy {
    mem: Vec<u8>,
    /// Whether the synchronisation sent every page (only then are deltas possible).
    complete: bool,
}

impl BackupCopy {
    /// An empty copy of a VM with `mem_bytes` of memory (whole pages), for a new session's
    /// synchronisation; `None` if that is not a number of whole pages.
    pub fn new(mem_bytes: u64) -> Option<BackupCopy> {
        let len = usize::try_from(mem_bytes).ok().filter(|l| l.is_multiple_of(PAGE))?;
        // Zeroed by the allocator (fresh pages, touched only as the synchronisation fills
        // them): writing zeros here took a page fault per page before the first chunk went
        // out, longer than the backup's timeout on the bench's nested host (it abandoned the
        // session, "the primary fell silent before the first checkpoint").
        Some(BackupCopy { mem: vec![0u8; len], complete: false })
    }

    /// Records whole pages sent from `first_page` on (a synchronisation chunk).
    pub fn record_range(&mut self, first_page: u64, data: &[u8]) -> Result<(), WireError> {
        let at = usize::try_from(first_page).ok().and_then(|p| p.checked_mul(PAGE));
        let place = at.and_then(|a| self.mem.get_mut(a..a.checked_add(data.len())?));
        match place {
            Some(place) if data.len().is_multiple_of(PAGE) => {
                place.copy_from_slice(data);
                Ok(())
            }
            _ => Err(WireError::Delta {
                epoch: 0,
                reason: format!("{} bytes from page {first_page} on are not whole pages of the {}-page copy", data.len(), self.pages()),
            }),
        }
    }

    /// Records pages sent by the checkpoint closing `epoch` (`data`: their contents in order).
    pub fn record_pages(&mut self, epoch: u64, pages: &[u64], data: &[u8]) -> Result<(), WireError> {
        if data.len() != pages.len() * PAGE {
            return Err(WireError::Delta { epoch, reason: format!("{} bytes for {} pages", data.len(), pages.len()) });
        }
        let len = self.mem.len();
        for (&p, new) in pages.iter().zip(data.chunks_exact(PAGE)) {
            let page = page_of(&mut self.mem, p).ok_or_else(|| outside(epoch, p, len))?;
            page.copy_from_slice(new);
        }
        Ok(())
    }

    /// The synchronisation sent every page: deltas may follow.
    pub fn set_complete(&mut self) {
        self.complete = true;
    }

    /// Whether deltas may be computed against this copy.
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// The copy of guest memory.
    pub fn memory(&self) -> &[u8] {
        &self.mem
    }

    fn pages(&self) -> usize {
        self.mem.len() / PAGE
    }
}

fn page_of(mem: &mut [u8], page: u64) -> Option<&mut [u8]> {
    let at = usize::try_from(page).ok()?.checked_mul(PAGE)?;
    mem.get_mut(at..at.checked_add(PAGE)?)
}

fn page_in(mem: &[u8], page: u64) -> Option<&[u8]> {
    let at = usize::try_from(page).ok()?.checked_mul(PAGE)?;
    mem.get(at..at.checked_add(PAGE)?)
}

fn outside(epoch: u64, page: u64, mem_len: usize) -> WireError {
    WireError::Delta { epoch, reason: format!("page {page} is outside guest memory ({} pages)", mem_len / PAGE) }
}

/// The checksum of a delta's result: CRC-32 of the epoch, the page numbers (LE) and the new
/// pages, so that a delta applied to the wrong pages, or in another epoch, is caught too.
pub fn pages_crc(epoch: u64, pages: &[u64], data: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&epoch.to_le_bytes());
    for p in pages {
        crc.update(&p.to_le_bytes());
    }
    crc.update(data);
    crc.finalize()
}

/// Computes `pages`' XOR against `base` (whole guest memory as the backup has it) into `xor`,
/// from their new contents `data`; returns the CRC-32 of each base page.
pub fn encode(epoch: u64, pages: &[u64], data: &[u8], base: &[u8], xor: &mut Vec<u8>) -> Result<Vec<u32>, WireError> {
    if data.len() != pages.len() * PAGE {
        return Err(WireError::Delta { epoch, reason: format!("{} bytes for {} pages", data.len(), pages.len()) });
    }
    xor.clear();
    xor.extend_from_slice(data);
    let mut crcs = Vec::with_capacity(pages.len());
    for (&p, out) in pages.iter().zip(xor.chunks_exact_mut(PAGE)) {
        let old = page_in(base, p).ok_or_else(|| outside(epoch, p, base.len()))?;
        crcs.push(crc32fast::hash(old));
        xor_into(out, old);
    }
    Ok(crcs)
}

/// Applies a delta pages frame to `replica` (whole guest memory, as the session's last
/// committed checkpoint left it), in place: `xor` becomes the new pages. Checks each base
/// page against its checksum first and the result against `pages_crc` after; the replica
/// itself is not changed (the pages are staged and applied at the commit as any others).
pub fn resolve(epoch: u64, pages: &[u64], base_crcs: &[u32], pages_crc: u32, xor: &mut [u8], replica: &[u8]) -> Result<(), WireError> {
    let bad = |reason: String| WireError::Delta { epoch, reason };
    if xor.len() != pages.len() * PAGE || base_crcs.len() != pages.len() {
        return Err(bad(format!("{} bytes and {} base checksums for {} pages", xor.len(), base_crcs.len(), pages.len())));
    }
    for ((&p, &want), out) in pages.iter().zip(base_crcs).zip(xor.chunks_exact_mut(PAGE)) {
        let old = page_in(replica, p).ok_or_else(|| outside(epoch, p, replica.len()))?;
        let got = crc32fast::hash(old);
        if got != want {
            return Err(bad(format!(
                "page {p} of the replica is not the base the delta was computed against (checksum {got:08x}, the primary's {want:08x}): refused, never applied to another base"
            )));
        }
        xor_into(out, old);
    }
    let got = self::pages_crc(epoch, pages, xor);
    if got != pages_crc {
        return Err(bad(format!(
            "the pages rebuilt from the delta do not match their checksum ({got:08x}, the primary's {pages_crc:08x})"
        )));
    }
    Ok(())
}

/// `out ^= other`, a word at a time.
fn xor_into(out: &mut [u8], other: &[u8]) {
    let mut o = out.chunks_exact_mut(8);
    let mut b = other.chunks_exact(8);
    for (x, y) in (&mut o).zip(&mut b) {
        let v = u64::from_ne_bytes(x.try_into().unwrap_or([0; 8])) ^ u64::from_ne_bytes(y.try_into().unwrap_or([0; 8]));
        x.copy_from_slice(&v.to_ne_bytes());
    }
    for (x, y) in o.into_remainder().iter_mut().zip(b.remainder()) {
        *x ^= y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::Encoding;
    use crate::wire::{self, decode, read_msg, write_pages_delta, write_pages_lz4, Encoder, Msg};

    /// A small deterministic generator (no dependency for tests' noise).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Memory as guests leave it: pages of noise (non-zero content a checkpoint changes only
    /// a few words of), pages of text-like bytes, zero pages.
    fn memory(pages: usize, rng: &mut Rng) -> Vec<u8> {
        let mut m = vec![0u8; pages * PAGE];
        for (i, page) in m.chunks_exact_mut(PAGE).enumerate() {
            match i % 3 {
                0 => page.iter_mut().for_each(|b| *b = rng.next() as u8),
                1 => page.iter_mut().enumerate().for_each(|(j, b)| *b = b'a' + (j % 26) as u8),
                _ => {}
            }
        }
        m
    }

    /// Changes a few words of `pages` in `mem`; returns the new contents in order.
    fn touch(mem: &mut [u8], pages: &[u64], rng: &mut Rng) -> Vec<u8> {
        let mut data = Vec::new();
        for &p in pages {
            let page = page_of(mem, p).expect("inside");
            for _ in 0..4 {
                let at = rng.below((PAGE / 8) as u64) as usize * 8;
                page[at..at + 8].copy_from_slice(&rng.next().to_le_bytes());
            }
            data.extend_from_slice(page);
        }
        data
    }

    /// A delta frame of 4 pages of epoch 7 against `base`, the new memory, and the pages.
    fn delta_frame() -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u64>) {
        let mut rng = Rng(0x9e3779b97f4a7c15);
        let base = memory(12, &mut rng);
        let mut new = base.clone();
        let pages = vec![0, 3, 4, 11];
        let data = touch(&mut new, &pages, &mut rng);
        let mut bytes = Vec::new();
        let n = write_pages_delta(&mut bytes, 7, &pages, &data, &base, &mut Vec::new(), &mut Vec::new()).expect("write");
        assert_eq!(n as usize, bytes.len());
        (bytes, base, data, pages)
    }

    /// Decodes one frame and applies it to `replica` as the backup does: the new pages, or
    /// why not.
    fn receive(bytes: &[u8], replica: &[u8]) -> Result<(Vec<u64>, Vec<u8>), WireError> {
        match decode(bytes)? {
            Msg::PagesDelta { epoch, pages, base_crcs, pages_crc, mut xor } => {
                resolve(epoch, &pages, &base_crcs, pages_crc, &mut xor, replica)?;
                Ok((pages, xor))
            }
            other => panic!("decoded as {other:?}"),
        }
    }

    #[test]
    fn a_delta_frame_round_trips_and_beats_lz4_on_pages_with_unchanged_content() {
        let (bytes, base, data, pages) = delta_frame();
        assert_eq!(receive(&bytes, &base), Ok((pages.clone(), data.clone())));
        let mut lz4 = Vec::new();
        write_pages_lz4(&mut lz4, 7, &pages, &data, &mut Vec::new()).expect("write");
        // Two noise pages LZ4 cannot shrink; their XOR is four words each.
        assert!(bytes.len() * 8 < lz4.len(), "delta {} bytes, LZ4 {} bytes", bytes.len(), lz4.len());
        // The message itself round trips through write_msg and a recycled buffer.
        let Ok(msg @ Msg::PagesDelta { .. }) = decode(&bytes) else { panic!() };
        assert_eq!(decode(&wire::encode(&msg)), Ok(msg.clone()));
        let mut spare = vec![vec![0x55; 9 * PAGE]];
        assert_eq!(wire::read_msg_recycling(&mut &bytes[..], &mut spare), Ok(msg));
        assert!(spare.is_empty(), "the buffer was used");
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_of_a_delta_frame_is_refused() {
        let (bytes, base, data, pages) = delta_frame();
        let len = bytes.len();
        for i in 0..len {
            for bit in [0x01u8, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[i] ^= bit;
                assert!(decode(&bad).is_err(), "byte {i} ^ {bit:#x} was accepted");
                // The same damage under a recomputed frame checksum (a bug, or someone on the
                // path): the delta's own checksums must still refuse it, or the pages be the
                // right ones (an LZ4 match moved within identical bytes decodes the same).
                if (4..len - 4).contains(&i) {
                    let mut crc = crc32fast::Hasher::new();
                    crc.update(&bad[4..len - 4]);
                    let c = crc.finalize().to_le_bytes();
                    bad[len - 4..].copy_from_slice(&c);
                    match receive(&bad, &base) {
                        Err(_) => {}
                        Ok(got) => assert_eq!(got, (pages.clone(), data.clone()), "byte {i} ^ {bit:#x}: wrong pages"),
                    }
                }
            }
        }
        for cut in 0..len {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut} was accepted");
        }
    }

    #[test]
    fn a_delta_against_another_base_is_refused_naming_the_epoch_and_page() {
        let (bytes, mut base, _, _) = delta_frame();
        // The backup's page 4 is not what the sender had.
        base[4 * PAGE + 100] ^= 1;
        let e = receive(&bytes, &base).unwrap_err().to_string();
        assert!(e.contains("epoch 7") && e.contains("page 4 of the replica is not the base"), "{e}");
        // A replica smaller than the delta's pages.
        base[4 * PAGE + 100] ^= 1;
        let e = receive(&bytes, &base[..8 * PAGE]).unwrap_err().to_string();
        assert!(e.contains("page 11 is outside guest memory (8 pages)"), "{e}");
    }

    /// The sender and the backup over a byte stream, session after session: the sender keeps
    /// its copy, encodes each checkpoint as the chooser's encodings would, the backup decodes,
    /// rebuilds deltas against its replica and applies at the commit; after every commit the
    /// replica is the primary's memory.
    #[test]
    fn sender_and_backup_keep_the_replica_equal_to_the_primary_through_sessions() {
        const PAGES: usize = 64;
        let mut rng = Rng(42);
        let mut primary = memory(PAGES, &mut rng);
        let mut old_copy: Option<BackupCopy> = None;
        for session in 0..3u64 {
            // A new session: a new copy (no base until its synchronisation is complete) and
            // a new replica.
            // The VM ran on between the sessions (page 1 changed since the old copy).
            touch(&mut primary, &[1], &mut rng);
            let mut enc = Encoder::default();
            enc.copy = BackupCopy::new((PAGES * PAGE) as u64);
            let commit = |epoch| Msg::Commit { epoch, guest_ns: 0, pages: 0, disk_writes: 0, vcpu: vec![] };
            let refused = wire::write_checkpoint_encoded(&mut Vec::new(), 1, &[], &[], &commit(1), Encoding::Xor, &mut enc);
            assert!(refused.is_err(), "deltas before the synchronisation");
            let mut replica = vec![0u8; PAGES * PAGE];
            let copy = enc.copy.as_mut().expect("copy");
            for (i, chunk) in primary.chunks(16 * PAGE).enumerate() {
                copy.record_range((i * 16) as u64, chunk).expect("sync");
                replica[i * 16 * PAGE..][..chunk.len()].copy_from_slice(chunk);
            }
            copy.set_complete();
            assert!(enc.delta_ready());
            if let Some(old) = &old_copy {
                // A delta against the previous session's copy is refused by this replica.
                let p = [1u64];
                let new = touch(&mut primary.clone(), &p, &mut rng);
                let mut bytes = Vec::new();
                write_pages_delta(&mut bytes, 1, &p, &new, old.memory(), &mut Vec::new(), &mut Vec::new()).expect("write");
                assert!(receive(&bytes, &replica).is_err(), "session {session}: a delta of the old session was applied");
            }
            for epoch in 1..=40u64 {
                let mut pages: Vec<u64> = (0..1 + rng.below(12)).map(|_| rng.below(PAGES as u64)).collect();
                pages.sort_unstable();
                pages.dedup();
                let data = touch(&mut primary, &pages, &mut rng);
                let encoding = [Encoding::Xor, Encoding::Lz4, Encoding::Raw, Encoding::Xor][(epoch % 4) as usize];
                let mut stream = Vec::new();
                wire::write_checkpoint_encoded(&mut stream, epoch, &pages, &data, &commit(epoch), encoding, &mut enc).expect("write");
                let mut r = &stream[..];
                let mut staged: Vec<(Vec<u64>, Vec<u8>)> = Vec::new();
                loop {
                    match read_msg(&mut r).expect("frame") {
                        Msg::Pages { pages, data, .. } => staged.push((pages, data)),
                        Msg::PagesDelta { epoch: e, pages, base_crcs, pages_crc, mut xor } => {
                            resolve(e, &pages, &base_crcs, pages_crc, &mut xor, &replica).expect("resolve");
                            staged.push((pages, xor));
                        }
                        Msg::Commit { epoch: e, .. } => {
                            assert_eq!(e, epoch);
                            break;
                        }
                        other => panic!("{other:?}"),
                    }
                }
                for (pages, data) in staged {
                    for (&p, new) in pages.iter().zip(data.chunks_exact(PAGE)) {
                        page_of(&mut replica, p).expect("inside").copy_from_slice(new);
                    }
                }
                assert!(replica == primary, "session {session} epoch {epoch} ({encoding:?}): the replica differs");
                let copy = enc.copy.as_ref().expect("copy");
                assert!(copy.memory() == &primary[..], "session {session} epoch {epoch}: the sender's copy differs");
            }
            old_copy = enc.copy.take();
        }
    }
}
