//! The control API: a Unix stream socket carrying one JSON object per line. Requests are
//! [`Command`]s (`{"cmd":"pause"}`, `{"cmd":"snapshot","dir":"/x"}`, ...), answers are
//! [`Reply`]s (`{"ok":true,...}` or `{"ok":false,"error":"..."}`).

use crate::control::{Command, Controller, Reply};
use crate::{Error, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// A running API server; the socket file is removed on drop.
pub struct ApiServer {
    path: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `path` (replacing a stale socket file) and serves `controller` on a thread.
pub fn serve(path: &Path, controller: Controller) -> Result<ApiServer> {
    let api_err = |reason: String| Error::Api { path: path.to_owned(), reason };
    if path.exists() {
        std::fs::remove_file(path).map_err(|e| api_err(format!("cannot remove the old socket: {e}")))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| api_err(format!("cannot listen: {e}")))?;
    std::thread::Builder::new()
        .name("vmm-api".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let _ = handle(conn, &controller);
            }
        })
        .map_err(|e| api_err(format!("cannot start the API thread: {e}")))?;
    Ok(ApiServer { path: path.to_owned() })
}

fn handle(conn: UnixStream, controller: &Controller) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    for line in BufReader::new(conn).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Command>(&line) {
            Ok(cmd) => controller.call(cmd),
            Err(e) => Reply::err(format!("bad request: {e}")),
        };
        let mut text = serde_json::to_string(&reply).unwrap_or_else(|_| r#"{"ok":false,"error":"unserialisable reply"}"#.into());
        text.push('\n');
        out.write_all(text.as_bytes())?;
    }
    Ok(())
}

/// Sends one command to the API socket at `path` and returns the reply.
pub fn call(path: &Path, cmd: &Command) -> Result<Reply> {
    let api_err = |reason: String| Error::Api { path: path.to_owned(), reason };
    let mut conn = UnixStream::connect(path).map_err(|e| api_err(format!("cannot connect: {e}")))?;
    let mut text = serde_json::to_string(cmd).map_err(|e| api_err(e.to_string()))?;
    text.push('\n');
    conn.write_all(text.as_bytes()).map_err(|e| api_err(format!("cannot send: {e}")))?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).map_err(|e| api_err(format!("cannot read the reply: {e}")))?;
    serde_json::from_str(&line).map_err(|e| api_err(format!("bad reply {line:?}: {e}")))
}
