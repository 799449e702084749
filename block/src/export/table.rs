//! The export table (QEMU: the `block_exports` list of `BlockExport`s,
//! each an `NBDExport`).
//!
//! An export owns an anonymous backend on its node that asks
//! CONSISTENT_READ (+WRITE when writable) and shares everything but
//! RESIZE, so `block_resize` on an exported node fails with QEMU's
//! permission message. Deleting an export is a request: it stops being
//! offered at once (`shutting-down` in `query-block-exports`), its clients
//! are told to go (hard mode) and, once the last one has, its backend is
//! deleted and `BLOCK_EXPORT_DELETED` is emitted.
//!
//! A legacy `nbd-server-add device=BACKEND` export also listens to the
//! named backend's remove notifier: ejecting the medium shuts it down.

use alloc::rc::{Rc, Weak};
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use serde_json::json;

use super::bitmaps::{self, BitmapRef, ExportedBitmap};
use crate::graph::backend::{Backend, BackendOptions};
use crate::graph::permission::Perm;
use crate::graph::registry::{self, Registry};
use crate::nbd::{BlockSize, Export, ExportSet, Features};

/// One export.
pub struct NbdExport {
    pub id: String,
    /// The NBD name clients ask for.
    pub name: String,
    pub description: String,
    pub node_name: String,
    pub writable: bool,
    pub backend: Rc<Backend>,
    /// Connections that chose this export.
    pub clients: Cell<usize>,
    /// No longer offered; deleted once `clients` is 0.
    pub shutting_down: Cell<bool>,
    /// Disconnect clients at once (mode hard, eject, server stop).
    pub hard: Cell<bool>,
    /// `qemu:allocation-depth` is offered.
    pub allocation_depth: bool,
    /// The bitmaps offered as `qemu:dirty-bitmap:NAME` (busy while the
    /// export lives).
    pub bitmaps: Vec<ExportedBitmap>,
    /// The named backend whose eject shuts this export down, and the
    /// notifier's id there.
    on_eject: RefCell<Option<(Rc<Backend>, u64)>>,
}

impl NbdExport {
    /// What the NBD engine offers clients.
    pub fn describe(&self) -> Export {
        let mut features = if self.writable {
            Features::all()
        } else {
            Features {
                flush: true,
                ..Features::read_only()
            }
        };
        features.rotational = false;
        Export {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.backend.get_length().unwrap_or(0),
            features,
            // The node's alignment (QEMU: blk_get_request_alignment()) is
            // told as the preferred block size, and the minimum is 1 for
            // every client: the node pads any request and serialises the
            // read-modify-writes that needs. QEMU tells it as the minimum
            // to clients that ask for block sizes; qemu-io then pads on its
            // side, and several clients writing their own pieces of one
            // block overwrite each other's (the reproducer lost
            // 789 of 2048 acknowledged pieces that way).
            block_size: BlockSize::for_alignment(
                self.backend
                    .root_node()
                    .map_or(1, |n| n.request_alignment()),
            )
            .without_minimum(),
            allocation_depth: self.allocation_depth,
            bitmaps: self.bitmaps.iter().map(|b| b.name.clone()).collect(),
        }
    }

    /// Asks the export to go away; `hard` also disconnects its clients.
    pub fn request_shutdown(&self, hard: bool) {
        self.shutting_down.set(true);
        if hard {
            self.hard.set(true);
        }
    }
}

/// The exports, shared by the server, the QMP commands and eject
/// notifiers.
pub struct ExportTable {
    list: RefCell<Vec<Rc<NbdExport>>>,
    registry: Rc<Registry>,
    /// `NBD_FLAG_CAN_MULTI_CONN` may be offered: not when the server
    /// takes a single connection (`max-connections=1`), as QEMU.
    multi_conn: Cell<bool>,
}

/// What `block-export-add` / `nbd-server-add` asks for.
pub struct NewExport<'a> {
    pub id: &'a str,
    pub node_name: &'a str,
    pub name: Option<&'a str>,
    pub description: Option<&'a str>,
    pub writable: bool,
    /// Legacy `nbd-server-add`: the named backend to follow on eject.
    pub on_eject: Option<Rc<Backend>>,
    /// Offer `qemu:allocation-depth`.
    pub allocation_depth: bool,
    /// Offer these bitmaps as `qemu:dirty-bitmap:NAME`.
    pub bitmaps: Vec<BitmapRef>,
}

impl ExportTable {
    pub fn new(registry: Rc<Registry>) -> Rc<ExportTable> {
        Rc::new(ExportTable {
            list: RefCell::new(Vec::new()),
            registry,
            multi_conn: Cell::new(true),
        })
    }

    /// Whether exports offer multi-conn (the server's `max-connections`
    /// is not 1).
    pub fn set_multi_conn(&self, on: bool) {
        self.multi_conn.set(on);
    }

    /// What the engine offers for `e`.
    fn offer(&self, e: &NbdExport) -> Export {
        let mut d = e.describe();
        d.features.multi_conn &= self.multi_conn.get();
        d
    }

    /// The registry the exports' backends live in.
    pub fn registry(&self) -> &Rc<Registry> {
        &self.registry
    }

    /// Every export, shutting down or not, oldest first.
    pub fn all(&self) -> Vec<Rc<NbdExport>> {
        self.list.borrow().clone()
    }

