//! The Linux VM that blockhaus replaces, as a benchmark anchor: Debian's
//! kernel with busybox and the host's `qemu-nbd` in an initramfs, serving
//! its virtio-blk disk over virtio-net exactly as a small storage VM does.
//!
//! This ports the method of the team's `shared/bench/linux-vm-anchor.sh`
//! (so that `cargo xtask bench nbd` needs nothing outside the repository):
//! the same packages (`linux-image-amd64`, `busybox-static`, fetched with
//! `apt-get download`), the same modules, the same guest init (`qemu-nbd
//! -t -f raw -x '' --cache=none --aio=threads /dev/vda`, printing
//! `NBD-READY`), the same QEMU devices (q35, virtio-blk-pci with
//! `cache=none`, virtio-net-pci without option ROM). The artefacts are
//! built once into `target/linux-anchor/` and reused.

use harness::qemu::NetnsTap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The virtio modules the guest loads, in dependency order.
const MODULES: [&str; 10] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
];

/// The built kernel and initramfs.
pub struct Artefacts {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The one file in `dir` whose name starts with `prefix` and ends with
/// `suffix`.
fn find_file(dir: &Path, prefix: &str, suffix: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Downloads `package` into `debs` unless a `.deb` of it is there.
fn download(debs: &Path, package: &str) -> Result<PathBuf, String> {
    let prefix = format!("{package}_");
    if let Some(p) = find_file(debs, &prefix, ".deb") {
        return Ok(p);
    }
    run(Command::new("apt-get")
        .args(["download", package])
        .current_dir(debs))?;
    find_file(debs, &prefix, ".deb").ok_or_else(|| format!("apt-get download {package}: no .deb"))
}

/// The kernel module file `name` under `dir` (any compression).
fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_module(&path, name) {
                return Some(found);
            }
        } else if let Some(file) = path.file_name().and_then(|n| n.to_str())
            && [".ko", ".ko.xz", ".ko.zst"]
                .iter()
                .any(|ext| file == format!("{name}{ext}"))
        {
            return Some(path);
        }
    }
    None
}

/// The guest's init: load the modules, configure eth0 from `nbdip=` /
/// `nbdgw=` on the kernel command line, serve /dev/vda with qemu-nbd.
fn init_script() -> String {
    format!(
        r#"#!/bin/sh
PATH=/bin:/sbin:/usr/bin:/usr/sbin; export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {modules}; do
  [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
done
IP=10.0.2.15/24; GW=10.0.2.2
for a in $(cat /proc/cmdline); do
  case "$a" in nbdip=*) IP=${{a#nbdip=}};; nbdgw=*) GW=${{a#nbdgw=}};; esac
done
i=0
while [ ! -b /dev/vda ] || [ ! -e /sys/class/net/eth0 ]; do
  i=$((i+1)); [ $i -gt 2000 ] && {{ echo "NBD-FAIL: no /dev/vda or eth0"; break; }}; usleep 5000
done
ip link set lo up
ip addr add "$IP" dev eth0
ip link set eth0 up
[ "$GW" != none ] && ip route add default via "$GW"
if qemu-nbd --fork -t -f raw -x '' -b 0.0.0.0 -p 10809 --cache=none --aio=threads /dev/vda; then
  echo NBD-READY
else
  echo NBD-FAIL
fi
while :; do sleep 3600; done
"#,
        modules = MODULES.join(" ")
    )
}

/// Builds (or finds) the kernel and initramfs under `target/linux-anchor`.
pub fn build() -> Result<Artefacts, String> {
    let work = harness::workspace_root().join("target/linux-anchor");
    let out = work.join("out");
    let arts = Artefacts {
        kernel: out.join("vmlinuz"),
        initrd: out.join("init.cpio.gz"),
    };
    if arts.kernel.is_file() && arts.initrd.is_file() {
        return Ok(arts);
    }
    println!("building the Linux anchor VM in {}", work.display());
    let debs = work.join("debs");
    for d in [&out, &debs] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let meta = download(&debs, "linux-image-amd64")?;
    let depends = run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&meta)
        .arg("Depends"))?;
    let kpkg = depends
        .split([',', ' ', '|'])
        .find(|w| {
            w.strip_prefix("linux-image-")
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        })
        .ok_or_else(|| format!("no kernel package in Depends: {depends}"))?
        .to_string();
    let kdeb = download(&debs, &kpkg)?;
    let bbdeb = download(&debs, "busybox-static")?;

    let x = work.join("extract");
    let root = work.join("rootfs");
    for d in [&x, &root] {
        let _ = std::fs::remove_dir_all(d);
    }
    let (xk, xb) = (x.join("k"), x.join("bb"));
    for (deb, dir) in [(&kdeb, &xk), (&bbdeb, &xb)] {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir))?;
    }
    let kvers = std::fs::read_dir(xk.join("lib/modules"))
        .map_err(|e| e.to_string())?
        .flatten()
        .next()
        .ok_or("no modules directory in the kernel package")?
        .file_name()
        .to_string_lossy()
        .into_owned();
    std::fs::copy(xk.join(format!("boot/vmlinuz-{kvers}")), &arts.kernel)
        .map_err(|e| format!("vmlinuz: {e}"))?;

    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "lib/modules",
        "lib64",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "etc",
    ] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
    }
    let busybox = root.join("bin/busybox");
    std::fs::copy(xb.join("bin/busybox"), &busybox).map_err(|e| format!("busybox: {e}"))?;
    for applet in run(Command::new(&busybox).arg("--list"))?.lines() {
        let link = root.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link).map_err(|e| e.to_string())?;
        }
    }
    // The host's qemu-nbd with the shared libraries it links.
    std::fs::copy("/usr/bin/qemu-nbd", root.join("usr/bin/qemu-nbd"))
        .map_err(|e| format!("qemu-nbd: {e}"))?;
    for lib in run(Command::new("ldd").arg("/usr/bin/qemu-nbd"))?
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let dest = root.join(lib.trim_start_matches('/'));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        // Follow links: the file itself goes in under the linked name.
        std::fs::copy(lib, &dest).map_err(|e| format!("{lib}: {e}"))?;
    }
    let kdir = xk.join("lib/modules").join(&kvers).join("kernel");
    for m in MODULES {
        let Some(src) = find_module(&kdir, m) else {
            continue; // built into the kernel
        };
        let dest = root.join(format!("lib/modules/{m}.ko"));
        let name = src.to_string_lossy().into_owned();
        let tool = if name.ends_with(".xz") {
            Some("xz")
        } else if name.ends_with(".zst") {
            Some("zstd")
        } else {
            None
        };
        match tool {
            Some(t) => {
                let data = Command::new(t)
                    .args(["-dc"])
                    .arg(&src)
                    .output()
                    .map_err(|e| format!("{t}: {e}"))?;
                std::fs::write(&dest, data.stdout).map_err(|e| e.to_string())?;
            }
            None => {
                std::fs::copy(&src, &dest).map_err(|e| e.to_string())?;
            }
        }
    }
    run(Command::new("mknod")
        .args(["-m", "600"])
        .arg(root.join("dev/console"))
        .args(["c", "5", "1"]))?;
    run(Command::new("mknod")
        .args(["-m", "666"])
        .arg(root.join("dev/null"))
        .args(["c", "1", "3"]))?;
    let init = root.join("init");
    std::fs::write(&init, init_script()).map_err(|e| e.to_string())?;
    run(Command::new("chmod").arg("+x").arg(&init))?;
    // newc cpio of the tree, sorted, then gzip: what Debian's initramfs is.
    let script = format!(
        "find . | LC_ALL=C sort | ./bin/busybox cpio -o -H newc 2>/dev/null | gzip -9 -n > {}",
        arts.initrd.display()
    );
    run(Command::new("sh").arg("-c").arg(script).current_dir(&root))?;
    let _ = std::fs::remove_dir_all(&x);
    Ok(arts)
}

