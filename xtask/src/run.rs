//! `cargo xtask run`: boot the appliance for a person to use.

use clap::Args;
use harness::qemu::Firmware;
use harness::{Accel, Machine, QemuConfig};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct RunArgs {
    /// QEMU machine type.
    #[arg(long, default_value = "q35", value_parser = ["q35", "pc", "microvm"])]
    machine: String,
    /// Accelerator (KVM here is nested and slow to boot q35/pc).
    #[arg(long, default_value = "tcg", value_parser = ["tcg", "kvm"])]
    accel: String,
    /// Disk images to attach (virtio-blk, serials disk0, disk1, ...):
    /// raw, or qcow2, which is opened as qcow2 (its file cannot grow in the
    /// appliance: give it room with `truncate -s`). Default:
    /// target/blockhaus/disk0.img, 1 GiB raw, made with qemu-img.
    #[arg(long = "disk")]
    disks: Vec<PathBuf>,
    /// Guest memory.
    #[arg(long, default_value = "256M")]
    memory: String,
    /// Extra kernel command line (e.g. "loglevel=debug" or
    /// "--blockdev null-co,node-name=n0").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    append: String,
    /// Boot the debug build instead of the release build.
    #[arg(long)]
    debug: bool,
    /// Host port where the disks are exported over NBD (QEMU user
    /// networking forwards 127.0.0.1:PORT to the appliance's 10809).
    #[arg(long, default_value_t = 10809)]
    nbd_port: u16,
    /// Where the default disk and the sockets live.
    #[arg(long, default_value = "target/blockhaus")]
    state_dir: PathBuf,
    /// Boot the disk image (`cargo xtask image`) under firmware instead of
    /// the PVH ELF. Without FILE: target/blockhaus.img, made (exporting
    /// every --disk, as without --image) if it does not exist yet.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "")]
    image: Option<PathBuf>,
    /// What boots the appliance: `none` (QEMU's -kernel with the PVH ELF),
    /// `ovmf` (Debian's OVMF from pflash; the default with --image) or
    /// `rhf` (rust-hypervisor-firmware: --firmware-path or $BLOCKHAUS_RHF).
    #[arg(long, value_parser = ["none", "ovmf", "rhf"])]
    firmware: Option<String>,
    /// The rust-hypervisor-firmware binary for `--firmware rhf` (default:
    /// $BLOCKHAUS_RHF).
    #[arg(long, value_name = "FILE")]
    firmware_path: Option<PathBuf>,
}

