//! Block status extents as the spec wants them (QEMU:
//! `blockstatus_to_extents` and `nbd_extent_array` in `nbd/server.c`).
//!
//! The host reports consecutive [`BlockStatus`] extents however its node
//! sees them; the engine turns them into `base:allocation` descriptors
//! that obey every rule of `NBD_REPLY_TYPE_BLOCK_STATUS`: no zero-length
//! descriptor, neighbours with equal flags merged, lengths multiples of the
//! minimum block size (a block that mixes statuses gets only the flags all
//! its parts share, so the answer stays true), nothing past the end of the
//! export, at most one descriptor no longer than the request under
//! `NBD_CMD_FLAG_REQ_ONE`, the reply stopping after the descriptor that
//! reaches the requested length, 32-bit lengths in compact replies, and at
//! most [`MAX_DESCRIPTORS`] descriptors. The `qemu:` contexts
//! (`qemu:allocation-depth`, `qemu:dirty-bitmap:*`) get the same shaping
//! from raw descriptors ([`normalize_raw`]), each with its own rule for a
//! block that mixes values ([`Combine`]).

use alloc::vec::Vec;

use super::repr::Descriptor;
use super::wire::state;
use crate::io::BlockStatus;

/// The most descriptors one reply carries (the spec allows up to 2^20; a
/// client asks again from where the reply stopped).
pub const MAX_DESCRIPTORS: usize = 1 << 16;

/// The request an answer is shaped for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    /// Offset of the request (aligned to `min_block`).
    pub offset: u64,
    /// Requested length (nonzero).
    pub len: u64,
    /// Export size.
    pub size: u64,
    /// Minimum block size.
    pub min_block: u64,
    /// `NBD_CMD_FLAG_REQ_ONE`.
    pub req_one: bool,
    /// 64-bit descriptor lengths (extended headers).
    pub wide: bool,
}

/// `base:allocation` flags of an extent, as QEMU reports them: no
/// `BDRV_BLOCK_DATA` is a hole, `BDRV_BLOCK_ZERO` reads as zeroes.
pub fn allocation_flags(s: &BlockStatus) -> u32 {
    let mut f = 0;
    if !s.data {
        f |= state::HOLE;
    }
    if s.zero {
        f |= state::ZERO;
    }
    f
}

/// How the parts of a block that mixes statuses are told as one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// Only the flags all parts share (`base:allocation`: a block is a
    /// hole or zero only if all of it is).
    All,
    /// Any part's flags (`qemu:dirty-bitmap:*`: a block is dirty if any of
    /// it is, so a backup never misses a write).
    Any,
    /// The shallowest nonzero depth (`qemu:allocation-depth`: a block
    /// partly allocated reads right from the shallowest layer holding a
    /// part of it).
    Depth,
}

impl Combine {
    fn apply(self, a: u32, b: u32) -> u32 {
        match self {
            Combine::All => a & b,
            Combine::Any => a | b,
            Combine::Depth if a == 0 => b,
            Combine::Depth if b == 0 => a,
            Combine::Depth => a.min(b),
        }
    }
}

fn push(out: &mut Vec<Descriptor>, length: u64, flags: u32) {
    if length == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.flags == flags => last.length += length,
        _ => out.push(Descriptor { length, flags }),
    }
}

/// Shape `input` (extents starting at `q.offset`) into descriptors,
/// appended to `out` (cleared first). `out` ends empty only if `input`
/// covered nothing.
pub fn normalize(input: &[BlockStatus], q: Query, out: &mut Vec<Descriptor>) {
    let raw = input.iter().map(|s| Descriptor {
        length: s.len,
        flags: allocation_flags(s),
    });
    shape(raw, q, Combine::All, out);
}

/// The same for raw descriptors of any context, mixed blocks told by
/// `combine`.
pub fn normalize_raw(input: &[Descriptor], q: Query, combine: Combine, out: &mut Vec<Descriptor>) {
    shape(input.iter().copied(), q, combine, out);
}

