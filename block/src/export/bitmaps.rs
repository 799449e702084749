//! The `qemu:` metadata contexts of an NBD export (QEMU: the `bitmaps`
//! and `allocation-depth` members of `BlockExportOptionsNbd`,
//! `nbd_export_create`, `bitmap_to_extents` and `blockalloc_to_extents`
//! in `nbd/server.c`).
//!
//! An exported bitmap is found when the export is made: a plain name on
//! the exported node or the first node below it (through filters and
//! backing files) that has one of that name, or `{node, name}` anywhere.
//! It is busy while the export lives, so no command can change or remove
//! it under a client. `qemu:allocation-depth` tells for each extent which
//! layer of the backing chain holds it.

use alloc::format;
use alloc::rc::{Rc, Weak};
use alloc::string::String;
use alloc::vec::Vec;

use crate::dirty_bitmap::check;
use crate::graph::node::Node;
use crate::graph::registry::Registry;
use crate::io::{IoError, IoResult};
use crate::nbd::Descriptor;
use crate::nbd::wire::state;

/// A bitmap as `block-export-add` names it (QEMU:
/// `BlockDirtyBitmapOrStr`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapRef {
    /// A name, looked up on the exported node and below it.
    Local(String),
    /// A bitmap of a named node.
    External { node: String, name: String },
}

/// A bitmap an export offers as `qemu:dirty-bitmap:NAME`.
pub struct ExportedBitmap {
    pub node: Weak<Node>,
    pub name: String,
}

/// The node below `n` that a lookup continues on (QEMU:
/// `bdrv_filter_or_cow_bs`): a filter's primary child, else the backing
/// file.
fn below(n: &Node) -> Option<Rc<Node>> {
    if n.driver().is_filter() {
        n.file().map(|c| c.node().clone())
    } else {
        n.child("backing").map(|c| c.node().clone())
    }
}

/// Finds every bitmap of `refs` for an export of `node` (writable or
/// not), with QEMU's checks and texts, and marks them busy; on error none
/// is marked.
pub fn claim(
    registry: &Registry,
    node: &Rc<Node>,
    writable: bool,
    refs: &[BitmapRef],
) -> Result<Vec<ExportedBitmap>, String> {
    let mut found: Vec<(Rc<Node>, String)> = Vec::new();
    for r in refs {
        let (holder, name) = match r {
            BitmapRef::Local(name) => {
                let mut at = Some(node.clone());
                let holder = loop {
                    match at {
                        None => return Err(format!("Bitmap '{name}' is not found")),
                        Some(n) if n.dirty_bitmaps().iter().any(|b| b.name == *name) => break n,
                        Some(n) => at = below(&n),
                    }
                };
                let enabled = holder
                    .dirty_bitmaps()
                    .iter()
                    .any(|b| b.name == *name && b.enabled);
                if !writable && !holder.read_only() && enabled {
                    return Err(format!(
                        "Enabled bitmap '{name}' incompatible with readonly export"
                    ));
                }
                (holder, name.clone())
            }
            BitmapRef::External { node, name } => {
                let holder = registry
                    .lookup(Some(node), Some(node))
                    .map_err(|_| format!("Node '{node}' not found"))?;
                if !holder.dirty_bitmaps().iter().any(|b| b.name == *name) {
                    return Err(format!("Dirty bitmap '{name}' not found"));
                }
                (holder, name.clone())
            }
        };
        if let Some(b) = holder.dirty_bitmaps().iter().find(|b| b.name == name) {
            b.check(check::ALLOW_RO)?;
        }
        found.push((holder, name));
    }
    // Busy in a separate pass, as QEMU does: nothing to roll back.
    Ok(found
        .into_iter()
        .map(|(n, name)| {
            set_busy(&n, &name, true);
            ExportedBitmap {
                node: Rc::downgrade(&n),
                name,
            }
        })
        .collect())
}

fn set_busy(node: &Node, name: &str, busy: bool) {
    if let Some(b) = node.dirty_bitmaps_mut().iter_mut().find(|b| b.name == name) {
        b.busy = busy;
    }
}

/// The export is gone: its bitmaps are free again.
pub fn release(bitmaps: &[ExportedBitmap]) {
    for b in bitmaps {
        if let Some(n) = b.node.upgrade() {
            set_busy(&n, &b.name, false);
        }
    }
}

/// `[offset, offset + len)` of the bitmap as clean (0) and dirty
/// (`NBD_STATE_DIRTY`) extents (QEMU: `bitmap_to_extents`).
pub fn dirty_extents(b: &ExportedBitmap, offset: u64, len: u64) -> IoResult<Vec<Descriptor>> {
    let node = b.node.upgrade().ok_or(IoError::Enomedium)?;
    let list = node.dirty_bitmaps();
    let bm = list
        .iter()
        .find(|x| x.name == b.name)
        .ok_or(IoError::Einval)?;
    let end = offset.saturating_add(len).min(bm.bitmap.len());
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        match bm.bitmap.next_dirty(at, end - at) {
            Some((start, n)) if start < end => {
                let stop = start.saturating_add(n).min(end);
                let clean = start.max(at) - at;
                if clean > 0 {
                    out.push(Descriptor {
                        length: clean,
                        flags: 0,
                    });
                }
                out.push(Descriptor {
                    length: stop - start.max(at),
                    flags: state::DIRTY,
                });
                at = stop;
            }
            _ => {
                out.push(Descriptor {
                    length: end - at,
                    flags: 0,
                });
                at = end;
            }
        }
    }
    Ok(out)
}

/// Extents of `[offset, offset + len)` by the depth of the layer that
/// holds them: 1 for `top` itself, 2 for its backing file, …, 0 for
/// nowhere in the chain (QEMU: `blockalloc_to_extents`, the depth
/// `bdrv_is_allocated_above` finds).
pub async fn allocation_depth(top: &Rc<Node>, offset: u64, len: u64) -> IoResult<Vec<Descriptor>> {
    let end = offset.saturating_add(len);
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        let mut n = end - at;
        let mut depth = 0u32;
        let mut layer = Some(top.clone());
        let mut d = 1u32;
        while let Some(l) = layer {
            let st = l.block_status(at, n).await?;
            if st.len > 0 {
                if st.allocated {
                    n = n.min(st.len);
                    depth = d;
                    break;
                }
                n = n.min(st.len);
            }
            layer = below(&l);
            d += 1;
        }
        out.push(Descriptor {
            length: n,
            flags: depth,
        });
        at += n;
    }
    Ok(out)
}
