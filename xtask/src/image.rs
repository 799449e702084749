//! `cargo xtask image`: the bootable disk image (GPT, an EFI System
//! Partition with `EFI/BOOT/BOOTX64.EFI` and `blockhaus.conf`, a partition
//! with the kernel), raw or qcow2. See `harness::esp` for the layout.

use clap::{Args, ValueEnum};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Raw,
    Qcow2,
}

#[derive(Args, Debug)]
pub struct ImageArgs {
    /// The configuration written as `blockhaus.conf` on the ESP: the
    /// qemu-storage-daemon options one per line, `#` comments.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Image format.
    #[arg(long, value_enum, default_value = "raw")]
    pub format: Format,
    /// Where to write it (default `target/blockhaus.img`).
    #[arg(short = 'o', long = "output", value_name = "PATH")]
    pub output: Option<PathBuf>,
}

/// The default image path.
pub fn default_path() -> PathBuf {
    harness::workspace_root().join("target/blockhaus.img")
}

/// Builds the kernel and the loader and writes the image; returns its path.
pub fn make(args: &ImageArgs) -> Result<PathBuf, String> {
    let config = match &args.config {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    let kernel = harness::image::build(true)?;
    let loader = harness::esp::build_loader(&kernel)?;
    let out = args.output.clone().unwrap_or_else(default_path);
    let size = match args.format {
        Format::Raw => harness::esp::write_disk(&out, &loader, config.as_deref())?,
        Format::Qcow2 => {
            let raw = out.with_extension("raw.tmp");
            let size = harness::esp::write_disk(&raw, &loader, config.as_deref())?;
            let r = harness::esp::convert_qcow2(&raw, &out);
            let _ = std::fs::remove_file(&raw);
            r?;
            size
        }
    };
    eprintln!(
        "image: {} ({:?}, {} KiB disk, BOOTX64.EFI {} KiB, kernel partition {} KiB{})",
        out.display(),
        args.format,
        size >> 10,
        loader.efi.len() >> 10,
        loader.kernel.len() >> 10,
        if config.is_some() {
            ", with blockhaus.conf"
        } else {
            ", no blockhaus.conf"
        }
    );
    Ok(out)
}
