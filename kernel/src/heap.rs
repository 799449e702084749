//! The kernel heap: every usable RAM region of the memory map (minus the
//! image itself and low memory), each managed by a `linked_list_allocator`
//! heap, behind one global allocator.
//!
//! In front of the first-fit heaps sit size classes for small blocks (16 B
//! to 64 KiB, powers of two): a freed block goes onto its class's free
//! list and the next allocation of that class takes it back at once. The
//! I/O path allocates and frees thousands of equal buffers (4 KiB reads,
//! request structures); without the classes the first-fit scan grows with
//! every live buffer, and a 4 KiB request cost several times more with a
//! deep queue.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use linked_list_allocator::Heap;
use spin::Mutex;

const MAX_HEAPS: usize = 8;
const MIN_REGION: u64 = 64 * 1024;

/// Smallest and largest size class: 2^4 and 2^16 bytes.
const MIN_CLASS_SHIFT: u32 = 4;
const MAX_CLASS_SHIFT: u32 = 16;
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;
/// Blocks of a class are aligned to their size, up to a page.
const MAX_CLASS_ALIGN: usize = 4096;

struct State {
    heaps: [Option<(u64, u64, Heap)>; MAX_HEAPS],
    /// Head of each class's free list (0 = empty); the next pointer is
    /// stored in the first word of each free block.
    free: [usize; CLASSES],
    /// Bytes parked on the free lists, for the usage report.
    parked: usize,
}

pub struct MultiHeap {
    state: Mutex<State>,
}

#[global_allocator]
static ALLOCATOR: MultiHeap = MultiHeap {
    state: Mutex::new(State {
        heaps: [const { None }; MAX_HEAPS],
        free: [0; CLASSES],
        parked: 0,
    }),
};

/// The size class of `layout`, if it is small enough for one.
fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(1 << MIN_CLASS_SHIFT);
    let shift = size.next_power_of_two().trailing_zeros();
    (shift <= MAX_CLASS_SHIFT && layout.align() <= MAX_CLASS_ALIGN)
        .then_some((shift - MIN_CLASS_SHIFT) as usize)
}

/// The layout a class's blocks are carved from the heap with.
fn class_layout(class: usize) -> Layout {
    let size = 1usize << (class as u32 + MIN_CLASS_SHIFT);
    // Size and alignment are powers of two no larger than 64 KiB.
    Layout::from_size_align(size, size.min(MAX_CLASS_ALIGN)).unwrap_or(Layout::new::<u8>())
}

impl State {
    fn heap_alloc(&mut self, layout: Layout) -> *mut u8 {
        for (_, _, heap) in self.heaps.iter_mut().flatten() {
            if let Ok(p) = heap.allocate_first_fit(layout) {
                return p.as_ptr();
            }
        }
        core::ptr::null_mut()
    }
}

unsafe extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
}

/// What [`init`] set up, for the boot log.
pub struct Summary {
    pub regions: usize,
    pub bytes: u64,
}

/// Hands every usable RAM region above 1 MiB, outside the image and below
/// the identity-mapped limit, to the allocator.
pub fn init(info: &boot::BootInfo) -> Summary {
    let (kstart, kend) = (
        core::ptr::addr_of!(__kernel_start) as u64,
        core::ptr::addr_of!(__kernel_end) as u64,
    );
    let limit = boot::paging::mapped_end();
    let mut state = ALLOCATOR.state.lock();
    let heaps = &mut state.heaps;
    let mut slot = 0;
    let mut bytes = 0;
    for region in info.ram() {
        let start = region.start.max(1 << 20);
        let end = region.end().min(limit);
        // Cut the image out of the region: it can leave a piece on each side.
        for (s, e) in [(start, end.min(kstart)), (start.max(kend), end)] {
            let s = (s + 4095) & !4095;
            if e <= s || e - s < MIN_REGION || slot == MAX_HEAPS {
                continue;
            }
            // SAFETY: [s, e) is usable RAM from the firmware's map, identity-
            // mapped, outside the image, and handed out exactly once.
            let heap = unsafe { Heap::new(s as *mut u8, (e - s) as usize) };
            heaps[slot] = Some((s, e, heap));
            slot += 1;
            bytes += e - s;
        }
    }
    Summary {
        regions: slot,
        bytes,
    }
}

