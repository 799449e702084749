//! Repr layer: typed options, requests and replies, parsed from and
//! emitted to the bytes [`super::wire`] lays out.
//!
//! As in smoltcp, "make illegal states unrepresentable": parsing sheds
//! everything invalid (a string that is not UTF-8 or holds a NUL, a length
//! that points past its option, a list whose size does not add up), so
//! whatever a `parse` returns can be acted upon without further checks,
//! and whatever exists here can be emitted. Parsing borrows from the input
//! and never allocates; emitting appends to a caller's `Vec<u8>`.

use alloc::vec::Vec;
use core::fmt;

use super::export::BlockSize;
use super::wire::{self, cmd, get_u16, get_u32, get_u64, info, opt, rep, reply_type};

/// Why option data was refused (answered with `NBD_REP_ERR_INVALID`, or a
/// hard disconnect for `NBD_OPT_EXPORT_NAME`, which has no error reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionError {
    /// The option must carry no data.
    UnexpectedData,
    /// A length field points past the end of the option.
    Truncated,
    /// The option is longer than its fields say.
    TrailingData,
    /// A string is not UTF-8, holds a NUL or is longer than 4096 bytes.
    BadString,
    /// `NBD_INFO_BLOCK_SIZE` with sizes the protocol forbids (a reply,
    /// seen by the client).
    BadBlockSize,
}

impl OptionError {
    /// The message sent with `NBD_REP_ERR_INVALID` (QEMU's wording where it
    /// has one).
    pub fn message(self) -> &'static str {
        match self {
            OptionError::UnexpectedData => "option must carry no data",
            OptionError::Truncated => "option data is truncated",
            OptionError::TrailingData => "option has trailing data",
            OptionError::BadString => "invalid string in option",
            OptionError::BadBlockSize => "server block size constraints are invalid",
        }
    }
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// A string as the protocol allows it: UTF-8, no NUL, at most 4096 bytes.
pub fn parse_string(bytes: &[u8]) -> Result<&str, OptionError> {
    if bytes.len() > wire::MAX_STRING_SIZE || bytes.contains(&0) {
        return Err(OptionError::BadString);
    }
    core::str::from_utf8(bytes).map_err(|_| OptionError::BadString)
}

/// A cursor over option data that fails instead of panicking.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionError> {
        if self.data.len() < n {
            return Err(OptionError::Truncated);
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, OptionError> {
        Ok(get_u16(self.take(2)?, 0..2))
    }

    fn u32(&mut self) -> Result<u32, OptionError> {
        Ok(get_u32(self.take(4)?, 0..4))
    }

    fn string(&mut self) -> Result<&'a str, OptionError> {
        let len = self.u32()? as usize;
        parse_string(self.take(len)?)
    }

    fn finish(self) -> Result<(), OptionError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(OptionError::TrailingData)
        }
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the
/// `NBD_INFO_*` items the client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Export name.
    pub name: &'a str,
    requests: &'a [u8],
}

