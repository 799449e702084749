//! The virtio-scsi event queue (virtio 1.2 §5.6.6.3): with
//! `VIRTIO_SCSI_F_HOTPLUG` the device reports LUNs plugged in
//! (`TRANSPORT_RESET`/`RESCAN`) and unplugged (`TRANSPORT_RESET`/`REMOVED`)
//! by filling a buffer the driver left on queue 1. The driver keeps a few
//! buffers there at all times; [`parse`] is pure and host-tested.

use super::super::queue::{Chain, Queue};
use alloc::boxed::Box;
use alloc::vec::Vec;
use virtio_drivers::transport::Transport;

/// `VIRTIO_SCSI_F_HOTPLUG`.
pub const F_HOTPLUG: u64 = 1 << 1;
/// The event queue's index.
pub const EVENT_QUEUE: u16 = 1;
/// Buffers kept on the event queue.
const BUFFERS: usize = 8;

const T_TRANSPORT_RESET: u32 = 1;
const T_EVENTS_MISSED: u32 = 0x8000_0000;
const EVT_RESET_RESCAN: u32 = 1;
const EVT_RESET_REMOVED: u32 = 2;

/// What an event says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A LUN appeared (hot-plug): scan it.
    Added { target: u8, lun: u16 },
    /// A LUN went away (hot-unplug).
    Removed { target: u8, lun: u16 },
    /// The device dropped events (no buffer was free): rescan everything.
    Missed,
    /// Anything else (`event`, `reason`).
    Other(u32, u32),
}

/// Decodes a `struct virtio_scsi_event` (event, lun[8], reason).
pub fn parse(b: &[u8; 16]) -> Event {
    let event = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let reason = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
    let target = b[5];
    let lun = (u16::from(b[6] & 0x3f) << 8) | u16::from(b[7]);
    if event & T_EVENTS_MISSED != 0 {
        return Event::Missed;
    }
    match (event, reason) {
        (T_TRANSPORT_RESET, EVT_RESET_RESCAN) => Event::Added { target, lun },
        (T_TRANSPORT_RESET, EVT_RESET_REMOVED) => Event::Removed { target, lun },
        _ => Event::Other(event, reason),
    }
}

/// Buffers on the event queue, by token.
pub struct Events {
    queue: Queue,
    slots: Vec<Option<(Chain, Box<[u8; 16]>)>>,
}

impl Events {
    pub fn new<T: Transport>(transport: &mut T, indirect: bool) -> Option<Events> {
        let queue = Queue::new(transport, EVENT_QUEUE, indirect).ok()?;
        let slots = (0..queue.size()).map(|_| None).collect();
        let mut events = Events { queue, slots };
        for _ in 0..BUFFERS.min(usize::from(events.queue.size())) {
            events.arm(Box::new([0; 16]));
        }
        Some(events)
    }

    /// Leaves `buf` on the queue for the device to fill.
    fn arm(&mut self, mut buf: Box<[u8; 16]>) {
        buf.fill(0);
        let mut chain = Chain::new();
        chain.writable(&mut buf[..]);
        // SAFETY: the buffer is boxed and kept in `slots` with its chain
        // until `reap` reclaims it.
        if let Ok(token) = unsafe { chain.submit(&mut self.queue) } {
            self.slots[usize::from(token)] = Some((chain, buf));
        }
    }

    /// Takes the events the device reported, re-arming their buffers; the
    /// caller notifies the device (see [`Events::notify`]).
    pub fn reap(&mut self, out: &mut Vec<Event>) -> bool {
        let mut any = false;
        while let Some(token) = self.queue.peek_used() {
            let Some((chain, buf)) = self
                .slots
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                break;
            };
            // SAFETY: `chain` was submitted with `token`; `buf` is alive.
            if unsafe { chain.reclaim(&mut self.queue, token) }.is_err() {
                self.slots[usize::from(token)] = Some((chain, buf));
                break;
            }
            out.push(parse(&buf));
            self.arm(buf);
            any = true;
        }
        any
    }

    /// Tells the device about re-armed buffers.
    pub fn notify<T: Transport>(&mut self, transport: &mut T) {
        if self.queue.should_notify() {
            transport.notify(EVENT_QUEUE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event: u32, target: u8, lun: u16, reason: u32) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&event.to_le_bytes());
        b[4..12].copy_from_slice(&super::super::wire::lun_field(target, lun));
        b[12..16].copy_from_slice(&reason.to_le_bytes());
        b
    }

    #[test]
    fn hotplug_events() {
        assert_eq!(
            parse(&event(1, 4, 0, 1)),
            Event::Added { target: 4, lun: 0 }
        );
        assert_eq!(
            parse(&event(1, 2, 300, 2)),
            Event::Removed {
                target: 2,
                lun: 300
            }
        );
        assert_eq!(parse(&event(0x8000_0000, 0, 0, 0)), Event::Missed);
        assert_eq!(parse(&event(3, 0, 0, 0x2a09)), Event::Other(3, 0x2a09));
    }
}
