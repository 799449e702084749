//! `human-monitor-command` with `qemu-io` (QEMU: `hmp_qemu_io` and
//! `qemu-io-cmds.c`): the hook QEMU's iotests use to touch data.
//!
//! `qemu-io DEVICE "COMMAND"` runs one qemu-io command on a named backend,
//! or on a node through a temporary anonymous backend. Supported: `read
//! [-qCv] [-P pattern] off len`, `write [-fquz] [-P pattern] off len`,
//! `discard [-q] off len`, `flush`, `map`. Output is qemu-io's, with the
//! monitor's `\r\n` line ends. As in QEMU, a command extends a named
//! backend's permissions as it needs (write → WRITE) and they stay extended.
//!
//! A command returns the text qemu-io prints: `Ok` when it ran, `Err` when
//! it stopped early (a bad argument, a failed permission change); both go
//! to the monitor as they are.

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use serde_json::Value;

use crate::graph::backend::{Backend, BackendOptions};
use crate::graph::permission::Perm;
use crate::io::ReqFlags;
use crate::layer::BlockLayer;
use crate::options::parse_size;
use crate::qmp::{Args, QmpError};

/// Largest request qemu-io accepts here (QEMU allows up to 2 GiB; the
/// appliance's heap is smaller).
pub const MAX_LEN: u64 = 16 << 20;

const READ_USAGE: &str = "read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset";
const WRITE_USAGE: &str =
    "write [-bcCfnquz] [-P pattern] off len -- writes a number of bytes at a specified offset";
const DISCARD_USAGE: &str =
    "discard [-Cq] off len -- discards a number of bytes at a specified offset";

/// `human-monitor-command`.
pub fn human_monitor_command(bl: &BlockLayer, args: &Args<'_>) -> Result<Value, QmpError> {
    let line = args.str("command-line")?;
    let _cpu = args.opt_i64("cpu-index")?;
    args.check_known(&["command-line", "cpu-index"])?;
    Ok(Value::String(hmp(bl, line)))
}

/// Runs one HMP command line and returns its output.
pub fn hmp(bl: &BlockLayer, line: &str) -> String {
    let words = breakline(line);
    let out = match words.first().map(String::as_str) {
        None => String::new(),
        Some("qemu-io") => {
            let rest: Vec<&str> = words[1..]
                .iter()
                .map(String::as_str)
                .filter(|w| *w != "-d")
                .collect();
            match rest.as_slice() {
                [] => "qemu-io: block device name expected\n".into(),
                [_] => "qemu-io: string expected\n".into(),
                [device, command] => qemu_io(bl, device, command),
                _ => "qemu-io: extraneous characters at the end of line\n".into(),
            }
        }
        Some(cmd) => format!("unknown command: '{cmd}'\n"),
    };
    out.replace('\n', "\r\n")
}

/// qemu-io's `breakline`: words split at blanks, `"…"` quotes a word.
fn breakline(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if any || !cur.is_empty() {
                    words.push(core::mem::take(&mut cur));
                    any = false;
                }
            }
            c => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// Runs qemu-io `command` on `device` (a backend name or a node-name).
pub fn qemu_io(bl: &BlockLayer, device: &str, command: &str) -> String {
    let reg = bl.registry();
    let (blk, temporary) = match reg.find_backend(device) {
        Some(b) => (b, false),
        None => {
            let node = match reg.lookup(None, Some(device)) {
                Ok(n) => n,
                Err(e) => return format!("Error: {e}\n"),
            };
            let b = match reg.new_backend(BackendOptions::default(), Perm::NONE, Perm::ALL) {
                Ok(b) => b,
                Err(e) => return format!("Error: {e}\n"),
            };
            if let Err(e) = b.insert(&node) {
                reg.forget_backend(&b);
                return format!("Error: {e}\n");
            }
            (b, true)
        }
    };
    let out = run(bl, &blk, command);
    if temporary {
        let b = blk.clone();
        if let Err(e) = bl.wait(async move { b.delete().await }) {
            return format!("{out}{e}\n");
        }
    }
    out
}

