//! The connection state machine (QEMU: `NBDClient` in `nbd/server.c`),
//! sans I/O.
//!
//! The host owns the socket and the export's node. It drives one
//! [`Connection`] per client:
//!
//! 1. [`Connection::receive`] with every chunk of bytes the socket gives,
//!    and the current [`ExportSet`]. It returns how many bytes it took: it
//!    stops taking input while too many requests are pending or too much
//!    output is queued (the rest stays in the socket, so TCP pushes back on
//!    the client). Call it again with what is left after completing
//!    requests or sending output.
//! 2. [`Connection::next_request`] until `None`; execute each [`Request`].
//! 3. [`Connection::complete`] when a request finishes, in any order.
//! 4. Send [`Connection::output`] bytes ([`Output::chunk`] /
//!    [`Output::chunks`], then [`Connection::consume_output`]).
//! 5. Close the socket when [`Connection::should_close`] says so; call
//!    [`Connection::closed`] when the peer goes away (or the host gives up
//!    on it: [`Connection::input_state`] tells an idle client from one
//!    stalled mid-message, for timeouts). Completions arriving afterwards
//!    are dropped cleanly; [`Connection::in_flight`] says how many the host
//!    still owes.
//!
//! A cooperative task per connection (the kernel's shape) looks like:
//!
//! ```text
//! loop {
//!     while let Some(chunk) = nonempty(conn.output().chunk()) {   // 4
//!         let n = socket.send_slice(chunk)?; if n == 0 { break }
//!         conn.consume_output(n);
//!     }
//!     if conn.should_close() { socket.close(); break }             // 5
//!     socket.recv(|buf| { let n = conn.receive(buf, &exports); (n, ()) });  // 1
//!     while let Some(req) = conn.next_request() { spawn(execute(req)) }     // 2
//!     // ... each finished future: conn.complete(id, completion)          // 3
//!     if socket.peer_gone() { conn.closed() }
//!     yield until the socket, a completion or a timer wakes the task;
//! }
//! ```
//!
//! The phases follow the spec: the fixed newstyle handshake
//! ([`super::handshake`]), then transmission ([`super::transmission`],
//! replies in [`super::reply`]), then closing.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use super::export::{Export, ExportSet};
use super::output::Output;
use super::repr::{Command, Descriptor};
use super::request::{CompleteError, Completion, MetaContext, Request, RequestId};
use super::wire::{self, handshake_flags};

/// Resource limits of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests parsed and not yet completed (queued for the host or in
    /// flight); input is not taken beyond this. QEMU's client keeps 16 in
    /// flight, libnbd's `nbdcopy` 64.
    pub max_requests: usize,
    /// Input is not taken while more output than this is queued.
    pub output_high_water: u64,
    /// The longest option data buffered; longer known options are skipped
    /// and answered `NBD_REP_ERR_TOO_BIG` (unknown options are always
    /// skipped unbuffered).
    pub max_option_len: u32,
    /// Options after which a haggling client is disconnected.
    pub max_options: u32,
    /// No new request is read while the payloads of writes queued or in
    /// flight add up to this (one more payload may be in progress). With
    /// `max_requests` and `output_high_water` this bounds the memory a
    /// client can make the host hold.
    pub max_write_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_requests: 64,
            output_high_water: 4 * 1024 * 1024,
            max_option_len: 16 * 1024,
            max_options: 1024,
            max_write_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Option haggling.
    Handshake,
    /// Serving requests.
    Transmission,
    /// Ending: pending requests finish (soft disconnect) and the output
    /// drains; then [`Connection::should_close`] is true.
    Closing,
    /// [`Connection::closed`] was called.
    Closed,
}

/// What the engine waits for on the input side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputState {
    /// Between messages: the client may be idle.
    Idle,
    /// In the middle of a message: this many more bytes complete the
    /// current piece (header, option data or payload). A client that
    /// stalls here is stuck; the host may time it out.
    Partial {
        /// Bytes still needed.
        needed: u64,
    },
    /// Not taking input until requests complete or output drains.
    Blocked,
    /// No more input will be read.
    Finished,
}

/// Why a connection ended (QEMU's error texts where it has them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// The host called [`Connection::closed`].
    PeerClosed,
    /// The server is shutting down ([`Connection::shutdown`]).
    Shutdown,
    /// The client broke the protocol: hard disconnect.
    Protocol(ProtocolError),
}

