//! A fatal error inside the appliance (a panic, or a CPU exception on the
//! normal stack) stops it through the same halt sequence as `quit` and the
//! power button whenever it can: QMP clients get `GUEST_PANICKED` and
//! `SHUTDOWN` (reason `guest-panic`), the exports close, every job is
//! cancelled, every node closes by its refcount and flushes, every device
//! flushes; then the failure exit (QEMU exits 33) instead of ACPI S5.
//!
//! The sequence runs on the stack of the code that failed, which never
//! resumes (panics abort). It is skipped, and the appliance reports and
//! stops at once, when it cannot be trusted to finish:
//! - a second fatal error while the sequence (or a normal halt) runs;
//! - a fault before the main loop started (nothing to close yet);
//! - a double fault or machine check, or a stack overflow;
//! - the heap's or the console's lock held by the code that failed.
//!
//! A watchdog bounds it besides ([`crate::watchdog`]): started here, it
//! stops the appliance when the sequence waits too long.

use core::ptr::null_mut;
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use crate::halt::Reason;
use crate::monitor::Monitor;

static MONITOR: AtomicPtr<Monitor> = AtomicPtr::new(null_mut());
static ENTERED: AtomicBool = AtomicBool::new(false);

/// The main loop's monitor, for the fatal path. The main loop keeps using
/// its own `&mut`; see the SAFETY note in [`stop`].
pub fn register(monitor: &mut Monitor) {
    MONITOR.store(monitor, Ordering::SeqCst);
}

/// A normal halt has begun: a fatal error from now on stops at once.
pub fn halting() {
    ENTERED.store(true, Ordering::SeqCst);
    MONITOR.store(null_mut(), Ordering::SeqCst);
}

/// A fatal error: the halt sequence if `attempt` and it can be trusted,
/// then the failure exit. Never returns.
pub fn stop(detail: &str, attempt: bool) -> ! {
    if ENTERED.swap(true, Ordering::SeqCst) {
        crate::console::emergency(format_args!(
            "fatal: a fatal error during the halt sequence; stopping without finishing it\n"
        ));
        crate::halt::fatal(detail);
    }
    let monitor = MONITOR.swap(null_mut(), Ordering::SeqCst);
    let skip = if monitor.is_null() {
        Some("no block layer running yet")
    } else if !attempt {
        Some("the machine state cannot be trusted")
    } else if crate::heap::is_locked() {
        Some("the heap was locked by the failed code")
    } else {
        None
    };
    if let Some(why) = skip {
        crate::console::emergency(format_args!("fatal: no halt sequence ({why})\n"));
        crate::halt::fatal(detail);
    }
    // The failed code may have held the console's lock; it never resumes.
    crate::console::break_lock();
    crate::console::emergency(format_args!(
        "fatal: running the halt sequence (exports, jobs, close-all, device flush)\n"
    ));
    crate::watchdog::start();
    // SAFETY: `monitor` points to the main loop's `Monitor`, which lives
    // until the appliance stops (the main loop never returns). The code
    // that failed may hold a `&mut` to it further up this stack, but a
    // panic aborts and an exception handler never returns, so that code
    // never runs again: this is the only reference used from now on.
    // State it left half-changed is what the sequence has to cope with:
    // a `RefCell` it left borrowed makes the sequence panic (a second
    // fatal error, handled above) or wait (bounded by the watchdog).
    let monitor = unsafe { &mut *monitor };
    crate::shutdown::halt_sequence(monitor, Reason::Fatal, detail)
}
