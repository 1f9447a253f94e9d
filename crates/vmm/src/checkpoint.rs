//! What Remus-style checkpoint replication (DESIGN §4) needs from the VMM, without the protocol
//! itself (that is the `replication` crate's):
//!
//! - on the primary: protection ([`Vm::protect`]: dirty logging, network output held by epoch,
//!   disk writes mirrored as [`DiskWrite`]s), a [`crate::memory::MemoryView`] for the initial
//!   copy while the guest runs, and [`Vm::checkpoint`], which in one short pause copies the
//!   dirty pages, the vCPU and the clock and seals the output epoch;
//! - on the backup: a [`Replica`] that applies checkpoints atomically (validate everything,
//!   then write) and becomes a VM with [`Vm::from_replica`], which then announces itself with
//!   a gratuitous ARP ([`Vm::announce`]).
//!
//! **Epochs.** While protected, the VM is always in an open epoch `k` (1, 2, ...). Checkpoint
//! `k` closes it: its [`Checkpoint::epoch`] is `k`, it seals the network output of epoch `k`
//! (release it with `ReleaseAcked { epoch: k }` once the backup acknowledged `k`), and the disk
//! writes of epoch `k` are exactly the [`DiskWrite`]s tagged `k`, all sent on the mirror channel
//! before the checkpoint's reply (so a driver that has received checkpoint `k` finds every
//! write of epoch `k` already in the channel). Epoch numbers never repeat within a VM, also
//! across unprotect/protect.

use crate::machine::{Vm, VmConfig};
use crate::memory::GuestMem;
use crate::mirror::MirrorSender;
use crate::snapshot::{RestoreOverrides, VcpuState};
use crate::tracking::{Chooser, DirtyTracker, Observation, TrackingChoice, TrackingMode};
use crate::{Error, Result};
use std::io::Write;
use std::net::Ipv4Addr;
use std::time::Instant;
use vmm_abi::PAGE_SIZE;

const PAGE: usize = PAGE_SIZE as usize;

/// One guest disk write, mirrored to the backup while the VM is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskWrite {
    /// The epoch that was open when the guest wrote (the checkpoint that closes it commits it).
    pub epoch: u64,
    /// Byte offset on the disk.
    pub offset: u64,
    /// The bytes written (whole sectors).
    pub data: Vec<u8>,
}

/// A checkpoint of a protected VM: everything the backup needs to move its replica from the
/// previous checkpoint to this one.
#[derive(Clone, Default)]
pub struct Checkpoint {
    /// The epoch this checkpoint closes (1, 2, ...): also the number of the network output
    /// epoch it sealed and the [`DiskWrite::epoch`] of the disk writes it commits.
    pub epoch: u64,
    /// Page numbers (guest-physical address / 4096) dirtied in the epoch, ascending.
    pub pages: Vec<u64>,
    /// The contents of those pages, `pages.len() * 4096` bytes, in the same order.
    pub data: Vec<u8>,
    /// The vCPU state blob (the format of a snapshot's `vcpu0.bin`).
    pub vcpu: Vec<u8>,
    /// Guest clock at the checkpoint.
    pub guest_ns: u64,
    /// Network frames the guest sent in the epoch (held until released).
    pub output_frames: u64,
    /// Bytes of those frames.
    pub output_bytes: u64,
    /// A copy of those frames, each as a 4-byte little-endian length and its bytes: the
    /// backup keeps the output of its last committed epochs and sends it again when it takes
    /// over ([`Vm::send_frames`]), so that a client owed a reply the dead primary never
    /// released gets it at once, not at its next retransmission.
    pub output: Vec<u8>,
    /// How long the vCPU was held out of guest mode for this checkpoint, measured on the
    /// vCPU thread from handling the command to resuming (without the kick that got it out).
    pub pause_ns: u64,
    /// Of `pause_ns`, the time spent copying pages.
    pub copy_ns: u64,
    /// Set when disk mirroring stopped during this protection (the mirror stayed full with
    /// nothing taken for [`crate::mirror::MIRROR_STALL`], or its receiver is gone): the
    /// backup missed disk writes, so the driver must drop it (unprotect) and synchronise a
    /// backup anew. The checkpoint itself is sound.
    pub disk_mirror_lost: Option<String>,
    /// How this epoch's dirty pages were found ([`crate::tracking`]).
    pub tracking: Option<TrackingMode>,
    /// How the next epoch's will be (differs from `tracking` after a switch).
    pub next_tracking: Option<TrackingMode>,
    /// Of `pause_ns`, the time spent finding the dirty pages (collecting KVM's log, or
    /// comparing memory against the shadow).
    pub find_ns: u64,
    /// Of `pause_ns`, the time a switch of tracking took (bringing the shadow up to date,
    /// turning logging on or off).
    pub switch_ns: u64,
    /// Hybrid mode: the hot pages (writable, compared) after this checkpoint.
    pub hot_pages: u64,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("epoch", &self.epoch)
            .field("pages", &self.pages.len())
            .field("data_bytes", &self.data.len())
            .field("vcpu_bytes", &self.vcpu.len())
            .field("guest_ns", &self.guest_ns)
            .field("output_frames", &self.output_frames)
            .field("output_bytes", &self.output_bytes)
            .field("pause_ns", &self.pause_ns)
            .field("copy_ns", &self.copy_ns)
            .field("disk_mirror_lost", &self.disk_mirror_lost)
            .field("tracking", &self.tracking)
            .field("next_tracking", &self.next_tracking)
            .field("find_ns", &self.find_ns)
            .field("switch_ns", &self.switch_ns)
            .field("hot_pages", &self.hot_pages)
            .finish()
    }
}

