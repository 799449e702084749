//! Disks as graph nodes (issue 4 §5-6): `driver=virtio-blk` and
//! `driver=virtio-scsi` protocol nodes opened by serial or address, data
//! written through the graph with qemu-io (across request-size limits and
//! unaligned), checked byte for byte by the host after `quit`; discard and
//! write-zeroes reaching the file; read-only devices; claims; the halt
//! path flushing the devices.

use harness::Appliance;
use harness::host::{MIB, config, images, is_zero_hole, qemu_io};
use serde_json::{Value, json};
use std::time::Duration;

fn add(a: &mut Appliance, args: Value) -> Result<Value, String> {
    a.qmp().cmd("blockdev-add", args)
}

#[test]
fn disk_nodes_carry_data_through_the_graph_and_halt_flushes_them() {
    let imgs = images();
    let mut cfg = config(&imgs);
    // One node from the kernel command line, the rest over QMP.
    cfg.append = "--blockdev driver=virtio-blk,node-name=vblk,serial=disk0".into();
    let mut a = Appliance::boot(&cfg);

    add(
        &mut a,
        json!({"driver": "virtio-scsi", "node-name": "sd0", "serial": "scsi0"}),
    )
    .unwrap();
    // By SCSI address instead of serial.
    add(
        &mut a,
        json!({"driver": "virtio-scsi", "node-name": "sd1", "target": 1, "lun": 0}),
    )
    .unwrap();
    // A format node on top, exposed to a second user: raw over sd1.
    add(
        &mut a,
        json!({"driver": "raw", "node-name": "fmt1", "file": "sd1"}),
    )
    .unwrap();
    add(
        &mut a,
        json!({"driver": "virtio-blk", "node-name": "ro", "serial": "ro0", "read-only": true}),
    )
    .unwrap();

    let nodes = a
        .qmp()
        .cmd("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let vblk = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "vblk")
        .unwrap();
    assert_eq!(vblk["drv"], "virtio-blk", "{vblk}");
    assert_eq!(vblk["image"]["virtual-size"], json!(64 * MIB), "{vblk}");
    let ro = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "ro")
        .unwrap();
    assert_eq!(ro["ro"], true, "{ro}");

    // The host's patterns read back through the graph.
    a.qemu_io("vblk", "read -P 0x11 0 24M");
    a.qemu_io("sd0", "read -P 0x22 0 24M");
    a.qemu_io("fmt1", "read -P 0x33 0 8M");
    a.qemu_io("ro", "read -P 0x44 0 1M");

    // New patterns: large (split at the device's limits), FUA, and
    // unaligned (read-modify-write of the covering sectors).
    a.qemu_io("vblk", "write -P 0xa1 1048064 5M");
    a.qemu_io("sd0", "write -P 0xa2 -f 3M 9M");
    a.qemu_io("fmt1", "write -P 0xa3 1000 3000");
    a.qemu_io("vblk", "read -P 0xa1 1048064 5M");
    a.qemu_io("fmt1", "read -P 0x33 0 1000");
    a.qemu_io("fmt1", "read -P 0xa3 1000 3000");
    a.qemu_io("fmt1", "read -P 0x33 4000 4192");

    // Discard and write-zeroes reach the files.
    a.qemu_io("vblk", "discard 32M 4M");
    a.qemu_io("sd0", "write -z -u 40M 4M");
    a.qemu_io("vblk", "write -z 48M 1M");
    a.qemu_io("vblk", "read -P 0 48M 1M");

    // Writing the read-only device fails and changes nothing.
    let out = a.qemu_io_output("ro", "write -P 0x55 0 4k");
    assert!(
        out.to_lowercase().contains("error")
            || out.contains("Permission denied")
            || out.contains("read-only"),
        "{out}"
    );

    let r = a.qmp().execute("quit", Value::Null).unwrap();
    assert_eq!(r, json!({"return": {}}));
    let status = a.wait_exit(Duration::from_secs(60)).expect("QEMU exits");
    let console = a.console();
    assert_eq!(status.code(), Some(0), "{console}");
    for node in ["vblk", "sd0", "sd1", "fmt1", "ro"] {
        assert!(
            console.contains(&format!("closed node '{node}'")),
            "{node} not closed:\n{console}"
        );
    }
    assert!(console.contains("all 5 nodes closed"), "{console}");
    assert!(console.contains("device 'disk0': flushed"), "{console}");
    assert!(console.contains("device 'scsi1': flushed"), "{console}");
    let fmt_at = console.find("closed node 'fmt1'").unwrap();
    let sd1_at = console.find("closed node 'sd1'").unwrap();
    assert!(
        fmt_at < sd1_at,
        "format node closes before its disk:\n{console}"
    );

    // The host sees every acknowledged byte.
    qemu_io(
        &imgs.blk,
        &[
            "read -P 0x11 0 1048064".into(),
            "read -P 0xa1 1048064 5M".into(),
        ],
    );
    qemu_io(&imgs.blk, &["read -P 0x11 6290944 18874368".into()]);
    qemu_io(
        &imgs.scsi_direct,
        &[
            "read -P 0x22 0 3M".into(),
            "read -P 0xa2 3M 9M".into(),
            "read -P 0x22 12M 12M".into(),
        ],
    );
    qemu_io(
        &imgs.scsi_writeback,
        &[
            "read -P 0x33 0 1000".into(),
            "read -P 0xa3 1000 3000".into(),
            "read -P 0x33 4000 4192".into(),
        ],
    );
    qemu_io(&imgs.ro, &["read -P 0x44 0 1M".into()]);
    assert!(
        is_zero_hole(&imgs.blk, 32 * MIB, 4 * MIB),
        "discard reached the file"
    );
    assert!(
        is_zero_hole(&imgs.scsi_direct, 40 * MIB, 4 * MIB),
        "write-zeroes with unmap reached the file"
    );
    qemu_io(&imgs.blk, &["read -P 0 48M 1M".into()]);
}

