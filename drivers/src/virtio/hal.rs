//! The virtio HAL for an identity-mapped kernel: DMA pages come from the
//! global allocator (page aligned, zeroed, returned on release), and a
//! buffer's device address is its virtual address.
//!
//! blockhaus maps all RAM and the first 4 GiB (where SeaBIOS puts the BARs)
//! one to one, so `share` is the identity and `unshare` has nothing to copy
//! back. [`HAL_PAGES`] counts the DMA pages outstanding, so a test (or the
//! halt report) can see that releasing a device frees its rings.

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};

/// DMA pages currently allocated through [`IdentityHal`].
pub static HAL_PAGES: AtomicUsize = AtomicUsize::new(0);

#[cfg(test)]
std::thread_local! {
    /// Pages allocated minus freed by this thread (host tests run in
    /// parallel threads, so the global count cannot be compared).
    pub static THREAD_PAGES: core::cell::Cell<isize> = const { core::cell::Cell::new(0) };
}

fn count(delta: isize) {
    if delta >= 0 {
        HAL_PAGES.fetch_add(delta as usize, Ordering::Relaxed);
    } else {
        HAL_PAGES.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
    }
    #[cfg(test)]
    THREAD_PAGES.with(|c| c.set(c.get() + delta));
}

/// The HAL used by every virtio device in blockhaus.
pub struct IdentityHal;

fn layout(pages: usize) -> Option<Layout> {
    Layout::from_size_align(pages.checked_mul(PAGE_SIZE)?, PAGE_SIZE).ok()
}

// SAFETY: `dma_alloc` returns fresh, zeroed, page-aligned memory from the
// global allocator, which nothing else aliases until `dma_dealloc` returns it;
// with the identity map its physical address is its virtual address.
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(layout) = layout(pages).filter(|l| l.size() > 0) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc::alloc::alloc_zeroed(layout) };
        match NonNull::new(ptr) {
            Some(p) => {
                count(pages as isize);
                (p.as_ptr() as PhysAddr, p)
            }
            // virtio-drivers treats physical address 0 as allocation failure.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Some(layout) = layout(pages) else {
            return -1;
        };
        // SAFETY: the caller passes back what `dma_alloc` returned for
        // `pages`, so `vaddr` came from `alloc_zeroed(layout)`.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), layout) };
        count(-(pages as isize));
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // `PciTransport::new` refuses a BAR at address 0 before it gets
        // here, so `paddr` is never 0.
        NonNull::new(paddr as *mut u8).expect("virtio BAR at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_pages_are_aligned_zeroed_and_returned() {
        let before = HAL_PAGES.load(Ordering::Relaxed);
        let (paddr, vaddr) = IdentityHal::dma_alloc(3, BufferDirection::Both);
        assert_ne!(paddr, 0);
        assert_eq!(paddr % PAGE_SIZE as u64, 0);
        assert_eq!(paddr, vaddr.as_ptr() as u64);
        // SAFETY: three fresh pages, ours until dealloc.
        let bytes = unsafe { core::slice::from_raw_parts(vaddr.as_ptr(), 3 * PAGE_SIZE) };
        assert!(bytes.iter().all(|&b| b == 0));
        assert!(HAL_PAGES.load(Ordering::Relaxed) >= before + 3);
        // SAFETY: returning exactly what dma_alloc gave.
        assert_eq!(unsafe { IdentityHal::dma_dealloc(paddr, vaddr, 3) }, 0);
    }
}
