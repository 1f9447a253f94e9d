//! The key-value server of the `kv` guest, without I/O: a parser for the Redis protocol (RESP2
//! request arrays and inline commands) and a store executing PING, ECHO, GET, SET, INCR, DECR,
//! INCRBY, DEL, EXISTS, MGET, MSET, DBSIZE, FLUSHALL, SELECT, CONFIG GET (what redis-cli and
//! redis-benchmark need), and ROTATE, a fixed CPU-bound computation for service benchmarks. Bytes in, bytes out; the guest feeds it from smoltcp sockets and the
//! `kv-native` binary from std TCP streams, so the VM-versus-native benchmark compares the
//! same logic. `no_std` + `alloc`.
#![no_std]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// Largest request the parser buffers (bulk strings included).
pub const MAX_REQUEST: usize = 1 << 20;
const MAX_ARGS: usize = 1024;

/// A request that cannot be parsed: the connection should be answered with the error and
/// closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub &'static str);

/// The keyspace.
#[derive(Default)]
pub struct Store {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Fault injection (N-version tests): every `wrong_every`-th reply is wrong; 0 never.
    wrong_every: u64,
    replies: u64,
    /// ROTATE's source image and result buffer (kept between calls).
    image: Vec<u8>,
    rotated: Vec<u8>,
    /// `DEBUG DIRTY MIB` asked for a background working set of that many MiB (the server that
    /// embeds the store applies it: [`Store::take_dirty_request`]).
    dirty_request: Option<u64>,
    /// `DEBUG WORK US` asked for that much busy work per request from now on (the embedding
    /// server applies it: [`Store::take_work_request`]).
    work_request: Option<u64>,
}

/// Largest side of ROTATE's square image (two buffers of its square in bytes).
pub const ROTATE_MAX: usize = 4096;

