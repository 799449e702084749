//! `driver=nbd`: a protocol node whose data is another server's export
//! (QEMU's `block/nbd.c`), over the sans-IO [`Client`] engine.
//!
//! The node and the platform share an [`NbdLink`]: the node submits
//! requests and waits on their completions; the platform (the kernel's
//! TCP glue, or a test) opens a socket to [`NbdLink::server`], moves the
//! engine's bytes both ways and reports the socket's fate
//! ([`NbdLink::connected`], [`NbdLink::closed`]); every event wakes the
//! node's waiting futures. The platform finds the links to service in the
//! [`Links`] list the driver class was made with.
//!
//! Options, as QEMU 7.2's `BlockdevOptionsNbd`: `server` (an inet
//! `SocketAddress`: `{"type": "inet", "host": ..., "port": ...}`),
//! `export`, `open-timer` (seconds of connection attempts before the open
//! fails; 0, the default, is one attempt), `reconnect-delay` (seconds after a lost
//! connection during which requests wait for a reconnect and are re-sent;
//! after it they fail, and a later request tries again; 0, the default,
//! never reconnects),
//! `tls-creds` refused (the appliance has no TLS). The node's length is the
//! export's size, block status is `base:allocation` (holes seen through
//! the node), writes are refused on a read-only export unless the node is
//! read-only (QEMU: "NBD export is read-only"), and closing the node sends
//! `NBD_CMD_DISC`.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::{OnceCell, RefCell};
use core::future::{Future, poll_fn};
use core::task::Poll;

use serde_json::{Value, json};

use super::client::{
    Client, ClientOp, ClientReply, ClientState, ExportInfo, Handle, MAX_IN_FLIGHT, SubmitError,
};
use super::wire::transmission_flags as tf;
use crate::align::{AlignedDevice, Aligner};
use crate::driver::BlockDriver;
use crate::exec::WaitQueue;
use crate::graph::node::Node;
use crate::io::{BlockStatus, BoxFuture, IoError, IoResult, ReqFlags};
use crate::open::{DriverClass, DriverOpts, Opener};
use crate::qmp::QmpError;

/// QEMU's `InetSocketAddress` (host and port only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl core::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Where the socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Socket {
    /// The platform has not connected it yet.
    Connecting,
    /// Bytes flow.
    Connected,
    /// Closed or never connected; the platform may drop its socket.
    Closed,
}

struct Inner {
    engine: Client,
    socket: Socket,
    connect_error: Option<String>,
    done: Vec<(Handle, Result<ClientReply, IoError>)>,
    /// The export as the first handshake found it (kept across
    /// reconnects, which must find the same size: [`Client::expect_size`]).
    known: Option<ExportInfo>,
    /// When the connection was lost (`reconnect-delay` counts from here).
    down_since: Option<u64>,
    /// [`NbdLink::cancel_in_flight`] was called: no more reconnects.
    cancelled: bool,
}

impl Inner {
    fn collect(&mut self) {
        while let Some(c) = self.engine.next_completion() {
            self.done.push(c);
        }
    }
}

/// One NBD client connection, shared by its node and the platform.
pub struct NbdLink {
    server: ServerAddr,
    export: String,
    inner: RefCell<Inner>,
    /// The node's requests and open, woken by every event on the link.
    events: WaitQueue,
}

/// Where a link's TCP socket is, for [`NbdLink::pump`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpPhase {
    /// The SYN is out and not answered yet.
    Opening,
    /// The TCP handshake completed; the server may have closed or reset
    /// the connection since.
    Opened,
    /// Never opened: refused (a reset in answer to the SYN), or the SYN
    /// timed out. (A connection reset right after it opened, in the same
    /// batch of frames, may look the same.)
    Refused,
}

