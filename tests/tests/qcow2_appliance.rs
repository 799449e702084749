//! qcow2 in the booted appliance (issue 6): QEMU iotest 117's scenario — a
//! qcow2 node over a disk node, both in use when the appliance halts —
//! and `blockdev-create` formatting a blank disk; after `quit` the host's
//! `qemu-img check` is clean and `qemu-io` reads the data back.

use harness::host::{MIB, create, qcow2_check_clean, run};
use harness::{Appliance, QemuConfig};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn qcow2_io(path: &Path, cmds: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = run(cmd.arg(path));
    assert!(!out.to_lowercase().contains("fail"), "{cmds:?}: {out}");
    out
}

#[test]
fn iotest_117_qcow2_over_a_disk_node_both_in_use_at_halt() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M"));
    qcow2_io(&img, &["write -P 0x11 0 1M"]);
    // A disk has a fixed size (unlike a host file, it cannot grow when qcow2
    // allocates clusters): give the device room, as a preallocated volume.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(80 * MIB)
        .unwrap();

    let cfg = QemuConfig {
        disks: vec![img.clone()],
        append: "--blockdev driver=virtio-blk,node-name=file0,serial=disk0".into(),
        ..QemuConfig::default()
    };
    let mut a = Appliance::boot(&cfg);
    // The file node stays monitor-owned and the qcow2 node holds it too.
    a.qmp()
        .cmd(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "fmt0", "file": "file0"}),
        )
        .unwrap();
    let nodes = a
        .qmp()
        .cmd("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let fmt0 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "fmt0")
        .unwrap();
    assert_eq!(fmt0["drv"], "qcow2", "{fmt0}");
    assert_eq!(fmt0["image"]["virtual-size"], json!(64 * MIB), "{fmt0}");

    a.qemu_io("fmt0", "read -P 0x11 0 1M");
    a.qemu_io("fmt0", "write -P 0x22 1M 2M");
    a.qemu_io("fmt0", "write -P 0x33 3000 5000");
    a.qemu_io("fmt0", "write -z 8M 1M");
    a.qemu_io("fmt0", "write -P 0x44 60M 4M");
    a.qemu_io("fmt0", "read -P 0x22 1M 2M");

    let console = a.quit();
    let fmt_at = console
        .find("closed node 'fmt0'")
        .unwrap_or_else(|| panic!("{console}"));
    let file_at = console
        .find("closed node 'file0'")
        .unwrap_or_else(|| panic!("{console}"));
    assert!(
        fmt_at < file_at,
        "qcow2 closes (and flushes) before its file:\n{console}"
    );
    assert!(console.contains("all 2 nodes closed"), "{console}");

    qcow2_check_clean(&img);
    qcow2_io(
        &img,
        &[
            "read -P 0x11 0 3000",
            "read -P 0x33 3000 5000",
            "read -P 0x11 8000 1040576",
            "read -P 0x22 1M 2M",
            "read -P 0 8M 1M",
            "read -P 0x44 60M 4M",
        ],
    );
}

#[test]
fn blockdev_create_formats_a_blank_disk_as_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("blank.img");
    create(&raw, 64 * MIB);
    let cfg = QemuConfig {
        disks: vec![raw.clone()],
        ..QemuConfig::default()
    };
    let mut a = Appliance::boot(&cfg);
    a.qmp()
        .cmd(
            "blockdev-add",
            json!({"driver": "virtio-blk", "node-name": "file1", "serial": "disk0"}),
        )
        .unwrap();
    a.qmp()
        .cmd(
            "blockdev-create",
            json!({"job-id": "c1", "options": {"driver": "qcow2", "file": "file1", "size": 32 * MIB, "cluster-size": 65536}}),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs = a.qmp().cmd("query-jobs", Value::Null).unwrap();
        let job = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == "c1")
            .cloned();
        match job {
            Some(j) if j["status"] == "concluded" => {
                assert!(j.get("error").is_none(), "blockdev-create failed: {j}");
                break;
            }
            Some(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            other => panic!("job c1 did not conclude: {other:?}"),
        }
    }
    a.qmp().cmd("job-dismiss", json!({"id": "c1"})).unwrap();
    a.qmp()
        .cmd(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "fmt1", "file": "file1"}),
        )
        .unwrap();
    a.qemu_io("fmt1", "write -P 0x5a 0 256k");
    a.quit();

    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&raw));
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], json!(32 * MIB), "{info}");
    assert_eq!(info["cluster-size"], json!(65536), "{info}");
    qcow2_check_clean(&raw);
    qcow2_io(&raw, &["read -P 0x5a 0 256k", "read -P 0 256k 1M"]);
}

#[test]
fn a_qcow2_that_outgrows_its_disk_fails_writes_with_enospc_and_stays_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("small.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M"));
    let cfg = QemuConfig {
        disks: vec![img.clone()],
        append: "--blockdev driver=virtio-blk,node-name=file0,serial=disk0 --blockdev qcow2,node-name=fmt0,file=file0"
            .into(),
        ..QemuConfig::default()
    };
    let mut a = Appliance::boot(&cfg);
    let r = a
        .qmp()
        .execute(
            "human-monitor-command",
            json!({"command-line": "qemu-io fmt0 \"write -P 0x66 0 4M\""}),
        )
        .unwrap();
    let out = r["return"].as_str().unwrap().to_string();
    assert!(out.contains("No space left on device"), "{out}");
    // The appliance keeps serving.
    assert_eq!(
        a.qmp().cmd("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    a.quit();
    // No corruption (clusters allocated for the failed write may leak, as in QEMU).
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&img)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "qemu-img check: {text}"
    );
    assert!(
        !text.contains("ERROR") && !text.contains("corrupt"),
        "qemu-img check: {text}"
    );
}

/// The appliance killed (not halted) in the middle of writes: `qemu-img
/// check` may find leaked clusters but never corruption, and everything
/// written before a completed flush reads back.
#[test]
fn crash_mid_writes_leaves_no_corruption_and_keeps_flushed_data() {
    for (round, kill_after_ms) in [5u64, 40, 150].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("crash.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("64M"));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(160 * MIB)
            .unwrap();
        let cfg = QemuConfig {
            disks: vec![img.clone()],
            append: "--blockdev driver=virtio-blk,node-name=file0,serial=disk0 --blockdev qcow2,node-name=fmt0,file=file0"
                .into(),
            ..QemuConfig::default()
        };
        let mut a = Appliance::boot(&cfg);
        a.qemu_io("fmt0", "write -P 0x11 0 8M");
        a.qemu_io("fmt0", "write -P 0x22 9000 3M");
        a.qemu_io("fmt0", "flush");
        // Unflushed writes, then the kill while a large write is running.
        a.qemu_io("fmt0", "write -P 0x33 20M 4M");
        let line = json!({"execute": "human-monitor-command",
                          "arguments": {"command-line": "qemu-io fmt0 \"write -P 0x44 30M 24M\""}});
        a.qmp().send_raw(format!("{line}\n").as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(kill_after_ms));
        Command::new("kill")
            .args(["-KILL", &a.pid().to_string()])
            .status()
            .unwrap();
        a.wait_exit(Duration::from_secs(10)).expect("QEMU is gone");

        let out = Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&img)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(0) | Some(3)),
            "round {round} (kill after {kill_after_ms} ms): qemu-img check found corruption:\n{text}"
        );
        assert!(!text.contains("ERROR"), "round {round}: {text}");
        qcow2_io(
            &img,
            &[
                "read -P 0x11 0 9000",
                "read -P 0x22 9000 3M",
                "read -P 0x11 3154728 5233880",
            ],
        );
    }
}
