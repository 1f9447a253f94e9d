//! The embedded durable backend: an append-only log of checksummed records, one record per
//! acknowledged request (a transaction is one record, so it is replayed whole or not at all),
//! written and `fdatasync`'ed before the reply leaves the server.
//!
//! [`Backend::write`] only queues a record in memory; the server's syncer thread writes the
//! queue to the file and syncs it ([`LogSync::sync`]). So the thread that serves requests never
//! waits for the file system — not even for a `write(2)`, which blocks while the kernel commits
//! its journal when other processes write much to the same disk.
//!
//! Files in the data directory:
//! - `log.<n>`: records `[len: u32 LE][crc32: u32 LE][payload]`; the payload is a batch of
//!   mutations, each `[len: u32 LE][bytes]` ([`Mutation::encode`]).
//! - `snapshot`: the same record format; the first record holds `n`, meaning "this snapshot
//!   contains everything up to and including `log.<n>`". Written to `snapshot.tmp`, synced,
//!   renamed, directory synced.
//!
//! Compaction: start `log.<n+1>`, write the snapshot for `n`, delete `log.<n>`. A crash at any
//! point leaves a consistent pair. On load a torn tail (a record cut short, or a bad checksum
//! followed only by zeros or nothing) is dropped and the file truncated there; a bad record with
//! valid data after it is reported as [`Error::Corrupt`].

use crate::state::{DomId, Mutation};
use crate::{Error, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// What [`Backend::catch_up`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum CatchUp {
    /// The entries others appended since, oldest first.
    Entries(Vec<Vec<Mutation>>),
    /// Another front end compacted entries this one had not applied: the whole history, as
    /// [`Backend::load`] returns it, to rebuild the state from.
    Reload(Vec<Vec<Mutation>>),
}

/// Where acknowledged mutations are kept. `append` returns only when the batch survives a crash
/// of the process (and of the machine, as far as `fdatasync` promises).
pub trait Backend: Send {
    /// Every batch made durable so far, oldest first (after the last compaction, the snapshot
    /// comes first as one batch).
    fn load(&mut self) -> Result<Vec<Vec<Mutation>>>;
    /// Makes one batch durable.
    fn append(&mut self, batch: &[Mutation]) -> Result<()>;
    /// Writes a batch without waiting for it to be durable; a later sync through
    /// [`Backend::syncer`] makes it (and everything written before it) durable. This lets the
    /// server commit many requests with one sync (group commit). By default it is `append`.
    fn write(&mut self, batch: &[Mutation]) -> Result<()> {
        self.append(batch)
    }
    /// A handle whose [`LogSync::sync`] makes everything written so far durable, usable without
    /// holding the backend; `None` if `write` is durable by itself.
    fn syncer(&self) -> Result<Option<LogSync>> {
        Ok(None)
    }
    /// The embedded log, whose compaction the server runs on its syncer thread, apart from
    /// the requests ([`LogBackend::rotate`]); `None`: compact in [`Backend::compact_from`].
    fn as_log(&mut self) -> Option<&mut LogBackend> {
        None
    }
    /// Appends unless another front end sharing the log appended first: then `Ok(false)`, and
    /// the caller must [`Backend::catch_up`] and try again. A log nobody shares always appends.
    fn try_write(&mut self, batch: &[Mutation]) -> Result<bool> {
        self.write(batch).map(|()| true)
    }
    /// Batches other front ends appended since this one last loaded, appended or caught up,
    /// oldest first (none for a log nobody shares) — or the whole history again if another
    /// front end compacted entries this one lacks.
    fn catch_up(&mut self) -> Result<CatchUp> {
        Ok(CatchUp::Entries(Vec::new()))
    }
    /// The newest log entry this front end has applied, where the log is shared (else `None`).
    fn applied_upto(&self) -> Option<u64> {
        None
    }
    /// Ties `domid`'s lifetime to this front end (an etcd lease it keeps alive); called before
    /// the `Introduce` is appended. A no-op where the backend has no leases.
    fn hold_domain(&mut self, _domid: DomId) -> Result<()> {
        Ok(())
    }
    /// The domain was released: forget its lease key. A no-op where the backend has no leases.
    fn drop_domain(&mut self, _domid: DomId) -> Result<()> {
        Ok(())
    }
    /// Domains whose front end is alive (their lease holds), or `None` if the backend does not
    /// track domain lifetimes.
    fn held_domains(&mut self) -> Result<Option<Vec<DomId>>> {
        Ok(None)
    }
    /// Whether the history has grown enough to be worth compacting.
    fn wants_compaction(&self) -> bool;
    /// Replaces the history with `snapshot` (the mutations that rebuild the current state).
    fn compact(&mut self, snapshot: &[Mutation]) -> Result<()>;
    /// [`Backend::compact`] from mutations made one at a time, so that a backend that can
    /// write them as they come never holds the whole snapshot (the log backend does; by default
    /// they are collected first).
    fn compact_from(&mut self, snapshot: &mut dyn Iterator<Item = Mutation>) -> Result<()> {
        let all: Vec<Mutation> = snapshot.collect();
        self.compact(&all)
    }
}

