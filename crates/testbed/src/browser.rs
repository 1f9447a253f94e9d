//! A real browser for tests: Debian's headless `chromium`, driven through `chromedriver`
//! (package `chromium-driver`) with the W3C WebDriver protocol over plain HTTP on loopback.
//! Just what the dashboard test needs: open a page, read elements, run a script, take a
//! screenshot.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A headless Chromium session; the driver is killed when dropped.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
}

/// The W3C key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a headless session.
    pub fn start() -> Result<Browser, String> {
        if !Path::new(CHROMEDRIVER).exists() {
            return Err(format!("{CHROMEDRIVER} is missing (Debian packages chromium and chromium-driver)"));
        }
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{CHROMEDRIVER}: {e}"))?;
        let mut b = Browser { driver, port, session: String::new() };
        let t = Instant::now();
        while b.call("GET", "/status", None).is_err() {
            if t.elapsed() > Duration::from_secs(20) {
                return Err("chromedriver did not answer within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1500,1300"]}
        }}});
        let v = b.call("POST", "/session", Some(caps))?;
        b.session = v["sessionId"].as_str().ok_or_else(|| format!("no session id in {v}"))?.to_string();
        Ok(b)
    }

    /// One WebDriver command; the `value` of the answer, or the driver's error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut c = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
        // chromedriver wants HTTP/1.1 with the port in Host, and answers with a Content-Length
        // (it may keep the connection open).
        write!(
            c,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.port,
            body.len()
        )
        .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 65536];
        let (head, length) = loop {
            let n = c.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("chromedriver closed the connection: {}", String::from_utf8_lossy(&raw)));
            }
            raw.extend_from_slice(&buf[..n]);
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).into_owned();
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")).map(|(_, v)| v.trim().parse::<usize>())
                    })
                    .ok_or_else(|| format!("no Content-Length from chromedriver: {head}"))?
                    .map_err(|e| e.to_string())?;
                raw.drain(..end + 4);
                break (head, length);
            }
        };
        while raw.len() < length {
            let n = c.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("chromedriver ended its answer early".into());
            }
            raw.extend_from_slice(&buf[..n]);
        }
        let json = String::from_utf8_lossy(&raw[..length]).into_owned();
        let v: Value = serde_json::from_str(&json).map_err(|e| format!("{e}: {json}"))?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("{method} {path}: {}", v["value"]));
        }
        Ok(v.get("value").cloned().unwrap_or(v))
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    pub fn goto(&self, url: &str) -> Result<(), String> {
        self.session_call("POST", "/url", Some(json!({ "url": url }))).map(drop)
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub fn script(&self, script: &str) -> Result<Value, String> {
        self.session_call("POST", "/execute/sync", Some(json!({ "script": script, "args": [] })))
    }

    /// The visible text of the first element matching `css`.
    pub fn text(&self, css: &str) -> Result<String, String> {
        let e = self.session_call("POST", "/element", Some(json!({ "using": "css selector", "value": css })))?;
        let id = e[ELEMENT].as_str().ok_or_else(|| format!("no element {css}"))?.to_string();
        let t = self.session_call("GET", &format!("/element/{id}/text"), None)?;
        Ok(t.as_str().unwrap_or_default().to_string())
    }

    /// Waits (at most `timeout`) until `check` returns `Some`.
    pub fn wait_for<T>(&self, what: &str, timeout: Duration, mut check: impl FnMut(&Browser) -> Option<T>) -> Result<T, String> {
        let t = Instant::now();
        loop {
            if let Some(v) = check(self) {
                return Ok(v);
            }
            if t.elapsed() > timeout {
                let body = self.script("return document.body.innerText").unwrap_or_default();
                return Err(format!("waited {timeout:?} for {what}; the page shows:\n{}", body.as_str().unwrap_or_default()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Saves a PNG screenshot of the window.
    pub fn screenshot(&self, path: &Path) -> Result<(), String> {
        let v = self.session_call("GET", "/screenshot", None)?;
        let png = base64(v.as_str().ok_or("no screenshot data")?)?;
        if !png.starts_with(b"\x89PNG") {
            return Err("the screenshot is not a PNG".into());
        }
        std::fs::write(path, png).map_err(|e| format!("{}: {e}", path.display()))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Standard base64 (with padding) to bytes.
fn base64(s: &str) -> Result<Vec<u8>, String> {
    let val = |c: u8| -> Result<u32, String> {
        Ok(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("not base64: {:?}", c as char)),
        } as u32)
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= if c == b'=' { 0 } else { val(c)? } << (18 - 6 * i);
        }
        let b = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&b[..(chunk.len() - 1).saturating_sub(pad).min(3)]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes() {
        assert_eq!(super::base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(super::base64("aGk=").unwrap(), b"hi");
        assert_eq!(super::base64("YWJj").unwrap(), b"abc");
        assert!(super::base64("a*==").is_err());
    }
}
