//! `cargo xtask bench`: measurements, reported side by side with the floor
//! or the stack blockhaus replaces. Never asserted on: this machine is
//! shared and noisy.

use clap::Subcommand;
use harness::{Machine, QemuConfig};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum Which {
    /// QEMU start → QMP greeting, against a do-nothing PVH image's start →
    /// exit; and the disk image under OVMF (and rust-hypervisor-firmware
    /// when given) against the same do-nothing image started by the UEFI
    /// loader (the firmware's floor).
    Boot {
        /// Runs per machine type.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Which boot paths: `none` (-kernel, every machine type), `ovmf`
        /// or `rhf` (the disk image on q35), or `all` (rhf only when a
        /// binary is given).
        #[arg(long, default_value = "all", value_parser = ["none", "ovmf", "rhf", "all"])]
        firmware: String,
        /// The rust-hypervisor-firmware binary (default: $BLOCKHAUS_RHF).
        #[arg(long, value_name = "FILE")]
        firmware_path: Option<std::path::PathBuf>,
    },
    /// CPU use of the QEMU process while the appliance sits idle.
    Idle {
        /// Seconds to measure.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// NBD throughput and IOPS: blockhaus next to qemu-nbd and
    /// qemu-storage-daemon on the same image, with the same clients.
    Nbd(crate::bench_nbd::NbdArgs),
    /// Mirror and backup of a 1 GiB image next to qemu-img convert; halt time.
    Jobs(crate::bench_jobs::JobsArgs),
    /// 4 KiB writes into an empty qcow2 image next to qemu-img bench.
    Qcow2(crate::bench_qcow2::Qcow2Args),
    /// Mirror of an image from one appliance to another (ready, pivot)
    /// next to qemu-img convert into qemu-nbd; qemu-img bench through an
    /// appliance's NBD client node next to QEMU's client.
    Migrate(crate::bench_migrate::MigrateArgs),
}

pub fn bench(which: Which) -> Result<(), String> {
    crate::deps::ensure()?;
    match which {
        Which::Boot {
            runs,
            firmware,
            firmware_path,
        } => {
            use harness::qemu::Firmware;
            let uses_rhf = matches!(firmware.as_str(), "rhf" | "all");
            if firmware_path.is_some() && !uses_rhf {
                return Err(format!(
                    "--firmware-path is the rust-hypervisor-firmware binary: --firmware {firmware} does not use it"
                ));
            }
            let rhf = firmware_path
                .or_else(harness::qemu::rhf_binary)
                .filter(|_| uses_rhf);
            if firmware == "rhf" && rhf.is_none() {
                return Err("--firmware rhf needs --firmware-path or $BLOCKHAUS_RHF".into());
            }
            if let Some(p) = rhf.as_ref().filter(|p| !p.is_file()) {
                return Err(format!(
                    "rust-hypervisor-firmware: {}: no such file",
                    p.display()
                ));
            }
            // One build of the kernel and of the two loaders for every
            // boot path.
            let kernel = harness::image::build(true)?;
            if firmware == "none" || firmware == "all" {
                boot(runs.max(1), &kernel)?;
            }
            if firmware == "none" {
                return Ok(());
            }
            let disks = Disks::write(&kernel)?;
            if firmware == "ovmf" || firmware == "all" {
                boot_firmware(runs.max(1), &disks, Firmware::Ovmf, None)?;
            }
            if let Some(path) = rhf {
                boot_firmware(runs.max(1), &disks, Firmware::Rhf, Some(path))?;
            }
            Ok(())
        }
        Which::Idle { seconds } => idle(seconds.max(1)),
        Which::Nbd(args) => crate::bench_nbd::bench(args),
        Which::Jobs(args) => crate::bench_jobs::bench(args),
        Which::Qcow2(args) => crate::bench_qcow2::bench(args),
        Which::Migrate(args) => crate::bench_migrate::bench(args),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn boot(runs: usize, image: &Path) -> Result<(), String> {
    let size = std::fs::metadata(image).map_err(|e| e.to_string())?.len();
    let dir = std::env::temp_dir().join(format!("blockhaus-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let floor = dir.join("floor.elf");
    std::fs::write(&floor, crate::floor::image()).map_err(|e| e.to_string())?;

    println!("boot benchmark: {runs} runs per machine, TCG, median wall time");
    println!(
        "image: {} ({size} bytes, {:.1} KiB)",
        image.display(),
        size as f64 / 1024.0
    );
    println!(
        "{:<8} {:>22} {:>26} {:>8}",
        "machine", "blockhaus → greeting", "do-nothing PVH → exit", "ratio"
    );
    for machine in Machine::ALL {
        let cfg = QemuConfig::default().machine(machine);
        let mut ours = Vec::new();
        let mut base = Vec::new();
        for i in 0..runs {
            let sock = dir.join(format!("qmp-{i}.sock"));
            ours.push(
                to_greeting(&cfg, image, &sock).map_err(|e| format!("{}: {e}", machine.name()))?,
            );
            base.push(floor_to_exit(&cfg, &floor, &sock)?);
        }
        let (o, b) = (median(ours), median(base));
        println!(
            "{:<8} {:>19.1} ms {:>23.1} ms {:>7.2}x",
            machine.name(),
            ms(o),
            ms(b),
            o.as_secs_f64() / b.as_secs_f64()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// QEMU spawn → the appliance's greeting on COM2 (read past firmware
/// output under firmware); then `quit`.
fn to_greeting(cfg: &QemuConfig, image: &Path, sock: &Path) -> Result<Duration, String> {
    let _ = std::fs::remove_file(sock);
    let mut cmd = cfg.command(image, sock);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let mut qmp =
        harness::Qmp::connect(sock, Duration::from_secs(20)).map_err(|e| e.to_string())?;
    qmp.after_firmware = cfg.firmware != harness::qemu::Firmware::None;
    qmp.read_greeting().map_err(|e| e.to_string())?;
    let took = t0.elapsed();
    qmp.negotiate()?;
    let _ = qmp.execute("quit", serde_json::Value::Null);
    let _ = child.wait();
    Ok(took)
}

/// The floor: spawn → exit of the do-nothing image with the same devices;
/// no QMP client, so QEMU must not wait for one.
fn floor_to_exit(cfg: &QemuConfig, floor: &Path, sock: &Path) -> Result<Duration, String> {
    let _ = std::fs::remove_file(sock);
    let floor_cfg = QemuConfig {
        qmp_wait: false,
        ..cfg.clone()
    };
    let mut cmd = floor_cfg.command(floor, sock);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let t0 = Instant::now();
    let status = cmd.status().map_err(|e| e.to_string())?;
    if status.code() != Some(1) {
        return Err(format!(
            "the do-nothing image exited with {status}, expected 1 (isa-debug-exit 0)"
        ));
    }
    Ok(t0.elapsed())
}

/// The disk images the firmware paths boot, written once: the appliance's
/// and the floor's (the do-nothing PVH image in the kernel partition, read
/// and started by the same loader).
struct Disks {
    dir: std::path::PathBuf,
    image: std::path::PathBuf,
    floor: std::path::PathBuf,
    size: u64,
    loader: usize,
    payload: usize,
    kernel: u64,
}

impl Disks {
    fn write(kernel: &Path) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("blockhaus-bench-fw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let loader = harness::esp::build_loader(kernel)?;
        let image = dir.join("blockhaus.img");
        let size = harness::esp::write_disk(&image, &loader, None)?;
        let floor_elf = dir.join("floor.elf");
        std::fs::write(&floor_elf, crate::floor::image()).map_err(|e| e.to_string())?;
        let floor = dir.join("floor.img");
        harness::esp::write_disk(&floor, &harness::esp::build_loader(&floor_elf)?, None)?;
        Ok(Self {
            image,
            floor,
            size,
            loader: loader.efi.len(),
            payload: loader.kernel.len(),
            kernel: std::fs::metadata(kernel).map_err(|e| e.to_string())?.len(),
            dir,
        })
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The virtio-blk read requests QEMU traced into `trace`, and the KiB
/// they read.
fn reads(trace: &Path) -> (usize, u64) {
    let r = harness::qemu::VirtioBlkReads::from_trace(trace);
    (r.requests, r.sectors / 2)
}

/// The disk image under `firmware` (q35): QEMU start → QMP greeting, next
/// to the do-nothing PVH image started by the same loader (firmware, loader
/// and ExitBootServices, then isa-debug-exit): the difference is the
/// appliance's own time on top of the firmware. Beside the times, the
/// virtio-blk read requests of each and the KiB they read (the same in every run, whatever the
/// load on the machine: rust-hypervisor-firmware reads one sector per
/// request, so they are most of what it costs).
fn boot_firmware(
    runs: usize,
    disks: &Disks,
    firmware: harness::qemu::Firmware,
    firmware_path: Option<std::path::PathBuf>,
) -> Result<(), String> {
    let name = firmware.name();
    println!("boot benchmark under {name} (q35, TCG): {runs} runs, median wall time");
    println!(
        "disk image: {} bytes; BOOTX64.EFI {} bytes, kernel partition payload {} bytes (PVH image {} bytes)",
        disks.size, disks.loader, disks.payload, disks.kernel
    );
    let cfg = QemuConfig {
        firmware,
        firmware_path,
        ..QemuConfig::default()
    };
    let trace = disks.dir.join(format!("{name}.trace"));
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    let (mut our_reads, mut base_reads) = ((0, 0), (0, 0));
    for i in 0..runs {
        let sock = disks.dir.join(format!("qmp-{name}-{i}.sock"));
        let traced = harness::qemu::tracing_reads(&cfg, &trace);
        ours.push(to_greeting(&traced, &disks.image, &sock).map_err(|e| format!("{name}: {e}"))?);
        our_reads = reads(&trace);
        let traced = harness::qemu::tracing_reads(&cfg, &trace);
        base.push(floor_to_exit(&traced, &disks.floor, &sock)?);
        base_reads = reads(&trace);
    }
    let (o, b) = (median(ours), median(base));
    println!(
        "{:<8} {:>22} {:>26} {:>16}",
        "firmware", "blockhaus → greeting", "do-nothing PVH → exit", "appliance on top"
    );
    println!(
        "{:<8} {:>19.1} ms {:>23.1} ms {:>13.1} ms",
        name,
        ms(o),
        ms(b),
        ms(o.saturating_sub(b))
    );
    let reads = |(n, kib): (usize, u64)| format!("{n} reads, {kib} KiB");
    println!(
        "{:<8} {:>25} {:>26} {:>16}",
        "",
        reads(our_reads),
        reads(base_reads),
        reads((
            our_reads.0.saturating_sub(base_reads.0),
            our_reads.1.saturating_sub(base_reads.1)
        ))
    );
    println!("goal: the appliance's time on top of the floor ≤ 100 ms; the image ≤ 4 MiB");
    Ok(())
}

fn idle(seconds: u64) -> Result<(), String> {
    let image = harness::image::build(true)?;
    println!("idle benchmark: QEMU's CPU use over {seconds} s with the appliance idle (TCG)");
    println!("{:<16} {:>14}", "machine", "CPU (% of a core)");
    let mut runs: Vec<(String, QemuConfig)> = Machine::ALL
        .into_iter()
        .map(|m| (m.name().to_string(), QemuConfig::default().machine(m)))
        .collect();
    // Managed by boot options alone: no UART on COM2, so no QMP.
    let no_com2 = QemuConfig {
        com2: false,
        ..QemuConfig::default()
    };
    runs.push(("q35, no COM2".into(), no_com2));
    for (name, cfg) in runs {
        let mut a = harness::Appliance::start(&image, &cfg)?;
        if cfg.com2 {
            a.qmp().negotiate()?;
        } else {
            a.wait_console("ready in", Duration::from_secs(20))?;
        }
        std::thread::sleep(Duration::from_millis(500)); // let boot settle
        let pct = 100.0 * a.cpu_share(Duration::from_secs(seconds))?;
        println!("{name:<16} {pct:>13.2} %");
        if cfg.com2 {
            let _ = a.qmp().execute("quit", serde_json::Value::Null);
        } else {
            a.qemu_monitor()?
                .cmd("system_powerdown", serde_json::Value::Null)?;
        }
        a.wait_exit(Duration::from_secs(10));
    }
    println!("goal: under 2 % of a core");
    Ok(())
}
