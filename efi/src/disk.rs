//! The kernel partition: found in the boot disk's GPT by its type GUID
//! (`harness::esp::KERNEL_TYPE`) and read in a few large requests.
//!
//! Two readers, one layout:
//! - under rust-hypervisor-firmware, whose BlockIo and File reads go one
//!   512-byte virtio-blk request per sector, the project's own virtio-blk
//!   driver ([`VirtioDisk`]) on the boot disk, taken over once the
//!   firmware has read `blockhaus.conf` and reset when done, so the kernel
//!   finds the device as the firmware left it before its first use;
//! - under any other firmware (OVMF: fast BlockIo, and a boot disk that
//!   need not be virtio-blk), BlockIo on the disk that holds our ESP
//!   ([`BlockIoDisk`]).

use alloc::vec;
use alloc::vec::Vec;
use drivers::pci::{Cam, PortIoCam};
use drivers::virtio::Op;
use drivers::virtio::blk::VirtioBlk;
use uefi::boot::{self, OpenProtocolAttributes, OpenProtocolParams, ScopedProtocol};
use uefi::proto::device_path::DevicePath;
use uefi::proto::media::block::BlockIO;
use uefi::{Guid, Handle, guid};
use virtio_drivers::transport::pci::bus::{Command, DeviceFunction, PciRoot};

use crate::payload::{self, HEADER, Header};

const SECTOR: usize = 512;
/// The kernel partition's type GUID.
const KERNEL_TYPE: Guid = guid!("2ba3f2db-0342-4948-ba28-f7e62636212a");
/// Most GPT entries we look at (128 is the usual count).
const MAX_ENTRIES: u64 = 1024;

/// A disk read in bytes, at offsets and lengths that are multiples of 512.
pub trait Disk {
    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, &'static str>;
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// The kernel partition's first byte and length, from `disk`'s GPT.
pub fn find_partition(disk: &mut dyn Disk) -> Result<(u64, u64), &'static str> {
    let gpt = disk.read(SECTOR as u64, SECTOR)?;
    if gpt.get(..8) != Some(b"EFI PART") {
        return Err("the boot disk has no GPT");
    }
    let (entries, count, size) = (u64_at(&gpt, 72), u32_at(&gpt, 80), u32_at(&gpt, 84));
    let (count, size) = (u64::from(count).min(MAX_ENTRIES), u64::from(size));
    if !(128..=4096).contains(&size) || !size.is_multiple_of(8) {
        return Err("the boot disk's GPT is damaged");
    }
    let len = (count * size).next_multiple_of(SECTOR as u64) as usize;
    let table = disk.read(entries.saturating_mul(SECTOR as u64), len)?;
    let ty = KERNEL_TYPE.to_bytes();
    table
        .chunks_exact(size as usize)
        .take(count as usize)
        .find(|e| e[..16] == ty)
        .map(|e| {
            let (first, last) = (u64_at(e, 32), u64_at(e, 40));
            let len = last.saturating_add(1).saturating_sub(first);
            (
                first.saturating_mul(SECTOR as u64),
                len.saturating_mul(SECTOR as u64),
            )
        })
        .filter(|&(_, len)| len > 0)
        .ok_or("no blockhaus kernel partition on the boot disk")
}

/// Reads the kernel partition's payload: its header, and the whole of it
/// from the partition's start (header first: the kernel is at [`HEADER`]),
/// in whole sectors.
pub fn read_kernel(disk: &mut dyn Disk) -> Result<(Header, Vec<u8>), &'static str> {
    let (start, len) = find_partition(disk)?;
    let header = payload::header(&disk.read(start, SECTOR)?)?;
    let total = (HEADER + header.kernel_len).next_multiple_of(SECTOR);
    if total as u64 > len {
        return Err(payload::CORRUPT);
    }
    let data = disk.read(start, total)?;
    Ok((header, data))
}

/// The boot disk through the project's virtio-blk driver (port-I/O PCI
/// configuration access, DMA memory from the UEFI pool: identity-mapped).
/// Dropping it resets the device.
pub struct VirtioDisk(VirtioBlk);

