//! The replication wire format: length-prefixed frames, each with a CRC-32 over its kind,
//! length and payload, carrying [`Msg`]s in both directions over one TCP connection.
//!
//! ```text
//! frame   = magic "VRPL" (4) | kind (1) | payload length (4, LE) | payload | crc32 (4, LE)
//! ```
//!
//! A checkpoint travels as any number of [`Msg::Pages`] frames, the epoch's network output
//! ([`Msg::Output`], kept by the backup only to send again after a takeover), and one
//! [`Msg::Commit`] frame that says how many pages and disk writes the epoch had, so the backup
//! can tell a complete checkpoint from a truncated one. Integers are little-endian. Every
//! decoding error names what was wrong; nothing here panics on hostile input.
//!
//! Page frames may travel compressed (a "compressed pages" frame: the same fields, then the
//! data's length and CRC-32, and the data as one LZ4 block), chosen per checkpoint by the
//! sender ([`crate::compress`]); the reader turns them back into [`Msg::Pages`]. The frame's
//! CRC covers the compressed bytes, so a damaged byte is refused before anything is
//! decompressed; a block that does not decompress to exactly the announced pages, with their
//! checksum, is refused too.
//!
//! Or as *delta pages* frames ([`Msg::PagesDelta`], [`crate::delta`]): each page XOR'd with
//! the backup's copy of it, the XOR'd data as one LZ4 block, with a CRC-32 of each base page
//! and one of the result (epoch, page numbers and new pages); the backup checks both against
//! its replica and never applies a delta to another base.

use crate::compress::Encoding;
use crate::delta::BackupCopy;
use std::io::{self, Read, Write};

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"VRPL";
/// Bytes of one guest page.
pub const PAGE: usize = 4096;
/// Largest payload accepted (a frame announcing more is refused before reading it).
pub const MAX_PAYLOAD: usize = 32 << 20;
/// Pages per [`Msg::Pages`] frame the encoder produces (well under [`MAX_PAYLOAD`]).
pub const PAGES_PER_FRAME: usize = 1024;
/// Pages per compressed or delta frame: encoding 1,024 pages took up to 40 ms on a loaded
/// host, all of it silence on the link (the backup's timeout is 60 ms by default).
pub const ENCODED_PAGES_PER_FRAME: usize = 256;

/// Everything the two sides say to each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Primary → backup, first on a connection: a new protection session for a VM.
    Hello { session: u64, vm: String, mem_bytes: u64, config: Vec<u8> },
    /// Primary → backup: guest memory from the initial synchronisation (whole pages starting
    /// at `first_page`), sent while the VM runs.
    Sync { first_page: u64, data: Vec<u8> },
    /// Primary → backup: the initial synchronisation is complete; how many pages and disk
    /// chunks it sent (the backup checks it received them all).
    SyncEnd { pages: u64, disk_chunks: u64 },
    /// Primary → backup: disk contents from the initial synchronisation (written at once).
    DiskSync { offset: u64, data: Vec<u8> },
    /// Primary → backup: one guest disk write made during `epoch` (held until it commits).
    DiskWrite { epoch: u64, offset: u64, data: Vec<u8> },
    /// Primary → backup: dirty pages of the checkpoint closing `epoch`.
    Pages { epoch: u64, pages: Vec<u64>, data: Vec<u8> },
    /// Primary → backup: dirty pages of the checkpoint closing `epoch`, each as its XOR
    /// against the backup's copy of the page (its replica as the session's last checkpoint
    /// left it): `base_crcs` has the CRC-32 of each page's base, `pages_crc` the CRC-32 of
    /// the epoch, page numbers and new pages ([`crate::delta::pages_crc`]). On the wire the
    /// XOR'd data is one LZ4 block; here it is decompressed, not yet applied to a base
    /// ([`crate::delta::resolve`]).
    PagesDelta { epoch: u64, pages: Vec<u64>, base_crcs: Vec<u32>, pages_crc: u32, xor: Vec<u8> },
    /// Primary → backup: the end of the checkpoint closing `epoch`: the vCPU state, the guest
    /// clock, and counts to check the checkpoint arrived whole.
    Commit { epoch: u64, guest_ns: u64, pages: u64, disk_writes: u64, vcpu: Vec<u8> },
    /// Primary → backup: network output of `epoch` (frames as 4-byte LE lengths and bytes,
    /// an epoch's output may span several messages), and the highest epoch whose output the
    /// primary had released. The backup sends the committed epochs' output it does not know
    /// released again when it takes over.
    Output { epoch: u64, released: u64, frames: Vec<u8> },
    /// Primary → backup: network input the VM received during `epoch` (frames as in
    /// [`Msg::Output`]), sent as it arrives. A backup that takes over from a checkpoint before
    /// `epoch` gives it to the VM it builds (the client need not send it again).
    Input { epoch: u64, frames: Vec<u8> },
    /// Backup → primary: the checkpoint closing `epoch` is applied (and its disk writes too).
    Ack { epoch: u64 },
    /// Backup → primary: a checkpoint was refused; the backup keeps its last committed state.
    Refuse { epoch: u64, reason: String },
    /// Either way: still alive.
    Heartbeat { seq: u64 },
    /// Primary → backup, last on a connection: a planned handover (live migration). The
    /// primary paused the VM for good after `epoch`, which the backup acknowledged, and gave
    /// its lease up at the arbiter: the backup takes over now (without waiting out a silence).
    /// `paused_ns`: how long the VM had been paused when this was sent (the downtime so far).
    Handover { epoch: u64, paused_ns: u64 },
}

