//! Persistence on the VM's disk, when it has one: every batch of requests `kv` executes is
//! appended to a log on the disk *before* its replies are sent, one disk write per record
//! (not flushed: under replication, the backup's copy is what survives a failure);
//! at start the log is replayed into the store. A record is
//! `magic "KVLG" | payload length | crc32 of the payload | sequence` (16 bytes) followed by
//! the requests as they arrived (Redis protocol), padded to whole sectors. Replay stops at the
//! first sector that does not start a valid record; it says whether that was a torn record (a
//! header whose payload does not match its checksum) or simply the end.

use alloc::vec;
use alloc::vec::Vec;
use guest_sdk::block;
use guest_sdk::println;

const MAGIC: [u8; 4] = *b"KVLG";
const SECTOR: usize = 512;
const HEADER: usize = 16;
/// Largest payload of one record (one disk write of at most 2048 sectors).
const MAX_PAYLOAD: usize = 2048 * SECTOR - HEADER;

/// The log: where the next record goes.
pub struct DiskLog {
    next: u64,
    sectors: u64,
    seq: u32,
    full: bool,
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
        }
    }
    !c
}

impl DiskLog {
    /// Opens the log on the disk (if the VM has one) and replays it into `store`.
    pub fn open(store: &mut kv_core::Store) -> Option<DiskLog> {
        let sectors = block::sectors();
        if sectors == 0 {
            return None;
        }
        let mut next = 0u64;
        let mut seq = 0u32;
        let mut bytes = 0usize;
        let mut torn = false;
        let mut head = [0u8; SECTOR];
        let mut sink = Vec::new();
        while next < sectors {
            if block::read(next, &mut head).is_err() {
                println!("kv: disk read error at sector {next}");
                break;
            }
            if head[..4] != MAGIC {
                break;
            }
            let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
            let crc = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
            let rec_seq = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
            let span = (HEADER + len).div_ceil(SECTOR) as u64;
            if len > MAX_PAYLOAD || rec_seq != seq || next + span > sectors {
                torn = true;
                break;
            }
            let mut rec = vec![0u8; span as usize * SECTOR];
            if block::read(next, &mut rec).is_err() {
                println!("kv: disk read error at sector {next}");
                break;
            }
            let payload = &rec[HEADER..HEADER + len];
            if crc32(payload) != crc {
                torn = true;
                break;
            }
            let mut input = payload.to_vec();
            let _ = store.serve(&mut input, &mut sink);
            sink.clear();
            bytes += len;
            seq += 1;
            next += span;
        }
        println!(
            "kv: disk log: replayed {seq} records ({bytes} bytes), {} keys; the log ends at sector {next} ({})",
            store.len(),
            if torn { "TORN RECORD" } else { "clean" }
        );
        Some(DiskLog { next, sectors, seq, full: false })
    }

    /// Appends the requests in `payload` (durably, before their replies go out).
    pub fn append(&mut self, payload: &[u8]) {
        for chunk in payload.chunks(MAX_PAYLOAD) {
            let span = (HEADER + chunk.len()).div_ceil(SECTOR);
            if self.next + span as u64 > self.sectors {
                if !self.full {
                    println!("kv: disk log full; requests are no longer persisted");
                    self.full = true;
                }
                return;
            }
            let mut rec = vec![0u8; span * SECTOR];
            rec[..4].copy_from_slice(&MAGIC);
            rec[4..8].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
            rec[8..12].copy_from_slice(&crc32(chunk).to_le_bytes());
            rec[12..16].copy_from_slice(&self.seq.to_le_bytes());
            rec[HEADER..HEADER + chunk.len()].copy_from_slice(chunk);
            // No flush: under replication the backup's copy is what survives a failure.
            if block::write(self.next, &rec).is_err() {
                println!("kv: disk write error at sector {}", self.next);
                return;
            }
            self.next += span as u64;
            self.seq += 1;
        }
    }
}
