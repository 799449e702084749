//! `copy-on-read` (QEMU: `block/copy-on-read.c`): a filter whose reads copy
//! data that its child does not hold itself (block-status *unallocated*)
//! into the child, with WRITE_UNCHANGED writes, so later reads find it
//! there. Writes pass through.

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::driver::BlockDriver;
use crate::graph::child::Child;
use crate::graph::node::Node;
use crate::graph::permission::{ChildRole, Perm, filter_default_perms};
use crate::io::{BoxFuture, IoResult, ReqFlags};
use crate::open::{DriverClass, DriverOpts, Opener};
use crate::qmp::QmpError;

/// `copy-on-read`.
pub fn class() -> DriverClass {
    DriverClass::new("copy-on-read", parse)
}

/// The driver (stateless).
pub struct CopyOnRead;

fn parse(d: &mut DriverOpts<'_, '_>) -> Result<Opener, QmpError> {
    d.child("file", ChildRole::FILTERED | ChildRole::PRIMARY)?;
    Ok(Box::new(|_| {
        Ok(Box::new(CopyOnRead) as Box<dyn BlockDriver>)
    }))
}

impl BlockDriver for CopyOnRead {
    fn format_name(&self) -> &str {
        "copy-on-read"
    }

    fn read<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: usize,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Vec<u8>>> {
        Box::pin(async move {
            let file = node.file().ok_or(crate::io::IoError::Enomedium)?;
            let end = offset + len as u64;
            let mut out = Vec::with_capacity(len);
            let mut off = offset;
            while off < end {
                let st = file.block_status(off, end - off).await?;
                let n = st.len.clamp(1, end - off);
                let data = file.read(off, n as usize, flags).await?;
                if !st.allocated {
                    file.write(off, data.clone(), ReqFlags::WRITE_UNCHANGED)
                        .await?;
                }
                out.extend_from_slice(&data);
                off += n;
            }
            Ok(out)
        })
    }

    fn supported_write_flags(&self) -> ReqFlags {
        ReqFlags::FUA | ReqFlags::MAY_UNMAP | ReqFlags::WRITE_UNCHANGED
    }

    /// QEMU's `cor_child_perm`: pass through, plus WRITE_UNCHANGED for the
    /// copies.
    fn child_perm(&self, node: &Node, _: &Child, perm: Perm, shared: Perm) -> (Perm, Perm) {
        let (p, s) = filter_default_perms(perm, shared);
        if node.read_only() {
            (p, s)
        } else {
            (p | Perm::WRITE_UNCHANGED, s)
        }
    }

    fn is_filter(&self) -> bool {
        true
    }
}
