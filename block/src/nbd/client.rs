//! The NBD client engine (QEMU's `nbd/client.c` negotiation and
//! `block/nbd.c` request/reply handling), sans I/O: requests in, bytes out;
//! bytes in, completions out. It shares [`super::wire`] and
//! [`super::repr`] with the server engine and never blocks, never does
//! I/O and never panics on anything a server sends: garbage or an early
//! close ends the connection, the open fails with QEMU's text, and every
//! request in flight completes with `EIO`.
//!
//! Negotiation follows QEMU 7.2's `nbd_receive_negotiate`: fixed newstyle
//! (plain newstyle falls back to `NBD_OPT_EXPORT_NAME` at once),
//! `NBD_OPT_EXTENDED_HEADERS` as QEMU 9 does (refused:
//! `NBD_OPT_STRUCTURED_REPLY`), then `NBD_OPT_SET_META_CONTEXT` for
//! `base:allocation`, then `NBD_OPT_GO` asking for `NBD_INFO_BLOCK_SIZE`;
//! a server that answers `GO` with `NBD_REP_ERR_UNSUP` gets
//! `NBD_OPT_EXPORT_NAME`. With extended headers, requests and replies
//! use the 32-byte headers (writes with `NBD_CMD_FLAG_PAYLOAD_LEN`) and
//! block status comes as `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`; requests stay
//! within 32-bit lengths. Not done (QEMU does them): oldstyle servers,
//! `NBD_OPT_LIST` for a nicer missing-export message before the fallback,
//! TLS.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use super::export::BlockSize;
use super::repr::{
    ChunkPayload, Command, Info, OptionReply, OptionReplyHeader, ReplyHeader, RequestHeader,
    emit_option, info_request_data, meta_context_data,
};
use super::wire::{
    self, client_flags, cmd_flags, get_u16, get_u64, handshake_flags, info, opt, rep, reply_type,
    state, transmission_flags as tf,
};
use crate::io::{BlockStatus, IoError};

/// The metadata context the client asks for.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// QEMU's `MAX_NBD_REQUESTS`: requests in flight on one connection.
pub const MAX_IN_FLIGHT: usize = 16;

/// The largest option reply or non-data chunk payload accepted (QEMU's
/// `NBD_MAX_BUFFER_SIZE` bounds the same); more is garbage.
const MAX_CONTROL_PAYLOAD: u64 = 64 * 1024;

/// What the server told us about the export (QEMU's `NBDExportInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Block size constraints (QEMU's defaults when the server sent none:
    /// minimum 1, preferred 4096, maximum 32 MiB).
    pub block_size: BlockSize,
    /// Structured replies are in use.
    pub structured: bool,
    /// Extended headers are in use (`NBD_OPT_EXTENDED_HEADERS`; implies
    /// structured replies).
    pub extended: bool,
    /// The `base:allocation` context id, when negotiated.
    pub base_allocation: Option<u32>,
}

impl ExportInfo {
    /// `NBD_FLAG_READ_ONLY`.
    pub fn read_only(&self) -> bool {
        self.flags & tf::READ_ONLY != 0
    }

    /// Whether the export advertises `flag` (`NBD_FLAG_SEND_*`).
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Where the connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientState {
    /// Negotiating; [`Client::open_error`] says why it failed, if it did.
    Handshake,
    /// Requests may be submitted.
    Ready,
    /// `NBD_CMD_DISC` queued; nothing more may be submitted.
    Disconnecting,
    /// The connection failed (error or the server closed it); every
    /// request in flight has completed with `EIO`.
    Failed,
    /// `NBD_CMD_DISC` was sent and every request had completed: the socket
    /// may be closed.
    Closed,
}

/// A request for the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOp {
    /// `NBD_CMD_READ`.
    Read {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// `NBD_CMD_WRITE`.
    Write {
        /// Offset.
        offset: u64,
        /// Data.
        data: Vec<u8>,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
    },
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
    },
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
        /// Without this, `NBD_CMD_FLAG_NO_HOLE` is sent.
        may_unmap: bool,
        /// `NBD_CMD_FLAG_FAST_ZERO`.
        fast: bool,
    },
    /// `NBD_CMD_CACHE`.
    Cache {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// `NBD_CMD_BLOCK_STATUS` on `base:allocation`, with
    /// `NBD_CMD_FLAG_REQ_ONE` (as QEMU asks).
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
}