/// Why bytes are not a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("frame cut short ({0})")]
    Truncated(&'static str),
    #[error("bad magic {0:02x?} (not a vigil replication stream)")]
    BadMagic([u8; 4]),
    #[error("frame of {0} bytes (at most {MAX_PAYLOAD})")]
    TooLong(usize),
    #[error("bad checksum on a {0} frame")]
    BadChecksum(&'static str),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed {kind} frame: {reason}")]
    Malformed { kind: &'static str, reason: String },
    /// A delta pages frame that cannot be applied: its base is not the replica's page, or
    /// its result is not the pages it was computed from.
    #[error("delta pages of epoch {epoch}: {reason}")]
    Delta { epoch: u64, reason: String },
    #[error("{0}")]
    Io(String),
}

const K_HELLO: u8 = 1;
const K_SYNC: u8 = 2;
const K_DISK: u8 = 3;
const K_PAGES: u8 = 4;
const K_COMMIT: u8 = 5;
const K_ACK: u8 = 6;
const K_REFUSE: u8 = 7;
const K_HEARTBEAT: u8 = 8;
const K_DISK_SYNC: u8 = 9;
const K_SYNC_END: u8 = 10;
const K_OUTPUT: u8 = 11;
/// [`Msg::Pages`] with its page data as one LZ4 block (see [`write_pages_lz4`]).
const K_PAGES_LZ4: u8 = 12;
const K_HANDOVER: u8 = 13;
const K_INPUT: u8 = 14;
/// [`Msg::PagesDelta`]: pages as their XOR against the backup's copy, as one LZ4 block.
const K_PAGES_DELTA: u8 = 15;

/// Largest network frame carried in [`Msg::Output`].
pub const MAX_NET_FRAME: usize = 65535;

fn kind_name(k: u8) -> &'static str {
    match k {
        K_HELLO => "hello",
        K_SYNC => "sync",
        K_DISK => "disk-write",
        K_PAGES => "pages",
        K_COMMIT => "commit",
        K_ACK => "ack",
        K_REFUSE => "refuse",
        K_HEARTBEAT => "heartbeat",
        K_DISK_SYNC => "disk-sync",
        K_SYNC_END => "sync-end",
        K_OUTPUT => "output",
        K_PAGES_LZ4 => "compressed pages",
        K_HANDOVER => "handover",
        K_INPUT => "input",
        K_PAGES_DELTA => "delta pages",
        _ => "unknown",
    }
}

impl Msg {
    /// The frame kind's name, for messages and metrics.
    pub fn kind(&self) -> &'static str {
        kind_name(self.code())
    }

    fn code(&self) -> u8 {
        match self {
            Msg::Hello { .. } => K_HELLO,
            Msg::Sync { .. } => K_SYNC,
            Msg::DiskWrite { .. } => K_DISK,
            Msg::Pages { .. } => K_PAGES,
            Msg::Commit { .. } => K_COMMIT,
            Msg::Ack { .. } => K_ACK,
            Msg::Refuse { .. } => K_REFUSE,
            Msg::Heartbeat { .. } => K_HEARTBEAT,
            Msg::DiskSync { .. } => K_DISK_SYNC,
            Msg::SyncEnd { .. } => K_SYNC_END,
            Msg::Output { .. } => K_OUTPUT,
            Msg::Handover { .. } => K_HANDOVER,
            Msg::Input { .. } => K_INPUT,
            Msg::PagesDelta { .. } => K_PAGES_DELTA,
        }
    }

    /// The payload as a fixed head plus an optional bulk slice (written without copying).
    fn parts(&self) -> (Vec<u8>, &[u8]) {
        let mut h = Vec::with_capacity(64);
        let bulk: &[u8] = match self {
            Msg::Hello { session, vm, mem_bytes, config } => {
                h.extend_from_slice(&session.to_le_bytes());
                h.extend_from_slice(&mem_bytes.to_le_bytes());
                put_bytes(&mut h, vm.as_bytes());
                config
            }
            Msg::Sync { first_page, data } => {
                h.extend_from_slice(&first_page.to_le_bytes());
                data
            }
            Msg::DiskSync { offset, data } => {
                h.extend_from_slice(&offset.to_le_bytes());
                data
            }
            Msg::SyncEnd { pages, disk_chunks } => {
                h.extend_from_slice(&pages.to_le_bytes());
                h.extend_from_slice(&disk_chunks.to_le_bytes());
                &[]
            }
            Msg::DiskWrite { epoch, offset, data } => {
                h.extend_from_slice(&epoch.to_le_bytes());
                h.extend_from_slice(&offset.to_le_bytes());
                data
            }
            Msg::Pages { epoch, pages, data } => {
                h.extend_from_slice(&epoch.to_le_bytes());
                h.extend_from_slice(&(pages.len() as u32).to_le_bytes());
                for p in pages {
                    h.extend_from_slice(&p.to_le_bytes());
                }
                data
            }
            Msg::Commit { epoch, guest_ns, pages, disk_writes, vcpu } => {
                for v in [epoch, guest_ns, pages, disk_writes] {
                    h.extend_from_slice(&v.to_le_bytes());
                }
                vcpu
            }
            Msg::Output { epoch, released, frames } => {
                h.extend_from_slice(&epoch.to_le_bytes());
                h.extend_from_slice(&released.to_le_bytes());
                frames
            }
            Msg::Input { epoch, frames } => {
                h.extend_from_slice(&epoch.to_le_bytes());
                frames
            }
            Msg::Ack { epoch } => {
                h.extend_from_slice(&epoch.to_le_bytes());
                &[]
            }
            Msg::Refuse { epoch, reason } => {
                h.extend_from_slice(&epoch.to_le_bytes());
                reason.as_bytes()
            }
            Msg::Heartbeat { seq } => {
                h.extend_from_slice(&seq.to_le_bytes());
                &[]
            }
            Msg::Handover { epoch, paused_ns } => {
                h.extend_from_slice(&epoch.to_le_bytes());
                h.extend_from_slice(&paused_ns.to_le_bytes());
                &[]
            }
            // Compressed on the way out: [`write_msg`] writes it with `write_delta_frame`.
            Msg::PagesDelta { .. } => &[],
        };
        (h, bulk)
    }
}

fn put_bytes(h: &mut Vec<u8>, b: &[u8]) {
    h.extend_from_slice(&(b.len() as u32).to_le_bytes());
    h.extend_from_slice(b);
}

