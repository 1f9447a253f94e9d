//! The etcd backend: the store's mutation log kept in an etcd cluster (v3 API through its JSON
//! gRPC gateway, plain HTTP/1.1 on loopback or a trusted network — no TLS, no auth), so that the
//! durable state survives the loss of a host, not only of a process.
//!
//! Keys under a prefix `P`:
//! - `P/log/<seq, 20 digits>`: one batch of mutations per acknowledged request (one XenStore
//!   transaction = one batch = one key). Appending is an etcd transaction "create this key if
//!   its create_revision is 0 and `P/snap/current` is unchanged": exactly one front end owns
//!   each sequence number. Several front ends share a prefix: one that loses the race catches
//!   up ([`Backend::catch_up`], which reloads everything if a compaction removed entries it
//!   lacks) and retries (the server does this);
//!   [`Backend::append`] itself fails on a lost race.
//! - `P/snap/current` = `<gen> <covered seq> <chunks>` and `P/snap/<gen>/<i>`: the compacted
//!   state; log keys up to `covered` are deleted in the same etcd transaction that switches
//!   `snap/current`.
//! - `P/domains/<domid>`: a domain introduced through a front end, attached to that front end's
//!   lease; it disappears when the front end dies and the lease expires, and the survivors then
//!   release the domain.
//!
//! [`follow`] keeps a streaming `/v3/watch` on `P/` open to learn of other front ends' appends.
//!
//! etcd acknowledges a put once a majority of members has it in its log (fsync'ed), so a reply
//! sent after `append` returns survives the loss of any minority of members.

