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
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Ipv4Address,
};
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{PhysAddr, Result as VirtioResult};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The TCP/IP stack, for the kernel (one version for driver and stack).
pub use smoltcp;

use crate::virtio::hal::IdentityHal;

/// Ring slots per queue (QEMU's default `rx_queue_size`/`tx_queue_size`).
pub const QUEUE_SIZE: usize = 256;
/// Bytes per pool buffer: the virtio-net header and a full Ethernet frame.
pub const BUFFER_LEN: usize = 2048;
/// The largest Ethernet frame (without FCS) at MTU 1500.
pub const MAX_FRAME: usize = 1514;

type Raw = VirtIONetRaw<IdentityHal, NoEventIdx, QUEUE_SIZE>;

/// `VIRTIO_RING_F_EVENT_IDX`.
const F_EVENT_IDX: u64 = 1 << 29;

/// The PCI transport with `VIRTIO_RING_F_EVENT_IDX` hidden from the
/// driver, which would otherwise negotiate it. With it, QEMU's virtio-net
/// re-arms the transmit notification at every pass (it moves
/// `avail_event` up to the ring), so nearly every burst of frames costs a
/// notification, i.e. an exit that takes QEMU's big lock while its main
/// thread is busy moving frames. Without it, QEMU raises
/// `VRING_USED_F_NO_NOTIFY` while it drains the ring and the driver stays
/// quiet.
pub struct NoEventIdx(PciTransport);

impl Transport for NoEventIdx {
    fn device_type(&self) -> DeviceType {
        self.0.device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.0.read_device_features() & !F_EVENT_IDX
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        self.0.write_driver_features(driver_features & !F_EVENT_IDX)
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.0.max_queue_size(queue)
    }
    fn notify(&mut self, queue: u16) {
        self.0.notify(queue)
    }
    fn get_status(&self) -> DeviceStatus {
        self.0.get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.0.set_status(status)
    }
    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.0.set_guest_page_size(guest_page_size)
    }
    fn requires_legacy_layout(&self) -> bool {
        self.0.requires_legacy_layout()
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.0
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }
    fn queue_unset(&mut self, queue: u16) {
        self.0.queue_unset(queue)
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.0.queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.0.ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.0.read_config_generation()
    }
    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> VirtioResult<T> {
        self.0.read_config_space(offset)
    }
    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> VirtioResult<()> {
        self.0.write_config_space(offset, value)
    }
}

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
}

/// The transmit side: buffers, free list, token → buffer.
struct TxPool {
    bufs: Vec<Box<[u8]>>,
    free: Vec<usize>,
    by_token: Vec<Option<usize>>,
}

/// A virtio-net device as a smoltcp device.
pub struct NetDevice {
    /// On the heap: with its two queues' shadow descriptor and indirect
    /// list tables inline it is 16 KiB, and an unoptimised build copies a
    /// value that size several times per frame at every level that moves
    /// it (the device, the stack, the network) — past the 512 KiB boot
    /// stack of a debug build. See [`boxed_raw`].
    raw: Box<Raw>,
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

/// The virtio-drivers device, moved to the heap as soon as it is made
/// (its `new` returns it by value), in a frame of its own so its copies
/// are not kept in the frames of every caller.
#[inline(never)]
fn boxed_raw(transport: PciTransport) -> Result<Box<Raw>, Error> {
    Ok(Box::new(
        Raw::new(NoEventIdx(transport)).map_err(Error::Setup)?,
    ))
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
        let mut raw = boxed_raw(transport)?;
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
            ip: None,
            neighbours: Neighbours::default(),
            held: None,
            arp: [0; ARP_FRAME],
            syn_gate: None,
            syn_queue: VecDeque::new(),
            replay: Vec::new(),
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

    /// From now on, of the TCP connection requests (SYNs) to `port`, only
    /// the next `free` reach the stack, one for each listening socket
    /// (smoltcp resets a SYN no socket listens for). The rest wait in a
    /// queue, as in a kernel's listen backlog, and reach the stack in
    /// order as sockets become free (a client's retransmitted SYN does not
    /// queue twice); beyond [`SYN_BACKLOG`] they are dropped, so their
    /// clients retry. `None`: no gate.
    pub fn gate_syns(&mut self, gate: Option<(u16, usize)>) {
        self.syn_gate = gate;
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

    fn receive(&mut self, timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        self.maintain();
        // A reply may be needed: deliver a frame only with a buffer free.
        if self.tx.free.is_empty() {
            self.stats.tx_full += 1;
            return None;
        }
        if self.held.is_none()
            && let Some((_, free)) = &mut self.syn_gate
            && *free > 0
            && let Some(syn) = self.syn_queue.pop_front()
        {
            *free -= 1;
            self.replay = syn;
            return Some((
                RxToken {
                    frame: &self.replay,
                    recycle: None,
                },
                TxToken {
                    raw: &mut self.raw,
                    pool: &mut self.tx,
                    stats: &mut self.stats,
                },
            ));
        }
        let (index, start, len) = match self.held.take() {
            Some(h) => h,
            // Each SYN queued: on to the next frame.
            None => loop {
                let token = self.raw.poll_receive()?;
                let index = self
                    .rx
                    .by_token
                    .get_mut(usize::from(token))
                    .and_then(Option::take)?;
                // SAFETY: `index` is the buffer `receive_begin` was given
                // for this token, which the device has now used.
                let done = unsafe { self.raw.receive_complete(token, &mut self.rx.bufs[index]) };
                self.activity = true;
                let Ok((start, len)) = done else {
                    // A runt: post the buffer again, report nothing.
                    self.rx.recycle.push(index);
                    return None;
                };
                self.stats.rx_frames += 1;
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
                        } else if self.syn_queue.len() < SYN_BACKLOG {
                            self.syn_queue.push_back(frame.to_vec());
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
                    && let Some((ip, mac)) = ipv4_sender(frame, self.raw.mac_address(), ours)
                    && self.neighbours.introduce(ip, mac, timestamp.total_millis())
                {
                    self.held = Some((index, start, len));
                    let me = self.mac();
                    synthetic_arp(&mut self.arp, me, ours.0, ip, mac);
                    return Some((
                        RxToken {
                            frame: &self.arp,
                            recycle: None,
                        },
                        TxToken {
                            raw: &mut self.raw,
                            pool: &mut self.tx,
                            stats: &mut self.stats,
                        },
                    ));
                }
                break (index, start, len);
            },
        };
        Some((
            RxToken {
                frame: frame_of(&self.rx.bufs[index], start, len),
                recycle: Some((&mut self.rx.recycle, index)),
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
}
