//! The legacy 8259 PICs. The firmware leaves them at vector base 8, where
//! IRQ 0 would look like a double fault: remap them above the exceptions
//! (0x20/0x28) and mask every line; blockhaus takes interrupts from the
//! local APIC (ISA lines through the I/O APIC, [`crate::ioapic`]).

use crate::port::outb;

/// # Safety
/// Reprograms both PICs; call once at boot with interrupts disabled.
pub unsafe fn remap_and_mask() {
    // SAFETY: standard 8259 initialisation sequence on ports 0x20/0x21/0xA0/0xA1.
    unsafe {
        outb(0x20, 0x11);
        outb(0xA0, 0x11);
        outb(0x21, 0x20);
        outb(0xA1, 0x28);
        outb(0x21, 0x04);
        outb(0xA1, 0x02);
        outb(0x21, 0x01);
        outb(0xA1, 0x01);
        outb(0x21, 0xff);
        outb(0xA1, 0xff);
    }
}
