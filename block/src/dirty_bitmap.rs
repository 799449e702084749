//! Named dirty bitmaps of a node (QEMU: `BdrvDirtyBitmap` in
//! `block/dirty-bitmap.c`): which chunks of the node were written since the
//! bitmap was created or cleared. Every write, write-zeroes and discard
//! that completes on the node marks its enabled bitmaps
//! ([`crate::graph::node::Node`]'s write path, as QEMU's
//! `bdrv_co_write_req_finish`).
//!
//! A `persistent` bitmap is stored by the node's format driver when the
//! node closes (qcow2: [`crate::drivers::qcow2::bitmaps`]); an
//! `inconsistent` one was found in use in an image that was not closed
//! cleanly: its content is unknown and it refuses every use but removal.

use alloc::string::String;

use crate::jobs::dirty_bitmap::DirtyBitmap;

/// One named bitmap on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedBitmap {
    /// Unique among the node's bitmaps.
    pub name: String,
    /// The dirty chunks.
    pub bitmap: DirtyBitmap,
    /// Recording writes (QEMU: not disabled).
    pub enabled: bool,
    /// Stored in the image when the node closes.
    pub persistent: bool,
    /// Found in use in the image at open: content unknown.
    pub inconsistent: bool,
    /// Used by a job or an export (QEMU: `bdrv_dirty_bitmap_busy`).
    pub busy: bool,
}

impl NamedBitmap {
    /// A clean, enabled, non-persistent bitmap over `len` bytes.
    pub fn new(name: &str, len: u64, granularity: u64) -> NamedBitmap {
        NamedBitmap {
            name: name.into(),
            bitmap: DirtyBitmap::new(len, granularity),
            enabled: true,
            persistent: false,
            inconsistent: false,
            busy: false,
        }
    }

    /// Whether writes are recorded (QEMU: `bdrv_dirty_bitmap_recording`).
    pub fn recording(&self) -> bool {
        self.enabled && !self.inconsistent
    }
}
