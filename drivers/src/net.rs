//! virtio-net glue to smoltcp: a [`NetDevice`] drives virtio-drivers'
//! non-blocking [`VirtIONetRaw`] over the PCI transport and implements
//! smoltcp's [`phy::Device`].
//!
//! Frames live in two fixed pools allocated once at start-up, one buffer
//! per ring slot: every receive buffer is posted to the RX ring, and a
//! transmit buffer is taken from the free list when smoltcp sends and
//! returns to it when the device has used it. Nothing is allocated per
//! frame. The device never interrupts (notifications are suppressed): the
//! kernel's main loop polls it.
//!
//! A buffer holds the `virtio_net_hdr` (12 bytes with VERSION_1) followed by
//! one Ethernet frame of at most 1514 bytes (MTU 1500; no offloads are
//! negotiated, so smoltcp computes checksums on transmit and the virtual
//! link's are trusted on receive).

use alloc::boxed::Box;
use alloc::vec::Vec;
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Ipv4Address,
};
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::pci::PciTransport;

/// The TCP/IP stack, for the kernel (one version for driver and stack).
pub use smoltcp;

use crate::virtio::hal::IdentityHal;

/// Ring slots per queue (QEMU's default `rx_queue_size`/`tx_queue_size`).
pub const QUEUE_SIZE: usize = 256;
/// Bytes per pool buffer: the virtio-net header and a full Ethernet frame.
pub const BUFFER_LEN: usize = 2048;
/// The largest Ethernet frame (without FCS) at MTU 1500.
pub const MAX_FRAME: usize = 1514;

type Raw = VirtIONetRaw<IdentityHal, PciTransport, QUEUE_SIZE>;

/// Why the device could not be brought up.
#[derive(Debug)]
pub enum Error {
    /// virtio-drivers refused the device (feature negotiation, queues).
    Setup(virtio_drivers::Error),
    /// Posting the receive buffers failed.
    Post(virtio_drivers::Error),
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Setup(e) => write!(f, "virtio-net setup: {e:?}"),
            Error::Post(e) => write!(f, "virtio-net receive buffers: {e:?}"),
        }
    }
}

/// Frame counters (for the console and tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Frames smoltcp wanted to send while every transmit buffer was busy.
    pub tx_full: u64,
}

/// The receive side: buffers, which ring token holds which buffer, and the
/// buffers smoltcp has finished with (posted again on the next poll).
struct RxPool {
    bufs: Vec<Box<[u8]>>,
    by_token: Vec<Option<usize>>,
    recycle: Vec<usize>,
}

/// The transmit side: buffers, free list, token → buffer.
struct TxPool {
    bufs: Vec<Box<[u8]>>,
    free: Vec<usize>,
    by_token: Vec<Option<usize>>,
}

/// A virtio-net device as a smoltcp device.
pub struct NetDevice {
    raw: Raw,
    rx: RxPool,
    tx: TxPool,
    stats: Stats,
    /// Frames moved since the last [`NetDevice::take_activity`].
    activity: bool,
}

fn pool(n: usize) -> Vec<Box<[u8]>> {
    (0..n)
        .map(|_| alloc::vec![0u8; BUFFER_LEN].into_boxed_slice())
        .collect()
}

impl NetDevice {
    /// Negotiates the device, sets up both queues and posts every receive
    /// buffer.
    pub fn new(transport: PciTransport) -> Result<NetDevice, Error> {
        let mut raw = Raw::new(transport).map_err(Error::Setup)?;
        raw.disable_interrupts();
        let mut dev = NetDevice {
            raw,
            rx: RxPool {
                bufs: pool(QUEUE_SIZE),
                by_token: alloc::vec![None; QUEUE_SIZE],
                recycle: Vec::new(),
            },
            tx: TxPool {
                bufs: pool(QUEUE_SIZE),
                free: (0..QUEUE_SIZE).rev().collect(),
                by_token: alloc::vec![None; QUEUE_SIZE],
            },
            stats: Stats::default(),
            activity: false,
        };
        for i in 0..QUEUE_SIZE {
            dev.post_rx(i).map_err(Error::Post)?;
        }
        Ok(dev)
    }

    /// The device's MAC address.
    pub fn mac(&self) -> EthernetAddress {
        EthernetAddress(self.raw.mac_address())
    }

    /// Frame counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Whether frames moved since the last call.
    pub fn take_activity(&mut self) -> bool {
        core::mem::take(&mut self.activity)
    }

    fn post_rx(&mut self, i: usize) -> Result<(), virtio_drivers::Error> {
        let buf = &mut self.rx.bufs[i];
        // SAFETY: buffer `i` is owned by the pool and not lent to smoltcp
        // (it is either fresh or recycled); nothing touches it until the
        // device returns its token and `receive_complete` is called with
        // the same buffer. Its heap allocation never moves.
        let token = unsafe { self.raw.receive_begin(buf) }?;
        if let Some(slot) = self.rx.by_token.get_mut(usize::from(token)) {
            *slot = Some(i);
        }
        Ok(())
    }

