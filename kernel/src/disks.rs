//! The appliance's disks (issue 4): PCI discovery of virtio-blk and
//! virtio-scsi controllers, their drivers, and the QMP commands about them.
//!
//! [`Disks::probe`] scans PCI once at boot, brings up every virtio-blk
//! device and every virtio-scsi controller (and the LUNs it reports), and
//! logs each disk. Every disk gets an index; I/O goes through
//! [`Disks::submit`] (a [`Ticket`] back), completions are collected by
//! [`Disks::poll`] (the main loop calls it every iteration) and picked up
//! with [`Disks::take`], or awaited with [`Disks::poll_completion`] (its
//! waker is woken by `poll`). The block graph's protocol nodes sit on
//! this API.
//!
//! Hot-plug: a SCSI LUN plugged in later is scanned and listed when the
//! controller reports it; one unplugged is left out of `x-query-devices`
//! and its requests fail ("the LUN was removed").
//!
//! QMP:
//! - `x-query-devices`: every disk present, claimed or not: `serial`,
//!   `transport` (`virtio-blk`, `virtio-scsi`), `pci-address` (`BB:DD.F`
//!   of the device or its controller), `target`/`lun`/`model` (SCSI only),
//!   `size`, `block-size`, `physical-block-size`, `read-only`,
//!   `write-cache`, `claimed-by` (when a node holds it), and `limits`
//!   (`max-transfer`, `max-segment`, `max-segments`, `max-discard`,
//!   `discard-alignment`, `max-write-zeroes`, `optimal-transfer`,
//!   `queue-size`; bytes, 0 = not supported).
//! - `x-blockhaus-disk-io` (debug, for tests until the block graph is
//!   wired): runs one operation on a disk (by serial or address) through
//!   the driver, split into `chunk`-sized requests all in flight at once,
//!   and waits.

use crate::app::Appliance;
use crate::pci::{OpenError, Pci};
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use block::qmp::{Args, Dispatcher, QmpError};
use core::task::{Context, Poll, Waker};
use drivers::pci::Address;
use drivers::virtio::blk::VirtioBlk;
use drivers::virtio::scsi::VirtioScsi;
use drivers::virtio::scsi::events::Event as ScsiEvent;
use drivers::virtio::{Completion, DiskInfo, Error, Op, RequestId};
use log::{info, warn};
use serde_json::{Value, json};

/// virtio-blk and virtio-scsi: transitional and modern PCI device IDs.
const BLK_IDS: [u16; 2] = [0x1001, 0x1042];
const SCSI_IDS: [u16; 2] = [0x1004, 0x1048];

enum Driver {
    Blk(VirtioBlk),
    Scsi(VirtioScsi),
}

/// How a disk is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    VirtioBlk,
    VirtioScsi { target: u8, lun: u16 },
}

/// One disk found at boot.
pub struct Disk {
    pub info: DiskInfo,
    pub transport: Transport,
    /// The PCI function of the device (or of the SCSI controller).
    pub pci: Address,
    /// The node that holds the disk (a disk is claimed by at most one).
    pub claimed_by: Option<String>,
    /// False once the disk was hot-unplugged (a SCSI LUN).
    pub present: bool,
    controller: usize,
    /// LUN index within a SCSI controller.
    lun: usize,
}

/// A submitted request: which controller, which request id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket {
    controller: usize,
    id: RequestId,
}

/// Every disk found at boot, claimed or not.
#[derive(Default)]
pub struct Disks {
    /// Each controller's PCI address and driver.
    controllers: Vec<(Address, Driver)>,
    disks: Vec<Disk>,
    completed: BTreeMap<Ticket, Completion>,
    /// Futures waiting for a ticket ([`Disks::poll_completion`]).
    wakers: BTreeMap<Ticket, Waker>,
    scratch: Vec<Completion>,
    /// Bytes sent to the disks in write requests (write-zeroes count their
    /// length), since boot.
    bytes_written: u64,
}

impl Disks {
    /// Brings up every virtio-blk device and virtio-scsi controller that
    /// the boot-time PCI scan found.
    pub fn probe(pci: &mut Pci) -> Self {
        let mut me = Self::default();
        for f in pci.virtio(&[BLK_IDS, SCSI_IDS].concat()) {
            let blk = BLK_IDS.contains(&f.device_id);
            let transport = match pci.open_virtio(&f) {
                Ok(t) => t,
                Err(e @ OpenError::AboveIdentityMap { .. }) => {
                    warn!("{}: {e}: skipped", f.address);
                    continue;
                }
                Err(e) => {
                    warn!("{}: {e}", f.address);
                    continue;
                }
            };
            let driver = if blk {
                VirtioBlk::new(transport).map(Driver::Blk)
            } else {
                VirtioScsi::new(transport).map(Driver::Scsi)
            };
            match driver {
                Ok(d) => me.add(f.address, d),
                Err(e) => warn!(
                    "{} virtio-{}: {e}",
                    f.address,
                    if blk { "blk" } else { "scsi" }
                ),
            }
        }
        if me.disks.is_empty() {
            info!("no disks found");
        }
        me
    }

