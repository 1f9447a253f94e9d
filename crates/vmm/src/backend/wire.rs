//! The messages between a VMM and its network backend process, over a `SOCK_SEQPACKET` socket
//! (one message per request or reply, so a message is never split or merged).
//!
//! Requests name guest memory by guest-physical address and length; the backend reaches it
//! through the guest memory it maps (a memfd). Everything here is parsed, never trusted: a
//! message that does not parse is an error with a reason, never a panic.

use vmm_abi::{FRAME_MAX, FRAME_MIN, NET_MAX_BUFS};

/// Send frames that lie in guest memory (entries: address, length) to the tap.
pub const OP_TX: u32 = 1;
/// Fill guest buffers (entries: address, capacity) with frames from the tap.
pub const OP_RX: u32 = 2;
/// Send frames carried in the message itself (`[len: u16 LE][frame]`...) to the tap: held
/// output released after a checkpoint commits, announcements.
pub const OP_SEND: u32 = 3;
/// A heartbeat.
pub const OP_PING: u32 = 4;
/// Block device: run descriptors (24-byte entries `[op: u32][sectors: u32][sector: u64]
/// [buf: u64]`) against the disk, in order.
pub const OP_BLOCK: u32 = 5;
/// The first request on a connection: the VMM's [`PROTOCOL`] (payload: u32 LE). A backend
/// refuses every other request until it has agreed to one.
pub const OP_HELLO: u32 = 6;

/// The version of everything a VMM and its backend processes share: these messages, the rings
/// and the progress page (`shm`), the descriptor numbers. Raise it with any change to them: a
/// backend program of another build (a VM restored on a machine whose recorded `vigil` is
/// older, say) is then refused by name at its start instead of misreading the rings.
pub const PROTOCOL: u32 = 1;

/// Bytes of one block entry.
pub const BLOCK_ENTRY: usize = 24;
/// Most descriptors in one block request.
pub const MAX_BLOCK_ENTRIES: usize = vmm_abi::BLOCK_MAX_DESCS as usize;

/// One block descriptor of an [`OP_BLOCK`] request (the guest's `BlockDesc`, checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockEntry {
    pub op: u32,
    pub sectors: u32,
    pub sector: u64,
    pub buf: u64,
}

/// Most entries in one request.
pub const MAX_ENTRIES: usize = NET_MAX_BUFS as usize;
/// Most payload bytes of one `OP_SEND` message.
pub const MAX_PAYLOAD: usize = 64 << 10;
/// Bytes of a header.
pub const HEADER: usize = 16;
/// Bytes of one entry.
pub const ENTRY: usize = 16;
/// Largest message either side sends or accepts.
pub const MAX_MSG: usize = HEADER + MAX_PAYLOAD;

/// Reply status: served (`done` says how far).
pub const STATUS_OK: u32 = 0;
/// Reply status: the request was malformed (a reason follows the header).
pub const STATUS_REFUSED: u32 = 1;
/// Reply status (block): the host I/O of descriptor `done` failed; those before it ran.
pub const STATUS_IO_ERROR: u32 = 2;

/// A request, as the backend reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Tx { seq: u32, frames: Vec<(u64, u32)> },
    Rx { seq: u32, bufs: Vec<(u64, u32)> },
    Send { seq: u32, payload: Vec<u8> },
    Ping { seq: u32 },
    Block { seq: u32, descs: Vec<BlockEntry> },
    Hello { seq: u32, version: u32 },
}

impl Request {
    pub fn seq(&self) -> u32 {
        match self {
            Request::Tx { seq, .. }
            | Request::Rx { seq, .. }
            | Request::Send { seq, .. }
            | Request::Ping { seq }
            | Request::Block { seq, .. }
            | Request::Hello { seq, .. } => *seq,
        }
    }

