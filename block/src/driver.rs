//! The driver interface of a node (QEMU: `BlockDriver`'s function pointers
//! together with the per-node `bs->opaque` state).
//!
//! One [`BlockDriver`] value is the driver *instance* of one node. Protocol
//! drivers (`null-co`, and in the kernel `virtio-blk`/`virtio-scsi`) talk to
//! a device; format and filter drivers (`raw`, `quorum`, `throttle`, …) turn
//! a request into requests on their children through the child edges
//! ([`crate::graph::child::Child`]), which carry the permission checks.
//!
//! Methods receive the node they belong to, so a driver can find its
//! children (`node.file()`, `node.children()`) without keeping references
//! of its own: when the node is closed its edges go away with it. The
//! generic layer in [`crate::graph::node::Node`] does what is common to all drivers
//! (in-flight accounting, read-only checks, zero-fill past the end,
//! `detect-zeroes`, FUA emulation, write-zeroes fallback) before calling
//! these methods.
//!
//! A filter ([`BlockDriver::is_filter`]: `copy-on-read`, `throttle`,
//! `blkdebug`, the jobs' filters) overrides only what it changes: every
//! request method it leaves out goes to its primary child unchanged
//! ([`forward`]), as QEMU's generic layer falls back to `bdrv_filter_bs`
//! for a filter without `bdrv_co_truncate` or `bdrv_co_block_status`.
//! For any other driver `get_length`, `read` and `write` are the minimum it
//! must implement.
//!
//! # A protocol driver from outside the crate
//! ```
//! use block::driver::BlockDriver;
//! use block::io::{BoxFuture, IoResult, ReqFlags};
//! use block::graph::node::Node;
//!
//! struct Disk { len: u64 }
//! impl BlockDriver for Disk {
//!     fn format_name(&self) -> &str { "virtio-blk" }
//!     fn get_length(&self, _: &Node) -> IoResult<u64> { Ok(self.len) }
//!     fn read<'a>(&'a self, _: &'a Node, _off: u64, len: usize, _: ReqFlags)
//!         -> BoxFuture<'a, IoResult<Vec<u8>>> {
//!         // Queue a request, keep the buffer until the device completes,
//!         // store the Waker; the completion poll wakes this future.
//!         Box::pin(async move { Ok(vec![0; len]) })
//!     }
//!     fn write<'a>(&'a self, _: &'a Node, _off: u64, _data: Vec<u8>, _: ReqFlags)
//!         -> BoxFuture<'a, IoResult<()>> {
//!         Box::pin(async { Ok(()) })
//!     }
//! }
//! ```

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use crate::graph::child::Child;
use crate::graph::node::Node;
use crate::graph::permission::{Perm, default_perms};
use crate::io::{BlockStatus, BoxFuture, IoError, IoResult, ReqFlags};

/// A ready future.
pub fn ready<'a, T: 'a>(v: T) -> BoxFuture<'a, T> {
    Box::pin(core::future::ready(v))
}

/// The driver instance of one node.
pub trait BlockDriver: core::any::Any {
    /// The driver's name as QMP reports it (`"drv"`, `format_name`).
    fn format_name(&self) -> &str;

    /// The node's length in bytes (QEMU: `bdrv_co_getlength`). A filter
    /// forwards it by default.
    fn get_length(&self, node: &Node) -> IoResult<u64> {
        if self.is_filter() {
            forward::get_length(node)
        } else {
            Err(IoError::Enotsup)
        }
    }

    /// Finishes opening once the node exists with its children attached
    /// (QEMU: a format driver's `bdrv_open`, which runs in a coroutine and
    /// reads its metadata through `bs->file`). An error closes the node
    /// again and fails the open with that text.
    fn open<'a>(&'a self, node: &'a alloc::rc::Rc<Node>) -> BoxFuture<'a, Result<(), String>> {
        let _ = node;
        ready(Ok(()))
    }

    /// Reads `len` bytes at `offset` (within the length; the generic layer
    /// zero-fills what lies beyond). Must return exactly `len` bytes. A
    /// filter forwards it by default.
    fn read<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: usize,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<Vec<u8>>> {
        if self.is_filter() {
            forward::read(node, offset, len, flags)
        } else {
            ready(Err(IoError::Enotsup))
        }
    }

