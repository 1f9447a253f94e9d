//! Framing of the Redis protocol (RESP2) for the voter: where one client request ends and how
//! many replies it asks for, and where one server reply ends. Only boundaries, no meaning:
//! the voter compares whole replies byte for byte and never interprets them. Written for the
//! voter (not shared with `kv-core`), so a framing bug in the guest is not also the voter's.
//!
//! Bounded: a request or a reply longer than the limits given is an error, never a buffer
//! that grows without end.

/// Most arguments of one request (Redis's own limit is far higher; kv's is 1,024).
pub const MAX_ARGS: usize = 1024;
/// Deepest nesting of arrays in a reply.
pub const MAX_DEPTH: usize = 8;

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError(pub &'static str);

/// One complete request at the start of the input: its length in bytes and whether the server
/// answers it (an empty inline line and an empty array get no reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub len: usize,
    pub replies: bool,
}

/// Frames one request at the start of `b`: `Ok(None)` while incomplete (and not over `max`
/// bytes), `Err` when malformed or longer than `max`.
pub fn request(b: &[u8], max: usize) -> Result<Option<Request>, FrameError> {
    let r = request_inner(b, max)?;
    if r.is_none() && b.len() > max {
        return Err(FrameError("request too large"));
    }
    Ok(r)
}

fn request_inner(b: &[u8], max: usize) -> Result<Option<Request>, FrameError> {
    let Some(&first) = b.first() else { return Ok(None) };
    if first != b'*' {
        // Inline: a line ending in \n (or \r\n); words separated by spaces.
        let Some(end) = b.iter().position(|c| *c == b'\n') else { return Ok(None) };
        if end + 1 > max {
            return Err(FrameError("request too large"));
        }
        let words = b[..end].split(|c| *c == b' ' || *c == b'\r').any(|w| !w.is_empty());
        return Ok(Some(Request { len: end + 1, replies: words }));
    }
    let Some(eol) = crlf(b, 1) else { return Ok(None) };
    let n = number(&b[1..eol]).ok_or(FrameError("invalid multibulk length"))?;
    if n > MAX_ARGS {
        return Err(FrameError("too many arguments"));
    }
    let mut pos = eol + 2;
    for _ in 0..n {
        let Some(&tag) = b.get(pos) else { return Ok(None) };
        if tag != b'$' {
            return Err(FrameError("expected '$'"));
        }
        let Some(eol) = crlf(b, pos + 1) else { return Ok(None) };
        let len = number(&b[pos + 1..eol]).ok_or(FrameError("invalid bulk length"))?;
        if len > max {
            return Err(FrameError("request too large"));
        }
        let end = eol + 2 + len + 2;
        if end > max {
            return Err(FrameError("request too large"));
        }
        if b.len() < end {
            return Ok(None);
        }
        if &b[end - 2..end] != b"\r\n" {
            return Err(FrameError("bulk string not followed by CRLF"));
        }
        pos = end;
    }
    Ok(Some(Request { len: pos, replies: n > 0 }))
}

/// Frames one reply at the start of `b`: its length, `Ok(None)` while incomplete (and not
/// over `max` bytes), `Err` when malformed or longer than `max`.
pub fn reply(b: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    match reply_at(b, 0, 0, max)? {
        Some(len) => Ok(Some(len)),
        None if b.len() > max => Err(FrameError("reply too large")),
        None => Ok(None),
    }
}

fn reply_at(b: &[u8], pos: usize, depth: usize, max: usize) -> Result<Option<usize>, FrameError> {
    if depth > MAX_DEPTH {
        return Err(FrameError("reply nested too deeply"));
    }
    let Some(&tag) = b.get(pos) else { return Ok(None) };
    let Some(eol) = crlf(b, pos + 1) else {
        return if b.len() - pos > max { Err(FrameError("reply line too long")) } else { Ok(None) };
    };
    let line = &b[pos + 1..eol];
    let after = eol + 2;
    match tag {
        b'+' | b'-' => Ok(Some(after)),
        b':' => {
            let digits = line.strip_prefix(b"-").unwrap_or(line);
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return Err(FrameError("invalid integer reply"));
            }
            Ok(Some(after))
        }
        b'$' => {
            if line == b"-1" {
                return Ok(Some(after));
            }
            let len = number(line).ok_or(FrameError("invalid bulk reply length"))?;
            if len > max {
                return Err(FrameError("reply too large"));
            }
            let end = after + len + 2;
            if b.len() < end {
                return Ok(None);
            }
            if &b[end - 2..end] != b"\r\n" {
                return Err(FrameError("bulk reply not followed by CRLF"));
            }
            Ok(Some(end))
        }
        b'*' => {
            if line == b"-1" {
                return Ok(Some(after));
            }
            let n = number(line).ok_or(FrameError("invalid array reply length"))?;
            if n > max / 3 {
                return Err(FrameError("reply too large"));
            }
            let mut at = after;
            for _ in 0..n {
                match reply_at(b, at, depth + 1, max)? {
                    Some(next) => at = next,
                    None => return Ok(None),
                }
            }
            Ok(Some(at))
        }
        _ => Err(FrameError("unknown reply type")),
    }
}

