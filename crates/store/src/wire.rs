//! The XenStore wire protocol (`xen/include/public/io/xs_wire.h`): every message is a 16-byte
//! header `{type, req_id, tx_id, len}` (u32, little-endian) followed by `len ≤ 4096` bytes of
//! payload. [`decode`] frames bytes into [`Msg`]s and never panics: a truncated message is
//! "need more bytes", an oversized one is an error after which the connection is closed.

/// Longest payload in either direction (`XENSTORE_PAYLOAD_MAX`).
pub const PAYLOAD_MAX: usize = 4096;
/// Size of the header.
pub const HEADER_LEN: usize = 16;

/// Message types (`enum xsd_sockmsg_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MsgType {
    Control = 0,
    Directory = 1,
    Read = 2,
    GetPerms = 3,
    Watch = 4,
    Unwatch = 5,
    TransactionStart = 6,
    TransactionEnd = 7,
    Introduce = 8,
    Release = 9,
    GetDomainPath = 10,
    Write = 11,
    Mkdir = 12,
    Rm = 13,
    SetPerms = 14,
    WatchEvent = 15,
    Error = 16,
    IsDomainIntroduced = 17,
    Resume = 18,
    SetTarget = 19,
    // 20 was XS_RESTRICT, removed from Xen.
    ResetWatches = 21,
    DirectoryPart = 22,
}

impl MsgType {
    pub fn from_u32(v: u32) -> Option<MsgType> {
        use MsgType::*;
        Some(match v {
            0 => Control,
            1 => Directory,
            2 => Read,
            3 => GetPerms,
            4 => Watch,
            5 => Unwatch,
            6 => TransactionStart,
            7 => TransactionEnd,
            8 => Introduce,
            9 => Release,
            10 => GetDomainPath,
            11 => Write,
            12 => Mkdir,
            13 => Rm,
            14 => SetPerms,
            15 => WatchEvent,
            16 => Error,
            17 => IsDomainIntroduced,
            18 => Resume,
            19 => SetTarget,
            21 => ResetWatches,
            22 => DirectoryPart,
            _ => return None,
        })
    }
}

/// One message: header fields and payload. `ty` stays a raw u32 so that unknown types can be
/// answered with `EINVAL` rather than dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub ty: u32,
    pub req_id: u32,
    pub tx_id: u32,
    pub payload: Vec<u8>,
}

/// Why a byte stream cannot be framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The header announces more than [`PAYLOAD_MAX`] bytes.
    TooLong(u32),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLong(n) => write!(f, "payload of {n} bytes exceeds XENSTORE_PAYLOAD_MAX ({PAYLOAD_MAX})"),
        }
    }
}

/// The header fields of the first 16 bytes.
pub fn parse_header(h: &[u8; HEADER_LEN]) -> (u32, u32, u32, u32) {
    let w = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    (w(0), w(4), w(8), w(12))
}

/// Frames one message from the front of `buf`: `Ok(None)` if more bytes are needed,
/// `Ok(Some((msg, consumed)))`, or an error if the stream cannot continue.
pub fn decode(buf: &[u8]) -> Result<Option<(Msg, usize)>, FrameError> {
    let Some(h) = buf.get(..HEADER_LEN) else { return Ok(None) };
    let mut hb = [0u8; HEADER_LEN];
    hb.copy_from_slice(h);
    let (ty, req_id, tx_id, len) = parse_header(&hb);
    if len as usize > PAYLOAD_MAX {
        return Err(FrameError::TooLong(len));
    }
    let end = HEADER_LEN + len as usize;
    let Some(payload) = buf.get(HEADER_LEN..end) else { return Ok(None) };
    Ok(Some((Msg { ty, req_id, tx_id, payload: payload.to_vec() }, end)))
}

impl Msg {
    pub fn new(ty: MsgType, req_id: u32, tx_id: u32, payload: Vec<u8>) -> Msg {
        Msg { ty: ty as u32, req_id, tx_id, payload }
    }

    /// Header and payload as bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        for v in [self.ty, self.req_id, self.tx_id, self.payload.len() as u32] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.payload);
        out
    }
}

/// Splits a payload into its nul-terminated strings; a final unterminated part is returned as
/// the last element (may be empty). Non-UTF-8 parts are `None`.
pub fn split(payload: &[u8]) -> Vec<&[u8]> {
    let mut parts: Vec<&[u8]> = payload.split(|b| *b == 0).collect();
    if payload.last() == Some(&0) {
        parts.pop();
    }
    parts
}

/// A payload of strings, each followed by a nul.
pub fn strings<S: AsRef<[u8]>>(items: &[S]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in items {
        out.extend_from_slice(s.as_ref());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_truncation() {
        let m = Msg::new(MsgType::Write, 7, 3, b"/a\0xyz".to_vec());
        let bytes = m.encode();
        assert_eq!(&bytes[..4], &11u32.to_le_bytes());
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), Ok(None));
        }
        assert_eq!(decode(&bytes), Ok(Some((m, bytes.len()))));
        let mut big = Msg::new(MsgType::Read, 0, 0, vec![]).encode();
        big[12..16].copy_from_slice(&4097u32.to_le_bytes());
        assert_eq!(decode(&big), Err(FrameError::TooLong(4097)));
    }

    #[test]
    fn splitting() {
        assert_eq!(split(b"a\0b\0"), vec![&b"a"[..], b"b"]);
        assert_eq!(split(b"a\0b"), vec![&b"a"[..], b"b"]);
        assert_eq!(split(b""), vec![&b""[..]]);
    }
}