    /// Writes `data` at `offset`. A filter forwards it by default.
    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        if self.is_filter() {
            forward::write(node, offset, data, flags)
        } else {
            ready(Err(IoError::Enotsup))
        }
    }

    /// Flags `write`/`write_zeroes` honour natively (QEMU:
    /// `supported_write_flags`); FUA is emulated by a flush otherwise.
    fn supported_write_flags(&self) -> ReqFlags {
        ReqFlags::NONE
    }

    /// Makes written data durable in this driver's own layer (QEMU:
    /// `bdrv_co_flush_to_disk`). The generic layer then flushes the
    /// children the node writes to, unless [`flushes_children`] says the
    /// driver did.
    ///
    /// [`flushes_children`]: BlockDriver::flushes_children
    fn flush<'a>(&'a self, node: &'a Node) -> BoxFuture<'a, IoResult<()>> {
        let _ = node;
        ready(Ok(()))
    }

    /// Whether [`flush`](BlockDriver::flush) already flushed the children
    /// (QEMU: a driver with `bdrv_co_flush`, like quorum's voting flush).
    fn flushes_children(&self) -> bool {
        false
    }

    /// Discards a range (advisory; ENOTSUP is ignored by the generic layer).
    /// A filter forwards it by default.
    fn discard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFuture<'a, IoResult<()>> {
        if self.is_filter() {
            forward::discard(node, offset, len)
        } else {
            ready(Err(IoError::Enotsup))
        }
    }

    /// Writes zeroes efficiently; ENOTSUP makes the generic layer write a
    /// buffer of zeroes instead (unless `NO_FALLBACK`). A filter forwards
    /// it by default.
    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFuture<'a, IoResult<()>> {
        if self.is_filter() {
            forward::write_zeroes(node, offset, len, flags)
        } else {
            ready(Err(IoError::Enotsup))
        }
    }

    /// The status of the extent at `offset` (at most `len` bytes). The
    /// default, as QEMU's for drivers without `bdrv_co_block_status`, is
    /// allocated data; a filter's is its primary child's.
    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, IoResult<BlockStatus>> {
        if self.is_filter() {
            forward::block_status(node, offset, len)
        } else {
            ready(Ok(BlockStatus::data(len)))
        }
    }

    /// Rewrites the backing file name and format recorded in the image
    /// (QEMU: `bdrv_change_backing_file`), as stream and commit do when
    /// they drop layers; `None` records no backing file. ENOTSUP for
    /// drivers without backing files.
    fn change_backing_file<'a>(
        &'a self,
        node: &'a Node,
        file: Option<&'a str>,
        format: Option<&'a str>,
    ) -> BoxFuture<'a, IoResult<()>> {
        let _ = (node, file, format);
        ready(Err(IoError::Enotsup))
    }

    /// Changes the length (QEMU: `bdrv_co_truncate`). A filter forwards it
    /// by default.
    fn truncate<'a>(&'a self, node: &'a Node, size: u64) -> BoxFuture<'a, IoResult<()>> {
        if self.is_filter() {
            forward::truncate(node, size)
        } else {
            ready(Err(IoError::Enotsup))
        }
    }

    /// Stores what the driver keeps in memory until the node closes (QEMU:
    /// `drv->bdrv_inactivate`, e.g. qcow2's persistent dirty bitmaps);
    /// called once when the node closes, before its final flush. The
    /// driver logs its own failures.
    fn inactivate<'a>(&'a self, node: &'a Node) -> BoxFuture<'a, IoResult<()>> {
        let _ = node;
        ready(Ok(()))
    }

    /// The driver's cluster size, if it has one (QEMU: `bdrv_get_info`'s
    /// `cluster_size`; the default granularity of new bitmaps follows it).
    fn cluster_size(&self, node: &Node) -> Option<u64> {
        let _ = node;
        None
    }

    /// Whether a new persistent dirty bitmap `name` can be stored by this
    /// driver (QEMU: `bdrv_can_store_new_dirty_bitmap`); the error is the
    /// reason, without the node name.
    fn can_store_new_dirty_bitmap(
        &self,
        node: &Node,
        name: &str,
        granularity: u64,
    ) -> Result<(), String> {
        let _ = (name, granularity);
        Err(alloc::format!(
            "Can't store persistent bitmaps to {}: Operation not supported",
            node.name()
        ))
    }

    /// Takes the persistent bitmap `name` out of the image now (QEMU:
    /// `bdrv_co_remove_persistent_dirty_bitmap`), before the node drops it.
    fn remove_persistent_dirty_bitmap<'a>(
        &'a self,
        node: &'a Node,
        name: &'a str,
    ) -> BoxFuture<'a, IoResult<()>> {
        let _ = (node, name);
        ready(Ok(()))
    }

    /// Stops waiting on what may never come (QEMU: `bdrv_cancel_in_flight`,
    /// which the halt calls on every node): a driver whose requests wait
    /// for a remote server to come back fails those waits now and starts
    /// no new attempt. Requests already sent are left to complete.
    fn cancel_in_flight(&self, node: &Node) {
        let _ = node;
    }

    /// Releases driver state; called once, after the final flush and before
    /// the child edges are dropped (QEMU: `bdrv_close`'s `drv->bdrv_close`).
    fn close(&self, node: &Node) {
        let _ = node;
    }

    /// The permissions this node needs on `child` and shares on it, given
    /// the cumulative `perm`/`shared` of this node's own parents (QEMU:
    /// `bdrv_child_perm`).
    fn child_perm(&self, node: &Node, child: &Child, perm: Perm, shared: Perm) -> (Perm, Perm) {
        default_perms(child.role(), !node.read_only(), perm, shared)
    }

    /// The alignment, in bytes, that requests on this node are best made
    /// in (QEMU: `bl.request_alignment`). Any request still works: a node
    /// over a device pads what is not aligned. A protocol node over a
    /// device reports its logical block size, a filter its primary
    /// child's, anything else (formats, which handle any byte) 1.
    fn request_alignment(&self, node: &Node) -> u64 {
        if self.is_filter() {
            node.file().map_or(1, |c| c.node().request_alignment())
        } else {
            1
        }
    }

    /// Whether this is a filter (QEMU: `is_filter`): its primary child holds
    /// exactly its data.
    fn is_filter(&self) -> bool {
        false
    }

    /// The node's filename, for protocol drivers (`null-co://`); `None`
    /// derives it from the primary child or the open options (QEMU:
    /// `bdrv_refresh_filename` and its `json:{…}` pseudo-filenames).
    fn filename(&self, node: &Node) -> Option<String> {
        let _ = node;
        None
    }

    /// Edge name for a child added by `x-blockdev-change` (QEMU:
    /// `bdrv_add_child`), or why it is refused.
    fn add_child_name(&self, node: &Node, child: &Node) -> Result<String, ChildChangeError> {
        let _ = (node, child);
        Err(ChildChangeError::AddUnsupported)
    }

    /// Called after the child named by [`add_child_name`] was attached.
    ///
    /// [`add_child_name`]: BlockDriver::add_child_name
    fn child_added(&self, node: &Node, child: &Child) {
        let _ = (node, child);
    }

    /// Whether `child` may be removed by `x-blockdev-change` (QEMU:
    /// `bdrv_del_child`).
    fn can_del_child(&self, node: &Node, child: &Child) -> Result<(), ChildChangeError> {
        let _ = (node, child);
        Err(ChildChangeError::DelUnsupported)
    }

    /// Called after `child` was detached by `x-blockdev-change`.
    fn child_removed(&self, node: &Node, child: &Child) {
        let _ = (node, child);
    }

    /// Driver-specific details for `query-named-block-nodes` (merged into
    /// the node's `image` info, as QEMU's `format-specific`).
    fn query_info(&self, node: &Node) -> Option<serde_json::Value> {
        let _ = node;
        None
    }
}

