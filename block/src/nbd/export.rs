//! What the host tells the engine about its exports (QEMU: `NBDExport`).
//!
//! The engine never touches a node: the host describes each export — name,
//! description, size, the operations its node can honour, its block size
//! constraints — and answers `NBD_OPT_LIST`/`INFO`/`GO` through the
//! [`ExportSet`] it passes to [`super::Connection::receive`]. The
//! transmission flags a client sees are derived from [`Features`] here, so
//! they tell the truth about the node by construction.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use super::wire::{self, transmission_flags as tf};

/// What an export's node can do (the honest half of the transmission
/// flags; `NBD_FLAG_SEND_DF` and `NBD_FLAG_BLOCK_STATUS_PAYLOAD` depend on
/// the negotiation and are added by the engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// `NBD_FLAG_READ_ONLY`: writes, trims and zeroes fail with EPERM.
    pub read_only: bool,
    /// `NBD_FLAG_SEND_FLUSH`.
    pub flush: bool,
    /// `NBD_FLAG_SEND_FUA`.
    pub fua: bool,
    /// `NBD_FLAG_SEND_TRIM`.
    pub trim: bool,
    /// `NBD_FLAG_SEND_WRITE_ZEROES` (with `NBD_CMD_FLAG_NO_HOLE`).
    pub write_zeroes: bool,
    /// `NBD_FLAG_SEND_FAST_ZERO` (only with `write_zeroes`).
    pub fast_zero: bool,
    /// `NBD_FLAG_SEND_CACHE`.
    pub cache: bool,
    /// `NBD_FLAG_CAN_MULTI_CONN`: set it only when a flush on one
    /// connection covers writes completed on every other one.
    pub multi_conn: bool,
    /// `NBD_FLAG_ROTATIONAL`.
    pub rotational: bool,
    /// `base:allocation` block status is offered.
    pub block_status: bool,
}

impl Features {
    /// A writable export that can do everything (the host's node honours
    /// flush, FUA, trim, zeroes, fast zeroes and cache). `multi_conn` is
    /// set: right when every connection reaches the same node with no
    /// per-connection cache, as in blockhaus; clear it otherwise.
    pub const fn all() -> Features {
        Features {
            read_only: false,
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            rotational: false,
            block_status: true,
        }
    }

    /// A read-only export with block status and cache, nothing else.
    pub const fn read_only() -> Features {
        Features {
            read_only: true,
            flush: false,
            fua: false,
            trim: false,
            write_zeroes: false,
            fast_zero: false,
            cache: true,
            multi_conn: true,
            rotational: false,
            block_status: true,
        }
    }

    /// The transmission flags these features imply, before negotiation.
    /// A read-only export advertises no trim or zeroes.
    pub fn transmission_flags(self) -> u16 {
        let mut f = tf::HAS_FLAGS;
        let writable = !self.read_only;
        let mut set = |on: bool, bit: u16| {
            if on {
                f |= bit;
            }
        };
        set(self.read_only, tf::READ_ONLY);
        set(self.flush, tf::SEND_FLUSH);
        set(self.fua && writable, tf::SEND_FUA);
        set(self.rotational, tf::ROTATIONAL);
        set(self.trim && writable, tf::SEND_TRIM);
        set(self.write_zeroes && writable, tf::SEND_WRITE_ZEROES);
        set(
            self.fast_zero && self.write_zeroes && writable,
            tf::SEND_FAST_ZERO,
        );
        set(self.multi_conn, tf::CAN_MULTI_CONN);
        set(self.cache, tf::SEND_CACHE);
        f
    }
}

/// `NBD_INFO_BLOCK_SIZE`: the size constraints an export enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    min: u32,
    preferred: u32,
    max_payload: u32,
}

/// Why a [`BlockSize`] is not one the protocol allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockSizeError {
    /// The minimum is not a power of two in 1..=64 KiB.
    Minimum(u32),
    /// The preferred size is not a power of two ≥ max(minimum, 512).
    Preferred(u32),
    /// The maximum payload is below the preferred size or below 64 KiB
    /// (unfragmented reads of 64 KiB must work).
    MaxPayload(u32),
}

impl fmt::Display for BlockSizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockSizeError::Minimum(v) => {
                write!(f, "minimum block size {v} is not a power of 2 up to 65536")
            }
            BlockSizeError::Preferred(v) => write!(
                f,
                "preferred block size {v} is not a power of 2 at least the minimum and 512"
            ),
            BlockSizeError::MaxPayload(v) => write!(
                f,
                "maximum payload {v} is below the preferred block size or 65536"
            ),
        }
    }
}

/// The lowest maximum payload the engine accepts: the spec makes servers
/// support unfragmented reads of 64 KiB.
pub const MIN_MAX_PAYLOAD: u32 = 64 * 1024;

