//! Nodes and their refcounts (QEMU: `BlockDriverState`, `bdrv_ref`,
//! `bdrv_unref`, `bdrv_close`, `bdrv_delete`, and the generic request path of
//! `block/io.c`).
//!
//! A node has a unique node-name, a driver instance, child edges, the edges
//! of its parents, a refcount and an in-flight request count. Opening yields
//! refcount 1 for the opener; every child edge holds one reference. A node
//! is closed only when its refcount reaches zero, by [`unref`]:
//! drain → flush → driver close → drop every child edge (each edge is
//! removed from both ends *before* its reference is dropped, the 2015 quorum
//! fix) → leave the all-nodes list. Parents are therefore always closed
//! before their children.
//!
//! Nodes are `Rc<Node>`: the `Rc` only keeps memory alive (in-flight
//! futures may hold one); whether a node is open is decided by its refcount
//! and the registry's all-nodes list alone.

use alloc::boxed::Box;
use alloc::rc::{Rc, Weak};
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use serde_json::{Map, Value};

use crate::dirty_bitmap::NamedBitmap;
use crate::driver::BlockDriver;
use crate::exec::WaitQueue;
use crate::graph::child::{Child, Parent, detach_child};
use crate::graph::permission::Perm;
use crate::graph::registry::{ClosedNode, FlushOutcome, Registry};
use crate::io::{BlockStatus, BoxFuture, IoError, IoResult, ReqFlags};

/// Largest buffer the write-zeroes fallback writes at once.
const ZERO_CHUNK: u64 = 1 << 20;

/// `detect-zeroes` (QEMU: `BlockdevDetectZeroesOptions`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Writes are written as they are.
    #[default]
    Off,
    /// All-zero writes become write-zeroes.
    On,
    /// All-zero writes become write-zeroes that may unmap (with `discard=unmap`).
    Unmap,
}

impl DetectZeroes {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        }
    }
}

/// Options every node has (QEMU: the `BlockdevOptions` base and open flags).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeOptions {
    /// `read-only`: writes fail with EPERM and writers cannot attach.
    pub read_only: bool,
    /// `discard`: `true` for `unmap`, `false` for `ignore` (the default).
    pub discard_unmap: bool,
    /// `detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
    /// `cache.direct`.
    pub cache_direct: bool,
    /// `cache.no-flush`: flushes stop at this node.
    pub cache_no_flush: bool,
    /// `force-share` (read-only nodes only): parents share every
    /// permission on this node.
    pub force_share: bool,
}

/// Lifecycle of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Usable.
    Open,
    /// Refcount reached zero; draining, flushing, dropping children.
    Closing,
    /// Closed and removed from the registry.
    Closed,
}

/// One node of the graph.
pub struct Node {
    id: u64,
    name: String,
    implicit_name: bool,
    driver: Box<dyn BlockDriver>,
    opts: NodeOptions,
    open_options: Map<String, Value>,
    children: RefCell<Vec<Rc<Child>>>,
    parents: RefCell<Vec<Weak<Child>>>,
    refcnt: Cell<u32>,
    in_flight: Cell<u32>,
    idle: WaitQueue,
    write_gen: Cell<u64>,
    write_notifiers: RefCell<Vec<(u64, WriteNotifier)>>,
    next_write_notifier: Cell<u64>,
    flushed_gen: Cell<u64>,
    wr_highest_offset: Cell<u64>,
    state: Cell<NodeState>,
    registry: Weak<Registry>,
    bitmaps: RefCell<Vec<NamedBitmap>>,
}

/// Told the range of every write-like request that completed on a node,
/// whichever parent sent it (QEMU: the dirty bitmaps that
/// `bdrv_co_write_req_finish` marks; a mirror tracks its source with one).
pub type WriteNotifier = Rc<dyn Fn(u64, u64)>;

/// Counts a request as in flight while alive (QEMU: `bdrv_inc_in_flight`).
struct InFlight<'a>(&'a Node);