/// The boot log's heap line: what the appliance holds once it is ready
/// (the "heap at boot", beside the image's own size).
pub fn report_at_ready() {
    let (kstart, kend) = (
        core::ptr::addr_of!(__kernel_start) as u64,
        core::ptr::addr_of!(__kernel_end) as u64,
    );
    let (free, used) = usage();
    log::info!(
        "heap at ready: {} KiB used, {} KiB free; image {} KiB",
        used >> 10,
        free >> 10,
        (kend - kstart) >> 10
    );
}

/// Free heap beyond `reserve` bytes (0 if the lock is held).
pub fn room(reserve: usize) -> usize {
    usage().0.saturating_sub(reserve)
}

/// Whether a block of `bytes` can be allocated now with `reserve` bytes of
/// the heap left free besides: the data path asks before it starts a
/// request whose buffers it cannot allocate fallibly (a failed infallible
/// allocation panics, and the panic stops the appliance), and answers
/// `ENOMEM` instead when the answer is no.
pub fn can_take(bytes: usize, reserve: usize) -> bool {
    let (free, _) = usage();
    if free < bytes.saturating_add(reserve) {
        return false;
    }
    // One contiguous block, not only enough bytes in pieces.
    let mut probe = alloc::vec::Vec::<u8>::new();
    probe.try_reserve_exact(bytes).is_ok()
}

/// Whether the allocator's lock is held (on the fatal path: by the code
/// that failed, which never resumes).
pub fn is_locked() -> bool {
    ALLOCATOR.state.is_locked()
}

/// Free and used bytes across all regions (blocks parked on the size-class
/// free lists count as free); zeroes if the lock is held (a fault inside
/// the allocator).
pub fn usage() -> (usize, usize) {
    let Some(state) = ALLOCATOR.state.try_lock() else {
        return (0, 0);
    };
    let (free, used) = state
        .heaps
        .iter()
        .flatten()
        .fold((0, 0), |(f, u), (_, _, h)| (f + h.free(), u + h.used()));
    (free + state.parked, used - state.parked)
}

// SAFETY: a block is handed out either from a class free list (where only
// blocks of that class, previously allocated with the class layout, are
// kept) or from exactly one region's `Heap`; a freed large block returns to
// the region containing its address. The lock serialises all of it.
unsafe impl GlobalAlloc for MultiHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mut state = self.state.lock();
        let Some(class) = class_of(layout) else {
            return state.heap_alloc(layout);
        };
        let head = state.free[class];
        if head != 0 {
            // SAFETY: `head` is a free block of this class; its first word
            // holds the next free block's address.
            state.free[class] = unsafe { core::ptr::read(head as *const usize) };
            state.parked -= class_layout(class).size();
            return head as *mut u8;
        }
        state.heap_alloc(class_layout(class))
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let mut state = self.state.lock();
        if let Some(class) = class_of(layout) {
            // SAFETY: `ptr` is a block of this class (allocated above with
            // the same layout), at least 16 bytes and aligned for a usize;
            // it is no longer in use, so its first word can link the list.
            unsafe { core::ptr::write(ptr as *mut usize, state.free[class]) };
            state.free[class] = ptr as usize;
            state.parked += class_layout(class).size();
            return;
        }
        let addr = ptr as u64;
        let owner = state
            .heaps
            .iter_mut()
            .flatten()
            .find(|(s, e, _)| (*s..*e).contains(&addr));
        if let (Some((_, _, heap)), Some(p)) = (owner, NonNull::new(ptr)) {
            // SAFETY: `p` was allocated from this heap with `layout`.
            unsafe { heap.deallocate(p, layout) };
        }
    }
}
