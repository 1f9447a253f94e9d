//! A smoltcp TCP/IP stack over the paravirtual network device (feature `net-stack`), with
//! frames moved in batches: one exit receives up to [`RX_BATCH`] frames, one sends up to 64.

use crate::net::{self, Frame};
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

/// Frames received per exit.
pub const RX_BATCH: usize = 16;

/// The network device as a smoltcp [`Device`].
pub struct NetDevice {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
    frames: Box<[Frame; RX_BATCH]>,
    /// The last receive filled every buffer, or the VMM signalled a frame: try again.
    rx_more: bool,
}

impl NetDevice {
    fn new() -> Self {
        NetDevice { rx: VecDeque::new(), tx: Vec::new(), frames: Box::new([[0; vmm_abi::FRAME_MAX as usize]; RX_BATCH]), rx_more: true }
    }

    /// Receives waiting frames (one exit) if the last receive suggested more.
    fn fill_rx(&mut self) {
        if !self.rx_more {
            return;
        }
        let mut lens = [0usize; RX_BATCH];
        let n = net::receive(&mut self.frames[..], &mut lens);
        for (f, len) in self.frames.iter().zip(&lens).take(n) {
            self.rx.push_back(f[..*len].to_vec());
        }
        self.rx_more = n == RX_BATCH;
    }

    /// Sends queued frames (one exit per 64).
    fn flush_tx(&mut self) {
        let mut start = 0;
        while start < self.tx.len() {
            let end = (start + vmm_abi::NET_MAX_BUFS as usize).min(self.tx.len());
            let refs: Vec<&[u8]> = self.tx[start..end].iter().map(|f| &f[..]).collect();
            net::send(&refs);
            start = end;
        }
        self.tx.clear();
    }
}

/// A received frame.
pub struct Rx(Vec<u8>);
/// Room for a frame to send.
pub struct Tx<'a>(&'a mut Vec<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        self.0.push(frame);
        r
    }
}

impl Device for NetDevice {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = vmm_abi::FRAME_MAX as usize;
        c
    }
}

/// An interface configured from the boot page, its device and its sockets.
pub struct Stack {
    pub iface: Interface,
    pub device: NetDevice,
    pub sockets: SocketSet<'static>,
}

/// smoltcp time from the paravirtual clock.
pub fn now() -> Instant {
    Instant::from_micros((crate::now_ns() / 1000) as i64)
}

impl Stack {
    /// The stack for the VM's network device, or `None` without one.
    pub fn new() -> Option<Stack> {
        let cfg = net::config()?;
        let mut device = NetDevice::new();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(cfg.mac)));
        config.random_seed = crate::now_ns() ^ 0x9e37_79b9_7f4a_7c15;
        let mut iface = Interface::new(config, &mut device, now());
        let [a, b, c, d] = cfg.ipv4;
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(Ipv4Address::new(a, b, c, d).into(), cfg.prefix_len));
        });
        if cfg.gateway != [0; 4] {
            let [a, b, c, d] = cfg.gateway;
            let _ = iface.routes_mut().add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
        }
        Some(Stack { iface, device, sockets: SocketSet::new(vec![]) })
    }

    /// Receives what is waiting, runs the stack, sends what it produced. Returns whether a
    /// socket's state may have changed.
    pub fn poll(&mut self) -> bool {
        self.device.fill_rx();
        let changed = self.iface.poll(now(), &mut self.device, &mut self.sockets);
        self.device.flush_tx();
        changed == smoltcp::iface::PollResult::SocketStateChanged
    }

    /// Like [`Stack::poll`], but asks the device for frames even when the last receive did not
    /// suggest more (for guests that never idle: one exit each time).
    pub fn poll_busy(&mut self) -> bool {
        self.device.rx_more = true;
        self.poll()
    }

    /// Idles until a frame arrives or the stack's next timer, unless frames are known to wait;
    /// frames waiting at the end of the wait arrive in the same exit.
    pub fn wait(&mut self) {
        if self.device.rx_more || !self.device.rx.is_empty() {
            return;
        }
        let t = now();
        let deadline = match self.iface.poll_delay(t, &self.sockets) {
            Some(d) => crate::now_ns().saturating_add(d.total_micros() * 1000),
            None => u64::MAX,
        };
        let mut lens = [0usize; RX_BATCH];
        let (wake, n) = net::idle_receive(deadline, &mut self.device.frames[..], &mut lens);
        for (f, len) in self.device.frames.iter().zip(&lens).take(n) {
            self.device.rx.push_back(f[..*len].to_vec());
        }
        self.device.rx_more = wake.net_rx;
    }
}
