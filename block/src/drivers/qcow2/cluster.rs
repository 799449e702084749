//! Guest-to-host mapping through the L1 and L2 tables (QEMU:
//! `block/qcow2-cluster.c`: `qcow2_get_host_offset`, `l2_allocate`,
//! `qcow2_get_subcluster_type`, `qcow2_grow_l1_table`).
//!
//! An L2 entry is 64 bits, or 128 with extended L2 entries (the second
//! word is the subcluster bitmap: bits 0-31 allocated, 32-63 reads as
//! zero). [`Sub`] is what one (sub)cluster is: unallocated (the backing
//! file shows through), zero, data at a host offset, or compressed.

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

use crate::graph::child::Child;
use crate::io::{IoError, IoResult};

use super::header::{MAX_L1_BYTES, field};
use super::state::{OFFSET_MASK, State, get64, put64};

/// `QCOW_OFLAG_COPIED`: refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// `QCOW_OFLAG_COMPRESSED`.
pub const COMPRESSED: u64 = 1 << 62;
/// `QCOW_OFLAG_ZERO` (v3, standard L2 entries only).
pub const ZERO: u64 = 1;
/// `QCOW_L2_BITMAP_ALL_ALLOC`.
pub const ALL_ALLOC: u64 = 0xffff_ffff;
/// `QCOW_L2_BITMAP_ALL_ZEROES`.
pub const ALL_ZEROES: u64 = 0xffff_ffff << 32;

/// One L2 entry (the bitmap is 0 without extended L2 entries).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct L2Entry {
    /// The cluster descriptor word.
    pub word: u64,
    /// The subcluster bitmap.
    pub bitmap: u64,
}

/// What one (sub)cluster is (QEMU: `QCow2SubclusterType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    /// Not allocated here: the backing file, or zeroes without one.
    Unallocated,
    /// Reads as zeroes.
    Zero,
    /// Data at this host offset (of the (sub)cluster's first byte).
    Data(u64),
    /// Part of a compressed cluster.
    Compressed,
}

impl State {
    /// The host cluster of a standard entry.
    pub fn host(&self, e: L2Entry) -> u64 {
        e.word & OFFSET_MASK
    }

    /// Whether `e` is a compressed cluster.
    pub fn is_compressed(&self, e: L2Entry) -> bool {
        e.word & COMPRESSED != 0
    }

    /// Classifies unit `u` (subcluster, or 0 for the cluster) of entry `e`
    /// (QEMU: `qcow2_get_subcluster_type`), checking what can be checked.
    pub fn sub(&mut self, e: L2Entry, u: u64) -> IoResult<Sub> {
        if self.is_compressed(e) {
            return Ok(Sub::Compressed);
        }
        let host = self.host(e);
        if !host.is_multiple_of(self.cs) {
            return Err(self.corruption(&format!("Cluster allocation offset {host:#x} unaligned")));
        }
        if self.ext {
            let alloc = e.bitmap & (1 << u) != 0;
            let zero = e.bitmap & (1 << (32 + u)) != 0;
            if alloc && (zero || host == 0) {
                return Err(self.corruption(&format!(
                    "Invalid cluster entry found (L2 entry {:#x}, bitmap {:#x})",
                    e.word, e.bitmap
                )));
            }
            return Ok(if alloc {
                self.data_at(host)?;
                Sub::Data(host + u * self.unit)
            } else if zero {
                Sub::Zero
            } else {
                Sub::Unallocated
            });
        }
        if self.h.version >= 3 && e.word & ZERO != 0 {
            return Ok(Sub::Zero);
        }
        if host == 0 {
            return Ok(Sub::Unallocated);
        }
        self.data_at(host)?;
        Ok(Sub::Data(host))
    }

    fn data_at(&mut self, host: u64) -> IoResult<()> {
        if host < self.cs {
            return Err(self.corruption(&format!(
                "Data cluster at {host:#x} overlaps the image header"
            )));
        }
        Ok(())
    }

    /// L1 index and L2 index of guest offset `g`.
    pub fn indices(&self, g: u64) -> (u64, u64) {
        let c = g / self.cs;
        (c / self.l2_entries, c % self.l2_entries)
    }

    fn entry_bytes(&self) -> usize {
        if self.ext { 16 } else { 8 }
    }

