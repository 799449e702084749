//! Page allocations that stay out of the kernel's way: below 4 GiB (the
//! PVH entry runs with paging off) and outside the range the kernel is
//! copied to at the very end. Firmware is free to hand out pages there:
//! rust-hypervisor-firmware allocates first-fit from the bottom, right
//! after this loader at 2 MiB, inside the kernel's range.

use core::ptr::NonNull;
use uefi::Status;
use uefi::boot::{self, AllocateType, MemoryType};
use uefi::mem::memory_map::MemoryMap;

use crate::{BELOW_4G, PAGE};

/// A physical range `[start, end)`.
pub type Range = (u64, u64);

/// `pages` pages of `ty` below 4 GiB, none of them inside `avoid`: the
/// first place in the firmware's free memory, from its bottom or from
/// `avoid`'s end, where they fit (page 0 is never used).
pub fn allocate(pages: usize, ty: MemoryType, avoid: Range) -> Result<NonNull<u8>, Status> {
    let size = (pages * PAGE) as u64;
    let at = {
        let map = boot::memory_map(MemoryType::LOADER_DATA).map_err(|e| e.status())?;
        map.entries()
            .filter(|d| d.ty == MemoryType::CONVENTIONAL)
            .find_map(|d| {
                let (lo, hi) = (d.phys_start, d.phys_start + d.page_count * PAGE as u64);
                let hi = hi.min(BELOW_4G + 1);
                [lo.max(PAGE as u64), avoid.1.max(lo)]
                    .into_iter()
                    .find(|&s| s + size <= hi && (s + size <= avoid.0 || s >= avoid.1))
            })
            .ok_or(Status::OUT_OF_RESOURCES)?
    };
    boot::allocate_pages(AllocateType::Address(at), ty, pages).map_err(|e| e.status())
}

/// Whether every page of `range` is memory the firmware lists as RAM
/// (free, or its own and the loader's, all done with once boot services
/// end), so the kernel may be copied there.
pub fn is_ram(range: Range) -> bool {
    let Ok(map) = boot::memory_map(MemoryType::LOADER_DATA) else {
        return false;
    };
    let mut covered = range.0;
    // Extend the covered prefix until it stops growing: the map need not
    // be sorted.
    loop {
        let before = covered;
        for d in map.entries() {
            let (lo, hi) = (d.phys_start, d.phys_start + d.page_count * PAGE as u64);
            let ram = matches!(
                d.ty,
                MemoryType::CONVENTIONAL
                    | MemoryType::LOADER_CODE
                    | MemoryType::LOADER_DATA
                    | MemoryType::BOOT_SERVICES_CODE
                    | MemoryType::BOOT_SERVICES_DATA
                    | MemoryType::RUNTIME_SERVICES_CODE
                    | MemoryType::RUNTIME_SERVICES_DATA
            );
            if ram && lo <= covered && hi > covered {
                covered = hi;
            }
        }
        if covered >= range.1 || covered == before {
            return covered >= range.1;
        }
    }
}
