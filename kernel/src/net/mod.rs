//! Networking and the NBD server: virtio-net, the TCP stack, listening
//! sockets and one NBD connection per client.
//!
//! A request's path, top to bottom: virtio-net RX ring ([`drivers::net`])
//! → smoltcp ([`stack`]) → the client's TCP socket → its
//! `block::nbd::Connection` ([`conn`]) → a task per request on the
//! export's backend ([`block::export`]) → the graph → the reply bytes back
//! the same way. [`server`] keeps sockets listening, for the QMP commands
//! and boot options of [`block::export::qmp`]; [`config`] holds the `ip=`
//! setting.
//!
//! Hooks the rest of the kernel calls:
//! - [`Network::probe`] at boot, with the PCI scan and the `ip=` setting of
//!   the command line;
//! - [`Network::poll`] from the main loop and from the block layer's
//!   platform while a QMP command waits (returns whether anything happened);
//! - the [`NbdServer`] the QMP commands and boot options of
//!   [`block::export`] drive (`app::Appliance` hands it to them);
//! - [`Network::close_exports`] first in the halt path, before close-all.

mod budget;
mod client;
mod config;
mod conn;
mod server;
mod stack;
pub mod tls;
mod traced;

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use block::exec::Executor;
use block::export::{ExportTable, NbdServer, ServerConfig};
use block::graph::registry::Registry;
use drivers::net::NetDevice;
use drivers::net::smoltcp::wire::IpAddress;
use log::{info, warn};

use crate::pci::Pci;
use budget::Budgets;
use conn::{Conn, IoBudget};
use server::Server;
use stack::Stack;

/// virtio-net: transitional and modern device ids.
const NET_IDS: [u16; 2] = [0x1000, 0x1041];

/// The network stack and the NBD server.
#[derive(Default)]
pub struct Network {
    stack: Option<Stack>,
    exports: Option<Rc<ExportTable>>,
    server: Option<Server>,
    conns: Vec<Conn>,
    exec: Option<Executor>,
    budget: Option<Rc<IoBudget>>,
    /// What the heap present allows ([`budget`]). Clients served at once
    /// are bounded by its `max_clients` whatever `max-connections` says
    /// (0 means no limit in QEMU); further clients wait, as they do at
    /// `max-connections`.
    budgets: Budgets,
    /// Test fault: panic inside [`Network::poll`] when a client connects.
    panic_on_client: bool,
    /// The `driver=nbd` nodes' sockets.
    clients: client::Clients,
}

/// Brings up the first virtio-net function of the boot-time PCI scan with
/// the buffers `budgets` allow.
fn find_device(pci: &mut Pci, budgets: &Budgets) -> Result<Option<NetDevice>, String> {
    let Some(f) = pci.virtio(&NET_IDS).into_iter().next() else {
        return Ok(None);
    };
    let transport = pci
        .open_virtio(&f)
        .map_err(|e| format!("{}: {e}", f.address))?;
    let mut dev =
        NetDevice::new(transport, budgets.net).map_err(|e| format!("{}: {e}", f.address))?;
    // Frames wake the idle CPU.
    dev.set_interrupts(true);
    pci.interrupts(
        &f,
        drivers::net::INTERRUPT_QUEUES,
        crate::interrupts::NET_VECTOR,
    );
    let (rx, tx, large) = dev.buffers();
    info!(
        "{} virtio-net: MAC {}, MTU {}, features {}; {} RX, {} TX buffers, {} for segmentation offload",
        f.address,
        dev.mac(),
        dev.mtu(),
        drivers::net::FeatureNames(dev.features()),
        rx,
        tx,
        large
    );
    info!(
        "virtio-net offloads: TCP checksum {}, segmentation {}",
        if dev.checksum_offload() {
            "host"
        } else {
            "guest"
        },
        if dev.segmentation_offload() {
            "host (TSO4)"
        } else {
            "none"
        }
    );
    Ok(Some(dev))
}

impl Network {
    /// Brings up the first virtio-net device of the boot-time PCI scan and
    /// the interface; `ip` is the command line's `ip=ADDR/PREFIX[,gw=GW]` (QEMU user-network defaults
    /// when absent). No device is not an error: the appliance then runs
    /// without a network.
    pub fn probe(
        pci: &mut Pci,
        heap_bytes: u64,
        ip: Option<&str>,
        registry: Rc<Registry>,
    ) -> Result<Self, String> {
        let ip = config::parse(ip)?;
        let budgets = Budgets::for_heap(heap_bytes);
        info!(
            "network budgets for a {} MiB heap: {budgets}",
            heap_bytes >> 20
        );
        let stack = match find_device(pci, &budgets)? {
            Some(dev) => {
                let s = Stack::new(dev, ip);
                info!(
                    "network: {}/{} gw {:?}, gratuitous ARP sent",
                    ip.addr, ip.prefix, ip.gateway
                );
                Some(s)
            }
            None => {
                info!("network: no virtio-net device");
                None
            }
        };
        Ok(Self {
            stack,
            exec: Some(registry.executor().clone()),
            exports: Some(ExportTable::new(registry)),
            server: None,
            conns: Vec::new(),
            budget: Some(IoBudget::new(budgets.read_bytes)),
            budgets,
            panic_on_client: false,
            clients: client::Clients::default(),
        })
    }

    /// `nbd-server-start`: listens on `cfg`.
    fn start_server(&mut self, cfg: ServerConfig) -> Result<(), String> {
        if self.server.is_some() {
            return Err("NBD server already running".into());
        }
        if self.stack.is_none() {
            warn!("NBD server started without a network device: no client can reach it");
        }
        let host = cfg.host.map(IpAddress::Ipv4);
        let tls = match &cfg.tls {
            Some(creds) => Some(tls::credentials(creds, cfg.tls_authz.as_deref())?),
            None => None,
        };
        self.server = Some(Server::new(
            host,
            cfg.port,
            cfg.max_connections,
            cfg.handshake_max_seconds,
            tls,
            &self.budgets,
        ));
        self.poll();
        Ok(())
    }

