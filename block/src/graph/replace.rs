//! Replacing a node by another in its parents (QEMU: `bdrv_replace_node`,
//! `bdrv_replace_child_noperm`, `should_update_child`).
//!
//! Jobs use it to insert their filter above a node (`mirror_top`,
//! `copy-before-write`, …), to take it out again, and to pivot (a mirror's
//! `job-complete` puts the target where the source was). Every parent edge
//! of `from` — a node's child edge or a backend's root — is re-created
//! pointing at `to`, with the same name, role and (for backends)
//! permissions; a backend's user sees no eject and no ENOMEDIUM. Edges
//! whose parent is `to` itself or lies below `to` stay where they are: moving
//! them would make a cycle (QEMU skips them the same way). Callers hold a
//! drained section so that no request crosses the edges while they move.

use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use crate::graph::child::{Child, Parent, attach_backend_root, attach_node_child, detach_child};
use crate::graph::node::{Node, unref};

/// Why a node could not be replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplaceError {
    /// A parent refused the new node (permissions); every edge moved so far
    /// was moved back.
    Attach(String),
}

impl fmt::Display for ReplaceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplaceError::Attach(e) => f.write_str(e),
        }
    }
}

/// Whether `to` reaches `from` through child edges.
pub fn reaches(from: &Rc<Node>, to: &Rc<Node>) -> bool {
    Rc::ptr_eq(from, to) || from.children().iter().any(|c| reaches(c.node(), to))
}

/// Re-creates `edge` (a parent edge of `edge.node()`) pointing at `to`.
/// The caller holds one reference on `to` for the new edge; on failure it
/// still does.
fn move_edge(edge: &Rc<Child>, to: &Rc<Node>) -> Result<Rc<Child>, String> {
    match edge.parent() {
        Parent::Node(w) => {
            let Some(p) = w.upgrade() else {
                return Err("parent node is gone".into());
            };
            detach_child(edge);
            match attach_node_child(&p, edge.name(), edge.role(), to) {
                Ok(new) => Ok(new),
                Err(e) => {
                    // Put the old edge back (same node, it still holds
                    // the reference it had).
                    if let Err(e2) = attach_node_child(&p, edge.name(), edge.role(), edge.node()) {
                        log::error!("replace: could not restore edge '{}': {e2}", edge.name());
                    }
                    Err(e.to_string())
                }
            }
        }
        Parent::Backend(w) => {
            let Some(b) = w.upgrade() else {
                return Err("parent backend is gone".into());
            };
            detach_child(edge);
            match attach_backend_root(&b, to, edge.perm(), edge.shared()) {
                Ok(new) => {
                    b.swap_root(new.clone());
                    Ok(new)
                }
                Err(e) => {
                    match attach_backend_root(&b, edge.node(), edge.perm(), edge.shared()) {
                        Ok(back) => {
                            b.swap_root(back);
                        }
                        Err(e2) => log::error!("replace: could not restore a root edge: {e2}"),
                    }
                    Err(e.to_string())
                }
            }
        }
    }
}

/// Moves the parents of `from` for which `keep` is false to `to` (QEMU:
/// `bdrv_replace_node`). All or nothing: on a refusal every edge moved so
/// far goes back. Returns how many edges moved.
pub async fn replace_node(
    from: &Rc<Node>,
    to: &Rc<Node>,
    keep: impl Fn(&Child) -> bool,
) -> Result<usize, ReplaceError> {
    let edges: Vec<Rc<Child>> = from
        .parents()
        .into_iter()
        .filter(|e| !keep(e))
        .filter(|e| match e.parent_node() {
            Some(p) => !reaches(to, &p),
            None => true,
        })
        .collect();
    let mut moved: Vec<Rc<Child>> = Vec::new();
    for e in &edges {
        to.ref_();
        match move_edge(e, to) {
            Ok(new) => moved.push(new),
            Err(msg) => {
                to.unref_nonfinal();
                // Each edge moved back takes over the reference its
                // original edge held on `from`.
                for m in moved.into_iter().rev() {
                    match move_edge(&m, from) {
                        Ok(_) => {
                            to.unref_nonfinal();
                        }
                        Err(e) => log::error!("replace: rollback of '{}' failed: {e}", m.name()),
                    }
                }
                return Err(ReplaceError::Attach(msg));
            }
        }
    }
    // The old edges' references on `from` go now (which may close it).
    for _ in 0..moved.len() {
        unref(from.clone()).await;
    }
    Ok(moved.len())
}