/// The platform's TCP socket, as [`NbdLink::pump`] uses it.
pub trait TcpSocket {
    /// Where the connection is.
    fn phase(&self) -> TcpPhase;
    /// Hands bytes received and not yet read to `take`, which takes them
    /// all; returns how many (0: none waiting).
    fn recv(&mut self, take: &mut dyn FnMut(&[u8])) -> usize;
    /// Queues bytes to send; returns how many were taken.
    fn send(&mut self, bytes: &[u8]) -> usize;
    /// Nothing more will arrive and every byte was read: the server
    /// closed its half (FIN) or reset the connection, or it timed out.
    fn at_eof(&self) -> bool;
}

/// The links a platform services. The platform keeps a link (and its
/// socket) after its node closed, until [`NbdLink::should_close`]: that
/// is how the node's `NBD_CMD_DISC` still reaches the server.
pub type Links = Rc<RefCell<Vec<Rc<NbdLink>>>>;

impl NbdLink {
    /// A link that will open `export` on `server`.
    pub fn new(server: ServerAddr, export: &str) -> NbdLink {
        NbdLink {
            server,
            export: String::from(export),
            inner: RefCell::new(Inner {
                engine: Client::new(export, true),
                socket: Socket::Connecting,
                connect_error: None,
                done: Vec::new(),
                known: None,
                down_since: None,
                cancelled: false,
            }),
            events: WaitQueue::new(),
        }
    }

    /// The server to connect to.
    pub fn server(&self) -> &ServerAddr {
        &self.server
    }

    /// The socket's state as the platform last reported it.
    pub fn socket(&self) -> Socket {
        self.inner.borrow().socket
    }

    /// The engine's state.
    pub fn state(&self) -> ClientState {
        self.inner.borrow().engine.state().clone()
    }

    /// Platform: the TCP connection is up.
    pub fn connected(&self) {
        let mut i = self.inner.borrow_mut();
        if i.socket == Socket::Connecting {
            i.socket = Socket::Connected;
        }
        i.collect();
        self.events.wake_all();
    }

    /// Platform: the connection failed (`why` in QEMU's words, e.g.
    /// "Connection refused") or the server closed it.
    pub fn closed(&self, why: &str) {
        let mut i = self.inner.borrow_mut();
        if i.socket == Socket::Connecting {
            i.connect_error = Some(format!("Failed to connect to '{}': {why}", self.server));
        }
        i.socket = Socket::Closed;
        i.engine.closed();
        i.collect();
        self.events.wake_all();
    }

    /// Platform: bytes from the server.
    pub fn receive(&self, bytes: &[u8]) {
        let mut i = self.inner.borrow_mut();
        i.engine.receive(bytes);
        i.collect();
        self.events.wake_all();
    }

    /// Platform: hand the bytes to send to `send`, which returns how many
    /// it took.
    pub fn transmit(&self, send: impl FnOnce(&[u8]) -> usize) {
        let mut i = self.inner.borrow_mut();
        let n = send(i.engine.output());
        i.engine.consume_output(n);
    }

    /// Platform: one round on the link's TCP socket: report its fate
    /// (opened, refused, closed by the server) and move bytes both ways.
    /// Returns whether anything happened.
    ///
    /// A link still connecting takes any socket past the SYN as opened,
    /// whatever happened since: a server that accepts, writes and closes
    /// can do all of it between two looks (SYN-ACK, data and FIN in one
    /// batch of frames), and the bytes it wrote and its close must still
    /// reach the engine (before, such a link waited for a state it had
    /// already left, and its open never returned).
    pub fn pump(&self, s: &mut dyn TcpSocket) -> bool {
        let mut busy = false;
        if self.socket() == Socket::Connecting {
            match s.phase() {
                TcpPhase::Opening => return false,
                TcpPhase::Refused => {
                    self.closed("Connection refused");
                    return true;
                }
                TcpPhase::Opened => {
                    self.connected();
                    busy = true;
                }
            }
        }
        if self.socket() != Socket::Connected {
            return busy;
        }
        while s.recv(&mut |b| self.receive(b)) > 0 {
            busy = true;
        }
        self.transmit(|out| {
            let n = s.send(out);
            busy |= n > 0;
            n
        });
        if s.at_eof() {
            self.closed("Connection closed by the server");
            busy = true;
        }
        busy
    }

