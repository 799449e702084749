//! The block graph (QEMU: `block.c`, `block/block-backend.c`): nodes and
//! their refcounts ([`node`]), the edges between them ([`child`]), the
//! backends through which users reach a tree ([`backend`]), the registry
//! that lists them all ([`registry`]), the permission rules on every edge
//! ([`permission`]) and the one graph rewrite, replacing a node in its
//! parents ([`replace`]).
//!
//! These modules refer to each other as QEMU's `BlockDriverState`,
//! `BdrvChild` and `BlockBackend` do: a node knows its parents' edges, a
//! backend its root edge, the registry every node and backend. Nothing here
//! knows about jobs, exports or QMP; those sit above the graph and use it.

pub mod backend;
pub mod child;
pub mod node;
pub mod permission;
pub mod registry;
pub mod replace;
