//! `cargo xtask bench migrate`: storage migration between appliances and
//! the NBD client node, next to QEMU's tools on the same host in the same
//! run.
//!
//! - migrate: appliance A mirrors its disk (`blockdev-add driver=nbd` to
//!   appliance B's export, `blockdev-mirror` sync=full) from the command
//!   to `BLOCK_JOB_READY`, then `job-complete` to `BLOCK_JOB_COMPLETED`
//!   (the pivot); the floor is `qemu-img convert -n` from the same host
//!   file into a host `qemu-nbd` serving a file of the same size;
//! - client: `qemu-img bench` (4 KiB, reads then writes, queue depth 16)
//!   through a proxy whose NBD client reaches a host `qemu-nbd`: the
//!   appliance (nbd node exported again) next to `qemu-storage-daemon`
//!   (QEMU's nbd driver exported again).
//!
//! TCG, medians; printed, never asserted.

use crate::bench_jobs::{filled_raw, median, raw_file, secs, sh, timed_job, timed_quit};
use crate::bench_nbd::{Running, spawn, start, wait_port};
use clap::Args;
use harness::host::MIB;
use harness::{Appliance, QemuConfig};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct MigrateArgs {
    /// Image size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Runs of each measurement (the median is printed).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Requests per `qemu-img bench` run.
    #[arg(long, default_value_t = 20000)]
    count: u64,
}

/// An appliance serving `disk` (if any) as export `disk`; returns it and
/// the host port its NBD server is forwarded to.
fn appliance(disk: Option<&Path>) -> Result<(Appliance, u16), String> {
    let image = harness::image::build(true)?;
    let port = harness::qemu::free_port();
    let mut append =
        String::from("loglevel=warn --nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809");
    if disk.is_some() {
        append += " --blockdev driver=virtio-blk,node-name=vblk,serial=disk0 \
                   --export type=nbd,id=e0,node-name=vblk,name=disk,writable=on";
    }
    let cfg = QemuConfig {
        disks: disk.map(Path::to_path_buf).into_iter().collect(),
        nbd_port: Some(port),
        append,
        ..QemuConfig::default()
    };
    let mut a = Appliance::start(&image, &cfg)?;
    a.qmp().negotiate()?;
    a.qmp()
        .set_timeout(Duration::from_secs(600))
        .map_err(|e| e.to_string())?;
    Ok((a, port))
}

/// `blockdev-add driver=nbd` named `node` to the host's `port` (the
/// guest reaches the host as 10.0.2.2).
fn add_nbd_node(a: &mut Appliance, node: &str, port: u16) -> Result<(), String> {
    a.qmp()
        .cmd(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": node, "export": "disk",
                   "server": {"type": "inet", "host": "10.0.2.2", "port": port.to_string()}}),
        )
        .map(|_| ())
}

/// One migration A → B: (command → READY, job-complete → COMPLETED).
fn migrate(src: &Path, tgt: &Path) -> Result<(Duration, Duration), String> {
    let (b, b_port) = appliance(Some(tgt))?;
    let (mut a, _) = appliance(Some(src))?;
    add_nbd_node(&mut a, "target", b_port)?;
    let ready = timed_job(
        &mut a,
        "blockdev-mirror",
        json!({"job-id": "m", "device": "vblk", "target": "target", "sync": "full"}),
        "BLOCK_JOB_READY",
    )?;
    let pivot = timed_job(
        &mut a,
        "job-complete",
        json!({"id": "m"}),
        "BLOCK_JOB_COMPLETED",
    )?;
    timed_quit(a)?;
    timed_quit(b)?;
    Ok((ready, pivot))
}

