//! One NBD request executed on an export's backend (QEMU:
//! `nbd_handle_request` in `nbd/server.c`): a read, write, flush, trim,
//! write-zeroes, cache or block-status command becomes the backend call
//! that serves it, and its result the engine's [`Completion`].
//!
//! The policy lives here once: a trim with FUA is a discard followed by a
//! flush, a cache request succeeds without doing anything, and a backend
//! with no allocation information reports its whole range as data.

use alloc::vec;
use alloc::vec::Vec;
use core::future::Future;

use crate::graph::backend::Backend;
use crate::io::{BlockStatus, IoResult, ReqFlags};
use crate::nbd::{Completion, Op};

/// What an export's requests run on: the export's [`Backend`] (QEMU: the
/// `BlockBackend` the NBD server calls `blk_co_*` on). The host adapter in
/// `tests/` supplies its own sparse memory and file stores.
pub trait Target {
    /// A read: [`Completion::Data`], or [`Completion::Zero`] /
    /// [`Completion::Chunks`] where the target knows its holes.
    fn read(&self, offset: u64, len: u64) -> impl Future<Output = IoResult<Completion>>;
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> impl Future<Output = IoResult<()>>;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> impl Future<Output = IoResult<()>>;
    fn discard(&self, offset: u64, len: u64) -> impl Future<Output = IoResult<()>>;
    fn flush(&self) -> impl Future<Output = IoResult<()>>;
    /// Consecutive extents from `offset` (an error, none, or an empty
    /// first one: no allocation information).
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = IoResult<Vec<BlockStatus>>>;
}

impl Target for Backend {
    async fn read(&self, offset: u64, len: u64) -> IoResult<Completion> {
        Backend::read(self, offset, len as usize)
            .await
            .map(Completion::Data)
    }
    async fn write(&self, offset: u64, data: Vec<u8>, flags: ReqFlags) -> IoResult<()> {
        Backend::write(self, offset, data, flags).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoResult<()> {
        Backend::write_zeroes(self, offset, len, flags).await
    }
    async fn discard(&self, offset: u64, len: u64) -> IoResult<()> {
        Backend::discard(self, offset, len).await
    }
    async fn flush(&self) -> IoResult<()> {
        Backend::flush(self).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> IoResult<Vec<BlockStatus>> {
        Backend::block_status(self, offset, len)
            .await
            .map(|s| vec![s])
    }
}

fn done(r: IoResult<()>) -> Completion {
    match r {
        Ok(()) => Completion::Done,
        Err(e) => Completion::Error(e),
    }
}

/// Runs one request against `target`.
pub async fn execute<T: Target + ?Sized>(target: &T, op: Op) -> Completion {
    match op {
        Op::Read { offset, len } => target
            .read(offset, len)
            .await
            .unwrap_or_else(Completion::Error),
        Op::Write {
            offset,
            data,
            flags,
        } => done(target.write(offset, data, flags).await),
        Op::Flush => done(target.flush().await),
        Op::Trim { offset, len, flags } => {
            let r = target.discard(offset, len).await;
            if r.is_ok() && flags.contains(ReqFlags::FUA) {
                done(target.flush().await)
            } else {
                done(r)
            }
        }
        Op::WriteZeroes { offset, len, flags } => {
            done(target.write_zeroes(offset, len, flags).await)
        }
        Op::Cache { .. } => Completion::Done,
        Op::BlockStatus { offset, len, .. } => match target.block_status(offset, len).await {
            Ok(mut v) if v.first().is_some_and(|s| s.len > 0) => {
                if v.len() == 1 {
                    Completion::Extent(v.remove(0))
                } else {
                    Completion::Extents(v)
                }
            }
            // No allocation information: all data.
            _ => Completion::Extent(BlockStatus::data(len)),
        },
    }
}
