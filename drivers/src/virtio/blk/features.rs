//! virtio-blk feature bits and configuration space (virtio 1.2 §5.2.3-4),
//! and the limits they give a disk. The conversion is pure and host-tested.

use crate::virtio::{DiskInfo, Limits};

pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_TOPOLOGY: u64 = 1 << 10;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

/// Everything the driver accepts (plus INDIRECT_DESC and VERSION_1, which
/// the transport adds). MQ is accepted, and the driver uses queue 0 only.
pub const WANTED: u64 = F_SIZE_MAX
    | F_SEG_MAX
    | F_RO
    | F_BLK_SIZE
    | F_FLUSH
    | F_TOPOLOGY
    | F_MQ
    | F_DISCARD
    | F_WRITE_ZEROES;

/// `struct virtio_blk_config` offsets.
pub mod offset {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const PHYSICAL_BLOCK_EXP: usize = 24;
    pub const OPT_IO_SIZE: usize = 28;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
}

/// The driver's own cap on one read or write request (Linux's
/// `max_sectors_kb` plays this role): bigger transfers are split, so one
/// client cannot hold the device for long.
pub const DRIVER_MAX_TRANSFER: u32 = 1 << 20;

/// The raw configuration fields the driver reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub features: u64,
    /// In 512-byte sectors.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub opt_io_size: u32,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub queue_size: u16,
}

impl Config {
    fn has(&self, f: u64) -> bool {
        self.features & f != 0
    }

    /// The disk these fields describe (the serial comes from GET_ID).
    pub fn disk_info(&self) -> DiskInfo {
        let block_size = if self.has(F_BLK_SIZE) && self.blk_size.is_power_of_two() {
            self.blk_size.max(512)
        } else {
            512
        };
        let physical_block_size = if self.has(F_TOPOLOGY) && self.physical_block_exp < 16 {
            block_size << self.physical_block_exp
        } else {
            block_size
        };
        let max_segment = if self.has(F_SIZE_MAX) && self.size_max >= 512 {
            self.size_max
        } else {
            u32::MAX
        };
        let max_segments = if self.has(F_SEG_MAX) {
            self.seg_max.max(1)
        } else {
            1
        };
        let transfer = u64::from(max_segment)
            .saturating_mul(u64::from(max_segments))
            .min(u64::from(DRIVER_MAX_TRANSFER)) as u32;
        let max_transfer = (transfer / block_size * block_size).max(block_size);
        // 0 sectors means "no limit given": the field's maximum.
        let sectors = |n: u32| u64::from(if n == 0 { u32::MAX } else { n }) * 512;
        let max_discard = if self.has(F_DISCARD) {
            sectors(self.max_discard_sectors) / u64::from(block_size) * u64::from(block_size)
        } else {
            0
        };
        let max_write_zeroes = if self.has(F_WRITE_ZEROES) {
            sectors(self.max_write_zeroes_sectors) / u64::from(block_size) * u64::from(block_size)
        } else {
            0
        };
        DiskInfo {
            serial: Default::default(),
            model: Default::default(),
            capacity: self.capacity.saturating_mul(512),
            block_size,
            physical_block_size,
            read_only: self.has(F_RO),
            flush: self.has(F_FLUSH),
            limits: Limits {
                max_transfer,
                max_segment,
                max_segments,
                max_discard,
                discard_alignment: self.discard_sector_alignment.saturating_mul(512),
                max_write_zeroes,
                optimal_transfer: if self.has(F_TOPOLOGY) {
                    self.opt_io_size.saturating_mul(block_size)
                } else {
                    0
                },
                queue_size: self.queue_size,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What QEMU 7.2's virtio-blk-pci offers for a raw file by default.
    fn qemu_default() -> Config {
        Config {
            features: F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_TOPOLOGY | F_DISCARD | F_WRITE_ZEROES,
            capacity: 2048,
            seg_max: 254,
            blk_size: 512,
            max_discard_sectors: 0x3f_ffff,
            discard_sector_alignment: 1,
            max_write_zeroes_sectors: 0x3f_ffff,
            queue_size: 256,
            ..Config::default()
        }
    }

    #[test]
    fn qemu_defaults_give_the_expected_limits() {
        let d = qemu_default().disk_info();
        assert_eq!(d.capacity, 1 << 20);
        assert_eq!(d.block_size, 512);
        assert!(!d.read_only);
        assert!(d.flush);
        assert_eq!(d.limits.max_transfer, DRIVER_MAX_TRANSFER);
        assert_eq!(d.limits.max_segments, 254);
        assert_eq!(d.limits.max_discard, 0x3f_ffff * 512);
        assert_eq!(d.limits.discard_alignment, 512);
        assert_eq!(d.limits.queue_size, 256);
    }

    #[test]
    fn features_not_offered_turn_limits_off() {
        let c = Config {
            features: F_RO,
            capacity: 8,
            blk_size: 4096,
            ..Config::default()
        };
        let d = c.disk_info();
        assert!(d.read_only);
        assert!(!d.flush);
        assert_eq!(d.block_size, 512, "BLK_SIZE not negotiated");
        assert_eq!(d.limits.max_discard, 0);
        assert_eq!(d.limits.max_write_zeroes, 0);
        assert_eq!(d.limits.max_segments, 1);
    }

    #[test]
    fn size_max_and_seg_max_bound_the_transfer() {
        let c = Config {
            features: F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_TOPOLOGY,
            size_max: 65536,
            seg_max: 4,
            blk_size: 4096,
            physical_block_exp: 1,
            opt_io_size: 16,
            ..Config::default()
        };
        let d = c.disk_info();
        assert_eq!(d.limits.max_transfer, 4 * 65536);
        assert_eq!(d.limits.max_segment, 65536);
        assert_eq!(d.block_size, 4096);
        assert_eq!(d.physical_block_size, 8192);
        assert_eq!(d.limits.optimal_transfer, 16 * 4096);
    }
}