    /// Platform: whether the socket should be closed now (everything was
    /// sent and the engine is done with it).
    pub fn should_close(&self) -> bool {
        let i = self.inner.borrow();
        i.engine.output().is_empty()
            && matches!(i.engine.state(), ClientState::Failed | ClientState::Closed)
    }

    /// The export, once open (also while reconnecting).
    fn info(&self) -> Option<ExportInfo> {
        let i = self.inner.borrow();
        i.engine.info().copied().or(i.known)
    }

    /// Wait for the handshake; QEMU's open error on failure.
    async fn open(&self) -> Result<ExportInfo, String> {
        self.events
            .wait_until(|| self.inner.borrow().engine.state() != &ClientState::Handshake)
            .await;
        let mut i = self.inner.borrow_mut();
        if let Some(info) = i.engine.info().copied() {
            i.known = Some(info);
            return Ok(info);
        }
        Err(i
            .connect_error
            .clone()
            .or_else(|| i.engine.open_error().map(String::from))
            .unwrap_or_else(|| String::from("NBD connection failed")))
    }

    /// Submit `op` (waiting while 16 are in flight) and wait for it.
    async fn request(&self, op: ClientOp) -> IoResult<ClientReply> {
        // Wait for a free slot first, so the op (and its data) is handed
        // over once, not copied in case the engine is busy.
        self.events
            .wait_until(|| {
                let i = self.inner.borrow();
                i.engine.state() != &ClientState::Ready || i.engine.in_flight() < MAX_IN_FLIGHT
            })
            .await;
        let h = match self.inner.borrow_mut().engine.submit(op) {
            Ok(h) => h,
            Err(SubmitError::Failed(e)) => return Err(e),
            Err(SubmitError::Busy) => return Err(IoError::Eio), // checked above
        };
        let mut reply = None;
        self.events
            .wait_until(|| {
                let mut i = self.inner.borrow_mut();
                reply = i
                    .done
                    .iter()
                    .position(|(d, _)| *d == h)
                    .map(|at| i.done.swap_remove(at).1);
                reply.is_some()
            })
            .await;
        reply.unwrap_or(Err(IoError::Eio))
    }

    /// A fresh connection attempt (QEMU: another round of
    /// `nbd_co_do_establish_connection`): a new engine and a socket to
    /// connect; the link goes back on the platform's list.
    fn restart(self: &Rc<Self>, links: &Links) {
        {
            let mut i = self.inner.borrow_mut();
            if i.cancelled {
                return;
            }
            i.engine = Client::new(&self.export, true);
            // Checked by the engine, so that a reconnect nobody waits for
            // (a request after `reconnect-delay` starts one in the
            // background) cannot come up with another size either.
            if let Some(k) = i.known {
                i.engine.expect_size(k.size);
            }
            i.socket = Socket::Connecting;
            i.connect_error = None;
            i.done.clear();
        }
        let mut l = links.borrow_mut();
        if !l.iter().any(|x| Rc::ptr_eq(x, self)) {
            l.push(self.clone());
        }
    }

    /// QEMU's `nbd_cancel_in_flight`: requests waiting for a reconnect
    /// fail now, and no attempt is made any more (the reconnect timers
    /// stop). Requests on the wire are left to the server.
    pub fn cancel_in_flight(&self) {
        // Halting after a fatal error may find the link borrowed by the
        // failed code: leave it then.
        if let Ok(mut i) = self.inner.try_borrow_mut() {
            i.cancelled = true;
            self.events.wake_all();
        }
    }

    /// Whether [`NbdLink::cancel_in_flight`] was called.
    fn cancelled(&self) -> bool {
        self.inner.borrow().cancelled
    }

