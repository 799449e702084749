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
    if let Ok(p) = std::env::var("BLOCKHAUS_KERNEL_ELF") {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
