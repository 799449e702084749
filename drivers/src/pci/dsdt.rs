//! What the DSDT says about the PCI Express host bridge, for machines
//! without an MCFG table whose firmware assigns no BARs (QEMU's `microvm`
//! with `pcie=on`: its GPEX host bridge is described only in AML).
//!
//! Not an AML interpreter: it finds the two constructs QEMU's
//! `acpi_dsdt_add_gpex` emits and reads them from the bytes:
//! - `Method (_CBA) { Return (base) }`: the ECAM base;
//! - `Name (_CRS, ResourceTemplate () { ... })` holding a bus-number range:
//!   the host bridge's windows (32- and 64-bit memory) to put BARs in.
//!
//! Pure and host-tested; reads go through [`PhysMem`].

use crate::acpi::PhysMem;
use alloc::vec;
use alloc::vec::Vec;

/// A PCIe host bridge as the DSDT describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostBridge {
    /// `_CBA`: where ECAM configuration space starts.
    pub ecam: Option<u64>,
    /// Bus numbers decoded (first, last).
    pub buses: Option<(u8, u8)>,
    /// Memory windows for BARs: (base, size), in the order listed.
    pub windows: Vec<(u64, u64)>,
}

/// Reads the DSDT at `addr` (at most 1 MiB) and finds the host bridge.
pub fn host_bridge(mem: &dyn PhysMem, dsdt: u64) -> Option<HostBridge> {
    let len = mem.read_u32(dsdt + 4).min(1 << 20) as usize;
    if len < 36 {
        return None;
    }
    let mut aml = vec![0u8; len];
    mem.read(dsdt, &mut aml);
    parse(&aml[36..])
}

/// The host bridge described in `aml` (the DSDT's body).
pub fn parse(aml: &[u8]) -> Option<HostBridge> {
    let mut hb = HostBridge {
        ecam: cba(aml),
        ..HostBridge::default()
    };
    for body in crs_buffers(aml) {
        let descs = descriptors(body);
        let Some(buses) = descs.iter().find_map(|d| match d {
            Desc::Range { kind: 2, min, max } => Some((*min as u8, *max as u8)),
            _ => None,
        }) else {
            continue;
        };
        hb.buses = Some(buses);
        hb.windows = descs
            .iter()
            .filter_map(|d| match d {
                Desc::Range { kind: 0, min, max } if max > min => Some((*min, max - min + 1)),
                _ => None,
            })
            .collect();
        break;
    }
    (hb.ecam.is_some() || hb.buses.is_some()).then_some(hb)
}

/// An AML integer at `at`: (value, bytes used).
fn integer(aml: &[u8], at: usize) -> Option<(u64, usize)> {
    let le = |n: usize| {
        let b = aml.get(at + 1..at + 1 + n)?;
        Some(b.iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x)))
    };
    match *aml.get(at)? {
        0x00 => Some((0, 1)),
        0x01 => Some((1, 1)),
        0xff => Some((u64::MAX, 1)),
        0x0a => Some((le(1)?, 2)),
        0x0b => Some((le(2)?, 3)),
        0x0c => Some((le(4)?, 5)),
        0x0e => Some((le(8)?, 9)),
        _ => None,
    }
}

/// An AML PkgLength at `at`: (length, bytes used).
fn pkg_length(aml: &[u8], at: usize) -> Option<(usize, usize)> {
    let lead = *aml.get(at)?;
    let extra = usize::from(lead >> 6);
    if extra == 0 {
        return Some((usize::from(lead & 0x3f), 1));
    }
    let mut len = usize::from(lead & 0x0f);
    for i in 0..extra {
        len |= usize::from(*aml.get(at + 1 + i)?) << (4 + 8 * i);
    }
    Some((len, 1 + extra))
}

fn find_all<'a>(aml: &'a [u8], needle: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    aml.windows(needle.len())
        .enumerate()
        .filter(move |(_, w)| *w == needle)
        .map(|(i, _)| i)
}

/// `Method (_CBA, 0) { Return (integer) }`: MethodOp, PkgLength, name,
/// flags, ReturnOp, integer.
fn cba(aml: &[u8]) -> Option<u64> {
    find_all(aml, b"_CBA").find_map(|at| {
        let ret = at + 5; // name, method flags
        (aml.get(ret) == Some(&0xa4)).then_some(())?;
        integer(aml, ret + 1).map(|(v, _)| v)
    })
}

/// The bodies of every `Name (_CRS, Buffer (...) {...})`.
fn crs_buffers(aml: &[u8]) -> Vec<&[u8]> {
    find_all(aml, b"_CRS")
        .filter(|&at| at > 0 && aml[at - 1] == 0x08 && aml.get(at + 4) == Some(&0x11))
        .filter_map(|at| {
            let (len, used) = pkg_length(aml, at + 5)?;
            let end = at + 5 + len;
            let (_, size_used) = integer(aml, at + 5 + used)?;
            aml.get(at + 5 + used + size_used..end)
        })
        .collect()
}

