//! virtio-net, blockhaus's own driver on virtio-drivers' PCI transport and
//! virtqueue (as [`crate::virtio`] does for the disks), as a smoltcp
//! [`phy::Device`].
//!
//! # Features
//! The driver negotiates what QEMU offers and it can honour
//! ([`WANTED`]): `MAC`, `MTU` (jumbo frames up to [`MAX_MTU`]), `CSUM`
//! (the host computes the TCP checksum of what we send), `GUEST_CSUM`
//! (the host may hand us frames whose checksum it vouches for; smoltcp
//! checks none anyway) and `HOST_TSO4` (with `CSUM`: smoltcp's
//! `segmentation-offload` emits TCP frames of up to 64 KiB and the host
//! cuts them into segments of the connection's MSS, see [`offload`]).
//! A tap netdev offers all of them; QEMU's user network (slirp) offers
//! none (it has no vnet header): then smoltcp computes every checksum and
//! sends MSS-sized frames, as before. `GUEST_TSO4` (the host hands us
//! unsegmented TCP frames of up to 64 KiB, one per receive buffer) is
//! asked for only when the 64 KiB receive buffers could be allocated;
//! `MRG_RXBUF` (frames spread over small buffers, which smoltcp would
//! need copied together) and the IPv6 and ECN variants are not.
//!
//! # Buffers
//! Allocated once at start-up, as many as [`Sizing`] allows (derived
//! from the heap by the kernel's budgets), fallibly: a heap too small for
//! the large transmit buffers turns segmentation offload off, not the
//! appliance. Every receive buffer is posted to the RX ring; a transmit
//! token holds a small (one frame at the MTU) and, with segmentation
//! offload, a large (64 KiB) buffer, and smoltcp writes the frame in
//! place after the 12-byte `virtio_net_hdr` in the one that fits it.
//! Nothing is allocated per frame.
//!
//! # Notifications
//! The device never interrupts (the kernel's main loop polls it; the
//! interrupt interface is [`NetDevice::set_interrupts`] and
//! [`NetDevice::ack_interrupt`]). Frames added to the TX ring during one
//! poll of the stack go to the device with one notification at the end
//! ([`NetDevice::flush`]), or earlier once 64 KiB or a quarter of the
//! ring wait ([`kick_now`]); `EVENT_IDX` is not negotiated (see
//! [`crate::virtio::queue`]), so QEMU's `NO_NOTIFY` flag suppresses the
//! kicks while it drains the ring.
//!
//! Neighbour learning: smoltcp fills its ARP cache only from ARP. A host
//! that learnt our MAC from the gratuitous ARP never asks, so the first
//! reply to it would be dropped while smoltcp resolves it (a lost ping, a
//! SYN-ACK retransmitted a second later). So when an IPv4 frame arrives
//! from a neighbour on our subnet that smoltcp has not heard from lately,
//! the device first hands smoltcp a synthetic ARP request from that
//! neighbour (its addresses taken from the frame), then the frame itself.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::num::NonZeroUsize;
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium, PacketMeta};
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Ipv4Address,
};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{InterruptStatus, Transport};

/// The TCP/IP stack, for the kernel (one version for driver and stack).
pub use smoltcp;

use crate::virtio::queue::Queue;
use crate::virtio::transport::{self as vt, F_VERSION_1};

/// `VIRTIO_NET_F_CSUM`: the device completes checksums of what we send.
pub const F_CSUM: u64 = 1 << 0;
/// `VIRTIO_NET_F_GUEST_CSUM`: received frames may carry partial checksums.
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// `VIRTIO_NET_F_MTU`: the device's MTU is in its config space.
pub const F_MTU: u64 = 1 << 3;
/// `VIRTIO_NET_F_MAC`: the device's MAC is in its config space.
pub const F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_GUEST_TSO4`: the device may hand us IPv4 TCP frames of
/// up to 64 KiB (needs `GUEST_CSUM`, and receive buffers that hold one).
pub const F_GUEST_TSO4: u64 = 1 << 7;
/// `VIRTIO_NET_F_HOST_TSO4`: the device segments large IPv4 TCP frames.
pub const F_HOST_TSO4: u64 = 1 << 11;
/// The features asked for (VERSION_1 is always; `GUEST_TSO4` when the
/// large receive buffers could be allocated).
pub const WANTED: u64 = F_CSUM | F_GUEST_CSUM | F_MTU | F_MAC | F_HOST_TSO4;

/// Feature names, for the boot log.
const NAMES: [(u64, &str); 7] = [
    (F_CSUM, "CSUM"),
    (F_GUEST_CSUM, "GUEST_CSUM"),
    (F_MTU, "MTU"),
    (F_MAC, "MAC"),
    (F_GUEST_TSO4, "GUEST_TSO4"),
    (F_HOST_TSO4, "HOST_TSO4"),
    (F_VERSION_1, "VERSION_1"),
];

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
/// The queues whose used buffers should interrupt (MSI-X routing): receive
/// and transmit.
pub const INTERRUPT_QUEUES: &[u16] = &[RX_QUEUE, TX_QUEUE];
/// The `virtio_net_hdr` (12 bytes with VERSION_1).
pub const HDR_LEN: usize = 12;
/// Ethernet header.
const ETH_LEN: usize = 14;
/// MTU without `VIRTIO_NET_F_MTU`.
pub const DEFAULT_MTU: u16 = 1500;
/// The largest MTU used (a larger one offered is lowered to this).
pub const MAX_MTU: u16 = 9000;
/// The largest frame handed to the device for segmentation: an IPv4
/// packet of 65535 bytes (its total length must be valid) and the
/// Ethernet header.
pub const TSO_FRAME: usize = 65535 + ETH_LEN;
/// A receive buffer with `GUEST_TSO4` and without `MRG_RXBUF` (virtio
/// 1.x, 5.1.6.3.1: at least 65562 bytes, header included).
pub const RX_TSO_BUFFER: usize = 65562;
/// Fewer large receive buffers than this: `GUEST_TSO4` is not asked for.
const MIN_RX_TSO_BUFFERS: usize = 4;

/// `virtio_net_hdr.flags`: checksum from `csum_start` to the end, stored
/// at `csum_start + csum_offset`.
const HDR_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.gso_type`: TCP over IPv4.
const HDR_GSO_TCPV4: u8 = 1;

