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
/// endian), then the kernel as a zlib stream (deflate at level 9, with its
/// Adler-32 checksum). Every byte the loader carries is a byte
/// rust-hypervisor-firmware reads one 512-byte sector at a time; this
/// halves them.
fn pack(kernel: &[u8]) -> Vec<u8> {
    let mut out = (kernel.len() as u64).to_le_bytes().to_vec();
    out.extend(miniz_oxide::deflate::compress_to_vec_zlib(kernel, 9));
    out
}
