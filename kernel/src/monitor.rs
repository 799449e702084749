//! The QMP monitors: `block::qmp`'s sans-IO sessions driven by the main
//! loop, one per client ([`Conn`]), over two transports that share the
//! command table and the appliance state:
//! - COM2: a 16550 cannot see a client connect, so its one session
//!   greets once, at boot (QEMU's socket with `wait=on`);
//! - virtio-serial ports named `org.qemu.qmp*` ([`crate::monitor_ports`]):
//!   the device reports every host connect and disconnect, so every
//!   connection gets its own greeting and negotiation, as with
//!   qemu-storage-daemon's `--monitor`.
//!
//! Output is queued per client and written as the transport takes it, so a
//! client that stops reading never stalls the appliance. Events go to every
//! client that finished `qmp_capabilities`. A machine with neither (an
//! appliance configured by its boot options alone) has no monitor to talk
//! to: the halt path's events are dropped.

use crate::app::Appliance;
use crate::monitor_ports::Ports;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use block::qmp::{Action, Dispatcher, Event, Limits, QmpContext, Session, Timestamp, VersionInfo};
use drivers::uart::{COM2, Uart};

/// The QEMU version whose qemu-storage-daemon QMP shapes blockhaus follows.
const QEMU_COMPAT: (u64, u64, u64) = (7, 2, 0);
/// How long the halt path waits for the QMP clients to take their last output.
/// A client that is not reading stalls COM2 after a few hundred bytes:
/// QEMU's 16550 sends each byte with its own `write()` on the chardev
/// socket, and on a Unix socket every one-byte message costs most of a
/// kilobyte of the socket's send budget, so the socket reports full (and
/// QEMU stops taking bytes from the UART) long before the bytes add up.
const WRITE_OUT_NS: u64 = 2_000_000_000;
/// Unread output at which a client's input stops being taken (left in
/// the UART or the port's receive queue, which holds the host side back):
/// a client that sends requests and reads no reply makes the appliance
/// hold at most this and one reply for it.
pub const INPUT_PAUSE: usize = 64 << 10;
/// Unread output beyond which events for a client that does not read are
/// dropped (replies never are: [`INPUT_PAUSE`] bounds them).
const EVENTS_LIMIT: usize = 1 << 20;

/// QEMU allows 64 MiB and 2 Mi tokens per request; a small heap wants less.
const LIMITS: Limits = Limits {
    max_bytes: 1 << 20,
    max_tokens: 1 << 16,
    max_nesting: 64,
};

/// One QMP client: its session (negotiation, half-received input) and the
/// output its transport has not taken yet. COM2 and every virtio-serial
/// port have one; a new connection gets a new one.
pub struct Conn {
    session: Session,
    outbox: VecDeque<u8>,
    /// The client has sent something.
    heard: bool,
}

impl Conn {
    /// A session for a client that just connected, its greeting queued.
    pub fn connected() -> Conn {
        let (major, minor, micro) = QEMU_COMPAT;
        let session = Session::new(VersionInfo::new(major, minor, micro)).with_limits(LIMITS);
        let mut conn = Conn {
            session,
            outbox: VecDeque::new(),
            heard: false,
        };
        let greeting = conn.session.greeting();
        conn.queue(&greeting, usize::MAX);
        conn
    }

    /// Queues `bytes` unless the outbox would pass `limit` or the heap
    /// has no room for them (then they are dropped, with a warning).
    fn queue(&mut self, bytes: &[u8], limit: usize) {
        if self.outbox.len() + bytes.len() > limit || self.outbox.try_reserve(bytes.len()).is_err()
        {
            log::warn!(
                "QMP client is not reading: dropping {} bytes of output",
                bytes.len()
            );
            return;
        }
        self.outbox.extend(bytes);
    }

    /// Moves the session's output to the outbox: `limit` as in
    /// [`Conn::queue`].
    fn take_output(&mut self, limit: usize) {
        let out = self.session.take_output();
        if !out.is_empty() {
            self.queue(&out, limit);
        }
    }

    /// Whether this client's input should wait ([`INPUT_PAUSE`]).
    pub fn input_paused(&self) -> bool {
        self.outbox.len() >= INPUT_PAUSE
    }

    /// Runs the requests `input` completes, and those queued before, while
    /// the unread output stays under [`INPUT_PAUSE`]; queues the replies.
    fn feed(
        &mut self,
        input: &[u8],
        commands: &Dispatcher<Appliance>,
        ctx: &mut Appliance,
    ) -> Action {
        self.heard |= !input.is_empty();
        let budget = INPUT_PAUSE.saturating_sub(self.outbox.len());
        let action = self.session.feed_within(input, commands, ctx, budget);
        self.take_output(usize::MAX);
        action
    }

    /// Whether requests wait that [`Conn::feed`] can run now.
    fn runnable(&self) -> bool {
        self.session.has_queued() && !self.input_paused()
    }

    fn emit(&mut self, event: &Event) {
        if self.session.emit(event) {
            self.take_output(EVENTS_LIMIT);
        }
    }

