//! The network device: Ethernet frames, sent and received in batches.

use vmm_abi::{NetBuf, NetRequest, FRAME_MAX, PORT_NET_RX, PORT_NET_TX};

/// Whether a network device is attached, and its configuration from the boot page.
pub fn config() -> Option<Config> {
    let b = crate::boot_info();
    (b.has_net != 0).then_some(Config { mac: b.mac, ipv4: b.ipv4, prefix_len: b.prefix_len as u8, gateway: b.gateway })
}

/// The network configuration the VMM was given.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub mac: [u8; 6],
    pub ipv4: [u8; 4],
    pub prefix_len: u8,
    pub gateway: [u8; 4],
}

/// A receive buffer (one frame).
pub type Frame = [u8; FRAME_MAX as usize];

/// Sends every frame of `frames` in one exit; returns how many were sent.
pub fn send(frames: &[&[u8]]) -> usize {
    let mut bufs = [NetBuf::default(); vmm_abi::NET_MAX_BUFS as usize];
    let n = frames.len().min(bufs.len());
    for (b, f) in bufs.iter_mut().zip(frames) {
        *b = NetBuf { addr: f.as_ptr() as u64, len: f.len() as u32, _pad: 0 };
    }
    let mut req = NetRequest { count: n as u32, done: 0, bufs: bufs.as_ptr() as u64 };
    crate::port::request(PORT_NET_TX, &mut req);
    req.done as usize
}

/// Receives up to `frames.len()` frames in one exit; `lens[i]` gets the length of frame i.
/// Returns how many frames were received.
pub fn receive(frames: &mut [Frame], lens: &mut [usize]) -> usize {
    let mut bufs = [NetBuf::default(); vmm_abi::NET_MAX_BUFS as usize];
    let n = frames.len().min(lens.len()).min(bufs.len());
    for (b, f) in bufs.iter_mut().zip(frames.iter_mut()).take(n) {
        *b = NetBuf { addr: f.as_mut_ptr() as u64, len: FRAME_MAX, _pad: 0 };
    }
    let mut req = NetRequest { count: n as u32, done: 0, bufs: bufs.as_ptr() as u64 };
    crate::port::request(PORT_NET_RX, &mut req);
    let done = (req.done as usize).min(n);
    for (l, b) in lens.iter_mut().zip(&bufs).take(done) {
        *l = b.len as usize;
    }
    done
}

/// Idles like [`crate::idle`] and receives in the same exit: up to `frames.len()` frames that
/// wait when the idle ends. Returns the wake-up and how many frames were received (`lens[i]`
/// is the length of frame i); `wake.net_rx` then says whether more frames wait.
pub fn idle_receive(deadline_ns: u64, frames: &mut [Frame], lens: &mut [usize]) -> (crate::clock::Wake, usize) {
    crate::console::flush();
    let mut bufs = [NetBuf::default(); vmm_abi::NET_MAX_BUFS as usize];
    let n = frames.len().min(lens.len()).min(bufs.len());
    for (b, f) in bufs.iter_mut().zip(frames.iter_mut()).take(n) {
        *b = NetBuf { addr: f.as_mut_ptr() as u64, len: FRAME_MAX, _pad: 0 };
    }
    let mut rx = NetRequest { count: n as u32, done: 0, bufs: bufs.as_ptr() as u64 };
    let mut req = vmm_abi::IdleRequest { deadline_ns, rx: &mut rx as *mut NetRequest as u64, ..Default::default() };
    crate::port::request(vmm_abi::PORT_IDLE, &mut req);
    let done = (rx.done as usize).min(n);
    for (l, b) in lens.iter_mut().zip(&bufs).take(done) {
        *l = b.len as usize;
    }
    let wake = crate::clock::Wake { now_ns: req.now_ns, net_rx: req.events & vmm_abi::EVENT_NET_RX != 0 };
    (wake, done)
}
