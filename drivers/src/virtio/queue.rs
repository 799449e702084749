//! A virtqueue whose size is chosen at run time: the largest power of two
//! the device offers (up to 1024), over virtio-drivers' const-sized
//! [`VirtQueue`].
//!
//! [`Chain`] is a request's list of buffers as raw (pointer, length) pairs,
//! so a driver can keep it next to the owned buffers of an in-flight request
//! and hand the same list to `add` and, when the device is done, `pop_used`.
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
        let size =
            pick_size(transport.max_queue_size(idx)).ok_or(virtio_drivers::Error::InvalidParam)?;
        macro_rules! make {
            ($n:literal, $v:ident) => {
                Queue::$v(Box::new(VirtQueue::new(transport, idx, indirect, false)?))
            };
        }
        Ok(match size {
            1024 => make!(1024, Q1024),
            512 => make!(512, Q512),
            256 => make!(256, Q256),
            128 => make!(128, Q128),
            64 => make!(64, Q64),
            32 => make!(32, Q32),
            16 => make!(16, Q16),
            8 => make!(8, Q8),
            4 => make!(4, Q4),
            _ => make!(2, Q2),
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

/// The buffers of one request, device-readable first, then
/// device-writable, as virtio lays out a descriptor chain. Empty buffers
/// are left out (a descriptor cannot be empty).
#[derive(Debug, Default)]
pub struct Chain {
    readable: Vec<(*const u8, usize)>,
    writable: Vec<(*mut u8, usize)>,
}

impl Chain {
    pub fn new() -> Chain {
        Chain::default()
    }

    /// Adds a buffer the device reads.
    pub fn readable(&mut self, buf: &[u8]) -> &mut Self {
        if !buf.is_empty() {
            self.readable.push((buf.as_ptr(), buf.len()));
        }
        self
    }

    /// Adds a buffer the device writes.
    pub fn writable(&mut self, buf: &mut [u8]) -> &mut Self {
        if !buf.is_empty() {
            self.writable.push((buf.as_mut_ptr(), buf.len()));
        }
        self
    }

    /// Number of buffers (descriptors without indirection).
    pub fn len(&self) -> usize {
        self.readable.len() + self.writable.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ring slots the chain needs: one with indirect descriptors.
    pub fn slots(&self, indirect: bool) -> usize {
        if indirect && self.len() > 1 {
            1
        } else {
            self.len()
        }
    }

    /// # Safety
    /// Every buffer recorded is still allocated and not otherwise accessed.
    unsafe fn slices<'a>(&self) -> (Vec<&'a [u8]>, Vec<&'a mut [u8]>) {
        let inputs = self
            .readable
            .iter()
            // SAFETY: the caller guarantees each (pointer, length) is live.
            .map(|&(p, n)| unsafe { core::slice::from_raw_parts(p, n) })
            .collect();
        let outputs = self
            .writable
            .iter()
            // SAFETY: as above, and nothing else holds a reference to them.
            .map(|&(p, n)| unsafe { core::slice::from_raw_parts_mut(p, n) })
            .collect();
        (inputs, outputs)
    }

    /// Puts the chain on `queue`; returns its token.
    ///
    /// # Safety
    /// The buffers stay allocated, unmoved and untouched by the driver until
    /// [`Chain::reclaim`] for the returned token succeeds.
    pub unsafe fn submit(&self, queue: &mut Queue) -> virtio_drivers::Result<u16> {
        // SAFETY: forwarded to the caller.
        let (inputs, mut outputs) = unsafe { self.slices() };
        // SAFETY: forwarded to the caller.
        unsafe { queue.add(&inputs, &mut outputs) }
    }

    /// Takes the chain back from the used ring, where it must be next.
    ///
    /// # Safety
    /// This chain was submitted and got `token`, and its buffers are live.
    pub unsafe fn reclaim(&self, queue: &mut Queue, token: u16) -> virtio_drivers::Result<u32> {
        // SAFETY: forwarded to the caller.
        let (inputs, mut outputs) = unsafe { self.slices() };
        // SAFETY: the same buffers as submitted with `token`.
        unsafe { queue.pop_used(token, &inputs, &mut outputs) }
    }
}

#[cfg(test)]
mod tests {
    use super::pick_size;

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