/// Writes one frame. The bulk data (pages, disk data) is written straight from the message.
pub fn write_msg(w: &mut impl Write, msg: &Msg) -> io::Result<()> {
    if let Msg::PagesDelta { epoch, pages, base_crcs, pages_crc, xor } = msg {
        return write_delta_frame(w, *epoch, pages, base_crcs, *pages_crc, xor, &mut Vec::new()).map(|_| ());
    }
    let (head, bulk) = msg.parts();
    let len = head.len() + bulk.len();
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} frame of {len} bytes", msg.kind())));
    }
    let mut header = [0u8; 9];
    header[..4].copy_from_slice(&MAGIC);
    header[4] = msg.code();
    header[5..].copy_from_slice(&(len as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[4..]);
    crc.update(&head);
    crc.update(bulk);
    w.write_all(&header)?;
    w.write_all(&head)?;
    w.write_all(bulk)?;
    w.write_all(&crc.finalize().to_le_bytes())
}

/// Encodes one frame into a new buffer (tests and small messages).
pub fn encode(msg: &Msg) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail except for an oversized frame, which the encoder's users
    // never build (pages are split into PAGES_PER_FRAME chunks).
    let _ = write_msg(&mut out, msg);
    out
}

/// Reads one frame. [`WireError::Closed`] means the peer closed between frames; a close
/// inside a frame is [`WireError::Truncated`].
pub fn read_msg(r: &mut impl Read) -> Result<Msg, WireError> {
    read_msg_recycling(r, &mut Vec::new())
}

/// Reads one frame, as [`read_msg`]; a [`Msg::Pages`] frame's page data is read straight from
/// `r` into a buffer taken from `spare` (an applied checkpoint's, whose pages are already
/// mapped), not copied out of a payload buffer: the backup's receive path is then the socket's
/// one copy into the staging buffer, and staging's one copy into the replica.
pub fn read_msg_recycling(r: &mut impl Read, spare: &mut Vec<Vec<u8>>) -> Result<Msg, WireError> {
    let mut header = [0u8; 9];
    match read_full(r, &mut header)? {
        0 => return Err(WireError::Closed),
        9 => {}
        _ => return Err(WireError::Truncated("header")),
    }
    let magic = [header[0], header[1], header[2], header[3]];
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let kind = header[4];
    let len = u32::from_le_bytes([header[5], header[6], header[7], header[8]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLong(len));
    }
    if kind == K_PAGES {
        return read_pages(r, &header, len, spare);
    }
    if kind == K_PAGES_LZ4 {
        return read_pages_lz4(r, &header, len, spare);
    }
    if kind == K_PAGES_DELTA {
        return read_pages_delta(r, &header, len, spare);
    }
    let mut payload = vec![0u8; len + 4];
    if read_full(r, &mut payload)? != payload.len() {
        return Err(WireError::Truncated(kind_name(kind)));
    }
    let crc_got = u32::from_le_bytes([payload[len], payload[len + 1], payload[len + 2], payload[len + 3]]);
    payload.truncate(len);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[4..]);
    crc.update(&payload);
    if crc.finalize() != crc_got {
        return Err(WireError::BadChecksum(kind_name(kind)));
    }
    decode_payload(kind, payload)
}

/// The rest of a [`Msg::Pages`] frame of payload length `len`: its fixed fields and page
/// list, then the page data read into a recycled buffer, then the checksum over all of it.
fn read_pages(r: &mut impl Read, header: &[u8; 9], len: usize, spare: &mut Vec<Vec<u8>>) -> Result<Msg, WireError> {
    let name = kind_name(K_PAGES);
    let bad = |reason: String| WireError::Malformed { kind: name, reason };
    let mut exact = |buf: &mut [u8]| -> Result<(), WireError> {
        if read_full(r, buf)? != buf.len() {
            return Err(WireError::Truncated(name));
        }
        Ok(())
    };
    if len < 12 {
        // Too short for its fixed fields: read it whole (the checksum decides what to say).
        let mut rest = vec![0u8; len + 4];
        exact(&mut rest)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header[4..]);
        crc.update(&rest[..len]);
        if crc.finalize().to_le_bytes() != rest[len..] {
            return Err(WireError::BadChecksum(name));
        }
        return Err(bad(format!("cut short in {}", if len < 8 { "epoch" } else { "page count" })));
    }
    let mut fixed = [0u8; 12];
    exact(&mut fixed)?;
    let epoch = u64::from_le_bytes(fixed[..8].try_into().unwrap_or([0; 8]));
    let n = u32::from_le_bytes(fixed[8..].try_into().unwrap_or([0; 4])) as usize;
    // The announced sizes must add up before anything is allocated for them.
    let list_len = n.checked_mul(8).filter(|l| 12 + l <= len);
    let data_len = n.checked_mul(PAGE);
    let (Some(list_len), Some(data_len)) = (list_len, data_len) else {
        let mut rest = vec![0u8; len - 12 + 4];
        exact(&mut rest)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header[4..]);
        crc.update(&fixed);
        crc.update(&rest[..len - 12]);
        if crc.finalize().to_le_bytes() != rest[len - 12..] {
            return Err(WireError::BadChecksum(name));
        }
        return Err(bad("cut short in page numbers".into()));
    };
    let mut list = vec![0u8; list_len];
    exact(&mut list)?;
    let rest_len = len - 12 - list_len;
    let mut data = spare.pop().unwrap_or_default();
    // A recycled buffer is only shortened (no zeroing); a new one is zeroed once.
    data.resize(rest_len, 0);
    exact(&mut data)?;
    let mut crc_got = [0u8; 4];
    exact(&mut crc_got)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[4..]);
    crc.update(&fixed);
    crc.update(&list);
    crc.update(&data);
    if crc.finalize().to_le_bytes() != crc_got {
        spare.push(data);
        return Err(WireError::BadChecksum(name));
    }
    if rest_len != data_len {
        spare.push(data);
        return Err(bad(format!("{n} pages announced but {rest_len} bytes of data")));
    }
    let pages = list.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
    Ok(Msg::Pages { epoch, pages, data })
}