/// Protection state of a VM.
pub(crate) struct Protection {
    /// The open epoch.
    epoch: u64,
    /// Finds each epoch's dirty pages.
    tracker: DirtyTracker,
    /// Chooses each epoch's tracking mode.
    chooser: Chooser,
}

impl Vm {
    /// Starts protection: KVM dirty logging on (what was collected before is dropped, so the
    /// first checkpoint holds the pages dirtied from now on), network output held from now on
    /// (if the VM has a tap) and every guest disk write also sent on `mirror` (if the VM has a
    /// disk; `None` leaves the disk unmirrored, for shared storage). The mirror is bounded by
    /// bytes ([`crate::mirror`]): while it is full, guest disk writes wait. Call it before reading a
    /// [`crate::memory::MemoryView`] for the initial copy.
    pub fn protect(&mut self, mirror: Option<MirrorSender>, hold: bool) -> Result<()> {
        self.protect_logging(mirror, hold, None)
    }

    /// As [`Vm::protect`], also copying every frame given to the guest, with its epoch, to
    /// `input` (a primary forwards them to its backup, which gives the input that arrived after
    /// the last checkpoint to the VM it builds at a takeover: a client's request that died with
    /// the primary is answered without the client's retransmission).
    pub fn protect_logging(
        &mut self,
        mirror: Option<MirrorSender>,
        hold: bool,
        input: Option<crate::devices::net::InputLog>,
    ) -> Result<()> {
        if self.protection.is_some() {
            return Err(Error::Config("the VM is already protected".into()));
        }
        let epoch = self.next_epoch.max(self.tap.as_ref().map_or(0, |t| t.open_epoch()));
        if self.dirty_logging {
            self.dirty_bitmap_get_and_clear()?;
        } else {
            self.set_dirty_logging(true)?;
        }
        if let Some(tap) = self.tap.as_mut() {
            tap.raise_open_epoch(epoch);
            if hold {
                tap.hold();
            }
            tap.set_input_log(input);
        }
        if let Some(block) = self.block.as_mut() {
            block.set_mirror(mirror, epoch);
        }
        if self.config.tracking == TrackingChoice::Auto {
            // Starts the host's calibration in the background (log mode until it is known).
            let _ = crate::tracking::host_calibration();
        }
        let tracker = DirtyTracker::new(self.mem.pages(), self.spare_shadow.take());
        let chooser = Chooser::new(self.config.tracking, self.manual_protect());
        self.protection = Some(Protection { epoch, tracker, chooser });
        Ok(())
    }

