//! The TCP/IP stack: smoltcp's interface over the virtio-net device, and
//! the TCP sockets the NBD server uses.
//!
//! Sockets get buffers as large as the heap allows
//! ([`super::budget::Budgets::socket_buffer`]; window scaling turns on by
//! itself above 64 KiB), Nagle and delayed ACK off (a request/response protocol must not
//! wait for either), Reno congestion control, and keep-alive so a client
//! that vanished without a word is noticed.

use alloc::vec::Vec;
use drivers::net::NetDevice;
use drivers::net::smoltcp::iface::{Config, Interface, PollResult, SocketSet};
use drivers::net::smoltcp::socket::tcp;
use drivers::net::smoltcp::time::{Duration, Instant};
use drivers::net::smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use super::config::IpConfig;

/// The interface, its device and the sockets.
pub struct Stack {
    pub device: NetDevice,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
}

pub fn now() -> Instant {
    Instant::from_micros((crate::clock::monotonic_ns() / 1000) as i64)
}

impl Stack {
    /// Brings the interface up with a static address and announces it.
    pub fn new(mut device: NetDevice, ip: IpConfig) -> Stack {
        let mut config = Config::new(HardwareAddress::Ethernet(device.mac()));
        config.random_seed = crate::clock::monotonic_ns() ^ 0x9e37_79b9_7f4a_7c15;
        let mut iface = Interface::new(config, &mut device, now());
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(ip.addr), ip.prefix));
        });
        if let Some(gw) = ip.gateway {
            let _ = iface.routes_mut().add_default_ipv4_route(gw);
        }
        device.announce(ip.addr, ip.prefix);
        Stack {
            device,
            iface,
            sockets: SocketSet::new(Vec::new()),
        }
    }

    /// When TCP next needs a poll without new frames (retransmission,
    /// keep-alive, ARP retry), in monotonic nanoseconds.
    pub fn poll_at(&mut self) -> Option<u64> {
        let at = self.iface.poll_at(now(), &self.sockets)?;
        Some(at.total_micros().max(0) as u64 * 1000)
    }

    /// Moves frames and runs TCP; returns whether anything happened.
    pub fn poll(&mut self) -> bool {
        let mut device = super::traced::Traced(&mut self.device);
        let r = self.iface.poll(now(), &mut device, &mut self.sockets);
        self.device.maintain();
        self.device.take_activity() | (r == PollResult::SocketStateChanged)
    }
}

/// A zeroed buffer of `len` bytes, or `None` if the heap cannot give one.
fn buffer(len: usize) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).ok()?;
    v.resize(len, 0);
    Some(v)
}

/// A TCP socket set up for NBD, with receive (a client's writes land
/// there) and transmit (read replies wait there) buffers of `len` bytes
/// each; `None` if the heap cannot hold them.
pub fn nbd_socket(len: usize) -> Option<tcp::Socket<'static>> {
    let rx = tcp::SocketBuffer::new(buffer(len)?);
    let tx = tcp::SocketBuffer::new(buffer(len)?);
    let mut s = tcp::Socket::new(rx, tx);
    s.set_nagle_enabled(false);
    s.set_ack_delay(None);
    s.set_congestion_control(tcp::CongestionControl::Reno);
    s.set_keep_alive(Some(Duration::from_secs(10)));
    s.set_timeout(Some(Duration::from_secs(60)));
    Some(s)
}
