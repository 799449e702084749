//! `cargo xtask test`: everything CI runs. Formatting and clippy (host
//! crates, and the image's crates on their own target), the image build,
//! then `cargo test` for the host crates, whose integration tests boot that
//! image in QEMU.

use clap::Args;
use std::process::Command;

#[derive(Args)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Extra arguments for `cargo test` (e.g. a test name filter).
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

fn cargo(args: &[&str], envs: &[(&str, &str)]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let mut cmd = Command::new(cargo);
    cmd.current_dir(harness::workspace_root()).args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let status = cmd.status().map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo {} failed ({status})", args.join(" ")))
    }
}

pub fn test(args: TestArgs) -> Result<(), String> {
    crate::deps::ensure()?;
    harness::toolchain::ensure(true)?;
    let image_dir = harness::image::target_dir();
    let image_dir = image_dir.to_str().ok_or("non-UTF-8 path")?;
    if !args.no_lint {
        cargo(&["fmt", "--all", "--check"], &[])?;
        cargo(&["clippy", "--all-targets", "--", "-D", "warnings"], &[])?;
        // The fuzz targets: a workspace member, not a default one.
        cargo(
            &[
                "clippy",
                "-p",
                "fuzz",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            &[],
        )?;
        cargo(
            &[
                "clippy",
                "-p",
                "kernel",
                "-p",
                "boot",
                "-p",
                "drivers",
                "-p",
                "block",
                "--target",
                "x86_64-unknown-none",
                "--",
                "-D",
                "warnings",
            ],
            &[("CARGO_TARGET_DIR", image_dir)],
        )?;
    }
    let image = harness::image::build(true)?;
    let image = image.to_str().ok_or("non-UTF-8 path")?.to_string();
    if !args.no_lint {
        // The UEFI loader: built as harness::esp builds it, carrying the image.
        let efi_dir = harness::image::target_dir().with_file_name("efi");
        let efi_dir = efi_dir.to_str().ok_or("non-UTF-8 path")?;
        cargo(
            &[
                "clippy",
                "-p",
                "efi",
                "--target",
                "x86_64-unknown-none",
                "--",
                "-D",
                "warnings",
            ],
            &[
                ("CARGO_TARGET_DIR", efi_dir),
                ("BLOCKHAUS_KERNEL_ELF", &image),
                ("RUSTFLAGS", "-C relocation-model=pic"),
            ],
        )?;
    }
    // Every fuzz target replays its seeds and runs a few seconds.
    crate::fuzz::smoke()?;
    let mut test_args = vec!["test", "--no-fail-fast"];
    if !args.cargo_args.is_empty() {
        test_args.push("--");
        test_args.extend(args.cargo_args.iter().map(String::as_str));
    }
    cargo(&test_args, &[("BLOCKHAUS_IMAGE", &image)])
}
