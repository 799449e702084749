//! The appliance's own virtio-blk and virtio-scsi drivers against QEMU's
//! devices and real raw files (issue 4): discovery and `x-query-devices`,
//! patterns written by the host read back in the appliance, patterns
//! written by the appliance (across request-size limits, hundreds of
//! requests in flight) checked byte for byte by `qemu-io` on the host,
//! discard and write-zeroes reaching the file, and clear errors.
//!
//! I/O goes through the debug command `x-blockhaus-disk-io`, beside the
//! block graph: every appliance here boots with
//! `blockhaus.debug-commands=on` ([`boot`]).

use harness::host::{MIB, args, config, create, images, is_zero_hole, map, qemu_io};
use harness::{Appliance, QemuConfig};
use serde_json::{Value, json};
use std::time::Duration;

/// Boots `cfg` with the debug command `x-blockhaus-disk-io`.
fn boot(cfg: QemuConfig) -> Appliance {
    Appliance::boot(&cfg.append("blockhaus.debug-commands=on"))
}

fn disk_io(a: &mut Appliance, arguments: Value) -> Value {
    let r = a
        .qmp()
        .execute("x-blockhaus-disk-io", arguments.clone())
        .expect("QMP reply");
    match r.get("return") {
        Some(v) => v.clone(),
        None => panic!(
            "x-blockhaus-disk-io {arguments} failed: {r}\nconsole:\n{}",
            a.console()
        ),
    }
}

fn disk_io_error(a: &mut Appliance, arguments: Value) -> Value {
    let r = a
        .qmp()
        .execute("x-blockhaus-disk-io", arguments.clone())
        .expect("QMP reply");
    assert!(r.get("error").is_some(), "{arguments} should fail: {r}");
    r["error"].clone()
}

/// Reads `[offset, offset + length)` in the appliance and checks every
/// byte is `pattern`.
fn verify(a: &mut Appliance, serial: &str, offset: u64, length: u64, pattern: u8) {
    let r = disk_io(
        a,
        json!({"serial": serial, "op": "read", "offset": offset, "length": length,
               "pattern": pattern, "chunk": 256 * 1024}),
    );
    assert_eq!(
        r["mismatch"],
        Value::Null,
        "{serial}: byte at {} is not {pattern:#x} in [{offset}, +{length})",
        r["mismatch"]
    );
}

fn quit(mut a: Appliance) -> String {
    let reply = a.qmp().execute("quit", Value::Null).expect("quit reply");
    assert_eq!(reply, json!({"return": {}}));
    let status = a
        .wait_exit(Duration::from_secs(30))
        .expect("QEMU exits after quit");
    let console = a.console();
    assert_eq!(status.code(), Some(0), "console:\n{console}");
    console
}

fn device<'a>(list: &'a Value, serial: &str) -> &'a Value {
    list.as_array()
        .expect("x-query-devices returns a list")
        .iter()
        .find(|d| d["serial"] == serial)
        .unwrap_or_else(|| panic!("no disk {serial} in {list}"))
}