impl<'a> InFlight<'a> {
    fn begin(node: &'a Node) -> IoResult<InFlight<'a>> {
        if node.state.get() == NodeState::Closed {
            log::error!("request on closed node '{}'", node.name);
            return Err(IoError::Eio);
        }
        node.in_flight.set(node.in_flight.get() + 1);
        Ok(InFlight(node))
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let n = self.0.in_flight.get().saturating_sub(1);
        self.0.in_flight.set(n);
        if n == 0 {
            self.0.idle.wake_all();
        }
    }
}

impl Node {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u64,
        name: String,
        implicit_name: bool,
        driver: Box<dyn BlockDriver>,
        opts: NodeOptions,
        open_options: Map<String, Value>,
        registry: Weak<Registry>,
    ) -> Node {
        crate::trace!(
            bdrv_open_common,
            "bs {} format_name \"{}\" read_only {}",
            name,
            driver.format_name(),
            opts.read_only
        );
        Node {
            id,
            name,
            implicit_name,
            driver,
            opts,
            open_options,
            children: RefCell::new(Vec::new()),
            parents: RefCell::new(Vec::new()),
            refcnt: Cell::new(1),
            in_flight: Cell::new(0),
            idle: WaitQueue::new(),
            write_gen: Cell::new(0),
            write_notifiers: RefCell::new(Vec::new()),
            wr_highest_offset: Cell::new(0),
            next_write_notifier: Cell::new(0),
            flushed_gen: Cell::new(0),
            state: Cell::new(NodeState::Open),
            registry,
            bitmaps: RefCell::new(Vec::new()),
        }
    }

    /// A number unique among all nodes ever opened in this registry.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The node-name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the name was generated (`#blockNNN`).
    pub fn has_implicit_name(&self) -> bool {
        self.implicit_name
    }

    /// The driver instance.
    pub fn driver(&self) -> &dyn BlockDriver {
        &*self.driver
    }

    /// The driver's name.
    pub fn driver_name(&self) -> &str {
        self.driver.format_name()
    }

    /// The common options.
    pub fn options(&self) -> &NodeOptions {
        &self.opts
    }

    /// The options the node was opened with (as `blockdev-add` gave them,
    /// with children by node-name).
    pub fn open_options(&self) -> &Map<String, Value> {
        &self.open_options
    }

    /// Whether the node is read-only.
    pub fn read_only(&self) -> bool {
        self.opts.read_only
    }

    /// The refcount.
    pub fn refcnt(&self) -> u32 {
        self.refcnt.get()
    }

