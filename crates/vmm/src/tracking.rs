//! Dirty-page tracking for checkpoints: which pages of a protected VM changed in an epoch.
//!
//! Owns the ways of finding them and the switch between them, per epoch:
//! - [`TrackingMode::Log`]: KVM's dirty log. Cheap for the host, but on nested PVM hosts every
//!   first guest write to a page after each collection takes a write-protection fault
//!   (measured 16–26 µs, `vigil bench tracking`), so a guest that rewrites thousands of pages
//!   per epoch spends most of its time in faults.
//! - [`TrackingMode::Compare`]: logging off (no faults at all); at the checkpoint, every page
//!   is compared against a *shadow* copy of guest memory as of the last checkpoint, and the
//!   pages that differ are the dirty ones (and are copied into the shadow). Costs the host a
//!   pass over memory during the pause (~0.3 µs a page), independent of the dirty rate.
//! - [`TrackingMode::Hybrid`]: both, page by page, with KVM's manual dirty-log protection: hot
//!   pages (written since they were last found unchanged for a while) stay writable and are
//!   compared, cold ones are logged.
//!
//! [`DirtyTracker`] keeps the shadow and the invariant that makes a switch lose nothing:
//! every page whose shadow may differ from memory at the last checkpoint is in `stale`; in
//! compare mode `stale` is empty, and hot pages' shadows are always current. The shadow is
//! warmed up a bounded number of pages per checkpoint before a switch to compare mode, so no
//! pause grows with the VM's size. [`Chooser`] decides the next epoch's mode from measured
//! figures (dirty and hot pages, the compare's own time, the host's fault cost from
//! [`Calibration`]).
//! The tracker does no I/O: the VMM gives it guest memory and a [`DirtyLog`] (KVM's), and the
//! deterministic simulation of the replication protocol gives it a model VM's.
//!
//! Not owned here: copying the dirty pages into a checkpoint (`checkpoint.rs`), the protocol.

use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use vmm_abi::PAGE_SIZE;

const PAGE: usize = PAGE_SIZE as usize;

/// How an epoch's dirty pages are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackingMode {
    /// KVM's dirty log (write-protection faults in the guest).
    Log,
    /// Comparing memory against the last checkpoint's copy (no faults; a pass over memory at
    /// each checkpoint).
    Compare,
    /// The dirty log for cold pages, comparison for hot ones: a page the log reports dirty is
    /// left writable (KVM's manual dirty-log protection) and compared against its shadow at
    /// each checkpoint instead of faulting again; a hot page unchanged for a while is
    /// write-protected again.
    Hybrid,
}

impl fmt::Display for TrackingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrackingMode::Log => "log",
            TrackingMode::Compare => "compare",
            TrackingMode::Hybrid => "hybrid",
        })
    }
}

/// The tracking a protected VM asks for: one mode always, or chosen per epoch. Written as
/// `auto`, `log` or `compare` (also in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TrackingChoice {
    /// Per epoch, whichever [`Chooser`] estimates cheaper.
    #[default]
    Auto,
    /// Always this mode.
    Fixed(TrackingMode),
}

impl fmt::Display for TrackingChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrackingChoice::Auto => f.write_str("auto"),
            TrackingChoice::Fixed(m) => m.fmt(f),
        }
    }
}

impl From<TrackingChoice> for String {
    fn from(c: TrackingChoice) -> String {
        c.to_string()
    }
}

impl TryFrom<String> for TrackingChoice {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl FromStr for TrackingChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(TrackingChoice::Auto),
            "log" => Ok(TrackingChoice::Fixed(TrackingMode::Log)),
            "compare" => Ok(TrackingChoice::Fixed(TrackingMode::Compare)),
            "hybrid" => Ok(TrackingChoice::Fixed(TrackingMode::Hybrid)),
            _ => Err(format!("unknown dirty tracking {s:?} (auto, log, compare or hybrid)")),
        }
    }
}

/// A dirty log: KVM's, or a model's in a simulation.
pub trait DirtyLog {
    /// The dirty bits, one per page: the pages the guest wrote since they were last cleared
    /// (or since the log was enabled). Without manual protection ([`DirtyLog::manual`]) they
    /// are cleared and the pages write-protected again by this call; with it, they stay set
    /// (and the pages writable) until [`DirtyLog::clear`]. Only called while enabled.
    fn get(&mut self) -> Result<Vec<u64>, String>;
    /// Whether the log has manual protection: [`DirtyLog::get`] leaves the bits set and the
    /// pages writable, [`DirtyLog::clear`] clears and write-protects the pages it is given.
    fn manual(&self) -> bool {
        false
    }
    /// Clears these bits and write-protects their pages again (manual protection; nothing
    /// otherwise).
    fn clear(&mut self, bits: &[u64]) -> Result<(), String> {
        let _ = bits;
        Ok(())
    }
    /// The dirty bits, all cleared and write-protected again.
    fn get_and_clear(&mut self) -> Result<Vec<u64>, String> {
        let bits = self.get()?;
        self.clear(&bits)?;
        Ok(bits)
    }
    /// Turns logging on (from a clean log) or off.
    fn set_enabled(&mut self, on: bool) -> Result<(), String>;
}

/// What closing an epoch found.
#[derive(Debug, Clone, Default)]
pub struct Closed {
    /// The pages that changed since the last checkpoint, ascending.
    pub pages: Vec<u64>,
    /// The mode of the epoch just closed.
    pub mode: Option<TrackingMode>,
    /// The mode of the epoch opened.
    pub next: Option<TrackingMode>,
    /// Pages whose shadow is out of date after finding this epoch's pages (before any warm-up).
    pub stale: u64,
    /// Time spent finding the pages (collecting the log, or comparing).
    pub find_ns: u64,
    /// Time spent on the shadow (warming it up, bringing it up to date for a switch to compare
    /// mode) and turning logging on or off.
    pub switch_ns: u64,
    /// Pages copied into the shadow.
    pub shadow_filled: u64,
}

/// Most stale pages one checkpoint copies into the shadow while compare mode is wanted but the
/// shadow is not ready (4 MiB: about a millisecond of the pause).
pub const WARM_PAGES: u64 = 1024;

/// Most stale pages a switch to compare mode copies (16 MiB: a few milliseconds of the
/// pause); with more, the tracker warms the shadow up first.
pub const SWITCH_PAGES: u64 = 4096;

