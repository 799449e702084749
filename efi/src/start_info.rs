//! The `hvm_start_info` the PVH entry expects (Xen's
//! `public/arch-x86/hvm/start_info.h`, version 1), with its command line,
//! module list and E820-typed memory map, in LOADER_DATA pages below 4 GiB.

use uefi::boot::MemoryType;
use uefi::mem::memory_map::{MemoryMap, MemoryMapOwned};

const MAGIC: u32 = 0x336e_c578;
/// Page 0: the start info (56 bytes) and the module list entry at 64.
/// Page 1: the command line. Pages 2-3: the memory map (24-byte entries).
const PAGES: usize = 4;
const MODLIST: usize = 64;
const CMDLINE: usize = 4096;
const MEMMAP: usize = 8192;
const MAX_ENTRIES: usize = 8192 / 24;

pub struct StartInfo {
    base: *mut u8,
    cmdline_len: usize,
}

/// E820 type of a UEFI memory type after ExitBootServices: what boot
/// services and the loader used is free RAM again (the kernel is told
/// about its own range and the configuration module separately).
fn e820(ty: MemoryType) -> u32 {
    match ty {
        MemoryType::CONVENTIONAL
        | MemoryType::BOOT_SERVICES_CODE
        | MemoryType::BOOT_SERVICES_DATA
        | MemoryType::LOADER_CODE
        | MemoryType::LOADER_DATA => 1,
        MemoryType::ACPI_RECLAIM => 3,
        MemoryType::ACPI_NON_VOLATILE => 4,
        MemoryType::UNUSABLE => 5,
        MemoryType::PERSISTENT_MEMORY => 7,
        _ => 2,
    }
}

impl StartInfo {
    /// In LOADER_DATA pages below 4 GiB, outside `avoid` (the kernel's
    /// range).
    pub fn allocate(avoid: crate::mem::Range) -> Result<Self, uefi::Status> {
        let p = crate::mem::allocate(PAGES, MemoryType::LOADER_DATA, avoid)?;
        let base = p.as_ptr();
        // SAFETY: PAGES pages were just allocated at `base`.
        unsafe { core::ptr::write_bytes(base, 0, PAGES * 4096) };
        let me = Self {
            base,
            cmdline_len: 0,
        };
        me.put32(0, MAGIC);
        me.put32(4, 1);
        me.put64(24, base as u64 + CMDLINE as u64);
        me.put64(40, base as u64 + MEMMAP as u64);
        Ok(me)
    }

    fn put32(&self, off: usize, v: u32) {
        // SAFETY: `off` + 4 lies inside our PAGES pages.
        unsafe { self.base.add(off).cast::<u32>().write_unaligned(v) }
    }

    fn put64(&self, off: usize, v: u64) {
        // SAFETY: `off` + 8 lies inside our PAGES pages.
        unsafe { self.base.add(off).cast::<u64>().write_unaligned(v) }
    }

    /// Appends to the command line (kept NUL-terminated, at most 4095
    /// bytes); `false` if it did not fit (nothing is appended then).
    pub fn push_cmdline(&mut self, s: &str) -> bool {
        if self.cmdline_len + s.len() >= 4096 {
            return false;
        }
        for &b in s.as_bytes() {
            // SAFETY: inside page 1; the byte after stays 0.
            unsafe { self.base.add(CMDLINE + self.cmdline_len).write(b) };
            self.cmdline_len += 1;
        }
        true
    }

    /// Module 0: the configuration file.
    pub fn set_module(&mut self, addr: u64, len: u64) {
        self.put32(12, 1);
        self.put64(16, self.base as u64 + MODLIST as u64);
        self.put64(MODLIST, addr);
        self.put64(MODLIST + 8, len);
    }

    pub fn set_rsdp(&mut self, rsdp: u64) {
        self.put64(32, rsdp);
    }

    /// The E820 view of the final map, adjacent entries of one type merged.
    pub fn set_memory_map(&mut self, map: &MemoryMapOwned) {
        let mut n = 0usize;
        let mut last: Option<(u64, u64, u32)> = None;
        let mut emit = |me: &Self, (start, size, ty): (u64, u64, u32)| {
            if n < MAX_ENTRIES {
                let e = MEMMAP + n * 24;
                me.put64(e, start);
                me.put64(e + 8, size);
                me.put32(e + 16, ty);
                n += 1;
            }
        };
        for d in map.entries() {
            let (start, size, ty) = (d.phys_start, d.page_count * 4096, e820(d.ty));
            last = match last {
                Some((s, z, t)) if t == ty && s + z == start => Some((s, z + size, t)),
                Some(prev) => {
                    emit(self, prev);
                    Some((start, size, ty))
                }
                None => Some((start, size, ty)),
            };
        }
        if let Some(prev) = last {
            emit(self, prev);
        }
        self.put32(48, n as u32);
    }

    pub fn address(&self) -> u32 {
        self.base as u32
    }
}

/// COM1, for the panic message (boot services may be gone).
pub struct Com1;

impl core::fmt::Write for Com1 {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            // SAFETY: writes to the 16550's data register at 0x3f8; QEMU
            // always has it on the machines we boot on.
            unsafe { core::arch::asm!("out dx, al", in("dx") 0x3f8u16, in("al") b) };
        }
        Ok(())
    }
}
