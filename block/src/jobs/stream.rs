//! `block-stream` (QEMU: `block/stream.c`, `stream_run`, `stream_prepare`):
//! pull the data of a backing chain into the top image, down to `base`
//! (exclusive; none: the whole chain), then make `base` the top's backing
//! file.
//!
//! The job walks the image in chunks; a chunk the top does not hold itself
//! but some layer above `base` does is read through the top (which reads
//! through the chain) and written into the top. Its users keep writing
//! meanwhile: a `stream_top` filter above the top (QEMU inserts a
//! `copy-on-read` filter) makes every user write and every copy of the same
//! range wait for each other, and the job asks allocation only once it
//! holds the range, so a copy never overwrites newer data. At the end the
//! intermediate images leave the chain and close by their refcount unless
//! someone else (the monitor) still holds them. The image header then
//! records no backing file (whole chain streamed) or the QMP
//! `backing-file` name for `base` ([`record_backing`]); without one it
//! keeps its old name: blockhaus does not know the host's file names, and
//! the data no longer depends on the layers in between either way.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use core::cell::{Cell, RefCell};

use crate::exec::WaitQueue;
use crate::graph::backend::Backend;
use crate::graph::backend::Drained;
use crate::graph::child::{attach_node_child, detach_child};
use crate::graph::node::{Node, unref};
use crate::graph::permission::{ChildRole, Perm};
use crate::io::{BoxFuture, IoError, IoResult, ReqFlags};
use crate::job::{Job, JobDriver, JobFailure, RegistryJobs};

use super::chain::{allocated_above, backing};
use super::copy::{RangeLock, Walked, Writing, walk};
use super::filter::{Guard, WriteHook, insert_filter, remove_filter};
use super::on_error::OnError;

/// QEMU's `STREAM_CHUNK`: 512 KiB.
pub const STREAM_CHUNK: u64 = 512 << 10;

/// The filter's hook: user writes take the range lock.
pub struct LockHook {
    /// The ranges in use.
    pub locks: Rc<RangeLock>,
}

impl WriteHook for LockHook {
    /// A user write waits for the job's copy of the range; the job's own
    /// copies (WRITE_UNCHANGED, issued while it holds the range) pass.
    fn before_write<'a>(
        &'a self,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Guard>> {
        Box::pin(async move {
            if flags.contains(ReqFlags::WRITE_UNCHANGED) {
                return Ok(Box::new(()) as Guard);
            }
            Ok(Box::new(self.locks.lock(offset, len).await) as Guard)
        })
    }

    fn after_write(&self, _: u64, _: u64) {}
}

/// One stream job.
pub struct Stream {
    top: Rc<Node>,
    base: Option<Rc<Node>>,
    on_error: OnError,
    locks: Rc<RangeLock>,
    blk: RefCell<Option<Rc<Backend>>>,
    filter: RefCell<Option<Rc<Node>>>,
    copied: Cell<u64>,
    wq: WaitQueue,
    backing_file: Option<String>,
}

/// Creates and starts stream job `id` pulling the chain of `top` above
/// `base` into `top`; `backing_file` is the name to record in the top's
/// header for `base` (QMP `backing-file`).
pub async fn start_stream(
    id: &str,
    top: &Rc<Node>,
    base: Option<Rc<Node>>,
    on_error: OnError,
    filter_node_name: Option<&str>,
    backing_file: Option<&str>,
    setup: super::JobSetup,
) -> Result<Rc<Job>, String> {
    let reg = top.registry().ok_or_else(|| String::from("no registry"))?;
    super::check_job_id(&reg, id)?;
    for n in super::chain::chain(top) {
        if base.as_ref().is_some_and(|b| Rc::ptr_eq(b, &n)) {
            break;
        }
        super::check_not_busy(&reg, &n)?;
    }
    let locks = RangeLock::new();
    let drv = Rc::new(Stream {
        top: top.clone(),
        base,
        on_error,
        locks: locks.clone(),
        blk: RefCell::new(None),
        filter: RefCell::new(None),
        copied: Cell::new(0),
        wq: WaitQueue::new(),
        backing_file: backing_file.map(String::from),
    });
    let job = reg
        .create_job(id, drv.clone(), setup.job_options())
        .map_err(|e| e.to_string())?;
    // Every writer of the top goes through the filter from now on, the
    // job's own copies too (its backend sits on the filter).
    let filter = match insert_filter(
        top,
        filter_node_name,
        "stream_top",
        "file",
        Rc::new(LockHook { locks }),
        &[],
        true,
    )
    .await
    {
        Ok(f) => f,
        Err(e) => {
            job.early_fail().await;
            return Err(e);
        }
    };
    let blk = match job.add_backend(
        &filter,
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::ALL.minus(Perm::RESIZE),
    ) {
        Ok(b) => b,
        Err(e) => {
            job.early_fail().await;
            remove_filter(filter).await;
            return Err(e.to_string());
        }
    };
    *drv.blk.borrow_mut() = Some(blk);
    *drv.filter.borrow_mut() = Some(filter);
    job.set_auto(setup.auto_finalize, setup.auto_dismiss);
    job.start();
    Ok(job)
}