/// Default of [`DirtyTracker::set_demote_after`].
pub const DEMOTE_AFTER: u8 = 16;

/// A shadow this small is prepared at once (and deterministically, as the simulation needs).
const INLINE_SHADOW: usize = 1 << 20;

/// Per-VM tracking state while protected (see the module comment).
pub struct DirtyTracker {
    mode: TrackingMode,
    pages: u64,
    /// Guest memory as of the last checkpoint, except the pages in `stale`; allocated (zero,
    /// untouched) when compare mode is first wanted.
    shadow: Vec<u8>,
    /// One bit per page whose shadow may be out of date.
    stale: Vec<u64>,
    /// Where the next warm-up starts looking for stale pages.
    warm_cursor: u64,
    /// Warm-up budget per checkpoint ([`WARM_PAGES`]) and most stale pages at a switch
    /// ([`SWITCH_PAGES`]).
    warm_pages: u64,
    switch_pages: u64,
    /// The shadow's buffer being allocated and faulted in by another thread.
    preparing: Option<std::thread::JoinHandle<Vec<u8>>>,
    /// Hybrid mode: the hot pages (left writable, compared), and per hot page the epochs it
    /// has not changed.
    hot: Vec<u64>,
    idle: Vec<u8>,
    /// A hot page unchanged for this many epochs is write-protected again.
    demote_after: u8,
    /// Most hot pages the next hybrid epoch closes with ([`DirtyTracker::set_hot_limit`]).
    hot_limit: u64,
}

impl DirtyTracker {
    /// A tracker in log mode for a VM of `pages` pages; the caller has just turned the dirty
    /// log on from a clean slate (so the first epoch's pages are what it collects). `shadow`
    /// is the buffer of an earlier tracker of the same VM ([`DirtyTracker::into_shadow`]), kept
    /// to spare its page faults; its contents count as out of date.
    pub fn new(pages: u64, shadow: Option<Vec<u8>>) -> DirtyTracker {
        let shadow = shadow.filter(|s| s.len() as u64 == pages * PAGE_SIZE).unwrap_or_default();
        let words = pages.div_ceil(64) as usize;
        let mut stale = vec![!0u64; words];
        if let Some(last) = stale.last_mut() {
            if pages % 64 != 0 {
                *last = (1u64 << (pages % 64)) - 1;
            }
        }
        DirtyTracker {
            mode: TrackingMode::Log,
            pages,
            shadow,
            stale,
            warm_cursor: 0,
            warm_pages: WARM_PAGES,
            switch_pages: SWITCH_PAGES,
            preparing: None,
            hot: vec![0; words],
            idle: Vec::new(),
            demote_after: DEMOTE_AFTER,
            hot_limit: u64::MAX,
        }
    }

