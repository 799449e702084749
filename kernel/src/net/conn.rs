//! One NBD client: its TCP socket, its `block::nbd::Connection`, and the
//! requests it has in flight as executor tasks.
//!
//! The network poll moves bytes both ways ([`Conn::service`]); each request
//! the engine issues runs as its own task ([`block::export::execute`] on
//! the export: its backend and its bitmaps) and completes into the engine whenever it finishes, so replies go out of
//! order. A client that vanishes only makes the engine drop the results
//! of its requests, which still run to the end (a write lands or fails
//! cleanly); the connection is forgotten once none is left.
//!
//! With `tls-creds` on the server, the engine sits behind an
//! [`nbdtls::TlsConnection`] ([`Session::Tls`]): it refuses every option
//! with `NBD_REP_ERR_TLS_REQD` until the client's `NBD_OPT_STARTTLS`,
//! and every byte after that goes through rustls.
//!
//! Memory: the engine bounds what one client makes it hold (requests,
//! write payloads, queued output: [`Budgets::limits`]); the buffers of
//! reads being executed are bounded across all clients by an [`IoBudget`]
//! (a request that does not fit waits in its connection's queue). All of
//! it follows the heap present ([`super::budget`]). A read larger than
//! the whole budget, or one the heap cannot give a buffer to while
//! keeping its reserve, is answered `ENOMEM` instead of started; so is a
//! write whose payload would eat into the reserve (the engine's payload
//! room). A client stalled
//! in the middle of a message for [`STALL_NS`], or still negotiating
//! `handshake-max-seconds` after it was accepted (QEMU 10's timer, from
//! `nbd_client_new`), is dropped.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::rc::Rc;
use block::exec::Executor;
use block::export::{ExportTable, NbdExport, execute};
use block::io::IoError;
use block::nbd::{Completion, Connection, ExportSet, InputState, Op, Request, State};
use core::cell::{Cell, RefCell};
use drivers::net::smoltcp::iface::{SocketHandle, SocketSet};
use drivers::net::smoltcp::socket::tcp;
use nbdtls::{Credentials, TlsConnection};

use super::budget::Budgets;

/// `ENOMEM`: a request the heap cannot hold.
const ENOMEM: IoError = IoError::Other(12);

/// A client stalled mid-message this long is dropped.
pub const STALL_NS: u64 = 60_000_000_000;

/// Bytes of read data all connections may hold at once: buffers of reads
/// in execution and read replies not yet sent.
pub struct IoBudget {
    used: Cell<u64>,
    limit: u64,
}

impl IoBudget {
    pub fn new(limit: u64) -> Rc<IoBudget> {
        Rc::new(IoBudget {
            used: Cell::new(0),
            limit,
        })
    }

    /// Whether `n` bytes could ever fit.
    fn can_ever_hold(&self, n: u64) -> bool {
        n <= self.limit
    }

    /// Takes `n` bytes if they fit (or if nothing is taken: a single
    /// request always runs).
    fn take(&self, n: u64) -> bool {
        let used = self.used.get();
        if used == 0 || used + n <= self.limit {
            self.used.set(used + n);
            true
        } else {
            false
        }
    }

    fn give(&self, n: u64) {
        self.used.set(self.used.get().saturating_sub(n));
    }
}

/// The read buffer a request needs while it executes.
fn buffer_bytes(op: &Op) -> u64 {
    match op {
        Op::Read { len, .. } => *len,
        _ => 0,
    }
}

/// A client's NBD session: the engine alone, or behind TLS.
enum Session {
    Plain(Box<Connection>),
    Tls(Box<TlsConnection>),
}

impl Session {
    fn engine(&mut self) -> &mut Connection {
        match self {
            Session::Plain(c) => c,
            Session::Tls(t) => t.engine(),
        }
    }

    fn engine_ref(&self) -> &Connection {
        match self {
            Session::Plain(c) => c,
            Session::Tls(t) => t.engine_ref(),
        }
    }