    /// Posts the receive buffers smoltcp has finished with and reclaims
    /// transmit buffers the device has sent.
    pub fn maintain(&mut self) {
        while let Some(i) = self.rx.recycle.pop() {
            if self.post_rx(i).is_err() {
                // Cannot happen (one slot per buffer); keep it for later.
                self.rx.recycle.push(i);
                break;
            }
        }
        reclaim_tx(&mut self.raw, &mut self.tx);
    }

    /// Announces `ip` with a gratuitous ARP (a broadcast request for our
    /// own address), so a host bridge or tap learns our MAC at once.
    pub fn announce(&mut self, ip: Ipv4Address) {
        let mac = self.mac();
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: mac,
            source_protocol_addr: ip,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: ip,
        };
        let eth = EthernetRepr {
            src_addr: mac,
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Arp,
        };
        let len = eth.buffer_len() + arp.buffer_len();
        if let Some(tx) = phy::Device::transmit(self, Instant::ZERO) {
            phy::TxToken::consume(tx, len, |buf| {
                let mut frame = EthernetFrame::new_unchecked(buf);
                eth.emit(&mut frame);
                arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
            });
        }
    }
}

/// Takes back every transmit buffer the device has used.
fn reclaim_tx(raw: &mut Raw, tx: &mut TxPool) {
    while let Some(token) = raw.poll_transmit() {
        let Some(i) = tx
            .by_token
            .get_mut(usize::from(token))
            .and_then(Option::take)
        else {
            break;
        };
        // SAFETY: `i` is the buffer `transmit_begin` was given for this
        // token; the device is done with it once its token is used.
        let _ = unsafe { raw.transmit_complete(token, &tx.bufs[i]) };
        tx.free.push(i);
    }
}

/// A received frame lent to smoltcp.
pub struct RxToken<'a> {
    pool: &'a mut RxPool,
    index: usize,
    start: usize,
    len: usize,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let buf = &self.pool.bufs[self.index];
        let end = (self.start + self.len).min(buf.len());
        f(&buf[self.start.min(end)..end])
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        self.pool.recycle.push(self.index);
    }
}

/// Room for one frame to send.
pub struct TxToken<'a> {
    raw: &'a mut Raw,
    pool: &'a mut TxPool,
    stats: &'a mut Stats,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        // The token is only handed out with a free buffer.
        let Some(i) = self.pool.free.pop() else {
            let mut scratch = [0u8; MAX_FRAME];
            return f(&mut scratch[..len.min(MAX_FRAME)]);
        };
        let buf = &mut self.pool.bufs[i];
        let hdr = self.raw.fill_buffer_header(buf).unwrap_or(0);
        let len = len.min(buf.len() - hdr);
        let r = f(&mut buf[hdr..hdr + len]);
        // SAFETY: buffer `i` came off the free list, so the device holds
        // none of it; it is not touched again until its token is used and
        // `reclaim_tx` completes it. Its heap allocation never moves.
        match unsafe { self.raw.transmit_begin(&buf[..hdr + len]) } {
            Ok(token) => {
                if let Some(slot) = self.pool.by_token.get_mut(usize::from(token)) {
                    *slot = Some(i);
                }
                self.stats.tx_frames += 1;
            }
            Err(_) => self.pool.free.push(i),
        }
        r
    }
}

impl phy::Device for NetDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        self.maintain();
        // A reply may be needed: deliver a frame only with a buffer free.
        if self.tx.free.is_empty() {
            self.stats.tx_full += 1;
            return None;
        }
        let token = self.raw.poll_receive()?;
        let index = self
            .rx
            .by_token
            .get_mut(usize::from(token))
            .and_then(Option::take)?;
        // SAFETY: `index` is the buffer `receive_begin` was given for this
        // token, which the device has now used.
        let done = unsafe { self.raw.receive_complete(token, &mut self.rx.bufs[index]) };
        self.activity = true;
        let (start, len) = match done {
            Ok(v) => v,
            Err(_) => {
                // A runt: post the buffer again, report nothing this time.
                self.rx.recycle.push(index);
                return None;
            }
        };
        self.stats.rx_frames += 1;
        Some((
            RxToken {
                pool: &mut self.rx,
                index,
                start,
                len,
            },
            TxToken {
                raw: &mut self.raw,
                pool: &mut self.tx,
                stats: &mut self.stats,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        reclaim_tx(&mut self.raw, &mut self.tx);
        if self.tx.free.is_empty() {
            self.stats.tx_full += 1;
            return None;
        }
        self.activity = true;
        Some(TxToken {
            raw: &mut self.raw,
            pool: &mut self.tx,
            stats: &mut self.stats,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps.max_burst_size = None;
        // Frames come from the host's stack or QEMU's slirp over a virtual
        // link that cannot corrupt them: verify nothing, compute on send.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        checksum.icmpv4 = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}
