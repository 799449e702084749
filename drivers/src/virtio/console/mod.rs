//! Our multiport virtio console ("virtio-serial", virtio 1.2 §5.3) over
//! the modern PCI transport: QEMU's `virtio-serial-pci` with
//! `virtserialport`s, each a byte stream to a host chardev.
//!
//! virtio-drivers has a console device of its own, but it drives port 0
//! only: no `VIRTIO_CONSOLE_F_MULTIPORT`, no control queues, so it can
//! neither find a port by name nor see the host connect and disconnect
//! (`PORT_OPEN`), which is what a per-connection QMP monitor needs. This
//! driver uses virtio-drivers' transport and virtqueue like our blk and
//! scsi drivers.
//!
//! The protocol, as QEMU's `hw/char/virtio-serial-bus.c` runs it:
//! 1. The driver negotiates `F_MULTIPORT`, sets up the control queues (2
//!    receive, 3 transmit) and each port's pair (port 0: 0/1; port n:
//!    2n+2/2n+3), leaves buffers on every receive queue and sends
//!    `DEVICE_READY`.
//! 2. The device announces every port (`DEVICE_ADD`, [`Event::Added`]);
//!    the driver answers `PORT_READY`, and the device sends the port's
//!    name (`PORT_NAME`, [`Event::Named`]) and, if a host client is
//!    connected, `PORT_OPEN` 1.
//! 3. The device forwards host data only to a port the guest opened
//!    ([`VirtioSerial::open`]: `PORT_OPEN` 1 from the driver). Host
//!    connects and disconnects arrive as `PORT_OPEN` 1/0
//!    ([`Event::HostOpen`], [`Event::HostClosed`]).
//!
//! The control receive queue must always hold buffers: QEMU drops a
//! control message when none is there. Every queue is polled, and its
//! used buffers interrupt once [`VirtioSerial::queues`] are routed to a
//! vector (they wake an idle CPU). Data and control messages travel on different queues;
//! [`VirtioSerial::poll`] orders them as a client sees them (see there).
//! One case cannot be told apart: a client that disconnects and a new one
//! that connects and sends at once, all between two polls: the new
//! client's first bytes count as the old one's. A QMP client waits for its
//! greeting first, so this does not arise.

pub mod control;
#[cfg(test)]
mod tests;

use super::Error;
use super::queue::{Chain, Queue};
use super::transport::{self, config_u32};
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use control::Message;
use virtio_drivers::transport::Transport;
use virtio_drivers::transport::pci::PciTransport;

/// `VIRTIO_CONSOLE_F_MULTIPORT`.
pub const F_MULTIPORT: u64 = 1 << 1;
/// The control receive and transmit queues.
const CONTROL_RX: u16 = 2;
const CONTROL_TX: u16 = 3;
/// Offset of `max_nr_ports` in the configuration space.
const MAX_NR_PORTS: usize = 4;
/// Ports (ids `0..PORTS`) whose queues are set up; a port with a higher
/// id is refused (`PORT_READY` 0). QEMU gives `virtserialport`s ids from 1.
pub const PORTS: u32 = 8;
/// Ring size of every queue: the console carries little.
const RING: u32 = 32;
/// Buffers on the control receive queue and their size (header + name).
const CONTROL_BUFFERS: usize = 16;
const CONTROL_BUF: usize = 256;
/// Buffers on a port's receive queue and their size.
const RX_BUFFERS: usize = 8;
const RX_BUF: usize = 2048;
/// The most one transmit buffer carries.
const TX_CHUNK: usize = 4096;

fn rx_queue(port: u32) -> u16 {
    if port == 0 { 0 } else { (2 * port + 2) as u16 }
}

/// What the device reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A port exists (answered with `PORT_READY`).
    Added(u32),
    /// The port's name.
    Named(u32, String),
    /// A host client connected to the port.
    HostOpen(u32),
    /// The host client went away.
    HostClosed(u32),
    /// The port was unplugged.
    Removed(u32),
    /// Bytes the host sent on an open port.
    Data(u32, Vec<u8>),
}

