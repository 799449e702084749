//! PCI: configuration space through ECAM (PCI Express's memory-mapped
//! configuration space, where the ACPI MCFG table lists one: [`mcfg`]) or
//! port I/O (`0xCF8`/`0xCFC`, "configuration mechanism #1"), bus
//! enumeration through bridges, and the glue that lets virtio-drivers'
//! [`PciRoot`]/`PciTransport` use it.
//!
//! API:
//! - [`Cam`] implements virtio-drivers' [`ConfigurationAccess`];
//!   [`Cam::detect`] picks ECAM where the MCFG (q35) or the DSDT's host
//!   bridge (microvm) names it, else port I/O (pc).
//! - [`Bus::new`] wraps it; [`Bus::scan`] walks bus 0 and every bus behind
//!   a PCI-to-PCI bridge (following each bridge's secondary bus number),
//!   places BARs the firmware left unassigned (microvm), enables memory
//!   decoding and bus mastering on every endpoint whose memory BARs are in
//!   place (SeaBIOS may leave bus mastering off), and returns one
//!   [`Function`] per device function found (address, IDs, class, BARs).
//!   [`Bus::root`] is the `PciRoot` that `PciTransport::new` takes.
//!
//! Files: `cam` (configuration access mechanisms), `bars` (sizing and
//! placing BARs), [`mcfg`] and [`dsdt`] (what ACPI says about PCI),
//! [`msix`] (MSI-X vectors and virtio queue routing).

mod bars;
mod cam;
pub mod dsdt;
pub mod mcfg;
pub mod msix;

pub use bars::plan_bars;
pub use cam::{Cam, EcamCam, Platform, PortIoCam, config_address};

use alloc::vec::Vec;
use core::fmt;
use virtio_drivers::transport::pci::bus::{
    Command, ConfigurationAccess, DeviceFunction, HeaderType, PciRoot,
};

/// Byte offset of the bridge's bus numbers (primary, secondary, subordinate).
const BRIDGE_BUS_NUMBERS: u8 = 0x18;

/// PCI configuration space: virtio-drivers' root, plus a reader for the
/// registers it does not expose (bridge bus numbers).
pub struct Bus {
    root: PciRoot<Cam>,
    reader: Cam,
    windows: Vec<(u64, u64)>,
}

impl Bus {
    /// # Safety
    /// As [`Cam::detect`]: the caller owns PCI configuration space.
    pub unsafe fn new(platform: Platform) -> Bus {
        // SAFETY: the clone reads any register and writes only registers
        // the root never caches (MSI-X control, `Bus::write`).
        let reader = unsafe { platform.cam.unsafe_clone() };
        Bus {
            root: PciRoot::new(platform.cam),
            reader,
            windows: platform.windows,
        }
    }

    /// The root `PciTransport::new` takes.
    pub fn root(&mut self) -> &mut PciRoot<Cam> {
        &mut self.root
    }

    /// Reads any register (no side effects).
    pub fn read(&self, function: DeviceFunction, offset: u8) -> u32 {
        self.reader.read_word(function, offset)
    }

    /// Writes a register virtio-drivers' root does not expose (MSI-X
    /// control).
    pub fn write(&mut self, function: DeviceFunction, offset: u8, value: u32) {
        self.reader.write_word(function, offset, value)
    }

    /// Runs `f` with `function`'s I/O and memory decoding off, then puts
    /// the command register back.
    ///
    /// Each change of a BAR or of the decode bits makes QEMU rebuild its
    /// memory map (expensive under TCG), and virtio-drivers' BAR sizing
    /// toggles decoding around every BAR unless it is already off: doing
    /// the sizing (the scan, `PciTransport::new`) inside one window costs
    /// two rebuilds per device instead of two per BAR.
    pub fn with_decode_off<T>(
        &mut self,
        function: DeviceFunction,
        f: impl FnOnce(&mut PciRoot<Cam>) -> T,
    ) -> T {
        let (_, command) = self.root.get_status_command(function);
        let off = command & !(Command::IO_SPACE | Command::MEMORY_SPACE);
        if off != command {
            self.root.set_command(function, off);
        }
        let out = f(&mut self.root);
        if off != command {
            self.root.set_command(function, command);
        }
        out
    }

    /// The host bridge windows unassigned BARs are placed in (empty when
    /// the firmware assigned them).
    pub fn windows(&self) -> &[(u64, u64)] {
        &self.windows
    }

    /// How configuration space is reached.
    pub fn cam(&self) -> &Cam {
        &self.reader
    }

    /// See the module doc.
    pub fn scan(&mut self) -> Vec<Function> {
        scan(self)
    }
}

/// A bus:device.function address, printed as `BB:DD.F` like `lspci`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Address {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl Address {
    pub fn device_function(self) -> DeviceFunction {
        DeviceFunction {
            bus: self.bus,
            device: self.device,
            function: self.function,
        }
    }

    /// Parses `BB:DD.F` (hex bus and device, decimal function).
    pub fn parse(s: &str) -> Option<Address> {
        let (bus, rest) = s.split_once(':')?;
        let (device, function) = rest.split_once('.')?;
        let a = Address {
            bus: u8::from_str_radix(bus, 16).ok()?,
            device: u8::from_str_radix(device, 16).ok()?,
            function: function.parse().ok()?,
        };
        (a.device < 32 && a.function < 8).then_some(a)
    }
}

