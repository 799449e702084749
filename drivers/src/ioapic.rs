//! The first I/O APIC. Every QEMU x86 machine (pc, q35, microvm) puts it
//! at 0xFEC0_0000 with global system interrupts from 0, and the ISA
//! serial lines (IRQ 3 and 4) on their own pins, edge-triggered, active
//! high (QEMU's MADT overrides only IRQ 0 and the PCI/SCI lines).
//! It carries the ISA lines blockhaus wakes on (COM2's receive interrupt,
//! the ACPI power button, the INTx line of a virtio function without
//! MSI-X) to the local APIC; virtio devices interrupt through MSI-X
//! ([`crate::pci::msix`]) where they have it.

pub const BASE: u64 = 0xFEC0_0000;
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const VERSION: u32 = 0x01;
const REDIRECTION: u32 = 0x10;
const MASKED: u32 = 1 << 16;

fn read(reg: u32) -> u32 {
    // SAFETY: the I/O APIC's index/data registers, 32-bit MMIO in the
    // identity map; selecting and reading a register has no side effect.
    unsafe {
        core::ptr::write_volatile((BASE + IOREGSEL) as *mut u32, reg);
        core::ptr::read_volatile((BASE + IOWIN) as *const u32)
    }
}

fn write(reg: u32, value: u32) {
    // SAFETY: as in `read`; only redirection entries are written, by
    // the one owner of the I/O APIC ([`route_edge`]'s caller).
    unsafe {
        core::ptr::write_volatile((BASE + IOREGSEL) as *mut u32, reg);
        core::ptr::write_volatile((BASE + IOWIN) as *mut u32, value);
    }
}

/// How many pins the I/O APIC has, or `None` if nothing answers at
/// [`BASE`] (all ones).
pub fn pins() -> Option<u8> {
    let version = read(VERSION);
    (version != u32::MAX).then_some(((version >> 16) & 0xff) as u8 + 1)
}

/// Routes pin `gsi` (edge-triggered, active high) to `vector` on the
/// local APIC `apic_id`, unmasked. Returns false if there is no such
/// pin.
///
/// # Safety
/// The caller owns the I/O APIC and has an IDT entry for `vector`.
pub unsafe fn route_edge(gsi: u8, vector: u8, apic_id: u8) -> bool {
    if pins().is_none_or(|n| gsi >= n) {
        return false;
    }
    let reg = REDIRECTION + 2 * u32::from(gsi);
    // Masked while the destination is written, then unmasked: fixed
    // delivery, physical destination, edge, active high.
    write(reg, MASKED | u32::from(vector));
    write(reg + 1, u32::from(apic_id) << 24);
    write(reg, u32::from(vector));
    true
}
