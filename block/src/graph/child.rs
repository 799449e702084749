//! Child edges (QEMU: `BdrvChild`).
//!
//! An edge goes from a parent — a node, or a backend's `root` — to a child
//! node. It has a name (`file`, `backing`, `image`, `children.N`, `root`), a
//! [`ChildRole`], the parent's `perm` and `shared` permissions, and it holds
//! one reference on the child node. Parents do I/O on a child *through* the
//! edge, which checks that the edge holds the permission the request needs
//! (QEMU asserts the same in `bdrv_co_write_req_prepare`).

use alloc::format;
use alloc::rc::{Rc, Weak};
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::Cell;

use crate::graph::backend::Backend;
use crate::graph::node::Node;
use crate::graph::permission::{ChildRole, Perm, PermConflict, PermError};
use crate::io::{BlockStatus, IoError, IoResult, ReqFlags};

/// Who holds an edge.
#[derive(Clone)]
pub enum Parent {
    /// A node's child edge.
    Node(Weak<Node>),
    /// A backend's root edge.
    Backend(Weak<Backend>),
}

/// One parent → child edge.
pub struct Child {
    name: String,
    role: ChildRole,
    node: Rc<Node>,
    parent: Parent,
    perm: Cell<Perm>,
    shared: Cell<Perm>,
}

impl Child {
    pub(crate) fn new(
        name: String,
        role: ChildRole,
        node: Rc<Node>,
        parent: Parent,
        perm: Perm,
        shared: Perm,
    ) -> Child {
        Child {
            name,
            role,
            node,
            parent,
            perm: Cell::new(perm),
            shared: Cell::new(shared),
        }
    }

    /// The edge's name (QEMU: `BdrvChild.name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The edge's role.
    pub fn role(&self) -> ChildRole {
        self.role
    }

    /// The child node.
    pub fn node(&self) -> &Rc<Node> {
        &self.node
    }

    /// The parent holding the edge.
    pub fn parent(&self) -> &Parent {
        &self.parent
    }

    /// The parent node, if the parent is a node that is still alive.
    pub fn parent_node(&self) -> Option<Rc<Node>> {
        match &self.parent {
            Parent::Node(w) => w.upgrade(),
            Parent::Backend(_) => None,
        }
    }

    /// The parent backend, if the parent is a backend that is still alive.
    pub fn parent_backend(&self) -> Option<Rc<Backend>> {
        match &self.parent {
            Parent::Backend(w) => w.upgrade(),
            Parent::Node(_) => None,
        }
    }

    /// What the parent needs.
    pub fn perm(&self) -> Perm {
        self.perm.get()
    }

    /// What the parent lets others do.
    pub fn shared(&self) -> Perm {
        self.shared.get()
    }

    pub(crate) fn set_perm(&self, perm: Perm, shared: Perm) {
        self.perm.set(perm);
        self.shared.set(shared);
    }

    /// How error messages name the parent (QEMU: `get_parent_desc`):
    /// `node 'x'`, `block device 'x'`, or the backend's user description.
    pub fn parent_desc(&self) -> String {
        match &self.parent {
            Parent::Node(w) => match w.upgrade() {
                Some(n) => format!("node '{}'", n.name()),
                None => String::from("a closed node"),
            },
            Parent::Backend(w) => match w.upgrade() {
                Some(b) => b.user_desc(),
                None => String::from("an unnamed block device"),
            },
        }
    }

    fn need(&self, p: Perm) -> IoResult<()> {
        if self.perm.get().contains(p) {
            Ok(())
        } else {
            Err(IoError::Eperm)
        }
    }

    /// Reads through the edge (QEMU: `bdrv_co_preadv(child, …)`).
    pub async fn read(&self, offset: u64, len: usize, flags: ReqFlags) -> IoResult<Vec<u8>> {
        self.node.read(offset, len, flags).await
    }