/// Why `x-blockdev-change` cannot change a node's children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildChangeError {
    /// The driver cannot add children.
    AddUnsupported,
    /// The driver cannot remove children.
    DelUnsupported,
    /// The driver refused, with QEMU's message.
    Refused(String),
}

/// The request on the primary child: a filter's default for every request
/// method, and the building blocks of drivers that forward with a change
/// (`raw`'s offset, `throttle`'s wait, `blkdebug`'s injected errors).
pub mod forward {
    use super::*;

    fn primary(node: &Node) -> IoResult<alloc::rc::Rc<Child>> {
        node.file().ok_or(IoError::Enomedium)
    }

    /// Length of the primary child.
    pub fn get_length(node: &Node) -> IoResult<u64> {
        primary(node)?.node().get_length()
    }

    /// Read from the primary child.
    pub fn read(
        node: &Node,
        offset: u64,
        len: usize,
        flags: ReqFlags,
    ) -> BoxFuture<'_, IoResult<Vec<u8>>> {
        Box::pin(async move { primary(node)?.read(offset, len, flags).await })
    }

    /// Write to the primary child.
    pub fn write(
        node: &Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFuture<'_, IoResult<()>> {
        Box::pin(async move { primary(node)?.write(offset, data, flags).await })
    }

    /// Discard on the primary child.
    pub fn discard(node: &Node, offset: u64, len: u64) -> BoxFuture<'_, IoResult<()>> {
        Box::pin(async move { primary(node)?.discard(offset, len).await })
    }

    /// Write-zeroes on the primary child.
    pub fn write_zeroes(
        node: &Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFuture<'_, IoResult<()>> {
        Box::pin(async move { primary(node)?.write_zeroes(offset, len, flags).await })
    }

    /// Block status of the primary child.
    pub fn block_status(
        node: &Node,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, IoResult<BlockStatus>> {
        Box::pin(async move { primary(node)?.block_status(offset, len).await })
    }

    /// Truncate the primary child.
    pub fn truncate(node: &Node, size: u64) -> BoxFuture<'_, IoResult<()>> {
        Box::pin(async move { primary(node)?.truncate(size).await })
    }
}