    /// Platform, halting: the server did not answer within the halt's
    /// bound. The requests on the wire fail with `EIO` now and
    /// `NBD_CMD_DISC` is queued if the connection still stands (QEMU has
    /// no such bound: its close-all waits for the server).
    pub fn abandon(&self) {
        let mut i = self.inner.borrow_mut();
        i.cancelled = true;
        i.engine.abandon();
        i.collect();
        self.events.wake_all();
    }

    fn disconnect(&self) {
        let mut i = self.inner.borrow_mut();
        i.engine.disconnect();
        i.collect();
        self.events.wake_all();
    }
}

/// The `nbd` node.
pub struct NbdNode {
    link: Rc<NbdLink>,
    export: String,
    links: Links,
    /// `open-timer` in nanoseconds (0: one attempt).
    open_timer_ns: u64,
    /// `reconnect-delay` in nanoseconds (0: a lost connection fails every
    /// request at once).
    reconnect_ns: u64,
    /// Pads requests to the export's minimum block size (known once open).
    aligner: OnceCell<Aligner>,
}

impl NbdNode {
    fn info(&self) -> IoResult<ExportInfo> {
        self.link.info().ok_or(IoError::Eio)
    }

    fn aligner(&self) -> IoResult<&Aligner> {
        self.aligner.get().ok_or(IoError::Eio)
    }

    /// Largest piece of one request, a multiple of the minimum block size.
    fn max_piece(info: &ExportInfo, data: bool) -> u64 {
        let min = u64::from(info.block_size.min());
        let cap = if data {
            u64::from(info.block_size.max_payload())
        } else {
            u64::from(u32::MAX)
        };
        (cap / min * min).max(min)
    }

    async fn ranged(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        make: impl Fn(u64, u32) -> ClientOp,
    ) -> IoResult<()> {
        let info = self.info()?;
        let piece = Self::max_piece(&info, false);
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(piece);
            self.req(node, make(offset + pos, n as u32)).await?;
            pos += n;
        }
        Ok(())
    }
}

/// The export as whole blocks of its minimum size, for the [`Aligner`]
/// that pads byte-granular requests (QEMU: `bl.request_alignment` set
/// from `NBD_INFO_BLOCK_SIZE`, padded by the generic block layer).
struct Blocks<'a> {
    nbd: &'a NbdNode,
    node: &'a Node,
}

impl AlignedDevice for Blocks<'_> {
    fn read_blocks(&self, offset: u64, len: usize) -> BoxFuture<'_, IoResult<Vec<u8>>> {
        Box::pin(async move {
            let info = self.nbd.info()?;
            let piece = NbdNode::max_piece(&info, true);
            let mut out = Vec::with_capacity(len);
            let len = len as u64;
            let mut pos = 0;
            while pos < len {
                let n = (len - pos).min(piece);
                let op = ClientOp::Read {
                    offset: offset + pos,
                    len: n as u32,
                };
                match self.nbd.req(self.node, op).await? {
                    ClientReply::Data(d) => out.extend_from_slice(&d),
                    _ => return Err(IoError::Eio),
                }
                pos += n;
            }
            Ok(out)
        })
    }

    fn write_blocks(&self, offset: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'_, IoResult<()>> {
        Box::pin(async move {
            let info = self.nbd.info()?;
            let piece = NbdNode::max_piece(&info, true) as usize;
            if data.len() <= piece {
                let op = ClientOp::Write { offset, data, fua };
                return self.nbd.req(self.node, op).await.map(|_| ());
            }
            for (i, chunk) in data.chunks(piece).enumerate() {
                let op = ClientOp::Write {
                    offset: offset + (i * piece) as u64,
                    data: chunk.to_vec(),
                    fua,
                };
                self.nbd.req(self.node, op).await?;
            }
            Ok(())
        })
    }
}

