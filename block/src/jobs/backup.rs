//! `blockdev-backup` (QEMU: `block/backup.c`, `backup_job_create`,
//! `backup_run`, `backup_loop`).
//!
//! The job attaches its backends on the source and the target, then puts a
//! `copy-before-write` filter above the source ([`super::copy_before_write`]):
//! from that moment on the target receives the source *as it was then*.
//! The job copies every chunk still marked (at most [`MAX_IN_FLIGHT`] at
//! once, at `speed`); `sync=top` skips what the source does not hold itself,
//! `sync=none` copies nothing and only keeps old data safe until cancelled
//! (image fleecing). A failed copy follows `on-source-error` /
//! `on-target-error` (report fails the job; ignore and stop retry the
//! chunk, stop after `job-resume`). At the end the filter goes and every
//! user writes straight to the source again.
//!
//! With a dirty bitmap (`sync=bitmap`, or `sync=full`/`top` keeping a
//! bitmap as output) the bitmap is frozen while the job runs (busy, new
//! writes recorded in its successor); `sync=bitmap` copies only what it
//! marks. The job's outcome decides what is left (QEMU:
//! `backup_cleanup_sync_bitmap`, iotest 257): the writes made during the
//! job alone when it succeeded with `on-success`/`always` or failed with
//! `always` (then also whatever was not copied), the frozen bitmap and
//! those writes otherwise.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use core::cell::RefCell;

use crate::dirty_bitmap::check;
use crate::exec::WaitQueue;
use crate::graph::node::Node;
use crate::graph::permission::Perm;
use crate::io::BoxFuture;
use crate::job::{Job, JobDriver, JobFailure, RegistryJobs};

use super::copy::{CopyError, MAX_BYTES_IN_FLIGHT, MAX_IN_FLIGHT, Pool, Writing};
use super::copy_before_write::{BlockCopy, CbwHook};
use super::dirty_bitmap::DirtyBitmap;
use super::filter::{insert_filter, remove_filter};
use super::mirror::{DEFAULT_GRANULARITY, MAX_CHUNK, SyncMode};
use super::on_error::{ErrorAction, OnError, error_action};
use super::rate_limit::RateLimit;

/// How a backup is set up.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// `sync`.
    pub sync: SyncMode,
    /// `on-source-error`.
    pub on_source_error: OnError,
    /// `on-target-error`.
    pub on_target_error: OnError,
    /// `filter-node-name`.
    pub filter_node_name: Option<String>,
    /// `bitmap` and `bitmap-mode`.
    pub bitmap: Option<(String, BitmapMode)>,
    /// Start the job at once; a `transaction` starts it when it commits
    /// (QEMU: `job_start` in `backup_commit`).
    pub start: bool,
}

/// `bitmap-mode` (QEMU: `BitmapSyncMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapMode {
    /// The bitmap is synchronized only if the job succeeds.
    OnSuccess,
    /// The bitmap is never synchronized.
    Never,
    /// The bitmap is synchronized whatever the outcome.
    Always,
}

impl BitmapMode {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            BitmapMode::OnSuccess => "on-success",
            BitmapMode::Never => "never",
            BitmapMode::Always => "always",
        }
    }
}

/// Why a backup could not be started (QEMU's texts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupError {
    /// Source and target are one node.
    Same,
    /// Different lengths.
    Size,
    /// A length could not be read.
    Length(String),
}

impl core::fmt::Display for BackupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BackupError::Same => f.write_str("Source and target cannot be the same"),
            BackupError::Size => f.write_str("Source and target image have different sizes"),
            BackupError::Length(e) => write!(f, "Unable to get length for '{e}'"),
        }
    }
}

/// One backup job.
pub struct Backup {
    opts: BackupOptions,
    wq: WaitQueue,
    bcs: RefCell<Option<Rc<BlockCopy>>>,
    filter: RefCell<Option<Rc<Node>>>,
    /// The source node holding the frozen bitmap.
    source: Rc<Node>,
}

/// Runs `f` on `node`'s bitmap `name`.
fn with_bitmap(node: &Node, name: &str, f: impl FnOnce(&mut crate::dirty_bitmap::NamedBitmap)) {
    if let Some(b) = node.dirty_bitmaps_mut().iter_mut().find(|b| b.name == name) {
        f(b);
    }
}

