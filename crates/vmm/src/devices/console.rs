//! The console: guest text to the host's log, rate-limited so that a guest cannot fill the
//! host's disk. A token bucket allows bursts of [`CONSOLE_BURST`] bytes and
//! [`CONSOLE_RATE`] bytes per second on average; output beyond it is dropped, and the console
//! says so (`[vigil: console output over the limit; dropping]`, then, when output flows again,
//! `[vigil: N bytes of console output dropped]`).

use std::io::Write;
use std::time::Instant;

/// Average console bytes per second a guest may write.
pub const CONSOLE_RATE: u64 = 1 << 20;
/// Console bytes a guest may write at once after a quiet period.
pub const CONSOLE_BURST: u64 = 4 << 20;

/// The console sink with its limit.
pub struct Console {
    out: Box<dyn Write + Send>,
    /// Bytes that may be written now (at most the burst).
    tokens: u64,
    last: Instant,
    /// Bytes dropped since output last flowed.
    dropped: u64,
    /// Bytes dropped in all.
    pub dropped_total: u64,
}

impl Console {
    pub fn new(out: Box<dyn Write + Send>) -> Console {
        Console { out, tokens: CONSOLE_BURST, last: Instant::now(), dropped: 0, dropped_total: 0 }
    }

    /// Writes `bytes` if the limit allows, else drops them (and says so once).
    pub fn write(&mut self, bytes: &[u8]) {
        self.write_at(bytes, Instant::now());
    }

    fn write_at(&mut self, bytes: &[u8], now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let refill = (elapsed.as_nanos().saturating_mul(CONSOLE_RATE as u128) / 1_000_000_000).min(CONSOLE_BURST as u128) as u64;
        if refill > 0 {
            self.tokens = self.tokens.saturating_add(refill).min(CONSOLE_BURST);
            self.last = now;
        }
        let len = bytes.len() as u64;
        // Once dropping, output resumes only when a quarter of the burst is available again,
        // so that a steady flood makes few notices, not one per write.
        let resume = if self.dropped > 0 { len.max(CONSOLE_BURST / 4) } else { len };
        if resume > self.tokens {
            if self.dropped == 0 {
                let _ = writeln!(
                    self.out,
                    "\n[vigil: console output over the limit ({} MiB/s, bursts of {} MiB); dropping]",
                    CONSOLE_RATE >> 20,
                    CONSOLE_BURST >> 20
                );
                let _ = self.out.flush();
            }
            self.dropped += len;
            self.dropped_total += len;
            return;
        }
        if self.dropped > 0 {
            let _ = writeln!(self.out, "[vigil: {} bytes of console output dropped]", self.dropped);
            self.dropped = 0;
        }
        self.tokens -= len;
        let _ = self.out.write_all(bytes);
        let _ = self.out.flush();
    }

    pub fn flush(&mut self) {
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_flood_is_cut_to_the_rate_and_the_drop_is_said() {
        let sink = Sink::default();
        let mut c = Console::new(Box::new(sink.clone()));
        let start = Instant::now();
        let chunk = vec![b'x'; 64 << 10];
        // 20,000 writes of 64 KiB over 2 s of (simulated) time.
        for i in 0..20_000u32 {
            c.write_at(&chunk, start + Duration::from_micros(100) * i);
        }
        let out = sink.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let limit = CONSOLE_BURST + 2 * CONSOLE_RATE + 4096;
        assert!((out.len() as u64) <= limit, "{} bytes written", out.len());
        let text = String::from_utf8_lossy(&out);
        let episodes = text.matches("dropping]").count();
        assert!((1..=3).contains(&episodes), "{episodes} notices");
        assert_eq!(text.matches("bytes of console output dropped]").count(), episodes - 1);
        assert!(c.dropped_total > 1 << 30);
        // Quiet for a second: output flows again, with the count of what was dropped.
        c.write_at(b"hello\n", start + Duration::from_secs(3));
        let out = sink.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let text = String::from_utf8_lossy(&out);
        assert!(text.ends_with("bytes of console output dropped]\nhello\n"), "{}", &text[text.len() - 100..]);
    }
}
