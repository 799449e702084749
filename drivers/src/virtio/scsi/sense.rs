//! SCSI sense data (SPC-4 §4.5): fixed and descriptor formats decoded into
//! a [`Sense`] with a readable text and the errno QEMU would return
//! (`scsi_sense_to_errno` in QEMU's `scsi/utils.c`). Pure and host-tested.

use core::fmt;

/// Sense keys.
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const RECOVERED_ERROR: u8 = 0x1;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xb;
    pub const MISCOMPARE: u8 = 0xe;
}

/// Decoded sense: key, additional sense code and qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

/// Decodes fixed (0x70/0x71) or descriptor (0x72/0x73) sense data.
pub fn parse(sense: &[u8]) -> Option<Sense> {
    let at = |i: usize| sense.get(i).copied().unwrap_or(0);
    match at(0) & 0x7f {
        0x70 | 0x71 => Some(Sense {
            key: at(2) & 0x0f,
            asc: at(12),
            ascq: at(13),
        }),
        0x72 | 0x73 => Some(Sense {
            key: at(1) & 0x0f,
            asc: at(2),
            ascq: at(3),
        }),
        _ => None,
    }
}

impl Sense {
    pub fn is_unit_attention(&self) -> bool {
        self.key == key::UNIT_ATTENTION
    }

    /// The errno for this sense, as QEMU's `scsi_sense_to_errno`.
    pub fn errno(&self) -> i32 {
        match self.key {
            key::NO_SENSE | key::RECOVERED_ERROR | key::UNIT_ATTENTION => return 11, // EAGAIN
            key::ABORTED_COMMAND => return 125,                                      // ECANCELED
            key::NOT_READY | key::ILLEGAL_REQUEST | key::DATA_PROTECT => {}
            _ => return 5, // EIO
        }
        match (self.asc, self.ascq) {
            (0x1a, 0) | (0x20, 0) | (0x24, 0) | (0x26, 0) => 22, // EINVAL
            (0x21, 0) | (0x27, 7) => 28,                         // ENOSPC
            (0x25, 0) => 95,                                     // ENOTSUP
            (0x3a, 0..=2) => 123,                                // ENOMEDIUM
            (0x27, 0) => 13,                                     // EACCES
            (0x04, 1) => 115,                                    // EINPROGRESS
            (0x04, 2) => 107,                                    // ENOTCONN
            _ => 5,
        }
    }

