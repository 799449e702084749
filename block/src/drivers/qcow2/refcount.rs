//! Refcounts and cluster allocation (QEMU: `block/qcow2-refcount.c`:
//! `qcow2_get_refcount`, `update_refcount`, `alloc_clusters_noref`,
//! `alloc_refcount_block`, `qcow2_refcount_area`, `qcow2_free_clusters`).
//!
//! Refcounts are 1 to 64 bits wide (`refcount_order` 0..=6), packed
//! little-bit-first below 8 bits and big-endian from 8 bits up. A cluster
//! beyond what the refcount table covers has refcount 0 and is free.
//!
//! Growth keeps every structure self-describing, as QEMU does: a new
//! refcount block for an uncovered area is placed in that area and counts
//! itself; a refcount table that is full moves to a free area together with
//! the new blocks that area needs, the header switches to it in one write,
//! and only then is the old table freed.

use alloc::boxed::Box;
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

use crate::graph::child::Child;
use crate::io::{IoError, IoResult};

use super::header::{MAX_REFTABLE_BYTES, field};
use super::state::{OFFSET_MASK, State, get64, put64};

/// Highest host offset an L2 entry can describe (56 bits).
const MAX_HOST: u64 = 1 << 56;

fn rc_get(b: &[u8], i: u64, bits: u32) -> u64 {
    if bits < 8 {
        let per = 8 / bits as u64;
        let byte = b.get((i / per) as usize).copied().unwrap_or(0);
        let shift = (i % per) as u32 * bits;
        u64::from(byte >> shift) & ((1 << bits) - 1)
    } else {
        let w = (bits / 8) as usize;
        let at = i as usize * w;
        let mut v = 0u64;
        for k in 0..w {
            v = (v << 8) | u64::from(b.get(at + k).copied().unwrap_or(0));
        }
        v
    }
}

pub(crate) fn rc_set(b: &mut [u8], i: u64, bits: u32, v: u64) {
    if bits < 8 {
        let per = 8 / bits as u64;
        let shift = (i % per) as u32 * bits;
        let mask = (((1u16 << bits) - 1) as u8) << shift;
        if let Some(byte) = b.get_mut((i / per) as usize) {
            *byte = (*byte & !mask) | (((v as u8) << shift) & mask);
        }
    } else {
        let w = (bits / 8) as usize;
        let at = i as usize * w;
        for k in 0..w {
            if let Some(byte) = b.get_mut(at + k) {
                *byte = (v >> (8 * (w - 1 - k))) as u8;
            }
        }
    }
}

impl State {
    fn rc_bits(&self) -> u32 {
        self.h.refcount_bits()
    }

    fn rc_max(&self) -> u64 {
        match self.rc_bits() {
            64 => u64::MAX,
            b => (1 << b) - 1,
        }
    }

    /// The refcount block offset for table index `ti` (0: none).
    fn rb_offset(&self, ti: u64) -> u64 {
        self.reftable.get(ti as usize).copied().unwrap_or(0) & OFFSET_MASK
    }

    /// The refcount of cluster index `c` (QEMU: `qcow2_get_refcount`).
    pub async fn refcount(&mut self, f: &Child, c: u64) -> IoResult<u64> {
        let ti = c / self.rb_entries;
        let rb = self.rb_offset(ti);
        if rb == 0 {
            return Ok(0);
        }
        let i = self.load_rb(f, rb).await?;
        let bits = self.rc_bits();
        let idx = c % self.rb_entries;
        Ok(self
            .rbc
            .slot(i)
            .map(|s| rc_get(&s.data, idx, bits))
            .unwrap_or(0))
    }