/// A completed request's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientReply {
    /// A write, flush, trim, zero or cache succeeded.
    Done,
    /// A read's bytes.
    Data(Vec<u8>),
    /// Block status: the first extent from the request's offset.
    Status(BlockStatus),
}

/// A request's handle (its cookie).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Handle(pub u64);

/// Why [`Client::submit`] refused a request; nothing was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// [`MAX_IN_FLIGHT`] requests are in flight: wait for a completion.
    Busy,
    /// The request cannot be sent: not ready or closed (`EIO`), read-only
    /// (`EPERM`), not advertised (`ENOTSUP`), misaligned or out of range
    /// (`EINVAL`).
    Failed(IoError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Greeting,
    /// Waiting for the reply to an option.
    Option(u32),
    /// Waiting for the `NBD_OPT_EXPORT_NAME` reply.
    ExportName,
    Done,
}

#[derive(Debug)]
struct Pending {
    command: Command,
    offset: u64,
    len: u64,
    /// Read buffer, assembled from chunks.
    data: Vec<u8>,
    /// Ranges (relative) already covered by data or hole chunks.
    covered: Vec<(u64, u64)>,
    status: Option<BlockStatus>,
    error: Option<IoError>,
}

/// One NBD client connection (QEMU's `BDRVNBDState` protocol half).
#[derive(Debug)]
pub struct Client {
    export: String,
    want_block_status: bool,
    step: Step,
    state: ClientState,
    fixed: bool,
    no_zeroes: bool,
    info: ExportInfo,
    have_export_info: bool,
    input: Vec<u8>,
    output: Vec<u8>,
    in_flight: BTreeMap<u64, Pending>,
    completions: VecDeque<(Handle, Result<ClientReply, IoError>)>,
    next_cookie: u64,
    open_error: Option<String>,
    /// A reconnect: the size the export had (QEMU fails a reconnect to
    /// an export whose size changed).
    expected_size: Option<u64>,
}

impl Client {
    /// A client that will open `export`, asking for `base:allocation`
    /// when `block_status` is set. Feed it the server's bytes.
    pub fn new(export: &str, block_status: bool) -> Client {
        Client {
            export: String::from(export),
            want_block_status: block_status,
            step: Step::Greeting,
            state: ClientState::Handshake,
            fixed: false,
            no_zeroes: false,
            info: ExportInfo {
                size: 0,
                flags: 0,
                block_size: BlockSize::QEMU,
                structured: false,
                extended: false,
                base_allocation: None,
            },
            have_export_info: false,
            input: Vec::new(),
            output: Vec::new(),
            in_flight: BTreeMap::new(),
            completions: VecDeque::new(),
            next_cookie: 1,
            expected_size: None,
            open_error: None,
        }
    }

    /// The connection state.
    pub fn state(&self) -> &ClientState {
        &self.state
    }

    /// A reconnect to an export that had `size` bytes: a handshake that
    /// finds another size fails the open.
    pub fn expect_size(&mut self, size: u64) {
        self.expected_size = Some(size);
    }

    /// The export, once the handshake finished.
    pub fn info(&self) -> Option<&ExportInfo> {
        (self.state != ClientState::Handshake && self.step == Step::Done).then_some(&self.info)
    }