    /// The L2 table offset for L1 index `l1i` (0: none), checked.
    fn l2_offset(&mut self, l1i: u64) -> IoResult<u64> {
        let Some(e) = self.l1.get(l1i as usize).copied() else {
            return Ok(0);
        };
        let off = e & OFFSET_MASK;
        if off != 0 {
            self.check_table(off, &format!("L2 table (L1 index {l1i:#x})"))?;
        }
        Ok(off)
    }

    /// The L2 entry for guest offset `g` (all zero when no L2 table).
    pub async fn entry(&mut self, f: &Child, g: u64) -> IoResult<L2Entry> {
        let (l1i, l2i) = self.indices(g);
        let off = self.l2_offset(l1i)?;
        if off == 0 {
            return Ok(L2Entry::default());
        }
        let i = self.load_l2(f, off).await?;
        let at = l2i as usize * self.entry_bytes();
        let ext = self.ext;
        Ok(self
            .l2c
            .slot(i)
            .map(|s| L2Entry {
                word: get64(&s.data, at),
                bitmap: if ext { get64(&s.data, at + 8) } else { 0 },
            })
            .unwrap_or_default())
    }

    /// Sets the L2 entry for guest offset `g` in the cache, allocating the
    /// L2 table first if there is none (QEMU: `l2_allocate`).
    pub async fn set_entry(&mut self, f: &Child, g: u64, e: L2Entry) -> IoResult<()> {
        self.check_writable()?;
        let (l1i, l2i) = self.indices(g);
        if l1i >= self.l1.len() as u64 {
            return Err(self.corruption(&format!("guest offset {g:#x} beyond the L1 table")));
        }
        let mut off = self.l2_offset(l1i)?;
        let l1e = self.l1.get(l1i as usize).copied().unwrap_or(0);
        if off != 0 && l1e & COPIED == 0 {
            off = self.unshare_l2(f, l1i, off).await?;
        }
        if off == 0 {
            off = self.alloc_clusters(f, 1).await?;
            // Refcounts first, then the zeroed table, then the L1 entry.
            self.write_dirty_rbs(f).await?;
            let zeros = self.zero_cluster();
            self.pwrite(f, off, zeros).await?;
            f.flush().await?;
            let mut b = vec![0u8; 8];
            put64(&mut b, 0, off | COPIED);
            let at = self.h.l1_table_offset + l1i * 8;
            self.pwrite(f, at, b).await?;
            self.l1[l1i as usize] = off | COPIED;
            self.l2c.remove(off);
        }
        let i = self.load_l2(f, off).await?;
        let at = l2i as usize * self.entry_bytes();
        let ext = self.ext;
        if let Some(s) = self.l2c.slot_mut(i) {
            put64(&mut s.data, at, e.word);
            if ext {
                put64(&mut s.data, at + 8, e.bitmap);
            }
            s.dirty = true;
        }
        Ok(())
    }

    /// Makes the L2 table of L1 index `l1i` private to the active L1
    /// table before it changes (QEMU: `l2_allocate` copying a table shared
    /// with an internal snapshot): a copy in a new cluster, then the L1
    /// entry, then the old table's reference is dropped. Returns the
    /// table's offset now.
    async fn unshare_l2(&mut self, f: &Child, l1i: u64, off: u64) -> IoResult<u64> {
        if self.refcount(f, off / self.cs).await? == 1 {
            // Only the COPIED flag was missing.
            return self
                .write_l1_entry(f, l1i, off | COPIED)
                .await
                .map(|()| off);
        }
        let i = self.load_l2(f, off).await?;
        let table = self
            .l2c
            .slot(i)
            .map(|s| s.data.clone())
            .ok_or(IoError::Eio)?;
        let new = self.alloc_clusters(f, 1).await?;
        // The copy's refcount first, then the copy, then the L1 entry.
        self.write_dirty_rbs(f).await?;
        self.pwrite(f, new, table).await?;
        f.flush().await?;
        self.write_l1_entry(f, l1i, new | COPIED).await?;
        self.l2c.remove(new);
        self.free_later(off, self.cs);
        Ok(new)
    }

    /// Clears L1 entry `l1i` on disk (the table it pointed to is the
    /// caller's to free).
    pub async fn clear_l1_entry(&mut self, f: &Child, l1i: u64) -> IoResult<()> {
        self.write_l1_entry(f, l1i, 0).await
    }