/// sin and cos of `deg` degrees (Taylor series; no libm in `no_std`).
fn sin_cos(deg: i64) -> (f64, f64) {
    let x = (deg.rem_euclid(360) as f64 - 180.0) * core::f64::consts::PI / 180.0;
    let (mut s, mut c, mut term_s, mut term_c) = (0.0, 0.0, x, 1.0);
    for k in 0..12 {
        s += term_s;
        c += term_c;
        let k = k as f64;
        term_s *= -x * x / ((2.0 * k + 2.0) * (2.0 * k + 3.0));
        term_c *= -x * x / ((2.0 * k + 1.0) * (2.0 * k + 2.0));
    }
    // x is deg − 180°: sin and cos change sign.
    (-s, -c)
}

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rotates a SIZE×SIZE 8-bit image (a fixed pattern) by `deg` degrees about its centre,
    /// nearest neighbour, and returns the sum of the result's pixels: the same work for the same
    /// arguments, a stand-in for an image-processing request.
    pub fn rotate(&mut self, n: usize, deg: i64) -> i64 {
        if self.image.len() != n * n {
            self.image = (0..n * n).map(|i| ((i % n) * 7 + (i / n) * 13 ^ (i % n) * (i / n)) as u8).collect();
            self.rotated = alloc::vec![0; n * n];
        }
        let (sin, cos) = sin_cos(deg);
        // 16.16 fixed point: source = R(−deg)·(destination − centre) + centre.
        let fixed = |v: f64| if v >= 0.0 { (v * 65536.0 + 0.5) as i64 } else { (v * 65536.0 - 0.5) as i64 };
        let (s, c) = (fixed(sin), fixed(cos));
        let half = ((n as i64 - 1) << 16) / 2;
        let mut sum = 0i64;
        for y in 0..n {
            let dy = ((y as i64) << 16) - half;
            for x in 0..n {
                let dx = ((x as i64) << 16) - half;
                let sx = (c * dx + s * dy) >> 16;
                let sy = (c * dy - s * dx) >> 16;
                let (ix, iy) = ((sx + half + 0x8000) >> 16, (sy + half + 0x8000) >> 16);
                let v = if ix >= 0 && iy >= 0 && (ix as usize) < n && (iy as usize) < n {
                    self.image[iy as usize * n + ix as usize]
                } else {
                    0
                };
                self.rotated[y * n + x] = v;
                sum += v as i64;
            }
        }
        sum
    }

    /// Makes one reply in `every` wrong (0: none), the way a design fault of one version
    /// would: still a valid reply, with another value (an integer one more, a string with a
    /// changed byte, an empty string instead of nil, `+OJ` instead of `+OK`).
    pub fn inject_wrong_answers(&mut self, every: u64) {
        self.wrong_every = every;
    }

    /// The background working set (MiB) `DEBUG DIRTY` last asked for, once.
    pub fn take_dirty_request(&mut self) -> Option<u64> {
        self.dirty_request.take()
    }

    /// The busy work per request (µs) `DEBUG WORK` last asked for, once.
    pub fn take_work_request(&mut self) -> Option<u64> {
        self.work_request.take()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Executes every complete request at the start of `input`, removes it from `input` and
    /// appends the replies to `out`. An incomplete request stays in `input`. A malformed one
    /// gets an error reply and `Err` (the caller closes the connection).
    pub fn serve(&mut self, input: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let mut pos = 0;
        let result = loop {
            match parse(&input[pos..]) {
                Ok(Some((args, used))) => {
                    pos += used;
                    if !args.is_empty() {
                        let start = out.len();
                        self.execute(&args, out);
                        let debug = args[0].eq_ignore_ascii_case(b"DEBUG");
                        self.replies += u64::from(!debug);
                        if !debug && self.wrong_every > 0 && self.replies % self.wrong_every == 0 {
                            corrupt(out, start);
                        }
                    }
                }
                Ok(None) => {
                    if input.len() - pos > MAX_REQUEST {
                        error(out, "ERR Protocol error: request too large");
                        break Err(ProtocolError("request too large"));
                    }
                    break Ok(());
                }
                Err(e) => {
                    out.extend_from_slice(b"-ERR Protocol error: ");
                    out.extend_from_slice(e.0.as_bytes());
                    out.extend_from_slice(b"\r\n");
                    break Err(e);
                }
            }
        };
        input.drain(..pos);
        result
    }

    fn execute(&mut self, args: &[&[u8]], out: &mut Vec<u8>) {
        let mut name = [0u8; 16];
        let cmd = args[0];
        let n = cmd.len().min(16);
        for (d, s) in name.iter_mut().zip(&cmd[..n]) {
            *d = s.to_ascii_uppercase();
        }
        let name = if cmd.len() > 16 { &b"?"[..] } else { &name[..n] };
        let argc = args.len();
        let arity = |ok: bool, out: &mut Vec<u8>| {
            if !ok {
                out.extend_from_slice(b"-ERR wrong number of arguments for '");
                out.extend_from_slice(cmd);
                out.extend_from_slice(b"' command\r\n");
            }
            ok
        };
        match name {
            b"PING" => {
                if argc == 2 {
                    bulk(out, Some(args[1]))
                } else if arity(argc == 1, out) {
                    out.extend_from_slice(b"+PONG\r\n")
                }
            }
            b"ECHO" if arity(argc == 2, out) => bulk(out, Some(args[1])),
            b"GET" if arity(argc == 2, out) => bulk(out, self.map.get(args[1]).map(|v| &v[..])),
            b"SET" if arity(argc >= 3, out) => {
                let mut nx = false;
                let mut xx = false;
                let mut i = 3;
                while i < argc {
                    match args[i].to_ascii_uppercase().as_slice() {
                        b"NX" => nx = true,
                        b"XX" => xx = true,
                        // Expiry is accepted and ignored: the guest keeps keys until deleted.
                        b"EX" | b"PX" | b"EXAT" | b"PXAT" => i += 1,
                        b"KEEPTTL" => {}
                        _ => return error(out, "ERR syntax error"),
                    }
                    i += 1;
                }
                if i > argc {
                    return error(out, "ERR syntax error");
                }
                let exists = self.map.contains_key(args[1]);
                if (nx && exists) || (xx && !exists) {
                    return bulk(out, None);
                }
                self.map.insert(args[1].to_vec(), args[2].to_vec());
                out.extend_from_slice(b"+OK\r\n");
            }
            b"INCR" if arity(argc == 2, out) => self.incr(args[1], 1, out),
            b"DECR" if arity(argc == 2, out) => self.incr(args[1], -1, out),
            b"INCRBY" | b"DECRBY" if arity(argc == 3, out) => match parse_i64(args[2]) {
                Some(d) => self.incr(args[1], if name == b"DECRBY" { d.wrapping_neg() } else { d }, out),
                None => error(out, "ERR value is not an integer or out of range"),
            },
            b"DEL" if arity(argc >= 2, out) => {
                let n = args[1..].iter().filter(|k| self.map.remove(**k).is_some()).count();
                integer(out, n as i64)
            }
            b"EXISTS" if arity(argc >= 2, out) => {
                let n = args[1..].iter().filter(|k| self.map.contains_key(**k)).count();
                integer(out, n as i64)
            }
            b"MGET" if arity(argc >= 2, out) => {
                array_header(out, argc - 1);
                for k in &args[1..] {
                    bulk(out, self.map.get(*k).map(|v| &v[..]));
                }
            }
            b"MSET" if arity(argc >= 3 && argc % 2 == 1, out) => {
                for kv in args[1..].chunks_exact(2) {
                    self.map.insert(kv[0].to_vec(), kv[1].to_vec());
                }
                out.extend_from_slice(b"+OK\r\n");
            }
            b"DBSIZE" => integer(out, self.map.len() as i64),
            b"ROTATE" if arity(argc <= 3, out) => {
                let size = if argc > 1 { parse_i64(args[1]) } else { Some(2000) };
                let deg = if argc > 2 { parse_i64(args[2]) } else { Some(20) };
                match (size, deg) {
                    (Some(n), Some(d)) if (1..=ROTATE_MAX as i64).contains(&n) => {
                        let sum = self.rotate(n as usize, d);
                        integer(out, sum)
                    }
                    _ => error(out, "ERR usage: ROTATE [SIZE 1..4096] [DEGREES]"),
                }
            }
            b"FLUSHALL" | b"FLUSHDB" => {
                self.map.clear();
                out.extend_from_slice(b"+OK\r\n");
            }
            b"SELECT" | b"QUIT" => out.extend_from_slice(b"+OK\r\n"),
            // Fault injection (`vigil fail --instance VM#K --wrong N`): from now on one reply
            // in N is wrong.
            b"DEBUG" if argc == 3 && args[1].eq_ignore_ascii_case(b"WRONG-ANSWERS") => match parse_i64(args[2]) {
                Some(n) if n >= 0 => {
                    self.wrong_every = n as u64;
                    self.replies = 0;
                    out.extend_from_slice(b"+OK\r\n");
                }
                _ => error(out, "ERR value is not an integer or out of range"),
            },
            // Load injection: from now on the server rewrites a working set of N MiB whenever
            // no request waits (the kv guest's `BUSY_MIB`), dirtying memory for checkpoints.
            b"DEBUG" if argc == 3 && args[1].eq_ignore_ascii_case(b"DIRTY") => match parse_i64(args[2]) {
                Some(n) if (0..=1024).contains(&n) => {
                    self.dirty_request = Some(n as u64);
                    out.extend_from_slice(b"+OK\r\n");
                }
                _ => error(out, "ERR usage: DEBUG DIRTY MIB (0..1024)"),
            },
            // Drift injection: from now on each request costs US µs of busy work more (the kv
            // guest's `work_us`), as a guest slower than its model would be.
            b"DEBUG" if argc == 3 && args[1].eq_ignore_ascii_case(b"WORK") => match parse_i64(args[2]) {
                Some(n) if (0..=1_000_000).contains(&n) => {
                    self.work_request = Some(n as u64);
                    out.extend_from_slice(b"+OK\r\n");
                }
                _ => error(out, "ERR usage: DEBUG WORK US (0..1000000)"),
            },
            b"CONFIG" if argc >= 3 && args[1].eq_ignore_ascii_case(b"GET") => {
                // No configuration to speak of: every asked parameter reads as empty.
                array_header(out, (argc - 2) * 2);
                for p in &args[2..] {
                    bulk(out, Some(p));
                    bulk(out, Some(b""));
                }
            }
            b"ECHO" | b"GET" | b"SET" | b"INCR" | b"DECR" | b"INCRBY" | b"DECRBY" | b"DEL" | b"EXISTS" | b"MGET" | b"MSET" | b"ROTATE" => {} // wrong arity, already answered
            _ => {
                out.extend_from_slice(b"-ERR unknown command '");
                out.extend(cmd.iter().take(64).filter(|c| c.is_ascii_graphic()));
                out.extend_from_slice(b"'\r\n");
            }
        }
    }

    fn incr(&mut self, key: &[u8], by: i64, out: &mut Vec<u8>) {
        let cur = match self.map.get(key) {
            None => 0,
            Some(v) => match parse_i64(v) {
                Some(n) => n,
                None => return error(out, "ERR value is not an integer or out of range"),
            },
        };
        let Some(next) = cur.checked_add(by) else {
            return error(out, "ERR increment or decrement would overflow");
        };
        let mut text = Vec::new();
        push_i64(&mut text, next);
        self.map.insert(key.to_vec(), text);
        integer(out, next);
    }
}

