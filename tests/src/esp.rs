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
        fatfs::FormatVolumeOptions::new().volume_label(*b"BLOCKHAUS  "),
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
