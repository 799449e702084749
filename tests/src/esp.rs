//! The bootable disk image: a GPT disk (`gpt`) with one EFI System
//! Partition (FAT, `fatfs`) holding `EFI/BOOT/BOOTX64.EFI` (the UEFI loader
//! carrying the PVH image) and `blockhaus.conf`.
//!
//! Layout: protective MBR, GPT, the ESP from 1 MiB to the end of the disk
//! less the backup GPT. The disk is [`DISK_SIZE`] unless the files need
//! more.

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

/// The ESP's first byte and length in a disk of `disk_size` bytes.
pub fn esp_range(disk_size: u64) -> (u64, u64) {
    (
        ESP_START,
        (disk_size - GPT_TAIL - ESP_START) / SECTOR * SECTOR,
    )
}

/// Builds the UEFI loader for `kernel` (the PVH ELF) and returns the
/// `BOOTX64.EFI` bytes.
pub fn build_loader(kernel: &Path) -> Result<Vec<u8>, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = crate::image::target_dir().with_file_name("efi");
    let kernel = kernel
        .canonicalize()
        .map_err(|e| format!("{}: {e}", kernel.display()))?;
    let status = Command::new(cargo)
        .current_dir(crate::workspace_root())
        .args(["build", "--release", "--package", "efi", "--target"])
        .arg(crate::image::TARGET)
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("BLOCKHAUS_KERNEL_ELF", &kernel)
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

/// Writes the raw disk image to `out`: the ESP with `loader` as
/// `EFI/BOOT/BOOTX64.EFI` and `config` as `blockhaus.conf` (if given).
pub fn write_disk(out: &Path, loader: &[u8], config: Option<&[u8]>) -> Result<u64, String> {
    let need = loader.len() as u64 + config.map_or(0, |c| c.len() as u64);
    // FAT overhead and cluster slack: a quarter more, at least 512 KiB.
    let disk_size = DISK_SIZE
        .max((ESP_START + GPT_TAIL + need + (need / 4).max(512 << 10)).next_multiple_of(1 << 20));
    let (esp_off, esp_len) = esp_range(disk_size);
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
                .and_then(|_| f.write_all(loader))
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
    disk.write().map_err(|e| format!("GPT: {e}"))?;
    file.seek(SeekFrom::Start(esp_off))
        .map_err(|e| e.to_string())?;
    file.write_all(fat.get_ref())
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

    /// Reads `path` from the FAT in `disk`'s ESP.
    fn read_esp_file(disk: &[u8], path: &str) -> Vec<u8> {
        let (off, len) = esp_range(disk.len() as u64);
        let mut esp = Cursor::new(disk[off as usize..(off + len) as usize].to_vec());
        let fs = fatfs::FileSystem::new(&mut esp, fatfs::FsOptions::new()).unwrap();
        let mut out = Vec::new();
        fs.root_dir()
            .open_file(path)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn the_disk_is_a_gpt_with_one_esp_holding_the_loader_and_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.img");
        let loader: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let size = write_disk(&path, &loader, Some(b"loglevel=info\n")).unwrap();
        assert_eq!(size, DISK_SIZE);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), DISK_SIZE);
        let disk = gpt::GptConfig::new().writable(false).open(&path).unwrap();
        let parts = disk.partitions();
        assert_eq!(parts.len(), 1, "{parts:?}");
        let esp = &parts[&1];
        assert_eq!(esp.part_type_guid, gpt::partition_types::EFI);
        assert_eq!(esp.first_lba * SECTOR, ESP_START);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(read_esp_file(&bytes, "EFI/BOOT/BOOTX64.EFI"), loader);
        assert_eq!(read_esp_file(&bytes, CONFIG_NAME), b"loglevel=info\n");
        // The FAT boot sector: bytes per sector times sectors per cluster.
        let bpb = &bytes[ESP_START as usize..];
        let sector = u32::from(u16::from_le_bytes([bpb[11], bpb[12]]));
        assert_eq!(sector * u32::from(bpb[13]), CLUSTER);
    }

    #[test]
    fn a_loader_too_big_for_4_mib_grows_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.img");
        let loader = vec![0xa5u8; 5 << 20];
        let size = write_disk(&path, &loader, None).unwrap();
        assert!(size > DISK_SIZE && size.is_multiple_of(1 << 20), "{size}");
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(read_esp_file(&bytes, "EFI/BOOT/BOOTX64.EFI"), loader);
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