#[test]
fn drivers_find_every_disk_and_move_real_data_both_ways() {
    let imgs = images();
    let mut a = boot(config(&imgs));

    // Discovery.
    let list = a.qmp().cmd("x-query-devices", Value::Null).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 4, "{list}");
    let blk = device(&list, "disk0").clone();
    assert_eq!(blk["transport"], "virtio-blk");
    assert_eq!(blk["size"], 64 * MIB);
    assert_eq!(blk["block-size"], 512);
    assert_eq!(blk["read-only"], false);
    assert_eq!(blk["limits"]["queue-size"], 256, "full queue size: {blk}");
    assert!(blk.get("target").is_none());
    assert_eq!(device(&list, "ro0")["read-only"], true);
    let s0 = device(&list, "scsi0").clone();
    assert_eq!(s0["transport"], "virtio-scsi");
    assert_eq!(
        (s0["target"].clone(), s0["lun"].clone()),
        (json!(0), json!(0))
    );
    assert_eq!(s0["size"], 64 * MIB);
    assert_eq!(s0["model"], "QEMU QEMU HARDDISK");
    assert_eq!(s0["pci-address"], device(&list, "scsi1")["pci-address"]);
    assert_eq!(device(&list, "scsi1")["target"], 1);
    assert_eq!(device(&list, "scsi1")["size"], 32 * MIB);
    assert!(s0["limits"]["max-discard"].as_u64().unwrap() > 0, "{s0}");
    let console = a.console();
    for serial in ["disk0", "ro0", "scsi0", "scsi1"] {
        assert!(
            console.contains(&format!("disk '{serial}'")),
            "{serial} not logged:\n{console}"
        );
    }
    assert!(console.contains("PCI 00:00.0 8086:29c0"), "{console}");
    assert!(
        console.contains("PCI configuration through ECAM at 0xb0000000"),
        "q35's MCFG: {console}"
    );

    // The host's patterns, read through both drivers.
    verify(&mut a, "disk0", 0, 24 * MIB, 0x11);
    verify(&mut a, "scsi0", 0, 24 * MIB, 0x22);
    verify(&mut a, "scsi1", 0, 8 * MIB, 0x33);
    verify(&mut a, "ro0", 0, MIB, 0x44);
    verify(&mut a, "ro0", MIB, MIB, 0);

    // New patterns at offsets that cross the request-size limits: the
    // driver splits each at max-transfer.
    let writes = [
        ("disk0", &blk, 0x55u8, false, None),
        ("disk0", &blk, 0x56, true, Some(64 * 1024)),
        ("scsi0", &s0, 0x66, true, None),
        ("scsi1", device(&list, "scsi1"), 0x77, false, Some(4096)),
    ];
    let mut written = Vec::new();
    for (i, (serial, dev, pattern, fua, chunk)) in writes.into_iter().enumerate() {
        let max = dev["limits"]["max-transfer"].as_u64().unwrap();
        assert!(max >= 4096, "{dev}");
        let offset = (2 + 4 * i as u64) * MIB + max - 1536;
        let length = 3 * max + 1024;
        let mut req = json!({"serial": serial, "op": "write", "offset": offset,
                             "length": length, "pattern": pattern, "fua": fua});
        if let Some(c) = chunk {
            req["chunk"] = json!(c);
        }
        let r = disk_io(&mut a, req);
        if chunk.is_none() {
            assert_eq!(r["requests"], 1);
            assert!(
                r["max-in-flight"].as_u64().unwrap() >= 4,
                "one request split into parts in flight together: {r}"
            );
        }
        verify(&mut a, serial, offset, length, pattern);
        written.push((serial, offset, length, pattern));
    }

    // Hundreds of requests in flight at once, each checked.
    let r = disk_io(
        &mut a,
        json!({"serial": "scsi1", "op": "read", "offset": 0, "length": 2 * MIB,
               "pattern": 0x33, "chunk": 4096}),
    );
    assert_eq!(r["requests"], 512);
    assert!(r["max-in-flight"].as_u64().unwrap() >= 200, "{r}");
    assert_eq!(r["mismatch"], Value::Null, "{r}");
    let r = disk_io(
        &mut a,
        json!({"serial": "disk0", "op": "read", "offset": 0, "length": 2 * MIB,
               "pattern": 0x11, "chunk": 4096}),
    );
    assert!(r["max-in-flight"].as_u64().unwrap() >= 200, "{r}");
    assert_eq!(r["mismatch"], Value::Null, "{r}");

    // Discard and write-zeroes.
    disk_io(
        &mut a,
        json!({"serial": "scsi0", "op": "discard", "offset": 20 * MIB, "length": MIB}),
    );
    disk_io(
        &mut a,
        json!({"serial": "disk0", "op": "discard", "offset": 21 * MIB, "length": MIB}),
    );
    disk_io(
        &mut a,
        json!({"serial": "disk0", "op": "write-zeroes", "offset": 22 * MIB,
               "length": MIB, "may-unmap": true}),
    );
    disk_io(
        &mut a,
        json!({"serial": "scsi0", "op": "write-zeroes", "offset": 22 * MIB,
               "length": MIB, "may-unmap": true}),
    );
    disk_io(
        &mut a,
        json!({"serial": "scsi1", "op": "write-zeroes", "offset": 7 * MIB,
               "length": 512 * 1024, "may-unmap": false}),
    );
    verify(&mut a, "disk0", 22 * MIB, MIB, 0);
    verify(&mut a, "scsi0", 22 * MIB, MIB, 0);
    verify(&mut a, "scsi1", 7 * MIB, 512 * 1024, 0);
    for serial in ["disk0", "scsi0", "scsi1"] {
        disk_io(&mut a, json!({"serial": serial, "op": "flush"}));
    }
    // The halt path's flush: every writable disk with a cache, once.
    let r = disk_io(&mut a, json!({"op": "flush-all"}));
    assert_eq!(
        r,
        json!({"flushed": [{"serial": "disk0"}, {"serial": "scsi0"}, {"serial": "scsi1"}]}),
        "the read-only ro0 is not flushed"
    );
    quit(a);

    // Every byte, checked on the host.
    for (serial, offset, length, pattern) in &written {
        let file = match *serial {
            "disk0" => &imgs.blk,
            "scsi0" => &imgs.scsi_direct,
            _ => &imgs.scsi_writeback,
        };
        qemu_io(file, &[format!("read -P {pattern:#x} {offset} {length}")]);
    }
    qemu_io(
        &imgs.blk,
        &[
            "read -P 0x11 0 2M".into(),
            format!("read -P 0 {} {}", 22 * MIB, MIB),
            format!("read -P 0x11 {} {}", 23 * MIB, MIB),
        ],
    );
    qemu_io(
        &imgs.scsi_direct,
        &[
            "read -P 0x22 0 2M".into(),
            format!("read -P 0 {} {}", 20 * MIB, MIB),
            format!("read -P 0 {} {}", 22 * MIB, MIB),
            format!("read -P 0x22 {} {}", 23 * MIB, MIB),
        ],
    );
    qemu_io(
        &imgs.scsi_writeback,
        &[
            "read -P 0x33 0 2M".into(),
            format!("read -P 0 {} {}", 7 * MIB, 512 * 1024),
            format!("read -P 0x33 {} {}", 7 * MIB + 512 * 1024, 512 * 1024),
        ],
    );
    assert!(
        is_zero_hole(&imgs.scsi_direct, 20 * MIB, MIB),
        "UNMAP did not punch a hole: {:?}",
        map(&imgs.scsi_direct)
    );
    assert!(
        is_zero_hole(&imgs.blk, 21 * MIB, MIB),
        "virtio-blk DISCARD did not punch a hole: {:?}",
        map(&imgs.blk)
    );
    assert!(
        is_zero_hole(&imgs.blk, 22 * MIB, MIB),
        "WRITE_ZEROES with unmap did not leave a hole: {:?}",
        map(&imgs.blk)
    );
    assert!(
        is_zero_hole(&imgs.scsi_direct, 22 * MIB, MIB),
        "WRITE SAME with unmap did not leave a hole: {:?}",
        map(&imgs.scsi_direct)
    );
    // The read-only disk is as the host left it.
    qemu_io(
        &imgs.ro,
        &["read -P 0x44 0 1M".into(), "read -P 0 1M 15M".into()],
    );
}

