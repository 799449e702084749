//! The dirty bitmap QMP commands (QEMU 7.2: `block-dirty-bitmap-add`,
//! `-remove`, `-clear`, `-enable`, `-disable`, `-merge` from
//! `qapi/block-core.json`, implemented in
//! `block/monitor/bitmap-qmp-cmds.c`), with QEMU's argument checks and
//! error texts. The bitmaps themselves are in [`crate::dirty_bitmap`].

use alloc::format;
use alloc::rc::Rc;
use alloc::string::ToString;

use serde_json::{Value, json};

use crate::dirty_bitmap::{NamedBitmap, check};
use crate::graph::node::Node;
use crate::layer::BlockLayer;
use crate::qmp::{Args, QmpError};

type Res = Result<Value, QmpError>;

/// `BDRV_BITMAP_MAX_NAME_SIZE`.
const MAX_NAME: usize = 1023;

fn ok() -> Res {
    Ok(json!({}))
}

/// QEMU's `block_dirty_bitmap_lookup`: the node and the bitmap's index.
fn lookup(bl: &BlockLayer, node: &str, name: &str) -> Result<(Rc<Node>, usize), QmpError> {
    let n = bl
        .registry()
        .lookup(Some(node), Some(node))
        .map_err(|_| QmpError::generic(format!("Node '{node}' not found")))?;
    let i = position(&n, name)?;
    Ok((n, i))
}

/// Where bitmap `name` is in `n`'s list.
fn position(n: &Node, name: &str) -> Result<usize, QmpError> {
    n.dirty_bitmaps()
        .iter()
        .position(|b| b.name == name)
        .ok_or_else(|| QmpError::generic(format!("Dirty bitmap '{name}' not found")))
}

/// Runs `f` on the bitmap once `flags` allow its use.
fn with_bitmap(
    bl: &BlockLayer,
    args: &Args<'_>,
    flags: u8,
    f: impl FnOnce(&mut NamedBitmap),
) -> Res {
    let node = args.str("node")?;
    let name = args.str("name")?;
    args.check_known(&["node", "name"])?;
    let (n, i) = lookup(bl, node, name)?;
    let mut list = n.dirty_bitmaps_mut();
    let b = &mut list[i];
    b.check(flags).map_err(QmpError::generic)?;
    f(b);
    ok()
}

/// `block-dirty-bitmap-add`.
pub fn add(bl: &BlockLayer, args: &Args<'_>) -> Res {
    let node = args.str("node")?;
    let name = args.str("name")?;
    let granularity = args.opt_u32("granularity")?;
    let persistent = args.opt_bool("persistent")?.unwrap_or(false);
    let disabled = args.opt_bool("disabled")?.unwrap_or(false);
    args.check_known(&["node", "name", "granularity", "persistent", "disabled"])?;
    if name.is_empty() {
        return Err(QmpError::generic("Bitmap name cannot be empty"));
    }
    let n = bl
        .registry()
        .lookup(Some(node), Some(node))
        .map_err(QmpError::generic)?;
    let granularity = match granularity {
        Some(g) if g < 512 || !g.is_power_of_two() => {
            return Err(QmpError::generic(
                "Granularity must be power of 2 and at least 512",
            ));
        }
        Some(g) => u64::from(g),
        // QEMU's `bdrv_get_default_bitmap_granularity`.
        None => n
            .driver()
            .cluster_size(&n)
            .map_or(65536, |cs| cs.clamp(4096, 65536)),
    };
    if persistent {
        n.driver()
            .can_store_new_dirty_bitmap(&n, name, granularity)
            .map_err(QmpError::generic)?;
    }
    if n.dirty_bitmaps().iter().any(|b| b.name == name) {
        return Err(QmpError::generic(format!("Bitmap already exists: {name}")));
    }
    if name.len() > MAX_NAME {
        return Err(QmpError::generic(format!("Bitmap name too long: {name}")));
    }
    let len = n
        .get_length()
        .map_err(|e| QmpError::generic(format!("Unable to get image size: {e}")))?;
    let mut b = NamedBitmap::new(name, len, granularity);
    b.enabled = !disabled;
    b.persistent = persistent;
    n.dirty_bitmaps_mut().push(b);
    ok()
}

