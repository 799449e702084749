//! Backends: where users attach to the graph (QEMU: `BlockBackend`).
//!
//! An export, a job or qemu-io uses the graph through a backend. A backend
//! is named (QEMU's monitor-owned BBs: `query-block` lists them and the
//! medium commands address them) or anonymous, and has an optional `root`
//! edge with the permissions its user needs. Without a root every request
//! fails with ENOMEDIUM ("No medium found"); nothing crashes.
//!
//! *Ejecting* ([`Backend::remove`], QEMU `blk_remove_bs`): fire the remove
//! notifiers (an NBD export on this backend shuts itself down), drain the
//! backend's requests, detach the root edge and drop its reference — which
//! may close the whole tree below.
//!
//! *Draining*: a backend stops sending and waits for its requests in
//! flight ([`Backend::drained_begin`], QEMU `blk_drain_begin`); a drained
//! section on a node ([`Drained`], QEMU `bdrv_drained_begin`) does that for
//! every backend whose tree contains the node, then waits for the node.

use alloc::format;
use alloc::rc::{Rc, Weak};
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::fmt;

use serde_json::json;

use crate::exec::WaitQueue;
use crate::graph::child::{Child, attach_backend_root, detach_child, set_child_perm};
use crate::graph::node::{Node, unref};
use crate::graph::permission::{Perm, PermError};
use crate::graph::registry::{Registry, id_wellformed};
use crate::io::{BlockStatus, IoError, IoResult, ReqFlags};
use crate::stats::{AcctType, BlockAcctStats};

/// A callback fired on insert or remove.
pub type Notifier = Rc<dyn Fn(&Rc<Backend>)>;

/// Why a backend operation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// The name is not a well-formed id.
    InvalidName,
    /// A backend has this name.
    Duplicate(String),
    /// A node has this name.
    ConflictsWithNode(String),
    /// `insert` on a backend that has a root.
    HasMedium(String),
    /// The root edge's permissions.
    Perm(PermError),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::InvalidName => f.write_str("Invalid device name"),
            BackendError::Duplicate(n) => write!(f, "Device with id '{n}' already exists"),
            BackendError::ConflictsWithNode(n) => {
                write!(f, "Device name '{n}' conflicts with an existing node name")
            }
            BackendError::HasMedium(n) => write!(f, "There already is a medium in device '{n}'"),
            BackendError::Perm(e) => e.fmt(f),
        }
    }
}

impl From<PermError> for BackendError {
    fn from(e: PermError) -> Self {
        BackendError::Perm(e)
    }
}

/// How a backend is created.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// The name; `None` for an anonymous backend.
    pub name: Option<String>,
    /// For anonymous backends: how permission errors name the user
    /// (`"mirror job 'm0'"`); default `"an unnamed block device"`.
    pub user: Option<String>,
    /// Model removable media with a tray (QEMU: a device with
    /// `is_tray_open`); `blockdev-open-tray` is a no-op without one.
    pub tray: bool,
    /// Requests bypass quiescing (QEMU: `blk_set_disable_request_queuing`),
    /// as a job's own backends do so that it can finish while drained.
    pub disable_request_queuing: bool,
    /// The id of the device-like user (an NBD export; QEMU: the attached
    /// device, `qdev`): `query-blockstats` lists such a backend, and its
    /// failed requests raise `BLOCK_IO_ERROR`.
    pub device: Option<String>,
}

/// One backend.
pub struct Backend {
    id: u64,
    name: Option<String>,
    user: Option<String>,
    root: RefCell<Option<Rc<Child>>>,
    perm: Cell<Perm>,
    shared: Cell<Perm>,
    in_flight: Cell<u32>,
    idle: WaitQueue,
    quiesce: Cell<u32>,
    resume: WaitQueue,
    disable_request_queuing: bool,
    tray: Option<Cell<bool>>,
    device: Option<String>,
    stats: BlockAcctStats,
    notifiers: RefCell<Vec<(u64, bool, Notifier)>>,
    next_notifier: Cell<u64>,
    registry: Weak<Registry>,
}

