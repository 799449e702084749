//! What every copying job shares: a pool of copies in flight (QEMU:
//! `MAX_IN_FLIGHT` and the coroutines a mirror or block-copy spawns), range
//! locks between a job's copies and its users' writes (QEMU: the
//! serialising requests of block-copy and copy-on-read), and the copy of
//! one chunk from a source backend to a target backend.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::task::Poll;

use crate::exec::WaitQueue;
use crate::graph::backend::Backend;
use crate::io::{BoxFuture, IoError, ReqFlags};
use crate::job::Job;

use super::on_error::{ErrorAction, OnError, error_action};
use super::rate_limit::RateLimit;

/// QEMU's `MAX_IN_FLIGHT`: copies a job runs at once.
pub const MAX_IN_FLIGHT: usize = 16;

/// Bytes of copy buffers a job keeps in flight by default (backup always,
/// mirror unless `buf-size` says otherwise).
pub const MAX_BYTES_IN_FLIGHT: u64 = 4 << 20;

/// How long a stopped job waits for its writes in flight before it
/// abandons them too: a target that never answers must not hang a halt.
pub const WRITE_GRACE_NS: u64 = 5_000_000_000;

/// Whether a copy is inside a write. A stopped job abandons a copy only
/// outside its writes: a write cut short may leave an image's metadata
/// half done (a qcow2 allocation between its refcount and L2 updates
/// leaks clusters), while an abandoned read has no effect.
#[derive(Clone, Default)]
pub struct Writing(Rc<Cell<u32>>);

/// A write in progress; dropping it ends it.
pub struct InWrite(Rc<Cell<u32>>);

impl Drop for InWrite {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

impl Writing {
    /// A copy not writing.
    pub fn new() -> Writing {
        Writing::default()
    }

    /// Marks a write as started until the guard is dropped.
    pub fn begin(&self) -> InWrite {
        self.0.set(self.0.get() + 1);
        InWrite(self.0.clone())
    }