const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32 (IEEE 802.3, the polynomial of zlib and Ethernet).
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn record(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

pub(crate) fn batch_payload(batch: &[Mutation]) -> Vec<u8> {
    let mut p = Vec::new();
    for m in batch {
        let b = m.encode();
        p.extend_from_slice(&(b.len() as u32).to_le_bytes());
        p.extend_from_slice(&b);
    }
    p
}

pub(crate) fn parse_batch(p: &[u8]) -> Option<Vec<Mutation>> {
    let mut out = Vec::new();
    let mut rest = p;
    while !rest.is_empty() {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let body = rest.get(4..4 + len)?;
        out.push(Mutation::decode(body)?);
        rest = &rest[4 + len..];
    }
    Some(out)
}

/// Reads the records of a file: the payloads, and the length of the valid prefix (shorter than
/// the file if the tail is torn).
fn read_records(path: &Path, bytes: &[u8]) -> Result<(Vec<Vec<u8>>, usize)> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off < bytes.len() {
        let rest = &bytes[off..];
        let torn = || rest.iter().all(|b| *b == 0);
        let Some(h) = rest.get(..8) else { break };
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let Some(payload) = rest.get(8..8 + len) else { break };
        if len == 0 || crc32(payload) != crc {
            if 8 + len >= rest.len() || torn() {
                break;
            }
            return Err(Error::Corrupt { path: path.to_path_buf(), offset: off as u64, what: "bad checksum".into() });
        }
        out.push(payload.to_vec());
        off += 8 + len;
    }
    Ok((out, off))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("syncing directory", dir, e))
}

/// Records queued for a log file, in order, and not written to it yet.
type Queue = std::sync::Arc<std::sync::Mutex<Vec<u8>>>;

/// Writes a log file's queued records and syncs the file, away from the backend's owner.
pub struct LogSync {
    file: File,
    path: PathBuf,
    queue: Queue,
}

impl LogSync {
    /// Writes what is queued (in order: syncs of one file must not run at once) and
    /// `fdatasync`s the file.
    pub fn sync(&self) -> Result<()> {
        let queued = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()));
        (&self.file).write_all(&queued).map_err(|e| Error::io("appending to", &self.path, e))?;
        self.file.sync_data().map_err(|e| Error::io("syncing", &self.path, e))
    }
}

/// The log-structured backend in one directory.
pub struct LogBackend {
    dir: PathBuf,
    /// Number of the log file being appended to.
    n: u64,
    file: Option<File>,
    /// Records written for `file` since its last sync.
    queue: Queue,
    log_bytes: u64,
    snapshot_bytes: u64,
}

impl LogBackend {
    /// Opens (creating if needed) the data directory. Call [`Backend::load`] before appending.
    pub fn open(dir: &Path) -> Result<LogBackend> {
        fs::create_dir_all(dir).map_err(|e| Error::io("creating data directory", dir, e))?;
        Ok(LogBackend { dir: dir.to_path_buf(), n: 0, file: None, queue: Queue::default(), log_bytes: 0, snapshot_bytes: 0 })
    }

    fn log_path(&self, n: u64) -> PathBuf {
        self.dir.join(format!("log.{n}"))
    }

    fn logs(&self) -> Result<Vec<u64>> {
        let rd = fs::read_dir(&self.dir).map_err(|e| Error::io("listing data directory", &self.dir, e))?;
        let mut ns = Vec::new();
        for e in rd {
            let e = e.map_err(|e| Error::io("listing data directory", &self.dir, e))?;
            if let Some(n) = e.file_name().to_str().and_then(|s| s.strip_prefix("log.")).and_then(|s| s.parse().ok()) {
                ns.push(n);
            }
        }
        ns.sort();
        Ok(ns)
    }

    fn open_log(&mut self, n: u64) -> Result<()> {
        let f = create_log(&self.dir, &self.log_path(n))?;
        self.install(n, f)
    }

