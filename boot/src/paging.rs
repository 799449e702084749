//! Identity paging. `pvh.s` maps the first 4 GiB with 2 MiB pages before
//! Rust runs; [`finish`] then maps every RAM region the memory map reports
//! above 4 GiB (1 GiB pages where the CPU has them, else 2 MiB pages from a
//! static pool) and unmaps the page below the boot stack, so a stack overflow
//! faults instead of silently corrupting `.bss`. [`map_mmio`] maps device
//! memory the firmware placed above the map (OVMF puts 64-bit BARs at
//! 0xE0_0000_0000 and up), uncached.

use crate::info::BootInfo;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const HUGE: u64 = 1 << 7;
/// Page-level write-through and cache-disable: UC with the default PAT.
const UNCACHED: u64 = (1 << 3) | (1 << 4);
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;

#[repr(C, align(4096))]
struct PageTable([u64; 512]);

/// Page directories for RAM above 4 GiB when 1 GiB pages are unavailable:
/// 60 of them map up to 64 GiB of address space.
const EXTRA_PDS: usize = 60;
static mut EXTRA_PD: [PageTable; EXTRA_PDS] = [const { PageTable([0; 512]) }; EXTRA_PDS];
/// The 4 KiB page table that splits the 2 MiB page holding the stack guard.
static mut GUARD_PT: PageTable = PageTable([0; 512]);

/// Tables for [`map_mmio`]: PDPTs for PML4 entries past the first (each
/// covers 512 GiB) and page directories for 2 MiB pages (each 1 GiB).
const MMIO_PDPTS: usize = 4;
const MMIO_PDS: usize = 8;
static mut MMIO_PDPT: [PageTable; MMIO_PDPTS] = [const { PageTable([0; 512]) }; MMIO_PDPTS];
static mut MMIO_PD: [PageTable; MMIO_PDS] = [const { PageTable([0; 512]) }; MMIO_PDS];
static mut MMIO_USED: (usize, usize) = (0, 0);

unsafe extern "C" {
    static mut boot_pml4: [u64; 512];
    static mut boot_pdpt: [u64; 512];
    static mut boot_pd: [u64; 2048];
    static __stack_guard: u8;
}

/// How much address space ended up identity-mapped, for the boot log.
pub static mut MAPPED_END: u64 = 4 * GIB;

fn has_1g_pages() -> bool {
    let max_ext = core::arch::x86_64::__cpuid(0x8000_0000).eax;
    max_ext >= 0x8000_0001 && core::arch::x86_64::__cpuid(0x8000_0001).edx & (1 << 26) != 0
}

/// Maps RAM above 4 GiB and unmaps the stack guard page.
///
/// # Safety
/// Call once, during boot, while the page tables of `pvh.s` are live.
pub unsafe fn finish(info: &BootInfo) {
    let top = info.ram_end();
    let one_g = has_1g_pages();
    let mut mapped_end = 4 * GIB;
    // SAFETY: boot is single-threaded; these tables are ours alone and the
    // entries written map memory identity, so no live mapping changes.
    unsafe {
        let pdpt = &mut *core::ptr::addr_of_mut!(boot_pdpt);
        let pool = &mut *core::ptr::addr_of_mut!(EXTRA_PD);
        let mut gib = 4u64;
        while gib * GIB < top && gib < 512 {
            if one_g {
                pdpt[gib as usize] = (gib * GIB) | PRESENT | WRITABLE | HUGE;
            } else {
                let idx = (gib - 4) as usize;
                if idx >= EXTRA_PDS {
                    break;
                }
                let pd = &mut pool[idx];
                for (i, e) in pd.0.iter_mut().enumerate() {
                    *e = (gib * GIB + i as u64 * MIB2) | PRESENT | WRITABLE | HUGE;
                }
                pdpt[gib as usize] = (pd as *const PageTable as u64) | PRESENT | WRITABLE;
            }
            gib += 1;
            mapped_end = gib * GIB;
        }
        *core::ptr::addr_of_mut!(MAPPED_END) = mapped_end;

        // Split the 2 MiB page holding the guard into 4 KiB pages and drop it.
        let guard = core::ptr::addr_of!(__stack_guard) as u64;
        let base = guard & !(MIB2 - 1);
        let pt = &mut *core::ptr::addr_of_mut!(GUARD_PT);
        for (i, e) in pt.0.iter_mut().enumerate() {
            let addr = base + i as u64 * 4096;
            *e = if addr == guard {
                0
            } else {
                addr | PRESENT | WRITABLE
            };
        }
        let pd = &mut *core::ptr::addr_of_mut!(boot_pd);
        pd[(base / MIB2) as usize] = (pt as *const PageTable as u64) | PRESENT | WRITABLE;

        // Flush the TLB.
        let cr3: u64;
        core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack));
        core::arch::asm!("mov cr3, {}", in(reg) cr3, options(nostack));
    }
}

