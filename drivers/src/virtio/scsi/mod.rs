//! Our virtio-scsi driver (virtio 1.2 §5.6): one controller, the LUNs it
//! finds, and SCSI block commands (SBC-3) on its first request queue.
//!
//! API (see [`crate::virtio`] for the request model):
//! - [`VirtioScsi::new`] brings the controller up (request queue 2 at the
//!   full size offered, one ring slot per command with indirect
//!   descriptors) and scans it: REPORT LUNS to every target
//!   `0..=max_target` at once (response BAD_TARGET = no target there),
//!   then for each LUN reported, INQUIRY, the VPD pages 0x80 (serial), 0xB0
//!   (limits) and 0xB2 (provisioning), READ CAPACITY(16) and MODE
//!   SENSE(10) (write protect). Disks (peripheral type 0) become [`Lun`]s.
//! - [`VirtioScsi::submit`]`(lun_index, op)` / [`VirtioScsi::poll`]: the
//!   same request model as virtio-blk, with ids unique per controller, and
//!   many commands in flight for all LUNs on the one request queue.
//!   UNIT ATTENTION (the first command to each target after a reset gets
//!   one) and BUSY are retried; other CHECK CONDITIONs complete with the
//!   decoded sense ([`sense`]).
//! - Hot-plug ([`events`]): with `VIRTIO_SCSI_F_HOTPLUG` the event queue
//!   reports LUNs plugged in and out; [`VirtioScsi::take_events`] hands
//!   them over, [`VirtioScsi::rescan`] brings a new LUN up and
//!   [`VirtioScsi::remove`] marks one gone (its requests then fail with
//!   [`Error::Gone`]).
//!
//! Pure parts, tested on the host: [`wire`] (request/response layouts, LUN
//! addressing), [`cdb`] (CDB builders), [`sense`] (sense decoding),
//! [`inquiry`] (INQUIRY/VPD/capacity/REPORT LUNS parsing), [`command`]
//! (an op as commands). `scan` is the bring-up scan.

pub mod cdb;
pub mod command;
pub mod events;
pub mod inquiry;
mod scan;
pub mod sense;
#[cfg(test)]
mod tests;
pub mod wire;

use super::queue::{Chain, Queue, want_kick};
use super::requests::Requests;
use super::transport::{self, F_INDIRECT_DESC, config_u16, config_u32};
use super::{Completion, DiskInfo, Error, Op, RequestId};
use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use command::{Caps, Command, Data};
use virtio_drivers::transport::Transport;
use virtio_drivers::transport::pci::PciTransport;
use wire::{Response, offset};

/// The driver's own cap on one READ/WRITE (as virtio-blk's).
pub const DRIVER_MAX_TRANSFER: u64 = 1 << 20;
/// The queues whose used buffers should interrupt (MSI-X routing): hot-plug
/// events and the request queue.
pub const INTERRUPT_QUEUES: &[u16] = &[events::EVENT_QUEUE, wire::FIRST_REQUEST_QUEUE];
/// Retries of a command that met UNIT ATTENTION or BUSY.
const MAX_RETRIES: u8 = 8;
/// Spins before a bring-up command is declared lost.
const SPIN_LIMIT: u64 = 4_000_000_000;

/// A disk found on the controller.
#[derive(Clone, Debug)]
pub struct Lun {
    pub target: u8,
    pub lun: u16,
    pub info: DiskInfo,
    pub caps: Caps,
    /// Hot-unplugged: requests fail with [`Error::Gone`].
    pub gone: bool,
}

struct Pending {
    id: RequestId,
    target: u8,
    lun: u16,
    cmd: Command,
    retries: u8,
}

struct InFlight {
    pending: Pending,
    chain: Chain,
    _req: Vec<u8>,
    resp: Vec<u8>,
}

/// One virtio-scsi controller.
pub struct VirtioScsi<T: Transport = PciTransport> {
    // First, so it drops first: the reset stops the device before the
    // rings and in-flight buffers are freed.
    transport: T,
    queue: Queue,
    indirect: bool,
    cdb_size: usize,
    sense_size: usize,
    pub max_target: u16,
    pub max_lun: u32,
    luns: Vec<Lun>,
    requests: Requests,
    slots: Vec<Option<InFlight>>,
    in_flight: usize,
    /// Chains added since the device was last notified.
    unkicked: usize,
    backlog: VecDeque<Pending>,
    ready: Vec<Completion>,
    next_tag: u64,
    max_sectors: u32,
    /// The event queue, when the device offers hot-plug.
    events: Option<events::Events>,
    /// Events reaped and not yet taken by [`VirtioScsi::take_events`].
    reported: Vec<events::Event>,
}

