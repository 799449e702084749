//! `blockdev-mirror` and active `block-commit` (QEMU: `block/mirror.c`,
//! `mirror_start_job`, `mirror_run`, `mirror_complete`, `mirror_cancel`,
//! `mirror_exit_common`, the `mirror_top` / `commit_top` filter).
//!
//! The job inserts a filter above the source (named by `filter-node-name`,
//! else implicit) and moves the source's users onto it, as QEMU does, and
//! registers a write notifier on the source ([`Node::add_write_notifier`]):
//! every write that completes on the source — through the filter or from
//! a user that attached to the source directly — marks the written chunks
//! dirty in the job's [`DirtyBitmap`].
//! The initial bitmap is what `sync` asks for: everything (`full`), what
//! the source holds itself (`top`), nothing (`none`), or for an active
//! commit what lies above `base`. The job copies dirty chunks (at most
//! [`MAX_IN_FLIGHT`] at once, `buf-size` bytes in flight, at `speed`),
//! clearing a chunk's bit *before* reading it, so a write that lands during
//! the copy marks it again. When nothing is dirty the job is ready
//! (`BLOCK_JOB_READY`) and keeps the target in sync.
//!
//! `job-complete` makes it converge in a drained section of the source
//! (no user write can start), flush the target, and at finalize *pivot*:
//! every user of the source (the filter's parents and any direct user) is
//! moved to the target
//! ([`crate::graph::replace::replace_node`]). `block-job-cancel` of a ready job
//! (no `force`) completes without pivoting; any other cancel is forced and
//! ends with `BLOCK_JOB_CANCELLED`. Either way the filter's users go back
//! to the source and the filter closes by its refcount.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::task::Poll;

use crate::exec::WaitQueue;
use crate::graph::backend::Backend;
use crate::graph::backend::Drained;
use crate::graph::node::Node;
use crate::graph::permission::Perm;
use crate::io::{BoxFuture, IoResult, ReqFlags};
use crate::job::{Job, JobDriver, JobFailure, JobStatus, RegistryJobs};

use super::chain::{allocated_above, backing};
use super::copy::{CopyError, MAX_IN_FLIGHT, Pool, Writing, copy_chunk, until_stopped};
use super::dirty_bitmap::DirtyBitmap;
use super::filter::{Guard, WriteHook, insert_filter, remove_filter};
use super::on_error::{ErrorAction, OnError, error_action};
use super::rate_limit::{RateLimit, SLICE_NS};

/// Default `buf-size`: 4 MiB of copies in flight (QEMU's
/// `DEFAULT_MIRROR_BUF_SIZE` is 16 MiB; an appliance that runs in 28 MiB
/// keeps the default within [`super::copy::MAX_BYTES_IN_FLIGHT`]).
pub const DEFAULT_BUF_SIZE: u64 = super::copy::MAX_BYTES_IN_FLIGHT;
/// Default dirty granularity: 64 KiB (QEMU: the image's cluster size,
/// 64 KiB for qcow2 and when unknown).
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;
/// Largest copy request.
pub const MAX_CHUNK: u64 = 1 << 20;

/// QEMU's `MirrorSyncMode` (the supported subset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Copy the whole disk.
    Full,
    /// Copy what the top image holds itself.
    Top,
    /// Copy only what is written from now on.
    None,
    /// Copy what a dirty bitmap marks (backup only: `sync=bitmap` and
    /// `sync=incremental`).
    Bitmap,
}

impl SyncMode {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Full => "full",
            SyncMode::Top => "top",
            SyncMode::None => "none",
            SyncMode::Bitmap => "bitmap",
        }
    }
}

/// How a mirror is set up.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// `sync`.
    pub sync: SyncMode,
    /// `granularity` in bytes (a power of two).
    pub granularity: u64,
    /// `buf-size`: bytes in flight.
    pub buf_size: u64,
    /// `on-source-error`.
    pub on_source_error: OnError,
    /// `on-target-error`.
    pub on_target_error: OnError,
    /// `filter-node-name`.
    pub filter_node_name: Option<String>,
    /// Active commit: copy what is allocated above this node (the target).
    pub commit_base: Option<Rc<Node>>,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            sync: SyncMode::Full,
            granularity: DEFAULT_GRANULARITY,
            buf_size: DEFAULT_BUF_SIZE,
            on_source_error: OnError::Report,
            on_target_error: OnError::Report,
            filter_node_name: None,
            commit_base: None,
        }
    }
}

