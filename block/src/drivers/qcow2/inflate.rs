//! Raw deflate decompression (RFC 1951) for compressed clusters (QEMU:
//! `qcow2_zlib_decompress`, zlib's `inflate` with a negative window, i.e.
//! no zlib header). Stored, fixed-Huffman and dynamic-Huffman blocks.
//!
//! As QEMU, decompression succeeds once the output buffer (one cluster) is
//! full, even if the stream goes on; it fails if the stream ends early or
//! is malformed. Safe on any input: every read is bounds-checked.

use alloc::vec;
use alloc::vec::Vec;

/// Why a stream could not be decompressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// The input ended before the output was full.
    Truncated,
    /// A malformed block header, code table or distance.
    Malformed,
}

struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    bit: u32,
    nbits: u32,
}

impl Bits<'_> {
    fn need(&mut self, n: u32) -> Result<u32, InflateError> {
        while self.nbits < n {
            let b = *self.data.get(self.pos).ok_or(InflateError::Truncated)?;
            self.pos += 1;
            self.bit |= u32::from(b) << self.nbits;
            self.nbits += 8;
        }
        let v = self.bit & ((1u32 << n) - 1);
        self.bit >>= n;
        self.nbits -= n;
        Ok(v)
    }
}

/// A canonical Huffman decoding table (counts per length, symbols by code).
struct Huffman {
    count: [u16; 16],
    symbol: Vec<u16>,
}

impl Huffman {
    fn new(lengths: &[u8]) -> Result<Huffman, InflateError> {
        let mut count = [0u16; 16];
        for &l in lengths {
            count[usize::from(l)] += 1;
        }
        count[0] = 0;
        let mut left: i32 = 1;
        for c in count.iter().skip(1) {
            left = (left << 1) - i32::from(*c);
            if left < 0 {
                return Err(InflateError::Malformed);
            }
        }
        let mut offs = [0u16; 16];
        for i in 1..15 {
            offs[i + 1] = offs[i] + count[i];
        }
        let mut symbol = vec![0u16; lengths.len()];
        for (s, &l) in lengths.iter().enumerate() {
            if l != 0 {
                let o = &mut offs[usize::from(l)];
                if let Some(slot) = symbol.get_mut(usize::from(*o)) {
                    *slot = s as u16;
                }
                *o += 1;
            }
        }
        Ok(Huffman { count, symbol })
    }

    fn decode(&self, b: &mut Bits<'_>) -> Result<u16, InflateError> {
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..16 {
            code |= b.need(1)? as i32;
            let count = i32::from(self.count[len]);
            if code - count < first {
                return self
                    .symbol
                    .get((index + (code - first)) as usize)
                    .copied()
                    .ok_or(InflateError::Malformed);
            }
            index += count;
            first += count;
            first <<= 1;
            code <<= 1;
        }
        Err(InflateError::Malformed)
    }
}

const LEN_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEN_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
const CLEN_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// Output buffer that reports when it is full.
struct Out<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Out<'_> {
    fn full(&self) -> bool {
        self.pos >= self.buf.len()
    }
    fn push(&mut self, b: u8) {
        if let Some(s) = self.buf.get_mut(self.pos) {
            *s = b;
            self.pos += 1;
        }
    }
}

fn codes(
    b: &mut Bits<'_>,
    out: &mut Out<'_>,
    lit: &Huffman,
    dist: &Huffman,
) -> Result<bool, InflateError> {
    loop {
        if out.full() {
            return Ok(true);
        }
        let sym = lit.decode(b)?;
        match sym {
            0..=255 => out.push(sym as u8),
            256 => return Ok(false),
            _ => {
                let i = usize::from(sym - 257);
                let len = *LEN_BASE.get(i).ok_or(InflateError::Malformed)? as usize
                    + b.need(u32::from(LEN_EXTRA[i]))? as usize;
                let d = usize::from(dist.decode(b)?);
                let dist = *DIST_BASE.get(d).ok_or(InflateError::Malformed)? as usize
                    + b.need(u32::from(DIST_EXTRA[d]))? as usize;
                if dist > out.pos {
                    return Err(InflateError::Malformed);
                }
                for _ in 0..len {
                    if out.full() {
                        return Ok(true);
                    }
                    let c = out.buf[out.pos - dist];
                    out.push(c);
                }
            }
        }
    }
}

fn dynamic(b: &mut Bits<'_>) -> Result<(Huffman, Huffman), InflateError> {
    let nlen = b.need(5)? as usize + 257;
    let ndist = b.need(5)? as usize + 1;
    let ncode = b.need(4)? as usize + 4;
    if nlen > 286 || ndist > 30 {
        return Err(InflateError::Malformed);
    }
    let mut lengths = [0u8; 320];
    for &i in CLEN_ORDER.iter().take(ncode) {
        lengths[i] = b.need(3)? as u8;
    }
    let clen = Huffman::new(&lengths[..19])?;
    let mut index = 0;
    while index < nlen + ndist {
        let sym = clen.decode(b)?;
        if sym < 16 {
            lengths[index] = sym as u8;
            index += 1;
            continue;
        }
        let (val, rep) = match sym {
            16 => {
                if index == 0 {
                    return Err(InflateError::Malformed);
                }
                (lengths[index - 1], 3 + b.need(2)? as usize)
            }
            17 => (0, 3 + b.need(3)? as usize),
            _ => (0, 11 + b.need(7)? as usize),
        };
        if index + rep > nlen + ndist {
            return Err(InflateError::Malformed);
        }
        for _ in 0..rep {
            lengths[index] = val;
            index += 1;
        }
    }
    if lengths[256] == 0 {
        return Err(InflateError::Malformed);
    }
    Ok((
        Huffman::new(&lengths[..nlen])?,
        Huffman::new(&lengths[nlen..nlen + ndist])?,
    ))
}

/// Decompresses `input` until `out` is full.
pub fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), InflateError> {
    let mut b = Bits {
        data: input,
        pos: 0,
        bit: 0,
        nbits: 0,
    };
    let mut o = Out { buf: out, pos: 0 };
    loop {
        if o.full() {
            return Ok(());
        }
        let last = b.need(1)? == 1;
        match b.need(2)? {
            0 => {
                b.bit = 0;
                b.nbits = 0;
                let hdr = input.get(b.pos..b.pos + 4).ok_or(InflateError::Truncated)?;
                let len = usize::from(u16::from_le_bytes([hdr[0], hdr[1]]));
                let nlen = u16::from_le_bytes([hdr[2], hdr[3]]);
                if nlen != !(len as u16) {
                    return Err(InflateError::Malformed);
                }
                b.pos += 4;
                let data = input
                    .get(b.pos..b.pos + len)
                    .ok_or(InflateError::Truncated)?;
                b.pos += len;
                for &c in data {
                    o.push(c);
                }
            }
            1 => {
                let mut l = [0u8; 288];
                l[..144].fill(8);
                l[144..256].fill(9);
                l[256..280].fill(7);
                l[280..].fill(8);
                let lit = Huffman::new(&l)?;
                let dist = Huffman::new(&[5u8; 30])?;
                if codes(&mut b, &mut o, &lit, &dist)? {
                    return Ok(());
                }
            }
            2 => {
                let (lit, dist) = dynamic(&mut b)?;
                if codes(&mut b, &mut o, &lit, &dist)? {
                    return Ok(());
                }
            }
            _ => return Err(InflateError::Malformed),
        }
        if last {
            return if o.full() {
                Ok(())
            } else {
                Err(InflateError::Truncated)
            };
        }
    }
}