#[test]
fn disk_node_errors_are_clear_and_leave_the_appliance_running() {
    let imgs = images();
    let mut a = Appliance::boot(&config(&imgs));
    // The driver-level debug command exists only with
    // `blockhaus.debug-commands=on`.
    let r = a
        .qmp()
        .execute("x-blockhaus-disk-io", json!({"op": "flush-all"}))
        .unwrap();
    assert_eq!(r["error"]["class"], "CommandNotFound", "{r}");
    add(
        &mut a,
        json!({"driver": "virtio-blk", "node-name": "a", "serial": "disk0"}),
    )
    .unwrap();

    let e = add(
        &mut a,
        json!({"driver": "virtio-blk", "node-name": "b", "serial": "disk0"}),
    )
    .unwrap_err();
    assert!(
        e.contains("Disk 'disk0' is already in use by node 'a'"),
        "{e}"
    );
    let e = add(
        &mut a,
        json!({"driver": "virtio-blk", "node-name": "c", "serial": "nosuch"}),
    )
    .unwrap_err();
    assert!(e.contains("No virtio-blk disk with serial 'nosuch'"), "{e}");
    let e = add(
        &mut a,
        json!({"driver": "virtio-scsi", "node-name": "d", "serial": "disk0"}),
    )
    .unwrap_err();
    assert!(e.contains("is a virtio-blk disk, not virtio-scsi"), "{e}");
    let e = add(
        &mut a,
        json!({"driver": "virtio-blk", "node-name": "e", "serial": "ro0"}),
    )
    .unwrap_err();
    assert!(e.contains("Disk 'ro0' is read-only"), "{e}");
    let e = add(&mut a, json!({"driver": "virtio-blk", "node-name": "f"})).unwrap_err();
    assert!(e.contains("virtio-blk needs 'serial' or 'pci-addr'"), "{e}");
    let e = add(
        &mut a,
        json!({"driver": "virtio-blk", "node-name": "g", "serial": 5}),
    )
    .unwrap_err();
    assert!(
        e.contains("Invalid parameter type for 'serial', expected: string"),
        "{e}"
    );

    // Deleting the node releases the disk: it can be claimed again.
    a.qmp()
        .cmd("blockdev-del", json!({"node-name": "a"}))
        .unwrap();
    add(
        &mut a,
        json!({"driver": "virtio-blk", "node-name": "b", "serial": "disk0"}),
    )
    .unwrap();
    let devices = a.qmp().cmd("x-query-devices", Value::Null).unwrap();
    let d0 = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["serial"] == "disk0")
        .unwrap();
    assert_eq!(d0["claimed-by"], "b", "{d0}");

    // A hot-unplugged LUN: I/O through its node fails clearly; others work.
    add(
        &mut a,
        json!({"driver": "virtio-scsi", "node-name": "gone", "serial": "scsi1"}),
    )
    .unwrap();
    let mut qemu = a.qemu_monitor().unwrap();
    qemu.cmd("device_del", json!({"id": "sd1"})).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = a.qemu_io_output("gone", "read 0 4k");
    assert!(
        out.to_lowercase().contains("error") || out.contains("No such device"),
        "{out}"
    );
    a.qemu_io("b", "read -P 0x11 0 64k");

    let r = a.qmp().execute("quit", Value::Null).unwrap();
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(
        a.wait_exit(Duration::from_secs(60)).and_then(|s| s.code()),
        Some(0),
        "{}",
        a.console()
    );
}
