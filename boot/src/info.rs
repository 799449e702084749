//! [`BootInfo`]: what the boot protocol told us, copied into the image so
//! that low memory can be reused. PVH fills it, whether QEMU's `-kernel` or
//! the UEFI loader (`efi/`, which starts the image through PVH) started us.

/// Kinds of memory in the firmware's map (the E820 / PVH numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryType {
    Ram,
    Reserved,
    AcpiReclaimable,
    AcpiNvs,
    Unusable,
    Other(u32),
}

impl MemoryType {
    pub fn from_e820(t: u32) -> Self {
        match t {
            1 => Self::Ram,
            2 => Self::Reserved,
            3 => Self::AcpiReclaimable,
            4 => Self::AcpiNvs,
            5 => Self::Unusable,
            other => Self::Other(other),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct MemoryRegion {
    pub start: u64,
    pub size: u64,
    pub kind: MemoryType,
}

impl MemoryRegion {
    pub const fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }
}

pub const MAX_REGIONS: usize = 64;
pub const MAX_CMDLINE: usize = 4096;

/// The boot facts, owned by the image.
pub struct BootInfo {
    regions: [MemoryRegion; MAX_REGIONS],
    region_count: usize,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    /// True when the command line was longer than [`MAX_CMDLINE`].
    pub cmdline_truncated: bool,
    /// Physical address of the ACPI RSDP, if the loader gave one.
    pub rsdp: Option<u64>,
    /// Which protocol started us ("PVH").
    pub protocol: &'static str,
    /// Regions the map had but that did not fit into `regions`.
    pub regions_dropped: usize,
    /// The configuration file (PVH module 0): physical address and length,
    /// below 4 GiB and out of the RAM map.
    config: Option<(u64, u64)>,
}

impl BootInfo {
    pub(crate) const fn empty() -> Self {
        Self {
            regions: [MemoryRegion {
                start: 0,
                size: 0,
                kind: MemoryType::Reserved,
            }; MAX_REGIONS],
            region_count: 0,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            cmdline_truncated: false,
            rsdp: None,
            protocol: "none",
            regions_dropped: 0,
            config: None,
        }
    }

    pub(crate) fn push_region(&mut self, region: MemoryRegion) {
        if region.size == 0 {
            return; // microvm's map has a zero-size entry
        }
        if self.region_count == MAX_REGIONS {
            self.regions_dropped += 1;
            return;
        }
        self.regions[self.region_count] = region;
        self.region_count += 1;
        self.regions[..self.region_count].sort_unstable_by_key(|r| r.start);
    }

    pub(crate) fn set_cmdline(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(MAX_CMDLINE);
        self.cmdline[..n].copy_from_slice(&bytes[..n]);
        self.cmdline_len = n;
        self.cmdline_truncated = bytes.len() > MAX_CMDLINE;
    }

    /// Records the configuration file and takes its pages out of RAM:
    /// each RAM region it touches is split around it.
    pub(crate) fn set_config(&mut self, start: u64, size: u64) {
        self.config = Some((start, size));
        let (lo, hi) = (start & !4095, (start + size + 4095) & !4095);
        let old = self.regions;
        let count = self.region_count;
        self.region_count = 0;
        for r in &old[..count] {
            if r.kind != MemoryType::Ram || r.end() <= lo || r.start >= hi {
                self.push_region(*r);
                continue;
            }
            let pieces = [
                (r.start, lo.max(r.start), MemoryType::Ram),
                (lo.max(r.start), hi.min(r.end()), MemoryType::Reserved),
                (hi.min(r.end()), r.end(), MemoryType::Ram),
            ];
            for (s, e, kind) in pieces {
                self.push_region(MemoryRegion {
                    start: s,
                    size: e.saturating_sub(s),
                    kind,
                });
            }
        }
    }

    /// The configuration file the loader passed (module 0), if any.
    pub fn config_file(&self) -> Option<&'static [u8]> {
        let (start, size) = self.config?;
        // SAFETY: the loader placed the module there, below 4 GiB (always
        // identity-mapped), and `set_config` took its pages out of the RAM
        // map, so nothing else writes them.
        Some(unsafe { core::slice::from_raw_parts(start as *const u8, size as usize) })
    }

    /// The memory map, sorted by start address, zero-sized entries dropped.
    pub fn regions(&self) -> &[MemoryRegion] {
        &self.regions[..self.region_count]
    }

    /// Usable RAM regions.
    pub fn ram(&self) -> impl Iterator<Item = &MemoryRegion> {
        self.regions().iter().filter(|r| r.kind == MemoryType::Ram)
    }

    /// The kernel command line (`-append`), lossily as UTF-8.
    pub fn cmdline(&self) -> &str {
        let bytes = &self.cmdline[..self.cmdline_len];
        match core::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
        }
    }

    /// End of the highest RAM region.
    pub fn ram_end(&self) -> u64 {
        self.ram().map(MemoryRegion::end).max().unwrap_or(0)
    }
}