    /// Why the open failed (QEMU's text), if it did.
    pub fn open_error(&self) -> Option<&str> {
        self.open_error.as_deref()
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Bytes to send to the server.
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// `n` bytes of [`Client::output`] were sent.
    pub fn consume_output(&mut self, n: usize) {
        self.output.drain(..n.min(self.output.len()));
    }

    /// The next completed request.
    pub fn next_completion(&mut self) -> Option<(Handle, Result<ClientReply, IoError>)> {
        self.completions.pop_front()
    }

    /// The server closed the connection (EOF or a socket error).
    pub fn closed(&mut self) {
        if self.state == ClientState::Handshake {
            self.fail_open("Failed to read from the NBD server: unexpected end of file");
        } else if self.state != ClientState::Closed {
            self.fail("server closed the connection");
        }
    }

    /// Queue `NBD_CMD_DISC` (QEMU's `nbd_client_close`); requests already
    /// in flight still complete.
    pub fn disconnect(&mut self) {
        if self.state == ClientState::Ready {
            let h = RequestHeader {
                flags: 0,
                command: Command::Disc,
                cookie: 0,
                offset: 0,
                length: 0,
            };
            h.emit(self.info.extended, &mut self.output);
            self.state = ClientState::Disconnecting;
            self.after_reply();
        }
    }

    /// Take the server's bytes; all of them are consumed.
    pub fn receive(&mut self, input: &[u8]) {
        if matches!(self.state, ClientState::Failed | ClientState::Closed) {
            return;
        }
        self.input.extend_from_slice(input);
        loop {
            let progressed = if self.step == Step::Done {
                self.receive_reply()
            } else {
                self.receive_handshake()
            };
            if !progressed || self.state == ClientState::Failed {
                break;
            }
        }
    }

    fn fail_open(&mut self, msg: &str) {
        if self.open_error.is_none() {
            self.open_error = Some(String::from(msg));
        }
        self.fail(msg);
    }

    /// Give up on the requests in flight (a halt whose bound ran out on a
    /// server that stopped answering): each fails with `EIO` now, and
    /// `NBD_CMD_DISC` is queued if the connection still stands (after
    /// whatever part of a request is still to go out). Late replies are
    /// not read: the engine is done.
    pub fn abandon(&mut self) {
        if self.state != ClientState::Ready && self.state != ClientState::Disconnecting {
            return;
        }
        for (cookie, _) in core::mem::take(&mut self.in_flight) {
            self.completions
                .push_back((Handle(cookie), Err(IoError::Eio)));
        }
        self.input.clear();
        self.disconnect();
        self.after_reply();
    }

    /// End the connection: every request in flight fails with `EIO`.
    fn fail(&mut self, why: &str) {
        if self.state == ClientState::Failed {
            return;
        }
        log::debug!("nbd client: {why}");
        self.state = ClientState::Failed;
        self.input.clear();
        self.output.clear();
        for (cookie, _) in core::mem::take(&mut self.in_flight) {
            self.completions
                .push_back((Handle(cookie), Err(IoError::Eio)));
        }
    }

    // ---- handshake ---------------------------------------------------

    fn send_option(&mut self, option: u32, data: &[u8]) {
        emit_option(option, data, &mut self.output);
        self.step = Step::Option(option);
    }

    fn receive_handshake(&mut self) -> bool {
        match self.step {
            Step::Greeting => {
                if self.input.len() < wire::greeting::LEN {
                    return false;
                }
                let g: Vec<u8> = self.input.drain(..wire::greeting::LEN).collect();
                if get_u64(&g, wire::greeting::PASSWD) != wire::NBD_MAGIC {
                    self.fail_open("Invalid magic received");
                    return false;
                }
                if get_u64(&g, wire::greeting::MAGIC) != wire::NBD_OPTS_MAGIC {
                    self.fail_open("Server is not a newstyle NBD server");
                    return false;
                }
                let flags = get_u16(&g, wire::greeting::FLAGS);
                self.fixed = flags & handshake_flags::FIXED_NEWSTYLE != 0;
                self.no_zeroes = flags & handshake_flags::NO_ZEROES != 0;
                let mut cf = 0;
                if self.fixed {
                    cf |= client_flags::FIXED_NEWSTYLE;
                }
                if self.no_zeroes {
                    cf |= client_flags::NO_ZEROES;
                }
                self.output.extend_from_slice(&cf.to_be_bytes());
                if self.fixed {
                    // QEMU 9: extended headers first, then structured
                    // replies if the server refuses them.
                    self.send_option(opt::EXTENDED_HEADERS, &[]);
                } else {
                    self.send_export_name();
                }
                true
            }
            Step::Option(option) => self.receive_option_reply(option),
            Step::ExportName => {
                let need = wire::export_name_reply::LEN
                    + if self.no_zeroes {
                        0
                    } else {
                        wire::export_name_reply::ZEROES
                    };
                if self.input.len() < need {
                    return false;
                }
                let r: Vec<u8> = self.input.drain(..need).collect();
                self.info.size = get_u64(&r, wire::export_name_reply::SIZE);
                self.info.flags = get_u16(&r, wire::export_name_reply::FLAGS);
                self.info.block_size = BlockSize::QEMU;
                self.finish_handshake();
                true
            }
            Step::Done => false,
        }
    }

    fn send_export_name(&mut self) {
        let name = self.export.clone();
        emit_option(opt::EXPORT_NAME, name.as_bytes(), &mut self.output);
        // Block status needs GO (the context is tied to it).
        self.info.base_allocation = None;
        self.step = Step::ExportName;
    }

    fn send_go(&mut self) {
        let data = info_request_data(&self.export, &[info::BLOCK_SIZE]);
        self.send_option(opt::GO, &data);
    }

    fn after_structured(&mut self) {
        if self.info.structured && self.want_block_status {
            let data = meta_context_data(&self.export, &[BASE_ALLOCATION]);
            self.send_option(opt::SET_META_CONTEXT, &data);
        } else {
            self.send_go();
        }
    }

    fn receive_option_reply(&mut self, option: u32) -> bool {
        use wire::option_reply as r;
        if self.input.len() < r::LEN {
            return false;
        }
        let Some(h) = OptionReplyHeader::parse(&self.input[..r::LEN]) else {
            self.fail_open("Unexpected option reply magic");
            return false;
        };
        if h.option != option {
            self.fail_open(&format!(
                "Unexpected option type {} in reply, expected {option}",
                h.option
            ));
            return false;
        }
        if u64::from(h.length) > MAX_CONTROL_PAYLOAD {
            self.fail_open(&format!("server reply length {} too large", h.length));
            return false;
        }
        let total = r::LEN + h.length as usize;
        if self.input.len() < total {
            return false;
        }
        let msg: Vec<u8> = self.input.drain(..total).collect();
        let data = &msg[r::LEN..];
        let reply = match OptionReply::parse(h.reply_type, data) {
            Ok(reply) => reply,
            Err(e) => {
                self.fail_open(&format!("Invalid reply to option {option}: {e}"));
                return false;
            }
        };
        match (option, reply) {
            (opt::EXTENDED_HEADERS, Some(OptionReply::Ack)) => {
                self.info.extended = true;
                self.info.structured = true;
                self.after_structured();
            }
            (opt::EXTENDED_HEADERS, Some(OptionReply::Error { .. })) => {
                self.send_option(opt::STRUCTURED_REPLY, &[]);
            }
            (opt::STRUCTURED_REPLY, Some(OptionReply::Ack)) => {
                self.info.structured = true;
                self.after_structured();
            }
            (opt::STRUCTURED_REPLY, Some(OptionReply::Error { .. })) => {
                self.info.structured = false;
                self.after_structured();
            }
            (opt::SET_META_CONTEXT, Some(OptionReply::MetaContext { id, name })) => {
                if name != BASE_ALLOCATION || self.info.base_allocation.is_some() {
                    self.fail_open(&format!("Unexpected context name: {name}"));
                    return false;
                }
                self.info.base_allocation = Some(id);
            }
            (opt::SET_META_CONTEXT, Some(OptionReply::Ack | OptionReply::Error { .. })) => {
                self.send_go();
            }
            (opt::GO, Some(OptionReply::Info(item))) => match item {
                Info::Export { size, flags } => {
                    self.info.size = size;
                    self.info.flags = flags;
                    self.have_export_info = true;
                }
                Info::BlockSize(bs) => self.info.block_size = bs,
                Info::Name(_) | Info::Description(_) => {}
            },
            (opt::GO, None) if h.reply_type == rep::INFO => {} // unknown item: skipped
            (opt::GO, Some(OptionReply::Ack)) => {
                if !self.have_export_info {
                    self.fail_open("broken server omitted NBD_INFO_EXPORT");
                    return false;
                }
                self.finish_handshake();
            }
            (opt::GO, Some(OptionReply::Error { code, message })) => {
                if code == rep::ERR_UNSUP {
                    // QEMU: "server doesn't understand request ..., attempting fallback"
                    self.send_export_name();
                } else {
                    let what = match code {
                        rep::ERR_UNKNOWN => "Requested export not available",
                        rep::ERR_POLICY => "Denied by server for option",
                        rep::ERR_INVALID => "Invalid parameters for option",
                        rep::ERR_TLS_REQD => "TLS negotiation required before option",
                        rep::ERR_SHUTDOWN => "Server shutting down before option",
                        _ => "Unknown error returned by server for option",
                    };
                    let mut text = format!("{what} 7 (go)");
                    if !message.is_empty() {
                        text = format!("{text}\nserver reported: {message}");
                    }
                    self.fail_open(&text);
                    return false;
                }
            }
            _ => {
                self.fail_open(&format!(
                    "Unexpected reply type {} for option {option}",
                    h.reply_type
                ));
                return false;
            }
        }
        true
    }

    /// The export is known: check it (QEMU's `nbd_client_handshake`
    /// refusals), then transmission starts. `step` becomes `Done` only
    /// then, so a refused export never shows as [`Client::info`].
    fn finish_handshake(&mut self) {
        if self.info.flags & tf::HAS_FLAGS == 0 {
            // QEMU accepts this (old servers); treat every feature as absent.
            self.info.flags = tf::HAS_FLAGS;
        }
        let min = u64::from(self.info.block_size.min());
        if min > 1 && !self.info.size.is_multiple_of(min) {
            self.fail_open(&format!(
                "Export size {} is not multiple of minimum block size {min}",
                self.info.size
            ));
            return;
        }
        if self.info.size > i64::MAX as u64 {
            self.fail_open(&format!("Export size {} is too large", self.info.size));
            return;
        }
        if let Some(was) = self.expected_size
            && was != self.info.size
        {
            self.fail_open(&format!(
                "Export size changed from {was} to {} on reconnect",
                self.info.size
            ));
            return;
        }
        self.step = Step::Done;
        self.state = ClientState::Ready;
    }

    // ---- transmission --------------------------------------------------

    /// Send a request. The result comes back from
    /// [`Client::next_completion`] with the returned handle.
    pub fn submit(&mut self, op: ClientOp) -> Result<Handle, SubmitError> {
        if self.state != ClientState::Ready {
            return Err(SubmitError::Failed(IoError::Eio));
        }
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            return Err(SubmitError::Busy);
        }
        let info = self.info;
        // Reads never ask for DF: the server may send holes.
        let (command, offset, len, flags) = match &op {
            ClientOp::Read { offset, len } => (Command::Read, *offset, u64::from(*len), 0),
            ClientOp::Write { offset, data, fua } => {
                let mut f = fua_flag(*fua);
                if info.extended {
                    // The payload's length is the header's (QEMU sets it).
                    f |= cmd_flags::PAYLOAD_LEN;
                }
                (Command::Write, *offset, data.len() as u64, f)
            }
            ClientOp::Flush => (Command::Flush, 0, 0, 0),
            ClientOp::Trim { offset, len, fua } => {
                (Command::Trim, *offset, u64::from(*len), fua_flag(*fua))
            }
            ClientOp::WriteZeroes {
                offset,
                len,
                fua,
                may_unmap,
                fast,
            } => {
                let mut f = fua_flag(*fua);
                if !may_unmap {
                    f |= cmd_flags::NO_HOLE;
                }
                if *fast {
                    f |= cmd_flags::FAST_ZERO;
                }
                (Command::WriteZeroes, *offset, u64::from(*len), f)
            }
            ClientOp::Cache { offset, len } => (Command::Cache, *offset, u64::from(*len), 0),
            ClientOp::BlockStatus { offset, len } => (
                Command::BlockStatus,
                *offset,
                u64::from(*len),
                cmd_flags::REQ_ONE,
            ),
        };
        let refuse = |e| Err(SubmitError::Failed(e));
        let writes = matches!(
            command,
            Command::Write | Command::Trim | Command::WriteZeroes
        );
        if writes && info.read_only() {
            return refuse(IoError::Eperm);
        }
        let needed = match command {
            Command::Flush => tf::SEND_FLUSH,
            Command::Trim => tf::SEND_TRIM,
            Command::WriteZeroes => tf::SEND_WRITE_ZEROES,
            Command::Cache => tf::SEND_CACHE,
            _ => 0,
        };
        if needed != 0 && !info.has(needed) {
            return refuse(IoError::Enotsup);
        }
        if command == Command::BlockStatus && info.base_allocation.is_none() {
            return refuse(IoError::Enotsup);
        }
        if flags & cmd_flags::FUA != 0 && !info.has(tf::SEND_FUA) {
            return refuse(IoError::Enotsup);
        }
        if flags & cmd_flags::FAST_ZERO != 0 && !info.has(tf::SEND_FAST_ZERO) {
            return refuse(IoError::Enotsup);
        }
        if command != Command::Flush {
            let min = u64::from(info.block_size.min());
            let end = offset.checked_add(len);
            if len == 0 || end.is_none_or(|e| e > info.size) {
                return refuse(IoError::Einval);
            }
            if !offset.is_multiple_of(min) || !len.is_multiple_of(min) {
                return refuse(IoError::Einval);
            }
            let data_cmd = matches!(command, Command::Read | Command::Write);
            if data_cmd && len > u64::from(info.block_size.max_payload()) {
                return refuse(IoError::Einval);
            }
        }
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1).max(1);
        RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length: len,
        }
        .emit(info.extended, &mut self.output);
        if let ClientOp::Write { data, .. } = &op {
            self.output.extend_from_slice(data);
        }
        self.in_flight.insert(
            cookie,
            Pending {
                command,
                offset,
                len,
                data: if command == Command::Read {
                    vec![0; len as usize]
                } else {
                    Vec::new()
                },
                covered: Vec::new(),
                status: None,
                error: None,
            },
        );
        Ok(Handle(cookie))
    }

    /// Parse one reply (or chunk) from the input; `false` if more input is
    /// needed or the connection failed.
    fn receive_reply(&mut self) -> bool {
        if self.input.len() < 4 {
            return false;
        }
        let magic = wire::get_u32(&self.input, 0..4);
        let Some(hlen) = ReplyHeader::len_for(magic) else {
            self.fail("invalid reply magic");
            return false;
        };
        // With extended headers every reply is extended; without them,
        // structured chunks only once negotiated.
        let negotiated = if self.info.extended {
            magic == wire::NBD_EXTENDED_REPLY_MAGIC
        } else {
            magic == wire::NBD_SIMPLE_REPLY_MAGIC
                || (magic == wire::NBD_STRUCTURED_REPLY_MAGIC && self.info.structured)
        };
        if !negotiated {
            self.fail("server sent a reply style that was not negotiated");
            return false;
        }
        if self.input.len() < hlen {
            return false;
        }
        let Some(header) = ReplyHeader::parse(&self.input[..hlen]) else {
            self.fail("invalid reply header");
            return false;
        };
        match header {
            ReplyHeader::Simple(s) => {
                let Some(p) = self.in_flight.get(&s.cookie) else {
                    self.fail("reply for a request that is not in flight");
                    return false;
                };
                let only_structured = matches!(p.command, Command::Read | Command::BlockStatus)
                    && self.info.structured;
                if only_structured {
                    self.fail("server answered with a simple reply although structured replies are negotiated");
                    return false;
                }
                let data_len = if p.command == Command::Read && s.error == 0 {
                    p.len as usize
                } else {
                    0
                };
                if self.input.len() < hlen + data_len {
                    return false;
                }
                let mut p = self.in_flight.remove(&s.cookie).expect("looked up above");
                let result = if s.error != 0 {
                    Err(errno_to_io(s.error))
                } else if p.command == Command::Read {
                    p.data.copy_from_slice(&self.input[hlen..hlen + data_len]);
                    Ok(ClientReply::Data(p.data))
                } else {
                    Ok(ClientReply::Done)
                };
                self.input.drain(..hlen + data_len);
                self.completions.push_back((Handle(s.cookie), result));
                self.after_reply();
                true
            }
            ReplyHeader::Chunk {
                cookie,
                chunk_type,
                done,
                length,
            } => {
                let Some(p) = self.in_flight.get(&cookie) else {
                    self.fail("reply chunk for a request that is not in flight");
                    return false;
                };
                let limit = if chunk_type == reply_type::OFFSET_DATA {
                    p.len + ChunkPayload::DATA_OFFSET_LEN as u64
                } else {
                    MAX_CONTROL_PAYLOAD
                };
                if length > limit {
                    self.fail("reply chunk payload is too large");
                    return false;
                }
                let total = hlen + length as usize;
                if self.input.len() < total {
                    return false;
                }
                let msg: Vec<u8> = self.input.drain(..total).collect();
                if let Err(why) = self.apply_chunk(cookie, chunk_type, &msg[hlen..]) {
                    self.fail(why);
                    return false;
                }
                if done {
                    let p = self.in_flight.remove(&cookie).expect("looked up above");
                    let result = finish(p);
                    self.completions.push_back((Handle(cookie), result));
                    self.after_reply();
                }
                true
            }
        }
    }

    fn after_reply(&mut self) {
        if self.state == ClientState::Disconnecting && self.in_flight.is_empty() {
            // DISC was sent and nothing is left to wait for.
            self.state = ClientState::Closed;
        }
    }

    fn apply_chunk(
        &mut self,
        cookie: u64,
        chunk_type: u16,
        payload: &[u8],
    ) -> Result<(), &'static str> {
        let info = self.info;
        let p = self
            .in_flight
            .get_mut(&cookie)
            .ok_or("chunk for an unknown cookie")?;
        let chunk = ChunkPayload::parse(chunk_type, payload).map_err(|_| "invalid reply chunk")?;
        match chunk {
            ChunkPayload::None => {}
            ChunkPayload::OffsetData { offset } => {
                let data = &payload[ChunkPayload::DATA_OFFSET_LEN..];
                if p.command != Command::Read || data.is_empty() {
                    return Err("unexpected data chunk");
                }
                let rel = cover(p, offset, data.len() as u64)?;
                p.data[rel as usize..rel as usize + data.len()].copy_from_slice(data);
            }
            ChunkPayload::OffsetHole { offset, len } => {
                if p.command != Command::Read || len == 0 {
                    return Err("unexpected hole chunk");
                }
                let rel = cover(p, offset, u64::from(len))?;
                p.data[rel as usize..(rel + u64::from(len)) as usize].fill(0);
            }
            ChunkPayload::BlockStatus { context, .. } => {
                if p.command != Command::BlockStatus
                    || Some(context) != info.base_allocation
                    || p.status.is_some()
                {
                    return Err("unexpected block status chunk");
                }
                let first = chunk.descriptors().next().ok_or("empty block status")?;
                if first.length == 0 {
                    return Err("zero-length extent");
                }
                // QEMU clips an over-long extent to the request.
                let len = first.length.min(p.len);
                let hole = first.flags & state::HOLE != 0;
                p.status = Some(BlockStatus {
                    data: !hole,
                    zero: first.flags & state::ZERO != 0,
                    allocated: true,
                    len,
                });
            }
            ChunkPayload::Error { error, offset, .. } => {
                if let Some(o) = offset
                    && (o < p.offset || o >= p.offset + p.len)
                {
                    return Err("error offset outside the request");
                }
                if error == 0 {
                    return Err("error chunk with error 0");
                }
                p.error.get_or_insert(errno_to_io(error));
            }
        }
        Ok(())
    }
}

