//! The configuration: `blockhaus.conf` (from the image's ESP, or `-initrd`
//! under `-kernel`) first, then the kernel command line (`-append`), which
//! adds to it. Both hold blockhaus's own `blockhaus.*`, `ip=` and
//! `loglevel=` settings and `--option value` pairs in qemu-storage-daemon's
//! syntax, kept in order for the block layer.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use block::cmdline::Token;
use log::LevelFilter;

/// A fault to trigger after boot, for the failure-path tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestFault {
    PageFault,
    InvalidOpcode,
    DivideByZero,
    StackOverflow,
    Panic,
    /// Adds the QMP command `x-blockhaus-panic`, which panics inside the
    /// monitor: a fatal error at a moment the test chooses.
    PanicOnQmp,
    /// Leaks one reference to the first node once the boot options are
    /// applied, so close-all finds it open at halt.
    LeakNodeRef,
    /// Panics inside the network poll (holding the network's `RefCell`)
    /// when the first NBD client connects: the halt sequence must still
    /// close the exports, close every node and flush.
    PanicInNetPoll,
}

#[derive(Debug, Default)]
pub struct Config {
    pub log_level: Option<LevelFilter>,
    pub test_fault: Option<TestFault>,
    /// `blockhaus.debug-commands=on`: adds the QMP command
    /// `x-blockhaus-disk-io`, which runs I/O on a disk beside the graph.
    pub debug_commands: bool,
    /// `ip=ADDR/PREFIX[,gw=GW]` for the network interface.
    pub ip: Option<String>,
    /// qemu-storage-daemon options in order, e.g. `("blockdev", "driver=...")`.
    pub options: Vec<(String, Option<String>)>,
    /// Where each of `options` came from, for error messages
    /// (`blockhaus.conf line 3`; empty for the command line).
    pub origins: Vec<String>,
    /// `blockhaus.boot-disk=BB:DD.F`: the disk the firmware loaded us from
    /// (set by the UEFI loader); claiming it needs `"x-boot-disk": true`.
    pub boot_disk: Option<String>,
}

/// The name of the configuration file on the ESP.
pub const CONFIG_FILE: &str = "blockhaus.conf";

/// Parses `blockhaus.conf`: one setting or option per line, e.g.
/// `--blockdev driver=virtio-blk,node-name=d0,serial=disk0` or `ip=...`;
/// empty lines and lines starting with `#` are skipped. An error names the
/// line: `blockhaus.conf line N: ...`.
pub fn parse_file(bytes: &[u8], cfg: &mut Config) -> Result<(), String> {
    let text = core::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        alloc::format!("{CONFIG_FILE} line {line}: not UTF-8")
    })?;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let origin = alloc::format!("{CONFIG_FILE} line {}", i + 1);
        parse_into(line, &origin, cfg).map_err(|e| alloc::format!("{origin}: {e}"))?;
    }
    Ok(())
}

/// Parses the command line with [`block::cmdline::tokenize`] (quotes and
/// JSON values with spaces work); blockhaus's own words are applied here,
/// `--options` are kept in order for the block layer. Any unknown or
/// malformed item is an error that names it: the appliance then halts
/// instead of running half-configured.
pub fn parse(cmdline: &str, cfg: &mut Config) -> Result<(), String> {
    parse_into(cmdline, "", cfg)
}

fn parse_into(text: &str, origin: &str, cfg: &mut Config) -> Result<(), String> {
    let tokens = block::cmdline::tokenize(text).map_err(|e| e.to_string())?;
    for token in tokens {
        let word = match token {
            Token::Option { name, value } => {
                cfg.options.push((name, value));
                cfg.origins.push(origin.to_string());
                continue;
            }
            Token::Word(w) => w,
        };
        let (key, value) = word.split_once('=').unwrap_or((&word, ""));
        match key {
            "loglevel" | "blockhaus.loglevel" => {
                cfg.log_level = Some(match value {
                    "off" => LevelFilter::Off,
                    "error" => LevelFilter::Error,
                    "warn" => LevelFilter::Warn,
                    "info" => LevelFilter::Info,
                    "debug" => LevelFilter::Debug,
                    "trace" => LevelFilter::Trace,
                    other => {
                        return Err(alloc::format!(
                            "invalid loglevel '{other}' (off|error|warn|info|debug|trace)"
                        ));
                    }
                })
            }
            "ip" => cfg.ip = Some(value.to_string()),
            "blockhaus.boot-disk" => cfg.boot_disk = Some(value.to_string()),
            "blockhaus.debug-commands" => {
                cfg.debug_commands = match value {
                    "on" => true,
                    "off" => false,
                    other => {
                        return Err(alloc::format!(
                            "invalid blockhaus.debug-commands '{other}' (on|off)"
                        ));
                    }
                }
            }
            "blockhaus.test-fault" => {
                cfg.test_fault = Some(match value {
                    "page-fault" => TestFault::PageFault,
                    "invalid-opcode" => TestFault::InvalidOpcode,
                    "divide-by-zero" => TestFault::DivideByZero,
                    "stack-overflow" => TestFault::StackOverflow,
                    "panic" => TestFault::Panic,
                    "panic-on-qmp" => TestFault::PanicOnQmp,
                    "leak-node-ref" => TestFault::LeakNodeRef,
                    "panic-in-net-poll" => TestFault::PanicInNetPoll,
                    other => {
                        return Err(alloc::format!(
                            "invalid blockhaus.test-fault '{other}' (page-fault|invalid-opcode|divide-by-zero|stack-overflow|panic|panic-on-qmp|leak-node-ref|panic-in-net-poll)"
                        ));
                    }
                })
            }
            _ => {
                return Err(alloc::format!(
                    "unrecognized kernel command-line item '{word}'"
                ));
            }
        }
    }
    Ok(())
}

/// Triggers the configured fault.
pub fn trigger(fault: TestFault) {
    let triggering = || log::warn!("triggering test fault {fault:?}");
    match fault {
        TestFault::PanicOnQmp => {
            log::warn!("test fault: QMP command x-blockhaus-panic added");
        }
        // Done by main once the graph is built.
        TestFault::LeakNodeRef => {}
        TestFault::PanicInNetPoll => {
            log::warn!("test fault: the network poll panics when the first NBD client connects");
        }
        TestFault::PageFault => {
            triggering();
            // SAFETY: a deliberate fault on an unmapped, canonical address;
            // the exception handler reports it and exits.
            unsafe { core::ptr::read_volatile(0x4000_dead_0000u64 as *const u64) };
        }
        TestFault::InvalidOpcode => {
            triggering();
            // SAFETY: a deliberate #UD; the handler reports it and exits.
            unsafe { core::arch::asm!("ud2") }
        }
        TestFault::DivideByZero => {
            triggering();
            // SAFETY: a deliberate #DE; the handler reports it and exits.
            unsafe {
                core::arch::asm!("xor edx, edx", "xor eax, eax", "xor ecx, ecx", "div ecx", out("eax") _, out("edx") _, out("ecx") _)
            }
        }
        TestFault::StackOverflow => {
            triggering();
            recurse(0);
        }
        TestFault::Panic => {
            triggering();
            panic!("test panic requested on the command line")
        }
    }
}

#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let buf = [depth; 64];
    core::hint::black_box(&buf);
    recurse(core::hint::black_box(depth + 1)) + buf[(depth % 64) as usize]
}
