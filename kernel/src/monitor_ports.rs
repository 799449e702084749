//! QMP on virtio-serial: every port whose name starts with
//! [`QMP_PORT_PREFIX`] (QEMU: `-device virtserialport,name=org.qemu.qmp.0`
//! on a `-device virtio-serial-pci`, with a socket chardev behind it) is a
//! monitor of its own. The device reports the host client connecting and
//! disconnecting (`VIRTIO_CONSOLE_PORT_OPEN`): a connection gets a fresh
//! [`Conn`] (greeting, capabilities negotiation) and loses it, with any
//! half-received command, when the client goes away.
//!
//! Ports with other names are left closed: QEMU does not read what their
//! host side sends while the guest has not opened them.

use crate::monitor::Conn;
use crate::pci::Pci;
use alloc::string::String;
use alloc::vec::Vec;
use drivers::virtio::console::{Event, VirtioSerial};
use log::info;

/// The name prefix of the ports that carry QMP.
pub const QMP_PORT_PREFIX: &str = "org.qemu.qmp";

/// virtio-console's PCI device ids (transitional, modern).
const CONSOLE_IDS: [u16; 2] = [0x1003, 0x1043];

/// A QMP port and its client, while one is connected.
struct QmpPort {
    id: u32,
    name: String,
    conn: Option<Conn>,
}

/// The virtio-serial device and its QMP ports.
pub struct Ports {
    dev: VirtioSerial,
    ports: Vec<QmpPort>,
    events: Vec<Event>,
}

impl Ports {
    /// Brings up the first virtio-serial function of the boot-time PCI
    /// scan, if there is one. A device that fails to come up is logged and
    /// left alone (COM2 still serves QMP).
    pub fn probe(pci: &mut Pci) -> Option<Ports> {
        let f = pci.virtio(&CONSOLE_IDS).into_iter().next()?;
        let dev = pci
            .open_virtio(&f)
            .map_err(|e| alloc::format!("{e}"))
            .and_then(|t| VirtioSerial::new(t).map_err(|e| alloc::format!("{e}")));
        match dev {
            Ok(dev) => {
                pci.interrupts(&f, &dev.queues(), crate::interrupts::CONSOLE_VECTOR);
                info!(
                    "{} virtio-serial: QMP on ports named {QMP_PORT_PREFIX}*",
                    f.address
                );
                Some(Ports {
                    dev,
                    ports: Vec::new(),
                    events: Vec::new(),
                })
            }
            Err(e) => {
                log::error!("{} virtio-serial: {e}", f.address);
                None
            }
        }
    }

    /// Every connected client's session.
    pub fn for_each_conn(&mut self, mut f: impl FnMut(u32, &mut Conn)) {
        for p in &mut self.ports {
            if let Some(conn) = &mut p.conn {
                f(p.id, conn);
            }
        }
    }

    fn port(&mut self, id: u32) -> Option<&mut QmpPort> {
        self.ports.iter_mut().find(|p| p.id == id)
    }

    /// Polls the device: port appearances, connects and disconnects, and
    /// input, which `feed` gets with the session of the client that sent
    /// it, in the order the device reported it. Returns whether anything
    /// happened.
    pub fn poll(&mut self, mut feed: impl FnMut(u32, &mut Conn, &[u8])) -> bool {
        for p in &self.ports {
            let paused = p.conn.as_ref().is_some_and(Conn::input_paused);
            self.dev.pause_input(p.id, paused);
        }
        let mut events = core::mem::take(&mut self.events);
        let busy = self.dev.poll(&mut events);
        for event in events.drain(..) {
            match event {
                Event::Data(id, bytes) => match self.port(id).and_then(|p| p.conn.as_mut()) {
                    Some(conn) => feed(id, conn, &bytes),
                    None => log::debug!("virtio-serial port {id}: input without a client dropped"),
                },
                Event::Named(id, name) if name.starts_with(QMP_PORT_PREFIX) => {
                    if self.port(id).is_none() {
                        info!("QMP on virtio-serial port {id} ({name})");
                        self.dev.open(id);
                        // QEMU follows the name with `PORT_OPEN` 1 if a
                        // client is already there: the session starts then.
                        self.ports.push(QmpPort {
                            id,
                            name,
                            conn: None,
                        });
                    }
                }
                Event::Named(id, name) => {
                    info!("virtio-serial port {id} ({name}) is not a QMP port: left closed");
                }
                Event::HostOpen(id) => {
                    // QEMU may repeat `PORT_OPEN` 1 after `PORT_READY`: a
                    // client that has sent nothing yet keeps its session.
                    // Any other open is a new client, which never gets
                    // the output or the state of the one before.
                    if let Some(p) = self.port(id) {
                        match &p.conn {
                            Some(c) if !c.heard() => {}
                            Some(_) => {
                                log::warn!(
                                    "QMP on {}: a new connection without a disconnect: new session",
                                    p.name
                                );
                                p.conn = Some(Conn::connected());
                            }
                            None => {
                                log::debug!("QMP client connected on {}", p.name);
                                p.conn = Some(Conn::connected());
                            }
                        }
                    }
                }
                Event::HostClosed(id) => {
                    if let Some(p) = self.port(id) {
                        log::debug!("QMP client on {} went away", p.name);
                        p.conn = None;
                    }
                }
                Event::Removed(id) => self.ports.retain(|p| p.id != id),
                Event::Added(_) => {}
            }
        }
        self.events = events;
        busy
    }

    /// Hands every client's output to the device as far as it takes it;
    /// returns whether it took anything.
    pub fn flush(&mut self) -> bool {
        let dev = &mut self.dev;
        let mut wrote = false;
        for p in &mut self.ports {
            if let Some(conn) = &mut p.conn {
                wrote |= conn.flush(|b| dev.write(p.id, b));
            }
        }
        wrote
    }

    /// Whether the device still has output to send to a connected client.
    pub fn unsent(&self) -> bool {
        self.ports
            .iter()
            .any(|p| p.conn.is_some() && self.dev.unsent(p.id))
    }
}
