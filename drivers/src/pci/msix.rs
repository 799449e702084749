//! MSI-X (PCI 3.0 §6.8.2) for virtio-pci functions, and the routing of
//! virtio queues to its vectors (virtio 1.x §4.1.4.3, §4.1.5.1.2).
//!
//! blockhaus needs one thing from a device interrupt: that it ends `hlt`.
//! So [`Msix::enable`] points every table entry at one IDT vector on the
//! boot CPU, and [`route_virtio_queues`] sends the chosen queues' used-ring
//! notifications to entry 0; the main loop then polls every device, as it
//! does when busy. QEMU's virtio-pci functions all have MSI-X (BAR1 holds
//! the table); a function without it (`vectors=0`) interrupts through
//! INTx ([`intx_line`], [`enable_intx`]) on the ISA IRQ the firmware gave it, and its
//! ISR ([`virtio_isr`]) must be read to lower the line.

use super::{BarKind, Bus, Function};
use virtio_drivers::transport::pci::bus::DeviceFunction;

const CAP_MSIX: u8 = 0x11;
const CAP_VENDOR: u8 = 0x09;
/// Message Control (bits 31:16 of the capability's first dword).
const MSIX_ENABLE: u32 = 1 << 31;
const FUNCTION_MASK: u32 = 1 << 30;
const TABLE_ENTRY_BYTES: u64 = 16;
/// Where MSI messages to the local APICs are written (Intel SDM 11.11.1).
const MSI_ADDRESS: u32 = 0xFEE0_0000;

/// virtio's `VIRTIO_PCI_CAP_COMMON_CFG` and the common configuration's
/// MSI-X fields.
const VIRTIO_COMMON_CFG: u8 = 1;
const MSIX_CONFIG: u64 = 0x10;
/// `VIRTIO_PCI_CAP_ISR_CFG`.
const VIRTIO_ISR_CFG: u8 = 3;
/// Configuration space: the command register and Interrupt Line/Pin.
const COMMAND: u8 = 0x04;
const INTX_DISABLE: u32 = 1 << 10;
const INTERRUPT_LINE: u8 = 0x3C;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_MSIX_VECTOR: u64 = 0x1A;
/// "No vector": the device does not interrupt for that queue.
pub const NO_VECTOR: u16 = 0xFFFF;

/// A function's MSI-X capability.
#[derive(Clone, Copy, Debug)]
pub struct Msix {
    function: DeviceFunction,
    /// Offset of the capability in configuration space.
    cap: u8,
    /// Address of the vector table (in a memory BAR, identity-mapped).
    table: u64,
    /// Table entries.
    pub entries: u16,
}

impl Msix {
    /// `f`'s MSI-X capability, if it has one whose table lies in one of
    /// its memory BARs.
    pub fn find(bus: &mut Bus, f: &Function) -> Option<Msix> {
        let function = f.address.device_function();
        let cap = bus
            .root()
            .capabilities(function)
            .find(|c| c.id == CAP_MSIX)?;
        let entries = (cap.private_header & 0x7ff) + 1;
        let table = bus.read(function, cap.offset + 4);
        let bir = (table & 0x7) as u8;
        let bar = f
            .bars
            .iter()
            .find(|b| b.index == bir && b.kind != BarKind::Io && b.address != 0)?;
        let offset = u64::from(table & !0x7);
        if offset + u64::from(entries) * TABLE_ENTRY_BYTES > bar.size {
            return None;
        }
        Some(Msix {
            function,
            cap: cap.offset,
            table: bar.address + offset,
            entries,
        })
    }

    /// Points every table entry at `vector` on the local APIC `apic_id`
    /// (fixed delivery, edge), unmasks them and enables MSI-X; the
    /// function's INTx line goes quiet.
    ///
    /// # Safety
    /// The table must be identity-mapped device memory that nothing else
    /// uses, and `vector` must have an IDT entry.
    pub unsafe fn enable(&self, bus: &mut Bus, apic_id: u8, vector: u8) {
        let entry = [
            MSI_ADDRESS | (u32::from(apic_id) << 12),
            0,
            u32::from(vector),
            0,
        ];
        for i in 0..u64::from(self.entries) {
            let base = self.table + i * TABLE_ENTRY_BYTES;
            for (w, value) in entry.iter().enumerate() {
                // SAFETY: inside the table (checked against the BAR in
                // `find`), which the caller owns; 32-bit accesses as the
                // PCI spec requires.
                unsafe { core::ptr::write_volatile((base + 4 * w as u64) as *mut u32, *value) };
            }
        }
        let control = bus.read(self.function, self.cap);
        bus.write(
            self.function,
            self.cap,
            (control | MSIX_ENABLE) & !FUNCTION_MASK,
        );
    }