    /// Starts holding the network output of a protected VM that was protected without holding
    /// it (while a new backup synchronises, output may flow: that backup cannot take over yet).
    /// Output from now on waits in the open epoch for its checkpoint's acknowledgement.
    pub fn hold_output(&mut self) -> Result<()> {
        if self.protection.is_none() {
            return Err(Error::Config("the VM is not protected (send protect first)".into()));
        }
        if let Some(tap) = self.tap.as_mut() {
            tap.hold();
        }
        Ok(())
    }

    /// Ends protection: dirty logging off, all held output sent, disk writes no longer
    /// mirrored. The open epoch is closed without a checkpoint.
    pub fn unprotect(&mut self) -> Result<()> {
        let Some(p) = self.protection.take() else {
            return Err(Error::Config("the VM is not protected".into()));
        };
        self.spare_shadow = Some(p.tracker.into_shadow());
        self.next_epoch = p.epoch + 1;
        if let Some(tap) = self.tap.as_mut() {
            tap.unhold();
            tap.set_input_log(None);
        }
        if let Some(block) = self.block.as_mut() {
            block.set_mirror(None, 0);
        }
        self.set_dirty_logging(false)
    }

    /// Chooses how dirty pages are found: from the next checkpoint's epoch on while protected
    /// (the checkpoint closing the open epoch switches), else from the next protection on.
    pub fn set_tracking(&mut self, choice: TrackingChoice) {
        self.config.tracking = choice;
        if let Some(p) = self.protection.as_mut() {
            p.chooser.set_choice(choice);
        }
        if choice == TrackingChoice::Auto {
            let _ = crate::tracking::host_calibration();
        }
    }

    /// The open epoch while protected.
    pub fn protected_epoch(&self) -> Option<u64> {
        self.protection.as_ref().map(|p| p.epoch)
    }

    /// Takes a checkpoint of the protected VM, closing the open epoch: pauses (unless paused
    /// already), collects and clears the dirty pages, copies them into `buffer` (an earlier
    /// checkpoint's `data`, reused for speed, or a new one), captures vCPU and clock, seals the
    /// network output epoch, moves the disk mirror to the next epoch, and resumes at once if
    /// it was running.
    pub fn checkpoint(&mut self, buffer: Option<Vec<u8>>) -> Result<Checkpoint> {
        let start = Instant::now();
        let Some(epoch) = self.protected_epoch() else {
            return Err(Error::Config("the VM is not protected (send protect first)".into()));
        };
        let was_paused = self.paused();
        self.pause()?;
        let taken = self.capture(epoch, buffer.unwrap_or_default());
        let pause_ns = start.elapsed().as_nanos() as u64;
        if !was_paused {
            self.unpause();
        }
        let mut c = taken?;
        c.pause_ns = pause_ns;
        Ok(c)
    }

