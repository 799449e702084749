//! PCI: configuration space through port I/O (`0xCF8`/`0xCFC`, PCI's
//! "configuration mechanism #1"), bus enumeration through bridges, and the
//! glue that lets virtio-drivers' [`PciRoot`]/`PciTransport` use it.
//!
//! API:
//! - [`PortIoCam`] implements virtio-drivers' [`ConfigurationAccess`]; wrap
//!   it in a [`PciRoot`] with [`root`].
//! - [`scan`] walks bus 0 and every bus behind a PCI-to-PCI bridge
//!   (depth-first, following each bridge's secondary bus number), enables
//!   memory decoding and bus mastering on every endpoint, and returns one
//!   [`Function`] per device function found (address, IDs, class, BARs).
//!   SeaBIOS has assigned the BARs by the time the kernel runs (it may leave
//!   bus mastering off, hence the enable).
//!
//! The configuration-address/data register pair is not atomic: the one CPU
//! and the absence of PCI access from interrupt handlers make it safe here.

use alloc::vec::Vec;
use core::fmt;
use virtio_drivers::transport::pci::bus::{
    BarInfo, Command, ConfigurationAccess, DeviceFunction, HeaderType, PciRoot,
};
use x86_64::instructions::port::Port;

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

/// Byte offset of the bridge's bus numbers (primary, secondary, subordinate).
const BRIDGE_BUS_NUMBERS: u8 = 0x18;

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

/// A [`PciRoot`] over port I/O.
///
/// # Safety
/// As [`PortIoCam::new`].
pub unsafe fn root() -> PciRoot<PortIoCam> {
    // SAFETY: forwarded to the caller.
    PciRoot::new(unsafe { PortIoCam::new() })
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

/// The BARs of `function` (6 on an endpoint, 2 on a bridge). Sizing a BAR
/// briefly disables decoding, so call this before the device is in use.
fn bars(root: &mut PciRoot<PortIoCam>, function: DeviceFunction, count: u8) -> Vec<Bar> {
    let mut out = Vec::new();
    let mut index = 0;
    while index < count {
        let info = match root.bar_info(function, index) {
            Ok(Some(info)) => info,
            Ok(None) => {
                index += 1;
                continue;
            }
            Err(_) => break,
        };
        let wide = info.takes_two_entries();
        let bar = match info {
            BarInfo::IO { address, size } => Bar {
                index,
                kind: BarKind::Io,
                address: address.into(),
                size: size.into(),
            },
            BarInfo::Memory { address, size, .. } => Bar {
                index,
                kind: if wide { BarKind::Mem64 } else { BarKind::Mem32 },
                address,
                size,
            },
        };
        out.push(bar);
        index += if wide { 2 } else { 1 };
    }
    out
}

/// Enumerates every function on bus 0 and behind every bridge, enabling
/// memory decoding and bus mastering on endpoints that have memory BARs.
pub fn scan(root: &mut PciRoot<PortIoCam>) -> Vec<Function> {
    let mut found = Vec::new();
    let mut seen = [false; 256];
    let mut pending = Vec::from([0u8]);
    while let Some(bus) = pending.pop() {
        if core::mem::replace(&mut seen[usize::from(bus)], true) {
            continue;
        }
        for (df, info) in functions_on(root, bus) {
            let bridge = info.header_type == HeaderType::PciPciBridge;
            let bars = bars(root, df, if bridge { 2 } else { 6 });
            if bridge {
                let numbers = read_register(root, df, BRIDGE_BUS_NUMBERS);
                let secondary = (numbers >> 8) as u8;
                if secondary != 0 {
                    pending.push(secondary);
                }
            } else if bars.iter().any(|b| b.kind != BarKind::Io) {
                let (_, command) = root.get_status_command(df);
                root.set_command(df, command | Command::MEMORY_SPACE | Command::BUS_MASTER);
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
    found
}

/// The functions present on `bus`. Unlike virtio-drivers' iterator, only
/// multi-function devices have functions 1-7 probed: every configuration
/// access is a VM exit, and this halves boot-time scanning.
fn functions_on(root: &PciRoot<PortIoCam>, bus: u8) -> Vec<(DeviceFunction, Info)> {
    let mut found = Vec::new();
    for device in 0..32 {
        for function in 0..8 {
            let df = DeviceFunction {
                bus,
                device,
                function,
            };
            let id = read_register(root, df, 0x00);
            if id & 0xffff == 0xffff {
                if function == 0 {
                    break;
                }
                continue;
            }
            let class = read_register(root, df, 0x08);
            let header = (read_register(root, df, 0x0c) >> 16) as u8;
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

/// Reads any register of `function`. virtio-drivers keeps its root's
/// access object private; `_root` is the proof that the caller holds it.
fn read_register(_root: &PciRoot<PortIoCam>, function: DeviceFunction, offset: u8) -> u32 {
    // SAFETY: a root over `PortIoCam` exists, so its creator accepted the
    // contract of `PortIoCam::new`, and we borrow it; the read has no side
    // effect.
    unsafe { PortIoCam::new() }.read_word(function, offset)
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
