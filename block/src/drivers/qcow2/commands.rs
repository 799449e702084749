//! QMP commands of the qcow2 driver: `blockdev-create` (QEMU:
//! `qmp_blockdev_create`, a job of type `create` that must be dismissed)
//! and `blockdev-snapshot` (QEMU: `external_snapshot_action` with
//! `bdrv_append`).
//!
//! `blockdev-snapshot` attaches `node` as the backing file of `overlay`
//! (which must be a qcow2 node opened with `"backing": null` and not in
//! use), then replaces `node` by `overlay` in all of `node`'s users —
//! backends (an NBD export, a job) and parent nodes — inside a drained
//! section, so the overlay becomes the active layer without any user
//! seeing an eject (QEMU: `bdrv_append`). If a user refuses the overlay
//! (permissions), nothing changes.

use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};

use serde_json::{Value, json};

use crate::graph::backend::Drained;
use crate::graph::child::{attach_node_child, detach_child};
use crate::graph::node::Node;
use crate::graph::permission::ChildRole;
use crate::graph::replace::replace_node;
use crate::job::{JobOptions, RegistryJobs};
use crate::layer::{BlockContext, BlockLayer};
use crate::qmp::{Args, Dispatcher, QmpError, Signature};

use super::create::{CreateJob, CreateOpts};

type Res = Result<Value, QmpError>;

/// Registers `blockdev-create` and `blockdev-snapshot` on `d`.
pub fn register<C: BlockContext + 'static>(d: &mut Dispatcher<C>) {
    fn create<C: BlockContext>(c: &mut C, a: &Args<'_>) -> Res {
        blockdev_create(c.block_layer(), a)
    }
    fn snapshot<C: BlockContext>(c: &mut C, a: &Args<'_>) -> Res {
        blockdev_snapshot(c.block_layer(), a)
    }
    d.register(
        "blockdev-create",
        Signature::new(
            "job-id:str, options:{driver:(qcow2), file:str, size:size, version?:(v2|v3), \
             cluster-size?:size, backing-file?:str, backing-fmt?:@BlockdevDriver, \
             extended-l2?:bool, lazy-refcounts?:bool, refcount-bits?:int, \
             preallocation?:(off|metadata|falloc|full), compression-type?:(zlib|zstd)}",
            "{}",
        ),
        create::<C>,
    );
    d.register(
        "blockdev-snapshot",
        Signature::new("node:str, overlay:str", "{}"),
        snapshot::<C>,
    );
}

/// Reads `BlockdevCreateOptionsQcow2`.
pub fn parse_create(o: &Args<'_>) -> Result<(String, CreateOpts), QmpError> {
    let file = o.str("file")?.to_string();
    let mut c = CreateOpts {
        size: o.u64("size")?,
        ..Default::default()
    };
    if let Some(v) = o.opt_enum_str("version", &["v2", "v3"])? {
        c.version = if v == "v2" { 2 } else { 3 };
    }
    if let Some(cs) = o.opt_u64("cluster-size")? {
        c.cluster_size = cs;
    }
    c.backing_file = o.opt_str("backing-file")?.map(String::from);
    c.backing_fmt = o.opt_str("backing-fmt")?.map(String::from);
    c.extended_l2 = o.opt_bool("extended-l2")?.unwrap_or(false);
    c.lazy_refcounts = o.opt_bool("lazy-refcounts")?.unwrap_or(false);
    if let Some(b) = o.opt_u64("refcount-bits")? {
        c.refcount_bits = b as u32;
    }
    if let Some(p) = o.opt_str("preallocation")?
        && p != "off"
    {
        return Err(QmpError::generic(format!(
            "Unsupported preallocation mode '{p}'"
        )));
    }
    if let Some(t) = o.opt_str("compression-type")?
        && t != "zlib"
    {
        return Err(QmpError::generic(format!(
            "Unsupported compression type '{t}'"
        )));
    }
    if o.has("encrypt") {
        return Err(QmpError::generic(
            "Encrypted qcow2 images are not supported by blockhaus",
        ));
    }
    if o.has("data-file") || o.has("data-file-raw") {
        return Err(QmpError::generic(
            "External data files are not supported by blockhaus",
        ));
    }
    o.check_known(&[
        "driver",
        "file",
        "size",
        "version",
        "cluster-size",
        "backing-file",
        "backing-fmt",
        "extended-l2",
        "lazy-refcounts",
        "refcount-bits",
        "preallocation",
        "compression-type",
    ])?;
    Ok((file, c))
}