    /// The next bytes owed to the socket.
    fn output_chunk(&self) -> &[u8] {
        match self {
            Session::Plain(c) => c.output().chunk(),
            Session::Tls(t) => t.output(),
        }
    }

    fn consume_output(&mut self, n: usize) {
        match self {
            Session::Plain(c) => c.consume_output(n),
            Session::Tls(t) => t.consume_output(n),
        }
    }

    /// Bytes owed to the client: the engine's output and, with TLS, the
    /// records encrypted from it and not yet sent.
    fn output_len(&self) -> u64 {
        match self {
            Session::Plain(c) => c.output().len(),
            Session::Tls(t) => t.engine_ref().output().len() + t.output().len() as u64,
        }
    }

    fn receive(&mut self, input: &[u8], exports: &dyn ExportSet) -> usize {
        match self {
            Session::Plain(c) => c.receive(input, exports),
            Session::Tls(t) => t.receive(input, exports),
        }
    }

    /// With TLS: encrypts what the engine said since (replies of requests
    /// completed by their tasks).
    fn poll(&mut self, exports: &dyn ExportSet) {
        if let Session::Tls(t) = self {
            t.poll(exports);
        }
    }

    fn should_close(&self) -> bool {
        match self {
            Session::Plain(c) => c.should_close(),
            Session::Tls(t) => t.should_close(),
        }
    }

    fn closed(&mut self) {
        match self {
            Session::Plain(c) => c.closed(),
            Session::Tls(t) => t.closed(),
        }
    }
}

/// A client connection.
pub struct Conn {
    pub handle: SocketHandle,
    engine: Rc<RefCell<Session>>,
    export: Option<Rc<NbdExport>>,
    shutdown_sent: bool,
    peer_closed: bool,
    /// When we sent our FIN (monotonic ns).
    closed_at: Option<u64>,
    /// Requests issued by the engine, waiting for the budget.
    queued: VecDeque<Request>,
    /// When input last moved (monotonic ns).
    last_input: u64,
    /// When the client is dropped if it is still negotiating (monotonic
    /// ns): `handshake-max-seconds` after it was accepted, so silent or
    /// trickling clients cannot hold every slot of `max-connections`.
    handshake_deadline: Option<u64>,
    /// This connection's share of read data ([`Budgets::conn_read_bytes`]).
    reads: Rc<IoBudget>,
    /// Bytes of both budgets held for read replies waiting in the
    /// engine's output; given back as the client takes its output.
    held: Rc<Cell<u64>>,
    /// Queued output beyond which no further read starts.
    output_high_water: u64,
}

/// How long a socket we closed may wait for the peer's FIN before it is
/// reset (a client that never closes its side holds no export meanwhile).
const LINGER_NS: u64 = 10_000_000_000;

impl Conn {
    /// A client accepted now; `handshake_ns`: how long it may negotiate;
    /// `tls`: the server's credentials when it requires TLS.
    pub fn new(
        handle: SocketHandle,
        budgets: &Budgets,
        handshake_ns: Option<u64>,
        tls: Option<&Credentials>,
    ) -> Conn {
        let now = crate::clock::monotonic_ns();
        let session = match tls {
            None => Session::Plain(Box::new(Connection::new(budgets.limits))),
            Some(c) => Session::Tls(Box::new(TlsConnection::new(budgets.limits, c.clone()))),
        };
        Conn {
            handle,
            engine: Rc::new(RefCell::new(session)),
            export: None,
            shutdown_sent: false,
            peer_closed: false,
            closed_at: None,
            queued: VecDeque::new(),
            last_input: now,
            handshake_deadline: handshake_ns.map(|d| now.saturating_add(d)),
            reads: IoBudget::new(budgets.conn_read_bytes),
            held: Rc::new(Cell::new(0)),
            output_high_water: budgets.limits.output_high_water,
        }
    }