/// QEMU's first retry delay, doubled up to 16 s
/// (`nbd/client-connection.c`).
const RETRY_START_NS: u64 = 1_000_000_000;
const RETRY_MAX_NS: u64 = 16_000_000_000;

impl NbdNode {
    /// The open's connection (QEMU's `nbd_do_establish_connection`): one
    /// attempt without `open-timer`; with it, attempts with growing delays
    /// until one succeeds or the timer expires, which also cancels an
    /// attempt that never completes.
    async fn connect(&self, node: &Node) -> Result<ExportInfo, String> {
        if self.open_timer_ns == 0 {
            return self.link.open().await;
        }
        let reg = node
            .registry()
            .ok_or_else(|| String::from("node is not in a registry"))?;
        let clock = reg.clock();
        let timers = reg.executor().timers().clone();
        let deadline = clock.now_ns().saturating_add(self.open_timer_ns);
        let mut delay = RETRY_START_NS;
        let mut expired = core::pin::pin!(timers.sleep_until(clock.clone(), deadline));
        loop {
            let attempt = {
                let mut open = core::pin::pin!(self.link.open());
                poll_fn(|cx| {
                    if let Poll::Ready(r) = open.as_mut().poll(cx) {
                        return Poll::Ready(Some(r));
                    }
                    expired.as_mut().poll(cx).map(|()| None)
                })
                .await
            };
            let err = match attempt {
                Some(Ok(info)) => return Ok(info),
                Some(Err(e)) => e,
                None => {
                    self.link.closed("Connection timed out");
                    return Err(self.link.open().await.err().unwrap_or_default());
                }
            };
            let now = clock.now_ns();
            if now >= deadline {
                return Err(err);
            }
            log::debug!("nbd: {err}; retrying");
            let wake = now.saturating_add(delay).min(deadline);
            timers.sleep_until(clock.clone(), wake).await;
            delay = (delay * 2).min(RETRY_MAX_NS);
            if clock.now_ns() >= deadline {
                return Err(err);
            }
            self.link.restart(&self.links);
        }
    }
}

impl NbdNode {
    /// A request; with `reconnect-delay`, a lost connection is re-made
    /// and the request re-sent, for up to that delay after the loss
    /// (QEMU's `nbd_co_do_establish_connection` in
    /// `nbd_reconnect_attempt`); then `EIO`.
    async fn req(&self, node: &Node, op: ClientOp) -> IoResult<ClientReply> {
        if self.reconnect_ns == 0 {
            return self.link.request(op).await;
        }
        loop {
            if self.link.state() == ClientState::Ready {
                self.link.inner.borrow_mut().down_since = None;
                match self.link.request(op.clone()).await {
                    Err(IoError::Eio) if self.link.state() == ClientState::Failed => {}
                    r => return r,
                }
            }
            self.reconnect(node).await?;
        }
    }

    /// Wait for the connection to be back, making attempts once a second
    /// (QEMU's first delays), until `reconnect-delay` after the loss. Once
    /// that is over, requests fail at once, each starting another attempt
    /// in the background (QEMU: `NBD_CLIENT_CONNECTING_NOWAIT`), so the
    /// node comes back when the server does.
    async fn reconnect(&self, node: &Node) -> IoResult<()> {
        let reg = node.registry().ok_or(IoError::Eio)?;
        let clock = reg.clock();
        let timers = reg.executor().timers().clone();
        if self.link.cancelled() {
            return Err(IoError::Eio);
        }
        let since = {
            let mut i = self.link.inner.borrow_mut();
            *i.down_since.get_or_insert(clock.now_ns())
        };
        let deadline = since.saturating_add(self.reconnect_ns);
        if clock.now_ns() >= deadline {
            if self.link.state() == ClientState::Failed {
                self.link.restart(&self.links);
            }
            return Err(IoError::Eio);
        }
        loop {
            match self.link.state() {
                ClientState::Ready => {
                    self.link.inner.borrow_mut().down_since = None;
                    return Ok(());
                }
                ClientState::Failed => {
                    if clock.now_ns() >= deadline {
                        return Err(IoError::Eio);
                    }
                    log::debug!("nbd: connection to {} lost; reconnecting", self.link.server);
                    self.link.restart(&self.links);
                }
                ClientState::Handshake => {}
                ClientState::Disconnecting | ClientState::Closed => return Err(IoError::Eio),
            }
            let now = clock.now_ns();
            if now >= deadline {
                return Err(IoError::Eio);
            }
            let wake = now.saturating_add(RETRY_START_NS).min(deadline);
            let mut sleep = core::pin::pin!(timers.sleep_until(clock.clone(), wake));
            let mut open = core::pin::pin!(self.link.open());
            let opened = poll_fn(|cx| {
                if self.link.cancelled() {
                    return Poll::Ready(None);
                }
                if let Poll::Ready(r) = open.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                sleep.as_mut().poll(cx).map(|()| None)
            })
            .await;
            if self.link.cancelled() {
                return Err(IoError::Eio);
            }
            if let Some(Err(_)) = opened {
                // Refused: wait out the retry delay.
                sleep.await;
            }
        }
    }
}