/// The rest of a compressed pages frame: read whole (it is the compressed size), checked,
/// then its block decompressed into a recycled buffer of exactly the announced pages.
fn read_pages_lz4(r: &mut impl Read, header: &[u8; 9], len: usize, spare: &mut Vec<Vec<u8>>) -> Result<Msg, WireError> {
    let name = kind_name(K_PAGES_LZ4);
    let payload = read_checked(r, header, len, name)?;
    let mut f = Fields { kind: name, rest: &payload[..len] };
    let epoch = f.u64("epoch")?;
    let n = f.u32("page count")? as usize;
    let list = f.take(n.checked_mul(8).ok_or_else(|| f.bad("page count overflows"))?, "page numbers")?;
    let raw = f.u32("data length")? as usize;
    let raw_crc = f.u32("data checksum")?;
    if n.checked_mul(PAGE) != Some(raw) || raw > MAX_PAYLOAD {
        return Err(f.bad(format!("{n} pages announced but {raw} bytes of data")));
    }
    let data = decompress(&f, raw, spare)?;
    if crc32fast::hash(&data) != raw_crc {
        spare.push(data);
        return Err(f.bad("the decompressed pages do not match their checksum"));
    }
    let pages = list.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
    Ok(Msg::Pages { epoch, pages, data })
}

/// A compressed frame's payload of length `len` and its checksum (over the header's kind and
/// length too), read whole and checked: the payload, then the four checksum bytes.
fn read_checked(r: &mut impl Read, header: &[u8; 9], len: usize, name: &'static str) -> Result<Vec<u8>, WireError> {
    let mut payload = vec![0u8; len + 4];
    if read_full(r, &mut payload)? != payload.len() {
        return Err(WireError::Truncated(name));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[4..]);
    crc.update(&payload[..len]);
    if crc.finalize().to_le_bytes() != payload[len..] {
        return Err(WireError::BadChecksum(name));
    }
    Ok(payload)
}

/// The LZ4 block left in `f`, decompressed into a recycled buffer that must come out exactly
/// `raw` bytes long (the buffer goes back to `spare` on an error).
fn decompress(f: &Fields, raw: usize, spare: &mut Vec<Vec<u8>>) -> Result<Vec<u8>, WireError> {
    let mut data = spare.pop().unwrap_or_default();
    data.resize(raw, 0);
    match lz4_flex::block::decompress_into(f.rest, &mut data) {
        Ok(got) if got == raw => Ok(data),
        Ok(got) => {
            spare.push(data);
            Err(f.bad(format!("the block decompressed to {got} bytes, not the {raw} announced")))
        }
        Err(e) => {
            spare.push(data);
            Err(f.bad(format!("the block does not decompress: {e}")))
        }
    }
}

/// The rest of a delta pages frame: read whole, checked, then its block decompressed into a
/// recycled buffer of exactly the announced pages (still XOR'd: [`crate::delta::resolve`]
/// applies them to their base).
fn read_pages_delta(r: &mut impl Read, header: &[u8; 9], len: usize, spare: &mut Vec<Vec<u8>>) -> Result<Msg, WireError> {
    let name = kind_name(K_PAGES_DELTA);
    let payload = read_checked(r, header, len, name)?;
    let mut f = Fields { kind: name, rest: &payload[..len] };
    let epoch = f.u64("epoch")?;
    let n = f.u32("page count")? as usize;
    let list = f.take(n.checked_mul(8).ok_or_else(|| f.bad("page count overflows"))?, "page numbers")?;
    let crcs = f.take(n.checked_mul(4).ok_or_else(|| f.bad("page count overflows"))?, "base checksums")?;
    let raw = f.u32("data length")? as usize;
    let pages_crc = f.u32("pages checksum")?;
    if n.checked_mul(PAGE) != Some(raw) || raw > MAX_PAYLOAD {
        return Err(f.bad(format!("{n} pages announced but {raw} bytes of data")));
    }
    let xor = decompress(&f, raw, spare)?;
    let pages = list.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
    let base_crcs = crcs.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap_or([0; 4]))).collect();
    Ok(Msg::PagesDelta { epoch, pages, base_crcs, pages_crc, xor })
}

/// Decodes a whole frame held in `bytes` (which must contain exactly one frame).
pub fn decode(bytes: &[u8]) -> Result<Msg, WireError> {
    let mut r = bytes;
    let msg = read_msg(&mut r)?;
    if !r.is_empty() {
        return Err(WireError::Malformed { kind: msg.kind(), reason: format!("{} bytes after the frame", r.len()) });
    }
    Ok(msg)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, WireError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e.to_string())),
        }
    }
    Ok(n)
}

/// A cursor over a payload that reports what is missing.
struct Fields<'a> {
    kind: &'static str,
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn bad(&self, reason: impl Into<String>) -> WireError {
        WireError::Malformed { kind: self.kind, reason: reason.into() }
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(self.bad(format!("cut short in {what}")));
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }
    fn u64(&mut self, what: &str) -> Result<u64, WireError> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }
    fn u32(&mut self, what: &str) -> Result<u32, WireError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
    }
    fn bytes(&mut self, what: &str) -> Result<&'a [u8], WireError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    fn text(&mut self, what: &str) -> Result<String, WireError> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad(format!("{what} is not UTF-8")))
    }
    fn end(&self) -> Result<(), WireError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.bad(format!("{} unexpected trailing bytes", self.rest.len())))
        }
    }
}

