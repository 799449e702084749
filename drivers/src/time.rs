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

/// Measures the TSC against PIT channel 0 over 2.5 ms, reading the
/// counter with latch commands (port 0x61's channel-2 gate is the PC
/// speaker's, which microvm lacks). `during` is called at the start of the
/// window and `after` at its end with the PIT ticks elapsed (the kernel
/// calibrates the LAPIC timer in the same window). Without a PIT, the RTC's
/// seconds edge is used (slow: up to 2 s).
///
/// # Safety
/// Programs PIT channel 0 (its IRQ must be masked) and reads the CMOS RTC;
/// call once at boot.
pub unsafe fn calibrate(during: impl FnOnce(), after: impl FnOnce(u64)) -> Calibration {
    const WINDOW_TICKS: u16 = 2_983; // 2.5 ms: 0.03 % resolution
    // SAFETY: PIT ports 0x40/0x43; forwarded to the caller.
    let read_counter = || unsafe {
        outb(0x43, 0x00); // latch channel 0
        let lo = inb(0x40) as u16;
        let hi = inb(0x40) as u16;
        (hi << 8) | lo
    };
    // SAFETY: as above.
    unsafe {
        outb(0x43, 0x34); // channel 0, lobyte/hibyte, mode 2, binary
        outb(0x40, 0xff);
        outb(0x40, 0xff);
    }
    let first = read_counter();
    during();
    let t0 = rdtsc();
    let mut spins: u64 = 0;
    loop {
        let now = read_counter();
        let elapsed = first.wrapping_sub(now);
        if now <= first && elapsed >= WINDOW_TICKS {
            let tsc = rdtsc() - t0;
            after(elapsed as u64);
            return Calibration {
                tsc_hz: ticks_to_hz(tsc, elapsed as u64),
                source: "PIT",
            };
        }
        spins += 1;
        // A counter that has not moved after a thousand reads is no PIT
        // (and every read is a VM exit: do not spin long under KVM).
        if spins > 2_000_000 || (spins > 1000 && now == first) {
            break;
        }
    }
    // No PIT answered: time one RTC second.
    // SAFETY: CMOS ports; forwarded to the caller.
    let second = || unsafe {
        outb(0x70, 0x00);
        inb(0x71)
    };
    let s0 = second();
    let mut guard = 0u64;
    while second() == s0 && guard < 500_000_000 {
        guard += 1;
    }
    let t0 = rdtsc();
    let s1 = second();
    guard = 0;
    while second() == s1 && guard < 500_000_000 {
        guard += 1;
    }
    after(0);
    Calibration {
        tsc_hz: rdtsc() - t0,
        source: "RTC second (no PIT)",
    }
}

/// The TSC frequency a hypervisor states, without any timing loop: under
/// (nested) KVM every port read is a slow VM exit, so the PIT window would
/// take seconds. Tries CPUID leaf 0x15 (crystal ratio), the hypervisor
/// timing leaf 0x40000010, then KVM's pvclock scale.
pub fn hypervisor_tsc_hz() -> Option<(u64, &'static str)> {
    use core::arch::x86_64::__cpuid;
    let max = __cpuid(0).eax;
    if max >= 0x15 {
        let l = __cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return Some((l.ecx as u64 * l.ebx as u64 / l.eax as u64, "CPUID 0x15"));
        }
    }
    if __cpuid(1).ecx & (1 << 31) == 0 {
        return None; // not running under a hypervisor
    }
    let hv = __cpuid(0x4000_0000);
    if hv.eax >= 0x4000_0010 {
        let khz = __cpuid(0x4000_0010).eax as u64;
        if khz != 0 {
            return Some((khz * 1000, "CPUID 0x40000010"));
        }
    }
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&hv.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&hv.ecx.to_le_bytes());
    sig[8..].copy_from_slice(&hv.edx.to_le_bytes());
    if &sig != b"KVMKVMKVM\0\0\0" {
        return None;
    }
    kvm_pvclock_hz().map(|hz| (hz, "KVM pvclock"))
}

/// KVM's `pvclock_vcpu_time_info`: 32 bytes, 4-byte aligned.
#[repr(C, align(64))]
struct PvclockInfo([u32; 8]);
static mut PVCLOCK: PvclockInfo = PvclockInfo([0; 8]);

