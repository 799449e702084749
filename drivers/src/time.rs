//! Time: the TSC as the monotonic clock, calibrated against the PIT (a known
//! 1.193182 MHz clock) at boot, and the CMOS RTC for wall-clock time (QMP
//! event timestamps). The arithmetic is pure and host-tested.

use crate::port::{inb, outb};

pub const PIT_HZ: u64 = 1_193_182;

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects and exists on every x86_64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Result of a calibration window: TSC ticks (and optionally another
/// counter's ticks) elapsed over `pit_ticks` of the PIT.
pub struct Calibration {
    pub tsc_hz: u64,
    /// How the TSC frequency was found.
    pub source: &'static str,
}

/// Measures the TSC against PIT channel 2 over ~10 ms. `during` is called at
/// the start of the window and `after` at its end (the kernel uses them to
/// calibrate the LAPIC timer in the same window).
///
/// # Safety
/// Programs PIT channel 2 and port 0x61; call once at boot.
pub unsafe fn calibrate(during: impl FnOnce(), after: impl FnOnce(u64)) -> Calibration {
    const WINDOW_TICKS: u16 = 11_932; // ~10 ms
    // SAFETY: legacy PIT and port 0x61 exist on pc, q35 and microvm (pit=on).
    unsafe {
        let gate = inb(0x61);
        outb(0x61, (gate & !0x02) | 0x01); // speaker off, gate on
        outb(0x43, 0xB0); // channel 2, lobyte/hibyte, mode 0, binary
        outb(0x42, (WINDOW_TICKS & 0xff) as u8);
        outb(0x42, (WINDOW_TICKS >> 8) as u8);
        let g = inb(0x61);
        outb(0x61, g & !0x01); // restart the count
        outb(0x61, g | 0x01);
        during();
        let t0 = rdtsc();
        let mut spins: u64 = 0;
        while inb(0x61) & 0x20 == 0 {
            spins += 1;
            if spins > 50_000_000 {
                // No PIT answered: fall back to a nominal frequency.
                after(0);
                return Calibration { tsc_hz: 1_000_000_000, source: "nominal (no PIT)" };
            }
        }
        let elapsed = rdtsc() - t0;
        after(WINDOW_TICKS as u64);
        Calibration { tsc_hz: ticks_to_hz(elapsed, WINDOW_TICKS as u64), source: "PIT" }
    }
}

/// Frequency of a counter that advanced `ticks` during `pit_ticks` PIT ticks.
pub fn ticks_to_hz(ticks: u64, pit_ticks: u64) -> u64 {
    if pit_ticks == 0 {
        return 0;
    }
    ((ticks as u128 * PIT_HZ as u128) / pit_ticks as u128) as u64
}

/// Converts TSC ticks to nanoseconds at `hz`.
pub fn ticks_to_ns(ticks: u64, hz: u64) -> u64 {
    if hz == 0 {
        return 0;
    }
    ((ticks as u128 * 1_000_000_000u128) / hz as u128) as u64
}

/// A wall-clock instant read from the RTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: u32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl DateTime {
    /// Seconds since 1970-01-01T00:00:00Z (the RTC runs in UTC under QEMU's
    /// default `-rtc base=utc`).
    pub fn unix_seconds(&self) -> u64 {
        let days = days_from_civil(self.year as i64, self.month, self.day);
        (days * 86_400) as u64 + (self.hour * 3600 + self.minute * 60 + self.second) as u64
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn bcd(v: u8) -> u32 {
    ((v >> 4) * 10 + (v & 0x0f)) as u32
}

/// Decodes raw CMOS registers (sec, min, hour, day, month, year, century,
/// status B) into a [`DateTime`].
pub fn decode_rtc(raw: [u8; 7], status_b: u8) -> DateTime {
    let binary = status_b & 0x04 != 0;
    let h24 = status_b & 0x02 != 0;
    let conv = |v: u8| if binary { v as u32 } else { bcd(v) };
    let pm = raw[2] & 0x80 != 0;
    let mut hour = conv(raw[2] & 0x7f);
    if !h24 {
        hour %= 12;
        if pm {
            hour += 12;
        }
    }
    let century = if raw[6] != 0 && raw[6] != 0xff { conv(raw[6]) } else { 20 };
    DateTime {
        second: conv(raw[0]),
        minute: conv(raw[1]),
        hour,
        day: conv(raw[3]),
        month: conv(raw[4]),
        year: century * 100 + conv(raw[5]),
    }
}

/// Reads the CMOS RTC, waiting out an update in progress.
///
/// # Safety
/// Uses CMOS ports 0x70/0x71; call when nothing else touches them.
pub unsafe fn read_rtc() -> DateTime {
    // SAFETY: CMOS index/data ports, forwarded to the caller.
    let reg = |r: u8| unsafe {
        outb(0x70, r);
        inb(0x71)
    };
    let read_all = || [reg(0x00), reg(0x02), reg(0x04), reg(0x07), reg(0x08), reg(0x09), reg(0x32)];
    let mut spins = 0;
    while reg(0x0A) & 0x80 != 0 && spins < 1_000_000 {
        spins += 1;
    }
    let mut raw = read_all();
    // Read until two reads agree, so no update tears the value.
    for _ in 0..5 {
        let again = read_all();
        if again == raw {
            break;
        }
        raw = again;
    }
    decode_rtc(raw, reg(0x0B))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_epoch_and_known_dates() {
        let dt = |year, month, day, hour, minute, second| DateTime { year, month, day, hour, minute, second };
        assert_eq!(dt(1970, 1, 1, 0, 0, 0).unix_seconds(), 0);
        assert_eq!(dt(2000, 3, 1, 0, 0, 0).unix_seconds(), 951_868_800);
        assert_eq!(dt(2026, 11, 29, 19, 50, 54).unix_seconds(), 1_795_981_854);
    }

    #[test]
    fn rtc_bcd_and_12_hour_decoding() {
        // 2026-11-29 19:50:54 in BCD, 24-hour mode.
        let d = decode_rtc([0x54, 0x50, 0x19, 0x29, 0x11, 0x26, 0x20], 0x02);
        assert_eq!(d, DateTime { year: 2026, month: 11, day: 29, hour: 19, minute: 50, second: 54 });
        // 7 PM in 12-hour BCD mode; binary mode.
        assert_eq!(decode_rtc([0, 0, 0x87, 1, 1, 0x26, 0x20], 0x00).hour, 19);
        assert_eq!(decode_rtc([54, 50, 19, 29, 11, 26, 20], 0x06).second, 54);
        // No century register: assume 20xx.
        assert_eq!(decode_rtc([0, 0, 0, 1, 1, 0x26, 0], 0x02).year, 2026);
    }

    #[test]
    fn frequency_arithmetic() {
        assert_eq!(ticks_to_hz(1_000_000_000, PIT_HZ), 1_000_000_000);
        assert_eq!(ticks_to_hz(500, PIT_HZ / 2), 1000);
        assert_eq!(ticks_to_ns(3_000_000_000, 3_000_000_000), 1_000_000_000);
        assert_eq!(ticks_to_hz(1, 0), 0);
    }
}