#[test]
fn errors_are_clear_and_change_nothing() {
    let imgs = images();
    let mut cfg = config(&imgs);
    // A read-only scsi-hd as well: the driver learns it from MODE SENSE.
    let ro_scsi = imgs.ro.with_file_name("ro-scsi.img");
    create(&ro_scsi, 8 * MIB);
    qemu_io(&ro_scsi, &["write -P 0x99 0 8M".into()]);
    let high_lun = imgs.ro.with_file_name("lun300.img");
    create(&high_lun, 4 * MIB);
    qemu_io(&high_lun, &["write -P 0x3c 0 1M".into()]);
    cfg.extra.extend(args(&[
        "-drive",
        &format!(
            "file={},if=none,format=raw,id=s2,readonly=on",
            ro_scsi.display()
        ),
        "-device",
        "scsi-hd,bus=scsi0.0,drive=s2,scsi-id=2,lun=3,serial=scsi-ro",
        // A LUN above 255: flat-space addressing.
        "-drive",
        &format!("file={},if=none,format=raw,id=s3", high_lun.display()),
        "-device",
        "scsi-hd,bus=scsi0.0,drive=s3,scsi-id=2,lun=300,serial=lun300",
    ]));
    let mut a = boot(cfg);
    let list = a.qmp().cmd("x-query-devices", Value::Null).unwrap();
    let ro_lun = device(&list, "scsi-ro");
    assert_eq!(ro_lun["read-only"], true, "{ro_lun}");
    assert_eq!(
        (ro_lun["target"].clone(), ro_lun["lun"].clone()),
        (json!(2), json!(3))
    );
    verify(&mut a, "scsi-ro", 0, 8 * MIB, 0x99);
    let high = device(&list, "lun300");
    assert_eq!(
        (high["target"].clone(), high["lun"].clone()),
        (json!(2), json!(300))
    );
    verify(&mut a, "lun300", 0, MIB, 0x3c);

    for serial in ["ro0", "scsi-ro"] {
        for op in [
            json!({"op": "write", "pattern": 1}),
            json!({"op": "discard"}),
            json!({"op": "write-zeroes"}),
        ] {
            let mut req = op.clone();
            req["serial"] = json!(serial);
            req["offset"] = json!(0);
            req["length"] = json!(MIB);
            let e = disk_io_error(&mut a, req);
            assert_eq!(e["class"], "GenericError", "{e}");
            assert!(
                e["desc"]
                    .as_str()
                    .unwrap()
                    .ends_with("failed: device is read-only"),
                "{e}"
            );
        }
    }
    let e = disk_io_error(
        &mut a,
        json!({"serial": "nosuch", "op": "read", "offset": 0, "length": 512}),
    );
    assert_eq!(
        e,
        json!({"class": "DeviceNotFound", "desc": "No disk with serial 'nosuch'"})
    );
    let e = disk_io_error(
        &mut a,
        json!({"serial": "scsi0", "op": "read", "offset": 100, "length": 512}),
    );
    assert_eq!(
        e["desc"],
        "read failed: offset and length must be multiples of the block size (512)"
    );
    let e = disk_io_error(
        &mut a,
        json!({"serial": "disk0", "op": "read", "offset": 64 * MIB - 512, "length": 1024}),
    );
    assert_eq!(
        e["desc"],
        format!(
            "read failed: request ends at byte {}, beyond the device's {} bytes",
            64 * MIB + 512,
            64 * MIB
        )
    );

    // A LUN that vanished (hot-unplugged on the host): a clear error.
    let mut qemu = a.qemu_monitor().expect("QEMU's monitor");
    qemu.cmd("device_del", json!({"id": "sd1"})).unwrap();
    qemu.wait_event("DEVICE_DELETED", Duration::from_secs(10))
        .expect("scsi-hd unplugged");
    let e = disk_io_error(
        &mut a,
        json!({"serial": "scsi1", "op": "read", "offset": 0, "length": 4096}),
    );
    assert_eq!(
        e["desc"],
        "read failed: the LUN was removed (hot-unplugged)"
    );
    let list = a.qmp().cmd("x-query-devices", Value::Null).unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|d| d["serial"] != "scsi1"),
        "an unplugged LUN is not listed: {list}"
    );
    assert!(a.console().contains("disk 'scsi1': "), "{}", a.console());
    assert!(a.console().contains("was unplugged"), "{}", a.console());

    // A LUN plugged in while running is scanned and usable.
    let hot = imgs.ro.with_file_name("hot.img");
    create(&hot, 4 * MIB);
    qemu_io(&hot, &["write -P 0x4d 0 1M".into()]);
    qemu.cmd(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "hot0",
               "file": {"driver": "file", "filename": hot.display().to_string()}}),
    )
    .unwrap();
    qemu.cmd(
        "device_add",
        json!({"driver": "scsi-hd", "id": "hotsd", "bus": "scsi0.0", "scsi-id": 6,
               "lun": 0, "drive": "hot0", "serial": "hot"}),
    )
    .unwrap();
    let mut found = false;
    for _ in 0..100 {
        let list = a.qmp().cmd("x-query-devices", Value::Null).unwrap();
        if list
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["serial"] == "hot")
        {
            found = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(found, "hot-plugged LUN never listed:\n{}", a.console());
    verify(&mut a, "hot", 0, MIB, 0x4d);

    // Disks addressed by where they are rather than by serial.
    let blk_pci = device(&list, "disk0")["pci-address"].clone();
    let scsi_pci = device(&list, "scsi0")["pci-address"].clone();
    let r = disk_io(
        &mut a,
        json!({"pci-addr": blk_pci, "op": "read", "offset": 0, "length": 4096, "pattern": 0x11}),
    );
    assert_eq!(r["mismatch"], Value::Null, "{r}");
    let r = disk_io(
        &mut a,
        json!({"pci-addr": scsi_pci, "target": 0, "lun": 0, "op": "read",
               "offset": 0, "length": 4096, "pattern": 0x22}),
    );
    assert_eq!(r["mismatch"], Value::Null, "{r}");
    let e = disk_io_error(
        &mut a,
        json!({"pci-addr": scsi_pci, "target": 9, "lun": 0, "op": "read",
               "offset": 0, "length": 4096}),
    );
    assert_eq!(e["class"], "DeviceNotFound");
    assert_eq!(
        e["desc"],
        format!(
            "No SCSI disk at {} target 9 lun 0",
            scsi_pci.as_str().unwrap()
        )
    );

    // Still serving.
    verify(&mut a, "disk0", 0, MIB, 0x11);
    verify(&mut a, "scsi0", 0, MIB, 0x22);
    quit(a);
    qemu_io(&imgs.ro, &["read -P 0x44 0 1M".into()]);
    qemu_io(&ro_scsi, &["read -P 0x99 0 8M".into()]);
}