    /// Hot pages (hybrid mode).
    pub fn hot_pages(&self) -> u64 {
        self.hot.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Sets after how many unchanged epochs a hot page is write-protected again (from the
    /// host's costs: keeping a page hot costs a comparison per epoch, letting it go a fault
    /// when it is written again).
    pub fn set_demote_after(&mut self, epochs: u8) {
        self.demote_after = epochs.max(1);
    }

    /// Sets the most hot pages the next hybrid epoch closes with (`u64::MAX`: no limit;
    /// [`Chooser::hot_limit`]). Pages already hot keep their place, in page order; beyond the
    /// limit a hot page is write-protected again after its comparison and a newly written
    /// page is not made hot, so their next writes fault, as in log mode.
    pub fn set_hot_limit(&mut self, pages: u64) {
        self.hot_limit = pages;
    }

    /// Sets the warm-up budget per checkpoint and the most stale pages a switch copies (tests
    /// use small ones).
    pub fn set_warm_pages(&mut self, warm: u64, switch: u64) {
        self.warm_pages = warm.max(1);
        self.switch_pages = switch;
    }

    /// The shadow's buffer, for a later tracker of the same VM.
    pub fn into_shadow(self) -> Vec<u8> {
        match self.preparing {
            Some(h) if self.shadow.is_empty() => h.join().unwrap_or_default(),
            _ => self.shadow,
        }
    }

    /// The mode of the open epoch.
    pub fn mode(&self) -> TrackingMode {
        self.mode
    }

    /// Pages whose shadow is out of date (what a switch to compare mode would copy).
    pub fn stale_pages(&self) -> u64 {
        self.stale.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Closes the open epoch at a checkpoint (the guest stopped): returns the pages that
    /// changed since the last checkpoint — found by the open epoch's mode, plus `vmm_written`
    /// (one bit per page the VMM itself wrote; KVM's log does not see those) — and opens the
    /// next epoch in the mode `choose` picks from what was found. `mem` is all of guest memory
    /// as it is now.
    ///
    /// Switching to compare mode needs the shadow current: while more than [`SWITCH_PAGES`]
    /// pages are stale, the tracker stays in log mode and copies up to [`WARM_PAGES`] stale
    /// pages into the shadow instead (so no pause grows with the VM's size); then it copies the
    /// rest and turns logging off. To log mode, logging is turned on
    /// from a clean log, and the shadow, current now, goes stale page by page as later epochs'
    /// logs say. Either way no page is lost.
    pub fn close_epoch(
        &mut self,
        mem: &[u8],
        vmm_written: &[u64],
        log: &mut dyn DirtyLog,
        choose: impl FnOnce(&Closed) -> TrackingMode,
    ) -> Result<Closed, String> {
        if mem.len() as u64 != self.pages * PAGE_SIZE {
            return Err(format!("{} bytes of memory for a tracker of {} pages", mem.len(), self.pages));
        }
        let t = Instant::now();
        let mut closed = Closed { mode: Some(self.mode), ..Closed::default() };
        let mut bits: Vec<u64> = vec![0; self.stale.len()];
        for (b, v) in bits.iter_mut().zip(vmm_written) {
            *b |= v;
        }
        match self.mode {
            TrackingMode::Log => {
                for (b, v) in bits.iter_mut().zip(log.get_and_clear()?) {
                    *b |= v;
                }
                closed.pages = pages_of_bits(&bits, self.pages);
                for (s, b) in self.stale.iter_mut().zip(&bits) {
                    *s |= b;
                }
            }
            TrackingMode::Hybrid => closed.pages = self.find_hybrid(mem, &bits, log)?,
            TrackingMode::Compare => {
                // Invariant: in compare mode the shadow is all of memory at the last checkpoint.
                let mut pages = Vec::new();
                for (p, (now, old)) in mem.chunks_exact(PAGE).zip(self.shadow.chunks_exact_mut(PAGE)).enumerate() {
                    let vmm = bits.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0);
                    if vmm || now != &*old {
                        old.copy_from_slice(now);
                        pages.push(p as u64);
                    }
                }
                closed.pages = pages;
            }
        }
        closed.find_ns = t.elapsed().as_nanos() as u64;
        closed.stale = self.stale_pages();
        let mut next = choose(&closed);
        let t = Instant::now();
        if next == TrackingMode::Hybrid && !log.manual() {
            // Without manual protection a hybrid epoch would be a log epoch.
            next = TrackingMode::Log;
        }
        if self.mode != TrackingMode::Compare && next != self.mode {
            // Out of hybrid mode: every hot page write-protected again (their changes in this
            // epoch were found by comparison; later writes are the log's).
            let hot = std::mem::replace(&mut self.hot, vec![0; self.stale.len()]);
            if self.mode == TrackingMode::Hybrid && next == TrackingMode::Log {
                log.clear(&hot)?;
            }
        }
        if next != TrackingMode::Log && self.shadow.is_empty() {
            self.poll_shadow(mem.len())?;
            if self.shadow.is_empty() && next == TrackingMode::Compare {
                next = if self.mode == TrackingMode::Hybrid { TrackingMode::Hybrid } else { TrackingMode::Log };
            }
        }
        if self.mode != TrackingMode::Compare && next == TrackingMode::Compare {
            if closed.stale > self.switch_pages {
                closed.shadow_filled = self.warm(mem, self.warm_pages);
                next = self.mode;
            } else {
                closed.shadow_filled = self.warm(mem, u64::MAX);
                log.set_enabled(false)?;
            }
        } else if self.mode == TrackingMode::Compare && next != TrackingMode::Compare {
            log.set_enabled(true)?;
        }
        closed.switch_ns = t.elapsed().as_nanos() as u64;
        closed.next = Some(next);
        self.mode = next;
        Ok(closed)
    }

    /// Takes the shadow's buffer if it is ready, or starts preparing it: its pages are faulted
    /// in by another thread (first touch of fresh memory costs ~2.5 ms per MiB here), never
    /// in a pause.
    fn poll_shadow(&mut self, len: usize) -> Result<(), String> {
        match self.preparing.take() {
            Some(h) if h.is_finished() => self.shadow = h.join().map_err(|_| "the shadow's preparing thread panicked")?,
            Some(h) => self.preparing = Some(h),
            None if len <= INLINE_SHADOW => self.shadow = new_shadow(len),
            None => self.preparing = Some(std::thread::spawn(move || new_shadow(len))),
        }
        Ok(())
    }

    /// A hybrid epoch's dirty pages: the log's cold pages, and the hot pages that differ from
    /// their shadow; then the cold dirty pages become hot (left writable, their shadow taken
    /// now; once the shadow's buffer is ready), hot pages unchanged for `demote_after` epochs
    /// become cold, and every page that is not hot is write-protected again.
    fn find_hybrid(&mut self, mem: &[u8], vmm: &[u64], log: &mut dyn DirtyLog) -> Result<Vec<u64>, String> {
        let raw = log.get()?;
        let shadow_ready = !self.shadow.is_empty();
        let mut pages = Vec::new();
        if self.idle.len() as u64 != self.pages && shadow_ready {
            self.idle = vec![0; self.pages as usize];
        }
        // Room for pages made hot in this epoch: what the limit leaves after the hot pages.
        let mut room = self.hot_limit.saturating_sub(self.hot_pages());
        // Hot pages kept so far (against the limit).
        let mut kept = 0u64;
        for i in 0..self.stale.len() {
            let logged = raw.get(i).copied().unwrap_or(0);
            let by_vmm = vmm.get(i).copied().unwrap_or(0);
            let mut w = logged | by_vmm | self.hot[i];
            while w != 0 {
                let b = w.trailing_zeros() as u64;
                w &= w - 1;
                let p = i as u64 * 64 + b;
                if p >= self.pages {
                    continue;
                }
                let bit = 1u64 << b;
                let at = p as usize * PAGE;
                if self.hot[i] & bit != 0 {
                    let (now, old) = (&mem[at..at + PAGE], &mut self.shadow[at..at + PAGE]);
                    if by_vmm & bit != 0 || now != &*old {
                        old.copy_from_slice(now);
                        pages.push(p);
                        self.idle[p as usize] = 0;
                    } else {
                        self.idle[p as usize] = self.idle[p as usize].saturating_add(1);
                        if self.idle[p as usize] >= self.demote_after {
                            self.hot[i] &= !bit;
                        }
                    }
                    if self.hot[i] & bit != 0 {
                        if kept < self.hot_limit {
                            kept += 1;
                        } else {
                            // Over the limit: write-protected again below (its shadow is
                            // current: compared, and copied if it changed, just now).
                            self.hot[i] &= !bit;
                        }
                    }
                } else {
                    pages.push(p);
                    if shadow_ready && room == 0 {
                        // No room: logged, its shadow out of date, as in log mode.
                        self.stale[i] |= bit;
                    } else if shadow_ready {
                        room -= 1;
                        // Written: hot from now on, its shadow current. (Waiting for a second
                        // epoch in a row misses pages rewritten every other epoch, as a guest
                        // slowed by faults rewrites half its working set an epoch.)
                        self.shadow[at..at + PAGE].copy_from_slice(&mem[at..at + PAGE]);
                        self.hot[i] |= bit;
                        self.stale[i] &= !bit;
                        self.idle[p as usize] = 0;
                    } else {
                        self.stale[i] |= bit;
                    }
                }
            }
        }
        // Write-protect again everything the log reported that is not hot (now).
        let clear: Vec<u64> = raw.iter().zip(&self.hot).map(|(r, h)| r & !h).collect();
        log.clear(&clear)?;
        Ok(pages)
    }

    /// Copies up to `budget` stale pages from `mem` (memory at this checkpoint) into the
    /// shadow, from where the last warm-up stopped; returns how many.
    fn warm(&mut self, mem: &[u8], budget: u64) -> u64 {
        let mut done = 0;
        let words = self.stale.len() as u64;
        for k in 0..words {
            let i = ((self.warm_cursor / 64 + k) % words) as usize;
            while self.stale[i] != 0 && done < budget {
                let b = self.stale[i].trailing_zeros() as u64;
                let at = (i as u64 * 64 + b) as usize * PAGE;
                self.shadow[at..at + PAGE].copy_from_slice(&mem[at..at + PAGE]);
                self.stale[i] &= !(1 << b);
                done += 1;
            }
            if done >= budget {
                self.warm_cursor = i as u64 * 64;
                break;
            }
        }
        done
    }
}

/// A zeroed shadow buffer of `len` bytes, asked to use transparent huge pages, every page
/// written once (first-touch faults dominate filling fresh memory on these hosts: this runs
/// on its own thread, not in a checkpoint's pause).
fn new_shadow(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    const HUGE: usize = 2 << 20;
    let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
    let end = (v.as_ptr() as usize + len) & !(HUGE - 1);
    if end > start {
        // SAFETY: advice on whole pages inside our own allocation; it changes no contents and
        // its failure (no THP support) is harmless.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
    for i in (0..len).step_by(PAGE) {
        // Volatile: a write the compiler cannot drop, so that the page is really allocated.
        // SAFETY: `i < len`, inside the vector.
        unsafe { std::ptr::write_volatile(v.as_mut_ptr().add(i), 0) };
    }
    v
}

/// Ascending page numbers of the set bits, below `pages`.
fn pages_of_bits(bits: &[u64], pages: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, &w) in bits.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            let p = i as u64 * 64 + w.trailing_zeros() as u64;
            if p < pages {
                out.push(p);
            }
            w &= w - 1;
        }
    }
    out
}