    /// The message bytes: header `[op][seq][count][payload len]` (u32 LE each), then entries
    /// `[addr: u64][len: u32][0: u32]` or the payload.
    pub fn encode(&self) -> Vec<u8> {
        if let Request::Block { seq, descs } = self {
            let mut m = Vec::with_capacity(HEADER + descs.len() * BLOCK_ENTRY);
            for v in [OP_BLOCK, *seq, descs.len() as u32, 0] {
                m.extend_from_slice(&v.to_le_bytes());
            }
            for d in descs {
                m.extend_from_slice(&d.op.to_le_bytes());
                m.extend_from_slice(&d.sectors.to_le_bytes());
                m.extend_from_slice(&d.sector.to_le_bytes());
                m.extend_from_slice(&d.buf.to_le_bytes());
            }
            return m;
        }
        if let Request::Hello { seq, version } = self {
            return [OP_HELLO, *seq, 0, 4, *version].iter().flat_map(|v| v.to_le_bytes()).collect();
        }
        let (op, seq, entries, payload): (u32, u32, &[(u64, u32)], &[u8]) = match self {
            Request::Tx { seq, frames } => (OP_TX, *seq, frames, &[]),
            Request::Rx { seq, bufs } => (OP_RX, *seq, bufs, &[]),
            Request::Send { seq, payload } => (OP_SEND, *seq, &[], payload),
            Request::Ping { seq } | Request::Block { seq, .. } | Request::Hello { seq, .. } => (OP_PING, *seq, &[], &[]),
        };
        let mut m = Vec::with_capacity(HEADER + entries.len() * ENTRY + payload.len());
        for v in [op, seq, entries.len() as u32, payload.len() as u32] {
            m.extend_from_slice(&v.to_le_bytes());
        }
        for (addr, len) in entries {
            m.extend_from_slice(&addr.to_le_bytes());
            m.extend_from_slice(&len.to_le_bytes());
            m.extend_from_slice(&0u32.to_le_bytes());
        }
        m.extend_from_slice(payload);
        m
    }

    /// Parses one message; the reason when it is malformed. Entry addresses are checked
    /// against guest memory by whoever uses them; lengths are checked here.
    pub fn parse(m: &[u8]) -> Result<Request, String> {
        let (op, seq, count, plen) = header(m)?;
        let body = &m[HEADER..];
        let count = count as usize;
        let plen = plen as usize;
        let entries = |max_len: Option<u32>| -> Result<Vec<(u64, u32)>, String> {
            if count > MAX_ENTRIES {
                return Err(format!("{count} entries (at most {MAX_ENTRIES})"));
            }
            if plen != 0 || body.len() != count * ENTRY {
                return Err(format!("{} bytes after the header for {count} entries", body.len()));
            }
            body.chunks_exact(ENTRY)
                .enumerate()
                .map(|(i, e)| {
                    let addr = u64::from_le_bytes(e[0..8].try_into().unwrap_or_default());
                    let len = u32::from_le_bytes(e[8..12].try_into().unwrap_or_default());
                    match max_len {
                        Some(_) if !(FRAME_MIN..=FRAME_MAX).contains(&len) => {
                            Err(format!("entry {i}: frame of {len} bytes (must be {FRAME_MIN}..={FRAME_MAX})"))
                        }
                        None if len < FRAME_MAX => Err(format!("entry {i}: buffer of {len} bytes (at least {FRAME_MAX})")),
                        _ => Ok((addr, len)),
                    }
                })
                .collect()
        };
        match op {
            OP_TX => Ok(Request::Tx { seq, frames: entries(Some(FRAME_MAX))? }),
            OP_RX => Ok(Request::Rx { seq, bufs: entries(None)? }),
            OP_SEND => {
                if count != 0 || plen > MAX_PAYLOAD || body.len() != plen {
                    return Err(format!("send of {} bytes (header says {plen}, at most {MAX_PAYLOAD}, no entries)", body.len()));
                }
                send_frames(body).try_for_each(|f| f.map(|_| ()))?;
                Ok(Request::Send { seq, payload: body.to_vec() })
            }
            OP_BLOCK => {
                if count > MAX_BLOCK_ENTRIES {
                    return Err(format!("{count} block descriptors (at most {MAX_BLOCK_ENTRIES})"));
                }
                if plen != 0 || body.len() != count * BLOCK_ENTRY {
                    return Err(format!("{} bytes after the header for {count} block descriptors", body.len()));
                }
                let descs = body
                    .chunks_exact(BLOCK_ENTRY)
                    .enumerate()
                    .map(|(i, e)| {
                        let w = |a: usize| u32::from_le_bytes([e[a], e[a + 1], e[a + 2], e[a + 3]]);
                        let q = |a: usize| u64::from_le_bytes(e[a..a + 8].try_into().unwrap_or_default());
                        let d = BlockEntry { op: w(0), sectors: w(4), sector: q(8), buf: q(16) };
                        if ![vmm_abi::BLOCK_READ, vmm_abi::BLOCK_WRITE, vmm_abi::BLOCK_FLUSH].contains(&d.op) {
                            return Err(format!("descriptor {i}: unknown operation {}", d.op));
                        }
                        if d.sectors > vmm_abi::BLOCK_MAX_SECTORS {
                            return Err(format!("descriptor {i}: {} sectors (at most {})", d.sectors, vmm_abi::BLOCK_MAX_SECTORS));
                        }
                        Ok(d)
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                Ok(Request::Block { seq, descs })
            }
            OP_PING if count == 0 && plen == 0 && body.is_empty() => Ok(Request::Ping { seq }),
            OP_PING => Err("ping with a body".into()),
            OP_HELLO if count == 0 && plen == 4 && body.len() == 4 => {
                Ok(Request::Hello { seq, version: u32::from_le_bytes([body[0], body[1], body[2], body[3]]) })
            }
            OP_HELLO => Err(format!("hello of {} bytes (4 expected)", body.len())),
            op => Err(format!("unknown operation {op}")),
        }
    }
}

/// The frames of an `OP_SEND` payload, each checked: a length that runs past the end or a
/// frame outside `FRAME_MIN..=FRAME_MAX` is an error.
pub fn send_frames(mut p: &[u8]) -> impl Iterator<Item = Result<&[u8], String>> {
    std::iter::from_fn(move || {
        if p.is_empty() {
            return None;
        }
        let Some((len, rest)) = p.split_at_checked(2) else {
            p = &[];
            return Some(Err("a frame length cut short".into()));
        };
        let n = u16::from_le_bytes([len[0], len[1]]) as usize;
        if !(FRAME_MIN as usize..=FRAME_MAX as usize).contains(&n) {
            p = &[];
            return Some(Err(format!("a frame of {n} bytes (must be {FRAME_MIN}..={FRAME_MAX})")));
        }
        let Some((frame, rest)) = rest.split_at_checked(n) else {
            p = &[];
            return Some(Err(format!("a frame of {n} bytes cut short")));
        };
        p = rest;
        Some(Ok(frame))
    })
}

/// A reply: `[op][seq][done][status]`, then a reason when refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub op: u32,
    pub seq: u32,
    /// Entries (or payload frames) served, in order from the first.
    pub done: u32,
    pub status: u32,
    pub reason: String,
}

impl Reply {
    pub fn encode(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(HEADER + self.reason.len());
        for v in [self.op, self.seq, self.done, self.status] {
            m.extend_from_slice(&v.to_le_bytes());
        }
        m.extend_from_slice(&self.reason.as_bytes()[..self.reason.len().min(MAX_PAYLOAD)]);
        m
    }

