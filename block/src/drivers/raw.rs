//! `raw` (QEMU: `block/raw-format.c`): the identity format, optionally a
//! window of `size` bytes at `offset` into its `file`.
//!
//! Without `offset`/`size` it passes everything through and its file is a
//! *filtered* child; with them the file is a *data* child and the window is
//! enforced: writes beyond it fail with ENOSPC, nothing outside it can be
//! read or written.

use alloc::boxed::Box;
use alloc::format;
use alloc::vec::Vec;

use crate::driver::{BlockDriver, forward};
use crate::graph::child::Child;
use crate::graph::node::Node;
use crate::graph::permission::{ChildRole, Perm, default_perms};
use crate::io::{BlockStatus, BoxFuture, IoError, IoResult, ReqFlags};
use crate::open::{DriverClass, DriverOpts, Opener};
use crate::qmp::QmpError;

/// `raw`.
pub fn class() -> DriverClass {
    DriverClass::new("raw", parse)
}

/// QEMU's `BDRV_SECTOR_SIZE`.
const SECTOR: u64 = 512;

/// One raw node.
pub struct Raw {
    offset: u64,
    size: Option<u64>,
}

fn non_negative(d: &DriverOpts<'_, '_>, key: &str) -> Result<Option<u64>, QmpError> {
    match d.opts.opt_i64(key)? {
        Some(v) if v < 0 => Err(QmpError::invalid_parameter_value(
            &d.opts.full_name(key),
            "a non-negative value",
        )),
        v => Ok(v.map(|v| v as u64)),
    }
}

fn parse(d: &mut DriverOpts<'_, '_>) -> Result<Opener, QmpError> {
    let offset = non_negative(d, "offset")?;
    let size = non_negative(d, "size")?;
    let role = if offset.is_some_and(|o| o > 0) || size.is_some() {
        ChildRole::DATA | ChildRole::PRIMARY
    } else {
        ChildRole::FILTERED | ChildRole::PRIMARY
    };
    d.child("file", role)?;
    let offset = offset.unwrap_or(0);
    Ok(Box::new(move |ctx| {
        let file = ctx.child("file").ok_or("raw: no file child")?;
        let real = file
            .get_length()
            .map_err(|e| format!("Could not get the size of the file: {e}"))?;
        if offset > real {
            return Err(format!(
                "Offset ({offset}) cannot be greater than size of the containing file ({real})"
            ));
        }
        if let Some(size) = size {
            if real - offset < size {
                return Err(format!(
                    "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  actual size of the containing file ({real})"
                ));
            }
            if size % SECTOR != 0 {
                return Err(format!("Specified size is not multiple of {SECTOR}"));
            }
        }
        Ok(Box::new(Raw { offset, size }) as Box<dyn BlockDriver>)
    }))
}

impl Raw {
    /// QEMU's `raw_adjust_offset`.
    fn adjust(&self, offset: u64, len: u64, write: bool) -> IoResult<u64> {
        if let Some(size) = self.size
            && (offset > size || len > size - offset)
        {
            return Err(if write {
                IoError::Enospc
            } else {
                IoError::Einval
            });
        }
        offset.checked_add(self.offset).ok_or(IoError::Einval)
    }
}

impl BlockDriver for Raw {
    fn format_name(&self) -> &str {
        "raw"
    }

    fn get_length(&self, node: &Node) -> IoResult<u64> {
        match self.size {
            Some(s) => Ok(s),
            None => Ok(forward::get_length(node)?.saturating_sub(self.offset)),
        }
    }

    /// The file's alignment when the window starts on it (QEMU's raw
    /// format reports 1 and pads at the file; passing the device's block
    /// size up lets an NBD client over raw align its requests too).
    fn request_alignment(&self, node: &Node) -> u64 {
        let file = node.file().map_or(1, |c| c.node().request_alignment());
        if self.offset.is_multiple_of(file) {
            file
        } else {
            1
        }
    }

    fn read<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: usize,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Vec<u8>>> {
        match self.adjust(offset, len as u64, false) {
            Ok(o) => forward::read(node, o, len, flags),
            Err(e) => crate::driver::ready(Err(e)),
        }
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        match self.adjust(offset, data.len() as u64, true) {
            Ok(o) => forward::write(node, o, data, flags),
            Err(e) => crate::driver::ready(Err(e)),
        }
    }

    fn supported_write_flags(&self) -> ReqFlags {
        ReqFlags::FUA | ReqFlags::MAY_UNMAP
    }

    fn discard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFuture<'a, IoResult<()>> {
        match self.adjust(offset, len, true) {
            Ok(o) => forward::discard(node, o, len),
            Err(e) => crate::driver::ready(Err(e)),
        }
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        match self.adjust(offset, len, true) {
            Ok(o) => forward::write_zeroes(node, o, len, flags),
            Err(e) => crate::driver::ready(Err(e)),
        }
    }

    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, IoResult<BlockStatus>> {
        match self.adjust(offset, len, false) {
            Ok(o) => forward::block_status(node, o, len),
            Err(e) => crate::driver::ready(Err(e)),
        }
    }

    fn truncate<'a>(&'a self, node: &'a Node, size: u64) -> BoxFuture<'a, IoResult<()>> {
        if self.size.is_some() {
            return crate::driver::ready(Err(IoError::Enotsup));
        }
        match size.checked_add(self.offset) {
            Some(s) => forward::truncate(node, s),
            None => crate::driver::ready(Err(IoError::Einval)),
        }
    }

    /// QEMU's `raw_child_perm`: the default, but WRITE and RESIZE only when
    /// the parents need them.
    fn child_perm(&self, node: &Node, child: &Child, perm: Perm, shared: Perm) -> (Perm, Perm) {
        let (p, s) = default_perms(child.role(), !node.read_only(), perm, shared);
        let wr = Perm::WRITE | Perm::RESIZE;
        (p.minus(wr) | perm.and(wr), s)
    }
}
