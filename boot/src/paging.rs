//! Identity paging. `pvh.s` maps the first 4 GiB with 2 MiB pages before
//! Rust runs; [`finish`] then maps every RAM region the memory map reports
//! above 4 GiB (1 GiB pages where the CPU has them, else 2 MiB pages from a
//! static pool) and unmaps the page below the boot stack, so a stack overflow
//! faults instead of silently corrupting `.bss`.

use crate::info::BootInfo;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const HUGE: u64 = 1 << 7;
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

unsafe extern "C" {
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

/// The identity-mapped limit (everything below is mapped).
pub fn mapped_end() -> u64 {
    // SAFETY: written once during boot before anyone reads it.
    unsafe { *core::ptr::addr_of!(MAPPED_END) }
}

/// The unmapped stack guard page, for the fault report.
pub fn stack_guard() -> u64 {
    core::ptr::addr_of!(__stack_guard) as u64
}
