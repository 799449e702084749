//! ACPI, as much as a storage appliance needs: find the FADT through the
//! RSDP (RSDT or XSDT), read the PM1 blocks (or, on hardware-reduced ACPI
//! such as QEMU's microvm, the sleep control register), and the S5 sleep
//! type from the DSDT's `_S5_` package, so that [`PowerOff::execute`] turns
//! the machine off and QEMU exits 0.
//!
//! Parsing goes through [`PhysMem`], so it is tested on the host with
//! synthetic tables.

/// Read access to physical memory (identity-mapped in the kernel).
pub trait PhysMem {
    fn read(&self, addr: u64, buf: &mut [u8]);

    fn read_u8(&self, addr: u64) -> u8 {
        let mut b = [0u8; 1];
        self.read(addr, &mut b);
        b[0]
    }
    fn read_u16(&self, addr: u64) -> u16 {
        let mut b = [0u8; 2];
        self.read(addr, &mut b);
        u16::from_le_bytes(b)
    }
    fn read_u32(&self, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(addr, &mut b);
        u32::from_le_bytes(b)
    }
    fn read_u64(&self, addr: u64) -> u64 {
        let mut b = [0u8; 8];
        self.read(addr, &mut b);
        u64::from_le_bytes(b)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    NoRsdp,
    BadRsdpSignature,
    NoFadt,
    NoDsdt,
    NoS5,
    BadS5Package,
    NoControlRegister,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Error::NoRsdp => "the loader gave no RSDP",
            Error::BadRsdpSignature => "RSDP signature is not 'RSD PTR '",
            Error::NoFadt => "no FADT (FACP) in the RSDT/XSDT",
            Error::NoDsdt => "the FADT names no DSDT",
            Error::NoS5 => "the DSDT has no _S5_ object",
            Error::BadS5Package => "the DSDT's _S5_ package is malformed",
            Error::NoControlRegister => {
                "the FADT has neither a PM1a control block nor a sleep control register"
            }
        })
    }
}

/// ACPI Generic Address Structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gas {
    pub space: AddressSpace,
    pub bit_width: u8,
    pub address: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressSpace {
    Memory,
    Io,
    Other(u8),
}

impl Gas {
    fn read(mem: &dyn PhysMem, at: u64) -> Self {
        let space = match mem.read_u8(at) {
            0 => AddressSpace::Memory,
            1 => AddressSpace::Io,
            other => AddressSpace::Other(other),
        };
        Gas {
            space,
            bit_width: mem.read_u8(at + 1),
            address: mem.read_u64(at + 4),
        }
    }
}

/// How to enter S5 on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerOff {
    /// Classic ACPI (q35, pc): write `SLP_TYPa << 10 | SLP_EN` to PM1a_CNT
    /// (and PM1b_CNT when present).
    Pm1 {
        pm1a_cnt: u16,
        pm1b_cnt: Option<u16>,
        slp_typa: u8,
        slp_typb: u8,
    },
    /// Hardware-reduced ACPI (microvm): write `SLP_TYP << 2 | SLP_EN` to the
    /// sleep control register.
    SleepControl { reg: Gas, slp_typ: u8 },
}

/// What the kernel keeps from the FADT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fadt {
    pub poweroff: PowerOff,
    /// PM1a event block (status, then enable), where the power button
    /// status bit lives; `None` on hardware-reduced ACPI.
    pub pm1a_evt: Option<u16>,
    pub pm1_evt_len: u8,
    pub sci_irq: u16,
    pub hw_reduced: bool,
}

const FADT_HW_REDUCED: u32 = 1 << 20;