    fn capture(&mut self, epoch: u64, mut data: Vec<u8>) -> Result<Checkpoint> {
        let fail = |e: Error| Error::Checkpoint { epoch, reason: e.to_string() };
        let vmm_written = self.mem.take_vmm_dirty();
        let calibration = match self.config.tracking {
            TrackingChoice::Auto => crate::tracking::host_calibration(),
            TrackingChoice::Fixed(_) => None,
        };
        let total = self.mem.pages();
        // Output waits for this checkpoint: the checkpoint's duration is in a reply's latency.
        let output_waits = self.tap.as_ref().is_some_and(|t| t.held_frames() > 0);
        let (mut log, mem, protection) = self.tracking_parts();
        let Some(Protection { tracker, chooser, .. }) = protection else {
            return Err(Error::Checkpoint { epoch, reason: "the VM is not protected".into() });
        };
        let mem = mem.as_slice().map_err(fail)?;
        if let Some(cal) = calibration.as_ref() {
            // Keep a page hot while a comparison per epoch is cheaper than the fault it would
            // take when written again.
            tracker.set_demote_after((cal.fault_ns / cal.compare_ns_per_page.max(1.0)).clamp(2.0, 64.0) as u8);
        }
        tracker.set_hot_limit(chooser.hot_limit(output_waits));
        let hot = tracker.hot_pages();
        let closed = tracker
            .close_epoch(mem, &vmm_written, &mut log, |c| {
                let mode = c.mode.unwrap_or(TrackingMode::Log);
                let o = Observation { mode, dirty: c.pages.len() as u64, pages: total, find_ns: c.find_ns, hot, output_waits };
                chooser.next(&o, calibration.as_ref())
            })
            .map_err(|reason| Error::Checkpoint { epoch, reason: format!("dirty tracking: {reason}") })?;
        let pages = closed.pages;
        let tracker_hot = tracker.hot_pages();
        let copy_start = Instant::now();
        data.clear();
        reserve_staging(&mut data, pages.len() * PAGE);
        for (first, count) in runs(&pages) {
            self.mem.append_pages(first, count, &mut data).map_err(|e| Error::Checkpoint { epoch, reason: e })?;
        }
        let copy_ns = copy_start.elapsed().as_nanos() as u64;
        let vcpu = self.vcpu_state().map_err(fail)?;
        let guest_ns = self.clock.now_ns();
        let (mut output_frames, mut output_bytes, mut output) = (0, 0, Vec::new());
        if let Some(tap) = self.tap.as_mut() {
            let (sealed, frames, bytes, copy) = tap.seal_copied();
            if sealed != epoch {
                return Err(Error::Checkpoint { epoch, reason: format!("the network sealed epoch {sealed} instead") });
            }
            (output_frames, output_bytes, output) = (frames, bytes, copy);
        }
        if let Some(block) = self.block.as_mut() {
            block.set_mirror_epoch(epoch + 1);
        }
        if let Some(p) = self.protection.as_mut() {
            p.epoch = epoch + 1;
        }
        let disk_mirror_lost = self.block.as_ref().and_then(|b| b.mirror_lost()).map(str::to_owned);
        Ok(Checkpoint {
            epoch,
            pages,
            data,
            vcpu,
            guest_ns,
            output_frames,
            output_bytes,
            output,
            pause_ns: 0,
            copy_ns,
            disk_mirror_lost,
            tracking: closed.mode,
            next_tracking: closed.next,
            find_ns: closed.find_ns,
            switch_ns: closed.switch_ns,
            hot_pages: tracker_hot,
        })
    }

    /// Gives the guest `frames` (encoded as [`Vm::send_frames`] takes them) before anything
    /// from the network; returns how many.
    pub fn inject_input(&mut self, frames: &[u8]) -> usize {
        self.tap.as_mut().map_or(0, |t| t.inject(frames))
    }

    /// Sends network frames encoded as [`Checkpoint::output`] holds them on this VM's tap at
    /// once (after a takeover: the output of committed epochs the old primary may not have
    /// released); returns how many went out.
    pub fn send_frames(&self, frames: &[u8]) -> Result<usize> {
        match self.tap.as_ref() {
            Some(tap) => tap.send_frames(frames),
            None => Ok(0),
        }
    }

    /// Builds a new, paused VM on this host from a replica (a takeover): the replica's memory
    /// is moved in (no copy), the vCPU continues from the last applied checkpoint and guest
    /// time from its clock. `overrides` name this host's tap and disk. Resume it, then
    /// [`Vm::announce`] it.
    pub fn from_replica(replica: Replica, overrides: &RestoreOverrides, console: Box<dyn Write + Send>) -> Result<Vm> {
        Vm::from_replica_with_tap(replica, overrides, console, None)
    }

