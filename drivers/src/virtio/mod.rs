//! blockhaus's own virtio disk drivers, on virtio-drivers' PCI transport
//! and virtqueue.
//!
//! # The request API (the same for both drivers)
//!
//! A disk takes a request and answers later:
//!
//! 1. `submit(Op) -> Result<RequestId, Error>` checks the request (block
//!    alignment, range, read-only) and queues it in the driver's backlog.
//!    It never waits and never touches the device: the next `poll` moves
//!    what fits onto the virtqueue, so requests submitted together reach
//!    the device with one notification. A request larger than the device's limits is
//!    split; its parts run in parallel and it completes once, when the last
//!    part does, with the first error any part had.
//! 2. `poll(&mut Vec<Completion>) -> bool` reaps the used ring, refills the
//!    virtqueue from the backlog, notifies the device when it runs low or
//!    a batch is waiting (every notification is a VM exit), and
//!    appends one [`Completion`] per finished request (id, result, and the
//!    request's buffer back). It returns whether anything happened.
//!
//! Buffers are owned `Vec<u8>`s (the block layer's buffer type): a read
//! fills the buffer it was given, a write sends it; both come back in the
//! completion, so a caller whose future was dropped never frees memory the
//! device is still writing. The kernel identity-maps RAM, so any heap
//! buffer is a DMA buffer ([`hal`]).
//!
//! Modules: [`hal`] (DMA memory), [`queue`] (run-time sized virtqueue and
//! descriptor chains), [`blk`] (virtio-blk), [`scsi`] (virtio-scsi), [`console`] (multiport
//! virtio console, for QMP), [`rng`] (virtio-rng, entropy for TLS), and
//! [`transport`] (bringing a PCI function up as a virtio device).

pub mod blk;
pub mod console;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod hal;
pub mod queue;
pub mod requests;
pub mod rng;
pub mod scsi;
pub mod transport;

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Identifies a submitted request until its [`Completion`].
pub type RequestId = u64;

/// What a request asks of a disk. Offsets and lengths are in bytes and must
/// be multiples of the disk's logical block size.
#[derive(Debug)]
pub enum Op {
    /// Fill `buf` from `offset`.
    Read { offset: u64, buf: Vec<u8> },
    /// Write `buf` at `offset`; with `fua`, durable when it completes.
    Write {
        offset: u64,
        buf: Vec<u8>,
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Deallocate a range (contents afterwards are unspecified).
    Discard { offset: u64, len: u64 },
    /// Make a range read as zeroes; `may_unmap` lets the device deallocate.
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
    },
}

impl Op {
    /// The QEMU-style name of the operation, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Flush => "flush",
            Op::Discard { .. } => "discard",
            Op::WriteZeroes { .. } => "write-zeroes",
        }
    }

    /// Whether the operation changes the disk.
    pub fn is_write(&self) -> bool {
        !matches!(self, Op::Read { .. } | Op::Flush)
    }

    /// `(offset, len)` of the byte range, `None` for a flush.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            Op::Read { offset, buf } | Op::Write { offset, buf, .. } => {
                Some((*offset, buf.len() as u64))
            }
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => {
                Some((*offset, *len))
            }
            Op::Flush => None,
        }
    }
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    pub id: RequestId,
    pub result: Result<(), Error>,
    /// The request's buffer (read data, or the written bytes); empty for
    /// requests without one.
    pub buf: Vec<u8>,
}

/// Why a request or a device failed. [`Error::errno`] gives the Linux
/// errno the block layer reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The device reported an I/O error (virtio-blk `IOERR`, SCSI
    /// hardware error, aborted command...).
    Io,
    /// The device does not support the operation (virtio-blk `UNSUPP`, a
    /// feature not offered, SCSI INVALID COMMAND OPERATION CODE).
    Unsupported,
    /// A write to a read-only device.
    ReadOnly,
    /// Offset or length not a multiple of the logical block size.
    Misaligned { block_size: u32 },
    /// The range ends beyond the end of the device.
    OutOfRange { end: u64, capacity: u64 },
    /// A SCSI command ended with CHECK CONDITION; the decoded sense data.
    Sense(scsi::sense::Sense),
    /// A SCSI command ended with a status other than GOOD or CHECK
    /// CONDITION (BUSY, RESERVATION CONFLICT, ...).
    ScsiStatus(u8),
    /// The virtio-scsi transport failed the command (response code).
    Transport(scsi::wire::Response),
    /// The LUN was hot-unplugged.
    Gone,
    /// Setting the device up failed.
    Setup(&'static str),
}

