//! blockhaus's platform-free core.
//!
//! Everything a storage appliance decides lives here, with no knowledge of
//! hardware: QEMU's block graph, its jobs and drivers, the NBD server
//! engine and the QMP control plane. The crate is `no_std + alloc`, has no
//! `unsafe`, and is tested on the host with `cargo test -p block`. The
//! kernel supplies the executor's wake-ups, the clock, the device drivers
//! and the sockets.
//!
//! # Where things are
//!
//! **[`graph`]** — the block graph proper, QEMU's `block.c` and
//! `block-backend.c`: nodes and their refcounts ([`graph::node`]; a node
//! closes when [`graph::node::unref`] takes its refcount to zero), child
//! edges ([`graph::child`]), permissions ([`graph::permission`]), backends
//! ([`graph::backend`]: eject is [`graph::backend::Backend::remove`], drain
//! is [`graph::backend::Backend::drained_begin`] and
//! [`graph::backend::Drained`]), the registry with the all-nodes and
//! monitor-owned lists ([`graph::registry`]:
//! [`graph::registry::Registry::monitor_adopt`]), and
//! [`graph::replace`] (`bdrv_replace_node`). Nothing in it knows jobs,
//! exports or QMP.
//!
//! **[`driver`]** and **[`drivers`]** — the [`driver::BlockDriver`] trait
//! every node's driver implements (a filter forwards what it does not
//! override), and the built-in drivers: `null-co`, `raw`, `qcow2`,
//! `quorum`, and the filters `blkdebug`, `copy-on-read`, `throttle`.
//!
//! **[`align`]** — requests on devices with a block size (QEMU's
//! `request_alignment`): read-modify-write of partial blocks, serialised
//! against overlapping requests by a tracked-request list.
//!
//! **[`job`]** and **[`jobs`]** — the job framework above the graph
//! (QEMU's `job.c`: states, verbs, `job-cancel` is [`job::Job::cancel`] and
//! close-all's is [`job::Job::cancel_sync`]) and the block jobs on it:
//! mirror, backup, stream, commit, with their filters and QMP commands.
//!
//! **[`close_all`]** — the shutdown sequence (QEMU: `bdrv_close_all`):
//! quiesce users, cancel every job, eject every backend, drop the
//! monitor's references, and check that every node closed by its
//! refcount.
//!
//! **[`nbd`]** — the NBD server engine, sans I/O: wire layout, typed
//! requests and replies, the per-connection state machine, exports.
//!
//! **[`qmp`]** — QMP itself, sans I/O: JSON framing, sessions,
//! dispatch, errors and events. The block layer's commands are in
//! [`commands`] (the table), [`blockdev`] (`blockdev-add`/`-del`, medium
//! commands), [`query`], [`stats`] (I/O accounting, `query-blockstats`),
//! [`object`] and [`qemu_io`] (`human-monitor-command`); [`schema`] holds
//! the QAPI types and events their signatures name.
//!
//! **The rest, one concern each** — [`layer`] (the block layer as one
//! value), [`open`], [`options`] and [`keyval`] (opening nodes from
//! options), [`cmdline`] (boot configuration), [`io`] (the request model),
//! [`exec`] and [`timer`] (the executor and its clock), [`event`] (QMP
//! events of the block layer).
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod align;
pub mod blockdev;
pub mod close_all;
pub mod cmdline;
pub mod commands;
pub mod dirty_bitmap;
pub mod dirty_bitmap_commands;
pub mod driver;
pub mod drivers;
pub mod event;
pub mod exec;
pub mod export;
pub mod graph;
pub mod io;
pub mod job;
pub mod jobs;
pub mod keyval;
pub mod layer;
pub mod nbd;
pub mod object;
pub mod open;
pub mod options;
pub mod qemu_io;
pub mod qmp;
pub mod query;
pub mod schema;
pub mod stats;
#[cfg(test)]
mod tests;
pub mod timer;
pub mod tls_creds;
pub mod trace;
pub mod transaction;
