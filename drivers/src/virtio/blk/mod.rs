//! Our virtio-blk driver (virtio 1.2 §5.2) over the modern PCI transport.
//!
//! API (see [`crate::virtio`] for the request model):
//! - [`VirtioBlk::new`] negotiates the features ([`features`]), sets up
//!   request queue 0 at the full size the device offers (one ring slot per
//!   request with indirect descriptors), reads the limits, and asks GET_ID
//!   for the serial.
//! - [`VirtioBlk::submit`] / [`VirtioBlk::poll`]: many requests in flight,
//!   each completed on its own when the used ring returns its token; no
//!   request waits for another. Reads and writes are split at the
//!   device's limits ([`request::plan`]); a FUA write is followed by a flush
//!   once its data is written (virtio-blk has no FUA bit).
//! - [`VirtioBlk::info`]: serial, size, block sizes, read-only, limits.
//!
//! Dropping a `VirtioBlk` resets the device (the transport's drop) before
//! its rings and the buffers of requests still in flight are freed.

pub mod features;
pub mod request;
#[cfg(test)]
mod tests;

use super::queue::{Chain, Queue, want_kick};
use super::requests::{Open, Requests};
use super::transport::{self, F_INDIRECT_DESC, config_u8, config_u16, config_u32, config_u64};
use super::{Completion, DiskInfo, Error, Op, RequestId};
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use features::{Config, offset};
use request::{Part, ReqType};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{DeviceStatus, Transport};

const REQUEST_QUEUE: u16 = 0;
/// The queues whose completions should interrupt (MSI-X routing).
pub const INTERRUPT_QUEUES: &[u16] = &[REQUEST_QUEUE];

/// A device request waiting for a ring slot.
struct Pending {
    id: RequestId,
    part: Part,
}

/// A device request on the ring: the chain and the memory it points to.
/// The data part points into the open request's buffer.
struct InFlight {
    id: RequestId,
    chain: Chain,
    io: Box<Io>,
}

/// The driver-owned parts of a request, in one allocation.
struct Io {
    header: [u8; 16],
    segment: [u8; 16],
    status: [u8; 1],
}

/// One virtio-blk device.
pub struct VirtioBlk<T: Transport = PciTransport> {
    // Declared first so it drops first: the reset stops the device before
    // the rings and in-flight buffers below are freed.
    transport: T,
    queue: Queue,
    indirect: bool,
    info: DiskInfo,
    requests: Requests,
    /// In-flight device requests by token (descriptor head).
    slots: Vec<Option<InFlight>>,
    in_flight: usize,
    /// Chains added since the device was last notified.
    unkicked: usize,
    backlog: VecDeque<Pending>,
    /// Requests that completed without reaching the device.
    ready: Vec<Completion>,
}

impl<T: Transport> VirtioBlk<T> {
    /// Brings the device behind `transport` up.
    pub fn new(mut transport: T) -> Result<VirtioBlk<T>, Error> {
        let negotiated = transport::negotiate(&mut transport, features::WANTED | F_INDIRECT_DESC)?;
        let indirect = negotiated & F_INDIRECT_DESC != 0;
        log::debug!("virtio-blk: negotiated features {negotiated:#x}");
        let queue = Queue::new(&mut transport, REQUEST_QUEUE, indirect)
            .map_err(|_| Error::Setup("cannot set up the request queue"))?;
        // Completions are polled, and interrupt too (once routed to a
        // vector) so that they wake an idle CPU.
        let t = &transport;
        let config = Config {
            features: negotiated,
            capacity: config_u64(t, offset::CAPACITY),
            size_max: config_u32(t, offset::SIZE_MAX),
            seg_max: config_u32(t, offset::SEG_MAX),
            blk_size: config_u32(t, offset::BLK_SIZE),
            physical_block_exp: config_u8(t, offset::PHYSICAL_BLOCK_EXP),
            opt_io_size: config_u32(t, offset::OPT_IO_SIZE),
            num_queues: config_u16(t, offset::NUM_QUEUES),
            max_discard_sectors: config_u32(t, offset::MAX_DISCARD_SECTORS),
            discard_sector_alignment: config_u32(t, offset::DISCARD_SECTOR_ALIGNMENT),
            max_write_zeroes_sectors: config_u32(t, offset::MAX_WRITE_ZEROES_SECTORS),
            queue_size: queue.size(),
        };
        transport.finish_init();
        let slots = (0..queue.size()).map(|_| None).collect();
        let mut blk = VirtioBlk {
            transport,
            queue,
            indirect,
            info: config.disk_info(),
            requests: Requests::default(),
            slots,
            in_flight: 0,
            unkicked: 0,
            backlog: VecDeque::new(),
            ready: Vec::new(),
        };
        blk.info.serial = match blk.get_id() {
            Ok(serial) => serial,
            // A device that does not answer is unusable.
            Err(e @ Error::Setup(_)) => return Err(e),
            // A device without GET_ID has no serial.
            Err(_) => Default::default(),
        };
        Ok(blk)
    }