impl<T: Transport> VirtioScsi<T> {
    /// Brings the controller up and scans it for disks.
    pub fn new(mut transport: T) -> Result<VirtioScsi<T>, Error> {
        let negotiated = transport::negotiate(&mut transport, F_INDIRECT_DESC | events::F_HOTPLUG)?;
        let indirect = negotiated & F_INDIRECT_DESC != 0;
        log::debug!("virtio-scsi: negotiated features {negotiated:#x}");
        let num_queues = config_u32(&transport, offset::NUM_QUEUES);
        if num_queues == 0 {
            return Err(Error::Setup(
                "virtio-scsi controller without request queues",
            ));
        }
        let queue = Queue::new(&mut transport, wire::FIRST_REQUEST_QUEUE, indirect)
            .map_err(|_| Error::Setup("cannot set up the request queue"))?;
        // Completions are polled, and interrupt too (once routed to a
        // vector) so that they wake an idle CPU.
        // Our CDBs are up to 16 bytes: a smaller CDB area is raised to the
        // default (the field is driver-writable).
        let cdb_size = match config_u32(&transport, offset::CDB_SIZE) as usize {
            n if n >= 16 => n,
            _ => {
                let _ =
                    transport.write_config_space(offset::CDB_SIZE, wire::DEFAULT_CDB_SIZE as u32);
                wire::DEFAULT_CDB_SIZE
            }
        };
        let sense_size = match config_u32(&transport, offset::SENSE_SIZE) as usize {
            0 => wire::DEFAULT_SENSE_SIZE,
            n => n,
        };
        let max_target = config_u16(&transport, offset::MAX_TARGET).min(255);
        let max_lun = config_u32(&transport, offset::MAX_LUN).min(16383);
        let max_sectors = config_u32(&transport, offset::MAX_SECTORS);
        let mut events = (negotiated & events::F_HOTPLUG != 0)
            .then(|| events::Events::new(&mut transport, indirect))
            .flatten();
        transport.finish_init();
        if let Some(e) = &mut events {
            e.notify(&mut transport);
        }
        let slots = (0..queue.size()).map(|_| None).collect();
        let mut scsi = VirtioScsi {
            transport,
            queue,
            indirect,
            cdb_size,
            sense_size,
            max_target,
            max_lun,
            luns: Vec::new(),
            requests: Requests::default(),
            slots,
            in_flight: 0,
            unkicked: 0,
            backlog: VecDeque::new(),
            ready: Vec::new(),
            next_tag: 1,
            max_sectors,
            events,
            reported: Vec::new(),
        };
        scsi.scan()?;
        Ok(scsi)
    }

    /// The disks found, in target/LUN order.
    pub fn luns(&self) -> &[Lun] {
        &self.luns
    }

    /// Commands on the ring now.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether any request is open.
    pub fn busy(&self) -> bool {
        !self.requests.is_empty() || !self.ready.is_empty()
    }

    /// Hot-plug events reported since the last call (see [`events`]); the
    /// caller answers them with [`VirtioScsi::rescan`] and
    /// [`VirtioScsi::remove`].
    pub fn take_events(&mut self) -> Vec<events::Event> {
        core::mem::take(&mut self.reported)
    }

    /// Probes `target`:`lun` again (it was plugged in): returns the index
    /// of its entry in [`VirtioScsi::luns`] (reused if it was there
    /// before), or `None` if no disk answers there. Runs synchronously.
    pub fn rescan(&mut self, target: u8, lun: u16) -> Result<Option<usize>, Error> {
        let Some(found) = self.probe_lun(target, lun, self.max_sectors)? else {
            return Ok(None);
        };
        match self
            .luns
            .iter()
            .position(|l| l.target == target && l.lun == lun)
        {
            Some(i) => {
                self.luns[i] = found;
                Ok(Some(i))
            }
            None => {
                self.luns.push(found);
                Ok(Some(self.luns.len() - 1))
            }
        }
    }

    /// Marks `target`:`lun` as unplugged; returns its index.
    pub fn remove(&mut self, target: u8, lun: u16) -> Option<usize> {
        let i = self
            .luns
            .iter()
            .position(|l| l.target == target && l.lun == lun)?;
        self.luns[i].gone = true;
        Some(i)
    }

