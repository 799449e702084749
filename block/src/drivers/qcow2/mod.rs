//! `qcow2` (QEMU: `block/qcow2.c` and friends), byte-compatible with QEMU:
//! images QEMU writes open here, images written here pass `qemu-img check`.
//!
//! ```text
//! blockdev-add {"driver": "qcow2", "node-name": "disk0", "file": "vda"}
//! blockdev-add {"driver": "qcow2", "node-name": "top", "file": "f1",
//!               "backing": {"driver": "qcow2", "file": "f0", "backing": null}}
//! --blockdev qcow2,node-name=disk0,file=vda          (boot option)
//! ```
//!
//! The `file` child is any node (a virtio disk, `raw` with an offset, a
//! memory node in tests). The backing file is the `backing` option — a
//! node-name or a nested definition, or `null`/`""` for none. Without the
//! option, the header's backing file name is looked up as a node-name
//! (blockhaus has no file system); if no such node exists the open fails
//! and says so. Chains of any depth are nested definitions or references;
//! a chain that loops is refused by the graph ("would create a cycle").
//!
//! Options: `discard-no-unref` (see [`io`]), `lazy-refcounts` (accepted,
//! never used: refcounts are always updated in order), `pass-discard-request`
//! (freed clusters are discarded in the file unless `off`),
//! `l2-cache-size` and `refcount-cache-size` (bytes).
//!
//! Supported: versions 2 and 3, cluster sizes 512 B to 2 MiB, refcount
//! widths 1 to 64 bits, extended L2 entries (subclusters), zero clusters,
//! zlib-compressed clusters (read; a write rewrites the cluster
//! uncompressed), backing files, growing and shrinking, images with
//! internal snapshots (kept intact: clusters and L2 tables shared with a
//! snapshot are copied before a change; snapshots cannot be created,
//! applied or deleted here). A dirty image (lazy refcounts, not closed
//! cleanly) has its refcounts rebuilt when opened read-write, as QEMU does.
//! Persistent dirty bitmaps ([`bitmaps`]) are loaded at open as the node's
//! bitmaps, marked in use while the image is open read-write, and stored
//! when the node closes; bitmaps a program without bitmap support left
//! behind (autoclear bit clear) are ignored, as QEMU ignores them.
//!
//! Refused, with a message: external data files, encryption, zstd
//! compression, unknown incompatible features (named from the image's
//! feature table), shrinking an image with internal snapshots, opening a
//! corrupt image read-write.
//!
//! The image file does not grow by itself on a fixed-size protocol node (a
//! virtio disk): an image used there needs room behind its last cluster
//! (e.g. the host file truncated larger); a write that needs a cluster past
//! the end fails with ENOSPC, as with QEMU on a block device.
//!
//! Requests: one at a time changes metadata (the image lock, QEMU's
//! `s->lock`); reads and writes that change no metadata do their data I/O
//! without it, and clusters freed meanwhile are only handed back once that
//! I/O is done ([`state::Inflight`]).
//!
//! QMP: `blockdev-create` (`driver: qcow2`, a job to dismiss) and
//! `blockdev-snapshot` ([`commands`]). Jobs that drop layers rewrite the
//! header's backing file with [`BlockDriver::change_backing_file`];
//! [`Qcow2::check`] recomputes refcounts like `qemu-img check`.
//!
//! The concerns: [`header`] (header, extensions, feature bits), [`open`]
//! (validation at open), [`state`] (the open image and its write-back
//! order), [`cache`] (L2 and refcount block caches), [`cluster`] (L1/L2
//! mapping, subclusters, compressed clusters), [`refcount`] (refcounts and
//! allocation), [`io`] (requests), [`inflate`] (zlib), [`create`]
//! (`blockdev-create`), [`check`] (consistency check), [`commands`] (the
//! QMP commands).

pub mod bitmaps;
pub mod cache;
pub mod check;
pub mod cluster;
pub mod commands;
pub mod create;
pub mod header;
pub mod inflate;
pub mod io;
pub mod open;
pub mod refcount;
pub mod state;

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::Cell;

use serde_json::{Value, json};