/// Creates and starts backup job `id` of `source` into `target`.
pub async fn start_backup(
    id: &str,
    source: &Rc<Node>,
    target: &Rc<Node>,
    opts: BackupOptions,
    setup: super::JobSetup,
) -> Result<Rc<Job>, String> {
    let reg = source
        .registry()
        .ok_or_else(|| String::from("no registry"))?;
    super::check_job_id(&reg, id)?;
    if Rc::ptr_eq(source, target) {
        return Err(BackupError::Same.to_string());
    }
    super::check_not_busy(&reg, source)?;
    super::check_not_busy(&reg, target)?;
    let len = source
        .get_length()
        .map_err(|_| BackupError::Length(source.name().into()).to_string())?;
    let tlen = target
        .get_length()
        .map_err(|_| BackupError::Length(target.name().into()).to_string())?;
    if len != tlen {
        return Err(BackupError::Size.to_string());
    }
    if let Some((name, mode)) = &opts.bitmap {
        let list = source.dirty_bitmaps();
        let b = list
            .iter()
            .find(|b| b.name == *name)
            .ok_or_else(|| format!("Bitmap '{name}' could not be found"))?;
        // QEMU's backup_job_create: a bitmap the job writes must allow it;
        // bdrv_dirty_bitmap_create_successor: not in use.
        let flags = if *mode == BitmapMode::Never {
            check::BUSY
        } else {
            check::DEFAULT
        };
        b.check(flags)?;
    }
    let filter_name = opts.filter_node_name.clone();
    let sync = opts.sync;
    let drv = Rc::new(Backup {
        opts,
        wq: WaitQueue::new(),
        bcs: RefCell::new(None),
        filter: RefCell::new(None),
        source: source.clone(),
    });
    let job = reg
        .create_job(id, drv.clone(), setup.job_options())
        .map_err(|e| e.to_string())?;
    let backends = job
        .add_backend(source, Perm::CONSISTENT_READ, Perm::ALL.minus(Perm::RESIZE))
        .and_then(|s| {
            // Writes shared (QEMU: cbw_child_perm for the target): a
            // fleecing target's backing file is the source, which the
            // guest keeps writing.
            job.add_backend(target, Perm::WRITE, Perm::ALL.minus(Perm::RESIZE))
                .map(|t| (s, t))
        });
    let (src, tgt) = match backends {
        Ok(x) => x,
        Err(e) => {
            job.early_fail().await;
            return Err(e.to_string());
        }
    };
    let top_of = (sync == SyncMode::Top).then(|| source.clone());
    let keep = [src.clone()];
    let bcs = BlockCopy::new(len, DEFAULT_GRANULARITY, src, tgt, top_of);
    // Frozen at the point in time the filter makes the target show.
    if let Some((name, _)) = &drv.opts.bitmap {
        with_bitmap(source, name, |b| {
            if drv.opts.sync == SyncMode::Bitmap {
                bcs.restrict_to(&b.bitmap);
            }
            b.freeze();
        });
    }
    let hook = Rc::new(CbwHook { bcs: bcs.clone() });
    let filter = match insert_filter(
        source,
        filter_name.as_deref(),
        "copy-before-write",
        "file",
        hook,
        &keep,
        true,
    )
    .await
    {
        Ok(f) => f,
        Err(e) => {
            drv.release_bitmap(false, None);
            job.early_fail().await;
            return Err(e);
        }
    };
    *drv.bcs.borrow_mut() = Some(bcs);
    *drv.filter.borrow_mut() = Some(filter);
    job.set_auto(setup.auto_finalize, setup.auto_dismiss);
    if drv.opts.start {
        job.start();
    }
    Ok(job)
}

type ChunkResult = (u64, u64, Result<u64, CopyError>);

impl Backup {
    /// The job's end for its bitmap (QEMU: `backup_cleanup_sync_bitmap`).
    fn release_bitmap(&self, success: bool, uncopied: Option<DirtyBitmap>) {
        let Some((name, mode)) = &self.opts.bitmap else {
            return;
        };
        let mode = *mode;
        with_bitmap(&self.source, name, |b| {
            if (success || mode == BitmapMode::Always) && mode != BitmapMode::Never {
                b.abdicate();
            } else {
                b.reclaim();
            }
            if !success
                && mode == BitmapMode::Always
                && let Some(u) = uncopied
            {
                b.bitmap.merge(&u);
            }
        });
    }

