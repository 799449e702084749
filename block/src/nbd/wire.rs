//! Wire layer: the NBD protocol's numbers and header layouts, nothing else.
//!
//! Every constant carries the name `doc/proto.md` (NetworkBlockDevice/nbd)
//! and QEMU's `include/block/nbd.h` give it. All integers on the wire are
//! big-endian. Header layouts are byte ranges ([`Field`]) into a header, as
//! smoltcp's `wire` modules describe packets; the [`get_u16`]-style helpers
//! read and write them. Nothing here allocates or validates meaning: that
//! is [`super::repr`]'s job.

use core::ops::Range;

/// A byte range inside a fixed-size header.
pub type Field = Range<usize>;

/// `NBDMAGIC`: the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT` (`NBD_OPTS_MAGIC`): newstyle greeting and every option header.
pub const NBD_OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// `NBD_REP_MAGIC`: every option reply.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: a compact (28-byte) request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_EXTENDED_REQUEST_MAGIC`: an extended (32-byte) request.
pub const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// `NBD_SIMPLE_REPLY_MAGIC`: a simple (16-byte) reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`: a structured (20-byte) reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// `NBD_EXTENDED_REPLY_MAGIC`: an extended (32-byte) reply chunk.
pub const NBD_EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flags (16 bits, server → client).
pub mod handshake_flags {
    /// `NBD_FLAG_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// `NBD_FLAG_NO_ZEROES`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits, client → server).
pub mod client_flags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// `NBD_FLAG_C_NO_ZEROES`.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag a client may set.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags (16 bits, per export).
pub mod transmission_flags {
    /// `NBD_FLAG_HAS_FLAGS`: always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_ROTATIONAL`.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_FLAG_SEND_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`.
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_RESIZE` (experimental, never sent).
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_FLAG_SEND_CACHE`.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO`.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD` (extended headers only).
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
}

/// Option types (`NBD_OPT_*`).
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME`.
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`.
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`.
    pub const LIST: u32 = 3;
    /// `NBD_OPT_PEEK_EXPORT` (withdrawn).
    pub const PEEK_EXPORT: u32 = 4;
    /// `NBD_OPT_STARTTLS`.
    pub const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO`.
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`.
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// `NBD_OPT_LIST_META_CONTEXT`.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// `NBD_OPT_SET_META_CONTEXT`.
    pub const SET_META_CONTEXT: u32 = 10;
    /// `NBD_OPT_EXTENDED_HEADERS`.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`); errors have bit 31 set.
