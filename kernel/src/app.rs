//! The appliance's state, what QMP commands run against: the block graph,
//! the disk table and the network, with the events commands raise. The
//! monitor owns it; the command modules (`disks_qmp`, `drive`, `net::qmp`)
//! and the halt path reach it through the monitor.

use crate::disks::Disks;
use crate::net::Network;
use alloc::rc::Rc;
use alloc::vec::Vec;
use block::export::{ExportTable, NbdContext, NbdServer};
use block::layer::{BlockContext, BlockLayer};
use block::qmp::{Event, QmpContext};
use core::cell::{RefCell, RefMut};

/// The disks, shared by the nodes, the main loop, the block layer's wait
/// platform and the disk QMP commands.
pub type SharedDisks = Rc<RefCell<Disks>>;

/// What QMP commands run against: the appliance's state.
pub struct Appliance {
    /// Events raised by commands, written before their reply.
    pub events: Vec<Event>,
    /// A copy of every event handed to a QMP session, for the monitor to
    /// send to its other clients too (the session running a command writes
    /// the command's events itself).
    pub raised: Vec<Event>,
    pub disks: SharedDisks,
    /// The block graph (QEMU's block layer).
    pub block: BlockLayer,
    /// The network and the NBD server (shared with the block layer's
    /// platform, which polls it while a command waits).
    pub net: Rc<RefCell<Network>>,
    /// The network's export table, also held here so the halt path can
    /// close the exports when a fatal error left the network borrowed.
    pub exports: Option<Rc<ExportTable>>,
}

impl Appliance {
    pub fn new(disks: SharedDisks, block: BlockLayer, net: Rc<RefCell<Network>>) -> Self {
        let exports = net.borrow().exports();
        Self {
            exports,
            events: Vec::new(),
            raised: Vec::new(),
            disks,
            block,
            net,
        }
    }
}

impl QmpContext for Appliance {
    fn drain_events(&mut self, out: &mut Vec<Event>) {
        let from = out.len();
        self.block.drain_events(out);
        out.append(&mut self.events);
        self.raised.extend_from_slice(&out[from..]);
    }
}

impl BlockContext for Appliance {
    fn block_layer(&mut self) -> &mut BlockLayer {
        &mut self.block
    }
}

/// The NBD export commands (`block::export::register`) reach the server
/// through the appliance.
impl NbdContext for Appliance {
    fn nbd_server(&self) -> RefMut<'_, dyn NbdServer> {
        self.net.borrow_mut()
    }
}
