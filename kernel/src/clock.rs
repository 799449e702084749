//! The appliance's clocks: monotonic nanoseconds from the calibrated TSC,
//! wall-clock time from the RTC read at boot plus the monotonic clock.

use core::sync::atomic::{AtomicU64, Ordering};
use drivers::{lapic, time};

static BOOT_TSC: AtomicU64 = AtomicU64::new(0);
static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static LAPIC_HZ: AtomicU64 = AtomicU64::new(0);
static BOOT_UNIX_SECONDS: AtomicU64 = AtomicU64::new(0);

/// Records the TSC at entry, before anything else runs.
pub fn mark_boot() {
    BOOT_TSC.store(time::rdtsc(), Ordering::Relaxed);
}

/// Calibrates the TSC and the LAPIC timer against the PIT, reads the RTC.
pub fn init() -> &'static str {
    if let Some((hz, source)) = time::hypervisor_tsc_hz() {
        TSC_HZ.store(hz, Ordering::Relaxed);
        // QEMU's and KVM's APIC bus runs at 1 GHz; the timer divides by 16.
        // SAFETY: boot, interrupts off.
        unsafe { lapic::enable_for_calibration() };
        LAPIC_HZ.store(1_000_000_000 / 16, Ordering::Relaxed);
        read_wall_clock();
        return source;
    }
    // SAFETY: boot, interrupts off; the LAPIC and PIT are ours.
    let cal = unsafe {
        time::calibrate(
            || {
                lapic::enable_for_calibration();
                lapic::restart_count();
            },
            |pit_ticks| {
                let ticks = lapic::elapsed_since_calibration_start();
                // Without a PIT window, QEMU's and KVM's APIC bus runs at 1 GHz.
                let hz = if pit_ticks == 0 {
                    1_000_000_000 / 16
                } else {
                    time::ticks_to_hz(ticks, pit_ticks)
                };
                LAPIC_HZ.store(hz, Ordering::Relaxed);
            },
        )
    };
    TSC_HZ.store(cal.tsc_hz, Ordering::Relaxed);
    read_wall_clock();
    cal.source
}

fn read_wall_clock() {
    // SAFETY: CMOS ports, only touched here.
    match unsafe { time::read_rtc() } {
        Some(now) => BOOT_UNIX_SECONDS.store(
            now.unix_seconds()
                .saturating_sub(monotonic_ns() / 1_000_000_000),
            Ordering::Relaxed,
        ),
        None => log::warn!("no CMOS RTC: event timestamps count from 1970"),
    }
}

pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

pub fn lapic_timer_hz() -> u64 {
    LAPIC_HZ.load(Ordering::Relaxed)
}

/// Nanoseconds since the image started (0 until calibrated).
pub fn monotonic_ns() -> u64 {
    time::ticks_to_ns(
        time::rdtsc().wrapping_sub(BOOT_TSC.load(Ordering::Relaxed)),
        tsc_hz(),
    )
}

/// Wall-clock nanoseconds since the Unix epoch.
pub fn wall_clock_ns() -> u64 {
    BOOT_UNIX_SECONDS.load(Ordering::Relaxed) * 1_000_000_000 + monotonic_ns()
}

/// Wall-clock time as (seconds, microseconds) since the Unix epoch.
pub fn wall_clock() -> (u64, u64) {
    let ns = monotonic_ns();
    (
        BOOT_UNIX_SECONDS.load(Ordering::Relaxed) + ns / 1_000_000_000,
        (ns % 1_000_000_000) / 1000,
    )
}
