//! Jobs: long-running operations with QEMU's state machine (QEMU: `Job`,
//! `job.c`, `JobStatus`, `JobVerb`, `job_cancel_sync`).
//!
//! The job framework sits above the block graph ([`crate::graph`]): a job
//! uses the graph only through its own anonymous backends
//! ([`Job::add_backend`]), which it releases when it concludes, so a running
//! job keeps its nodes open and a cancelled one lets them close. The
//! registry keeps the job list without knowing the job type; jobs are
//! created and found through [`RegistryJobs`].
//!
//! A job runs as a task on the executor. Its body ([`JobDriver::run`]) calls [`Job::pause_point`] and
//! [`Job::sleep_ns`] and stops when [`Job::is_cancelled`].
//!
//! States and transitions follow QEMU's `JobSTT`; the verbs a state accepts
//! follow `JobVerbTable`, with QEMU's refusal text.
//!
//! The end of a job follows `job_completed`: a successful body goes
//! waiting → pending, waits there for `job-finalize` unless
//! auto-finalize (`BLOCK_JOB_PENDING`), runs [`JobDriver::prepare`] (a
//! mirror's pivot) and [`JobDriver::clean`]; a failed or force-cancelled
//! one goes aborting and runs [`JobDriver::abort`] and `clean`. A cancel
//! without force is the driver's to interpret ([`JobDriver::cancel`]: a
//! ready mirror completes without pivoting). The block jobs themselves
//! are in [`crate::jobs`].

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::{Rc, Weak};
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::fmt;
use core::task::Poll;

use serde_json::{Value, json};

use crate::exec::WaitQueue;
use crate::graph::backend::{Backend, BackendError, BackendOptions};
use crate::graph::node::Node;
use crate::graph::permission::Perm;
use crate::graph::registry::{Registry, id_wellformed};
use crate::io::{BoxFuture, IoError};

/// QEMU's `JobStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Not yet created.
    Undefined,
    /// Created, not started.
    Created,
    /// Working.
    Running,
    /// Paused while running.
    Paused,
    /// Ready to be completed (mirror in sync).
    Ready,
    /// Paused while ready.
    Standby,
    /// Done, waiting for its transaction.
    Waiting,
    /// Done, waiting to be finalized.
    Pending,
    /// Failing or cancelled.
    Aborting,
    /// Finished, waiting to be dismissed.
    Concluded,
    /// Gone.
    Null,
}

const ALL_STATUS: [JobStatus; 11] = [
    JobStatus::Undefined,
    JobStatus::Created,
    JobStatus::Running,
    JobStatus::Paused,
    JobStatus::Ready,
    JobStatus::Standby,
    JobStatus::Waiting,
    JobStatus::Pending,
    JobStatus::Aborting,
    JobStatus::Concluded,
    JobStatus::Null,
];

