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

use alloc::format;
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
    /// Loaded from an image opened read-only: cannot be changed (QEMU:
    /// `bdrv_dirty_bitmap_readonly`).
    pub readonly: bool,
    /// While a backup job uses the bitmap, `bitmap` is frozen and new
    /// writes are recorded here (QEMU: `bdrv_dirty_bitmap_create_successor`);
    /// the job's outcome decides what becomes of both
    /// ([`NamedBitmap::abdicate`], [`NamedBitmap::reclaim`]).
    pub successor: Option<DirtyBitmap>,
}

/// What [`NamedBitmap::check`] refuses (QEMU's `BDRV_BITMAP_*` flags).
pub mod check {
    /// Busy bitmaps.
    pub const BUSY: u8 = 1;
    /// Read-only bitmaps.
    pub const RO: u8 = 2;
    /// Inconsistent bitmaps.
    pub const INCONSISTENT: u8 = 4;
    /// `BDRV_BITMAP_DEFAULT`: all of them.
    pub const DEFAULT: u8 = BUSY | RO | INCONSISTENT;
    /// `BDRV_BITMAP_ALLOW_RO`.
    pub const ALLOW_RO: u8 = BUSY | INCONSISTENT;
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
            readonly: false,
            successor: None,
        }
    }

    /// Records a write: into the successor while frozen.
    pub fn record(&mut self, offset: u64, len: u64) {
        if self.recording() {
            match &mut self.successor {
                Some(s) => s.set(offset, len),
                None => self.bitmap.set(offset, len),
            }
        }
    }

    /// Freezes the bitmap for a job: busy, new writes go to a clean
    /// successor (QEMU: `bdrv_dirty_bitmap_create_successor`).
    pub fn freeze(&mut self) {
        self.successor = Some(DirtyBitmap::new(
            self.bitmap.len(),
            self.bitmap.granularity(),
        ));
        self.busy = true;
    }

    /// The successor replaces the frozen bitmap, which is dropped (QEMU:
    /// `bdrv_dirty_bitmap_abdicate`).
    pub fn abdicate(&mut self) {
        if let Some(s) = self.successor.take() {
            self.bitmap = s;
        }
        self.busy = false;
    }

    /// The successor is merged back into the frozen bitmap (QEMU:
    /// `bdrv_reclaim_dirty_bitmap`).
    pub fn reclaim(&mut self) {
        if let Some(s) = self.successor.take() {
            self.bitmap.merge(&s);
        }
        self.busy = false;
    }

    /// Refuses the use `flags` forbid, with QEMU's texts
    /// (`bdrv_dirty_bitmap_check`).
    pub fn check(&self, flags: u8) -> Result<(), String> {
        let name = &self.name;
        if flags & check::BUSY != 0 && self.busy {
            return Err(format!(
                "Bitmap '{name}' is currently in use by another operation and cannot be used"
            ));
        }
        if flags & check::RO != 0 && self.readonly {
            return Err(format!(
                "Bitmap '{name}' is readonly and cannot be modified"
            ));
        }
        if flags & check::INCONSISTENT != 0 && self.inconsistent {
            return Err(format!(
                "Bitmap '{name}' is inconsistent and cannot be used"
            ));
        }
        Ok(())
    }

    /// QEMU's `BlockDirtyInfo`.
    pub fn info(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "name": self.name,
            "count": self.bitmap.dirty_bytes(),
            "granularity": self.bitmap.granularity(),
            "recording": self.recording(),
            "busy": self.busy,
            "persistent": self.persistent,
        });
        if self.inconsistent
            && let Some(m) = v.as_object_mut()
        {
            m.insert("inconsistent".into(), serde_json::Value::Bool(true));
        }
        v
    }

    /// Whether writes are recorded (QEMU: `bdrv_dirty_bitmap_recording`).
    pub fn recording(&self) -> bool {
        self.enabled && !self.inconsistent
    }
}
