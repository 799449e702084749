//! Test-only drivers: a memory-backed protocol driver with request gates
//! and an access log, and a recording format driver.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use crate::driver::{BlockDriver, forward};
use crate::exec::WaitQueue;
use crate::graph::child::Child;
use crate::graph::node::Node;
use crate::graph::permission::{ChildRole, Perm, default_perms};
use crate::io::{BlockStatus, BoxFuture, IoError, IoResult, ReqFlags};

/// A shared log of driver events ("flush fmt", "close mem0", …).
pub type Log = Rc<RefCell<Vec<String>>>;

/// Holds requests in flight until opened.
#[derive(Default)]
pub struct Gate {
    open: Cell<bool>,
    waiting: Cell<u32>,
    q: WaitQueue,
}

impl Gate {
    pub fn closed() -> Rc<Gate> {
        Rc::new(Gate::default())
    }
    pub fn open(&self) {
        self.open.set(true);
        self.q.wake_all();
    }
    pub fn close(&self) {
        self.open.set(false);
    }
    pub fn waiting(&self) -> u32 {
        self.waiting.get()
    }
    pub async fn pass(&self) {
        self.waiting.set(self.waiting.get() + 1);
        self.q.wait_until(|| self.open.get()).await;
        self.waiting.set(self.waiting.get() - 1);
    }
}

pub const CLUSTER: u64 = 512;

/// Memory-backed protocol driver.
pub struct Mem {
    pub label: String,
    pub data: RefCell<Vec<u8>>,
    /// Per-512-byte allocation map (for block-status tests).
    pub allocated: RefCell<Vec<bool>>,
    pub log: Log,
    pub gate: RefCell<Option<Rc<Gate>>>,
    pub closed: Cell<bool>,
    pub fail_flush: Cell<bool>,
    /// Runs inside `close`, like QEMU's nested drain during bdrv_close.
    pub on_close: RefCell<Option<Box<dyn Fn()>>>,
}

impl Mem {
    pub fn new(label: &str, size: usize, log: &Log) -> Mem {
        let clusters = (size as u64).div_ceil(CLUSTER) as usize;
        Mem {
            label: label.into(),
            data: RefCell::new(vec![0; size]),
            allocated: RefCell::new(vec![true; clusters]),
            log: log.clone(),
            gate: RefCell::new(None),
            closed: Cell::new(false),
            fail_flush: Cell::new(false),
            on_close: RefCell::new(None),
        }
    }

    fn note(&self, what: &str) {
        if self.closed.get() {
            self.log
                .borrow_mut()
                .push(format!("USE-AFTER-CLOSE {what} {}", self.label));
        }
    }

    async fn gate(&self) {
        let g = self.gate.borrow().clone();
        if let Some(g) = g {
            g.pass().await;
        }
    }

    fn mark(&self, offset: u64, len: u64, allocated: bool) {
        let mut a = self.allocated.borrow_mut();
        let first = offset / CLUSTER;
        let last = (offset + len).div_ceil(CLUSTER);
        for c in first..last {
            if let Some(x) = a.get_mut(c as usize) {
                *x = allocated;
            }
        }
    }
}

impl BlockDriver for Mem {
    fn format_name(&self) -> &str {
        "mem"
    }
    fn get_length(&self, _: &Node) -> IoResult<u64> {
        Ok(self.data.borrow().len() as u64)
    }
    fn read<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        len: usize,
        _: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Vec<u8>>> {
        Box::pin(async move {
            self.note("read");
            self.gate().await;
            self.note("read-complete");
            let d = self.data.borrow();
            let o = offset as usize;
            d.get(o..o + len).map(<[u8]>::to_vec).ok_or(IoError::Eio)
        })
    }
    fn write<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        data: Vec<u8>,
        _: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            self.note("write");
            self.gate().await;
            self.note("write-complete");
            let mut d = self.data.borrow_mut();
            let o = offset as usize;
            let dst = d.get_mut(o..o + data.len()).ok_or(IoError::Enospc)?;
            dst.copy_from_slice(&data);
            drop(d);
            self.mark(offset, data.len() as u64, true);
            Ok(())
        })
    }
    fn flush<'a>(&'a self, _: &'a Node) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            self.note("flush");
            self.log.borrow_mut().push(format!("flush {}", self.label));
            if self.fail_flush.get() {
                Err(IoError::Eio)
            } else {
                Ok(())
            }
        })
    }
    fn discard<'a>(&'a self, _: &'a Node, offset: u64, len: u64) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            let mut d = self.data.borrow_mut();
            let o = offset as usize;
            let dst = d.get_mut(o..o + len as usize).ok_or(IoError::Einval)?;
            dst.fill(0);
            drop(d);
            self.mark(offset, len, false);
            Ok(())
        })
    }
    fn write_zeroes<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            let mut d = self.data.borrow_mut();
            let o = offset as usize;
            let dst = d.get_mut(o..o + len as usize).ok_or(IoError::Enospc)?;
            dst.fill(0);
            drop(d);
            self.mark(offset, len, !flags.contains(ReqFlags::MAY_UNMAP));
            Ok(())
        })
    }
    fn block_status<'a>(
        &'a self,
        _: &'a Node,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, IoResult<BlockStatus>> {
        Box::pin(async move {
            let a = self.allocated.borrow();
            let first = (offset / CLUSTER) as usize;
            let state = a.get(first).copied().unwrap_or(true);
            let mut end = (first as u64 + 1) * CLUSTER;
            while end < offset + len && a.get((end / CLUSTER) as usize).copied() == Some(state) {
                end += CLUSTER;
            }
            let n = core::cmp::min(end, offset + len) - offset;
            Ok(if state {
                BlockStatus::data(n)
            } else {
                BlockStatus {
                    data: false,
                    zero: true,
                    allocated: false,
                    len: n,
                }
            })
        })
    }
    fn truncate<'a>(&'a self, _: &'a Node, size: u64) -> BoxFuture<'a, IoResult<()>> {
        Box::pin(async move {
            self.data.borrow_mut().resize(size as usize, 0);
            self.allocated
                .borrow_mut()
                .resize(size.div_ceil(CLUSTER) as usize, true);
            Ok(())
        })
    }
    fn close(&self, _: &Node) {
        self.note("close");
        if let Some(hook) = self.on_close.borrow().as_ref() {
            hook();
        }
        self.closed.set(true);
        self.log.borrow_mut().push(format!("close {}", self.label));
    }
    fn filename(&self, _: &Node) -> Option<String> {
        Some(format!("mem://{}", self.label))
    }
}