/// The dirty bitmap, marked by the source's write notifier.
pub struct MirrorHook {
    bitmap: RefCell<DirtyBitmap>,
    wq: WaitQueue,
}

impl MirrorHook {
    fn mark(&self, offset: u64, len: u64) {
        self.bitmap.borrow_mut().set(offset, len);
        self.wq.wake_all();
    }
}

/// The filter itself sees nothing the source's write notifier does not.
impl WriteHook for MirrorHook {
    fn before_write<'a>(&'a self, _: u64, _: u64, _: ReqFlags) -> BoxFuture<'a, IoResult<Guard>> {
        crate::driver::ready(Ok(Box::new(()) as Guard))
    }

    fn after_write(&self, _: u64, _: u64) {}
}

/// One mirror (or active commit) job.
pub struct Mirror {
    opts: MirrorOptions,
    job_type: &'static str,
    source: Rc<Node>,
    target: Rc<Node>,
    hook: Rc<MirrorHook>,
    filter: RefCell<Option<Rc<Node>>>,
    src: RefCell<Option<Rc<Backend>>>,
    tgt: RefCell<Option<Rc<Backend>>>,
    should_complete: Cell<bool>,
    synced: Cell<bool>,
    drained: RefCell<Option<Drained>>,
    copied: Cell<u64>,
    rate: RefCell<RateLimit>,
    notifier: Cell<Option<u64>>,
}

/// Why a mirror could not be started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorError {
    /// Source and target differ in length.
    Size,
    /// The source's length.
    Length(String),
    /// Inserting the filter or attaching the job's backends.
    Setup(String),
}

impl core::fmt::Display for MirrorError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MirrorError::Size => f.write_str("Source and target image have different sizes"),
            MirrorError::Length(e) => write!(f, "bdrv_getlength failed: {e}"),
            MirrorError::Setup(e) => f.write_str(e),
        }
    }
}

/// Creates and starts a mirror job `id` from `source` to `target` (QEMU:
/// `mirror_start_job`). `job_type` is `"mirror"` or `"commit"`.
pub async fn start_mirror(
    id: &str,
    job_type: &'static str,
    source: &Rc<Node>,
    target: &Rc<Node>,
    opts: MirrorOptions,
    job_opts: super::JobSetup,
) -> Result<Rc<Job>, String> {
    let reg = source
        .registry()
        .ok_or_else(|| String::from("no registry"))?;
    super::check_job_id(&reg, id)?;
    super::check_not_busy(&reg, source)?;
    super::check_not_busy(&reg, target)?;
    let len = source
        .get_length()
        .map_err(|e| MirrorError::Length(e.to_string()).to_string())?;
    let tlen = target
        .get_length()
        .map_err(|e| MirrorError::Length(e.to_string()).to_string())?;
    if opts.commit_base.is_none() && len != tlen {
        return Err(MirrorError::Size.to_string());
    }
    let hook = Rc::new(MirrorHook {
        bitmap: RefCell::new(DirtyBitmap::new(len, opts.granularity)),
        wq: WaitQueue::new(),
    });
    let fmt = if job_type == "commit" {
        "commit_top"
    } else {
        "mirror_top"
    };
    let filter = insert_filter(
        source,
        opts.filter_node_name.as_deref(),
        fmt,
        "backing",
        hook.clone(),
        &[],
        // Like QEMU's mirror_top and commit_top, the filter lets others
        // write to the source: the write notifier sees them too.
        false,
    )
    .await?;
    let weak = Rc::downgrade(&hook);
    let notifier = source.add_write_notifier(Rc::new(move |offset, len| {
        if let Some(h) = weak.upgrade() {
            h.mark(offset, len);
        }
    }));
    let drv = Rc::new(Mirror {
        opts,
        job_type,
        source: source.clone(),
        target: target.clone(),
        hook,
        filter: RefCell::new(Some(filter.clone())),
        src: RefCell::new(None),
        tgt: RefCell::new(None),
        should_complete: Cell::new(false),
        synced: Cell::new(false),
        drained: RefCell::new(None),
        copied: Cell::new(0),
        rate: RefCell::new(RateLimit::new()),
        notifier: Cell::new(Some(notifier)),
    });
    let job = match reg.create_job(id, drv.clone(), job_opts.job_options()) {
        Ok(j) => j,
        Err(e) => {
            source.remove_write_notifier(notifier);
            remove_filter(filter).await;
            return Err(e.to_string());
        }
    };
    let commit = drv.opts.commit_base.is_some();
    // QEMU: the job's blk on the source shares everything but RESIZE;
    // the target is the job's alone (an active commit's base is read by
    // its overlay, so it shares reads there).
    let tgt_shared = if commit {
        Perm::ALL.minus(Perm::RESIZE)
    } else {
        Perm::WRITE_UNCHANGED
    };
    let r = job
        .add_backend(source, Perm::CONSISTENT_READ, Perm::ALL.minus(Perm::RESIZE))
        .and_then(|s| {
            // QEMU: a base smaller than the top is grown first.
            let perm = if commit && tlen < len {
                Perm::WRITE | Perm::RESIZE
            } else {
                Perm::WRITE
            };
            job.add_backend(target, perm, tgt_shared).map(|t| (s, t))
        });
    match r {
        Ok((s, t)) => {
            *drv.src.borrow_mut() = Some(s);
            *drv.tgt.borrow_mut() = Some(t);
        }
        Err(e) => {
            source.remove_write_notifier(notifier);
            job.early_fail().await;
            remove_filter(filter).await;
            return Err(e.to_string());
        }
    }
    job.set_auto(job_opts.auto_finalize, job_opts.auto_dismiss);
    job.start();
    Ok(job)
}