impl VirtioDisk {
    /// Brings up the modern virtio-blk device at `00:dev.0`, whose BARs
    /// the firmware assigned.
    pub fn open(dev: u8) -> Result<Self, &'static str> {
        // SAFETY: boot services run on one CPU and nothing else uses the
        // configuration ports while the loader runs.
        let mut root = PciRoot::new(Cam::Port(unsafe { PortIoCam::new() }));
        let df = DeviceFunction {
            bus: 0,
            device: dev,
            function: 0,
        };
        let (_, command) = root.get_status_command(df);
        root.set_command(df, command | Command::MEMORY_SPACE | Command::BUS_MASTER);
        let transport = drivers::virtio::transport::open(&mut root, df)
            .map_err(|_| "the boot disk is not a modern virtio device")?;
        VirtioBlk::new(transport)
            .map(Self)
            .map_err(|_| "cannot set up the boot disk's virtio-blk device")
    }
}

impl Disk for VirtioDisk {
    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, &'static str> {
        let id = self
            .0
            .submit(Op::Read {
                offset,
                buf: vec![0; len],
            })
            .map_err(|_| "a read beyond the boot disk's end")?;
        let mut done = Vec::new();
        // 5 s in 10 µs steps: a device that never answers fails the boot
        // rather than hanging it.
        for _ in 0..500_000 {
            if !self.0.poll(&mut done) {
                boot::stall(core::time::Duration::from_micros(10));
                continue;
            }
            if let Some(c) = done.iter().position(|c| c.id == id) {
                let c = done.swap_remove(c);
                return c
                    .result
                    .map(|()| c.buf)
                    .map_err(|_| "cannot read the boot disk");
            }
        }
        Err("the boot disk does not answer")
    }
}

/// The whole disk under `esp` (the partition we were loaded from) through
/// its BlockIo.
pub struct BlockIoDisk {
    io: ScopedProtocol<BlockIO>,
}

/// `P` on `handle`, opened without taking it from the driver that holds
/// it (an exclusive open would disconnect the partition driver, and with
/// it our own ESP).
fn get<P: uefi::proto::ProtocolPointer + ?Sized>(handle: Handle) -> Option<ScopedProtocol<P>> {
    // SAFETY: only read, and dropped before the loader leaves boot
    // services; the firmware's drivers keep their own opens.
    unsafe {
        boot::open_protocol::<P>(
            OpenProtocolParams {
                handle,
                agent: boot::image_handle(),
                controller: None,
            },
            OpenProtocolAttributes::GetProtocol,
        )
    }
    .ok()
}

/// A device path's bytes without its end node.
fn path_bytes(path: &DevicePath) -> &[u8] {
    let b = path.as_bytes();
    &b[..b.len().saturating_sub(4)]
}

impl BlockIoDisk {
    pub fn open(esp: Handle) -> Result<Self, &'static str> {
        let esp_path = get::<DevicePath>(esp).ok_or("the ESP has no device path")?;
        let esp_path = path_bytes(&esp_path);
        let handles = boot::find_handles::<BlockIO>().map_err(|_| "no BlockIo devices")?;
        for h in handles {
            let Some(path) = get::<DevicePath>(h) else {
                continue;
            };
            let path = path_bytes(&path);
            if path.len() >= esp_path.len() || !esp_path.starts_with(path) {
                continue;
            }
            let Some(io) = get::<BlockIO>(h) else {
                continue;
            };
            let media = io.media();
            if media.is_logical_partition() || !media.is_media_present() {
                continue;
            }
            if media.block_size() as usize != SECTOR || media.io_align() > 8 {
                return Err("the boot disk's blocks are not 512 bytes");
            }
            return Ok(Self { io });
        }
        Err("cannot find the disk that holds the ESP")
    }
}

impl Disk for BlockIoDisk {
    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, &'static str> {
        let mut buf = vec![0; len];
        let media = self.io.media().media_id();
        self.io
            .read_blocks(media, offset / SECTOR as u64, &mut buf)
            .map_err(|_| "cannot read the boot disk")?;
        Ok(buf)
    }
}