/// QEMU's `JobSTT`: `STT[from][to]`, columns U C R P Y S W D X E N.
const STT: [[u8; 11]; 11] = [
    [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1],
    [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0],
    [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
    [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
];

impl JobStatus {
    fn index(self) -> usize {
        ALL_STATUS.iter().position(|s| *s == self).unwrap_or(0)
    }

    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// Whether QEMU allows the transition `self → to`.
    pub fn can_become(self, to: JobStatus) -> bool {
        STT[self.index()][to.index()] == 1
    }
}

/// QEMU's `JobVerb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobVerb {
    /// `job-cancel`.
    Cancel,
    /// `job-pause`.
    Pause,
    /// `job-resume`.
    Resume,
    /// `block-job-set-speed`.
    SetSpeed,
    /// `job-complete`.
    Complete,
    /// `job-finalize`.
    Finalize,
    /// `job-dismiss`.
    Dismiss,
    /// `block-job-change`.
    Change,
}

impl JobVerb {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
            JobVerb::Change => "change",
        }
    }

    /// QEMU's `JobVerbTable` row, columns U C R P Y S W D X E N.
    fn table(self) -> [u8; 11] {
        match self {
            JobVerb::Cancel => [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed => {
                [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
            }
            // QEMU 6.2+: a job on standby may be completed too.
            JobVerb::Complete => [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
            JobVerb::Finalize => [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            JobVerb::Dismiss => [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            JobVerb::Change => [0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        }
    }
}

/// Why a job operation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobError {
    /// Malformed id.
    InvalidId(String),
    /// Id in use.
    Duplicate(String),
    /// The job's state does not accept the verb.
    Verb {
        id: String,
        status: JobStatus,
        verb: JobVerb,
    },
    /// `resume` of a job that was not paused by the user.
    NotPaused,
    /// Attaching the job's backend failed.
    Backend(BackendError),
    /// The job type refused (e.g. `complete` before ready).
    Driver(String),
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobError::InvalidId(id) => write!(f, "Invalid job ID '{id}'"),
            JobError::Duplicate(id) => write!(f, "Job ID '{id}' already in use"),
            JobError::Verb { id, status, verb } => write!(
                f,
                "Job '{id}' in state '{}' cannot accept command verb '{}'",
                status.as_str(),
                verb.as_str()
            ),
            JobError::NotPaused => f.write_str("Can't resume a job that was not paused"),
            JobError::Backend(e) => e.fmt(f),
            JobError::Driver(e) => f.write_str(e),
        }
    }
}

/// Why a job's body or its prepare step failed; the text is QEMU's, for
/// the `error` of `BLOCK_JOB_COMPLETED` and `query-jobs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobFailure {
    /// An I/O error the job reports (`on-*-error=report`): its `strerror`.
    Io(IoError),
    /// Anything else, with QEMU's message.
    Message(String),
}

impl fmt::Display for JobFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobFailure::Io(e) => e.fmt(f),
            JobFailure::Message(m) => f.write_str(m),
        }
    }
}

impl From<IoError> for JobFailure {
    fn from(e: IoError) -> Self {
        JobFailure::Io(e)
    }
}

impl From<String> for JobFailure {
    fn from(m: String) -> Self {
        JobFailure::Message(m)
    }
}

impl From<&str> for JobFailure {
    fn from(m: &str) -> Self {
        JobFailure::Message(m.into())
    }
}

/// A job type (QEMU: `JobDriver`).
pub trait JobDriver {
    /// The QAPI `JobType` (`"mirror"`, `"backup"`, …).
    fn job_type(&self) -> &str;

    /// The job's body. Must check [`Job::is_cancelled`] regularly and call
    /// [`Job::pause_point`].
    fn run(self: Rc<Self>, job: Rc<Job>) -> BoxFuture<'static, Result<(), JobFailure>>;

    /// `job-complete` on a ready job.
    fn complete(&self, job: &Job) -> Result<(), String> {
        Err(format!(
            "The active block job '{}' cannot be completed",
            job.id()
        ))
    }

    /// A cancel request (QEMU: `JobDriver.cancel`): returns whether it is
    /// a forced cancel. A job without its own rule is always force-cancelled;
    /// a ready mirror cancelled without `force` completes without pivoting.
    fn cancel(&self, job: &Job, force: bool) -> bool {
        let _ = (job, force);
        true
    }

    /// Commits the job's result when it finalizes successfully (QEMU:
    /// `JobDriver.prepare`, e.g. a mirror's pivot); an error aborts it.
    fn prepare(self: Rc<Self>, job: Rc<Job>) -> BoxFuture<'static, Result<(), JobFailure>> {
        let _ = job;
        Box::pin(core::future::ready(Ok(())))
    }

    /// Undoes what the job did when it fails or is cancelled (QEMU:
    /// `JobDriver.abort`).
    fn abort(self: Rc<Self>, job: Rc<Job>) -> BoxFuture<'static, ()> {
        let _ = job;
        Box::pin(core::future::ready(()))
    }

    /// Cleans up after `prepare` or `abort`, before the job's backends go
    /// (QEMU: `JobDriver.clean`, e.g. removing a filter node).
    fn clean(self: Rc<Self>, job: Rc<Job>) -> BoxFuture<'static, ()> {
        let _ = job;
        Box::pin(core::future::ready(()))
    }
}

