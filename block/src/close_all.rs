//! The shutdown sequence (QEMU: `bdrv_close_all`, reworked by Max Reitz's
//! 2015 series "block: Rework bdrv_close_all()", and its callers
//! `qemu_cleanup` / qemu-storage-daemon's exit path).
//!
//! Nothing is force-closed. Every user lets go, and every node closes
//! because its refcount reaches zero — parents before children, each
//! flushed before its child goes — and then the all-nodes list must be
//! empty:
//!
//! 1. drain: stop new requests on every backend and wait for those in flight;
//! 2. cancel every job synchronously, with force (`job_cancel_sync_all`);
//! 3. wait until no request is in flight on any node (`bdrv_drain_all`);
//! 4. eject the tree of every backend (`blk_remove_all_bs`): an NBD export
//!    on a named backend hears the remove notifier and shuts down;
//! 5. drop every monitor reference (`blockdev_close_all_bdrv_states`);
//! 6. assert that no node is left (`assert(QTAILQ_EMPTY(&all_bdrv_states))`).
//!
//! Backends themselves are not deleted, as in QEMU ("the BBs are leaked;
//! this does not matter because the process is about to exit"): a user
//! still holding one gets ENOMEDIUM, never a crash.
//!
//! The kernel runs [`close_all`] with [`crate::exec::Executor::block_on`]
//! and prints the [`CloseAllReport`] on the console before powering off.

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::graph::node::unref;
use crate::graph::registry::{ClosedNode, Registry};
use crate::job::RegistryJobs;

/// What close-all did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloseAllReport {
    /// Ids of the jobs cancelled, in order.
    pub jobs_cancelled: Vec<String>,
    /// Backends whose tree was ejected (name, or the user description of
    /// an anonymous one).
    pub backends_ejected: Vec<String>,
    /// Monitor-owned nodes whose monitor reference was dropped.
    pub monitor_refs_dropped: Vec<String>,
    /// Every node closed during close-all, in closing order, with its
    /// final flush.
    pub nodes_closed: Vec<ClosedNode>,
    /// Nodes still open afterwards, with their refcount: a leaked
    /// reference. Empty on success.
    pub leaked: Vec<(String, u32)>,
}

impl CloseAllReport {
    /// Whether every node was closed.
    pub fn is_clean(&self) -> bool {
        self.leaked.is_empty()
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        String::from("none")
    } else {
        items.join(", ")
    }
}

impl fmt::Display for CloseAllReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "close-all: jobs cancelled: {}",
            list(&self.jobs_cancelled)
        )?;
        writeln!(
            f,
            "close-all: backends ejected: {}",
            list(&self.backends_ejected)
        )?;
        writeln!(
            f,
            "close-all: monitor references dropped: {}",
            list(&self.monitor_refs_dropped)
        )?;
        for c in &self.nodes_closed {
            writeln!(
                f,
                "close-all: closed node '{}' ({}): {}",
                c.name, c.driver, c.flush
            )?;
        }
        if self.leaked.is_empty() {
            write!(f, "close-all: all {} nodes closed", self.nodes_closed.len())
        } else {
            let leaked: Vec<String> = self
                .leaked
                .iter()
                .map(|(n, r)| format!("'{n}' (refcount {r})"))
                .collect();
            write!(f, "close-all: NODES LEFT OPEN: {}", leaked.join(", "))
        }
    }
}

/// Nodes were left open: a reference leaked. Carries the full report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseAllError {
    /// What was done before the assertion failed.
    pub report: CloseAllReport,
}

impl fmt::Display for CloseAllError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.report.leaked.iter().map(|(n, _)| n.as_str()).collect();
        write!(
            f,
            "close-all left {} node(s) open: {}",
            names.len(),
            names.join(", ")
        )
    }
}

/// Runs the shutdown sequence; `Err` if any node is left open.
pub async fn close_all(registry: &Rc<Registry>) -> Result<CloseAllReport, CloseAllError> {
    let mut report = CloseAllReport::default();
    // Nodes closed earlier (blockdev-del) are not part of this report.
    let _ = registry.take_closed();

    // 1. Quiesce the backends of users; jobs' backends keep going so that
    //    the jobs can finish their cancellation.
    let backends = registry.backends();
    let quiesced: Vec<_> = backends
        .iter()
        .filter(|b| !is_job_backend(registry, b))
        .cloned()
        .collect();
    for b in &quiesced {
        b.drained_begin().await;
    }

    // 2. Cancel every job and wait for each to be gone.
    for job in registry.jobs() {
        report.jobs_cancelled.push(job.id().into());
        job.cancel_sync().await;
    }

    // 3. Nothing in flight anywhere.
    for n in registry.nodes() {
        n.drain().await;
    }

    // 4. Eject every backend's tree.
    for b in registry.backends() {
        let desc = match b.name() {
            Some(n) => String::from(n),
            None => b.user_desc(),
        };
        if b.remove().await {
            report.backends_ejected.push(desc);
        }
    }
    for b in &quiesced {
        b.drained_end();
    }

    // 5. Drop the monitor's references.
    for n in registry.monitor_nodes() {
        if registry.monitor_release(&n) {
            report.monitor_refs_dropped.push(n.name().into());
            unref(n).await;
        }
    }

    // 6. Every node must have been closed by its refcount reaching zero.
    report.nodes_closed = registry.take_closed();
    report.leaked = registry
        .nodes()
        .iter()
        .map(|n| (String::from(n.name()), n.refcnt()))
        .collect();
    if report.leaked.is_empty() {
        log::info!("close-all: {} nodes closed", report.nodes_closed.len());
        Ok(report)
    } else {
        log::error!("close-all: nodes left open: {:?}", report.leaked);
        Err(CloseAllError { report })
    }
}

fn is_job_backend(registry: &Registry, b: &Rc<crate::graph::backend::Backend>) -> bool {
    registry
        .jobs()
        .iter()
        .any(|j| j.backends().iter().any(|x| Rc::ptr_eq(x, b)))
}