/// Finds the FADT and the S5 sleep type, starting from the RSDP.
pub fn parse(mem: &dyn PhysMem, rsdp: Option<u64>) -> Result<Fadt, Error> {
    let rsdp = rsdp.ok_or(Error::NoRsdp)?;
    let mut sig = [0u8; 8];
    mem.read(rsdp, &mut sig);
    if &sig != b"RSD PTR " {
        return Err(Error::BadRsdpSignature);
    }
    let revision = mem.read_u8(rsdp + 15);
    let xsdt = if revision >= 2 {
        mem.read_u64(rsdp + 24)
    } else {
        0
    };
    let fadt = if xsdt != 0 {
        find_table(mem, xsdt, 8, b"FACP")
    } else {
        find_table(mem, mem.read_u32(rsdp + 16) as u64, 4, b"FACP")
    }
    .ok_or(Error::NoFadt)?;

    let len = mem.read_u32(fadt + 4);
    let flags = if len >= 116 {
        mem.read_u32(fadt + 112)
    } else {
        0
    };
    let hw_reduced = flags & FADT_HW_REDUCED != 0;
    let mut dsdt = mem.read_u32(fadt + 40) as u64;
    if len >= 148 {
        let x = mem.read_u64(fadt + 140);
        if x != 0 {
            dsdt = x;
        }
    }
    if dsdt == 0 {
        return Err(Error::NoDsdt);
    }
    let (slp_typa, slp_typb) = find_s5(mem, dsdt)?;
    let pm1a_cnt = mem.read_u32(fadt + 64) as u16;
    let pm1b_cnt = mem.read_u32(fadt + 68) as u16;
    let pm1a_evt = mem.read_u32(fadt + 56) as u16;
    let poweroff = if pm1a_cnt != 0 {
        PowerOff::Pm1 {
            pm1a_cnt,
            pm1b_cnt: (pm1b_cnt != 0).then_some(pm1b_cnt),
            slp_typa,
            slp_typb,
        }
    } else if len >= 256 {
        let reg = Gas::read(mem, fadt + 244);
        if reg.address == 0 {
            return Err(Error::NoControlRegister);
        }
        PowerOff::SleepControl {
            reg,
            slp_typ: slp_typa,
        }
    } else {
        return Err(Error::NoControlRegister);
    };
    Ok(Fadt {
        poweroff,
        pm1a_evt: (pm1a_evt != 0).then_some(pm1a_evt),
        pm1_evt_len: mem.read_u8(fadt + 88),
        sci_irq: mem.read_u16(fadt + 46),
        hw_reduced,
    })
}

fn find_table(mem: &dyn PhysMem, sdt: u64, entry_size: u64, sig: &[u8; 4]) -> Option<u64> {
    if sdt == 0 {
        return None;
    }
    let len = mem.read_u32(sdt + 4) as u64;
    let entries = len.saturating_sub(36) / entry_size;
    (0..entries.min(256)).find_map(|i| {
        let at = sdt + 36 + i * entry_size;
        let table = if entry_size == 8 {
            mem.read_u64(at)
        } else {
            mem.read_u32(at) as u64
        };
        let mut s = [0u8; 4];
        mem.read(table, &mut s);
        (&s == sig).then_some(table)
    })
}

/// Reads `Name (_S5_, Package () { SLP_TYPa, SLP_TYPb, ... })` from the DSDT.
fn find_s5(mem: &dyn PhysMem, dsdt: u64) -> Result<(u8, u8), Error> {
    let len = (mem.read_u32(dsdt + 4) as u64).min(1 << 20);
    // Scan the AML in chunks for "_S5_" preceded by NameOp (0x08) or '\'.
    let mut i = 36;
    while i + 4 < len {
        if mem.read_u8(dsdt + i) == b'_' {
            let mut s = [0u8; 4];
            mem.read(dsdt + i, &mut s);
            let prev = mem.read_u8(dsdt + i - 1);
            if &s == b"_S5_" && (prev == 0x08 || prev == b'\\') {
                return parse_s5_package(mem, dsdt + i + 4, dsdt + len);
            }
        }
        i += 1;
    }
    Err(Error::NoS5)
}

fn parse_s5_package(mem: &dyn PhysMem, mut at: u64, end: u64) -> Result<(u8, u8), Error> {
    if mem.read_u8(at) != 0x12 {
        return Err(Error::BadS5Package); // PackageOp
    }
    at += 1;
    let lead = mem.read_u8(at);
    at += 1 + (lead >> 6) as u64; // PkgLength
    at += 1; // NumElements
    let mut next = || -> Result<u8, Error> {
        if at >= end {
            return Err(Error::BadS5Package);
        }
        let op = mem.read_u8(at);
        let (value, size) = match op {
            0x00 => (0, 1),                   // ZeroOp
            0x01 => (1, 1),                   // OneOp
            0x0A => (mem.read_u8(at + 1), 2), // BytePrefix
            0x0B => (mem.read_u8(at + 1), 3), // WordPrefix
            0x0C => (mem.read_u8(at + 1), 5), // DWordPrefix
            _ => return Err(Error::BadS5Package),
        };
        at += size;
        Ok(value)
    };
    let a = next()?;
    let b = next().unwrap_or(a);
    Ok((a, b))
}

