//! The open image (QEMU: `BDRVQcow2State`): header, active L1 table,
//! refcount table, the two table caches, and the write-back order that
//! keeps the image consistent on a crash.
//!
//! # Ordering (QEMU's, from `qcow2_alloc_cluster_link_l2`, `l2_allocate`,
//! `update_refcount` and the cache dependencies)
//! - Guest data is written before the L2 entry that points to it: entries
//!   change only in the L2 cache after the data write returned, and an L2
//!   table is written back only after a flush of the file.
//! - A refcount increment reaches the disk before the reference: dirty
//!   refcount blocks are written (and the file flushed) before any L2 table,
//!   L1 entry, refcount table entry or header field that refers to a newly
//!   allocated cluster.
//! - A refcount decrement reaches the disk after the last reference is gone:
//!   clusters to free wait in [`State::pending_free`] until the L2 tables
//!   that dropped them were written and flushed ([`State::flush_caches`]).
//!
//! Refcounts are never postponed (no lazy refcounts), so the dirty bit is
//! never set: after a crash `qemu-img check` may find leaked clusters but
//! never a cluster in use with a refcount too small.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell, RefMut};

use crate::exec::WaitQueue;
use crate::graph::child::Child;
use crate::io::{IoError, IoResult, ReqFlags};

use super::cache::Cache;
use super::header::Header;

/// Bits 9-55 of an L1/L2 entry or refcount table entry (`L1E_OFFSET_MASK`).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// An asynchronous mutex (QEMU: `CoMutex`, `s->lock`): one request at a
/// time works on the image's metadata.
pub struct CoLock<T> {
    locked: Cell<bool>,
    queue: WaitQueue,
    value: RefCell<T>,
}

/// Holds a [`CoLock`]; unlocks when dropped.
pub struct CoGuard<'a, T> {
    value: Option<RefMut<'a, T>>,
    lock: &'a CoLock<T>,
}

impl<T> CoLock<T> {
    /// A lock around `value`.
    pub fn new(value: T) -> CoLock<T> {
        CoLock {
            locked: Cell::new(false),
            queue: WaitQueue::new(),
            value: RefCell::new(value),
        }
    }

    /// Waits for the lock.
    pub async fn lock(&self) -> CoGuard<'_, T> {
        self.queue.wait_until(|| !self.locked.get()).await;
        self.locked.set(true);
        CoGuard {
            value: Some(self.value.borrow_mut()),
            lock: self,
        }
    }

    /// The value, if nobody holds the lock (synchronous callers).
    pub fn try_get(&self) -> Option<RefMut<'_, T>> {
        if self.locked.get() {
            None
        } else {
            self.value.try_borrow_mut().ok()
        }
    }
}

impl<T> core::ops::Deref for CoGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_deref().unwrap_or_else(|| unreachable!())
    }
}

impl<T> core::ops::DerefMut for CoGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_deref_mut().unwrap_or_else(|| unreachable!())
    }
}

impl<T> Drop for CoGuard<'_, T> {
    fn drop(&mut self) {
        self.value = None;
        self.lock.locked.set(false);
        self.lock.queue.wake_all();
    }
}

/// Data requests running without the image lock (reads of allocated
/// clusters, in-place writes, the data of allocating writes). Freed
/// clusters are handed back only once these are done, so a request never
/// reads or writes a cluster that was reused in the meantime. Guest
/// clusters whose allocating write is between its data write and its L2
/// update are marked; other writes, zero writes and discards of them wait
/// (QEMU: the dependencies between `QCowL2Meta` of overlapping
/// allocations).
#[derive(Default)]
pub struct Inflight {
    count: Cell<u32>,
    idle: WaitQueue,
    allocating: RefCell<BTreeSet<u64>>,
    allocated: WaitQueue,
}

/// One request counted in [`Inflight`].
pub struct InflightGuard(Rc<Inflight>);