#[test]
fn disks_behind_pci_bridges_are_found() {
    // q35: a PCIe root port with a modern-only virtio-scsi (device 1048)
    // on its bus, and a PCIe-to-PCI bridge behind a second root port with
    // a transitional virtio-blk: buses 1, 2 and 3.
    let dir = tempfile::tempdir().unwrap();
    let (b, s) = (dir.path().join("b.img"), dir.path().join("s.img"));
    create(&b, 8 * MIB);
    create(&s, 8 * MIB);
    qemu_io(&b, &["write -P 0x5a 0 1M".into()]);
    qemu_io(&s, &["write -P 0xa5 0 1M".into()]);
    let cfg = QemuConfig {
        extra: args(&[
            "-device",
            "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
            "-device",
            "pcie-root-port,id=rp2,bus=pcie.0,chassis=2",
            "-device",
            "pcie-pci-bridge,id=br1,bus=rp2",
            "-drive",
            &format!("file={},if=none,id=b,format=raw", b.display()),
            "-device",
            "virtio-blk-pci,drive=b,serial=bridged-blk,bus=br1,addr=3",
            "-device",
            "virtio-scsi-pci,id=scsi9,bus=rp1",
            "-drive",
            &format!("file={},if=none,id=s,format=raw", s.display()),
            "-device",
            "scsi-hd,bus=scsi9.0,drive=s,scsi-id=5,lun=0,serial=bridged-scsi",
        ]),
        ..QemuConfig::default()
    };
    let mut a = boot(cfg);
    let list = a.qmp().cmd("x-query-devices", Value::Null).unwrap();
    let blk = device(&list, "bridged-blk");
    let scsi = device(&list, "bridged-scsi");
    assert_ne!(blk["pci-address"].as_str().unwrap()[..2], *"00", "{blk}");
    assert_ne!(scsi["pci-address"].as_str().unwrap()[..2], *"00", "{scsi}");
    assert_eq!(scsi["target"], 5);
    let console = a.console();
    assert!(
        console.contains(" bridge "),
        "bridges are logged:\n{console}"
    );
    verify(&mut a, "bridged-blk", 0, MIB, 0x5a);
    verify(&mut a, "bridged-scsi", 0, MIB, 0xa5);
    quit(a);
}

