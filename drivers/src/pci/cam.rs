//! How PCI configuration space is reached: ECAM (memory-mapped, where the
//! ACPI MCFG table or the DSDT's host bridge names it) or the legacy
//! port-I/O pair `0xCF8`/`0xCFC`, each as a virtio-drivers
//! [`ConfigurationAccess`], and [`Cam::detect`], which picks one.
//!
//! The port-I/O address/data pair is not atomic: the one CPU and the
//! absence of PCI access from interrupt handlers make it safe here.

use super::{dsdt, mcfg};
use crate::acpi::PhysMem;
use alloc::vec::Vec;
use core::fmt;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};
use x86_64::instructions::port::Port;

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

/// The `0xCF8` word selecting `function`'s register `offset` (dword aligned).
pub fn config_address(function: DeviceFunction, offset: u8) -> u32 {
    0x8000_0000
        | (u32::from(function.bus) << 16)
        | (u32::from(function.device & 0x1f) << 11)
        | (u32::from(function.function & 0x7) << 8)
        | u32::from(offset & 0xfc)
}

/// Configuration access through the legacy I/O ports. Zero-sized: every
/// instance drives the same two ports.
#[derive(Debug)]
pub struct PortIoCam {
    _private: (),
}

impl PortIoCam {
    /// # Safety
    /// The caller owns PCI configuration space: nothing else (another CPU,
    /// an interrupt handler) uses ports `0xCF8`/`0xCFC` concurrently.
    pub unsafe fn new() -> Self {
        Self { _private: () }
    }
}

impl ConfigurationAccess for PortIoCam {
    fn read_word(&self, function: DeviceFunction, offset: u8) -> u32 {
        // SAFETY: `PortIoCam::new`'s contract gives us exclusive use of the
        // configuration ports; selecting a register then reading the data
        // port has no other side effect.
        unsafe {
            Port::<u32>::new(CONFIG_ADDRESS).write(config_address(function, offset));
            Port::<u32>::new(CONFIG_DATA).read()
        }
    }

    fn write_word(&mut self, function: DeviceFunction, offset: u8, data: u32) {
        // SAFETY: as in `read_word`; callers (PciRoot) write only registers
        // they own (command, BAR sizing with restore).
        unsafe {
            Port::<u32>::new(CONFIG_ADDRESS).write(config_address(function, offset));
            Port::<u32>::new(CONFIG_DATA).write(data);
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        Self { _private: () }
    }
}

/// Configuration access through one ECAM region (bus numbers outside it
/// read as absent).
#[derive(Debug)]
pub struct EcamCam {
    region: mcfg::EcamRegion,
}

impl EcamCam {
    /// # Safety
    /// `region` describes real ECAM space, identity-mapped, that nothing
    /// else accesses.
    pub unsafe fn new(region: mcfg::EcamRegion) -> Self {
        Self { region }
    }

    fn address(&self, f: DeviceFunction, offset: u8) -> Option<*mut u32> {
        if f.bus < self.region.start_bus || f.bus > self.region.end_bus || !f.valid() {
            return None;
        }
        let off = (u64::from(f.bus) << 20)
            | (u64::from(f.device) << 15)
            | (u64::from(f.function) << 12)
            | u64::from(offset & 0xfc);
        Some((self.region.base + off) as *mut u32)
    }
}

impl ConfigurationAccess for EcamCam {
    fn read_word(&self, function: DeviceFunction, offset: u8) -> u32 {
        match self.address(function, offset) {
            // SAFETY: inside the ECAM region (`EcamCam::new`'s contract),
            // dword aligned; a configuration read has no side effect.
            Some(p) => unsafe { p.read_volatile() },
            None => 0xffff_ffff,
        }
    }

