//! `cargo xtask bench qcow2`: 4 KiB writes into an empty qcow2 image
//! through the appliance (virtio-blk disk → `qcow2` node), next to
//! `qemu-img bench -w` on the same kind of image on the host in the same
//! run, as ratios.
//!
//! How the appliance is measured: its `human-monitor-command` qemu-io has
//! no batch or aio mode, so the bench issues one `write` of 4 KiB per QMP
//! command, at queue depth 1. Two figures: the appliance's own time per
//! write (qemu-io's report, `ops/sec` of a one-op command, measured inside
//! the guest around the request through the qcow2 node, cluster
//! allocation included), and the wall time per write seen from the host
//! (with the QMP round trip over the emulated UART). `qemu-img bench` runs
//! at queue depth 1 (`-d 1`, the like-for-like figure) and at its default
//! depth 64. "Random" is the same scattered pattern on both sides: the
//! offset advances by a prime number of 4 KiB blocks modulo the image
//! size (`qemu-img bench -S`), so every write lands in a new cluster.

use clap::Args;
use harness::host::MIB;
use harness::{Appliance, QemuConfig};
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct Qcow2Args {
    /// 4 KiB writes per pattern.
    #[arg(long, default_value_t = 2000)]
    count: u64,
}

const SIZE: u64 = 1 << 30;
const BLOCK: u64 = 4096;
/// Stride of the scattered pattern, in 4 KiB blocks (a prime: no repeats
/// before 262144 writes in 1 GiB).
const STRIDE_BLOCKS: u64 = 40009;

fn sh(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{cmd:?} failed: {text}"))
    }
}

fn empty_qcow2(path: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(SIZE.to_string()))?;
    Ok(())
}

/// `qemu-img bench -w` on a fresh empty image; returns seconds.
fn host_bench(path: &Path, count: u64, step: u64, depth: u32) -> Result<f64, String> {
    empty_qcow2(path)?;
    let out = sh(Command::new("qemu-img")
        .args([
            "bench",
            "-w",
            "-f",
            "qcow2",
            "-t",
            "writeback",
            "-s",
            "4096",
        ])
        .args(["-c", &count.to_string()])
        .args(["-d", &depth.to_string()])
        .args(["-S", &step.to_string()])
        .arg(path))?;
    // "Run completed in 1.234 seconds."
    out.split("Run completed in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("unexpected qemu-img bench output: {out}"))
}

/// Writes `count` blocks through the appliance; returns (sum of the
/// appliance's own times, wall time), in seconds.
fn appliance_bench(path: &Path, count: u64, step: u64) -> Result<(f64, f64), String> {
    empty_qcow2(path)?;
    // The disk cannot grow like a host file: room for every cluster.
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(SIZE + 64 * MIB))
        .map_err(|e| e.to_string())?;
    let image = harness::image::build(true)?;
    let cfg = QemuConfig {
        disks: vec![path.to_path_buf()],
        append: "--blockdev driver=virtio-blk,node-name=file0,serial=disk0 \
                 --blockdev qcow2,node-name=fmt0,file=file0"
            .into(),
        ..QemuConfig::default()
    };
    let mut a = Appliance::start(&image, &cfg)?;
    a.qmp().negotiate()?;
    let mut inside = 0.0;
    let t0 = Instant::now();
    let mut offset = 0;
    for _ in 0..count {
        let line = format!("qemu-io fmt0 \"write -P 0x5a {offset} 4k\"");
        let out = a
            .qmp()
            .cmd("human-monitor-command", json!({"command-line": line}))?;
        let out = out.as_str().unwrap_or_default();
        // "... (X KiB/sec and R ops/sec)": one op, so it took 1/R s.
        let rate: f64 = out
            .split(" and ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("unexpected qemu-io output: {out}"))?;
        inside += 1.0 / rate;
        offset = (offset + step) % SIZE;
    }
    let wall = t0.elapsed().as_secs_f64();
    a.qmp()
        .send_raw(b"{\"execute\": \"quit\"}\n")
        .map_err(|e| e.to_string())?;
    while a.qmp().recv().is_ok() {}
    let status = a
        .wait_exit(Duration::from_secs(120))
        .ok_or("QEMU did not exit")?;
    if status.code() != Some(0) {
        return Err(format!("QEMU exited with {status}"));
    }
    let check = sh(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path))?;
    if !check.contains("No errors were found") {
        return Err(format!("qemu-img check after the bench: {check}"));
    }
    Ok((inside, wall))
}

pub fn bench(args: Qcow2Args) -> Result<(), String> {
    let count = args.count.max(1);
    let dir = harness::workspace_root()
        .join("target/blockhaus")
        .join(format!("bench-qcow2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let img = dir.join("bench.qcow2");
    println!(
        "qcow2 benchmark: {count} writes of 4 KiB into an empty 1 GiB qcow2 image (64 KiB \
         clusters), TCG; appliance at queue depth 1 through QMP qemu-io"
    );
    println!(
        "{:<11} {:>14} {:>14} {:>14} {:>14} {:>10} {:>10}",
        "pattern",
        "appl. inside",
        "appl. wall",
        "qemu-img d=1",
        "qemu-img d=64",
        "ratio d=1",
        "ratio d=64"
    );
    for (name, step) in [("sequential", BLOCK), ("random", STRIDE_BLOCKS * BLOCK)] {
        let (inside, wall) = appliance_bench(&img, count, step)?;
        let d1 = host_bench(&img, count, step, 1)?;
        let d64 = host_bench(&img, count, step, 64)?;
        let iops = |s: f64| count as f64 / s;
        println!(
            "{:<11} {:>9.0} IOPS {:>9.0} IOPS {:>9.0} IOPS {:>9.0} IOPS {:>9.2}x {:>9.2}x",
            name,
            iops(inside),
            iops(wall),
            iops(d1),
            iops(d64),
            iops(inside) / iops(d1),
            iops(inside) / iops(d64)
        );
    }
    println!("ratio: the appliance's own IOPS / qemu-img bench's IOPS on the host");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