/// What the chooser learns from one closed epoch.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    /// The mode of the epoch.
    pub mode: TrackingMode,
    /// Its dirty pages.
    pub dirty: u64,
    /// All of the VM's pages.
    pub pages: u64,
    /// How long finding them took (for compare mode: the pass over memory).
    pub find_ns: u64,
    /// Of them, hybrid mode's hot pages (compared, no faults); the others took faults.
    pub hot: u64,
    /// Network output waits for the checkpoint closing the epoch.
    pub output_waits: bool,
}

/// Chooses each epoch's tracking from measured costs, in units of guest time lost per epoch:
/// log mode costs `dirty × fault` (the guest's write-protection faults; in hybrid mode only the
/// cold dirty pages fault, the hot ones cost a comparison each), compare mode costs the pass
/// over memory in the pause (`pages × compare cost per page`, measured by every compare epoch,
/// first from the host calibration). Where the log has manual protection, `auto` logs in
/// hybrid mode. Switches when the other mode is estimated at least
/// [`Chooser::MARGIN`] times cheaper, and not within [`Chooser::DWELL`] epochs of the last
/// switch (a switch to compare mode costs a copy of the stale pages). Without a fault-cost
/// calibration it keeps log mode. While output waits for the checkpoint, the checkpoint's
/// duration is in a reply's latency: the hot set is limited ([`Chooser::hot_limit`]) and a
/// compare pass longer than [`Chooser::OUTPUT_FIND_NS`] gives way to logging at once. In any
/// pause, the search is held to [`Chooser::PAUSE_FIND_NS`] (the hot set's size, and no compare
/// pass beyond it): a long pause is a silence the backup takes for a dead primary.
#[derive(Debug, Clone)]
pub struct Chooser {
    choice: TrackingChoice,
    /// Compare cost per page (ns), smoothed.
    compare_ns_per_page: Option<f64>,
    /// Hybrid mode's search cost per hot page (ns; compared, and copied when it changed),
    /// smoothed.
    hot_ns_per_page: Option<f64>,
    since_switch: u32,
    current: TrackingMode,
    /// The dirty log has manual protection: `auto` uses hybrid mode where it would log.
    hybrid: bool,
}

impl Chooser {
    /// How much cheaper the other mode must be estimated for a switch.
    pub const MARGIN: f64 = 1.5;
    /// Epochs to stay in a mode after a switch.
    pub const DWELL: u32 = 8;
    /// Longest search for dirty pages (ns) in a pause while output waits for the checkpoint:
    /// compare mode beyond it gives way to logging.
    pub const OUTPUT_FIND_NS: u64 = 500_000;
    /// Most hot pages while output waits for the checkpoint. Each hot page that changed costs
    /// every checkpoint a reply waits for about 8 µs here (compared, copied, sent, applied:
    /// 3.1 ms for 381 pages in `mixed`), so 128 cost at most about a millisecond, and the
    /// pages a request or a stream rewrites fit (kv's hot set under redis-benchmark: about
    /// 55; the stream guest's: about 90). A guest rewriting more takes the log's faults on
    /// the rest, which slow it to what its checkpoints carry quickly, instead of putting all
    /// its pages in every checkpoint.
    pub const OUTPUT_HOT_PAGES: u64 = 128;
    /// Longest search for dirty pages (ns) in any pause of `auto`: compare mode is not chosen
    /// when its pass over memory would take longer, and the hot set is held to what hybrid
    /// mode searches in that time. The pause is a silence on the replication link: the backup
    /// suspects its primary after 60 ms by default, and a 32 MiB hot set took 20–60 ms to
    /// search here (2.5–7 µs a page), which lost backups (and failed a VM over once) on the
    /// first checkpoints. A sixth of the timeout, so that the search, the copy and the
    /// sending after it stay well inside it.
    pub const PAUSE_FIND_NS: u64 = 10_000_000;

    /// A chooser for `choice`, starting in log mode; `hybrid`: the dirty log has manual
    /// protection, so `auto` may use hybrid mode (instead of plain logging).
    pub fn new(choice: TrackingChoice, hybrid: bool) -> Chooser {
        Chooser { choice, compare_ns_per_page: None, hot_ns_per_page: None, since_switch: 0, current: TrackingMode::Log, hybrid }
    }

    /// The most hot pages for the epoch being closed, under `auto` (a fixed choice: no limit):
    /// as many as hybrid mode searches in [`Chooser::PAUSE_FIND_NS`] at the cost per hot page
    /// measured so far (none measured yet: no limit), never fewer than
    /// [`Chooser::OUTPUT_HOT_PAGES`] (one sample inflated by a burst of pages made hot must not
    /// shut the hot set, after which nothing would be measured again), and at most
    /// [`Chooser::OUTPUT_HOT_PAGES`] while output waits for the checkpoint.
    pub fn hot_limit(&self, output_waits: bool) -> u64 {
        if self.choice != TrackingChoice::Auto {
            return u64::MAX;
        }
        let budget =
            self.hot_ns_per_page.map_or(u64::MAX, |ns| ((Self::PAUSE_FIND_NS as f64 / ns.max(1.0)) as u64).max(Self::OUTPUT_HOT_PAGES));
        if output_waits {
            budget.min(Self::OUTPUT_HOT_PAGES)
        } else {
            budget
        }
    }

