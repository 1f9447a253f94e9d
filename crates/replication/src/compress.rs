//! When to compress a checkpoint's pages on the wire: per checkpoint, from measured figures —
//! the link's throughput (page bytes over the time the sender took to write them), the
//! compressor's speed and its ratio on this VM's pages — compress when sending the compressed
//! bytes plus compressing them is estimated faster than sending them as they are (on a slow
//! link), not when it would only cost CPU (on a fast one). Pure: the sender reports each
//! checkpoint's figures and asks before the next one.

use std::fmt;
use std::str::FromStr;

/// What the operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Per checkpoint, when it pays ([`Chooser`]).
    #[default]
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Auto => "auto",
            Compression::On => "on",
            Compression::Off => "off",
        })
    }
}

impl FromStr for Compression {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Compression::Auto),
            "on" => Ok(Compression::On),
            "off" => Ok(Compression::Off),
            _ => Err(crate::Error::Compression(format!("unknown compression {s:?} (auto, on or off)"))),
        }
    }
}

/// One checkpoint as the sender wrote it.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Page bytes before compression.
    pub raw: u64,
    /// Page frame bytes written.
    pub wire: u64,
    /// Time spent compressing (0 when not compressed).
    pub compress_ns: u64,
    /// Time spent writing the page frames (compression excluded).
    pub send_ns: u64,
    pub compressed: bool,
}

/// Smoothed figures and the decision ([`Compression::Auto`]).
#[derive(Debug, Clone)]
pub struct Chooser {
    mode: Compression,
    /// Link throughput, bytes per ns.
    link: Option<f64>,
    /// Compressor speed, raw bytes per ns, and ratio (wire / raw).
    speed: Option<f64>,
    ratio: Option<f64>,
    /// Checkpoints since the last compressed one (to measure again now and then).
    since_probe: u32,
}

impl Chooser {
    /// Compress one checkpoint in this many while not compressing, to keep the ratio and speed
    /// current.
    pub const PROBE_EVERY: u32 = 32;
    /// Checkpoints smaller than this teach nothing about the link (the socket buffer takes
    /// them at once).
    pub const MIN_SAMPLE: u64 = 256 << 10;

    pub fn new(mode: Compression) -> Chooser {
        Chooser { mode, link: None, speed: None, ratio: None, since_probe: 0 }
    }

    pub fn set_mode(&mut self, mode: Compression) {
        self.mode = mode;
    }

    /// Whether to compress the next checkpoint.
    pub fn compress_next(&mut self) -> bool {
        match self.mode {
            Compression::On => true,
            Compression::Off => false,
            Compression::Auto => {
                let (Some(link), Some(speed), Some(ratio)) = (self.link, self.speed, self.ratio) else {
                    // Learn the compressor first, then the link.
                    return self.speed.is_none();
                };
                if self.since_probe >= Self::PROBE_EVERY {
                    return true;
                }
                // Time per raw byte: as it is, 1/link; compressed, 1/speed + ratio/link.
                1.0 / speed + ratio / link < 0.8 / link
            }
        }
    }

    /// Learns from a checkpoint the sender wrote.
    pub fn observe(&mut self, s: &Sample) {
        let ewma = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| 0.7 * o + 0.3 * new));
        if s.compressed {
            self.since_probe = 0;
            if s.raw > 0 && s.compress_ns > 0 {
                self.speed = ewma(self.speed, s.raw as f64 / s.compress_ns as f64);
                self.ratio = ewma(self.ratio, s.wire as f64 / s.raw as f64);
            }
        } else {
            self.since_probe = self.since_probe.saturating_add(1);
        }
        if s.wire >= Self::MIN_SAMPLE && s.send_ns > 0 {
            self.link = ewma(self.link, s.wire as f64 / s.send_ns as f64);
        }
    }

    /// (link MB/s, compressor MB/s, ratio) as measured so far.
    pub fn figures(&self) -> (Option<f64>, Option<f64>, Option<f64>) {
        (self.link.map(|l| l * 1e3), self.speed.map(|s| s * 1e3), self.ratio)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(raw: u64, ratio: f64, link_gbs: f64, compress_gbs: f64, compressed: bool) -> Sample {
        let wire = if compressed { (raw as f64 * ratio) as u64 } else { raw };
        Sample {
            raw,
            wire,
            compress_ns: if compressed { (raw as f64 / compress_gbs) as u64 } else { 0 },
            send_ns: (wire as f64 / link_gbs) as u64,
            compressed,
        }
    }

    /// Feeds the chooser a link and a compressor; returns how many of 100 checkpoints it
    /// compressed.
    fn run(link_gbs: f64, compress_gbs: f64, ratio: f64) -> usize {
        let mut c = Chooser::new(Compression::Auto);
        let mut n = 0;
        for _ in 0..100 {
            let z = c.compress_next();
            n += z as usize;
            c.observe(&sample(8 << 20, ratio, link_gbs, compress_gbs, z));
        }
        n
    }

    #[test]
    fn compresses_on_a_slow_link_and_not_on_a_fast_one() {
        // 1 Gbit/s (0.125 GB/s), LZ4 at 2 GB/s, pages compressing 10:1: compress.
        assert!(run(0.125, 2.0, 0.1) > 95);
        // Loopback at 3 GB/s, incompressible pages: only the probes.
        assert!(run(3.0, 2.0, 1.0) <= 5);
        // Fast link, pages that compress 100:1 and fast: compressing still wins.
        assert!(run(3.0, 10.0, 0.01) > 95);
        assert_eq!("on".parse::<Compression>().map(|c| c.to_string()).as_deref(), Ok("on"));
        assert!("zstd".parse::<Compression>().is_err());
    }
}
