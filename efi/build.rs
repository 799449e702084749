//! The loader is built for `x86_64-unknown-none` as a static PIE (this
//! toolchain has no `x86_64-unknown-uefi` standard library) and converted to
//! PE32+ by `cargo xtask image`: every loadable segment on its own page, so
//! each becomes one PE section, and the ELF headers off page 0, where the PE
//! headers go. It carries the PVH image named by `BLOCKHAUS_KERNEL_ELF`,
//! compressed here (`pack`) and unpacked by `src/payload.rs`.
fn main() {
    if std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-none") {
        for arg in [
            "--entry=efi_main",
            "-z",
            "separate-loadable-segments",
            "--image-base=0x1000",
        ] {
            println!("cargo:rustc-link-arg-bins={arg}");
        }
    }
    println!("cargo:rerun-if-env-changed=BLOCKHAUS_KERNEL_ELF");
    let kernel = match std::env::var("BLOCKHAUS_KERNEL_ELF") {
        Ok(p) => {
            println!("cargo:rerun-if-changed={p}");
            std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
        }
        // Built outside `cargo xtask image` (e.g. a workspace-wide check):
        // carry nothing; the loader then says it has no kernel.
        Err(_) => Vec::new(),
    };
    let out = std::env::var("OUT_DIR").expect("OUT_DIR");
    let payload = std::path::Path::new(&out).join("kernel.z");
    std::fs::write(&payload, pack(&kernel)).expect("write OUT_DIR/kernel.z");
    println!("cargo:rerun-if-changed=build.rs");
}

/// The payload format `payload.rs` reads: the kernel's length (u64, little
/// endian), the Adler-32 of what follows (u32, little endian), then the
/// kernel as one LZ4 block. Every byte the loader carries is a byte
/// rust-hypervisor-firmware reads one 512-byte sector per request: this
/// nearly halves them. LZ4 rather than deflate: deflate is 8 % smaller,
/// but inflating the 1 MB kernel took 115 ms under TCG (guest TSC), LZ4
/// 25-35 ms.
fn pack(kernel: &[u8]) -> Vec<u8> {
    // LZ4's high-compression mode at its top level (liblz4 through crate
    // `lz4`): a quarter smaller than lz4_flex's fast mode, the same format.
    // No kernel, no block (liblz4's binding crashes on empty input): the
    // loader then says it has no kernel.
    let block = if kernel.is_empty() {
        Vec::new()
    } else {
        lz4::block::compress(
            kernel,
            Some(lz4::block::CompressionMode::HIGHCOMPRESSION(12)),
            false,
        )
        .expect("LZ4 compression")
    };
    let mut out = (kernel.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&adler2::adler32_slice(&block).to_le_bytes());
    out.extend(block);
    out
}