type CopyResult = (u64, u64, Result<u64, CopyError>);

impl Mirror {
    fn backends(&self) -> Result<(Rc<Backend>, Rc<Backend>), JobFailure> {
        match (self.src.borrow().clone(), self.tgt.borrow().clone()) {
            (Some(s), Some(t)) => Ok((s, t)),
            _ => Err("mirror job without backends".into()),
        }
    }

    fn chunk(&self) -> u64 {
        let g = self.opts.granularity;
        (self.opts.buf_size / MAX_IN_FLIGHT as u64).clamp(g, MAX_CHUNK.max(g))
    }

    fn max_in_flight(&self) -> usize {
        ((self.opts.buf_size / self.chunk()) as usize).clamp(1, MAX_IN_FLIGHT)
    }

    fn update_progress(&self, job: &Job, in_flight: u64) {
        let remaining = self.hook.bitmap.borrow().dirty_bytes() + in_flight;
        let cur = self.copied.get();
        job.set_progress(cur, cur + remaining);
    }

    /// QEMU's `mirror_dirty_init`.
    async fn dirty_init(&self, job: &Job) -> Result<(), JobFailure> {
        let len = self.hook.bitmap.borrow().len();
        let base = match (&self.opts.commit_base, self.opts.sync) {
            (Some(b), _) => Some(b.clone()),
            // A mirror is never started with a bitmap mode (refused by
            // blockdev-mirror); copying everything is the safe reading.
            (None, SyncMode::Full | SyncMode::Bitmap) => {
                self.hook.bitmap.borrow_mut().set_all();
                return Ok(());
            }
            (None, SyncMode::None) => return Ok(()),
            (None, SyncMode::Top) => backing(&self.source),
        };
        let mut off = 0;
        while off < len {
            if job.is_cancelled() {
                return Ok(());
            }
            let (alloc, n) = allocated_above(&self.source, base.as_ref(), off, len - off).await?;
            if alloc {
                self.hook.bitmap.borrow_mut().set(off, n);
            }
            off += n;
        }
        Ok(())
    }

    /// Waits until there is something to do: dirty data, a cancel, a
    /// complete, a pause request, or a slice passed.
    async fn idle(&self, job: &Job) {
        let mut sleep = Box::pin(job.sleep_ns(SLICE_NS));
        core::future::poll_fn(|cx| {
            if self.hook.bitmap.borrow().dirty_bytes() > 0
                || job.is_cancelled()
                || self.should_complete.get()
                || job.pause_requested()
            {
                return Poll::Ready(());
            }
            self.hook.wq.register(cx.waker());
            sleep.as_mut().poll(cx)
        })
        .await;
    }

