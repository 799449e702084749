//! The block layer inside the kernel: its clock (wall-clock nanoseconds, so
//! QMP event timestamps are real time), and the [`Platform`] through which
//! synchronous callers (QMP handlers, the halt path) wait for I/O, as QEMU's
//! monitor waits in a nested `AIO_WAIT_WHILE`.

use crate::app::SharedDisks;
use crate::net::Network;
use alloc::rc::Rc;
use block::exec::{Executor, Platform};
use block::layer::BlockLayer;
use block::timer::Clock;
use core::cell::RefCell;

/// Wall-clock nanoseconds since the Unix epoch: monotonic (the RTC is read
/// once at boot, the TSC does the rest).
pub struct KernelClock;

impl Clock for KernelClock {
    fn now_ns(&self) -> u64 {
        crate::clock::wall_clock_ns()
    }
}

/// Polls what can complete a request while a synchronous caller waits.
pub struct KernelPlatform {
    disks: SharedDisks,
    net: Rc<RefCell<Network>>,
}

impl Platform for KernelPlatform {
    fn poll(&self, exec: &Executor, _may_halt: bool) -> bool {
        crate::watchdog::check();
        exec.timers().fire_expired(crate::clock::wall_clock_ns());
        // Each is skipped if the waiting command itself is using it.
        if let Ok(mut disks) = self.disks.try_borrow_mut() {
            disks.poll();
        }
        if let Ok(mut net) = self.net.try_borrow_mut() {
            net.poll();
        }
        // A waiting QMP command busy-polls: its I/O completes in micro- to
        // milliseconds, and halting would add a timer tick to every request.
        core::hint::spin_loop();
        true
    }
}

/// A block layer with the built-in drivers, on a fresh executor, whose
/// waits also poll the disks and the network.
pub fn new_block_layer(disks: SharedDisks, net: Rc<RefCell<Network>>) -> BlockLayer {
    BlockLayer::new(
        Executor::new(),
        Rc::new(KernelClock),
        Rc::new(KernelPlatform { disks, net }),
    )
}

/// The block layer's next timer deadline, in monotonic nanoseconds (its
/// timers run on the wall clock).
pub fn next_deadline(bl: &BlockLayer) -> Option<u64> {
    let deadline = bl.executor().timers().next_deadline()?;
    let left = deadline.saturating_sub(crate::clock::wall_clock_ns());
    Some(crate::clock::monotonic_ns().saturating_add(left))
}

/// Runs ready tasks and expired timers; returns whether anything ran.
pub fn run(bl: &BlockLayer) -> bool {
    let exec = bl.executor();
    let fired = exec.timers().fire_expired(crate::clock::wall_clock_ns());
    let had_ready = exec.has_ready();
    exec.run_ready();
    had_ready || fired > 0
}