fn decode_payload(kind: u8, payload: Vec<u8>) -> Result<Msg, WireError> {
    let name = kind_name(kind);
    let mut f = Fields { kind: name, rest: &payload };
    let msg = match kind {
        K_HELLO => {
            let session = f.u64("session")?;
            let mem_bytes = f.u64("memory size")?;
            let vm = f.text("VM name")?;
            let config = std::mem::take(&mut f.rest).to_vec();
            Msg::Hello { session, vm, mem_bytes, config }
        }
        K_SYNC => {
            let first_page = f.u64("first page")?;
            let data = std::mem::take(&mut f.rest).to_vec();
            if data.is_empty() || !data.len().is_multiple_of(PAGE) {
                return Err(f.bad(format!("{} bytes of memory is not a positive number of whole pages", data.len())));
            }
            Msg::Sync { first_page, data }
        }
        K_DISK_SYNC => {
            let offset = f.u64("offset")?;
            let data = std::mem::take(&mut f.rest).to_vec();
            Msg::DiskSync { offset, data }
        }
        K_SYNC_END => {
            let pages = f.u64("page count")?;
            let disk_chunks = f.u64("disk chunk count")?;
            f.end()?;
            Msg::SyncEnd { pages, disk_chunks }
        }
        K_DISK => {
            let epoch = f.u64("epoch")?;
            let offset = f.u64("offset")?;
            let data = std::mem::take(&mut f.rest).to_vec();
            Msg::DiskWrite { epoch, offset, data }
        }
        K_PAGES => {
            let epoch = f.u64("epoch")?;
            let n = f.u32("page count")? as usize;
            let list = f.take(n.checked_mul(8).ok_or_else(|| f.bad("page count overflows"))?, "page numbers")?;
            let pages: Vec<u64> = list.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
            let data = std::mem::take(&mut f.rest).to_vec();
            if data.len() != n * PAGE {
                return Err(f.bad(format!("{n} pages announced but {} bytes of data", data.len())));
            }
            Msg::Pages { epoch, pages, data }
        }
        K_COMMIT => {
            let epoch = f.u64("epoch")?;
            let guest_ns = f.u64("guest clock")?;
            let pages = f.u64("page count")?;
            let disk_writes = f.u64("disk write count")?;
            let vcpu = std::mem::take(&mut f.rest).to_vec();
            Msg::Commit { epoch, guest_ns, pages, disk_writes, vcpu }
        }
        K_OUTPUT => {
            let epoch = f.u64("epoch")?;
            let released = f.u64("released epoch")?;
            let frames = std::mem::take(&mut f.rest).to_vec();
            if let Err(reason) = check_frames(&frames) {
                return Err(f.bad(reason));
            }
            Msg::Output { epoch, released, frames }
        }
        K_INPUT => {
            let epoch = f.u64("epoch")?;
            let frames = std::mem::take(&mut f.rest).to_vec();
            if let Err(reason) = check_frames(&frames) {
                return Err(f.bad(reason));
            }
            Msg::Input { epoch, frames }
        }
        K_ACK => {
            let epoch = f.u64("epoch")?;
            f.end()?;
            Msg::Ack { epoch }
        }
        K_REFUSE => {
            let epoch = f.u64("epoch")?;
            let reason = String::from_utf8_lossy(std::mem::take(&mut f.rest)).into_owned();
            Msg::Refuse { epoch, reason }
        }
        K_HEARTBEAT => {
            let seq = f.u64("sequence")?;
            f.end()?;
            Msg::Heartbeat { seq }
        }
        K_HANDOVER => {
            let epoch = f.u64("epoch")?;
            let paused_ns = f.u64("pause")?;
            f.end()?;
            Msg::Handover { epoch, paused_ns }
        }
        k => return Err(WireError::UnknownKind(k)),
    };
    Ok(msg)
}

/// Checks that `frames` is a sequence of network frames, each a 4-byte LE length (1 to
/// [`MAX_NET_FRAME`]) and its bytes.
pub fn check_frames(mut frames: &[u8]) -> Result<usize, String> {
    let mut n = 0;
    while !frames.is_empty() {
        let Some(len) = frames.get(..4) else { return Err(format!("output frame {n}: length cut short")) };
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len == 0 || len > MAX_NET_FRAME {
            return Err(format!("output frame {n}: length {len} outside 1..={MAX_NET_FRAME}"));
        }
        if frames.len() < 4 + len {
            return Err(format!("output frame {n}: {len} bytes announced, {} there", frames.len() - 4));
        }
        frames = &frames[4 + len..];
        n += 1;
    }
    Ok(n)
}

/// Writes an epoch's network output as [`Msg::Output`] frames of at most 16 MiB each, cut at
/// network-frame boundaries (nothing if there is no output).
pub fn write_output(w: &mut impl Write, epoch: u64, released: u64, mut frames: &[u8]) -> io::Result<()> {
    const CHUNK: usize = 16 << 20;
    while !frames.is_empty() {
        let mut cut = 0;
        while cut < frames.len() {
            let len = frames.get(cut..cut + 4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
            if cut > 0 && cut + 4 + len > CHUNK {
                break;
            }
            cut = (cut + 4 + len).min(frames.len());
        }
        let (chunk, rest) = frames.split_at(cut);
        write_msg(w, &Msg::Output { epoch, released, frames: chunk.to_vec() })?;
        frames = rest;
    }
    Ok(())
}

/// Splits a staged checkpoint's dirty pages into [`Msg::Pages`] frames of at most
/// [`PAGES_PER_FRAME`] pages, then writes the [`Msg::Commit`] frame.
pub fn write_checkpoint(w: &mut impl Write, epoch: u64, pages: &[u64], data: &[u8], commit: &Msg) -> io::Result<()> {
    for (i, chunk) in pages.chunks(PAGES_PER_FRAME).enumerate() {
        let start = i * PAGES_PER_FRAME * PAGE;
        let bytes = data.get(start..start + chunk.len() * PAGE).ok_or_else(|| io::Error::other("staged data shorter than its pages"))?;
        write_pages(w, epoch, chunk, bytes)?;
    }
    write_msg(w, commit)
}

/// What a sender keeps between checkpoints to encode their pages: buffers for the XOR'd
/// pages and the LZ4 block, and its copy of the backup's replica (the base of XOR deltas).
#[derive(Debug, Default)]
pub struct Encoder {
    xor: Vec<u8>,
    block: Vec<u8>,
    /// The session's copy of the backup's replica: every page written with this encoder is
    /// recorded in it (whatever the encoding); [`Encoding::Xor`] needs it complete.
    pub copy: Option<BackupCopy>,
}

impl Encoder {
    /// Whether checkpoints may be sent as XOR deltas (the copy is complete).
    pub fn delta_ready(&self) -> bool {
        self.copy.as_ref().is_some_and(BackupCopy::complete)
    }
}

/// As [`write_checkpoint`], each pages frame as `encoding` says, with `enc`'s buffers (every
/// page written is recorded in its copy of the backup's replica, if it has one;
/// [`Encoding::Xor`] needs that copy complete: an error otherwise, before anything is
/// written). Each pages frame is flushed as soon as it is written. Returns the bytes of page
/// frames written.
pub fn write_checkpoint_encoded(
    w: &mut impl Write,
    epoch: u64,
    pages: &[u64],
    data: &[u8],
    commit: &Msg,
    encoding: Encoding,
    enc: &mut Encoder,
) -> io::Result<u64> {
    if encoding == Encoding::Xor && !enc.delta_ready() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "XOR deltas without a complete copy of the backup's pages"));
    }
    let Encoder { xor, block, copy } = enc;
    let mut bytes = 0u64;
    let per_frame = if encoding == Encoding::Raw { PAGES_PER_FRAME } else { ENCODED_PAGES_PER_FRAME };
    for (i, chunk) in pages.chunks(per_frame).enumerate() {
        let start = i * per_frame * PAGE;
        let part = data.get(start..start + chunk.len() * PAGE).ok_or_else(|| io::Error::other("staged data shorter than its pages"))?;
        bytes += match (encoding, copy.as_ref()) {
            (Encoding::Xor, Some(c)) => write_pages_delta(w, epoch, chunk, part, c.memory(), xor, block)?,
            (Encoding::Lz4, _) => write_pages_lz4(w, epoch, chunk, part, block)?,
            _ => {
                write_pages(w, epoch, chunk, part)?;
                (9 + 12 + chunk.len() * 8 + part.len() + 4) as u64
            }
        };
        if let Some(c) = copy.as_mut() {
            c.record_pages(epoch, chunk, part).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        }
        // On the link now, not when a buffer fills: the backup counts its silence from the
        // last frame it read, and encoding the next one can take tens of milliseconds.
        w.flush()?;
    }
    write_msg(w, commit)?;
    Ok(bytes)
}

