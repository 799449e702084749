//! The halt sequence every stop runs (`quit`, the power button, a fatal
//! error, a bad boot option): `SHUTDOWN`, close the exports, the block
//! layer's close-all, flush every device, then [`crate::halt`]'s report and
//! poweroff. It sits below the main loop and [`crate::fatal`], and above
//! the monitor and the appliance state it closes.

use crate::{app, clock, halt, monitor, println};

/// How long requests of `nbd` nodes already sent may take once the halt
/// began; then they fail with `EIO` and close-all goes on. QEMU has no
/// such bound (its close-all waits for the server). 5 s: a server that
/// still answers does within it even for the largest request (32 MiB)
/// over a slow user-mode network, and it is well inside a supervisor's
/// stop timeout (systemd's 90 s, the test harness's 60 s).
const NBD_HALT_BOUND_NS: u64 = 5_000_000_000;

/// The halt sequence of `quit`, the power button and a fatal error:
/// `SHUTDOWN` (after `GUEST_PANICKED` for a fatal error), close every
/// export, close-all (cancel jobs, eject backends, close every node),
/// flush every device, then the halt report and poweroff (or the failure
/// exit, also when close-all left a node open).
pub fn halt_sequence(monitor: &mut monitor::Monitor, reason: halt::Reason, detail: &str) -> ! {
    let start = clock::monotonic_ns();
    // On the fatal path the failed code may hold the disks or the network
    // (a `RefCell` borrowed further up this stack, never released): each
    // step skips what it cannot borrow, with a note, and the rest runs.
    let written = bytes_written(&monitor.appliance().disks);
    monitor.shutdown(reason);
    let exports = close_exports(monitor.appliance());
    monitor.write_out();
    // QEMU's bdrv_cancel_in_flight on every node: `nbd` requests waiting
    // for a reconnect fail now and no attempt is made any more; those on
    // the wire get NBD_HALT_BOUND_NS.
    let block = &monitor.appliance().block;
    for n in block.registry().nodes() {
        n.driver().cancel_in_flight(&n);
    }
    if let Ok(mut net) = monitor.appliance().net.try_borrow_mut() {
        net.bound_nbd_requests(NBD_HALT_BOUND_NS);
    }
    let closed = close_all(&monitor.appliance().block);
    // The closed `nbd` nodes' NBD_CMD_DISC goes out (a dead server
    // cannot hold the halt beyond the bound).
    if let Ok(mut net) = monitor.appliance().net.try_borrow_mut() {
        net.close_nbd_clients(500_000_000);
    }
    // Events of the cancelled jobs, then nothing more.
    monitor.write_out();
    flush_devices(&monitor.appliance().disks);
    let written = bytes_written(&monitor.appliance().disks).saturating_sub(written);
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

/// Bytes written to the disks so far (0 if the disks are held).
fn bytes_written(disks: &app::SharedDisks) -> u64 {
    disks.try_borrow().map_or(0, |d| d.bytes_written())
}

/// Closes every export: through the network (which also tells clients
/// the server is going away), or, when the failed code holds the network,
/// through the export table alone (its clients are then left as they are).
fn close_exports(app: &app::Appliance) -> alloc::vec::Vec<alloc::string::String> {
    if let Ok(mut net) = app.net.try_borrow_mut() {
        return net.close_exports();
    }
    println!("network held by the failed code: exports closed without it");
    app.exports
        .as_ref()
        .map_or_else(alloc::vec::Vec::new, |e| e.close_all())
}

/// Flushes every writable disk's cache (the nodes flushed theirs when they
/// closed; this also covers disks written outside the graph) and reports
/// each device.
fn flush_devices(disks: &app::SharedDisks) {
    let Ok(mut disks) = disks.try_borrow_mut() else {
        println!("disks held by the failed code: device flush skipped");
        return;
    };
    for (serial, result) in disks.flush_all() {
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