    async fn write_l1_entry(&mut self, f: &Child, l1i: u64, e: u64) -> IoResult<()> {
        let mut b = vec![0u8; 8];
        put64(&mut b, 0, e);
        let at = self.h.l1_table_offset + l1i * 8;
        self.pwrite(f, at, b).await?;
        if let Some(x) = self.l1.get_mut(l1i as usize) {
            *x = e;
        }
        Ok(())
    }

    /// Grows the active L1 table to at least `entries` (QEMU:
    /// `qcow2_grow_l1_table` with an exact size): new table, then the header
    /// switches to it, then the old one is freed.
    pub async fn grow_l1(&mut self, f: &Child, entries: u64) -> IoResult<()> {
        if entries <= self.l1.len() as u64 {
            return Ok(());
        }
        if entries * 8 > MAX_L1_BYTES {
            return Err(IoError::Other(27)); // EFBIG
        }
        let clusters = (entries * 8).div_ceil(self.cs);
        let new_off = self.alloc_clusters(f, clusters).await?;
        let mut l1 = self.l1.clone();
        l1.resize(entries as usize, 0);
        let mut bytes = vec![0u8; (clusters * self.cs) as usize];
        for (i, e) in l1.iter().enumerate() {
            put64(&mut bytes, i * 8, *e);
        }
        self.write_dirty_rbs(f).await?;
        self.pwrite(f, new_off, bytes).await?;
        f.flush().await?;
        let mut hf = vec![0u8; 12];
        hf[0..4].copy_from_slice(&(entries as u32).to_be_bytes());
        put64(&mut hf, 4, new_off);
        self.write_header_field(f, field::L1, hf).await?;
        f.flush().await?;
        let old_off = self.h.l1_table_offset;
        let old_bytes = (self.l1.len() as u64 * 8).div_ceil(self.cs) * self.cs;
        self.h.l1_table_offset = new_off;
        self.h.l1_size = entries as u32;
        self.l1 = l1;
        if old_off != 0 {
            self.free_later(old_off, old_bytes);
        }
        Ok(())
    }

    /// L1 entries needed for a virtual size.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.cs * self.l2_entries)
    }

    /// Host offset and length in bytes of a compressed cluster (QEMU:
    /// `qcow2_parse_compressed_l2_entry`).
    pub fn compressed_extent(&self, e: L2Entry) -> (u64, u64) {
        let bits = self.h.cluster_bits;
        let shift = 62 - (bits - 8);
        let mask = (1u64 << (bits - 8)) - 1;
        let coff = e.word & ((1u64 << shift) - 1);
        let sectors = ((e.word >> shift) & mask) + 1;
        (coff, sectors * 512 - (coff & 511))
    }

    /// The decompressed cluster of compressed entry `e`.
    pub async fn decompress(&mut self, f: &Child, e: L2Entry) -> IoResult<Vec<u8>> {
        if let Some((w, d)) = &self.zcache
            && *w == e.word
        {
            return Ok(d.clone());
        }
        let (coff, len) = self.compressed_extent(e);
        if coff < self.cs || coff >= self.file_len {
            return Err(self.corruption(&format!(
                "Compressed cluster at {coff:#x} outside the image file"
            )));
        }
        let input = self.pread(f, coff, len as usize).await?;
        let mut out = self.zero_cluster();
        if let Err(err) = super::inflate::inflate(&input, &mut out) {
            log::error!(
                "qcow2 node '{}': compressed cluster at {coff:#x} cannot be decompressed: {err:?}",
                self.name
            );
            return Err(IoError::Eio);
        }
        self.zcache = Some((e.word, out.clone()));
        Ok(out)
    }

    /// Every L2 entry of the image, for checks: `(guest offset, entry)`.
    pub async fn all_entries(&mut self, f: &Child) -> IoResult<Vec<(u64, L2Entry)>> {
        let mut out = Vec::new();
        for l1i in 0..self.l1.len() as u64 {
            if self.l2_offset(l1i)? == 0 {
                continue;
            }
            for l2i in 0..self.l2_entries {
                let g = (l1i * self.l2_entries + l2i) * self.cs;
                let e = self.entry(f, g).await?;
                if e != L2Entry::default() {
                    out.push((g, e));
                }
            }
        }
        Ok(out)
    }
}
