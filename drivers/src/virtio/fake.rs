//! A fake virtio device for host tests: a [`Transport`] whose `notify`
//! walks the split virtqueue in memory the way a device does (available
//! ring → descriptor chain, following indirect tables → used ring), and a
//! [`Model`] that answers each request. The drivers run unchanged against
//! it, so their descriptor layouts, splitting, completion by token and
//! retries are tested without QEMU.
//!
//! Requests can complete at once (`auto`) or be held until the test
//! completes them, in any order ([`State::complete`]).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::vec::Vec;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{PhysAddr, Result as VResult};
use zerocopy::{FromBytes, Immutable, IntoBytes};

const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
const DESC_INDIRECT: u16 = 4;

/// What a device does with one request: `input` is every device-readable
/// byte of the chain in order, `out_len` the device-writable capacity; the
/// answer is written into the writable buffers in order.
pub trait Model {
    fn handle(&mut self, queue: u16, input: &[u8], out_len: usize) -> Vec<u8>;
}

/// One descriptor chain as the device saw it.
#[derive(Clone, Debug)]
pub struct SeenChain {
    pub queue: u16,
    pub head: u16,
    /// (length, device-writable) per buffer.
    pub buffers: Vec<(u32, bool)>,
    /// Whether the chain came through an indirect table.
    pub indirect: bool,
}

struct QueueAddrs {
    size: u16,
    desc: u64,
    driver: u64,
    device: u64,
    last_avail: u16,
    used_idx: u16,
}

/// The device's state, shared between the transport the driver owns and
/// the test.
pub struct State {
    pub device_type: DeviceType,
    pub features: u64,
    pub driver_features: u64,
    pub status: DeviceStatus,
    pub config: Vec<u8>,
    pub max_queue_size: u32,
    /// Complete requests as soon as they are notified.
    pub auto: bool,
    /// Queues whose buffers wait for [`State::fire`] (an event queue).
    pub hold: Vec<u16>,
    pub notifies: usize,
    /// Every chain the device took, in order.
    pub seen: Vec<SeenChain>,
    /// A misbehaving device: given each used element the device would
    /// publish (chain head, bytes written), the elements it publishes
    /// instead (none, a wrong head or length, duplicates).
    pub misbehave: Option<Misbehave>,
    queues: BTreeMap<u16, QueueAddrs>,
    held: Vec<SeenChain>,
    model: Box<dyn Model>,
}

pub type Shared = Rc<RefCell<State>>;

/// See [`State::misbehave`]: (head, length) → the used elements published.
pub type Misbehave = Box<dyn FnMut(u32, u32) -> Vec<(u32, u32)>>;

/// The transport end of a fake device.
pub struct FakeTransport(pub Shared);

/// A device of `device_type` offering `features` with `config` space.
pub fn device(
    device_type: DeviceType,
    features: u64,
    config: Vec<u8>,
    model: impl Model + 'static,
) -> (FakeTransport, Shared) {
    let state = Rc::new(RefCell::new(State {
        device_type,
        features,
        driver_features: 0,
        status: DeviceStatus::empty(),
        config,
        max_queue_size: 256,
        auto: true,
        hold: Vec::new(),
        notifies: 0,
        seen: Vec::new(),
        misbehave: None,
        queues: BTreeMap::new(),
        held: Vec::new(),
        model: Box::new(model),
    }));
    (FakeTransport(state.clone()), state)
}

/// Reads `len` bytes of "physical" memory: the identity HAL hands the
/// device host addresses.
///
/// # Safety
/// `[addr, addr + len)` is live memory the driver gave the device.
unsafe fn read(addr: u64, len: usize) -> Vec<u8> {
    // SAFETY: forwarded to the caller.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec()
}