impl<'a> InfoRequest<'a> {
    /// The requested information types, in the client's order.
    pub fn requests(&self) -> impl Iterator<Item = u16> + 'a {
        self.requests
            .as_chunks::<2>()
            .0
            .iter()
            .map(|c| u16::from_be_bytes(*c))
    }

    /// Whether the client asked for `item`.
    pub fn wants(&self, item: u16) -> bool {
        self.requests().any(|r| r == item)
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT`: an
/// export name and a list of queries (each checked to be a valid string).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    /// Export name.
    pub name: &'a str,
    count: u32,
    queries: &'a [u8],
}

impl<'a> MetaContextRequest<'a> {
    /// Number of queries.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether there are no queries.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The queries, in the client's order.
    pub fn queries(&self) -> impl Iterator<Item = &'a str> + 'a {
        let mut r = Reader { data: self.queries };
        // Every query was validated by `parse`, so `string` cannot fail
        // here; stopping at the first failure keeps this panic-free anyway.
        core::iter::from_fn(move || r.string().ok())
    }
}

/// An option the client sent during haggling, parsed from its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientOption<'a> {
    /// `NBD_OPT_EXPORT_NAME`.
    ExportName(&'a str),
    /// `NBD_OPT_ABORT` (any data is ignored, as the spec asks).
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest<'a>),
    /// `NBD_OPT_GO`.
    Go(InfoRequest<'a>),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest<'a>),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest<'a>),
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// Anything else (answered `NBD_REP_ERR_UNSUP`).
    Unknown(u32),
}

impl<'a> ClientOption<'a> {
    /// Whether the engine knows `option` (unknown ones are skipped without
    /// being buffered).
    pub fn is_known(option: u32) -> bool {
        matches!(
            option,
            opt::EXPORT_NAME
                | opt::ABORT
                | opt::LIST
                | opt::STARTTLS
                | opt::INFO
                | opt::GO
                | opt::STRUCTURED_REPLY
                | opt::LIST_META_CONTEXT
                | opt::SET_META_CONTEXT
                | opt::EXTENDED_HEADERS
        )
    }

    /// Parse the data of option `option`.
    pub fn parse(option: u32, data: &'a [u8]) -> Result<ClientOption<'a>, OptionError> {
        let no_data = |o: ClientOption<'a>| {
            if data.is_empty() {
                Ok(o)
            } else {
                Err(OptionError::UnexpectedData)
            }
        };
        match option {
            opt::EXPORT_NAME => Ok(ClientOption::ExportName(parse_string(data)?)),
            opt::ABORT => Ok(ClientOption::Abort),
            opt::LIST => no_data(ClientOption::List),
            opt::STARTTLS => no_data(ClientOption::StartTls),
            opt::STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
            opt::EXTENDED_HEADERS => no_data(ClientOption::ExtendedHeaders),
            opt::INFO | opt::GO => {
                let mut r = Reader { data };
                let name = r.string()?;
                let n = r.u16()? as usize;
                let requests = r.take(n * 2)?;
                r.finish()?;
                let req = InfoRequest { name, requests };
                Ok(if option == opt::GO {
                    ClientOption::Go(req)
                } else {
                    ClientOption::Info(req)
                })
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let mut r = Reader { data };
                let name = r.string()?;
                let count = r.u32()?;
                let queries = r.data;
                for _ in 0..count {
                    r.string()?;
                }
                r.finish()?;
                let req = MetaContextRequest {
                    name,
                    count,
                    queries,
                };
                Ok(if option == opt::SET_META_CONTEXT {
                    ClientOption::SetMetaContext(req)
                } else {
                    ClientOption::ListMetaContext(req)
                })
            }
            other => Ok(ClientOption::Unknown(other)),
        }
    }
}

/// One `NBD_REP_INFO` item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info<'a> {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`.
    Name(&'a str),
    /// `NBD_INFO_DESCRIPTION`.
    Description(&'a str),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize(BlockSize),
}

/// A reply to an option (fixed newstyle), emitted with the option's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionReply<'a> {
    /// `NBD_REP_ACK`.
    Ack,
    /// `NBD_REP_SERVER`: one export of `NBD_OPT_LIST`.
    Server {
        /// Export name.
        name: &'a str,
        /// Description (may be empty).
        description: &'a str,
    },
    /// `NBD_REP_INFO`.
    Info(Info<'a>),
    /// `NBD_REP_META_CONTEXT`.
    MetaContext {
        /// Context id (0 in `LIST_META_CONTEXT` replies).
        id: u32,
        /// Context name, e.g. `base:allocation`.
        name: &'a str,
    },
    /// An `NBD_REP_ERR_*` reply with a message for humans.
    Error {
        /// The error reply type (bit 31 set).
        code: u32,
        /// Message (at most 4096 bytes are sent).
        message: &'a str,
    },
}

fn clip(s: &str) -> &[u8] {
    let b = s.as_bytes();
    &b[..b.len().min(wire::MAX_STRING_SIZE)]
}

impl OptionReply<'_> {
    /// The reply type.
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionReply::Ack => rep::ACK,
            OptionReply::Server { .. } => rep::SERVER,
            OptionReply::Info(_) => rep::INFO,
            OptionReply::MetaContext { .. } => rep::META_CONTEXT,
            OptionReply::Error { code, .. } => *code,
        }
    }

    /// Append the reply (header and data) to `out`.
    pub fn emit(&self, option: u32, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&wire::NBD_REP_MAGIC.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&self.reply_type().to_be_bytes());
        out.extend_from_slice(&[0; 4]);
        let data = out.len();
        match *self {
            OptionReply::Ack => {}
            OptionReply::Server { name, description } => {
                let name = clip(name);
                out.extend_from_slice(&(name.len() as u32).to_be_bytes());
                out.extend_from_slice(name);
                out.extend_from_slice(clip(description));
            }
            OptionReply::Info(item) => match item {
                Info::Export { size, flags } => {
                    out.extend_from_slice(&info::EXPORT.to_be_bytes());
                    out.extend_from_slice(&size.to_be_bytes());
                    out.extend_from_slice(&flags.to_be_bytes());
                }
                Info::Name(name) => {
                    out.extend_from_slice(&info::NAME.to_be_bytes());
                    out.extend_from_slice(clip(name));
                }
                Info::Description(text) => {
                    out.extend_from_slice(&info::DESCRIPTION.to_be_bytes());
                    out.extend_from_slice(clip(text));
                }
                Info::BlockSize(bs) => {
                    out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
                    out.extend_from_slice(&bs.min().to_be_bytes());
                    out.extend_from_slice(&bs.preferred().to_be_bytes());
                    out.extend_from_slice(&bs.max_payload().to_be_bytes());
                }
            },
            OptionReply::MetaContext { id, name } => {
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(clip(name));
            }
            OptionReply::Error { message, .. } => out.extend_from_slice(clip(message)),
        }
        let len = (out.len() - data) as u32;
        wire::set_u32(&mut out[start..], wire::option_reply::LENGTH, len);
    }
}

