//! The carried PVH image, compressed by `build.rs` (`pack`): its length as
//! a little-endian u64, the Adler-32 of the rest, then one LZ4 block.
//! Unpacked into pages of its own before anything else, so the rest of the
//! loader sees the plain ELF.

use uefi::Status;
use uefi::boot::MemoryType;

use crate::{PAGE, mem};

static PACKED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernel.z"));

/// The kernel ELF, unpacked into LOADER_DATA pages below 4 GiB (anywhere:
/// it is read only until `elf::Image::load` has laid it out elsewhere).
pub fn unpack() -> Result<&'static [u8], (&'static str, Status)> {
    let corrupt = ("the carried kernel is corrupt", Status::LOAD_ERROR);
    let (len, rest) = PACKED.split_first_chunk::<8>().ok_or(corrupt)?;
    let (sum, block) = rest.split_first_chunk::<4>().ok_or(corrupt)?;
    let len = usize::try_from(u64::from_le_bytes(*len)).map_err(|_| corrupt)?;
    if adler2::adler32_slice(block) != u32::from_le_bytes(*sum) {
        return Err(corrupt);
    }
    if len == 0 {
        return Ok(&[]);
    }
    let pages = len.div_ceil(PAGE);
    let at = mem::allocate(pages, MemoryType::LOADER_DATA, (0, 0))
        .map_err(|s| ("no memory to unpack the kernel", s))?;
    // SAFETY: `pages` pages were just allocated at `at`, identity-mapped;
    // they are never freed, so the slice lives as long as the loader.
    let out: &'static mut [u8] = unsafe { core::slice::from_raw_parts_mut(at.as_ptr(), len) };
    match lz4_flex::block::decompress_into(block, out) {
        Ok(n) if n == len => Ok(out),
        _ => Err(corrupt),
    }
}