/// Writes one [`Msg::PagesDelta`] frame for `pages` (their new contents in `data`) against
/// `base`, the backup's memory as the sender last sent it (`xor` and `block`: buffers kept
/// between calls); returns the frame's bytes.
pub fn write_pages_delta(
    w: &mut impl Write,
    epoch: u64,
    pages: &[u64],
    data: &[u8],
    base: &[u8],
    xor: &mut Vec<u8>,
    block: &mut Vec<u8>,
) -> io::Result<u64> {
    let base_crcs = crate::delta::encode(epoch, pages, data, base, xor).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let pages_crc = crate::delta::pages_crc(epoch, pages, data);
    write_delta_frame(w, epoch, pages, &base_crcs, pages_crc, xor, block)
}

/// Writes a delta pages frame: the fields, then `xor` compressed as one LZ4 block (in
/// `block`); returns the frame's bytes.
fn write_delta_frame(
    w: &mut impl Write,
    epoch: u64,
    pages: &[u64],
    base_crcs: &[u32],
    pages_crc: u32,
    xor: &[u8],
    block: &mut Vec<u8>,
) -> io::Result<u64> {
    if xor.len() != pages.len() * PAGE || base_crcs.len() != pages.len() || xor.len() > MAX_PAYLOAD {
        return Err(io::Error::other(format!("{} bytes and {} base checksums for {} pages", xor.len(), base_crcs.len(), pages.len())));
    }
    let mut head = Vec::with_capacity(20 + pages.len() * 12);
    head.extend_from_slice(&epoch.to_le_bytes());
    head.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    for p in pages {
        head.extend_from_slice(&p.to_le_bytes());
    }
    for c in base_crcs {
        head.extend_from_slice(&c.to_le_bytes());
    }
    head.extend_from_slice(&(xor.len() as u32).to_le_bytes());
    head.extend_from_slice(&pages_crc.to_le_bytes());
    block.resize(lz4_flex::block::get_maximum_output_size(xor.len()), 0);
    let n = lz4_flex::block::compress_into(xor, block).map_err(io::Error::other)?;
    write_frame(w, K_PAGES_DELTA, &head, &block[..n])
}