/// `block-dirty-bitmap-remove`.
pub fn remove(bl: &BlockLayer, args: &Args<'_>) -> Res {
    let node = args.str("node")?;
    let name = args.str("name")?;
    args.check_known(&["node", "name"])?;
    let (n, i) = lookup(bl, node, name)?;
    let persistent = {
        let list = n.dirty_bitmaps();
        list[i]
            .check(check::BUSY | check::RO)
            .map_err(QmpError::generic)?;
        list[i].persistent
    };
    if persistent {
        let nn = n.clone();
        let owned = name.to_string();
        let r = bl.wait(async move {
            nn.driver()
                .remove_persistent_dirty_bitmap(&nn, &owned)
                .await
        })?;
        r.map_err(|e| {
            QmpError::generic(format!(
                "Failed to remove bitmap '{name}' from '{node}': {e}"
            ))
        })?;
    }
    // Found again: the list may have changed while the image was written.
    n.dirty_bitmaps_mut().retain(|b| b.name != name);
    ok()
}

/// `block-dirty-bitmap-clear`.
pub fn clear(bl: &BlockLayer, args: &Args<'_>) -> Res {
    with_bitmap(bl, args, check::DEFAULT, |b| b.bitmap.clear())
}

/// `block-dirty-bitmap-enable`.
pub fn enable(bl: &BlockLayer, args: &Args<'_>) -> Res {
    with_bitmap(bl, args, check::ALLOW_RO, |b| b.enabled = true)
}

/// `block-dirty-bitmap-disable`.
pub fn disable(bl: &BlockLayer, args: &Args<'_>) -> Res {
    with_bitmap(bl, args, check::ALLOW_RO, |b| b.enabled = false)
}

/// `block-dirty-bitmap-merge`: the union of `bitmaps` (names on `node`, or
/// `{node, name}` anywhere) into `target`; `target` is unchanged on error.
pub fn merge(bl: &BlockLayer, args: &Args<'_>) -> Res {
    let node = args.str("node")?;
    let target = args.str("target")?;
    let sources = args.array("bitmaps")?;
    args.check_known(&["node", "target", "bitmaps"])?;
    let (n, ti) = lookup(bl, node, target)?;
    let (mut anon, dst_len) = {
        let list = n.dirty_bitmaps();
        let dst = &list[ti];
        let mut a = dst.bitmap.clone();
        a.clear();
        (a, dst.bitmap.len())
    };
    for (i, v) in sources.iter().enumerate() {
        let (src_node, idx) = match v {
            Value::String(s) => (n.clone(), position(&n, s)?),
            Value::Object(m) => {
                let e = Args::new(m);
                let en = e.str("node")?;
                let ename = e.str("name")?;
                e.check_known(&["node", "name"])?;
                lookup(bl, en, ename)?
            }
            _ => {
                return Err(QmpError::invalid_parameter_type(
                    &args.element_name("bitmaps", i),
                    "BlockDirtyBitmapOrStr",
                ));
            }
        };
        // QEMU's `bdrv_merge_dirty_bitmap(anon, src)`: the anonymous
        // target passes its checks; the source must be usable.
        let list = src_node.dirty_bitmaps();
        let src = &list[idx];
        src.check(check::ALLOW_RO).map_err(QmpError::generic)?;
        if src.bitmap.len() != dst_len {
            return Err(QmpError::generic(format!(
                "Bitmaps are of different sizes (destination size is {dst_len}, source size is {}) and can't be merged",
                src.bitmap.len()
            )));
        }
        anon.merge(&src.bitmap);
    }
    let mut list = n.dirty_bitmaps_mut();
    let dst = &mut list[ti];
    dst.check(check::DEFAULT).map_err(QmpError::generic)?;
    dst.bitmap.merge(&anon);
    ok()
}

/// The node's bitmaps as `dirty-bitmaps` of `BlockDeviceInfo` (QEMU:
/// `bdrv_query_dirty_bitmaps`, newest first); `None` without bitmaps.
pub fn query(node: &Node) -> Option<Value> {
    let list = node.dirty_bitmaps();
    (!list.is_empty()).then(|| Value::Array(list.iter().rev().map(NamedBitmap::info).collect()))
}