impl BlockSize {
    /// QEMU's (`qemu-nbd`) constraints: 1 / 4096 / 32 MiB.
    pub const QEMU: BlockSize = BlockSize {
        min: 1,
        preferred: 4096,
        max_payload: 32 * 1024 * 1024,
    };

    /// QEMU's constraints for a node whose requests are best aligned to
    /// `alignment` bytes (`blk_get_request_alignment`): that minimum,
    /// preferred at least 4 KiB, 32 MiB of payload. An alignment the
    /// protocol cannot carry (not a power of two, above 64 KiB) is
    /// advertised as 1: the node pads any request.
    pub fn for_alignment(alignment: u64) -> BlockSize {
        let min = u32::try_from(alignment)
            .ok()
            .filter(|a| a.is_power_of_two() && *a <= 65536)
            .unwrap_or(1);
        BlockSize {
            min,
            preferred: min.max(4096),
            ..BlockSize::QEMU
        }
    }

    /// The same without a minimum: what QEMU tells a client that did not
    /// ask for block sizes (`NBD_OPT_GO` without `NBD_INFO_BLOCK_SIZE`, or
    /// `NBD_OPT_EXPORT_NAME`), which may then send requests of any
    /// alignment.
    pub fn without_minimum(self) -> BlockSize {
        BlockSize { min: 1, ..self }
    }

    /// Constraints checked against the rules of the spec's "Size
    /// constraints" section.
    pub fn new(min: u32, preferred: u32, max_payload: u32) -> Result<BlockSize, BlockSizeError> {
        if !min.is_power_of_two() || min > 65536 {
            return Err(BlockSizeError::Minimum(min));
        }
        if !preferred.is_power_of_two() || preferred < min.max(512) {
            return Err(BlockSizeError::Preferred(preferred));
        }
        if max_payload < preferred || max_payload < MIN_MAX_PAYLOAD {
            return Err(BlockSizeError::MaxPayload(max_payload));
        }
        Ok(BlockSize {
            min,
            preferred,
            max_payload,
        })
    }

    /// Minimum block size: the alignment of every offset and length.
    pub fn min(&self) -> u32 {
        self.min
    }

    /// Preferred block size.
    pub fn preferred(&self) -> u32 {
        self.preferred
    }

    /// Maximum payload of a request or a read reply.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }
}

impl Default for BlockSize {
    fn default() -> BlockSize {
        BlockSize::QEMU
    }
}

/// One export, as the host describes it (QEMU's `BlockExportOptionsNbd`:
/// `name`, `description`, `writable`, plus what the node reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The name clients ask for (`""` is the default export).
    pub name: String,
    /// Free text for humans (`NBD_INFO_DESCRIPTION`, `NBD_REP_SERVER`).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// What the node can do.
    pub features: Features,
    /// Size constraints.
    pub block_size: BlockSize,
    /// `qemu:allocation-depth` is offered (QEMU: `allocation-depth`).
    pub allocation_depth: bool,
    /// The dirty bitmaps offered as `qemu:dirty-bitmap:NAME` (QEMU:
    /// `bitmaps`), in the order the context ids follow.
    pub bitmaps: Vec<String>,
}

impl Export {
    /// An export with every feature and QEMU's block sizes.
    pub fn new(name: &str, size: u64) -> Export {
        Export {
            name: String::from(name),
            description: String::new(),
            size,
            features: Features::all(),
            block_size: BlockSize::QEMU,
            allocation_depth: false,
            bitmaps: Vec::new(),
        }
    }

    /// The transmission flags before negotiation.
    pub fn transmission_flags(&self) -> u16 {
        self.features.transmission_flags()
    }

    /// Whether the name is one the protocol can carry (UTF-8 is given by
    /// `String`; no NUL, at most 4096 bytes).
    pub fn name_is_valid(&self) -> bool {
        self.name.len() <= wire::MAX_STRING_SIZE && !self.name.contains('\0')
    }
}

/// The exports a connection may choose from (QEMU: the `nbd_export_find`
/// list). Passed to every [`super::Connection::receive`] call, so exports
/// added or removed between calls are seen by the next option.
pub trait ExportSet {
    /// Call `f` for every export `NBD_OPT_LIST` shows, in order.
    fn for_each(&self, f: &mut dyn FnMut(&Export));

    /// The export called `name` (`""` picks the default export, if any).
    fn find(&self, name: &str) -> Option<Export>;
}

impl ExportSet for [Export] {
    fn for_each(&self, f: &mut dyn FnMut(&Export)) {
        self.iter().for_each(f)
    }

    fn find(&self, name: &str) -> Option<Export> {
        self.iter().find(|e| e.name == name).cloned()
    }
}

impl ExportSet for Vec<Export> {
    fn for_each(&self, f: &mut dyn FnMut(&Export)) {
        self.as_slice().for_each(f)
    }

    fn find(&self, name: &str) -> Option<Export> {
        self.as_slice().find(name)
    }
}