fn crlf(b: &[u8], from: usize) -> Option<usize> {
    b.get(from..)?.windows(2).position(|w| w == b"\r\n").map(|p| p + from)
}

fn number(b: &[u8]) -> Option<usize> {
    if b.is_empty() || b.len() > 10 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0usize, |a, c| a * 10 + (c - b'0') as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    #[test]
    fn requests() {
        assert_eq!(request(b"PING\r\n", MAX), Ok(Some(Request { len: 6, replies: true })));
        assert_eq!(request(b"PING\nX", MAX), Ok(Some(Request { len: 5, replies: true })));
        assert_eq!(request(b"  \r\n", MAX), Ok(Some(Request { len: 4, replies: false })));
        assert_eq!(request(b"PIN", MAX), Ok(None));
        let set = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nvv\r\n";
        assert_eq!(request(set, MAX), Ok(Some(Request { len: set.len(), replies: true })));
        for cut in 0..set.len() {
            assert_eq!(request(&set[..cut], MAX), Ok(None), "cut at {cut}");
        }
        assert_eq!(request(b"*0\r\n", MAX), Ok(Some(Request { len: 4, replies: false })));
        assert!(request(b"*x\r\n", MAX).is_err());
        assert!(request(b"*1\r\n+PING\r\n", MAX).is_err());
        assert!(request(b"*1\r\n$4\r\nPINGxx", MAX).is_err());
        assert!(request(b"*99999\r\n", MAX).is_err());
    }

    #[test]
    fn requests_are_bounded() {
        assert_eq!(request(b"*1\r\n$100\r\n", 64), Err(FrameError("request too large")));
        assert_eq!(request(&[b'a'; 100], 64), Err(FrameError("request too large")));
        assert_eq!(request(&[b'a'; 60], 64), Ok(None));
    }

    #[test]
    fn replies() {
        for r in [
            &b"+OK\r\n"[..],
            b"-ERR x\r\n",
            b":12\r\n",
            b":-3\r\n",
            b"$-1\r\n",
            b"$3\r\nabc\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*2\r\n$1\r\na\r\n:1\r\n",
            b"*1\r\n*1\r\n+x\r\n",
        ] {
            assert_eq!(reply(r, MAX), Ok(Some(r.len())), "{}", String::from_utf8_lossy(r));
            for cut in 0..r.len() {
                assert_eq!(reply(&r[..cut], MAX), Ok(None), "cut {cut} of {}", String::from_utf8_lossy(r));
            }
            let mut two = r.to_vec();
            two.extend_from_slice(b"+next\r\n");
            assert_eq!(reply(&two, MAX), Ok(Some(r.len())));
        }
        assert!(reply(b"?\r\n", MAX).is_err());
        assert!(reply(b":x\r\n", MAX).is_err());
        assert!(reply(b"$3\r\nabcd\r\n", MAX).is_err());
        let deep = b"*1\r\n".repeat(20);
        assert_eq!(reply(&deep, MAX), Err(FrameError("reply nested too deeply")));
        assert!(reply(&[b'+'; 100], 64).is_err());
    }

    /// Arbitrary bytes never panic and a frame never claims more bytes than it was given.
    #[test]
    fn hostile_bytes() {
        let mut x = 0x9e3779b97f4a7c15u64;
        for _ in 0..20_000 {
            let len = (x % 40) as usize;
            let mut b = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.push(b"*$+-:\r\n0123abc"[(x % 14) as usize]);
            }
            if let Ok(Some(r)) = request(&b, 64) {
                assert!(r.len <= b.len());
            }
            if let Ok(Some(n)) = reply(&b, 64) {
                assert!(n <= b.len());
            }
            x = x.wrapping_add(1);
        }
    }
}