    /// Handles a failed copy; `Err` fails the job.
    fn copy_failed(&self, job: &Job, off: u64, len: u64, e: CopyError) -> Result<(), JobFailure> {
        self.hook.bitmap.borrow_mut().set(off, len);
        let policy = if e.is_read() {
            self.opts.on_source_error
        } else {
            self.opts.on_target_error
        };
        match error_action(job, policy, e.is_read(), e.error()) {
            ErrorAction::Report => Err(e.error().into()),
            ErrorAction::Ignore | ErrorAction::Stop => Ok(()),
        }
    }

    /// The last pass with the source's users quiesced (QEMU: the end of
    /// `mirror_run`): copy what is still dirty, flush the target. Leaves
    /// the drained section open for the pivot; `Ok(false)` if it has to
    /// go on (an ignored or stopping error).
    async fn converge(
        &self,
        job: &Job,
        src: &Rc<Backend>,
        tgt: &Rc<Backend>,
    ) -> Result<bool, JobFailure> {
        let drained = Drained::begin(&self.source).await;
        loop {
            let next = self.hook.bitmap.borrow().next_dirty(0, self.chunk());
            let Some((off, len)) = next else { break };
            self.hook.bitmap.borrow_mut().reset(off, len);
            let writing = Writing::new();
            let copy = copy_chunk(src.clone(), tgt.clone(), off, len, writing.clone());
            let stop = || job.is_force_cancelled();
            let Some(r) = until_stopped(copy, writing, job, &self.hook.wq, stop).await else {
                drained.end();
                return Ok(false);
            };
            match r {
                Ok(n) => self.copied.set(self.copied.get() + n),
                Err(e) => {
                    drained.end();
                    self.copy_failed(job, off, len, e)?;
                    return Ok(false);
                }
            }
        }
        if let Err(e) = tgt.flush().await {
            drained.end();
            self.copy_failed(job, 0, 0, CopyError::Write(e))?;
            return Ok(false);
        }
        self.update_progress(job, 0);
        *self.drained.borrow_mut() = Some(drained);
        Ok(true)
    }