    /// Writes what `write` takes of the outbox; returns whether it took
    /// anything.
    pub fn flush(&mut self, mut write: impl FnMut(&[u8]) -> usize) -> bool {
        let mut wrote = false;
        while !self.outbox.is_empty() {
            let (front, _) = self.outbox.as_slices();
            let n = write(front);
            if n == 0 {
                break;
            }
            self.outbox.drain(..n);
            wrote = true;
        }
        wrote
    }

    /// Whether the client has sent anything yet.
    pub fn heard(&self) -> bool {
        self.heard
    }

    /// Whether output waits for the transport.
    pub fn pending(&self) -> bool {
        !self.outbox.is_empty()
    }
}

/// Which client raised events while its command ran (it wrote them itself).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ConnId {
    Com2,
    Port(u32),
}

pub struct Monitor {
    /// `None`: no UART on COM2.
    com2: Option<(Uart, Conn)>,
    /// `None`: no virtio-serial device.
    ports: Option<Ports>,
    commands: Dispatcher<Appliance>,
    ctx: Appliance,
    quit: bool,
    /// The halt path runs: input is no longer executed.
    halting: bool,
}

pub fn timestamp() -> Timestamp {
    let (s, us) = crate::clock::wall_clock();
    Timestamp {
        seconds: s as i64,
        microseconds: us as i64,
    }
}

impl Monitor {
    pub fn new(ctx: Appliance, ports: Option<Ports>) -> Self {
        let mut commands = Dispatcher::new();
        crate::disks_qmp::register(&mut commands);
        block::commands::register(&mut commands);
        block::export::register(&mut commands);
        crate::drive::register(&mut commands);
        // SAFETY: COM2 is the monitor's port; only this module drives it.
        let uart = unsafe { Uart::probe(COM2) };
        if uart.is_none() && ports.is_none() {
            log::warn!(
                "no UART on COM2: QMP is off (no virtio-serial either; boot options configure the appliance, the ACPI power button stops it)"
            );
        }
        Self {
            com2: uart.map(|u| (u, Conn::connected())),
            ports,
            commands,
            ctx,
            quit: false,
            halting: false,
        }
    }

    /// Sends COM2's greeting (queued by [`Conn::connected`]). A 16550
    /// cannot see a client connect, so it goes out once, at boot (run
    /// QEMU's COM2 socket with `wait=on`).
    pub fn start(&mut self) {
        self.flush_some();
    }

    /// Whether output waits for room in a transport (COM2's transmitter
    /// or a port's transmit queue): the idle loop retries on a timer.
    pub fn output_pending(&mut self) -> bool {
        let mut pending = false;
        self.for_each_conn(|_, conn| pending |= conn.pending());
        pending || self.ports.as_ref().is_some_and(|p| p.unsent())
    }

    /// Whether QMP is served on COM2.
    pub fn on_com2(&self) -> bool {
        self.com2.is_some()
    }