    /// Queues `op` for LUN `index` of [`VirtioScsi::luns`].
    pub fn submit(&mut self, index: usize, op: Op) -> Result<RequestId, Error> {
        let lun = self.luns.get(index).ok_or(Error::Setup("no such LUN"))?;
        if lun.gone {
            return Err(Error::Gone);
        }
        lun.info.check(&op)?;
        let cmds = command::plan(&op, &lun.caps);
        let (target, l) = (lun.target, lun.lun);
        let buf = match op {
            Op::Read { buf, .. } | Op::Write { buf, .. } => buf,
            _ => Vec::new(),
        };
        Ok(self.submit_commands(target, l, cmds, buf))
    }

    /// Queues raw commands for `target`/`lun` as one request over `buf`.
    pub fn submit_commands(
        &mut self,
        target: u8,
        lun: u16,
        cmds: Vec<Command>,
        buf: Vec<u8>,
    ) -> RequestId {
        let id = self.requests.open(cmds.len(), buf, false);
        if cmds.is_empty() {
            if let Some(open) = self.requests.finish_part(id, Ok(())) {
                self.ready.push(Completion {
                    id,
                    result: Ok(()),
                    buf: open.buf,
                });
            }
            return id;
        }
        self.backlog.extend(cmds.into_iter().map(|cmd| Pending {
            id,
            target,
            lun,
            cmd,
            retries: 0,
        }));
        id
    }

    /// Reaps finished commands, completes requests into `out`, refills the
    /// ring; returns whether anything happened.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> bool {
        let mut progress = !self.ready.is_empty();
        if let Some(e) = &mut self.events
            && e.reap(&mut self.reported)
        {
            e.notify(&mut self.transport);
            progress = true;
        }
        out.append(&mut self.ready);
        while let Some(token) = self.queue.peek_used() {
            let Some(done) = self
                .slots
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                log::error!("virtio-scsi: device returned unknown token {token}");
                break;
            };
            // SAFETY: `done.chain` was submitted with `token`; the buffers
            // it names are owned by `done` and the open request.
            if unsafe { done.chain.reclaim(&mut self.queue, token) }.is_err() {
                log::error!("virtio-scsi: used ring out of order");
                self.slots[usize::from(token)] = Some(done);
                break;
            }
            self.in_flight -= 1;
            progress = true;
            let (mut result, retry) = outcome(&done.resp);
            let mut pending = done.pending;
            // A READ or WRITE that moved less than asked did not do its job
            // (for INQUIRY and friends a residual is normal).
            let rw = matches!(pending.cmd.cdb.opcode(), cdb::READ_16 | cdb::WRITE_16);
            if rw && result.is_ok() && wire::parse_response(&done.resp).residual != 0 {
                result = Err(Error::Io);
            }
            if retry && pending.retries < MAX_RETRIES {
                pending.retries += 1;
                self.backlog.push_front(pending);
                continue;
            }
            if let Some(open) = self.requests.finish_part(pending.id, result) {
                out.push(Completion {
                    id: pending.id,
                    result: open.result(),
                    buf: open.buf,
                });
            }
        }
        progress |= self.dispatch();
        progress
    }

    /// Moves backlog commands onto the ring while there is room, and
    /// notifies the device as [`want_kick`] says. Returns whether anything
    /// was added.
    fn dispatch(&mut self) -> bool {
        let mut added = false;
        while !self.backlog.is_empty() {
            if self.queue.available_desc() == 0 {
                break;
            }
            let Some(pending) = self.backlog.pop_front() else {
                break;
            };
            let flight = match self.build(pending) {
                Ok(f) => f,
                // Its buffer does not cover the command (cannot happen):
                // fail it rather than leave the request open forever.
                Err(id) => {
                    if let Some(open) = self.requests.finish_part(id, Err(Error::Io)) {
                        self.ready.push(Completion {
                            id,
                            result: open.result(),
                            buf: open.buf,
                        });
                    }
                    continue;
                }
            };
            if self.queue.available_desc() < flight.chain.slots(self.indirect) {
                self.backlog.push_front(flight.pending);
                break;
            }
            // SAFETY: the chain's buffers live in `flight` (kept in
            // `slots` until reclaimed) and in the open request's buffer,
            // which nobody touches until the request completes.
            match unsafe { flight.chain.submit(&mut self.queue) } {
                Ok(token) => {
                    self.slots[usize::from(token)] = Some(flight);
                    self.in_flight += 1;
                    self.unkicked += 1;
                    added = true;
                }
                Err(_) => {
                    self.backlog.push_front(flight.pending);
                    break;
                }
            }
        }
        if want_kick(self.in_flight, self.unkicked, self.queue.size()) {
            // A device that asked not to be notified looks at the ring
            // anyway.
            if self.queue.should_notify() {
                self.transport.notify(wire::FIRST_REQUEST_QUEUE);
            }
            self.unkicked = 0;
        }
        added
    }

    /// The chain for one command. Fails (with the request's id) only if
    /// the request's buffer does not cover the command's data.
    fn build(&mut self, mut pending: Pending) -> Result<InFlight, RequestId> {
        let id = pending.id;
        let tag = self.next_tag;
        self.next_tag += 1;
        let req = wire::request(
            pending.target,
            pending.lun,
            tag,
            pending.cmd.cdb.as_bytes(),
            self.cdb_size,
        );
        let mut resp = vec![0u8; wire::RESP_HEADER + self.sense_size];
        let mut chain = Chain::new();
        chain.readable(&req);
        let buf = self.requests.buf(id).ok_or(id)?;
        match &mut pending.cmd.data {
            Data::None => {
                chain.writable(&mut resp);
            }
            Data::Out(start, len) => {
                chain.readable(buf.get(*start..*start + *len).ok_or(id)?);
                chain.writable(&mut resp);
            }
            Data::OutOwned(params) => {
                chain.readable(params);
                chain.writable(&mut resp);
            }
            Data::In(start, len) => {
                chain.writable(&mut resp);
                chain.writable(buf.get_mut(*start..*start + *len).ok_or(id)?);
            }
        }
        Ok(InFlight {
            pending,
            chain,
            _req: req,
            resp,
        })
    }
}

