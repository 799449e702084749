//! Guest requests on the image (QEMU: `qcow2_co_preadv_part`,
//! `qcow2_co_pwritev_part` with `qcow2_alloc_host_offset` and
//! `perform_cow`, `qcow2_co_pwrite_zeroes`, `qcow2_co_pdiscard`,
//! `qcow2_co_block_status`, `qcow2_co_truncate`).
//!
//! All of them run under the image lock. Writes go in three steps: plan
//! each cluster (allocate a host cluster and read what copy-on-write needs
//! from the old mapping: the backing file, zeroes or a compressed cluster),
//! write the data of host-contiguous clusters in one request, and only then
//! change their L2 entries in the cache — data before the entry that points
//! to it. Clusters that stop being referenced are freed after the next
//! durable L2 write-back ([`State::flush_caches`]).
//!
//! Discard (QEMU's guest `discard` with `pass-discard-request=on`): full
//! clusters (full subclusters with extended L2 entries) become zero clusters
//! in v3 images — or unallocated ones in v2 images, which lets a backing
//! file show through as QEMU does — and their host clusters are freed and
//! discarded in the file. With `discard-no-unref=on` the host cluster stays
//! allocated to the guest cluster (it only reads as zeroes), which avoids
//! fragmentation, as QEMU's option of that name. Partial clusters are left
//! alone (discard is advisory).

use alloc::vec;
use alloc::vec::Vec;

use crate::graph::child::Child;
use crate::io::{BlockStatus, IoError, IoResult, ReqFlags};

use super::cluster::{ALL_ALLOC, ALL_ZEROES, COPIED, L2Entry, Sub, ZERO};
use super::state::State;

/// Where a run of guest bytes comes from.
pub enum Src {
    /// The image file at this offset.
    File(u64),
    /// The backing file at this guest offset.
    Backing(u64),
    /// Zeroes.
    Zero,
    /// Already decompressed bytes.
    Bytes(Vec<u8>),
}

/// A read plan: `(position in the request, length, source)`.
pub type Runs = Vec<(usize, usize, Src)>;

fn push_run(runs: &mut Runs, pos: usize, n: usize, src: Src) {
    if let Some((_, ln, last)) = runs.last_mut() {
        let n0 = *ln as u64;
        let merge = match (&*last, &src) {
            (Src::File(a), Src::File(b)) => a + n0 == *b,
            (Src::Backing(a), Src::Backing(b)) => a + n0 == *b,
            (Src::Zero, Src::Zero) => true,
            _ => false,
        };
        if merge {
            *ln += n;
            return;
        }
    }
    runs.push((pos, n, src));
}

/// Executes a read plan; needs no lock (see [`super::state::Inflight`]).
pub async fn exec_read(
    runs: Runs,
    f: &Child,
    backing: Option<&Child>,
    len: usize,
) -> IoResult<Vec<u8>> {
    let mut out = vec![0u8; len];
    for (pos, n, src) in runs {
        let dst = &mut out[pos..pos + n];
        match src {
            Src::Zero => {}
            Src::File(h) => dst.copy_from_slice(&f.read(h, n, ReqFlags::NONE).await?),
            Src::Backing(go) => {
                if let Some(b) = backing {
                    dst.copy_from_slice(&b.read(go, n, ReqFlags::NONE).await?);
                }
            }
            Src::Bytes(b) => dst.copy_from_slice(&b),
        }
    }
    Ok(out)
}

/// One cluster's part of a write.
struct Plan {
    host: u64,
    bytes: Vec<u8>,
    update: Option<L2Entry>,
    free: Option<(u64, u64)>,
    allocated: Option<u64>,
}

/// One host-contiguous data write and the L2 entries (and frees) that
/// follow it.
#[derive(Default)]
pub struct Batch {
    host: u64,
    buf: Vec<u8>,
    updates: Vec<(u64, L2Entry)>,
    frees: Vec<(u64, u64)>,
    allocated: Vec<u64>,
}

/// A planned write (QEMU: the `QCowL2Meta` list of an allocating write):
/// clusters allocated and copy-on-write data gathered; the data writes can
/// run without the lock, the L2 updates follow under it.
#[derive(Default)]
pub struct WritePlan {
    batches: Vec<Batch>,
}

