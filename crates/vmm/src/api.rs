//! The control API: a Unix stream socket carrying one JSON object per line. Requests are
//! [`Command`]s (`{"cmd":"pause"}`, `{"cmd":"snapshot","dir":"/x"}`, ...), answers are
//! [`Reply`]s (`{"ok":true,...}` or `{"ok":false,"error":"..."}`).
//!
//! Clients are untrusted: each is served on its own thread (at most [`MAX_CLIENTS`] at once;
//! one more is told so and closed), a request line is at most [`MAX_LINE`] bytes, a client
//! silent for [`IDLE_TIMEOUT`] (or not reading its replies for [`WRITE_TIMEOUT`]) is closed,
//! and every line, whatever its bytes, gets a reply.

use crate::control::{Command, Controller, Reply};
use crate::{Error, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Longest request line, in bytes (without the newline).
pub const MAX_LINE: usize = 64 << 10;
/// Most clients served at once.
pub const MAX_CLIENTS: usize = 16;
/// A client that sends no complete line for this long is disconnected.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that does not take its reply for this long is disconnected.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A running API server; the socket file is removed on drop, after the replies being written
/// are out (at most [`DRAIN`]): the reply to `quit` must reach its client before the process
/// that served it ends.
pub struct ApiServer {
    path: PathBuf,
    in_flight: Arc<AtomicUsize>,
}

/// Longest wait on drop for replies being written.
pub const DRAIN: Duration = Duration::from_secs(1);

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let t = std::time::Instant::now();
        while self.in_flight.load(Ordering::Acquire) > 0 && t.elapsed() < DRAIN {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Listens on `path` (replacing a stale socket file) and serves `controller` on a thread.
pub fn serve(path: &Path, controller: Controller) -> Result<ApiServer> {
    let api_err = |reason: String| Error::Api { path: path.to_owned(), reason };
    if path.exists() {
        std::fs::remove_file(path).map_err(|e| api_err(format!("cannot remove the old socket: {e}")))?;
    }
    let listener = unixsock::bind(path).map_err(|e| api_err(format!("cannot listen: {e}")))?;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let requests = in_flight.clone();
    std::thread::Builder::new()
        .name("vmm-api".into())
        .spawn(move || {
            let active = Arc::new(AtomicUsize::new(0));
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                if active.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                    active.fetch_sub(1, Ordering::AcqRel);
                    let _ = conn.set_write_timeout(Some(Duration::from_millis(100)));
                    let _ = send(&mut conn, &Reply::err(format!("too many control clients (at most {MAX_CLIENTS}); try again")));
                    continue;
                }
                let (controller, mine, requests) = (controller.clone(), active.clone(), requests.clone());
                let spawned = std::thread::Builder::new().name("vmm-api-client".into()).spawn(move || {
                    let _ = handle(conn, &controller, &requests);
                    mine.fetch_sub(1, Ordering::AcqRel);
                });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })
        .map_err(|e| api_err(format!("cannot start the API thread: {e}")))?;
    Ok(ApiServer { path: path.to_owned(), in_flight })
}

/// What reading one request line gave.
enum Line {
    Text(Vec<u8>),
    TooLong,
    End,
}

/// Reads up to and without the next newline, at most [`MAX_LINE`] bytes; a last line without
/// a newline counts.
fn read_line(r: &mut impl BufRead) -> std::io::Result<Line> {
    let mut line = Vec::new();
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(if line.is_empty() { Line::End } else { Line::Text(line) });
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_LINE {
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take + done as usize);
        if done {
            return Ok(Line::Text(line));
        }
    }
}

fn send(out: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut text = serde_json::to_string(reply).unwrap_or_else(|_| r#"{"ok":false,"error":"unserialisable reply"}"#.into());
    text.push('\n');
    out.write_all(text.as_bytes())
}

fn handle(conn: UnixStream, controller: &Controller, in_flight: &AtomicUsize) -> std::io::Result<()> {
    conn.set_read_timeout(Some(IDLE_TIMEOUT))?;
    conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut out = conn.try_clone()?;
    let mut input = BufReader::new(conn);
    loop {
        let line = match read_line(&mut input) {
            Ok(Line::Text(l)) => l,
            Ok(Line::End) => return Ok(()),
            Ok(Line::TooLong) => {
                return send(&mut out, &Reply::err(format!("bad request: a line longer than {MAX_LINE} bytes (connection closed)")))
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                let secs = IDLE_TIMEOUT.as_secs();
                return send(&mut out, &Reply::err(format!("no complete request for {secs} s (connection closed)")));
            }
            Err(e) => return Err(e),
        };
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        // Counted from the request to its reply written, so that the server's owner can wait
        // for it before the process ends.
        in_flight.fetch_add(1, Ordering::AcqRel);
        let reply = match std::str::from_utf8(&line) {
            Err(e) => Reply::err(format!("bad request: not UTF-8 text ({e})")),
            Ok(text) => match serde_json::from_str::<Command>(text) {
                Ok(cmd) => controller.call(cmd),
                Err(e) => Reply::err(format!("bad request: {e}")),
            },
        };
        let sent = send(&mut out, &reply);
        in_flight.fetch_sub(1, Ordering::AcqRel);
        sent?;
    }
}

/// Sends one command to the API socket at `path` and returns the reply.
pub fn call(path: &Path, cmd: &Command) -> Result<Reply> {
    call_within(path, cmd, None)
}

/// [`call`], giving up when the VM does not answer within `timeout` (a monitor must not hang
/// on a stuck VMM).
pub fn call_within(path: &Path, cmd: &Command, timeout: Option<Duration>) -> Result<Reply> {
    let api_err = |reason: String| Error::Api { path: path.to_owned(), reason };
    let mut conn = unixsock::connect(path).map_err(|e| api_err(format!("cannot connect: {e}")))?;
    conn.set_read_timeout(timeout).and_then(|_| conn.set_write_timeout(timeout)).map_err(|e| api_err(e.to_string()))?;
    let mut text = serde_json::to_string(cmd).map_err(|e| api_err(e.to_string()))?;
    text.push('\n');
    // The server may have answered and closed before reading (too many clients): a failed
    // send still leaves its reply to read.
    let sent = conn.write_all(text.as_bytes());
    let mut line = String::new();
    let read = BufReader::new(conn.take(1 << 30)).read_line(&mut line);
    match (sent, read) {
        (_, Ok(n)) if n > 0 => {}
        (Err(e), _) => return Err(api_err(format!("cannot send: {e}"))),
        (Ok(()), Err(e)) => return Err(api_err(format!("cannot read the reply: {e}"))),
        (Ok(()), Ok(_)) => return Err(api_err("the VM closed the connection without a reply".into())),
    }
    serde_json::from_str(&line).map_err(|e| api_err(format!("bad reply {line:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<String> {
        let mut r = std::io::BufReader::with_capacity(7, input);
        let mut out = vec![];
        loop {
            match read_line(&mut r).expect("read") {
                Line::Text(l) => out.push(String::from_utf8_lossy(&l).into_owned()),
                Line::TooLong => out.push("TOO LONG".into()),
                Line::End => return out,
            }
            if out.last().is_some_and(|l| l == "TOO LONG") {
                return out;
            }
        }
    }

    #[test]
    fn lines_are_split_and_bounded() {
        assert_eq!(lines(b"a\nbc\n\nlast"), ["a", "bc", "", "last"]);
        let mut long = vec![b'x'; MAX_LINE];
        long.push(b'\n');
        assert_eq!(lines(&long).len(), 1);
        long.insert(0, b'y');
        assert_eq!(lines(&long), ["TOO LONG"]);
    }
}