/// QEMU's `cvtstr`: `64 KiB`, `1.500 KiB`, `512 bytes`.
pub fn cvtstr(value: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        (1_152_921_504_606_846_976.0, " EiB"),
        (1_125_899_906_842_624.0, " PiB"),
        (1_099_511_627_776.0, " TiB"),
        (1_073_741_824.0, " GiB"),
        (1_048_576.0, " MiB"),
        (1024.0, " KiB"),
    ];
    let (s, suffix) = match UNITS.iter().find(|(u, _)| value >= *u) {
        Some((u, sfx)) => (format!("{:.3}", value / u), *sfx),
        None => (format!("{value:.6}"), " bytes"),
    };
    match s.find(".000") {
        Some(i) => format!("{}{suffix}", &s[..i]),
        None => format!("{s}{suffix}"),
    }
}

/// qemu-io's `print_report`.
fn report(op: &str, elapsed_ns: u64, offset: u64, count: u64, total: u64, ops: u64) -> String {
    let secs = elapsed_ns as f64 / 1e9;
    let frac = (elapsed_ns % 1_000_000_000) as f64 / 1e9;
    let rate = |v: f64| if secs > 0.0 { v / secs } else { f64::INFINITY };
    format!(
        "{op} {total}/{count} bytes at offset {offset}\n{}, {ops} ops; {frac:05.2} sec ({}/sec and {:.4} ops/sec)\n",
        cvtstr(total as f64),
        cvtstr(rate(total as f64)),
        rate(ops as f64)
    )
}

/// Options and positional arguments of one command.
struct Parsed {
    flags: Vec<char>,
    pattern: Option<u8>,
    pos: Vec<String>,
}

/// Why a command's options could not be parsed.
#[derive(Debug)]
enum OptError {
    /// An unknown option, or one missing its value: the command prints its
    /// usage (qemu-io's `getopt` returning `?`).
    Usage,
    /// A bad `-P` pattern, with qemu-io's text.
    Pattern(String),
}

/// The options of a command whose usage line is `usage_text`; a usage
/// error prints it.
fn options(
    words: &[String],
    allowed: &str,
    with_value: &str,
    usage_text: &str,
) -> Result<Parsed, String> {
    getopt(words, allowed, with_value).map_err(|e| match e {
        OptError::Usage => usage(usage_text),
        OptError::Pattern(text) => text,
    })
}

fn getopt(words: &[String], allowed: &str, with_value: &str) -> Result<Parsed, OptError> {
    let mut p = Parsed {
        flags: Vec::new(),
        pattern: None,
        pos: Vec::new(),
    };
    let mut i = 1;
    while i < words.len() {
        let w = &words[i];
        if w.len() > 1 && w.starts_with('-') && p.pos.is_empty() {
            let mut chars = w[1..].chars();
            while let Some(c) = chars.next() {
                if with_value.contains(c) {
                    let rest: String = chars.collect();
                    let v = if rest.is_empty() {
                        i += 1;
                        words.get(i).cloned().ok_or(OptError::Usage)?
                    } else {
                        rest
                    };
                    if c == 'P' {
                        p.pattern = Some(parse_pattern(&v).map_err(OptError::Pattern)?);
                    }
                    break;
                } else if allowed.contains(c) {
                    p.flags.push(c);
                } else {
                    return Err(OptError::Usage);
                }
            }
        } else {
            p.pos.push(w.clone());
        }
        i += 1;
    }
    Ok(p)
}

fn parse_pattern(s: &str) -> Result<u8, String> {
    let v = crate::options::parse_int(s).or_else(|| s.parse().ok());
    match v {
        Some(v) if v <= 255 => Ok(v as u8),
        _ => Err(format!("{s} is not a valid pattern byte\n")),
    }
}

fn cvtnum(s: &str) -> Result<u64, String> {
    parse_size(s).ok_or_else(|| {
        format!("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {s}\n")
    })
}

fn off_len(p: &Parsed) -> Result<(u64, u64), String> {
    let offset = cvtnum(&p.pos[0])?;
    let len = cvtnum(&p.pos[1])?;
    if len > MAX_LEN {
        return Err(format!(
            "length cannot exceed {MAX_LEN}, given {}\n",
            p.pos[1]
        ));
    }
    Ok((offset, len))
}

