//! Host-side tools for the tests: real images made with `qemu-img`,
//! patterns written and checked with `qemu-io`, `qemu-img map` extents, and
//! the standard disk set (virtio-blk, read-only virtio-blk, two scsi-hd).

use crate::QemuConfig;
use serde_json::Value;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const MIB: u64 = 1 << 20;

/// Runs a command; panics with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

pub fn create(path: &Path, size: u64) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(path)
        .arg(size.to_string()));
}

/// Runs `qemu-io` commands on a raw file; panics if one fails or a
/// pattern check does not match.
pub fn qemu_io(path: &Path, cmds: &[String]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(path);
    let out = run(&mut cmd);
    for bad in ["verification failed", "failed:", "error"] {
        assert!(
            !out.to_lowercase().contains(bad),
            "qemu-io {cmds:?} on {}:\n{out}",
            path.display()
        );
    }
    out
}

/// A new qcow2 image of `size` bytes whose file is `room` bytes long:
/// inside the appliance the image is a disk that cannot grow.
pub fn qcow2_with_room(path: &Path, size: u64, room: u64) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string()));
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the image")
        .set_len(room)
        .expect("give the image room");
}

/// `qemu-img check` finds no errors and no leaks.
pub fn qcow2_check_clean(path: &Path) {
    let out = run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path));
    assert!(
        out.contains("No errors were found on the image."),
        "qemu-img check:\n{out}"
    );
    assert!(!out.contains("leaked"), "qemu-img check:\n{out}");
}

/// The dirty extents of bitmap `name` of the qcow2 image `img`, as
/// `nbdinfo --map=qemu:dirty-bitmap:NAME` reads them from a read-only
/// `qemu-nbd -B NAME` of the image: `(start, length)`.
pub fn dirty_extents(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let out = run(Command::new("nbdinfo")
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .args(["--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", name])
        .arg(img)
        .arg("]"));
    map_lines(&out)
        .into_iter()
        .filter(|e| e.2 == 1)
        .map(|(o, l, _)| (o, l))
        .collect()
}

/// `nbdinfo --map=CONTEXT` of an NBD URI: `(offset, length, value)`.
pub fn nbd_map(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    map_lines(&run(Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg(uri)))
}

fn map_lines(out: &str) -> Vec<(u64, u64, u32)> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .take(3)
                .map(|x| x.parse().expect("nbdinfo --map offset, length and type"))
                .collect();
            (f[0], f[1], f[2] as u32)
        })
        .collect()
}