/// What a response means, and whether the command should be sent again
/// (UNIT ATTENTION, BUSY, a transport reset).
fn outcome(resp: &[u8]) -> (Result<(), Error>, bool) {
    let r = wire::parse_response(resp);
    match r.response {
        Response::Ok => {}
        Response::Busy | Response::Reset | Response::Aborted => {
            return (Err(Error::Transport(r.response)), true);
        }
        other => return (Err(Error::Transport(other)), false),
    }
    match r.status {
        wire::STATUS_GOOD => (Ok(()), false),
        wire::STATUS_CHECK_CONDITION => match sense::parse(r.sense) {
            Some(s) => (Err(Error::Sense(s)), s.is_unit_attention()),
            None => (Err(Error::Io), false),
        },
        wire::STATUS_BUSY | wire::STATUS_TASK_SET_FULL => (Err(Error::ScsiStatus(r.status)), true),
        s => (Err(Error::ScsiStatus(s)), false),
    }
}

#[cfg(test)]
mod outcome_tests {
    use super::*;

    fn resp(response: u8, status: u8, sense: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; wire::RESP_HEADER + 96];
        r[0..4].copy_from_slice(&(sense.len() as u32).to_le_bytes());
        r[10] = status;
        r[11] = response;
        r[12..12 + sense.len()].copy_from_slice(sense);
        r
    }

    fn fixed(key: u8, asc: u8) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = 0x70;
        s[2] = key;
        s[12] = asc;
        s
    }

    #[test]
    fn outcomes() {
        assert_eq!(outcome(&resp(0, 0, &[])), (Ok(()), false));
        let (r, retry) = outcome(&resp(0, 2, &fixed(6, 0x29)));
        assert!(retry, "unit attention is retried");
        assert_eq!(r.unwrap_err().errno(), 11);
        let (r, retry) = outcome(&resp(0, 2, &fixed(3, 0x11)));
        assert!(!retry);
        assert_eq!(
            alloc::string::ToString::to_string(&r.unwrap_err()),
            "MEDIUM ERROR: unrecovered read error (asc 0x11, ascq 0x00)"
        );
        assert_eq!(
            outcome(&resp(3, 0, &[])),
            (Err(Error::Transport(Response::BadTarget)), false)
        );
        assert_eq!(
            alloc::string::ToString::to_string(&Error::Transport(Response::BadTarget)),
            "virtio-scsi: no such target or LUN (VIRTIO_SCSI_S_BAD_TARGET)"
        );
        assert!(outcome(&resp(0, 8, &[])).1, "BUSY is retried");
        assert_eq!(outcome(&resp(0, 0x18, &[])).0, Err(Error::ScsiStatus(0x18)));
        assert_eq!(outcome(&resp(0, 2, &[])).0, Err(Error::Io), "no sense data");
    }
}
