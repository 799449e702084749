//! virtio-rng (virtio 1.x §5.4): entropy from the host
//! (`-device virtio-rng-pci`), on virtio-drivers' driver. The appliance
//! uses it for TLS where the CPU has neither RDSEED nor RDRAND.
//!
//! Requests are synchronous (the device answers from QEMU's main loop
//! while the CPU polls the used ring): a few dozen bytes per TLS
//! handshake.

use alloc::format;
use alloc::string::String;
use virtio_drivers::device::rng::VirtIORng;

use super::hal::IdentityHal;
use super::transport::PciTransport;

/// virtio-rng: transitional and modern device ids.
pub const RNG_IDS: [u16; 2] = [0x1005, 0x1044];

/// Requests that may come back empty in a row before the device is taken
/// to have stopped giving entropy.
const EMPTY_REPLIES: usize = 64;

/// A virtio-rng device.
pub struct RngDevice(VirtIORng<IdentityHal, PciTransport>);

impl RngDevice {
    /// Brings the device up.
    pub fn new(transport: PciTransport) -> Result<RngDevice, String> {
        VirtIORng::new(transport)
            .map(RngDevice)
            .map_err(|e| format!("virtio-rng: {e}"))
    }

    /// Fills `dest` (the device may give fewer bytes per request).
    pub fn fill(&mut self, dest: &mut [u8]) -> Result<(), String> {
        let mut at = 0;
        let mut empty = 0;
        while at < dest.len() {
            let n = self
                .0
                .request_entropy(&mut dest[at..])
                .map_err(|e| format!("virtio-rng: {e}"))?;
            if n == 0 {
                empty += 1;
                if empty > EMPTY_REPLIES {
                    return Err(String::from("virtio-rng: the device gives no bytes"));
                }
            }
            at += n.min(dest.len() - at);
        }
        Ok(())
    }
}