/// How a job is created.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Dismiss automatically once concluded (QEMU default: true).
    pub auto_dismiss: bool,
    /// Bytes per second limit, 0 for none.
    pub speed: u64,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            auto_dismiss: true,
            speed: 0,
        }
    }
}

/// One job.
pub struct Job {
    id: String,
    driver: Rc<dyn JobDriver>,
    status: Cell<JobStatus>,
    started: Cell<bool>,
    cancelled: Cell<bool>,
    force: Cell<bool>,
    pause_count: Cell<u32>,
    user_paused: Cell<bool>,
    progress: Cell<(u64, u64)>,
    speed: Cell<u64>,
    auto_dismiss: Cell<bool>,
    auto_finalize: Cell<bool>,
    finalize_requested: Cell<bool>,
    io_status: Cell<&'static str>,
    error: RefCell<Option<String>>,
    backends: RefCell<Vec<Rc<Backend>>>,
    wake: WaitQueue,
    done: WaitQueue,
    registry: Weak<Registry>,
}

/// The job framework's face of the registry: creating jobs and finding
/// them in its job list (QEMU: `job_create`, `job_next`, `job_get`). The
/// registry holds the jobs type-erased; only this module puts them there.
pub trait RegistryJobs {
    /// Creates a job in state `created` (QEMU: `job_create`); start it with
    /// [`Job::start`] after adding its backends.
    fn create_job(
        self: &Rc<Self>,
        id: &str,
        driver: Rc<dyn JobDriver>,
        opts: JobOptions,
    ) -> Result<Rc<Job>, JobError>;

    /// Every job, oldest first.
    fn jobs(&self) -> Vec<Rc<Job>>;

    /// The job called `id`.
    fn find_job(&self, id: &str) -> Option<Rc<Job>>;
}

impl RegistryJobs for Registry {
    fn create_job(
        self: &Rc<Self>,
        id: &str,
        driver: Rc<dyn JobDriver>,
        opts: JobOptions,
    ) -> Result<Rc<Job>, JobError> {
        if !id_wellformed(id) {
            return Err(JobError::InvalidId(id.to_string()));
        }
        if self.find_job(id).is_some() {
            return Err(JobError::Duplicate(id.to_string()));
        }
        let job = Rc::new(Job {
            id: id.to_string(),
            driver,
            status: Cell::new(JobStatus::Undefined),
            started: Cell::new(false),
            cancelled: Cell::new(false),
            force: Cell::new(false),
            pause_count: Cell::new(0),
            user_paused: Cell::new(false),
            progress: Cell::new((0, 0)),
            speed: Cell::new(opts.speed),
            auto_dismiss: Cell::new(opts.auto_dismiss),
            auto_finalize: Cell::new(true),
            finalize_requested: Cell::new(false),
            io_status: Cell::new("ok"),
            error: RefCell::new(None),
            backends: RefCell::new(Vec::new()),
            wake: WaitQueue::new(),
            done: WaitQueue::new(),
            registry: Rc::downgrade(self),
        });
        self.add_job_entry(job.clone());
        job.transition(JobStatus::Created);
        Ok(job)
    }

    fn jobs(&self) -> Vec<Rc<Job>> {
        self.job_entries()
            .into_iter()
            .filter_map(|j| j.downcast::<Job>().ok())
            .collect()
    }

    fn find_job(&self, id: &str) -> Option<Rc<Job>> {
        self.jobs().into_iter().find(|j| j.id() == id)
    }
}

impl Job {
    /// The job id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The job type.
    pub fn job_type(&self) -> &str {
        self.driver.job_type()
    }

    /// The current status.
    pub fn status(&self) -> JobStatus {
        self.status.get()
    }

