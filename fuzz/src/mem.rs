//! `fuzz-mem`: a protocol driver over bytes the fuzz target owns, so a
//! format driver (qcow2) opens the fuzzer's image as it would a file.
//! Writes past the end grow it, up to [`MAX`].

use std::cell::RefCell;
use std::rc::Rc;

use block::driver::{BlockDriver, ready};
use block::graph::node::Node;
use block::io::{BlockStatus, BoxFuture, IoError, IoResult, ReqFlags};
use block::open::DriverClass;

/// The largest the bytes may grow to.
pub const MAX: usize = 64 << 20;

/// The image a `fuzz-mem` node reads and writes.
pub type Bytes = Rc<RefCell<Vec<u8>>>;

/// The `fuzz-mem` driver class over `bytes`.
pub fn class(bytes: Bytes) -> DriverClass {
    DriverClass::new("fuzz-mem", move |_| {
        let bytes = bytes.clone();
        Ok(Box::new(move |_| {
            Ok(Box::new(Mem { bytes }) as Box<dyn BlockDriver>)
        }))
    })
}

struct Mem {
    bytes: Bytes,
}

impl Mem {
    fn range(&self, offset: u64, len: usize, grow: bool) -> IoResult<(usize, usize)> {
        let start = usize::try_from(offset).map_err(|_| IoError::Eio)?;
        let end = start.checked_add(len).ok_or(IoError::Eio)?;
        let mut b = self.bytes.borrow_mut();
        if end > b.len() {
            if !grow || end > MAX {
                return Err(IoError::Eio);
            }
            b.resize(end, 0);
        }
        Ok((start, end))
    }
}

impl BlockDriver for Mem {
    fn format_name(&self) -> &str {
        "fuzz-mem"
    }

    fn get_length(&self, _: &Node) -> IoResult<u64> {
        Ok(self.bytes.borrow().len() as u64)
    }

    fn read<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        len: usize,
        _: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Vec<u8>>> {
        ready(
            self.range(offset, len, false)
                .map(|(s, e)| self.bytes.borrow()[s..e].to_vec()),
        )
    }

    fn write<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        data: Vec<u8>,
        _: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        ready(
            self.range(offset, data.len(), true)
                .map(|(s, e)| self.bytes.borrow_mut()[s..e].copy_from_slice(&data)),
        )
    }

    fn flush<'a>(&'a self, _: &'a Node) -> BoxFuture<'a, IoResult<()>> {
        ready(Ok(()))
    }

    fn write_zeroes<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        len: u64,
        _: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        let len = usize::try_from(len).map_err(|_| IoError::Eio);
        ready(len.and_then(|len| {
            self.range(offset, len, true)
                .map(|(s, e)| self.bytes.borrow_mut()[s..e].fill(0))
        }))
    }

    fn truncate<'a>(&'a self, _: &'a Node, size: u64) -> BoxFuture<'a, IoResult<()>> {
        ready(match usize::try_from(size) {
            Ok(n) if n <= MAX => {
                self.bytes.borrow_mut().resize(n, 0);
                Ok(())
            }
            _ => Err(IoError::Enospc),
        })
    }

    fn block_status<'a>(
        &'a self,
        _: &'a Node,
        _: u64,
        len: u64,
    ) -> BoxFuture<'a, IoResult<BlockStatus>> {
        ready(Ok(BlockStatus::data(len)))
    }

    fn filename(&self, _: &Node) -> Option<String> {
        Some("fuzz-mem://".into())
    }
}