/// Writes a frame of `kind` whose payload is `head` then `bulk`; returns its bytes.
fn write_frame(w: &mut impl Write, kind: u8, head: &[u8], bulk: &[u8]) -> io::Result<u64> {
    let len = head.len() + bulk.len();
    if len > MAX_PAYLOAD {
        return Err(io::Error::other(format!("{} frame of {len} bytes", kind_name(kind))));
    }
    let mut header = [0u8; 9];
    header[..4].copy_from_slice(&MAGIC);
    header[4] = kind;
    header[5..].copy_from_slice(&(len as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[4..]);
    crc.update(head);
    crc.update(bulk);
    w.write_all(&header)?;
    w.write_all(head)?;
    w.write_all(bulk)?;
    w.write_all(&crc.finalize().to_le_bytes())?;
    Ok((9 + len + 4) as u64)
}

/// Writes one [`Msg::Pages`] frame with its page data compressed as one LZ4 block (in
/// `scratch`); returns the frame's bytes.
pub fn write_pages_lz4(w: &mut impl Write, epoch: u64, pages: &[u64], data: &[u8], scratch: &mut Vec<u8>) -> io::Result<u64> {
    if data.len() != pages.len() * PAGE || data.len() > MAX_PAYLOAD {
        return Err(io::Error::other(format!("{} bytes of data for {} pages", data.len(), pages.len())));
    }
    let mut head = Vec::with_capacity(16 + pages.len() * 8);
    head.extend_from_slice(&epoch.to_le_bytes());
    head.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    for p in pages {
        head.extend_from_slice(&p.to_le_bytes());
    }
    head.extend_from_slice(&(data.len() as u32).to_le_bytes());
    head.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    scratch.resize(lz4_flex::block::get_maximum_output_size(data.len()), 0);
    let n = lz4_flex::block::compress_into(data, scratch).map_err(io::Error::other)?;
    let block = &scratch[..n];
    let len = head.len() + block.len();
    if len > MAX_PAYLOAD {
        return Err(io::Error::other(format!("compressed pages frame of {len} bytes")));
    }
    let mut header = [0u8; 9];
    header[..4].copy_from_slice(&MAGIC);
    header[4] = K_PAGES_LZ4;
    header[5..].copy_from_slice(&(len as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[4..]);
    crc.update(&head);
    crc.update(block);
    w.write_all(&header)?;
    w.write_all(&head)?;
    w.write_all(block)?;
    w.write_all(&crc.finalize().to_le_bytes())?;
    Ok((9 + len + 4) as u64)
}

/// Writes one [`Msg::Pages`] frame from borrowed slices (no copy of the page data).
pub fn write_pages(w: &mut impl Write, epoch: u64, pages: &[u64], data: &[u8]) -> io::Result<()> {
    let mut head = Vec::with_capacity(12 + pages.len() * 8);
    head.extend_from_slice(&epoch.to_le_bytes());
    head.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    for p in pages {
        head.extend_from_slice(&p.to_le_bytes());
    }
    let len = head.len() + data.len();
    let mut header = [0u8; 9];
    header[..4].copy_from_slice(&MAGIC);
    header[4] = K_PAGES;
    header[5..].copy_from_slice(&(len as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[4..]);
    crc.update(&head);
    crc.update(data);
    w.write_all(&header)?;
    w.write_all(&head)?;
    w.write_all(data)?;
    w.write_all(&crc.finalize().to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressed_frame() -> (Msg, Vec<u8>) {
        // Pages as guests leave them: mostly zeros, a few words, one page of noise.
        let mut data = vec![0u8; 4 * PAGE];
        for (i, b) in data.iter_mut().enumerate().step_by(509) {
            *b = i as u8;
        }
        for (i, b) in data[3 * PAGE..].iter_mut().enumerate() {
            *b = (i.wrapping_mul(2654435761) >> 13) as u8;
        }
        let msg = Msg::Pages { epoch: 3, pages: vec![1, 4, 5, 9], data: data.clone() };
        let mut bytes = Vec::new();
        let n = write_pages_lz4(&mut bytes, 3, &[1, 4, 5, 9], &data, &mut Vec::new()).expect("write");
        assert_eq!(n as usize, bytes.len());
        (msg, bytes)
    }

    #[test]
    fn compressed_pages_round_trip_and_are_smaller() {
        let (msg, bytes) = compressed_frame();
        assert!(bytes.len() < 2 * PAGE, "{} bytes for 4 pages", bytes.len());
        assert_eq!(decode(&bytes), Ok(msg.clone()));
        let mut spare = vec![vec![0x55; 9 * PAGE]];
        assert_eq!(read_msg_recycling(&mut &bytes[..], &mut spare), Ok(msg));
    }

    #[test]
    fn every_flipped_byte_of_a_compressed_frame_is_refused() {
        let (_, bytes) = compressed_frame();
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = bytes.clone();
                bad[i] ^= bit;
                assert!(decode(&bad).is_err(), "byte {i} bit {bit:#x} flipped was accepted");
            }
        }
    }

    #[test]
    fn a_damaged_block_under_a_valid_checksum_is_refused_not_applied() {
        // A CRC fixed up after the damage (a bug, or someone on the path): the block itself
        // must still be checked.
        let (_, bytes) = compressed_frame();
        let len = bytes.len();
        for at in [9 + 12 + 32 + 8, len / 2, len - 6] {
            let mut bad = bytes.clone();
            bad[at] ^= 0xff;
            let mut crc = crc32fast::Hasher::new();
            crc.update(&bad[4..len - 4]);
            let c = crc.finalize().to_le_bytes();
            bad[len - 4..].copy_from_slice(&c);
            match decode(&bad) {
                Err(WireError::Malformed { kind: "compressed pages", .. }) => {}
                Ok(Msg::Pages { data, .. }) => panic!("byte {at}: decoded {} bytes", data.len()),
                other => panic!("byte {at}: {other:?}"),
            }
        }
        // A truncated block.
        let mut short = bytes[..len - 4 - 10].to_vec();
        let body = (short.len() - 9) as u32;
        short[5..9].copy_from_slice(&body.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&short[4..]);
        short.extend_from_slice(&crc.finalize().to_le_bytes());
        assert!(matches!(decode(&short), Err(WireError::Malformed { .. })), "{:?}", decode(&short));
    }

    #[test]
    fn pages_read_into_a_recycled_buffer_are_the_pages_sent() {
        let data: Vec<u8> = (0..3 * PAGE).map(|i| (i * 7 % 251) as u8).collect();
        let msg = Msg::Pages { epoch: 9, pages: vec![2, 3, 10], data };
        let bytes = encode(&msg);
        // A longer recycled buffer full of something else.
        let mut spare = vec![vec![0xAA; 5 * PAGE]];
        assert_eq!(read_msg_recycling(&mut &bytes[..], &mut spare), Ok(msg.clone()));
        assert!(spare.is_empty(), "the buffer was used");
        // A flipped byte in the page data: refused by the checksum, the buffer kept.
        let mut bad = bytes.clone();
        bad[9 + 12 + 24 + 100] ^= 1;
        let mut spare = vec![Vec::new()];
        assert_eq!(read_msg_recycling(&mut &bad[..], &mut spare), Err(WireError::BadChecksum("pages")));
        assert_eq!(spare.len(), 1);
        // Truncated inside the data.
        assert_eq!(read_msg_recycling(&mut &bytes[..bytes.len() - 5000], &mut Vec::new()), Err(WireError::Truncated("pages")));
    }
    use proptest::prelude::*;

    fn samples() -> Vec<Msg> {
        vec![
            Msg::Hello { session: 7, vm: "kv".into(), mem_bytes: 64 << 20, config: b"{\"x\":1}".to_vec() },
            Msg::Sync { first_page: 3, data: vec![9; 2 * PAGE] },
            Msg::DiskWrite { epoch: 4, offset: 512, data: vec![1; 512] },
            Msg::DiskSync { offset: 1 << 20, data: vec![3; 4096] },
            Msg::SyncEnd { pages: 16384, disk_chunks: 3 },
            Msg::Pages { epoch: 4, pages: vec![1, 5], data: vec![2; 2 * PAGE] },
            Msg::Commit { epoch: 4, guest_ns: 123, pages: 2, disk_writes: 1, vcpu: vec![5; 100] },
            Msg::Ack { epoch: 4 },
            Msg::Refuse { epoch: 5, reason: "bad".into() },
            Msg::Heartbeat { seq: 99 },
            Msg::Handover { epoch: 42, paused_ns: 7 },
            Msg::Output { epoch: 4, released: 3, frames: frames(&[&[1; 60], &[2; 1514]]) },
            Msg::Input { epoch: 5, frames: frames(&[&[3; 60]]) },
        ]
    }

    fn frames(list: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for f in list {
            v.extend_from_slice(&(f.len() as u32).to_le_bytes());
            v.extend_from_slice(f);
        }
        v
    }

    #[test]
    fn output_is_cut_at_frame_boundaries_and_bad_frames_are_named() {
        let big: Vec<u8> = vec![7; 60_000];
        let many: Vec<&[u8]> = std::iter::repeat_n(&big[..], 600).collect();
        let all = frames(&many);
        let mut out = Vec::new();
        write_output(&mut out, 9, 8, &all).expect("write");
        let mut r = &out[..];
        let mut got = Vec::new();
        let mut n = 0;
        while let Ok(Msg::Output { epoch: 9, released: 8, frames: f }) = read_msg(&mut r) {
            assert!(f.len() <= 16 << 20);
            got.extend(f);
            n += 1;
        }
        assert!(n >= 3, "{n} messages");
        assert_eq!(got, all);
        let mut none = Vec::new();
        write_output(&mut none, 1, 0, &[]).expect("write");
        assert!(none.is_empty());
        for (bad, want) in [
            (vec![1u8, 0], "length cut short"),
            (vec![0, 0, 0, 0], "outside 1..=65535"),
            (vec![9, 0, 0, 0, 1], "9 bytes announced, 1 there"),
        ] {
            let e = decode(&encode(&Msg::Output { epoch: 1, released: 0, frames: bad })).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            assert_eq!(decode(&encode(&m)), Ok(m));
        }
    }

    #[test]
    fn a_checkpoint_splits_into_frames_and_a_commit() {
        let pages: Vec<u64> = (0..2500).collect();
        let data: Vec<u8> = (0..2500 * PAGE).map(|i| (i / PAGE) as u8).collect();
        let commit = Msg::Commit { epoch: 1, guest_ns: 0, pages: 2500, disk_writes: 0, vcpu: vec![] };
        let mut out = Vec::new();
        write_checkpoint(&mut out, 1, &pages, &data, &commit).expect("write");
        let mut r = &out[..];
        let mut seen = vec![];
        loop {
            match read_msg(&mut r).expect("frame") {
                Msg::Pages { pages, data: d, .. } => {
                    for (i, p) in pages.iter().enumerate() {
                        assert_eq!(d[i * PAGE], *p as u8);
                    }
                    seen.extend(pages)
                }
                m => {
                    assert_eq!(m, commit);
                    break;
                }
            }
        }
        assert_eq!(seen, pages);
        assert_eq!(read_msg(&mut r), Err(WireError::Closed));
    }

    /// Each pages frame reaches the link as soon as it is written, even through a large
    /// buffer: the backup's silence timeout counts from the last frame it read. (Compressed
    /// frames of a 3,118-page checkpoint sat in the sender's 1 MiB buffer until the whole
    /// checkpoint was encoded: 83 ms of silence under load, past the 60 ms timeout, and the
    /// backup abandoned the synchronisation it had just received.)
    #[test]
    fn every_frame_of_a_checkpoint_is_flushed_as_it_is_written() {
        /// The link: what reached it, write by write.
        #[derive(Default)]
        struct Link(Vec<usize>);
        impl Write for Link {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.push(b.len());
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let pages: Vec<u64> = (0..3 * PAGES_PER_FRAME as u64).collect();
        let data = vec![0u8; pages.len() * PAGE];
        let commit = Msg::Commit { epoch: 1, guest_ns: 0, pages: pages.len() as u64, disk_writes: 0, vcpu: vec![] };
        for encoding in [Encoding::Lz4, Encoding::Raw] {
            let mut w = io::BufWriter::with_capacity(1 << 20, Link::default());
            write_checkpoint_encoded(&mut w, 1, &pages, &data, &commit, encoding, &mut Encoder::default()).expect("write");
            // Three frames on the link before the commit is written (it may wait for the
            // caller's flush).
            assert!(w.get_ref().0.len() >= 3, "{encoding:?}: {} writes reached the link", w.get_ref().0.len());
        }
    }

    #[test]
    fn damaged_frames_are_named() {
        let good = encode(&Msg::Ack { epoch: 3 });
        let mut flipped = good.clone();
        flipped[12] ^= 1;
        assert_eq!(decode(&flipped), Err(WireError::BadChecksum("ack")));
        assert_eq!(decode(&good[..good.len() - 1]), Err(WireError::Truncated("ack")));
        assert_eq!(decode(&good[..5]), Err(WireError::Truncated("header")));
        assert!(matches!(decode(b"HTTP/1.1 200 OK\r\n"), Err(WireError::BadMagic(_))));
        let mut long = good.clone();
        long[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&long), Err(WireError::TooLong(u32::MAX as usize)));
        let pages = Msg::Pages { epoch: 1, pages: vec![1, 2], data: vec![0; PAGE] };
        let e = decode(&encode(&pages)).unwrap_err().to_string();
        assert!(e.contains("2 pages announced but 4096 bytes"), "{e}");
        assert_eq!(decode(&[]), Err(WireError::Closed));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn mutated_frames_never_panic_and_never_decode_to_something_else(i in 0usize..11, pos in any::<usize>(), bit in 0u8..8) {
            let m = samples()[i].clone();
            let mut b = encode(&m);
            let p = pos % b.len();
            b[p] ^= 1 << bit;
            // A single flipped bit is always caught (by the magic, the length or the CRC).
            prop_assert_ne!(decode(&b), Ok(m));
        }
    }
}
