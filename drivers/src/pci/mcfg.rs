//! Finding PCI Express's enhanced configuration space (ECAM) through the
//! ACPI MCFG table: RSDP (from the loader, or found in the BIOS area) →
//! XSDT or RSDT → `MCFG` → one entry per PCI segment: base address, bus
//! range. Parsing goes through [`PhysMem`], so it is tested on the host.

use crate::acpi::PhysMem;
use alloc::vec::Vec;

/// One MCFG allocation: configuration space of buses `start_bus..=end_bus`
/// of `segment` at `base` (the address of bus 0, as the spec defines it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EcamRegion {
    pub base: u64,
    pub segment: u16,
    pub start_bus: u8,
    pub end_bus: u8,
}

/// Scans the BIOS read-only area (0xE0000-0xFFFFF) for the RSDP, on
/// 16-byte boundaries, checking the signature and checksum (ACPI 6.5
/// §5.2.5.1), for loaders that pass none.
pub fn find_rsdp(mem: &dyn PhysMem) -> Option<u64> {
    let signature = u64::from_le_bytes(*b"RSD PTR ");
    (0xe0000u64..0x100000).step_by(16).find(|&at| {
        if mem.read_u64(at) != signature {
            return false;
        }
        let mut b = [0u8; 20];
        mem.read(at, &mut b);
        b.iter().fold(0u8, |s, &x| s.wrapping_add(x)) == 0
    })
}

/// The address of the ACPI table with signature `sig` (through the XSDT,
/// or the RSDT for ACPI 1.0).
pub fn table(mem: &dyn PhysMem, rsdp: u64, sig: &[u8; 4]) -> Option<u64> {
    let mut rsdp_sig = [0u8; 8];
    mem.read(rsdp, &mut rsdp_sig);
    if &rsdp_sig != b"RSD PTR " {
        return None;
    }
    let revision = mem.read_u8(rsdp + 15);
    let xsdt = if revision >= 2 {
        mem.read_u64(rsdp + 24)
    } else {
        0
    };
    let (sdt, entry) = if xsdt != 0 {
        (xsdt, 8)
    } else {
        (u64::from(mem.read_u32(rsdp + 16)), 4)
    };
    find_table(mem, sdt, entry, sig)
}

/// The DSDT's address, from the FADT (X_DSDT when set).
pub fn dsdt(mem: &dyn PhysMem, rsdp: u64) -> Option<u64> {
    let fadt = table(mem, rsdp, b"FACP")?;
    let len = mem.read_u32(fadt + 4);
    let x = if len >= 148 {
        mem.read_u64(fadt + 140)
    } else {
        0
    };
    let dsdt = if x != 0 {
        x
    } else {
        u64::from(mem.read_u32(fadt + 40))
    };
    (dsdt != 0).then_some(dsdt)
}

/// The ECAM regions the MCFG lists (empty without an MCFG).
pub fn ecam_regions(mem: &dyn PhysMem, rsdp: u64) -> Vec<EcamRegion> {
    let Some(mcfg) = table(mem, rsdp, b"MCFG") else {
        return Vec::new();
    };
    let len = u64::from(mem.read_u32(mcfg + 4)).min(4096);
    // Header (36 bytes) and 8 reserved bytes, then 16-byte entries.
    (0..len.saturating_sub(44) / 16)
        .map(|i| {
            let e = mcfg + 44 + 16 * i;
            EcamRegion {
                base: mem.read_u64(e),
                segment: mem.read_u16(e + 8),
                start_bus: mem.read_u8(e + 10),
                end_bus: mem.read_u8(e + 11),
            }
        })
        .filter(|r| r.base != 0 && r.start_bus <= r.end_bus)
        .collect()
}

fn find_table(mem: &dyn PhysMem, sdt: u64, entry_size: u64, sig: &[u8; 4]) -> Option<u64> {
    if sdt == 0 {
        return None;
    }
    let len = u64::from(mem.read_u32(sdt + 4));
    let entries = len.saturating_sub(36) / entry_size;
    (0..entries.min(256)).find_map(|i| {
        let at = sdt + 36 + i * entry_size;
        let table = if entry_size == 8 {
            mem.read_u64(at)
        } else {
            u64::from(mem.read_u32(at))
        };
        let mut s = [0u8; 4];
        mem.read(table, &mut s);
        (&s == sig).then_some(table)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

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

    /// RSDP at 0xe0010 (revision 2) → XSDT at 0x1000 → [FACP, MCFG at 0x3000].
    fn tables() -> Mem {
        let mut m = vec![0u8; 0x100000];
        let rsdp = 0xe0010;
        put(&mut m, rsdp, b"RSD PTR ");
        m[rsdp + 15] = 2;
        put(&mut m, rsdp + 16, &0x1000u32.to_le_bytes());
        put(&mut m, rsdp + 24, &0x1000u64.to_le_bytes());
        let sum = m[rsdp..rsdp + 20]
            .iter()
            .fold(0u8, |s, &x| s.wrapping_add(x));
        m[rsdp + 8] = 0u8.wrapping_sub(sum);
        put(&mut m, 0x1000, b"XSDT");
        put(&mut m, 0x1004, &(36u32 + 16).to_le_bytes());
        put(&mut m, 0x1000 + 36, &0x2000u64.to_le_bytes());
        put(&mut m, 0x1000 + 44, &0x3000u64.to_le_bytes());
        put(&mut m, 0x2000, b"FACP");
        put(&mut m, 0x3000, b"MCFG");
        put(&mut m, 0x3004, &(44u32 + 16).to_le_bytes());
        put(&mut m, 0x3000 + 44, &0xb000_0000u64.to_le_bytes());
        m[0x3000 + 55] = 0xff;
        Mem(m)
    }

    #[test]
    fn finds_the_rsdp_and_the_ecam_region() {
        let m = tables();
        assert_eq!(find_rsdp(&m), Some(0xe0010));
        assert_eq!(
            ecam_regions(&m, 0xe0010),
            vec![EcamRegion {
                base: 0xb000_0000,
                segment: 0,
                start_bus: 0,
                end_bus: 0xff
            }]
        );
    }

    #[test]
    fn no_mcfg_no_region_and_bad_checksum_no_rsdp() {
        let mut m = tables();
        put(&mut m.0, 0x1000 + 44, &0x2000u64.to_le_bytes());
        assert!(ecam_regions(&m, 0xe0010).is_empty());
        m.0[0xe0010 + 8] ^= 1;
        assert_eq!(find_rsdp(&m), None);
    }
}