fn shape(
    input: impl Iterator<Item = Descriptor>,
    q: Query,
    combine: Combine,
    out: &mut Vec<Descriptor>,
) {
    out.clear();
    let b = q.min_block.max(1);
    let limit = q.size.saturating_sub(q.offset);
    let mut pos = 0u64;
    // A block partly covered so far: its index and the flags its parts
    // share.
    let mut pending: Option<(u64, u32)> = None;
    for s in input {
        if pos >= q.len || pos >= limit || out.len() > MAX_DESCRIPTORS {
            break;
        }
        if s.length == 0 {
            continue;
        }
        let flags = s.flags;
        let start = pos;
        let end = start.saturating_add(s.length).min(limit);
        if !start.is_multiple_of(b)
            && let Some((k, f)) = pending.as_mut()
            && *k == start / b
        {
            *f = combine.apply(*f, flags);
        }
        let first_full = start.div_ceil(b);
        let last_full = end / b;
        if first_full < last_full {
            if let Some((_, f)) = pending.take() {
                push(out, b, f);
            }
            push(out, (last_full - first_full) * b, flags);
        }
        if !end.is_multiple_of(b) {
            let k = end / b;
            pending = match pending {
                Some((pk, f)) if pk == k => Some((k, combine.apply(f, flags))),
                Some((_, f)) => {
                    push(out, b, f);
                    Some((k, flags))
                }
                None => Some((k, flags)),
            };
        }
        pos = end;
    }
    if let Some((k, f)) = pending {
        let block_start = k * b;
        push(out, b.min(limit.saturating_sub(block_start)), f);
    }

    if q.req_one {
        out.truncate(1);
        if let Some(d) = out.first_mut() {
            d.length = d.length.min(q.len);
        }
        return;
    }
    let mut covered = 0u64;
    let mut keep = 0;
    for d in out.iter_mut() {
        keep += 1;
        if !q.wide && d.length > u64::from(u32::MAX) {
            d.length = u64::from(u32::MAX) / b * b;
            break;
        }
        covered = covered.saturating_add(d.length);
        if covered >= q.len || keep == MAX_DESCRIPTORS {
            break;
        }
    }
    out.truncate(keep);
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn q(len: u64, min_block: u64) -> Query {
        Query {
            offset: 0,
            len,
            size: 1 << 20,
            min_block,
            req_one: false,
            wide: false,
        }
    }

    fn hole(len: u64) -> BlockStatus {
        BlockStatus {
            data: false,
            zero: true,
            allocated: false,
            len,
        }
    }

    fn d(length: u64, flags: u32) -> Descriptor {
        Descriptor { length, flags }
    }

    const HZ: u32 = state::HOLE | state::ZERO;

    #[test]
    fn merges_and_drops_empty_extents() {
        let mut out = Vec::new();
        let input = [
            BlockStatus::data(4096),
            BlockStatus::data(0),
            BlockStatus::data(4096),
            hole(8192),
        ];
        normalize(&input, q(16384, 1), &mut out);
        assert_eq!(out, vec![d(8192, 0), d(8192, HZ)]);
    }

    #[test]
    fn mixed_blocks_keep_only_shared_flags() {
        let mut out = Vec::new();
        // 512-byte minimum: data 100 bytes, hole 924, data 1024.
        let input = [
            BlockStatus::data(100),
            hole(924 + 512),
            BlockStatus::data(512),
        ];
        normalize(&input, q(2048, 512), &mut out);
        // Block 0 mixes data and hole → 0; block 1 hole; block 2... the
        // hole ended at 1536, so block 2 is data.
        assert_eq!(out, vec![d(512, 0), d(1024, HZ), d(512, 0)]);
        for e in &out {
            assert_eq!(e.length % 512, 0);
        }
    }

    #[test]
    fn stops_after_the_requested_length_and_clamps_to_the_export() {
        let mut out = Vec::new();
        let input = [
            BlockStatus::data(4096),
            hole(1 << 30),
            BlockStatus::data(4096),
        ];
        normalize(&input, q(8192, 1), &mut out);
        assert_eq!(out, vec![d(4096, 0), d((1 << 20) - 4096, HZ)]);
    }

    #[test]
    fn req_one_gives_one_extent_within_the_request() {
        let mut out = Vec::new();
        let mut query = q(4096, 1);
        query.req_one = true;
        normalize(&[hole(1 << 19), BlockStatus::data(4096)], query, &mut out);
        assert_eq!(out, vec![d(4096, HZ)]);
    }

    #[test]
    fn compact_lengths_fit_32_bits() {
        let mut out = Vec::new();
        let mut query = q(u64::from(u32::MAX) + 4096, 512);
        query.size = 1 << 40;
        normalize(&[hole(1 << 33)], query, &mut out);
        assert_eq!(out, vec![d(u64::from(u32::MAX) / 512 * 512, HZ)]);
        query.wide = true;
        normalize(&[hole(1 << 33)], query, &mut out);
        assert_eq!(out, vec![d(1 << 33, HZ)]);
    }

    #[test]
    fn nothing_in_nothing_out() {
        let mut out = Vec::new();
        normalize(&[BlockStatus::data(0)], q(4096, 1), &mut out);
        assert!(out.is_empty());
    }
}