use crate::driver::BlockDriver;
use crate::graph::child::Child;
use crate::graph::node::Node;
use crate::graph::permission::{ChildRole, Perm, default_perms};
use crate::io::{BlockStatus, BoxFuture, IoError, IoResult, ReqFlags};
use crate::open::{DriverClass, DriverOpts, Opener};
use crate::qmp::QmpError;

use self::open::BackingOpt;
use self::state::{CoLock, State};

/// `qcow2`.
pub fn class() -> DriverClass {
    DriverClass::new("qcow2", parse)
}

/// The role of the `file` child: data and metadata.
pub fn file_role() -> ChildRole {
    ChildRole::DATA | ChildRole::METADATA | ChildRole::PRIMARY
}

fn parse(d: &mut DriverOpts<'_, '_>) -> Result<Opener, QmpError> {
    d.child("file", file_role())?;
    let backing = match d.opts.get("backing") {
        None => BackingOpt::FromHeader,
        Some(Value::Null) => BackingOpt::None,
        Some(Value::String(s)) if s.is_empty() => BackingOpt::None,
        Some(_) => {
            d.child("backing", ChildRole::COW)?;
            BackingOpt::Child
        }
    };
    let discard_no_unref = d.opts.bool_or("discard-no-unref", false)?;
    let _lazy = d.opts.opt_bool("lazy-refcounts")?;
    let pass_discard = d.opts.bool_or("pass-discard-request", true)?;
    let l2_cache = d.opts.opt_size("l2-cache-size")?;
    let rb_cache = d.opts.opt_size("refcount-cache-size")?;
    if d.opts.has("data-file") {
        return Err(QmpError::generic(
            "qcow2: external data files are not supported by blockhaus",
        ));
    }
    Ok(Box::new(move |_ctx| {
        Ok(Box::new(Qcow2 {
            st: CoLock::new(None),
            size: Cell::new(0),
            backing,
            discard_no_unref,
            pass_discard,
            l2_cache,
            rb_cache,
            info: core::cell::RefCell::new(Value::Null),
            used: core::cell::RefCell::new(None),
            header: core::cell::RefCell::new(header::Header::default()),
        }) as Box<dyn BlockDriver>)
    }))
}

/// One qcow2 node.
pub struct Qcow2 {
    st: CoLock<Option<State>>,
    size: Cell<u64>,
    backing: BackingOpt,
    discard_no_unref: bool,
    pass_discard: bool,
    l2_cache: Option<u64>,
    rb_cache: Option<u64>,
    info: core::cell::RefCell<Value>,
    /// The open image's count of clusters in use.
    used: core::cell::RefCell<Option<Rc<Cell<u64>>>>,
    /// The header as opened or last resized (for checks that cannot wait
    /// for the lock).
    header: core::cell::RefCell<header::Header>,
}

fn file(node: &Node) -> IoResult<Rc<Child>> {
    node.file().ok_or(IoError::Enomedium)
}