    fn install(&mut self, n: u64, f: File) -> Result<()> {
        let path = self.log_path(n);
        self.log_bytes = f.metadata().map_err(|e| Error::io("reading log size", &path, e))?.len();
        self.file = Some(f);
        // A new file gets a new queue: what is queued for the old one is dropped (the
        // snapshot that compaction writes holds it).
        self.queue = Queue::default();
        self.n = n;
        Ok(())
    }

    /// Compaction in three steps, so that its slow parts run without the backend:
    /// 1. [`LogBackend::next_log`] names the next log file; [`create_log`] creates it;
    /// 2. `rotate` switches writes to it (no file system call), and returns what the snapshot
    ///    must cover (the old log's number) with the data directory;
    /// 3. [`write_snapshot`] of the state as it was at the switch, then
    ///    [`LogBackend::snapshot_written`].
    ///
    /// Nothing may sync the new log before step 3 ends: a crash in between leaves the old
    /// snapshot and the old log, without the records queued for it since its last sync (none
    /// was acknowledged), and an empty new log.
    pub fn rotate(&mut self, file: File) -> Result<(u64, PathBuf)> {
        let old = self.n;
        self.install(old + 1, file)?;
        Ok((old, self.dir.clone()))
    }

    /// The next log file's path and the data directory (compaction's step 1).
    pub fn next_log(&self) -> (PathBuf, PathBuf) {
        (self.log_path(self.n + 1), self.dir.clone())
    }

    /// The snapshot written has `bytes` (compaction's step 3).
    pub fn snapshot_written(&mut self, bytes: u64) {
        self.snapshot_bytes = bytes;
    }
}

/// Creates log file `path` in `dir` (made durable in the directory).
pub fn create_log(dir: &Path, path: &Path) -> Result<File> {
    let f = OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io("opening log", path, e))?;
    sync_dir(dir)?;
    Ok(f)
}

/// Writes `snapshot` as covering `log.<covered>` in `dir` — 256 mutations to a record as they
/// come, so it is never whole in memory — then removes that log; returns the snapshot's size.
pub fn write_snapshot(dir: &Path, covered: u64, snapshot: &mut dyn Iterator<Item = Mutation>) -> Result<u64> {
    let tmp = dir.join("snapshot.tmp");
    let f = File::create(&tmp).map_err(|e| Error::io("creating", &tmp, e))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 16, f);
    let wr = |e| Error::io("writing", &tmp, e);
    let header = record(covered.to_string().as_bytes());
    out.write_all(&header).map_err(wr)?;
    let mut written = header.len() as u64;
    let mut chunk = Vec::with_capacity(256);
    loop {
        chunk.clear();
        chunk.extend((&mut *snapshot).take(256));
        if chunk.is_empty() {
            break;
        }
        let rec = record(&batch_payload(&chunk));
        out.write_all(&rec).map_err(wr)?;
        written += rec.len() as u64;
    }
    let f = out.into_inner().map_err(|e| wr(e.into_error()))?;
    f.sync_all().map_err(wr)?;
    let snap = dir.join("snapshot");
    fs::rename(&tmp, &snap).map_err(|e| Error::io("renaming snapshot into", &snap, e))?;
    sync_dir(dir)?;
    let path = dir.join(format!("log.{covered}"));
    match fs::remove_file(&path) {
        Ok(()) => Ok(written),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(written),
        Err(e) => Err(Error::io("removing compacted log", &path, e)),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    let mut b = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut b)).map_err(|e| Error::io("reading", path, e))?;
    Ok(b)
}

impl Backend for LogBackend {
    fn load(&mut self) -> Result<Vec<Vec<Mutation>>> {
        let mut batches = Vec::new();
        let snap = self.dir.join("snapshot");
        let mut covered = 0u64;
        if snap.exists() {
            let bytes = read_file(&snap)?;
            let (recs, valid) = read_records(&snap, &bytes)?;
            let corrupt = |what: &str| Error::Corrupt { path: snap.clone(), offset: valid as u64, what: what.into() };
            if valid != bytes.len() || recs.is_empty() {
                return Err(corrupt("truncated snapshot"));
            }
            covered = std::str::from_utf8(&recs[0]).ok().and_then(|s| s.parse().ok()).ok_or_else(|| corrupt("bad header"))?;
            let mut all = Vec::new();
            for r in &recs[1..] {
                all.extend(parse_batch(r).ok_or_else(|| corrupt("bad mutation"))?);
            }
            batches.push(all);
            self.snapshot_bytes = bytes.len() as u64;
        }
        let mut last = covered + 1;
        for n in self.logs()? {
            let path = self.log_path(n);
            if n <= covered {
                fs::remove_file(&path).map_err(|e| Error::io("removing compacted log", &path, e))?;
                continue;
            }
            let bytes = read_file(&path)?;
            let (recs, valid) = read_records(&path, &bytes)?;
            for (i, r) in recs.iter().enumerate() {
                batches.push(parse_batch(r).ok_or_else(|| Error::Corrupt {
                    path: path.clone(),
                    offset: i as u64,
                    what: format!("record {i} holds no valid mutations"),
                })?);
            }
            if valid < bytes.len() {
                let f = OpenOptions::new().write(true).open(&path).map_err(|e| Error::io("opening log", &path, e))?;
                f.set_len(valid as u64).and_then(|_| f.sync_all()).map_err(|e| Error::io("truncating torn tail of", &path, e))?;
            }
            last = n;
        }
        self.open_log(last)?;
        Ok(batches)
    }

