//! The loader is built for `x86_64-unknown-none` as a static PIE (this
//! toolchain has no `x86_64-unknown-uefi` standard library) and converted to
//! PE32+ by `cargo xtask image`: every loadable segment on its own page, so
//! each becomes one PE section, and the ELF headers off page 0, where the PE
//! headers go. The kernel it starts is not part of it: it lies in a
//! partition of its own (`src/disk.rs`).
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
    println!("cargo:rerun-if-changed=build.rs");
}