    pub fn parse(m: &[u8]) -> Result<Reply, String> {
        let (op, seq, done, status) = header(m)?;
        let reason = String::from_utf8_lossy(&m[HEADER..]).into_owned();
        if ![STATUS_OK, STATUS_REFUSED, STATUS_IO_ERROR].contains(&status) {
            return Err(format!("reply status {status}"));
        }
        Ok(Reply { op, seq, done, status, reason })
    }
}

fn header(m: &[u8]) -> Result<(u32, u32, u32, u32), String> {
    if m.len() < HEADER {
        return Err(format!("a message of {} bytes (the header alone has {HEADER})", m.len()));
    }
    if m.len() > MAX_MSG {
        return Err(format!("a message of {} bytes (at most {MAX_MSG})", m.len()));
    }
    let w = |i: usize| u32::from_le_bytes([m[i], m[i + 1], m[i + 2], m[i + 3]]);
    Ok((w(0), w(4), w(8), w(12)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let mut payload = vec![];
        for n in [14u16, 1514] {
            payload.extend_from_slice(&n.to_le_bytes());
            payload.extend(std::iter::repeat_n(7u8, n as usize));
        }
        for r in [
            Request::Tx { seq: 1, frames: vec![(0x1000, 60), (0x2000, 1514)] },
            Request::Rx { seq: 2, bufs: vec![(0x3000, 2048)] },
            Request::Send { seq: 3, payload },
            Request::Ping { seq: 4 },
            Request::Hello { seq: 5, version: PROTOCOL },
            Request::Block {
                seq: 5,
                descs: vec![BlockEntry { op: 1, sectors: 8, sector: 3, buf: 0x4000 }, BlockEntry { op: 2, sectors: 0, sector: 0, buf: 0 }],
            },
        ] {
            assert_eq!(Request::parse(&r.encode()), Ok(r));
        }
    }

    /// Random bytes and mutated valid messages never panic the parser.
    #[test]
    fn garbage_is_refused_with_a_reason() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let valid = Request::Tx { seq: 9, frames: vec![(0x1000, 60); 3] }.encode();
        let (mut ok, mut bad) = (0, 0);
        for _ in 0..20_000 {
            let mut m = if next() % 2 == 0 { valid.clone() } else { (0..next() % 200).map(|_| next() as u8).collect() };
            for _ in 0..next() % 4 {
                if !m.is_empty() {
                    let i = (next() as usize) % m.len();
                    m[i] = next() as u8;
                }
            }
            if next() % 3 == 0 {
                m.truncate((next() as usize) % (m.len() + 1));
            }
            match Request::parse(&m) {
                Ok(_) => ok += 1,
                Err(reason) => {
                    assert!(!reason.is_empty());
                    bad += 1
                }
            }
            let _ = Reply::parse(&m);
        }
        assert!(ok > 0 && bad > 0, "{ok} parsed, {bad} refused");
    }
}
