//! The kernel partition's payload, written by `harness::esp::pack_kernel`:
//! a 32-byte header (the magic `BHKERNEL`, the kernel's length as a
//! little-endian u64, its Adler-32 as a u32, zeroes), then the PVH image.

/// The header's length.
pub const HEADER: usize = 32;
const MAGIC: &[u8; 8] = b"BHKERNEL";
pub const CORRUPT: &str = "the kernel partition is corrupt";

/// What the header says.
pub struct Header {
    /// The kernel ELF's length (it follows the header).
    pub kernel_len: usize,
    sum: u32,
}

/// Parses the header at the start of `first` (the partition's first
/// sector).
pub fn header(first: &[u8]) -> Result<Header, &'static str> {
    if first.get(..8) != Some(MAGIC) {
        return Err("the kernel partition holds no blockhaus kernel");
    }
    let len = first
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or(CORRUPT)?;
    let sum = first
        .get(16..20)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(CORRUPT)?;
    // The kernel lies below 4 GiB: anything near that is damage.
    match u32::try_from(len) {
        Ok(len) if len > 0 => Ok(Header {
            kernel_len: len as usize,
            sum,
        }),
        _ => Err(CORRUPT),
    }
}

/// The kernel ELF inside `payload` (the partition's bytes from its start,
/// `header` first), once its checksum matches.
pub fn kernel<'a>(header: &Header, payload: &'a [u8]) -> Result<&'a [u8], &'static str> {
    let kernel = payload
        .get(HEADER..HEADER + header.kernel_len)
        .ok_or(CORRUPT)?;
    if adler2::adler32_slice(kernel) != header.sum {
        return Err(CORRUPT);
    }
    Ok(kernel)
}
