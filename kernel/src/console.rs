//! The console on COM1: `log` records with level and a monotonic timestamp,
//! the lines of enabled trace points (`block::trace`), and a lock-free path
//! for fault and panic reports.

use core::fmt::Write;
use drivers::uart::{COM1, Uart};
use log::{Level, LevelFilter, Log, Metadata, Record};
use spin::Mutex;

static CONSOLE: Mutex<Option<Uart>> = Mutex::new(None);

struct Logger;
static LOGGER: Logger = Logger;

/// Sets up COM1 and installs the logger.
pub fn init(level: LevelFilter) {
    // SAFETY: COM1 is the console; only this module drives it.
    *CONSOLE.lock() = Some(unsafe { Uart::new(COM1) });
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
    block::trace::set_sink(trace_line);
}

/// An enabled trace point's line, whatever the log level, in the shape of
/// QEMU's `log` trace backend without its thread id:
/// `SECONDS.MICROS:name arguments`.
fn trace_line(name: &'static str, args: core::fmt::Arguments<'_>) {
    let ns = crate::clock::monotonic_ns();
    print(format_args!(
        "{}.{:06}:{name} {args}\n",
        ns / 1_000_000_000,
        (ns % 1_000_000_000) / 1000
    ));
}

pub fn set_level(level: LevelFilter) {
    log::set_max_level(level);
}

/// Writes formatted text to the console (no record header).
pub fn print(args: core::fmt::Arguments<'_>) {
    if let Some(uart) = CONSOLE.lock().as_mut() {
        let _ = uart.write_fmt(args);
    }
}

/// Frees the console's lock if the code that failed held it: the fatal
/// path's last resort (that code never resumes).
pub fn break_lock() {
    if CONSOLE.is_locked() {
        // SAFETY: called only on the fatal path, whose caller's stack never
        // resumes: nothing else can be using the console.
        unsafe { CONSOLE.force_unlock() };
    }
}

/// Writes to COM1 without taking the console lock: for exception and panic
/// reports, which may interrupt a holder of the lock.
pub fn emergency(args: core::fmt::Arguments<'_>) {
    // SAFETY: the failure path is the last code to run; COM1 was initialised.
    let mut uart = unsafe { Uart::steal(COM1) };
    let _ = uart.write_fmt(args);
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ns = crate::clock::monotonic_ns();
        let level = match record.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        print(format_args!(
            "[{:5}.{:06}] {} {}: {}\n",
            ns / 1_000_000_000,
            (ns % 1_000_000_000) / 1000,
            level,
            record.target(),
            record.args()
        ));
    }

    fn flush(&self) {}
}
