//! The blockhaus image: boot → console → clocks → interrupts → heap → ACPI
//! → QMP monitor on COM2 → main loop; every exit goes through [`halt`].
#![no_std]
#![no_main]

extern crate alloc;

use alloc::rc::Rc;
use alloc::string::ToString;
use core::cell::RefCell;

mod app;
mod clock;
mod cmdline;
mod console;
mod disk_node;
mod disk_stats;
mod disks;
mod disks_debug;
mod disks_qmp;
mod drive;
mod fatal;
mod halt;
mod heap;
mod interrupts;
mod monitor;
mod monitor_ports;
mod net;
mod pci;
mod rng;
mod shutdown;
mod stack_depth;
mod storage;
mod watchdog;

use log::{LevelFilter, info, warn};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How often the ACPI power button is checked when its interrupt cannot
/// be routed.
const POWER_BUTTON_POLL_NS: u64 = 100_000_000;
/// After any activity, keep busy-polling this long before halting the CPU:
/// not at all. Every device the appliance waits for interrupts it, and a
/// vCPU that spins holds a host CPU the VMM needs for that very I/O (its
/// disk worker threads, slirp). Measured with `bench nbd` on a 2-CPU host
/// (TCG): with 20 ms of spinning a 4K read after an idle second took
/// 7.1–7.8 ms (the host woke an idle CPU for QEMU's disk thread), without
/// 1.3–1.6 ms; slirp reads went from 55–63 to 57–69 MB/s, the rest stayed
/// within the run-to-run noise (0.1 ms of spinning measured in between).
const BUSY_POLL_NS: u64 = 0;
/// ... except while QMP output waits for COM2's transmitter, which has no
/// interrupt the appliance uses: its FIFO is refilled as it empties for
/// this long after the last byte went out (then every
/// [`OUTPUT_RETRY_NS`]).
const OUTPUT_SPIN_NS: u64 = 20_000_000;
/// While QMP output waits for COM2's transmitter, retry this often.
const OUTPUT_RETRY_NS: u64 = 1_000_000;

