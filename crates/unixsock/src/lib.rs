//! UNIX-domain sockets at paths of any length.
//!
//! A socket address holds 107 bytes of path (`sun_path`), but vigil puts its control sockets
//! (a VMM's API and migration sockets, a voter's, the store's, the supervisor's) in the
//! directories its users choose: a cluster's `--dir`, a voted VM's state directory below a
//! host's. A deep checkout made one of them 108 bytes long and every instance of a voted VM
//! failed to start. [`bind`] and [`connect`] take any path: a short one is used as it is; a
//! long one is reached through its directory, opened first and named
//! `/proc/self/fd/N/NAME` for the one call (Linux resolves the directory through the open
//! descriptor, so the socket is created, or found, at the path given). Only the file name
//! itself must fit.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The longest path a socket address holds (`sun_path` less its terminating NUL).
pub const MAX_DIRECT: usize = 107;

/// `O_PATH` (Linux): the directory is opened only to name it, not to read it.
const O_PATH: i32 = 0o10000000;

/// Listens at `path`, whatever its length.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    through_dir(path, |p| UnixListener::bind(p))
}

/// Connects to the socket at `path`, whatever its length.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    through_dir(path, |p| UnixStream::connect(p))
}

/// Runs `f` on `path`, or, if it is too long for a socket address, on a short name of it
/// through its directory (open while `f` runs).
fn through_dir<T>(path: &Path, f: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    if path.as_os_str().len() <= MAX_DIRECT {
        return f(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a socket's path", path.display())));
    };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let handle = File::options().read(true).custom_flags(O_PATH).open(dir)?;
    let mut short = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
    short.push(name);
    if short.as_os_str().len() > MAX_DIRECT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: its file name is too long for a socket ({} bytes at most)", path.display(), MAX_DIRECT - 24),
        ));
    }
    let r = f(&short);
    drop(handle);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("unixsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// A 300-byte path: bound, connected to, and the socket's file is where the path says.
    #[test]
    fn a_socket_at_a_long_path_is_bound_and_reached() {
        let base = scratch("long");
        let mut dir = base.clone();
        while dir.as_os_str().len() < 300 {
            dir.push("a-rather-long-directory-name");
        }
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        assert!(UnixListener::bind(&path).is_err(), "the standard library refuses it");
        let l = bind(&path).unwrap();
        assert!(path.exists());
        let mut c = connect(&path).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"ping").unwrap();
        let mut b = [0; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// A short path is used as it is; a relative one too.
    #[test]
    fn short_and_relative_paths_work_as_before() {
        let base = scratch("short");
        std::fs::create_dir_all(&base).unwrap();
        let path = base.join("s.sock");
        let _l = bind(&path).unwrap();
        connect(&path).unwrap();
        assert!(connect(&base.join("absent.sock")).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// A missing directory, a file name too long, no file name: errors, never a panic.
    #[test]
    fn bad_paths_are_errors() {
        let long = PathBuf::from(format!("/nonexistent/{}/x.sock", "d".repeat(120)));
        assert_eq!(connect(&long).unwrap_err().kind(), io::ErrorKind::NotFound);
        let base = scratch("name");
        std::fs::create_dir_all(&base).unwrap();
        let e = bind(&base.join("n".repeat(100))).unwrap_err();
        assert!(e.to_string().contains("too long for a socket"), "{e}");
        assert!(bind(Path::new("/")).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
