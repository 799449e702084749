//! The one place that knows how to start blockhaus: build the image
//! ([`image`]), lay out a QEMU command line ([`qemu`]), run and watch an
//! appliance ([`appliance`]) and talk QMP to it ([`qmp`]). `cargo xtask`
//! and the integration tests in `tests/tests/` both use it.

pub mod appliance;
pub mod esp;
pub mod host;
pub mod image;
pub mod nbd_client;
pub mod nbd_server;
pub mod pe;
pub mod pki;
pub mod qemu;
pub mod qmp;
pub mod toolchain;

pub use appliance::Appliance;
pub use qemu::{Accel, Machine, QemuConfig};
pub use qmp::Qmp;

use std::path::PathBuf;

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}
