//! The loader is built for `x86_64-unknown-none` as a static PIE (this
//! toolchain has no `x86_64-unknown-uefi` standard library) and converted to
//! PE32+ by `cargo xtask image`: every loadable segment on its own page, so
//! each becomes one PE section, and the ELF headers off page 0, where the PE
//! headers go. It carries the PVH image named by `BLOCKHAUS_KERNEL_ELF`.
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
    match std::env::var("BLOCKHAUS_KERNEL_ELF") {
        Ok(p) => println!("cargo:rerun-if-changed={p}"),
        Err(_) => {
            // Built outside `cargo xtask image` (e.g. a workspace-wide
            // check): carry nothing; the loader then says it has no kernel.
            let out = std::env::var("OUT_DIR").expect("OUT_DIR");
            let empty = std::path::Path::new(&out).join("no-kernel");
            std::fs::write(&empty, b"").expect("write OUT_DIR/no-kernel");
            println!("cargo:rustc-env=BLOCKHAUS_KERNEL_ELF={}", empty.display());
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
