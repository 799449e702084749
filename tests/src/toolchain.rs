//! Making sure the toolchain that `rust-toolchain.toml` names is complete
//! before anything is built: the image's target (`x86_64-unknown-none`)
//! and the components `cargo xtask test` runs (rustfmt, clippy).
//!
//! rustup installs those on its own only while `RUSTUP_AUTO_INSTALL` is not
//! `0`; where a distribution or CI image sets it, a first build failed with
//! "can't find crate for `core`". Installed pieces are left as they are
//! (no channel update); what is missing is added with `rustup target add`
//! / `rustup component add`, or the whole toolchain with `rustup toolchain
//! install`, which reads `rust-toolchain.toml`. Without rustup, the command
//! to run is printed.

use std::path::Path;
use std::process::{Command, Stdio};

/// What `rust-toolchain.toml` asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    pub targets: Vec<String>,
    pub components: Vec<String>,
}

/// The `targets` and `components` lists of a `rust-toolchain.toml`.
pub fn parse(toml: &str) -> Wanted {
    let list = |key: &str| -> Vec<String> {
        toml.lines()
            .map(str::trim)
            .find_map(|l| {
                let rest = l.strip_prefix(key)?.trim_start().strip_prefix('=')?;
                let inner = rest.trim().strip_prefix('[')?.strip_suffix(']')?;
                Some(
                    inner
                        .split(',')
                        .map(|s| s.trim().trim_matches('"').to_string())
                        .filter(|s| !s.is_empty())
                        .collect(),
                )
            })
            .unwrap_or_default()
    };
    Wanted {
        targets: list("targets"),
        components: list("components"),
    }
}

fn lines(cmd: &mut Command) -> Option<Vec<String>> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    })
}

fn rustup(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root).args(args);
    cmd
}

fn have_rustup() -> bool {
    Command::new("rustup")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(root: &Path, args: &[&str]) -> Result<(), String> {
    eprintln!("xtask: rustup {}", args.join(" "));
    let status = rustup(root, args)
        .status()
        .map_err(|e| format!("cannot run rustup: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("rustup {} failed ({status})", args.join(" ")))
    }
}

/// Whether `rustc`'s sysroot holds the standard library for `target`.
fn sysroot_has(target: &str) -> bool {
    lines(Command::new("rustc").args(["--print", "sysroot"]))
        .and_then(|l| l.into_iter().next())
        .is_some_and(|sysroot| {
            Path::new(sysroot.trim())
                .join("lib/rustlib")
                .join(target)
                .join("lib")
                .is_dir()
        })
}

/// Installs what the workspace's `rust-toolchain.toml` names and is
/// missing; `components` says whether rustfmt/clippy are needed too.
pub fn ensure(components: bool) -> Result<(), String> {
    let root = crate::workspace_root();
    let file = root.join("rust-toolchain.toml");
    let wanted = parse(&std::fs::read_to_string(&file).unwrap_or_default());
    if !have_rustup() {
        let missing: Vec<&String> = wanted.targets.iter().filter(|t| !sysroot_has(t)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        return Err(format!(
            "the Rust target {} is not installed and rustup is not on PATH.\n\
             Install rustup, then in {} run:\n  rustup toolchain install\n\
             (it reads rust-toolchain.toml), or add the target to your toolchain by hand.",
            names.join(", "),
            root.display()
        ));
    }
    // The toolchain itself: absent, these fail.
    let (Some(targets), Some(comps)) = (
        lines(&mut rustup(&root, &["target", "list", "--installed"])),
        lines(&mut rustup(&root, &["component", "list", "--installed"])),
    ) else {
        return run(&root, &["toolchain", "install"]);
    };
    let targets: Vec<&String> = wanted
        .targets
        .iter()
        .filter(|t| !targets.iter().any(|i| i == *t))
        .collect();
    if !targets.is_empty() {
        let mut args = vec!["target", "add"];
        args.extend(targets.iter().map(|s| s.as_str()));
        run(&root, &args)?;
    }
    if components {
        let missing: Vec<&String> = wanted
            .components
            .iter()
            .filter(|c| {
                !comps
                    .iter()
                    .any(|i| i == *c || i.starts_with(&format!("{c}-")))
            })
            .collect();
        if !missing.is_empty() {
            let mut args = vec!["component", "add"];
            args.extend(missing.iter().map(|s| s.as_str()));
            run(&root, &args)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_workspace_toolchain_file() {
        let text = std::fs::read_to_string(crate::workspace_root().join("rust-toolchain.toml"))
            .expect("rust-toolchain.toml");
        let w = parse(&text);
        assert_eq!(w.targets, ["x86_64-unknown-none"]);
        assert_eq!(w.components, ["rustfmt", "clippy"]);
    }
}
