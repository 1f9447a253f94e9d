//! A small, bounded HTTP/1.0 server for vigil's own endpoints (a VMM's replication metrics and
//! policy switch, the manager's dashboard): one request per connection, each connection on its
//! own thread (at most [`MAX_CONNECTIONS`]; more are answered 503 at once), request and header
//! lines and bodies bounded, and a client silent for 2 s dropped — so no client, however slow
//! or hostile, holds up another or grows memory. The handler is a plain function of the
//! request; everything else (routing, authentication) is the caller's.

use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Longest request line or header line, and most header lines.
pub const MAX_LINE: usize = 4096;
pub const MAX_HEADERS: usize = 64;
/// Largest request body.
pub const MAX_BODY: usize = 4096;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// A client silent (or not reading) this long is dropped.
pub const IDLE: Duration = Duration::from_secs(2);

/// A request, as far as vigil's endpoints care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without its query.
    pub path: String,
    pub query: String,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(status: &'static str, body: impl Into<String>) -> Response {
        Response { status, content_type: "text/plain; charset=utf-8", body: body.into().into_bytes() }
    }
    pub fn ok(content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response { status: "200 OK", content_type, body: body.into() }
    }
}

/// Serves `handler` on `listener` from a thread named `name`, until the process ends.
pub fn serve<F>(listener: TcpListener, name: &str, handler: F) -> std::io::Result<()>
where
    F: Fn(&Request) -> Response + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let open = Arc::new(AtomicUsize::new(0));
    let conn_name = format!("{name}-conn");
    std::thread::Builder::new().name(name.into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                open.fetch_sub(1, Ordering::SeqCst);
                let _ = conn.set_write_timeout(Some(IDLE));
                let _ = respond(&mut conn, &Response::text("503 Service Unavailable", "too many connections\n"));
                continue;
            }
            let (handler, open2) = (handler.clone(), open.clone());
            let spawned = std::thread::Builder::new().name(conn_name.clone()).spawn(move || {
                let _ = conn.set_read_timeout(Some(IDLE));
                let _ = conn.set_write_timeout(Some(IDLE));
                let resp = match read_request(&conn) {
                    Ok(req) => handler(&req),
                    Err(e) => Response::text("400 Bad Request", format!("{e}\n")),
                };
                let _ = respond(&mut conn, &resp);
                open2.fetch_sub(1, Ordering::SeqCst);
            });
            if spawned.is_err() {
                open.fetch_sub(1, Ordering::SeqCst);
            }
        }
    })?;
    Ok(())
}

/// Reads one request (line, headers, body), every part bounded.
pub fn read_request(conn: &TcpStream) -> Result<Request, String> {
    let mut r = BufReader::new(conn);
    let line = |r: &mut BufReader<&TcpStream>| -> Result<String, String> {
        match crate::arbiter::read_line(r, MAX_LINE) {
            Ok(Some(l)) => String::from_utf8(l).map_err(|_| "a request line that is not UTF-8".to_string()),
            Ok(None) => Err("the request ended early".into()),
            Err(e) => Err(format!("bad request: {e}")),
        }
    };
    let request = line(&mut r)?;
    let mut parts = request.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    if method.is_empty() || !target.starts_with('/') {
        return Err(format!("not an HTTP request line: {:?}", request.chars().take(80).collect::<String>()));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target, String::new()),
    };
    let (mut length, mut authorization) = (0usize, None);
    for n in 0.. {
        if n == MAX_HEADERS {
            return Err(format!("more than {MAX_HEADERS} header lines"));
        }
        let h = line(&mut r)?;
        let h = h.trim_end_matches('\r');
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().map_err(|_| "a bad Content-Length".to_string())?;
                if length > MAX_BODY {
                    return Err(format!("a body over {MAX_BODY} bytes"));
                }
            } else if k.eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_string());
            }
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body).map_err(|e| format!("the body: {e}"))?;
    Ok(Request { method, path, query, authorization, body })
}

fn respond(conn: &mut TcpStream, r: &Response) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.0 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    )?;
    conn.write_all(&r.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        serve(l, "test-http", |req| match req.path.as_str() {
            "/echo" => Response::ok("text/plain", format!("{} {} {}", req.method, req.query, String::from_utf8_lossy(&req.body))),
            _ => Response::text("404 Not Found", "no\n"),
        })
        .unwrap();
        a
    }

    fn ask(a: std::net::SocketAddr, raw: &[u8]) -> String {
        let mut c = TcpStream::connect(a).unwrap();
        c.write_all(raw).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    }

    #[test]
    fn answers_requests_and_garbage() {
        let a = server();
        let r = ask(a, b"POST /echo?x=1 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
        assert!(r.starts_with("HTTP/1.0 200 OK") && r.ends_with("POST x=1 abc"), "{r}");
        assert!(ask(a, b"GET /nothing HTTP/1.1\r\n\r\n").starts_with("HTTP/1.0 404"));
        assert!(ask(a, b"\x00\x01garbage\r\n\r\n").starts_with("HTTP/1.0 400"));
        assert!(ask(a, b"GET /echo HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n").contains("a body over 4096 bytes"));
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_LINE + 10));
        assert!(ask(a, long.as_bytes()).starts_with("HTTP/1.0 400"));
        let many = format!("GET /echo HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(MAX_HEADERS + 1));
        assert!(ask(a, many.as_bytes()).contains("header lines"));
    }

    #[test]
    fn silent_clients_do_not_block_others() {
        let a = server();
        // More silent clients than connection slots: the excess is refused at once, and once
        // the silent ones are dropped, requests are served again.
        let silent: Vec<TcpStream> = (0..MAX_CONNECTIONS + 4).map(|_| TcpStream::connect(a).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(200));
        let r = ask(a, b"GET /echo HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.0 503"), "{r}");
        std::thread::sleep(IDLE + Duration::from_millis(500));
        let r = ask(a, b"GET /echo HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.0 200"), "{r}");
        drop(silent);
    }
}