/// A protocol violation that ends the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// Client flags with bits the server did not offer.
    UnknownClientFlags(u32),
    /// An option header without `IHAVEOPT`.
    BadOptionMagic(u64),
    /// A request header with the wrong magic.
    BadRequestMagic(u32),
    /// More options than [`Limits::max_options`].
    TooManyOptions,
    /// `NBD_OPT_EXPORT_NAME` for an export that does not exist (it has
    /// no error reply).
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` with a name that is not a valid string or is
    /// longer than [`Limits::max_option_len`].
    BadExportName,
    /// `NBD_OPT_EXPORT_NAME` after extended headers were negotiated.
    ExportNameWithExtendedHeaders,
    /// A request payload too large to skip.
    PayloadTooLarge(u64),
    /// `NBD_OPT_EXPORT_NAME` on a server that requires TLS, before TLS
    /// (it has no error reply).
    NotBeforeTls(u32),
    /// `NBD_OPT_STARTTLS` with data: a client that cannot start TLS
    /// correctly is dropped (QEMU: `nbd_reject_length(.., true, ..)`).
    StartTlsWithData,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::UnknownClientFlags(fl) => {
                write!(f, "Unknown client flags 0x{fl:x} received")
            }
            ProtocolError::BadOptionMagic(m) => write!(f, "Bad magic received: 0x{m:016x}"),
            ProtocolError::BadRequestMagic(m) => write!(f, "invalid magic (got 0x{m:08x})"),
            ProtocolError::TooManyOptions => f.write_str("too many options"),
            ProtocolError::UnknownExport(name) => write!(f, "export '{name}' not present"),
            ProtocolError::BadExportName => f.write_str("invalid export name"),
            ProtocolError::ExportNameWithExtendedHeaders => {
                f.write_str("NBD_OPT_EXPORT_NAME after extended headers")
            }
            ProtocolError::PayloadTooLarge(n) => write!(f, "payload of {n} bytes is too large"),
            ProtocolError::NotBeforeTls(o) => write!(f, "Option 0x{o:x} not permitted before TLS"),
            ProtocolError::StartTlsWithData => {
                f.write_str("option 'starttls' has unexpected length")
            }
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Abort => f.write_str("client aborted the negotiation"),
            CloseReason::Disconnect => f.write_str("client disconnected"),
            CloseReason::PeerClosed => f.write_str("connection closed"),
            CloseReason::Shutdown => f.write_str("server shutting down"),
            CloseReason::Protocol(e) => write!(f, "protocol error: {e}"),
        }
    }
}

/// The input parser's position.
#[derive(Debug)]
pub(super) enum Rx {
    /// The 32-bit client flags.
    ClientFlags,
    /// An option header.
    OptionHeader,
    /// Option data being buffered into `opt_buf`.
    OptionData { option: u32, len: usize },
    /// Option data being skipped; then the error reply `reply` is sent.
    OptionSkip { option: u32, left: u64, reply: u32 },
    /// A request header.
    RequestHeader,
    /// A write's payload, filling the buffer of the pending request.
    WritePayload { pending: PendingWrite },
    /// `NBD_CMD_BLOCK_STATUS`'s payload (effect length and context ids).
    BlockStatusPayload { header: Header, len: usize },
    /// A payload being discarded; then `reply` is sent.
    Skip {
        left: u64,
        reply: Option<ErrorReply>,
    },
    /// `NBD_OPT_STARTTLS` was acknowledged: nothing more is read in
    /// plain text; the host runs the TLS handshake and then calls
    /// [`Connection::tls_started`].
    TlsSwitch,
    /// Nothing more is read.
    Stopped,
}

/// Where a connection is with TLS (QEMU: `client->tlscreds` and whether
/// `client->ioc` is still the plain socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tls {
    /// No TLS credentials: `NBD_OPT_STARTTLS` is refused with
    /// `NBD_REP_ERR_POLICY`.
    Off,
    /// TLS is required and not yet started: every option but
    /// `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_TLS_REQD`.
    Required,
    /// `NBD_OPT_STARTTLS` was acknowledged; the host is switching.
    Starting,
    /// The option haggling goes on inside TLS.
    Active,
}

/// A request header after parsing, as the engine keeps it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Header {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    /// Effect length (what the command acts on).
    pub len: u64,
}

/// A validated write waiting for its payload.
#[derive(Debug)]
pub(super) struct PendingWrite {
    pub header: Header,
    pub data: Vec<u8>,
}

/// An error reply owed to the client for a request never handed to the
/// host.
#[derive(Debug, Clone, Copy)]
pub(super) struct ErrorReply {
    pub header: Header,
    pub error: u32,
    pub message: &'static str,
}

/// A request slot (QEMU: `NBDRequestData`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    pub generation: u32,
    /// The request occupying the slot, if any.
    pub busy: Option<Header>,
}

/// One NBD client connection.
#[derive(Debug)]
pub struct Connection {
    pub(super) limits: Limits,
    pub(super) tls: Tls,
    pub(super) state: State,
    pub(super) rx: Rx,
    /// Bytes of the fixed-size header being read.
    pub(super) hdr: [u8; 32],
    pub(super) hdr_fill: usize,
    /// Option data being buffered (capacity reused).
    pub(super) opt_buf: Vec<u8>,
    pub(super) options_seen: u32,
    pub(super) no_zeroes: bool,
    /// `NBD_OPT_STRUCTURED_REPLY` (or extended headers) negotiated.
    pub(super) structured: bool,
    /// `NBD_OPT_EXTENDED_HEADERS` negotiated.
    pub(super) extended: bool,
    /// The export `NBD_OPT_SET_META_CONTEXT` last selected contexts for,
    /// and those contexts with their ids.
    pub(super) meta_export: Option<String>,
    pub(super) meta_selected: Vec<(u32, MetaContext)>,
    /// The export being served, and the transmission flags it was sent.
    pub(super) export: Option<Export>,
    pub(super) flags: u16,
    /// The metadata contexts selected for the export being served.
    pub(super) contexts: Vec<(u32, MetaContext)>,
    pub(super) slots: Vec<Slot>,
    pub(super) free_slots: Vec<u32>,
    pub(super) busy: usize,
    /// Payload bytes of writes being received, queued or in flight.
    pub(super) write_bytes: u64,
    /// Memory the host can give to new write payloads
    /// ([`Connection::set_payload_room`]).
    pub(super) payload_room: u64,
    pub(super) ready: VecDeque<Request>,
    pub(super) out: Output,
    pub(super) shutting_down: bool,
    /// Close once nothing is pending and the output has drained.
    pub(super) drain_then_close: bool,
    pub(super) close_reason: Option<CloseReason>,
    /// Scratch space for block status replies.
    pub(super) descriptors: Vec<Descriptor>,
}

impl Connection {
    /// A new connection for a server that requires TLS (QEMU's NBD server
    /// with `tls-creds`): until the client sends `NBD_OPT_STARTTLS`, every
    /// option is refused with `NBD_REP_ERR_TLS_REQD` (and
    /// `NBD_OPT_EXPORT_NAME`, which has no error reply, disconnects), so a
    /// plain-text client sees no export. After `NBD_OPT_STARTTLS` is
    /// acknowledged, [`Connection::tls_pending`] is true: the host sends
    /// the output still queued in plain text, runs the TLS handshake over
    /// the bytes [`Connection::receive`] did not take, then calls
    /// [`Connection::tls_started`] and from then on feeds and sends the
    /// decrypted stream.
    pub fn new_tls_required(limits: Limits) -> Connection {
        let mut c = Connection::new(limits);
        c.tls = Tls::Required;
        c
    }

    /// Whether `NBD_OPT_STARTTLS` was acknowledged and the host must now
    /// switch the connection to TLS (see [`Connection::new_tls_required`]).
    /// No input is taken until it does.
    pub fn tls_pending(&self) -> bool {
        self.tls == Tls::Starting
    }

    /// The host finished the TLS handshake: option haggling starts again,
    /// inside TLS. Does nothing unless [`Connection::tls_pending`].
    pub fn tls_started(&mut self) {
        if self.tls == Tls::Starting {
            self.tls = Tls::Active;
            if matches!(self.rx, Rx::TlsSwitch) {
                self.rx = Rx::OptionHeader;
            }
        }
    }

    /// Whether the connection runs inside TLS.
    pub fn tls_active(&self) -> bool {
        self.tls == Tls::Active
    }

    /// A new connection; the server greeting is already queued.
    pub fn new(limits: Limits) -> Connection {
        crate::trace!(nbd_negotiate_begin, "Beginning negotiation");
        let mut out = Output::new();
        out.write(|b| {
            b.extend_from_slice(&wire::NBD_MAGIC.to_be_bytes());
            b.extend_from_slice(&wire::NBD_OPTS_MAGIC.to_be_bytes());
            b.extend_from_slice(
                &(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_be_bytes(),
            );
        });
        Connection {
            limits,
            tls: Tls::Off,
            state: State::Handshake,
            rx: Rx::ClientFlags,
            hdr: [0; 32],
            hdr_fill: 0,
            opt_buf: Vec::new(),
            options_seen: 0,
            no_zeroes: false,
            structured: false,
            extended: false,
            meta_export: None,
            meta_selected: Vec::new(),
            export: None,
            flags: 0,
            contexts: Vec::new(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            busy: 0,
            write_bytes: 0,
            payload_room: u64::MAX,
            ready: VecDeque::new(),
            out,
            shutting_down: false,
            drain_then_close: false,
            close_reason: None,
            descriptors: Vec::new(),
        }
    }

    /// How many bytes the host can give to write payloads received from now
    /// on (unlimited until set): a write whose payload does not fit, or
    /// whose buffer cannot be allocated, is answered `ENOMEM` after its
    /// payload is skipped, and the connection goes on. A host with little
    /// memory sets it before each [`Connection::receive`].
    pub fn set_payload_room(&mut self, bytes: u64) {
        self.payload_room = bytes;
    }

    /// Where the connection is.
    pub fn state(&self) -> State {
        self.state
    }

    /// The export being served (after `NBD_OPT_GO`/`EXPORT_NAME`).
    pub fn export(&self) -> Option<&Export> {
        self.export.as_ref()
    }

    /// The transmission flags the client was sent (0 before
    /// transmission).
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// Whether structured replies are in use.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// Whether extended headers are in use.
    pub fn extended_headers(&self) -> bool {
        self.extended
    }

    /// Why the connection is ending, once it is.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.close_reason.as_ref()
    }

    /// Requests handed out by [`Connection::next_request`] or queued for
    /// it, and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.busy
    }

    /// The bytes owed to the client.
    pub fn output(&self) -> &Output {
        &self.out
    }

    /// Mark `n` bytes of [`Connection::output`] as sent.
    pub fn consume_output(&mut self, n: usize) {
        self.out.consume(n as u64);
    }

    /// Whether the host should close the socket now: the connection is
    /// ending, everything owed has been sent, and (on a soft disconnect)
    /// every request has completed.
    pub fn should_close(&self) -> bool {
        match self.state {
            State::Closed => true,
            State::Closing => {
                self.out.is_empty()
                    && (!self.drain_then_close || (self.busy == 0 && self.ready.is_empty()))
            }
            _ => false,
        }
    }

    /// What the engine waits for on the input side.
    pub fn input_state(&self) -> InputState {
        let fixed = |len: usize| InputState::Partial {
            needed: (len - self.hdr_fill) as u64,
        };
        match &self.rx {
            Rx::Stopped => InputState::Finished,
            Rx::TlsSwitch => InputState::Blocked,
            Rx::ClientFlags => fixed(4),
            Rx::OptionHeader | Rx::RequestHeader if self.hdr_fill == 0 => {
                if self.blocked() {
                    InputState::Blocked
                } else {
                    InputState::Idle
                }
            }
            Rx::OptionHeader => fixed(wire::option_header::LEN),
            Rx::RequestHeader => fixed(super::repr::RequestHeader::len(self.extended)),
            Rx::OptionData { len, .. } => InputState::Partial {
                needed: (*len - self.opt_buf.len()) as u64,
            },
            Rx::OptionSkip { left, .. } | Rx::Skip { left, .. } => {
                InputState::Partial { needed: *left }
            }
            Rx::WritePayload { pending } => InputState::Partial {
                needed: pending.header.len - pending.data.len() as u64,
            },
            Rx::BlockStatusPayload { len, .. } => fixed(*len),
        }
    }

    /// Whether input must wait (at a message boundary only).
    pub(super) fn blocked(&self) -> bool {
        if self.hdr_fill != 0 {
            return false;
        }
        let output_full = self.out.len() > self.limits.output_high_water;
        match self.rx {
            Rx::OptionHeader => output_full,
            Rx::RequestHeader => {
                output_full
                    || self.busy >= self.limits.max_requests
                    || self.write_bytes >= self.limits.max_write_bytes
            }
            _ => false,
        }
    }

    /// Feed bytes from the client; returns how many were taken (see the
    /// module doc). Never panics, whatever the bytes.
    pub fn receive(&mut self, input: &[u8], exports: &dyn ExportSet) -> usize {
        let mut used = 0;
        while used < input.len() {
            if matches!(self.rx, Rx::Stopped) {
                // Nothing after NBD_CMD_DISC, NBD_OPT_ABORT or a protocol
                // error is read: drop it.
                return input.len();
            }
            if self.blocked() {
                break;
            }
            let n = self.step(&input[used..], exports);
            if n == 0 {
                break;
            }
            used += n;
        }
        used
    }

    /// Consume a prefix of `input` for the current parser position.
    fn step(&mut self, input: &[u8], exports: &dyn ExportSet) -> usize {
        match &mut self.rx {
            Rx::ClientFlags => self.fill_header(input, 4, Connection::on_client_flags),
            Rx::OptionHeader => {
                let n = self.fill_header(
                    input,
                    wire::option_header::LEN,
                    Connection::on_option_header,
                );
                self.finish_option(exports);
                n
            }
            Rx::OptionData { len, .. } => {
                let n = (*len - self.opt_buf.len()).min(input.len());
                self.opt_buf.extend_from_slice(&input[..n]);
                self.finish_option(exports);
                n
            }
            Rx::OptionSkip {
                option,
                left,
                reply,
            } => {
                let n = (*left).min(input.len() as u64);
                *left -= n;
                if *left == 0 {
                    let (option, reply) = (*option, *reply);
                    self.rx = Rx::OptionHeader;
                    self.option_error(option, reply);
                }
                n as usize
            }
            Rx::RequestHeader => {
                let len = super::repr::RequestHeader::len(self.extended);
                self.fill_header(input, len, Connection::on_request_header)
            }
            Rx::WritePayload { pending } => {
                let want = pending.header.len - pending.data.len() as u64;
                let n = want.min(input.len() as u64) as usize;
                pending.data.extend_from_slice(&input[..n]);
                if n as u64 == want {
                    let rx = core::mem::replace(&mut self.rx, Rx::RequestHeader);
                    if let Rx::WritePayload { pending } = rx {
                        self.on_write_payload(pending);
                    }
                }
                n
            }
            Rx::BlockStatusPayload { header, len } => {
                let (header, len) = (*header, *len);
                self.fill_header(input, len, move |c| c.on_block_status_payload(header, len))
            }
            Rx::Skip { left, reply } => {
                let n = (*left).min(input.len() as u64);
                *left -= n;
                if *left == 0 {
                    let reply = reply.take();
                    self.rx = Rx::RequestHeader;
                    if let Some(r) = reply {
                        self.send_error(r.header, r.error, r.message);
                    }
                }
                n as usize
            }
            Rx::TlsSwitch => 0,
            Rx::Stopped => input.len(),
        }
    }

    /// Act on a fully buffered option.
    fn finish_option(&mut self, exports: &dyn ExportSet) {
        if let Rx::OptionData { option, len } = self.rx
            && self.opt_buf.len() == len
        {
            self.rx = Rx::OptionHeader;
            let data = core::mem::take(&mut self.opt_buf);
            self.on_option(option, &data, exports);
            self.opt_buf = data;
            self.opt_buf.clear();
        }
    }

    /// Fill the fixed-size header buffer up to `len` bytes; once full,
    /// reset it and call `done`.
    fn fill_header(
        &mut self,
        input: &[u8],
        len: usize,
        done: impl FnOnce(&mut Connection),
    ) -> usize {
        let n = (len - self.hdr_fill).min(input.len());
        self.hdr[self.hdr_fill..self.hdr_fill + n].copy_from_slice(&input[..n]);
        self.hdr_fill += n;
        if self.hdr_fill == len {
            self.hdr_fill = 0;
            done(self);
        }
        n
    }

    /// The next request for the host to execute.
    pub fn next_request(&mut self) -> Option<Request> {
        self.ready.pop_front()
    }

    /// Hand back the result of a request; the reply is queued at once.
    pub fn complete(&mut self, id: RequestId, completion: Completion) -> Result<(), CompleteError> {
        let header = self.release(id)?;
        if self.state == State::Closed {
            return Err(CompleteError::Closed);
        }
        self.send_completion(header, completion);
        Ok(())
    }

    /// The peer went away (or the host closed the socket): drop queued
    /// requests and output. Requests in flight may still be completed;
    /// their results are dropped.
    pub fn closed(&mut self) {
        if self.close_reason.is_none() {
            self.close_reason = Some(CloseReason::PeerClosed);
        }
        self.state = State::Closed;
        if let Rx::WritePayload { pending } = &self.rx {
            self.write_bytes = self.write_bytes.saturating_sub(pending.header.len);
        }
        self.rx = Rx::Stopped;
        while let Some(r) = self.ready.pop_front() {
            let _ = self.release(r.id);
        }
        self.out.clear();
    }

    /// The server is going away (QEMU: `nbd_export_close`): options are
    /// answered `NBD_REP_ERR_SHUTDOWN`, queued and new requests
    /// `NBD_ESHUTDOWN`; requests in flight finish, then the connection
    /// closes.
    pub fn shutdown(&mut self) {
        if self.shutting_down || self.state == State::Closed {
            return;
        }
        self.shutting_down = true;
        while let Some(r) = self.ready.pop_front() {
            if let Ok(header) = self.release(r.id) {
                self.send_error(header, wire::errno::ESHUTDOWN, "server shutting down");
            }
        }
        if self.state == State::Transmission {
            self.begin_close(CloseReason::Shutdown, true);
        }
    }

    /// Start closing: stop reading unless draining for a shutdown.
    pub(super) fn begin_close(&mut self, reason: CloseReason, drain: bool) {
        if self.close_reason.is_none() {
            self.close_reason = Some(reason);
        }
        if self.state != State::Closed {
            self.state = State::Closing;
        }
        self.drain_then_close |= drain;
        if !self.shutting_down || !drain {
            self.rx = Rx::Stopped;
        }
    }

    /// Hard disconnect for a protocol violation: nothing more is read and
    /// nothing is waited for. Pending output is still offered, and requests
    /// received whole before the violation stay valid (so the outcome does
    /// not depend on how the input was chunked): the host may still take
    /// and complete them until it closes the socket and calls
    /// [`Connection::closed`].
    pub(super) fn protocol_error(&mut self, e: ProtocolError) {
        log::warn!("nbd: {e}");
        self.drain_then_close = false;
        self.begin_close(CloseReason::Protocol(e), false);
        self.rx = Rx::Stopped;
    }

    /// Take a free request slot for `header`.
    pub(super) fn acquire(&mut self, header: Header) -> RequestId {
        self.busy += 1;
        if let Some(slot) = self.free_slots.pop()
            && let Some(s) = self.slots.get_mut(slot as usize)
        {
            s.busy = Some(header);
            return RequestId {
                slot,
                generation: s.generation,
            };
        }
        let slot = self.slots.len() as u32;
        self.slots.push(Slot {
            generation: 0,
            busy: Some(header),
        });
        RequestId {
            slot,
            generation: 0,
        }
    }

    /// Free the slot of `id`, returning its request.
    pub(super) fn release(&mut self, id: RequestId) -> Result<Header, CompleteError> {
        let s = self
            .slots
            .get_mut(id.slot as usize)
            .filter(|s| s.generation == id.generation)
            .ok_or(CompleteError::UnknownRequest)?;
        let header = s.busy.take().ok_or(CompleteError::UnknownRequest)?;
        s.generation = s.generation.wrapping_add(1);
        self.free_slots.push(id.slot);
        self.busy -= 1;
        if header.command == Command::Write {
            self.write_bytes = self.write_bytes.saturating_sub(header.len);
        }
        Ok(header)
    }
}
