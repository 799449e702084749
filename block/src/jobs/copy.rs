//! What every copying job shares: a pool of copies in flight (QEMU:
//! `MAX_IN_FLIGHT` and the coroutines a mirror or block-copy spawns), range
//! locks between a job's copies and its users' writes (QEMU: the
//! serialising requests of block-copy and copy-on-read), and the copy of
//! one chunk from a source backend to a target backend.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::task::Poll;

use crate::backend::Backend;
use crate::exec::WaitQueue;
use crate::io::{BoxFuture, IoError, ReqFlags};

/// QEMU's `MAX_IN_FLIGHT`: copies a job runs at once.
pub const MAX_IN_FLIGHT: usize = 16;

/// Bytes of copy buffers a job keeps in flight by default (backup always,
/// mirror unless `buf-size` says otherwise).
pub const MAX_BYTES_IN_FLIGHT: u64 = 4 << 20;

/// Futures polled together by the job's task; results come back in
/// completion order.
pub struct Pool<'a, T> {
    futs: Vec<BoxFuture<'a, T>>,
}

impl<T> Default for Pool<'_, T> {
    fn default() -> Self {
        Pool { futs: Vec::new() }
    }
}

impl<'a, T> Pool<'a, T> {
    /// An empty pool.
    pub fn new() -> Self {
        Pool::default()
    }

    /// Adds a future.
    pub fn push(&mut self, f: BoxFuture<'a, T>) {
        self.futs.push(f);
    }

    /// Futures not yet complete.
    pub fn len(&self) -> usize {
        self.futs.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.futs.is_empty()
    }

    /// The result of the next future to complete; `None` if the pool is
    /// empty.
    pub async fn next(&mut self) -> Option<T> {
        if self.futs.is_empty() {
            return None;
        }
        core::future::poll_fn(|cx| {
            for i in 0..self.futs.len() {
                if let Poll::Ready(v) = self.futs[i].as_mut().poll(cx) {
                    drop(self.futs.swap_remove(i));
                    return Poll::Ready(Some(v));
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// Runs `f` unless `stop()` turns true first, checked whenever `wq` is
/// woken (QEMU: a force-cancelled job abandons its requests in flight,
/// `bdrv_cancel_in_flight`). Dropping `f` is safe: drivers keep their
/// buffers until the device is done.
pub async fn until_stopped<F: core::future::Future>(
    f: F,
    wq: &WaitQueue,
    stop: impl Fn() -> bool,
) -> Option<F::Output> {
    let mut f = core::pin::pin!(f);
    core::future::poll_fn(|cx| {
        if stop() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(v) = f.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        wq.register(cx.waker());
        Poll::Pending
    })
    .await
}

/// Byte ranges in use; a new user of an overlapping range waits.
#[derive(Default)]
pub struct RangeLock {
    held: RefCell<Vec<(u64, u64, u64)>>,
    next: Cell<u64>,
    wq: WaitQueue,
}

/// A held range; dropping it lets waiters in.
pub struct RangeGuard {
    lock: Rc<RangeLock>,
    id: u64,
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.lock
            .held
            .borrow_mut()
            .retain(|(_, _, i)| *i != self.id);
        self.lock.wq.wake_all();
    }
}

impl RangeLock {
    /// A lock with nothing held.
    pub fn new() -> Rc<RangeLock> {
        Rc::new(RangeLock::default())
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len.max(1));
        self.held
            .borrow()
            .iter()
            .any(|(o, l, _)| offset < o.saturating_add(*l) && *o < end)
    }

    /// Waits until nothing overlapping is held, then holds the range.
    pub async fn lock(self: &Rc<Self>, offset: u64, len: u64) -> RangeGuard {
        self.wq.wait_until(|| !self.overlaps(offset, len)).await;
        let id = self.next.get();
        self.next.set(id + 1);
        self.held.borrow_mut().push((offset, len.max(1), id));
        RangeGuard {
            lock: self.clone(),
            id,
        }
    }

    /// Whether any range is held.
    pub fn is_idle(&self) -> bool {
        self.held.borrow().is_empty()
    }
}

/// Where a copy failed: reading the source or writing the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyError {
    /// The source read failed.
    Read(IoError),
    /// The target write failed.
    Write(IoError),
}

impl CopyError {
    /// Whether it was the read.
    pub fn is_read(self) -> bool {
        matches!(self, CopyError::Read(_))
    }

    /// The I/O error.
    pub fn error(self) -> IoError {
        match self {
            CopyError::Read(e) | CopyError::Write(e) => e,
        }
    }
}

/// Copies `[offset, offset + len)` from `src` to `dst`; a chunk of zeroes
/// becomes a write-zeroes (QEMU: `mirror_co_read` / `block_copy_do_copy`).
pub fn copy_chunk(
    src: Rc<Backend>,
    dst: Rc<Backend>,
    offset: u64,
    len: u64,
) -> BoxFuture<'static, Result<u64, CopyError>> {
    Box::pin(async move {
        let data = src
            .read(offset, len as usize)
            .await
            .map_err(CopyError::Read)?;
        let r = if data.iter().all(|b| *b == 0) {
            dst.write_zeroes(offset, len, ReqFlags::NONE).await
        } else {
            dst.write(offset, data, ReqFlags::NONE).await
        };
        r.map_err(CopyError::Write)?;
        Ok(len)
    })
}