use crate::log::{batch_payload, parse_batch, Backend, CatchUp};
use crate::state::{DomId, Mutation};
use crate::{Error, Result};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (what the gateway uses for `bytes` fields).
pub fn b64encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Inverse of [`b64encode`]; `None` on anything else.
pub fn b64decode(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if s.len() & 3 != 0 {
        return None;
    }
    let val = |c: u8| B64.iter().position(|b| *b == c).map(|p| p as u32);
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for (k, q) in s.chunks(4).enumerate() {
        let last = k == s.len() / 4 - 1;
        let pad = q.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for (i, &c) in q.iter().enumerate() {
            n |= if i < 4 - pad { val(c)? } else { 0 } << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// The etcd-backed log.
pub struct EtcdBackend {
    endpoints: Vec<String>,
    prefix: String,
    /// Endpoint that answered last (tried first).
    current: usize,
    next_seq: u64,
    appended_since_snapshot: u64,
    snap_gen: u64,
    /// `mod_revision` of `P/snap/current` as last seen (0: none). Appends compare it, so that
    /// a front end never appends into a range another front end has compacted away.
    snap_rev: i64,
    /// An append or compaction lost a race: re-read `P/snap/current` when catching up.
    snap_stale: bool,
    /// TTL of the lease holding the domains this front end introduced.
    lease_ttl: u64,
    /// That lease, granted at the first introduction (kept alive by a thread).
    lease: Option<i64>,
    timeout: Duration,
}

fn err(what: String) -> Error {
    Error::Etcd(what)
}

impl EtcdBackend {
    /// `endpoints` are `host:port` of the members' client URLs; `prefix` separates stores.
    pub fn new(endpoints: Vec<String>, prefix: &str) -> Result<EtcdBackend> {
        if endpoints.is_empty() {
            return Err(Error::Protocol("etcd backend needs at least one endpoint".into()));
        }
        Ok(EtcdBackend {
            endpoints,
            prefix: prefix.trim_end_matches('/').to_string(),
            current: 0,
            next_seq: 1,
            appended_since_snapshot: 0,
            snap_gen: 0,
            snap_rev: 0,
            snap_stale: false,
            lease_ttl: 10,
            lease: None,
            timeout: Duration::from_secs(5),
        })
    }

    fn post_once(&self, ep: &str, path: &str, body: &str) -> std::result::Result<Value, String> {
        let addr = ep.to_socket_addrs().map_err(|e| e.to_string())?.next().ok_or("no address")?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(self.timeout)).map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(self.timeout)).map_err(|e| e.to_string())?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {ep}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
        let split = resp.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no HTTP header end")?;
        let head = String::from_utf8_lossy(&resp[..split]);
        let status = head.split_whitespace().nth(1).unwrap_or("");
        let body = &resp[split + 4..];
        if status != "200" {
            return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(body)));
        }
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            let body = dechunk(body).ok_or("malformed chunked response")?;
            return serde_json::from_slice(&body).map_err(|e| e.to_string());
        }
        serde_json::from_slice(body).map_err(|e| e.to_string())
    }

    /// POSTs to the first endpoint that answers, starting with the one that answered last.
    fn post(&mut self, path: &str, body: Value) -> Result<Value> {
        let body = body.to_string();
        let mut last = String::new();
        // Two passes: a member may be electing a leader for a moment.
        for pass in 0..2 {
            for k in 0..self.endpoints.len() {
                let i = (self.current + k) % self.endpoints.len();
                match self.post_once(&self.endpoints[i], path, &body) {
                    Ok(v) => {
                        self.current = i;
                        return Ok(v);
                    }
                    Err(e) => last = format!("{last}{}: {e}; ", self.endpoints[i]),
                }
            }
            if pass == 0 {
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        Err(err(format!("{path} on every endpoint failed: {last}")))
    }

    /// TTL (seconds, at least 1) of the lease that ties introduced domains to this front end.
    pub fn set_lease_ttl(&mut self, secs: u64) {
        self.lease_ttl = secs.max(1);
    }

    /// `P/snap/current`: (generation, covered sequence number, chunks, mod_revision).
    fn snap_header(&mut self) -> Result<Option<(u64, u64, u64, i64)>> {
        let cur = self.key("snap/current");
        let v = self.post("/v3/kv/range", json!({"key": b64encode(cur.as_bytes())}))?;
        let Some(kv) = v["kvs"].as_array().and_then(|a| a.first()) else { return Ok(None) };
        let text = kv["value"].as_str().and_then(b64decode).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        let f: Vec<u64> = text.split(' ').filter_map(|x| x.parse().ok()).collect();
        let [gen, cov, chunks] = f[..] else { return Err(corrupt(&cur, "bad snapshot header")) };
        Ok(Some((gen, cov, chunks, int(&kv["mod_revision"]))))
    }

    /// The lease of this front end, granted on first use; a thread keeps it alive every TTL/3
    /// for as long as the process lives.
    fn lease(&mut self) -> Result<i64> {
        if let Some(id) = self.lease {
            return Ok(id);
        }
        let v = self.post("/v3/lease/grant", json!({"TTL": self.lease_ttl.to_string()}))?;
        let id = int(&v["ID"]);
        if id == 0 {
            return Err(err(format!("lease grant answered {v}")));
        }
        let mut ka = EtcdBackend::new(self.endpoints.clone(), &self.prefix)?;
        let period = Duration::from_millis((self.lease_ttl * 1000 / 3).max(200));
        std::thread::spawn(move || loop {
            std::thread::sleep(period);
            match ka.post("/v3/lease/keepalive", json!({"ID": id.to_string()})) {
                Ok(v) if int(&v["result"]["TTL"]) > 0 => {}
                Ok(v) => {
                    // Expired (this front end was cut off longer than the TTL): the others
                    // release its domains; the next introduction grants a new lease.
                    tracing::warn!("vigil store: etcd lease {id} for introduced domains is gone ({v})");
                    return;
                }
                Err(e) => tracing::warn!("vigil store: keeping etcd lease {id} alive: {e}"),
            }
        });
        self.lease = Some(id);
        Ok(id)
    }

    fn domain_key(&self, domid: DomId) -> String {
        self.key(&format!("domains/{domid}"))
    }

    /// The append transaction: `Ok(false)` if the slot was taken or the log compacted meanwhile.
    fn try_append(&mut self, batch: &[Mutation]) -> Result<bool> {
        let key = b64encode(self.log_key(self.next_seq).as_bytes());
        let cur = b64encode(self.key("snap/current").as_bytes());
        let v = self.post(
            "/v3/kv/txn",
            json!({
                "compare": [
                    {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"},
                    {"key": cur, "target": "MOD", "result": "EQUAL", "mod_revision": self.snap_rev.to_string()},
                ],
                "success": [{"request_put": {"key": key, "value": b64encode(&batch_payload(batch))}}],
            }),
        )?;
        if v["succeeded"].as_bool() != Some(true) {
            self.snap_stale = true;
            return Ok(false);
        }
        self.next_seq += 1;
        self.appended_since_snapshot += 1;
        Ok(true)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    fn log_key(&self, seq: u64) -> String {
        self.key(&format!("log/{seq:020}"))
    }

    fn range(&mut self, from: &str, to: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let v = self.post("/v3/kv/range", json!({"key": b64encode(from.as_bytes()), "range_end": b64encode(to.as_bytes())}))?;
        let mut out = Vec::new();
        for kv in v["kvs"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let k = kv["key"].as_str().and_then(b64decode).ok_or_else(|| err(format!("bad key in range {from}")))?;
            let val = kv["value"].as_str().map_or(Some(Vec::new()), b64decode).ok_or_else(|| err(format!("bad value in range {from}")))?;
            out.push((String::from_utf8_lossy(&k).into_owned(), val));
        }
        Ok(out)
    }

    /// A plain etcd put (used to compare the store with etcd used directly).
    pub fn put(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.post("/v3/kv/put", json!({"key": b64encode(key.as_bytes()), "value": b64encode(value)})).map(|_| ())
    }

    /// A plain etcd get: the value of `key`, if any.
    pub fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>> {
        let v = self.post("/v3/kv/range", json!({"key": b64encode(key.as_bytes())}))?;
        match v["kvs"].as_array().and_then(|a| a.first()) {
            None => Ok(None),
            Some(kv) => {
                Ok(Some(kv["value"].as_str().map_or(Some(Vec::new()), b64decode).ok_or_else(|| err(format!("bad value of {key}")))?))
            }
        }
    }
}

/// What the watch stream said (see [`follow`]).
#[derive(Debug, Clone, Copy)]
pub struct Signal {
    /// The data names a `DELETE` (such as a domain key whose lease expired), or the stream
    /// broke or stayed silent for a period: check the domains.
    pub deleted: bool,
    /// The newest log entry the data names (0: none), or `None` if unknown (a torn message, a
    /// silent period, a broken stream): read the log to find out.
    pub newest: Option<u64>,
}

/// Reads one piece of the watch stream: whether it names a `DELETE`, and the newest log
/// sequence number among its keys (`None` if a message may be torn or a key does not parse).
fn scan_watch_data(data: &[u8], log_prefix: &str) -> Signal {
    let deleted = data.windows(8).any(|w| w == b"\"DELETE\"");
    if !data.ends_with(b"\n") {
        return Signal { deleted, newest: None };
    }
    let text = String::from_utf8_lossy(data);
    let mut newest = 0;
    for piece in text.split("\"key\":\"").skip(1) {
        let Some(key) = piece.split('"').next().and_then(b64decode) else { return Signal { deleted, newest: None } };
        let key = String::from_utf8_lossy(&key);
        if let Some(seq) = key.strip_prefix(log_prefix) {
            let Ok(seq) = seq.parse::<u64>() else { return Signal { deleted, newest: None } };
            newest = newest.max(seq);
        }
    }
    Signal { deleted, newest: Some(newest) }
}

/// Follows everything under `prefix` with the gateway's streaming `/v3/watch` (one long HTTP
/// response, one JSON message per event): calls `wake` whenever the stream delivers data, and
/// also whenever `period` passes without data, or the stream breaks (then it reconnects to the
/// next member). The stream is only a signal: the caller reads the log itself when the signal
/// names entries it lacks or is unknown, so a missed or torn event costs at most one `period`.
/// Never returns.
pub fn follow(endpoints: Vec<String>, prefix: &str, period: Duration, mut wake: impl FnMut(Signal)) -> ! {
    let prefix = prefix.trim_end_matches('/');
    let body = json!({"create_request": {
        "key": b64encode(format!("{prefix}/").as_bytes()),
        "range_end": b64encode(format!("{prefix}0").as_bytes()),
    }})
    .to_string();
    let log_prefix = format!("{prefix}/log/");
    let unknown = |deleted| Signal { deleted, newest: None };
    let mut i = 0;
    loop {
        let ep = endpoints[i % endpoints.len().max(1)].clone();
        i += 1;
        let open = || -> std::io::Result<TcpStream> {
            let addr = ep.to_socket_addrs()?.next().ok_or_else(|| std::io::Error::other("no address"))?;
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
            s.set_read_timeout(Some(period))?;
            let req = format!(
                "POST /v3/watch HTTP/1.1\r\nHost: {ep}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes())?;
            Ok(s)
        };
        if let Ok(mut s) = open() {
            // Entries appended before the watch existed.
            wake(unknown(false));
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => wake(scan_watch_data(&buf[..n], &log_prefix)),
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => wake(unknown(false)),
                    Err(_) => break,
                }
            }
        }
        wake(unknown(true));
        std::thread::sleep(period.min(Duration::from_millis(200)));
    }
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// An int64 of the gateway's JSON (a string, or absent for 0).
fn int(v: &Value) -> i64 {
    v.as_str().and_then(|s| s.parse().ok()).or_else(|| v.as_i64()).unwrap_or(0)
}

fn corrupt(key: &str, what: &str) -> Error {
    Error::Corrupt { path: PathBuf::from(format!("etcd:{key}")), offset: 0, what: what.into() }
}

impl Backend for EtcdBackend {
    fn load(&mut self) -> Result<Vec<Vec<Mutation>>> {
        let mut batches = Vec::new();
        let mut covered = 0;
        self.snap_rev = 0;
        if let Some((gen, cov, chunks, rev)) = self.snap_header()? {
            self.snap_rev = rev;
            let mut all = Vec::new();
            for i in 0..chunks {
                let k = self.key(&format!("snap/{gen}/{i:010}"));
                let b = self.get(&k)?.ok_or_else(|| corrupt(&k, "missing snapshot chunk"))?;
                all.extend(parse_batch(&b).ok_or_else(|| corrupt(&k, "bad snapshot chunk"))?);
            }
            batches.push(all);
            covered = cov;
            self.snap_gen = gen;
        }
        let from = self.log_key(covered + 1);
        let to = self.key("log0"); // '0' follows '/': the end of the log/ range
        let mut last = covered;
        for (k, v) in self.range(&from, &to)? {
            let seq: u64 = k.rsplit('/').next().and_then(|s| s.parse().ok()).ok_or_else(|| corrupt(&k, "bad log key"))?;
            if seq != last + 1 {
                return Err(corrupt(&k, &format!("log gap after {last}")));
            }
            batches.push(parse_batch(&v).ok_or_else(|| corrupt(&k, "bad batch"))?);
            last = seq;
        }
        self.next_seq = last + 1;
        Ok(batches)
    }

    fn append(&mut self, batch: &[Mutation]) -> Result<()> {
        if !self.try_append(batch)? {
            return Err(err(format!("log slot {} taken by another front end", self.next_seq)));
        }
        Ok(())
    }

    fn try_write(&mut self, batch: &[Mutation]) -> Result<bool> {
        self.try_append(batch)
    }

    fn catch_up(&mut self) -> Result<CatchUp> {
        if self.snap_stale {
            self.snap_stale = false;
            if let Some((gen, covered, _, rev)) = self.snap_header()? {
                if covered >= self.next_seq {
                    // Another front end compacted entries this one lacks: start over.
                    return Ok(CatchUp::Reload(self.load()?));
                }
                self.snap_gen = gen;
                self.snap_rev = rev;
            }
        }
        let from = self.log_key(self.next_seq);
        let to = self.key("log0");
        let mut batches = Vec::new();
        for (k, v) in self.range(&from, &to)? {
            let seq: u64 = k.rsplit('/').next().and_then(|s| s.parse().ok()).ok_or_else(|| corrupt(&k, "bad log key"))?;
            if seq != self.next_seq {
                return Ok(CatchUp::Reload(self.load()?));
            }
            batches.push(parse_batch(&v).ok_or_else(|| corrupt(&k, "bad batch"))?);
            self.next_seq += 1;
        }
        Ok(CatchUp::Entries(batches))
    }

    fn applied_upto(&self) -> Option<u64> {
        Some(self.next_seq - 1)
    }

    fn hold_domain(&mut self, domid: DomId) -> Result<()> {
        let k = b64encode(self.domain_key(domid).as_bytes());
        let lease = self.lease()?;
        match self.post("/v3/kv/put", json!({"key": k, "value": b64encode(b"held"), "lease": lease.to_string()})) {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("lease not found") => {
                // The lease expired: grant a new one.
                self.lease = None;
                let lease = self.lease()?;
                self.post("/v3/kv/put", json!({"key": k, "value": b64encode(b"held"), "lease": lease.to_string()})).map(|_| ())
            }
            Err(e) => Err(e),
        }
    }

    fn drop_domain(&mut self, domid: DomId) -> Result<()> {
        let k = b64encode(self.domain_key(domid).as_bytes());
        self.post("/v3/kv/deleterange", json!({"key": k})).map(|_| ())
    }

    fn held_domains(&mut self) -> Result<Option<Vec<DomId>>> {
        let (from, to) = (self.key("domains/"), self.key("domains0"));
        let keys = self.range(&from, &to)?;
        Ok(Some(keys.iter().filter_map(|(k, _)| k.rsplit('/').next()?.parse().ok()).collect()))
    }

    fn wants_compaction(&self) -> bool {
        self.appended_since_snapshot >= 10_000
    }

    fn compact(&mut self, snapshot: &[Mutation]) -> Result<()> {
        // Unique across front ends (two may compact at once; only one switches `snap/current`).
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let gen = now.max(self.snap_gen + 1);
        let chunks: Vec<&[Mutation]> = snapshot.chunks(256).collect();
        for (i, c) in chunks.iter().enumerate() {
            let k = self.key(&format!("snap/{gen}/{i:010}"));
            self.post("/v3/kv/put", json!({"key": b64encode(k.as_bytes()), "value": b64encode(&batch_payload(c))}))?;
        }
        let covered = self.next_seq - 1;
        let cur = b64encode(self.key("snap/current").as_bytes());
        let next = b64encode(self.log_key(self.next_seq).as_bytes());
        // Switch the snapshot and drop the covered log, unless someone appended meanwhile.
        let v = self.post(
            "/v3/kv/txn",
            json!({
                "compare": [
                    {"key": next, "target": "CREATE", "result": "EQUAL", "create_revision": "0"},
                    {"key": cur, "target": "MOD", "result": "EQUAL", "mod_revision": self.snap_rev.to_string()},
                ],
                "success": [
                    {"request_put": {"key": cur, "value": b64encode(format!("{gen} {covered} {}", chunks.len()).as_bytes())}},
                    {"request_delete_range": {"key": b64encode(self.log_key(0).as_bytes()), "range_end": next}},
                ],
            }),
        )?;
        if v["succeeded"].as_bool() != Some(true) {
            // Another front end appended or compacted meanwhile: drop this attempt's chunks and
            // try again after the next append (the log stays valid without it).
            let (mine, mine_end) = (self.key(&format!("snap/{gen}/")), self.key(&format!("snap/{gen}0")));
            self.post("/v3/kv/deleterange", json!({"key": b64encode(mine.as_bytes()), "range_end": b64encode(mine_end.as_bytes())}))?;
            self.snap_stale = true;
            self.appended_since_snapshot = 0;
            return Ok(());
        }
        self.snap_rev = int(&v["header"]["revision"]);
        let old = self.key(&format!("snap/{}/", self.snap_gen));
        let old_end = self.key(&format!("snap/{}0", self.snap_gen));
        self.post("/v3/kv/deleterange", json!({"key": b64encode(old.as_bytes()), "range_end": b64encode(old_end.as_bytes())}))?;
        self.snap_gen = gen;
        self.appended_since_snapshot = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_roundtrip() {
        for s in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar", &[0, 255, 128, 7]] {
            assert_eq!(b64decode(&b64encode(s)).as_deref(), Some(s));
        }
        assert_eq!(b64encode(b"foo"), "Zm9v");
        assert_eq!(b64encode(b"fo"), "Zm8=");
        assert_eq!(b64decode("Zm9_"), None);
        assert_eq!(b64decode("Zm8"), None);
        assert_eq!(b64decode("Z==="), None);
    }

    #[test]
    fn watch_data_names_the_newest_log_entry() {
        let key = |k: &str| b64encode(k.as_bytes());
        let msg = format!(
            "{{\"result\":{{\"events\":[{{\"kv\":{{\"key\":\"{}\"}}}},{{\"kv\":{{\"key\":\"{}\"}}}}]}}}}\n",
            key("P/log/00000000000000000007"),
            key("P/domains/3")
        );
        let s = scan_watch_data(msg.as_bytes(), "P/log/");
        assert_eq!((s.deleted, s.newest), (false, Some(7)));
        let s = scan_watch_data(&msg.as_bytes()[..msg.len() - 10], "P/log/");
        assert_eq!(s.newest, None, "torn");
        let del = format!("{{\"result\":{{\"events\":[{{\"type\":\"DELETE\",\"kv\":{{\"key\":\"{}\"}}}}]}}}}\n", key("P/domains/3"));
        let s = scan_watch_data(del.as_bytes(), "P/log/");
        assert_eq!((s.deleted, s.newest), (true, Some(0)));
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").as_deref(), Some(&b"abcde"[..]));
        assert_eq!(dechunk(b"5\r\nab"), None);
        assert_eq!(dechunk(b"zz\r\n"), None);
    }
}
