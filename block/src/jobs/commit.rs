//! `block-commit` (QEMU: `block/commit.c`, `commit_start`, `commit_run`,
//! `bdrv_drop_intermediate`; active commit is `commit_active_start` in
//! `block/mirror.c`).
//!
//! A base smaller than the top grows to the top's length first, as in
//! QEMU.
//!
//! *Intermediate* commit (`top` below the active layer): copy every extent
//! allocated in `top` or between it and `base` into `base`, then make
//! `base` the backing file of `top`'s overlay; `top` and the images between
//! leave the chain. Nobody writes to those layers (they are backing files),
//! so the copy needs no write hook; what a reader sees never changes. As in
//! QEMU, a pass-through `commit_top` filter (named by `filter-node-name`,
//! implicit otherwise) sits above `top` while the job runs, and goes
//! before the chain is cut or when the job ends otherwise.
//!
//! *Active* commit (`top` is the active layer): a mirror from the active
//! layer into `base` with `base` as the bound of what is copied (see
//! [`super::mirror`]); it becomes ready, and `job-complete` pivots every
//! user of the active layer to `base`. Its job type is `commit`.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use core::cell::RefCell;

use crate::exec::WaitQueue;
use crate::graph::backend::Backend;
use crate::graph::node::Node;
use crate::graph::permission::Perm;
use crate::io::{BoxFuture, IoError, IoResult, ReqFlags};
use crate::job::{Job, JobDriver, JobFailure, RegistryJobs};

use super::chain::{allocated_above, find_overlay};
use super::copy::{Walked, Writing, walk};
use super::filter::{Guard, WriteHook, insert_filter, remove_filter};
use super::on_error::OnError;
use super::stream::{record_backing, set_backing};

/// QEMU's `COMMIT_BUFFER_SIZE`: 512 KiB.
pub const COMMIT_CHUNK: u64 = 512 << 10;

/// One intermediate commit job.
pub struct Commit {
    active: Rc<Node>,
    top: Rc<Node>,
    base: Rc<Node>,
    on_error: OnError,
    blks: RefCell<Option<(Rc<Backend>, Rc<Backend>)>>,
    /// The `commit_top` filter above `top`.
    filter: RefCell<Option<Rc<Node>>>,
    wq: WaitQueue,
    backing_file: Option<String>,
}

/// `commit_top`'s hook: nothing to do on a write.
struct PassThrough;

impl WriteHook for PassThrough {
    fn before_write<'a>(&'a self, _: u64, _: u64, _: ReqFlags) -> BoxFuture<'a, IoResult<Guard>> {
        Box::pin(async { Ok(Box::new(()) as Guard) })
    }

    fn after_write(&self, _: u64, _: u64) {}
}

/// Creates and starts an intermediate commit of `top` (below `active`)
/// into `base`, with its filter named `filter_node_name`.
#[allow(clippy::too_many_arguments)]
pub async fn start_commit(
    id: &str,
    active: &Rc<Node>,
    top: &Rc<Node>,
    base: &Rc<Node>,
    on_error: OnError,
    backing_file: Option<&str>,
    filter_node_name: Option<&str>,
    setup: super::JobSetup,
) -> Result<Rc<Job>, String> {
    let reg = top.registry().ok_or_else(|| String::from("no registry"))?;
    super::check_job_id(&reg, id)?;
    for n in [active, top, base] {
        super::check_not_busy(&reg, n)?;
    }
    let len = top.get_length().map_err(|e| e.to_string())?;
    let blen = base.get_length().map_err(|e| e.to_string())?;
    let drv = Rc::new(Commit {
        active: active.clone(),
        top: top.clone(),
        base: base.clone(),
        on_error,
        blks: RefCell::new(None),
        filter: RefCell::new(None),
        wq: WaitQueue::new(),
        backing_file: backing_file.map(String::from),
    });
    let job = reg
        .create_job(id, drv.clone(), setup.job_options())
        .map_err(|e| e.to_string())?;
    let r = job
        .add_backend(top, Perm::CONSISTENT_READ, Perm::ALL)
        .and_then(|t| {
            // QEMU: a base smaller than the top is grown first.
            let perm = if blen < len {
                Perm::WRITE | Perm::RESIZE
            } else {
                Perm::WRITE
            };
            job.add_backend(base, perm, Perm::ALL.minus(Perm::RESIZE))
                .map(|b| (t, b))
        });
    let keep = match r {
        Ok((t, b)) => {
            *drv.blks.borrow_mut() = Some((t.clone(), b));
            t
        }
        Err(e) => {
            job.early_fail().await;
            return Err(e.to_string());
        }
    };
    // QEMU: commit_top above top; the job's own reader stays on top.
    let filter = insert_filter(
        top,
        filter_node_name,
        "commit_top",
        "backing",
        Rc::new(PassThrough),
        &[keep],
        false,
    )
    .await;
    match filter {
        Ok(f) => *drv.filter.borrow_mut() = Some(f),
        Err(e) => {
            job.early_fail().await;
            return Err(e);
        }
    }
    job.set_auto(setup.auto_finalize, setup.auto_dismiss);
    job.start();
    Ok(job)
}