    /// Writes through the edge; needs WRITE, or WRITE_UNCHANGED for a
    /// `WRITE_UNCHANGED` request.
    pub async fn write(&self, offset: u64, data: Vec<u8>, flags: ReqFlags) -> IoResult<()> {
        let unchanged = flags.contains(ReqFlags::WRITE_UNCHANGED)
            && self.perm().contains(Perm::WRITE_UNCHANGED);
        if !unchanged {
            self.need(Perm::WRITE)?;
        }
        self.node.write(offset, data, flags).await
    }

    /// Write-zeroes through the edge; needs WRITE.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoResult<()> {
        self.need(Perm::WRITE)?;
        self.node.write_zeroes(offset, len, flags).await
    }

    /// Discard through the edge; needs WRITE.
    pub async fn discard(&self, offset: u64, len: u64) -> IoResult<()> {
        self.need(Perm::WRITE)?;
        self.node.discard(offset, len).await
    }

    /// Flush through the edge.
    pub async fn flush(&self) -> IoResult<()> {
        self.node.flush().await
    }

    /// Block status through the edge.
    pub async fn block_status(&self, offset: u64, len: u64) -> IoResult<BlockStatus> {
        self.node.block_status(offset, len).await
    }

    /// Truncate through the edge; needs RESIZE.
    pub async fn truncate(&self, size: u64) -> IoResult<()> {
        self.need(Perm::RESIZE)?;
        self.node.truncate(size).await
    }
}

/// Why an edge could not be attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachError {
    /// The permissions of the new edge conflict, or need a writable node.
    Perm(PermError),
    /// The child is an ancestor of the parent.
    Cycle {
        /// The would-be child.
        child: String,
        /// The edge name.
        name: String,
        /// The would-be parent.
        parent: String,
    },
}

impl core::fmt::Display for AttachError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AttachError::Perm(e) => e.fmt(f),
            AttachError::Cycle {
                child,
                name,
                parent,
            } => {
                write!(
                    f,
                    "Making '{child}' a {name} child of '{parent}' would create a cycle"
                )
            }
        }
    }
}

impl From<PermError> for AttachError {
    fn from(e: PermError) -> Self {
        AttachError::Perm(e)
    }
}

/// Edge permissions changed so far in one graph change, to undo it.
#[derive(Default)]
struct PermTx {
    saved: Vec<(Rc<Child>, Perm, Perm)>,
}

impl PermTx {
    fn set(&mut self, c: &Rc<Child>, perm: Perm, shared: Perm) {
        self.saved.push((c.clone(), c.perm(), c.shared()));
        c.set_perm(perm, shared);
    }

    fn rollback(self) {
        for (c, p, s) in self.saved.into_iter().rev() {
            c.set_perm(p, s);
        }
    }
}

/// Checks `node` after its parents changed and re-derives the permissions
/// of its own child edges, recursively (QEMU: `bdrv_refresh_perms`).
fn refresh(node: &Rc<Node>, tx: &mut PermTx) -> Result<(), PermError> {
    let (perm, shared) = node.cumulative_perms();
    if perm.intersects(Perm::WRITE | Perm::WRITE_UNCHANGED) && node.read_only() {
        return Err(PermError::ReadOnly);
    }
    // QEMU's bdrv_parent_perms_conflict: each ordered pair, newest first.
    let parents = node.parents();
    for a in &parents {
        for b in &parents {
            if Rc::ptr_eq(a, b) {
                continue;
            }
            let missing = b.perm().minus(a.shared());
            if !missing.is_empty() {
                return Err(PermError::Conflict(alloc::boxed::Box::new(PermConflict {
                    node: node.name().into(),
                    perms: missing,
                    required_by: b.parent_desc(),
                    required_child: b.name().into(),
                    unshared_by: a.parent_desc(),
                    unshared_child: a.name().into(),
                })));
            }
        }
    }
    for c in node.children() {
        let (p, s) = child_perm(node, &c, perm, shared);
        if (p, s) != (c.perm(), c.shared()) {
            tx.set(&c, p, s);
            refresh(c.node(), tx)?;
        }
    }
    Ok(())
}