    /// Sets the refcount of cluster index `c`, whose block must exist.
    async fn set_refcount(&mut self, f: &Child, c: u64, v: u64) -> IoResult<()> {
        if v > self.rc_max() {
            return Err(self.corruption(&format!(
                "refcount overflow for cluster {:#x} ({}-bit refcounts)",
                c * self.cs,
                self.rc_bits()
            )));
        }
        let ti = c / self.rb_entries;
        let rb = self.rb_offset(ti);
        if rb == 0 {
            return Err(
                self.corruption(&format!("no refcount block for cluster {:#x}", c * self.cs))
            );
        }
        let i = self.load_rb(f, rb).await?;
        let bits = self.rc_bits();
        let idx = c % self.rb_entries;
        if let Some(s) = self.rbc.slot_mut(i) {
            let old = rc_get(&s.data, idx, bits);
            rc_set(&mut s.data, idx, bits, v);
            s.dirty = true;
            match (old, v) {
                (0, 1..) => self.used.set(self.used.get() + 1),
                (1.., 0) => self.used.set(self.used.get().saturating_sub(1)),
                _ => {}
            }
        }
        Ok(())
    }

    /// Counts the clusters with a nonzero refcount (at open, into
    /// [`State::used`]).
    pub async fn count_used(&mut self, f: &Child) -> IoResult<u64> {
        let bits = self.rc_bits();
        let mut n = 0;
        for ti in 0..self.reftable.len() as u64 {
            let rb = self.rb_offset(ti);
            if rb == 0 {
                continue;
            }
            let i = self.load_rb(f, rb).await?;
            if let Some(s) = self.rbc.slot(i) {
                n += (0..self.rb_entries)
                    .filter(|idx| rc_get(&s.data, *idx, bits) != 0)
                    .count() as u64;
            }
        }
        Ok(n)
    }

    /// Finds `n` contiguous free clusters from `free_index` (QEMU:
    /// `alloc_clusters_noref`); returns the first cluster index.
    async fn find_free(&mut self, f: &Child, n: u64) -> IoResult<u64> {
        let mut start = self.free_index;
        let mut run = 0;
        let mut c = self.free_index;
        // Past the end of the file every cluster is free in a sound image;
        // refcounts that say otherwise must not send this loop to 2^56.
        let limit = (self.file_len / self.cs)
            .max(self.free_index)
            .saturating_add(n + self.rb_entries + 1);
        while run < n {
            if c.saturating_mul(self.cs) >= MAX_HOST {
                return Err(IoError::Enospc);
            }
            if c > limit {
                return Err(self.corruption(&format!(
                    "refcounts claim clusters up to {:#x}, past the end of the image file",
                    c * self.cs
                )));
            }
            if self.refcount(f, c).await? == 0 && !self.reserved.contains(&c) {
                if run == 0 {
                    start = c;
                }
                run += 1;
            } else {
                run = 0;
            }
            c += 1;
        }
        Ok(start)
    }