pub mod rep {
    /// `NBD_REP_ACK`.
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER`.
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`.
    pub const INFO: u32 = 3;
    /// `NBD_REP_META_CONTEXT`.
    pub const META_CONTEXT: u32 = 4;
    /// Bit 31: the reply is an error.
    pub const FLAG_ERROR: u32 = 1 << 31;
    /// `NBD_REP_ERR_UNSUP`.
    pub const ERR_UNSUP: u32 = FLAG_ERROR | 1;
    /// `NBD_REP_ERR_POLICY`.
    pub const ERR_POLICY: u32 = FLAG_ERROR | 2;
    /// `NBD_REP_ERR_INVALID`.
    pub const ERR_INVALID: u32 = FLAG_ERROR | 3;
    /// `NBD_REP_ERR_PLATFORM`.
    pub const ERR_PLATFORM: u32 = FLAG_ERROR | 4;
    /// `NBD_REP_ERR_TLS_REQD`.
    pub const ERR_TLS_REQD: u32 = FLAG_ERROR | 5;
    /// `NBD_REP_ERR_UNKNOWN`.
    pub const ERR_UNKNOWN: u32 = FLAG_ERROR | 6;
    /// `NBD_REP_ERR_SHUTDOWN`.
    pub const ERR_SHUTDOWN: u32 = FLAG_ERROR | 7;
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`.
    pub const ERR_BLOCK_SIZE_REQD: u32 = FLAG_ERROR | 8;
    /// `NBD_REP_ERR_TOO_BIG`.
    pub const ERR_TOO_BIG: u32 = FLAG_ERROR | 9;
    /// `NBD_REP_ERR_EXT_HEADER_REQD`.
    pub const ERR_EXT_HEADER_REQD: u32 = FLAG_ERROR | 10;
}

/// Information types inside `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME`: the canonical export name.
    pub const NAME: u16 = 1;
    /// `NBD_INFO_DESCRIPTION`: text for humans.
    pub const DESCRIPTION: u16 = 2;
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum payload.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    /// `NBD_CMD_READ`.
    pub const READ: u16 = 0;
    /// `NBD_CMD_WRITE`.
    pub const WRITE: u16 = 1;
    /// `NBD_CMD_DISC`.
    pub const DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`.
    pub const FLUSH: u16 = 3;
    /// `NBD_CMD_TRIM`.
    pub const TRIM: u16 = 4;
    /// `NBD_CMD_CACHE`.
    pub const CACHE: u16 = 5;
    /// `NBD_CMD_WRITE_ZEROES`.
    pub const WRITE_ZEROES: u16 = 6;
    /// `NBD_CMD_BLOCK_STATUS`.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flags {
    /// `NBD_CMD_FLAG_FUA`.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `NBD_CMD_FLAG_FAST_ZERO`.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// `NBD_CMD_FLAG_PAYLOAD_LEN` (extended headers only).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Reply flags of structured and extended chunks (`NBD_REPLY_FLAG_*`).
pub mod reply_flags {
    /// `NBD_REPLY_FLAG_DONE`: the last chunk of a reply.
    pub const DONE: u16 = 1 << 0;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`).
pub mod reply_type {
    /// `NBD_REPLY_TYPE_NONE`.
    pub const NONE: u16 = 0;
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    pub const OFFSET_DATA: u16 = 1;
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    pub const OFFSET_HOLE: u16 = 2;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    pub const BLOCK_STATUS: u16 = 5;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`.
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// Bit 15: an error chunk.
    pub const FLAG_ERROR: u16 = 1 << 15;
    /// `NBD_REPLY_TYPE_ERROR`.
    pub const ERROR: u16 = FLAG_ERROR | 1;
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    pub const ERROR_OFFSET: u16 = FLAG_ERROR | 2;
}

/// `base:allocation` status flags (`NBD_STATE_*`).
pub mod state {
    /// `NBD_STATE_HOLE`: not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// `NBD_STATE_ZERO`: reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
    /// `NBD_STATE_DIRTY` of `qemu:dirty-bitmap:*`: dirty in the bitmap.
    pub const DIRTY: u32 = 1 << 0;
}

/// Error values carried in replies (`NBD_E*`).
pub mod errno {
    /// `NBD_EPERM`.
    pub const EPERM: u32 = 1;
    /// `NBD_EIO`.
    pub const EIO: u32 = 5;
    /// `NBD_ENOMEM`.
    pub const ENOMEM: u32 = 12;
    /// `NBD_EINVAL`.
    pub const EINVAL: u32 = 22;
    /// `NBD_ENOSPC`.
    pub const ENOSPC: u32 = 28;
    /// `NBD_EOVERFLOW`.
    pub const EOVERFLOW: u32 = 75;
    /// `NBD_ENOTSUP`.
    pub const ENOTSUP: u32 = 95;
    /// `NBD_ESHUTDOWN`.
    pub const ESHUTDOWN: u32 = 108;
}

/// `NBD_MAX_STRING_SIZE`: the longest string (export name, query, error
/// message) the protocol allows.
pub const MAX_STRING_SIZE: usize = 4096;

/// Server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub mod greeting {
    use super::Field;
    /// `NBDMAGIC`.
    pub const PASSWD: Field = 0..8;
    /// `IHAVEOPT`.
    pub const MAGIC: Field = 8..16;
    /// Handshake flags.
    pub const FLAGS: Field = 16..18;
    /// Total length.
    pub const LEN: usize = 18;
}

/// Option request header (client → server), followed by `LENGTH` bytes.
pub mod option_header {
    use super::Field;
    /// `IHAVEOPT`.
    pub const MAGIC: Field = 0..8;
    /// Option type.
    pub const OPTION: Field = 8..12;
    /// Length of the option data.
    pub const LENGTH: Field = 12..16;
    /// Total length.
    pub const LEN: usize = 16;
}

