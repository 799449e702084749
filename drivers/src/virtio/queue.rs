//! A virtqueue whose size is chosen at run time: the largest power of two
//! the device offers (up to 1024), over virtio-drivers' const-sized
//! [`VirtQueue`].
//!
//! [`Chain`] is a request's list of buffers as raw (pointer, length) pairs,
//! so a driver can keep it next to the owned buffers of an in-flight request
//! and hand the same list to `add` and, when the device is done, `pop_used`.
//!
//! `VIRTIO_F_EVENT_IDX` is not negotiated: virtio-drivers 0.13's
//! `should_notify` compares `avail_idx >= avail_event + 1` without the
//! wrap-safe form of the spec's `vring_need_event`, so a notification
//! could be skipped once the 16-bit index wraps; measured here it saved
//! only ~15% of the per-request cost anyway.
//!
//! The ring itself (descriptor table, available and used rings, the fence
//! and Release store that publish `avail.idx`, the Acquire load of
//! `used.idx`) is virtio-drivers' code; this wrapper only dispatches.

use super::hal::IdentityHal;
use alloc::boxed::Box;
use alloc::vec::Vec;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::Transport;

type Q<const N: usize> = Box<VirtQueue<IdentityHal, N>>;

/// A split virtqueue of 2..=1024 entries.
pub enum Queue {
    Q1024(Q<1024>),
    Q512(Q<512>),
    Q256(Q<256>),
    Q128(Q<128>),
    Q64(Q<64>),
    Q32(Q<32>),
    Q16(Q<16>),
    Q8(Q<8>),
    Q4(Q<4>),
    Q2(Q<2>),
}

macro_rules! each {
    ($self:expr, $q:ident => $body:expr) => {
        match $self {
            Queue::Q1024($q) => $body,
            Queue::Q512($q) => $body,
            Queue::Q256($q) => $body,
            Queue::Q128($q) => $body,
            Queue::Q64($q) => $body,
            Queue::Q32($q) => $body,
            Queue::Q16($q) => $body,
            Queue::Q8($q) => $body,
            Queue::Q4($q) => $body,
            Queue::Q2($q) => $body,
        }
    };
}

/// A `VirtQueue` of `N` entries, moved to the heap. `VirtQueue::new`
/// returns the queue by value (its shadow descriptor table and indirect
/// list table inline: 33 KiB at 1024 entries), and an unoptimised build
/// keeps every temporary copy in its own stack slot. Built here, one size
/// per function, those copies take one frame of one size while the queue
/// is made, not a frame of every size in [`Queue::new`] (260 KiB of the
/// 512 KiB boot stack in a debug build).
#[inline(never)]
fn boxed<T: Transport, const N: usize>(
    transport: &mut T,
    idx: u16,
    indirect: bool,
) -> virtio_drivers::Result<Q<N>> {
    Ok(Box::new(VirtQueue::new(transport, idx, indirect, false)?))
}

/// The largest supported queue size not above what the device offers.
pub fn pick_size(device_max: u32) -> Option<u16> {
    [1024u16, 512, 256, 128, 64, 32, 16, 8, 4, 2]
        .into_iter()
        .find(|&n| u32::from(n) <= device_max)
}

impl Queue {
    /// Sets up queue `idx` of `transport` with the largest size it offers.
    /// `indirect` must match whether `VIRTIO_F_INDIRECT_DESC` was
    /// negotiated: then each request takes one ring slot.
    pub fn new<T: Transport>(
        transport: &mut T,
        idx: u16,
        indirect: bool,
    ) -> virtio_drivers::Result<Queue> {
        Queue::at_most(transport, idx, indirect, 1024)
    }

    /// As [`Queue::new`], with at most `limit` entries (a queue that
    /// carries little, such as a console port's, needs no large ring).
    pub fn at_most<T: Transport>(
        transport: &mut T,
        idx: u16,
        indirect: bool,
        limit: u32,
    ) -> virtio_drivers::Result<Queue> {
        let offered = transport.max_queue_size(idx).min(limit);
        let size = pick_size(offered).ok_or(virtio_drivers::Error::InvalidParam)?;
        let t = transport;
        Ok(match size {
            1024 => Queue::Q1024(boxed(t, idx, indirect)?),
            512 => Queue::Q512(boxed(t, idx, indirect)?),
            256 => Queue::Q256(boxed(t, idx, indirect)?),
            128 => Queue::Q128(boxed(t, idx, indirect)?),
            64 => Queue::Q64(boxed(t, idx, indirect)?),
            32 => Queue::Q32(boxed(t, idx, indirect)?),
            16 => Queue::Q16(boxed(t, idx, indirect)?),
            8 => Queue::Q8(boxed(t, idx, indirect)?),
            4 => Queue::Q4(boxed(t, idx, indirect)?),
            _ => Queue::Q2(boxed(t, idx, indirect)?),
        })
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        match self {
            Queue::Q1024(_) => 1024,
            Queue::Q512(_) => 512,
            Queue::Q256(_) => 256,
            Queue::Q128(_) => 128,
            Queue::Q64(_) => 64,
            Queue::Q32(_) => 32,
            Queue::Q16(_) => 16,
            Queue::Q8(_) => 8,
            Queue::Q4(_) => 4,
            Queue::Q2(_) => 2,
        }
    }