    /// As [`Vm::from_replica`], with the network on `tap`, a tap device the caller opened
    /// beforehand (a backup keeps its tap open while it waits, so that the device's carrier, and
    /// the bridge port it is on, are up the moment it takes over).
    pub fn from_replica_with_tap(
        replica: Replica,
        overrides: &RestoreOverrides,
        console: Box<dyn Write + Send>,
        tap: Option<crate::devices::net::Tap>,
    ) -> Result<Vm> {
        let Some(blob) = replica.vcpu.as_deref() else {
            return Err(Error::Replica("no checkpoint has been applied: there is no vCPU state to start from".into()));
        };
        let cpu = VcpuState::parse(blob).map_err(|e| Error::Replica(format!("vCPU state: {e}")))?;
        let config = overrides.apply(replica.config);
        let mut vm = Vm::assemble(config, console, replica.mem, &cpu, replica.guest_ns, tap)?;
        vm.next_epoch = replica.epoch + 1;
        Ok(vm)
    }

    /// Announces the VM's MAC and IPv4 address on its tap: `count` rounds of a gratuitous ARP
    /// request and a gratuitous ARP reply (see [`gratuitous_arp`]), sent at once and bypassing
    /// any hold. Returns the frames sent. Repeat it a few times, some tens of milliseconds
    /// apart, after a takeover.
    pub fn announce(&mut self, count: u32) -> Result<u64> {
        if count > MAX_ANNOUNCE {
            return Err(Error::Config(format!("announce {count} rounds: at most {MAX_ANNOUNCE}")));
        }
        let Some(tap) = self.tap.as_ref() else {
            return Err(Error::Config("the VM has no network device to announce".into()));
        };
        let net = self.config.net;
        if net.ip.is_unspecified() {
            return Err(Error::Config("the VM has no IPv4 address to announce".into()));
        }
        let frames = [gratuitous_arp(net.mac, net.ip, ArpOp::Request), gratuitous_arp(net.mac, net.ip, ArpOp::Reply)];
        let mut sent = 0;
        for _ in 0..count {
            for f in &frames {
                tap.send_frame(f)?;
                sent += 1;
            }
        }
        Ok(sent)
    }
}

/// Most rounds one `announce` sends.
pub const MAX_ANNOUNCE: u32 = 16;

/// Makes room for `len` bytes in `data`. A new allocation is asked to use transparent huge
/// pages: first-touch page faults dominate a copy into fresh memory on these hosts (measured
/// on 128 MiB: 4 KiB faults 110-140 ms, huge pages 60 ms, a reused buffer 24 ms).
fn reserve_staging(data: &mut Vec<u8>, len: usize) {
    if data.capacity() >= len {
        return;
    }
    *data = Vec::with_capacity(len);
    const HUGE: usize = 2 << 20;
    let start = (data.as_ptr() as usize).next_multiple_of(HUGE);
    let end = (data.as_ptr() as usize + len) & !(HUGE - 1);
    if end > start {
        // SAFETY: advice on whole pages inside our own, not yet touched allocation; it changes
        // no contents and its failure (no THP support) is harmless.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

/// Readies a staging buffer for checkpoints of up to `len` bytes, outside any pause: a buffer
/// with less room is replaced by one of `len` bytes whose pages are all touched now (a page
/// fault each, on the caller's thread), so that the copy of a later pause finds them mapped.
/// A 32 MiB copy into a buffer that had just grown took 34–74 ms on these hosts, more than the
/// backup waits before it suspects its primary. A buffer that had room is left as it was.
pub fn prepare_staging(data: &mut Vec<u8>, len: usize) {
    if data.capacity() >= len {
        return;
    }
    reserve_staging(data, len);
    data.resize(len, 0);
    data.clear();
}

/// Runs of consecutive page numbers in an ascending list, as (first, count).
fn runs(pages: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *pages.get(i)?;
        let mut n = 1;
        while pages.get(i + n as usize) == Some(&(first + n)) {
            n += 1;
        }
        i += n as usize;
        Some((first, n))
    })
}

/// The backup's copy of a protected VM: configuration, all of guest memory, and the vCPU state
/// and clock of the last applied checkpoint. Memory is a [`GuestMem`], so a takeover
/// ([`Vm::from_replica`]) moves it into the new VM without copying.
pub struct Replica {
    config: VmConfig,
    mem: GuestMem,
    vcpu: Option<Vec<u8>>,
    guest_ns: u64,
    epoch: u64,
}

