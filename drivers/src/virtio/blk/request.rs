//! virtio-blk requests on the wire (virtio 1.2 §5.2.6), and how one
//! [`Op`](crate::virtio::Op) becomes one or more device requests. Pure:
//! tested on the host.
//!
//! A device request is a chain `header (16 bytes, device-readable)`,
//! `data` (readable for OUT/DISCARD/WRITE_ZEROES, writable for IN and
//! GET_ID), `status (1 byte, device-writable)`. Sectors are always 512
//! bytes, whatever the logical block size.

use crate::virtio::{Error, Op, split};
use alloc::vec::Vec;

pub const SECTOR: u64 = 512;

/// `VIRTIO_BLK_T_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ReqType {
    In = 0,
    Out = 1,
    Flush = 4,
    GetId = 8,
    Discard = 11,
    WriteZeroes = 13,
}

/// `VIRTIO_BLK_S_*`.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
pub const WRITE_ZEROES_UNMAP: u32 = 1;

/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

/// `struct virtio_blk_req`'s header: type, reserved (ioprio), sector.
pub fn header(kind: ReqType, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&(kind as u32).to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
pub fn range_segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

/// The result a status byte means.
pub fn status_result(status: u8) -> Result<(), Error> {
    match status {
        S_OK => Ok(()),
        S_UNSUPP => Err(Error::Unsupported),
        // S_IOERR and anything a device should not send.
        _ => Err(Error::Io),
    }
}

/// The serial from a GET_ID answer: up to 20 bytes, NUL-terminated if
/// shorter.
pub fn parse_id(id: &[u8]) -> alloc::string::String {
    let end = id.iter().position(|&b| b == 0).unwrap_or(id.len());
    alloc::string::String::from_utf8_lossy(&id[..end])
        .trim()
        .into()
}

/// One device request an [`Op`] turned into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub kind: ReqType,
    pub sector: u64,
    /// Bytes `[start, start + len)` of the op's buffer (reads and writes).
    pub data: Option<(usize, usize)>,
    /// The discard/write-zeroes segment.
    pub segment: Option<[u8; 16]>,
}

/// The device requests for `op`: reads and writes split at `max_transfer`
/// bytes, discards and write-zeroes at their own maxima, a flush as one.
/// `op` must have passed [`DiskInfo::check`](crate::virtio::DiskInfo::check).
pub fn plan(op: &Op, max_transfer: u64, max_discard: u64, max_write_zeroes: u64) -> Vec<Part> {
    let rw = |kind, offset: u64, len: u64| {
        split(offset, len, max_transfer)
            .map(|(o, n)| Part {
                kind,
                sector: o / SECTOR,
                data: Some(((o - offset) as usize, n as usize)),
                segment: None,
            })
            .collect::<Vec<_>>()
    };
    let ranged = |kind, offset: u64, len: u64, max: u64, flags| {
        // num_sectors is 32 bits wide.
        let max = max.min(u64::from(u32::MAX) * SECTOR) / SECTOR * SECTOR;
        split(offset, len, max)
            .map(|(o, n)| Part {
                kind,
                // The header's sector is "unused and set to 0 for commands
                // other than read or write" (virtio 1.2 §5.2.6).
                sector: 0,
                data: None,
                segment: Some(range_segment(o / SECTOR, (n / SECTOR) as u32, flags)),
            })
            .collect::<Vec<_>>()
    };
    match op {
        Op::Read { offset, buf } => rw(ReqType::In, *offset, buf.len() as u64),
        // virtio-blk has no FUA bit: the driver follows a FUA write with a
        // flush once every part is done (see `VirtioBlk`).
        Op::Write { offset, buf, .. } => rw(ReqType::Out, *offset, buf.len() as u64),
        Op::Flush => alloc::vec![flush()],
        Op::Discard { offset, len } => ranged(ReqType::Discard, *offset, *len, max_discard, 0),
        Op::WriteZeroes {
            offset,
            len,
            may_unmap,
        } => ranged(
            ReqType::WriteZeroes,
            *offset,
            *len,
            max_write_zeroes,
            if *may_unmap { WRITE_ZEROES_UNMAP } else { 0 },
        ),
    }
}