/// How clients reach the VM.
pub enum Net {
    /// QEMU's user network, 127.0.0.1:PORT forwarded to the guest's 10809.
    Slirp(u16),
    /// A tap in a network namespace; the guest is [`NetnsTap::GUEST_IP`].
    Tap(NetnsTap),
}

/// A running Linux VM, killed on drop.
pub struct LinuxVm {
    child: Child,
}

impl Drop for LinuxVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LinuxVm {
    /// Boots the VM (q35, TCG, `memory`) on the raw `disk` with
    /// `cache=none` and waits for its `NBD-READY`.
    pub fn start(arts: &Artefacts, disk: &Path, net: &Net, memory: &str) -> Result<Self, String> {
        let mut append = String::from("console=ttyS0 quiet panic=-1");
        let mut cmd = match net {
            Net::Slirp(_) => Command::new("qemu-system-x86_64"),
            Net::Tap(t) => {
                append.push_str(&format!(" nbdip={}/24 nbdgw=none", NetnsTap::GUEST_IP));
                t.exec("qemu-system-x86_64")
            }
        };
        cmd.args(["-machine", "q35", "-accel", "tcg", "-m", memory]);
        cmd.arg("-kernel").arg(&arts.kernel);
        cmd.arg("-initrd").arg(&arts.initrd);
        cmd.args(["-append", &append]);
        cmd.args([
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ]);
        cmd.arg("-drive").arg(format!(
            "file={},if=none,format=raw,id=d0,cache=none",
            disk.display()
        ));
        cmd.args(["-device", "virtio-blk-pci,drive=d0"]);
        match net {
            Net::Slirp(port) => cmd
                .arg("-netdev")
                .arg(format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:10809")),
            Net::Tap(_) => cmd.arg("-netdev").arg(format!(
                "tap,id=n0,ifname={},script=no,downscript=no",
                NetnsTap::TAP
            )),
        };
        cmd.args(["-device", "virtio-net-pci,netdev=n0,romfile="]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().map_err(|e| format!("qemu: {e}"))?;
        let stdout = child.stdout.take().ok_or("qemu: no stdout")?;
        let vm = LinuxVm { child };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains("NBD-READY") => break,
                Ok(l) if l.contains("NBD-FAIL") || l.contains("Kernel panic") => {
                    return Err(format!("Linux VM: {l}"));
                }
                Ok(_) => {}
                Err(_) => return Err("Linux VM: no NBD-READY within 180 s".into()),
            }
        }
        // Keep draining the console so the guest never blocks on it.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        Ok(vm)
    }
}