fn kvm_pvclock_hz() -> Option<u64> {
    use core::arch::x86_64::__cpuid;
    const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
    const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
    if __cpuid(0x4000_0001).eax & KVM_FEATURE_CLOCKSOURCE2 == 0 {
        return None;
    }
    let addr = core::ptr::addr_of!(PVCLOCK) as u64;
    // SAFETY: the MSR exists (feature bit checked); it makes the hypervisor
    // write the structure at `addr`, a static of ours, identity-mapped.
    unsafe {
        x86_64::registers::model_specific::Msr::new(MSR_KVM_SYSTEM_TIME_NEW).write(addr | 1);
    }
    // SAFETY: reading our own static, written by the hypervisor above.
    let (mul, shift) = unsafe {
        let p = core::ptr::addr_of!(PVCLOCK) as *const u32;
        (
            core::ptr::read_volatile(p.add(6)),
            core::ptr::read_volatile(p.add(7)) as u8 as i8,
        )
    };
    // SAFETY: turn the clock update off again (bit 0 clear).
    unsafe { x86_64::registers::model_specific::Msr::new(MSR_KVM_SYSTEM_TIME_NEW).write(0) };
    pvclock_hz(mul, shift)
}

/// TSC frequency from pvclock's scale: ns = ((tsc << shift) * mul) >> 32.
pub fn pvclock_hz(mul: u32, shift: i8) -> Option<u64> {
    if mul == 0 {
        return None;
    }
    let base = (1_000_000_000u128 << 32) / mul as u128;
    let hz = if shift >= 0 {
        base >> shift
    } else {
        base << (-shift)
    };
    Some(hz as u64)
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
    let century = if raw[6] != 0 && raw[6] != 0xff {
        conv(raw[6])
    } else {
        20
    };
    DateTime {
        second: conv(raw[0]),
        minute: conv(raw[1]),
        hour,
        day: conv(raw[3]),
        month: conv(raw[4]),
        year: century * 100 + conv(raw[5]),
    }
}

/// Reads the CMOS RTC, waiting out an update in progress; `None` when no
/// RTC answers (status register A reads as all ones).
///
/// # Safety
/// Uses CMOS ports 0x70/0x71; call when nothing else touches them.
pub unsafe fn read_rtc() -> Option<DateTime> {
    // SAFETY: CMOS index/data ports, forwarded to the caller.
    let reg = |r: u8| unsafe {
        outb(0x70, r);
        inb(0x71)
    };
    let read_all = || {
        [
            reg(0x00),
            reg(0x02),
            reg(0x04),
            reg(0x07),
            reg(0x08),
            reg(0x09),
            reg(0x32),
        ]
    };
    if reg(0x0A) == 0xff {
        return None;
    }
    // An update lasts under 2 ms; every read may be a slow VM exit.
    let mut spins = 0;
    while reg(0x0A) & 0x80 != 0 && spins < 2000 {
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
    Some(decode_rtc(raw, reg(0x0B)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_epoch_and_known_dates() {
        let dt = |year, month, day, hour, minute, second| DateTime {
            year,
            month,
            day,
            hour,
            minute,
            second,
        };
        assert_eq!(dt(1970, 1, 1, 0, 0, 0).unix_seconds(), 0);
        assert_eq!(dt(2000, 3, 1, 0, 0, 0).unix_seconds(), 951_868_800);
        assert_eq!(dt(2026, 11, 29, 19, 50, 54).unix_seconds(), 1_795_981_854);
    }

    #[test]
    fn rtc_bcd_and_12_hour_decoding() {
        // 2026-11-29 19:50:54 in BCD, 24-hour mode.
        let d = decode_rtc([0x54, 0x50, 0x19, 0x29, 0x11, 0x26, 0x20], 0x02);
        assert_eq!(
            d,
            DateTime {
                year: 2026,
                month: 11,
                day: 29,
                hour: 19,
                minute: 50,
                second: 54
            }
        );
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
        // A 2.3 GHz TSC as KVM scales it: shift -1, mul = 2^32 * 1e9 / (2.3e9 / 2).
        let mul = ((1u128 << 32) * 1_000_000_000 / 1_150_000_000) as u32;
        let hz = pvclock_hz(mul, -1).unwrap();
        assert!((2_299_999_000..=2_300_001_000).contains(&hz), "{hz}");
        assert_eq!(pvclock_hz(0, 0), None);
    }
}
