//! The registry: every node, the monitor's nodes, every backend and job
//! (QEMU: `all_bdrv_states`, `monitor_bdrv_states`, the BlockBackend list,
//! the job list, and `graph_bdrv_states` for lookups by node-name).
//!
//! The registry keeps the job list but does not know what a job is: it
//! holds each one type-erased, and the job framework above the graph
//! reads and writes the list through [`crate::job::RegistryJobs`]. So
//! one `Rc<Registry>` still reaches everything close-all must stop, while
//! the graph depends on nothing above it.
//!
//! The all-nodes list exists so that [`crate::close_all`] can *assert* that
//! every node was closed by its refcount reaching zero. The monitor list
//! holds the one reference `blockdev-add` gives the monitor on each node it
//! creates; `blockdev-del` and close-all drop it.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::any::Any;
use core::cell::{Cell, RefCell};
use core::fmt;

use serde_json::{Map, Value};

use crate::driver::BlockDriver;
use crate::event::{EventSink, NoEvents};
use crate::exec::Executor;
use crate::graph::backend::Backend;
use crate::graph::child::{AttachError, attach_node_child, detach_child};
use crate::graph::node::{Node, NodeOptions};
use crate::graph::permission::ChildRole;
use crate::io::IoError;
use crate::timer::Clock;

/// Longest node-name (QEMU: `sizeof(bs->node_name) - 1`).
pub const MAX_NAME_LEN: usize = 31;

/// How a node's final flush went, for the close-all report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Nothing was written since the last flush.
    Clean,
    /// Written data was flushed.
    Flushed,
    /// The flush failed (the node was closed anyway, as in QEMU).
    Failed(IoError),
}

impl fmt::Display for FlushOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlushOutcome::Clean => f.write_str("clean"),
            FlushOutcome::Flushed => f.write_str("flushed"),
            FlushOutcome::Failed(e) => write!(f, "flush failed: {e}"),
        }
    }
}

/// A node that was closed, in closing order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedNode {
    /// Its node-name.
    pub name: String,
    /// Its driver.
    pub driver: String,
    /// How its final flush went.
    pub flush: FlushOutcome,
}

/// Why a node-name cannot be used (QEMU: `bdrv_assign_node_name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    /// Not a well-formed id.
    Invalid(String),
    /// A backend has this name.
    ConflictsWithDevice(String),
    /// A node has this name.
    Duplicate(String),
    /// Longer than [`MAX_NAME_LEN`].
    TooLong,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Invalid(n) => write!(f, "Invalid node-name: '{n}'"),
            NameError::ConflictsWithDevice(n) => {
                write!(f, "node-name={n} is conflicting with a device id")
            }
            NameError::Duplicate(n) => write!(f, "Duplicate nodes with node-name='{n}'"),
            NameError::TooLong => f.write_str("Node name too long"),
        }
    }
}

/// Why a node could not be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenNodeError {
    /// The node-name.
    Name(NameError),
    /// A child edge.
    Attach(AttachError),
}

impl fmt::Display for OpenNodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenNodeError::Name(e) => e.fmt(f),
            OpenNodeError::Attach(e) => e.fmt(f),
        }
    }
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// A child to attach to a node being opened: edge name, role, node. The
/// caller holds one reference on the node, which the edge takes over.
pub type NewChild = (String, ChildRole, Rc<Node>);

/// The registry of one block layer.
pub struct Registry {
    exec: Executor,
    clock: Rc<dyn Clock>,
    events: RefCell<Rc<dyn EventSink>>,
    nodes: RefCell<Vec<Rc<Node>>>,
    monitor_nodes: RefCell<Vec<Rc<Node>>>,
    backends: RefCell<Vec<Rc<Backend>>>,
    jobs: RefCell<Vec<Rc<dyn Any>>>,
    next_id: Cell<u64>,
    next_auto_name: Cell<u64>,
    closed: RefCell<Vec<ClosedNode>>,
    objects: RefCell<BTreeMap<String, Rc<dyn Any>>>,
}

