//! The guest/VMM ABI of vigil's VMM, version [`ABI_VERSION`] (documented in `docs/vmm-abi.md`).
//!
//! Owns the numbers both sides must agree on: the guest-physical memory layout, the boot
//! information page, the device ports and the layout of every request block. It holds no code
//! that touches a device; the VMM (`vmm`) and the guest SDK (`guest-sdk`) both depend on it.
//! `no_std`, no dependencies.
#![no_std]

/// Version of this ABI, in the boot information page. Bumped on any incompatible change.
pub const ABI_VERSION: u32 = 1;

/// Size of a guest page (the unit of the dirty log).
pub const PAGE_SIZE: u64 = 4096;

/// Guest-physical address of the GDT and TSS page (the VMM owns it).
pub const GDT_ADDR: u64 = 0x1000;
/// Guest-physical address of the boot information page ([`BootInfo`] then the arguments).
pub const BOOT_INFO_ADDR: u64 = 0x2000;
/// Guest-physical address of the top-level page table (PML4); PDPT, the first 2 MiB's page
/// table and the page directories follow, up to [`PAGE_TABLES_END`].
pub const PML4_ADDR: u64 = 0x3000;
/// End of the page-table area.
pub const PAGE_TABLES_END: u64 = 0x10000;
/// Lowest address an image segment may be loaded at.
pub const IMAGE_MIN_ADDR: u64 = 0x20_0000;
/// Size of the stack the VMM reserves at the top of guest memory.
pub const STACK_SIZE: u64 = 1 << 20;
/// Largest guest memory: request blocks are passed as 32-bit addresses, so all of memory must
/// lie below 4 GiB.
pub const MAX_MEM: u64 = 4 << 30;
/// Smallest guest memory: image area, heap and stack must fit.
pub const MIN_MEM: u64 = 4 << 20;

/// Magic value at the start of the boot information page.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"VIGILBI1");
/// Offset of the NUL-separated argument strings inside the boot information page.
pub const ARGS_OFFSET: u64 = 0x100;
/// Largest total size of the argument strings (NULs included).
pub const ARGS_MAX: u64 = PAGE_SIZE - ARGS_OFFSET;

/// The boot information page, at [`BOOT_INFO_ADDR`], written by the VMM before the first
/// instruction. All integers little-endian, all addresses guest-physical (= guest-virtual).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// Number of arguments at [`ARGS_OFFSET`].
    pub argc: u32,
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// First byte of the heap (page-aligned, after the image).
    pub heap_start: u64,
    /// Heap size in bytes (up to the stack).
    pub heap_size: u64,
    /// Initial stack pointer + 8 (16-byte aligned; the guest starts with rsp = stack_top - 8).
    pub stack_top: u64,
    /// Disk size in 512-byte sectors (0: no disk).
    pub disk_sectors: u64,
    /// 1 when a network device is attached.
    pub has_net: u32,
    /// IPv4 prefix length of `ipv4`.
    pub prefix_len: u32,
    /// MAC address of the network device.
    pub mac: [u8; 6],
    /// Padding.
    pub _pad: [u8; 2],
    /// IPv4 address (0.0.0.0: none configured).
    pub ipv4: [u8; 4],
    /// IPv4 gateway (0.0.0.0: none).
    pub gateway: [u8; 4],
    /// Total bytes of argument strings at [`ARGS_OFFSET`] (NULs included).
    pub args_len: u32,
    /// Padding.
    pub _pad2: u32,
}

/// Port I/O protocol: the guest executes `out dx, eax` with `dx` = port and `eax` = the
/// guest-physical address of a request block (except [`PORT_EXIT`], where `eax` is the exit
/// status). The VMM handles the request before the instruction completes and writes results
/// into the block. Request blocks must be 8-byte aligned and lie inside guest memory.
pub const PORT_CONSOLE: u16 = 0x510;
/// Clock: [`ClockRequest`].
pub const PORT_CLOCK: u16 = 0x511;
/// Exit: `eax` = exit status (0..=255 reported to the host).
pub const PORT_EXIT: u16 = 0x512;
/// Idle: [`IdleRequest`].
pub const PORT_IDLE: u16 = 0x513;
/// Block device: [`BlockRequest`].
pub const PORT_BLOCK: u16 = 0x514;
/// Network transmit: [`NetRequest`] with [`NetBuf`]s to send.
pub const PORT_NET_TX: u16 = 0x515;
/// Network receive: [`NetRequest`] with [`NetBuf`]s to fill.
pub const PORT_NET_RX: u16 = 0x516;

/// Console write: `len` bytes at `addr` (at most [`CONSOLE_MAX`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConsoleRequest {
    pub addr: u64,
    pub len: u64,
}
/// Largest console write.
pub const CONSOLE_MAX: u64 = 64 * 1024;