    /// Gives back the budget held for read replies the client has taken
    /// (or that were dropped): what is held never exceeds the output.
    fn release_sent(&self, budget: &IoBudget) {
        let out = self.engine.borrow().output_len();
        let held = self.held.get();
        if held > out {
            budget.give(held - out);
            self.reads.give(held - out);
            self.held.set(out);
        }
    }

    /// The server is going away: the engine answers ESHUTDOWN, lets
    /// requests in flight finish, then closes.
    pub fn shutdown(&mut self) {
        if !self.shutdown_sent {
            self.shutdown_sent = true;
            self.engine.borrow_mut().engine().shutdown();
        }
    }

    /// Moves bytes between the socket and the engine, starts the requests
    /// it issues. Returns whether anything moved.
    pub fn service(
        &mut self,
        sockets: &mut SocketSet<'_>,
        exports: &Rc<ExportTable>,
        exec: &Executor,
        budget: &Rc<IoBudget>,
        reserve: usize,
    ) -> bool {
        if self
            .export
            .as_ref()
            .is_some_and(|e| e.shutting_down.get() && e.hard.get())
        {
            self.shutdown();
        }
        let sock = sockets.get_mut::<tcp::Socket>(self.handle);
        let mut progress = false;
        loop {
            let mut moved = false;
            {
                let mut eng = self.engine.borrow_mut();
                let table: &ExportTable = exports;
                eng.poll(table);
                while sock.can_send() {
                    let chunk = eng.output_chunk();
                    if chunk.is_empty() {
                        break;
                    }
                    match sock.send_slice(chunk) {
                        Ok(n) if n > 0 => {
                            eng.consume_output(n);
                            moved = true;
                        }
                        _ => break,
                    }
                }
                if sock.can_recv() && !self.peer_closed {
                    // A write payload may not eat into the heap's reserve.
                    eng.engine()
                        .set_payload_room(crate::heap::room(reserve) as u64);
                    let taken = sock
                        .recv(|buf| {
                            let n = eng.receive(buf, table);
                            (n, n)
                        })
                        .unwrap_or(0);
                    if taken > 0 {
                        moved = true;
                        self.last_input = crate::clock::monotonic_ns();
                    }
                }
            }
            self.bind_export(exports);
            self.release_sent(budget);
            moved |= self.start_requests(exec, budget, reserve);
            if !moved {
                break;
            }
            progress = true;
        }
        let mut eng = self.engine.borrow_mut();
        if eng.should_close() && self.closed_at.is_none() {
            sock.close();
            self.closed_at = Some(crate::clock::monotonic_ns());
            progress = true;
        }
        let now = crate::clock::monotonic_ns();
        let stalled = matches!(eng.engine_ref().input_state(), InputState::Partial { .. })
            && now.saturating_sub(self.last_input) > STALL_NS;
        let lingering = eng.engine_ref().state() == State::Handshake
            && self.handshake_deadline.is_some_and(|d| now > d);
        if (stalled || lingering) && sock.is_open() {
            log::warn!(
                "nbd: dropping a client {}",
                if stalled {
                    "stalled mid-message"
                } else {
                    "still negotiating at handshake-max-seconds"
                }
            );
            sock.abort();
        }
        let gone = !sock.is_open()
            || (!sock.may_recv() && !sock.can_recv() && eng.engine_ref().state() != State::Closing);
        if gone && !self.peer_closed {
            self.peer_closed = true;
            eng.closed();
            if sock.is_open() {
                sock.close();
            }
            progress = true;
        }
        progress
    }

    /// Counts the client on its export once it has chosen one.
    fn bind_export(&mut self, exports: &ExportTable) {
        if self.export.is_some() {
            return;
        }
        let name = match self.engine.borrow().engine_ref().export() {
            Some(e) => e.name.clone(),
            None => return,
        };
        match exports.by_name(&name) {
            Some(e) => {
                e.clients.set(e.clients.get() + 1);
                self.export = Some(e);
            }
            None => self.shutdown(),
        }
    }

