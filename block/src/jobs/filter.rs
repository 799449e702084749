//! The filter node a job inserts above the node it works on (QEMU:
//! `mirror_top`, `commit_top`, `copy-before-write`, and the `copy-on-read`
//! filter of `block-stream`), and its insertion and removal.
//!
//! Every write-like request (write, write-zeroes, discard) that a user of
//! the node sends passes the filter, which lets the job see it: a
//! [`WriteHook`] runs before the request goes down (backup copies the old
//! data out; stream waits for its copy of the same range) and after it
//! completes. A mirror's filter only holds the graph's shape (QEMU's
//! `mirror_top`): the mirror hears writes through the node's write
//! notifier. Reads, flushes and block-status pass through. A filter that
//! must see every write first (backup, stream) stops sharing WRITE on the
//! node once all its users moved onto the filter.
//!
//! [`insert_filter`] opens the filter over the node and moves every parent
//! of the node onto it ([`crate::graph::replace::replace_node`]);
//! [`remove_filter`] moves them back and drops the job's reference, which
//! closes the filter. Both run in a drained section of the node.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::any::Any;
use core::cell::Cell;

use serde_json::{Map, Value};

use crate::driver::{BlockDriver, forward};
use crate::graph::backend::Backend;
use crate::graph::backend::Drained;
use crate::graph::child::{Child, set_child_perm};
use crate::graph::node::{Node, NodeOptions, unref};
use crate::graph::permission::{ChildRole, Perm, filter_default_perms};
use crate::io::{BoxFuture, IoError, IoResult, ReqFlags};

use crate::graph::replace::replace_node;

/// What a request holds while it runs (a range lock, …).
pub type Guard = Box<dyn Any>;

/// A job's view of the writes that reach its node.
pub trait WriteHook {
    /// Runs before a write-like request on `[offset, offset + len)` with
    /// `flags` goes down; the guard lives until the request completes. An
    /// error fails the request (QEMU: copy-before-write's
    /// `on-cbw-error=break-guest-write`).
    fn before_write<'a>(
        &'a self,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Guard>>;

    /// Runs after a write-like request completed (or failed).
    fn after_write(&self, offset: u64, len: u64);
}

/// The filter driver.
pub struct HookFilter {
    name: &'static str,
    hook: Rc<dyn WriteHook>,
    /// Set once the filter holds every user of its child: until then it
    /// shares everything, so that it can be attached next to them (QEMU:
    /// `bdrv_mirror_top_child_perm` without a job).
    unshare_write: Cell<bool>,
}

impl HookFilter {
    async fn hooked<F>(&self, offset: u64, len: u64, flags: ReqFlags, req: F) -> IoResult<()>
    where
        F: core::future::Future<Output = IoResult<()>>,
    {
        let guard = self.hook.before_write(offset, len, flags).await?;
        let r = req.await;
        self.hook.after_write(offset, len);
        drop(guard);
        r
    }
}

impl BlockDriver for HookFilter {
    fn format_name(&self) -> &str {
        self.name
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        let len = data.len() as u64;
        Box::pin(self.hooked(
            offset,
            len,
            flags,
            forward::write(node, offset, data, flags),
        ))
    }

    fn supported_write_flags(&self) -> ReqFlags {
        ReqFlags::FUA | ReqFlags::MAY_UNMAP | ReqFlags::WRITE_UNCHANGED
    }

    fn discard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(self.hooked(
            offset,
            len,
            ReqFlags::NONE,
            forward::discard(node, offset, len),
        ))
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(self.hooked(
            offset,
            len,
            flags,
            forward::write_zeroes(node, offset, len, flags),
        ))
    }

    fn truncate<'a>(&'a self, node: &'a Node, size: u64) -> BoxFuture<'a, IoResult<()>> {
        let _ = (node, size);
        // A job's node keeps its length while the job runs (QEMU: the job
        // does not share RESIZE).
        crate::driver::ready(Err(IoError::Eperm))
    }

    /// Passthrough; a filter that must see every write of its child
    /// (mirror, backup) does not let anyone else write there (QEMU:
    /// `cbw_child_perm` unshares WRITE and RESIZE on `file`).
    fn child_perm(&self, _: &Node, _: &Child, perm: Perm, shared: Perm) -> (Perm, Perm) {
        let (p, s) = filter_default_perms(perm, shared);
        if self.unshare_write.get() {
            (p, s.minus(Perm::WRITE | Perm::RESIZE))
        } else {
            (p, s.minus(Perm::RESIZE))
        }
    }

    fn is_filter(&self) -> bool {
        true
    }
}