struct InFlight<'a>(&'a Backend);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let n = self.0.in_flight.get().saturating_sub(1);
        self.0.in_flight.set(n);
        if n == 0 {
            self.0.idle.wake_all();
        }
    }
}

impl Registry {
    /// Creates a backend with `perm`/`shared` for its future root (QEMU:
    /// `blk_new` + `monitor_add_blk` for a named one).
    pub fn new_backend(
        self: &Rc<Self>,
        opts: BackendOptions,
        perm: Perm,
        shared: Perm,
    ) -> Result<Rc<Backend>, BackendError> {
        if let Some(name) = &opts.name {
            if !id_wellformed(name) {
                return Err(BackendError::InvalidName);
            }
            if self.find_backend(name).is_some() {
                return Err(BackendError::Duplicate(name.clone()));
            }
            if self.find_node(name).is_some() {
                return Err(BackendError::ConflictsWithNode(name.clone()));
            }
        }
        let b = Rc::new(Backend {
            id: self.next_id(),
            name: opts.name,
            user: opts.user,
            root: RefCell::new(None),
            perm: Cell::new(perm),
            shared: Cell::new(shared),
            in_flight: Cell::new(0),
            idle: WaitQueue::new(),
            quiesce: Cell::new(0),
            resume: WaitQueue::new(),
            disable_request_queuing: opts.disable_request_queuing,
            tray: opts.tray.then(|| Cell::new(false)),
            device: opts.device,
            stats: BlockAcctStats::default(),
            notifiers: RefCell::new(Vec::new()),
            next_notifier: Cell::new(0),
            registry: Rc::downgrade(self),
        });
        self.add_backend(b.clone());
        Ok(b)
    }
}

impl Backend {
    /// A number unique in the registry.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The name, for a named backend.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// How permission errors name this backend's user (QEMU:
    /// `blk_root_get_parent_desc`).
    pub fn user_desc(&self) -> String {
        match (&self.name, &self.user) {
            (Some(n), _) => format!("block device '{n}'"),
            (None, Some(u)) => u.clone(),
            (None, None) => String::from("an unnamed block device"),
        }
    }

    /// The user description given at creation, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The device-like user's id (see [`BackendOptions::device`]).
    pub fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// The I/O statistics of the requests sent through this backend.
    pub fn stats(&self) -> &BlockAcctStats {
        &self.stats
    }

    /// The root edge.
    pub fn root(&self) -> Option<Rc<Child>> {
        self.root.borrow().clone()
    }

    /// The root node (QEMU: `blk_bs`).
    pub fn root_node(&self) -> Option<Rc<Node>> {
        self.root.borrow().as_ref().map(|c| c.node().clone())
    }

    /// The permissions this backend asks of its root.
    pub fn perm(&self) -> (Perm, Perm) {
        (self.perm.get(), self.shared.get())
    }