/// How many buffers the driver allocates (the kernel derives them from the
/// heap); each is capped by its ring's size.
#[derive(Debug, Clone, Copy)]
pub struct Sizing {
    /// Receive buffers (one frame at the MTU each).
    pub rx_buffers: usize,
    /// Large receive buffers (64 KiB) for `GUEST_TSO4`, used instead of
    /// those when the device offers it; 0 does without.
    pub rx_tso_buffers: usize,
    /// Small transmit buffers (one frame at the MTU each).
    pub tx_buffers: usize,
    /// Large (64 KiB) transmit buffers for segmentation offload; 0 turns it
    /// off.
    pub tso_buffers: usize,
}

/// Why the device could not be brought up.
#[derive(Debug)]
pub enum Error {
    /// Feature negotiation failed.
    Negotiate(crate::virtio::Error),
    /// virtio-drivers refused a queue.
    Setup(virtio_drivers::Error),
    /// Posting the receive buffers failed.
    Post(virtio_drivers::Error),
    /// Not even one receive and one transmit buffer could be allocated.
    NoMemory,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Negotiate(e) => write!(f, "virtio-net features: {e}"),
            Error::Setup(e) => write!(f, "virtio-net setup: {e:?}"),
            Error::Post(e) => write!(f, "virtio-net receive buffers: {e:?}"),
            Error::NoMemory => f.write_str("virtio-net: no memory for frame buffers"),
        }
    }
}

/// The negotiated features by name, e.g. `CSUM GUEST_CSUM MAC VERSION_1`.
pub struct FeatureNames(pub u64);

impl core::fmt::Display for FeatureNames {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut first = true;
        for (bit, name) in NAMES {
            if self.0 & bit != 0 {
                if !first {
                    f.write_str(" ")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// Frame counters (for the console and tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub rx_frames: u64,
    /// Received frames the host did not segment (`gso_type` set: only
    /// with `GUEST_TSO4`).
    pub rx_gso_frames: u64,
    pub tx_frames: u64,
    /// Frames handed to the device for segmentation (`gso_type` TCPV4).
    pub tx_gso_frames: u64,
    /// Frames smoltcp wanted to send while every transmit buffer was busy.
    pub tx_full: u64,
    /// Notifications of the device (TX and RX queues).
    pub kicks: u64,
    /// Connection requests dropped because no listening socket was free
    /// and the SYN queue was full (see [`NetDevice::gate_syns`]).
    pub syn_dropped: u64,
    /// Connection requests queued until a listening socket was free.
    pub syn_queued: u64,
}

/// Connection requests held while no listening socket is free (Linux's
/// `somaxconn` was 128 for decades; a SYN is about 80 bytes).
pub const SYN_BACKLOG: usize = 256;

/// The receive side: buffers, which ring token holds which buffer, and the
/// buffers smoltcp has finished with (posted again on the next poll).
struct RxPool {
    bufs: Vec<Box<[u8]>>,
    by_token: Vec<Option<usize>>,
    recycle: Vec<usize>,
    /// Buffers posted since the last notification.
    unkicked: usize,
}

/// A transmit buffer: small (`Small(i)`) or large.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Small(usize),
    Large(usize),
}

/// The transmit side: buffers, free lists, token → buffer.
struct TxPool {
    small: Vec<Box<[u8]>>,
    large: Vec<Box<[u8]>>,
    free_small: Vec<usize>,
    free_large: Vec<usize>,
    /// Token → the buffer and the bytes (header and frame) added.
    by_token: Vec<Option<(Slot, usize)>>,
    /// Frames on the ring (not yet reclaimed).
    in_flight: usize,
    /// Frames added since the last notification.
    unkicked: usize,
    /// Their bytes.
    unkicked_bytes: usize,
}

impl TxPool {
    fn buf(&mut self, slot: Slot) -> &mut [u8] {
        match slot {
            Slot::Small(i) => &mut self.small[i],
            Slot::Large(i) => &mut self.large[i],
        }
    }

    fn free(&mut self, slot: Slot) {
        match slot {
            Slot::Small(i) => self.free_small.push(i),
            Slot::Large(i) => self.free_large.push(i),
        }
    }
}

/// The transport and the two queues (what a notification needs).
struct Rings {
    transport: PciTransport,
    rxq: Queue,
    txq: Queue,
    features: u64,
}

impl Rings {
    /// Notifies the TX queue if frames wait and the device wants it.
    fn kick_tx(&mut self, tx: &mut TxPool, stats: &mut Stats) {
        if tx.unkicked > 0 {
            tx.unkicked = 0;
            tx.unkicked_bytes = 0;
            if self.txq.should_notify() {
                self.transport.notify(TX_QUEUE);
                stats.kicks += 1;
            }
        }
    }
}

/// A virtio-net device as a smoltcp device.
pub struct NetDevice {
    rings: Rings,
    mtu: u16,
    mac: [u8; 6],
    rx: RxPool,
    tx: TxPool,
    stats: Stats,
    /// Frames moved since the last [`NetDevice::take_activity`].
    activity: bool,
    /// Our address and prefix (after [`NetDevice::announce`]).
    ip: Option<(Ipv4Address, u8)>,
    neighbours: Neighbours,
    /// A received frame held back while its synthetic ARP goes first.
    held: Option<(usize, usize, usize)>,
    /// The synthetic ARP request.
    arp: [u8; ARP_FRAME],
    /// TCP connection requests to this port beyond this many are queued.
    syn_gate: Option<(u16, usize)>,
    /// Copies of the SYNs waiting for a listening socket, oldest first.
    syn_queue: VecDeque<Vec<u8>>,
    /// The queued SYN being handed to the stack.
    replay: Vec<u8>,
}

/// Who sent a TCP segment in an IPv4 frame: source address and port.
fn tcp_source(frame: &[u8]) -> Option<[u8; 6]> {
    let ip = frame.get(14..)?;
    let ihl = usize::from(*ip.first()? & 0x0f) * 4;
    let mut key = [0; 6];
    key[..4].copy_from_slice(ip.get(12..16)?);
    key[4..].copy_from_slice(ip.get(ihl..ihl + 2)?);
    Some(key)
}

/// A copy of `frame`, or `None` when the heap cannot hold one.
fn fallible_copy(frame: &[u8]) -> Option<Vec<u8>> {
    let mut copy = Vec::new();
    copy.try_reserve_exact(frame.len()).ok()?;
    copy.extend_from_slice(frame);
    Some(copy)
}

/// The destination port of a TCP SYN (without ACK) in an IPv4 frame.
fn tcp_syn_port(frame: &[u8]) -> Option<u16> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = frame.get(14..)?;
    let ihl = usize::from(*ip.first()? & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || *ip.get(9)? != 6 {
        return None;
    }
    let tcp = ip.get(ihl..)?;
    let flags = *tcp.get(13)?;
    if flags & 0x12 != 0x02 {
        return None;
    }
    Some(u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]))
}