    /// `nbd-server-stop`: stops listening and closes every export (QEMU:
    /// `blk_exp_close_all_type(NBD)`); connections drain in the background.
    fn stop_server(&mut self) -> Result<(), String> {
        let Some(mut server) = self.server.take() else {
            return Err("NBD server not running".into());
        };
        if let Some(stack) = &mut self.stack {
            server.close(&mut stack.sockets);
        }
        if let Some(exports) = &self.exports {
            for e in exports.all() {
                e.request_shutdown(true);
            }
        }
        self.poll();
        Ok(())
    }

    /// Moves frames, runs TCP, serves NBD connections (spawning their
    /// request tasks on the registry's executor). Returns whether anything
    /// happened.
    pub fn poll(&mut self) -> bool {
        let Network {
            stack,
            exports,
            server,
            conns,
            exec,
            budget,
            budgets,
            panic_on_client,
            clients,
        } = self;
        let mut busy = false;
        if let (Some(stack), Some(exports), Some(exec), Some(budget)) =
            (stack, exports.as_ref(), exec, budget)
        {
            let gate = server.as_ref().map(|s| (s.port, s.free(&stack.sockets)));
            stack.device.gate_syns(gate);
            busy |= stack.poll();
            if let Some(server) = server {
                let max = match server.max_connections {
                    0 => budgets.max_clients,
                    m => (m as usize).min(budgets.max_clients),
                };
                let room = max.saturating_sub(conns.len());
                for h in server.accept(&mut stack.sockets, room) {
                    conns.push(Conn::new(
                        h,
                        budgets,
                        server.handshake_ns,
                        server.tls.as_ref(),
                    ));
                    busy = true;
                    if *panic_on_client {
                        panic!("test fault: panic inside the network poll");
                    }
                }
            }
            for c in conns.iter_mut() {
                busy |= c.service(&mut stack.sockets, exports, exec, budget, budgets.reserve);
            }
            busy |= clients.service(stack, budgets.socket_buffer);
            conns.retain_mut(|c| {
                if c.finished(&mut stack.sockets, budget) {
                    stack.sockets.remove(c.handle);
                    false
                } else {
                    true
                }
            });
            if busy {
                stack.poll();
            }
        } else {
            busy |= clients.no_network();
        }
        if let Some(exports) = exports {
            busy |= exports.reap();
        }
        busy
    }

    /// When the TCP stack next needs a poll without new frames, in
    /// monotonic nanoseconds (`None`: only a frame or a timer of the
    /// block layer will).
    pub fn poll_at(&mut self) -> Option<u64> {
        self.stack.as_mut()?.poll_at()
    }

    /// The links of `driver=nbd` nodes, for the driver class
    /// ([`block::nbd::client_node::class`]).
    pub fn nbd_links(&self) -> block::nbd::client_node::Links {
        self.clients.links()
    }

    /// Halt path, before close-all: requests of `nbd` nodes still
    /// unanswered `bound_ns` from now fail then (a server that stopped
    /// answering cannot hold close-all).
    pub fn bound_nbd_requests(&mut self, bound_ns: u64) {
        let at = crate::clock::monotonic_ns().saturating_add(bound_ns);
        self.clients.abandon_at(at);
    }

    /// Halt path, after close-all: lets the closed `nbd` nodes' last bytes
    /// (`NBD_CMD_DISC`) go out and their sockets close, for at most
    /// `bound_ns`.
    pub fn close_nbd_clients(&mut self, bound_ns: u64) {
        let start = crate::clock::monotonic_ns();
        while self.clients.busy() && crate::clock::monotonic_ns().saturating_sub(start) < bound_ns {
            self.poll();
        }
    }

    /// Test fault: the next client to connect makes [`Network::poll`]
    /// panic while the network is borrowed.
    pub fn panic_on_client(&mut self) {
        self.panic_on_client = true;
    }

    /// Halt path: closes every export (each emits `BLOCK_EXPORT_DELETED`),
    /// tells clients the server is going away; requests in flight finish
    /// while close-all drains the backends.
    pub fn close_exports(&mut self) -> Vec<String> {
        if let (Some(server), Some(stack)) = (&mut self.server, &mut self.stack) {
            server.close(&mut stack.sockets);
        }
        self.server = None;
        for c in &mut self.conns {
            c.shutdown();
        }
        let closed = match &self.exports {
            Some(exports) => exports.close_all(),
            None => Vec::new(),
        };
        for _ in 0..8 {
            if !self.poll() {
                break;
            }
        }
        if let Some(stack) = &self.stack {
            let st = stack.device.stats();
            info!(
                "virtio-net: {} frames received ({} unsegmented), {} sent ({} for segmentation), {} notifications, {} times no TX buffer",
                st.rx_frames,
                st.rx_gso_frames,
                st.tx_frames,
                st.tx_gso_frames,
                st.kicks,
                st.tx_full
            );
        }
        closed
    }
}

impl NbdServer for Network {
    fn start(&mut self, cfg: ServerConfig) -> Result<(), String> {
        self.start_server(cfg)
    }

    fn stop(&mut self) -> Result<(), String> {
        self.stop_server()
    }

    fn running(&self) -> bool {
        self.server.is_some()
    }

    fn exports(&self) -> Option<Rc<ExportTable>> {
        self.exports.clone()
    }
}