/// Parses one request: `Ok(None)` when incomplete, else the arguments and the bytes used.
/// A parsed request's arguments and the number of bytes it took.
type Parsed<'a> = (Vec<&'a [u8]>, usize);

fn parse(b: &[u8]) -> Result<Option<Parsed<'_>>, ProtocolError> {
    if b.is_empty() {
        return Ok(None);
    }
    if b[0] != b'*' {
        // Inline command: words up to the end of the line.
        let Some(end) = find_crlf(b, 0).or_else(|| b.iter().position(|c| *c == b'\n')) else {
            return Ok(None);
        };
        let line = &b[..end];
        let used = if b.get(end) == Some(&b'\r') { end + 2 } else { end + 1 };
        let args: Vec<&[u8]> = line.split(|c| *c == b' ' || *c == b'\r').filter(|w| !w.is_empty()).collect();
        return Ok(Some((args, used.min(b.len()))));
    }
    let Some(end) = find_crlf(b, 1) else { return Ok(None) };
    let n = parse_len(&b[1..end]).ok_or(ProtocolError("invalid multibulk length"))?;
    if n > MAX_ARGS {
        return Err(ProtocolError("too many arguments"));
    }
    let mut pos = end + 2;
    let mut args = Vec::with_capacity(n);
    for _ in 0..n {
        if pos >= b.len() {
            return Ok(None);
        }
        if b[pos] != b'$' {
            return Err(ProtocolError("expected '$'"));
        }
        let Some(end) = find_crlf(b, pos + 1) else { return Ok(None) };
        let len = parse_len(&b[pos + 1..end]).ok_or(ProtocolError("invalid bulk length"))?;
        if len > MAX_REQUEST {
            return Err(ProtocolError("bulk string too large"));
        }
        let start = end + 2;
        if b.len() < start + len + 2 {
            return Ok(None);
        }
        if &b[start + len..start + len + 2] != b"\r\n" {
            return Err(ProtocolError("bulk string not followed by CRLF"));
        }
        args.push(&b[start..start + len]);
        pos = start + len + 2;
    }
    Ok(Some((args, pos)))
}