impl Qcow2 {
    /// Refuses a request past the virtual size (QEMU's generic layer does
    /// the same for format drivers).
    fn in_range(&self, offset: u64, len: u64) -> IoResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size.get() => Ok(()),
            _ => Err(IoError::Einval),
        }
    }

    /// The image lock, once no guest cluster of `[offset, offset+len)` is
    /// being allocated by a write in flight.
    async fn lock_range(
        &self,
        offset: u64,
        len: u64,
    ) -> IoResult<state::CoGuard<'_, Option<State>>> {
        loop {
            let guard = self.st.lock().await;
            let st = guard.as_ref().ok_or(IoError::Enomedium)?;
            let (c0, c1) = st.cluster_range(offset, len);
            if !st.inflight.busy(c0, c1) {
                return Ok(guard);
            }
            let inflight = st.inflight.clone();
            drop(guard);
            inflight.wait_allocated(c0, c1).await;
        }
    }

    /// Rewrites the backing file name and format in the header (QEMU:
    /// `qcow2_change_backing_file`, reached through
    /// [`BlockDriver::change_backing_file`]). `None` removes the backing
    /// file from the header. The node's `backing` edge is the caller's
    /// business.
    pub async fn rewrite_backing_file(
        &self,
        node: &Node,
        backing_file: Option<&str>,
        format: Option<&str>,
    ) -> IoResult<()> {
        let f = file(node)?;
        let mut guard = self.st.lock().await;
        let st = guard.as_mut().ok_or(IoError::Enomedium)?;
        st.check_writable()?;
        let current = f.read(0, st.cs as usize, ReqFlags::NONE).await?;
        let Some(new) = header::with_backing(&st.h, &current, backing_file, format) else {
            log::error!(
                "qcow2 node '{}': the backing file name does not fit in the header cluster",
                node.name()
            );
            return Err(IoError::Einval);
        };
        // Everything the new header could make reachable is durable first.
        st.flush_caches(&f).await?;
        f.flush().await?;
        st.write_header_field(&f, 0, new.clone()).await?;
        f.flush().await?;
        if let Ok(h) = header::Header::parse(&new) {
            st.h.backing_file = h.backing_file;
            st.h.backing_format = h.backing_format;
            st.h.backing_file_offset = h.backing_file_offset;
            st.h.backing_file_size = h.backing_file_size;
            st.h.extensions = h.extensions;
        }
        Ok(())
    }

    /// Checks the image's refcounts against its metadata (see [`check`]).
    pub async fn check(&self, node: &Node) -> IoResult<check::CheckReport> {
        let f = file(node)?;
        let mut guard = self.st.lock().await;
        let st = guard.as_mut().ok_or(IoError::Enomedium)?;
        st.check(&f).await
    }

    async fn do_open(&self, node: &Rc<Node>) -> Result<(), String> {
        let f = file(node).map_err(|_| String::from("qcow2: no file child"))?;
        let mut st = open::load(&f, node.name(), node.read_only())
            .await
            .map_err(|e| format!("qcow2 node '{}': {e}", node.name()))?;
        st.pass_discard = self.pass_discard;
        if let Some(b) = self.l2_cache {
            st.l2c = cache::Cache::new((b / st.cs) as usize);
        }
        if let Some(b) = self.rb_cache {
            st.rbc = cache::Cache::new((b / st.cs) as usize);
        }
        if let Some(mut dir) = st.bitmaps.take() {
            let loaded = bitmaps::load_bitmaps(&f, &st, &dir)
                .await
                .map_err(|e| format!("qcow2 node '{}': {e}", node.name()))?;
            if !st.read_only {
                bitmaps::mark_in_use(&f, &mut st, &mut dir)
                    .await
                    .map_err(|e| {
                        format!(
                            "qcow2 node '{}': Could not update the bitmap directory: {e}",
                            node.name()
                        )
                    })?;
            }
            st.bitmaps = Some(dir);
            node.dirty_bitmaps_mut().extend(loaded);
        }
        if self.backing == BackingOpt::FromHeader
            && let Some(name) = st.h.backing_file.clone()
        {
            open::attach_backing_from_header(node, &name)
                .map_err(|e| format!("qcow2 node '{}': {e}", node.name()))?;
        }
        self.size.set(st.h.size);
        *self.header.borrow_mut() = st.h.clone();
        *self.info.borrow_mut() = json!({
            "compat": if st.h.version >= 3 { "1.1" } else { "0.10" },
            "lazy-refcounts": st.h.compatible & header::compat::LAZY_REFCOUNTS != 0,
            "refcount-bits": st.h.refcount_bits(),
            "corrupt": st.h.incompatible & header::incompat::CORRUPT != 0,
            "extended-l2": st.ext,
            "compression-type": "zlib",
        });
        *self.used.borrow_mut() = Some(st.used.clone());
        *self.st.lock().await = Some(st);
        Ok(())
    }
}

/// Runs `f` on the open state under the image lock.
macro_rules! with_state {
    ($self:ident, $node:ident, |$st:ident, $f:ident| $body:expr) => {
        Box::pin(async move {
            let $f = file($node)?;
            let mut guard = $self.st.lock().await;
            let Some($st) = guard.as_mut() else {
                return Err(IoError::Enomedium);
            };
            $body
        })
    };
}

impl BlockDriver for Qcow2 {
    fn format_name(&self) -> &str {
        "qcow2"
    }