/// Clock read: the VMM writes the guest's monotonic time in nanoseconds. It starts near 0 at
/// first boot and is continuous across pause, snapshot and restore (it does not advance while
/// the VM is paused).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ClockRequest {
    pub now_ns: u64,
}

/// Idle: block until an event or until the clock reaches `deadline_ns` (u64::MAX: no
/// deadline). The VMM writes the time and the pending events ([`EVENT_NET_RX`]). When `rx` is
/// not 0 it is the address of a [`NetRequest`] that the VMM handles as [`PORT_NET_RX`] would
/// once the wait ends (its `done` is 0 when no frame waits), saving the guest one exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IdleRequest {
    pub deadline_ns: u64,
    pub now_ns: u64,
    pub events: u64,
    pub rx: u64,
}
/// A frame is waiting to be received.
pub const EVENT_NET_RX: u64 = 1;

/// Sector size of the block device.
pub const SECTOR_SIZE: u64 = 512;
/// A batch of block operations: `count` [`BlockDesc`]s at `descs`. The VMM performs them in
/// order and writes `status` ([`BLOCK_OK`] or [`BLOCK_IO_ERROR`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockRequest {
    pub count: u32,
    pub status: u32,
    pub descs: u64,
}
/// One block operation: `op` ([`BLOCK_READ`] / [`BLOCK_WRITE`]), `sectors` sectors starting at
/// `sector`, to or from the buffer at `buf`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockDesc {
    pub op: u32,
    pub sectors: u32,
    pub sector: u64,
    pub buf: u64,
}
pub const BLOCK_READ: u32 = 0;
pub const BLOCK_WRITE: u32 = 1;
/// Also a flush: writes reach the host file before the request completes.
pub const BLOCK_FLUSH: u32 = 2;
pub const BLOCK_OK: u32 = 0;
pub const BLOCK_IO_ERROR: u32 = 1;
/// Largest number of descriptors in one block request.
pub const BLOCK_MAX_DESCS: u32 = 256;
/// Largest number of sectors in one descriptor (1 MiB).
pub const BLOCK_MAX_SECTORS: u32 = 2048;

/// A batch of frames: `count` [`NetBuf`]s at `bufs`. For transmit the VMM sends each
/// `buf[i].len` bytes and writes `done` = frames sent; for receive it fills up to `count`
/// buffers (each of capacity `len` >= [`FRAME_MAX`]), writes each frame's length into its
/// `len`, and `done` = frames received.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NetRequest {
    pub count: u32,
    pub done: u32,
    pub bufs: u64,
}
/// One frame buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NetBuf {
    pub addr: u64,
    pub len: u32,
    pub _pad: u32,
}
/// Largest Ethernet frame (no FCS, no VLAN tag).
pub const FRAME_MAX: u32 = 1514;
/// Smallest Ethernet frame the VMM sends (header only).
pub const FRAME_MIN: u32 = 14;
/// Largest number of buffers in one network request.
pub const NET_MAX_BUFS: u32 = 64;

/// The job-trace ring (no call, no exit): the guest writes marks — a job released, started,
/// ended — into guest memory at [`TRACE_ADDR`], and the VMM reads them when asked (its
/// `trace` command), between runs of the vCPU, so reads are never torn. The guest writes
/// [`TraceHeader::magic`] once, then each record at `written % TRACE_CAPACITY` and increments
/// `written`; it never waits for the VMM, and the VMM reports records it missed (more than
/// [`TRACE_CAPACITY`] written between two reads) as lost. Timestamps are the raw TSC; the VMM
/// converts them with its vCPU's TSC frequency. The ring is ordinary guest memory, so it
/// survives snapshots, restores and checkpoint replication.
pub const TRACE_ADDR: u64 = 0x10000;
/// Bytes of the ring (header and records), below [`IMAGE_MIN_ADDR`].
pub const TRACE_BYTES: u64 = 0x10000;
/// Bytes before the first record.
pub const TRACE_HEADER: u64 = 64;
/// Records the ring holds.
pub const TRACE_CAPACITY: u64 = (TRACE_BYTES - TRACE_HEADER) / core::mem::size_of::<TraceRecord>() as u64;
/// `TraceHeader::magic` once the guest set the ring up.
pub const TRACE_MAGIC: u64 = u64::from_le_bytes(*b"VIGILTR1");

/// The ring's header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceHeader {
    pub magic: u64,
    /// Records written since the guest set the ring up.
    pub written: u64,
}