/// An Ethernet frame carrying an IPv4 ARP packet.
const ARP_FRAME: usize = 42;
/// How often a neighbour is re-introduced to smoltcp (its cache keeps an
/// entry 60 s).
const NEIGHBOUR_REFRESH_MS: i64 = 20_000;
/// Neighbours remembered.
const NEIGHBOURS: usize = 32;

/// Neighbours smoltcp was told about: (IPv4, MAC, when, ms).
#[derive(Default)]
struct Neighbours(Vec<([u8; 4], [u8; 6], i64)>);

impl Neighbours {
    /// Whether `(ip, mac)` should be introduced now; records it if so.
    fn introduce(&mut self, ip: [u8; 4], mac: [u8; 6], now_ms: i64) -> bool {
        if let Some(e) = self.0.iter_mut().find(|e| e.0 == ip) {
            if e.1 == mac && now_ms - e.2 < NEIGHBOUR_REFRESH_MS {
                return false;
            }
            *e = (ip, mac, now_ms);
            return true;
        }
        if self.0.len() >= NEIGHBOURS {
            // Forget the stalest.
            if let Some(i) = (0..self.0.len()).min_by_key(|&i| self.0[i].2) {
                self.0.swap_remove(i);
            }
        }
        self.0.push((ip, mac, now_ms));
        true
    }
}

/// Up to `n` zeroed buffers of `len` bytes: as many as the heap gives.
fn pool(n: usize, len: usize) -> Vec<Box<[u8]>> {
    let mut bufs = Vec::new();
    if bufs.try_reserve_exact(n).is_err() {
        return bufs;
    }
    for _ in 0..n {
        let mut v = Vec::new();
        if v.try_reserve_exact(len).is_err() {
            break;
        }
        v.resize(len, 0);
        bufs.push(v.into_boxed_slice());
    }
    bufs
}

/// `features` without those whose dependency is missing (virtio 1.x,
/// 5.1.3.1): `GUEST_TSO4` needs `GUEST_CSUM`, `HOST_TSO4` needs `CSUM`.
fn without_unmet(features: u64) -> u64 {
    let mut f = features;
    if f & F_GUEST_CSUM == 0 {
        f &= !F_GUEST_TSO4;
    }
    if f & F_CSUM == 0 {
        f &= !F_HOST_TSO4;
    }
    f
}

/// The MTU to use given the negotiated features and the config's `mtu`.
fn pick_mtu(features: u64, offered: u16) -> u16 {
    if features & F_MTU == 0 || offered < 68 {
        DEFAULT_MTU
    } else {
        offered.min(MAX_MTU)
    }
}