impl From<DeviceFunction> for Address {
    fn from(f: DeviceFunction) -> Self {
        Address {
            bus: f.bus,
            device: f.device,
            function: f.function,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// One decoded base address register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub index: u8,
    pub kind: BarKind,
    pub address: u64,
    pub size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32,
    Mem64,
}

impl fmt::Display for Bar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            BarKind::Io => "io",
            BarKind::Mem32 => "mem32",
            BarKind::Mem64 => "mem64",
        };
        write!(
            f,
            "BAR{}={kind}@{:#x}+{:#x}",
            self.index, self.address, self.size
        )
    }
}

/// A device function found by [`scan`].
#[derive(Clone, Debug)]
pub struct Function {
    pub address: Address,
    pub vendor_id: u16,
    pub device_id: u16,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub bridge: bool,
    pub bars: Vec<Bar>,
}

impl fmt::Display for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:04x}:{:04x} class {:02x}{:02x}{:02x}{}",
            self.address,
            self.vendor_id,
            self.device_id,
            self.class,
            self.subclass,
            self.prog_if,
            if self.bridge { " bridge" } else { "" }
        )?;
        for bar in &self.bars {
            write!(f, " {bar}")?;
        }
        Ok(())
    }
}

/// Enumerates every function on bus 0 and behind every bridge, enabling
/// memory decoding and bus mastering on endpoints that have memory BARs.
fn scan(bus_access: &mut Bus) -> Vec<Function> {
    let mut found = Vec::new();
    let mut seen = [false; 256];
    let mut pending = Vec::from([0u8]);
    while let Some(bus) = pending.pop() {
        if core::mem::replace(&mut seen[usize::from(bus)], true) {
            continue;
        }
        for (df, info) in functions_on(bus_access, bus) {
            let bridge = info.header_type == HeaderType::PciPciBridge;
            let count = if bridge { 2 } else { 6 };
            let bars = bus_access.with_decode_off(df, |root| bars::bars(root, df, count));
            if bridge {
                let numbers = bus_access.read(df, BRIDGE_BUS_NUMBERS);
                let secondary = (numbers >> 8) as u8;
                if secondary != 0 {
                    pending.push(secondary);
                }
            } else if bars.iter().any(|b| b.kind != BarKind::Io)
                && bars.iter().all(|b| b.kind == BarKind::Io || b.address != 0)
            {
                let (_, command) = bus_access.root.get_status_command(df);
                let wanted = command | Command::MEMORY_SPACE | Command::BUS_MASTER;
                if wanted != command {
                    bus_access.root.set_command(df, wanted);
                }
            }
            found.push(Function {
                address: df.into(),
                vendor_id: info.vendor_id,
                device_id: info.device_id,
                class: info.class,
                subclass: info.subclass,
                prog_if: info.prog_if,
                bridge,
                bars,
            });
        }
    }
    found.sort_by_key(|f| f.address);
    if !bus_access.windows.is_empty() {
        bars::assign_bars(bus_access, &mut found);
    }
    found
}

/// The functions present on `bus`. Unlike virtio-drivers' iterator, only
/// multi-function devices have functions 1-7 probed: every configuration
/// access is a VM exit, and this halves boot-time scanning.
fn functions_on(access: &Bus, bus: u8) -> Vec<(DeviceFunction, Info)> {
    let mut found = Vec::new();
    for device in 0..32 {
        for function in 0..8 {
            let df = DeviceFunction {
                bus,
                device,
                function,
            };
            let id = access.read(df, 0x00);
            if id & 0xffff == 0xffff {
                if function == 0 {
                    break;
                }
                continue;
            }
            let class = access.read(df, 0x08);
            let header = (access.read(df, 0x0c) >> 16) as u8;
            found.push((
                df,
                Info {
                    vendor_id: id as u16,
                    device_id: (id >> 16) as u16,
                    class: (class >> 24) as u8,
                    subclass: (class >> 16) as u8,
                    prog_if: (class >> 8) as u8,
                    header_type: HeaderType::from(header & 0x7f),
                },
            ));
            if function == 0 && header & 0x80 == 0 {
                break;
            }
        }
    }
    found
}

/// The identity registers of a function.
struct Info {
    vendor_id: u16,
    device_id: u16,
    class: u8,
    subclass: u8,
    prog_if: u8,
    header_type: HeaderType,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_parse_and_display() {
        let a = Address::parse("00:1f.2").unwrap();
        assert_eq!(
            a,
            Address {
                bus: 0,
                device: 0x1f,
                function: 2
            }
        );
        assert_eq!(alloc::format!("{a}"), "00:1f.2");
        assert!(Address::parse("00:20.0").is_none());
        assert!(Address::parse("00:01.8").is_none());
        assert!(Address::parse("0001.0").is_none());
    }
}