    /// Adds a descriptor chain: device-readable `inputs`, then
    /// device-writable `outputs`. Returns the token that `peek_used` will
    /// show when the device is done.
    ///
    /// # Safety
    /// The buffers must stay valid, and not be accessed, until `pop_used`
    /// for the returned token succeeds.
    pub unsafe fn add<'a, 'b>(
        &mut self,
        inputs: &'a [&'b [u8]],
        outputs: &'a mut [&'b mut [u8]],
    ) -> virtio_drivers::Result<u16> {
        // SAFETY: forwarded to the caller.
        each!(self, q => unsafe { q.add(inputs, outputs) })
    }

    /// Asks the device for (`true`) or not to send (`false`) used-buffer
    /// interrupts. blockhaus polls the used rings, so it turns them off.
    pub fn set_dev_notify(&mut self, enable: bool) {
        each!(self, q => q.set_dev_notify(enable))
    }

    /// Whether the device wants a notification after new buffers.
    pub fn should_notify(&self) -> bool {
        each!(self, q => q.should_notify())
    }

    /// The token of the next used chain, if the device finished one.
    pub fn peek_used(&self) -> Option<u16> {
        each!(self, q => q.peek_used())
    }

    /// Free descriptors (with indirect descriptors: ring slots).
    pub fn available_desc(&self) -> usize {
        each!(self, q => q.available_desc())
    }

    /// Pops the next used chain, which must be `token`; returns how many
    /// bytes the device wrote.
    ///
    /// # Safety
    /// `inputs` and `outputs` are the buffers given to `add` for `token`.
    pub unsafe fn pop_used<'a>(
        &mut self,
        token: u16,
        inputs: &'a [&'a [u8]],
        outputs: &'a mut [&'a mut [u8]],
    ) -> virtio_drivers::Result<u32> {
        // SAFETY: forwarded to the caller.
        each!(self, q => unsafe { q.pop_used(token, inputs, outputs) })
    }
}

/// Whether to notify the device now, with `in_flight` chains on the ring
/// of which `unkicked` were added since the last notification.
///
/// Every notification is a VM exit (expensive under nested
/// virtualisation), so additions are batched: notify when the device is
/// running low (fewer than a quarter of the ring notified) or when a
/// quarter of the ring is waiting; otherwise the device is busy with
/// enough work and the next poll decides again.
pub fn want_kick(in_flight: usize, unkicked: usize, size: u16) -> bool {
    let quarter = (usize::from(size) / 4).max(1);
    unkicked > 0 && (in_flight.saturating_sub(unkicked) < quarter || unkicked >= quarter)
}

/// Buffers a chain keeps inline; longer chains spill to the heap.
const INLINE: usize = 4;

/// The buffers of one request, device-readable first, then
/// device-writable, as virtio lays out a descriptor chain. Empty buffers
/// are left out (a descriptor cannot be empty). Up to [`INLINE`] buffers
/// need no allocation (the per-request path: header, data, status).
#[derive(Debug)]
pub struct Chain {
    inline: [(*mut u8, usize); INLINE],
    spill: Vec<(*mut u8, usize)>,
    len: usize,
    readable: usize,
}

impl Default for Chain {
    fn default() -> Self {
        Chain {
            inline: [(core::ptr::null_mut(), 0); INLINE],
            spill: Vec::new(),
            len: 0,
            readable: 0,
        }
    }
}

impl Chain {
    pub fn new() -> Chain {
        Chain::default()
    }

    fn push(&mut self, ptr: *mut u8, len: usize) {
        if self.len < INLINE {
            self.inline[self.len] = (ptr, len);
        } else {
            if self.spill.is_empty() {
                self.spill.extend_from_slice(&self.inline);
            }
            self.spill.push((ptr, len));
        }
        self.len += 1;
    }

    /// Adds a buffer the device reads. Readable buffers come first.
    pub fn readable(&mut self, buf: &[u8]) -> &mut Self {
        debug_assert_eq!(self.readable, self.len, "readable after writable");
        if !buf.is_empty() {
            // The device never writes through it: the cast only gives
            // every entry one type.
            self.push(buf.as_ptr().cast_mut(), buf.len());
            self.readable += 1;
        }
        self
    }

    /// Adds a buffer the device writes.
    pub fn writable(&mut self, buf: &mut [u8]) -> &mut Self {
        if !buf.is_empty() {
            self.push(buf.as_mut_ptr(), buf.len());
        }
        self
    }