    /// Whether a write is in progress.
    pub fn active(&self) -> bool {
        self.0.get() > 0
    }
}

/// Futures polled together by the job's task; results come back in
/// completion order.
pub struct Pool<'a, T> {
    futs: Vec<(BoxFuture<'a, T>, Writing)>,
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

    /// Adds a future that marks its writes in `writing`.
    pub fn push(&mut self, writing: Writing, f: BoxFuture<'a, T>) {
        self.futs.push((f, writing));
    }

    /// Futures not yet complete.
    pub fn len(&self) -> usize {
        self.futs.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.futs.is_empty()
    }

    /// The result of the next future to complete: `Some(None)` if the
    /// pool is empty, `None` once `stop()` is true, checked whenever `wq`
    /// is woken (QEMU: a force-cancelled job abandons its requests,
    /// `bdrv_cancel_in_flight`). A stopped pool is empty: see
    /// [`Pool::abandon`].
    pub async fn next_until(
        &mut self,
        job: &Job,
        wq: &WaitQueue,
        stop: impl Fn() -> bool,
    ) -> Option<Option<T>> {
        let r = core::future::poll_fn(|cx| {
            if stop() {
                return Poll::Ready(None);
            }
            for i in 0..self.futs.len() {
                if let Poll::Ready(v) = self.futs[i].0.as_mut().poll(cx) {
                    drop(self.futs.swap_remove(i));
                    return Poll::Ready(Some(Some(v)));
                }
            }
            if self.futs.is_empty() {
                return Poll::Ready(Some(None));
            }
            wq.register(cx.waker());
            Poll::Pending
        })
        .await;
        if r.is_none() {
            self.abandon(job).await;
        }
        r
    }

    /// Empties the pool of a stopped job: a future outside a write is
    /// dropped at once; one inside a write goes on until the write ends,
    /// for at most [`WRITE_GRACE_NS`]. Dropping is safe: drivers keep their
    /// buffers until the device is done. Returns how many writes were still
    /// in flight when the grace ran out.
    pub async fn abandon(&mut self, job: &Job) -> usize {
        self.futs.retain(|(_, w)| w.active());
        if self.futs.is_empty() {
            return 0;
        }
        let mut grace = job.registry().map(|r| {
            let clock = r.clock();
            let deadline = clock.now_ns().saturating_add(WRITE_GRACE_NS);
            r.executor().timers().sleep_until(clock, deadline)
        });
        core::future::poll_fn(|cx| {
            let mut i = 0;
            while i < self.futs.len() {
                let (f, w) = &mut self.futs[i];
                if f.as_mut().poll(cx).is_ready() || !w.active() {
                    drop(self.futs.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            match &mut grace {
                _ if self.futs.is_empty() => Poll::Ready(()),
                Some(g) => core::pin::Pin::new(g).poll(cx),
                None => Poll::Ready(()),
            }
        })
        .await;
        let left = self.futs.len();
        if left > 0 {
            log::warn!(
                "job '{}': {left} write(s) still in flight after {} s, abandoned",
                job.id(),
                WRITE_GRACE_NS / 1_000_000_000
            );
        }
        self.futs.clear();
        left
    }
}

/// Runs `f`, which marks its writes in `writing`, unless `stop()` turns
/// true first; then `f` is abandoned as [`Pool::abandon`] says.
pub async fn until_stopped<T>(
    f: BoxFuture<'_, T>,
    writing: Writing,
    job: &Job,
    wq: &WaitQueue,
    stop: impl Fn() -> bool,
) -> Option<T> {
    let mut pool = Pool::new();
    pool.push(writing, f);
    pool.next_until(job, wq, stop).await.flatten()
}

/// How a [`walk`] ended.
pub enum Walked {
    /// Every chunk was handled; with the first error `ignore`d, if any.
    Done(Option<IoError>),
    /// The job was cancelled.
    Cancelled,
}

/// The loop of a job that goes once through `[0, len)` in chunks of at
/// most `chunk` bytes (QEMU: `stream_run`, `commit_run`): the job's speed,
/// pause points and cancel, `on_error` for a failed chunk, progress.
/// `copy(offset, len, writing)` handles one chunk, marking its write in
/// `writing`, and says how many bytes it covered (or where it failed:
/// `true` for the read). `Err` is an error the policy reports.
pub async fn walk<'a>(
    job: &Job,
    wq: &WaitQueue,
    len: u64,
    chunk: u64,
    on_error: OnError,
    mut copy: impl FnMut(u64, u64, Writing) -> BoxFuture<'a, Result<u64, (bool, IoError)>>,
) -> Result<Walked, String> {
    let clock = job
        .registry()
        .map(|r| r.clock())
        .ok_or_else(|| String::from("no registry"))?;
    let mut rate = RateLimit::new();
    let mut ignored = None;
    let mut off = 0;
    job.set_progress(0, len);
    while off < len {
        if job.is_cancelled() {
            return Ok(Walked::Cancelled);
        }
        let n = chunk.min(len - off);
        let d = rate.delay_ns(clock.now_ns(), job.speed(), n);
        if d > 0 {
            job.sleep_ns(d).await;
            continue;
        }
        job.pause_point().await;
        if job.is_cancelled() {
            return Ok(Walked::Cancelled);
        }
        let writing = Writing::new();
        let f = copy(off, n, writing.clone());
        let stop = || job.is_cancelled();
        let Some(r) = until_stopped(f, writing, job, wq, stop).await else {
            return Ok(Walked::Cancelled);
        };
        match r {
            Ok(done) => {
                off += done;
                job.set_progress(off, len);
            }
            Err((is_read, e)) => match error_action(job, on_error, is_read, e) {
                ErrorAction::Stop => continue,
                ErrorAction::Report => return Err(e.to_string()),
                ErrorAction::Ignore => {
                    ignored.get_or_insert(e);
                    off += n;
                }
            },
        }
        crate::exec::yield_now().await;
    }
    Ok(Walked::Done(ignored))
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

/// Copies `[offset, offset + len)` from `src` to `dst`, marking the write
/// in `writing`; a chunk of zeroes becomes a write-zeroes (QEMU:
/// `mirror_co_read` / `block_copy_do_copy`).
pub fn copy_chunk(
    src: Rc<Backend>,
    dst: Rc<Backend>,
    offset: u64,
    len: u64,
    writing: Writing,
) -> BoxFuture<'static, Result<u64, CopyError>> {
    Box::pin(async move {
        let data = src
            .read(offset, len as usize)
            .await
            .map_err(CopyError::Read)?;
        let _w = writing.begin();
        let r = if data.iter().all(|b| *b == 0) {
            dst.write_zeroes(offset, len, ReqFlags::NONE).await
        } else {
            dst.write(offset, data, ReqFlags::NONE).await
        };
        r.map_err(CopyError::Write)?;
        Ok(len)
    })
}