impl PowerOff {
    /// Enters S5. Returns only if the machine did not turn off.
    ///
    /// # Safety
    /// Turns the machine off: everything must already be flushed. The
    /// register addresses must come from this machine's ACPI tables.
    pub unsafe fn execute(&self) {
        use crate::port::{outb, outw};
        const SLP_EN: u16 = 1 << 13;
        match *self {
            PowerOff::Pm1 {
                pm1a_cnt,
                pm1b_cnt,
                slp_typa,
                slp_typb,
            } => {
                // SAFETY: ports from the FADT; forwarded to the caller.
                unsafe {
                    outw(pm1a_cnt, ((slp_typa as u16 & 7) << 10) | SLP_EN);
                    if let Some(b) = pm1b_cnt {
                        outw(b, ((slp_typb as u16 & 7) << 10) | SLP_EN);
                    }
                }
            }
            PowerOff::SleepControl { reg, slp_typ } => {
                let value = ((slp_typ & 7) << 2) | (1 << 5);
                match reg.space {
                    // SAFETY: register from the FADT; forwarded to the caller.
                    AddressSpace::Io => unsafe { outb(reg.address as u16, value) },
                    // SAFETY: identity-mapped MMIO register from the FADT.
                    AddressSpace::Memory => unsafe {
                        core::ptr::write_volatile(reg.address as *mut u8, value)
                    },
                    AddressSpace::Other(_) => {}
                }
            }
        }
    }
}

/// The power button, polled (no SCI handler needed): QEMU's
/// `system_powerdown` (what `virsh shutdown` sends) sets PWRBTN_STS in the
/// PM1a status register on pc/q35, or the power-down bit of the Generic
/// Event Device's selector on hardware-reduced microvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerButton {
    /// PM1a event block: status at `status`, enable at `status + len / 2`.
    Pm1 { status: u16, enable: u16 },
    /// QEMU's GED event selector (MMIO, read-to-clear).
    Ged { selector: u64 },
}

const PWRBTN: u16 = 1 << 8;
/// QEMU's GED lays its sleep registers 0x200 after the event selector.
const GED_REGS_OFFSET: u64 = 0x200;
const GED_PWR_DOWN_EVT: u32 = 0x2;

impl Fadt {
    /// Where this machine's power button is reported, if anywhere.
    pub fn power_button(&self) -> Option<PowerButton> {
        match (self.pm1a_evt, self.poweroff) {
            (Some(status), _) if self.pm1_evt_len >= 4 => Some(PowerButton::Pm1 {
                status,
                enable: status + (self.pm1_evt_len / 2) as u16,
            }),
            (None, PowerOff::SleepControl { reg, .. })
                if self.hw_reduced && reg.space == AddressSpace::Memory =>
            {
                Some(PowerButton::Ged {
                    selector: reg.address.checked_sub(GED_REGS_OFFSET)?,
                })
            }
            _ => None,
        }
    }
}

impl PowerButton {
    /// Arms the button: clears a stale status and sets PWRBTN_EN.
    ///
    /// # Safety
    /// The registers must be this machine's, from its FADT.
    pub unsafe fn enable(&self) {
        use crate::port::{inw, outw};
        if let PowerButton::Pm1 { status, enable } = *self {
            // SAFETY: PM1 registers from the FADT; forwarded to the caller.
            unsafe {
                outw(status, PWRBTN); // write-1-to-clear
                outw(enable, inw(enable) | PWRBTN);
            }
        }
    }

    /// Whether the button was pressed since the last call (clears it).
    ///
    /// # Safety
    /// As [`enable`](Self::enable).
    pub unsafe fn pressed(&self) -> bool {
        use crate::port::{inw, outw};
        match *self {
            PowerButton::Pm1 { status, .. } => {
                // SAFETY: PM1 status register from the FADT.
                let sts = unsafe { inw(status) };
                if sts & PWRBTN != 0 {
                    // SAFETY: as above; write-1-to-clear.
                    unsafe { outw(status, PWRBTN) };
                    return true;
                }
                false
            }
            PowerButton::Ged { selector } => {
                // SAFETY: QEMU's GED selector, identity-mapped MMIO; reading
                // returns and clears the pending events.
                let sel = unsafe { core::ptr::read_volatile(selector as *const u32) };
                sel & GED_PWR_DOWN_EVT != 0
            }
        }
    }
}

/// The kernel's view of physical memory: identity-mapped reads.
pub struct IdentityMapped;

