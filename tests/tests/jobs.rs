//! Block jobs in the booted appliance (issue 7) between real disks, checked
//! on the host after `quit` with `qemu-img compare` / `qemu-io`.
//! Guest writes during a job go to `top`, a `raw` node over the source disk
//! (mirror's source must be a root node, as in QEMU).

use harness::host::{MIB, create, qemu_io, run};
use harness::{Appliance, QemuConfig};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn compare(a: &Path, b: &Path) -> String {
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b))
}

fn wait_status(a: &mut Appliance, id: &str, status: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = a.qmp().cmd("query-jobs", Value::Null).unwrap();
        let job = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .cloned();
        match job {
            Some(j) if j["status"] == status => return,
            Some(j) if j.get("error").is_some() => panic!("job {id} failed: {j}"),
            None if status == "null" => return,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            other => panic!("job {id} never reached {status}: {other:?}"),
        }
    }
}

/// Two raw disks: `src` with the host's patterns, `tgt` blank.
fn two_disks(dir: &Path) -> (PathBuf, PathBuf, QemuConfig) {
    let src = dir.join("src.img");
    let tgt = dir.join("tgt.img");
    create(&src, 64 * MIB);
    create(&tgt, 64 * MIB);
    qemu_io(
        &src,
        &["write -P 0x11 0 32M".into(), "write -P 0x22 40M 8M".into()],
    );
    let cfg = QemuConfig {
        disks: vec![src.clone(), tgt.clone()],
        append: "--blockdev driver=virtio-blk,node-name=src,serial=disk0 \
                 --blockdev driver=virtio-blk,node-name=tgt,serial=disk1 \
                 --blockdev raw,node-name=top,file=src"
            .into(),
        ..QemuConfig::default()
    };
    (src, tgt, cfg)
}

#[test]
fn mirror_with_guest_writes_pivots_and_the_target_equals_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt, cfg) = two_disks(dir.path());
    let mut a = Appliance::boot(&cfg);
    let job = json!({"job-id": "m0", "device": "top", "target": "tgt", "sync": "full",
                     "filter-node-name": "mt0"});
    a.qmp().cmd("blockdev-mirror", job).unwrap();
    // Guest writes while the copy runs, through the job's filter (where a
    // user of `top` writes once the mirror has moved it above the filter).
    a.qemu_io("mt0", "write -P 0x33 1M 2M");
    let ready = a
        .qmp()
        .wait_event("BLOCK_JOB_READY", Duration::from_secs(60))
        .unwrap();
    assert_eq!(ready["data"]["device"], "m0", "{ready}");
    assert_eq!(ready["data"]["type"], "mirror", "{ready}");
    assert_eq!(ready["data"]["len"], ready["data"]["offset"], "{ready}");
    // And while it is ready: mirrored to both.
    a.qemu_io("mt0", "write -P 0x44 50M 1M");
    a.qmp().cmd("job-complete", json!({"id": "m0"})).unwrap();
    let done = a
        .qmp()
        .wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60))
        .unwrap();
    assert!(done["data"].get("error").is_none(), "{done}");
    wait_status(&mut a, "m0", "null");
    let console = a.quit();
    assert!(console.contains("jobs cancelled: none"), "{console}");
    let reads = [
        "read -P 0x33 1M 2M",
        "read -P 0x44 50M 1M",
        "read -P 0x22 40M 8M",
    ];
    qemu_io(&tgt, &reads.map(String::from));
    let same = compare(&src, &tgt);
    assert!(
        same.contains("Images are identical."),
        "target equals source at completion: {same}"
    );
}

#[test]
fn backup_shows_the_source_as_it_was_when_the_job_started() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt, cfg) = two_disks(dir.path());
    let before = dir.path().join("before.img");
    std::fs::copy(&src, &before).unwrap();
    let mut a = Appliance::boot(&cfg);
    // Slow enough that the guest's writes land while it copies.
    a.qmp()
        .cmd(
            "blockdev-backup",
            json!({"job-id": "b0", "device": "src", "target": "tgt", "sync": "full", "speed": 32 * MIB}),
        )
        .unwrap();
    a.qemu_io("top", "write -P 0x66 0 4M");
    a.qemu_io("top", "write -P 0x77 44M 8M");
    a.qemu_io("top", "write -P 0x88 62M 2M");
    let done = a
        .qmp()
        .wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60))
        .unwrap();
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["type"], "backup", "{done}");
    a.quit();
    assert!(
        compare(&before, &tgt).contains("Images are identical."),
        "backup = source at job start"
    );
    qemu_io(
        &src,
        &[
            "read -P 0x66 0 4M".into(),
            "read -P 0x77 44M 8M".into(),
            "read -P 0x88 62M 2M".into(),
        ],
    );
}

