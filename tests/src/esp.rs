//! The bootable disk image: a GPT disk (`gpt`) with an EFI System
//! Partition (FAT, `fatfs`) holding `EFI/BOOT/BOOTX64.EFI` (the UEFI loader)
//! and `blockhaus.conf`, and a second partition holding the PVH image
//! ([`KERNEL_TYPE`], [`pack_kernel`]).
//!
//! The kernel has a partition of its own rather than a file on the ESP:
//! rust-hypervisor-firmware reads files one 512-byte sector per request
//! (plus a FAT sector per cluster), so the loader reads the kernel itself,
//! under RHF with the project's virtio-blk driver, under other firmware
//! through BlockIo; a partition is one extent found from the GPT, which
//! needs no FAT code in the loader and reads in a few large requests.
//!
//! Layout: protective MBR, GPT, the ESP from 1 MiB, the kernel partition
//! (its payload rounded up to 64 KiB) at the end of the disk less the
//! backup GPT. The disk is [`DISK_SIZE`] unless the files need more.

use std::io::{Cursor, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// 4 MiB: the size the design promises for the bootable image.
pub const DISK_SIZE: u64 = 4 << 20;
const SECTOR: u64 = 512;
const ESP_START: u64 = 1 << 20;
/// Primary and backup GPT entry arrays (16 KiB) plus headers.
const GPT_TAIL: u64 = 33 * SECTOR;
pub const CONFIG_NAME: &str = "blockhaus.conf";
/// The ESP's cluster: 32 KiB, FAT's largest portable size (fatfs would
/// pick 2 KiB). rust-hypervisor-firmware reads a FAT sector for every
/// cluster it crosses, one 512-byte request each, on top of the file's
/// own sectors: a quarter more requests with 2 KiB clusters, 1/64 with
/// these.
pub const CLUSTER: u32 = 32 << 10;
/// The kernel partition's type GUID (the loader's `disk::KERNEL_TYPE`).
pub const KERNEL_TYPE: &str = "2ba3f2db-0342-4948-ba28-f7e62636212a";
/// The kernel partition's name in the GPT.
pub const KERNEL_PARTITION: &str = "blockhaus kernel";
/// The first bytes of the kernel partition (`efi/src/payload.rs`).
pub const KERNEL_MAGIC: &[u8; 8] = b"BHKERNEL";
/// The payload header: magic, the kernel's length (u64), its Adler-32
/// (u32), 20 bytes of zeroes.
pub const KERNEL_HEADER: usize = 32;

/// What the image carries besides its configuration.
pub struct Loader {
    /// `BOOTX64.EFI`.
    pub efi: Vec<u8>,
    /// The kernel partition's payload ([`pack_kernel`]).
    pub kernel: Vec<u8>,
}

/// The ESP's first byte and length in the disk image at `disk`, from its
/// GPT.
pub fn esp_range(disk: &Path) -> Result<(u64, u64), String> {
    partition_range(disk, gpt::partition_types::EFI.guid)
}

/// The kernel partition's first byte and length in the disk image at
/// `disk`, from its GPT.
pub fn kernel_range(disk: &Path) -> Result<(u64, u64), String> {
    partition_range(disk, kernel_type().guid)
}

fn partition_range(disk: &Path, ty: uuid::Uuid) -> Result<(u64, u64), String> {
    let gpt = gpt::GptConfig::new()
        .writable(false)
        .open(disk)
        .map_err(|e| format!("{}: {e}", disk.display()))?;
    let p = gpt
        .partitions()
        .values()
        .find(|p| p.part_type_guid.guid == ty)
        .ok_or_else(|| format!("{}: no partition of type {ty}", disk.display()))?;
    Ok((
        p.first_lba * SECTOR,
        (p.last_lba + 1 - p.first_lba) * SECTOR,
    ))
}

fn kernel_type() -> gpt::partition_types::Type {
    gpt::partition_types::Type {
        guid: KERNEL_TYPE.parse().expect("KERNEL_TYPE is a GUID"),
        os: gpt::partition_types::OperatingSystem::None,
    }
}

/// The kernel partition's payload for the PVH image `kernel`: the header
/// ([`KERNEL_HEADER`]) then the ELF as it is. Not compressed: the loader
/// reads the partition in a few large requests whatever its size, and
/// unpacking (LZ4, the best of the formats tried) cost 10-25 ms of guest
/// time under TCG, more than reading the extra 0.6 MB.
pub fn pack_kernel(kernel: &[u8]) -> Result<Vec<u8>, String> {
    if kernel.is_empty() {
        return Err("no kernel to pack".into());
    }
    let mut out = KERNEL_MAGIC.to_vec();
    out.extend_from_slice(&(kernel.len() as u64).to_le_bytes());
    out.extend_from_slice(&adler2::adler32_slice(kernel).to_le_bytes());
    out.resize(KERNEL_HEADER, 0);
    out.extend_from_slice(kernel);
    Ok(out)
}

/// Builds the UEFI loader and packs `kernel` (the PVH ELF) for the kernel
/// partition.
pub fn build_loader(kernel: &Path) -> Result<Loader, String> {
    let bytes = std::fs::read(kernel).map_err(|e| format!("{}: {e}", kernel.display()))?;
    if bytes.is_empty() {
        return Err(format!("{}: empty", kernel.display()));
    }
    Ok(Loader {
        efi: build_efi()?,
        kernel: pack_kernel(&bytes)?,
    })
}

/// Builds `BOOTX64.EFI` (it carries no kernel).
pub fn build_efi() -> Result<Vec<u8>, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = crate::image::target_dir().with_file_name("efi");
    let status = Command::new(cargo)
        .current_dir(crate::workspace_root())
        .args(["build", "--release", "--package", "efi", "--target"])
        .arg(crate::image::TARGET)
        .env("CARGO_TARGET_DIR", &target_dir)
        // A static PIE: the PE conversion turns its relocations into
        // base relocations (the workspace builds the kernel static).
        .env("RUSTFLAGS", "-C relocation-model=pic")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building the UEFI loader failed ({status})"));
    }
    let elf_path: PathBuf = target_dir
        .join(crate::image::TARGET)
        .join("release/bootx64");
    let elf = std::fs::read(&elf_path).map_err(|e| format!("{}: {e}", elf_path.display()))?;
    crate::pe::elf_to_efi(&elf)
}

