//! SCSI command descriptor blocks (SPC-4, SBC-3) and the parameter data
//! some of them send. Pure and host-tested. Multi-byte fields are
//! big-endian.

use alloc::vec::Vec;

pub const TEST_UNIT_READY: u8 = 0x00;
pub const INQUIRY: u8 = 0x12;
pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
pub const UNMAP: u8 = 0x42;
pub const MODE_SENSE_10: u8 = 0x5a;
pub const READ_16: u8 = 0x88;
pub const WRITE_16: u8 = 0x8a;
pub const WRITE_SAME_16: u8 = 0x93;
pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
pub const READ_CAPACITY_16: u8 = 0x10; // service action
pub const REPORT_LUNS: u8 = 0xa0;

/// The FUA bit of READ(16)/WRITE(16) byte 1.
const FUA: u8 = 1 << 3;
/// The UNMAP bit of WRITE SAME(16) byte 1.
const WS_UNMAP: u8 = 1 << 3;

/// A CDB: up to 16 bytes here (the device's CDB area is larger).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cdb {
    bytes: [u8; 16],
    len: u8,
}

impl Cdb {
    fn new(len: usize) -> Cdb {
        Cdb {
            bytes: [0; 16],
            len: len as u8,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    pub fn opcode(&self) -> u8 {
        self.bytes[0]
    }
}

pub fn test_unit_ready() -> Cdb {
    Cdb::new(6)
}

/// INQUIRY; `page` = `Some(code)` asks for a VPD page (EVPD=1).
pub fn inquiry(page: Option<u8>, alloc: u16) -> Cdb {
    let mut c = Cdb::new(6);
    c.bytes[0] = INQUIRY;
    if let Some(p) = page {
        c.bytes[1] = 1;
        c.bytes[2] = p;
    }
    c.bytes[3..5].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// REPORT LUNS, select report 0 (all LUNs addressed by the target).
pub fn report_luns(alloc: u32) -> Cdb {
    let mut c = Cdb::new(12);
    c.bytes[0] = REPORT_LUNS;
    c.bytes[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// READ CAPACITY(16) (SERVICE ACTION IN(16), action 0x10).
pub fn read_capacity_16(alloc: u32) -> Cdb {
    let mut c = Cdb::new(16);
    c.bytes[0] = SERVICE_ACTION_IN_16;
    c.bytes[1] = READ_CAPACITY_16;
    c.bytes[10..14].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// MODE SENSE(10) of all pages without block descriptors; the header's
/// device-specific parameter carries the write-protect bit.
pub fn mode_sense_10(alloc: u16) -> Cdb {
    let mut c = Cdb::new(10);
    c.bytes[0] = MODE_SENSE_10;
    c.bytes[1] = 1 << 3; // DBD
    c.bytes[2] = 0x3f; // all pages, current values
    c.bytes[7..9].copy_from_slice(&alloc.to_be_bytes());
    c
}

fn rw16(opcode: u8, lba: u64, blocks: u32, fua: bool) -> Cdb {
    let mut c = Cdb::new(16);
    c.bytes[0] = opcode;
    if fua {
        c.bytes[1] = FUA;
    }
    c.bytes[2..10].copy_from_slice(&lba.to_be_bytes());
    c.bytes[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

pub fn read_16(lba: u64, blocks: u32, fua: bool) -> Cdb {
    rw16(READ_16, lba, blocks, fua)
}

pub fn write_16(lba: u64, blocks: u32, fua: bool) -> Cdb {
    rw16(WRITE_16, lba, blocks, fua)
}

/// WRITE SAME(16) of one block of data-out over `blocks` blocks; `unmap`
/// lets the device deallocate them.
pub fn write_same_16(lba: u64, blocks: u32, unmap: bool) -> Cdb {
    let mut c = rw16(WRITE_SAME_16, lba, blocks, false);
    if unmap {
        c.bytes[1] = WS_UNMAP;
    }
    c
}

/// SYNCHRONIZE CACHE(10) of the whole medium (LBA 0, 0 blocks).
pub fn synchronize_cache_10() -> Cdb {
    let mut c = Cdb::new(10);
    c.bytes[0] = SYNCHRONIZE_CACHE_10;
    c
}

/// UNMAP with a parameter list of `param_len` bytes.
pub fn unmap(param_len: u16) -> Cdb {
    let mut c = Cdb::new(10);
    c.bytes[0] = UNMAP;
    c.bytes[7..9].copy_from_slice(&param_len.to_be_bytes());
    c
}

/// The UNMAP parameter list: an 8-byte header, then one 16-byte block
/// descriptor (LBA, block count, reserved) per range.
pub fn unmap_parameters(ranges: &[(u64, u32)]) -> Vec<u8> {
    let desc_len = 16 * ranges.len();
    let mut p = Vec::with_capacity(8 + desc_len);
    p.extend_from_slice(&((6 + desc_len) as u16).to_be_bytes());
    p.extend_from_slice(&(desc_len as u16).to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    for &(lba, blocks) in ranges {
        p.extend_from_slice(&lba.to_be_bytes());
        p.extend_from_slice(&blocks.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inquiry_standard_and_vpd() {
        assert_eq!(inquiry(None, 96).as_bytes(), &[0x12, 0, 0, 0, 96, 0]);
        assert_eq!(
            inquiry(Some(0xb0), 0x100).as_bytes(),
            &[0x12, 1, 0xb0, 1, 0, 0]
        );
    }

    #[test]
    fn report_luns_and_read_capacity() {
        assert_eq!(
            report_luns(0x1008).as_bytes(),
            &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0x08, 0, 0]
        );
        assert_eq!(
            read_capacity_16(32).as_bytes(),
            &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]
        );
        assert_eq!(test_unit_ready().as_bytes(), &[0; 6]);
    }

    #[test]
    fn read_write_16_with_fua() {
        assert_eq!(
            read_16(0x0102_0304_0506_0708, 0x0a0b_0c0d, false).as_bytes(),
            &[
                0x88, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x0b, 0x0c, 0x0d, 0, 0
            ]
        );
        let w = write_16(1, 8, true);
        assert_eq!(w.opcode(), 0x8a);
        assert_eq!(w.as_bytes()[1], 0x08, "FUA");
        assert_eq!(&w.as_bytes()[2..14], &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 8]);
    }

    #[test]
    fn sync_cache_unmap_write_same_mode_sense() {
        assert_eq!(
            synchronize_cache_10().as_bytes(),
            &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(unmap(24).as_bytes(), &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]);
        let ws = write_same_16(0x10, 0x20, true);
        assert_eq!(ws.as_bytes()[0], 0x93);
        assert_eq!(ws.as_bytes()[1], 0x08, "UNMAP");
        assert_eq!(write_same_16(0, 1, false).as_bytes()[1], 0);
        assert_eq!(
            mode_sense_10(8).as_bytes(),
            &[0x5a, 0x08, 0x3f, 0, 0, 0, 0, 0, 8, 0]
        );
    }

    #[test]
    fn unmap_parameter_list_layout() {
        let p = unmap_parameters(&[(0x0102_0304_0506_0708, 0x0a0b_0c0d)]);
        assert_eq!(p.len(), 24);
        assert_eq!(&p[0..8], &[0, 22, 0, 16, 0, 0, 0, 0]);
        assert_eq!(&p[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&p[16..24], &[0x0a, 0x0b, 0x0c, 0x0d, 0, 0, 0, 0]);
    }
}
