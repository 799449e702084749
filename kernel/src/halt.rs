//! The one way out: [`halt`]. `quit`, the ACPI power button and a fatal
//! error all end here, after the halt sequence
//! ([`crate::shutdown::halt_sequence`]; for a fatal error see
//! [`crate::fatal`]); it logs the halt
//! report and powers off through ACPI S5 (QEMU exits 0), or, for a
//! failure, through the `isa-debug-exit` device so tests see a distinct
//! exit code.

use core::sync::atomic::{AtomicBool, Ordering};
use spin::Once;

/// `isa-debug-exit` at 0xf4: QEMU exits with `(code << 1) | 1`, so 0x10
/// gives exit status 33 for a fatal error.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
pub const FAILURE_CODE: u32 = 0x10;

static FADT: Once<Result<drivers::acpi::Fadt, drivers::acpi::Error>> = Once::new();
static HALTING: AtomicBool = AtomicBool::new(false);

/// Why the appliance stops (QMP `SHUTDOWN` event reasons).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// QMP `quit`.
    HostQmpQuit,
    /// The ACPI power button (QEMU `system_powerdown`, `virsh shutdown`).
    GuestShutdown,
    /// A fatal error inside the appliance.
    Fatal,
    /// A boot option was refused.
    BadConfig,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::HostQmpQuit => "host-qmp-quit",
            Reason::GuestShutdown => "guest-shutdown",
            Reason::Fatal => "guest-panic",
            Reason::BadConfig => "host-error",
        }
    }

    /// Where the halt came from, for the report.
    pub fn source(self) -> &'static str {
        match self {
            Reason::HostQmpQuit => "requested over QMP",
            Reason::GuestShutdown => "ACPI power button",
            Reason::Fatal => "fatal error",
            Reason::BadConfig => "configuration error",
        }
    }

    /// Whether the guest itself decided to stop (QMP `SHUTDOWN`'s `guest`).
    pub fn by_guest(self) -> bool {
        matches!(self, Reason::GuestShutdown | Reason::Fatal)
    }

    /// Whether the appliance stops because something went wrong: it then
    /// takes the failure exit.
    pub fn is_failure(self) -> bool {
        matches!(self, Reason::Fatal | Reason::BadConfig)
    }
}

/// Reads the FADT once at boot so poweroff needs no parsing at halt time,
/// and arms the power button.
pub fn init(rsdp: Option<u64>) -> &'static Result<drivers::acpi::Fadt, drivers::acpi::Error> {
    let fadt = FADT.call_once(|| drivers::acpi::parse(&drivers::acpi::IdentityMapped, rsdp));
    if let Some(button) = power_button() {
        // SAFETY: the registers come from this machine's FADT.
        unsafe { button.enable() };
    }
    fadt
}

/// The machine's power button, if its ACPI tables name one.
pub fn power_button() -> Option<drivers::acpi::PowerButton> {
    FADT.get()?.as_ref().ok()?.power_button()
}

/// The global system interrupt the power button raises: the FADT's SCI
/// (PM1 power button, pc and q35), or QEMU's Generic Event Device's
/// interrupt on hardware-reduced microvm (GSI 9, `GED_MMIO_IRQ`; its
/// DSDT `_CRS` says so too, but the FADT does not).
pub fn power_button_gsi() -> Option<u8> {
    let fadt = FADT.get()?.as_ref().ok()?;
    match fadt.power_button()? {
        drivers::acpi::PowerButton::Pm1 { .. } => u8::try_from(fadt.sci_irq).ok(),
        drivers::acpi::PowerButton::Ged { .. } => Some(9),
    }
}

/// Polls the power button: `Some(GuestShutdown)` once it was pressed.
pub fn poll_power_button() -> Option<Reason> {
    let button = power_button()?;
    // SAFETY: the registers come from this machine's FADT.
    unsafe { button.pressed() }.then_some(Reason::GuestShutdown)
}

/// Stops the appliance: report, then poweroff (the failure exit for a
/// failure reason). Never returns.
pub fn halt(reason: Reason, detail: &str) -> ! {
    stop(reason, detail, None)
}

/// Stops the appliance with the failure exit whatever the reason: the halt
/// sequence itself went wrong (`why`).
pub fn halt_failed(reason: Reason, detail: &str, why: &str) -> ! {
    stop(reason, detail, Some(why))
}

fn stop(reason: Reason, detail: &str, failed: Option<&str>) -> ! {
    let failure = reason.is_failure() || failed.is_some();
    x86_64::instructions::interrupts::disable();
    let first = !HALTING.swap(true, Ordering::SeqCst);
    drivers::lapic::stop_timer();
    let uptime = crate::clock::monotonic_ns();
    let (free, used) = if first { crate::heap::usage() } else { (0, 0) };
    let (stack_used, stack_size) = crate::stack_depth::usage();
    let irqs = crate::interrupts::counts();
    let report = |out: fn(core::fmt::Arguments<'_>)| {
        out(format_args!(
            "\n=== blockhaus halt report ===\nreason: {} ({})\nuptime: {}.{:03} s\nheap: {} KiB used, {} KiB free\nboot stack: {} KiB of {} KiB used at the deepest\nidle: {} halts; interrupts: timer {}, disk {}, net {}, virtio-serial {}, COM2 {}, SCI {}, INTx {}\n",
            reason.as_str(),
            detail,
            uptime / 1_000_000_000,
            (uptime / 1_000_000) % 1000,
            used / 1024,
            free / 1024,
            stack_used.div_ceil(1024),
            stack_size / 1024,
            irqs.halts,
            irqs.timer,
            irqs.disk,
            irqs.net,
            irqs.console,
            irqs.uart,
            irqs.sci,
            irqs.intx,
        ))
    };
    if first && !failure {
        report(crate::console::print);
    } else {
        report(crate::console::emergency);
    }
    if failure {
        crate::console::emergency(format_args!(
            "exit: failure (isa-debug-exit code {FAILURE_CODE:#x}){}{}\n",
            if failed.is_some() { ": " } else { "" },
            failed.unwrap_or("")
        ));
        // SAFETY: the isa-debug-exit port; writing ends QEMU. Without the
        // device the write is ignored and we fall through to poweroff.
        unsafe { drivers::port::outl(DEBUG_EXIT_PORT, FAILURE_CODE) };
    }
    match FADT.get() {
        Some(Ok(fadt)) => {
            crate::console::emergency(format_args!("poweroff: ACPI S5 ({:?})\n", fadt.poweroff));
            // SAFETY: the report is out; nothing is left to flush.
            unsafe { fadt.poweroff.execute() };
            // The hypervisor acts on the write asynchronously: give it a second.
            let start = crate::clock::monotonic_ns();
            while crate::clock::monotonic_ns().saturating_sub(start) < 1_000_000_000 {
                core::hint::spin_loop();
            }
            crate::console::emergency(format_args!(
                "poweroff: ACPI S5 did not turn the machine off\n"
            ));
        }
        Some(Err(e)) => crate::console::emergency(format_args!("poweroff: no ACPI S5: {e}\n")),
        None => crate::console::emergency(format_args!("poweroff: ACPI not initialised\n")),
    }
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// A fatal error: report and take the failure exit.
pub fn fatal(detail: &str) -> ! {
    halt(Reason::Fatal, detail)
}