impl Replica {
    /// A replica of a VM configured as `config`, with zeroed memory of its size and no
    /// checkpoint applied.
    pub fn new(config: VmConfig) -> Result<Replica> {
        let size = crate::machine::mem_bytes(&config)?;
        Ok(Replica { mem: GuestMem::new(size)?, config, vcpu: None, guest_ns: 0, epoch: 0 })
    }

    /// The VM's configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The replica's guest memory.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// The epoch of the last applied checkpoint (0: none yet).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The guest clock of the last applied checkpoint.
    pub fn guest_ns(&self) -> u64 {
        self.guest_ns
    }

    /// The vCPU blob of the last applied checkpoint.
    pub fn vcpu(&self) -> Option<&[u8]> {
        self.vcpu.as_deref()
    }

    /// Writes whole pages from `first_page` on (the initial copy); `data` is a multiple of
    /// 4096 bytes and must fit in guest memory.
    pub fn write_pages(&mut self, first_page: u64, data: &[u8]) -> Result<()> {
        if !data.len().is_multiple_of(PAGE) {
            return Err(Error::Replica(format!("{} bytes for page {first_page} on: not whole pages", data.len())));
        }
        let count = (data.len() / PAGE) as u64;
        if first_page.checked_add(count).is_none_or(|end| end > self.mem.pages()) {
            return Err(Error::Replica(format!("pages {first_page}+{count} are outside guest memory ({} pages)", self.mem.pages())));
        }
        let start = first_page as usize * PAGE;
        self.mem.as_mut_slice()?[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }

    /// Writes one page (the initial copy).
    pub fn write_page(&mut self, page: u64, data: &[u8]) -> Result<()> {
        if data.len() != PAGE {
            return Err(Error::Replica(format!("page {page}: {} bytes, a page has {PAGE}", data.len())));
        }
        self.write_pages(page, data)
    }

    /// Applies a checkpoint atomically: checks everything first (epoch follows the last
    /// applied one, or any epoch for the first; page numbers ascending and inside memory; data
    /// length; the vCPU blob parses), and only then writes pages, vCPU, clock and epoch. A
    /// refused checkpoint leaves the replica as it was.
    pub fn apply(&mut self, c: &Checkpoint) -> Result<()> {
        self.apply_parts(c.epoch, &[(&c.pages, &c.data)], &c.vcpu, c.guest_ns)
    }

    /// As [`Replica::apply`], for a checkpoint received as several parts (page numbers and
    /// their data, in order, as the frames brought them): each page is copied once, from the
    /// buffer it was received into to its place in the replica.
    pub fn apply_parts<P: AsRef<[u64]>, D: AsRef<[u8]>>(&mut self, epoch: u64, parts: &[(P, D)], vcpu: &[u8], guest_ns: u64) -> Result<()> {
        self.validate(epoch, parts, vcpu).map_err(|reason| Error::Checkpoint { epoch, reason })?;
        let mem = self.mem.as_mut_slice()?;
        for (pages, data) in parts {
            let (pages, data) = (pages.as_ref(), data.as_ref());
            let mut src = 0;
            for (first, count) in runs(pages) {
                let (at, len) = (first as usize * PAGE, count as usize * PAGE);
                mem[at..at + len].copy_from_slice(&data[src..src + len]);
                src += len;
            }
        }
        self.vcpu = Some(vcpu.to_vec());
        self.guest_ns = guest_ns;
        self.epoch = epoch;
        Ok(())
    }

    fn validate<P: AsRef<[u64]>, D: AsRef<[u8]>>(&self, epoch: u64, parts: &[(P, D)], vcpu: &[u8]) -> Result<(), String> {
        if epoch == 0 {
            return Err("epoch 0 (epochs start at 1)".into());
        }
        if self.epoch != 0 && epoch != self.epoch + 1 {
            return Err(format!("does not follow the last applied epoch {}", self.epoch));
        }
        let pages = self.mem.pages();
        let mut prev = None;
        let mut i = 0usize;
        for (list, data) in parts {
            let (list, data) = (list.as_ref(), data.as_ref());
            for &p in list {
                if p >= pages {
                    return Err(format!("page {p} (entry {i}) is outside guest memory ({pages} pages)"));
                }
                if prev.is_some_and(|q| p <= q) {
                    return Err(format!("page {p} (entry {i}) is not above the one before it"));
                }
                prev = Some(p);
                i += 1;
            }
            let want = list.len().checked_mul(PAGE).ok_or("too many pages")?;
            if data.len() != want {
                return Err(format!("{} bytes of page data for {} pages (expected {want})", data.len(), list.len()));
            }
        }
        VcpuState::parse(vcpu).map_err(|e| format!("vCPU state: {e}"))?;
        Ok(())
    }
}

/// Which ARP operation a gratuitous ARP uses. Both are in use: a request (RFC 5227's "ARP
/// announcement", target hardware address zero) is what Linux sends (`arping -U`), a reply
/// (`arping -A`) is what some switches and hosts only learn from; [`Vm::announce`] sends both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpOp {
    /// ARP request (operation 1).
    Request,
    /// ARP reply (operation 2).
    Reply,
}