/// Writes the raw disk image to `out`: the ESP with `loader.efi` as
/// `EFI/BOOT/BOOTX64.EFI` and `config` as `blockhaus.conf` (if given), and
/// `loader.kernel` in the kernel partition.
pub fn write_disk(out: &Path, loader: &Loader, config: Option<&[u8]>) -> Result<u64, String> {
    let need = loader.efi.len() as u64 + config.map_or(0, |c| c.len() as u64);
    let kernel_len = (loader.kernel.len() as u64).next_multiple_of(64 << 10);
    // FAT overhead and cluster slack: a quarter more, at least 512 KiB.
    let esp_min = need + (need / 4).max(512 << 10);
    let disk_size =
        DISK_SIZE.max((ESP_START + esp_min + kernel_len + GPT_TAIL).next_multiple_of(1 << 20));
    let kernel_off = (disk_size - GPT_TAIL - kernel_len) / (64 << 10) * (64 << 10);
    let (esp_off, esp_len) = (ESP_START, kernel_off - ESP_START);
    let kernel_len = (disk_size - GPT_TAIL - kernel_off) / SECTOR * SECTOR;
    let mut fat = Cursor::new(vec![0u8; esp_len as usize]);
    fatfs::format_volume(
        &mut fat,
        fatfs::FormatVolumeOptions::new()
            .volume_label(*b"BLOCKHAUS  ")
            .bytes_per_cluster(CLUSTER),
    )
    .map_err(|e| format!("formatting the ESP: {e}"))?;
    {
        let fs = fatfs::FileSystem::new(&mut fat, fatfs::FsOptions::new())
            .map_err(|e| format!("opening the ESP: {e}"))?;
        {
            let root = fs.root_dir();
            let boot = root
                .create_dir("EFI")
                .and_then(|d| d.create_dir("BOOT"))
                .map_err(|e| format!("ESP: EFI/BOOT: {e}"))?;
            let mut f = boot
                .create_file("BOOTX64.EFI")
                .map_err(|e| format!("ESP: BOOTX64.EFI: {e}"))?;
            f.truncate()
                .and_then(|_| f.write_all(&loader.efi))
                .map_err(|e| format!("ESP: BOOTX64.EFI: {e}"))?;
            if let Some(config) = config {
                let mut f = root
                    .create_file(CONFIG_NAME)
                    .map_err(|e| format!("ESP: {CONFIG_NAME}: {e}"))?;
                f.truncate()
                    .and_then(|_| f.write_all(config))
                    .map_err(|e| format!("ESP: {CONFIG_NAME}: {e}"))?;
            }
        }
        fs.unmount().map_err(|e| format!("ESP: {e}"))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    file.set_len(disk_size)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    let mbr = gpt::mbr::ProtectiveMBR::with_lb_size(
        u32::try_from(disk_size / SECTOR - 1).unwrap_or(u32::MAX),
    );
    mbr.overwrite_lba0(&mut file)
        .map_err(|e| format!("protective MBR: {e}"))?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .create_from_device(&mut file, None)
        .map_err(|e| format!("GPT: {e}"))?;
    disk.add_partition_at(
        "EFI system partition",
        1,
        esp_off / SECTOR,
        esp_len / SECTOR,
        gpt::partition_types::EFI,
        0,
    )
    .map_err(|e| format!("GPT: {e}"))?;
    disk.add_partition_at(
        KERNEL_PARTITION,
        2,
        kernel_off / SECTOR,
        kernel_len / SECTOR,
        kernel_type(),
        0,
    )
    .map_err(|e| format!("GPT: {e}"))?;
    disk.write().map_err(|e| format!("GPT: {e}"))?;
    file.seek(SeekFrom::Start(esp_off))
        .map_err(|e| e.to_string())?;
    file.write_all(fat.get_ref())
        .and_then(|_| file.seek(SeekFrom::Start(kernel_off)))
        .and_then(|_| file.write_all(&loader.kernel))
        .map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(disk_size)
}

/// Converts a raw image to qcow2 with `qemu-img convert`.
pub fn convert_qcow2(raw: &Path, out: &Path) -> Result<(), String> {
    let o = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(out)
        .output()
        .map_err(|e| format!("qemu-img: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img convert: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Reads `path` from the FAT in the ESP of the image at `disk`.
    fn read_esp_file(disk: &Path, path: &str) -> Vec<u8> {
        let bytes = std::fs::read(disk).unwrap();
        let (off, len) = esp_range(disk).unwrap();
        let mut esp = Cursor::new(bytes[off as usize..(off + len) as usize].to_vec());
        let fs = fatfs::FileSystem::new(&mut esp, fatfs::FsOptions::new()).unwrap();
        let mut out = Vec::new();
        fs.root_dir()
            .open_file(path)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn pattern(len: u32) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn the_disk_is_a_gpt_with_an_esp_and_a_kernel_partition() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.img");
        let loader = Loader {
            efi: pattern(100_000),
            kernel: pack_kernel(&pattern(1_200_000)).unwrap(),
        };
        let size = write_disk(&path, &loader, Some(b"loglevel=info\n")).unwrap();
        assert_eq!(size, DISK_SIZE);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), DISK_SIZE);
        let disk = gpt::GptConfig::new().writable(false).open(&path).unwrap();
        let parts = disk.partitions();
        assert_eq!(parts.len(), 2, "{parts:?}");
        let esp = &parts[&1];
        assert_eq!(esp.part_type_guid, gpt::partition_types::EFI);
        assert_eq!(esp.first_lba * SECTOR, ESP_START);
        let kernel = &parts[&2];
        assert_eq!(kernel.part_type_guid.guid.to_string(), KERNEL_TYPE);
        assert_eq!(kernel.name, KERNEL_PARTITION);
        assert_eq!(kernel.first_lba, esp.last_lba + 1);
        assert!(kernel.last_lba * SECTOR < DISK_SIZE - GPT_TAIL);
        assert_eq!(read_esp_file(&path, "EFI/BOOT/BOOTX64.EFI"), loader.efi);
        assert_eq!(read_esp_file(&path, CONFIG_NAME), b"loglevel=info\n");
        let bytes = std::fs::read(&path).unwrap();
        let (off, len) = kernel_range(&path).unwrap();
        assert!(len >= loader.kernel.len() as u64);
        assert_eq!(
            &bytes[off as usize..off as usize + loader.kernel.len()],
            loader.kernel
        );
        // The FAT boot sector: bytes per sector times sectors per cluster.
        let bpb = &bytes[ESP_START as usize..];
        let sector = u32::from(u16::from_le_bytes([bpb[11], bpb[12]]));
        assert_eq!(sector * u32::from(bpb[13]), CLUSTER);
    }

    /// The header `efi/src/payload.rs` reads, then the kernel.
    #[test]
    fn the_kernel_payload_is_a_header_and_the_kernel() {
        let kernel = pattern(300_000);
        let p = pack_kernel(&kernel).unwrap();
        assert_eq!(&p[..8], KERNEL_MAGIC);
        assert_eq!(
            u64::from_le_bytes(p[8..16].try_into().unwrap()),
            kernel.len() as u64
        );
        assert_eq!(
            u32::from_le_bytes(p[16..20].try_into().unwrap()),
            adler2::adler32_slice(&kernel)
        );
        assert!(p[20..KERNEL_HEADER].iter().all(|&b| b == 0));
        assert_eq!(&p[KERNEL_HEADER..], kernel);
        assert!(pack_kernel(&[]).is_err());
    }

    #[test]
    fn a_loader_too_big_for_4_mib_grows_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.img");
        let loader = Loader {
            efi: vec![0xa5u8; 5 << 20],
            kernel: pack_kernel(&pattern(1000)).unwrap(),
        };
        let size = write_disk(&path, &loader, None).unwrap();
        assert!(size > DISK_SIZE && size.is_multiple_of(1 << 20), "{size}");
        assert_eq!(read_esp_file(&path, "EFI/BOOT/BOOTX64.EFI"), loader.efi);
        let (off, _) = kernel_range(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[off as usize..off as usize + 8], KERNEL_MAGIC);
    }

    #[test]
    fn only_a_pie_converts_to_pe() {
        let e = crate::pe::elf_to_efi(
            b"not an elf at all, just bytes....................................",
        )
        .unwrap_err();
        assert!(e.contains("PIE"), "{e}");
        // An ET_EXEC image (like the kernel itself) is refused, not mangled.
        let mut exec = vec![0u8; 64];
        exec[..4].copy_from_slice(b"\x7fELF");
        exec[16] = 2;
        exec[18] = 0x3e;
        assert!(crate::pe::elf_to_efi(&exec).is_err());
    }
}