/// Makes the reply that starts at `start` of `out` wrong and keeps it a valid reply.
fn corrupt(out: &mut Vec<u8>, start: usize) {
    if &out[start..] == b"$-1\r\n" {
        out.truncate(start);
        out.extend_from_slice(b"$0\r\n\r\n");
        return;
    }
    // The last byte before the final CRLF: a digit goes one up (9 to 8), a letter changes.
    let Some(i) = out.len().checked_sub(3).filter(|&i| i > start) else { return };
    out[i] = match out[i] {
        b'9' => b'8',
        d @ b'0'..=b'8' => d + 1,
        b'K' => b'J',
        c => c ^ 1,
    };
}

fn find_crlf(b: &[u8], from: usize) -> Option<usize> {
    b.get(from..)?.windows(2).position(|w| w == b"\r\n").map(|p| p + from)
}

fn parse_len(b: &[u8]) -> Option<usize> {
    if b.is_empty() || b.len() > 10 || !b.iter().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(b.iter().fold(0usize, |a, c| a * 10 + (c - b'0') as usize))
}

fn parse_i64(b: &[u8]) -> Option<i64> {
    let (neg, digits) = match b.first() {
        Some(b'-') => (true, &b[1..]),
        _ => (false, b),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut v: i64 = 0;
    for c in digits {
        v = v.checked_mul(10)?.checked_sub((c - b'0') as i64)?;
    }
    if neg {
        Some(v)
    } else {
        v.checked_neg()
    }
}

fn push_i64(out: &mut Vec<u8>, v: i64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut x = v.unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (x % 10) as u8;
        x /= 10;
        if x == 0 {
            break;
        }
    }
    if v < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&buf[i..]);
}