/// A transmission-phase command (`NBD_CMD_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_DISC`.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// Anything else (answered EINVAL).
    Unknown(u16),
}

impl From<u16> for Command {
    fn from(v: u16) -> Command {
        match v {
            cmd::READ => Command::Read,
            cmd::WRITE => Command::Write,
            cmd::DISC => Command::Disc,
            cmd::FLUSH => Command::Flush,
            cmd::TRIM => Command::Trim,
            cmd::CACHE => Command::Cache,
            cmd::WRITE_ZEROES => Command::WriteZeroes,
            cmd::BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }
}

impl From<Command> for u16 {
    fn from(c: Command) -> u16 {
        match c {
            Command::Read => cmd::READ,
            Command::Write => cmd::WRITE,
            Command::Disc => cmd::DISC,
            Command::Flush => cmd::FLUSH,
            Command::Trim => cmd::TRIM,
            Command::Cache => cmd::CACHE,
            Command::WriteZeroes => cmd::WRITE_ZEROES,
            Command::BlockStatus => cmd::BLOCK_STATUS,
            Command::Unknown(v) => v,
        }
    }
}

impl Command {
    /// QEMU's name for the command (`nbd_cmd_lookup`).
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Disc => "disconnect",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::Cache => "cache",
            Command::WriteZeroes => "write zeroes",
            Command::BlockStatus => "block status",
            Command::Unknown(_) => "<unknown>",
        }
    }
}

/// A request header whose magic matched the negotiated header style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`), not yet checked.
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset into the export.
    pub offset: u64,
    /// Length: 32 bits in compact headers, 64 in extended ones.
    pub length: u64,
}

/// A request header that cannot be parsed: the connection must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// The magic is not the one the negotiated header style uses.
    BadMagic(u32),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::BadMagic(m) => write!(f, "invalid request magic 0x{m:08x}"),
        }
    }
}

impl RequestHeader {
    /// Header length for the negotiated style.
    pub fn len(extended: bool) -> usize {
        if extended {
            wire::request::LEN_EXT
        } else {
            wire::request::LEN
        }
    }

    /// Parse a header of [`RequestHeader::len`] bytes.
    pub fn parse(buf: &[u8], extended: bool) -> Result<RequestHeader, HeaderError> {
        use wire::request as r;
        if buf.len() < Self::len(extended) {
            return Err(HeaderError::BadMagic(0));
        }
        let magic = get_u32(buf, r::MAGIC);
        let want = if extended {
            wire::NBD_EXTENDED_REQUEST_MAGIC
        } else {
            wire::NBD_REQUEST_MAGIC
        };
        if magic != want {
            return Err(HeaderError::BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: get_u16(buf, r::FLAGS),
            command: Command::from(get_u16(buf, r::TYPE)),
            cookie: get_u64(buf, r::COOKIE),
            offset: get_u64(buf, r::OFFSET),
            length: if extended {
                get_u64(buf, r::LENGTH_EXT)
            } else {
                u64::from(get_u32(buf, r::LENGTH))
            },
        })
    }

