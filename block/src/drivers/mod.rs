//! The built-in drivers. Protocol: `null-co`/`null-aio`. Format: `raw`.
//! Filters: `blkdebug`, `copy-on-read`, `throttle`, `quorum`. The kernel adds
//! its device drivers (`virtio-blk`, …) with
//! [`crate::layer::BlockLayer::register_driver`].

pub mod blkdebug;
pub mod copy_on_read;
pub mod null;
pub mod qcow2;
pub mod quorum;
pub mod raw;
pub mod throttle;
pub mod throttle_group;

use alloc::vec;
use alloc::vec::Vec;

use crate::open::DriverClass;

/// Every built-in driver class.
pub fn builtin() -> Vec<DriverClass> {
    vec![
        null::null_co(),
        null::null_aio(),
        raw::class(),
        qcow2::class(),
        blkdebug::class(),
        copy_on_read::class(),
        throttle::class(),
        quorum::class(),
    ]
}