fn fua_flag(fua: bool) -> u16 {
    if fua { cmd_flags::FUA } else { 0 }
}

/// Mark `[offset, offset + len)` covered in a read; the offset relative to
/// the request, or an error for a chunk outside it or overlapping another.
fn cover(p: &mut Pending, offset: u64, len: u64) -> Result<u64, &'static str> {
    let rel = offset
        .checked_sub(p.offset)
        .ok_or("chunk before the request")?;
    let end = rel.checked_add(len).ok_or("chunk overflows")?;
    if end > p.len {
        return Err("chunk beyond the request");
    }
    if p.covered.iter().any(|&(s, e)| rel < e && s < end) {
        return Err("overlapping chunks");
    }
    p.covered.push((rel, end));
    Ok(rel)
}

fn finish(p: Pending) -> Result<ClientReply, IoError> {
    if let Some(e) = p.error {
        return Err(e);
    }
    match p.command {
        Command::Read => {
            let covered: u64 = p.covered.iter().map(|(s, e)| e - s).sum();
            if covered != p.len {
                // A read the server did not fully answer.
                return Err(IoError::Eio);
            }
            Ok(ClientReply::Data(p.data))
        }
        Command::BlockStatus => p.status.map(ClientReply::Status).ok_or(IoError::Eio),
        _ => Ok(ClientReply::Done),
    }
}

/// QEMU's `nbd_errno_to_system_errno`: unknown values become EINVAL.
pub fn errno_to_io(e: u32) -> IoError {
    use wire::errno as n;
    match e {
        n::EPERM => IoError::Eperm,
        n::EIO => IoError::Eio,
        n::EINVAL => IoError::Einval,
        n::ENOSPC => IoError::Enospc,
        n::ENOTSUP => IoError::Enotsup,
        n::ENOMEM => IoError::Other(12),
        n::EOVERFLOW => IoError::Other(75),
        n::ESHUTDOWN => IoError::Other(108),
        _ => IoError::Einval,
    }
}