    fn append(&mut self, batch: &[Mutation]) -> Result<()> {
        self.write(batch)?;
        self.syncer()?.map_or(Ok(()), |s| s.sync())
    }

    fn write(&mut self, batch: &[Mutation]) -> Result<()> {
        if self.file.is_none() {
            return Err(Error::io("appending to", self.log_path(self.n), std::io::Error::other("log not loaded")));
        }
        let rec = record(&batch_payload(batch));
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&rec);
        self.log_bytes += rec.len() as u64;
        Ok(())
    }

    fn syncer(&self) -> Result<Option<LogSync>> {
        let path = self.log_path(self.n);
        let f = self.file.as_ref().ok_or_else(|| Error::io("syncing", &path, std::io::Error::other("log not loaded")))?;
        let file = f.try_clone().map_err(|e| Error::io("duplicating handle of", &path, e))?;
        Ok(Some(LogSync { file, path, queue: std::sync::Arc::clone(&self.queue) }))
    }

    fn wants_compaction(&self) -> bool {
        self.log_bytes > (1 << 20).max(2 * self.snapshot_bytes)
    }

    fn compact(&mut self, snapshot: &[Mutation]) -> Result<()> {
        self.compact_from(&mut snapshot.iter().cloned())
    }

    /// The three steps of [`LogBackend::rotate`] in one go.
    fn compact_from(&mut self, snapshot: &mut dyn Iterator<Item = Mutation>) -> Result<()> {
        let (next, dir) = self.next_log();
        let file = create_log(&dir, &next)?;
        let (old, dir) = self.rotate(file)?;
        let bytes = write_snapshot(&dir, old, snapshot)?;
        self.snapshot_written(bytes);
        Ok(())
    }

    fn as_log(&mut self) -> Option<&mut LogBackend> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perms::Perms;

    fn put(p: &str, v: &str) -> Mutation {
        Mutation::Put { path: p.into(), value: v.as_bytes().to_vec(), perms: Perms::owned_by(0) }
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vigil-store-log-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn crc_matches_reference() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn append_load_torn_tail_and_compaction() {
        let d = tmpdir("basic");
        let mut b = LogBackend::open(&d).unwrap();
        assert!(b.load().unwrap().is_empty());
        b.append(&[put("/a", "1")]).unwrap();
        b.append(&[put("/b", "2"), put("/b/c", "3")]).unwrap();
        drop(b);
        // A torn tail: half a record.
        let log = d.join("log.1");
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&record(&batch_payload(&[put("/x", "lost")]))[..10]).unwrap();
        drop(f);
        let mut b = LogBackend::open(&d).unwrap();
        assert_eq!(b.load().unwrap(), vec![vec![put("/a", "1")], vec![put("/b", "2"), put("/b/c", "3")]]);
        b.append(&[put("/d", "4")]).unwrap();
        b.compact(&[put("/a", "1"), put("/d", "4")]).unwrap();
        b.append(&[put("/e", "5")]).unwrap();
        drop(b);
        assert!(!log.exists());
        let mut b = LogBackend::open(&d).unwrap();
        assert_eq!(b.load().unwrap(), vec![vec![put("/a", "1"), put("/d", "4")], vec![put("/e", "5")]]);
        drop(b);
        // Corruption in the middle is an error, not silently dropped data.
        let log = d.join("log.2");
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&record(&batch_payload(&[put("/f", "6")]))).unwrap();
        drop(f);
        let mut bytes = fs::read(&log).unwrap();
        bytes[9] ^= 0xff;
        fs::write(&log, &bytes).unwrap();
        let err = LogBackend::open(&d).unwrap().load().unwrap_err().to_string();
        assert!(err.contains("log.2") && err.contains("bad checksum"), "{err}");
        let _ = fs::remove_dir_all(&d);
    }
}