    /// What the disk is.
    pub fn info(&self) -> &DiskInfo {
        &self.info
    }

    /// Device requests on the ring now.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether any request is open.
    pub fn busy(&self) -> bool {
        !self.requests.is_empty() || !self.ready.is_empty()
    }

    /// Queues `op`; see the module doc.
    pub fn submit(&mut self, op: Op) -> Result<RequestId, Error> {
        self.info.check(&op)?;
        let limits = &self.info.limits;
        let parts = request::plan(
            &op,
            u64::from(limits.max_transfer),
            limits.max_discard,
            limits.max_write_zeroes,
        );
        let flush_after = matches!(op, Op::Write { fua: true, .. }) && self.info.flush;
        let buf = match op {
            Op::Read { buf, .. } | Op::Write { buf, .. } => buf,
            _ => Vec::new(),
        };
        let id = self.requests.open(parts.len(), buf, flush_after);
        if parts.is_empty() {
            // Nothing to send (an empty read or write).
            if let Some(open) = self.requests.finish_part(id, Ok(())) {
                self.ready.push(Completion {
                    id,
                    result: Ok(()),
                    buf: open.buf,
                });
            }
            return Ok(id);
        }
        if matches!(parts[0].kind, ReqType::Flush) && !self.info.flush {
            // No volatile cache: a flush has nothing to do.
            let open = self.requests.finish_part(id, Ok(()));
            self.ready.push(Completion {
                id,
                result: Ok(()),
                buf: open.map(|o| o.buf).unwrap_or_default(),
            });
            return Ok(id);
        }
        self.backlog
            .extend(parts.into_iter().map(|part| Pending { id, part }));
        Ok(id)
    }

