//! The kernel heap: every usable RAM region of the memory map (minus the
//! image itself and low memory), each managed by a `linked_list_allocator`
//! heap, behind one global allocator.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use linked_list_allocator::Heap;
use spin::Mutex;

const MAX_HEAPS: usize = 8;
const MIN_REGION: u64 = 64 * 1024;

pub struct MultiHeap {
    heaps: Mutex<[Option<(u64, u64, Heap)>; MAX_HEAPS]>,
}

#[global_allocator]
static ALLOCATOR: MultiHeap = MultiHeap {
    heaps: Mutex::new([const { None }; MAX_HEAPS]),
};

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
    let mut heaps = ALLOCATOR.heaps.lock();
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

/// Free and used bytes across all regions.
pub fn usage() -> (usize, usize) {
    let heaps = ALLOCATOR.heaps.lock();
    heaps
        .iter()
        .flatten()
        .fold((0, 0), |(f, u), (_, _, h)| (f + h.free(), u + h.used()))
}

// SAFETY: every allocation comes from exactly one region's `Heap` and is
// returned to the region that contains its address; the lock serialises use.
unsafe impl GlobalAlloc for MultiHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mut heaps = self.heaps.lock();
        for (_, _, heap) in heaps.iter_mut().flatten() {
            if let Ok(p) = heap.allocate_first_fit(layout) {
                return p.as_ptr();
            }
        }
        core::ptr::null_mut()
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let addr = ptr as u64;
        let mut heaps = self.heaps.lock();
        let owner = heaps
            .iter_mut()
            .flatten()
            .find(|(s, e, _)| (*s..*e).contains(&addr));
        if let (Some((_, _, heap)), Some(p)) = (owner, NonNull::new(ptr)) {
            // SAFETY: `p` was allocated from this heap with `layout`.
            unsafe { heap.deallocate(p, layout) };
        }
    }
}
