//! virtio-scsi on the wire (virtio 1.2 §5.6): feature bits, configuration
//! space, the request header and response layouts, LUN addressing. Pure and
//! host-tested.

/// `struct virtio_scsi_config` offsets.
pub mod offset {
    pub const NUM_QUEUES: usize = 0;
    pub const SEG_MAX: usize = 4;
    pub const MAX_SECTORS: usize = 8;
    pub const CMD_PER_LUN: usize = 12;
    pub const SENSE_SIZE: usize = 20;
    pub const CDB_SIZE: usize = 24;
    pub const MAX_TARGET: usize = 30;
    pub const MAX_LUN: usize = 32;
}

/// Queue 0 is control, 1 events, 2.. requests.
pub const FIRST_REQUEST_QUEUE: u16 = 2;

/// Default sizes (the device may report others).
pub const DEFAULT_CDB_SIZE: usize = 32;
pub const DEFAULT_SENSE_SIZE: usize = 96;

/// `virtio_scsi_cmd_req` without the CDB: lun[8], id, task_attr, prio, crn.
pub const REQ_HEADER: usize = 19;
/// `virtio_scsi_cmd_resp` without the sense: sense_len, resid,
/// status_qualifier, status, response.
pub const RESP_HEADER: usize = 12;

/// The 8-byte LUN field for `target`/`lun` (flat-space addressing for the
/// LUN, as Linux and QEMU use).
pub fn lun_field(target: u8, lun: u16) -> [u8; 8] {
    [
        1,
        target,
        0x40 | ((lun >> 8) as u8 & 0x3f),
        lun as u8,
        0,
        0,
        0,
        0,
    ]
}

/// The device-readable request: header, then the CDB padded to
/// `cdb_size` bytes. `tag` goes in the `id` field; task attribute SIMPLE.
pub fn request(target: u8, lun: u16, tag: u64, cdb: &[u8], cdb_size: usize) -> alloc::vec::Vec<u8> {
    let mut r = alloc::vec![0u8; REQ_HEADER + cdb_size];
    r[0..8].copy_from_slice(&lun_field(target, lun));
    r[8..16].copy_from_slice(&tag.to_le_bytes());
    let n = cdb.len().min(cdb_size);
    r[REQ_HEADER..REQ_HEADER + n].copy_from_slice(&cdb[..n]);
    r
}

/// `VIRTIO_SCSI_S_*` response codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Response {
    Ok,
    Overrun,
    Aborted,
    BadTarget,
    Reset,
    Busy,
    TransportFailure,
    TargetFailure,
    NexusFailure,
    Failure,
    Other(u8),
}

impl core::fmt::Display for Response {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let text = match self {
            Response::Ok => "OK",
            Response::Overrun => "data overrun (VIRTIO_SCSI_S_OVERRUN)",
            Response::Aborted => "command aborted (VIRTIO_SCSI_S_ABORTED)",
            Response::BadTarget => "no such target or LUN (VIRTIO_SCSI_S_BAD_TARGET)",
            Response::Reset => "bus reset (VIRTIO_SCSI_S_RESET)",
            Response::Busy => "device busy (VIRTIO_SCSI_S_BUSY)",
            Response::TransportFailure => "transport failure (VIRTIO_SCSI_S_TRANSPORT_FAILURE)",
            Response::TargetFailure => "target failure (VIRTIO_SCSI_S_TARGET_FAILURE)",
            Response::NexusFailure => "nexus failure (VIRTIO_SCSI_S_NEXUS_FAILURE)",
            Response::Failure => "failure (VIRTIO_SCSI_S_FAILURE)",
            Response::Other(n) => return write!(f, "unknown response {n}"),
        };
        f.write_str(text)
    }
}

impl From<u8> for Response {
    fn from(v: u8) -> Self {
        match v {
            0 => Response::Ok,
            1 => Response::Overrun,
            2 => Response::Aborted,
            3 => Response::BadTarget,
            4 => Response::Reset,
            5 => Response::Busy,
            6 => Response::TransportFailure,
            7 => Response::TargetFailure,
            8 => Response::NexusFailure,
            9 => Response::Failure,
            n => Response::Other(n),
        }
    }
}

/// SCSI status codes we act on.
pub const STATUS_GOOD: u8 = 0x00;
pub const STATUS_CHECK_CONDITION: u8 = 0x02;
pub const STATUS_BUSY: u8 = 0x08;
pub const STATUS_TASK_SET_FULL: u8 = 0x28;

/// A decoded `virtio_scsi_cmd_resp`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmdResponse<'a> {
    pub response: Response,
    pub status: u8,
    pub residual: u32,
    pub sense: &'a [u8],
}

/// Decodes the device-writable response area.
pub fn parse_response(resp: &[u8]) -> CmdResponse<'_> {
    let u32_at = |i: usize| {
        resp.get(i..i + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let sense_len = u32_at(0) as usize;
    let sense = resp.get(RESP_HEADER..).unwrap_or(&[]);
    CmdResponse {
        response: Response::from(resp.get(11).copied().unwrap_or(9)),
        status: resp.get(10).copied().unwrap_or(0),
        residual: u32_at(4),
        sense: &sense[..sense_len.min(sense.len())],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_encoding_matches_linux_and_qemu() {
        assert_eq!(lun_field(0, 0), [1, 0, 0x40, 0, 0, 0, 0, 0]);
        assert_eq!(lun_field(3, 2), [1, 3, 0x40, 2, 0, 0, 0, 0]);
        assert_eq!(lun_field(255, 16383), [1, 255, 0x7f, 0xff, 0, 0, 0, 0]);
        assert_eq!(lun_field(1, 0x1234), [1, 1, 0x52, 0x34, 0, 0, 0, 0]);
    }

    #[test]
    fn request_header_layout() {
        let r = request(2, 1, 0x1122_3344_5566_7788, &[0x12, 0, 0, 0, 36, 0], 32);
        assert_eq!(r.len(), 19 + 32);
        assert_eq!(&r[0..8], &[1, 2, 0x40, 1, 0, 0, 0, 0]);
        assert_eq!(&r[8..16], &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&r[16..19], &[0, 0, 0], "SIMPLE, prio 0, crn 0");
        assert_eq!(&r[19..25], &[0x12, 0, 0, 0, 36, 0]);
        assert!(r[25..].iter().all(|&b| b == 0));
    }

    #[test]
    fn response_layout() {
        let mut resp = [0u8; 12 + 96];
        resp[0..4].copy_from_slice(&18u32.to_le_bytes());
        resp[4..8].copy_from_slice(&7u32.to_le_bytes());
        resp[10] = STATUS_CHECK_CONDITION;
        resp[11] = 0;
        resp[12] = 0x70;
        let r = parse_response(&resp);
        assert_eq!(r.response, Response::Ok);
        assert_eq!(r.status, STATUS_CHECK_CONDITION);
        assert_eq!(r.residual, 7);
        assert_eq!(r.sense.len(), 18);
        assert_eq!(r.sense[0], 0x70);
        resp[11] = 3;
        assert_eq!(parse_response(&resp).response, Response::BadTarget);
    }
}