    /// Number of buffers (descriptors without indirection).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Ring slots the chain needs: one with indirect descriptors.
    pub fn slots(&self, indirect: bool) -> usize {
        if indirect && self.len > 1 {
            1
        } else {
            self.len
        }
    }

    fn entries(&self) -> &[(*mut u8, usize)] {
        if self.len <= INLINE {
            &self.inline[..self.len]
        } else {
            &self.spill
        }
    }

    /// Calls `f` with the chain as the slices virtio-drivers takes.
    ///
    /// # Safety
    /// Every buffer recorded is still allocated and not otherwise accessed.
    unsafe fn with_slices<R>(
        &self,
        f: impl for<'a> FnOnce(&'a [&'a [u8]], &'a mut [&'a mut [u8]]) -> R,
    ) -> R {
        let (r, w) = self.entries().split_at(self.readable);
        // SAFETY: the caller guarantees each (pointer, length) is live.
        let input =
            |&(p, n): &(*mut u8, usize)| unsafe { core::slice::from_raw_parts(p.cast_const(), n) };
        // SAFETY: as above, and nothing else holds a reference to them.
        let output = |&(p, n): &(*mut u8, usize)| unsafe { core::slice::from_raw_parts_mut(p, n) };
        if self.len <= INLINE {
            let mut ins: [&[u8]; INLINE] = [&[]; INLINE];
            let mut outs: [&mut [u8]; INLINE] = core::array::from_fn(|_| &mut [][..]);
            for (slot, e) in ins.iter_mut().zip(r) {
                *slot = input(e);
            }
            for (slot, e) in outs.iter_mut().zip(w) {
                *slot = output(e);
            }
            f(&ins[..r.len()], &mut outs[..w.len()])
        } else {
            let ins: Vec<&[u8]> = r.iter().map(input).collect();
            let mut outs: Vec<&mut [u8]> = w.iter().map(output).collect();
            f(&ins, &mut outs)
        }
    }

    /// Puts the chain on `queue`; returns its token.
    ///
    /// # Safety
    /// The buffers stay allocated, unmoved and untouched by the driver until
    /// [`Chain::reclaim`] for the returned token succeeds.
    pub unsafe fn submit(&self, queue: &mut Queue) -> virtio_drivers::Result<u16> {
        // SAFETY: forwarded to the caller (twice: the slices, and `add`).
        unsafe { self.with_slices(|i, o| queue.add(i, o)) }
    }

    /// Takes the chain back from the used ring, where it must be next.
    ///
    /// # Safety
    /// This chain was submitted and got `token`, and its buffers are live.
    pub unsafe fn reclaim(&self, queue: &mut Queue, token: u16) -> virtio_drivers::Result<u32> {
        // SAFETY: the same buffers as submitted with `token`, still live.
        unsafe { self.with_slices(|i, o| queue.pop_used(token, i, o)) }
    }
}

#[cfg(test)]
mod tests {
    use super::pick_size;

    #[test]
    fn chains_keep_readable_before_writable_and_spill_past_inline() {
        use super::Chain;
        let (a, mut b, mut c) = ([1u8; 16], [0u8; 512], [0u8; 1]);
        let mut chain = Chain::new();
        chain
            .readable(&a)
            .readable(&[])
            .writable(&mut b)
            .writable(&mut c);
        assert_eq!(chain.len(), 3, "empty buffers are left out");
        assert_eq!(chain.slots(true), 1);
        assert_eq!(chain.slots(false), 3);
        let mut bufs: std::vec::Vec<[u8; 8]> = std::vec![[0; 8]; 6];
        let mut long = Chain::new();
        for b in &mut bufs {
            long.writable(b);
        }
        assert_eq!(long.len(), 6);
        assert_eq!(long.entries().len(), 6);
        assert_eq!(long.entries()[5].0, bufs[5].as_mut_ptr());
    }

    #[test]
    fn kicks_when_the_device_runs_low_or_a_batch_waits() {
        use super::want_kick;
        assert!(!want_kick(100, 0, 256), "nothing new");
        assert!(want_kick(1, 1, 256), "idle device: at once");
        assert!(want_kick(70, 10, 256), "60 notified < 64");
        assert!(!want_kick(100, 10, 256), "90 notified: batch more");
        assert!(want_kick(200, 64, 256), "a quarter of the ring waits");
        assert!(want_kick(2, 1, 2));
    }

    #[test]
    fn picks_largest_power_of_two_offered() {
        assert_eq!(pick_size(256), Some(256));
        assert_eq!(pick_size(1024), Some(1024));
        assert_eq!(pick_size(32768), Some(1024));
        assert_eq!(pick_size(300), Some(256));
        assert_eq!(pick_size(1), None);
        assert_eq!(pick_size(0), None);
    }
}