#[test]
fn quit_during_a_throttled_mirror_cancels_it_and_closes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _tgt, cfg) = two_disks(dir.path());
    let mut a = Appliance::boot(&cfg);
    let job = json!({"job-id": "m1", "device": "top", "target": "tgt", "sync": "full",
                     "speed": MIB, "filter-node-name": "mt1"});
    a.qmp().cmd("blockdev-mirror", job).unwrap();
    a.qemu_io("mt1", "write -P 0x99 5M 1M");
    let console = a.quit();
    assert!(console.contains("jobs cancelled: m1"), "{console}");
    // The three nodes and the job's filter.
    assert!(console.contains("all 4 nodes closed"), "{console}");
    qemu_io(
        &src,
        &["read -P 0x99 5M 1M".into(), "read -P 0x11 6M 26M".into()],
    );
}

#[test]
fn powerdown_during_a_backup_cancels_it_and_closes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _tgt, cfg) = two_disks(dir.path());
    let mut a = Appliance::boot(&cfg);
    let job =
        json!({"job-id": "b1", "device": "src", "target": "tgt", "sync": "full", "speed": MIB});
    a.qmp().cmd("blockdev-backup", job).unwrap();
    a.qemu_io("top", "write -P 0x98 7M 1M");
    a.qemu_monitor()
        .unwrap()
        .cmd("system_powerdown", Value::Null)
        .unwrap();
    let ev = a
        .qmp()
        .wait_event("SHUTDOWN", Duration::from_secs(20))
        .unwrap();
    assert_eq!(ev["data"]["reason"], "guest-shutdown", "{ev}");
    let status = a.wait_exit(Duration::from_secs(60)).expect("QEMU exits");
    let console = a.console();
    assert_eq!(status.code(), Some(0), "{console}");
    assert!(console.contains("jobs cancelled: b1"), "{console}");
    assert!(
        console.contains("nodes closed") && !console.contains("NODES LEFT OPEN"),
        "{console}"
    );
    qemu_io(
        &src,
        &["read -P 0x98 7M 1M".into(), "read -P 0x11 8M 24M".into()],
    );
}

/// base.qcow2 (0x11 everywhere in the first 4 MiB) ← top.qcow2 (0x22 at
/// 1 MiB), each on its own disk with room to grow.
fn qcow2_chain(dir: &Path) -> (PathBuf, PathBuf, QemuConfig) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("16M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x11 0 4M"])
        .arg(&base));
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&top));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x22 1M 1M"])
        .arg(&top));
    for p in [&base, &top] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(32 * MIB)
            .unwrap();
    }
    let cfg = QemuConfig {
        disks: vec![base.clone(), top.clone()],
        append: "--blockdev driver=virtio-blk,node-name=d0,serial=disk0 \
                 --blockdev driver=virtio-blk,node-name=d1,serial=disk1 \
                 --blockdev qcow2,node-name=base,file=d0 \
                 --blockdev qcow2,node-name=top,file=d1,backing=base"
            .into(),
        ..QemuConfig::default()
    };
    (base, top, cfg)
}

fn qcow2_check(path: &Path) -> Value {
    let out = run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path));
    assert!(out.contains("No errors were found on the image."), "{out}");
    let info = run(Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path));
    serde_json::from_str(&info).unwrap()
}