    /// Starts the engine's requests as tasks, as far as the budget allows.
    fn start_requests(&mut self, exec: &Executor, budget: &Rc<IoBudget>, reserve: usize) -> bool {
        let mut any = false;
        while let Some(req) = self.engine.borrow_mut().engine().next_request() {
            self.queued.push_back(req);
        }
        while let Some(req) = self.queued.front() {
            let bytes = buffer_bytes(&req.op);
            // A read's data stays in memory until the client takes the
            // reply: a client that asks for gigabytes and reads nothing
            // holds at most its share.
            if bytes > 0 && self.engine.borrow().output_len() > self.output_high_water {
                break;
            }
            if !budget.can_ever_hold(bytes) {
                self.refuse_no_memory();
                any = true;
                continue;
            }
            if !self.reads.take(bytes) {
                break;
            }
            if !budget.take(bytes) {
                self.reads.give(bytes);
                break;
            }
            if bytes > 0 && !crate::heap::can_take(bytes as usize, reserve) {
                budget.give(bytes);
                self.reads.give(bytes);
                self.refuse_no_memory();
                any = true;
                continue;
            }
            let Some(req) = self.queued.pop_front() else {
                break;
            };
            any = true;
            let engine = self.engine.clone();
            let export = self.export.clone();
            let budget = budget.clone();
            let reads = self.reads.clone();
            let held = self.held.clone();
            exec.spawn(async move {
                let completion = match export {
                    Some(e) => execute(&*e, req.op).await,
                    None => Completion::Error(IoError::Enomedium),
                };
                // Refused harmlessly if the client has gone.
                if engine
                    .borrow_mut()
                    .engine()
                    .complete(req.id, completion)
                    .is_ok()
                {
                    // Held until the reply has been sent (release_sent).
                    held.set(held.get() + bytes);
                } else {
                    budget.give(bytes);
                    reads.give(bytes);
                }
            });
        }
        any
    }

    /// Answers the first queued request `ENOMEM`: its buffer cannot be
    /// allocated without risking the appliance.
    fn refuse_no_memory(&mut self) {
        if let Some(req) = self.queued.pop_front() {
            log::debug!(
                "nbd: no memory for a request of {} bytes",
                buffer_bytes(&req.op)
            );
            let _ = self
                .engine
                .borrow_mut()
                .engine()
                .complete(req.id, Completion::Error(ENOMEM));
        }
    }

    /// Whether the connection is over: the socket is closed and no request
    /// is left running. The client's hold on its export ends as soon as
    /// either side has closed and nothing is in flight.
    pub fn finished(&mut self, sockets: &mut SocketSet<'_>, budget: &IoBudget) -> bool {
        let sock = sockets.get_mut::<tcp::Socket>(self.handle);
        let mut eng = self.engine.borrow_mut();
        let socket_closed = matches!(sock.state(), tcp::State::Closed | tcp::State::TimeWait);
        if socket_closed && !self.peer_closed {
            self.peer_closed = true;
            eng.closed();
        }
        if self.peer_closed {
            // Not started, never will be: their results could not be sent.
            for req in self.queued.drain(..) {
                let _ = eng
                    .engine()
                    .complete(req.id, Completion::Error(IoError::Eio));
            }
        }
        let idle = eng.engine_ref().in_flight() == 0;
        if idle
            && (self.peer_closed || self.closed_at.is_some())
            && let Some(e) = self.export.take()
        {
            e.clients.set(e.clients.get().saturating_sub(1));
        }
        if let Some(t) = self.closed_at
            && !socket_closed
            && crate::clock::monotonic_ns().saturating_sub(t) > LINGER_NS
        {
            sock.abort();
        }
        // An aborted socket is Closed at once but sends its RST only when
        // the stack next dispatches (then it forgets its peer): removed
        // before that, the client would never hear it was dropped.
        let reset_sent = sock.state() != tcp::State::Closed || sock.remote_endpoint().is_none();
        drop(eng);
        // Output dropped with the connection: its read data goes back.
        self.release_sent(budget);
        socket_closed && idle && reset_sent
    }
}