/// A format driver that passes I/O through to `file` and records its
/// flushes and close; its `file` child is data + metadata, so like qcow2 it
/// takes WRITE and RESIZE on a writable file and shares neither.
pub struct RecFmt {
    pub label: String,
    pub log: Log,
}

impl BlockDriver for RecFmt {
    fn format_name(&self) -> &str {
        "recfmt"
    }
    fn get_length(&self, node: &Node) -> IoResult<u64> {
        forward::get_length(node)
    }
    fn read<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: usize,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Vec<u8>>> {
        forward::read(node, offset, len, flags)
    }
    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        forward::write(node, offset, data, flags)
    }
    fn flush<'a>(&'a self, _: &'a Node) -> BoxFuture<'a, IoResult<()>> {
        self.log.borrow_mut().push(format!("flush {}", self.label));
        crate::driver::ready(Ok(()))
    }
    fn close(&self, node: &Node) {
        // Like qcow2's close, the child must still be there and open.
        let child_open = node
            .file()
            .is_some_and(|c| c.node().state() == crate::graph::node::NodeState::Open);
        self.log
            .borrow_mut()
            .push(format!("close {} (file open: {child_open})", self.label));
    }
    fn child_perm(&self, node: &Node, child: &Child, perm: Perm, shared: Perm) -> (Perm, Perm) {
        default_perms(child.role(), !node.read_only(), perm, shared)
    }
}

/// The role `RecFmt` gives its file.
pub fn fmt_file() -> ChildRole {
    ChildRole::DATA | ChildRole::METADATA | ChildRole::PRIMARY
}

extern crate std;
std::thread_local! {
    /// The log of `mem` nodes opened through `blockdev-add`.
    pub static LOG: Log = Log::default();
    /// The drivers of `mem` nodes opened through `blockdev-add`, by label.
    pub static OPENED: RefCell<Vec<(String, Rc<Gate>)>> = RefCell::default();
}

fn parse_mem(
    d: &mut crate::open::DriverOpts<'_, '_>,
) -> Result<crate::open::Opener, crate::qmp::QmpError> {
    let size = d.opts.opt_u64("size")?.unwrap_or(1 << 20) as usize;
    let label = String::from(d.opts.opt_str("label")?.unwrap_or("mem"));
    let gated = d.opts.bool_or("gated", false)?;
    let unallocated = d.opts.bool_or("unallocated", false)?;
    Ok(Box::new(move |_| {
        let log = LOG.with(|l| l.clone());
        let m = Mem::new(&label, size, &log);
        if unallocated {
            m.allocated.borrow_mut().fill(false);
        }
        if gated {
            let g = Gate::closed();
            *m.gate.borrow_mut() = Some(g.clone());
            OPENED.with(|o| o.borrow_mut().push((label.clone(), g)));
        }
        Ok(Box::new(m) as Box<dyn BlockDriver>)
    }))
}

/// `mem`: a memory node for `blockdev-add` in tests (`size`, `label`,
/// `gated`: requests wait for the gate, `unallocated`).
pub fn mem_class() -> crate::open::DriverClass {
    crate::open::DriverClass::new("mem", parse_mem)
}

/// The gate of the gated `mem` node labelled `label`.
pub fn gate(label: &str) -> Rc<Gate> {
    OPENED
        .with(|o| {
            o.borrow()
                .iter()
                .find(|(l, _)| l == label)
                .map(|(_, g)| g.clone())
        })
        .expect("no such gated mem node")
}