    fn write_word(&mut self, function: DeviceFunction, offset: u8, data: u32) {
        if let Some(p) = self.address(function, offset) {
            // SAFETY: as in `read_word`; callers write only registers they
            // own (command, BAR sizing with restore).
            unsafe { p.write_volatile(data) }
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        Self {
            region: self.region,
        }
    }
}

/// The configuration access mechanism in use.
#[derive(Debug)]
pub enum Cam {
    Port(PortIoCam),
    Ecam(EcamCam),
}

/// How configuration space is reached, and (when the firmware left BAR
/// assignment to us) where BARs may go.
pub struct Platform {
    pub cam: Cam,
    /// Memory windows of the host bridge from the DSDT, below the
    /// identity-mapped limit; empty when the firmware assigned the BARs.
    pub windows: Vec<(u64, u64)>,
}

impl Cam {
    /// ECAM when the MCFG (found from `rsdp`, or by scanning the BIOS area)
    /// lists a region for segment 0 starting at bus 0 below `mapped_end`;
    /// else ECAM at the host bridge's `_CBA` from the DSDT, with the
    /// bridge's memory windows for BAR assignment (QEMU's microvm: no MCFG,
    /// and its firmware assigns no BARs); port I/O otherwise.
    ///
    /// # Safety
    /// The caller owns PCI configuration space, and `mem` reads physical
    /// memory.
    pub unsafe fn detect(mem: &dyn PhysMem, rsdp: Option<u64>, mapped_end: u64) -> Platform {
        let below = |r: &mcfg::EcamRegion| {
            let end = r.base + ((u64::from(r.end_bus) + 1) << 20);
            r.segment == 0 && r.start_bus == 0 && end <= mapped_end
        };
        let rsdp = rsdp.or_else(|| mcfg::find_rsdp(mem));
        let region = rsdp
            .map(|r| mcfg::ecam_regions(mem, r))
            .unwrap_or_default()
            .into_iter()
            .find(below);
        if let Some(r) = region {
            return Platform {
                // SAFETY: the firmware's MCFG describes this ECAM space; it
                // is below the identity-mapped limit; the caller owns PCI
                // configuration space.
                cam: Cam::Ecam(unsafe { EcamCam::new(r) }),
                windows: Vec::new(),
            };
        }
        let bridge = rsdp
            .and_then(|r| mcfg::dsdt(mem, r))
            .and_then(|d| dsdt::host_bridge(mem, d));
        if let Some(hb) = bridge
            && let Some(base) = hb.ecam
        {
            let (start_bus, end_bus) = hb.buses.unwrap_or((0, 0xff));
            let r = mcfg::EcamRegion {
                base,
                segment: 0,
                start_bus,
                end_bus,
            };
            if below(&r) {
                return Platform {
                    // SAFETY: the DSDT's `_CBA` names this ECAM space; as
                    // above.
                    cam: Cam::Ecam(unsafe { EcamCam::new(r) }),
                    windows: hb
                        .windows
                        .into_iter()
                        .filter(|&(b, n)| b.saturating_add(n) <= mapped_end)
                        .collect(),
                };
            }
        }
        Platform {
            // SAFETY: forwarded to the caller.
            cam: Cam::Port(unsafe { PortIoCam::new() }),
            windows: Vec::new(),
        }
    }
}

impl fmt::Display for Cam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cam::Port(_) => f.write_str("port I/O 0xcf8"),
            Cam::Ecam(e) => write!(
                f,
                "ECAM at {:#x} (buses {:02x}-{:02x})",
                e.region.base, e.region.start_bus, e.region.end_bus
            ),
        }
    }
}

impl ConfigurationAccess for Cam {
    fn read_word(&self, function: DeviceFunction, offset: u8) -> u32 {
        match self {
            Cam::Port(c) => c.read_word(function, offset),
            Cam::Ecam(c) => c.read_word(function, offset),
        }
    }

    fn write_word(&mut self, function: DeviceFunction, offset: u8, data: u32) {
        match self {
            Cam::Port(c) => c.write_word(function, offset, data),
            Cam::Ecam(c) => c.write_word(function, offset, data),
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        match self {
            // SAFETY: forwarded to the caller.
            Cam::Port(c) => Cam::Port(unsafe { c.unsafe_clone() }),
            // SAFETY: forwarded to the caller.
            Cam::Ecam(c) => Cam::Ecam(unsafe { c.unsafe_clone() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_address_layout() {
        let f = DeviceFunction {
            bus: 0x12,
            device: 0x1f,
            function: 7,
        };
        assert_eq!(config_address(f, 0x3e), 0x8012_ff3c);
        assert_eq!(
            config_address(
                DeviceFunction {
                    bus: 0,
                    device: 0,
                    function: 0
                },
                0
            ),
            0x8000_0000
        );
    }
}
