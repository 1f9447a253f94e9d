//! Pre-copy live migration of a running VM, over the checkpoint machinery (docs/mms.md,
//! "Migration").
//!
//! The agent of the VM's host asks the VM's own process (`vigil vm run`) to protect the VM to a
//! backup on the destination ([`Request::Protect`]): the replication driver then copies all of
//! memory while the VM runs (the first round), then the pages dirtied since, checkpoint after
//! checkpoint — each a short pause that copies only the pages dirtied in the previous round —
//! until the backup holds a committed replica. Then the agent asks for the handover
//! ([`Request::Handover`]): the VM is paused for good, a last checkpoint (the pages dirtied
//! since the previous one, the vCPU and the devices) goes to the destination, and once it is
//! acknowledged the arbiter ends the source's lease early and the destination takes over at
//! once (`replication::primary`, "handover"). Fencing is the replication's: at every moment
//! exactly one copy may release output.
//!
//! The requests travel on a Unix socket beside the VM's control socket ([`socket_path`]),
//! one JSON line each way, served by the VM's process ([`serve`]) and bounded like the VMM's
//! control API: at most [`MAX_LINE`] bytes a line, 4 clients at once, 5 s of silence. It is
//! authenticated the way the control socket is: by the file's owner and mode (0600), in the
//! agent's run directory.

use crate::protection::Input;
use crate::vm::Protection;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::Duration;

/// Longest request line (bytes).
pub const MAX_LINE: usize = 16 << 10;
const MAX_CLIENTS: usize = 4;
const IDLE: Duration = Duration::from_secs(5);

/// What the agent asks of a running VM's process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "do")]
pub enum Request {
    /// Start protecting the VM to the backup (the destination): the pre-copy rounds.
    /// Idempotent: asked again for the same backup, it reports how far it got.
    Protect(Box<Protection>),
    /// Hand the VM over to its backup once it holds a committed replica — only if that backup
    /// is the one at `to` (the migration's destination), when given: a replicated VM is
    /// protected to another backup until its `Protect` replaced it.
    Handover {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
    },
    /// How far the migration got.
    Status,
    /// Run this checkpoint policy from the next checkpoint on (a protected VM's driver; the
    /// protection goes on, no new synchronisation). The manager adapts the `analysed` policy
    /// to the measured pauses this way.
    Policy { policy: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Answer {
    ok: bool,
    detail: String,
}

/// The migration socket of a VM whose control socket is `api`.
pub fn socket_path(api: &Path) -> PathBuf {
    let mut p = api.as_os_str().to_owned();
    p.push(".migrate");
    PathBuf::from(p)
}

/// A running migration socket; the file is removed on drop.
pub struct Server {
    path: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves the migration socket at `path`: each request becomes an [`Input::Migrate`] on `tx`
/// (the VM's process answers it), its answer goes back to the client.
pub fn serve(path: &Path, tx: Sender<Input>) -> std::io::Result<Server> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = unixsock::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new().name("migrate-api".into()).spawn(move || {
        let active = Arc::new(AtomicUsize::new(0));
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            if active.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                active.fetch_sub(1, Ordering::AcqRel);
                let _ = reply(&mut conn, Err("too many clients".into()));
                continue;
            }
            let (tx, mine) = (tx.clone(), active.clone());
            let _ = std::thread::Builder::new().name("migrate-client".into()).spawn(move || {
                handle(conn, &tx);
                mine.fetch_sub(1, Ordering::AcqRel);
            });
        }
    })?;
    Ok(Server { path: path.to_owned() })
}

fn handle(conn: UnixStream, tx: &Sender<Input>) {
    let _ = conn.set_read_timeout(Some(IDLE));
    let _ = conn.set_write_timeout(Some(IDLE));
    let Ok(mut w) = conn.try_clone() else { return };
    let mut r = BufReader::new(conn).take(MAX_LINE as u64 + 1);
    loop {
        let mut line = Vec::new();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') {
            let _ = reply(&mut w, Err(format!("request longer than {MAX_LINE} bytes")));
            return;
        }
        r.set_limit(MAX_LINE as u64 + 1);
        let answer = match serde_json::from_slice::<Request>(&line) {
            Err(e) => Err(format!("bad request: {e}")),
            Ok(req) => {
                let (atx, arx) = channel();
                if tx.send(Input::Migrate(req, atx)).is_err() {
                    Err("the VM has stopped".into())
                } else {
                    arx.recv_timeout(Duration::from_secs(2)).unwrap_or_else(|_| Err("the VM's process did not answer".into()))
                }
            }
        };
        if reply(&mut w, answer).is_err() {
            return;
        }
    }
}

fn reply(w: &mut UnixStream, r: Result<String, String>) -> std::io::Result<()> {
    let a = match r {
        Ok(detail) => Answer { ok: true, detail },
        Err(detail) => Answer { ok: false, detail },
    };
    let mut line = serde_json::to_vec(&a).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

/// Sends `req` to the migration socket at `path`; the answer's detail, or why not.
pub fn call(path: &Path, req: &Request) -> Result<String, String> {
    let mut s = unixsock::connect(path).map_err(|e| format!("migration socket {}: {e}", path.display()))?;
    // Short: the agent asks from its heartbeat loop (the VM's process answers from its
    // driver's loop, within a checkpoint's pause).
    s.set_read_timeout(Some(Duration::from_millis(300))).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_millis(300))).map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    s.write_all(&line).map_err(|e| format!("migration socket {}: {e}", path.display()))?;
    let mut answer = String::new();
    BufReader::new(s.take(MAX_LINE as u64)).read_line(&mut answer).map_err(|e| format!("migration socket {}: {e}", path.display()))?;
    let a: Answer = serde_json::from_str(&answer).map_err(|e| format!("migration socket {}: bad answer: {e}", path.display()))?;
    if a.ok {
        Ok(a.detail)
    } else {
        Err(a.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_answered_and_bad_ones_explained() {
        let dir = std::env::temp_dir().join(format!("vigil-migrate-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("vm.sock.migrate");
        let (tx, rx) = channel::<Input>();
        let _server = serve(&path, tx).expect("serve");
        std::thread::spawn(move || {
            for i in rx {
                if let Input::Migrate(req, answer) = i {
                    let _ = answer.send(match req {
                        Request::Status => Ok("synchronising".into()),
                        _ => Err("not protected yet".into()),
                    });
                }
            }
        });
        assert_eq!(call(&path, &Request::Status), Ok("synchronising".into()));
        assert_eq!(call(&path, &Request::Handover { to: None }), Err("not protected yet".into()));
        // The destination travels with a handover, and an older agent's request without it
        // still reads.
        let to = Request::Handover { to: Some("10.0.0.3:7000".into()) };
        assert_eq!(serde_json::from_str::<Request>(&serde_json::to_string(&to).expect("json")).expect("read"), to);
        assert_eq!(serde_json::from_str::<Request>(r#"{"do":"handover"}"#).expect("read"), Request::Handover { to: None });
        // Garbage and an overlong line get an answer that says so.
        let mut s = UnixStream::connect(&path).expect("connect");
        s.write_all(b"{\"do\":\"steal\"}\n").expect("write");
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut a = String::new();
        r.read_line(&mut a).expect("read");
        assert!(a.contains("bad request"), "{a}");
        s.write_all(&vec![b'x'; MAX_LINE + 10]).expect("write");
        a.clear();
        r.read_line(&mut a).expect("read");
        assert!(a.contains("longer than"), "{a}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