    /// Whether a cancel was requested: the job's body stops (QEMU:
    /// `job_cancel_requested`).
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.get()
    }

    /// Whether the job was force-cancelled, so that it ends as cancelled
    /// rather than completed (QEMU: `job_is_cancelled`).
    pub fn is_force_cancelled(&self) -> bool {
        self.cancelled.get() && self.force.get()
    }

    /// Whether the job was started.
    pub fn is_started(&self) -> bool {
        self.started.get()
    }

    /// Whether the user paused the job (QEMU: `job->user_paused`).
    pub fn is_user_paused(&self) -> bool {
        self.user_paused.get()
    }

    /// `auto-finalize` (QEMU default: true).
    pub fn auto_finalize(&self) -> bool {
        self.auto_finalize.get()
    }

    /// `auto-dismiss` (QEMU default: true).
    pub fn auto_dismiss(&self) -> bool {
        self.auto_dismiss.get()
    }

    /// Sets `auto-finalize` and `auto-dismiss`; call before [`Job::start`].
    pub fn set_auto(&self, finalize: bool, dismiss: bool) {
        self.auto_finalize.set(finalize);
        self.auto_dismiss.set(dismiss);
    }

    /// The QAPI `BlockDeviceIoStatus` of the job (`ok`, `failed`,
    /// `nospace`; QEMU: `BlockJob.iostatus`).
    pub fn io_status(&self) -> &'static str {
        self.io_status.get()
    }

    /// Records an I/O error that stopped the job (QEMU:
    /// `block_job_iostatus_set_err`); the first error sticks until resume.
    pub fn set_io_status(&self, status: &'static str) {
        if self.io_status.get() == "ok" {
            self.io_status.set(status);
        }
    }

    /// Pauses the job as `job-pause` would (QEMU: `job_pause` with
    /// `user_paused`, what the `stop` error policy does); a no-op if the
    /// user already paused it.
    pub fn pause_for_error(&self) {
        if !self.user_paused.get() {
            self.user_paused.set(true);
            self.pause_count.set(self.pause_count.get() + 1);
        }
    }

    /// Wakes the job if it sleeps (QEMU: `job_enter`).
    pub fn enter(&self) {
        self.wake.wake_all();
    }

    /// `(current, total)` progress.
    pub fn progress(&self) -> (u64, u64) {
        self.progress.get()
    }

    /// Sets the progress.
    pub fn set_progress(&self, current: u64, total: u64) {
        self.progress.set((current, total));
    }

    /// The speed limit in bytes per second (0: none).
    pub fn speed(&self) -> u64 {
        self.speed.get()
    }

    /// The error a failed job ended with.
    pub fn error(&self) -> Option<String> {
        self.error.borrow().clone()
    }

    /// The job's backends.
    pub fn backends(&self) -> Vec<Rc<Backend>> {
        self.backends.borrow().clone()
    }

    /// The registry the job belongs to.
    pub fn registry(&self) -> Option<Rc<Registry>> {
        self.registry.upgrade()
    }

    fn transition(&self, to: JobStatus) {
        let from = self.status.get();
        crate::trace!(
            job_state_transition,
            "job {} attempting {} transition ({}-->{})",
            self.id,
            if from.can_become(to) {
                "allowed"
            } else {
                "disallowed"
            },
            from.as_str(),
            to.as_str()
        );
        if !from.can_become(to) {
            log::error!(
                "job '{}': illegal transition {} -> {}",
                self.id,
                from.as_str(),
                to.as_str()
            );
        }
        self.status.set(to);
        if let Some(r) = self.registry() {
            r.emit(
                "JOB_STATUS_CHANGE",
                json!({"id": self.id, "status": to.as_str()}),
            );
        }
        self.done.wake_all();
    }

    fn check_verb(&self, verb: JobVerb) -> Result<(), JobError> {
        let allowed = verb.table()[self.status.get().index()] == 1;
        crate::trace!(
            job_apply_verb,
            "job {} in state {}; applying verb {} ({})",
            self.id,
            self.status.get().as_str(),
            verb.as_str(),
            if allowed { "allowed" } else { "prohibited" }
        );
        if allowed {
            Ok(())
        } else {
            Err(JobError::Verb {
                id: self.id.clone(),
                status: self.status.get(),
                verb,
            })
        }
    }

    /// Gives the job a backend on `node` with the permissions it needs; the
    /// job keeps `node` open until it concludes (QEMU: `block_job_create`'s
    /// `blk_new` + `blk_insert_bs`, and `block_job_add_bdrv`).
    pub fn add_backend(
        &self,
        node: &Rc<Node>,
        perm: Perm,
        shared: Perm,
    ) -> Result<Rc<Backend>, JobError> {
        let r = self
            .registry()
            .ok_or(JobError::Driver("no registry".into()))?;
        let opts = BackendOptions {
            name: None,
            user: Some(format!("{} job '{}'", self.job_type(), self.id)),
            tray: false,
            disable_request_queuing: true,
            device: None,
        };
        let b = r
            .new_backend(opts, perm, shared)
            .map_err(JobError::Backend)?;
        if let Err(e) = b.insert(node) {
            r.forget_backend(&b);
            return Err(JobError::Backend(e));
        }
        self.backends.borrow_mut().push(b.clone());
        Ok(b)
    }

    /// Starts the job's task (QEMU: `job_start`).
    pub fn start(self: &Rc<Self>) {
        if self.started.replace(true) {
            return;
        }
        let Some(r) = self.registry() else { return };
        let job = self.clone();
        r.executor().spawn(async move {
            let ran = !job.cancelled.get();
            if ran {
                job.transition(JobStatus::Running);
                let res = job.driver.clone().run(job.clone()).await;
                if let Err(e) = res {
                    *job.error.borrow_mut() = Some(e.to_string());
                }
            }
            job.finish(ran).await;
        });
    }

    fn failed(&self) -> bool {
        self.is_force_cancelled() || self.error.borrow().is_some()
    }

    /// The end of a job (QEMU: `job_completed` → `job_completed_txn_success`
    /// → `job_do_finalize` → `job_finalize_single`, or
    /// `job_completed_txn_abort`): waiting → pending → (job-finalize unless
    /// auto-finalize) → prepare → clean → `BLOCK_JOB_COMPLETED`; or aborting
    /// → abort → clean → `BLOCK_JOB_CANCELLED` / `BLOCK_JOB_COMPLETED` with
    /// the error. Then concluded, and null with auto-dismiss.
    async fn finish(self: &Rc<Self>, ran: bool) {
        let r = self.registry();
        if !self.failed() && ran {
            self.transition(JobStatus::Waiting);
            self.transition(JobStatus::Pending);
            if !self.auto_finalize.get() {
                if let Some(r) = &r {
                    r.emit(
                        "BLOCK_JOB_PENDING",
                        json!({"type": self.job_type(), "id": self.id}),
                    );
                }
                self.wake
                    .wait_until(|| self.finalize_requested.get() || self.cancelled.get())
                    .await;
                if self.cancelled.get() {
                    // Cancelling a pending job aborts it (QEMU: job_cancel
                    // of a pending job is always forced).
                    self.force.set(true);
                }
            }
            if !self.failed()
                && let Err(e) = self.driver.clone().prepare(self.clone()).await
            {
                *self.error.borrow_mut() = Some(e.to_string());
            }
        }
        let failed = self.failed() || !ran;
        crate::trace!(
            job_completed,
            "job {} ret {}",
            self.id,
            if failed { -125 } else { 0 }
        );
        if failed {
            self.transition(JobStatus::Aborting);
            self.driver.clone().abort(self.clone()).await;
        }
        self.driver.clone().clean(self.clone()).await;
        let (offset, len) = self.progress.get();
        let mut data = json!({
            "type": self.job_type(), "device": self.id, "len": len, "offset": offset, "speed": self.speed.get(),
        });
        if let Some(r) = &r {
            if failed && self.error.borrow().is_none() {
                r.emit("BLOCK_JOB_CANCELLED", data);
            } else {
                if let (Some(e), Value::Object(m)) = (self.error.borrow().clone(), &mut data) {
                    m.insert("error".into(), Value::String(e));
                }
                r.emit("BLOCK_JOB_COMPLETED", data);
            }
        }
        // Release the nodes (QEMU: job_clean / block_job_remove_all_bdrv).
        let backends = core::mem::take(&mut *self.backends.borrow_mut());
        for b in backends {
            b.delete().await;
        }
        self.transition(JobStatus::Concluded);
        if self.auto_dismiss.get() {
            self.dismiss_now();
        }
    }

    /// Drops a job that was created but could not be set up (QEMU:
    /// `job_early_fail`): releases its backends and goes to null without
    /// running.
    pub async fn early_fail(self: &Rc<Self>) {
        let backends = core::mem::take(&mut *self.backends.borrow_mut());
        for b in backends {
            b.delete().await;
        }
        self.dismiss_now();
    }

    fn dismiss_now(&self) {
        self.transition(JobStatus::Null);
        if let Some(r) = self.registry() {
            r.forget_job_entry(self);
        }
    }

    /// `job-cancel` (QEMU: `job_cancel`). `force` also cancels a ready
    /// mirror without completing it. Cancelling a concluded job dismisses it.
    pub fn cancel(self: &Rc<Self>, force: bool) -> Result<(), JobError> {
        self.check_verb(JobVerb::Cancel)?;
        let never_started = !self.started.get();
        let force = self.driver.cancel(self, force) || self.status.get() == JobStatus::Pending;
        self.cancelled.set(true);
        self.force.set(self.force.get() || force);
        if self.user_paused.get() {
            self.user_paused.set(false);
            self.pause_count
                .set(self.pause_count.get().saturating_sub(1));
        }
        self.wake.wake_all();
        if never_started {
            // Never started: conclude without running.
            self.start();
        }
        Ok(())
    }

    /// Cancels with force and waits until the job is gone (QEMU:
    /// `job_cancel_sync(job, true)`).
    pub async fn cancel_sync(self: &Rc<Self>) {
        match self.status.get() {
            JobStatus::Null => return,
            JobStatus::Aborting | JobStatus::Concluded => {}
            _ => {
                let _ = self.cancel(true);
            }
        }
        self.done
            .wait_until(|| matches!(self.status.get(), JobStatus::Concluded | JobStatus::Null))
            .await;
        if self.status.get() == JobStatus::Concluded {
            self.dismiss_now();
        }
    }

    /// `job-pause` (QEMU: `job_user_pause`).
    pub fn pause(&self) -> Result<(), JobError> {
        self.check_verb(JobVerb::Pause)?;
        if self.user_paused.get() {
            return Err(JobError::Driver("Job is already paused".into()));
        }
        self.user_paused.set(true);
        self.pause_count.set(self.pause_count.get() + 1);
        self.wake.wake_all();
        Ok(())
    }

    /// Whether a pause was requested (QEMU: `job_should_pause`).
    pub fn pause_requested(&self) -> bool {
        self.pause_count.get() > 0 && !self.cancelled.get()
    }

    /// `job-resume` (QEMU: `job_user_resume`).
    pub fn resume(&self) -> Result<(), JobError> {
        self.check_verb(JobVerb::Resume)?;
        if !self.user_paused.get() {
            return Err(JobError::NotPaused);
        }
        self.user_paused.set(false);
        self.pause_count
            .set(self.pause_count.get().saturating_sub(1));
        self.io_status.set("ok");
        self.wake.wake_all();
        Ok(())
    }

    /// `job-finalize` (QEMU: `job_finalize`): lets a pending job without
    /// auto-finalize run its prepare step and conclude.
    pub fn finalize(&self) -> Result<(), JobError> {
        self.check_verb(JobVerb::Finalize)?;
        self.finalize_requested.set(true);
        self.wake.wake_all();
        Ok(())
    }

    /// `job-complete`.
    pub fn complete(&self) -> Result<(), JobError> {
        self.check_verb(JobVerb::Complete)?;
        if self.cancelled.get() {
            return Err(JobError::Driver(format!(
                "The active block job '{}' cannot be completed",
                self.id
            )));
        }
        self.driver.complete(self).map_err(JobError::Driver)?;
        self.wake.wake_all();
        Ok(())
    }

    /// `job-dismiss`.
    pub fn dismiss(&self) -> Result<(), JobError> {
        self.check_verb(JobVerb::Dismiss)?;
        self.dismiss_now();
        Ok(())
    }

    /// `block-job-set-speed`.
    pub fn set_speed(&self, speed: u64) -> Result<(), JobError> {
        self.check_verb(JobVerb::SetSpeed)?;
        self.speed.set(speed);
        self.wake.wake_all();
        Ok(())
    }

    /// Marks a running job ready (`BLOCK_JOB_READY`; QEMU: `job_transition_to_ready`).
    pub fn set_ready(&self) {
        if self.status.get() == JobStatus::Running {
            self.transition(JobStatus::Ready);
            if let Some(r) = self.registry() {
                let (offset, len) = self.progress.get();
                r.emit(
                    "BLOCK_JOB_READY",
                    json!({"type": self.job_type(), "device": self.id, "len": len, "offset": offset, "speed": self.speed.get()}),
                );
            }
        }
    }

    /// Pauses here while a pause is requested and the job is not
    /// cancelled (QEMU: `job_pause_point`).
    pub async fn pause_point(&self) {
        if self.pause_count.get() == 0 || self.cancelled.get() {
            return;
        }
        let resume_to = self.status.get();
        let paused = if resume_to == JobStatus::Ready {
            JobStatus::Standby
        } else {
            JobStatus::Paused
        };
        self.transition(paused);
        self.wake
            .wait_until(|| self.pause_count.get() == 0 || self.cancelled.get())
            .await;
        self.transition(resume_to);
    }

    /// Sleeps `ns` nanoseconds, waking early when cancelled (QEMU:
    /// `job_sleep_ns`).
    pub async fn sleep_ns(&self, ns: u64) {
        let Some(r) = self.registry() else { return };
        let clock = r.clock();
        let deadline = clock.now_ns().saturating_add(ns);
        let mut sleep = Box::pin(r.executor().timers().sleep_until(clock, deadline));
        core::future::poll_fn(|cx| {
            // Cut short by a cancel or a pause request (QEMU: job_enter
            // deletes the sleep timer).
            if self.cancelled.get() || self.pause_count.get() > 0 {
                return Poll::Ready(());
            }
            self.wake.register(cx.waker());
            sleep.as_mut().poll(cx)
        })
        .await;
        self.pause_point().await;
    }

    /// QMP `query-jobs` entry (QEMU: `JobInfo`).
    pub fn info(&self) -> Value {
        let (cur, total) = self.progress.get();
        let mut v = json!({
            "id": self.id, "type": self.job_type(), "status": self.status.get().as_str(),
            "current-progress": cur, "total-progress": total,
        });
        if let (Some(e), Value::Object(m)) = (self.error.borrow().clone(), &mut v) {
            m.insert("error".into(), Value::String(e));
        }
        v
    }
}

use core::future::Future;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_table_is_qemus() {
        use JobStatus::*;
        assert!(Created.can_become(Running));
        assert!(Running.can_become(Aborting));
        assert!(Aborting.can_become(Concluded));
        assert!(Concluded.can_become(Null));
        assert!(!Null.can_become(Running));
        assert!(Ready.can_become(Standby));
        assert!(!Paused.can_become(Ready));
    }

    #[test]
    fn verb_refusal_text() {
        let e = JobError::Verb {
            id: "j0".into(),
            status: JobStatus::Running,
            verb: JobVerb::Complete,
        };
        assert_eq!(
            e.to_string(),
            "Job 'j0' in state 'running' cannot accept command verb 'complete'"
        );
    }
}