impl NetDevice {
    /// Negotiates the device, sets up both queues, allocates the buffers
    /// `sizing` asks for (fewer if the heap is short) and posts every
    /// receive buffer.
    pub fn new(mut transport: PciTransport, sizing: Sizing) -> Result<NetDevice, Error> {
        // Large receive buffers first: only with them may the device send
        // 64 KiB frames (without MRG_RXBUF a frame must fit one buffer).
        let mut rx = pool(sizing.rx_tso_buffers, RX_TSO_BUFFER);
        let wanted = if rx.len() >= MIN_RX_TSO_BUFFERS {
            WANTED | F_GUEST_TSO4
        } else {
            WANTED
        };
        let mut features = vt::negotiate(&mut transport, wanted).map_err(Error::Negotiate)?;
        if without_unmet(features) != features {
            // QEMU offers the TSO features without the checksum ones they
            // need (`csum=off`): ask again without them.
            features =
                vt::negotiate(&mut transport, without_unmet(features)).map_err(Error::Negotiate)?;
        }
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = vt::config_u8(&transport, i);
        }
        let mtu = pick_mtu(features, vt::config_u16(&transport, 10));
        let mut rxq = Queue::new(&mut transport, RX_QUEUE, false).map_err(Error::Setup)?;
        let mut txq = Queue::new(&mut transport, TX_QUEUE, false).map_err(Error::Setup)?;
        rxq.set_dev_notify(false);
        txq.set_dev_notify(false);
        transport.finish_init();
        let frame_len = HDR_LEN + ETH_LEN + usize::from(mtu);
        rx.truncate(rxq.size().into());
        if features & F_GUEST_TSO4 == 0 {
            // Not offered: the large buffers go back before the small come.
            drop(core::mem::take(&mut rx));
            rx = pool(sizing.rx_buffers.min(rxq.size().into()), frame_len);
        }
        let small = pool(sizing.tx_buffers.min(txq.size().into()), frame_len);
        if rx.is_empty() || small.is_empty() {
            return Err(Error::NoMemory);
        }
        let tso = features & (F_CSUM | F_HOST_TSO4) == F_CSUM | F_HOST_TSO4;
        let large = if tso {
            pool(sizing.tso_buffers, HDR_LEN + TSO_FRAME)
        } else {
            Vec::new()
        };
        let mut dev = NetDevice {
            mtu,
            mac,
            rx: RxPool {
                by_token: alloc::vec![None; rxq.size().into()],
                recycle: (0..rx.len()).rev().collect(),
                bufs: rx,
                unkicked: 0,
            },
            tx: TxPool {
                free_small: (0..small.len()).rev().collect(),
                free_large: (0..large.len()).rev().collect(),
                small,
                large,
                by_token: alloc::vec![None; txq.size().into()],
                in_flight: 0,
                unkicked: 0,
                unkicked_bytes: 0,
            },
            rings: Rings {
                transport,
                rxq,
                txq,
                features,
            },
            stats: Stats::default(),
            activity: false,
            ip: None,
            neighbours: Neighbours::default(),
            held: None,
            arp: [0; ARP_FRAME],
            syn_gate: None,
            syn_queue: VecDeque::new(),
            replay: Vec::new(),
        };
        dev.post_recycled().map_err(Error::Post)?;
        dev.flush();
        Ok(dev)
    }

    /// The device's MAC address.
    pub fn mac(&self) -> EthernetAddress {
        EthernetAddress(self.mac)
    }

    /// The negotiated features (`F_*` bits).
    pub fn features(&self) -> u64 {
        self.rings.features
    }

    /// The IP MTU in use.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Whether the host computes our TCP checksums.
    pub fn checksum_offload(&self) -> bool {
        self.rings.features & F_CSUM != 0
    }

    /// Whether large TCP frames go to the host for segmentation: the
    /// device offers it and large buffers were allocated.
    pub fn segmentation_offload(&self) -> bool {
        self.rings.features & (F_CSUM | F_HOST_TSO4) == F_CSUM | F_HOST_TSO4
            && !self.tx.large.is_empty()
    }

    /// Buffers allocated: (receive, small transmit, large transmit).
    pub fn buffers(&self) -> (usize, usize, usize) {
        (self.rx.bufs.len(), self.tx.small.len(), self.tx.large.len())
    }

    /// Frame counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Asks the device for used-buffer interrupts on both queues (`true`)
    /// or for none (`false`, the default: the main loop polls).
    pub fn set_interrupts(&mut self, on: bool) {
        self.rings.rxq.set_dev_notify(on);
        self.rings.txq.set_dev_notify(on);
    }

    /// Acknowledges an INTx interrupt (reads the ISR, which lowers it).
    pub fn ack_interrupt(&mut self) -> InterruptStatus {
        self.rings.transport.ack_interrupt()
    }

    /// From now on, of the TCP connection requests (SYNs) to `port`, only
    /// the next `free` reach the stack, one for each listening socket
    /// (smoltcp resets a SYN no socket listens for). The rest wait in a
    /// queue, as in a kernel's listen backlog, and reach the stack in
    /// order as sockets become free (a client's retransmitted SYN does not
    /// queue twice); beyond [`SYN_BACKLOG`], or when no memory is left for
    /// the copy, they are dropped, so their clients retry. `None`: no gate.
    pub fn gate_syns(&mut self, gate: Option<(u16, usize)>) {
        self.syn_gate = gate;
    }

    /// Whether frames moved since the last call.
    pub fn take_activity(&mut self) -> bool {
        core::mem::take(&mut self.activity)
    }

    /// Posts the receive buffers smoltcp has finished with.
    fn post_recycled(&mut self) -> Result<(), virtio_drivers::Error> {
        while let Some(i) = self.rx.recycle.pop() {
            let buf = &mut self.rx.bufs[i];
            // SAFETY: buffer `i` is owned by the pool and not lent to
            // smoltcp (it is fresh or recycled); nothing touches it until
            // the device returns its token and `receive` pops it with the
            // same buffer. Its heap allocation never moves.
            let token = match unsafe { self.rings.rxq.add(&[], &mut [&mut buf[..]]) } {
                Ok(t) => t,
                Err(e) => {
                    // Cannot happen (one slot per buffer); keep it for later.
                    self.rx.recycle.push(i);
                    return Err(e);
                }
            };
            if let Some(slot) = self.rx.by_token.get_mut(usize::from(token)) {
                *slot = Some(i);
            }
            self.rx.unkicked += 1;
        }
        Ok(())
    }

    /// Notifies the device of the frames and receive buffers added since
    /// the last notification (if it wants one). The stack calls this once
    /// per poll, so a burst of frames costs one notification.
    pub fn flush(&mut self) {
        self.rings.kick_tx(&mut self.tx, &mut self.stats);
        if self.rx.unkicked > 0 {
            self.rx.unkicked = 0;
            if self.rings.rxq.should_notify() {
                self.rings.transport.notify(RX_QUEUE);
                self.stats.kicks += 1;
            }
        }
    }

    /// Posts the receive buffers smoltcp has finished with, reclaims
    /// transmit buffers the device has sent and notifies the device.
    pub fn maintain(&mut self) {
        let _ = self.post_recycled();
        reclaim_tx(&mut self.rings, &mut self.tx);
        self.flush();
    }

    /// Announces `ip` with a gratuitous ARP (a broadcast request for our
    /// own address), so a host bridge or tap learns our MAC at once.
    pub fn announce(&mut self, ip: Ipv4Address, prefix: u8) {
        self.ip = Some((ip, prefix));
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
        self.flush();
    }
}

/// A token for a frame to send: a small buffer, and a large one with
/// segmentation offload (smoltcp says the frame's length only later).
fn tx_token<'a>(
    rings: &'a mut Rings,
    tx: &'a mut TxPool,
    stats: &'a mut Stats,
) -> Option<TxToken<'a>> {
    reclaim_tx(rings, tx);
    let tso =
        rings.features & (F_CSUM | F_HOST_TSO4) == F_CSUM | F_HOST_TSO4 && !tx.large.is_empty();
    if tx.free_small.is_empty()
        || (tso && tx.free_large.is_empty())
        || rings.txq.available_desc() == 0
    {
        stats.tx_full += 1;
        return None;
    }
    let small = tx.free_small.pop()?;
    let large = if tso { tx.free_large.pop() } else { None };
    Some(TxToken {
        rings,
        pool: tx,
        stats,
        small,
        small_taken: false,
        large,
        meta: PacketMeta::default(),
    })
}

/// Takes back every transmit buffer the device has used.
fn reclaim_tx(rings: &mut Rings, tx: &mut TxPool) {
    while let Some(token) = rings.txq.peek_used() {
        let Some(slot) = tx
            .by_token
            .get_mut(usize::from(token))
            .and_then(Option::take)
        else {
            break;
        };
        let (slot, len) = slot;
        let buf = &tx.buf(slot)[..len];
        // SAFETY: `buf` is the buffer (and length) added for this token;
        // the device is done with it once its token is used.
        let _ = unsafe { rings.txq.pop_used(token, &[buf], &mut []) };
        tx.in_flight = tx.in_flight.saturating_sub(1);
        tx.free(slot);
    }
}

/// A frame's slice of a pool buffer.
fn frame_of(buf: &[u8], start: usize, len: usize) -> &[u8] {
    let end = start.saturating_add(len).min(buf.len());
    &buf[start.min(end)..end]
}