/// One mark.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceRecord {
    /// The guest's TSC when it made the mark.
    pub tsc: u64,
    /// [`MARK_RELEASE`], [`MARK_START`] or [`MARK_END`].
    pub kind: u32,
    /// The job's identity (the guest's choice, e.g. a request number), the same in its marks.
    pub id: u32,
}
/// A job was released (its input arrived).
pub const MARK_RELEASE: u32 = 1;
/// A job started executing.
pub const MARK_START: u32 = 2;
/// A job ended.
pub const MARK_END: u32 = 3;

/// Timer upcalls (paravirtual preemption): the guest registers a handler and a deadline in the
/// [`UpcallBlock`] at [`UPCALL_ADDR`] and tells the VMM with an `out` to [`PORT_UPCALL`] (the
/// value is ignored). When the guest clock reaches the deadline and the block is not masked,
/// the VMM stops the vCPU wherever it is, pushes an [`UpcallFrame`] with the interrupted
/// registers below the interrupted stack pointer (past the 128-byte red zone, 16-byte
/// aligned), and continues the vCPU at the handler with `rsp` = `rdi` = the frame's address
/// (the frame's `cs` and `ss` are the ABI's user selectors).
/// The deadline is consumed (set to `u64::MAX`) and the block masked; the handler saves the
/// FPU/SSE state into the frame's `fxsave` area if it uses them, unmasks when it is ready for
/// another upcall (then, if the VMM marked an upcall `pending` meanwhile, makes an exit to
/// have it delivered), and returns to whatever frame it chooses (the interrupted one, or another
/// task's: a frame is a complete user-mode context). The block is guest memory, so a pending
/// upcall is carried by snapshots, checkpoints and takeovers; the VMM arms its host timer from
/// it again after a restore.
pub const PORT_UPCALL: u16 = 0x517;
/// Guest-physical address of the [`UpcallBlock`] (below [`IMAGE_MIN_ADDR`], after the trace
/// ring).
pub const UPCALL_ADDR: u64 = TRACE_ADDR + TRACE_BYTES;
/// `UpcallBlock::magic` once the guest registered a handler.
pub const UPCALL_MAGIC: u64 = u64::from_le_bytes(*b"VIGILUP1");
/// Bytes the VMM skips below the interrupted `rsp` before the frame (the System V red zone).
pub const UPCALL_RED_ZONE: u64 = 128;

/// The upcall control block, at [`UPCALL_ADDR`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UpcallBlock {
    /// [`UPCALL_MAGIC`]: a handler is registered.
    pub magic: u64,
    /// Guest address of the handler.
    pub handler: u64,
    /// Guest clock time (ns) of the next upcall; `u64::MAX`: none. Consumed by delivery.
    pub deadline_ns: u64,
    /// Not 0: no upcall is delivered (the VMM sets it to 1 when it delivers one).
    pub masked: u64,
    /// Set by the VMM when the deadline passed while masked: the guest, having unmasked,
    /// makes an exit (`out` to [`PORT_UPCALL`]) for it to be delivered. Cleared on delivery.
    pub pending: u64,
    /// Upcalls delivered so far (written by the VMM).
    pub delivered: u64,
    /// The deadline of the last upcall delivered (written by the VMM).
    pub fired_ns: u64,
    /// Guest clock time at which the VMM redirected the vCPU for it (written by the VMM):
    /// `entered_ns - fired_ns` is the upcall's latency up to the handler's first instruction.
    pub entered_ns: u64,
}

/// The interrupted context the VMM pushes for an upcall (and the guest for a voluntary
/// switch): restoring it resumes the interrupted code exactly. 16-byte aligned.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug)]
pub struct UpcallFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// From here on, the layout `iretq` pops: a guest resumes a frame by popping the 15
    /// registers above and executing `iretq` (legal in user mode, and atomic: the interrupted
    /// code's stack, red zone included, is never touched).
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
    /// `fxsave64` area for the handler (the VMM leaves it as it is).
    pub fxsave: [u8; 512],
}

/// Offsets inside [`UpcallFrame`] that the guest's assembly uses.
pub const FRAME_RIP: usize = 15 * 8;
pub const FRAME_CS: usize = 16 * 8;
pub const FRAME_RFLAGS: usize = 17 * 8;
pub const FRAME_RSP: usize = 18 * 8;
pub const FRAME_SS: usize = 19 * 8;
pub const FRAME_FXSAVE: usize = 20 * 8;
/// Offset of `UpcallBlock::masked`.
pub const UPCALL_MASKED: u64 = 3 * 8;
/// Offset of `UpcallBlock::pending`.
pub const UPCALL_PENDING: u64 = 4 * 8;
/// Size of an [`UpcallFrame`].
pub const FRAME_SIZE: usize = core::mem::size_of::<UpcallFrame>();
const _: () = assert!(FRAME_FXSAVE % 16 == 0 && FRAME_SIZE == FRAME_FXSAVE + 512);
