//! `cargo xtask bench jobs`: block jobs inside the appliance next to the
//! host's `qemu-img convert` between the same kind of files in the same
//! run, and the halt time.
//!
//! - mirror: `blockdev-mirror` sync=full of a raw image filled with data
//!   (virtio-blk disk0 → disk1), from the command to `BLOCK_JOB_READY`;
//! - backup: `blockdev-backup` sync=full, from the command to
//!   `BLOCK_JOB_COMPLETED`;
//! - the floor: `qemu-img convert -f raw -O raw -n` between two raw files
//!   of the same size on the host (target preallocated like the disk);
//! - halt: QMP `quit` sent → QEMU exit, with an idle graph and with an
//!   unthrottled mirror copying.
//!
//! TCG, medians; printed, never asserted.

use clap::Args;
use harness::host::MIB;
use harness::{Appliance, QemuConfig};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct JobsArgs {
    /// Image size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Runs of each measurement (the median is printed).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

pub(crate) fn sh(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

pub(crate) fn raw_file(path: &Path, size: u64) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(path)
        .arg(size.to_string()))
}

/// A raw file of `size` bytes with data everywhere, so nothing is
/// skipped as a hole or as zeroes.
pub(crate) fn filled_raw(path: &Path, size: u64) -> Result<(), String> {
    raw_file(path, size)?;
    sh(Command::new("qemu-io")
        .args(["-f", "raw", "-c", &format!("write -P 0x5a 0 {size}")])
        .arg(path))
}

pub(crate) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub(crate) fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn boot(src: &Path, tgt: &Path) -> Result<Appliance, String> {
    let image = harness::image::build(true)?;
    let cfg = QemuConfig {
        disks: vec![src.to_path_buf(), tgt.to_path_buf()],
        append: "--blockdev driver=virtio-blk,node-name=src,serial=disk0 \
                 --blockdev driver=virtio-blk,node-name=tgt,serial=disk1"
            .into(),
        ..QemuConfig::default()
    };
    let mut a = Appliance::start(&image, &cfg)?;
    a.qmp().negotiate()?;
    a.qmp()
        .set_timeout(Duration::from_secs(600))
        .map_err(|e| e.to_string())?;
    Ok(a)
}

/// Starts a job and waits for `event`; returns the time in between.
pub(crate) fn timed_job(
    a: &mut Appliance,
    cmd: &str,
    args: Value,
    event: &str,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    a.qmp().cmd(cmd, args)?;
    let ev = a
        .qmp()
        .wait_event(event, Duration::from_secs(600))
        .map_err(|e| format!("{cmd}: waiting for {event}: {e}"))?;
    let took = t0.elapsed();
    if ev["data"].get("error").is_some() {
        return Err(format!("{cmd} failed: {ev}"));
    }
    Ok(took)
}

/// `quit` sent → QEMU gone.
pub(crate) fn timed_quit(mut a: Appliance) -> Result<Duration, String> {
    let t0 = Instant::now();
    a.qmp()
        .send_raw(b"{\"execute\": \"quit\"}\n")
        .map_err(|e| e.to_string())?;
    // Read as a client does, so the appliance's last words never block.
    while a.qmp().recv().is_ok() {}
    let status = a
        .wait_exit(Duration::from_secs(120))
        .ok_or("QEMU did not exit after quit")?;
    let took = t0.elapsed();
    if status.code() != Some(0) {
        return Err(format!("QEMU exited with {status}:\n{}", a.console()));
    }
    Ok(took)
}

fn wait_gone(a: &mut Appliance, id: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let jobs = a.qmp().cmd("query-jobs", Value::Null)?;
        if !jobs
            .as_array()
            .is_some_and(|j| j.iter().any(|j| j["id"] == id))
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("job {id} did not go away"))
}

pub fn bench(args: JobsArgs) -> Result<(), String> {
    let runs = args.runs.max(1);
    let size = args.size_mib.max(16) * MIB;
    // On disk, not tmpfs: the same kind of files QEMU's disks are.
    let dir: PathBuf = harness::workspace_root()
        .join("target/blockhaus")
        .join(format!("bench-jobs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let src = dir.join("src.img");
    let tgt = dir.join("tgt.img");
    let host_tgt = dir.join("host-tgt.img");
    filled_raw(&src, size)?;
    raw_file(&tgt, size)?;

    println!(
        "jobs benchmark: {} MiB raw image, virtio-blk → virtio-blk inside the appliance (TCG), \
         median of {runs}",
        size / MIB
    );
    let mut mirror = Vec::new();
    let mut backup = Vec::new();
    let mut convert = Vec::new();
    for _ in 0..runs {
        let mut a = boot(&src, &tgt)?;
        mirror.push(timed_job(
            &mut a,
            "blockdev-mirror",
            json!({"job-id": "m", "device": "src", "target": "tgt", "sync": "full"}),
            "BLOCK_JOB_READY",
        )?);
        a.qmp().cmd("job-cancel", json!({"id": "m"}))?;
        wait_gone(&mut a, "m")?;
        backup.push(timed_job(
            &mut a,
            "blockdev-backup",
            json!({"job-id": "b", "device": "src", "target": "tgt", "sync": "full"}),
            "BLOCK_JOB_COMPLETED",
        )?);
        timed_quit(a)?;

        raw_file(&host_tgt, size)?;
        let t0 = Instant::now();
        sh(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", "-n"])
            .arg(&src)
            .arg(&host_tgt))?;
        convert.push(t0.elapsed());
    }
    let (m, b, c) = (median(mirror), median(backup), median(convert));
    let mib = (size / MIB) as f64;
    println!(
        "{:<34} {:>9} {:>11} {:>17}",
        "copy", "time (s)", "MiB/s", "time ÷ convert"
    );
    for (name, d) in [
        ("mirror (command → READY)", m),
        ("backup (command → COMPLETED)", b),
        ("host qemu-img convert -f raw -O raw", c),
    ] {
        println!(
            "{:<34} {:>9.2} {:>11.1} {:>16.2}x",
            name,
            secs(d),
            mib / secs(d),
            secs(d) / secs(c)
        );
    }

    // Halt time.
    let mut idle = Vec::new();
    let mut busy = Vec::new();
    for _ in 0..runs {
        let a = boot(&src, &tgt)?;
        idle.push(timed_quit(a)?);
        let mut a = boot(&src, &tgt)?;
        a.qmp().cmd(
            "blockdev-mirror",
            json!({"job-id": "m", "device": "src", "target": "tgt", "sync": "full"}),
        )?;
        std::thread::sleep(Duration::from_millis(300));
        let jobs = a.qmp().cmd("query-jobs", Value::Null)?;
        if jobs[0]["status"] != "running" {
            eprintln!("note: the mirror was {} at the halt", jobs[0]["status"]);
        }
        busy.push(timed_quit(a)?);
    }
    println!("{:<34} {:>9}", "halt (quit sent → QEMU exit)", "time (ms)");
    println!(
        "{:<34} {:>9.1}",
        "idle graph (2 disk nodes)",
        secs(median(idle)) * 1000.0
    );
    println!(
        "{:<34} {:>9.1}",
        "unthrottled mirror copying",
        secs(median(busy)) * 1000.0
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
