//! `copy-before-write` (QEMU: `block/copy-before-write.c` over
//! `block/block-copy.c`): the filter that makes a backup show the source
//! as it was when the job started.
//!
//! [`BlockCopy`] holds the copy bitmap — every chunk not yet in the target
//! — and copies chunks from the source to the target through the backup
//! job's backends, each under a range lock. Before a user's write goes
//! down, the filter ([`CbwHook`]) copies every chunk it touches that is
//! still marked, so the old data reaches the target first; the job copies
//! the rest. A chunk is copied exactly once, by whoever comes first; the
//! other waits on the lock and then finds it clean. A failed copy fails
//! the user's write (QEMU's default `on-cbw-error=break-guest-write`) and
//! leaves the chunk marked.

use alloc::boxed::Box;
use alloc::rc::Rc;
use core::cell::RefCell;

use crate::graph::backend::Backend;
use crate::graph::node::Node;
use crate::io::{BoxFuture, IoResult, ReqFlags};

use super::chain::{allocated_above, backing};
use super::copy::{CopyError, RangeLock, Writing, copy_chunk};
use super::dirty_bitmap::DirtyBitmap;
use super::filter::{Guard, WriteHook};

/// The copy state shared by the backup job and its filter (QEMU:
/// `BlockCopyState`).
pub struct BlockCopy {
    bitmap: RefCell<DirtyBitmap>,
    locks: Rc<RangeLock>,
    src: Rc<Backend>,
    tgt: Rc<Backend>,
    /// `sync=top`: chunks the source does not hold itself are not copied.
    top_of: Option<Rc<Node>>,
}

impl BlockCopy {
    /// Copy state for `len` bytes, everything marked.
    pub fn new(
        len: u64,
        granularity: u64,
        src: Rc<Backend>,
        tgt: Rc<Backend>,
        top_of: Option<Rc<Node>>,
    ) -> Rc<BlockCopy> {
        let mut bitmap = DirtyBitmap::new(len, granularity);
        bitmap.set_all();
        Rc::new(BlockCopy {
            bitmap: RefCell::new(bitmap),
            locks: RangeLock::new(),
            src,
            tgt,
            top_of,
        })
    }

    /// Copies only what `b` marks (QEMU: `backup_init_bcs_bitmap` for
    /// `sync=bitmap`).
    pub fn restrict_to(&self, b: &DirtyBitmap) {
        let mut m = self.bitmap.borrow_mut();
        m.clear();
        m.merge(b);
    }

    /// What is not copied yet.
    pub fn uncopied(&self) -> DirtyBitmap {
        self.bitmap.borrow().clone()
    }

    /// The chunk size.
    pub fn granularity(&self) -> u64 {
        self.bitmap.borrow().granularity()
    }

    /// Bytes not yet copied.
    pub fn remaining(&self) -> u64 {
        self.bitmap.borrow().dirty_bytes()
    }

    /// The next marked extent at or after `from`, at most `max` bytes.
    pub fn next_dirty(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        self.bitmap.borrow().next_dirty(from, max)
    }

    /// Copies every marked chunk of `[offset, offset + len)` (QEMU:
    /// `block_copy`), marking its writes in `writing`; returns the bytes
    /// handled (copied or skipped).
    pub async fn copy_range(
        &self,
        offset: u64,
        len: u64,
        writing: &Writing,
    ) -> Result<u64, CopyError> {
        let g = self.granularity();
        let total = self.bitmap.borrow().len();
        let start = offset / g * g;
        let end = offset
            .saturating_add(len)
            .div_ceil(g)
            .saturating_mul(g)
            .min(total);
        if start >= end {
            return Ok(0);
        }
        let _guard = self.locks.lock(start, end - start).await;
        let mut handled = 0;
        let mut pos = start;
        while pos < end {
            // At most 1 MiB per copy, whatever the length of the user's write.
            let max = (end - pos).min(super::mirror::MAX_CHUNK.max(self.granularity()));
            let next = self.bitmap.borrow().next_dirty(pos, max);
            let Some((o, l)) = next else { break };
            if o >= end {
                break;
            }
            let l = l.min(end - o);
            self.bitmap.borrow_mut().reset(o, l);
            let r = self.copy_extent(o, l, writing).await;
            if let Err(e) = r {
                self.bitmap.borrow_mut().set(o, l);
                return Err(e);
            }
            handled += l;
            pos = o + l;
        }
        Ok(handled)
    }

    async fn copy_extent(&self, offset: u64, len: u64, writing: &Writing) -> Result<(), CopyError> {
        let Some(top) = &self.top_of else {
            return copy_chunk(
                self.src.clone(),
                self.tgt.clone(),
                offset,
                len,
                writing.clone(),
            )
            .await
            .map(|_| ());
        };
        let base = backing(top);
        let mut off = offset;
        let end = offset + len;
        while off < end {
            let (alloc, n) = allocated_above(top, base.as_ref(), off, end - off)
                .await
                .map_err(CopyError::Read)?;
            let n = n.min(end - off);
            if alloc {
                copy_chunk(self.src.clone(), self.tgt.clone(), off, n, writing.clone()).await?;
            }
            off += n;
        }
        Ok(())
    }
}

/// The filter's hook.
pub struct CbwHook {
    /// The copy state.
    pub bcs: Rc<BlockCopy>,
}

impl WriteHook for CbwHook {
    fn before_write<'a>(
        &'a self,
        offset: u64,
        len: u64,
        _: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Guard>> {
        Box::pin(async move {
            // A user's write is never abandoned, nor its copy.
            self.bcs
                .copy_range(offset, len, &Writing::new())
                .await
                .map_err(CopyError::error)?;
            Ok(Box::new(()) as Guard)
        })
    }

    fn after_write(&self, _: u64, _: u64) {}
}