    /// The choice it follows.
    pub fn choice(&self) -> TrackingChoice {
        self.choice
    }

    /// Follows `choice` from the next epoch on (a fixed mode applies at once, whatever the
    /// dwell).
    pub fn set_choice(&mut self, choice: TrackingChoice) {
        self.choice = choice;
    }

    /// Estimated cost per epoch of (log, compare) for `o`'s dirty pages, in ns of guest time,
    /// with `cal` the host calibration.
    pub fn estimates(&self, o: &Observation, cal: &Calibration) -> (f64, f64) {
        let per_page = self.compare_ns_per_page.unwrap_or(cal.compare_ns_per_page);
        let cold = o.dirty.saturating_sub(o.hot);
        (cold as f64 * cal.fault_ns + o.hot as f64 * per_page, o.pages as f64 * per_page)
    }

    /// The mode for the next epoch, after `o` (the epoch just closed), with the host's
    /// calibration if there is one.
    pub fn next(&mut self, o: &Observation, cal: Option<&Calibration>) -> TrackingMode {
        if o.mode == TrackingMode::Compare && o.pages > 0 {
            let sample = o.find_ns as f64 / o.pages as f64;
            self.compare_ns_per_page = Some(match self.compare_ns_per_page {
                Some(v) => 0.8 * v + 0.2 * sample,
                None => sample,
            });
        }
        if o.mode == TrackingMode::Hybrid && o.hot > 0 {
            // The whole search over the hot pages (the dirty log's share of it is small).
            let sample = o.find_ns as f64 / o.hot as f64;
            self.hot_ns_per_page = Some(match self.hot_ns_per_page {
                Some(v) => 0.8 * v + 0.2 * sample,
                None => sample,
            });
        }
        if o.mode != self.current {
            self.since_switch = 0;
            self.current = o.mode;
        }
        self.since_switch = self.since_switch.saturating_add(1);
        let logging = if self.hybrid { TrackingMode::Hybrid } else { TrackingMode::Log };
        let next = match (self.choice, cal) {
            (TrackingChoice::Fixed(m), _) => m,
            (TrackingChoice::Auto, None) => logging,
            // Output waits for the checkpoint: no pass over memory that does not fit the
            // budget (the hot set is held to it: `hot_limit`).
            (TrackingChoice::Auto, Some(_)) if o.output_waits => match o.mode {
                TrackingMode::Compare if o.find_ns <= Self::OUTPUT_FIND_NS => TrackingMode::Compare,
                _ => logging,
            },
            (TrackingChoice::Auto, Some(cal)) => {
                let (log, cmp) = self.estimates(o, cal);
                match o.mode {
                    // Plain logging to hybrid costs nothing (the log stays on): at once.
                    TrackingMode::Log if self.hybrid => TrackingMode::Hybrid,
                    // A pass longer than a pause may search: logging at once, whatever the
                    // dwell.
                    TrackingMode::Compare if o.find_ns > Self::PAUSE_FIND_NS => logging,
                    _ if self.since_switch < Self::DWELL => o.mode,
                    TrackingMode::Log | TrackingMode::Hybrid if log > Self::MARGIN * cmp && cmp <= Self::PAUSE_FIND_NS as f64 => {
                        TrackingMode::Compare
                    }
                    TrackingMode::Compare if cmp > Self::MARGIN * log => logging,
                    TrackingMode::Log | TrackingMode::Hybrid => logging,
                    m => m,
                }
            }
        };
        next
    }
}

/// This host's costs of the two tracking modes, measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Guest time of one write-protection fault (first write to a page after a collection).
    pub fault_ns: f64,
    /// Host time to compare one unchanged page against its copy.
    pub compare_ns_per_page: f64,
}

impl fmt::Display for Calibration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1} µs per dirty-log fault, {:.0} ns per page compared", self.fault_ns / 1e3, self.compare_ns_per_page)
    }
}

/// How old a calibration may be before it is measured again (by whichever VMM process on the
/// host needs it first).
pub const RECALIBRATE: Duration = Duration::from_secs(300);

static LATEST: Mutex<Option<Calibration>> = Mutex::new(None);
static STARTED: OnceLock<()> = OnceLock::new();

/// Where the host's last calibration is kept for the VMM processes that start after it (a
/// probe VM spinning for half a second at every VM's start would take the CPU from the VM and
/// its backup on a small host): `fault_ns compare_ns_per_page unix_seconds`.
fn calibration_file() -> std::path::PathBuf {
    std::env::temp_dir().join("vigil-tracking-calibration")
}

fn load_calibration() -> Option<(Calibration, Duration)> {
    let text = std::fs::read_to_string(calibration_file()).ok()?;
    let f: Vec<f64> = text.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    let (fault_ns, compare_ns_per_page, at) = (*f.first()?, *f.get(1)?, *f.get(2)?);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64();
    let valid = |v: f64| v.is_finite() && v > 0.0 && v < 1e9;
    if !valid(fault_ns) || !valid(compare_ns_per_page) || at > now {
        return None;
    }
    Some((Calibration { fault_ns, compare_ns_per_page }, Duration::from_secs_f64(now - at)))
}

fn store_calibration(c: &Calibration) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let tmp = calibration_file().with_extension(format!("{}", std::process::id()));
    if std::fs::write(&tmp, format!("{} {} {now}\n", c.fault_ns, c.compare_ns_per_page)).is_ok() {
        let _ = std::fs::rename(&tmp, calibration_file());
    }
}