fn usage(u: &str) -> String {
    format!("{u}\n")
}

fn arg_count(cmd: &str, words: &[String], min: usize, max: Option<usize>) -> Result<(), String> {
    let n = words.len() - 1;
    match max {
        None if n < min => Err(format!(
            "bad argument count {n} to {cmd}, expected at least {min} arguments\n"
        )),
        Some(m) if (n < min || n > m) && min == m => Err(format!(
            "bad argument count {n} to {cmd}, expected {min} arguments\n"
        )),
        _ => Ok(()),
    }
}

fn extend_perm(blk: &Backend, p: Perm) -> Result<(), String> {
    let (perm, shared) = blk.perm();
    if perm.contains(p) {
        return Ok(());
    }
    blk.set_perm(perm | p, shared).map_err(|e| format!("{e}\n"))
}

fn run(bl: &BlockLayer, blk: &Rc<Backend>, command: &str) -> String {
    let words = breakline(command);
    let Some(cmd) = words.first() else {
        return String::new();
    };
    let r = match cmd.as_str() {
        "read" | "r" => read(bl, blk, &words),
        "write" | "w" => write(bl, blk, &words),
        "discard" | "d" => discard(bl, blk, &words),
        "flush" | "f" => arg_count("flush", &words, 0, Some(0)).and_then(|()| {
            let b = blk.clone();
            match bl.wait(async move { b.flush().await }) {
                Ok(Ok(())) => Ok(String::new()),
                Ok(Err(e)) => Ok(format!("flush failed: {e}\n")),
                Err(e) => Err(format!("{e}\n")),
            }
        }),
        "map" => arg_count("map", &words, 0, Some(0)).and_then(|()| map(bl, blk)),
        other => Err(format!("command \"{other}\" not found\n")),
    };
    r.unwrap_or_else(|e| e)
}

fn now(bl: &BlockLayer) -> u64 {
    bl.registry().clock().now_ns()
}

fn read(bl: &BlockLayer, blk: &Rc<Backend>, words: &[String]) -> Result<String, String> {
    arg_count("read", words, 2, None)?;
    let p = options(words, "abCqv", "Psl", READ_USAGE)?;
    if p.pos.len() != 2 {
        return Err(usage(READ_USAGE));
    }
    let (offset, len) = off_len(&p)?;
    let t0 = now(bl);
    let b = blk.clone();
    let data = match bl
        .wait(async move { b.read(offset, len as usize).await })
        .map_err(|e| format!("{e}\n"))?
    {
        Ok(d) => d,
        Err(e) => return Ok(format!("read failed: {e}\n")),
    };
    let elapsed = now(bl) - t0;
    let mut out = String::new();
    if let Some(pat) = p.pattern
        && data.iter().any(|b| *b != pat)
    {
        out.push_str(&format!(
            "Pattern verification failed at offset {offset}, {len} bytes\n"
        ));
    }
    if !p.flags.contains(&'q') {
        out.push_str(&report("read", elapsed, offset, len, len, 1));
    }
    Ok(out)
}