/// Guest clusters marked as being allocated; unmarked when dropped.
pub struct AllocGuard {
    owner: Rc<Inflight>,
    first: u64,
    last: u64,
}

impl Inflight {
    /// Counts a request until the guard is dropped.
    pub fn begin(self: &Rc<Self>) -> InflightGuard {
        self.count.set(self.count.get() + 1);
        InflightGuard(self.clone())
    }

    /// Waits until no request is counted.
    pub async fn drain(&self) {
        self.idle.wait_until(|| self.count.get() == 0).await;
    }

    /// Whether a guest cluster in `first..=last` is being allocated.
    pub fn busy(&self, first: u64, last: u64) -> bool {
        self.allocating
            .borrow()
            .range(first..=last)
            .next()
            .is_some()
    }

    /// Waits until no guest cluster in `first..=last` is being allocated.
    pub async fn wait_allocated(&self, first: u64, last: u64) {
        self.allocated.wait_until(|| !self.busy(first, last)).await;
    }

    /// Marks guest clusters `first..=last` as being allocated.
    pub fn mark(self: &Rc<Self>, first: u64, last: u64) -> AllocGuard {
        self.allocating.borrow_mut().extend(first..=last);
        AllocGuard {
            owner: self.clone(),
            first,
            last,
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let n = self.0.count.get().saturating_sub(1);
        self.0.count.set(n);
        if n == 0 {
            self.0.idle.wake_all();
        }
    }
}

impl Drop for AllocGuard {
    fn drop(&mut self) {
        let mut set = self.owner.allocating.borrow_mut();
        for c in self.first..=self.last {
            set.remove(&c);
        }
        drop(set);
        self.owner.allocated.wake_all();
    }
}

/// Reads a big-endian u64 at `at` (0 past the end).
pub fn get64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

/// Writes a big-endian u64 at `at` (ignored past the end).
pub fn put64(b: &mut [u8], at: usize, v: u64) {
    if let Some(s) = b.get_mut(at..at + 8) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// The open image.
pub struct State {
    /// The node's name, for messages.
    pub name: String,
    /// The header as read (fields updated as they are rewritten).
    pub h: Header,
    /// Cluster size in bytes.
    pub cs: u64,
    /// Extended L2 entries.
    pub ext: bool,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// Allocation unit inside a cluster: the subcluster, or the cluster.
    pub unit: u64,
    /// The active L1 table (entries as on disk).
    pub l1: Vec<u64>,
    /// The refcount table (entries as on disk).
    pub reftable: Vec<u64>,
    /// Refcount entries per refcount block.
    pub rb_entries: u64,
    /// L2 table cache.
    pub l2c: Cache,
    /// Refcount block cache.
    pub rbc: Cache,
    /// Where the search for a free cluster starts (cluster index).
    pub free_index: u64,
    /// Clusters to free once the references to them are durably gone:
    /// `(offset, bytes)`.
    pub pending_free: Vec<(u64, u64)>,
    /// Length of the image file as far as this driver knows.
    pub file_len: u64,
    /// Opened read-only.
    pub read_only: bool,
    /// Corruption was found: no more writes (QEMU: `qcow2_signal_corruption`).
    pub corrupt: bool,
    /// Last decompressed cluster: `(L2 entry, data)`.
    pub zcache: Option<(u64, Vec<u8>)>,
    /// Discard freed clusters in the file (`pass-discard-request`).
    pub pass_discard: bool,
    /// Data requests running without the lock.
    pub inflight: Rc<Inflight>,
    /// Clusters never to allocate, whatever their refcount says (in use
    /// while a repair rebuilds refcounts).
    pub reserved: BTreeSet<u64>,
    /// Clusters with a nonzero refcount: what the image uses of its file.
    /// Counted at open, kept by every refcount change, shared with the
    /// node so `query-named-block-nodes` can tell the room left.
    pub used: Rc<Cell<u64>>,
    /// The bitmap directory as it is in the image (a consistent bitmaps
    /// extension only).
    pub bitmaps: Option<super::bitmaps::Directory>,
}

impl State {
    /// State for an image whose header, L1 and refcount tables were read.
    pub fn new(
        name: &str,
        h: Header,
        l1: Vec<u64>,
        reftable: Vec<u64>,
        file_len: u64,
        read_only: bool,
    ) -> State {
        let cs = h.cluster_size();
        let ext = h.extended_l2();
        let l2_entries = if ext { cs / 16 } else { cs / 8 };
        let rb_entries = cs * 8 / u64::from(h.refcount_bits());
        State {
            name: name.into(),
            cs,
            ext,
            l2_entries,
            unit: if ext { cs / 32 } else { cs },
            l1,
            reftable,
            rb_entries,
            l2c: Cache::new(((1u64 << 20) / cs) as usize),
            rbc: Cache::new(((256u64 << 10) / cs) as usize),
            free_index: 0,
            pending_free: Vec::new(),
            file_len,
            read_only,
            corrupt: false,
            zcache: None,
            pass_discard: true,
            inflight: Rc::default(),
            reserved: BTreeSet::new(),
            used: Rc::default(),
            bitmaps: None,
            h,
        }
    }

    /// Records corruption and returns the error for the request (QEMU:
    /// `qcow2_signal_corruption`: "Marking image as corrupt"; blockhaus
    /// does not write the corrupt bit, it stops writing altogether).
    pub fn corruption(&mut self, what: &str) -> IoError {
        if !self.corrupt {
            log::error!(
                "qcow2 node '{}': {what}; further writes are refused",
                self.name
            );
        }
        self.corrupt = true;
        IoError::Eio
    }

    /// Fails unless the image may be written.
    pub fn check_writable(&self) -> IoResult<()> {
        if self.read_only {
            Err(IoError::Eperm)
        } else if self.corrupt {
            Err(IoError::Eio)
        } else {
            Ok(())
        }
    }

    /// Checks a metadata table offset: aligned, not in the header cluster,
    /// inside the file.
    pub fn check_table(&mut self, offset: u64, what: &str) -> IoResult<()> {
        if !offset.is_multiple_of(self.cs) {
            return Err(self.corruption(&format!("{what} offset {offset:#x} unaligned")));
        }
        if offset < self.cs {
            return Err(self.corruption(&format!(
                "{what} at offset {offset:#x} overlaps the image header"
            )));
        }
        if offset.saturating_add(self.cs) > self.file_len {
            return Err(self.corruption(&format!(
                "{what} at offset {offset:#x} is past the end of the image file"
            )));
        }
        Ok(())
    }

    /// Reads from the image file.
    pub async fn pread(&mut self, f: &Child, offset: u64, len: usize) -> IoResult<Vec<u8>> {
        f.read(offset, len, ReqFlags::NONE).await
    }

    /// Writes to the image file (never to a corrupt image).
    pub async fn pwrite(&mut self, f: &Child, offset: u64, data: Vec<u8>) -> IoResult<()> {
        if self.corrupt {
            return Err(IoError::Eio);
        }
        if offset < self.cs {
            // QEMU's overlap check for the header (`QCOW2_OL_MAIN_HEADER`).
            return Err(self.corruption(&format!(
                "a write of {} bytes at {offset:#x} would overwrite the header",
                data.len()
            )));
        }
        let end = offset + data.len() as u64;
        f.write(offset, data, ReqFlags::NONE).await?;
        self.file_len = self.file_len.max(end);
        Ok(())
    }

    /// Rewrites a header field in place (QEMU writes single fields the
    /// same way, e.g. `qcow2_mark_dirty`, the L1 and refcount table moves).
    pub async fn write_header_field(&mut self, f: &Child, at: u64, data: Vec<u8>) -> IoResult<()> {
        if self.corrupt {
            return Err(IoError::Eio);
        }
        f.write(at, data, ReqFlags::NONE).await
    }

    /// Loads the L2 table at `offset` into the cache; returns its slot.
    pub async fn load_l2(&mut self, f: &Child, offset: u64) -> IoResult<usize> {
        if let Some(i) = self.l2c.find(offset) {
            return Ok(i);
        }
        self.check_table(offset, "L2 table")?;
        if self.l2c.is_full() && !self.l2c.evict_clean() {
            // Writing an L2 table needs its flush dependencies first.
            self.flush_caches(f).await?;
            self.l2c.evict_clean();
        }
        let data = self.pread(f, offset, self.cs as usize).await?;
        Ok(self.l2c.insert(offset, data, false))
    }

    /// Loads the refcount block at `offset` into the cache; returns its slot.
    pub async fn load_rb(&mut self, f: &Child, offset: u64) -> IoResult<usize> {
        if let Some(i) = self.rbc.find(offset) {
            return Ok(i);
        }
        self.check_table(offset, "Refcount block")?;
        if self.rbc.is_full() && !self.rbc.evict_clean() {
            // A refcount block may always be written early: it only ever
            // holds increments, or decrements whose references are gone.
            if let Some(i) = self.rbc.lru() {
                self.write_rb_slot(f, i).await?;
            }
            self.rbc.evict_clean();
        }
        let data = self.pread(f, offset, self.cs as usize).await?;
        Ok(self.rbc.insert(offset, data, false))
    }

    async fn write_rb_slot(&mut self, f: &Child, i: usize) -> IoResult<()> {
        let Some(s) = self.rbc.slot(i) else {
            return Ok(());
        };
        let (off, data) = (s.offset, s.data.clone());
        self.pwrite(f, off, data).await?;
        if let Some(s) = self.rbc.slot_mut(i) {
            s.dirty = false;
        }
        Ok(())
    }

    /// Writes every dirty refcount block.
    pub async fn write_dirty_rbs(&mut self, f: &Child) -> IoResult<()> {
        for i in self.rbc.dirty() {
            self.write_rb_slot(f, i).await?;
        }
        Ok(())
    }

    /// Writes every dirty L2 table, after the refcount blocks and the data
    /// they depend on are durable.
    pub async fn write_dirty_l2(&mut self, f: &Child) -> IoResult<()> {
        if !self.l2c.any_dirty() {
            return Ok(());
        }
        self.write_dirty_rbs(f).await?;
        f.flush().await?;
        for i in self.l2c.dirty() {
            let Some(s) = self.l2c.slot(i) else { continue };
            let (off, data) = (s.offset, s.data.clone());
            self.pwrite(f, off, data).await?;
            if let Some(s) = self.l2c.slot_mut(i) {
                s.dirty = false;
            }
        }
        Ok(())
    }

    /// Writes everything back in dependency order and applies the refcount
    /// decrements that became safe (QEMU: `qcow2_write_caches`). The file
    /// itself is flushed by the caller (the node's generic flush).
    pub async fn flush_caches(&mut self, f: &Child) -> IoResult<()> {
        if self.corrupt {
            return Err(IoError::Eio);
        }
        self.write_dirty_l2(f).await?;
        if !self.pending_free.is_empty() {
            // The L2 tables that dropped these clusters must be durable, and
            // no request may still be using them.
            f.flush().await?;
            let inflight = self.inflight.clone();
            inflight.drain().await;
            let frees = core::mem::take(&mut self.pending_free);
            for (off, len) in frees {
                self.free_now(f, off, len).await?;
            }
        }
        self.write_dirty_rbs(f).await
    }

    /// The guest clusters `[g, g+len)` touches, first and last (len > 0).
    pub fn cluster_range(&self, g: u64, len: u64) -> (u64, u64) {
        (g / self.cs, (g + len.max(1) - 1) / self.cs)
    }

    /// A zeroed cluster buffer.
    pub fn zero_cluster(&self) -> Vec<u8> {
        vec![0; self.cs as usize]
    }
}