/// The bitmaps of the qcow2 image `img` as `qemu-img info` lists them:
/// `(name, flags, granularity)`.
pub fn image_bitmaps(img: &Path) -> Vec<(String, Vec<String>, u64)> {
    // stdout only: QEMU warns on stderr about bitmaps it ignores.
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(img)
        .output()
        .expect("qemu-img info");
    assert!(out.status.success(), "qemu-img info: {out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("qemu-img info JSON");
    let Some(list) = v["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            let flags = b["flags"]
                .as_array()
                .map(|f| {
                    f.iter()
                        .map(|x| x.as_str().unwrap_or("").to_string())
                        .collect()
                })
                .unwrap_or_default();
            (
                b["name"].as_str().unwrap_or("").to_string(),
                flags,
                b["granularity"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// `qemu-img map` extents as (start, length, data, zero).
pub fn map(path: &Path) -> Vec<(u64, u64, bool, bool)> {
    let out = run(Command::new("qemu-img")
        .args(["map", "-f", "raw", "--output=json"])
        .arg(path));
    let v: Value = serde_json::from_str(&out).expect("qemu-img map JSON");
    v.as_array()
        .expect("extent list")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Whether `[start, start + len)` is a hole that reads as zeroes.
pub fn is_zero_hole(path: &Path, start: u64, len: u64) -> bool {
    map(path)
        .iter()
        .filter(|&&(s, l, _, _)| s < start + len && start < s + l)
        .all(|&(_, _, data, zero)| zero && !data)
}

pub fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}

/// The standard disk set: raw images with the host's patterns.
pub struct Images {
    pub _dir: tempfile::TempDir,
    pub blk: PathBuf,
    pub scsi_direct: PathBuf,
    pub scsi_writeback: PathBuf,
    pub ro: PathBuf,
}

pub fn images() -> Images {
    let dir = tempfile::Builder::new()
        .prefix("blockhaus-virtio-")
        .tempdir()
        .expect("tempdir");
    let p = |n: &str| dir.path().join(n);
    let imgs = Images {
        blk: p("blk.img"),
        scsi_direct: p("scsi-direct.img"),
        scsi_writeback: p("scsi-wb.img"),
        ro: p("ro.img"),
        _dir: dir,
    };
    create(&imgs.blk, 64 * MIB);
    create(&imgs.scsi_direct, 64 * MIB);
    create(&imgs.scsi_writeback, 32 * MIB);
    create(&imgs.ro, 16 * MIB);
    // Distinct patterns, written by the host before boot.
    qemu_io(&imgs.blk, &["write -P 0x11 0 24M".into()]);
    qemu_io(&imgs.scsi_direct, &["write -P 0x22 0 24M".into()]);
    qemu_io(&imgs.scsi_writeback, &["write -P 0x33 0 8M".into()]);
    qemu_io(&imgs.ro, &["write -P 0x44 0 1M".into()]);
    imgs
}

/// One virtio-blk (serial disk0), one read-only virtio-blk (ro0), and a
/// virtio-scsi controller with two scsi-hd: `cache=none` (scsi0, target
/// 0) and writeback (scsi1, target 1).
pub fn config(imgs: &Images) -> QemuConfig {
    let drive = |p: &Path, rest: &str| format!("file={},if=none,format=raw,{rest}", p.display());
    let extra = args(&[
        "-drive",
        &drive(&imgs.ro, "id=ro,readonly=on"),
        "-device",
        "virtio-blk-pci,drive=ro,serial=ro0",
        "-device",
        "virtio-scsi-pci,id=scsi0",
        "-drive",
        &drive(
            &imgs.scsi_direct,
            "id=s0,discard=unmap,cache=none,aio=threads",
        ),
        "-device",
        "scsi-hd,bus=scsi0.0,drive=s0,scsi-id=0,lun=0,serial=scsi0,id=sd0",
        "-drive",
        &drive(&imgs.scsi_writeback, "id=s1,discard=unmap,cache=writeback"),
        "-device",
        "scsi-hd,bus=scsi0.0,drive=s1,scsi-id=1,lun=0,serial=scsi1,id=sd1",
    ]);
    QemuConfig {
        disks: vec![imgs.blk.clone()],
        extra,
        ..QemuConfig::default()
    }
}

/// A qemu-io process whose image is open: its commands come on stdin, so
/// `open` returns only once qemu-io has shown its first prompt, that is
/// once the NBD connection and handshake are done.
///
/// Tests that start several NBD clients through QEMU's user network start
/// them this way, one after another: slirp takes host connections one at
/// a time (its listen backlog is 1), and a burst can overflow the host's
/// accept queue, which leaves a client waiting forever on a connection
/// slirp never sees (captured: the SYN reaches the guest only when the
/// client gives up and closes).
pub struct QemuIoSession {
    child: std::process::Child,
}

impl QemuIoSession {
    /// qemu-io on `target` with `args` before it (`-f raw`, `-r`, ...),
    /// killed by `timeout` after `secs` so that a stuck client fails the
    /// test instead of hanging it.
    pub fn open(args: &[&str], target: &str, secs: u32) -> QemuIoSession {
        use std::io::Read;
        let mut child = Command::new("timeout")
            .arg(secs.to_string())
            .arg("qemu-io")
            .args(args)
            .arg(target)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("qemu-io");
        let what = format!("qemu-io {args:?} {target}");
        // The prompt has no newline: read bytes until it is there.
        let mut seen = Vec::new();
        let stdout = child.stdout.as_mut().expect("stdout");
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"qemu-io> ") {
            match stdout.read(&mut byte) {
                Ok(1) => seen.push(byte[0]),
                _ => {
                    let o = child.wait_with_output().expect("qemu-io");
                    panic!(
                        "{what} did not open: {}{}{}",
                        String::from_utf8_lossy(&seen),
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
            }
        }
        QemuIoSession { child }
    }

    /// Sends `cmds`, one a line, without waiting for them.
    pub fn send(&mut self, cmds: &[String]) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("stdin");
        for c in cmds {
            writeln!(stdin, "{c}").expect("qemu-io stdin");
        }
        stdin.flush().expect("qemu-io stdin");
    }

    /// Ends the session (stdin closed, so qemu-io quits after its
    /// commands) and returns whether it exited 0, and all it printed
    /// (without its prompts, so it reads as with `-c`).
    pub fn finish(self) -> (bool, String) {
        self.finish_streaming(|_| {})
    }

    /// As `finish`, handing each line of output to `each` as it comes.
    pub fn finish_streaming(mut self, mut each: impl FnMut(&str)) -> (bool, String) {
        use std::io::BufRead;
        drop(self.child.stdin.take());
        let mut out = String::new();
        let stdout = std::io::BufReader::new(self.child.stdout.take().expect("stdout"));
        for line in stdout.lines().map_while(Result::ok) {
            // As with `-c`: without the prompts qemu-io shows before each
            // command it reads.
            let line = line.trim_start_matches("qemu-io> ");
            each(line);
            out.push_str(line);
            out.push('\n');
        }
        let o = self.child.wait_with_output().expect("qemu-io");
        out.push_str(&String::from_utf8_lossy(&o.stderr));
        (o.status.success(), out)
    }
}