impl BlockDriver for NbdNode {
    fn format_name(&self) -> &str {
        "nbd"
    }

    fn get_length(&self, _node: &Node) -> IoResult<u64> {
        Ok(self.info()?.size)
    }

    fn open<'a>(&'a self, node: &'a Rc<Node>) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let info = self.connect(node).await?;
            if info.read_only() && !node.read_only() {
                self.link.disconnect();
                return Err(String::from("NBD export is read-only"));
            }
            let _ = self.aligner.set(Aligner::new(info.block_size.min()));
            Ok(())
        })
    }

    fn read<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: usize,
        _flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Vec<u8>>> {
        Box::pin(async move {
            let dev = Blocks { nbd: self, node };
            self.aligner()?.read(&dev, offset, len).await
        })
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        let fua = flags.contains(ReqFlags::FUA);
        Box::pin(async move {
            let dev = Blocks { nbd: self, node };
            self.aligner()?.write(&dev, offset, data, fua).await
        })
    }

    fn supported_write_flags(&self) -> ReqFlags {
        match self.link.info() {
            Some(i) if i.has(tf::SEND_FUA) => ReqFlags::FUA,
            _ => ReqFlags::NONE,
        }
    }

    fn flush<'a>(&'a self, node: &'a Node) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            let info = self.info()?;
            if !info.has(tf::SEND_FLUSH) || info.read_only() {
                // QEMU: a server without flush has nothing to flush.
                return Ok(());
            }
            self.req(node, ClientOp::Flush).await.map(|_| ())
        })
    }

    fn discard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            // Advisory: the whole blocks inside the range only.
            let Some((start, len)) = self.aligner()?.whole_blocks_within(offset, len) else {
                return Ok(());
            };
            let trim = |offset, len| ClientOp::Trim {
                offset,
                len,
                fua: false,
            };
            self.ranged(node, start, len, trim).await
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        let fua = flags.contains(ReqFlags::FUA);
        let may_unmap = flags.contains(ReqFlags::MAY_UNMAP);
        let fast = flags.contains(ReqFlags::NO_FALLBACK);
        Box::pin(async move {
            let info = self.info()?;
            if fast && !info.has(tf::SEND_FAST_ZERO) {
                return Err(IoError::Enotsup);
            }
            // Unaligned zeroes: the generic layer writes a zeroed buffer,
            // which the aligner pads.
            let min = u64::from(info.block_size.min());
            if !offset.is_multiple_of(min) || !len.is_multiple_of(min) {
                return Err(IoError::Enotsup);
            }
            let fua = fua && info.has(tf::SEND_FUA);
            self.ranged(node, offset, len, |offset, len| ClientOp::WriteZeroes {
                offset,
                len,
                fua,
                may_unmap,
                fast,
            })
            .await
        })
    }

    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, IoResult<BlockStatus>> {
        Box::pin(async move {
            let info = self.info()?;
            if info.base_allocation.is_none() {
                // QEMU: without block status everything is allocated data.
                return Ok(BlockStatus::data(len));
            }
            let n = len.min(Self::max_piece(&info, false)) as u32;
            match self
                .req(node, ClientOp::BlockStatus { offset, len: n })
                .await?
            {
                ClientReply::Status(s) => Ok(s),
                _ => Err(IoError::Eio),
            }
        })
    }

    fn request_alignment(&self, _node: &Node) -> u64 {
        self.link
            .info()
            .map_or(1, |i| u64::from(i.block_size.min()))
    }

    fn cancel_in_flight(&self, _node: &Node) {
        self.link.cancel_in_flight();
    }

    fn close(&self, _node: &Node) {
        self.link.disconnect();
    }

    fn filename(&self, _node: &Node) -> Option<String> {
        let s = &self.link.server;
        Some(if self.export.is_empty() {
            format!("nbd://{}:{}", s.host, s.port)
        } else {
            format!("nbd://{}:{}/{}", s.host, s.port, self.export)
        })
    }

    fn query_info(&self, _node: &Node) -> Option<Value> {
        let state = match self.link.state() {
            ClientState::Handshake => "connecting",
            ClientState::Ready => "connected",
            ClientState::Disconnecting | ClientState::Closed => "closed",
            ClientState::Failed => "failed",
        };
        // Which reply headers the connection uses (what the handshake
        // found, kept while reconnecting).
        let headers = self.link.info().map(|i| {
            if i.extended {
                "extended"
            } else if i.structured {
                "structured"
            } else {
                "simple"
            }
        });
        Some(json!({"x-state": state, "x-headers": headers}))
    }
}

