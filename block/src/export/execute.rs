//! One NBD request executed on an export's backend (QEMU:
//! `nbd_handle_request` in `nbd/server.c`): a read, write, flush, trim,
//! write-zeroes, cache or block-status command becomes the backend call
//! that serves it, and its result the engine's [`Completion`].
//!
//! The policy lives here once: a trim with FUA is a discard followed by a
//! flush, a cache request succeeds without doing anything, and a backend
//! with no allocation information reports its whole range as data. A
//! block status request for the `qemu:` contexts too is answered per
//! context ([`Target::context_status`]).

use alloc::vec;
use alloc::vec::Vec;
use core::future::Future;

use super::bitmaps;
use super::table::NbdExport;
use crate::graph::backend::Backend;
use crate::io::{BlockStatus, IoError, IoResult, ReqFlags};
use crate::nbd::extents::allocation_flags;
use crate::nbd::{Completion, Descriptor, MetaContext, Op};

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
    /// Consecutive extents of context `ctx` from `offset` (raw: length
    /// and the context's flags). The default answers `base:allocation`
    /// from [`Target::block_status`] and nothing else.
    fn context_status(
        &self,
        ctx: &MetaContext,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = IoResult<Vec<Descriptor>>> {
        let base = *ctx == MetaContext::BaseAllocation;
        async move {
            if !base {
                return Err(IoError::Enotsup);
            }
            let v = self.block_status(offset, len).await?;
            Ok(if v.first().is_some_and(|s| s.len > 0) {
                v.iter()
                    .map(|s| Descriptor {
                        length: s.len,
                        flags: allocation_flags(s),
                    })
                    .collect()
            } else {
                vec![Descriptor {
                    length: len,
                    flags: 0,
                }]
            })
        }
    }
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

/// An export: its backend, and its `qemu:` contexts.
impl Target for NbdExport {
    async fn read(&self, offset: u64, len: u64) -> IoResult<Completion> {
        Target::read(&*self.backend, offset, len).await
    }
    async fn write(&self, offset: u64, data: Vec<u8>, flags: ReqFlags) -> IoResult<()> {
        Backend::write(&self.backend, offset, data, flags).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> IoResult<()> {
        Backend::write_zeroes(&self.backend, offset, len, flags).await
    }
    async fn discard(&self, offset: u64, len: u64) -> IoResult<()> {
        Backend::discard(&self.backend, offset, len).await
    }
    async fn flush(&self) -> IoResult<()> {
        Backend::flush(&self.backend).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> IoResult<Vec<BlockStatus>> {
        Target::block_status(&*self.backend, offset, len).await
    }
    async fn context_status(
        &self,
        ctx: &MetaContext,
        offset: u64,
        len: u64,
    ) -> IoResult<Vec<Descriptor>> {
        match ctx {
            MetaContext::BaseAllocation => {
                let v = Target::block_status(self, offset, len).await?;
                Ok(v.iter()
                    .map(|s| Descriptor {
                        length: s.len,
                        flags: allocation_flags(s),
                    })
                    .collect())
            }
            MetaContext::AllocationDepth if self.allocation_depth => {
                let node = self.backend.root_node().ok_or(IoError::Enomedium)?;
                bitmaps::allocation_depth(&node, offset, len).await
            }
            MetaContext::DirtyBitmap(name) => {
                let b = self
                    .bitmaps
                    .iter()
                    .find(|b| b.name == *name)
                    .ok_or(IoError::Einval)?;
                bitmaps::dirty_extents(b, offset, len)
            }
            MetaContext::AllocationDepth => Err(IoError::Einval),
        }
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
        Op::BlockStatus {
            offset,
            len,
            contexts,
            ..
        } if contexts
            .iter()
            .any(|(_, c)| *c != MetaContext::BaseAllocation) =>
        {
            let mut out = Vec::with_capacity(contexts.len());
            for (id, c) in contexts {
                match target.context_status(&c, offset, len).await {
                    Ok(v) => out.push((id, v)),
                    Err(e) => return Completion::Error(e),
                }
            }
            Completion::Contexts(out)
        }
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