/// Option reply header (server → client), followed by `LENGTH` bytes.
pub mod option_reply {
    use super::Field;
    /// `NBD_REP_MAGIC`.
    pub const MAGIC: Field = 0..8;
    /// The option being answered.
    pub const OPTION: Field = 8..12;
    /// Reply type.
    pub const TYPE: Field = 12..16;
    /// Length of the reply data.
    pub const LENGTH: Field = 16..20;
    /// Total length.
    pub const LEN: usize = 20;
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, then 124 zeroes
/// unless `NBD_FLAG_C_NO_ZEROES`.
pub mod export_name_reply {
    use super::Field;
    /// Export size.
    pub const SIZE: Field = 0..8;
    /// Transmission flags.
    pub const FLAGS: Field = 8..10;
    /// Length without the zeroes.
    pub const LEN: usize = 10;
    /// Number of reserved zeroes.
    pub const ZEROES: usize = 124;
}

/// Request header, compact (28 bytes) or extended (32 bytes).
pub mod request {
    use super::Field;
    /// `NBD_REQUEST_MAGIC` or `NBD_EXTENDED_REQUEST_MAGIC`.
    pub const MAGIC: Field = 0..4;
    /// Command flags.
    pub const FLAGS: Field = 4..6;
    /// Command type.
    pub const TYPE: Field = 6..8;
    /// Cookie (formerly "handle"), echoed in the reply.
    pub const COOKIE: Field = 8..16;
    /// Offset into the export.
    pub const OFFSET: Field = 16..24;
    /// 32-bit length (compact).
    pub const LENGTH: Field = 24..28;
    /// 64-bit length (extended).
    pub const LENGTH_EXT: Field = 24..32;
    /// Compact header length.
    pub const LEN: usize = 28;
    /// Extended header length.
    pub const LEN_EXT: usize = 32;
}

/// Simple reply header (16 bytes).
pub mod simple_reply {
    use super::Field;
    /// `NBD_SIMPLE_REPLY_MAGIC`.
    pub const MAGIC: Field = 0..4;
    /// Error (0 on success).
    pub const ERROR: Field = 4..8;
    /// Cookie.
    pub const COOKIE: Field = 8..16;
    /// Total length.
    pub const LEN: usize = 16;
}

/// Structured (20 bytes) or extended (32 bytes) reply chunk header.
pub mod chunk {
    use super::Field;
    /// `NBD_STRUCTURED_REPLY_MAGIC` or `NBD_EXTENDED_REPLY_MAGIC`.
    pub const MAGIC: Field = 0..4;
    /// Reply flags.
    pub const FLAGS: Field = 4..6;
    /// Chunk type.
    pub const TYPE: Field = 6..8;
    /// Cookie.
    pub const COOKIE: Field = 8..16;
    /// 32-bit payload length (structured).
    pub const LENGTH: Field = 16..20;
    /// Request offset (extended).
    pub const OFFSET_EXT: Field = 16..24;
    /// 64-bit payload length (extended).
    pub const LENGTH_EXT: Field = 24..32;
    /// Structured header length.
    pub const LEN: usize = 20;
    /// Extended header length.
    pub const LEN_EXT: usize = 32;
}

/// Read a big-endian `u16` field.
pub fn get_u16(buf: &[u8], field: Field) -> u16 {
    let mut b = [0u8; 2];
    b.copy_from_slice(&buf[field]);
    u16::from_be_bytes(b)
}

/// Read a big-endian `u32` field.
pub fn get_u32(buf: &[u8], field: Field) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[field]);
    u32::from_be_bytes(b)
}

/// Read a big-endian `u64` field.
pub fn get_u64(buf: &[u8], field: Field) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[field]);
    u64::from_be_bytes(b)
}

/// Write a big-endian `u16` field.
pub fn set_u16(buf: &mut [u8], field: Field, v: u16) {
    buf[field].copy_from_slice(&v.to_be_bytes());
}

/// Write a big-endian `u32` field.
pub fn set_u32(buf: &mut [u8], field: Field, v: u32) {
    buf[field].copy_from_slice(&v.to_be_bytes());
}

/// Write a big-endian `u64` field.
pub fn set_u64(buf: &mut [u8], field: Field, v: u64) {
    buf[field].copy_from_slice(&v.to_be_bytes());
}