/// Length of a gratuitous ARP frame: the 42 bytes of Ethernet header and ARP packet, padded
/// to the Ethernet minimum of 60 (without the frame check sequence, which the tap adds).
pub const ARP_FRAME_LEN: usize = 60;

/// A gratuitous ARP frame announcing that `ip` is at `mac`: Ethernet broadcast from `mac`
/// (EtherType 0x0806), ARP for Ethernet/IPv4, sender = target protocol address = `ip`, sender
/// hardware address `mac`, target hardware address zero for a request and `mac` for a reply.
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr, op: ArpOp) -> [u8; ARP_FRAME_LEN] {
    let mut f = [0u8; ARP_FRAME_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6;
    f[19] = 4;
    let (code, target_mac) = match op {
        ArpOp::Request => (1u16, [0u8; 6]),
        ArpOp::Reply => (2u16, mac),
    };
    f[20..22].copy_from_slice(&code.to_be_bytes());
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    f[32..38].copy_from_slice(&target_mac);
    f[38..42].copy_from_slice(&ip.octets());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prepared buffer is the one the pause's copy then uses: no new allocation for a
    /// checkpoint that fits.
    #[test]
    fn a_prepared_staging_buffer_is_kept_by_the_pause() {
        let mut data = Vec::new();
        prepare_staging(&mut data, 64 * PAGE);
        assert!(data.is_empty() && data.capacity() >= 64 * PAGE);
        let at = data.as_ptr();
        reserve_staging(&mut data, 40 * PAGE);
        assert_eq!(data.as_ptr(), at, "the pause allocated again");
        // A smaller request leaves a larger buffer as it is.
        prepare_staging(&mut data, 8 * PAGE);
        assert_eq!(data.as_ptr(), at);
    }

    #[test]
    fn runs_group_consecutive_pages() {
        let r: Vec<_> = runs(&[1, 2, 3, 7, 9, 10]).collect();
        assert_eq!(r, vec![(1, 3), (7, 1), (9, 2)]);
        assert_eq!(runs(&[]).count(), 0);
    }

    #[test]
    fn gratuitous_arp_has_the_conventional_layout() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let ip = Ipv4Addr::new(10, 77, 0, 2);
        let req = gratuitous_arp(mac, ip, ArpOp::Request);
        assert_eq!(&req[..6], &[0xff; 6]);
        assert_eq!(&req[6..12], &mac);
        assert_eq!(&req[12..14], &[0x08, 0x06]);
        assert_eq!(&req[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&req[22..28], &mac);
        assert_eq!(&req[28..32], &[10, 77, 0, 2]);
        assert_eq!(&req[32..38], &[0; 6]);
        assert_eq!(&req[38..42], &[10, 77, 0, 2]);
        assert!(req[42..].iter().all(|b| *b == 0));
        let rep = gratuitous_arp(mac, ip, ArpOp::Reply);
        assert_eq!(&rep[20..22], &[0, 2]);
        assert_eq!(&rep[32..38], &mac);
    }
}