/// The host's latest calibration, if one is known. The first call starts a background thread
/// that takes the host's stored calibration while it is younger than [`RECALIBRATE`], else
/// measures it (a probe VM for about half a second: [`Calibration::measure`]) and stores it,
/// and looks again every [`RECALIBRATE`]; until the first result, `None`.
pub fn host_calibration() -> Option<Calibration> {
    STARTED.get_or_init(|| {
        let _ = std::thread::Builder::new().name("calibrate".into()).spawn(|| loop {
            let wait = match load_calibration() {
                Some((c, age)) if age < RECALIBRATE => {
                    *LATEST.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
                    RECALIBRATE - age
                }
                _ => {
                    let mut return_soon = false;
                    match Calibration::measure() {
                        Ok(c) => {
                            store_calibration(&c);
                            *LATEST.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
                        }
                        Err(e) => {
                            eprintln!("vmm: dirty-tracking calibration failed (no comparison until it works): {e}");
                            return_soon = true;
                        }
                    }
                    if return_soon {
                        Duration::from_secs(30)
                    } else {
                        RECALIBRATE
                    }
                }
            };
            std::thread::sleep(wait.max(Duration::from_secs(1)));
        });
    });
    *LATEST.lock().unwrap_or_else(|e| e.into_inner())
}

/// Guest code of the probe VM (64-bit, user mode, loaded at `IMAGE_MIN_ADDR`): forever, add
/// one to the first word of each of `PROBE_PAGES` pages from `PROBE_BASE` on, then count the
/// pass in the word at `PROBE_COUNTER`. No exits: the host reads the counter from memory.
fn probe_code(pages: u32) -> Vec<u8> {
    let mut c = vec![0xBF]; // mov edi, PROBE_BASE
    c.extend_from_slice(&(PROBE_BASE as u32).to_le_bytes());
    c.push(0xB9); // mov ecx, pages
    c.extend_from_slice(&pages.to_le_bytes());
    c.extend_from_slice(&[0x48, 0xFF, 0x07]); // 10: inc qword [rdi]
    c.extend_from_slice(&[0x48, 0x81, 0xC7, 0x00, 0x10, 0x00, 0x00]); // add rdi, 4096
    c.extend_from_slice(&[0xFF, 0xC9]); // dec ecx
    c.extend_from_slice(&[0x75, 0xF2]); // jnz 10
    c.push(0xB8); // mov eax, PROBE_COUNTER
    c.extend_from_slice(&(PROBE_COUNTER as u32).to_le_bytes());
    c.extend_from_slice(&[0x48, 0xFF, 0x00]); // inc qword [rax]
    c.extend_from_slice(&[0xEB, 0xDE]); // jmp 0
    c
}

const PROBE_COUNTER: u64 = vmm_abi::IMAGE_MIN_ADDR + 0x1000;
const PROBE_BASE: u64 = vmm_abi::IMAGE_MIN_ADDR + 0x20_0000;
const PROBE_PAGES: u32 = 512;
const PROBE_MIB: u64 = 8;

impl Calibration {
    /// Measures this host: a probe VM rewrites 512 pages in a loop, first without dirty logging
    /// (its pass rate), then with the log collected every 10 ms; each page in a collected log
    /// took one fault, so the fault cost is (time − the passes' own time at the unlogged rate)
    /// / pages collected, all in the probe thread's CPU time. The probe runs under SCHED_IDLE
    /// (it never delays the host's VMs); on a host too busy to give it 20 ms of CPU in a phase
    /// it fails (and is tried again later). The compare cost is a host pass over 4 MiB of equal
    /// pages. Takes about half a second.
    pub fn measure() -> crate::Result<Calibration> {
        use crate::{channel_pair, Command, Error, Vm, VmConfig};
        let mut config = VmConfig::new("(dirty-tracking probe)", PROBE_MIB);
        config.dirty_log = false;
        let mut vm = Vm::bare(config, Box::new(std::io::sink()))?;
        vm.mem.write(vmm_abi::IMAGE_MIN_ADDR, &probe_code(PROBE_PAGES)).map_err(Error::Memory)?;
        crate::arch::write_page_tables(&mut vm.mem)?;
        crate::arch::write_gdt(&mut vm.mem)?;
        let top = vm.mem.size();
        crate::arch::setup_sregs(vm.vcpu())?;
        crate::arch::setup_regs(vm.vcpu(), vmm_abi::IMAGE_MIN_ADDR, top)?;
        let view = vm.mem.view()?;
        let counter = || -> crate::Result<u64> {
            let mut b = [0u8; 8];
            view.copy_range(PROBE_COUNTER, &mut b)?;
            Ok(u64::from_le_bytes(b))
        };
        let (ctl, inbox) = channel_pair()?;
        let runner = std::thread::spawn(move || {
            // SCHED_IDLE: the probe only takes CPU nobody else wants (it must not delay the
            // host's VMs); it is timed by its own CPU time, so waiting costs it nothing.
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: sets this thread's own policy; the parameter outlives the call.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
            vm.run(Some(&inbox))
        });
        let mut clock: libc::clockid_t = 0;
        // SAFETY: the thread is alive until joined below; `clock` is written by the call.
        let r = unsafe { libc::pthread_getcpuclockid(std::os::unix::thread::JoinHandleExt::as_pthread_t(&runner), &mut clock) };
        let cpu_ns = move || -> u64 {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: `clock` is the probe thread's CPU clock; `ts` is ours.
            unsafe { libc::clock_gettime(clock, &mut ts) };
            ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
        };
        let result = (|| -> crate::Result<Calibration> {
            if r != 0 {
                return Err(Error::Config(format!("probe: no CPU clock for its thread (error {r})")));
            }
            // Unlogged pass rate, in the probe's CPU time (after a warm-up that maps every page).
            std::thread::sleep(Duration::from_millis(30));
            let (t0, c0) = (cpu_ns(), counter()?);
            std::thread::sleep(Duration::from_millis(100));
            let (t1, c1) = (cpu_ns(), counter()?);
            let pass_ns = (t1 - t0) as f64 / (c1 - c0).max(1) as f64;
            // Logged: collect every 10 ms.
            let r = ctl.call(Command::DirtyLogStart);
            if !r.ok {
                return Err(Error::Config(format!("probe: dirty-log-start: {}", r.error.unwrap_or_default())));
            }
            let (t2, c2, wall) = (cpu_ns(), counter()?, Instant::now());
            let mut pages = 0u64;
            while wall.elapsed() < Duration::from_millis(250) {
                std::thread::sleep(Duration::from_millis(10));
                let r = ctl.call(Command::DirtyLogGetAndClear);
                pages += r.dirty_pages.map_or(0, |p| p.len() as u64);
            }
            let (t3, c3) = (cpu_ns(), counter()?);
            if t1 - t0 < 20_000_000 || t3 - t2 < 20_000_000 || pages < 1000 {
                return Err(Error::Config(format!(
                    "probe: the host was too busy to measure ({} and {} ms of CPU, {pages} faults)",
                    (t1 - t0) / 1_000_000,
                    (t3 - t2) / 1_000_000
                )));
            }
            let logged = (t3 - t2) as f64 - (c3 - c2) as f64 * pass_ns;
            let fault_ns = (logged / pages as f64).max(1.0);
            Ok(Calibration { fault_ns, compare_ns_per_page: compare_cost() })
        })();
        let _ = ctl.call(Command::Quit);
        let _ = runner.join();
        result
    }
}