/// The resource descriptors this module cares about.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Desc {
    /// Word/DWord/QWord address space: resource type (0 memory, 1 I/O,
    /// 2 bus numbers) and the range.
    Range {
        kind: u8,
        min: u64,
        max: u64,
    },
    Other,
}

/// Decodes a resource template (ACPI 6.5 §6.4).
fn descriptors(mut b: &[u8]) -> Vec<Desc> {
    let mut out = Vec::new();
    while let Some(&tag) = b.first() {
        if tag & 0x80 == 0 {
            // Small item: length in the low 3 bits; 0x79 ends the list.
            if tag >> 3 == 0x0f {
                break;
            }
            let n = 1 + usize::from(tag & 7);
            b = b.get(n..).unwrap_or(&[]);
            out.push(Desc::Other);
            continue;
        }
        let Some(len) = b
            .get(1..3)
            .map(|l| usize::from(u16::from_le_bytes([l[0], l[1]])))
        else {
            break;
        };
        let Some(body) = b.get(3..3 + len) else {
            break;
        };
        let field = |size: usize, index: usize| {
            let at = 3 + size * index;
            body.get(at..at + size)
                .map(|f| f.iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x)))
        };
        let range = |size: usize| -> Option<Desc> {
            // type, general flags, type flags, then granularity, min, max.
            Some(Desc::Range {
                kind: *body.first()?,
                min: field(size, 1)?,
                max: field(size, 2)?,
            })
        };
        out.push(
            match tag {
                0x88 => range(2),
                0x87 => range(4),
                0x8a => range(8),
                _ => None,
            }
            .unwrap_or(Desc::Other),
        );
        b = &b[3 + len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word_bus(min: u16, max: u16) -> Vec<u8> {
        let mut d = vec![0x88, 13, 0, 2, 0x0c, 0];
        for v in [0u16, min, max, 0, max - min + 1] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        d
    }

    fn dword_mem(min: u32, max: u32) -> Vec<u8> {
        let mut d = vec![0x87, 23, 0, 0, 0x0c, 0x01];
        for v in [0u32, min, max, 0, max - min + 1] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        d
    }

    fn qword_mem(min: u64, max: u64) -> Vec<u8> {
        let mut d = vec![0x8a, 43, 0, 0, 0x0c, 0x01];
        for v in [0u64, min, max, 0, max - min + 1] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        d
    }

    /// `Name (_CRS, ResourceTemplate () { items })`.
    fn crs(items: &[Vec<u8>]) -> Vec<u8> {
        let mut body: Vec<u8> = items.concat();
        body.extend_from_slice(&[0x79, 0]);
        let mut buf = vec![0x0b];
        buf.extend_from_slice(&(body.len() as u16).to_le_bytes());
        buf.extend_from_slice(&body);
        // Two-byte PkgLength covering itself and the rest.
        let len = buf.len() + 2;
        let mut out = b"\x08_CRS\x11".to_vec();
        out.push(0x40 | (len & 0x0f) as u8);
        out.push((len >> 4) as u8);
        out.extend_from_slice(&buf);
        out
    }

    /// What QEMU's `acpi_dsdt_add_gpex` emits for microvm, in short: an
    /// I/O-port _CRS of another device first, RES0's ECAM _CRS, the host
    /// bridge's windows, and `_CBA`.
    fn microvm_like() -> Vec<u8> {
        let mut aml = b"\x5b\x82junkDevice".to_vec();
        aml.extend(crs(&[vec![0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]]));
        aml.extend(crs(&[qword_mem(0xe000_0000, 0xefff_ffff)]));
        aml.extend(crs(&[
            word_bus(0, 0xff),
            dword_mem(0xc000_0000, 0xdfff_ffff),
            qword_mem(0x80_0000_0000, 0xff_ffff_ffff),
        ]));
        aml.extend(b"\x14\x0e_CBA\x00\xa4\x0e\x00\x00\x00\xe0\x00\x00\x00\x00");
        aml
    }

    #[test]
    fn finds_ecam_bus_range_and_windows() {
        let hb = parse(&microvm_like()).unwrap();
        assert_eq!(hb.ecam, Some(0xe000_0000));
        assert_eq!(hb.buses, Some((0, 0xff)));
        assert_eq!(
            hb.windows,
            vec![(0xc000_0000, 0x2000_0000), (0x80_0000_0000, 0x80_0000_0000)]
        );
    }

    #[test]
    fn integers_and_pkg_lengths() {
        assert_eq!(integer(&[0x0a, 0x12], 0), Some((0x12, 2)));
        assert_eq!(integer(&[0x0c, 0, 0, 0, 0xe0], 0), Some((0xe000_0000, 5)));
        assert_eq!(integer(&[0x01], 0), Some((1, 1)));
        assert_eq!(integer(&[0x0c, 0], 0), None, "truncated");
        assert_eq!(pkg_length(&[0x3f], 0), Some((0x3f, 1)));
        assert_eq!(pkg_length(&[0x45, 0x12], 0), Some((0x125, 2)));
    }

    #[test]
    fn nothing_to_find_is_none() {
        assert_eq!(parse(b"\x08_S5_\x12\x06\x04\x05\x05"), None);
        assert_eq!(parse(&[]), None);
    }
}