/// `blockdev-create`: starts a `create` job (manual dismiss, as QEMU's).
pub fn blockdev_create(bl: &BlockLayer, args: &Args<'_>) -> Res {
    let job_id = args.str("job-id")?;
    let o = args.obj("options")?;
    args.check_known(&["job-id", "options"])?;
    let driver = o.str("driver")?;
    if driver != "qcow2" {
        return Err(QmpError::generic(format!(
            "Driver '{driver}' does not support blockdev-create"
        )));
    }
    let (file, opts) = parse_create(&o)?;
    let reg = bl.registry();
    let node = reg
        .lookup(Some(&file), Some(&file))
        .map_err(QmpError::generic)?;
    let job = reg
        .create_job(
            job_id,
            Rc::new(CreateJob { node, opts }),
            JobOptions {
                auto_dismiss: false,
                speed: 0,
            },
        )
        .map_err(|e| QmpError::generic(e.to_string()))?;
    job.start();
    Ok(json!({}))
}

/// `blockdev-snapshot` (see the module documentation).
pub fn blockdev_snapshot(bl: &BlockLayer, args: &Args<'_>) -> Res {
    snapshot_prepare(bl, args)?;
    Ok(json!({}))
}

/// A snapshot taken: the node, its overlay and the overlay's backing edge,
/// for [`snapshot_undo`].
pub type Snapshot = (Rc<Node>, Rc<Node>, Rc<crate::graph::child::Child>);

/// Takes the snapshot `args` ask for.
pub fn snapshot_prepare(bl: &BlockLayer, args: &Args<'_>) -> Result<Snapshot, QmpError> {
    let name = args.str("node")?;
    let overlay_name = args.str("overlay")?;
    args.check_known(&["node", "overlay"])?;
    let reg = bl.registry();
    let node = reg
        .lookup(Some(name), Some(name))
        .map_err(QmpError::generic)?;
    let Some(overlay) = reg.find_node(overlay_name) else {
        return Err(QmpError::generic(format!(
            "Cannot find node with node-name='{overlay_name}'"
        )));
    };
    if overlay.driver_name() != "qcow2" {
        return Err(QmpError::generic(format!(
            "Driver '{}' of node '{overlay_name}' does not support backing files",
            overlay.driver_name()
        )));
    }
    if overlay.has_backend() {
        return Err(QmpError::generic(format!(
            "The overlay '{overlay_name}' is already in use"
        )));
    }
    if overlay.child("backing").is_some() {
        return Err(QmpError::generic(format!(
            "The overlay '{overlay_name}' already has a backing image"
        )));
    }
    let (node2, overlay2) = (node.clone(), overlay.clone());
    let r = bl.wait(async move {
        let drained = Drained::begin(&node2).await;
        let r = append(&node2, &overlay2).await;
        drained.end();
        r
    })?;
    let edge = r.map_err(QmpError::generic)?;
    Ok((node, overlay, edge))
}

/// Undoes a snapshot (QEMU: `external_snapshot_abort`): the node takes
/// the overlay's place again and is no longer its backing file.
pub async fn snapshot_undo(snap: Snapshot) {
    let (node, overlay, edge) = snap;
    let drained = Drained::begin(&overlay).await;
    let r = replace_node(&overlay, &node, |c| core::ptr::eq(c, &*edge)).await;
    drained.end();
    if let Err(e) = r {
        log::error!(
            "transaction abort: node '{}' not restored: {e}",
            node.name()
        );
        return;
    }
    detach_child(&edge);
    node.unref_nonfinal();
}

/// QEMU's `bdrv_append`: `node` becomes the backing file of `overlay`, and
/// `overlay` takes `node`'s place in every user.
async fn append(
    node: &Rc<Node>,
    overlay: &Rc<Node>,
) -> Result<Rc<crate::graph::child::Child>, String> {
    node.ref_();
    let edge = match attach_node_child(overlay, "backing", ChildRole::COW, node) {
        Ok(e) => e,
        Err(e) => {
            node.unref_nonfinal();
            return Err(e.to_string());
        }
    };
    // The new backing edge stays (its parent is the overlay itself).
    if let Err(e) = replace_node(node, overlay, |_| false).await {
        detach_child(&edge);
        node.unref_nonfinal();
        return Err(e.to_string());
    }
    Ok(edge)
}