#[unsafe(no_mangle)]
extern "Rust" fn kernel_main(info: &'static boot::BootInfo) -> ! {
    stack_depth::paint();
    clock::mark_boot();
    console::init(LevelFilter::Info);
    println!(
        "\nblockhaus {VERSION} — kernel-free storage appliance (booted by {}, {} memory regions)",
        info.protocol,
        info.regions().len()
    );
    println!("command line: \"{}\"", info.cmdline());
    let cal_source = clock::init();
    if info.protocol != "PVH" {
        halt::fatal("no PVH start info: cannot find the memory map");
    }
    interrupts::init();
    // SAFETY: interrupts are off; the PICs are remapped before anything
    // could deliver through them.
    unsafe { drivers::pic::remap_and_mask() };
    let heap = heap::init(info);
    info!(
        "TSC {} MHz ({}), LAPIC timer {} kHz; RAM {} MiB in {} heap regions; identity map to {} GiB",
        clock::tsc_hz() / 1_000_000,
        cal_source,
        clock::lapic_timer_hz() / 1000,
        heap.bytes >> 20,
        heap.regions,
        boot::paging::mapped_end() >> 30
    );
    if heap.regions == 0 {
        halt::fatal("no usable RAM for the heap in the memory map");
    }
    match halt::init(info.rsdp) {
        Ok(fadt) => info!(
            "ACPI: poweroff via {:?}; power button {:?}",
            fadt.poweroff,
            fadt.power_button()
        ),
        Err(e) => warn!("ACPI: {e}; poweroff will not work"),
    }
    if info.cmdline_truncated {
        warn!(
            "command line longer than {} bytes was truncated",
            boot::info::MAX_CMDLINE
        );
    }
    let mut config = cmdline::Config::default();
    if let Some(file) = info.config_file() {
        println!("{}: {} bytes", cmdline::CONFIG_FILE, file.len());
        if let Err(e) = cmdline::parse_file(file, &mut config) {
            log::error!("{e}");
            halt::fatal("bad blockhaus.conf");
        }
    }
    if let Err(e) = cmdline::parse(info.cmdline(), &mut config) {
        log::error!("{e}");
        halt::fatal("bad kernel command line");
    }
    if let Some(level) = config.log_level {
        console::set_level(level);
    }
    info!(
        "command line parsed: loglevel={}, test-fault={:?}, {} storage option(s)",
        log::max_level(),
        config.test_fault,
        config.options.len()
    );
    if let Some(fault) = config.test_fault {
        cmdline::trigger(fault);
    }

    let mut pci = pci::Pci::scan();
    let disks = Rc::new(RefCell::new(disks::Disks::probe(&mut pci)));
    let net = Rc::new(RefCell::new(net::Network::default()));
    let mut block = storage::new_block_layer(disks.clone(), net.clone());
    block.set_tls_creds_check(Rc::new(net::tls::check));
    for class in disk_node::classes(&disks) {
        block.register_driver(class);
    }
    match net::Network::probe(
        &mut pci,
        heap.bytes,
        config.ip.as_deref(),
        block.registry().clone(),
    ) {
        Ok(n) => *net.borrow_mut() = n,
        Err(e) => {
            log::error!("network: {e}");
            shutdown::halt_bad_config(&block);
        }
    }
    block.register_driver(block::nbd::client_node::class(net.borrow().nbd_links()));
    if config.test_fault == Some(cmdline::TestFault::PanicInNetPoll) {
        net.borrow_mut().panic_on_client();
    }
    let qmp_ports = monitor_ports::Ports::probe(&mut pci);
    rng::probe(&mut pci);
    // Every device is up: configuration space is not touched again.
    drop(pci);
    let mut app = app::Appliance::new(disks, block, net);
    // qemu-storage-daemon's options, in order, before the QMP greeting.
    if let Some(bdf) = &config.boot_disk {
        app.disks.borrow_mut().mark_boot_disk(bdf);
    }
    for ((name, value), origin) in config.options.iter().zip(&config.origins) {
        let value = value.as_deref().unwrap_or("");
        let at = if origin.is_empty() {
            alloc::string::String::new()
        } else {
            alloc::format!("{origin}: ")
        };
        let applied = match app.block.apply_boot_option(name, value) {
            Ok(false) => match drive::apply_boot_option(&app.block, name, value) {
                Ok(false) => block::export::apply_boot_option(&mut app, name, value),
                other => other,
            },
            other => other.map_err(|e| e.to_string()),
        };
        match applied {
            Ok(true) => info!("--{name} {value}: applied"),
            Ok(false) => {
                log::error!("{at}--{name}: option not supported");
                shutdown::halt_bad_config(&app.block);
            }
            Err(e) => {
                log::error!("{at}{e}");
                shutdown::halt_bad_config(&app.block);
            }
        }
    }
    if config.test_fault == Some(cmdline::TestFault::LeakNodeRef) {
        match app.block.registry().nodes().first() {
            Some(node) => {
                node.ref_();
                warn!("test fault: one reference to node '{}' leaked", node.name());
            }
            None => warn!("test fault: no node to leak a reference to"),
        }
    }
    let mut monitor = monitor::Monitor::new(app, qmp_ports);
    if config.test_fault == Some(cmdline::TestFault::PanicOnQmp) {
        monitor.add_test_panic_command();
    }
    if config.debug_commands {
        warn!("debug commands: QMP command x-blockhaus-disk-io added");
        monitor.add_debug_commands();
    }
    if monitor.on_com2() && !interrupts::route_com2() {
        interrupts::poll_without_interrupt(format_args!("COM2 (no I/O APIC)"));
    }
    let button_interrupts = interrupts::route_power_button();
    if halt::power_button().is_some() && !button_interrupts {
        warn!(
            "ACPI power button: no interrupt, polled every {} ms",
            POWER_BUTTON_POLL_NS / 1_000_000
        );
    }
    info!(
        "ready in {} µs: {}",
        clock::monotonic_ns() / 1000,
        monitor.transports()
    );
    monitor.start();
    fatal::register(&mut monitor);
    heap::report_at_ready();

    let mut last_activity = clock::monotonic_ns();
    let mut last_button_poll = 0;
    loop {
        interrupts::ack_intx();
        let mut busy = {
            let mut disks = monitor.appliance().disks.borrow_mut();
            // Requests in flight on a device that cannot interrupt: keep
            // polling rather than wait for the poll timer.
            disks.poll() || (interrupts::polled() && disks.in_flight() > 0)
        };
        busy |= storage::run(&monitor.appliance().block);
        busy |= monitor.appliance().net.borrow_mut().poll();
        busy |= monitor.poll();
        monitor.flush_events();
        let now = clock::monotonic_ns();
        // The power button is read when its interrupt came, or (without
        // one) ten times a second: every read is a VM exit.
        let mut halt_reason = monitor.halt_requested();
        let button = if button_interrupts {
            // Once at start: a press before the route was lost.
            interrupts::take_sci() || last_button_poll == 0
        } else {
            now.saturating_sub(last_button_poll) > POWER_BUTTON_POLL_NS
        };
        if halt_reason.is_none() && button {
            last_button_poll = now;
            halt_reason = halt::poll_power_button();
        }
        if let Some(reason) = halt_reason {
            fatal::halting();
            shutdown::halt_sequence(&mut monitor, reason, reason.source());
        }
        if busy {
            last_activity = now;
        } else if now.saturating_sub(last_activity)
            > if monitor.output_pending() {
                OUTPUT_SPIN_NS
            } else {
                BUSY_POLL_NS
            }
        {
            // Tickless idle: halt until a device, COM2 or the next deadline
            // wakes the CPU.
            let output = monitor.output_pending().then_some(now + OUTPUT_RETRY_NS);
            let app = monitor.appliance();
            let tcp = app.net.borrow_mut().poll_at();
            let deadline = [
                storage::next_deadline(&app.block),
                tcp,
                (!button_interrupts).then_some(last_button_poll + POWER_BUTTON_POLL_NS),
                output,
                interrupts::polled().then_some(now + interrupts::POLL_NS),
            ]
            .into_iter()
            .flatten()
            .min();
            interrupts::wait_until(deadline);
        } else {
            core::hint::spin_loop();
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    console::emergency(format_args!("\nPANIC: {info}\n"));
    fatal::stop("panic", true)
}