impl Registry {
    /// An empty registry whose requests run on `exec` and whose time is `clock`.
    pub fn new(exec: Executor, clock: Rc<dyn Clock>) -> Rc<Registry> {
        Rc::new(Registry {
            exec,
            clock,
            events: RefCell::new(Rc::new(NoEvents)),
            nodes: RefCell::default(),
            monitor_nodes: RefCell::default(),
            backends: RefCell::default(),
            jobs: RefCell::default(),
            next_id: Cell::new(1),
            next_auto_name: Cell::new(0),
            closed: RefCell::default(),
            objects: RefCell::default(),
        })
    }

    /// The executor.
    pub fn executor(&self) -> &Executor {
        &self.exec
    }

    /// The clock.
    pub fn clock(&self) -> Rc<dyn Clock> {
        self.clock.clone()
    }

    /// Sends events to `sink` from now on.
    pub fn set_event_sink(&self, sink: Rc<dyn EventSink>) {
        *self.events.borrow_mut() = sink;
    }

    /// Emits a QMP event.
    pub fn emit(&self, name: &str, data: Value) {
        let sink = self.events.borrow().clone();
        sink.emit(name, data);
    }

    pub(crate) fn next_id(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    // ---- nodes ----

    /// Every node not yet closed (QEMU: `all_bdrv_states`).
    pub fn nodes(&self) -> Vec<Rc<Node>> {
        self.nodes.borrow().clone()
    }

    /// The open node called `name` (QEMU: `bdrv_find_node`).
    pub fn find_node(&self, name: &str) -> Option<Rc<Node>> {
        self.nodes
            .borrow()
            .iter()
            .find(|n| n.name() == name && n.state() == crate::graph::node::NodeState::Open)
            .cloned()
    }

    /// A node by backend name or node-name (QEMU: `bdrv_lookup_bs`).
    pub fn lookup(
        &self,
        device: Option<&str>,
        node_name: Option<&str>,
    ) -> Result<Rc<Node>, String> {
        if let Some(d) = device
            && let Some(b) = self.find_backend(d)
        {
            return b
                .root_node()
                .ok_or_else(|| format!("Device '{d}' has no medium"));
        }
        if let Some(n) = node_name
            && let Some(node) = self.find_node(n)
        {
            return Ok(node);
        }
        Err(format!(
            "Cannot find device='{}' nor node-name='{}'",
            device.unwrap_or(""),
            node_name.unwrap_or("")
        ))
    }

    /// Validates a user-given node-name, or generates one (`#blockNNN`).
    /// Returns the name and whether it was generated.
    pub fn assign_node_name(&self, name: Option<&str>) -> Result<(String, bool), NameError> {
        let Some(name) = name else {
            let n = self.next_auto_name.get();
            self.next_auto_name.set(n + 1);
            return Ok((format!("#block{n:03}"), true));
        };
        if !id_wellformed(name) {
            return Err(NameError::Invalid(name.to_string()));
        }
        if self.find_backend(name).is_some() {
            return Err(NameError::ConflictsWithDevice(name.to_string()));
        }
        if self.find_node(name).is_some() {
            return Err(NameError::Duplicate(name.to_string()));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        Ok((name.to_string(), false))
    }

    /// Creates a node (QEMU: the end of `bdrv_open_inherit`): assigns its
    /// name, attaches `children` in order with permission checks, registers
    /// it. The new node has refcount 1, owned by the caller. On failure
    /// nothing is registered and the caller still owns its references on
    /// the children.
    pub fn open_node(
        self: &Rc<Self>,
        name: Option<&str>,
        driver: Box<dyn BlockDriver>,
        opts: NodeOptions,
        open_options: Map<String, Value>,
        children: Vec<NewChild>,
    ) -> Result<Rc<Node>, OpenNodeError> {
        let (name, implicit) = self.assign_node_name(name).map_err(OpenNodeError::Name)?;
        let node = Rc::new(Node::new(
            self.next_id(),
            name,
            implicit,
            driver,
            opts,
            open_options,
            Rc::downgrade(self),
        ));
        for (edge_name, role, child) in children {
            if let Err(e) = attach_node_child(&node, &edge_name, role, &child) {
                for c in node.children().iter().rev() {
                    detach_child(c);
                }
                node.driver().close(&node);
                return Err(OpenNodeError::Attach(e));
            }
        }
        self.nodes.borrow_mut().push(node.clone());
        Ok(node)
    }

    pub(crate) fn record_closed(&self, c: ClosedNode) {
        log::debug!("closed node '{}' ({}), {}", c.name, c.driver, c.flush);
        self.closed.borrow_mut().push(c);
    }

    pub(crate) fn forget_node(&self, node: &Rc<Node>) {
        self.nodes.borrow_mut().retain(|n| !Rc::ptr_eq(n, node));
        self.monitor_nodes
            .borrow_mut()
            .retain(|n| !Rc::ptr_eq(n, node));
    }

    /// Takes the log of nodes closed since the last call, in closing order.
    pub fn take_closed(&self) -> Vec<ClosedNode> {
        core::mem::take(&mut *self.closed.borrow_mut())
    }

    // ---- monitor-owned nodes ----

    /// Hands the caller's reference on `node` to the monitor (QEMU:
    /// `QTAILQ_INSERT_TAIL(&monitor_bdrv_states, …)` in `bds_tree_init`).
    pub fn monitor_adopt(&self, node: &Rc<Node>) {
        self.monitor_nodes.borrow_mut().push(node.clone());
    }

    /// Whether the monitor holds a reference on `node`.
    pub fn is_monitor_owned(&self, node: &Node) -> bool {
        self.monitor_nodes
            .borrow()
            .iter()
            .any(|n| core::ptr::eq(&**n, node))
    }

    /// The monitor-owned nodes, oldest first.
    pub fn monitor_nodes(&self) -> Vec<Rc<Node>> {
        self.monitor_nodes.borrow().clone()
    }

    /// Takes `node` off the monitor list; the caller now owns the monitor's
    /// reference and must drop it with [`crate::graph::node::unref`].
    pub fn monitor_release(&self, node: &Rc<Node>) -> bool {
        let mut list = self.monitor_nodes.borrow_mut();
        let before = list.len();
        list.retain(|n| !Rc::ptr_eq(n, node));
        list.len() != before
    }

    // ---- backends ----

    /// Every backend, named or anonymous, oldest first.
    pub fn backends(&self) -> Vec<Rc<Backend>> {
        self.backends.borrow().clone()
    }

    /// The named backend called `name` (QEMU: `blk_by_name`).
    pub fn find_backend(&self, name: &str) -> Option<Rc<Backend>> {
        self.backends
            .borrow()
            .iter()
            .find(|b| b.name() == Some(name))
            .cloned()
    }

    pub(crate) fn add_backend(&self, b: Rc<Backend>) {
        self.backends.borrow_mut().push(b);
    }

    pub(crate) fn forget_backend(&self, b: &Backend) {
        self.backends
            .borrow_mut()
            .retain(|x| !core::ptr::eq(&**x, b));
    }

    // ---- jobs (type-erased; see the module doc) ----

    /// The job list, oldest first.
    pub(crate) fn job_entries(&self) -> Vec<Rc<dyn Any>> {
        self.jobs.borrow().clone()
    }

    pub(crate) fn add_job_entry(&self, j: Rc<dyn Any>) {
        self.jobs.borrow_mut().push(j);
    }

    pub(crate) fn forget_job_entry(&self, j: &dyn Any) {
        let j = j as *const dyn Any as *const ();
        self.jobs
            .borrow_mut()
            .retain(|x| Rc::as_ptr(x) as *const () != j);
    }

    // ---- user-creatable objects (QEMU: the /objects container) ----

    /// The object called `id`.
    pub fn object(&self, id: &str) -> Option<Rc<dyn Any>> {
        self.objects.borrow().get(id).cloned()
    }

    /// Every object id, sorted.
    pub fn object_ids(&self) -> Vec<String> {
        self.objects.borrow().keys().cloned().collect()
    }

    /// Adds an object; `false` if the id is taken.
    pub fn add_object(&self, id: &str, obj: Rc<dyn Any>) -> bool {
        let mut objs = self.objects.borrow_mut();
        if objs.contains_key(id) {
            return false;
        }
        objs.insert(id.to_string(), obj);
        true
    }

    /// Removes an object.
    pub fn remove_object(&self, id: &str) -> Option<Rc<dyn Any>> {
        self.objects.borrow_mut().remove(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(id_wellformed("disk0"));
        assert!(id_wellformed("a-b.c_d"));
        assert!(!id_wellformed("0disk"));
        assert!(!id_wellformed(""));
        assert!(!id_wellformed("#block000"));
        assert!(!id_wellformed("a b"));
    }
}
