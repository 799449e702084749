//! The halt sequence every stop runs (`quit`, the power button, a fatal
//! error, a bad boot option): `SHUTDOWN`, close the exports, the block
//! layer's close-all, flush every device, then [`crate::halt`]'s report and
//! poweroff. It sits below the main loop and [`crate::fatal`], and above
//! the monitor and the appliance state it closes.

use crate::{app, clock, halt, monitor, println};

/// The halt sequence of `quit`, the power button and a fatal error:
/// `SHUTDOWN` (after `GUEST_PANICKED` for a fatal error), close every
/// export, close-all (cancel jobs, eject backends, close every node),
/// flush every device, then the halt report and poweroff (or the failure
/// exit, also when close-all left a node open).
pub fn halt_sequence(monitor: &mut monitor::Monitor, reason: halt::Reason, detail: &str) -> ! {
    let start = clock::monotonic_ns();
    let written = monitor.appliance().disks.borrow().bytes_written();
    monitor.shutdown(reason);
    let exports = monitor.appliance().net.borrow_mut().close_exports();
    monitor.write_out();
    let closed = close_all(&monitor.appliance().block);
    // Events of the cancelled jobs, then nothing more.
    monitor.write_out();
    flush_devices(&monitor.appliance().disks);
    let written = monitor.appliance().disks.borrow().bytes_written() - written;
    let elapsed = clock::monotonic_ns().saturating_sub(start);
    println!(
        "=== halt sequence done ===\nexports closed: {}\nbytes written to disks while halting: {written}\nhalt sequence took {}.{:03} ms",
        if exports.is_empty() {
            alloc::string::String::from("none")
        } else {
            exports.join(", ")
        },
        elapsed / 1_000_000,
        (elapsed / 1000) % 1000
    );
    if closed {
        halt::halt(reason, detail)
    } else {
        // QEMU asserts here; a supervisor must see that a node was left
        // open, so the exit is the failure one (SHUTDOWN went out first).
        halt::halt_failed(reason, detail, "close-all left nodes open")
    }
}

/// The block layer's close-all (QEMU's `bdrv_close_all`): cancel jobs,
/// eject every backend, drop monitor references, close every node by its
/// refcount; the report goes to the console.
fn close_all(block: &block::layer::BlockLayer) -> bool {
    match block.close_all() {
        Ok(Ok(report)) => {
            println!("=== block layer closed ===\n{report}");
            true
        }
        Ok(Err(e)) => {
            println!("=== block layer close-all FAILED ===\n{}", e.report);
            false
        }
        Err(e) => {
            println!("=== block layer close-all FAILED: {} ===", e.desc);
            false
        }
    }
}

/// Flushes every writable disk's cache (the nodes flushed theirs when they
/// closed; this also covers disks written outside the graph) and reports
/// each device.
fn flush_devices(disks: &app::SharedDisks) {
    for (serial, result) in disks.borrow_mut().flush_all() {
        match result {
            Ok(()) => println!("device '{serial}': flushed"),
            Err(e) => println!("device '{serial}': FLUSH FAILED: {e}"),
        }
    }
}

/// A bad boot option: close what was already opened, then stop with the
/// failure exit instead of running half-configured.
pub fn halt_bad_config(block: &block::layer::BlockLayer) -> ! {
    close_all(block);
    halt::halt(halt::Reason::BadConfig, "bad boot option")
}
