//! Host tests of the block layer that span several modules: the graph,
//! backends, jobs, close-all, drivers and QMP commands, over memory-backed
//! test drivers (which exist only here, in test code).

extern crate std;

mod backend;
mod bitmaps;
mod boot;
mod close_all;
mod drivers;
mod export;
mod export_qmp;
mod graph;
mod harness;
mod job;
mod jobs_backup;
mod jobs_backup_bitmap;
mod jobs_chain;
mod jobs_framework;
mod jobs_mirror;
mod jobs_seeded;
mod jobs_util;
mod mem;
mod qcow2;
mod qmp;
mod quorum;
mod stats;
mod trace;
mod transaction;
mod wire;