/// Opens a filter (driver name `fmt`, node-name `name` or an implicit one)
/// over `node`, as its child `child_name`, and moves every parent of `node`
/// onto it, except the root edges of the backends in `keep` (the job's
/// own). With `unshare_write` nobody may write to `node` except through
/// the filter from now on. Returns the filter; the caller owns one
/// reference on it.
pub async fn insert_filter(
    node: &Rc<Node>,
    name: Option<&str>,
    fmt: &'static str,
    child_name: &str,
    hook: Rc<dyn WriteHook>,
    keep: &[Rc<Backend>],
    unshare_write: bool,
) -> Result<Rc<Node>, String> {
    let reg = node
        .registry()
        .ok_or_else(|| String::from("node without a registry"))?;
    let opts = NodeOptions {
        read_only: node.read_only(),
        ..NodeOptions::default()
    };
    let mut open_options = Map::new();
    open_options.insert("driver".into(), Value::String(fmt.into()));
    open_options.insert(child_name.into(), Value::String(node.name().into()));
    node.ref_();
    let filter = match reg.open_node(
        name,
        Box::new(HookFilter {
            name: fmt,
            hook,
            unshare_write: Cell::new(false),
        }),
        opts,
        open_options,
        alloc::vec![(
            child_name.to_string(),
            ChildRole::FILTERED | ChildRole::PRIMARY,
            node.clone()
        )],
    ) {
        Ok(f) => f,
        Err(e) => {
            node.unref_nonfinal();
            return Err(e.to_string());
        }
    };
    let drained = Drained::begin(node).await;
    let r = replace_node(node, &filter, |e| {
        e.parent_backend()
            .is_some_and(|b| keep.iter().any(|k| Rc::ptr_eq(k, &b)))
    })
    .await;
    let r = match r {
        Ok(_) if unshare_write => lock_child(&filter),
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    };
    drained.end();
    match r {
        Ok(()) => Ok(filter),
        Err(e) => {
            if let Some(child) = filter.file().map(|c| c.node().clone()) {
                let _ = replace_node(&filter, &child, |_| false).await;
            }
            unref(filter).await;
            Err(e)
        }
    }
}

/// Shares WRITE on the filter's child edge again, so that its users can
/// go back to the child.
fn share_child(filter: &Rc<Node>) {
    let Some(hf) = (filter.driver() as &dyn Any).downcast_ref::<HookFilter>() else {
        return;
    };
    let Some(edge) = filter.file() else { return };
    hf.unshare_write.set(false);
    let (perm, shared) = filter.cumulative_perms();
    let (p, s) = hf.child_perm(filter, &edge, perm, shared);
    if let Err(e) = set_child_perm(&edge, p, s) {
        log::warn!("job filter '{}': {e}", filter.name());
    }
}

/// Stops sharing WRITE on the filter's child edge, now that every writer
/// goes through the filter.
fn lock_child(filter: &Rc<Node>) -> Result<(), String> {
    let Some(hf) = (filter.driver() as &dyn Any).downcast_ref::<HookFilter>() else {
        return Ok(());
    };
    let Some(edge) = filter.file() else {
        return Ok(());
    };
    hf.unshare_write.set(true);
    let (perm, shared) = filter.cumulative_perms();
    let (p, s) = hf.child_perm(filter, &edge, perm, shared);
    set_child_perm(&edge, p, s).map_err(|e| {
        hf.unshare_write.set(false);
        e.to_string()
    })
}

/// Moves the filter's parents back to its child and drops the caller's
/// reference on the filter, which closes it (QEMU: `bdrv_drop_filter`).
pub async fn remove_filter(filter: Rc<Node>) {
    if let Some(child) = filter.file().map(|c| c.node().clone()) {
        let drained = Drained::begin(&child).await;
        share_child(&filter);
        if let Err(e) = replace_node(&filter, &child, |_| false).await {
            log::error!(
                "job filter '{}': could not give its users back: {e}",
                filter.name()
            );
        }
        drained.end();
    }
    unref(filter).await;
}