/// Identity-maps `[start, start + size)` uncached (device memory), with
/// 1 GiB pages where the CPU has them, else 2 MiB pages. Parts already
/// mapped stay as they are. `false` when the address is beyond 48 bits or
/// the static table pools are used up.
///
/// # Safety
/// The range must be device memory (or otherwise not in use as RAM by
/// anyone relying on it being cached); single-threaded.
pub unsafe fn map_mmio(start: u64, size: u64) -> bool {
    let end = start.saturating_add(size);
    if end > 1 << 47 {
        return false;
    }
    let one_g = has_1g_pages();
    // SAFETY: single-threaded; the tables are identity-mapped statics (the
    // image is linked at its physical address) and only new entries for
    // unmapped addresses are written.
    unsafe {
        let pml4 = &mut *core::ptr::addr_of_mut!(boot_pml4);
        let pdpts = &mut *core::ptr::addr_of_mut!(MMIO_PDPT);
        let pds = &mut *core::ptr::addr_of_mut!(MMIO_PD);
        let used = &mut *core::ptr::addr_of_mut!(MMIO_USED);
        let mut addr = start & !(MIB2 - 1);
        while addr < end {
            let l4 = ((addr >> 39) & 511) as usize;
            if pml4[l4] & PRESENT == 0 {
                let Some(t) = pdpts.get_mut(used.0) else {
                    return false;
                };
                used.0 += 1;
                pml4[l4] = (t as *const PageTable as u64) | PRESENT | WRITABLE;
            }
            let pdpt = &mut *((pml4[l4] & ADDR_MASK) as *mut [u64; 512]);
            let l3 = ((addr >> 30) & 511) as usize;
            let gib = addr & !(GIB - 1);
            if pdpt[l3] & PRESENT == 0 {
                if one_g {
                    pdpt[l3] = gib | PRESENT | WRITABLE | HUGE | UNCACHED;
                    addr = gib + GIB;
                    continue;
                }
                let Some(t) = pds.get_mut(used.1) else {
                    return false;
                };
                used.1 += 1;
                pdpt[l3] = (t as *const PageTable as u64) | PRESENT | WRITABLE;
            }
            if pdpt[l3] & HUGE != 0 {
                addr = gib + GIB;
                continue;
            }
            let pd = &mut *((pdpt[l3] & ADDR_MASK) as *mut [u64; 512]);
            let l2 = ((addr >> 21) & 511) as usize;
            if pd[l2] & PRESENT == 0 {
                pd[l2] = addr | PRESENT | WRITABLE | HUGE | UNCACHED;
            }
            addr += MIB2;
        }
        // Only new entries were added: no stale translation to flush, but
        // reload CR3 anyway so a cached "not present" cannot linger.
        let cr3: u64;
        core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack));
        core::arch::asm!("mov cr3, {}", in(reg) cr3, options(nostack));
    }
    true
}

/// The identity-mapped limit (everything below is mapped).
pub fn mapped_end() -> u64 {
    // SAFETY: written once during boot before anyone reads it.
    unsafe { *core::ptr::addr_of!(MAPPED_END) }
}

/// The unmapped stack guard page, for the fault report.
pub fn stack_guard() -> u64 {
    core::ptr::addr_of!(__stack_guard) as u64
}