/// Copies what a chunk needs, under its lock, marking its write in
/// `writing`; returns bytes written.
async fn stream_chunk(
    top: &Rc<Node>,
    base: Option<&Rc<Node>>,
    blk: &Backend,
    locks: &Rc<RangeLock>,
    (off, len): (u64, u64),
    writing: Writing,
) -> Result<(u64, u64), (bool, IoError)> {
    let _g = locks.lock(off, len).await;
    let st = top.block_status(off, len).await.map_err(|e| (true, e))?;
    let n = st.len.clamp(1, len);
    if st.allocated {
        return Ok((n, 0));
    }
    let Some(below) = backing(top) else {
        return Ok((n, 0));
    };
    let (alloc, n) = allocated_above(&below, base, off, n)
        .await
        .map_err(|e| (true, e))?;
    if !alloc {
        return Ok((n, 0));
    }
    let data = blk.read(off, n as usize).await.map_err(|e| (true, e))?;
    let _w = writing.begin();
    blk.write(off, data, ReqFlags::WRITE_UNCHANGED)
        .await
        .map_err(|e| (false, e))?;
    Ok((n, n))
}

impl Stream {
    async fn run_loop(&self, job: &Job) -> Result<(), JobFailure> {
        let blk = self
            .blk
            .borrow()
            .clone()
            .ok_or_else(|| String::from("stream job without backend"))?;
        let len = blk.get_length().map_err(|e| e.to_string())?;
        let base = self.base.as_ref();
        let walked = walk(
            job,
            &self.wq,
            len,
            STREAM_CHUNK,
            self.on_error,
            |off, n, w| {
                let (blk, locks) = (&blk, &self.locks);
                Box::pin(async move {
                    let (done, copied) =
                        stream_chunk(&self.top, base, blk, locks, (off, n), w).await?;
                    self.copied.set(self.copied.get() + copied);
                    Ok(done)
                })
            },
        )
        .await?;
        // QEMU: "Do not remove the backing file if an error was there but
        // ignored."
        match walked {
            Walked::Done(Some(e)) => Err(e.into()),
            Walked::Done(None) | Walked::Cancelled => Ok(()),
        }
    }
}

/// Makes `base` (or nothing) the backing file of `node` in place of its
/// current one, in a drained section (QEMU: `bdrv_set_backing_hd`). The
/// old chain loses `node`'s reference and closes unless held elsewhere.
pub async fn set_backing(node: &Rc<Node>, base: Option<&Rc<Node>>) -> Result<(), String> {
    let Some(old) = node.child("backing") else {
        return Ok(());
    };
    if base.is_some_and(|b| Rc::ptr_eq(b, old.node())) {
        return Ok(());
    }
    let drained = Drained::begin(node).await;
    detach_child(&old);
    if let Some(b) = base {
        b.ref_();
        if let Err(e) = attach_node_child(node, "backing", ChildRole::COW, b) {
            b.unref_nonfinal();
            if let Err(e2) = attach_node_child(node, "backing", ChildRole::COW, old.node()) {
                log::error!(
                    "could not restore the backing file of '{}': {e2}",
                    node.name()
                );
            }
            drained.end();
            return Err(e.to_string());
        }
    }
    drained.end();
    unref(old.node().clone()).await;
    Ok(())
}

/// Writes the backing file name into `node`'s image header (QEMU:
/// `bdrv_change_backing_file`); drivers without backing files are left
/// alone.
pub async fn record_backing(
    node: &Node,
    name: Option<&str>,
    format: Option<&str>,
) -> Result<(), String> {
    match node.driver().change_backing_file(node, name, format).await {
        Ok(()) | Err(IoError::Enotsup) => Ok(()),
        Err(e) => Err(alloc::format!(
            "Could not change backing file to '{}': {e}",
            name.unwrap_or("")
        )),
    }
}

impl JobDriver for Stream {
    fn job_type(&self) -> &str {
        "stream"
    }

    fn run(self: Rc<Self>, job: Rc<Job>) -> BoxFuture<'static, Result<(), JobFailure>> {
        Box::pin(async move { self.run_loop(&job).await })
    }

    fn cancel(&self, _job: &Job, _force: bool) -> bool {
        self.wq.wake_all();
        true
    }

    /// QEMU's `stream_prepare`: the top's backing file becomes `base`.
    fn prepare(self: Rc<Self>, _job: Rc<Job>) -> BoxFuture<'static, Result<(), JobFailure>> {
        Box::pin(async move {
            set_backing(&self.top, self.base.as_ref()).await?;
            match &self.base {
                None => record_backing(&self.top, None, None).await?,
                Some(b) => {
                    if let Some(name) = &self.backing_file {
                        record_backing(&self.top, Some(name), Some(b.driver_name())).await?;
                    }
                }
            }
            Ok(())
        })
    }

    fn clean(self: Rc<Self>, _job: Rc<Job>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let filter = self.filter.borrow_mut().take();
            if let Some(f) = filter {
                remove_filter(f).await;
            }
        })
    }
}
