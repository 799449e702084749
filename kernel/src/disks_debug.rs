//! `x-blockhaus-disk-io`, a debug command that runs I/O on a disk through
//! its driver, beside the block graph: the tests of the virtio drivers
//! (`tests/tests/virtio.rs`) use it to reach the devices with no node in
//! between. It exists only with `blockhaus.debug-commands=on` on the
//! kernel command line.

use crate::app::Appliance;
use crate::disks::{Disks, Ticket};
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;
use block::qmp::{Args, Dispatcher, QmpError};
use drivers::pci::Address;
use drivers::virtio::{Error, Op};
use serde_json::{Value, json};

/// Largest range `x-blockhaus-disk-io` moves in one command.
const DEBUG_IO_MAX: u64 = 64 << 20;
/// Most requests `x-blockhaus-disk-io` makes in one command.
const DEBUG_IO_MAX_REQUESTS: u64 = 1 << 15;

/// Fisher-Yates with a fixed xorshift seed: the same "random" order on
/// every run, so benchmark figures compare.
fn shuffle<T>(items: &mut [T]) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..items.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        items.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

/// 64-bit FNV-1a, so a test can compare what was read with the file.
fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `x-blockhaus-disk-io`: the disk (`serial`, or `pci-addr` of a
/// virtio-blk, or `pci-addr`, `target` and `lun` of a SCSI LUN), `op`
/// (read, write, flush, discard, write-zeroes; or flush-all, which needs
/// no disk and returns `flushed`, one entry per disk flushed), `offset`, `length`, `pattern` (the byte written, or
/// expected by a read), `chunk` (bytes per request, all in flight at
/// once; default: the whole range), `random` (issue the chunks in a fixed
/// pseudo-random order), `fua`, `may-unmap`. Returns the
/// requests made, the most in flight at once, the time taken (`ns`, from
/// the first submit to the last completion), and for reads the FNV-1a
/// checksum (over the chunks in the order issued) and the lowest offset
/// that differs from `pattern`.
fn disk_io(app: &mut Appliance, args: &Args<'_>) -> Result<Value, QmpError> {
    let serial = args.opt_str("serial")?;
    let pci_addr = args.opt_str("pci-addr")?;
    let target = args.opt_u64("target")?;
    let lun = args.opt_u64("lun")?;
    let op = args.enum_str(
        "op",
        &[
            "read",
            "write",
            "flush",
            "discard",
            "write-zeroes",
            "flush-all",
        ],
    )?;
    let offset = args.opt_u64("offset")?.unwrap_or(0);
    let length = args.opt_u64("length")?.unwrap_or(0);
    let pattern = match args.opt_u64("pattern")? {
        Some(p) if p > 255 => return Err(QmpError::invalid_parameter_value("pattern", "uint8")),
        p => p.map(|p| p as u8),
    };
    let chunk = args.opt_u64("chunk")?.unwrap_or(length).max(1);
    let fua = args.opt_bool("fua")?.unwrap_or(false);
    let may_unmap = args.opt_bool("may-unmap")?.unwrap_or(false);
    let random = args.opt_bool("random")?.unwrap_or(false);
    args.check_known(&[
        "serial",
        "pci-addr",
        "target",
        "lun",
        "op",
        "offset",
        "length",
        "pattern",
        "chunk",
        "fua",
        "may-unmap",
        "random",
    ])?;
    if length > DEBUG_IO_MAX {
        return Err(QmpError::generic(format!(
            "length {length} is above this command's limit of {DEBUG_IO_MAX}"
        )));
    }
    if length.div_ceil(chunk) > DEBUG_IO_MAX_REQUESTS {
        return Err(QmpError::generic(format!(
            "{} requests of {chunk} bytes are above this command's limit of {DEBUG_IO_MAX_REQUESTS}",
            length.div_ceil(chunk)
        )));
    }
    if op == "write" && pattern.is_none() {
        return Err(QmpError::missing_parameter("pattern"));
    }
    let mut disks = app.disks.borrow_mut();
    let disks = &mut *disks;
    // Take in hot-plug events that arrived since the last main-loop pass.
    disks.poll();
    if op == "flush-all" {
        // What the halt path does: every writable disk with a cache.
        let flushed: Vec<Value> = disks
            .flush_all()
            .into_iter()
            .map(|(serial, r)| match r {
                Ok(()) => json!({"serial": serial}),
                Err(e) => json!({"serial": serial, "error": format!("{e}")}),
            })
            .collect();
        return Ok(json!({ "flushed": flushed }));
    }
    let index = find_disk(disks, serial, pci_addr, target, lun)?;

    let mut pieces: Vec<(u64, u64)> = Vec::new();
    if op == "flush" {
        pieces.push((0, 0));
    } else {
        let mut at = offset;
        while at < offset.saturating_add(length) {
            let n = chunk.min(offset + length - at);
            pieces.push((at, n));
            at += n;
        }
    }
    if random {
        shuffle(&mut pieces);
    }
    let started = crate::clock::monotonic_ns();
    let mut tickets = Vec::with_capacity(pieces.len());
    let fail = |e: Error| QmpError::generic(format!("{op} failed: {e}"));
    for &(at, n) in &pieces {
        let req = match op {
            "read" => Op::Read {
                offset: at,
                buf: vec![0; n as usize],
            },
            "write" => Op::Write {
                offset: at,
                buf: vec![pattern.unwrap_or(0); n as usize],
                fua,
            },
            "flush" => Op::Flush,
            "discard" => Op::Discard { offset: at, len: n },
            _ => Op::WriteZeroes {
                offset: at,
                len: n,
                may_unmap,
            },
        };
        match disks.submit(index, req) {
            Ok(t) => tickets.push((at, t)),
            Err(e) => {
                // Let what was already submitted finish before failing.
                let _ = disks.wait_all(&ids(&tickets));
                return Err(fail(e));
            }
        }
    }
    let (done, max_in_flight) = disks.wait_all(&ids(&tickets)).map_err(QmpError::generic)?;
    let elapsed_ns = crate::clock::monotonic_ns().saturating_sub(started);
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut mismatch = None;
    let mut first_error = None;
    for ((at, _), c) in tickets.iter().zip(done) {
        if let Err(e) = c.result {
            first_error.get_or_insert(e);
            continue;
        }
        if op == "read" {
            hash = fnv1a(hash, &c.buf);
            if let Some(p) = pattern
                && let Some(i) = c.buf.iter().position(|&b| b != p)
            {
                let off = at + i as u64;
                mismatch = Some(mismatch.map_or(off, |m: u64| m.min(off)));
            }
        }
    }
    if let Some(e) = first_error {
        return Err(fail(e));
    }
    let mut ret = json!({
        "requests": tickets.len(),
        "max-in-flight": max_in_flight,
        "bytes": length,
        "ns": elapsed_ns,
    });
    if op == "read" {
        ret["checksum"] = json!(format!("{hash:016x}"));
        ret["mismatch"] = json!(mismatch);
    }
    Ok(ret)
}

/// The disk named by `serial`, or by `pci-addr` (a virtio-blk) with
/// `target` and `lun` (a SCSI LUN on the controller there).
fn find_disk(
    disks: &Disks,
    serial: Option<&str>,
    pci_addr: Option<&str>,
    target: Option<u64>,
    lun: Option<u64>,
) -> Result<usize, QmpError> {
    if let Some(serial) = serial {
        return disks
            .find(serial)
            .ok_or_else(|| QmpError::device_not_found(format!("No disk with serial '{serial}'")));
    }
    let Some(text) = pci_addr else {
        return Err(QmpError::missing_parameter("serial"));
    };
    let pci = Address::parse(text)
        .ok_or_else(|| QmpError::invalid_parameter_value("pci-addr", "a PCI address BB:DD.F"))?;
    match (target, lun) {
        (None, None) => disks
            .find_blk(pci)
            .ok_or_else(|| QmpError::device_not_found(format!("No virtio-blk disk at {pci}"))),
        (t, l) => {
            let t = u8::try_from(t.unwrap_or(0))
                .map_err(|_| QmpError::invalid_parameter_value("target", "uint8"))?;
            let l = u16::try_from(l.unwrap_or(0))
                .map_err(|_| QmpError::invalid_parameter_value("lun", "uint16"))?;
            disks.find_scsi(Some(pci), t, l).ok_or_else(|| {
                QmpError::device_not_found(format!("No SCSI disk at {pci} target {t} lun {l}"))
            })
        }
    }
}

/// The tickets of `(offset, ticket)` pairs.
fn ids(tickets: &[(u64, Ticket)]) -> Vec<Ticket> {
    tickets.iter().map(|(_, t)| *t).collect()
}

/// Registers `x-blockhaus-disk-io`.
pub fn register(commands: &mut Dispatcher<Appliance>) {
    commands.register(
        "x-blockhaus-disk-io",
        block::qmp::Signature::new(
            "serial?:str, pci-addr?:str, target?:uint64, lun?:uint64, \
             op:(read|write|flush|discard|write-zeroes|flush-all), offset?:uint64, \
             length?:uint64, pattern?:uint64, chunk?:uint64, fua?:bool, may-unmap?:bool, \
             random?:bool",
            "any",
        ),
        disk_io,
    );
}
