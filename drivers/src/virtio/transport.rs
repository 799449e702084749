//! Bringing a PCI function up as a virtio device: the modern PCI transport
//! and feature negotiation (virtio 1.x §3.1.1).

use super::Error;
use super::hal::IdentityHal;
use crate::pci::Cam;
/// The transport [`open`] gives, for callers outside this crate.
pub use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::bus::{DeviceFunction, PciRoot};
use virtio_drivers::transport::{DeviceStatus, Transport};

/// `VIRTIO_F_INDIRECT_DESC`: a request takes one ring slot.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_F_VERSION_1`: the modern (virtio 1.x) interface.
pub const F_VERSION_1: u64 = 1 << 32;

/// Opens the modern virtio transport of `function`.
pub fn open(root: &mut PciRoot<Cam>, function: DeviceFunction) -> Result<PciTransport, Error> {
    PciTransport::new::<IdentityHal, _>(root, function)
        .map_err(|_| Error::Setup("no modern virtio-pci capabilities"))
}

/// Resets the device and negotiates `wanted & offered`. VERSION_1 is
/// required. Returns the negotiated features; the device is left in
/// FEATURES_OK, ready for its queues, then [`Transport::finish_init`].
pub fn negotiate<T: Transport>(transport: &mut T, wanted: u64) -> Result<u64, Error> {
    transport.set_status(DeviceStatus::empty());
    transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    let offered = transport.read_device_features();
    if offered & F_VERSION_1 == 0 {
        transport.set_status(DeviceStatus::FAILED);
        return Err(Error::Setup("device does not offer VIRTIO_F_VERSION_1"));
    }
    let features = offered & (wanted | F_VERSION_1);
    transport.write_driver_features(features);
    let status = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
    transport.set_status(status);
    if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
        transport.set_status(DeviceStatus::FAILED);
        return Err(Error::Setup("device refused the negotiated features"));
    }
    Ok(features)
}

/// Reads a little-endian u64 made of two 32-bit config fields (the PCI
/// transport only guarantees 4-byte aligned config access).
pub fn config_u64<T: Transport>(transport: &T, offset: usize) -> u64 {
    transport
        .read_consistent(|| {
            let lo: u32 = transport.read_config_space(offset)?;
            let hi: u32 = transport.read_config_space(offset + 4)?;
            Ok(u64::from(lo) | (u64::from(hi) << 32))
        })
        .unwrap_or(0)
}

/// Reads a 32-bit config field (0 if the config space is too small).
pub fn config_u32<T: Transport>(transport: &T, offset: usize) -> u32 {
    transport.read_config_space::<u32>(offset).unwrap_or(0)
}

/// Reads a 16-bit config field (0 if the config space is too small).
pub fn config_u16<T: Transport>(transport: &T, offset: usize) -> u16 {
    transport.read_config_space::<u16>(offset).unwrap_or(0)
}

/// Reads an 8-bit config field (0 if the config space is too small).
pub fn config_u8<T: Transport>(transport: &T, offset: usize) -> u8 {
    transport.read_config_space::<u8>(offset).unwrap_or(0)
}