    /// Append the header (as a client sends it) to `out`. A compact header
    /// carries the low 32 bits of the length.
    pub fn emit(&self, extended: bool, out: &mut Vec<u8>) {
        let magic = if extended {
            wire::NBD_EXTENDED_REQUEST_MAGIC
        } else {
            wire::NBD_REQUEST_MAGIC
        };
        out.extend_from_slice(&magic.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&u16::from(self.command).to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        if extended {
            out.extend_from_slice(&self.length.to_be_bytes());
        } else {
            out.extend_from_slice(&(self.length as u32).to_be_bytes());
        }
    }
}

/// A simple reply (16 bytes; a read's data follows on success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// `NBD_E*` error, 0 on success.
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

impl SimpleReply {
    /// Append the reply to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&wire::NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.error.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
    }
}

/// One extent of a block status chunk (`NBD_REPLY_TYPE_BLOCK_STATUS`
/// descriptor; 32-bit fields unless extended headers are in use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Extent length, nonzero.
    pub length: u64,
    /// Status flags (`NBD_STATE_*` for `base:allocation`).
    pub flags: u32,
}

/// A structured or extended reply chunk, without its data payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: `data_len` bytes follow the header.
    OffsetData {
        /// Offset of the data.
        offset: u64,
        /// Length of the data that follows.
        data_len: u64,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole {
        /// Offset of the hole.
        offset: u64,
        /// Hole size, nonzero.
        len: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS` (or `_EXT` with extended headers).
    BlockStatus {
        /// Metadata context id.
        context: u32,
        /// One or more extents.
        extents: &'a [Descriptor],
    },
    /// `NBD_REPLY_TYPE_ERROR`.
    Error {
        /// `NBD_E*` error, nonzero.
        error: u32,
        /// Message for humans.
        message: &'a str,
    },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    ErrorOffset {
        /// `NBD_E*` error, nonzero.
        error: u32,
        /// Message for humans.
        message: &'a str,
        /// Where the error happened.
        offset: u64,
    },
}

/// The fields of a chunk header that do not depend on the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset (sent only in extended headers).
    pub offset: u64,
    /// `NBD_REPLY_FLAG_DONE` on the last chunk.
    pub done: bool,
    /// Extended (32-byte) rather than structured (20-byte) header.
    pub extended: bool,
}

impl Chunk<'_> {
    /// The chunk type.
    pub fn chunk_type(&self, extended: bool) -> u16 {
        match self {
            Chunk::None => reply_type::NONE,
            Chunk::OffsetData { .. } => reply_type::OFFSET_DATA,
            Chunk::OffsetHole { .. } => reply_type::OFFSET_HOLE,
            Chunk::BlockStatus { .. } if extended => reply_type::BLOCK_STATUS_EXT,
            Chunk::BlockStatus { .. } => reply_type::BLOCK_STATUS,
            Chunk::Error { .. } => reply_type::ERROR,
            Chunk::ErrorOffset { .. } => reply_type::ERROR_OFFSET,
        }
    }

    /// Append header and payload (for `OffsetData`, only the offset: the
    /// caller sends `data_len` bytes after it) to `out`.
    pub fn emit(&self, header: ChunkHeader, out: &mut Vec<u8>) {
        let extended = header.extended;
        let magic = if extended {
            wire::NBD_EXTENDED_REPLY_MAGIC
        } else {
            wire::NBD_STRUCTURED_REPLY_MAGIC
        };
        let start = out.len();
        out.extend_from_slice(&magic.to_be_bytes());
        let flags = if header.done {
            wire::reply_flags::DONE
        } else {
            0
        };
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&self.chunk_type(extended).to_be_bytes());
        out.extend_from_slice(&header.cookie.to_be_bytes());
        if extended {
            out.extend_from_slice(&header.offset.to_be_bytes());
            out.extend_from_slice(&[0; 8]);
        } else {
            out.extend_from_slice(&[0; 4]);
        }
        let payload = out.len();
        let mut extra = 0u64;
        match *self {
            Chunk::None => {}
            Chunk::OffsetData { offset, data_len } => {
                out.extend_from_slice(&offset.to_be_bytes());
                extra = data_len;
            }
            Chunk::OffsetHole { offset, len } => {
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
            }
            Chunk::BlockStatus { context, extents } => {
                out.extend_from_slice(&context.to_be_bytes());
                if extended {
                    out.extend_from_slice(&(extents.len() as u32).to_be_bytes());
                    for e in extents {
                        out.extend_from_slice(&e.length.to_be_bytes());
                        out.extend_from_slice(&u64::from(e.flags).to_be_bytes());
                    }
                } else {
                    for e in extents {
                        out.extend_from_slice(&(e.length as u32).to_be_bytes());
                        out.extend_from_slice(&e.flags.to_be_bytes());
                    }
                }
            }
            Chunk::Error { error, message } => {
                let m = clip(message);
                out.extend_from_slice(&error.to_be_bytes());
                out.extend_from_slice(&(m.len() as u16).to_be_bytes());
                out.extend_from_slice(m);
            }
            Chunk::ErrorOffset {
                error,
                message,
                offset,
            } => {
                let m = clip(message);
                out.extend_from_slice(&error.to_be_bytes());
                out.extend_from_slice(&(m.len() as u16).to_be_bytes());
                out.extend_from_slice(m);
                out.extend_from_slice(&offset.to_be_bytes());
            }
        }
        let len = (out.len() - payload) as u64 + extra;
        let hdr = &mut out[start..];
        if extended {
            wire::set_u64(hdr, wire::chunk::LENGTH_EXT, len);
        } else {
            wire::set_u32(hdr, wire::chunk::LENGTH, len as u32);
        }
    }
}

// ---------------------------------------------------------------------
// The client's half: options emitted, option replies and transmission
// replies parsed. Same layouts as above, seen from the other end.
// ---------------------------------------------------------------------

/// Append an option request (`IHAVEOPT`, option, length, data) to `out`.
pub fn emit_option(option: u32, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&wire::NBD_OPTS_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The data of `NBD_OPT_INFO`/`NBD_OPT_GO`: `name` and the `NBD_INFO_*`
/// items asked for (what [`ClientOption::parse`] reads back).
pub fn info_request_data(name: &str, items: &[u16]) -> Vec<u8> {
    let name = clip(name);
    let mut d = Vec::with_capacity(4 + name.len() + 2 + 2 * items.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name);
    d.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for i in items {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// The data of `NBD_OPT_SET_META_CONTEXT`/`NBD_OPT_LIST_META_CONTEXT`.
pub fn meta_context_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let name = clip(name);
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        let q = clip(q);
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
    }
    d
}

/// The header of an option reply, as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply_type: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Parse [`wire::option_reply::LEN`] bytes; `None` if the magic is wrong.
    pub fn parse(buf: &[u8]) -> Option<OptionReplyHeader> {
        use wire::option_reply as r;
        if buf.len() < r::LEN || get_u64(buf, r::MAGIC) != wire::NBD_REP_MAGIC {
            return None;
        }
        Some(OptionReplyHeader {
            option: get_u32(buf, r::OPTION),
            reply_type: get_u32(buf, r::TYPE),
            length: get_u32(buf, r::LENGTH),
        })
    }
}

impl<'a> OptionReply<'a> {
    /// Parse the data of an option reply of type `reply_type` (the inverse
    /// of [`OptionReply::emit`]). Unknown `NBD_INFO_*` items and unknown
    /// non-error reply types are `Err(Truncated)`-free: an unknown info
    /// item comes back as `Ok(None)` so the caller can skip it.
    pub fn parse(reply_type: u32, data: &'a [u8]) -> Result<Option<OptionReply<'a>>, OptionError> {
        let mut r = Reader { data };
        let reply = match reply_type {
            rep::ACK => {
                r.finish()?;
                OptionReply::Ack
            }
            rep::SERVER => {
                let name = r.string()?;
                let description = parse_string(r.data)?;
                OptionReply::Server { name, description }
            }
            rep::META_CONTEXT => {
                let id = r.u32()?;
                let name = parse_string(r.data)?;
                OptionReply::MetaContext { id, name }
            }
            rep::INFO => {
                let item = r.u16()?;
                let info = match item {
                    info::EXPORT => {
                        let size = get_u64(r.take(8)?, 0..8);
                        let flags = r.u16()?;
                        r.finish()?;
                        Info::Export { size, flags }
                    }
                    info::NAME => Info::Name(parse_string(r.data)?),
                    info::DESCRIPTION => Info::Description(parse_string(r.data)?),
                    info::BLOCK_SIZE => {
                        let min = r.u32()?;
                        let preferred = r.u32()?;
                        let max = r.u32()?;
                        r.finish()?;
                        let bs = BlockSize::new(min, preferred, max)
                            .map_err(|_| OptionError::BadBlockSize)?;
                        Info::BlockSize(bs)
                    }
                    _ => return Ok(None),
                };
                OptionReply::Info(info)
            }
            code if code & rep::FLAG_ERROR != 0 => OptionReply::Error {
                code,
                // A message that is not valid text is still an error reply.
                message: parse_string(data).unwrap_or(""),
            },
            _ => return Ok(None),
        };
        Ok(Some(reply))
    }
}

/// The header of a transmission reply, as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: error and cookie (a read's data follows on success
    /// when structured replies are off).
    Simple(SimpleReply),
    /// A structured or extended chunk header.
    Chunk {
        /// The request's cookie.
        cookie: u64,
        /// `NBD_REPLY_TYPE_*`.
        chunk_type: u16,
        /// `NBD_REPLY_FLAG_DONE`.
        done: bool,
        /// Payload length.
        length: u64,
    },
}

impl ReplyHeader {
    /// The header length announced by the magic in the first 4 bytes, or
    /// `None` for a magic that is none of the reply magics.
    pub fn len_for(magic: u32) -> Option<usize> {
        match magic {
            wire::NBD_SIMPLE_REPLY_MAGIC => Some(wire::simple_reply::LEN),
            wire::NBD_STRUCTURED_REPLY_MAGIC => Some(wire::chunk::LEN),
            wire::NBD_EXTENDED_REPLY_MAGIC => Some(wire::chunk::LEN_EXT),
            _ => None,
        }
    }

    /// Parse a header of [`ReplyHeader::len_for`] bytes.
    pub fn parse(buf: &[u8]) -> Option<ReplyHeader> {
        if buf.len() < 4 {
            return None;
        }
        let magic = get_u32(buf, wire::chunk::MAGIC);
        let len = Self::len_for(magic)?;
        if buf.len() < len {
            return None;
        }
        if magic == wire::NBD_SIMPLE_REPLY_MAGIC {
            return Some(ReplyHeader::Simple(SimpleReply {
                error: get_u32(buf, wire::simple_reply::ERROR),
                cookie: get_u64(buf, wire::simple_reply::COOKIE),
            }));
        }
        let length = if magic == wire::NBD_EXTENDED_REPLY_MAGIC {
            get_u64(buf, wire::chunk::LENGTH_EXT)
        } else {
            u64::from(get_u32(buf, wire::chunk::LENGTH))
        };
        Some(ReplyHeader::Chunk {
            cookie: get_u64(buf, wire::chunk::COOKIE),
            chunk_type: get_u16(buf, wire::chunk::TYPE),
            done: get_u16(buf, wire::chunk::FLAGS) & wire::reply_flags::DONE != 0,
            length,
        })
    }
}

/// A structured chunk's payload, parsed (the client's view of [`Chunk`]).
/// `OffsetData` carries only the offset: the data follows in the payload
/// after [`ChunkPayload::DATA_OFFSET_LEN`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkPayload<'a> {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    OffsetData {
        /// Offset of the data.
        offset: u64,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole {
        /// Offset of the hole.
        offset: u64,
        /// Hole size.
        len: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS` or `_EXT`: the context and its raw
    /// descriptors (8 bytes each, or 16 when `wide`, checked to be a
    /// whole number of them).
    BlockStatus {
        /// Metadata context id.
        context: u32,
        /// Raw descriptors; read them with [`ChunkPayload::descriptors`].
        raw: &'a [u8],
        /// `_EXT`: 64-bit lengths and flags.
        wide: bool,
    },
    /// `NBD_REPLY_TYPE_ERROR` or `_ERROR_OFFSET` (with `offset`).
    Error {
        /// `NBD_E*`.
        error: u32,
        /// Message for humans (empty if it was not valid text).
        message: &'a str,
        /// Where, for `_ERROR_OFFSET`.
        offset: Option<u64>,
    },
}

/// A chunk payload that does not parse: the connection must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// The payload is shorter or longer than its type allows.
    BadLength,
    /// A chunk type this client does not know (and not an error type).
    UnknownType(u16),
}