/// # Safety
/// As [`read`], and the driver lets the device write there.
unsafe fn write(addr: u64, bytes: &[u8]) {
    // SAFETY: forwarded to the caller.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

impl State {
    /// Requests notified and not completed yet.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Completes the held requests at `order` (indices into the held list,
    /// in the order given); the others stay held.
    pub fn complete(&mut self, order: &[usize]) {
        let mut taken: Vec<Option<SeenChain>> = self.held.drain(..).map(Some).collect();
        for &i in order {
            if let Some(c) = taken[i].take() {
                self.finish(&c);
            }
        }
        self.held = taken.into_iter().flatten().collect();
    }

    /// Completes the oldest buffer held on `queue` with `answer` (an
    /// event the device reports); false if none is there.
    pub fn fire(&mut self, queue: u16, answer: &[u8]) -> bool {
        let Some(i) = self.held.iter().position(|c| c.queue == queue) else {
            return false;
        };
        let c = self.held.remove(i);
        self.finish_with(&c, Some(answer.to_vec()));
        true
    }

    /// Completes every held request, newest first.
    pub fn complete_all_reversed(&mut self) {
        let order: Vec<usize> = (0..self.held.len()).rev().collect();
        self.complete(&order);
    }

    /// The buffers of the chain at `head`: (address, length, writable).
    fn walk(&self, queue: u16, head: u16) -> (Vec<(u64, u32, bool)>, bool) {
        let q = &self.queues[&queue];
        let desc = |table: u64, i: u16| {
            // SAFETY: the descriptor table the driver registered with
            // `queue_set` (or an indirect table a descriptor points to).
            let d = unsafe { read(table + 16 * u64::from(i), 16) };
            (
                u64::from_le_bytes(d[0..8].try_into().unwrap()),
                u32::from_le_bytes(d[8..12].try_into().unwrap()),
                u16_at(&d, 12),
                u16_at(&d, 14),
            )
        };
        let (mut table, mut i) = (q.desc, head);
        let mut indirect = false;
        let mut out = Vec::new();
        loop {
            let (addr, len, flags, next) = desc(table, i);
            if flags & DESC_INDIRECT != 0 {
                assert!(!indirect, "nested indirect table");
                indirect = true;
                table = addr;
                i = 0;
                assert_eq!(len % 16, 0, "indirect table length");
                continue;
            }
            out.push((addr, len, flags & DESC_WRITE != 0));
            if flags & DESC_NEXT == 0 {
                break;
            }
            i = next;
        }
        // Device-readable buffers must all come before writable ones.
        let first_w = out.iter().position(|b| b.2).unwrap_or(out.len());
        assert!(
            out[first_w..].iter().all(|b| b.2),
            "readable after writable"
        );
        (out, indirect)
    }

    fn take_avail(&mut self, queue: u16) {
        let Some(q) = self.queues.get(&queue) else {
            return;
        };
        // SAFETY: the driver area the driver registered.
        let avail = unsafe { read(q.driver, 4 + 2 * usize::from(q.size)) };
        let idx = u16_at(&avail, 2);
        let (size, mut last) = (q.size, q.last_avail);
        while last != idx {
            let head = u16_at(&avail, 4 + 2 * usize::from(last % size));
            let (bufs, indirect) = self.walk(queue, head);
            let chain = SeenChain {
                queue,
                head,
                buffers: bufs.iter().map(|b| (b.1, b.2)).collect(),
                indirect,
            };
            self.seen.push(chain.clone());
            self.held.push(chain);
            last = last.wrapping_add(1);
        }
        self.queues.get_mut(&queue).unwrap().last_avail = last;
    }

    fn finish(&mut self, c: &SeenChain) {
        self.finish_with(c, None);
    }

    fn finish_with(&mut self, c: &SeenChain, answer: Option<Vec<u8>>) {
        let (bufs, _) = self.walk(c.queue, c.head);
        let mut input = Vec::new();
        let mut out_len = 0;
        for &(addr, len, w) in &bufs {
            if w {
                out_len += len as usize;
            } else {
                // SAFETY: a device-readable buffer of a chain on the ring.
                input.extend(unsafe { read(addr, len as usize) });
            }
        }
        let answer = match answer {
            Some(a) => a,
            None => self.model.handle(c.queue, &input, out_len),
        };
        let mut at = 0;
        for &(addr, len, w) in &bufs {
            if !w || at >= answer.len() {
                continue;
            }
            let n = (len as usize).min(answer.len() - at);
            // SAFETY: a device-writable buffer of a chain on the ring.
            unsafe { write(addr, &answer[at..at + n]) };
            at += n;
        }
        let elems = match self.misbehave.as_mut() {
            Some(f) => f(u32::from(c.head), at as u32),
            None => vec![(u32::from(c.head), at as u32)],
        };
        let q = self.queues.get_mut(&c.queue).unwrap();
        for (head, len) in elems {
            let slot = u64::from(q.used_idx % q.size);
            let mut elem = [0u8; 8];
            elem[0..4].copy_from_slice(&head.to_le_bytes());
            elem[4..8].copy_from_slice(&len.to_le_bytes());
            // SAFETY: the used ring's element `slot`, in the device area.
            unsafe { write(q.device + 4 + 8 * slot, &elem) };
            q.used_idx = q.used_idx.wrapping_add(1);
        }
        // SAFETY: `used.idx`, a naturally aligned u16 in the device area;
        // Release publishes the elements written above, as a device must.
        unsafe { &*((q.device + 2) as *const AtomicU16) }.store(q.used_idx, Ordering::Release);
    }
}

impl Transport for FakeTransport {
    fn device_type(&self) -> DeviceType {
        self.0.borrow().device_type
    }

    fn read_device_features(&mut self) -> u64 {
        self.0.borrow().features
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.0.borrow_mut().driver_features = driver_features;
    }

    fn max_queue_size(&mut self, _queue: u16) -> u32 {
        self.0.borrow().max_queue_size
    }

    fn notify(&mut self, queue: u16) {
        let mut s = self.0.borrow_mut();
        s.notifies += 1;
        s.take_avail(queue);
        if s.auto {
            let all: Vec<usize> = (0..s.held.len())
                .filter(|&i| !s.hold.contains(&s.held[i].queue))
                .collect();
            s.complete(&all);
        }
    }

    fn get_status(&self) -> DeviceStatus {
        self.0.borrow().status
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.0.borrow_mut().status = status;
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.0.borrow_mut().queues.insert(
            queue,
            QueueAddrs {
                size: size as u16,
                desc: descriptors,
                driver: driver_area,
                device: device_area,
                last_avail: 0,
                used_idx: 0,
            },
        );
    }

    fn queue_unset(&mut self, queue: u16) {
        self.0.borrow_mut().queues.remove(&queue);
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.0.borrow().queues.contains_key(&queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::empty()
    }

    fn read_config_generation(&self) -> u32 {
        0
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> VResult<T> {
        let s = self.0.borrow();
        let bytes = s
            .config
            .get(offset..offset + size_of::<T>())
            .ok_or(virtio_drivers::Error::ConfigSpaceTooSmall)?;
        T::read_from_bytes(bytes).map_err(|_| virtio_drivers::Error::ConfigSpaceTooSmall)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> VResult<()> {
        let mut s = self.0.borrow_mut();
        let bytes = value.as_bytes();
        s.config
            .get_mut(offset..offset + bytes.len())
            .ok_or(virtio_drivers::Error::ConfigSpaceTooSmall)?
            .copy_from_slice(bytes);
        Ok(())
    }
}

/// Runs `poll` until `n` completions arrived (the fake completes inside
/// `notify`, or when the test says so).
pub fn collect<F: FnMut(&mut Vec<crate::virtio::Completion>) -> bool>(
    n: usize,
    mut poll: F,
) -> Vec<crate::virtio::Completion> {
    let mut out = Vec::new();
    for _ in 0..10_000 {
        if out.len() >= n {
            break;
        }
        poll(&mut out);
    }
    out
}

/// Writes `v` little-endian at `at` of a config image.
pub fn put(config: &mut [u8], at: usize, v: &[u8]) {
    config[at..at + v.len()].copy_from_slice(v);
}
