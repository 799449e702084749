//! The kernel partition's payload, written by `harness::esp::pack_kernel`:
//! a 32-byte header (the magic `BHKERNEL`, the kernel's length and the LZ4
//! block's length as little-endian u64s, the block's Adler-32 as a u32,
//! four zero bytes), then the PVH image as one LZ4 block. Unpacked into
//! pages of its own, so the rest of the loader sees the plain ELF.

use uefi::Status;
use uefi::boot::MemoryType;

use crate::{PAGE, mem};

/// The header's length.
pub const HEADER: usize = 32;
const MAGIC: &[u8; 8] = b"BHKERNEL";
const CORRUPT: &str = "the kernel partition is corrupt";

/// What the header says.
pub struct Header {
    /// The kernel ELF's length.
    pub kernel_len: usize,
    /// The LZ4 block's length (it follows the header).
    pub block_len: usize,
    sum: u32,
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Parses the header at the start of `first` (the partition's first
/// sector).
pub fn header(first: &[u8]) -> Result<Header, &'static str> {
    if first.get(..8) != Some(MAGIC) {
        return Err("the kernel partition holds no blockhaus kernel");
    }
    let kernel_len = u64_at(first, 8).ok_or(CORRUPT)?;
    let block_len = u64_at(first, 16).ok_or(CORRUPT)?;
    let sum = first
        .get(24..28)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(CORRUPT)?;
    // The kernel lies below 4 GiB: anything near that is damage.
    let (Ok(kernel_len), Ok(block_len)) = (u32::try_from(kernel_len), u32::try_from(block_len))
    else {
        return Err(CORRUPT);
    };
    if kernel_len == 0 || block_len == 0 {
        return Err(CORRUPT);
    }
    Ok(Header {
        kernel_len: kernel_len as usize,
        block_len: block_len as usize,
        sum,
    })
}

/// The kernel ELF, unpacked from `payload` (the partition's bytes from
/// its start, `header` first) into LOADER_DATA pages below 4 GiB
/// (anywhere: it is read only until `elf::Image::load` has laid it out
/// elsewhere).
pub fn unpack(header: &Header, payload: &[u8]) -> Result<&'static [u8], (&'static str, Status)> {
    let corrupt = (CORRUPT, Status::LOAD_ERROR);
    let block = payload
        .get(HEADER..HEADER + header.block_len)
        .ok_or(corrupt)?;
    if adler2::adler32_slice(block) != header.sum {
        return Err(corrupt);
    }
    let len = header.kernel_len;
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