pub fn run(args: RunArgs) -> Result<(), String> {
    crate::deps::ensure()?;
    let firmware = match (args.firmware.as_deref(), &args.image) {
        (Some("none"), Some(_)) => {
            return Err(
                "--image needs firmware (--firmware ovmf|rhf): -kernel boots the ELF".into(),
            );
        }
        (Some("ovmf"), _) | (None, Some(_)) => Firmware::Ovmf,
        (Some("rhf"), _) => Firmware::Rhf,
        _ => Firmware::None,
    };
    let firmware_path = args
        .firmware_path
        .clone()
        .or_else(harness::qemu::rhf_binary);
    match (firmware, &firmware_path) {
        (Firmware::Rhf, None) => {
            return Err(
                "--firmware rhf needs --firmware-path FILE or $BLOCKHAUS_RHF: \
                 rust-hypervisor-firmware is not packaged (build it from \
                 cloud-hypervisor/rust-hypervisor-firmware)"
                    .into(),
            );
        }
        (Firmware::Rhf, Some(p)) if !p.is_file() => {
            return Err(format!("--firmware rhf: {}: no such file", p.display()));
        }
        (Firmware::None | Firmware::Ovmf, _) if args.firmware_path.is_some() => {
            return Err("--firmware-path is the rust-hypervisor-firmware binary: \
                 it needs --firmware rhf"
                .into());
        }
        _ => {}
    }
    if firmware != Firmware::None {
        if !args.append.is_empty() {
            return Err("--append: under firmware the configuration is the image's \
                 blockhaus.conf (cargo xtask image --config FILE)"
                .into());
        }
        if args.machine == "microvm" {
            return Err(format!(
                "--firmware {}: the disk image boots on q35 or pc, not microvm",
                firmware.name()
            ));
        }
        if args.debug {
            return Err("--debug: the disk image carries the release build".into());
        }
    }
    let state = harness::workspace_root().join(&args.state_dir);
    std::fs::create_dir_all(&state).map_err(|e| format!("{}: {e}", state.display()))?;
    let mut disks = args.disks.clone();
    if disks.is_empty() {
        let disk = state.join("disk0.img");
        if !disk.exists() {
            let ok = Command::new("qemu-img")
                .args(["create", "-q", "-f", "raw"])
                .arg(&disk)
                .arg("1G")
                .status()
                .map_err(|e| format!("qemu-img: {e}"))?;
            if !ok.success() {
                return Err(format!("qemu-img create {} failed", disk.display()));
            }
            eprintln!("xtask: made default disk {} (raw, 1 GiB)", disk.display());
        }
        disks.push(disk);
    }
    let qcow2: Vec<bool> = disks
        .iter()
        .map(|d| match Qcow2File::read(d) {
            Some(q) => {
                if let Some(note) = q.room_note(d) {
                    eprintln!("{note}");
                }
                q.backing.is_none()
            }
            None => false,
        })
        .collect();
    // QMP is on virtio-serial ports: every client that connects gets its
    // own greeting, so no proxy is needed. Port 0 (`org.qemu.qmp.0`,
    // socket `qmp-port0.sock`) is the user's: `qmp.sock`, where `top` and
    // `graph` look, links to it. Port 1 is a second monitor, which Ctrl-C
    // here uses for `quit`. No COM2: a 16550 greets once, at boot.
    let com2 = state.join("com2.sock");
    let port_sock = harness::qemu::qmp_port_socket(&com2, 0);
    let quit_sock = harness::qemu::qmp_port_socket(&com2, 1);
    let user_sock = state.join("qmp.sock");
    let monitor_sock = harness::qemu::qemu_monitor_socket(&com2);
    for old in [&com2, &port_sock, &quit_sock, &user_sock] {
        let _ = std::fs::remove_file(old);
    }

    let image = match (&firmware, &args.image) {
        (Firmware::None, _) => harness::image::build(!args.debug)?,
        (_, Some(p)) if !p.as_os_str().is_empty() => p.clone(),
        _ => {
            let path = crate::image::default_path();
            if !path.exists() {
                let config = state.join("blockhaus.conf");
                let text = storage_options(&qcow2, "").replace(" --", "\n--");
                std::fs::write(
                    &config,
                    format!("# made by cargo xtask run --image\n{text}\n"),
                )
                .map_err(|e| format!("{}: {e}", config.display()))?;
                crate::image::make(&crate::image::ImageArgs {
                    config: Some(config),
                    format: crate::image::Format::Raw,
                    output: Some(path.clone()),
                })?;
            }
            path
        }
    };
    let mut cfg = QemuConfig {
        machine: Machine::parse(&args.machine).ok_or("bad machine")?,
        accel: Accel::parse(&args.accel).ok_or("bad accel")?,
        memory: args.memory.clone(),
        append: match firmware {
            Firmware::None => storage_options(&qcow2, &args.append),
            Firmware::Ovmf | Firmware::Rhf => String::new(),
        },
        firmware,
        firmware_path: firmware_path.filter(|_| firmware == Firmware::Rhf),
        nbd_port: Some(args.nbd_port),
        disks: disks.clone(),
        com2: false,
        qmp_ports: 2,
        ..QemuConfig::default()
    };
    if cfg.accel == Accel::Kvm && !harness::qemu::kvm_usable() {
        return Err("--accel kvm: /dev/kvm cannot be opened".into());
    }
    cfg.extra.clear();
    let mut cmd = cfg.command(&image, &com2);
    // QEMU gets its own process group: Ctrl-C reaches xtask, which stops the
    // appliance through QMP `quit` (the clean halt path) instead of killing it.
    use std::os::unix::process::CommandExt;
    cmd.process_group(0).stdin(Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
    if let Err(e) = std::os::unix::fs::symlink(port_sock.file_name().expect("a file"), &user_sock) {
        let _ = child.kill();
        return Err(format!("{}: {e}", user_sock.display()));
    }
    let exports: String = (0..disks.len())
        .map(|i| {
            format!(
                "xtask: NBD:   nbdinfo nbd://127.0.0.1:{port}/disk{i}    qemu-img info nbd://127.0.0.1:{port}/disk{i}\n",
                port = args.nbd_port
            )
        })
        .collect();
    eprintln!(
        "\nxtask: blockhaus is booting ({} {}, {}image {}).\n\
         xtask: QMP:   socat - UNIX-CONNECT:{}\n\
         xtask:        then type {{\"execute\": \"qmp_capabilities\"}} and e.g. {{\"execute\": \"query-version\"}}\n\
         xtask:        (every connection gets its own greeting; qmp-shell {} works too)\n\
         {exports}\
         xtask: stop:  Ctrl-C here (sends QMP quit: the appliance runs its halt path) or QMP {{\"execute\": \"quit\"}}\n",
        args.machine,
        args.accel,
        match firmware {
            Firmware::None => "",
            Firmware::Ovmf => "OVMF, ",
            Firmware::Rhf => "rust-hypervisor-firmware, ",
        },
        image.display(),
        user_sock.display(),
        user_sock.display()
    );
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).map_err(|e| e.to_string())?;
    let mut quit_sent: Option<Instant> = None;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if interrupted.load(Ordering::SeqCst) && quit_sent.is_none() {
            eprintln!("\nxtask: Ctrl-C: sending QMP quit");
            if let Err(e) = quit(&quit_sock) {
                eprintln!(
                    "xtask: QMP quit on {}: {e}; pressing the power button instead",
                    quit_sock.display()
                );
                if let Err(e) = power_button(&monitor_sock) {
                    eprintln!("xtask: {e}; killing QEMU");
                    let _ = child.kill();
                }
            }
            quit_sent = Some(Instant::now());
        }
        if quit_sent.is_some_and(|t| t.elapsed() > Duration::from_secs(15)) {
            eprintln!("xtask: the appliance did not stop within 15 s; killing QEMU");
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for old in [&port_sock, &quit_sock, &user_sock] {
        let _ = std::fs::remove_file(old);
    }
    eprintln!("xtask: QEMU exited ({status})");
    if status.success() {
        Ok(())
    } else {
        Err(format!("QEMU exited with {status}"))
    }
}

/// `quit` on QMP port `sock` (its own connection, its own greeting).
fn quit(sock: &Path) -> Result<(), String> {
    let mut q = harness::Qmp::connect(sock, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    q.set_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    q.negotiate()?;
    q.cmd("quit", serde_json::Value::Null)?;
    Ok(())
}

/// `system_powerdown` on QEMU's own monitor: the appliance sees the ACPI
/// power button and runs its halt path.
fn power_button(monitor: &Path) -> Result<(), String> {
    let mut q = harness::Qmp::connect(monitor, Duration::from_secs(5))
        .map_err(|e| format!("QEMU's monitor: {e}"))?;
    q.negotiate()?;
    q.cmd("system_powerdown", serde_json::Value::Null)?;
    Ok(())
}

/// Every attached disk as a virtio-blk node `diskN`, exported writable over
/// NBD under the same name; then the user's own `--append`.
fn storage_options(qcow2: &[bool], user: &str) -> String {
    let mut out = String::from("--nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809");
    for (i, &qcow2) in qcow2.iter().enumerate() {
        // A qcow2 image is opened as one: the export serves its contents.
        if qcow2 {
            out.push_str(&format!(
                " --blockdev driver=virtio-blk,node-name=disk{i}-file,serial=disk{i} \
                 --blockdev driver=qcow2,node-name=disk{i},file=disk{i}-file"
            ));
        } else {
            out.push_str(&format!(
                " --blockdev driver=virtio-blk,node-name=disk{i},serial=disk{i}"
            ));
        }
        out.push_str(&format!(
            " --export type=nbd,id=disk{i},node-name=disk{i},name=disk{i},writable=on"
        ));
    }
    if !user.is_empty() {
        out.push(' ');
        out.push_str(user);
    }
    out
}

/// What a disk file's qcow2 header says, if it is one.
struct Qcow2File {
    virtual_size: u64,
    file_size: u64,
    backing: Option<String>,
}

impl Qcow2File {
    fn read(path: &Path) -> Option<Qcow2File> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(path).ok()?;
        let mut h = [0u8; 32];
        f.read_exact(&mut h).ok()?;
        if &h[0..4] != b"QFI\xfb" {
            return None;
        }
        let be64 = |at: usize| u64::from_be_bytes(h[at..at + 8].try_into().unwrap_or_default());
        let (backing_offset, backing_len) =
            (be64(8), u32::from_be_bytes([h[16], h[17], h[18], h[19]]));
        let backing = if backing_offset != 0 && backing_len > 0 {
            let mut name = vec![0u8; backing_len.min(1023) as usize];
            f.seek(SeekFrom::Start(backing_offset)).ok()?;
            f.read_exact(&mut name).ok()?;
            Some(String::from_utf8_lossy(&name).into_owned())
        } else {
            None
        };
        Some(Qcow2File {
            virtual_size: be64(24),
            file_size: f.metadata().ok()?.len(),
            backing,
        })
    }

    /// What to tell the user before boot: the disk is the file as it is
    /// (it cannot grow), so an image made by `qemu-img create` has no room
    /// for new clusters; and a backing file the appliance cannot open.
    fn room_note(&self, path: &Path) -> Option<String> {
        let mib = |b: u64| b.div_ceil(1 << 20);
        let mut note = String::new();
        if let Some(b) = &self.backing {
            note.push_str(&format!(
                "xtask: {} has a backing file ({b}): the appliance opens backing files as nodes only, \
                 so it is attached raw; open it with --append \"--blockdev ...\" (see the README)\n",
                path.display()
            ));
        }
        if self.file_size < self.virtual_size {
            // Data plus about 1/8192 for L2 tables and refcounts, and 1 MiB.
            let room = self.virtual_size + self.virtual_size / 4096 + (1 << 20);
            note.push_str(&format!(
                "xtask: {} is a qcow2 image of {} MiB in a file of {} KiB. In the appliance the disk is \
                 the file as it is now and cannot grow: writes that need new clusters fail with \
                 \"No space left on device\" once it is full (query-named-block-nodes shows the room left \
                 as x-room-left). Give it room first, e.g.\n  truncate -s {}M {}\n\
                 (trailing space is free clusters to qcow2), or put the image on a raw block device or LV.",
                path.display(),
                mib(self.virtual_size),
                self.file_size.div_ceil(1024),
                mib(room),
                path.display()
            ));
        }
        (!note.is_empty()).then_some(note)
    }
}
