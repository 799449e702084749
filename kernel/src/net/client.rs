//! The NBD client side of the network: one smoltcp TCP client socket per
//! `driver=nbd` node ([`block::nbd::client_node`]). Each poll connects new
//! links, moves the engine's bytes both ways and reports the socket's fate
//! to the link (connected, refused, closed by the server). A link whose
//! node closed stays here until its last bytes (`NBD_CMD_DISC`) went out;
//! then the socket is closed and dropped.

use alloc::format;
use alloc::rc::Rc;
use alloc::vec::Vec;
use block::nbd::client_node::{Links, NbdLink, Socket, TcpPhase, TcpSocket};
use drivers::net::smoltcp::iface::{SocketHandle, SocketSet};
use drivers::net::smoltcp::socket::tcp;
use drivers::net::smoltcp::wire::{IpAddress, Ipv4Address};

use super::stack::{Stack, nbd_socket};

/// First local port of client sockets (the IANA dynamic range).
const LOCAL_PORTS: u16 = 49152;

/// The client sockets.
#[derive(Default)]
pub struct Clients {
    links: Links,
    sockets: Vec<(Rc<NbdLink>, SocketHandle)>,
    /// Sockets closing after their link let go.
    closing: Vec<SocketHandle>,
    next_port: u16,
    /// Halting: when the requests still on the wire are abandoned
    /// ([`NbdLink::abandon`]), in monotonic nanoseconds.
    abandon_at: Option<u64>,
}

impl Clients {
    /// The list the `nbd` driver class adds its links to.
    pub fn links(&self) -> Links {
        self.links.clone()
    }

    /// No network device: every link waiting to connect fails.
    pub fn no_network(&mut self) -> bool {
        let links: Vec<Rc<NbdLink>> = self.links.borrow_mut().drain(..).collect();
        for l in &links {
            l.closed("Network is unreachable");
        }
        !links.is_empty()
    }

    /// Halting: requests still on the wire at `at` (monotonic
    /// nanoseconds) fail then, and each link's `NBD_CMD_DISC` goes out.
    pub fn abandon_at(&mut self, at: u64) {
        self.abandon_at = Some(at);
    }

    /// Whether any link or socket is still open.
    pub fn busy(&self) -> bool {
        !self.links.borrow().is_empty() || !self.closing.is_empty()
    }

    fn connect(&mut self, stack: &mut Stack, link: &Rc<NbdLink>, buffer: usize) {
        let server = link.server();
        let Ok(ip) = server.host.parse::<Ipv4Address>() else {
            link.closed(&format!(
                "address resolution failed for {server}: Name or service not known"
            ));
            return;
        };
        let Some(mut socket) = nbd_socket(buffer) else {
            link.closed("Cannot allocate memory");
            return;
        };
        let port = LOCAL_PORTS + self.next_port % 16000;
        self.next_port = self.next_port.wrapping_add(1);
        let remote = (IpAddress::Ipv4(ip), server.port);
        if let Err(e) = socket.connect(stack.iface.context(), remote, port) {
            link.closed(&format!("{e}"));
            return;
        }
        let handle = stack.sockets.add(socket);
        self.sockets.push((link.clone(), handle));
    }

    /// One round: connect, move bytes, report closes. Returns whether
    /// anything happened.
    pub fn service(&mut self, stack: &mut Stack, buffer: usize) -> bool {
        let mut busy = false;
        if let Some(at) = self.abandon_at
            && crate::clock::monotonic_ns() >= at
        {
            for l in self.links.borrow().iter() {
                l.abandon();
            }
        }
        // Copied out (connect may call back into the link), but only the
        // links still to connect: nothing is allocated in steady state.
        let connecting: Vec<Rc<NbdLink>> = self
            .links
            .borrow()
            .iter()
            .filter(|l| {
                l.socket() == Socket::Connecting
                    && !self.sockets.iter().any(|(s, _)| Rc::ptr_eq(s, l))
            })
            .cloned()
            .collect();
        for link in &connecting {
            self.connect(stack, link, buffer);
            busy = true;
        }
        for (link, handle) in &self.sockets {
            busy |= link.pump(&mut Tcp(stack.sockets.get_mut::<tcp::Socket>(*handle)));
        }
        // Let go of links that are done: their socket closes gracefully.
        let mut done = Vec::new();
        let finished = |l: &NbdLink| l.should_close() || l.socket() == Socket::Closed;
        self.sockets.retain(|(link, handle)| {
            let finished = finished(link);
            if finished {
                done.push(*handle);
            }
            !finished
        });
        for h in done {
            stack.sockets.get_mut::<tcp::Socket>(h).close();
            self.closing.push(h);
            busy = true;
        }
        self.links.borrow_mut().retain(|l| !finished(l));
        busy |= reap(&mut stack.sockets, &mut self.closing);
        busy
    }
}

/// A smoltcp socket as the link sees it ([`NbdLink::pump`]).
struct Tcp<'a, 'b>(&'a mut tcp::Socket<'b>);

impl TcpSocket for Tcp<'_, '_> {
    fn phase(&self) -> TcpPhase {
        match self.0.state() {
            tcp::State::SynSent | tcp::State::SynReceived | tcp::State::Listen => TcpPhase::Opening,
            tcp::State::Closed => TcpPhase::Refused,
            // Established, or already past it: CloseWait when the
            // server's SYN-ACK, data and FIN came in one poll.
            _ => TcpPhase::Opened,
        }
    }

    fn recv(&mut self, take: &mut dyn FnMut(&[u8])) -> usize {
        if !self.0.can_recv() {
            return 0;
        }
        self.0
            .recv(|buf| {
                take(buf);
                (buf.len(), buf.len())
            })
            .unwrap_or(0)
    }

    fn send(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || !self.0.can_send() {
            return 0;
        }
        self.0.send_slice(bytes).unwrap_or(0)
    }

    fn at_eof(&self) -> bool {
        // The server closed (FIN or RST) or the connection timed out.
        !self.0.may_recv() && !self.0.can_recv()
    }
}

/// Drops closing sockets once TCP is done with them.
fn reap(sockets: &mut SocketSet<'static>, closing: &mut Vec<SocketHandle>) -> bool {
    let before = closing.len();
    closing.retain(|h| {
        let s = sockets.get_mut::<tcp::Socket>(*h);
        let gone = matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait);
        if gone {
            sockets.remove(*h);
        }
        !gone
    });
    closing.len() != before
}