impl PhysMem for IdentityMapped {
    fn read(&self, addr: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: ACPI tables lie in identity-mapped memory below 4 GiB;
            // volatile byte reads have no alignment requirement.
            *b = unsafe { core::ptr::read_volatile((addr + i as u64) as *const u8) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    struct Mem(Vec<u8>);
    impl PhysMem for Mem {
        fn read(&self, addr: u64, buf: &mut [u8]) {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = self.0.get(addr as usize + i).copied().unwrap_or(0xff);
            }
        }
    }

    fn put(m: &mut [u8], at: usize, bytes: &[u8]) {
        m[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// RSDP at 0x100 (rev 0) → RSDT at 0x200 → FADT at 0x300 → DSDT at 0x500.
    fn machine(s5: &[u8], pm1a_cnt: u32, hw_reduced: bool) -> Mem {
        let mut m = vec![0u8; 0x1000];
        put(&mut m, 0x100, b"RSD PTR ");
        put(&mut m, 0x100 + 16, &0x200u32.to_le_bytes());
        put(&mut m, 0x200, b"RSDT");
        put(&mut m, 0x204, &40u32.to_le_bytes());
        put(&mut m, 0x200 + 36, &0x300u32.to_le_bytes());
        put(&mut m, 0x300, b"FACP");
        put(&mut m, 0x304, &276u32.to_le_bytes());
        put(&mut m, 0x300 + 40, &0x500u32.to_le_bytes());
        put(&mut m, 0x300 + 56, &0x600u32.to_le_bytes());
        put(&mut m, 0x300 + 64, &pm1a_cnt.to_le_bytes());
        let flags: u32 = if hw_reduced { FADT_HW_REDUCED } else { 0 };
        put(&mut m, 0x300 + 112, &flags.to_le_bytes());
        // sleep control register: memory space, 8 bits, at 0xfea00204
        put(&mut m, 0x300 + 244, &[0, 8, 0, 1]);
        put(&mut m, 0x300 + 248, &0xfea0_0204u64.to_le_bytes());
        put(&mut m, 0x500, b"DSDT");
        let mut aml = b"\x10\x05\\_SB_\x08".to_vec();
        aml.extend_from_slice(b"_S5_");
        aml.extend_from_slice(s5);
        put(&mut m, 0x500 + 36, &aml);
        put(&mut m, 0x504, &((36 + aml.len()) as u32).to_le_bytes());
        Mem(m)
    }

    #[test]
    fn q35_style_zero_op_package() {
        // Package (0x04) { Zero, Zero, Zero, Zero }
        let m = machine(&[0x12, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00], 0x604, false);
        let f = parse(&m, Some(0x100)).expect("parse");
        assert_eq!(
            f.poweroff,
            PowerOff::Pm1 {
                pm1a_cnt: 0x604,
                pm1b_cnt: None,
                slp_typa: 0,
                slp_typb: 0
            }
        );
        assert_eq!(f.pm1a_evt, Some(0x600));
    }

    #[test]
    fn byte_prefix_values() {
        let m = machine(&[0x12, 0x08, 0x02, 0x0A, 0x05, 0x0A, 0x05], 0xb004, false);
        let f = parse(&m, Some(0x100)).expect("parse");
        assert_eq!(
            f.poweroff,
            PowerOff::Pm1 {
                pm1a_cnt: 0xb004,
                pm1b_cnt: None,
                slp_typa: 5,
                slp_typb: 5
            }
        );
    }

    #[test]
    fn hardware_reduced_uses_sleep_control() {
        let m = machine(&[0x12, 0x04, 0x01, 0x0A, 0x05], 0, true);
        let f = parse(&m, Some(0x100)).expect("parse");
        assert!(f.hw_reduced);
        match f.poweroff {
            PowerOff::SleepControl { reg, slp_typ } => {
                assert_eq!(slp_typ, 5);
                assert_eq!(reg.address, 0xfea0_0204);
                assert_eq!(reg.space, AddressSpace::Memory);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn power_button_location() {
        let m = machine(&[0x12, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00], 0x604, false);
        let mut f = parse(&m, Some(0x100)).expect("parse");
        f.pm1_evt_len = 4;
        assert_eq!(
            f.power_button(),
            Some(PowerButton::Pm1 {
                status: 0x600,
                enable: 0x602
            })
        );
        let m = machine(&[0x12, 0x04, 0x01, 0x0A, 0x05], 0, true);
        let mut f = parse(&m, Some(0x100)).expect("parse");
        f.pm1a_evt = None;
        assert_eq!(
            f.power_button(),
            Some(PowerButton::Ged {
                selector: 0xfea0_0004
            })
        );
    }

    #[test]
    fn clear_errors_for_missing_pieces() {
        let m = machine(&[0x12, 0x04, 0x01, 0x0A, 0x05], 0x604, false);
        assert_eq!(parse(&m, None), Err(Error::NoRsdp));
        assert_eq!(parse(&m, Some(0x104)), Err(Error::BadRsdpSignature));
        let mut bad = machine(&[0x12, 0x04, 0x01, 0x0A, 0x05], 0x604, false);
        put(&mut bad.0, 0x300, b"XXXX");
        assert_eq!(parse(&bad, Some(0x100)), Err(Error::NoFadt));
        let no_s5 = machine(&[0x12, 0x04, 0x01, 0x0A, 0x05], 0x604, false);
        let mut v = no_s5.0;
        put(&mut v, 0x500 + 36 + 8, b"_S4_");
        assert_eq!(parse(&Mem(v), Some(0x100)), Err(Error::NoS5));
        let garbage = machine(&[0x13, 0x04, 0x01], 0x604, false);
        assert_eq!(parse(&garbage, Some(0x100)), Err(Error::BadS5Package));
    }
}
