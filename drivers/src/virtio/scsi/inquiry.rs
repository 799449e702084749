//! Parsing what a LUN says about itself: standard INQUIRY, the VPD pages
//! (0x00 supported, 0x80 unit serial number, 0xB0 block limits, 0xB2
//! logical block provisioning), READ CAPACITY(16), REPORT LUNS, and the
//! MODE SENSE(10) header. Pure and host-tested; short data reads as zeroes.

use alloc::string::String;
use alloc::vec::Vec;

fn at(d: &[u8], i: usize) -> u8 {
    d.get(i).copied().unwrap_or(0)
}

fn be16(d: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([at(d, i), at(d, i + 1)])
}

fn be32(d: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([at(d, i), at(d, i + 1), at(d, i + 2), at(d, i + 3)])
}

fn be64(d: &[u8], i: usize) -> u64 {
    (u64::from(be32(d, i)) << 32) | u64::from(be32(d, i + 4))
}

fn text(d: &[u8]) -> String {
    String::from_utf8_lossy(d)
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .into()
}

/// Peripheral device type of a direct-access block device (SBC).
pub const TYPE_DISK: u8 = 0x00;

/// Standard INQUIRY data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inquiry {
    /// 0: connected; 1: supported, not connected; 3: no LUN here.
    pub qualifier: u8,
    pub device_type: u8,
    pub vendor: String,
    pub product: String,
    pub revision: String,
}

impl Inquiry {
    /// Whether a logical unit exists at this address.
    pub fn present(&self) -> bool {
        self.qualifier == 0 && self.device_type != 0x1f
    }
}

pub fn parse_inquiry(d: &[u8]) -> Inquiry {
    Inquiry {
        qualifier: at(d, 0) >> 5,
        device_type: at(d, 0) & 0x1f,
        vendor: text(d.get(8..16).unwrap_or(&[])),
        product: text(d.get(16..32).unwrap_or(&[])),
        revision: text(d.get(32..36).unwrap_or(&[])),
    }
}

/// The body of a VPD page (after its 4-byte header), bounded by its length.
fn vpd_body(d: &[u8], page: u8) -> &[u8] {
    if at(d, 1) != page {
        return &[];
    }
    let len = usize::from(be16(d, 2));
    d.get(4..).map_or(&[], |b| &b[..len.min(b.len())])
}

/// VPD 0x00: the pages the LUN supports.
pub fn parse_supported_pages(d: &[u8]) -> Vec<u8> {
    vpd_body(d, 0x00).to_vec()
}

/// VPD 0x80: the unit serial number.
pub fn parse_serial(d: &[u8]) -> String {
    text(vpd_body(d, 0x80))
}

/// VPD 0xB0, Block Limits (SBC-3 §6.6.4). Lengths in logical blocks; 0
/// means "not reported".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockLimits {
    pub max_transfer: u32,
    pub optimal_transfer: u32,
    pub max_unmap_blocks: u32,
    pub max_unmap_descriptors: u32,
    pub unmap_granularity: u32,
    pub max_write_same: u64,
}

pub fn parse_block_limits(d: &[u8]) -> BlockLimits {
    if at(d, 1) != 0xb0 {
        return BlockLimits::default();
    }
    BlockLimits {
        max_transfer: be32(d, 8),
        optimal_transfer: be32(d, 12),
        max_unmap_blocks: be32(d, 20),
        max_unmap_descriptors: be32(d, 24),
        unmap_granularity: be32(d, 28),
        max_write_same: be64(d, 36),
    }
}

/// VPD 0xB2, Logical Block Provisioning (SBC-3 §6.6.5).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Provisioning {
    /// LBPU: UNMAP is supported.
    pub unmap: bool,
    /// LBPWS: WRITE SAME(16) with the UNMAP bit is supported.
    pub write_same_16_unmap: bool,
    /// LBPRZ: unmapped blocks read as zeroes.
    pub reads_zeroes: bool,
}

pub fn parse_provisioning(d: &[u8]) -> Provisioning {
    if at(d, 1) != 0xb2 {
        return Provisioning::default();
    }
    let b = at(d, 5);
    Provisioning {
        unmap: b & 0x80 != 0,
        write_same_16_unmap: b & 0x40 != 0,
        reads_zeroes: b & 0x04 != 0,
    }
}

/// READ CAPACITY(16) data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    pub blocks: u64,
    pub block_size: u32,
    pub physical_exponent: u8,
    /// LBPME: logical block provisioning management enabled.
    pub thin: bool,
}

pub fn parse_capacity_16(d: &[u8]) -> Capacity {
    Capacity {
        blocks: be64(d, 0).saturating_add(1),
        block_size: be32(d, 8),
        physical_exponent: at(d, 13) & 0x0f,
        thin: at(d, 14) & 0x80 != 0,
    }
}

