//! QMP commands that change the graph (QEMU: `blockdev.c`):
//! `blockdev-add`, `blockdev-del`, `x-blockdev-change`, `block_resize`,
//! the medium and tray commands, and the job verbs.
//!
//! Every command validates all of its arguments before it changes
//! anything, so a refused command leaves the graph as it was.

use alloc::format;
use alloc::rc::Rc;
use alloc::string::ToString;

use serde_json::{Value, json};

use crate::driver::ChildChangeError;
use crate::graph::backend::Drained;
use crate::graph::backend::{Backend, BackendOptions};
use crate::graph::child::{attach_node_child, detach_child};
use crate::graph::node::unref;
use crate::graph::permission::{ChildRole, Perm};
use crate::io::IoError;
use crate::layer::BlockLayer;
use crate::qmp::{Args, QmpError};

type Res = Result<Value, QmpError>;

fn ok() -> Res {
    Ok(json!({}))
}

/// `blockdev-add`.
pub fn blockdev_add(bl: &BlockLayer, args: &Args<'_>) -> Res {
    bl.blockdev_add(args.map(), false)?;
    ok()
}

/// `blockdev-del` with QEMU's refusals (QEMU: `qmp_blockdev_del`).
pub fn blockdev_del(bl: &BlockLayer, args: &Args<'_>) -> Res {
    let name = args.str("node-name")?;
    args.check_known(&["node-name"])?;
    let reg = bl.registry();
    let Some(node) = reg.find_node(name) else {
        return Err(QmpError::generic(format!(
            "Failed to find node with node-name='{name}'"
        )));
    };
    if node.has_backend() {
        return Err(QmpError::generic(format!("Node {name} is in use")));
    }
    if !reg.is_monitor_owned(&node) {
        return Err(QmpError::generic(format!(
            "Node {name} is not owned by the monitor"
        )));
    }
    if node.refcnt() > 1 {
        return Err(QmpError::generic(format!("Block device {name} is in use")));
    }
    reg.monitor_release(&node);
    bl.wait(unref(node))?;
    ok()
}

/// `x-blockdev-change` (QEMU: `qmp_x_blockdev_change`, `bdrv_add_child`,
/// `bdrv_del_child`).
pub fn x_blockdev_change(bl: &BlockLayer, args: &Args<'_>) -> Res {
    let parent_name = args.str("parent")?;
    let child = args.opt_str("child")?;
    let new = args.opt_str("node")?;
    args.check_known(&["parent", "child", "node"])?;
    let reg = bl.registry();
    let parent = reg
        .lookup(Some(parent_name), Some(parent_name))
        .map_err(QmpError::generic)?;
    match (child, new) {
        (Some(_), Some(_)) => Err(QmpError::generic(
            "The parameters child and node are in conflict",
        )),
        (None, None) => Err(QmpError::generic("Either child or node must be specified")),
        (Some(child), None) => {
            let Some(edge) = parent.child(child) else {
                return Err(QmpError::generic(format!(
                    "Node '{parent_name}' does not have child '{child}'"
                )));
            };
            match parent.driver().can_del_child(&parent, &edge) {
                Ok(()) => {}
                Err(ChildChangeError::Refused(m)) => return Err(QmpError::generic(m)),
                Err(_) => {
                    return Err(QmpError::generic(format!(
                        "The node {} does not support removing a child",
                        parent.name()
                    )));
                }
            }
            // Let requests that use the child finish first (QEMU drains).
            let drained = bl.wait(Drained::begin(&parent))?;
            detach_child(&edge);
            parent.driver().child_removed(&parent, &edge);
            drained.end();
            bl.wait(unref(edge.node().clone()))?;
            ok()
        }
        (None, Some(new)) => {
            let Some(node) = reg.find_node(new) else {
                return Err(QmpError::generic(format!("Node '{new}' not found")));
            };
            let name = match parent.driver().add_child_name(&parent, &node) {
                Ok(n) => n,
                Err(ChildChangeError::Refused(m)) => return Err(QmpError::generic(m)),
                Err(_) => {
                    return Err(QmpError::generic(format!(
                        "The node {} does not support adding a child",
                        parent.name()
                    )));
                }
            };
            if !node.parents().is_empty() {
                return Err(QmpError::generic(format!(
                    "The node {new} already has a parent"
                )));
            }
            let drained = bl.wait(Drained::begin(&parent))?;
            node.ref_();
            let r = match attach_node_child(&parent, &name, ChildRole::DATA, &node) {
                Ok(edge) => {
                    parent.driver().child_added(&parent, &edge);
                    ok()
                }
                Err(e) => {
                    node.unref_nonfinal();
                    Err(QmpError::generic(e.to_string()))
                }
            };
            drained.end();
            r
        }
    }
}