    async fn run_loop(&self, job: &Job) -> Result<(), JobFailure> {
        let (src, tgt) = self.backends()?;
        let len = self.hook.bitmap.borrow().len();
        if self.opts.commit_base.is_some() && tgt.get_length()? < len {
            tgt.truncate(len).await?;
        }
        self.dirty_init(job).await?;
        self.update_progress(job, 0);
        let clock = job
            .registry()
            .map(|r| r.clock())
            .ok_or(JobFailure::from("no registry"))?;
        let mut pool: Pool<'static, CopyResult> = Pool::new();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut from = 0u64;
        let mut failure: Option<JobFailure> = None;
        loop {
            if job.is_cancelled() || failure.is_some() {
                // Let the copies in flight finish (QEMU:
                // mirror_wait_for_all_io) and stop; a forced cancel
                // abandons them, all but their writes.
                let stop = || job.is_force_cancelled();
                while let Some(Some(_)) = pool.next_until(job, &self.hook.wq, stop).await {}
                break;
            }
            if pool.is_empty() {
                job.pause_point().await;
                if job.is_cancelled() {
                    continue;
                }
            }
            // Start copies while there is room.
            let mut rate_delay = 0;
            while pool.len() < self.max_in_flight() && !job.pause_requested() {
                let next = {
                    let b = self.hook.bitmap.borrow();
                    let mut found = None;
                    let mut pos = from;
                    let mut wrapped = false;
                    loop {
                        match b.next_dirty(pos, self.chunk()) {
                            Some((o, l)) => {
                                if ranges.iter().any(|(ro, rl)| o < ro + rl && *ro < o + l) {
                                    pos = o + l;
                                    continue;
                                }
                                found = Some((o, l));
                                break;
                            }
                            None if !wrapped && from > 0 => {
                                wrapped = true;
                                pos = 0;
                            }
                            None => break,
                        }
                    }
                    found
                };
                let Some((off, len)) = next else { break };
                let d = self
                    .rate
                    .borrow_mut()
                    .delay_ns(clock.now_ns(), job.speed(), len);
                if d > 0 {
                    rate_delay = d;
                    break;
                }
                self.hook.bitmap.borrow_mut().reset(off, len);
                ranges.push((off, len));
                from = off + len;
                let writing = Writing::new();
                let f = copy_chunk(src.clone(), tgt.clone(), off, len, writing.clone());
                pool.push(writing, Box::pin(async move { (off, len, f.await) }));
            }
            let in_flight: u64 = ranges.iter().map(|(_, l)| l).sum();
            self.update_progress(job, in_flight);
            if pool.is_empty() {
                if rate_delay > 0 {
                    job.sleep_ns(rate_delay).await;
                    continue;
                }
                // Nothing dirty, nothing in flight.
                if !self.synced.get() {
                    self.synced.set(true);
                    job.set_ready();
                }
                if self.should_complete.get() && !job.is_cancelled() {
                    if self.converge(job, &src, &tgt).await? {
                        return Ok(());
                    }
                    continue;
                }
                self.idle(job).await;
                continue;
            }
            let stop = || job.is_force_cancelled();
            let next = pool.next_until(job, &self.hook.wq, stop).await;
            if let Some(Some((off, len, res))) = next {
                ranges.retain(|r| *r != (off, len));
                match res {
                    Ok(n) => self.copied.set(self.copied.get() + n),
                    Err(e) => {
                        if let Err(msg) = self.copy_failed(job, off, len, e) {
                            failure = Some(msg);
                        } else {
                            crate::exec::yield_now().await;
                        }
                    }
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl JobDriver for Mirror {
    fn job_type(&self) -> &str {
        self.job_type
    }

    fn run(self: Rc<Self>, job: Rc<Job>) -> BoxFuture<'static, Result<(), JobFailure>> {
        Box::pin(async move { self.run_loop(&job).await })
    }

    /// QEMU's `mirror_complete`.
    fn complete(&self, job: &Job) -> Result<(), String> {
        if !self.synced.get() {
            return Err(alloc::format!(
                "The active block job '{}' cannot be completed",
                job.id()
            ));
        }
        self.should_complete.set(true);
        self.hook.wq.wake_all();
        Ok(())
    }

    /// QEMU's `mirror_cancel`: before ready every cancel is forced.
    fn cancel(&self, job: &Job, force: bool) -> bool {
        self.hook.wq.wake_all();
        force || !matches!(job.status(), JobStatus::Ready | JobStatus::Standby)
    }

    /// The pivot (QEMU: `mirror_exit_common` with `should_complete`).
    fn prepare(self: Rc<Self>, job: Rc<Job>) -> BoxFuture<'static, Result<(), JobFailure>> {
        Box::pin(async move {
            if !self.should_complete.get() || job.is_cancelled() {
                return Ok(());
            }
            let filter = self.filter.borrow().clone();
            let Some(filter) = filter else {
                return Ok(());
            };
            if let Some(t) = self.tgt.borrow().clone()
                && let Err(e) = t.set_perm(Perm::NONE, Perm::ALL)
            {
                return Err(e.to_string().into());
            }
            crate::graph::replace::replace_node(&filter, &self.target, |_| false)
                .await
                .map_err(|e| e.to_string())?;
            // Users that attached to the source itself meanwhile move too
            // (QEMU replaces the source in every parent); the filter's edge
            // and the job's own backend stay.
            let job_blks = job.backends();
            crate::graph::replace::replace_node(&self.source, &self.target, |e| {
                e.parent_node().is_some_and(|p| Rc::ptr_eq(&p, &filter))
                    || e.parent_backend()
                        .is_some_and(|b| job_blks.iter().any(|j| Rc::ptr_eq(j, &b)))
            })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string().into())
        })
    }

    /// Takes the filter out (its remaining users go back to the source)
    /// and ends the drained section.
    fn clean(self: Rc<Self>, _job: Rc<Job>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if let Some(id) = self.notifier.take() {
                self.source.remove_write_notifier(id);
            }
            let filter = self.filter.borrow_mut().take();
            if let Some(f) = filter {
                remove_filter(f).await;
            }
            if let Some(d) = self.drained.borrow_mut().take() {
                d.end();
            }
        })
    }
}