    /// The export with QMP id `id`.
    pub fn by_id(&self, id: &str) -> Option<Rc<NbdExport>> {
        self.list.borrow().iter().find(|e| e.id == id).cloned()
    }

    /// The live export clients reach by `name`.
    pub fn by_name(&self, name: &str) -> Option<Rc<NbdExport>> {
        self.list
            .borrow()
            .iter()
            .find(|e| e.name == name && !e.shutting_down.get())
            .cloned()
    }

    /// Creates an export (QEMU: `blk_exp_add` + `nbd_export_create`, with
    /// their error texts). The caller has checked that the server runs.
    pub fn add(self: &Rc<Self>, req: NewExport<'_>) -> Result<Rc<NbdExport>, String> {
        if !registry::id_wellformed(req.id) {
            return Err("Invalid block export id".into());
        }
        if self.by_id(req.id).is_some() {
            return Err(alloc::format!(
                "Block export id '{}' is already in use",
                req.id
            ));
        }
        let node = self.registry.lookup(None, Some(req.node_name))?;
        if node.read_only() && req.writable {
            return Err("Cannot export read-only node as writable".into());
        }
        let name = req.name.unwrap_or(req.node_name);
        if name.len() > 4096 {
            return Err(alloc::format!("export name '{name}' too long"));
        }
        let description = req.description.unwrap_or("");
        if description.len() > 4096 {
            return Err(alloc::format!("description '{description}' too long"));
        }
        if self.by_name(name).is_some() {
            return Err(alloc::format!(
                "NBD server already has export named '{name}'"
            ));
        }
        let claimed = bitmaps::claim(&self.registry, &node, req.writable, &req.bitmaps)?;
        let mut perm = Perm::CONSISTENT_READ;
        if req.writable {
            perm |= Perm::WRITE;
        }
        let backend = self
            .registry
            .new_backend(
                BackendOptions {
                    device: Some(req.id.into()),
                    ..BackendOptions::default()
                },
                perm,
                Perm::ALL.minus(Perm::RESIZE),
            )
            .map_err(|e| {
                bitmaps::release(&claimed);
                alloc::format!("{e}")
            })?;
        if let Err(e) = backend.insert(&node) {
            bitmaps::release(&claimed);
            // No root: deleting only forgets the backend.
            self.registry.executor().spawn(async move {
                backend.delete().await;
            });
            return Err(alloc::format!("{e}"));
        }
        let export = Rc::new(NbdExport {
            id: req.id.into(),
            name: name.into(),
            description: description.into(),
            node_name: node.name().into(),
            writable: req.writable,
            backend,
            clients: Cell::new(0),
            shutting_down: Cell::new(false),
            hard: Cell::new(false),
            allocation_depth: req.allocation_depth,
            bitmaps: claimed,
            on_eject: RefCell::new(None),
        });
        if let Some(named) = req.on_eject {
            let weak: Weak<NbdExport> = Rc::downgrade(&export);
            let id = named.add_remove_notifier(Rc::new(move |_| {
                if let Some(e) = weak.upgrade() {
                    e.request_shutdown(true);
                }
            }));
            *export.on_eject.borrow_mut() = Some((named, id));
        }
        self.list.borrow_mut().push(export.clone());
        Ok(export)
    }

    /// Deletes every export that is shutting down and has no client left:
    /// its backend goes (a task), then `BLOCK_EXPORT_DELETED`. Returns
    /// whether any went.
    pub fn reap(&self) -> bool {
        let gone = |e: &Rc<NbdExport>| e.shutting_down.get() && e.clients.get() == 0;
        // Called on every poll: nothing to do costs no allocation.
        if !self.list.borrow().iter().any(gone) {
            return false;
        }
        let done: Vec<Rc<NbdExport>> = {
            let mut list = self.list.borrow_mut();
            let (done, keep) = core::mem::take(&mut *list).into_iter().partition(gone);
            *list = keep;
            done
        };
        let any = !done.is_empty();
        for e in done {
            if let Some((named, id)) = e.on_eject.borrow_mut().take() {
                named.remove_notifier(id);
            }
            bitmaps::release(&e.bitmaps);
            let registry = self.registry.clone();
            self.registry.executor().spawn(async move {
                e.backend.delete().await;
                registry.emit("BLOCK_EXPORT_DELETED", json!({ "id": e.id }));
            });
        }
        any
    }

    /// The halt path: every export is gone at once, each with its event
    /// (close-all then ejects the backends, draining their requests).
    pub fn close_all(&self) -> Vec<String> {
        let list = core::mem::take(&mut *self.list.borrow_mut());
        let mut closed = Vec::new();
        for e in list {
            e.request_shutdown(true);
            if let Some((named, id)) = e.on_eject.borrow_mut().take() {
                named.remove_notifier(id);
            }
            bitmaps::release(&e.bitmaps);
            log::info!("NBD export '{}' closed", e.id);
            self.registry
                .emit("BLOCK_EXPORT_DELETED", json!({ "id": e.id }));
            closed.push(e.id.clone());
        }
        closed
    }
}

impl ExportSet for ExportTable {
    fn for_each(&self, f: &mut dyn FnMut(&Export)) {
        for e in self.list.borrow().iter() {
            if !e.shutting_down.get() {
                f(&self.offer(e));
            }
        }
    }

    fn find(&self, name: &str) -> Option<Export> {
        self.by_name(name).map(|e| self.offer(&e))
    }
}