/// REPORT LUNS data: the LUN numbers (peripheral and flat addressing).
pub fn parse_report_luns(d: &[u8]) -> Vec<u16> {
    let len = be32(d, 0) as usize;
    let body = d.get(8..).unwrap_or(&[]);
    let body = &body[..len.min(body.len())];
    body.as_chunks::<8>()
        .0
        .iter()
        .filter_map(|e| match e[0] >> 6 {
            0 => Some(u16::from(e[1])),
            1 => Some((u16::from(e[0] & 0x3f) << 8) | u16::from(e[1])),
            _ => None,
        })
        .collect()
}

/// MODE SENSE(10) header: the WP bit of the device-specific parameter.
pub fn parse_write_protect(d: &[u8]) -> bool {
    d.len() >= 4 && at(d, 3) & 0x80 != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn standard_inquiry_of_a_qemu_disk_and_of_no_lun() {
        let mut d = vec![0u8; 36];
        d[8..16].copy_from_slice(b"QEMU    ");
        d[16..32].copy_from_slice(b"QEMU HARDDISK   ");
        d[32..36].copy_from_slice(b"2.5+");
        let i = parse_inquiry(&d);
        assert!(i.present());
        assert_eq!(i.device_type, TYPE_DISK);
        assert_eq!(i.vendor, "QEMU");
        assert_eq!(i.product, "QEMU HARDDISK");
        assert_eq!(i.revision, "2.5+");
        d[0] = 0x7f;
        assert!(!parse_inquiry(&d).present());
    }

    #[test]
    fn vpd_pages() {
        assert_eq!(
            parse_supported_pages(&[0, 0, 0, 4, 0x00, 0x80, 0xb0, 0xb2, 0xff]),
            vec![0x00, 0x80, 0xb0, 0xb2]
        );
        let mut s = vec![0, 0x80, 0, 6];
        s.extend_from_slice(b"scsi0 ");
        assert_eq!(parse_serial(&s), "scsi0");
        assert_eq!(parse_serial(&[0, 0x83, 0, 2, b'x', b'y']), "", "wrong page");

        let mut b0 = vec![0u8; 64];
        b0[1] = 0xb0;
        b0[8..12].copy_from_slice(&0x0000_ffffu32.to_be_bytes());
        b0[20..24].copy_from_slice(&0x0040_0000u32.to_be_bytes());
        b0[24..28].copy_from_slice(&1u32.to_be_bytes());
        b0[28..32].copy_from_slice(&8u32.to_be_bytes());
        b0[36..44].copy_from_slice(&0x0040_0000u64.to_be_bytes());
        let l = parse_block_limits(&b0);
        assert_eq!(l.max_transfer, 0xffff);
        assert_eq!(l.max_unmap_blocks, 0x40_0000);
        assert_eq!(l.max_unmap_descriptors, 1);
        assert_eq!(l.unmap_granularity, 8);
        assert_eq!(l.max_write_same, 0x40_0000);

        let p = parse_provisioning(&[0, 0xb2, 0, 4, 0, 0xc4, 2, 0]);
        assert!(p.unmap && p.write_same_16_unmap && p.reads_zeroes);
        assert_eq!(
            parse_provisioning(&[0, 0xb0, 0, 4, 0, 0xc4]),
            Provisioning::default()
        );
    }

    #[test]
    fn capacity_16() {
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&2047u64.to_be_bytes());
        d[8..12].copy_from_slice(&4096u32.to_be_bytes());
        d[13] = 3;
        d[14] = 0x80;
        let c = parse_capacity_16(&d);
        assert_eq!(c.blocks, 2048);
        assert_eq!(c.block_size, 4096);
        assert_eq!(c.physical_exponent, 3);
        assert!(c.thin);
    }

    #[test]
    fn report_luns_peripheral_and_flat() {
        let mut d = vec![0, 0, 0, 24, 0, 0, 0, 0];
        d.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0, 5, 0, 0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0x41, 0x02, 0, 0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0, 9, 0, 0, 0, 0, 0, 0]); // beyond the length
        assert_eq!(parse_report_luns(&d), vec![0, 5, 0x102]);
        assert_eq!(parse_report_luns(&[]), Vec::<u16>::new());
    }

    #[test]
    fn mode_sense_write_protect() {
        assert!(parse_write_protect(&[0, 6, 0, 0x80, 0, 0, 0, 0]));
        assert!(!parse_write_protect(&[0, 6, 0, 0x10, 0, 0, 0, 0]));
        assert!(!parse_write_protect(&[]));
    }
}