impl WritePlan {
    /// Writes the data (no lock needed: only new clusters, or clusters of
    /// this request's own guest clusters, are written).
    pub async fn write_data(&mut self, f: &Child) -> IoResult<u64> {
        let mut end = 0;
        for b in &mut self.batches {
            if !b.buf.is_empty() {
                let buf = core::mem::take(&mut b.buf);
                end = end.max(b.host + buf.len() as u64);
                f.write(b.host, buf, ReqFlags::NONE).await?;
            }
        }
        Ok(end)
    }
}

fn bits(u0: u64, u1: u64) -> u64 {
    let mut b = 0;
    for u in u0..=u1 {
        b |= 1 << u;
    }
    b
}

impl State {
    /// Plans the read of guest bytes `[g, g+len)`: the mapping is looked
    /// up (and compressed clusters decompressed) now, the data I/O can run
    /// later without the lock.
    pub async fn map_read(
        &mut self,
        f: &Child,
        has_backing: bool,
        g: u64,
        len: usize,
    ) -> IoResult<Runs> {
        let mut runs: Runs = Vec::new();
        let mut pos = 0usize;
        while pos < len {
            let go = g + pos as u64;
            let e = self.entry(f, go).await?;
            let in_cl = go % self.cs;
            let n_cl = core::cmp::min((len - pos) as u64, self.cs - in_cl);
            let mut p = 0u64;
            while p < n_cl {
                let off = in_cl + p;
                let u = if self.ext { off / self.unit } else { 0 };
                let unit_end = if self.ext {
                    (u + 1) * self.unit
                } else {
                    self.cs
                };
                let n = core::cmp::min(n_cl - p, unit_end - off);
                let src = match self.sub(e, u)? {
                    Sub::Unallocated if has_backing => Src::Backing(go + p),
                    Sub::Unallocated | Sub::Zero => Src::Zero,
                    Sub::Data(h) => Src::File(h + off - u * self.unit),
                    Sub::Compressed => {
                        let d = self.decompress(f, e).await?;
                        let o = off as usize;
                        Src::Bytes(d.get(o..o + n as usize).ok_or(IoError::Eio)?.to_vec())
                    }
                };
                push_run(&mut runs, pos + p as usize, n as usize, src);
                p += n;
            }
            pos += n_cl as usize;
        }
        Ok(runs)
    }

    /// Reads guest bytes `[g, g+len)` under the lock (copy-on-write).
    pub async fn read(
        &mut self,
        f: &Child,
        backing: Option<&Child>,
        g: u64,
        len: usize,
    ) -> IoResult<Vec<u8>> {
        let runs = self.map_read(f, backing.is_some(), g, len).await?;
        exec_read(runs, f, backing, len).await
    }

    /// The host extents of a write that changes no metadata (every
    /// touched (sub)cluster already holds data with refcount 1), or `None`
    /// (QEMU: the `QCOW2_SUBCLUSTER_NORMAL` fast path of
    /// `qcow2_alloc_host_offset`): `(host offset, position, length)`.
    pub async fn map_in_place(
        &mut self,
        f: &Child,
        g: u64,
        len: usize,
    ) -> IoResult<Option<Vec<(u64, usize, usize)>>> {
        let mut out: Vec<(u64, usize, usize)> = Vec::new();
        let mut pos = 0usize;
        while pos < len {
            let go = g + pos as u64;
            let e = self.entry(f, go).await?;
            let in_cl = go % self.cs;
            let n = core::cmp::min((len - pos) as u64, self.cs - in_cl) as usize;
            if e.word & COPIED == 0 || self.is_compressed(e) {
                return Ok(None);
            }
            let u0 = in_cl / self.unit;
            let u1 = (in_cl + n as u64 - 1) / self.unit;
            for u in u0..=u1 {
                if !matches!(self.sub(e, u)?, Sub::Data(_)) {
                    return Ok(None);
                }
            }
            let host = self.host(e) + in_cl;
            match out.last_mut() {
                Some((h, _, l)) if *h + *l as u64 == host => *l += n,
                _ => out.push((host, pos, n)),
            }
            pos += n;
        }
        Ok(Some(out))
    }

