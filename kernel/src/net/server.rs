//! The NBD server's listening side (QEMU: `NBDServerData` in
//! `blockdev-nbd.c`): a few listening sockets on the address of
//! `nbd-server-start`, and `max-connections`.
//!
//! smoltcp has no accept queue: a listening socket *becomes* the
//! connection. The server keeps `listeners` sockets listening (from the
//! heap's budgets) and replaces
//! each one a client takes. At `max-connections`, established sockets wait
//! in their listening slot, unserved, until a connection ends (QEMU stops
//! accepting and leaves clients in the kernel's backlog).

use alloc::vec::Vec;
use drivers::net::smoltcp::iface::{SocketHandle, SocketSet};
use drivers::net::smoltcp::socket::tcp;
use drivers::net::smoltcp::wire::{IpAddress, IpListenEndpoint};

use super::budget::Budgets;
use super::stack::nbd_socket;

/// A running NBD server.
pub struct Server {
    pub host: Option<IpAddress>,
    pub port: u16,
    /// 0: unlimited.
    pub max_connections: u32,
    /// How long a client may take over the handshake
    /// (`handshake-max-seconds`); `None`: no limit.
    pub handshake_ns: Option<u64>,
    /// `tls-creds`: clients must start TLS.
    pub tls: Option<nbdtls::Credentials>,
    listeners: Vec<SocketHandle>,
    /// Sockets kept listening: how many clients may connect at the same
    /// instant (the listen backlog). A SYN that would find none is dropped
    /// before the stack sees it, so that client tries again shortly
    /// (`NetDevice::gate_syns`).
    backlog: usize,
    /// Each socket's RX and TX buffer size.
    socket_buffer: usize,
}

impl Server {
    pub fn new(
        host: Option<IpAddress>,
        port: u16,
        max_connections: u32,
        handshake_max_seconds: u32,
        tls: Option<nbdtls::Credentials>,
        budgets: &Budgets,
    ) -> Server {
        Server {
            host,
            port,
            max_connections,
            handshake_ns: match handshake_max_seconds {
                0 => None,
                s => Some(u64::from(s) * 1_000_000_000),
            },
            tls,
            listeners: Vec::new(),
            backlog: budgets.listeners,
            socket_buffer: budgets.socket_buffer,
        }
    }

    fn endpoint(&self) -> IpListenEndpoint {
        IpListenEndpoint {
            addr: self.host,
            port: self.port,
        }
    }

    /// Keeps up to `backlog` sockets listening; returns the sockets
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
        // One new listener per call: each zeroes up to 2 MiB of buffers,
        // which would otherwise delay `nbd-server-start` (and boot) by tens
        // of milliseconds under TCG; the backlog fills over the next polls.
        // Without the heap for its buffers, no new listener: clients wait
        // (their SYNs are dropped) until a connection ends.
        if self.listeners.len() < self.backlog
            && let Some(mut s) = nbd_socket(self.socket_buffer)
            && s.listen(self.endpoint()).is_ok()
        {
            self.listeners.push(sockets.add(s));
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
