//! The QMP monitor on COM2: `block::qmp`'s sans-IO session driven by the
//! main loop. Output is queued and written as the UART takes it, so a
//! client that stops reading never stalls the appliance.
//!
//! A machine without a UART on COM2 (an appliance configured by its boot
//! options alone) has no monitor to talk to: the session still runs the
//! halt path's events, and their output is dropped.

use crate::app::Appliance;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use block::qmp::{Action, Dispatcher, Limits, QmpContext, Session, Timestamp, VersionInfo};
use drivers::uart::{COM2, Uart};

/// The QEMU version whose qemu-storage-daemon QMP shapes blockhaus follows.
const QEMU_COMPAT: (u64, u64, u64) = (7, 2, 0);
/// How long the halt path waits for a QMP client to take its last output.
/// A client that is not reading stalls COM2 after a few hundred bytes:
/// QEMU's 16550 sends each byte with its own `write()` on the chardev
/// socket, and on a Unix socket every one-byte message costs most of a
/// kilobyte of the socket's send budget, so the socket reports full (and
/// QEMU stops taking bytes from the UART) long before the bytes add up.
const WRITE_OUT_NS: u64 = 2_000_000_000;
/// Output kept for a client that does not read, before events are dropped.
const OUTBOX_LIMIT: usize = 4 << 20;

/// QEMU allows 64 MiB and 2 Mi tokens per request; a small heap wants less.
const LIMITS: Limits = Limits {
    max_bytes: 1 << 20,
    max_tokens: 1 << 16,
    max_nesting: 64,
};

pub struct Monitor {
    /// `None`: no UART on COM2, QMP is off.
    uart: Option<Uart>,
    session: Session,
    commands: Dispatcher<Appliance>,
    ctx: Appliance,
    outbox: VecDeque<u8>,
    quit: bool,
}

pub fn timestamp() -> Timestamp {
    let (s, us) = crate::clock::wall_clock();
    Timestamp {
        seconds: s as i64,
        microseconds: us as i64,
    }
}

impl Monitor {
    pub fn new(ctx: Appliance) -> Self {
        let (major, minor, micro) = QEMU_COMPAT;
        let mut commands = Dispatcher::new();
        crate::disks_qmp::register(&mut commands);
        block::commands::register(&mut commands);
        block::export::register(&mut commands);
        crate::drive::register(&mut commands);
        // SAFETY: COM2 is the monitor's port; only this module drives it.
        let uart = unsafe { Uart::probe(COM2) };
        if uart.is_none() {
            log::warn!(
                "no UART on COM2: QMP is off (boot options configure the appliance, the ACPI power button stops it)"
            );
        }
        Self {
            uart,
            session: Session::new(VersionInfo::new(major, minor, micro)).with_limits(LIMITS),
            commands,
            ctx,
            outbox: VecDeque::new(),
            quit: false,
        }
    }

    /// Sends the greeting. A 16550 cannot see a client connect, so it goes
    /// out once, at boot (run QEMU's COM2 socket with `wait=on`).
    pub fn start(&mut self) {
        let greeting = self.session.greeting();
        self.queue(&greeting);
        self.flush_some();
    }

    /// Whether QMP is served (a UART is on COM2).
    pub fn present(&self) -> bool {
        self.uart.is_some()
    }

    fn queue(&mut self, bytes: &[u8]) {
        if self.uart.is_none() {
            return;
        }
        if self.outbox.len() + bytes.len() > OUTBOX_LIMIT {
            log::warn!(
                "QMP client is not reading: dropping {} bytes of output",
                bytes.len()
            );
            return;
        }
        self.outbox.extend(bytes);
    }

    fn flush_some(&mut self) -> bool {
        let Some(uart) = &mut self.uart else {
            return false;
        };
        let mut wrote = false;
        while !self.outbox.is_empty() {
            let (front, _) = self.outbox.as_slices();
            let n = uart.try_write(front);
            if n == 0 {
                break;
            }
            self.outbox.drain(..n);
            wrote = true;
        }
        wrote
    }

    /// Serves COM2: reads what arrived, runs complete requests, writes
    /// what the UART takes. Returns whether anything happened.
    pub fn poll(&mut self) -> bool {
        let Some(uart) = &mut self.uart else {
            return false;
        };
        let mut buf = [0u8; 512];
        let n = uart.read_available(&mut buf);
        if n > 0 && !self.quit {
            let action = self.session.feed(&buf[..n], &self.commands, &mut self.ctx);
            let out = self.session.take_output();
            self.queue(&out);
            if action == Action::Quit {
                self.quit = true;
            }
        }
        let wrote = self.flush_some();
        n > 0 || wrote
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
    /// exports), as they happen.
    pub fn flush_events(&mut self) {
        let mut events = Vec::new();
        self.ctx.drain_events(&mut events);
        for e in &events {
            self.session.emit(e);
        }
        if !events.is_empty() {
            let out = self.session.take_output();
            self.queue(&out);
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
    }

    /// Queues `SHUTDOWN` (after the `quit` reply, as QEMU does); a fatal
    /// error is announced first by `GUEST_PANICKED` with the action taken
    /// (QEMU's `-action panic=exit-failure`: `poweroff`).
    pub fn shutdown(&mut self, reason: crate::halt::Reason) {
        if reason == crate::halt::Reason::Fatal {
            let data = serde_json::json!({"action": "poweroff"});
            self.session
                .event("GUEST_PANICKED", Some(data), timestamp());
        }
        let data = serde_json::json!({"guest": reason.by_guest(), "reason": reason.as_str()});
        self.session.event("SHUTDOWN", Some(data), timestamp());
        let out = self.session.take_output();
        self.queue(&out);
    }

    /// Writes out everything still queued (events of the halt path
    /// included), waiting for the UART: the last thing before poweroff.
    /// A client that does not read gets at most [`WRITE_OUT_NS`] of waiting:
    /// the halt path must finish whatever the client does.
    pub fn write_out(&mut self) {
        self.flush_events();
        let start = crate::clock::monotonic_ns();
        while !self.outbox.is_empty() {
            if !self.flush_some() {
                crate::watchdog::check();
                if crate::clock::monotonic_ns().saturating_sub(start) > WRITE_OUT_NS {
                    log::warn!(
                        "QMP client is not reading: {} bytes of output dropped at halt",
                        self.outbox.len()
                    );
                    self.outbox.clear();
                    break;
                }
                core::hint::spin_loop();
            }
        }
    }
}