impl Commit {
    async fn chunk(
        &self,
        top: &Backend,
        base: &Backend,
        off: u64,
        n: u64,
        writing: Writing,
    ) -> Result<u64, (bool, IoError)> {
        let (alloc, n) = allocated_above(&self.top, Some(&self.base), off, n)
            .await
            .map_err(|e| (true, e))?;
        if alloc {
            let data = top.read(off, n as usize).await.map_err(|e| (true, e))?;
            let _w = writing.begin();
            base.write(off, data, ReqFlags::NONE)
                .await
                .map_err(|e| (false, e))?;
        }
        Ok(n)
    }

    async fn run_loop(&self, job: &Job) -> Result<(), JobFailure> {
        let (top, base) = self
            .blks
            .borrow()
            .clone()
            .ok_or_else(|| String::from("commit job without backends"))?;
        let len = top.get_length().map_err(|e| e.to_string())?;
        if base.get_length().map_err(|e| e.to_string())? < len {
            base.truncate(len).await.map_err(|e| e.to_string())?;
        }
        let walked = walk(
            job,
            &self.wq,
            len,
            COMMIT_CHUNK,
            self.on_error,
            |off, n, w| Box::pin(self.chunk(&top, &base, off, n, w)),
        )
        .await?;
        let Walked::Done(ignored) = walked else {
            return Ok(());
        };
        base.flush().await?;
        match ignored {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

impl JobDriver for Commit {
    fn job_type(&self) -> &str {
        "commit"
    }

    fn run(self: Rc<Self>, job: Rc<Job>) -> BoxFuture<'static, Result<(), JobFailure>> {
        Box::pin(async move { self.run_loop(&job).await })
    }

    fn cancel(&self, _job: &Job, _force: bool) -> bool {
        self.wq.wake_all();
        true
    }

    fn clean(self: Rc<Self>, _job: Rc<Job>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let filter = self.filter.borrow_mut().take();
            if let Some(f) = filter {
                remove_filter(f).await;
            }
        })
    }

    /// QEMU's `commit_prepare` → `bdrv_drop_intermediate`: `top`'s overlay
    /// gets `base` as its backing file.
    fn prepare(self: Rc<Self>, _job: Rc<Job>) -> BoxFuture<'static, Result<(), JobFailure>> {
        Box::pin(async move {
            // The filter goes first: the overlay's backing is `top` again.
            let filter = self.filter.borrow_mut().take();
            if let Some(f) = filter {
                remove_filter(f).await;
            }
            let Some(overlay) = find_overlay(&self.active, &self.top) else {
                return Err(alloc::format!(
                    "Node '{}' is no longer in the backing chain",
                    self.top.name()
                )
                .into());
            };
            set_backing(&overlay, Some(&self.base)).await?;
            if let Some(name) = &self.backing_file {
                record_backing(&overlay, Some(name), Some(self.base.driver_name())).await?;
            }
            Ok(())
        })
    }
}