    /// Whether unit `u` of `e` is shared with a snapshot (refcount > 1).
    async fn shared(&mut self, f: &Child, e: L2Entry, host: u64) -> IoResult<bool> {
        if e.word & COPIED != 0 {
            return Ok(false);
        }
        Ok(self.refcount(f, host / self.cs).await? != 1)
    }

    /// Plans the write of `chunk` at `a` inside the guest cluster `gcl`.
    async fn plan(
        &mut self,
        f: &Child,
        backing: Option<&Child>,
        gcl: u64,
        e: L2Entry,
        a: u64,
        chunk: &[u8],
    ) -> IoResult<Plan> {
        let cs = self.cs;
        let end = a + chunk.len() as u64;
        let host = self.host(e);
        let compressed = self.is_compressed(e);
        // A cluster shared with an internal snapshot is copied whole.
        let shared_ext = self.ext && !compressed && host != 0 && self.shared(f, e, host).await?;
        if !self.ext || compressed || shared_ext {
            let s = if shared_ext {
                Sub::Data(host)
            } else {
                self.sub(e, 0)?
            };
            if let Sub::Data(h) = s
                && !shared_ext
                && !self.shared(f, e, h).await?
            {
                let update = (e.word & COPIED == 0).then_some(L2Entry {
                    word: e.word | COPIED,
                    bitmap: e.bitmap,
                });
                return Ok(Plan {
                    host: h + a,
                    bytes: chunk.to_vec(),
                    update,
                    free: None,
                    allocated: None,
                });
            }
            // A whole new cluster (or a preallocated zero cluster reused):
            // copy-on-write of what the write does not cover.
            let reuse =
                !self.ext && s == Sub::Zero && host != 0 && !self.shared(f, e, host).await?;
            let mut bytes = Vec::with_capacity(cs as usize);
            if compressed {
                let old = self.decompress(f, e).await?;
                bytes.extend_from_slice(&old);
                bytes[a as usize..end as usize].copy_from_slice(chunk);
            } else if !self.ext && s == Sub::Zero {
                bytes.resize(cs as usize, 0);
                bytes[a as usize..end as usize].copy_from_slice(chunk);
            } else {
                bytes.extend_from_slice(&self.read(f, backing, gcl, a as usize).await?);
                bytes.extend_from_slice(chunk);
                bytes.extend_from_slice(
                    &self
                        .read(f, backing, gcl + end, (cs - end) as usize)
                        .await?,
                );
            }
            let free = if compressed {
                Some(self.compressed_extent(e))
            } else if host != 0 && !reuse {
                Some((host, cs))
            } else {
                None
            };
            let new = if reuse {
                host
            } else {
                self.alloc_clusters(f, 1).await?
            };
            let bitmap = if self.ext { ALL_ALLOC } else { 0 };
            return Ok(Plan {
                host: new,
                bytes,
                update: Some(L2Entry {
                    word: new | COPIED,
                    bitmap,
                }),
                free,
                allocated: (!reuse).then_some(new),
            });
        }
        // Extended L2: only the touched subclusters become allocated;
        // partial ones are completed from their old content.
        let unit = self.unit;
        let new = host == 0;
        let u0 = a / unit;
        let u1 = (end - 1) / unit;
        self.sub(e, u0)?;
        self.sub(e, u1)?;
        let alloc0 = e.bitmap & (1 << u0) != 0;
        let alloc1 = e.bitmap & (1 << u1) != 0;
        let rs = if alloc0 { a } else { u0 * unit };
        let re = if alloc1 { end } else { (u1 + 1) * unit };
        let mut bytes = Vec::with_capacity((re - rs) as usize);
        if rs < a {
            bytes.extend_from_slice(&self.read(f, backing, gcl + rs, (a - rs) as usize).await?);
        }
        bytes.extend_from_slice(chunk);
        if end < re {
            bytes.extend_from_slice(
                &self
                    .read(f, backing, gcl + end, (re - end) as usize)
                    .await?,
            );
        }
        let h = if new {
            self.alloc_clusters(f, 1).await?
        } else {
            host
        };
        let b = bits(u0, u1);
        let bitmap = (e.bitmap | b) & !(b << 32);
        let word = h | COPIED;
        Ok(Plan {
            host: h + rs,
            bytes,
            update: (word != e.word || bitmap != e.bitmap).then_some(L2Entry { word, bitmap }),
            free: None,
            allocated: new.then_some(h),
        })
    }

