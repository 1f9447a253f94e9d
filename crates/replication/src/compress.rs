//! How to send a checkpoint's pages on the wire, chosen per checkpoint from measured figures —
//! the link's throughput (page bytes over the time the sender took to write them), and each
//! compressor's speed and ratio on this VM's pages: as they are, as LZ4, or as their XOR
//! against the backup's copy of each page, then LZ4 ([`crate::delta`]). Compress when sending
//! the compressed bytes plus compressing them is estimated faster than sending the pages as
//! they are (on a slow link), not when it would only cost CPU (on a fast one); of the two
//! compressors, the one estimated faster. Pure: the sender reports each checkpoint's figures
//! and asks before the next one.

use std::fmt;
use std::str::FromStr;

/// What the operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Per checkpoint, whichever of [`Encoding`] pays ([`Chooser`]).
    #[default]
    Auto,
    /// Always plain LZ4 (`lz4`; `on` is read as this, its meaning before XOR deltas).
    Lz4,
    /// Always XOR against the backup's copy, then LZ4 (plain LZ4 until the session's first
    /// synchronisation gave the sender its copy).
    Xor,
    /// Never.
    Off,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Auto => "auto",
            Compression::Lz4 => "lz4",
            Compression::Xor => "xor",
            Compression::Off => "off",
        })
    }
}

impl FromStr for Compression {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Compression::Auto),
            "lz4" | "on" => Ok(Compression::Lz4),
            "xor" => Ok(Compression::Xor),
            "off" => Ok(Compression::Off),
            _ => Err(crate::Error::Compression(format!("unknown compression {s:?} (auto, lz4, xor or off; on means lz4)"))),
        }
    }
}

/// How one checkpoint's pages travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// As they are ([`crate::wire::Msg::Pages`] frames).
    Raw,
    /// As one LZ4 block per frame (compressed pages frames).
    Lz4,
    /// As their XOR against the backup's copy, then LZ4 ([`crate::wire::Msg::PagesDelta`]).
    Xor,
}

impl Encoding {
    /// Whether the pages are compressed (LZ4, of the pages or of their XOR).
    pub fn compressed(self) -> bool {
        self != Encoding::Raw
    }
}

/// One checkpoint as the sender wrote it.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Page bytes before compression.
    pub raw: u64,
    /// Page frame bytes written.
    pub wire: u64,
    /// Time spent encoding: XOR, checksums and compression (0 when sent raw).
    pub compress_ns: u64,
    /// Time spent writing the page frames (encoding excluded).
    pub send_ns: u64,
    /// How the pages travelled.
    pub encoding: Encoding,
}

/// A compressor's smoothed speed (raw bytes per ns) and ratio (wire / raw) on this VM's
/// pages, and the checkpoints since it was last used.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    speed: Option<f64>,
    ratio: Option<f64>,
    since: u32,
}

impl Figures {
    /// Time per raw byte to compress and send, on a link of `link` bytes per ns.
    fn cost(&self, link: f64) -> Option<f64> {
        Some(1.0 / self.speed? + self.ratio? / link)
    }
}

/// Smoothed figures and the decision ([`Compression::Auto`]).
#[derive(Debug, Clone)]
pub struct Chooser {
    mode: Compression,
    /// Link throughput, bytes per ns.
    link: Option<f64>,
    lz4: Figures,
    xor: Figures,
}

impl Chooser {
    /// Use a compressor one checkpoint in this many while not using it, to keep its ratio and
    /// speed current.
    pub const PROBE_EVERY: u32 = 32;
    /// Checkpoints smaller than this teach nothing about the link (the socket buffer takes
    /// them at once).
    pub const MIN_SAMPLE: u64 = 256 << 10;

    pub fn new(mode: Compression) -> Chooser {
        Chooser { mode, link: None, lz4: Figures::default(), xor: Figures::default() }
    }

    pub fn set_mode(&mut self, mode: Compression) {
        self.mode = mode;
    }

    /// How to send the next checkpoint; `delta` says whether the sender has the backup's copy
    /// of every page (a session's synchronisation is complete), without which there is no XOR.
    pub fn next(&mut self, delta: bool) -> Encoding {
        match self.mode {
            Compression::Off => Encoding::Raw,
            Compression::Lz4 => Encoding::Lz4,
            Compression::Xor if delta => Encoding::Xor,
            Compression::Xor => Encoding::Lz4,
            Compression::Auto => {
                let candidates: &[(Encoding, Figures)] =
                    if delta { &[(Encoding::Xor, self.xor), (Encoding::Lz4, self.lz4)] } else { &[(Encoding::Lz4, self.lz4)] };
                // Learn each compressor first, then the link.
                if let Some((e, _)) = candidates.iter().find(|(_, f)| f.speed.is_none() || f.ratio.is_none()) {
                    return *e;
                }
                let Some(link) = self.link else { return Encoding::Raw };
                if let Some((e, _)) = candidates.iter().find(|(_, f)| f.since >= Self::PROBE_EVERY) {
                    return *e;
                }
                // Time per raw byte: as it is, 1/link; compressed, 1/speed + ratio/link.
                let best = candidates.iter().filter_map(|(e, f)| Some((*e, f.cost(link)?))).min_by(|a, b| a.1.total_cmp(&b.1));
                match best {
                    Some((e, cost)) if cost < 0.8 / link => e,
                    _ => Encoding::Raw,
                }
            }
        }
    }

