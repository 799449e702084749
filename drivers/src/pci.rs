//! PCI: configuration space through ECAM (PCI Express's memory-mapped
//! configuration space, where the ACPI MCFG table lists one: [`mcfg`]) or
//! port I/O (`0xCF8`/`0xCFC`, "configuration mechanism #1"), bus
//! enumeration through bridges, and the glue that lets virtio-drivers'
//! [`PciRoot`]/`PciTransport` use it.
//!
//! API:
//! - [`Cam`] implements virtio-drivers' [`ConfigurationAccess`];
//!   [`Cam::detect`] picks ECAM when the MCFG offers it for segment 0, else
//!   port I/O.
//! - [`Bus::new`] wraps it; [`Bus::scan`] walks bus 0 and every bus behind
//!   a PCI-to-PCI bridge (following each bridge's secondary bus number),
//!   enables memory decoding and bus mastering on every endpoint with a
//!   memory BAR, and returns one [`Function`] per device function found
//!   (address, IDs, class, BARs). SeaBIOS has assigned the BARs by the time
//!   the kernel runs (it may leave bus mastering off, hence the enable).
//!   [`Bus::root`] is the `PciRoot` that `PciTransport::new` takes.
//!
//! The port-I/O address/data pair is not atomic: the one CPU and the
//! absence of PCI access from interrupt handlers make it safe here.

pub mod dsdt;
pub mod mcfg;

use crate::acpi::PhysMem;
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

/// Places BARs the firmware left unassigned in the host bridge's windows:
/// naturally aligned (a BAR's size is a power of two), clear of every BAR
/// already in place. Pure: returns (function index, BAR index, address).
pub fn plan_bars(functions: &[Function], windows: &[(u64, u64)]) -> Vec<(usize, u8, u64)> {
    let mut used: Vec<(u64, u64)> = functions
        .iter()
        .flat_map(|f| &f.bars)
        .filter(|b| b.kind != BarKind::Io && b.address != 0)
        .map(|b| (b.address, b.size))
        .collect();
    let mut todo: Vec<(usize, &Bar)> = functions
        .iter()
        .enumerate()
        .filter(|(_, f)| !f.bridge)
        .flat_map(|(i, f)| f.bars.iter().map(move |b| (i, b)))
        .filter(|(_, b)| b.kind != BarKind::Io && b.address == 0 && b.size.is_power_of_two())
        .collect();
    // Largest first packs naturally aligned ranges without holes.
    todo.sort_by_key(|(_, b)| core::cmp::Reverse(b.size));
    let mut out = Vec::new();
    for (i, bar) in todo {
        let fits = |w: &(u64, u64)| {
            let mut at = w.0.next_multiple_of(bar.size);
            while at + bar.size <= w.0 + w.1 {
                match used.iter().find(|&&(s, n)| at < s + n && s < at + bar.size) {
                    None => return Some(at),
                    Some(&(s, n)) => at = (s + n).next_multiple_of(bar.size),
                }
            }
            None
        };
        // A 32-bit BAR needs an address below 4 GiB.
        let Some(at) = windows
            .iter()
            .filter_map(fits)
            .find(|&a| bar.kind == BarKind::Mem64 || a + bar.size <= 1 << 32)
        else {
            continue;
        };
        used.push((at, bar.size));
        out.push((i, bar.index, at));
    }
    out
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
        // SAFETY: the clone only reads (see `Bus::read`).
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

/// The BARs of `function` (6 on an endpoint, 2 on a bridge). Call with
/// decoding off ([`Bus::with_decode_off`]): sizing writes the BARs.
fn bars(root: &mut PciRoot<Cam>, function: DeviceFunction, count: u8) -> Vec<Bar> {
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
            let bars = bus_access.with_decode_off(df, |root| bars(root, df, count));
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
        assign_bars(bus_access, &mut found);
    }
    found
}

/// Writes the BARs [`plan_bars`] placed, then turns on memory decoding
/// and bus mastering for the functions whose memory BARs are all in place.
fn assign_bars(bus_access: &mut Bus, found: &mut [Function]) {
    let plan = plan_bars(found, &bus_access.windows);
    for &(i, index, at) in &plan {
        let df = found[i].address.device_function();
        let Some(bar) = found[i].bars.iter_mut().find(|b| b.index == index) else {
            continue;
        };
        bus_access.with_decode_off(df, |root| match bar.kind {
            BarKind::Mem64 => root.set_bar_64(df, index, at),
            _ => root.set_bar_32(df, index, at as u32),
        });
        bar.address = at;
    }
    for f in found.iter().filter(|f| !f.bridge) {
        let memory = || f.bars.iter().filter(|b| b.kind != BarKind::Io);
        if memory().count() == 0 || memory().any(|b| b.address == 0) {
            continue;
        }
        let df = f.address.device_function();
        let (_, command) = bus_access.root.get_status_command(df);
        let wanted = command | Command::MEMORY_SPACE | Command::BUS_MASTER;
        if wanted != command {
            bus_access.root.set_command(df, wanted);
        }
    }
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

    fn function(device: u8, bars: &[(u8, BarKind, u64, u64)]) -> Function {
        Function {
            address: Address {
                bus: 0,
                device,
                function: 0,
            },
            vendor_id: 0x1af4,
            device_id: 0x1001,
            class: 1,
            subclass: 0,
            prog_if: 0,
            bridge: false,
            bars: bars
                .iter()
                .map(|&(index, kind, address, size)| Bar {
                    index,
                    kind,
                    address,
                    size,
                })
                .collect(),
        }
    }

    #[test]
    fn unassigned_bars_are_placed_aligned_and_clear_of_others() {
        let fs = [
            function(
                1,
                &[
                    (0, BarKind::Io, 0, 0x80),
                    (1, BarKind::Mem32, 0, 0x1000),
                    (4, BarKind::Mem64, 0, 0x4000),
                ],
            ),
            // Already placed by firmware at the window's start.
            function(2, &[(1, BarKind::Mem32, 0xc000_0000, 0x1000)]),
        ];
        let plan = plan_bars(&fs, &[(0xc000_0000, 0x2000_0000)]);
        assert_eq!(
            plan,
            alloc::vec![(0, 4, 0xc000_4000), (0, 1, 0xc000_1000)],
            "largest first, aligned, clear of 0xc0000000+0x1000, no I/O BARs"
        );
        assert!(plan_bars(&fs, &[]).is_empty());
        // A 32-bit BAR never lands above 4 GiB.
        let high = [(0x80_0000_0000, 0x1000_0000)];
        assert_eq!(plan_bars(&fs, &high), alloc::vec![(0, 4, 0x80_0000_0000)]);
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