/// A queue of buffers, by token, that the device reads or fills.
struct Ring {
    idx: u16,
    queue: Queue,
    slots: Vec<Option<(Chain, Box<[u8]>)>>,
    /// Buffers added since the last notification.
    added: bool,
}

impl Ring {
    fn new<T: Transport>(transport: &mut T, idx: u16) -> Option<Ring> {
        // Polled, and interrupting too (once routed to a vector) so that
        // a client's bytes wake an idle CPU.
        let queue = Queue::at_most(transport, idx, false, RING).ok()?;
        let slots = (0..queue.size()).map(|_| None).collect();
        Some(Ring {
            idx,
            queue,
            slots,
            added: false,
        })
    }

    /// Adds `buf`, device-writable (`receive`) or device-readable; `false`
    /// (and `buf` dropped) when the ring is full.
    fn add(&mut self, mut buf: Box<[u8]>, receive: bool) -> bool {
        let mut chain = Chain::new();
        if receive {
            chain.writable(&mut buf);
        } else {
            chain.readable(&buf);
        }
        if self.queue.available_desc() < chain.slots(false) {
            return false;
        }
        // SAFETY: the buffer is boxed (its bytes never move) and kept in
        // `slots` with its chain until `reap` reclaims it.
        match unsafe { chain.submit(&mut self.queue) } {
            Ok(token) => {
                self.slots[usize::from(token)] = Some((chain, buf));
                self.added = true;
                true
            }
            Err(_) => false,
        }
    }

    /// Takes every buffer the device is done with: `f` gets it and the
    /// number of bytes the device wrote.
    fn reap(&mut self, mut f: impl FnMut(Box<[u8]>, usize)) -> bool {
        let mut any = false;
        while let Some(token) = self.queue.peek_used() {
            let Some((chain, buf)) = self
                .slots
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                log::error!(
                    "virtio-serial: queue {} returned unknown token {token}",
                    self.idx
                );
                break;
            };
            // SAFETY: `chain` was submitted with `token`; `buf` is alive.
            match unsafe { chain.reclaim(&mut self.queue, token) } {
                Ok(len) => {
                    let n = (len as usize).min(buf.len());
                    f(buf, n)
                }
                Err(_) => {
                    self.slots[usize::from(token)] = Some((chain, buf));
                    break;
                }
            }
            any = true;
        }
        any
    }

    fn in_flight(&self) -> usize {
        usize::from(self.queue.size()) - self.queue.available_desc()
    }

    fn notify<T: Transport>(&mut self, transport: &mut T) {
        if core::mem::take(&mut self.added) && self.queue.should_notify() {
            transport.notify(self.idx);
        }
    }
}

/// A port's receive and transmit queues.
struct Port {
    rx: Ring,
    tx: Ring,
    host_open: bool,
    /// Input is left in the receive queue ([`VirtioSerial::pause_input`]).
    paused: bool,
}

/// One multiport virtio console device.
pub struct VirtioSerial<T: Transport = PciTransport> {
    // Declared first so it drops first: the reset stops the device before
    // the rings and their buffers are freed.
    transport: T,
    control_rx: Ring,
    control_tx: Ring,
    /// Control messages waiting for a free slot on the transmit queue.
    control_backlog: VecDeque<[u8; control::HEADER]>,
    /// By port id; `None`: no queues (beyond [`PORTS`] or `max_nr_ports`).
    ports: Vec<Option<Port>>,
}

impl<T: Transport> VirtioSerial<T> {
    /// Every queue set up (control and ports), for MSI-X routing.
    pub fn queues(&self) -> Vec<u16> {
        let mut queues = vec![CONTROL_RX, CONTROL_TX];
        for (id, port) in self.ports.iter().enumerate() {
            if port.is_some() {
                let rx = rx_queue(id as u32);
                queues.extend([rx, rx + 1]);
            }
        }
        queues
    }

