//! Parsing of Xen's `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h),
//! the structure a PVH loader points `%ebx` at.

use crate::info::{BootInfo, MemoryRegion, MemoryType};

pub const START_INFO_MAGIC: u32 = 0x336e_c578;

// Offsets in struct hvm_start_info.
const MAGIC: u64 = 0;
const VERSION: u64 = 4;
const NR_MODULES: u64 = 12;
const MODLIST_PADDR: u64 = 16;
const CMDLINE_PADDR: u64 = 24;
const RSDP_PADDR: u64 = 32;
const MEMMAP_PADDR: u64 = 40;
const MEMMAP_ENTRIES: u64 = 48;
// struct hvm_modlist_entry { u64 paddr; u64 size; u64 cmdline_paddr; u64 reserved; }
// struct hvm_memmap_table_entry { u64 addr; u64 size; u32 type; u32 reserved; }
const MEMMAP_ENTRY_SIZE: u64 = 24;

/// Copies what the kernel needs out of `hvm_start_info` into `info`.
///
/// A missing or bad structure leaves `info` with no memory map; the kernel
/// then reports it and stops.
///
/// # Safety
/// `addr` must be the identity-mapped physical address the loader gave, and
/// the memory it and its pointers reference must not have been reused.
pub unsafe fn read_start_info(addr: u64, info: &mut BootInfo) {
    let rd32 = |a: u64| {
        // SAFETY: the caller guarantees these are live loader structures in
        // identity-mapped memory; the read has no alignment requirement.
        unsafe { core::ptr::read_unaligned(a as *const u32) }
    };
    let rd64 = |a: u64| {
        // SAFETY: as for `rd32`.
        unsafe { core::ptr::read_unaligned(a as *const u64) }
    };
    let rd8 = |a: u64| {
        // SAFETY: as for `rd32`.
        unsafe { core::ptr::read_unaligned(a as *const u8) }
    };
    if addr == 0 || rd32(addr + MAGIC) != START_INFO_MAGIC {
        return;
    }
    info.protocol = "PVH";
    let cmdline = rd64(addr + CMDLINE_PADDR);
    if cmdline != 0 {
        let mut len = 0usize;
        // A NUL-terminated string from the loader; the scan is bounded.
        while len <= crate::info::MAX_CMDLINE && rd8(cmdline + len as u64) != 0 {
            len += 1;
        }
        // SAFETY: `len` bytes were just read one by one.
        let bytes = unsafe { core::slice::from_raw_parts(cmdline as *const u8, len) };
        info.set_cmdline(bytes);
    }
    let rsdp = rd64(addr + RSDP_PADDR);
    info.rsdp = (rsdp != 0).then_some(rsdp);
    if rd32(addr + VERSION) >= 1 {
        let table = rd64(addr + MEMMAP_PADDR);
        let entries = rd32(addr + MEMMAP_ENTRIES) as u64;
        for i in 0..entries {
            let e = table + i * MEMMAP_ENTRY_SIZE;
            info.push_region(MemoryRegion {
                start: rd64(e),
                size: rd64(e + 8),
                kind: MemoryType::from_e820(rd32(e + 16)),
            });
        }
    }
    // Module 0 is the configuration file (`blockhaus.conf`): the UEFI loader
    // passes it so, and QEMU's `-initrd` does under `-kernel`. Its pages
    // leave the RAM map so the heap never overwrites it.
    if rd32(addr + NR_MODULES) >= 1 {
        let module = rd64(addr + MODLIST_PADDR);
        if module != 0 {
            let (start, size) = (rd64(module), rd64(module + 8));
            if start != 0 && start.saturating_add(size) <= 1 << 32 {
                info.set_config(start, size);
            }
        }
    }
}
