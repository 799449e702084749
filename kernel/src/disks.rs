//! The appliance's disks: PCI discovery of virtio-blk and virtio-scsi
//! devices and their drivers (issue 4). Placeholder until the drivers land:
//! finds nothing.

use crate::monitor::Appliance;
use block::qmp::Dispatcher;

/// Every disk found at boot, claimed or not.
#[derive(Default)]
pub struct Disks {}

impl Disks {
    /// Scans the PCI buses and brings up every disk controller.
    pub fn probe() -> Self {
        Self {}
    }

    /// Polls device completion rings; returns whether anything completed.
    pub fn poll(&mut self) -> bool {
        false
    }
}

/// Registers the disk-related QMP commands.
pub fn register(_commands: &mut Dispatcher<Appliance>) {}