    /// Whether MSI-X is enabled in configuration space.
    pub fn enabled(&self, bus: &Bus) -> bool {
        bus.read(self.function, self.cap) & MSIX_ENABLE != 0
    }
}

/// The address of `f`'s virtio common configuration structure (its
/// `VIRTIO_PCI_CAP_COMMON_CFG` capability).
pub fn virtio_common_cfg(bus: &mut Bus, f: &Function) -> Option<u64> {
    virtio_structure(bus, f, VIRTIO_COMMON_CFG, 0x38)
}

/// The address of `f`'s virtio ISR status byte (`VIRTIO_PCI_CAP_ISR_CFG`),
/// if its BAR is a memory BAR. Reading it returns the pending causes and
/// deasserts the function's INTx line (virtio 1.x §4.1.4.5).
pub fn virtio_isr(bus: &mut Bus, f: &Function) -> Option<u64> {
    virtio_structure(bus, f, VIRTIO_ISR_CFG, 1)
}

/// The address of `f`'s virtio structure of type `cfg_type` (a vendor
/// capability), when it lies in a placed memory BAR with `len` bytes.
fn virtio_structure(bus: &mut Bus, f: &Function, cfg_type: u8, len: u64) -> Option<u64> {
    let function = f.address.device_function();
    let caps: alloc::vec::Vec<_> = bus
        .root()
        .capabilities(function)
        .filter(|c| c.id == CAP_VENDOR && (c.private_header >> 8) as u8 == cfg_type)
        .collect();
    caps.iter().find_map(|cap| {
        let bir = (bus.read(function, cap.offset + 4) & 0xff) as u8;
        let offset = u64::from(bus.read(function, cap.offset + 8));
        let bar = f
            .bars
            .iter()
            .find(|b| b.index == bir && b.kind != BarKind::Io && b.address != 0)?;
        (offset + len <= bar.size).then_some(bar.address + offset)
    })
}

/// `f`'s legacy interrupt: the ISA IRQ its INTx pin reaches (the
/// Interrupt Line the firmware wrote: SeaBIOS and OVMF both route every
/// PIRQ to an ISA IRQ, which QEMU's pc and q35 raise on that I/O APIC pin
/// too). `None` if the function has no pin or no firmware gave it a line
/// (0 or 0xff).
pub fn intx_line(bus: &mut Bus, f: &Function) -> Option<u8> {
    let reg = bus.read(f.address.device_function(), INTERRUPT_LINE);
    let (line, pin) = ((reg & 0xff) as u8, ((reg >> 8) & 0xff) as u8);
    (pin != 0 && line != 0 && line < 16).then_some(line)
}

/// Lets `f` assert INTx (clears Interrupt Disable in its command
/// register). Call once its line is routed ([`intx_line`]): a function
/// asserting a pin another device's route owns would hold that pin high.
pub fn enable_intx(bus: &mut Bus, f: &Function) {
    let function = f.address.device_function();
    // Command is the low half of the dword at 4 (the status half is
    // write-one-to-clear: write zeroes there).
    let command = bus.read(function, COMMAND) & 0xffff;
    bus.write(function, COMMAND, command & !INTX_DISABLE);
}

/// Sends the used-ring notifications of `queues` to MSI-X entry 0 and
/// turns configuration-change interrupts off, through the common
/// configuration at `common`. Call after the driver set the queues up (a
/// device reset clears the routing). Returns false if the device refused a
/// vector (it reads back [`NO_VECTOR`]).
///
/// # Safety
/// `common` must be the identity-mapped common configuration of a virtio
/// device whose driver is not using it concurrently (single-threaded).
pub unsafe fn route_virtio_queues(common: u64, queues: &[u16]) -> bool {
    let w = |reg: u64, v: u16| {
        // SAFETY: a 16-bit register of the common configuration (caller).
        unsafe { core::ptr::write_volatile((common + reg) as *mut u16, v) }
    };
    let r = |reg: u64| {
        // SAFETY: as `w`.
        unsafe { core::ptr::read_volatile((common + reg) as *const u16) }
    };
    w(MSIX_CONFIG, NO_VECTOR);
    queues.iter().all(|&q| {
        w(QUEUE_SELECT, q);
        w(QUEUE_MSIX_VECTOR, 0);
        r(QUEUE_MSIX_VECTOR) == 0
    })
}