    /// Allocates `n` contiguous clusters with refcount 1 (QEMU:
    /// `qcow2_alloc_clusters`); returns the offset of the first. The
    /// increments are in the refcount cache, written before any reference.
    pub async fn alloc_clusters(&mut self, f: &Child, n: u64) -> IoResult<u64> {
        self.check_writable()?;
        'restart: loop {
            let start = self.find_free(f, n).await?;
            let first_ti = start / self.rb_entries;
            let last_ti = (start + n - 1) / self.rb_entries;
            for ti in first_ti..=last_ti {
                if self.ensure_refblock(f, ti).await? {
                    continue 'restart;
                }
            }
            for c in start..start + n {
                let rc = self.refcount(f, c).await?;
                self.set_refcount(f, c, rc + 1).await?;
            }
            // As QEMU's `free_cluster_index`: past the run, even if free
            // clusters were skipped (a later free brings the hint back).
            self.free_index = start + n;
            return Ok(start * self.cs);
        }
    }

    /// Makes sure table index `ti` has a refcount block; `true` if anything
    /// was allocated (the caller then searches again). QEMU:
    /// `alloc_refcount_block`.
    async fn ensure_refblock(&mut self, f: &Child, ti: u64) -> IoResult<bool> {
        if self.rb_offset(ti) != 0 {
            return Ok(false);
        }
        if ti >= self.reftable.len() as u64 {
            self.grow_reftable(f, ti + 1).await?;
            return Ok(true);
        }
        let c = self.find_free(f, 1).await?;
        let cti = c / self.rb_entries;
        let mut block = self.zero_cluster();
        if cti == ti {
            // The block lies in the area it covers and counts itself.
            rc_set(&mut block, c % self.rb_entries, self.rc_bits(), 1);
            self.used.set(self.used.get() + 1);
        } else if self.rb_offset(cti) != 0 {
            self.set_refcount(f, c, 1).await?;
        } else {
            // Cover the free cluster's own area first, then search again.
            return Box::pin(self.ensure_refblock(f, cti)).await;
        }
        let off = c * self.cs;
        self.write_dirty_rbs(f).await?;
        self.pwrite(f, off, block).await?;
        f.flush().await?;
        let mut e = vec![0u8; 8];
        put64(&mut e, 0, off);
        let at = self.h.refcount_table_offset + ti * 8;
        self.pwrite(f, at, e).await?;
        self.reftable[ti as usize] = off;
        if c == self.free_index {
            self.free_index = c + 1;
        }
        Ok(true)
    }

    /// Moves the refcount table to a bigger one (QEMU: the table growth in
    /// `alloc_refcount_block` / `qcow2_refcount_area`).
    async fn grow_reftable(&mut self, f: &Child, min_entries: u64) -> IoResult<()> {
        let per_cluster = self.cs / 8;
        let old_len = self.reftable.len() as u64;
        let want = min_entries.max(old_len + old_len / 2 + 1);
        let mut clusters = want.div_ceil(per_cluster);
        let mut k = 0u64;
        let mut rounds = 0;
        let (start, missing) = loop {
            rounds += 1;
            if rounds > 64 {
                return Err(self.corruption("the refcount table cannot be grown"));
            }
            let total = clusters + k;
            let start = self.find_free(f, total).await?;
            let first_ti = start / self.rb_entries;
            let last_ti = (start + total - 1) / self.rb_entries;
            if last_ti >= clusters * per_cluster {
                clusters = (last_ti + 1).div_ceil(per_cluster);
                continue;
            }
            let missing: Vec<u64> = (first_ti..=last_ti)
                .filter(|ti| self.rb_offset(*ti) == 0)
                .collect();
            if missing.len() as u64 == k {
                break (start, missing);
            }
            k = missing.len() as u64;
        };
        if clusters * self.cs > MAX_REFTABLE_BYTES {
            log::error!("qcow2 node '{}': refcount table too large", self.name);
            return Err(IoError::Enospc);
        }
        let mut table = self.reftable.clone();
        table.resize((clusters * per_cluster) as usize, 0);
        let blocks_at = start + clusters;
        let mut blocks: Vec<Vec<u8>> = missing.iter().map(|_| self.zero_cluster()).collect();
        for (j, ti) in missing.iter().enumerate() {
            table[*ti as usize] = (blocks_at + j as u64) * self.cs;
        }
        let bits = self.rc_bits();
        for c in start..start + clusters + k {
            let ti = c / self.rb_entries;
            match missing.iter().position(|m| *m == ti) {
                Some(j) => {
                    rc_set(&mut blocks[j], c % self.rb_entries, bits, 1);
                    self.used.set(self.used.get() + 1);
                }
                None => self.set_refcount(f, c, 1).await?,
            }
        }
        self.write_dirty_rbs(f).await?;
        for (j, b) in blocks.into_iter().enumerate() {
            self.pwrite(f, (blocks_at + j as u64) * self.cs, b).await?;
        }
        let mut bytes = vec![0u8; (clusters * self.cs) as usize];
        for (i, e) in table.iter().enumerate() {
            put64(&mut bytes, i * 8, *e);
        }
        let new_off = start * self.cs;
        self.pwrite(f, new_off, bytes).await?;
        f.flush().await?;
        let mut hf = vec![0u8; 12];
        put64(&mut hf, 0, new_off);
        hf[8..12].copy_from_slice(&(clusters as u32).to_be_bytes());
        self.write_header_field(f, field::REFTABLE, hf).await?;
        f.flush().await?;
        let old_off = self.h.refcount_table_offset;
        let old_clusters = u64::from(self.h.refcount_table_clusters);
        self.h.refcount_table_offset = new_off;
        self.h.refcount_table_clusters = clusters as u32;
        self.reftable = table;
        if start == self.free_index {
            self.free_index = start + clusters + k;
        }
        self.free_later(old_off, old_clusters * self.cs);
        Ok(())
    }

    /// Sets the refcount of cluster index `c` to `v`, creating its refcount
    /// block if needed (repairs only).
    pub async fn force_refcount(&mut self, f: &Child, c: u64, v: u64) -> IoResult<()> {
        let ti = c / self.rb_entries;
        if self.rb_offset(ti) == 0 {
            if v == 0 {
                return Ok(());
            }
            let mut rounds = 0;
            while self.rb_offset(ti) == 0 {
                rounds += 1;
                if rounds > 16 {
                    return Err(self.corruption("cannot create a refcount block"));
                }
                self.ensure_refblock(f, ti).await?;
            }
        }
        self.set_refcount(f, c, v).await
    }

    /// Queues clusters to free once their references are durably gone.
    pub fn free_later(&mut self, offset: u64, len: u64) {
        if len > 0 {
            self.pending_free.push((offset, len));
        }
    }

    /// Decrements the refcount of every cluster in `[offset, offset+len)`
    /// (QEMU: `qcow2_free_clusters`); a cluster that reaches 0 is discarded
    /// in the file (QEMU's `pass-discard-request`).
    pub async fn free_now(&mut self, f: &Child, offset: u64, len: u64) -> IoResult<()> {
        let first = offset / self.cs;
        let last = (offset + len - 1) / self.cs;
        for c in first..=last {
            let rc = self.refcount(f, c).await?;
            if rc == 0 {
                return Err(self.corruption(&format!(
                    "refcount of cluster {:#x} would drop below 0",
                    c * self.cs
                )));
            }
            self.set_refcount(f, c, rc - 1).await?;
            if rc == 1 {
                self.free_index = self.free_index.min(c);
                self.l2c.remove(c * self.cs);
                self.rbc.remove(c * self.cs);
                if self.pass_discard {
                    let _ = f.discard(c * self.cs, self.cs).await;
                }
            }
        }
        Ok(())
    }

    /// Reads the whole refcount table entry list as on disk (for checks).
    pub fn reftable_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.reftable.len() * 8];
        for (i, e) in self.reftable.iter().enumerate() {
            put64(&mut b, i * 8, *e);
        }
        b
    }
}

/// Decodes a table of big-endian u64 entries.
pub fn decode_table(b: &[u8]) -> Vec<u64> {
    (0..b.len() / 8).map(|i| get64(b, i * 8)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths_pack_like_qemu() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let mut b = vec![0u8; 64];
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            rc_set(&mut b, 3, bits, max);
            rc_set(&mut b, 4, bits, 1);
            assert_eq!(rc_get(&b, 3, bits), max);
            assert_eq!(rc_get(&b, 4, bits), 1);
            assert_eq!(rc_get(&b, 2, bits), 0);
        }
        let mut b = vec![0u8; 4];
        rc_set(&mut b, 1, 16, 0x0102);
        assert_eq!(b, [0, 0, 1, 2]);
        let mut b = vec![0u8; 1];
        rc_set(&mut b, 1, 1, 1);
        assert_eq!(b, [2]);
    }
}