    /// Plans the write of `data` at guest offset `g` (see [`WritePlan`]).
    pub async fn plan_write(
        &mut self,
        f: &Child,
        backing: Option<&Child>,
        g: u64,
        data: &[u8],
    ) -> IoResult<WritePlan> {
        self.check_writable()?;
        let mut plan = WritePlan::default();
        let mut pos = 0usize;
        while pos < data.len() {
            let go = g + pos as u64;
            let in_cl = go % self.cs;
            let n = core::cmp::min((data.len() - pos) as u64, self.cs - in_cl) as usize;
            let gcl = go - in_cl;
            let e = self.entry(f, gcl).await?;
            let p = self
                .plan(f, backing, gcl, e, in_cl, &data[pos..pos + n])
                .await?;
            let contiguous = plan
                .batches
                .last()
                .is_some_and(|b| b.host + b.buf.len() as u64 == p.host);
            if !contiguous {
                plan.batches.push(Batch {
                    host: p.host,
                    ..Default::default()
                });
            }
            if let Some(b) = plan.batches.last_mut() {
                b.buf.extend_from_slice(&p.bytes);
                if let Some(u) = p.update {
                    b.updates.push((gcl, u));
                }
                if let Some(fr) = p.free {
                    b.frees.push(fr);
                }
                b.allocated.extend(p.allocated);
            }
            pos += n;
        }
        Ok(plan)
    }

    /// Links the written clusters into the L2 tables and queues the frees
    /// (QEMU: `qcow2_alloc_cluster_link_l2`). `data_end` is where the data
    /// writes ended in the file; `ok` whether they all succeeded (if not,
    /// the new clusters are freed again and nothing is linked).
    pub async fn finish_write(
        &mut self,
        f: &Child,
        plan: WritePlan,
        data_end: u64,
        ok: bool,
    ) -> IoResult<()> {
        self.file_len = self.file_len.max(data_end);
        for b in plan.batches {
            if !ok {
                // Never referenced: they go back at the next write-back.
                for host in b.allocated {
                    self.free_later(host, self.cs);
                }
                continue;
            }
            for (g, e) in b.updates {
                self.set_entry(f, g, e).await?;
            }
            for (off, len) in b.frees {
                self.free_later(off, len);
            }
        }
        Ok(())
    }

    /// Writes guest bytes at `g`, all under the lock.
    pub async fn write(
        &mut self,
        f: &Child,
        backing: Option<&Child>,
        g: u64,
        data: &[u8],
    ) -> IoResult<()> {
        let mut plan = self.plan_write(f, backing, g, data).await?;
        if self.corrupt {
            return Err(IoError::Eio);
        }
        let r = plan.write_data(f).await;
        let end = *r.as_ref().unwrap_or(&0);
        self.finish_write(f, plan, end, r.is_ok()).await?;
        r.map(|_| ())
    }

    /// Whether unit `u` of `e` reads as zeroes without a backing file
    /// showing through.
    fn reads_zero(&mut self, e: L2Entry, u: u64, backing: bool) -> IoResult<bool> {
        Ok(match self.sub(e, u)? {
            Sub::Zero => true,
            Sub::Unallocated => !backing,
            _ => false,
        })
    }