fn write(bl: &BlockLayer, blk: &Rc<Backend>, words: &[String]) -> Result<String, String> {
    arg_count("write", words, 2, None)?;
    let p = options(words, "bcCfnquz", "P", WRITE_USAGE)?;
    let zero = p.flags.contains(&'z');
    if zero && p.pattern.is_some() {
        return Err("-z and -P cannot be specified at the same time\n".into());
    }
    if p.flags.contains(&'u') && !zero {
        return Err("-u requires -z to be specified\n".into());
    }
    if p.flags.iter().any(|f| matches!(f, 'b' | 'c' | 'n')) {
        return Err("this option is not supported by blockhaus's qemu-io\n".into());
    }
    if p.pos.len() != 2 {
        return Err(usage(WRITE_USAGE));
    }
    let (offset, len) = off_len(&p)?;
    extend_perm(blk, Perm::WRITE)?;
    let mut flags = ReqFlags::NONE;
    if p.flags.contains(&'f') {
        flags = flags | ReqFlags::FUA;
    }
    if p.flags.contains(&'u') {
        flags = flags | ReqFlags::MAY_UNMAP;
    }
    let t0 = now(bl);
    let b = blk.clone();
    let pattern = p.pattern.unwrap_or(0xcd);
    let r = bl
        .wait(async move {
            if zero {
                b.write_zeroes(offset, len, flags).await
            } else {
                b.write(offset, vec![pattern; len as usize], flags).await
            }
        })
        .map_err(|e| format!("{e}\n"))?;
    if let Err(e) = r {
        return Ok(format!("write failed: {e}\n"));
    }
    let elapsed = now(bl) - t0;
    Ok(if p.flags.contains(&'q') {
        String::new()
    } else {
        report("wrote", elapsed, offset, len, len, 1)
    })
}

fn discard(bl: &BlockLayer, blk: &Rc<Backend>, words: &[String]) -> Result<String, String> {
    arg_count("discard", words, 2, None)?;
    let p = options(words, "Cq", "", DISCARD_USAGE)?;
    if p.pos.len() != 2 {
        return Err(usage(DISCARD_USAGE));
    }
    let (offset, len) = off_len(&p)?;
    extend_perm(blk, Perm::WRITE)?;
    let t0 = now(bl);
    let b = blk.clone();
    if let Err(e) = bl
        .wait(async move { b.discard(offset, len).await })
        .map_err(|e| format!("{e}\n"))?
    {
        return Ok(format!("discard failed: {e}\n"));
    }
    let elapsed = now(bl) - t0;
    Ok(if p.flags.contains(&'q') {
        String::new()
    } else {
        report("discard", elapsed, offset, len, len, 1)
    })
}

fn map(bl: &BlockLayer, blk: &Rc<Backend>) -> Result<String, String> {
    let mut bytes = match blk.get_length() {
        Ok(l) => l,
        Err(e) => return Ok(format!("Failed to query image length: {e}\n")),
    };
    let b = blk.clone();
    let extents = bl
        .wait(async move {
            // QEMU's map_is_allocated: merge extents of equal allocation.
            let mut out = Vec::new();
            let mut offset = 0;
            while bytes > 0 {
                let st = b.block_status(offset, bytes).await?;
                if st.len == 0 {
                    return Err(crate::io::IoError::Eio);
                }
                match out.last_mut() {
                    Some((_, n, a)) if *a == st.allocated => *n += st.len,
                    _ => out.push((offset, st.len, st.allocated)),
                }
                offset += st.len;
                bytes -= st.len;
            }
            Ok(out)
        })
        .map_err(|e| format!("{e}\n"))?;
    let extents = match extents {
        Ok(e) => e,
        Err(e) => return Ok(format!("Failed to get allocation status: {e}\n")),
    };
    let mut out = String::new();
    for (offset, n, allocated) in extents {
        out.push_str(&format!(
            "{} (0x{n:x}) bytes {} at offset {} (0x{offset:x})\n",
            cvtstr(n as f64),
            if allocated {
                "    allocated"
            } else {
                "not allocated"
            },
            cvtstr(offset as f64)
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvtstr_is_qemus() {
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr(512.0), "512 bytes");
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(1_073_741_824.0), "1 GiB");
        assert_eq!(cvtstr(f64::INFINITY), "inf EiB");
    }

    #[test]
    fn breakline_quotes() {
        assert_eq!(
            breakline(r#"qemu-io drv "write -P 0x5a 0 4k""#),
            ["qemu-io", "drv", "write -P 0x5a 0 4k"]
        );
        assert_eq!(breakline("  read  0 512 "), ["read", "0", "512"]);
    }

    #[test]
    fn report_format() {
        assert_eq!(
            report("read", 500_000_000, 0, 512, 512, 1),
            "read 512/512 bytes at offset 0\n512 bytes, 1 ops; 00.50 sec (1 KiB/sec and 2.0000 ops/sec)\n"
        );
    }
}
