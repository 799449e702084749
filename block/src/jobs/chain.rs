//! The backing chain as stream and commit see it (QEMU: `bdrv_backing_chain_next`,
//! `bdrv_chain_contains`, `bdrv_find_base`, `bdrv_is_allocated_above`).
//!
//! A node's backing file is its `backing` child. Allocation is asked of
//! each layer with block-status: a layer that does not hold an extent
//! itself says *unallocated* and its reads fall through to the layer below.

use alloc::rc::Rc;
use alloc::vec::Vec;

use crate::graph::node::Node;
use crate::io::IoResult;

/// The node's backing file (QEMU: `backing_bs`).
pub fn backing(node: &Node) -> Option<Rc<Node>> {
    node.child("backing").map(|c| c.node().clone())
}

/// `top` and every backing file below it, top first.
pub fn chain(top: &Rc<Node>) -> Vec<Rc<Node>> {
    let mut v = Vec::new();
    let mut n = Some(top.clone());
    while let Some(x) = n {
        n = backing(&x);
        v.push(x);
    }
    v
}

/// Whether `node` is `top` or below it in the backing chain (QEMU:
/// `bdrv_chain_contains`).
pub fn chain_contains(top: &Rc<Node>, node: &Rc<Node>) -> bool {
    chain(top).iter().any(|n| Rc::ptr_eq(n, node))
}

/// The bottom of the chain (QEMU: `bdrv_find_base`).
pub fn find_base(top: &Rc<Node>) -> Rc<Node> {
    chain(top).pop().unwrap_or_else(|| top.clone())
}

/// The node whose backing file is `node`, searching from `top` (QEMU:
/// `bdrv_find_overlay`).
pub fn find_overlay(top: &Rc<Node>, node: &Rc<Node>) -> Option<Rc<Node>> {
    chain(top)
        .into_iter()
        .find(|n| backing(n).is_some_and(|b| Rc::ptr_eq(&b, node)))
}

/// Whether the extent at `offset` is allocated in `top` or any layer
/// above `base` (exclusive; `None`: the whole chain), and for how many
/// bytes that answer holds (QEMU: `bdrv_is_allocated_above`).
pub async fn allocated_above(
    top: &Rc<Node>,
    base: Option<&Rc<Node>>,
    offset: u64,
    len: u64,
) -> IoResult<(bool, u64)> {
    let mut n = len;
    for layer in chain(top) {
        if base.is_some_and(|b| Rc::ptr_eq(b, &layer)) {
            break;
        }
        let st = layer.block_status(offset, n).await?;
        if st.len == 0 {
            // Past this layer's end: nothing allocated here.
            continue;
        }
        if st.allocated {
            return Ok((true, st.len.min(n)));
        }
        n = n.min(st.len);
    }
    Ok((false, n.max(1)))
}