fn integer(out: &mut Vec<u8>, v: i64) {
    out.push(b':');
    push_i64(out, v);
    out.extend_from_slice(b"\r\n");
}

fn array_header(out: &mut Vec<u8>, n: usize) {
    out.push(b'*');
    push_i64(out, n as i64);
    out.extend_from_slice(b"\r\n");
}

fn bulk(out: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        None => out.extend_from_slice(b"$-1\r\n"),
        Some(v) => {
            out.push(b'$');
            push_i64(out, v.len() as i64);
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
    }
}

fn error(out: &mut Vec<u8>, msg: &str) {
    out.push(b'-');
    out.extend_from_slice(msg.as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use alloc::vec;

    fn run(store: &mut Store, input: &[u8]) -> Vec<u8> {
        let mut i = input.to_vec();
        let mut o = vec![];
        store.serve(&mut i, &mut o).expect("well-formed");
        assert!(i.is_empty(), "left {:?}", std::string::String::from_utf8_lossy(&i));
        o
    }

    #[test]
    fn rotate_is_a_rotation_and_refuses_bad_arguments() {
        let mut s = Store::new();
        let (sin, cos) = sin_cos(30);
        assert!((sin - 0.5).abs() < 1e-12 && (cos - 0.75f64.sqrt()).abs() < 1e-12, "{sin} {cos}");
        // 0° and 360° copy the image; 90° keeps every pixel of a square (its sum).
        let whole: i64 = {
            s.rotate(64, 0);
            s.image.iter().map(|&v| v as i64).sum()
        };
        assert_eq!(s.rotate(64, 0), whole);
        assert_eq!(s.rotate(64, 360), whole);
        assert_eq!(s.rotate(64, 90), whole);
        // 20° loses the corners.
        let r = s.rotate(64, 20);
        assert!(r < whole && r > whole / 2, "{r} of {whole}");
        assert_eq!(run(&mut s, b"ROTATE 64 20\r\n"), std::format!(":{r}\r\n").into_bytes());
        for bad in [&b"ROTATE 0\r\n"[..], b"ROTATE 5000\r\n", b"ROTATE x\r\n", b"ROTATE 4 5 6\r\n"] {
            assert!(run(&mut s, bad).starts_with(b"-ERR"), "{:?}", std::string::String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn injected_wrong_answers_are_valid_and_wrong() {
        let mut s = Store::new();
        s.inject_wrong_answers(2);
        assert_eq!(run(&mut s, b"INCR n\r\nINCR n\r\n"), b":1\r\n:3\r\n");
        assert_eq!(run(&mut s, b"GET x\r\nGET x\r\n"), b"$-1\r\n$0\r\n\r\n");
        assert_eq!(run(&mut s, b"SET a 1\r\nSET a 1\r\n"), b"+OK\r\n+OJ\r\n");
        assert_eq!(run(&mut s, b"INCR n\r\nINCR n\r\n"), b":3\r\n:5\r\n", "the state stays right");
        // Turned on and off at run time.
        assert_eq!(run(&mut s, b"DEBUG WRONG-ANSWERS 0\r\nINCR n\r\nINCR n\r\n"), b"+OK\r\n:5\r\n:6\r\n");
        assert_eq!(run(&mut s, b"DEBUG WRONG-ANSWERS 1\r\nINCR n\r\n"), b"+OK\r\n:8\r\n");
        // DEBUG DIRTY asks the embedding server for a working set, once.
        s.inject_wrong_answers(0);
        assert_eq!(run(&mut s, b"DEBUG DIRTY 4\r\nDEBUG DIRTY x\r\n"), b"+OK\r\n-ERR usage: DEBUG DIRTY MIB (0..1024)\r\n");
        assert_eq!((s.take_dirty_request(), s.take_dirty_request()), (Some(4), None));
        // DEBUG WORK likewise, for the busy work per request.
        assert_eq!(run(&mut s, b"DEBUG WORK 2000\r\nDEBUG WORK -1\r\n"), b"+OK\r\n-ERR usage: DEBUG WORK US (0..1000000)\r\n");
        assert_eq!((s.take_work_request(), s.take_work_request()), (Some(2000), None));
    }

    #[test]
    fn commands() {
        let mut s = Store::new();
        assert_eq!(run(&mut s, b"*1\r\n$4\r\nPING\r\n"), b"+PONG\r\n");
        assert_eq!(run(&mut s, b"PING\r\n"), b"+PONG\r\n");
        assert_eq!(run(&mut s, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv1\r\n"), b"+OK\r\n");
        assert_eq!(run(&mut s, b"*2\r\n$3\r\nget\r\n$1\r\nk\r\n"), b"$2\r\nv1\r\n");
        assert_eq!(run(&mut s, b"*2\r\n$3\r\nGET\r\n$1\r\nx\r\n"), b"$-1\r\n");
        assert_eq!(run(&mut s, b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n"), b":1\r\n:2\r\n");
        assert_eq!(run(&mut s, b"*2\r\n$4\r\nINCR\r\n$1\r\nk\r\n"), b"-ERR value is not an integer or out of range\r\n");
        assert_eq!(run(&mut s, b"*5\r\n$4\r\nMSET\r\n$1\r\na\r\n$1\r\n1\r\n$1\r\nb\r\n$1\r\n2\r\n"), b"+OK\r\n");
        assert_eq!(run(&mut s, b"*4\r\n$4\r\nMGET\r\n$1\r\na\r\n$1\r\nz\r\n$1\r\nb\r\n"), b"*3\r\n$1\r\n1\r\n$-1\r\n$1\r\n2\r\n");
        assert_eq!(run(&mut s, b"*3\r\n$3\r\nDEL\r\n$1\r\na\r\n$1\r\nz\r\n"), b":1\r\n");
        assert_eq!(run(&mut s, b"*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n$4\r\nsave\r\n"), b"*2\r\n$4\r\nsave\r\n$0\r\n\r\n");
        assert_eq!(run(&mut s, b"*1\r\n$3\r\nFOO\r\n"), b"-ERR unknown command 'FOO'\r\n");
        assert_eq!(run(&mut s, b"*1\r\n$3\r\nGET\r\n"), b"-ERR wrong number of arguments for 'GET' command\r\n");
        assert_eq!(run(&mut s, b"*3\r\n$6\r\nINCRBY\r\n$1\r\nn\r\n$2\r\n-5\r\n"), b":-3\r\n");
    }

    #[test]
    fn partial_requests_wait_for_more_bytes() {
        let mut s = Store::new();
        let full = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n";
        for cut in 0..full.len() {
            let mut i = full[..cut].to_vec();
            let mut o = vec![];
            s.serve(&mut i, &mut o).expect("partial is fine");
            assert!(o.is_empty());
            assert_eq!(i.len(), cut);
        }
    }

    #[test]
    fn malformed_requests_are_errors() {
        for bad in [&b"*x\r\n"[..], b"*1\r\n:3\r\n", b"*1\r\n$3\r\nGETXX\r\n", b"*99999\r\n"] {
            let mut s = Store::new();
            let mut i = bad.to_vec();
            let mut o = vec![];
            assert!(s.serve(&mut i, &mut o).is_err(), "{bad:?}");
            assert!(o.starts_with(b"-ERR Protocol error"));
        }
    }
}
