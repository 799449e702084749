//! How deep the boot stack has gone: its unused part is painted first thing
//! at boot, and the halt report says how much of it was ever written. The
//! stack is 512 KiB (`boot/linker.ld`) with an unmapped guard page below;
//! an unoptimised build keeps every temporary in its own slot, so its
//! frames are many times a release build's, and this is what shows how
//! close a build comes to the guard page.

use core::ptr::addr_of;

unsafe extern "C" {
    static __stack_bottom: u8;
    static __stack_top: u8;
}

/// What unused stack holds until something writes it.
const PAINT: u64 = 0x6b63_6174_735f_6268;
/// Left unpainted below the painter's own stack pointer.
const MARGIN: u64 = 4096;

fn bounds() -> (u64, u64) {
    (
        addr_of!(__stack_bottom) as u64,
        addr_of!(__stack_top) as u64,
    )
}

/// Paints the boot stack below the caller. Call it first thing, with
/// interrupts off.
pub fn paint() {
    let (bottom, _) = bounds();
    let rsp: u64;
    // SAFETY: reads the stack pointer; touches nothing.
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags))
    };
    let end = rsp.saturating_sub(MARGIN) & !7;
    if end <= bottom {
        return;
    }
    // SAFETY: [bottom, end) is the boot stack at least MARGIN below this
    // function's stack pointer: no frame lives there, interrupts are off so
    // no handler can push one, and `rep stosq` calls nothing. The ABI
    // guarantees the direction flag is clear.
    unsafe {
        core::arch::asm!(
            "rep stosq",
            inout("rdi") bottom => _,
            inout("rcx") (end - bottom) / 8 => _,
            in("rax") PAINT,
            options(nostack, preserves_flags)
        )
    };
}

/// (deepest use, size) of the boot stack in bytes: from its top down to
/// the lowest word that no longer holds the paint.
pub fn usage() -> (u64, u64) {
    let (bottom, top) = bounds();
    let mut p = bottom;
    // SAFETY: [bottom, top) is the boot stack, mapped and 8-byte aligned;
    // reading any word of it has no effect.
    while p < top && unsafe { core::ptr::read_volatile(p as *const u64) } == PAINT {
        p += 8;
    }
    (top - p, top - bottom)
}