/// `server`: only the inet form.
fn parse_server(d: &DriverOpts<'_, '_>) -> Result<ServerAddr, QmpError> {
    let s = d
        .opts
        .opt_obj("server")?
        .ok_or_else(|| QmpError::generic("Parameter 'server' is missing"))?;
    let kind = s.enum_str("type", &["inet", "unix", "vsock", "fd"])?;
    if kind != "inet" {
        return Err(QmpError::generic(format!(
            "NBD server address type '{kind}' is not supported (only inet)"
        )));
    }
    let host = String::from(s.str("host")?);
    let port_s = s.str("port")?;
    s.check_unexpected()?;
    let port = port_s
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| QmpError::generic(format!("Port '{port_s}' is not a valid port number")))?;
    Ok(ServerAddr { host, port })
}

/// The `nbd` driver class; every node it opens is added to `links` for
/// the platform to service.
pub fn class(links: Links) -> DriverClass {
    DriverClass::new("nbd", move |d| {
        let server = parse_server(d)?;
        let export = String::from(d.opts.opt_str("export")?.unwrap_or(""));
        let reconnect_ns = d
            .opts
            .opt_u64("reconnect-delay")?
            .unwrap_or(0)
            .saturating_mul(1_000_000_000);
        let open_timer_ns = d
            .opts
            .opt_u64("open-timer")?
            .unwrap_or(0)
            .saturating_mul(1_000_000_000);
        if d.opts.opt_str("tls-creds")?.is_some() {
            return Err(QmpError::generic("TLS is not supported by this NBD client"));
        }
        d.opts.check_unexpected()?;
        let links = links.clone();
        Ok(Box::new(move |_ctx: &crate::open::OpenCtx<'_>| {
            let link = Rc::new(NbdLink::new(server.clone(), &export));
            links.borrow_mut().push(link.clone());
            Ok(Box::new(NbdNode {
                link,
                export: export.clone(),
                links: links.clone(),
                open_timer_ns,
                reconnect_ns,
                aligner: OnceCell::new(),
            }) as Box<dyn BlockDriver>)
        }) as Opener)
    })
}