#[test]
fn stream_pulls_the_chain_into_the_top_image() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, top, cfg) = qcow2_chain(dir.path());
    let mut a = Appliance::boot(&cfg);
    a.qmp()
        .cmd("block-stream", json!({"job-id": "s0", "device": "top"}))
        .unwrap();
    let done = a
        .qmp()
        .wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60))
        .unwrap();
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(done["data"]["type"], "stream", "{done}");
    a.quit();
    let info = qcow2_check(&top);
    assert!(
        info.get("backing-filename").is_none(),
        "the stream removed the backing file: {info}"
    );
    // Standalone now: the base's data lives in top.
    let reads = [
        "read -P 0x11 0 1M",
        "read -P 0x22 1M 1M",
        "read -P 0x11 2M 2M",
        "read -P 0 4M 12M",
    ];
    run(Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .args(reads.iter().flat_map(|r| ["-c", r]))
        .arg(&top));
}

#[test]
fn active_commit_folds_the_top_into_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top, cfg) = qcow2_chain(dir.path());
    let mut a = Appliance::boot(&cfg);
    a.qemu_io("top", "write -P 0x33 3M 512k");
    a.qmp()
        .cmd("block-commit", json!({"job-id": "c0", "device": "top"}))
        .unwrap();
    let ready = a
        .qmp()
        .wait_event("BLOCK_JOB_READY", Duration::from_secs(60))
        .unwrap();
    assert_eq!(ready["data"]["type"], "commit", "{ready}");
    a.qmp().cmd("job-complete", json!({"id": "c0"})).unwrap();
    let done = a
        .qmp()
        .wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60))
        .unwrap();
    assert!(done["data"].get("error").is_none(), "{done}");
    a.quit();
    qcow2_check(&base);
    qcow2_check(&top);
    let reads = [
        "read -P 0x11 0 1M",
        "read -P 0x22 1M 1M",
        "read -P 0x11 2M 1M",
        "read -P 0x33 3M 512k",
    ];
    let out = run(Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .args(reads.iter().flat_map(|r| ["-c", r]))
        .arg(&base));
    assert!(!out.contains("failed"), "{out}");
}

fn nbd_io(port: u16, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    run(cmd.arg(format!("nbd://127.0.0.1:{port}/vm")));
}

/// Mirror while an NBD client writes: the export follows the pivot, and at
/// completion the target equals the source.
#[test]
fn mirror_while_an_nbd_client_writes_pivots_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt, mut cfg) = two_disks(dir.path());
    let port = harness::qemu::free_port();
    cfg.nbd_port = Some(port);
    cfg.append = "--blockdev driver=virtio-blk,node-name=src,serial=disk0 \
                  --blockdev driver=virtio-blk,node-name=tgt,serial=disk1 \
                  --nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809 \
                  --export type=nbd,id=e0,node-name=src,name=vm,writable=on"
        .into();
    let mut a = Appliance::boot(&cfg);
    let job = json!({"job-id": "m2", "device": "src", "target": "tgt", "sync": "full", "speed": 64 * MIB});
    a.qmp().cmd("blockdev-mirror", job).unwrap();
    // The client writes while the copy runs (its requests are served by the
    // appliance's main loop while this test waits on the host).
    let writer = std::thread::spawn(move || {
        nbd_io(
            port,
            &["write -P 0xc1 2M 1M", "write -P 0xc2 45M 2M", "flush"],
        );
    });
    writer.join().unwrap();
    a.qmp()
        .wait_event("BLOCK_JOB_READY", Duration::from_secs(60))
        .unwrap();
    nbd_io(port, &["write -P 0xc3 10M 1M"]);
    a.qmp().cmd("job-complete", json!({"id": "m2"})).unwrap();
    let done = a
        .qmp()
        .wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60))
        .unwrap();
    assert!(done["data"].get("error").is_none(), "{done}");
    wait_status(&mut a, "m2", "null");
    // After the pivot the export serves the target.
    nbd_io(port, &["write -P 0xc4 20M 1M", "read -P 0xc1 2M 1M"]);
    a.quit();
    qemu_io(
        &tgt,
        &[
            "read -P 0xc1 2M 1M".into(),
            "read -P 0xc2 45M 2M".into(),
            "read -P 0xc3 10M 1M".into(),
            "read -P 0xc4 20M 1M".into(),
        ],
    );
    qemu_io(
        &src,
        &["read -P 0x11 20M 1M".into(), "read -P 0xc3 10M 1M".into()],
    );
    // Apart from the write after the pivot, target and source are equal.
    qemu_io(&src, &["write -P 0xc4 20M 1M".into()]);
    assert!(compare(&src, &tgt).contains("Images are identical."));
}