    /// The sense key's SPC name.
    pub fn key_name(&self) -> &'static str {
        match self.key {
            key::NO_SENSE => "NO SENSE",
            key::RECOVERED_ERROR => "RECOVERED ERROR",
            key::NOT_READY => "NOT READY",
            key::MEDIUM_ERROR => "MEDIUM ERROR",
            key::HARDWARE_ERROR => "HARDWARE ERROR",
            key::ILLEGAL_REQUEST => "ILLEGAL REQUEST",
            key::UNIT_ATTENTION => "UNIT ATTENTION",
            key::DATA_PROTECT => "DATA PROTECT",
            0x8 => "BLANK CHECK",
            0x9 => "VENDOR SPECIFIC",
            0xa => "COPY ABORTED",
            key::ABORTED_COMMAND => "ABORTED COMMAND",
            0xd => "VOLUME OVERFLOW",
            key::MISCOMPARE => "MISCOMPARE",
            _ => "RESERVED",
        }
    }

    /// SPC's text for the additional sense code, for the common ones.
    pub fn asc_text(&self) -> Option<&'static str> {
        Some(match (self.asc, self.ascq) {
            (0x00, 0x00) => "no additional sense information",
            (0x04, 0x00) => "logical unit not ready, cause not reportable",
            (0x04, 0x01) => "logical unit is in process of becoming ready",
            (0x04, 0x02) => "logical unit not ready, initializing command required",
            (0x0c, 0x00) => "write error",
            (0x11, 0x00) => "unrecovered read error",
            (0x1a, 0x00) => "parameter list length error",
            (0x20, 0x00) => "invalid command operation code",
            (0x21, 0x00) => "logical block address out of range",
            (0x24, 0x00) => "invalid field in CDB",
            (0x25, 0x00) => "logical unit not supported",
            (0x26, 0x00) => "invalid field in parameter list",
            (0x27, 0x00) => "write protected",
            (0x27, 0x07) => "space allocation failed write protect",
            (0x29, _) => "power on, reset, or bus device reset occurred",
            (0x2a, 0x09) => "capacity data has changed",
            (0x3a, _) => "medium not present",
            (0x3f, 0x0e) => "reported luns data has changed",
            (0x44, 0x00) => "internal target failure",
            _ => return None,
        })
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.key_name())?;
        if let Some(t) = self.asc_text() {
            write!(f, ": {t}")?;
        }
        write!(f, " (asc {:#04x}, ascq {:#04x})", self.asc, self.ascq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn fixed(key: u8, asc: u8, ascq: u8) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = 0x70;
        s[2] = key;
        s[7] = 10;
        s[12] = asc;
        s[13] = ascq;
        s
    }

    #[test]
    fn fixed_and_descriptor_formats() {
        let s = parse(&fixed(key::MEDIUM_ERROR, 0x11, 0)).unwrap();
        assert_eq!(
            s,
            Sense {
                key: 3,
                asc: 0x11,
                ascq: 0
            }
        );
        let d = parse(&[0x72, key::NOT_READY, 0x3a, 0x00, 0, 0, 0, 0]).unwrap();
        assert_eq!(
            d,
            Sense {
                key: 2,
                asc: 0x3a,
                ascq: 0
            }
        );
        assert_eq!(parse(&[0xf0, 0, 0x05]).unwrap().key, 5, "valid bit ignored");
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&[0x7f, 0, 0]), None);
    }

    #[test]
    fn clear_texts() {
        let s = parse(&fixed(key::MEDIUM_ERROR, 0x11, 0)).unwrap();
        assert_eq!(
            s.to_string(),
            "MEDIUM ERROR: unrecovered read error (asc 0x11, ascq 0x00)"
        );
        let s = parse(&fixed(key::ILLEGAL_REQUEST, 0x21, 0)).unwrap();
        assert_eq!(
            s.to_string(),
            "ILLEGAL REQUEST: logical block address out of range (asc 0x21, ascq 0x00)"
        );
        let s = parse(&fixed(key::NOT_READY, 0x3a, 0)).unwrap();
        assert_eq!(
            s.to_string(),
            "NOT READY: medium not present (asc 0x3a, ascq 0x00)"
        );
        let s = parse(&fixed(key::UNIT_ATTENTION, 0x29, 0)).unwrap();
        assert!(s.is_unit_attention());
        assert_eq!(
            s.to_string(),
            "UNIT ATTENTION: power on, reset, or bus device reset occurred (asc 0x29, ascq 0x00)"
        );
    }

    #[test]
    fn errno_like_qemu() {
        let e = |k, a, q| {
            Sense {
                key: k,
                asc: a,
                ascq: q,
            }
            .errno()
        };
        assert_eq!(e(key::MEDIUM_ERROR, 0x11, 0), 5);
        assert_eq!(e(key::ILLEGAL_REQUEST, 0x24, 0), 22);
        assert_eq!(e(key::ILLEGAL_REQUEST, 0x21, 0), 28);
        assert_eq!(e(key::NOT_READY, 0x3a, 0), 123);
        assert_eq!(e(key::DATA_PROTECT, 0x27, 0), 13);
        assert_eq!(e(key::UNIT_ATTENTION, 0x29, 0), 11);
        assert_eq!(e(key::ABORTED_COMMAND, 0, 0), 125);
        assert_eq!(e(key::HARDWARE_ERROR, 0x44, 0), 5);
    }
}