/// `block_resize` (QEMU: `qmp_block_resize`): through a temporary backend
/// asking RESIZE, so that users that do not share it refuse.
pub fn block_resize(bl: &BlockLayer, args: &Args<'_>) -> Res {
    let device = args.opt_str("device")?;
    let node_name = args.opt_str("node-name")?;
    let size = args.i64("size")?;
    args.check_known(&["device", "node-name", "size"])?;
    let reg = bl.registry();
    let node = reg.lookup(device, node_name).map_err(QmpError::generic)?;
    if size < 0 {
        return Err(QmpError::invalid_parameter_value("size", "a >0 size"));
    }
    if node.read_only() {
        return Err(QmpError::generic("Image is read-only"));
    }
    let blk = reg
        .new_backend(BackendOptions::default(), Perm::RESIZE, Perm::ALL)
        .map_err(|e| QmpError::generic(e.to_string()))?;
    if let Err(e) = blk.insert(&node) {
        reg.forget_backend(&blk);
        return Err(QmpError::generic(e.to_string()));
    }
    let b = blk.clone();
    let r = bl.wait(async move {
        let r = b.truncate(size as u64).await;
        b.delete().await;
        r
    })?;
    match r {
        Ok(()) => ok(),
        Err(IoError::Enotsup) => Err(QmpError::generic(
            "Image format driver does not support resize",
        )),
        Err(IoError::Eperm) => Err(QmpError::generic("Image is read-only")),
        Err(e) => Err(QmpError::generic(format!("Could not resize: {e}"))),
    }
}

/// QEMU's `qmp_get_blk`: a named backend by `device` or `id`.
fn get_blk(
    bl: &BlockLayer,
    device: Option<&str>,
    id: Option<&str>,
) -> Result<Rc<Backend>, QmpError> {
    let name = match (device, id) {
        (Some(d), None) => d,
        (None, Some(i)) => i,
        _ => return Err(QmpError::generic("Need exactly one of 'device' and 'id'")),
    };
    bl.registry()
        .find_backend(name)
        .ok_or_else(|| QmpError::device_not_found(format!("Device '{name}' not found")))
}

/// `blockdev-open-tray`: a no-op for backends without a tray, as in QEMU.
pub fn blockdev_open_tray(bl: &BlockLayer, args: &Args<'_>) -> Res {
    let device = args.opt_str("device")?;
    let id = args.opt_str("id")?;
    let _force = args.opt_bool("force")?;
    args.check_known(&["device", "id", "force"])?;
    let blk = get_blk(bl, device, id)?;
    blk.set_tray_open(true);
    ok()
}

/// `blockdev-close-tray`.
pub fn blockdev_close_tray(bl: &BlockLayer, args: &Args<'_>) -> Res {
    let device = args.opt_str("device")?;
    let id = args.opt_str("id")?;
    args.check_known(&["device", "id"])?;
    let blk = get_blk(bl, device, id)?;
    blk.set_tray_open(false);
    ok()
}

fn remove_medium(bl: &BlockLayer, blk: &Rc<Backend>, name: &str) -> Res {
    if blk.has_tray() && !blk.is_tray_open() {
        return Err(QmpError::generic(format!(
            "Tray of device '{name}' is not open"
        )));
    }
    let b = blk.clone();
    bl.wait(async move { b.remove().await })?;
    ok()
}

/// `blockdev-remove-medium`: eject the backend's tree.
pub fn blockdev_remove_medium(bl: &BlockLayer, args: &Args<'_>) -> Res {
    let id = args.str("id")?;
    args.check_known(&["id"])?;
    let blk = get_blk(bl, None, Some(id))?;
    remove_medium(bl, &blk, id)
}

/// `blockdev-insert-medium`.
pub fn blockdev_insert_medium(bl: &BlockLayer, args: &Args<'_>) -> Res {
    let id = args.str("id")?;
    let node_name = args.str("node-name")?;
    args.check_known(&["id", "node-name"])?;
    let reg = bl.registry();
    let Some(node) = reg.find_node(node_name) else {
        return Err(QmpError::generic(format!("Node '{node_name}' not found")));
    };
    if node.has_backend() {
        return Err(QmpError::generic(format!(
            "Node '{node_name}' is already in use"
        )));
    }
    let blk = get_blk(bl, None, Some(id))?;
    if blk.has_tray() && !blk.is_tray_open() {
        return Err(QmpError::generic(format!(
            "Tray of device '{id}' is not open"
        )));
    }
    if blk.root().is_some() {
        return Err(QmpError::generic(format!(
            "There already is a medium in device '{id}'"
        )));
    }
    blk.insert(&node)
        .map_err(|e| QmpError::generic(e.to_string()))?;
    ok()
}

/// `eject` = open the tray, remove the medium.
pub fn eject(bl: &BlockLayer, args: &Args<'_>) -> Res {
    let device = args.opt_str("device")?;
    let id = args.opt_str("id")?;
    let _force = args.opt_bool("force")?;
    args.check_known(&["device", "id", "force"])?;
    let blk = get_blk(bl, device, id)?;
    blk.set_tray_open(true);
    remove_medium(bl, &blk, device.or(id).unwrap_or(""))
}