    /// Requests currently in flight on this node.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.get()
    }

    /// Lifecycle state.
    pub fn state(&self) -> NodeState {
        self.state.get()
    }

    /// The registry the node belongs to.
    pub fn registry(&self) -> Option<Rc<Registry>> {
        self.registry.upgrade()
    }

    /// Takes a reference (QEMU: `bdrv_ref`). Release it with [`unref`].
    pub fn ref_(&self) {
        debug_assert_eq!(self.state.get(), NodeState::Open);
        self.refcnt.set(self.refcnt.get() + 1);
    }

    /// Drops a reference that cannot be the last one (undoing a
    /// [`ref_`](Self::ref_) whose purpose failed). Returns `false`, and
    /// keeps the reference, if it was the last.
    pub(crate) fn unref_nonfinal(&self) -> bool {
        let n = self.refcnt.get();
        if n > 1 {
            self.refcnt.set(n - 1);
            true
        } else {
            false
        }
    }

    /// The child edges, oldest first.
    pub fn children(&self) -> Vec<Rc<Child>> {
        self.children.borrow().clone()
    }

    /// The child edge called `name`.
    pub fn child(&self, name: &str) -> Option<Rc<Child>> {
        self.children
            .borrow()
            .iter()
            .find(|c| c.name() == name)
            .cloned()
    }

    /// The primary child (`file`, `image`, …; QEMU: `bdrv_primary_child`).
    pub fn file(&self) -> Option<Rc<Child>> {
        self.children
            .borrow()
            .iter()
            .find(|c| {
                c.role()
                    .contains(crate::graph::permission::ChildRole::PRIMARY)
            })
            .cloned()
    }

    /// The parent edges, newest first (QEMU's `bs->parents` order).
    pub fn parents(&self) -> Vec<Rc<Child>> {
        self.parents
            .borrow()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Whether a backend's root edge points here (QEMU: `bdrv_has_blk`).
    pub fn has_backend(&self) -> bool {
        self.parents()
            .iter()
            .any(|p| matches!(p.parent(), Parent::Backend(_)))
    }

    /// Union of the parents' `perm` and intersection of their `shared`.
    pub fn cumulative_perms(&self) -> (Perm, Perm) {
        let mut perm = Perm::NONE;
        let mut shared = Perm::ALL;
        for p in self.parents() {
            perm |= p.perm();
            shared = shared.and(p.shared());
        }
        (perm, shared)
    }

    pub(crate) fn push_child(&self, c: Rc<Child>) {
        self.children.borrow_mut().push(c);
    }

    pub(crate) fn remove_child(&self, c: &Rc<Child>) {
        self.children.borrow_mut().retain(|x| !Rc::ptr_eq(x, c));
    }

    pub(crate) fn add_parent(&self, c: &Rc<Child>) {
        self.parents.borrow_mut().insert(0, Rc::downgrade(c));
    }

    pub(crate) fn remove_parent(&self, c: &Rc<Child>) {
        let w = Rc::downgrade(c);
        self.parents
            .borrow_mut()
            .retain(|x| !x.ptr_eq(&w) && x.strong_count() > 0);
    }

    /// The node's filename (QEMU: `bs->filename`): the protocol's own, else
    /// the primary child's for filters and plain formats, else
    /// `json:{…}` from the open options.
    pub fn filename(&self) -> String {
        if let Some(f) = self.driver.filename(self) {
            return f;
        }
        let plain = self.children.borrow().len() == 1
            && self
                .open_options
                .keys()
                .all(|k| matches!(k.as_str(), "driver" | "node-name" | "file" | "image"));
        if plain && let Some(c) = self.file() {
            return c.node().filename();
        }
        let mut m = self.open_options.clone();
        m.remove("node-name");
        let mut s = String::from("json:");
        s.push_str(&Value::Object(m).to_string());
        s
    }

    // ---- the generic request path (QEMU: block/io.c) ----

    /// The length in bytes.
    pub fn get_length(&self) -> IoResult<u64> {
        self.driver.get_length(self)
    }

    /// The alignment requests are best made in (QEMU:
    /// `bl.request_alignment`; see [`BlockDriver::request_alignment`]).
    pub fn request_alignment(&self) -> u64 {
        self.driver.request_alignment(self).max(1)
    }

    /// Reads `len` bytes at `offset`; bytes past the end read as zeroes.
    pub async fn read(&self, offset: u64, len: usize, flags: ReqFlags) -> IoResult<Vec<u8>> {
        let _g = InFlight::begin(self)?;
        let length = self.driver.get_length(self)?;
        if offset >= length || len == 0 {
            return Ok(vec![0; len]);
        }
        let n = core::cmp::min(len as u64, length - offset) as usize;
        let mut data = self.driver.read(self, offset, n, flags).await?;
        if data.len() != n {
            log::error!(
                "driver {} returned {} bytes for a {n}-byte read",
                self.driver_name(),
                data.len()
            );
            return Err(IoError::Eio);
        }
        data.resize(len, 0);
        Ok(data)
    }

    /// Registers `f` to hear of every completed write, write-zeroes and
    /// discard on this node; returns an id for
    /// [`remove_write_notifier`](Self::remove_write_notifier).
    pub fn add_write_notifier(&self, f: WriteNotifier) -> u64 {
        let id = self.next_write_notifier.get();
        self.next_write_notifier.set(id + 1);
        self.write_notifiers.borrow_mut().push((id, f));
        id
    }

    /// Unregisters a write notifier.
    pub fn remove_write_notifier(&self, id: u64) {
        self.write_notifiers.borrow_mut().retain(|(i, _)| *i != id);
    }

    /// The end of the furthest write-like request so far (QEMU:
    /// `bs->wr_highest_offset`, what `query-blockstats` reports).
    pub fn wr_highest_offset(&self) -> u64 {
        self.wr_highest_offset.get()
    }

    /// The node's named dirty bitmaps (see [`crate::dirty_bitmap`]).
    pub fn dirty_bitmaps(&self) -> core::cell::Ref<'_, Vec<NamedBitmap>> {
        self.bitmaps.borrow()
    }

    /// The node's named dirty bitmaps, to change (never held across an
    /// await: every write marks them).
    pub fn dirty_bitmaps_mut(&self) -> core::cell::RefMut<'_, Vec<NamedBitmap>> {
        self.bitmaps.borrow_mut()
    }

    fn notify_write(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        if end > self.wr_highest_offset.get() {
            self.wr_highest_offset.set(end);
        }
        // QEMU's `bdrv_set_dirty`: whether or not the request succeeded.
        for b in self.bitmaps.borrow_mut().iter_mut() {
            b.record(offset, len);
        }
        let list: Vec<WriteNotifier> = self
            .write_notifiers
            .borrow()
            .iter()
            .map(|(_, f)| f.clone())
            .collect();
        for f in list {
            f(offset, len);
        }
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: Vec<u8>, flags: ReqFlags) -> IoResult<()> {
        let _g = InFlight::begin(self)?;
        if self.opts.read_only {
            return Err(IoError::Eperm);
        }
        if self.opts.detect_zeroes != DetectZeroes::Off
            && !data.is_empty()
            && data.iter().all(|b| *b == 0)
        {
            let mut zflags = flags;
            if self.opts.detect_zeroes == DetectZeroes::Unmap {
                zflags = zflags | ReqFlags::MAY_UNMAP;
            }
            return self
                .do_write_zeroes(offset, data.len() as u64, zflags)
                .await;
        }
        let emulate_fua = flags.contains(ReqFlags::FUA)
            && !self.driver.supported_write_flags().contains(ReqFlags::FUA);
        let dflags = if emulate_fua {
            flags.without(ReqFlags::FUA)
        } else {
            flags
        };
        let len = data.len() as u64;
        let r = self.driver.write(self, offset, data, dflags).await;
        self.write_gen.set(self.write_gen.get() + 1);
        self.notify_write(offset, len);
        r?;
        if emulate_fua {
            self.do_flush().await?;
        }
        Ok(())
    }

    /// Writes zeroes over `len` bytes at `offset`; `MAY_UNMAP` is honoured
    /// only with `discard=unmap`.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoResult<()> {
        let _g = InFlight::begin(self)?;
        if self.opts.read_only {
            return Err(IoError::Eperm);
        }
        self.do_write_zeroes(offset, len, flags).await
    }

    async fn do_write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoResult<()> {
        let flags = if self.opts.discard_unmap {
            flags
        } else {
            flags.without(ReqFlags::MAY_UNMAP)
        };
        let emulate_fua = flags.contains(ReqFlags::FUA)
            && !self.driver.supported_write_flags().contains(ReqFlags::FUA);
        let dflags = if emulate_fua {
            flags.without(ReqFlags::FUA)
        } else {
            flags
        };
        let r = match self.driver.write_zeroes(self, offset, len, dflags).await {
            Err(IoError::Enotsup) if !flags.contains(ReqFlags::NO_FALLBACK) => {
                let mut done = 0;
                let mut r = Ok(());
                while done < len {
                    let n = core::cmp::min(ZERO_CHUNK, len - done);
                    let buf = vec![0u8; n as usize];
                    r = self
                        .driver
                        .write(
                            self,
                            offset + done,
                            buf,
                            dflags.without(ReqFlags::MAY_UNMAP),
                        )
                        .await;
                    if r.is_err() {
                        break;
                    }
                    done += n;
                }
                r
            }
            r => r,
        };
        self.write_gen.set(self.write_gen.get() + 1);
        self.notify_write(offset, len);
        r?;
        if emulate_fua {
            self.do_flush().await?;
        }
        Ok(())
    }

    /// Discards a range; a no-op unless the node was opened with
    /// `discard=unmap`, and drivers that cannot discard are not an error.
    pub async fn discard(&self, offset: u64, len: u64) -> IoResult<()> {
        let _g = InFlight::begin(self)?;
        if self.opts.read_only {
            return Err(IoError::Eperm);
        }
        if !self.opts.discard_unmap {
            return Ok(());
        }
        let r = self.driver.discard(self, offset, len).await;
        self.write_gen.set(self.write_gen.get() + 1);
        self.notify_write(offset, len);
        match r {
            Err(IoError::Enotsup) => Ok(()),
            r => r,
        }
    }

    /// Makes everything written so far durable: this node's driver (if it
    /// was written since the last flush and `cache.no-flush` is off), then
    /// every child this node may write to.
    pub async fn flush(&self) -> IoResult<()> {
        let _g = InFlight::begin(self)?;
        self.do_flush().await
    }

    fn do_flush(&self) -> BoxFuture<'_, IoResult<()>> {
        Box::pin(async move {
            let generation = self.write_gen.get();
            let mut ret = Ok(());
            if !self.opts.cache_no_flush && self.flushed_gen.get() != generation {
                ret = self.driver.flush(self).await;
                if ret.is_ok() {
                    self.flushed_gen.set(generation);
                }
            }
            if !self.driver.flushes_children() {
                for c in self.children() {
                    if c.perm().intersects(Perm::WRITE | Perm::WRITE_UNCHANGED) {
                        let r = c.flush().await;
                        if ret.is_ok() {
                            ret = r;
                        }
                    }
                }
            }
            ret
        })
    }

    /// Whether something was written since the last successful flush.
    pub fn is_dirty(&self) -> bool {
        self.write_gen.get() != self.flushed_gen.get()
    }

    /// The status of the extent at `offset`, at most `len` bytes and never
    /// past the end (an empty extent at the end).
    pub async fn block_status(&self, offset: u64, len: u64) -> IoResult<BlockStatus> {
        let _g = InFlight::begin(self)?;
        let length = self.driver.get_length(self)?;
        if offset >= length || len == 0 {
            return Ok(BlockStatus {
                data: false,
                zero: false,
                allocated: false,
                len: 0,
            });
        }
        let len = core::cmp::min(len, length - offset);
        let mut st = self.driver.block_status(self, offset, len).await?;
        st.len = st.len.clamp(1, len);
        Ok(st)
    }

    /// Changes the length.
    pub async fn truncate(&self, size: u64) -> IoResult<()> {
        let _g = InFlight::begin(self)?;
        if self.opts.read_only {
            return Err(IoError::Eperm);
        }
        self.driver.truncate(self, size).await?;
        for b in self.bitmaps.borrow_mut().iter_mut() {
            b.bitmap = b.bitmap.resized(size);
            if let Some(s) = &mut b.successor {
                *s = s.resized(size);
            }
        }
        Ok(())
    }

    /// Waits until no request is in flight on this node (QEMU:
    /// `bdrv_drain`; nodes have no request queue of their own, their
    /// parents stop sending: see [`crate::graph::backend::Drained`]).
    pub async fn drain(&self) {
        crate::trace!(
            bdrv_drain_begin,
            "bs {} in_flight {}",
            self.name,
            self.in_flight.get()
        );
        self.idle.wait_until(|| self.in_flight.get() == 0).await;
        crate::trace!(bdrv_drain_end, "bs {}", self.name);
    }
}

