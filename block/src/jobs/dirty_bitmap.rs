//! A dirty bitmap: which `granularity`-sized chunks of a node changed
//! (QEMU: `BdrvDirtyBitmap`, `bdrv_set_dirty_bitmap`,
//! `bdrv_reset_dirty_bitmap`, `bdrv_dirty_iter_next`,
//! `bdrv_get_dirty_count`).
//!
//! Mirror marks what the source's users wrote; backup's copy bitmap marks
//! what still has to be copied. Offsets are bytes; a range marks every
//! chunk it touches.

use alloc::vec;
use alloc::vec::Vec;

/// One bitmap over `len` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    granularity: u64,
    len: u64,
    words: Vec<u64>,
    count: u64,
}

impl DirtyBitmap {
    /// A clean bitmap over `len` bytes; `granularity` is a power of two.
    pub fn new(len: u64, granularity: u64) -> DirtyBitmap {
        let granularity = granularity.max(1);
        let chunks = len.div_ceil(granularity);
        DirtyBitmap {
            granularity,
            len,
            words: vec![0; chunks.div_ceil(64) as usize],
            count: 0,
        }
    }

    /// The chunk size in bytes.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// The covered length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap covers nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn chunks(&self) -> u64 {
        self.len.div_ceil(self.granularity)
    }

    fn range(&self, offset: u64, len: u64) -> core::ops::Range<u64> {
        let end = offset.saturating_add(len).min(self.len);
        if len == 0 || offset >= end {
            return 0..0;
        }
        offset / self.granularity..end.div_ceil(self.granularity)
    }

    /// Whether chunk `i` is dirty.
    pub fn get_chunk(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn put(&mut self, i: u64, dirty: bool) {
        if let Some(w) = self.words.get_mut((i / 64) as usize) {
            let bit = 1u64 << (i % 64);
            let was = *w & bit != 0;
            if dirty && !was {
                *w |= bit;
                self.count += 1;
            } else if !dirty && was {
                *w &= !bit;
                self.count -= 1;
            }
        }
    }

    /// Marks every chunk touching `[offset, offset + len)` dirty.
    pub fn set(&mut self, offset: u64, len: u64) {
        let r = self.range(offset, len);
        let mut i = r.start;
        while i < r.end {
            // Whole words at once: a large write or discard is on every
            // request's path.
            if i.is_multiple_of(64)
                && i + 64 <= r.end
                && let Some(w) = self.words.get_mut((i / 64) as usize)
            {
                self.count += u64::from((!*w).count_ones());
                *w = u64::MAX;
                i += 64;
                continue;
            }
            self.put(i, true);
            i += 1;
        }
    }

    /// Marks every chunk touching the range clean.
    pub fn reset(&mut self, offset: u64, len: u64) {
        for i in self.range(offset, len) {
            self.put(i, false);
        }
    }

    /// Marks everything dirty.
    pub fn set_all(&mut self) {
        self.set(0, self.len);
    }

    /// Whether any chunk touching the range is dirty.
    pub fn is_dirty(&self, offset: u64, len: u64) -> bool {
        self.range(offset, len).any(|i| self.get_chunk(i))
    }

    /// Dirty bytes (QEMU: `bdrv_get_dirty_count`), counting whole chunks
    /// but never past the end.
    pub fn dirty_bytes(&self) -> u64 {
        let last = self.chunks().saturating_sub(1);
        let mut n = self.count * self.granularity;
        if self.count > 0 && self.get_chunk(last) {
            n -= last
                .saturating_add(1)
                .saturating_mul(self.granularity)
                .saturating_sub(self.len);
        }
        n
    }

    /// The first dirty chunk at or after byte `from`, as `(offset, len)`
    /// extended over following dirty chunks up to `max_len` bytes (QEMU:
    /// `bdrv_dirty_iter_next` + `bdrv_dirty_bitmap_next_dirty_area`).
    pub fn next_dirty(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        let chunks = self.chunks();
        let mut i = from / self.granularity;
        while i < chunks {
            let w = self.words.get((i / 64) as usize).copied().unwrap_or(0) >> (i % 64);
            if w == 0 {
                i = (i / 64 + 1) * 64;
                continue;
            }
            i += u64::from(w.trailing_zeros());
            break;
        }
        if i >= chunks {
            return None;
        }
        let start = i * self.granularity;
        let max_chunks = (max_len / self.granularity).max(1);
        let mut n = 1;
        while n < max_chunks && i + n < chunks && self.get_chunk(i + n) {
            n += 1;
        }
        let end = ((i + n) * self.granularity).min(self.len);
        Some((start, end - start))
    }
    /// Bytes `[byte, byte + n)` of the bitmap as stored on disk (QEMU:
    /// `bdrv_dirty_bitmap_serialize_part`): chunk `k` is bit `k % 8` of
    /// byte `k / 8`; bits past the end are 0.
    pub fn serialize(&self, byte: u64, n: usize) -> Vec<u8> {
        (0..n as u64)
            .map(|j| {
                let w = self
                    .words
                    .get(((byte + j) / 8) as usize)
                    .copied()
                    .unwrap_or(0);
                (w >> (((byte + j) % 8) * 8)) as u8
            })
            .collect()
    }

    /// Marks dirty every chunk whose bit is set in `bytes`, stored from
    /// byte `byte` on (QEMU: `bdrv_dirty_bitmap_deserialize_part`); bits
    /// past the end are ignored.
    pub fn deserialize(&mut self, byte: u64, bytes: &[u8]) {
        let chunks = self.chunks();
        for (j, &b) in bytes.iter().enumerate() {
            let k = byte + j as u64;
            let first = k * 8;
            if first >= chunks {
                break;
            }
            let mut bits = u64::from(b);
            if first + 8 > chunks {
                bits &= (1 << (chunks - first)) - 1;
            }
            if bits == 0 {
                continue;
            }
            if let Some(w) = self.words.get_mut((k / 8) as usize) {
                let new = (bits << ((k % 8) * 8)) & !*w;
                *w |= new;
                self.count += u64::from(new.count_ones());
            }
        }
    }

    /// Marks dirty what is dirty in `other`, whatever its granularity
    /// (QEMU: `hbitmap_merge`); `other` covers the same length.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        let mut at = 0;
        while let Some((off, len)) = other.next_dirty(at, u64::MAX) {
            self.set(off, len);
            at = off + len;
        }
    }

    /// The same bitmap over `len` bytes: what lies past the end is
    /// dropped, a new tail is clean (QEMU: `bdrv_dirty_bitmap_truncate`).
    pub fn resized(&self, len: u64) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(len, self.granularity);
        b.merge(self);
        b
    }

    /// Marks everything clean.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_reset_count_and_iterate() {
        let mut b = DirtyBitmap::new(10 * 512 + 100, 512);
        assert_eq!(b.dirty_bytes(), 0);
        assert_eq!(b.next_dirty(0, 1 << 20), None);
        b.set(700, 10);
        assert_eq!(b.dirty_bytes(), 512);
        assert_eq!(b.next_dirty(0, 1 << 20), Some((512, 512)));
        b.set(1024, 2048);
        assert_eq!(b.next_dirty(0, 1 << 20), Some((512, 2560)));
        assert_eq!(b.next_dirty(0, 1024), Some((512, 1024)));
        b.set(5200, 1);
        assert_eq!(b.next_dirty(3100, 1 << 20), Some((5120, 100)));
        assert_eq!(b.dirty_bytes(), 2560 + 100);
        b.reset(0, 4096);
        assert_eq!(b.next_dirty(0, 1 << 20), Some((5120, 100)));
        b.set_all();
        assert_eq!(b.dirty_bytes(), 10 * 512 + 100);
        assert!(b.is_dirty(5119, 1));
    }

    #[test]
    fn large_ranges_set_whole_words() {
        let mut b = DirtyBitmap::new(1000 * 512, 512);
        b.set(3 * 512, 1);
        b.set(64 * 512, 1);
        b.set(0, 900 * 512 + 1);
        assert_eq!(b.dirty_bytes(), 901 * 512);
        assert!(!b.is_dirty(901 * 512, 99 * 512));
        b.set(0, u64::MAX);
        assert_eq!(b.dirty_bytes(), 1000 * 512);
    }

    #[test]
    fn iterates_across_words() {
        let mut b = DirtyBitmap::new(1000 * 64, 64);
        b.set(700 * 64, 64);
        assert_eq!(b.next_dirty(0, 64), Some((700 * 64, 64)));
        assert_eq!(b.next_dirty(701 * 64, 64), None);
    }

    #[test]
    fn serializes_as_qemu_stores_it() {
        let mut b = DirtyBitmap::new(200 * 512, 512);
        b.set(0, 1);
        b.set(9 * 512, 1);
        b.set(199 * 512, 1);
        let s = b.serialize(0, 26);
        assert_eq!(s[0], 1);
        assert_eq!(s[1], 2);
        assert_eq!(s[24], 0x80);
        assert_eq!(s[25], 0);
        let mut c = DirtyBitmap::new(200 * 512, 512);
        c.deserialize(0, &s);
        assert_eq!(c, b);
        let mut d = DirtyBitmap::new(200 * 512, 512);
        d.deserialize(1, &[0xff; 30]);
        assert_eq!(d.dirty_bytes(), 192 * 512);
        d.merge(&b);
        assert_eq!(d.dirty_bytes(), 193 * 512);
        d.clear();
        assert_eq!(d.dirty_bytes(), 0);
    }
}
