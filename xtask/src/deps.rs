//! Making sure QEMU, OVMF and the real clients are installed: on Debian as root,
//! `.ci/install-deps` installs them (qemu-system-x86 and qemu-utils in one
//! apt-get command); elsewhere we print what to run and stop.

use std::process::Command;

fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs QEMU and the test clients if any is missing.
pub fn ensure() -> Result<(), String> {
    let mut missing: Vec<&str> = ["qemu-system-x86_64", "qemu-img", "qemu-io"]
        .into_iter()
        .filter(|b| !have(b))
        .collect();
    // OVMF boots the disk image (`run --image`, the efi tests).
    if !std::path::Path::new(harness::qemu::OVMF_CODE).exists() {
        missing.push(harness::qemu::OVMF_CODE);
    }
    if missing.is_empty() {
        return Ok(());
    }
    let script = harness::workspace_root().join(".ci/install-deps");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    let debian = std::path::Path::new("/etc/debian_version").exists();
    if !(root && debian) {
        return Err(format!(
            "missing {}: install QEMU first, e.g. on Debian/Ubuntu as root:\n  apt-get install -y qemu-system-x86 qemu-utils ovmf",
            missing.join(", ")
        ));
    }
    eprintln!(
        "xtask: {} missing; installing with {}",
        missing.join(", "),
        script.display()
    );
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !status.success() {
        return Err(format!("{} failed ({status})", script.display()));
    }
    Ok(())
}