    /// Learns from a checkpoint the sender wrote.
    pub fn observe(&mut self, s: &Sample) {
        let ewma = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| 0.7 * o + 0.3 * new));
        for (e, f) in [(Encoding::Lz4, &mut self.lz4), (Encoding::Xor, &mut self.xor)] {
            if s.encoding != e {
                f.since = f.since.saturating_add(1);
                continue;
            }
            f.since = 0;
            if s.raw > 0 && s.compress_ns > 0 {
                f.speed = ewma(f.speed, s.raw as f64 / s.compress_ns as f64);
                f.ratio = ewma(f.ratio, s.wire as f64 / s.raw as f64);
            }
        }
        if s.wire >= Self::MIN_SAMPLE && s.send_ns > 0 {
            self.link = ewma(self.link, s.wire as f64 / s.send_ns as f64);
        }
    }

    /// The link and compressor figures measured so far.
    pub fn figures(&self) -> Figured {
        let mbs = |v: Option<f64>| v.map(|x| x * 1e3);
        Figured {
            link_mbs: mbs(self.link),
            lz4_mbs: mbs(self.lz4.speed),
            lz4_ratio: self.lz4.ratio,
            xor_mbs: mbs(self.xor.speed),
            xor_ratio: self.xor.ratio,
        }
    }
}

/// What a [`Chooser`] measured so far (MB/s; ratios wire / raw).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figured {
    pub link_mbs: Option<f64>,
    pub lz4_mbs: Option<f64>,
    pub lz4_ratio: Option<f64>,
    pub xor_mbs: Option<f64>,
    pub xor_ratio: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint of `raw` bytes sent as `encoding` over a link of `link_gbs` GB/s, the
    /// compressor running at `compress_gbs` GB/s with ratio `ratio`.
    fn sample(raw: u64, ratio: f64, link_gbs: f64, compress_gbs: f64, encoding: Encoding) -> Sample {
        let compressed = encoding.compressed();
        let wire = if compressed { (raw as f64 * ratio) as u64 } else { raw };
        Sample {
            raw,
            wire,
            compress_ns: if compressed { (raw as f64 / compress_gbs) as u64 } else { 0 },
            send_ns: (wire as f64 / link_gbs) as u64,
            encoding,
        }
    }

    /// Feeds the chooser a link, LZ4 as (speed GB/s, ratio) and XOR+LZ4 likewise (`None`: no
    /// copy for deltas); returns how many of 100 checkpoints it sent raw, as LZ4 and as XOR.
    fn run(link_gbs: f64, lz4: (f64, f64), xor: Option<(f64, f64)>) -> [usize; 3] {
        let mut c = Chooser::new(Compression::Auto);
        let mut n = [0; 3];
        for _ in 0..100 {
            let e = c.next(xor.is_some());
            let (speed, ratio) = match e {
                Encoding::Raw => (1.0, 1.0),
                Encoding::Lz4 => lz4,
                Encoding::Xor => xor.unwrap_or((1.0, 1.0)),
            };
            n[e as usize] += 1;
            c.observe(&sample(8 << 20, ratio, link_gbs, speed, e));
        }
        n
    }

    #[test]
    fn compresses_on_a_slow_link_and_not_on_a_fast_one() {
        // 1 Gbit/s (0.125 GB/s), LZ4 at 2 GB/s, pages compressing 10:1: compress.
        assert!(run(0.125, (2.0, 0.1), None)[1] > 95);
        // Loopback at 3 GB/s, incompressible pages: only the probes.
        assert!(run(3.0, (2.0, 1.0), None)[0] >= 95);
        // Fast link, pages that compress 100:1 and fast: compressing still wins.
        assert!(run(3.0, (10.0, 0.01), None)[1] > 95);
    }

    #[test]
    fn xor_is_chosen_when_it_pays_more_than_lz4() {
        // 1 Gbit/s; the pages' unchanged content makes their XOR compress 50:1 against
        // LZ4's 2:1, at a somewhat slower speed: XOR, LZ4 only for its probes.
        let [raw, lz4, xor] = run(0.125, (2.0, 0.5), Some((1.5, 0.02)));
        assert!(xor > 90 && lz4 <= 5 && raw <= 2, "{raw} {lz4} {xor}");
        // The same ratio for both (pages rewritten whole): LZ4, the faster.
        let [raw, lz4, xor] = run(0.125, (2.0, 0.1), Some((1.0, 0.1)));
        assert!(lz4 > 90 && xor <= 5 && raw <= 2, "{raw} {lz4} {xor}");
        // A fast link and pages nothing compresses: raw, bar the probes.
        let [raw, _, _] = run(3.0, (2.0, 1.0), Some((1.5, 1.0)));
        assert!(raw >= 90, "{raw}");
    }

    #[test]
    fn fixed_modes_and_their_names() {
        let mut c = Chooser::new(Compression::Xor);
        assert_eq!(c.next(true), Encoding::Xor);
        assert_eq!(c.next(false), Encoding::Lz4, "no copy yet: no delta");
        c.set_mode(Compression::Lz4);
        assert_eq!(c.next(true), Encoding::Lz4);
        c.set_mode(Compression::Off);
        assert_eq!(c.next(true), Encoding::Raw);
        for (s, want) in [("auto", "auto"), ("lz4", "lz4"), ("on", "lz4"), ("xor", "xor"), ("off", "off")] {
            assert_eq!(s.parse::<Compression>().map(|c| c.to_string()).as_deref(), Ok(want));
        }
        let e = "zstd".parse::<Compression>().unwrap_err().to_string();
        assert!(e.contains("\"zstd\"") && e.contains("auto, lz4, xor or off"), "{e}");
    }
}