    /// Reaps finished requests into `out` and refills the ring; returns
    /// whether anything happened.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> bool {
        let mut progress = !self.ready.is_empty();
        out.append(&mut self.ready);
        while let Some(token) = self.queue.peek_used() {
            let Some(done) = self
                .slots
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                log::error!(
                    "virtio-blk {}: device returned unknown token {token}",
                    self.info.serial
                );
                break;
            };
            // SAFETY: `done.chain` was submitted with `token`; its buffers
            // (owned by `done` and the open request) are still allocated.
            if unsafe { done.chain.reclaim(&mut self.queue, token) }.is_err() {
                log::error!("virtio-blk {}: used ring out of order", self.info.serial);
                self.slots[usize::from(token)] = Some(done);
                break;
            }
            self.in_flight -= 1;
            progress = true;
            let result = request::status_result(done.io.status[0]);
            if let Some(open) = self.requests.finish_part(done.id, result) {
                self.complete(done.id, open, out);
            }
        }
        progress |= self.dispatch();
        progress
    }

    fn complete(&mut self, id: RequestId, open: Open, out: &mut Vec<Completion>) {
        if open.flush_after && open.error.is_none() {
            self.requests.reopen(
                id,
                Open {
                    flush_after: false,
                    ..open
                },
                1,
            );
            self.backlog.push_back(Pending {
                id,
                part: request::flush(),
            });
            return;
        }
        out.push(Completion {
            id,
            result: open.result(),
            buf: open.buf,
        });
    }

    /// Moves backlog requests onto the ring while there is room, and
    /// notifies the device as [`want_kick`] says. Returns whether anything
    /// was added.
    fn dispatch(&mut self) -> bool {
        let mut added = false;
        while let Some(pending) = self.backlog.front() {
            if self.queue.available_desc() == 0 {
                break;
            }
            let id = pending.id;
            let part = pending.part.clone();
            let Some(flight) = self.build(id, &part) else {
                // Its buffer does not cover the part (cannot happen): fail
                // the part rather than leave the request open forever.
                self.backlog.pop_front();
                if let Some(open) = self.requests.finish_part(id, Err(Error::Io)) {
                    self.ready.push(Completion {
                        id,
                        result: open.result(),
                        buf: open.buf,
                    });
                }
                continue;
            };
            if self.queue.available_desc() < flight.chain.slots(self.indirect) {
                break;
            }
            // SAFETY: the chain's buffers are owned by `flight` (kept in
            // `slots` until reclaimed) and by the open request, whose
            // buffer is not touched until it completes.
            match unsafe { flight.chain.submit(&mut self.queue) } {
                Ok(token) => {
                    self.slots[usize::from(token)] = Some(flight);
                    self.in_flight += 1;
                    self.unkicked += 1;
                    self.backlog.pop_front();
                    added = true;
                }
                Err(_) => break,
            }
        }
        if want_kick(self.in_flight, self.unkicked, self.queue.size()) {
            // A device that asked not to be notified looks at the ring
            // anyway.
            if self.queue.should_notify() {
                self.transport.notify(REQUEST_QUEUE);
            }
            self.unkicked = 0;
        }
        added
    }

    /// The chain and memory for one device request.
    fn build(&mut self, id: RequestId, part: &Part) -> Option<InFlight> {
        let mut io = Box::new(Io {
            header: request::header(part.kind, part.sector),
            segment: part.segment.unwrap_or_default(),
            status: [0xff],
        });
        let mut chain = Chain::new();
        chain.readable(&io.header);
        if part.segment.is_some() {
            chain.readable(&io.segment);
        }
        let max_segment = self.info.limits.max_segment;
        // `None` if the request is no longer open (cannot happen).
        let buf = self.requests.buf(id)?;
        if let Some((start, len)) = part.data {
            let data = buf.get_mut(start..start + len)?;
            for (s, n) in request::segments(len, max_segment) {
                let seg = &mut data[s..s + n];
                if part.kind == ReqType::In {
                    chain.writable(seg);
                } else {
                    chain.readable(seg);
                }
            }
        }
        chain.writable(&mut io.status);
        Some(InFlight { id, chain, io })
    }

    /// GET_ID, synchronously (used once, at bring-up).
    fn get_id(&mut self) -> Result<alloc::string::String, Error> {
        let header = request::header(ReqType::GetId, 0);
        let mut id = [0u8; request::ID_BYTES];
        let mut status = [0xffu8];
        let mut chain = Chain::new();
        chain
            .readable(&header)
            .writable(&mut id)
            .writable(&mut status);
        // SAFETY: the buffers are locals that outlive the wait below, which
        // reclaims the chain before returning.
        let token = unsafe { chain.submit(&mut self.queue) }
            .map_err(|_| Error::Setup("request queue full at bring-up"))?;
        self.transport.notify(REQUEST_QUEUE);
        let mut spins: u64 = 0;
        while self.queue.peek_used() != Some(token) {
            core::hint::spin_loop();
            spins += 1;
            if spins > 2_000_000_000 {
                // Stop the device before the buffers on this stack go.
                self.transport.set_status(DeviceStatus::FAILED);
                self.transport.set_status(DeviceStatus::empty());
                return Err(Error::Setup("GET_ID timed out"));
            }
        }
        // SAFETY: the same chain, submitted with `token`, buffers alive.
        unsafe { chain.reclaim(&mut self.queue, token) }
            .map_err(|_| Error::Setup("GET_ID used ring out of order"))?;
        request::status_result(status[0])?;
        Ok(request::parse_id(&id))
    }
}