/// `qemu-img bench` of 4 KiB requests at `uri`; returns seconds.
fn img_bench(uri: &str, write: bool, count: u64) -> Result<f64, String> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["bench", "-f", "raw", "-s", "4096", "-d", "16", "-t", "none"])
        .args(["-c", &count.to_string()]);
    if write {
        cmd.arg("-w");
    }
    let out = cmd
        .arg(uri)
        .output()
        .map_err(|e| format!("qemu-img bench: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "qemu-img bench {uri} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // "Run completed in 1.234 seconds."
    text.split("Run completed in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("unexpected qemu-img bench output: {text}"))
}

/// The proxy under test in front of `qemu-nbd` on `backend_port`:
/// returns what keeps it running and the URI of its export.
fn proxy(which: &str, backend_port: u16) -> Result<(Running, String), String> {
    match which {
        "blockhaus" => {
            let (mut a, port) = appliance(None)?;
            add_nbd_node(&mut a, "remote", backend_port)?;
            a.qmp().cmd(
                "block-export-add",
                json!({"type": "nbd", "id": "e", "node-name": "remote", "name": "disk",
                       "writable": true}),
            )?;
            let uri = format!("nbd://127.0.0.1:{port}/disk");
            Ok((Running::Appliance(Box::new(a)), uri))
        }
        _ => {
            let port = harness::qemu::free_port();
            let child = spawn(
                Command::new("qemu-storage-daemon")
                    .arg("--blockdev")
                    .arg(format!(
                        "driver=nbd,node-name=r0,export=disk,server.type=inet,\
                         server.host=127.0.0.1,server.port={backend_port}"
                    ))
                    .arg("--nbd-server")
                    .arg(format!(
                        "addr.type=inet,addr.host=127.0.0.1,addr.port={port}"
                    ))
                    .args([
                        "--export",
                        "type=nbd,id=e0,node-name=r0,name=disk,writable=on",
                    ]),
            )?;
            wait_port(port, Duration::from_secs(10))?;
            Ok((Running::Host(child), format!("nbd://127.0.0.1:{port}/disk")))
        }
    }
}

pub fn bench(args: MigrateArgs) -> Result<(), String> {
    let runs = args.runs.max(1);
    let size = args.size_mib.max(16) * MIB;
    let count = args.count.max(1);
    // On disk, not tmpfs: the same kind of files QEMU's disks are.
    let dir: PathBuf = harness::workspace_root()
        .join("target/blockhaus")
        .join(format!("bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let src = dir.join("src.img");
    let tgt = dir.join("tgt.img");
    filled_raw(&src, size)?;

    println!(
        "migrate benchmark: {} MiB raw image, appliance → appliance over NBD (TCG, user \
         network), median of {runs}",
        size / MIB
    );
    let (mut ready, mut pivot, mut convert) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        raw_file(&tgt, size)?;
        let (r, p) = migrate(&src, &tgt)?;
        ready.push(r);
        pivot.push(p);
        raw_file(&tgt, size)?;
        let port = harness::qemu::free_port();
        let (server, target) = start("qemu-nbd", &tgt, port)?;
        let t0 = Instant::now();
        sh(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", "-n"])
            .arg(&src)
            .arg(&target.uri))?;
        convert.push(t0.elapsed());
        drop(server);
    }
    let (r, p, c) = (median(ready), median(pivot), median(convert));
    let mib = (size / MIB) as f64;
    println!(
        "{:<40} {:>9} {:>9} {:>15}",
        "copy", "time (s)", "MiB/s", "time ÷ convert"
    );
    println!(
        "{:<40} {:>9.2} {:>9.1} {:>14.2}x",
        "mirror A → B (command → READY)",
        secs(r),
        mib / secs(r),
        secs(r) / secs(c)
    );
    println!(
        "{:<40} {:>9.3} {:>9} {:>15}",
        "pivot (job-complete → COMPLETED)",
        secs(p),
        "",
        ""
    );
    println!(
        "{:<40} {:>9.2} {:>9.1} {:>14.2}x",
        "host qemu-img convert → qemu-nbd",
        secs(c),
        mib / secs(c),
        1.0
    );

    // qemu-img bench through each proxy's NBD client.
    let port = harness::qemu::free_port();
    let (backend, _) = start("qemu-nbd", &src, port)?;
    println!(
        "\nqemu-img bench -s 4096 -d 16 -c {count} through an NBD client node in front of \
         qemu-nbd, median of {runs}"
    );
    println!("{:<40} {:>12} {:>12}", "proxy", "read IOPS", "write IOPS");
    for which in ["qemu-storage-daemon", "blockhaus"] {
        let (mut reads, mut writes) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let (running, uri) = proxy(which, port)?;
            reads.push(Duration::from_secs_f64(img_bench(&uri, false, count)?));
            writes.push(Duration::from_secs_f64(img_bench(&uri, true, count)?));
            drop(running);
        }
        println!(
            "{:<40} {:>12.0} {:>12.0}",
            which,
            count as f64 / secs(median(reads)),
            count as f64 / secs(median(writes))
        );
    }
    drop(backend);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