    /// Requests in flight through this backend.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.get()
    }

    /// Whether the backend models a tray.
    pub fn has_tray(&self) -> bool {
        self.tray.is_some()
    }

    /// Whether its tray is open (always `false` without a tray).
    pub fn is_tray_open(&self) -> bool {
        self.tray.as_ref().is_some_and(Cell::get)
    }

    /// Opens or closes the tray, emitting `DEVICE_TRAY_MOVED` when it
    /// moves (QEMU: the device's `change_media_cb`). No-op without a tray.
    pub fn set_tray_open(&self, open: bool) {
        if let Some(t) = &self.tray
            && t.get() != open
        {
            t.set(open);
            if let Some(r) = self.registry.upgrade() {
                r.emit(
                    "DEVICE_TRAY_MOVED",
                    json!({"device": self.name.as_deref().unwrap_or(""), "id": "", "tray-open": open}),
                );
            }
        }
    }

    /// Whether requests can reach a node (QEMU: `blk_is_available`).
    pub fn is_available(&self) -> bool {
        self.root.borrow().is_some() && !self.is_tray_open()
    }

    /// Changes the permissions asked of the root (QEMU: `blk_set_perm`);
    /// nothing changes if the graph refuses.
    pub fn set_perm(&self, perm: Perm, shared: Perm) -> Result<(), PermError> {
        if let Some(root) = self.root() {
            set_child_perm(&root, perm, shared)?;
        }
        self.perm.set(perm);
        self.shared.set(shared);
        Ok(())
    }

    /// Registers a callback fired when the root is removed (QEMU:
    /// `blk_add_remove_bs_notifier`); returns an id for
    /// [`remove_notifier`](Self::remove_notifier).
    pub fn add_remove_notifier(&self, f: Notifier) -> u64 {
        self.add_notifier(false, f)
    }

    /// Registers a callback fired when a root is inserted (QEMU:
    /// `blk_add_insert_bs_notifier`).
    pub fn add_insert_notifier(&self, f: Notifier) -> u64 {
        self.add_notifier(true, f)
    }

    fn add_notifier(&self, insert: bool, f: Notifier) -> u64 {
        let id = self.next_notifier.get();
        self.next_notifier.set(id + 1);
        self.notifiers.borrow_mut().push((id, insert, f));
        id
    }

    /// Unregisters a notifier.
    pub fn remove_notifier(&self, id: u64) {
        self.notifiers.borrow_mut().retain(|(i, _, _)| *i != id);
    }

    fn notify(self: &Rc<Self>, insert: bool) {
        let list: Vec<Notifier> = self
            .notifiers
            .borrow()
            .iter()
            .filter(|(_, i, _)| *i == insert)
            .map(|(_, _, f)| f.clone())
            .collect();
        for f in list {
            f(self);
        }
    }

    /// Attaches `node` as the root (QEMU: `blk_insert_bs`): takes a
    /// reference on it, checks permissions, fires the insert notifiers.
    pub fn insert(self: &Rc<Self>, node: &Rc<Node>) -> Result<(), BackendError> {
        if self.root.borrow().is_some() {
            return Err(BackendError::HasMedium(
                self.name.clone().unwrap_or_default(),
            ));
        }
        node.ref_();
        match attach_backend_root(self, node, self.perm.get(), self.shared.get()) {
            Ok(edge) => {
                *self.root.borrow_mut() = Some(edge);
                self.notify(true);
                Ok(())
            }
            Err(e) => {
                node.unref_nonfinal();
                Err(e.into())
            }
        }
    }

    /// Re-points the root to a new edge without ejecting (QEMU:
    /// `bdrv_replace_child_noperm` on a BlockBackend's root, as
    /// `bdrv_replace_node` does when a mirror pivots): no notifier fires and
    /// the user never sees ENOMEDIUM. The caller attached `edge` (see
    /// [`crate::graph::child::attach_backend_root`]) and detaches the returned old
    /// edge, dropping its reference.
    pub(crate) fn swap_root(&self, edge: Rc<Child>) -> Option<Rc<Child>> {
        self.root.borrow_mut().replace(edge)
    }

    /// Ejects the root (QEMU: `blk_remove_bs`): remove notifiers, drain,
    /// detach, drop the reference (which may close the tree). Returns
    /// whether there was a root.
    pub async fn remove(self: &Rc<Self>) -> bool {
        if self.root.borrow().is_none() {
            return false;
        }
        self.notify(false);
        self.drained_begin().await;
        let root = self.root.borrow_mut().take();
        if let Some(root) = &root {
            detach_child(root);
            unref(root.node().clone()).await;
        }
        self.drained_end();
        root.is_some()
    }

    /// Ejects the root and forgets the backend (QEMU: `blk_unref` of the
    /// last reference → `blk_delete`).
    pub async fn delete(self: &Rc<Self>) {
        self.remove().await;
        if let Some(r) = self.registry.upgrade() {
            r.forget_backend(self);
        }
    }

    /// Stops new requests (they wait) and waits for those in flight (QEMU:
    /// `blk_drain_begin` / the BB side of `bdrv_drained_begin`).
    pub async fn drained_begin(&self) {
        self.quiesce.set(self.quiesce.get() + 1);
        self.idle.wait_until(|| self.in_flight.get() == 0).await;
    }

    /// Lets waiting requests go on.
    pub fn drained_end(&self) {
        let q = self.quiesce.get().saturating_sub(1);
        self.quiesce.set(q);
        if q == 0 {
            self.resume.wake_all();
        }
    }

    /// Waits until no request is in flight (QEMU: `blk_drain`).
    pub async fn drain(&self) {
        self.drained_begin().await;
        self.drained_end();
    }

    async fn enter(&self) -> IoResult<(InFlight<'_>, Rc<Child>)> {
        if !self.disable_request_queuing {
            self.resume.wait_until(|| self.quiesce.get() == 0).await;
        }
        if self.is_tray_open() {
            return Err(IoError::Enomedium);
        }
        let root = self.root().ok_or(IoError::Enomedium)?;
        self.in_flight.set(self.in_flight.get() + 1);
        Ok((InFlight(self), root))
    }

    fn in_range(root: &Child, offset: u64, len: u64) -> IoResult<bool> {
        let length = root.node().get_length()?;
        Ok(offset <= length && length - offset >= len)
    }

    fn need(&self, p: Perm) -> IoResult<()> {
        if self.perm.get().contains(p) {
            Ok(())
        } else {
            Err(IoError::Eperm)
        }
    }

    fn now_ns(&self) -> u64 {
        self.registry.upgrade().map_or(0, |r| r.clock().now_ns())
    }

    /// Runs one accounted request (QEMU: a device's `block_acct_start`,
    /// the request, then `block_acct_done`/`_failed`/`_invalid`): waits
    /// for the backend, checks the range (`Some((offset, len))`; outside
    /// it the request is invalid: EIO, counted, no event) and the
    /// permission, runs `op` on the root; a failure is counted and, on a
    /// backend a user can name, raises `BLOCK_IO_ERROR`.
    async fn accounted<T, F: core::future::Future<Output = IoResult<T>>>(
        &self,
        kind: AcctType,
        bytes: u64,
        range: Option<(u64, u64)>,
        need: Perm,
        op: impl FnOnce(Rc<Child>) -> F,
    ) -> IoResult<T> {
        let start = self.now_ns();
        let result = async {
            let (guard, root) = self.enter().await?;
            if let Some((offset, len)) = range
                && !Self::in_range(&root, offset, len)?
            {
                return Ok(Err(guard));
            }
            self.need(need)?;
            let r = op(root).await;
            drop(guard);
            r.map(Ok)
        }
        .await;
        let now = self.now_ns();
        match result {
            Ok(Ok(v)) => {
                self.stats.done(kind, bytes, true, start, now);
                Ok(v)
            }
            Ok(Err(_guard)) => {
                self.stats.invalid(kind, now);
                Err(IoError::Eio)
            }
            Err(e) => {
                self.stats.done(kind, bytes, false, start, now);
                self.report_error(kind, e);
                Err(e)
            }
        }
    }

    /// `BLOCK_IO_ERROR` (QEMU: `send_qmp_error_event`), on a backend a
    /// user can name; blockhaus's error action is always `report`.
    fn report_error(&self, kind: AcctType, e: IoError) {
        if self.name.is_none() && self.device.is_none() {
            return;
        }
        let Some(reg) = self.registry.upgrade() else {
            return;
        };
        let mut data = serde_json::Map::new();
        data.insert("device".into(), json!(self.name.as_deref().unwrap_or("")));
        if let Some(root) = self.root_node() {
            data.insert("node-name".into(), json!(root.name()));
        }
        let op = if kind == AcctType::Read {
            "read"
        } else {
            "write"
        };
        data.insert("operation".into(), json!(op));
        data.insert("action".into(), json!("report"));
        data.insert("nospace".into(), json!(e == IoError::Enospc));
        data.insert("reason".into(), json!(e.strerror()));
        reg.emit("BLOCK_IO_ERROR", serde_json::Value::Object(data));
    }

    /// The root's length (QEMU: `blk_getlength`).
    pub fn get_length(&self) -> IoResult<u64> {
        if !self.is_available() {
            return Err(IoError::Enomedium);
        }
        self.root().ok_or(IoError::Enomedium)?.node().get_length()
    }

    /// Reads `len` bytes at `offset`; EIO past the end.
    pub async fn read(&self, offset: u64, len: usize) -> IoResult<Vec<u8>> {
        let bytes = len as u64;
        self.accounted(
            AcctType::Read,
            bytes,
            Some((offset, bytes)),
            Perm::NONE,
            |root| async move { root.read(offset, len, ReqFlags::NONE).await },
        )
        .await
    }

    /// Writes `data` at `offset` (`FUA` in `flags` for a durable write).
    pub async fn write(&self, offset: u64, data: Vec<u8>, flags: ReqFlags) -> IoResult<()> {
        let bytes = data.len() as u64;
        self.accounted(
            AcctType::Write,
            bytes,
            Some((offset, bytes)),
            Perm::WRITE,
            |root| async move { root.write(offset, data, flags).await },
        )
        .await
    }

    /// Writes zeroes (`MAY_UNMAP` allows deallocation); counted as a write
    /// of `len` bytes, as QEMU's devices count it.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoResult<()> {
        self.accounted(
            AcctType::Write,
            len,
            Some((offset, len)),
            Perm::WRITE,
            |root| async move { root.write_zeroes(offset, len, flags).await },
        )
        .await
    }

    /// Discards a range.
    pub async fn discard(&self, offset: u64, len: u64) -> IoResult<()> {
        self.accounted(
            AcctType::Unmap,
            len,
            Some((offset, len)),
            Perm::WRITE,
            |root| async move { root.discard(offset, len).await },
        )
        .await
    }

    /// Flushes the tree.
    pub async fn flush(&self) -> IoResult<()> {
        self.accounted(AcctType::Flush, 0, None, Perm::NONE, |root| async move {
            root.flush().await
        })
        .await
    }

    /// The status of the extent at `offset`.
    pub async fn block_status(&self, offset: u64, len: u64) -> IoResult<BlockStatus> {
        let (_g, root) = self.enter().await?;
        root.block_status(offset, len).await
    }

    /// Resizes the root (needs RESIZE).
    pub async fn truncate(&self, size: u64) -> IoResult<()> {
        let (_g, root) = self.enter().await?;
        self.need(Perm::RESIZE)?;
        root.truncate(size).await
    }
}

/// A drained section on a node (QEMU: `bdrv_drained_begin`/`_end`): the
/// backends whose tree contains the node stop sending new requests, and
/// the node's requests in flight complete. Call [`Drained::end`] when done.
pub struct Drained {
    quiesced: Vec<Rc<Backend>>,
}

impl Drained {
    /// Begins the section and waits until `node` is idle.
    pub async fn begin(node: &Rc<Node>) -> Drained {
        let mut quiesced = Vec::new();
        if let Some(reg) = node.registry() {
            for b in reg.backends() {
                if b.root_node().is_some_and(|r| reaches(&r, node)) {
                    b.drained_begin().await;
                    quiesced.push(b);
                }
            }
        }
        node.drain().await;
        Drained { quiesced }
    }

    /// Ends the section: queued requests go on.
    pub fn end(self) {
        for b in self.quiesced {
            b.drained_end();
        }
    }
}

fn reaches(from: &Rc<Node>, to: &Rc<Node>) -> bool {
    Rc::ptr_eq(from, to) || from.children().iter().any(|c| reaches(c.node(), to))
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("root", &self.root_node().map(|n| String::from(n.name())))
            .finish()
    }
}