#[test]
fn pc_machine_reaches_configuration_space_through_port_io() {
    // i440FX has no MCFG: the legacy 0xCF8/0xCFC mechanism.
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("b.img");
    create(&b, 8 * MIB);
    qemu_io(&b, &["write -P 0x3c 0 1M".into()]);
    let cfg = QemuConfig {
        disks: vec![b.clone()],
        ..QemuConfig::default().machine(harness::Machine::Pc)
    };
    let mut a = boot(cfg);
    assert!(
        a.console()
            .contains("PCI configuration through port I/O 0xcf8"),
        "{}",
        a.console()
    );
    verify(&mut a, "disk0", 0, MIB, 0x3c);
    disk_io(
        &mut a,
        json!({"serial": "disk0", "op": "write", "offset": MIB, "length": MIB, "pattern": 0xc3, "chunk": 4096}),
    );
    quit(a);
    qemu_io(
        &b,
        &["read -P 0x3c 0 1M".into(), "read -P 0xc3 1M 1M".into()],
    );
}

#[test]
fn microvm_disks_get_their_bars_from_the_dsdt() {
    // QEMU's microvm has no MCFG and its firmware assigns no BARs: the
    // appliance finds ECAM (`_CBA`) and the host bridge's window (`_CRS`)
    // in the DSDT and places the BARs itself.
    let dir = tempfile::tempdir().unwrap();
    let (b, s) = (dir.path().join("b.img"), dir.path().join("s.img"));
    create(&b, 8 * MIB);
    create(&s, 8 * MIB);
    qemu_io(&b, &["write -P 0x6b 0 1M".into()]);
    qemu_io(&s, &["write -P 0xb6 0 1M".into()]);
    let cfg = QemuConfig {
        disks: vec![b.clone()],
        extra: args(&[
            "-device",
            "virtio-scsi-pci,id=scsi0",
            "-drive",
            &format!("file={},if=none,id=s,format=raw", s.display()),
            "-device",
            "scsi-hd,bus=scsi0.0,drive=s,scsi-id=0,lun=0,serial=mv-scsi",
        ]),
        ..QemuConfig::default().machine(harness::Machine::Microvm)
    };
    let mut a = boot(cfg);
    let console = a.console();
    assert!(
        console.contains("PCI configuration through ECAM"),
        "{console}"
    );
    assert!(console.contains("placing unassigned BARs"), "{console}");
    verify(&mut a, "disk0", 0, MIB, 0x6b);
    verify(&mut a, "mv-scsi", 0, MIB, 0xb6);
    disk_io(
        &mut a,
        json!({"serial": "mv-scsi", "op": "write", "offset": MIB, "length": MIB,
               "pattern": 0x7e, "chunk": 65536}),
    );
    quit(a);
    qemu_io(
        &s,
        &["read -P 0xb6 0 1M".into(), "read -P 0x7e 1M 1M".into()],
    );
}