/// The sender of an IPv4 frame sent to `mac` from our subnet: (IPv4, MAC).
fn ipv4_sender(frame: &[u8], mac: [u8; 6], ours: (Ipv4Address, u8)) -> Option<([u8; 4], [u8; 6])> {
    if frame.len() < 34 || frame[0..6] != mac || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let src: [u8; 4] = frame[26..30].try_into().ok()?;
    let sender: [u8; 6] = frame[6..12].try_into().ok()?;
    let (ip, prefix) = ours;
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    let same_subnet = u32::from_be_bytes(src) & mask == u32::from_be_bytes(ip.octets()) & mask;
    let unicast = sender[0] & 1 == 0 && src != [0; 4] && src != ip.octets();
    (same_subnet && unicast).then_some((src, sender))
}

/// An ARP request from `(ip, mac)` for `target`, as if that neighbour had
/// asked for us.
fn synthetic_arp(
    out: &mut [u8; ARP_FRAME],
    ours: EthernetAddress,
    target: Ipv4Address,
    ip: [u8; 4],
    mac: [u8; 6],
) {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(mac),
        source_protocol_addr: Ipv4Address::from(ip),
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(mac),
        dst_addr: ours,
        ethertype: EthernetProtocol::Arp,
    };
    let mut frame = EthernetFrame::new_unchecked(&mut out[..]);
    eth.emit(&mut frame);
    arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
}

/// Fills the `virtio_net_hdr` at the start of `pkt` (header, then an
/// Ethernet frame) for a device that completes TCP checksums (`CSUM`):
/// for an IPv4 TCP frame, `NEEDS_CSUM` with the checksum's place, and the
/// TCP checksum field set to the folded, not inverted, pseudo-header sum
/// (smoltcp left it 0), from which the device sums the segment. With `mss`
/// (smoltcp's `segmentation_offload_size`) and more payload than that,
/// also `gso_type` TCPV4 and `gso_size` `mss`: the host cuts the frame
/// into segments of `mss` bytes, fixing each one's lengths, sequence
/// numbers and checksums. Returns whether the frame is marked for
/// segmentation. Anything else (ARP, a malformed frame) keeps a zero
/// header: smoltcp computed its checksums.
pub fn offload(pkt: &mut [u8], mss: Option<u16>) -> bool {
    let Some((hdr, frame)) = pkt.split_at_mut_checked(HDR_LEN) else {
        return false;
    };
    hdr.fill(0);
    if frame.len() < ETH_LEN + 20 || frame[12..14] != [0x08, 0x00] {
        return false;
    }
    let ip = &frame[ETH_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != 6 || total < ihl + 20 || total > ip.len() {
        return false;
    }
    let tcp_len = total - ihl;
    let thl = usize::from(ip[ihl + 12] >> 4) * 4;
    if thl < 20 || thl > tcp_len {
        return false;
    }
    let mut sum: u32 = 6 + tcp_len as u32;
    for pair in ip[12..20].as_chunks::<2>().0 {
        sum += u32::from(u16::from_be_bytes(*pair));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let start = ETH_LEN + ihl;
    frame[start + 16..start + 18].copy_from_slice(&(sum as u16).to_be_bytes());
    hdr[0] = HDR_F_NEEDS_CSUM;
    hdr[6..8].copy_from_slice(&(start as u16).to_le_bytes());
    hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
    match mss {
        Some(mss) if mss > 0 && tcp_len - thl > usize::from(mss) => {
            hdr[1] = HDR_GSO_TCPV4;
            hdr[2..4].copy_from_slice(&((start + thl) as u16).to_le_bytes());
            hdr[4..6].copy_from_slice(&mss.to_le_bytes());
            true
        }
        _ => false,
    }
}

/// Bytes of frames that go to the device at once, without waiting for
/// the end of the poll: a 64 KiB frame for segmentation, or some 44
/// frames at MTU 1500 (QEMU starts on them while smoltcp writes more).
const KICK_BYTES: usize = 64 * 1024;

/// Whether to notify the device in the middle of a poll, with `frames`
/// of `bytes` bytes added since the last notification on a ring of `size`
/// slots; otherwise [`NetDevice::flush`] does at the end of the poll.
/// Every notification is an exit to QEMU: per frame, a read over slirp
/// cost one per 1.5 KiB.
fn kick_now(frames: usize, bytes: usize, size: u16) -> bool {
    bytes >= KICK_BYTES || frames >= (usize::from(size) / 4).max(1)
}

/// A received frame lent to smoltcp: a pool buffer (posted again once
/// smoltcp is done with it) or the synthetic ARP request.
pub struct RxToken<'a> {
    frame: &'a [u8],
    recycle: Option<(&'a mut Vec<usize>, usize)>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.frame)
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        if let Some((list, index)) = self.recycle.take() {
            list.push(index);
        }
    }
}

/// Room for one frame to send: a small buffer and, with segmentation
/// offload, a large one; the frame goes in the smallest that holds it,
/// the other goes back to its free list.
pub struct TxToken<'a> {
    rings: &'a mut Rings,
    pool: &'a mut TxPool,
    stats: &'a mut Stats,
    small: usize,
    /// Whether the small buffer holds the frame (then it is not freed).
    small_taken: bool,
    large: Option<usize>,
    meta: PacketMeta,
}

