//! The fatal halt sequence's watchdog: [`check`] runs wherever the
//! sequence waits (the block layer's platform poll and the QMP write-out)
//! and stops the appliance once [`SEQUENCE_LIMIT_NS`] have passed since
//! [`start`] — for instance when the failure left the disks' state
//! borrowed, so no request can complete. It sits below the monitor and the
//! block layer's platform, which call it, and above nothing but the clock,
//! the console and the last-resort halt.

use core::sync::atomic::{AtomicU64, Ordering};

/// How long the fatal halt sequence may take.
pub const SEQUENCE_LIMIT_NS: u64 = 10_000_000_000;

/// When the fatal sequence started (monotonic ns + 1); 0 while none runs.
static STARTED: AtomicU64 = AtomicU64::new(0);

/// The fatal sequence starts now: from [`SEQUENCE_LIMIT_NS`] on, [`check`]
/// stops the appliance.
pub fn start() {
    STARTED.store(crate::clock::monotonic_ns() + 1, Ordering::SeqCst);
}

/// Stops the appliance once the fatal sequence has run too long.
pub fn check() {
    let started = STARTED.load(Ordering::Relaxed);
    if started == 0 {
        return;
    }
    let now = crate::clock::monotonic_ns();
    if now.saturating_sub(started - 1) > SEQUENCE_LIMIT_NS {
        STARTED.store(0, Ordering::Relaxed);
        crate::console::emergency(format_args!(
            "fatal: the halt sequence did not finish in {} s; stopping without it\n",
            SEQUENCE_LIMIT_NS / 1_000_000_000
        ));
        crate::halt::fatal("fatal error; halt sequence timed out");
    }
}