    fn add(&mut self, pci: Address, driver: Driver) {
        let controller = self.controllers.len();
        match &driver {
            Driver::Blk(b) => self.disks.push(Disk {
                info: b.info().clone(),
                transport: Transport::VirtioBlk,
                pci,
                claimed_by: None,
                present: true,
                controller,
                lun: 0,
            }),
            Driver::Scsi(s) => {
                info!(
                    "{pci} virtio-scsi: max_target {}, max_lun {}, {} LUN(s)",
                    s.max_target,
                    s.max_lun,
                    s.luns().len()
                );
                for (i, l) in s.luns().iter().enumerate() {
                    self.disks.push(Disk {
                        info: l.info.clone(),
                        transport: Transport::VirtioScsi {
                            target: l.target,
                            lun: l.lun,
                        },
                        pci,
                        claimed_by: None,
                        present: true,
                        controller,
                        lun: i,
                    });
                }
            }
        }
        self.controllers.push((pci, driver));
        for d in self.disks.iter().filter(|d| d.controller == controller) {
            log_disk(d);
        }
    }

    /// Every disk, in discovery order (its index is its handle).
    pub fn list(&self) -> &[Disk] {
        &self.disks
    }

    /// The disk with `serial`.
    pub fn find(&self, serial: &str) -> Option<usize> {
        let matching = |present: bool| {
            self.disks
                .iter()
                .position(|d| d.info.serial == serial && d.present == present)
        };
        matching(true).or_else(|| matching(false))
    }

    /// The virtio-blk disk at PCI address `pci`.
    pub fn find_blk(&self, pci: Address) -> Option<usize> {
        self.disks
            .iter()
            .position(|d| d.pci == pci && d.transport == Transport::VirtioBlk)
    }

    /// The SCSI LUN `target`:`lun`, on the controller at `pci` (any
    /// controller when `None`, if only one has such a LUN).
    pub fn find_scsi(&self, pci: Option<Address>, target: u8, lun: u16) -> Option<usize> {
        let mut matches = self.disks.iter().enumerate().filter(|(_, d)| {
            d.transport == (Transport::VirtioScsi { target, lun }) && pci.is_none_or(|p| p == d.pci)
        });
        match (matches.next(), matches.next()) {
            (Some((i, _)), None) => Some(i),
            _ => None,
        }
    }

    /// Claims disk `index` for `owner` (a node name). A disk has at most one
    /// owner; the error names the current one.
    pub fn claim(&mut self, index: usize, owner: &str) -> Result<(), String> {
        let disk = self.disks.get_mut(index).ok_or("no such disk")?;
        match &disk.claimed_by {
            Some(other) => Err(format!(
                "Disk '{}' is already in use by node '{other}'",
                disk.info.serial
            )),
            None => {
                disk.claimed_by = Some(owner.into());
                Ok(())
            }
        }
    }

    /// Gives disk `index` back (its node closed).
    pub fn release(&mut self, index: usize) {
        if let Some(d) = self.disks.get_mut(index) {
            d.claimed_by = None;
        }
    }

    /// Queues `op` on disk `index`.
    pub fn submit(&mut self, index: usize, op: Op) -> Result<Ticket, Error> {
        let disk = self.disks.get(index).ok_or(Error::Setup("no such disk"))?;
        let (controller, lun) = (disk.controller, disk.lun);
        let bytes = match &op {
            Op::Write { buf, .. } => buf.len() as u64,
            Op::WriteZeroes { len, .. } => *len,
            _ => 0,
        };
        let id = match &mut self.controllers[controller].1 {
            Driver::Blk(b) => b.submit(op)?,
            Driver::Scsi(s) => s.submit(lun, op)?,
        };
        self.bytes_written += bytes;
        Ok(Ticket { controller, id })
    }

    /// Bytes sent to the disks in write requests since boot.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// The completion of `ticket`, once [`Disks::poll`] has seen it.
    pub fn take(&mut self, ticket: Ticket) -> Option<Completion> {
        self.completed.remove(&ticket)
    }