    /// Brings the device up and sends `DEVICE_READY`.
    pub fn new(mut transport: T) -> Result<VirtioSerial<T>, Error> {
        let negotiated = transport::negotiate(&mut transport, F_MULTIPORT)?;
        if negotiated & F_MULTIPORT == 0 {
            return Err(Error::Setup(
                "virtio-serial: the device does not offer VIRTIO_CONSOLE_F_MULTIPORT",
            ));
        }
        let max_ports = config_u32(&transport, MAX_NR_PORTS).min(PORTS);
        let t = &mut transport;
        let (Some(control_rx), Some(control_tx)) =
            (Ring::new(t, CONTROL_RX), Ring::new(t, CONTROL_TX))
        else {
            return Err(Error::Setup(
                "virtio-serial: cannot set up the control queues",
            ));
        };
        let ports = (0..max_ports)
            .map(|id| {
                let rx = Ring::new(t, rx_queue(id))?;
                let tx = Ring::new(t, rx_queue(id) + 1)?;
                Some(Port {
                    rx,
                    tx,
                    host_open: false,
                    paused: false,
                })
            })
            .collect();
        transport.finish_init();
        let mut dev = VirtioSerial {
            transport,
            control_rx,
            control_tx,
            control_backlog: VecDeque::new(),
            ports,
        };
        for _ in 0..CONTROL_BUFFERS {
            dev.control_rx
                .add(vec![0u8; CONTROL_BUF].into_boxed_slice(), true);
        }
        for port in dev.ports.iter_mut().flatten() {
            for _ in 0..RX_BUFFERS {
                port.rx.add(vec![0u8; RX_BUF].into_boxed_slice(), true);
            }
        }
        dev.send_control(0, control::DEVICE_READY, 1);
        dev.notify_all();
        log::debug!("virtio-serial: {max_ports} port(s) set up, features {negotiated:#x}");
        Ok(dev)
    }

    fn send_control(&mut self, id: u32, event: u16, value: u16) {
        self.control_backlog
            .push_back(control::encode(id, event, value));
        self.send_control_backlog();
    }

    fn notify_all(&mut self) {
        let t = &mut self.transport;
        self.control_rx.notify(t);
        self.control_tx.notify(t);
        for port in self.ports.iter_mut().flatten() {
            port.rx.notify(t);
            port.tx.notify(t);
        }
    }

    /// Opens port `id` on the guest side: the device starts forwarding
    /// what the host sends on it.
    pub fn open(&mut self, id: u32) {
        self.send_control(id, control::PORT_OPEN, 1);
        self.notify_all();
    }

    /// Whether a host client is connected to port `id`.
    pub fn host_open(&self, id: u32) -> bool {
        self.port(id).is_some_and(|p| p.host_open)
    }

    fn port(&self, id: u32) -> Option<&Port> {
        self.ports.get(id as usize).and_then(Option::as_ref)
    }

    /// Queues as much of `bytes` for the host as the transmit ring takes;
    /// returns how many bytes it took. The device discards what it is
    /// given while no host client is connected.
    pub fn write(&mut self, id: u32, bytes: &[u8]) -> usize {
        let Some(port) = self.ports.get_mut(id as usize).and_then(Option::as_mut) else {
            return 0;
        };
        let mut taken = 0;
        for chunk in bytes.chunks(TX_CHUNK) {
            if !port.tx.add(chunk.into(), false) {
                break;
            }
            taken += chunk.len();
        }
        if taken > 0 {
            port.tx.notify(&mut self.transport);
        }
        taken
    }

