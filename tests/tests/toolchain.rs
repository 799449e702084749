//! A fresh toolchain (issue 11): on a machine where rustup does not
//! install targets on its own (`RUSTUP_AUTO_INSTALL=0`), the image's
//! target missing must not stop the README's commands; without rustup,
//! xtask says what to run.
//!
//! The test works on a copy of this machine's rustup home (hard links for
//! the toolchain's files, real copies of the metadata rustup rewrites), so
//! the real toolchain is never touched. Adding the target back downloads
//! its standard library, as a new user's first build does.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TARGET: &str = "x86_64-unknown-none";

fn rustup_home() -> PathBuf {
    match std::env::var_os("RUSTUP_HOME") {
        Some(h) => PathBuf::from(h),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".rustup"),
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?}:\n{}", text(&o));
    text(&o)
}

/// The toolchain `rust-toolchain.toml` selects here, by directory name.
fn active_toolchain(root: &Path) -> String {
    let out = ok(Command::new("rustup")
        .current_dir(root)
        .args(["show", "active-toolchain"]));
    out.split_whitespace()
        .next()
        .expect("a toolchain")
        .to_string()
}

/// A rustup home holding only `toolchain`, sharing its files by hard link;
/// the files rustup rewrites in place are real copies.
fn copy_rustup_home(toolchain: &str, to: &Path) {
    let from = rustup_home();
    let real = std::fs::canonicalize(from.join("toolchains").join(toolchain)).expect("toolchain");
    std::fs::create_dir_all(to.join("toolchains")).unwrap();
    let settings = from.join("settings.toml");
    if settings.exists() {
        std::fs::copy(&settings, to.join("settings.toml")).unwrap();
    }
    let dest = to.join("toolchains").join(toolchain);
    ok(Command::new("cp").arg("-al").arg(&real).arg(&dest));
    let meta = dest.join("lib/rustlib");
    for entry in std::fs::read_dir(&meta).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let name = path.file_name().unwrap();
            std::fs::remove_file(&path).unwrap();
            std::fs::copy(real.join("lib/rustlib").join(name), &path).unwrap();
        }
    }
}

#[test]
fn a_missing_image_target_is_installed_before_the_build_or_named_without_rustup() {
    let root = harness::workspace_root();
    let tmp = tempfile::Builder::new()
        .prefix("blockhaus-toolchain-")
        .tempdir()
        .unwrap();
    let home = tmp.path().join("rustup");
    let toolchain = active_toolchain(&root);
    copy_rustup_home(&toolchain, &home);
    let target_dir = tmp.path().join("target");
    // A command as on the new user's machine: this rustup home, no
    // automatic installs, our own target directory.
    let fresh = |program: &str| {
        let mut c = Command::new(program);
        c.current_dir(&root)
            .env("RUSTUP_HOME", &home)
            .env("RUSTUP_AUTO_INSTALL", "0")
            .env("CARGO_TARGET_DIR", &target_dir)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO")
            .env_remove("RUSTC")
            // cargo test points this at the real toolchain's libraries,
            // and rustc finds its sysroot through them.
            .env_remove("LD_LIBRARY_PATH");
        c
    };
    ok(fresh("rustup").args(["target", "remove", TARGET]));
    let installed = ok(fresh("rustup").args(["target", "list", "--installed"]));
    assert!(!installed.contains(TARGET), "{installed}");

    // What the user hit: a plain build of the image fails.
    let o = fresh("cargo")
        .args(["build", "-q", "-p", "kernel", "--target", TARGET])
        .env("CARGO_TARGET_DIR", tmp.path().join("plain"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o).contains("can't find crate for `core`"),
        "{}",
        text(&o)
    );

    // xtask itself (built for the host, which the toolchain has).
    ok(fresh("cargo").args(["build", "-q", "-p", "xtask"]));
    let xtask = target_dir.join("debug/xtask");

    // No rustup on PATH: the toolchain's own cargo and rustc only. xtask
    // names what is missing and the command to run, and builds nothing.
    let bin = home.join("toolchains").join(&toolchain).join("bin");
    let o = fresh(xtask.to_str().unwrap())
        .arg("build")
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .output()
        .unwrap();
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains(&format!("the Rust target {TARGET} is not installed")),
        "{out}"
    );
    assert!(out.contains("rustup toolchain install"), "{out}");
    assert!(!out.contains("can't find crate"), "{out}");

    // With rustup: `cargo xtask build` adds the target, then builds.
    let out = ok(fresh("cargo").args(["xtask", "build"]));
    assert!(
        out.contains(&format!("rustup target add {TARGET}")),
        "{out}"
    );
    let image = target_dir
        .join("image")
        .join(TARGET)
        .join("debug/blockhaus");
    assert!(image.is_file(), "no image at {}:\n{out}", image.display());
    let installed = ok(fresh("rustup").args(["target", "list", "--installed"]));
    assert!(installed.contains(TARGET), "{installed}");
}