    /// For a request's future: the completion if it is there, else the
    /// waker is kept and woken when [`Disks::poll`] sees the completion.
    pub fn poll_completion(&mut self, ticket: Ticket, cx: &mut Context<'_>) -> Poll<Completion> {
        match self.completed.remove(&ticket) {
            Some(c) => {
                self.wakers.remove(&ticket);
                Poll::Ready(c)
            }
            None => {
                self.wakers.insert(ticket, cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Device requests in flight on all controllers.
    pub fn in_flight(&self) -> usize {
        self.controllers
            .iter()
            .map(|(_, c)| match c {
                Driver::Blk(b) => b.in_flight(),
                Driver::Scsi(s) => s.in_flight(),
            })
            .sum()
    }

    /// Flushes every writable disk with a write cache and waits (the halt
    /// path: nothing acknowledged is lost). Returns each disk's serial and
    /// outcome.
    pub fn flush_all(&mut self) -> Vec<(String, Result<(), Error>)> {
        let writable: Vec<usize> = (0..self.disks.len())
            .filter(|&i| {
                let d = &self.disks[i];
                d.present && d.info.flush && !d.info.read_only
            })
            .collect();
        let targets: Vec<(usize, Result<Ticket, Error>)> = writable
            .into_iter()
            .map(|i| (i, self.submit(i, Op::Flush)))
            .collect();
        let tickets: Vec<(u64, Ticket)> = targets
            .iter()
            .filter_map(|(_, t)| t.as_ref().ok().map(|t| (0, *t)))
            .collect();
        // A timeout leaves the results short: those disks report EIO.
        let results: Vec<Result<(), Error>> = wait(self, &tickets)
            .map(|(done, _)| done.into_iter().map(|c| c.result).collect())
            .unwrap_or_default();
        let mut done = results.into_iter();
        targets
            .into_iter()
            .map(|(i, t)| {
                let result = match t {
                    Ok(_) => done.next().unwrap_or(Err(Error::Io)),
                    Err(e) => Err(e),
                };
                (self.disks[i].info.serial.clone(), result)
            })
            .collect()
    }

    /// Polls device completion rings; returns whether anything completed.
    pub fn poll(&mut self) -> bool {
        let mut progress = false;
        for (i, (pci, c)) in self.controllers.iter_mut().enumerate() {
            progress |= match c {
                Driver::Blk(b) => b.poll(&mut self.scratch),
                Driver::Scsi(s) => {
                    let p = s.poll(&mut self.scratch);
                    hotplug(&mut self.disks, i, *pci, s);
                    p
                }
            };
            for done in self.scratch.drain(..) {
                let ticket = Ticket {
                    controller: i,
                    id: done.id,
                };
                if let Some(w) = self.wakers.remove(&ticket) {
                    w.wake();
                }
                self.completed.insert(ticket, done);
            }
        }
        progress
    }
}

/// Answers a SCSI controller's hot-plug events: a LUN plugged in is
/// scanned and listed (or listed again), one unplugged is marked absent.
fn hotplug(disks: &mut Vec<Disk>, controller: usize, pci: Address, s: &mut VirtioScsi) {
    for event in s.take_events() {
        match event {
            ScsiEvent::Added { target, lun } => match s.rescan(target, lun) {
                Ok(Some(index)) => {
                    let info = s.luns()[index].info.clone();
                    let known = disks
                        .iter_mut()
                        .find(|d| d.controller == controller && d.lun == index);
                    let disk = match known {
                        Some(d) => {
                            d.info = info;
                            d.present = true;
                            d
                        }
                        None => {
                            disks.push(Disk {
                                info,
                                transport: Transport::VirtioScsi { target, lun },
                                pci,
                                claimed_by: None,
                                present: true,
                                controller,
                                lun: index,
                            });
                            let last = disks.len() - 1;
                            &mut disks[last]
                        }
                    };
                    info!("hot-plugged:");
                    log_disk(disk);
                }
                Ok(None) => {}
                Err(e) => {
                    warn!("{pci} virtio-scsi {target}:{lun}: hot-plugged but not usable: {e}")
                }
            },
            ScsiEvent::Removed { target, lun } => {
                if let Some(index) = s.remove(target, lun)
                    && let Some(d) = disks
                        .iter_mut()
                        .find(|d| d.controller == controller && d.lun == index)
                {
                    d.present = false;
                    info!(
                        "disk '{}': {pci} virtio-scsi {target}:{lun} was unplugged",
                        d.info.serial
                    );
                }
            }
            ScsiEvent::Missed => warn!("{pci} virtio-scsi: hot-plug events were lost"),
            ScsiEvent::Other(..) => {}
        }
    }
}

fn log_disk(d: &Disk) {
    let i = &d.info;
    let l = &i.limits;
    let place = match d.transport {
        Transport::VirtioBlk => format!("{} virtio-blk", d.pci),
        Transport::VirtioScsi { target, lun } => {
            format!("{} virtio-scsi {target}:{lun} {}", d.pci, i.model)
        }
    };
    info!(
        "disk '{}': {place}, {} bytes, block {}/{}{}{}; max transfer {}, discard {}, write-zeroes {}, queue {}",
        i.serial,
        i.capacity,
        i.block_size,
        i.physical_block_size,
        if i.read_only { ", read-only" } else { "" },
        if i.flush { ", write cache" } else { "" },
        l.max_transfer,
        l.max_discard,
        l.max_write_zeroes,
        l.queue_size
    );
}

fn disk_json(d: &Disk) -> Value {
    let i = &d.info;
    let l = &i.limits;
    let mut v = json!({
        "serial": i.serial,
        "transport": match d.transport {
            Transport::VirtioBlk => "virtio-blk",
            Transport::VirtioScsi { .. } => "virtio-scsi",
        },
        "pci-address": format!("{}", d.pci),
        "size": i.capacity,
        "block-size": i.block_size,
        "physical-block-size": i.physical_block_size,
        "read-only": i.read_only,
        "write-cache": i.flush,
        "limits": {
            "max-transfer": l.max_transfer,
            "max-segment": l.max_segment,
            "max-segments": l.max_segments,
            "max-discard": l.max_discard,
            "discard-alignment": l.discard_alignment,
            "max-write-zeroes": l.max_write_zeroes,
            "optimal-transfer": l.optimal_transfer,
            "queue-size": l.queue_size,
        },
    });
    if let Some(owner) = &d.claimed_by {
        v["claimed-by"] = json!(owner);
    }
    if let Transport::VirtioScsi { target, lun } = d.transport {
        v["target"] = json!(target);
        v["lun"] = json!(lun);
        v["model"] = json!(i.model);
    }
    v
}

/// `x-query-devices`: every disk found, claimed or not.
fn query_devices(app: &mut Appliance, args: &Args<'_>) -> Result<Value, QmpError> {
    args.check_known(&[])?;
    let mut disks = app.disks.borrow_mut();
    disks.poll();
    Ok(Value::Array(
        disks
            .list()
            .iter()
            .filter(|d| d.present)
            .map(disk_json)
            .collect(),
    ))
}

/// Largest range `x-blockhaus-disk-io` moves in one command.
const DEBUG_IO_MAX: u64 = 64 << 20;
/// Most requests `x-blockhaus-disk-io` makes in one command.
const DEBUG_IO_MAX_REQUESTS: u64 = 1 << 15;
/// How long `x-blockhaus-disk-io` waits for the device.
const DEBUG_IO_TIMEOUT_NS: u64 = 120_000_000_000;

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
                let _ = wait(disks, &tickets);
                return Err(fail(e));
            }
        }
    }
    let (done, max_in_flight) = wait(disks, &tickets).map_err(QmpError::generic)?;
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

/// Polls until every ticket completed; returns the completions in ticket
/// order and the most device requests seen in flight.
fn wait(disks: &mut Disks, tickets: &[(u64, Ticket)]) -> Result<(Vec<Completion>, usize), String> {
    let deadline = crate::clock::monotonic_ns() + DEBUG_IO_TIMEOUT_NS;
    let mut done: Vec<Option<Completion>> = tickets.iter().map(|_| None).collect();
    let mut pending: BTreeMap<Ticket, usize> = tickets
        .iter()
        .enumerate()
        .map(|(i, (_, t))| (*t, i))
        .collect();
    let mut max_in_flight = disks.in_flight();
    let mut idle: u32 = 0;
    while !pending.is_empty() {
        max_in_flight = max_in_flight.max(disks.in_flight());
        if !disks.poll() {
            // Reading the clock may trap under nested virtualisation:
            // look at it only now and then.
            idle = idle.wrapping_add(1);
            if idle.is_multiple_of(4096) && crate::clock::monotonic_ns() > deadline {
                return Err(format!(
                    "{} request(s) still pending after 120 s",
                    pending.len()
                ));
            }
            core::hint::spin_loop();
            continue;
        }
        // Only finished requests are in `completed`: pick ours.
        let finished: Vec<Ticket> = disks
            .completed
            .keys()
            .filter(|t| pending.contains_key(t))
            .copied()
            .collect();
        for t in finished {
            if let (Some(i), Some(c)) = (pending.remove(&t), disks.take(t)) {
                done[i] = Some(c);
            }
        }
    }
    Ok((done.into_iter().flatten().collect(), max_in_flight))
}

/// Registers the disk-related QMP commands.
pub fn register(commands: &mut Dispatcher<Appliance>) {
    commands.register("x-query-devices", query_devices);
    commands.register("x-blockhaus-disk-io", disk_io);
}
