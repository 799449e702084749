//! The appliance's disk table: every virtio-blk device and virtio-scsi
//! LUN, their drivers, and the request multiplexer the block graph's
//! protocol nodes (`disk_node`) sit on.
//!
//! [`Disks::probe`] brings up, from the boot-time PCI scan, every
//! virtio-blk device and every virtio-scsi controller (and the LUNs it
//! reports), and logs each disk. Every disk gets an index; I/O goes through
//! [`Disks::submit`] (a [`Ticket`] back), completions are collected by
//! [`Disks::poll`] (the main loop calls it every iteration) and picked up
//! with [`Disks::take`], or awaited with [`Disks::poll_completion`] (its
//! waker is woken by `poll`); [`Disks::wait_all`] busy-waits for a set of
//! tickets (the halt path's [`Disks::flush_all`], the debug command).
//!
//! Hot-plug: a SCSI LUN plugged in later is scanned and listed when the
//! controller reports it; one unplugged is left out of `x-query-devices`
//! and its requests fail ("the LUN was removed").
//!
//! The QMP commands about the disks are in `disks_qmp` (`x-query-devices`)
//! and `disks_debug` (`x-blockhaus-disk-io`, only with
//! `blockhaus.debug-commands=on`).

use crate::disk_stats::{DiskStats, Kind, Pending};
use crate::pci::{OpenError, Pci};
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::task::{Context, Poll, Waker};
use drivers::pci::Address;
use drivers::virtio::blk::VirtioBlk;
use drivers::virtio::scsi::VirtioScsi;
use drivers::virtio::scsi::events::Event as ScsiEvent;
use drivers::virtio::{Completion, DiskInfo, Error, Op, RequestId};
use log::{info, warn};

/// How long [`Disks::wait_all`] waits for the devices.
const WAIT_TIMEOUT_NS: u64 = 120_000_000_000;
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
    /// The disk the firmware loaded the image from (it holds the ESP):
    /// a node claims it only with `"x-boot-disk": true`.
    pub boot: bool,
    controller: usize,
    /// LUN index within a SCSI controller.
    lun: usize,
    /// I/O counters since boot.
    pub stats: DiskStats,
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
    /// Requests in flight, for the disks' counters: the disk's index and the
    /// request.
    pending: BTreeMap<Ticket, (usize, Pending)>,
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
                Ok(d) => {
                    pci.interrupts(
                        &f,
                        if blk {
                            drivers::virtio::blk::INTERRUPT_QUEUES
                        } else {
                            drivers::virtio::scsi::INTERRUPT_QUEUES
                        },
                        crate::interrupts::DISK_VECTOR,
                    );
                    me.add(f.address, d)
                }
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
                boot: false,
                present: true,
                stats: DiskStats::default(),
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
                        boot: false,
                        present: true,
                        stats: DiskStats::default(),
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

    /// Marks the virtio-blk disk at PCI address `bdf` (`BB:DD.F`, from the
    /// UEFI loader) as the boot disk.
    pub fn mark_boot_disk(&mut self, bdf: &str) {
        let disk = Address::parse(bdf).and_then(|a| {
            self.disks
                .iter_mut()
                .find(|d| d.pci == a && d.transport == Transport::VirtioBlk)
        });
        match disk {
            Some(d) => {
                d.boot = true;
                log::info!("boot disk: '{}' at {bdf} (holds the ESP)", d.info.serial);
            }
            None => log::warn!("boot disk {bdf}: no virtio-blk disk there"),
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
        let transport = disk.transport;
        let p = Pending::of(&op, crate::clock::monotonic_ns());
        let pci = self.controllers[controller].0;
        let id = match &mut self.controllers[controller].1 {
            Driver::Blk(b) => b.submit(op)?,
            Driver::Scsi(s) => s.submit(lun, op)?,
        };
        let (kind, offset, len) = (p.kind.name(), p.offset, p.len);
        match (transport, p.kind) {
            (Transport::VirtioBlk, Kind::Read) => {
                block::trace!(
                    virtio_blk_handle_read,
                    "{pci} req {id} offset {offset} len {len}"
                )
            }
            (Transport::VirtioBlk, Kind::Write) => {
                block::trace!(
                    virtio_blk_handle_write,
                    "{pci} req {id} offset {offset} len {len}"
                )
            }
            (Transport::VirtioBlk, _) => {
                block::trace!(
                    virtio_blk_handle_flush,
                    "{pci} req {id} {kind} offset {offset} len {len}"
                )
            }
            (Transport::VirtioScsi { target, lun }, _) => block::trace!(
                virtio_scsi_cmd_req,
                "{pci} target {target} lun {lun}, tag {id}, {kind} offset {offset} len {len}"
            ),
        }
        if matches!(p.kind, Kind::Write | Kind::WriteZeroes) {
            self.bytes_written += p.len;
        }
        self.pending.insert(Ticket { controller, id }, (index, p));
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
        let tickets: Vec<Ticket> = targets
            .iter()
            .filter_map(|(_, t)| t.as_ref().ok().copied())
            .collect();
        // A timeout leaves the results short: those disks report EIO.
        let results: Vec<Result<(), Error>> = self
            .wait_all(&tickets)
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
            // One clock read for the batch: completions are accounted at
            // the poll that found them.
            let now = if self.scratch.is_empty() {
                0
            } else {
                crate::clock::monotonic_ns()
            };
            for done in self.scratch.drain(..) {
                let status = done.result.as_ref().map_or_else(|e| e.errno(), |()| 0);
                match c {
                    Driver::Blk(_) => {
                        block::trace!(
                            virtio_blk_req_complete,
                            "{pci} req {} status {status}",
                            done.id
                        )
                    }
                    Driver::Scsi(_) => {
                        block::trace!(
                            virtio_scsi_cmd_resp,
                            "{pci} tag {}, status {status}",
                            done.id
                        )
                    }
                }
                let ticket = Ticket {
                    controller: i,
                    id: done.id,
                };
                if let Some((index, p)) = self.pending.remove(&ticket)
                    && let Some(d) = self.disks.get_mut(index)
                {
                    d.stats.account(&p, done.result.is_ok(), now);
                }
                if let Some(w) = self.wakers.remove(&ticket) {
                    w.wake();
                }
                self.completed.insert(ticket, done);
            }
        }
        progress
    }

    /// Polls until every ticket completed (at most [`WAIT_TIMEOUT_NS`]);
    /// returns the completions in ticket order and the most device requests
    /// seen in flight.
    pub fn wait_all(&mut self, tickets: &[Ticket]) -> Result<(Vec<Completion>, usize), String> {
        let deadline = crate::clock::monotonic_ns() + WAIT_TIMEOUT_NS;
        let mut done: Vec<Option<Completion>> = tickets.iter().map(|_| None).collect();
        let mut pending: BTreeMap<Ticket, usize> =
            tickets.iter().enumerate().map(|(i, t)| (*t, i)).collect();
        let mut max_in_flight = self.in_flight();
        let mut idle: u32 = 0;
        while !pending.is_empty() {
            max_in_flight = max_in_flight.max(self.in_flight());
            if !self.poll() {
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
            let finished: Vec<Ticket> = self
                .completed
                .keys()
                .filter(|t| pending.contains_key(t))
                .copied()
                .collect();
            for t in finished {
                if let (Some(i), Some(c)) = (pending.remove(&t), self.take(t)) {
                    done[i] = Some(c);
                }
            }
        }
        Ok((done.into_iter().flatten().collect(), max_in_flight))
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
                                boot: false,
                                present: true,
                                stats: DiskStats::default(),
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