    /// Writes zeroes over `[g, g+len)` (QEMU: `qcow2_co_pwrite_zeroes` and
    /// `qcow2_subcluster_zeroize`): zero flags for whole (sub)clusters,
    /// freeing the host cluster with `may_unmap`; explicit zeroes for the
    /// partial ones that do not already read as zeroes. ENOTSUP for v2
    /// images, which have no zero flag (the node then writes zeroes).
    pub async fn write_zeroes(
        &mut self,
        f: &Child,
        backing: Option<&Child>,
        g: u64,
        len: u64,
        flags: ReqFlags,
    ) -> IoResult<()> {
        self.check_writable()?;
        if self.h.version < 3 {
            return Err(IoError::Enotsup);
        }
        let may_unmap = flags.contains(ReqFlags::MAY_UNMAP);
        // An image opened with `backing: null` over a backing file named in
        // its header: unallocated is zeroes here but the backing file's
        // data to whoever opens the chain (a backup into an overlay), so
        // zeroes get their flag, as QEMU always sets it.
        let below = backing.is_some() || self.h.backing_file.is_some();
        let end = g + len;
        let mut pos = g;
        while pos < end {
            if !below && let Some(next) = self.skip_unmapped(pos, end) {
                // No L2 table and no backing file: already zeroes.
                pos = next;
                continue;
            }
            let in_cl = pos % self.cs;
            let n = core::cmp::min(end - pos, self.cs - in_cl);
            let gcl = pos - in_cl;
            let e = self.entry(f, gcl).await?;
            if n == self.cs && !below && e == L2Entry::default() {
                // Unallocated without a backing file reads as zeroes.
            } else if n == self.cs {
                let (new, free) = self.zero_whole(e, may_unmap);
                if new != e {
                    self.set_entry(f, gcl, new).await?;
                }
                if let Some((o, l)) = free {
                    self.free_later(o, l);
                }
            } else if !self.ext || self.is_compressed(e) {
                if !self.reads_zero(e, 0, below)? {
                    self.write(f, backing, pos, &vec![0u8; n as usize]).await?;
                }
            } else {
                // Whole subclusters get the zero bit, partial ones zeroes.
                let unit = self.unit;
                let first_full = in_cl.div_ceil(unit);
                let end_full = (in_cl + n) / unit;
                let head_end = core::cmp::min(first_full * unit, in_cl + n);
                if in_cl < head_end && !self.reads_zero(e, in_cl / unit, below)? {
                    let buf = vec![0u8; (head_end - in_cl) as usize];
                    self.write(f, backing, pos, &buf).await?;
                }
                if end_full >= first_full && end_full * unit < in_cl + n {
                    let tail = end_full * unit;
                    if !self.reads_zero(e, end_full, below)? {
                        let buf = vec![0u8; (in_cl + n - tail) as usize];
                        self.write(f, backing, gcl + tail, &buf).await?;
                    }
                }
                if end_full > first_full {
                    let e = self.entry(f, gcl).await?;
                    let b = bits(first_full, end_full - 1);
                    let new = L2Entry {
                        word: e.word,
                        bitmap: (e.bitmap & !b) | (b << 32),
                    };
                    if new != e {
                        self.set_entry(f, gcl, new).await?;
                    }
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// The entry of a whole cluster made zero, and what to free.
    fn zero_whole(&self, e: L2Entry, unmap: bool) -> (L2Entry, Option<(u64, u64)>) {
        if self.is_compressed(e) {
            return (self.zero_entry(), Some(self.compressed_extent(e)));
        }
        let host = self.host(e);
        if host == 0 {
            return (self.zero_entry(), None);
        }
        if unmap {
            return (self.zero_entry(), Some((host, self.cs)));
        }
        if self.ext {
            (
                L2Entry {
                    word: e.word,
                    bitmap: ALL_ZEROES,
                },
                None,
            )
        } else {
            (
                L2Entry {
                    word: e.word | ZERO,
                    bitmap: 0,
                },
                None,
            )
        }
    }

    fn zero_entry(&self) -> L2Entry {
        if self.ext {
            L2Entry {
                word: 0,
                bitmap: ALL_ZEROES,
            }
        } else {
            L2Entry {
                word: ZERO,
                bitmap: 0,
            }
        }
    }

    /// Discards whole (sub)clusters of `[g, g+len)` (see the module doc).
    pub async fn discard(
        &mut self,
        f: &Child,
        has_backing: bool,
        g: u64,
        len: u64,
        no_unref: bool,
    ) -> IoResult<()> {
        self.check_writable()?;
        let unit = self.unit;
        let mut pos = g.div_ceil(unit) * unit;
        let end = (g + len) / unit * unit;
        while pos < end {
            if !has_backing && let Some(next) = self.skip_unmapped(pos, end) {
                pos = next;
                continue;
            }
            let in_cl = pos % self.cs;
            let n = core::cmp::min(end - pos, self.cs - in_cl);
            let gcl = pos - in_cl;
            let e = self.entry(f, gcl).await?;
            let allocated = e.word != 0 || e.bitmap != 0;
            let (new, free) = if n < self.cs && self.is_compressed(e) {
                // A compressed cluster has no subclusters: left alone
                // (discard is advisory).
                (e, None)
            } else if n < self.cs {
                // Whole subclusters of an extended L2 entry become zero.
                let b = bits(in_cl / unit, (in_cl + n) / unit - 1);
                (
                    L2Entry {
                        word: e.word,
                        bitmap: (e.bitmap & !b) | (b << 32),
                    },
                    None,
                )
            } else if no_unref && self.h.version >= 3 && !self.is_compressed(e) {
                self.zero_whole(e, false)
            } else if self.is_compressed(e) || self.host(e) != 0 {
                let free = if self.is_compressed(e) {
                    self.compressed_extent(e)
                } else {
                    (self.host(e), self.cs)
                };
                let new = if self.h.version >= 3 {
                    self.zero_entry()
                } else {
                    L2Entry::default()
                };
                (new, Some(free))
            } else if allocated || has_backing {
                let new = if self.h.version >= 3 {
                    self.zero_entry()
                } else {
                    L2Entry::default()
                };
                (new, None)
            } else {
                (e, None)
            };
            if new != e {
                self.set_entry(f, gcl, new).await?;
            }
            if let Some((o, l)) = free {
                self.free_later(o, l);
            }
            pos += n;
        }
        Ok(())
    }

    /// If guest offset `pos` lies under an L1 entry without an L2 table,
    /// the end of that entry's range (at most `end`).
    fn skip_unmapped(&self, pos: u64, end: u64) -> Option<u64> {
        let (l1i, _) = self.indices(pos);
        if self.l1.get(l1i as usize).copied().unwrap_or(0) & super::state::OFFSET_MASK != 0 {
            return None;
        }
        let span = self.cs * self.l2_entries;
        Some(core::cmp::min(end, (l1i + 1) * span))
    }

    fn class(s: Sub) -> u8 {
        match s {
            Sub::Unallocated => 0,
            Sub::Zero => 1,
            Sub::Data(_) | Sub::Compressed => 2,
        }
    }

    /// The status of the extent at `g`, at most `len` bytes, from the L2
    /// tables (QEMU: `qcow2_co_block_status`); unallocated extents report
    /// the backing file's data/zero status, as `bdrv_block_status_above`.
    pub async fn block_status(
        &mut self,
        f: &Child,
        backing: Option<&Child>,
        g: u64,
        len: u64,
    ) -> IoResult<BlockStatus> {
        let e = self.entry(f, g).await?;
        let in_cl = g % self.cs;
        let u = if self.ext { in_cl / self.unit } else { 0 };
        let class = Self::class(self.sub(e, u)?);
        let unit_end = if self.ext {
            (u + 1) * self.unit
        } else {
            self.cs
        };
        let mut n = unit_end - in_cl;
        // Extend over following units and clusters of the same kind, up to
        // the end of this L2 table.
        let limit = core::cmp::min(len, self.cs * self.l2_entries);
        while n < limit {
            let next = g + n;
            let e2 = self.entry(f, next).await?;
            let o = next % self.cs;
            let u2 = if self.ext { o / self.unit } else { 0 };
            if Self::class(self.sub(e2, u2)?) != class {
                break;
            }
            n += if self.ext { self.unit } else { self.cs };
        }
        let n = core::cmp::min(n, len);
        Ok(match class {
            2 => BlockStatus::data(n),
            1 => BlockStatus::zero(n),
            _ => {
                let below = match backing {
                    Some(b) => Some(b.block_status(g, n).await?),
                    None => None,
                };
                match below {
                    Some(s) if s.len > 0 => BlockStatus {
                        data: s.data,
                        zero: s.zero,
                        allocated: false,
                        len: core::cmp::min(s.len, n),
                    },
                    _ => BlockStatus {
                        data: false,
                        zero: true,
                        allocated: false,
                        len: n,
                    },
                }
            }
        })
    }

    /// Drops every cluster past `size` (QEMU: the shrinking half of
    /// `qcow2_co_truncate`, `qcow2_cluster_discard` with a full discard and
    /// `qcow2_shrink_l1_table`): L2 tables wholly past it leave the L1
    /// table, entries of the last table are cleared; everything they
    /// referenced is freed once that is durable. The L1 table keeps its
    /// size.
    async fn shrink(&mut self, f: &Child, backing: Option<&Child>, size: u64) -> IoResult<()> {
        // The part of the last kept cluster past the end reads as zeroes
        // should the image grow again.
        let tail_end = size.div_ceil(self.cs) * self.cs;
        if tail_end > size {
            let n = tail_end - size;
            match self.write_zeroes(f, backing, size, n, ReqFlags::NONE).await {
                Err(IoError::Enotsup) => {
                    self.write(f, backing, size, &vec![0u8; n as usize]).await?
                }
                r => r?,
            }
        }
        let span = self.cs * self.l2_entries;
        let first_whole_cluster = size.div_ceil(self.cs) * self.cs;
        // The partially kept L2 table: clear its entries past the end.
        let table_end = (size.div_ceil(span) * span).min(self.h.size.div_ceil(self.cs) * self.cs);
        let mut g = first_whole_cluster;
        while g < table_end {
            let e = self.entry(f, g).await?;
            if e != L2Entry::default() {
                if self.is_compressed(e) {
                    self.free_later_extent(self.compressed_extent(e));
                } else if self.host(e) != 0 {
                    self.free_later(self.host(e), self.cs);
                }
                self.set_entry(f, g, L2Entry::default()).await?;
            }
            g += self.cs;
        }
        // Whole tables past the end.
        let first_l1 = size.div_ceil(span);
        for l1i in first_l1..self.l1.len() as u64 {
            let off = self.l1[l1i as usize] & super::state::OFFSET_MASK;
            if off == 0 {
                continue;
            }
            for l2i in 0..self.l2_entries {
                let e = self
                    .entry(f, (l1i * self.l2_entries + l2i) * self.cs)
                    .await?;
                if self.is_compressed(e) {
                    self.free_later_extent(self.compressed_extent(e));
                } else if self.host(e) != 0 {
                    self.free_later(self.host(e), self.cs);
                }
            }
            // The L2 changes made so far reach the disk before the table
            // goes; the table is then dropped from the cache unwritten.
            self.write_dirty_l2(f).await?;
            self.clear_l1_entry(f, l1i).await?;
            self.l2c.remove(off);
            self.free_later(off, self.cs);
        }
        self.flush_caches(f).await?;
        f.flush().await?;
        self.write_header_field(f, super::header::field::SIZE, size.to_be_bytes().to_vec())
            .await?;
        f.flush().await?;
        self.h.size = size;
        Ok(())
    }

    fn free_later_extent(&mut self, (off, len): (u64, u64)) {
        self.free_later(off, len);
    }

    /// Changes the virtual size (QEMU: `qcow2_co_truncate`; shrinking is
    /// refused for images with internal snapshots, as QEMU does). Written
    /// through: nothing stays dirty.
    pub async fn truncate(
        &mut self,
        f: &Child,
        backing: Option<&Child>,
        size: u64,
    ) -> IoResult<()> {
        self.check_writable()?;
        if !size.is_multiple_of(512) {
            return Err(IoError::Einval);
        }
        if size < self.h.size {
            if self.h.nb_snapshots > 0 {
                // QEMU: "Can't resize an image which has snapshots".
                return Err(IoError::Enotsup);
            }
            self.shrink(f, backing, size).await?;
        }
        let entries = self.l1_entries_for(size);
        self.grow_l1(f, entries).await?;
        self.flush_caches(f).await?;
        f.flush().await?;
        self.write_header_field(f, super::header::field::SIZE, size.to_be_bytes().to_vec())
            .await?;
        f.flush().await?;
        self.h.size = size;
        Ok(())
    }
}