    async fn run_loop(&self, job: &Job) -> Result<(), JobFailure> {
        let bcs = self
            .bcs
            .borrow()
            .clone()
            .ok_or_else(|| String::from("backup job without copy state"))?;
        let total = bcs.remaining();
        job.set_progress(0, total);
        if self.opts.sync == SyncMode::None {
            // Fleecing: the filter copies what is overwritten; the job
            // waits to be cancelled (QEMU: backup_run's job_yield loop).
            while !job.is_cancelled() {
                job.sleep_ns(super::rate_limit::SLICE_NS).await;
            }
            return Ok(());
        }
        let clock = job
            .registry()
            .map(|r| r.clock())
            .ok_or_else(|| String::from("no registry"))?;
        let mut rate = RateLimit::new();
        let mut pool: Pool<'_, ChunkResult> = Pool::new();
        let mut from = 0u64;
        let mut failure = None;
        let chunk = MAX_CHUNK.max(bcs.granularity());
        let max_in_flight = ((MAX_BYTES_IN_FLIGHT / chunk) as usize).clamp(1, MAX_IN_FLIGHT);
        loop {
            if job.is_cancelled() || failure.is_some() {
                let stop = || job.is_force_cancelled();
                while let Some(Some(_)) = pool.next_until(job, &self.wq, stop).await {}
                break;
            }
            if pool.is_empty() {
                job.pause_point().await;
            }
            let mut delay = 0;
            while pool.len() < max_in_flight && !job.pause_requested() && !job.is_cancelled() {
                let Some((off, len)) = bcs.next_dirty(from, chunk) else {
                    break;
                };
                let d = rate.delay_ns(clock.now_ns(), job.speed(), len);
                if d > 0 {
                    delay = d;
                    break;
                }
                from = off + len;
                let b = bcs.clone();
                let writing = Writing::new();
                let w = writing.clone();
                pool.push(
                    writing,
                    Box::pin(async move { (off, len, b.copy_range(off, len, &w).await) }),
                );
            }
            if pool.is_empty() {
                if delay > 0 {
                    job.sleep_ns(delay).await;
                    continue;
                }
                if job.pause_requested() {
                    continue;
                }
                if bcs.remaining() == 0 {
                    break;
                }
                // Chunks re-marked after an error: go round again.
                from = 0;
                crate::exec::yield_now().await;
                continue;
            }
            let stop = || job.is_force_cancelled();
            let next = pool.next_until(job, &self.wq, stop).await;
            if let Some(Some((off, len, r))) = next {
                match r {
                    Ok(_) => {}
                    Err(e) => {
                        let policy = if e.is_read() {
                            self.opts.on_source_error
                        } else {
                            self.opts.on_target_error
                        };
                        match error_action(job, policy, e.is_read(), e.error()) {
                            ErrorAction::Report => failure = Some(e.error().into()),
                            ErrorAction::Ignore | ErrorAction::Stop => {
                                // Retry the chunk, letting others run first.
                                from = from.min(off);
                                let _ = len;
                                crate::exec::yield_now().await;
                            }
                        }
                    }
                }
                job.set_progress(total - bcs.remaining().min(total), total);
            }
        }
        job.set_progress(total - bcs.remaining().min(total), total);
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl JobDriver for Backup {
    fn job_type(&self) -> &str {
        "backup"
    }

    fn run(self: Rc<Self>, job: Rc<Job>) -> BoxFuture<'static, Result<(), JobFailure>> {
        Box::pin(async move { self.run_loop(&job).await })
    }

    fn cancel(&self, _job: &Job, _force: bool) -> bool {
        self.wq.wake_all();
        true
    }

    fn prepare(self: Rc<Self>, _job: Rc<Job>) -> BoxFuture<'static, Result<(), JobFailure>> {
        Box::pin(async move {
            self.release_bitmap(true, None);
            Ok(())
        })
    }

    fn abort(self: Rc<Self>, _job: Rc<Job>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let uncopied = self.bcs.borrow().as_ref().map(|b| b.uncopied());
            self.release_bitmap(false, uncopied);
        })
    }

    fn clean(self: Rc<Self>, _job: Rc<Job>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let filter = self.filter.borrow_mut().take();
            if let Some(f) = filter {
                remove_filter(f).await;
            }
            self.bcs.borrow_mut().take();
        })
    }
}
