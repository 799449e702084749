//! The PVH image: its loadable segments (ELF64 program headers) and
//! entry point. The image is linked at its physical address (1 MiB up), so
//! loading is copying each segment to `p_paddr` and zeroing the rest of its
//! memory size and the gaps between segments.

const PT_LOAD: u32 = 1;
const BELOW_4G: u64 = 1 << 32;

pub struct Image {
    bytes: &'static [u8],
    phoff: usize,
    phnum: usize,
    entry: u64,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// One PT_LOAD: (file offset, physical address, file size, memory size).
type Segment = (usize, u64, usize, u64);

impl Image {
    pub fn parse(bytes: &'static [u8]) -> Result<Self, &'static str> {
        if bytes.get(..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&2) {
            return Err("the kernel is not an ELF64 file");
        }
        let bad = "the kernel's ELF header is truncated";
        let me = Self {
            bytes,
            entry: u64_at(bytes, 24).ok_or(bad)?,
            phoff: u64_at(bytes, 32).ok_or(bad)? as usize,
            phnum: u16_at(bytes, 56).ok_or(bad)? as usize,
        };
        if me.phnum == 0 || me.segments().count() != me.phnum_load() {
            return Err("the kernel has a bad program header");
        }
        // In ascending order and apart, as ELF requires, and below 4 GiB:
        // `load` relies on it.
        let mut end = 0;
        for (_, paddr, _, memsz) in me.segments() {
            if paddr < end || paddr.saturating_add(memsz) > BELOW_4G {
                return Err("the kernel's segments overlap or are out of order");
            }
            end = paddr + memsz;
        }
        if me.entry > u32::MAX as u64 {
            return Err("the kernel's entry is above 4 GiB");
        }
        Ok(me)
    }

    fn phnum_load(&self) -> usize {
        (0..self.phnum)
            .filter(|i| u32_at(self.bytes, self.phoff + i * 56) == Some(PT_LOAD))
            .count()
    }

    /// The loadable segments that lie inside the file.
    fn segments(&self) -> impl Iterator<Item = Segment> + '_ {
        (0..self.phnum).filter_map(move |i| {
            let ph = self.phoff + i * 56;
            if u32_at(self.bytes, ph)? != PT_LOAD {
                return None;
            }
            let offset = u64_at(self.bytes, ph + 8)? as usize;
            let paddr = u64_at(self.bytes, ph + 24)?;
            let filesz = u64_at(self.bytes, ph + 32)? as usize;
            let memsz = u64_at(self.bytes, ph + 40)?;
            (offset.checked_add(filesz)? <= self.bytes.len() && filesz as u64 <= memsz)
                .then_some((offset, paddr, filesz, memsz))
        })
    }

    /// The physical range the image occupies, page-aligned.
    pub fn range(&self) -> (u64, u64) {
        let start = self.segments().map(|s| s.1).min().unwrap_or(0) & !0xfff;
        let end = self.segments().map(|s| s.1 + s.3).max().unwrap_or(0);
        (start, (end + 0xfff) & !0xfff)
    }

    /// The 32-bit entry (`pvh_start`).
    pub fn entry(&self) -> u32 {
        self.entry as u32
    }

    /// Lays the segments out at `base` as they lie in memory from
    /// [`Image::range`]'s start, ready to be copied there as one block:
    /// each segment's file bytes copied, and only what no file byte covers
    /// zeroed (the gaps between segments and their BSS; zeroing the whole
    /// range first would write its 1.2 MB of code and data twice, and TCG
    /// is slow at that).
    ///
    /// # Safety
    /// `base` must point at [`Image::range`]'s length of memory, writable
    /// and owned by the caller.
    pub unsafe fn load(&self, base: *mut u8) {
        let (start, end) = self.range();
        let mut at = start;
        // Segments come in ascending, non-overlapping order (`parse`).
        for (offset, paddr, filesz, memsz) in self.segments() {
            // SAFETY: `[start, end)` is the caller's; `at <= paddr` and
            // `paddr + memsz <= end` by `parse` and the definition of
            // `range`; the source lies inside the file.
            unsafe {
                base.add((at - start) as usize)
                    .write_bytes(0, (paddr - at) as usize);
                let dst = base.add((paddr - start) as usize);
                dst.copy_from_nonoverlapping(self.bytes.as_ptr().add(offset), filesz);
                dst.add(filesz)
                    .write_bytes(0, (memsz - filesz as u64) as usize);
            }
            at = paddr + memsz;
        }
        // SAFETY: as above; `at <= end`.
        unsafe {
            base.add((at - start) as usize)
                .write_bytes(0, (end - at) as usize)
        };
    }
}