    fn open<'a>(&'a self, node: &'a Rc<Node>) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.do_open(node))
    }

    fn get_length(&self, _: &Node) -> IoResult<u64> {
        Ok(self.size.get())
    }

    fn read<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: usize,
        _: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Vec<u8>>> {
        Box::pin(async move {
            let f = file(node)?;
            let b = node.child("backing");
            let (runs, _busy) = {
                let mut guard = self.st.lock().await;
                let st = guard.as_mut().ok_or(IoError::Enomedium)?;
                let runs = st.map_read(&f, b.is_some(), offset, len).await?;
                (runs, st.inflight.begin())
            };
            io::exec_read(runs, &f, b.as_deref(), len).await
        })
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        _: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            self.in_range(offset, data.len() as u64)?;
            let f = file(node)?;
            let b = node.child("backing");
            loop {
                let mut guard = self.st.lock().await;
                let st = guard.as_mut().ok_or(IoError::Enomedium)?;
                st.check_writable()?;
                let (c0, c1) = st.cluster_range(offset, data.len() as u64);
                if st.inflight.busy(c0, c1) {
                    let inflight = st.inflight.clone();
                    drop(guard);
                    inflight.wait_allocated(c0, c1).await;
                    continue;
                }
                if let Some(extents) = st.map_in_place(&f, offset, data.len()).await? {
                    // Only data changes: no lock, as QEMU drops `s->lock`.
                    let _busy = st.inflight.begin();
                    drop(guard);
                    if let [(host, _, _)] = extents[..] {
                        return f.write(host, data, ReqFlags::NONE).await;
                    }
                    for (host, pos, n) in extents {
                        f.write(host, data[pos..pos + n].to_vec(), ReqFlags::NONE)
                            .await?;
                    }
                    return Ok(());
                }
                // Allocating write: plan under the lock, write the data
                // without it, link the clusters under it again.
                let mut plan = st.plan_write(&f, b.as_deref(), offset, &data).await?;
                let _marks = st.inflight.mark(c0, c1);
                let busy = st.inflight.begin();
                drop(guard);
                let r = plan.write_data(&f).await;
                // Done with the file before waiting for the lock: a flush
                // holding the lock may be waiting for this I/O to end.
                drop(busy);
                let mut guard = self.st.lock().await;
                let st = guard.as_mut().ok_or(IoError::Enomedium)?;
                let end = *r.as_ref().unwrap_or(&0);
                st.finish_write(&f, plan, end, r.is_ok()).await?;
                return r.map(|_| ());
            }
        })
    }

    fn supported_write_flags(&self) -> ReqFlags {
        ReqFlags::MAY_UNMAP
    }

    fn flush<'a>(&'a self, node: &'a Node) -> BoxFuture<'a, IoResult<()>> {
        with_state!(self, node, |st, f| {
            if st.read_only {
                return Ok(());
            }
            st.flush_caches(&f).await
        })
    }

    fn discard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFuture<'a, IoResult<()>> {
        let no_unref = self.discard_no_unref;
        Box::pin(async move {
            // Discard is advisory: what lies past the end is ignored.
            let len = len.min(self.size.get().saturating_sub(offset));
            if len == 0 {
                return Ok(());
            }
            let f = file(node)?;
            let mut guard = self.lock_range(offset, len).await?;
            let st = guard.as_mut().ok_or(IoError::Enomedium)?;
            let has_backing = node.child("backing").is_some();
            st.discard(&f, has_backing, offset, len, no_unref).await
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            self.in_range(offset, len)?;
            let f = file(node)?;
            let mut guard = self.lock_range(offset, len).await?;
            let st = guard.as_mut().ok_or(IoError::Enomedium)?;
            let b = node.child("backing");
            st.write_zeroes(&f, b.as_deref(), offset, len, flags).await
        })
    }

    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, IoResult<BlockStatus>> {
        with_state!(self, node, |st, f| {
            let b = node.child("backing");
            st.block_status(&f, b.as_deref(), offset, len).await
        })
    }

    fn truncate<'a>(&'a self, node: &'a Node, size: u64) -> BoxFuture<'a, IoResult<()>> {
        with_state!(self, node, |st, f| {
            let old = st.h.size;
            if size != old
                && let Err(e) = bitmaps::truncate_check(st.bitmaps.as_ref(), &node.dirty_bitmaps())
            {
                log::error!("qcow2 node '{}': {e}", node.name());
                return Err(IoError::Enotsup);
            }
            let b = node.child("backing");
            st.truncate(&f, b.as_deref(), size).await?;
            self.size.set(size);
            *self.header.borrow_mut() = st.h.clone();
            // A longer backing file must not show through the new area
            // (QEMU: the zero-fill in `bdrv_co_truncate`).
            if let Some(bk) = &b {
                let end = bk.node().get_length()?.min(size);
                if end > old {
                    match st
                        .write_zeroes(&f, b.as_deref(), old, end - old, ReqFlags::NONE)
                        .await
                    {
                        Err(IoError::Enotsup) => {
                            let mut pos = old;
                            while pos < end {
                                let n = (end - pos).min(1 << 20);
                                st.write(&f, b.as_deref(), pos, &alloc::vec![0u8; n as usize])
                                    .await?;
                                pos += n;
                            }
                        }
                        r => r?,
                    }
                    st.flush_caches(&f).await?;
                }
            }
            Ok(())
        })
    }

    fn change_backing_file<'a>(
        &'a self,
        node: &'a Node,
        file: Option<&'a str>,
        format: Option<&'a str>,
    ) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(self.rewrite_backing_file(node, file, format))
    }

    fn inactivate<'a>(&'a self, node: &'a Node) -> BoxFuture<'a, IoResult<()>> {
        with_state!(self, node, |st, f| {
            let r = bitmaps::store(&f, st, node).await;
            if let Err(e) = &r {
                log::error!(
                    "qcow2 node '{}': could not store the persistent dirty bitmaps: {e}; \
                     they will be inconsistent when the image is opened again",
                    node.name()
                );
            }
            r
        })
    }

    fn remove_persistent_dirty_bitmap<'a>(
        &'a self,
        node: &'a Node,
        name: &'a str,
    ) -> BoxFuture<'a, IoResult<()>> {
        with_state!(self, node, |st, f| bitmaps::remove(&f, st, name).await)
    }

    fn cluster_size(&self, _: &Node) -> Option<u64> {
        Some(self.header.borrow().cluster_size())
    }

    fn can_store_new_dirty_bitmap(
        &self,
        node: &Node,
        name: &str,
        granularity: u64,
    ) -> Result<(), String> {
        let h = self.header.borrow();
        let bitmaps = node.dirty_bitmaps();
        let stored: Vec<_> = bitmaps.iter().filter(|b| b.persistent).collect();
        bitmaps::can_store_new(&h, node.read_only(), &stored, name, granularity).map_err(|e| {
            format!(
                "Can't make bitmap '{name}' persistent in '{}': {e}",
                node.name()
            )
        })
    }

    fn close(&self, node: &Node) {
        if let Some(mut st) = self.st.try_get()
            && let Some(s) = st.as_ref()
            && !s.read_only
            && (s.l2c.any_dirty() || s.rbc.any_dirty() || !s.pending_free.is_empty())
        {
            log::error!(
                "qcow2 node '{}': closed with metadata not written back (the final flush failed)",
                node.name()
            );
            *st = None;
        }
    }

    fn child_perm(&self, node: &Node, child: &Child, perm: Perm, shared: Perm) -> (Perm, Perm) {
        default_perms(child.role(), !node.read_only(), perm, shared)
    }

    /// QEMU's qcow2 format-specific data, and `x-room-left`: the bytes of
    /// its file the image does not use yet (free clusters, trailing space
    /// included). A disk cannot grow, so that is all new clusters can take.
    fn query_info(&self, node: &Node) -> Option<Value> {
        let mut info = self.info.borrow().clone();
        if let (Some(used), Some(file)) = (&*self.used.borrow(), node.file())
            && let (Ok(len), Some(map)) = (file.node().get_length(), info.as_object_mut())
        {
            let cs = self.header.borrow().cluster_size();
            let room = len.saturating_sub(used.get().saturating_mul(cs));
            map.insert("x-room-left".into(), json!(room));
        }
        Some(info)
    }
}