    /// Bytes handed to the device for port `id` that it has not sent yet.
    /// While `paused`, what the client on port `id` sends stays in the
    /// device's receive queue, whose buffers fill and stop the host side
    /// from reading the client's socket: flow control for a client that
    /// sends requests but does not read the replies. A disconnect reaps
    /// the port regardless.
    pub fn pause_input(&mut self, id: u32, paused: bool) {
        if let Some(Some(port)) = self.ports.get_mut(id as usize) {
            port.paused = paused;
        }
    }

    pub fn unsent(&self, id: u32) -> bool {
        self.port(id).is_some_and(|p| p.tx.in_flight() > 0)
    }

    /// Reaps every queue and appends what happened to `out`: answers
    /// `DEVICE_ADD` with `PORT_READY` and re-arms the receive buffers.
    /// Control messages come first, so data a client sends right after it
    /// connected follows its [`Event::HostOpen`]; before a
    /// [`Event::HostClosed`] the port's data is reaped, so what the client
    /// sent before it went away comes first. Returns whether anything
    /// happened.
    pub fn poll(&mut self, out: &mut Vec<Event>) -> bool {
        let mut messages = Vec::new();
        let mut rearm = Vec::new();
        let mut any = self.control_rx.reap(|buf, len| {
            messages.extend(control::parse(&buf[..len]));
            rearm.push(buf);
        });
        for buf in rearm {
            self.control_rx.add(buf, true);
        }
        any |= self.control_tx.reap(|_, _| {});
        for msg in messages {
            if let Message::Open(id, false) = msg {
                any |= self.reap_port(id, out, true);
            }
            self.handle(msg, out);
        }
        for id in 0..self.ports.len() as u32 {
            any |= self.reap_port(id, out, false);
        }
        // Control messages that waited for a slot.
        self.send_control_backlog();
        self.notify_all();
        any
    }

    /// Takes what port `id` received (unless its input is paused and not
    /// `even_paused`) and the transmit buffers the device is done with;
    /// re-arms the receive buffers.
    fn reap_port(&mut self, id: u32, out: &mut Vec<Event>, even_paused: bool) -> bool {
        let Some(Some(port)) = self.ports.get_mut(id as usize) else {
            return false;
        };
        if port.paused && !even_paused {
            return port.tx.reap(|_, _| {});
        }
        let mut rearm = Vec::new();
        let mut any = port.rx.reap(|buf, len| {
            if len > 0 {
                out.push(Event::Data(id, buf[..len].to_vec()));
            }
            rearm.push(buf);
        });
        for buf in rearm {
            port.rx.add(buf, true);
        }
        any |= port.tx.reap(|_, _| {});
        any
    }

    fn send_control_backlog(&mut self) {
        while let Some(msg) = self.control_backlog.front() {
            if !self.control_tx.add(Box::new(*msg), false) {
                break;
            }
            self.control_backlog.pop_front();
        }
    }

    fn handle(&mut self, msg: Message, out: &mut Vec<Event>) {
        match msg {
            Message::Added(id) => {
                let ready = self.port(id).is_some();
                if !ready {
                    log::warn!(
                        "virtio-serial: port {id} refused (ports 0..{} are served)",
                        self.ports.len()
                    );
                }
                self.send_control(id, control::PORT_READY, u16::from(ready));
                if ready {
                    out.push(Event::Added(id));
                }
            }
            Message::Removed(id) => {
                if let Some(Some(port)) = self.ports.get_mut(id as usize) {
                    port.host_open = false;
                    out.push(Event::Removed(id));
                }
            }
            Message::Name(id, name) if self.port(id).is_some() => {
                out.push(Event::Named(id, name));
            }
            Message::Open(id, open) => {
                if let Some(Some(port)) = self.ports.get_mut(id as usize) {
                    port.host_open = open;
                    out.push(if open {
                        Event::HostOpen(id)
                    } else {
                        Event::HostClosed(id)
                    });
                }
            }
            other => log::debug!("virtio-serial: control message {other:?} ignored"),
        }
    }
}