impl ChunkPayload<'_> {
    /// Bytes of an `OffsetData` payload before the data.
    pub const DATA_OFFSET_LEN: usize = 8;

    /// Parse a payload of type `chunk_type` (for `OffsetData`, the first
    /// [`Self::DATA_OFFSET_LEN`] bytes suffice).
    pub fn parse(chunk_type: u16, payload: &[u8]) -> Result<ChunkPayload<'_>, ChunkError> {
        let mut r = Reader { data: payload };
        let bad = |_| ChunkError::BadLength;
        let p = match chunk_type {
            reply_type::NONE => {
                r.finish().map_err(bad)?;
                ChunkPayload::None
            }
            reply_type::OFFSET_DATA => ChunkPayload::OffsetData {
                offset: get_u64(r.take(8).map_err(bad)?, 0..8),
            },
            reply_type::OFFSET_HOLE => {
                let offset = get_u64(r.take(8).map_err(bad)?, 0..8);
                let len = r.u32().map_err(bad)?;
                r.finish().map_err(bad)?;
                ChunkPayload::OffsetHole { offset, len }
            }
            reply_type::BLOCK_STATUS => {
                let context = r.u32().map_err(bad)?;
                if r.data.is_empty() || !r.data.len().is_multiple_of(8) {
                    return Err(ChunkError::BadLength);
                }
                ChunkPayload::BlockStatus {
                    context,
                    raw: r.data,
                    wide: false,
                }
            }
            reply_type::BLOCK_STATUS_EXT => {
                let context = r.u32().map_err(bad)?;
                let count = r.u32().map_err(bad)? as usize;
                if r.data.is_empty()
                    || !r.data.len().is_multiple_of(16)
                    || (count != 0 && count != r.data.len() / 16)
                {
                    return Err(ChunkError::BadLength);
                }
                ChunkPayload::BlockStatus {
                    context,
                    raw: r.data,
                    wide: true,
                }
            }
            t if t & reply_type::FLAG_ERROR != 0 => {
                let error = r.u32().map_err(bad)?;
                let mlen = r.u16().map_err(bad)? as usize;
                let message = parse_string(r.take(mlen).map_err(bad)?).unwrap_or("");
                let offset = if t == reply_type::ERROR_OFFSET {
                    Some(get_u64(r.take(8).map_err(bad)?, 0..8))
                } else {
                    None
                };
                // Unknown error types may carry more; `ERROR` and
                // `ERROR_OFFSET` may not.
                if matches!(t, reply_type::ERROR | reply_type::ERROR_OFFSET) {
                    r.finish().map_err(bad)?;
                }
                ChunkPayload::Error {
                    error,
                    message,
                    offset,
                }
            }
            other => return Err(ChunkError::UnknownType(other)),
        };
        Ok(p)
    }

    /// The descriptors of a `BlockStatus` payload (empty for other kinds).
    pub fn descriptors(&self) -> impl Iterator<Item = Descriptor> + '_ {
        let (raw, wide): (&[u8], bool) = match self {
            ChunkPayload::BlockStatus { raw, wide, .. } => (raw, *wide),
            _ => (&[], false),
        };
        let size = if wide { 16 } else { 8 };
        raw.chunks_exact(size).map(move |d| {
            if wide {
                // Only the low 32 bits of a flags word have meanings.
                Descriptor {
                    length: get_u64(d, 0..8),
                    flags: get_u64(d, 8..16) as u32,
                }
            } else {
                Descriptor {
                    length: u64::from(get_u32(d, 0..4)),
                    flags: get_u32(d, 4..8),
                }
            }
        })
    }
}
