//! What the engine asks of the host, and what the host answers.
//!
//! A [`Request`] is a validated transmission-phase command, addressed by a
//! [`RequestId`] the engine assigns (the client's cookie rides along but
//! is not trusted to be unique). The host executes it against the export
//! however it likes — at once, later, in any order — and hands back a
//! [`Completion`] with [`super::Connection::complete`]. Flags use the block
//! layer's vocabulary ([`ReqFlags`]): `NBD_CMD_FLAG_FUA` is `BDRV_REQ_FUA`,
//! a write-zeroes without `NBD_CMD_FLAG_NO_HOLE` may unmap
//! (`BDRV_REQ_MAY_UNMAP`), and `NBD_CMD_FLAG_FAST_ZERO` is
//! `BDRV_REQ_NO_FALLBACK`, exactly as QEMU's `nbd/server.c` maps them.

use alloc::string::String;
use alloc::vec::Vec;

use super::repr::Descriptor;
use crate::io::{BlockStatus, IoError, ReqFlags};

/// A metadata context a client selected (QEMU: the members of
/// `NBDExportMetaContexts`), with what it reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`: `NBD_STATE_HOLE` / `NBD_STATE_ZERO`.
    BaseAllocation,
    /// `qemu:allocation-depth`: 0 unallocated, 1 in the export's node, n
    /// in its (n-1)th backing file (QEMU: `bdrv_is_allocated_above`'s
    /// depth).
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME`: `NBD_STATE_DIRTY` (1) where the bitmap
    /// is dirty.
    DirtyBitmap(String),
}

impl MetaContext {
    /// The context's name as the client asks for it.
    pub fn name(&self) -> String {
        match self {
            MetaContext::BaseAllocation => String::from("base:allocation"),
            MetaContext::AllocationDepth => String::from("qemu:allocation-depth"),
            MetaContext::DirtyBitmap(b) => alloc::format!("qemu:dirty-bitmap:{b}"),
        }
    }
}

/// The engine's handle on one request; stale ids (from before a slot was
/// reused, or from a closed connection) are recognised and refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId {
    pub(super) slot: u32,
    pub(super) generation: u32,
}

/// One request for the host to execute.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Pass this back to [`super::Connection::complete`].
    pub id: RequestId,
    /// The client's cookie (for logs).
    pub cookie: u64,
    /// What to do.
    pub op: Op,
}

/// The operation of a [`Request`]. Every range lies inside the export and
/// is aligned to its minimum block size; lengths are nonzero.
#[derive(Debug, PartialEq, Eq)]
pub enum Op {
    /// `NBD_CMD_READ`: answer with [`Completion::Data`], [`Completion::Zero`]
    /// or [`Completion::Chunks`] covering exactly `len` bytes. `len` never
    /// exceeds the export's maximum payload.
    Read {
        /// Offset into the export.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `NBD_CMD_WRITE`: `flags` may hold [`ReqFlags::FUA`].
    Write {
        /// Offset into the export.
        offset: u64,
        /// The bytes to write.
        data: Vec<u8>,
        /// [`ReqFlags::FUA`] or nothing.
        flags: ReqFlags,
    },
    /// `NBD_CMD_FLUSH`: make every write completed so far durable.
    Flush,
    /// `NBD_CMD_TRIM`: `flags` may hold [`ReqFlags::FUA`].
    Trim {
        /// Offset into the export.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// [`ReqFlags::FUA`] or nothing.
        flags: ReqFlags,
    },
    /// `NBD_CMD_WRITE_ZEROES`: `flags` may hold [`ReqFlags::FUA`],
    /// [`ReqFlags::MAY_UNMAP`] (no `NBD_CMD_FLAG_NO_HOLE`) and
    /// [`ReqFlags::NO_FALLBACK`] (`NBD_CMD_FLAG_FAST_ZERO`: fail at once
    /// with [`IoError::Enotsup`] unless zeroing is faster than writing).
    WriteZeroes {
        /// Offset into the export.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// See above.
        flags: ReqFlags,
    },
    /// `NBD_CMD_CACHE`: a hint; complete with [`Completion::Done`].
    Cache {
        /// Offset into the export.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `NBD_CMD_BLOCK_STATUS`: answer with [`Completion::Contexts`], one
    /// entry per context in `contexts`' order, each covering the range
    /// from `offset`; a request for `base:allocation` alone may also be
    /// answered with [`Completion::Extents`] (or [`Completion::Extent`]).
    /// `len` is a hint; extents may stop short or run past it.
    BlockStatus {
        /// Offset into the export.
        offset: u64,
        /// Length of interest.
        len: u64,
        /// `NBD_CMD_FLAG_REQ_ONE`: only the first extent is used.
        req_one: bool,
        /// The selected contexts asked about, with their ids (never
        /// empty).
        contexts: Vec<(u32, MetaContext)>,
    },
}

/// One consecutive piece of a read's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    /// Bytes read.
    Data(Vec<u8>),
    /// This many bytes read as zeroes (sent as `NBD_REPLY_TYPE_OFFSET_HOLE`
    /// where the client allows it).
    Zero(u64),
    /// This many bytes could not be read (`NBD_REPLY_TYPE_ERROR_OFFSET`
    /// where the client allows it; otherwise the whole read fails).
    Error(IoError, u64),
}

/// The host's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// Success of a write, flush, trim, write-zeroes or cache.
    Done,
    /// A read's bytes, all of them.
    Data(Vec<u8>),
    /// A read whose whole range reads as zeroes (no buffer needed).
    Zero,
    /// A read, as consecutive pieces covering the range.
    Chunks(Vec<ReadChunk>),
    /// Block status: consecutive extents from the request's offset
    /// (`BDRV_BLOCK_DATA` clear → `NBD_STATE_HOLE`, `BDRV_BLOCK_ZERO` →
    /// `NBD_STATE_ZERO`, as QEMU reports `base:allocation`).
    Extents(Vec<BlockStatus>),
    /// Block status with a single extent (no allocation).
    Extent(BlockStatus),
    /// Block status per context: the context id of the request's
    /// `contexts` and consecutive raw extents (length, context flags)
    /// from the request's offset.
    Contexts(Vec<(u32, Vec<Descriptor>)>),
    /// Failure of the whole request.
    Error(IoError),
}

/// Why [`super::Connection::complete`] refused a completion. Every case is
/// harmless: the completion is dropped and its slot (if any) freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompleteError {
    /// No request with this id is in flight (completed twice, or never
    /// handed out).
    UnknownRequest,
    /// The connection is closed; the result cannot reach the client.
    Closed,
}

impl core::fmt::Display for CompleteError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CompleteError::UnknownRequest => f.write_str("no such request in flight"),
            CompleteError::Closed => f.write_str("connection closed"),
        }
    }
}
