//! The I/O model: what a request on a node is, what it may fail with.
//!
//! QEMU names: the `bdrv_co_preadv`/`pwritev`/`flush`/`pdiscard`/
//! `pwrite_zeroes`/`block_status`/`getlength`/`truncate` family, the
//! `BdrvRequestFlags` (`BDRV_REQ_FUA`, `BDRV_REQ_MAY_UNMAP`,
//! `BDRV_REQ_WRITE_UNCHANGED`), and the negative-errno convention, which is
//! [`IoError`] here.
//!
//! Every request is a future. Buffers are owned (`Vec<u8>`): a read returns
//! the bytes it read, a write consumes the bytes it writes. A device driver
//! can therefore keep a buffer alive until the device has completed, even if
//! the request's future is dropped early.

use alloc::boxed::Box;
use core::fmt;
use core::future::Future;
use core::pin::Pin;

/// A boxed, not-`Send` future: the whole block layer runs on one thread.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// The result of a request.
pub type IoResult<T> = Result<T, IoError>;

/// An errno-like I/O error (QEMU returns `-errno` from every request).
///
/// `Display` gives glibc's `strerror()` text, which is what QEMU prints
/// (`read failed: Input/output error`) and what QMP events carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoError {
    /// EPERM: the request needs a permission the caller does not hold.
    Eperm,
    /// EIO: the device or a vote failed, or the request is out of range.
    Eio,
    /// EINVAL: malformed request.
    Einval,
    /// ENOSPC: a write beyond what the node can hold.
    Enospc,
    /// ENOTSUP: the driver does not implement the operation.
    Enotsup,
    /// ENOMEDIUM: the backend has no root node (ejected or never inserted).
    Enomedium,
    /// ECANCELED: the request was cancelled.
    Ecanceled,
    /// Any other errno value (e.g. injected by `blkdebug`).
    Other(i32),
}

impl IoError {
    /// The Linux errno number.
    pub fn errno(self) -> i32 {
        match self {
            IoError::Eperm => 1,
            IoError::Eio => 5,
            IoError::Einval => 22,
            IoError::Enospc => 28,
            IoError::Enotsup => 95,
            IoError::Enomedium => 123,
            IoError::Ecanceled => 125,
            IoError::Other(n) => n,
        }
    }

    /// The error for a Linux errno number.
    pub fn from_errno(errno: i32) -> IoError {
        match errno {
            1 => IoError::Eperm,
            5 => IoError::Eio,
            22 => IoError::Einval,
            28 => IoError::Enospc,
            95 => IoError::Enotsup,
            123 => IoError::Enomedium,
            125 => IoError::Ecanceled,
            n => IoError::Other(n),
        }
    }

    /// glibc's `strerror()` text.
    pub fn strerror(self) -> &'static str {
        match self.errno() {
            1 => "Operation not permitted",
            2 => "No such file or directory",
            5 => "Input/output error",
            6 => "No such device or address",
            11 => "Resource temporarily unavailable",
            12 => "Cannot allocate memory",
            13 => "Permission denied",
            16 => "Device or resource busy",
            17 => "File exists",
            19 => "No such device",
            22 => "Invalid argument",
            27 => "File too large",
            28 => "No space left on device",
            30 => "Read-only file system",
            61 => "No data available",
            95 => "Operation not supported",
            110 => "Connection timed out",
            123 => "No medium found",
            125 => "Operation canceled",
            _ => "Unknown error",
        }
    }
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::Other(n) if self.strerror() == "Unknown error" => {
                write!(f, "Unknown error {n}")
            }
            _ => f.write_str(self.strerror()),
        }
    }
}

/// Request flags (QEMU: `BdrvRequestFlags`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReqFlags(u8);

impl ReqFlags {
    /// No flags.
    pub const NONE: ReqFlags = ReqFlags(0);
    /// `BDRV_REQ_FUA`: the write is durable when it completes.
    pub const FUA: ReqFlags = ReqFlags(1);
    /// `BDRV_REQ_MAY_UNMAP`: a write-zeroes may deallocate the range.
    pub const MAY_UNMAP: ReqFlags = ReqFlags(2);
    /// `BDRV_REQ_WRITE_UNCHANGED`: the write does not change what a reader
    /// sees (copy-on-read, a mirror's copy); needs only WRITE_UNCHANGED.
    pub const WRITE_UNCHANGED: ReqFlags = ReqFlags(4);
    /// `BDRV_REQ_NO_FALLBACK`: fail write-zeroes with ENOTSUP rather than
    /// writing a buffer of zeroes.
    pub const NO_FALLBACK: ReqFlags = ReqFlags(8);

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: ReqFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// These flags without those of `other`.
    pub fn without(self, other: ReqFlags) -> ReqFlags {
        ReqFlags(self.0 & !other.0)
    }
}

impl core::ops::BitOr for ReqFlags {
    type Output = ReqFlags;
    fn bitor(self, rhs: ReqFlags) -> ReqFlags {
        ReqFlags(self.0 | rhs.0)
    }
}

/// The status of the first extent of a range (QEMU: the return value and
/// `pnum` of `bdrv_co_block_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// `BDRV_BLOCK_DATA`: the extent holds data (as opposed to a hole).
    pub data: bool,
    /// `BDRV_BLOCK_ZERO`: the extent reads as zeroes.
    pub zero: bool,
    /// `BDRV_BLOCK_ALLOCATED`: this layer provides the extent's content
    /// (as opposed to a backing file below it).
    pub allocated: bool,
    /// Length of the extent in bytes, at least 1 unless the range was empty.
    pub len: u64,
}

impl BlockStatus {
    /// An allocated data extent.
    pub fn data(len: u64) -> BlockStatus {
        BlockStatus {
            data: true,
            zero: false,
            allocated: true,
            len,
        }
    }

    /// An allocated extent that reads as zeroes.
    pub fn zero(len: u64) -> BlockStatus {
        BlockStatus {
            data: false,
            zero: true,
            allocated: true,
            len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn strerror_texts_match_glibc() {
        assert_eq!(IoError::Enomedium.to_string(), "No medium found");
        assert_eq!(IoError::Eio.to_string(), "Input/output error");
        assert_eq!(IoError::Enospc.to_string(), "No space left on device");
        assert_eq!(IoError::Eperm.to_string(), "Operation not permitted");
        assert_eq!(IoError::Einval.to_string(), "Invalid argument");
        assert_eq!(IoError::Enotsup.to_string(), "Operation not supported");
        assert_eq!(IoError::from_errno(30).to_string(), "Read-only file system");
        assert_eq!(IoError::from_errno(999).to_string(), "Unknown error 999");
        assert_eq!(IoError::from_errno(5), IoError::Eio);
    }

    #[test]
    fn flags_combine() {
        let f = ReqFlags::FUA | ReqFlags::MAY_UNMAP;
        assert!(f.contains(ReqFlags::FUA));
        assert!(!f.contains(ReqFlags::WRITE_UNCHANGED));
        assert_eq!(f.without(ReqFlags::FUA), ReqFlags::MAY_UNMAP);
    }
}