/// A flush request.
pub fn flush() -> Part {
    Part {
        kind: ReqType::Flush,
        sector: 0,
        data: None,
        segment: None,
    }
}

/// Splits `len` bytes of data into descriptor-sized segments:
/// `(start, len)` pairs of at most `max_segment` bytes.
pub fn segments(len: usize, max_segment: u32) -> impl Iterator<Item = (usize, usize)> {
    split(0, len as u64, u64::from(max_segment.max(512))).map(|(o, n)| (o as usize, n as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn header_layout_is_little_endian_type_reserved_sector() {
        let h = header(ReqType::Out, 0x0102_0304_0506_0708);
        assert_eq!(
            h,
            [1, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1],
            "type=1, ioprio=0, sector"
        );
        assert_eq!(header(ReqType::GetId, 0)[0], 8);
        assert_eq!(header(ReqType::WriteZeroes, 0)[0], 13);
        assert_eq!(header(ReqType::Discard, 0)[0], 11);
    }

    #[test]
    fn discard_segment_layout() {
        let s = range_segment(0x10, 0x20, WRITE_ZEROES_UNMAP);
        assert_eq!(s, [0x10, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn status_codes_map_to_errors() {
        assert_eq!(status_result(S_OK), Ok(()));
        assert_eq!(status_result(S_IOERR), Err(Error::Io));
        assert_eq!(status_result(S_UNSUPP), Err(Error::Unsupported));
        assert_eq!(status_result(S_IOERR).unwrap_err().errno(), 5);
        assert_eq!(status_result(S_UNSUPP).unwrap_err().errno(), 95);
        assert_eq!(status_result(77), Err(Error::Io));
    }

    #[test]
    fn get_id_is_nul_terminated_or_twenty_bytes() {
        assert_eq!(parse_id(b"disk0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"), "disk0");
        assert_eq!(parse_id(b"abcdefghijklmnopqrst"), "abcdefghijklmnopqrst");
        assert_eq!(parse_id(&[0; 20]), "");
    }

    #[test]
    fn reads_split_at_max_transfer_with_buffer_offsets() {
        let op = Op::Read {
            offset: 1 << 20,
            buf: vec![0; 3 * 4096 + 512],
        };
        let parts = plan(&op, 4096, 0, 0);
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0].sector, 2048);
        assert_eq!(parts[1].sector, 2056);
        assert_eq!(parts[3].data, Some((3 * 4096, 512)));
        assert!(parts.iter().all(|p| p.kind == ReqType::In));
    }

    #[test]
    fn flush_is_one_request_without_data() {
        let parts = plan(&Op::Flush, 4096, 0, 0);
        assert_eq!(parts, vec![flush()]);
        assert_eq!(header(parts[0].kind, parts[0].sector)[0], 4);
    }

    #[test]
    fn discards_split_at_max_discard_sectors() {
        let op = Op::Discard {
            offset: 512,
            len: 3 * 512,
        };
        let parts = plan(&op, 0, 1024, 0);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].segment, Some(range_segment(1, 2, 0)));
        assert_eq!(parts[1].segment, Some(range_segment(3, 1, 0)));
        assert!(parts.iter().all(|p| p.sector == 0), "header sector unused");
        let wz = Op::WriteZeroes {
            offset: 0,
            len: 512,
            may_unmap: true,
        };
        assert_eq!(
            plan(&wz, 0, 0, 1 << 30)[0].segment,
            Some(range_segment(0, 1, WRITE_ZEROES_UNMAP))
        );
    }

    #[test]
    fn data_segments_respect_size_max() {
        let segs: Vec<_> = segments(10_000, 4096).collect();
        assert_eq!(segs, vec![(0, 4096), (4096, 4096), (8192, 1808)]);
    }
}
