//! blockhaus's platform-free core.
//!
//! Everything a storage appliance decides lives here, with no knowledge of
//! hardware: the QMP wire protocol and command layer ([`qmp`]), and (as the
//! issues land) QEMU's block graph — nodes, backends, permissions, refcounts,
//! jobs, the NBD server engine and the close-all sequence. The crate is
//! `no_std + alloc`, has no `unsafe`, and is tested on the host with
//! `cargo test -p block`.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod backend;
pub mod blockdev;
pub mod child;
pub mod close_all;
pub mod cmdline;
pub mod commands;
pub mod driver;
pub mod drivers;
pub mod event;
pub mod exec;
pub mod export;
pub mod io;
pub mod job;
pub mod jobs;
pub mod keyval;
pub mod layer;
pub mod nbd;
pub mod node;
pub mod object;
pub mod open;
pub mod options;
pub mod permission;
pub mod qemu_io;
pub mod qmp;
pub mod query;
pub mod registry;
#[cfg(test)]
mod tests;
pub mod timer;