/// Host time to compare one unchanged page with its copy (a pass over 4 MiB, best of 7: the
/// least disturbed by other work on the host).
fn compare_cost() -> f64 {
    let a = vec![7u8; 4 << 20];
    let b = a.clone();
    let mut best = f64::MAX;
    for _ in 0..7 {
        let t = Instant::now();
        let differing = a.chunks_exact(PAGE).zip(b.chunks_exact(PAGE)).filter(|(x, y)| x != y).count();
        std::hint::black_box(differing);
        best = best.min(t.elapsed().as_nanos() as f64 / (a.len() / PAGE) as f64);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model dirty log over a byte memory: records the pages written while enabled.
    struct ModelLog {
        on: bool,
        /// Manual protection: `get` leaves the bits set until `clear`.
        manual: bool,
        bits: Vec<u64>,
    }
    impl DirtyLog for ModelLog {
        fn get(&mut self) -> Result<Vec<u64>, String> {
            if !self.on {
                return Err("logging is off".into());
            }
            if self.manual {
                return Ok(self.bits.clone());
            }
            let n = self.bits.len();
            Ok(std::mem::replace(&mut self.bits, vec![0; n]))
        }
        fn manual(&self) -> bool {
            self.manual
        }
        fn clear(&mut self, bits: &[u64]) -> Result<(), String> {
            if self.manual {
                for (b, c) in self.bits.iter_mut().zip(bits) {
                    *b &= !c;
                }
            }
            Ok(())
        }
        fn set_enabled(&mut self, on: bool) -> Result<(), String> {
            self.on = on;
            self.bits.iter_mut().for_each(|w| *w = 0);
            Ok(())
        }
    }

    fn write(mem: &mut [u8], log: &mut ModelLog, page: usize, byte: usize, v: u8) {
        mem[page * PAGE + byte] = v;
        if log.on {
            log.bits[page / 64] |= 1 << (page % 64);
        }
    }

    /// Random writes (some writing the value already there, some by the "VMM" outside the
    /// log), random modes per epoch: a replica updated with each epoch's pages equals memory
    /// after every epoch.
    #[test]
    fn switching_at_random_never_loses_a_page() {
        switching_at_random(false);
        switching_at_random(true);
    }

    fn switching_at_random(manual: bool) {
        let pages = 200usize;
        let mut mem = vec![0u8; pages * PAGE];
        let mut replica = mem.clone();
        let mut log = ModelLog { on: true, manual, bits: vec![0; pages.div_ceil(64)] };
        let mut t = DirtyTracker::new(pages as u64, None);
        t.set_warm_pages(32, 64);
        let mut seed = 0x1234_5678_9abc_def1u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        t.set_demote_after(3);
        let mut switches = 0;
        let mut hot_seen = 0;
        // Hybrid epochs closed under a limit below the hot pages they started with.
        let mut limited = 0;
        let mut want = TrackingMode::Compare;
        for epoch in 0..400 {
            let mut vmm = vec![0u64; pages.div_ceil(64)];
            let writes = rnd(3) * rnd(60);
            for _ in 0..writes {
                // Few places and values, so that pages often return to an earlier content.
                // Half of them on a few hot pages (hybrid mode's hot set).
                let p = if rnd(2) == 0 { rnd(12) as usize } else { rnd(pages as u64) as usize };
                let (b, v) = (rnd(4) as usize * 8, rnd(2) as u8);
                if rnd(10) == 0 {
                    mem[p * PAGE + b] = v;
                    vmm[p / 64] |= 1 << (p % 64);
                } else {
                    write(&mut mem, &mut log, p, b, v);
                }
            }
            let hot_before = t.hot_pages();
            // What is wanted changes now and then (a warm-up takes several epochs).
            if rnd(6) == 0 {
                want = [TrackingMode::Log, TrackingMode::Compare, TrackingMode::Hybrid][rnd(3) as usize];
            }
            // Now and then output waits and the hot set is limited, often below what is hot.
            let limit = if rnd(3) == 0 { rnd(6) } else { u64::MAX };
            t.set_hot_limit(limit);
            let closed = t.close_epoch(&mem, &vmm, &mut log, |_| want).expect("close");
            switches += (closed.next != closed.mode) as u32;
            hot_seen = hot_seen.max(t.hot_pages());
            assert!(t.hot_pages() <= limit, "{} hot pages over the limit of {limit}", t.hot_pages());
            limited += (limit < hot_before && closed.mode == Some(TrackingMode::Hybrid)) as u32;
            if closed.next == Some(TrackingMode::Compare) {
                assert_eq!(t.stale_pages(), 0, "compare mode with a stale shadow");
            }
            for p in closed.pages {
                let at = p as usize * PAGE;
                replica[at..at + PAGE].copy_from_slice(&mem[at..at + PAGE]);
            }
            assert!(replica == mem, "replica differs after epoch {epoch}");
        }
        assert!(switches > 8, "{switches} switches");
        assert_eq!(hot_seen > 0, manual, "hot pages: {hot_seen}");
        assert!(!manual || limited >= 10, "{limited} hybrid epochs closed with fewer hot pages allowed than they had");
    }

    /// While output waits, `auto` limits the hot set and leaves a compare mode whose pass is
    /// longer than the budget at once; a fixed choice is left alone.
    #[test]
    fn waiting_output_limits_the_hot_set_and_the_search() {
        let cal = Calibration { fault_ns: 20_000.0, compare_ns_per_page: 300.0 };
        let mut c = Chooser::new(TrackingChoice::Auto, true);
        assert_eq!(c.hot_limit(true), Chooser::OUTPUT_HOT_PAGES);
        assert_eq!(c.hot_limit(false), u64::MAX);
        // Many dirty pages: compare mode (after the dwell), while nothing waits.
        let heavy = Observation { mode: TrackingMode::Hybrid, dirty: 8000, pages: 16384, find_ns: 50_000, hot: 0, output_waits: false };
        let mut mode = TrackingMode::Hybrid;
        for _ in 0..Chooser::DWELL + 1 {
            mode = c.next(&Observation { mode, ..heavy }, Some(&cal));
        }
        assert_eq!(mode, TrackingMode::Compare);
        // Output waits: a 4.9 ms pass goes at once; a pass within the budget stays.
        let slow = Observation { mode, find_ns: 16384 * 300, output_waits: true, ..heavy };
        assert_eq!(c.next(&slow, Some(&cal)), TrackingMode::Hybrid);
        let quick = Observation { mode: TrackingMode::Compare, pages: 1024, find_ns: 1024 * 300, output_waits: true, ..heavy };
        assert_eq!(c.next(&quick, Some(&cal)), TrackingMode::Compare);
        // Without manual protection: plain logging.
        let mut plain = Chooser::new(TrackingChoice::Auto, false);
        assert_eq!(plain.next(&Observation { mode: TrackingMode::Compare, ..slow }, Some(&cal)), TrackingMode::Log);
        // A fixed choice is the user's: no limit, no switch.
        let mut fixed = Chooser::new(TrackingChoice::Fixed(TrackingMode::Hybrid), true);
        assert_eq!(fixed.hot_limit(true), u64::MAX);
        assert_eq!(fixed.next(&Observation { mode: TrackingMode::Hybrid, ..slow }, Some(&cal)), TrackingMode::Hybrid);
    }

    /// A 32 MiB hot set took 20–60 ms to search on this host, past the backup's timeout: the
    /// hot set is held to what is searched within the pause budget, and compare mode is not
    /// chosen (or is left at once) when its pass is longer; a fixed choice is left alone.
    #[test]
    fn the_search_in_a_pause_is_held_to_the_budget() {
        let cal = Calibration { fault_ns: 20_000.0, compare_ns_per_page: 300.0 };
        let mut c = Chooser::new(TrackingChoice::Auto, true);
        assert_eq!(c.hot_limit(false), u64::MAX, "nothing measured yet");
        // 8,195 hot pages searched in 25 ms (about 3 µs a page, as measured here).
        let big =
            Observation { mode: TrackingMode::Hybrid, dirty: 8194, pages: 16384, find_ns: 25_000_000, hot: 8195, output_waits: false };
        assert_eq!(c.next(&big, Some(&cal)), TrackingMode::Hybrid);
        let limit = c.hot_limit(false);
        assert!(limit < 8195, "{limit}");
        let per_page = 25_000_000.0 / 8195.0;
        assert!(limit as f64 * per_page <= Chooser::PAUSE_FIND_NS as f64 + per_page, "{limit} pages take longer than the budget");
        assert!(limit as f64 * per_page > 0.9 * Chooser::PAUSE_FIND_NS as f64, "{limit} pages leave the budget unused");
        assert_eq!(c.hot_limit(true), limit.min(Chooser::OUTPUT_HOT_PAGES));
        // One sample inflated by a burst of pages made hot over a single hot page does not
        // shut the hot set.
        let mut burst = Chooser::new(TrackingChoice::Auto, true);
        burst.next(&Observation { find_ns: 30_000_000, hot: 1, ..big }, Some(&cal));
        assert_eq!(burst.hot_limit(false), Chooser::OUTPUT_HOT_PAGES);
        // A VM of 1 GiB: a compare pass (78 ms at 300 ns a page) is never chosen, however
        // many faults logging costs.
        let mut huge = Chooser::new(TrackingChoice::Auto, true);
        let faulting =
            Observation { mode: TrackingMode::Hybrid, dirty: 200_000, pages: 262_144, find_ns: 1_000_000, hot: 0, output_waits: false };
        for _ in 0..3 * Chooser::DWELL {
            assert_eq!(huge.next(&faulting, Some(&cal)), TrackingMode::Hybrid);
        }
        // A compare pass that took longer than the budget is left at once (within the dwell).
        let mut c = Chooser::new(TrackingChoice::Auto, true);
        let slow =
            Observation { mode: TrackingMode::Compare, dirty: 8000, pages: 65_536, find_ns: 30_000_000, hot: 0, output_waits: false };
        assert_eq!(c.next(&slow, Some(&cal)), TrackingMode::Hybrid);
        // A fixed choice is the user's.
        let mut fixed = Chooser::new(TrackingChoice::Fixed(TrackingMode::Hybrid), true);
        fixed.next(&big, Some(&cal));
        assert_eq!(fixed.hot_limit(false), u64::MAX);
    }

    #[test]
    fn the_chooser_prefers_compare_for_many_dirty_pages_and_log_for_few() {
        let cal = Calibration { fault_ns: 20_000.0, compare_ns_per_page: 300.0 };
        let mut c = Chooser::new(TrackingChoice::Auto, false);
        let heavy = Observation { mode: TrackingMode::Log, dirty: 2000, pages: 16384, find_ns: 50_000, hot: 0, output_waits: false };
        let mut mode = TrackingMode::Log;
        for _ in 0..Chooser::DWELL + 1 {
            mode = c.next(&Observation { mode, ..heavy }, Some(&cal));
        }
        assert_eq!(mode, TrackingMode::Compare);
        let light = Observation { mode, dirty: 10, pages: 16384, find_ns: 16384 * 300, hot: 0, output_waits: false };
        for _ in 0..Chooser::DWELL + 1 {
            mode = c.next(&Observation { mode, ..light }, Some(&cal));
        }
        assert_eq!(mode, TrackingMode::Log);
        // No calibration: log; fixed: that mode.
        assert_eq!(Chooser::new(TrackingChoice::Auto, false).next(&heavy, None), TrackingMode::Log);
        let fixed = TrackingChoice::Fixed(TrackingMode::Compare);
        assert_eq!(Chooser::new(fixed, false).next(&light, None), TrackingMode::Compare);
        assert_eq!("compare".parse::<TrackingChoice>(), Ok(fixed));
        assert!("hash".parse::<TrackingChoice>().is_err());
    }

    #[test]
    fn probe_code_jumps_land_on_the_loop_starts() {
        let c = probe_code(4);
        assert_eq!(c.len(), 34);
        assert_eq!(&c[10..13], &[0x48, 0xFF, 0x07]);
        assert_eq!(24 + (c[23] as i8) as i64, 10);
        assert_eq!(34 + (c[33] as i8) as i64, 0);
    }
}
