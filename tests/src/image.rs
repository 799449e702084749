//! Building the bootable image: `cargo build -p kernel` for
//! `x86_64-unknown-none`, in its own target directory (`target/image`) so a
//! running `cargo test` never contends for the host build's lock.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

pub const TARGET: &str = "x86_64-unknown-none";

/// The image's own target directory: `image/` in `$CARGO_TARGET_DIR`
/// when that is set, else `target/image` in the workspace.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => crate::workspace_root().join(d).join("image"),
        _ => crate::workspace_root().join("target/image"),
    }
}

/// Where the image lands for a profile.
pub fn path(release: bool) -> PathBuf {
    target_dir()
        .join(TARGET)
        .join(if release { "release" } else { "debug" })
        .join("blockhaus")
}

/// Builds the image and returns its path.
pub fn build(release: bool) -> Result<PathBuf, String> {
    crate::toolchain::ensure(false)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(crate::workspace_root())
        .args(["build", "--package", "kernel", "--target", TARGET])
        .env("CARGO_TARGET_DIR", target_dir());
    if release {
        cmd.arg("--release");
    }
    // Host-side flags (coverage, sanitizers) must not leak into the image.
    cmd.env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    let status = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building the image failed ({status})"));
    }
    Ok(path(release))
}

/// The image the tests boot: `$BLOCKHAUS_IMAGE` when set (xtask sets it),
/// else a release build made once per test process.
pub fn for_tests() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE
        .get_or_init(|| match std::env::var_os("BLOCKHAUS_IMAGE") {
            Some(p) => PathBuf::from(p),
            None => build(true).unwrap_or_else(|e| panic!("{e}")),
        })
        .clone()
}