/// QEMU's `bdrv_child_perm`: the driver's choice, and everything shared
/// on a `force-share` child.
fn child_perm(parent: &Node, c: &Child, perm: Perm, shared: Perm) -> (Perm, Perm) {
    let (p, s) = parent.driver().child_perm(parent, c, perm, shared);
    if c.node().options().force_share {
        (p, Perm::ALL)
    } else {
        (p, s)
    }
}

fn reaches(from: &Rc<Node>, to: &Rc<Node>) -> bool {
    Rc::ptr_eq(from, to) || from.children().iter().any(|c| reaches(c.node(), to))
}

fn attach(edge: &Rc<Child>) -> Result<(), PermError> {
    let child = edge.node();
    child.add_parent(edge);
    if let Some(p) = edge.parent_node() {
        p.push_child(edge.clone());
    }
    let mut tx = PermTx::default();
    match refresh(child, &mut tx) {
        Ok(()) => Ok(()),
        Err(e) => {
            tx.rollback();
            child.remove_parent(edge);
            if let Some(p) = edge.parent_node() {
                p.remove_child(edge);
            }
            Err(e)
        }
    }
}

/// Attaches `child` below the node `parent` as `name` (QEMU:
/// `bdrv_attach_child`). On success the edge owns one reference the caller
/// held on `child`; on failure nothing changed and the caller keeps it.
pub fn attach_node_child(
    parent: &Rc<Node>,
    name: &str,
    role: ChildRole,
    child: &Rc<Node>,
) -> Result<Rc<Child>, AttachError> {
    if reaches(child, parent) {
        return Err(AttachError::Cycle {
            child: child.name().into(),
            name: name.into(),
            parent: parent.name().into(),
        });
    }
    let edge = Rc::new(Child::new(
        name.into(),
        role,
        child.clone(),
        Parent::Node(Rc::downgrade(parent)),
        Perm::NONE,
        Perm::ALL,
    ));
    let (perm, shared) = parent.cumulative_perms();
    let (p, s) = child_perm(parent, &edge, perm, shared);
    edge.set_perm(p, s);
    attach(&edge)?;
    Ok(edge)
}

/// Attaches `child` as the `root` of a backend (QEMU:
/// `bdrv_root_attach_child`); references as for [`attach_node_child`].
pub(crate) fn attach_backend_root(
    backend: &Rc<Backend>,
    child: &Rc<Node>,
    perm: Perm,
    shared: Perm,
) -> Result<Rc<Child>, PermError> {
    let edge = Rc::new(Child::new(
        "root".into(),
        ChildRole::DATA | ChildRole::PRIMARY,
        child.clone(),
        Parent::Backend(Rc::downgrade(backend)),
        perm,
        shared,
    ));
    attach(&edge)?;
    Ok(edge)
}

/// Changes an edge's permissions, or changes nothing and fails (QEMU:
/// `bdrv_child_try_set_perm`).
pub fn set_child_perm(edge: &Rc<Child>, perm: Perm, shared: Perm) -> Result<(), PermError> {
    let mut tx = PermTx::default();
    tx.set(edge, perm, shared);
    match refresh(edge.node(), &mut tx) {
        Ok(()) => Ok(()),
        Err(e) => {
            tx.rollback();
            Err(e)
        }
    }
}

/// Removes an edge from both ends and relaxes the permissions below; the
/// reference it held is now the caller's to drop with
/// [`crate::graph::node::unref`] (QEMU: the first half of `bdrv_unref_child`).
pub fn detach_child(edge: &Rc<Child>) {
    if let Some(p) = edge.parent_node() {
        p.remove_child(edge);
    }
    let child = edge.node();
    child.remove_parent(edge);
    let mut tx = PermTx::default();
    if let Err(e) = refresh(child, &mut tx) {
        // Removing a parent only relaxes constraints; keep the result anyway.
        log::warn!(
            "permissions below '{}' after detaching '{}': {e}",
            child.name(),
            edge.name()
        );
    }
}
