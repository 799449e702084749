//! The local APIC (xAPIC, MMIO at 0xFEE0_0000, identity-mapped): software
//! enable, its ID (the destination of MSI-X messages and IOAPIC routes),
//! and the timer: one-shot, armed for the next deadline before the CPU
//! halts (tickless idle).

pub const BASE: u64 = 0xFEE0_0000;
const ID: u64 = 0x20;
const SVR: u64 = 0xF0;
const EOI: u64 = 0xB0;
const LVT_TIMER: u64 = 0x320;
const TIMER_INIT: u64 = 0x380;
const TIMER_CURRENT: u64 = 0x390;
const TIMER_DIVIDE: u64 = 0x3E0;
const MASKED: u32 = 1 << 16;

pub const SPURIOUS_VECTOR: u8 = 0xFF;

fn write(reg: u64, value: u32) {
    // SAFETY: LAPIC registers are 32-bit MMIO in the identity map.
    unsafe { core::ptr::write_volatile((BASE + reg) as *mut u32, value) }
}

fn read(reg: u64) -> u32 {
    // SAFETY: as in `write`.
    unsafe { core::ptr::read_volatile((BASE + reg) as *const u32) }
}

/// Software-enables the LAPIC and starts the timer counting down from
/// `u32::MAX` (masked), so its rate can be measured.
///
/// # Safety
/// Call once at boot with interrupts disabled.
pub unsafe fn enable_for_calibration() {
    write(SVR, 0x100 | SPURIOUS_VECTOR as u32);
    write(TIMER_DIVIDE, 0x3); // divide by 16
    write(LVT_TIMER, MASKED);
    write(TIMER_INIT, u32::MAX);
}

/// Ticks the timer has counted since [`enable_for_calibration`].
pub fn elapsed_since_calibration_start() -> u64 {
    (u32::MAX - read(TIMER_CURRENT)) as u64
}

/// Restarts the calibration count.
pub fn restart_count() {
    write(TIMER_INIT, u32::MAX);
}

/// This CPU's local APIC ID (xAPIC: bits 31:24 of the ID register).
pub fn id() -> u8 {
    (read(ID) >> 24) as u8
}

/// Arms the one-shot timer: one interrupt on `vector` after `ticks` timer
/// ticks (at the rate [`enable_for_calibration`] measured, divide by 16).
/// Re-arming restarts the count; [`disarm`] cancels it.
pub fn arm_oneshot(vector: u8, ticks: u32) {
    write(LVT_TIMER, vector as u32);
    write(TIMER_DIVIDE, 0x3);
    write(TIMER_INIT, ticks.max(1));
}

/// Cancels an armed one-shot (a zero initial count stops the timer).
pub fn disarm() {
    write(TIMER_INIT, 0);
}

/// Stops the timer (at halt).
pub fn stop_timer() {
    write(LVT_TIMER, MASKED);
    write(TIMER_INIT, 0);
}

/// Signals end of interrupt.
pub fn eoi() {
    write(EOI, 0);
}