impl Drop for TxToken<'_> {
    fn drop(&mut self) {
        if !self.small_taken {
            self.small_taken = true;
            self.pool.free_small.push(self.small);
        }
        if let Some(i) = self.large.take() {
            self.pool.free_large.push(i);
        }
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(mut self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        // The small buffer unless the frame needs the large one; smoltcp
        // never asks for more than the capabilities allow (a longer frame
        // would be truncated).
        let slot = match self.large {
            Some(i) if self.pool.small[self.small].len() < HDR_LEN + len => {
                self.large = None;
                Slot::Large(i)
            }
            _ => {
                self.small_taken = true;
                Slot::Small(self.small)
            }
        };
        let csum = self.rings.features & F_CSUM != 0;
        let mss = self
            .meta
            .segmentation_offload_size
            .map(|n| n.get())
            .filter(|_| matches!(slot, Slot::Large(_)));
        let buf = self.pool.buf(slot);
        let len = len.min(buf.len() - HDR_LEN);
        buf[..HDR_LEN].fill(0);
        let r = f(&mut buf[HDR_LEN..HDR_LEN + len]);
        let gso = csum && offload(&mut buf[..HDR_LEN + len], mss);
        let pkt = &buf[..HDR_LEN + len];
        // SAFETY: the buffer came off a free list, so the device holds
        // none of it; it is not touched again until its token is used and
        // `reclaim_tx` pops it with the same slice. Its heap allocation
        // never moves.
        match unsafe { self.rings.txq.add(&[pkt], &mut []) } {
            Ok(token) => {
                if let Some(entry) = self.pool.by_token.get_mut(usize::from(token)) {
                    *entry = Some((slot, HDR_LEN + len));
                }
                self.stats.tx_frames += 1;
                self.stats.tx_gso_frames += u64::from(gso);
                self.pool.in_flight += 1;
                self.pool.unkicked += 1;
                self.pool.unkicked_bytes += len;
                if kick_now(
                    self.pool.unkicked,
                    self.pool.unkicked_bytes,
                    self.rings.txq.size(),
                ) {
                    self.rings.kick_tx(self.pool, self.stats);
                }
            }
            Err(_) => self.pool.free(slot),
        }
        r
    }

    fn set_meta(&mut self, meta: PacketMeta) {
        self.meta = meta;
    }
}