impl Error {
    /// The Linux errno for this error, as QEMU would return it.
    pub fn errno(&self) -> i32 {
        const EIO: i32 = 5;
        const ENODEV: i32 = 19;
        const EINVAL: i32 = 22;
        const EROFS: i32 = 30;
        const ENOTSUP: i32 = 95;
        match self {
            Error::Io | Error::ScsiStatus(_) | Error::Setup(_) => EIO,
            Error::Unsupported => ENOTSUP,
            Error::ReadOnly => EROFS,
            Error::Misaligned { .. } | Error::OutOfRange { .. } => EINVAL,
            Error::Sense(s) => s.errno(),
            Error::Transport(scsi::wire::Response::BadTarget) | Error::Gone => ENODEV,
            Error::Transport(_) => EIO,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io => f.write_str("device reported an I/O error"),
            Error::Unsupported => f.write_str("operation not supported by the device"),
            Error::ReadOnly => f.write_str("device is read-only"),
            Error::Misaligned { block_size } => write!(
                f,
                "offset and length must be multiples of the block size ({block_size})"
            ),
            Error::OutOfRange { end, capacity } => write!(
                f,
                "request ends at byte {end}, beyond the device's {capacity} bytes"
            ),
            Error::Sense(s) => write!(f, "{s}"),
            Error::ScsiStatus(s) => write!(f, "SCSI status {s:#04x}"),
            Error::Transport(r) => write!(f, "virtio-scsi: {r}"),
            Error::Gone => f.write_str("the LUN was removed (hot-unplugged)"),
            Error::Setup(what) => write!(f, "device setup failed: {what}"),
        }
    }
}

/// What a disk can do and how big its requests may be. Byte units.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Largest read/write one device request carries; bigger ones are split.
    pub max_transfer: u32,
    /// Largest data segment (one descriptor).
    pub max_segment: u32,
    /// Data segments per device request.
    pub max_segments: u32,
    /// Largest discard per device request; 0 = discard not supported.
    pub max_discard: u64,
    /// Discard granularity.
    pub discard_alignment: u32,
    /// Largest write-zeroes per device request; 0 = not supported.
    pub max_write_zeroes: u64,
    /// Preferred transfer size (0 = unknown).
    pub optimal_transfer: u32,
    /// The virtqueue's size: requests in flight at once.
    pub queue_size: u16,
}

/// What a disk is: the facts `x-query-devices` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskInfo {
    /// virtio-blk GET_ID, or SCSI VPD page 0x80 (unit serial number).
    pub serial: String,
    /// SCSI vendor and product (INQUIRY); empty for virtio-blk.
    pub model: String,
    /// Size in bytes.
    pub capacity: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Physical block size.
    pub physical_block_size: u32,
    pub read_only: bool,
    /// Whether flush does anything (virtio-blk FLUSH; always on SCSI).
    pub flush: bool,
    pub limits: Limits,
}

impl DiskInfo {
    /// Checks `op` against the disk: block alignment, range, read-only,
    /// supported operation.
    pub fn check(&self, op: &Op) -> Result<(), Error> {
        if op.is_write() && self.read_only {
            return Err(Error::ReadOnly);
        }
        match op {
            Op::Discard { .. } if self.limits.max_discard == 0 => return Err(Error::Unsupported),
            Op::WriteZeroes { .. } if self.limits.max_write_zeroes == 0 => {
                return Err(Error::Unsupported);
            }
            _ => {}
        }
        if let Some((offset, len)) = op.range() {
            let bs = u64::from(self.block_size.max(1));
            if offset % bs != 0 || len % bs != 0 {
                return Err(Error::Misaligned {
                    block_size: self.block_size,
                });
            }
            let end = offset.saturating_add(len);
            if end > self.capacity {
                return Err(Error::OutOfRange {
                    end,
                    capacity: self.capacity,
                });
            }
        }
        Ok(())
    }
}

/// Splits `[offset, offset + len)` into pieces of at most `max` bytes
/// (`max` > 0). An empty range gives no piece.
pub fn split(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let max = max.max(1);
    let count = len.div_ceil(max);
    (0..count).map(move |i| {
        let start = i * max;
        (offset + start, (len - start).min(max))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn disk() -> DiskInfo {
        DiskInfo {
            capacity: 1 << 20,
            block_size: 512,
            limits: Limits {
                max_discard: 4096,
                ..Limits::default()
            },
            ..DiskInfo::default()
        }
    }

    #[test]
    fn split_covers_the_range_in_order() {
        let parts: Vec<_> = split(4096, 10_000, 4096).collect();
        assert_eq!(parts, vec![(4096, 4096), (8192, 4096), (12288, 1808)]);
        assert_eq!(split(0, 0, 4096).count(), 0);
        assert_eq!(split(0, 4096, 4096).collect::<Vec<_>>(), vec![(0, 4096)]);
    }

    #[test]
    fn check_rejects_misaligned_out_of_range_read_only_and_unsupported() {
        let d = disk();
        let read = |offset, len| Op::Read {
            offset,
            buf: vec![0; len],
        };
        assert_eq!(d.check(&read(0, 512)), Ok(()));
        assert_eq!(
            d.check(&read(1, 512)),
            Err(Error::Misaligned { block_size: 512 })
        );
        assert_eq!(
            d.check(&read((1 << 20) - 512, 1024)),
            Err(Error::OutOfRange {
                end: (1 << 20) + 512,
                capacity: 1 << 20
            })
        );
        assert_eq!(
            d.check(&Op::WriteZeroes {
                offset: 0,
                len: 512,
                may_unmap: false
            }),
            Err(Error::Unsupported)
        );
        let ro = DiskInfo {
            read_only: true,
            ..disk()
        };
        assert_eq!(
            ro.check(&Op::Discard {
                offset: 0,
                len: 512
            }),
            Err(Error::ReadOnly)
        );
        assert_eq!(ro.check(&Op::Flush), Ok(()));
        assert_eq!(Error::ReadOnly.errno(), 30);
        assert_eq!(Error::Unsupported.errno(), 95);
        assert_eq!(Error::Io.errno(), 5);
    }
}