    /// Where QMP is served, for the boot log.
    pub fn transports(&self) -> &'static str {
        match (self.com2.is_some(), self.ports.is_some()) {
            (true, true) => "QMP on COM2 and virtio-serial",
            (true, false) => "QMP on COM2",
            (false, true) => "QMP on virtio-serial",
            (false, false) => "QMP off",
        }
    }

    /// Every client's session.
    fn for_each_conn(&mut self, mut f: impl FnMut(ConnId, &mut Conn)) {
        if let Some((_, conn)) = &mut self.com2 {
            f(ConnId::Com2, conn);
        }
        if let Some(ports) = &mut self.ports {
            ports.for_each_conn(|id, conn| f(ConnId::Port(id), conn));
        }
    }

    /// Sends `events` raised by `from`'s command to every other client.
    fn broadcast(&mut self, from: ConnId, events: &[Event]) {
        self.for_each_conn(|id, conn| {
            if id != from {
                for e in events {
                    conn.emit(e);
                }
            }
        });
    }

    fn flush_some(&mut self) -> bool {
        let mut wrote = false;
        if let Some((uart, conn)) = &mut self.com2 {
            wrote |= conn.flush(|b| uart.try_write(b));
        }
        if let Some(ports) = &mut self.ports {
            wrote |= ports.flush();
        }
        wrote
    }

    /// Serves every client: reads what arrived, runs complete requests,
    /// writes what the transports take. Returns whether anything happened.
    pub fn poll(&mut self) -> bool {
        let serving = !self.quit && !self.halting;
        let mut busy = false;
        let mut raised: Vec<(ConnId, Vec<Event>)> = Vec::new();
        if let Some((uart, conn)) = &mut self.com2 {
            let mut buf = [0u8; 512];
            // Unread bytes stay in the UART, whose full FIFO holds QEMU
            // back from reading the client's socket.
            let n = if conn.input_paused() {
                0
            } else {
                uart.read_available(&mut buf)
            };
            busy |= conn.runnable();
            if (n > 0 || conn.runnable()) && serving {
                if conn.feed(&buf[..n], &self.commands, &mut self.ctx) == Action::Quit {
                    self.quit = true;
                }
                raised.push((ConnId::Com2, core::mem::take(&mut self.ctx.raised)));
            }
            busy |= n > 0;
        }
        if let Some(ports) = &mut self.ports {
            let (commands, ctx, quit) = (&self.commands, &mut self.ctx, &mut self.quit);
            busy |= ports.poll(|id, conn, input| {
                if *quit || !serving {
                    return;
                }
                if conn.feed(input, commands, ctx) == Action::Quit {
                    *quit = true;
                }
                raised.push((ConnId::Port(id), core::mem::take(&mut ctx.raised)));
            });
            // Requests held back while their client's output was high.
            ports.for_each_conn(|id, conn| {
                if *quit || !serving || !conn.runnable() {
                    return;
                }
                busy = true;
                if conn.feed(&[], commands, ctx) == Action::Quit {
                    *quit = true;
                }
                raised.push((ConnId::Port(id), core::mem::take(&mut ctx.raised)));
            });
        }
        for (from, events) in raised {
            if !events.is_empty() {
                self.broadcast(from, &events);
            }
        }
        busy |= self.flush_some();
        busy
    }

    /// The state commands run against.
    pub fn appliance(&mut self) -> &mut Appliance {
        &mut self.ctx
    }

    /// `quit` was executed.
    pub fn halt_requested(&self) -> Option<crate::halt::Reason> {
        self.quit.then_some(crate::halt::Reason::HostQmpQuit)
    }

    /// Writes out events raised outside any command (block jobs, quorum,
    /// exports), as they happen, to every negotiated client.
    pub fn flush_events(&mut self) {
        let mut events = Vec::new();
        self.ctx.drain_events(&mut events);
        self.ctx.raised.clear();
        if !events.is_empty() {
            self.for_each_conn(|_, conn| {
                for e in &events {
                    conn.emit(e);
                }
            });
        }
    }

    /// `x-blockhaus-panic` (with `blockhaus.test-fault=panic-on-qmp`):
    /// a fatal error inside the command, for the tests of the fatal halt
    /// path: a panic, or with `"fault": "page-fault"` a CPU exception.
    pub fn add_test_panic_command(&mut self) {
        let sig = block::qmp::Signature::new("fault?:str", "{}");
        self.commands.register("x-blockhaus-panic", sig, |_, args| {
            args.check_known(&["fault"])?;
            match args.opt_str("fault")? {
                None | Some("panic") => panic!("x-blockhaus-panic: test panic requested over QMP"),
                Some("page-fault") => {
                    crate::cmdline::trigger(crate::cmdline::TestFault::PageFault);
                    Err(block::qmp::QmpError::generic(
                        "the page fault did not happen",
                    ))
                }
                Some(other) => Err(block::qmp::QmpError::generic(alloc::format!(
                    "fault '{other}' is not one of panic, page-fault"
                ))),
            }
        });
    }

    /// `x-blockhaus-disk-io` (with `blockhaus.debug-commands=on`): I/O on
    /// a disk through its driver, for the driver tests.
    pub fn add_debug_commands(&mut self) {
        crate::disks_debug::register(&mut self.commands);
        crate::interrupts::register_debug(&mut self.commands);
    }

    /// Queues `SHUTDOWN` (after the `quit` reply, as QEMU does) for every
    /// client; a fatal error is announced first by `GUEST_PANICKED` with
    /// the action taken (QEMU's `-action panic=exit-failure`: `poweroff`).
    /// Input is no longer executed from here on.
    pub fn shutdown(&mut self, reason: crate::halt::Reason) {
        self.halting = true;
        let mut events = Vec::new();
        if reason == crate::halt::Reason::Fatal {
            let data = serde_json::json!({"action": "poweroff"});
            events.push(Event::new("GUEST_PANICKED", Some(data), timestamp()));
        }
        let data = serde_json::json!({"guest": reason.by_guest(), "reason": reason.as_str()});
        events.push(Event::new("SHUTDOWN", Some(data), timestamp()));
        self.for_each_conn(|_, conn| {
            for e in &events {
                conn.emit(e);
            }
        });
    }

    /// Writes out everything still queued (events of the halt path
    /// included), waiting for the transports: the last thing before
    /// poweroff. Clients that do not read get at most [`WRITE_OUT_NS`] of
    /// waiting: the halt path must finish whatever they do.
    pub fn write_out(&mut self) {
        self.flush_events();
        let start = crate::clock::monotonic_ns();
        loop {
            let mut pending = false;
            self.for_each_conn(|_, conn| pending |= conn.pending());
            if let Some(ports) = &self.ports {
                pending |= ports.unsent();
            }
            if !pending {
                break;
            }
            // Polling reaps what the device sent (input is not executed).
            let progressed = self.poll();
            if crate::clock::monotonic_ns().saturating_sub(start) > WRITE_OUT_NS {
                log::warn!("QMP client is not reading: output dropped at halt");
                break;
            }
            if !progressed {
                crate::watchdog::check();
                core::hint::spin_loop();
            }
        }
    }
}