impl phy::Device for NetDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let _ = self.post_recycled();
        if self.held.is_none()
            && let Some((_, free)) = &mut self.syn_gate
            && *free > 0
            && !self.syn_queue.is_empty()
        {
            let tx = tx_token(&mut self.rings, &mut self.tx, &mut self.stats)?;
            *free -= 1;
            self.replay = self.syn_queue.pop_front().unwrap_or_default();
            return Some((
                RxToken {
                    frame: &self.replay,
                    recycle: None,
                },
                tx,
            ));
        }
        let (index, start, len) = match self.held.take() {
            Some(h) => h,
            // Each SYN queued: on to the next frame.
            None => loop {
                let token = self.rings.rxq.peek_used()?;
                let index = self
                    .rx
                    .by_token
                    .get_mut(usize::from(token))
                    .and_then(Option::take)?;
                // SAFETY: `index` is the buffer `post_recycled` added for
                // this token, which the device has now used.
                let done = unsafe {
                    self.rings
                        .rxq
                        .pop_used(token, &[], &mut [&mut self.rx.bufs[index][..]])
                };
                self.activity = true;
                let written = done.map(|n| n as usize).unwrap_or(0);
                if written <= HDR_LEN {
                    // A runt: post the buffer again, report nothing.
                    self.rx.recycle.push(index);
                    return None;
                }
                let (start, len) = (HDR_LEN, written - HDR_LEN);
                self.stats.rx_frames += 1;
                self.stats.rx_gso_frames += u64::from(self.rx.bufs[index][1] != 0);
                if let Some((port, free)) = &mut self.syn_gate
                    && tcp_syn_port(frame_of(&self.rx.bufs[index], start, len)) == Some(*port)
                {
                    if *free == 0 || !self.syn_queue.is_empty() {
                        // Behind the SYNs already waiting: into the
                        // backlog (once per client), or, with the backlog
                        // full, dropped without a reset as a kernel does:
                        // the client sends its SYN again a little later.
                        let frame = frame_of(&self.rx.bufs[index], start, len);
                        let from = tcp_source(frame);
                        if self.syn_queue.iter().any(|q| tcp_source(q) == from) {
                            // A retransmission of a SYN already waiting.
                        } else if self.syn_queue.len() < SYN_BACKLOG
                            && let Some(copy) = fallible_copy(frame)
                            && self.syn_queue.try_reserve(1).is_ok()
                        {
                            self.syn_queue.push_back(copy);
                            self.stats.syn_queued += 1;
                        } else {
                            self.stats.syn_dropped += 1;
                        }
                        self.rx.recycle.push(index);
                        continue;
                    }
                    *free -= 1;
                }
                // A neighbour smoltcp has not heard from lately: its
                // synthetic ARP request goes first, the frame next time.
                let frame = frame_of(&self.rx.bufs[index], start, len);
                if let Some(ours) = self.ip
                    && let Some((ip, mac)) = ipv4_sender(frame, self.mac, ours)
                    && self.neighbours.introduce(ip, mac, timestamp.total_millis())
                {
                    self.held = Some((index, start, len));
                    let me = self.mac();
                    synthetic_arp(&mut self.arp, me, ours.0, ip, mac);
                    // A reply may be needed: hand out a transmit token too.
                    let tx = tx_token(&mut self.rings, &mut self.tx, &mut self.stats)?;
                    return Some((
                        RxToken {
                            frame: &self.arp,
                            recycle: None,
                        },
                        tx,
                    ));
                }
                break (index, start, len);
            },
        };
        // A reply may be needed: deliver a frame only with a buffer free.
        let Some(tx) = tx_token(&mut self.rings, &mut self.tx, &mut self.stats) else {
            self.held = Some((index, start, len));
            return None;
        };
        Some((
            RxToken {
                frame: frame_of(&self.rx.bufs[index], start, len),
                recycle: Some((&mut self.rx.recycle, index)),
            },
            tx,
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        let tx = tx_token(&mut self.rings, &mut self.tx, &mut self.stats)?;
        self.activity = true;
        Some(tx)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = ETH_LEN + usize::from(self.mtu);
        caps.max_burst_size = None;
        // Frames come from the host's stack or QEMU's slirp over a virtual
        // link that cannot corrupt them: verify nothing. Compute on send,
        // except TCP when the host completes it (`CSUM`).
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = if self.checksum_offload() {
            Checksum::None
        } else {
            Checksum::Tx
        };
        checksum.udp = Checksum::Tx;
        checksum.icmpv4 = Checksum::Tx;
        caps.checksum = checksum;
        if self.segmentation_offload() {
            caps.segmentation.tcpv4 = NonZeroUsize::new(TSO_FRAME);
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const HOST: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

    fn ipv4_frame(dst: [u8; 6], src_mac: [u8; 6], src_ip: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[0..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&src_mac);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[26..30].copy_from_slice(&src_ip);
        f[30..34].copy_from_slice(&[10, 0, 3, 15]);
        f
    }

    #[test]
    fn senders_on_our_subnet_are_recognised() {
        let ours = (Ipv4Address::new(10, 0, 3, 15), 24);
        let f = ipv4_frame(OURS, HOST, [10, 0, 3, 1]);
        assert_eq!(ipv4_sender(&f, OURS, ours), Some(([10, 0, 3, 1], HOST)));
        // Off the subnet (reached through a gateway), to another MAC, not
        // IPv4, from a multicast MAC, or from ourselves: nothing learnt.
        assert_eq!(
            ipv4_sender(&ipv4_frame(OURS, HOST, [10, 0, 4, 1]), OURS, ours),
            None
        );
        assert_eq!(
            ipv4_sender(&ipv4_frame(HOST, HOST, [10, 0, 3, 1]), OURS, ours),
            None
        );
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(ipv4_sender(&arp, OURS, ours), None);
        let mut mc = HOST;
        mc[0] |= 1;
        assert_eq!(
            ipv4_sender(&ipv4_frame(OURS, mc, [10, 0, 3, 1]), OURS, ours),
            None
        );
        assert_eq!(
            ipv4_sender(&ipv4_frame(OURS, HOST, [10, 0, 3, 15]), OURS, ours),
            None
        );
        assert_eq!(ipv4_sender(&f[..20], OURS, ours), None);
        // A /0 and a /32 prefix do not overflow the mask.
        assert!(ipv4_sender(&f, OURS, (ours.0, 0)).is_some());
        assert!(ipv4_sender(&f, OURS, (ours.0, 32)).is_none());
    }

    #[test]
    fn a_tcp_segment_names_its_source_address_and_port() {
        let mut f = ipv4_frame(OURS, HOST, [10, 0, 3, 1]);
        f[23] = 6; // TCP
        f[34..36].copy_from_slice(&40000u16.to_be_bytes());
        assert_eq!(tcp_source(&f), Some([10, 0, 3, 1, 0x9c, 0x40]));
        assert_eq!(tcp_source(&f[..35]), None);
    }

    #[test]
    fn tcp_syns_are_told_apart_by_their_port() {
        let mut f = ipv4_frame(OURS, HOST, [10, 0, 3, 1]);
        f[23] = 6; // TCP
        f[36..38].copy_from_slice(&10809u16.to_be_bytes());
        f[47] = 0x02; // SYN
        assert_eq!(tcp_syn_port(&f), Some(10809));
        // SYN+ACK, a plain ACK, UDP, IPv6, a truncated frame: not a SYN.
        for (at, v) in [(47, 0x12), (47, 0x10), (23, 17)] {
            let mut g = f.clone();
            g[at] = v;
            assert_eq!(tcp_syn_port(&g), None, "{at} {v:#x}");
        }
        let mut v6 = f.clone();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(tcp_syn_port(&v6), None);
        assert_eq!(tcp_syn_port(&f[..40]), None);
        // IP options move the TCP header.
        let mut opts = f.clone();
        opts[14] = 0x46;
        opts.splice(34..34, [1u8, 1, 1, 1]);
        assert_eq!(tcp_syn_port(&opts), Some(10809));
    }

    #[test]
    fn neighbours_are_introduced_once_per_refresh_period() {
        let mut n = Neighbours::default();
        assert!(n.introduce([10, 0, 3, 1], HOST, 0));
        assert!(!n.introduce([10, 0, 3, 1], HOST, 1_000));
        assert!(n.introduce([10, 0, 3, 1], HOST, NEIGHBOUR_REFRESH_MS + 1));
        // A new MAC for the same address is introduced at once.
        assert!(n.introduce([10, 0, 3, 1], OURS, NEIGHBOUR_REFRESH_MS + 2));
        for i in 0..100u8 {
            n.introduce([10, 0, 3, i], HOST, 5);
        }
        assert!(n.0.len() <= NEIGHBOURS);
    }

    #[test]
    fn the_synthetic_arp_request_parses_as_one_from_the_neighbour() {
        let mut out = [0u8; ARP_FRAME];
        let target = Ipv4Address::new(10, 0, 3, 15);
        synthetic_arp(&mut out, EthernetAddress(OURS), target, [10, 0, 3, 1], HOST);
        let frame = EthernetFrame::new_checked(&out[..]).unwrap();
        assert_eq!(frame.src_addr(), EthernetAddress(HOST));
        assert_eq!(frame.dst_addr(), EthernetAddress(OURS));
        assert_eq!(frame.ethertype(), EthernetProtocol::Arp);
        let arp = ArpRepr::parse(&ArpPacket::new_checked(frame.payload()).unwrap()).unwrap();
        assert_eq!(
            arp,
            ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Request,
                source_hardware_addr: EthernetAddress(HOST),
                source_protocol_addr: Ipv4Address::new(10, 0, 3, 1),
                target_hardware_addr: EthernetAddress([0; 6]),
                target_protocol_addr: target,
            }
        );
    }

    /// One's-complement sum of `data` (big-endian 16-bit words) from `sum`.
    fn ones_sum(mut sum: u32, data: &[u8]) -> u32 {
        for c in data.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum
    }

    /// Header and an Ethernet/IPv4/TCP frame with `opts` bytes of IP
    /// options and `payload` bytes, its TCP checksum left 0 (as smoltcp
    /// leaves it with `CSUM`).
    fn tcp_packet(opts: usize, payload: usize) -> Vec<u8> {
        let ihl = 20 + opts;
        let total = ihl + 20 + payload;
        let mut p = vec![0u8; HDR_LEN + ETH_LEN + total];
        let f = &mut p[HDR_LEN..];
        f[0..6].copy_from_slice(&HOST);
        f[6..12].copy_from_slice(&OURS);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut f[ETH_LEN..];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 0, 3, 15]);
        ip[16..20].copy_from_slice(&[10, 0, 3, 1]);
        let tcp = &mut ip[ihl..];
        tcp[0..2].copy_from_slice(&10809u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x18;
        for (i, b) in tcp[20..].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        p
    }

    /// What the device does with `NEEDS_CSUM`: sums from `csum_start`,
    /// starting from the field's value, and stores the complement.
    fn device_completes(p: &mut [u8]) {
        let start = usize::from(u16::from_le_bytes([p[6], p[7]]));
        let offset = usize::from(u16::from_le_bytes([p[8], p[9]]));
        let f = &mut p[HDR_LEN..];
        let sum = ones_sum(0, &f[start..]);
        f[start + offset..start + offset + 2].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    }

    /// The TCP checksum as a receiver checks it: 0xffff over the pseudo
    /// header and the segment means valid.
    fn tcp_checksum_valid(p: &[u8]) -> bool {
        let ip = &p[HDR_LEN + ETH_LEN..];
        let ihl = usize::from(ip[0] & 15) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let mut pseudo = [0u8; 12];
        pseudo[0..8].copy_from_slice(&ip[12..20]);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&((total - ihl) as u16).to_be_bytes());
        ones_sum(ones_sum(0, &pseudo), &ip[ihl..total]) == 0xffff
    }

    #[test]
    fn offload_leaves_the_tcp_checksum_to_the_device_and_it_comes_out_right() {
        for (opts, payload) in [(0, 0), (0, 1), (0, 1448), (4, 333), (40, 7)] {
            let mut p = tcp_packet(opts, payload);
            assert!(!offload(&mut p, None), "no mss: not GSO");
            assert_eq!(p[0], HDR_F_NEEDS_CSUM);
            assert_eq!(p[1], 0, "gso_type NONE");
            assert_eq!(
                u16::from_le_bytes([p[6], p[7]]) as usize,
                ETH_LEN + 20 + opts,
                "csum_start"
            );
            assert_eq!(u16::from_le_bytes([p[8], p[9]]), 16, "csum_offset");
            assert!(
                !tcp_checksum_valid(&p),
                "the field holds only the pseudo sum"
            );
            device_completes(&mut p);
            assert!(tcp_checksum_valid(&p), "opts {opts} payload {payload}");
        }
    }

    #[test]
    fn offload_marks_frames_longer_than_the_mss_for_segmentation() {
        let mut p = tcp_packet(0, 65535 - 40);
        assert!(offload(&mut p, Some(1448)));
        assert_eq!(p[1], HDR_GSO_TCPV4);
        assert_eq!(u16::from_le_bytes([p[2], p[3]]), 14 + 20 + 20, "hdr_len");
        assert_eq!(u16::from_le_bytes([p[4], p[5]]), 1448, "gso_size");
        // The pseudo sum counts the whole frame's TCP length (Linux's
        // tcp_gso_segment adjusts it per segment).
        device_completes(&mut p);
        assert!(tcp_checksum_valid(&p));
        // Exactly one MSS of payload, or no MSS given: not GSO.
        let mut one = tcp_packet(0, 1448);
        assert!(!offload(&mut one, Some(1448)));
        assert_eq!(one[1], 0);
    }

    #[test]
    fn offload_leaves_other_frames_alone() {
        // ARP, UDP, IPv6, truncated or inconsistent IPv4: a zero header
        // (smoltcp computed their checksums), the frame untouched.
        let base = tcp_packet(0, 100);
        let mut cases = Vec::new();
        let mut arp = base.clone();
        arp[HDR_LEN + 12..HDR_LEN + 14].copy_from_slice(&[0x08, 0x06]);
        cases.push(arp);
        let mut udp = base.clone();
        udp[HDR_LEN + ETH_LEN + 9] = 17;
        cases.push(udp);
        let mut v6 = base.clone();
        v6[HDR_LEN + ETH_LEN] = 0x65;
        cases.push(v6);
        let mut long = base.clone();
        long[HDR_LEN + ETH_LEN + 2..HDR_LEN + ETH_LEN + 4].copy_from_slice(&9000u16.to_be_bytes());
        cases.push(long);
        let mut bad_thl = base.clone();
        bad_thl[HDR_LEN + ETH_LEN + 20 + 12] = 0x20;
        cases.push(bad_thl);
        cases.push(base[..HDR_LEN + 30].to_vec());
        cases.push(base[..5].to_vec());
        for (i, mut c) in cases.into_iter().enumerate() {
            let before = c.clone();
            if c.len() >= HDR_LEN {
                c[..HDR_LEN].fill(0xaa);
            }
            assert!(!offload(&mut c, Some(100)), "case {i}");
            if c.len() >= HDR_LEN {
                assert_eq!(&c[..HDR_LEN], &[0u8; HDR_LEN], "case {i}");
                assert_eq!(&c[HDR_LEN..], &before[HDR_LEN..], "case {i}");
            }
        }
    }

    #[test]
    fn mtu_follows_the_device_within_bounds() {
        assert_eq!(pick_mtu(0, 9000), DEFAULT_MTU, "MTU not negotiated");
        assert_eq!(pick_mtu(F_MTU, 9000), 9000);
        assert_eq!(pick_mtu(F_MTU, 1400), 1400);
        assert_eq!(pick_mtu(F_MTU, 65535), MAX_MTU);
        assert_eq!(pick_mtu(F_MTU, 0), DEFAULT_MTU);
    }

    #[test]
    fn feature_names_list_what_was_negotiated() {
        let s = std::format!("{}", FeatureNames(F_CSUM | F_HOST_TSO4 | F_VERSION_1));
        assert_eq!(s, "CSUM HOST_TSO4 VERSION_1");
        assert_eq!(std::format!("{}", FeatureNames(0)), "none");
    }

    #[test]
    fn kicks_wait_for_64k_or_a_quarter_of_the_ring() {
        assert!(
            !kick_now(1, 1514, 256),
            "one small frame waits for the poll's end"
        );
        assert!(!kick_now(43, 43 * 1514, 256));
        assert!(kick_now(44, 44 * 1514, 256), "64 KiB of small frames");
        assert!(kick_now(1, TSO_FRAME, 256), "one frame for segmentation");
        assert!(kick_now(64, 64 * 60, 256), "a quarter of the ring of ACKs");
        assert!(kick_now(1, 60, 2));
    }

    #[test]
    fn tso_features_are_dropped_without_their_checksum_features() {
        let all = WANTED | F_GUEST_TSO4;
        assert_eq!(without_unmet(all), all);
        assert_eq!(without_unmet(all & !F_CSUM), all & !F_CSUM & !F_HOST_TSO4);
        assert_eq!(
            without_unmet(all & !F_GUEST_CSUM),
            all & !F_GUEST_CSUM & !F_GUEST_TSO4
        );
        assert_eq!(without_unmet(F_MAC | F_VERSION_1), F_MAC | F_VERSION_1);
    }
}
