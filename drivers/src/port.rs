//! Port I/O helpers shared by the drivers.

use x86_64::instructions::port::Port;

/// # Safety
/// Port I/O with side effects: the caller owns the device at `port`.
pub unsafe fn inb(port: u16) -> u8 {
    // SAFETY: forwarded to the caller.
    unsafe { Port::<u8>::new(port).read() }
}

/// # Safety
/// As [`inb`].
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: forwarded to the caller.
    unsafe { Port::<u8>::new(port).write(value) }
}

/// # Safety
/// As [`inb`].
pub unsafe fn inw(port: u16) -> u16 {
    // SAFETY: forwarded to the caller.
    unsafe { Port::<u16>::new(port).read() }
}

/// # Safety
/// As [`inb`].
pub unsafe fn outw(port: u16, value: u16) {
    // SAFETY: forwarded to the caller.
    unsafe { Port::<u16>::new(port).write(value) }
}

/// # Safety
/// As [`inb`].
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: forwarded to the caller.
    unsafe { Port::<u32>::new(port).write(value) }
}
