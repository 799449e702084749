//! The NBD server's listening side (QEMU: `NBDServerData` in
//! `blockdev-nbd.c`): a few listening sockets on the address of
//! `nbd-server-start`, and `max-connections`.
//!
//! smoltcp has no accept queue: a listening socket *becomes* the
//! connection. The server keeps [`BACKLOG`] sockets listening and replaces
//! each one a client takes. At `max-connections`, established sockets wait
//! in their listening slot, unserved, until a connection ends (QEMU stops
//! accepting and leaves clients in the kernel's backlog).

use alloc::vec::Vec;
use drivers::net::smoltcp::iface::{SocketHandle, SocketSet};
use drivers::net::smoltcp::socket::tcp;
use drivers::net::smoltcp::wire::{IpAddress, IpListenEndpoint};

use super::stack::nbd_socket;

/// Sockets kept listening: how many clients may connect at the same
/// instant (the listen backlog). A SYN that would find none is dropped
/// before the stack sees it, so that client tries again shortly
/// (`NetDevice::gate_syns`).
pub const BACKLOG: usize = 8;

/// A running NBD server.
pub struct Server {
    pub host: Option<IpAddress>,
    pub port: u16,
    /// 0: unlimited.
    pub max_connections: u32,
    listeners: Vec<SocketHandle>,
}

impl Server {
    pub fn new(host: Option<IpAddress>, port: u16, max_connections: u32) -> Server {
        Server {
            host,
            port,
            max_connections,
            listeners: Vec::new(),
        }
    }

    fn endpoint(&self) -> IpListenEndpoint {
        IpListenEndpoint {
            addr: self.host,
            port: self.port,
        }
    }

    /// Keeps up to [`BACKLOG`] sockets listening; returns the sockets
    /// clients have connected to, as many as `room` allows.
    pub fn accept(&mut self, sockets: &mut SocketSet<'static>, room: usize) -> Vec<SocketHandle> {
        let mut taken = Vec::new();
        let mut i = 0;
        while i < self.listeners.len() {
            let h = self.listeners[i];
            let state = sockets.get::<tcp::Socket>(h).state();
            match state {
                tcp::State::Listen | tcp::State::SynReceived => i += 1,
                tcp::State::Closed => {
                    sockets.remove(h);
                    self.listeners.swap_remove(i);
                }
                _ if taken.len() < room => {
                    taken.push(h);
                    self.listeners.swap_remove(i);
                }
                _ => i += 1,
            }
        }
        // One new listener per call: each zeroes 2 MiB of buffers, which
        // would otherwise delay `nbd-server-start` (and boot) by tens of
        // milliseconds under TCG; the backlog fills over the next polls.
        if self.listeners.len() < BACKLOG {
            let mut s = nbd_socket();
            if s.listen(self.endpoint()).is_ok() {
                self.listeners.push(sockets.add(s));
            }
        }
        taken
    }

    /// Sockets still waiting for a client.
    pub fn free(&self, sockets: &SocketSet<'static>) -> usize {
        self.listeners
            .iter()
            .filter(|&&h| sockets.get::<tcp::Socket>(h).state() == tcp::State::Listen)
            .count()
    }

    /// Stops listening (clients waiting in a slot are dropped).
    pub fn close(&mut self, sockets: &mut SocketSet<'static>) {
        for h in self.listeners.drain(..) {
            sockets.get_mut::<tcp::Socket>(h).abort();
            sockets.remove(h);
        }
    }
}