/// Drops a reference; at zero the node is closed (QEMU: `bdrv_unref` →
/// `bdrv_delete` → `bdrv_close`). The future completes when the node and
/// every node closed because of it are closed.
pub fn unref(node: Rc<Node>) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let n = node.refcnt.get();
        if n == 0 {
            log::error!("unref of node '{}' with refcount 0", node.name);
            return;
        }
        node.refcnt.set(n - 1);
        if n == 1 {
            close(node).await;
        }
    })
}

async fn close(node: Rc<Node>) {
    crate::trace!(
        bdrv_close,
        "bs {} format_name \"{}\"",
        node.name,
        node.driver_name()
    );
    node.state.set(NodeState::Closing);
    let registry = node.registry.upgrade();
    node.drain().await;
    // QEMU's `bdrv_inactivate`: what the driver keeps in memory and stores
    // at the end (qcow2's persistent bitmaps) goes out before the final
    // flush. A failure is logged by the driver and fails nothing else.
    let _ = node.driver.inactivate(&node).await;
    let was_dirty = node.is_dirty();
    let flush = match node.flush().await {
        Ok(()) if was_dirty => FlushOutcome::Flushed,
        Ok(()) => FlushOutcome::Clean,
        Err(e) => FlushOutcome::Failed(e),
    };
    node.driver.close(&node);
    if let Some(r) = &registry {
        r.record_closed(ClosedNode {
            name: node.name.clone(),
            driver: node.driver_name().to_string(),
            flush,
        });
    }
    // Newest child first, as QEMU's list order. Each edge leaves both ends
    // before its reference is dropped, so nothing can reach a child that is
    // being closed through this node.
    loop {
        let last = node.children.borrow().last().cloned();
        let Some(c) = last else { break };
        detach_child(&c);
        unref(c.node().clone()).await;
    }
    node.state.set(NodeState::Closed);
    if let Some(r) = &registry {
        r.forget_node(&node);
    }
}

impl core::fmt::Debug for Node {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver_name())
            .field("refcnt", &self.refcnt.get())
            .field("state", &self.state.get())
            .finish()
    }
}
