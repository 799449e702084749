//! The block jobs (QEMU: `block/mirror.c`, `block/backup.c`,
//! `block/copy-before-write.c`, `block/stream.c`, `block/commit.c`) on the
//! job framework of [`crate::job`].
//!
//! Each job holds its nodes through its own backends and, where it must see
//! its users' writes, through a filter node it inserts above the node it
//! works on ([`filter`]): `mirror_top` marks writes dirty for
//! [`mirror`] (and active [`commit`]), `copy-before-write` saves old data
//! for [`backup`], a stream's filter keeps its copies and the users' writes
//! apart. The filter goes when the job ends, by its refcount, whether the
//! job completed, failed or was cancelled — so close-all, which cancels
//! every job first, still finds every node closed.
//!
//! Shared pieces: [`dirty_bitmap`], [`copy`] (copies in flight, range
//! locks), [`rate_limit`] (`speed`), [`on_error`] (`on-*-error`,
//! `BLOCK_JOB_ERROR`), [`chain`] (backing chains). The filters and a
//! mirror's pivot rewrite the graph with
//! [`crate::graph::replace::replace_node`] (`bdrv_replace_node`). The QMP
//! commands are in [`commands`].
//!
//! # Where blockhaus differs from QEMU
//! - A mirror tracks every write to its source, as QEMU's dirty bitmap on
//!   the node does ([`crate::graph::node::Node::add_write_notifier`]), so users
//!   may still attach to the source itself. Backup (like QEMU's
//!   copy-before-write) and stream must see each write *before* it lands;
//!   their filters do not share WRITE on the node, so a writer attached to
//!   the node after the job started (an export, `qemu-io` on the
//!   node-name) is refused with a permission conflict — QEMU accepts it
//!   for stream (it serialises requests in the node). Users attached
//!   before are moved onto the filter; a new one can attach to the filter
//!   (`filter-node-name`).
//! - Not supported: `replaces`, `copy-mode=write-blocking`, dirty bitmaps
//!   (`sync=bitmap`/`incremental`, `bitmap`), `compress`, `bottom`.
//! - `block-stream` and `block-commit` record `base` in the image header
//!   only under the name given as `backing-file` (QEMU defaults to the
//!   base's file name, which blockhaus does not know); a full stream
//!   records no backing file. Without `backing-file` the header keeps its
//!   old name, which still reads the same data. A base opened with
//!   `read-only=on` is refused ("Block node is read-only"), as in QEMU,
//!   where libvirt reopens it read-write first; there is no
//!   `blockdev-reopen` and no `auto-read-only`.
//! - `blockdev-mirror` refuses a target of another size when the command
//!   runs; the default `buf-size` is 4 MiB (QEMU: 16 MiB).

pub mod backup;
pub mod chain;
pub mod commands;
pub mod commit;
pub mod copy;
pub mod copy_before_write;
pub mod dirty_bitmap;
pub mod filter;
pub mod mirror;
pub mod on_error;
pub mod rate_limit;
pub mod stream;

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;

use crate::graph::node::Node;
use crate::graph::registry::{Registry, id_wellformed};
use crate::job::{JobOptions, RegistryJobs};

/// The options every block job command takes (QEMU: `speed`,
/// `auto-finalize`, `auto-dismiss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobSetup {
    /// `speed` in bytes per second (0: unlimited).
    pub speed: u64,
    /// `auto-finalize` (default true).
    pub auto_finalize: bool,
    /// `auto-dismiss` (default true).
    pub auto_dismiss: bool,
}

impl Default for JobSetup {
    fn default() -> Self {
        JobSetup {
            speed: 0,
            auto_finalize: true,
            auto_dismiss: true,
        }
    }
}

impl JobSetup {
    /// The framework's options.
    pub fn job_options(&self) -> JobOptions {
        JobOptions {
            auto_dismiss: self.auto_dismiss,
            speed: self.speed,
        }
    }
}

/// Refuses a node another job works on (QEMU: the op blockers that
/// `block_job_add_bdrv` sets on every node of a job, `bdrv_op_is_blocked`).
pub fn check_not_busy(reg: &Rc<Registry>, node: &Rc<Node>) -> Result<(), String> {
    for job in reg.jobs() {
        let uses = job
            .backends()
            .iter()
            .any(|b| b.root_node().is_some_and(|n| Rc::ptr_eq(&n, node)));
        if uses {
            return Err(format!(
                "Node '{}' is busy: block device is in use by block job: {}",
                node.name(),
                job.job_type()
            ));
        }
    }
    Ok(())
}

/// Refuses a malformed or taken job id before anything changes (QEMU:
/// the checks of `job_create`).
pub fn check_job_id(reg: &Rc<Registry>, id: &str) -> Result<(), String> {
    if !id_wellformed(id) {
        return Err(format!("Invalid job ID '{id}'"));
    }
    if reg.find_job(id).is_some() {
        return Err(format!("Job ID '{id}' already in use"));
    }
    Ok(())
}
