//! Dirty bitmaps in the booted appliance (issue 15): bitmaps made by
//! `qemu-img bitmap` on the host survive a boot, record the writes made
//! through the appliance, and are stored in the image at `quit` (the halt
//! path closes the qcow2 node, which stores its persistent bitmaps before
//! the final flush); a `kill -9` leaves them in use, and the next boot
//! opens them inconsistent; bitmaps made over QMP reach `qemu-img info`
//! and qemu-nbd.

use harness::host::{
    MIB, dirty_extents, image_bitmaps, nbd_map, qcow2_check_clean, qcow2_with_room, run,
};
use harness::{Appliance, QemuConfig};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

const KIB: u64 = 1 << 10;

/// A 64 MiB qcow2 image with bitmap `b0` (64 KiB granularity, enabled)
/// that recorded two writes made by `qemu-io`, and room to grow on a disk.
fn image(dir: &Path) -> PathBuf {
    let img = dir.join("b.qcow2");
    qcow2_with_room(&img, 64 * MIB, 80 * MIB);
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "--enable", "-g", "64k"])
        .arg(&img)
        .arg("b0"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 64k", "-c", "write 1M 4k"])
        .arg(&img));
    img
}

fn boot(img: &Path) -> Appliance {
    let cfg = QemuConfig {
        disks: vec![img.to_path_buf()],
        append: "--blockdev driver=virtio-blk,node-name=file0,serial=disk0 \
                 --blockdev driver=qcow2,node-name=fmt0,file=file0"
            .into(),
        ..QemuConfig::default()
    };
    Appliance::boot(&cfg)
}

#[test]
fn qemu_img_bitmaps_survive_a_boot_and_record_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let mut a = boot(&img);
    // In use while the appliance has the image open read-write.
    assert_eq!(image_bitmaps(&img)[0].1, vec!["in-use", "auto"]);
    a.qemu_io("fmt0", "write -P 0x55 5M 4k");
    a.qemu_io("fmt0", "write -z 9M 128k");
    let console = a.quit();
    assert!(console.contains("closed node 'fmt0'"), "{console}");
    qcow2_check_clean(&img);
    assert_eq!(
        image_bitmaps(&img),
        vec![("b0".to_string(), vec!["auto".to_string()], 64 * KIB)]
    );
    assert_eq!(
        dirty_extents(&img, "b0"),
        vec![
            (0, 64 * KIB),
            (MIB, 64 * KIB),
            (5 * MIB, 64 * KIB),
            (9 * MIB, 128 * KIB)
        ]
    );
}

#[test]
fn kill_9_leaves_bitmaps_in_use_and_the_next_boot_inconsistent() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let a = boot(&img);
    run(Command::new("kill").arg("-9").arg(a.pid().to_string()));
    drop(a);
    assert_eq!(image_bitmaps(&img)[0].1, vec!["in-use", "auto"]);
    qcow2_check_clean(&img);
    let mut a = boot(&img);
    a.qemu_io("fmt0", "write -P 0x55 5M 4k");
    let console = a.quit();
    assert!(
        console.contains("bitmap 'b0' was not stored when the image was last used"),
        "{console}"
    );
    qcow2_check_clean(&img);
    // Still in use: QEMU keeps an inconsistent bitmap until it is removed.
    assert_eq!(image_bitmaps(&img)[0].1, vec!["in-use", "auto"]);
    // Listed inconsistent, refused, removed: gone from the image.
    let mut a = boot(&img);
    let b0 = &bitmaps(&mut a)[0];
    assert_eq!(b0["inconsistent"], true, "{b0}");
    assert_eq!(b0["recording"], false, "{b0}");
    let e = a
        .qmp()
        .cmd(
            "block-dirty-bitmap-enable",
            json!({"node": "fmt0", "name": "b0"}),
        )
        .unwrap_err();
    assert!(
        e.contains("Bitmap 'b0' is inconsistent and cannot be used"),
        "{e}"
    );
    // Refused for an incremental backup too.
    a.qmp()
        .cmd(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "nul", "size": 64 * MIB}),
        )
        .unwrap();
    let e = a
        .qmp()
        .cmd(
            "blockdev-backup",
            json!({"job-id": "inc", "device": "fmt0", "target": "nul",
                   "sync": "incremental", "bitmap": "b0"}),
        )
        .unwrap_err();
    assert!(
        e.contains("Bitmap 'b0' is inconsistent and cannot be used"),
        "{e}"
    );
    a.qmp()
        .cmd(
            "block-dirty-bitmap-remove",
            json!({"node": "fmt0", "name": "b0"}),
        )
        .unwrap();
    a.quit();
    qcow2_check_clean(&img);
    assert!(image_bitmaps(&img).is_empty());
}

fn bitmaps(a: &mut Appliance) -> Vec<Value> {
    let nodes = a
        .qmp()
        .cmd("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let fmt0 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "fmt0")
        .unwrap()
        .clone();
    fmt0["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The reverse direction: a persistent bitmap added over QMP records the
/// writes through the appliance and is stored at `quit`, where
/// `qemu-img info` and qemu-nbd find it; a non-persistent one is not.
#[test]
fn qmp_made_persistent_bitmaps_reach_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.qcow2");
    qcow2_with_room(&img, 64 * MIB, 80 * MIB);
    let mut a = boot(&img);
    a.qmp()
        .cmd(
            "block-dirty-bitmap-add",
            json!({"node": "fmt0", "name": "p", "persistent": true, "granularity": 65536}),
        )
        .unwrap();
    a.qmp()
        .cmd(
            "block-dirty-bitmap-add",
            json!({"node": "fmt0", "name": "t", "granularity": 4096}),
        )
        .unwrap();
    a.qemu_io("fmt0", "write -P 0x66 2M 70k");
    a.qemu_io("fmt0", "write -z 40M 4k");
    let list = bitmaps(&mut a);
    assert_eq!(list[0]["name"], "t");
    assert_eq!(list[0]["count"], 19 * 4096);
    assert_eq!(list[1]["name"], "p");
    assert_eq!(list[1]["count"], 3 * 65536);
    assert_eq!(list[1]["persistent"], true);
    a.quit();
    qcow2_check_clean(&img);
    assert_eq!(
        image_bitmaps(&img),
        vec![("p".to_string(), vec!["auto".to_string()], 64 * KIB)]
    );
    assert_eq!(
        dirty_extents(&img, "p"),
        vec![(2 * MIB, 128 * KIB), (40 * MIB, 64 * KIB)]
    );
}

/// Point 4 of the issue (QEMU's iotest 223): an export made on the command
/// line with `bitmaps` and `allocation-depth` offers
/// `qemu:dirty-bitmap:b0` and `qemu:allocation-depth`; `nbdinfo --map` and
/// qemu-img's `x-dirty-bitmap` read the bitmap, which follows writes made
/// through the export and stays busy until the export goes.
#[test]
fn an_nbd_export_serves_a_bitmap_and_allocation_depth() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let port = harness::qemu::free_port();
    let cfg = QemuConfig {
        disks: vec![img.clone()],
        append: "--blockdev driver=virtio-blk,node-name=file0,serial=disk0 \
                 --blockdev driver=qcow2,node-name=fmt0,file=file0 \
                 --nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809 \
                 --export type=nbd,id=e0,node-name=fmt0,name=disk,writable=on,\
                 bitmaps.0=b0,allocation-depth=on"
            .into(),
        nbd_port: Some(port),
        ..QemuConfig::default()
    };
    let mut a = Appliance::boot(&cfg);
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x77 5M 4k"])
        .arg(&uri));

    let dirty: Vec<(u64, u64)> = nbd_map(&uri, "qemu:dirty-bitmap:b0")
        .into_iter()
        .filter(|e| e.2 == 1)
        .map(|(o, l, _)| (o, l))
        .collect();
    let expect = vec![(0, 64 * KIB), (MIB, 64 * KIB), (5 * MIB, 64 * KIB)];
    assert_eq!(dirty, expect);
    let map = nbd_map(&uri, "qemu:allocation-depth");
    let local: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e.2 == 1)
        .map(|&(o, l, _)| (o, l))
        .collect();
    assert_eq!(local, expect, "{map:?}");
    assert!(map.iter().all(|e| e.2 <= 1), "{map:?}");
    assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), 64 * MIB);

    // qemu-img reads the bitmap as if it were allocation (iotest 223):
    // dirty is `"data": false`.
    let out = run(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "--image-opts",
        &format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},\
             export=disk,x-dirty-bitmap=qemu:dirty-bitmap:b0"
        ),
    ]));
    let v: Value = serde_json::from_str(&out).expect("qemu-img map JSON");
    let mut seen: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if e["data"] == false {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match seen.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += l,
                _ => seen.push((s, l)),
            }
        }
    }
    assert_eq!(seen, expect, "{out}");

    // Busy while exported.
    let e = a
        .qmp()
        .cmd(
            "block-dirty-bitmap-remove",
            json!({"node": "fmt0", "name": "b0"}),
        )
        .unwrap_err();
    assert!(
        e.contains("Bitmap 'b0' is currently in use by another operation and cannot be used"),
        "{e}"
    );
    assert_eq!(bitmaps(&mut a)[0]["busy"], true);
    let e = a
        .qmp()
        .cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e1", "node-name": "fmt0", "bitmaps": ["nope"]}),
        )
        .unwrap_err();
    assert!(e.contains("Bitmap 'nope' is not found"), "{e}");
    a.qmp()
        .cmd("block-export-del", json!({"id": "e0", "mode": "hard"}))
        .unwrap();
    a.qmp()
        .wait_event("BLOCK_EXPORT_DELETED", std::time::Duration::from_secs(60))
        .unwrap();
    assert_eq!(bitmaps(&mut a)[0]["busy"], false);
    a.qmp()
        .cmd(
            "block-dirty-bitmap-clear",
            json!({"node": "fmt0", "name": "b0"}),
        )
        .unwrap();
    a.quit();
    qcow2_check_clean(&img);
}

/// A 64 MiB qcow2 source with data at 0 (8 MiB of 0x21) and 40 MiB
/// (1 MiB of 0x22), and room.
fn source(dir: &Path) -> PathBuf {
    let src = dir.join("src.qcow2");
    qcow2_with_room(&src, 64 * MIB, 80 * MIB);
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x21 0 8M"])
        .args(["-c", "write -P 0x22 40M 1M"])
        .arg(&src));
    src
}

/// A qcow2 image of 64 MiB over `backing` (if any), with room.
fn qcow2_over(path: &Path, backing: Option<&Path>) {
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", "qcow2"]);
    if let Some(b) = backing {
        c.arg("-b").arg(b).args(["-F", "qcow2"]);
    }
    run(c.arg(path).arg((64 * MIB).to_string()));
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(80 * MIB)
        .unwrap();
}

/// Runs backup `args` and waits for its successful end.
fn backup(a: &mut Appliance, args: Value) {
    a.qmp().cmd("blockdev-backup", args.clone()).unwrap();
    let ev = a
        .qmp()
        .wait_event("BLOCK_JOB_COMPLETED", std::time::Duration::from_secs(300))
        .unwrap();
    assert!(ev["data"].get("error").is_none(), "{args}: {ev}");
}

/// Point 5 of the issue: a full backup that starts bitmap `b0`, then two
/// `sync=incremental` backups into qcow2 overlays of the previous one
/// (opened with `backing: null` in the appliance, so each holds only the
/// chunks the bitmap named). On the host, each chain is the source as it
/// was at that backup, byte for byte.
#[test]
fn a_full_and_two_incremental_backups_restore_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let full = dir.path().join("full.qcow2");
    let inc1 = dir.path().join("inc1.qcow2");
    let inc2 = dir.path().join("inc2.qcow2");
    qcow2_over(&full, None);
    qcow2_over(&inc1, Some(&full));
    qcow2_over(&inc2, Some(&inc1));
    let cfg = QemuConfig {
        disks: vec![src.clone(), full.clone(), inc1.clone(), inc2.clone()],
        append: "--blockdev driver=virtio-blk,node-name=file0,serial=disk0 \
                 --blockdev driver=qcow2,node-name=fmt0,file=file0 \
                 --blockdev driver=virtio-blk,node-name=file1,serial=disk1 \
                 --blockdev driver=qcow2,node-name=full,file=file1 \
                 --blockdev driver=virtio-blk,node-name=file2,serial=disk2 \
                 --blockdev driver=qcow2,node-name=inc1,file=file2,backing= \
                 --blockdev driver=virtio-blk,node-name=file3,serial=disk3 \
                 --blockdev driver=qcow2,node-name=inc2,file=file3,backing="
            .into(),
        ..QemuConfig::default()
    };
    let mut a = Appliance::boot(&cfg);
    a.qmp()
        .cmd(
            "block-dirty-bitmap-add",
            json!({"node": "fmt0", "name": "b0", "granularity": 65536}),
        )
        .unwrap();
    backup(
        &mut a,
        json!({"job-id": "full", "device": "fmt0", "target": "full", "sync": "full",
               "bitmap": "b0", "bitmap-mode": "on-success"}),
    );
    assert_eq!(bitmaps(&mut a)[0]["count"], 0);
    // Overwrites, a new extent, zeroes over data.
    a.qemu_io("fmt0", "write -P 0x31 1M 100k");
    a.qemu_io("fmt0", "write -P 0x32 20M 4k");
    a.qemu_io("fmt0", "write -z 40M 64k");
    assert_eq!(bitmaps(&mut a)[0]["count"], (2 + 1 + 1) * 65536);
    backup(
        &mut a,
        json!({"job-id": "inc1", "device": "fmt0", "target": "inc1",
               "sync": "incremental", "bitmap": "b0"}),
    );
    assert_eq!(bitmaps(&mut a)[0]["count"], 0);
    a.qemu_io("fmt0", "write -P 0x41 1M 4k");
    a.qemu_io("fmt0", "write -P 0x42 63M 1M");
    backup(
        &mut a,
        json!({"job-id": "inc2", "device": "fmt0", "target": "inc2",
               "sync": "incremental", "bitmap": "b0"}),
    );
    a.quit();
    for img in [&src, &full, &inc1, &inc2] {
        qcow2_check_clean(img);
    }
    // The last chain is the source.
    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .arg(&inc2)
        .arg(&src));
    // The first incremental holds only its chunks, and its chain is the
    // source as it was then.
    let map = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(&inc1));
    let v: Value = serde_json::from_str(&map).unwrap();
    let own: u64 = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(own, 4 * 65536, "{map}");
    let out = run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "read -P 0x21 0 1M",
            "-c",
            "read -P 0x31 1M 100k",
            "-c",
            "read -P 0x32 20M 4k",
            "-c",
            "read -P 0 40M 64k",
            "-c",
            "read -P 0x22 42008576 960k",
            "-c",
            "read -P 0 63M 1M",
        ])
        .arg(&inc1));
    assert!(!out.to_lowercase().contains("fail"), "{out}");
}

/// Point 2 of the issue: `transaction` in the appliance, as libvirt makes
/// a checkpoint (a new persistent bitmap, the previous one disabled, in
/// one step): all or nothing, and the schema lists it.
#[test]
fn a_transaction_adds_and_disables_bitmaps_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let mut a = boot(&img);
    let checkpoint = |abort: bool| {
        let mut actions = vec![
            json!({"type": "block-dirty-bitmap-add",
                   "data": {"node": "fmt0", "name": "c1", "persistent": true}}),
            json!({"type": "block-dirty-bitmap-disable",
                   "data": {"node": "fmt0", "name": "b0"}}),
        ];
        if abort {
            actions.push(json!({"type": "abort", "data": {}}));
        }
        json!({ "actions": actions })
    };
    let e = a.qmp().cmd("transaction", checkpoint(true)).unwrap_err();
    assert!(e.contains("Transaction aborted using Abort action"), "{e}");
    let list = bitmaps(&mut a);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["recording"], true);
    a.qmp().cmd("transaction", checkpoint(false)).unwrap();
    let list = bitmaps(&mut a);
    assert_eq!(list[0]["name"], "c1");
    assert_eq!(list[1]["recording"], false);
    let schema = a.qmp().cmd("query-qmp-schema", Value::Null).unwrap();
    assert!(
        schema
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "transaction" && e["meta-type"] == "command"),
        "transaction missing from query-qmp-schema"
    );
    a.qemu_io("fmt0", "write -P 0x55 5M 4k");
    a.quit();
    qcow2_check_clean(&img);
    let names: Vec<String> = image_bitmaps(&img).into_iter().map(|b| b.0).collect();
    assert_eq!(names, ["b0", "c1"]);
    assert_eq!(dirty_extents(&img, "c1"), vec![(5 * MIB, 64 * KIB)]);
    assert_eq!(
        dirty_extents(&img, "b0"),
        vec![(0, 64 * KIB), (MIB, 64 * KIB)]
    );
}

/// The pull-mode backup client: copies the extents that
/// `qemu:dirty-bitmap:BITMAP` of the export at URI marks into the raw file
/// OUT (the previous backup), and prints how many bytes it copied.
const PULL_CLIENT: &str = r#"
import sys, nbd
uri, bitmap, out = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = "qemu:dirty-bitmap:" + bitmap
h = nbd.NBD()
h.add_meta_context(ctx)
h.connect_uri(uri)
assert h.can_meta_context(ctx), ctx
size = h.get_size()
dirty = []
pos = 0
while pos < size:
    seen = []
    def cb(meta, offset, entries, err):
        if meta != ctx:
            return 0
        o = offset
        for i in range(0, len(entries), 2):
            seen.append((o, entries[i], entries[i + 1]))
            o += entries[i]
        return 0
    h.block_status(size - pos, pos, cb)
    assert seen, "no extents"
    for (o, l, f) in seen:
        if f & 1:
            dirty.append((o, l))
    pos = seen[-1][0] + seen[-1][1]
copied = 0
with open(out, "r+b") as f:
    for (o, l) in dirty:
        done = 0
        while done < l:
            n = min(l - done, 1 << 20)
            f.seek(o + done)
            f.write(h.pread(n, o + done))
            done += n
        copied += l
h.shutdown()
print(copied)
"#;

/// The guest meanwhile: COUNT 4 KiB writes of 0xee through the export at
/// URI, spread over the disk.
const WRITER: &str = r#"
import sys, nbd
uri, count = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
for i in range(count):
    h.pwrite(b"\xee" * 4096, (i * 7919 * 4096) % size)
h.flush()
h.shutdown()
"#;

fn python(script: &str, args: &[&str]) -> std::process::Child {
    Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3")
}

fn finished(c: std::process::Child) -> String {
    let o = c.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{text}");
    text
}

/// Point 6 of the issue: pull-mode backup as libvirt runs it
/// (`virsh backup-begin` in pull mode, QEMU's image-fleecing test): a
/// fleecing overlay whose backing file is the active node, a `sync=none`
/// backup job (the copy-before-write filter) into it, the bitmap
/// frozen on the overlay and exported with it in one transaction; a host
/// client copies only the extents the bitmap names while another client
/// writes through the active export; then teardown. The copy laid over the
/// previous full backup equals the disk at the transaction.
#[test]
fn pull_mode_backup_through_a_fleecing_export() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let scratch = dir.path().join("scratch.qcow2");
    qcow2_with_room(&scratch, 64 * MIB, 80 * MIB);
    let port = harness::qemu::free_port();
    let cfg = QemuConfig {
        disks: vec![src.clone(), scratch.clone()],
        append: "--blockdev driver=virtio-blk,node-name=file0,serial=disk0 \
                 --blockdev driver=qcow2,node-name=fmt0,file=file0 \
                 --blockdev driver=virtio-blk,node-name=file1,serial=disk1 \
                 --nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809 \
                 --export type=nbd,id=disk,node-name=fmt0,name=disk,writable=on"
            .into(),
        nbd_port: Some(port),
        ..QemuConfig::default()
    };
    let mut a = Appliance::boot(&cfg);
    let disk = format!("nbd://127.0.0.1:{port}/disk");
    // The checkpoint and the full backup it starts from.
    a.qmp()
        .cmd(
            "block-dirty-bitmap-add",
            json!({"node": "fmt0", "name": "c0", "persistent": true}),
        )
        .unwrap();
    let full = dir.path().join("full.raw");
    run(Command::new("nbdcopy").arg(&disk).arg(&full));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x31 1M 100k",
            "-c",
            "write -z 40M 64k",
        ])
        .args(["-c", "write -P 0x32 50M 4k"])
        .arg(&disk));
    // The point in time: nothing writes until the transaction.
    let reference = dir.path().join("ref.raw");
    run(Command::new("nbdcopy").arg(&disk).arg(&reference));

    a.qmp()
        .cmd(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "fleece", "file": "file1",
                   "backing": "fmt0"}),
        )
        .unwrap();
    a.qmp()
        .cmd(
            "transaction",
            json!({"actions": [
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "fleece", "name": "backup", "disabled": true}},
                {"type": "block-dirty-bitmap-merge",
                 "data": {"node": "fleece", "target": "backup",
                          "bitmaps": [{"node": "fmt0", "name": "c0"}]}},
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "fmt0", "name": "c1", "persistent": true}},
                {"type": "block-dirty-bitmap-disable",
                 "data": {"node": "fmt0", "name": "c0"}},
                {"type": "blockdev-backup",
                 "data": {"job-id": "fleecing", "device": "fmt0", "target": "fleece",
                          "sync": "none"}},
            ]}),
        )
        .unwrap();
    a.qmp()
        .cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "pull", "node-name": "fleece", "name": "pull",
                   "bitmaps": ["backup"]}),
        )
        .unwrap();
    let pull = format!("nbd://127.0.0.1:{port}/pull");
    let out = full.to_str().unwrap().to_string();
    let writer = python(WRITER, &[&disk, "400"]);
    let copier = python(PULL_CLIENT, &[&pull, "backup", &out]);
    let copied: u64 = finished(copier).trim().parse().unwrap();
    finished(writer);
    // 1M..1M+100k, 40M and 50M at 64 KiB granularity.
    assert_eq!(copied, (2 + 1 + 1) * 64 * KIB);
    run(Command::new("cmp").arg(&full).arg(&reference));
    // The guest's writes reached the disk, not the backup.
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0xee 0 4k"])
        .arg(&disk));

    // Teardown, in libvirt's order.
    a.qmp()
        .cmd("block-export-del", json!({"id": "pull"}))
        .unwrap();
    a.qmp()
        .wait_event("BLOCK_EXPORT_DELETED", std::time::Duration::from_secs(60))
        .unwrap();
    a.qmp()
        .cmd("job-cancel", json!({"id": "fleecing"}))
        .unwrap();
    a.qmp()
        .wait_event("BLOCK_JOB_CANCELLED", std::time::Duration::from_secs(60))
        .unwrap();
    a.qmp()
        .cmd("blockdev-del", json!({"node-name": "fleece"}))
        .unwrap();
    a.quit();
    qcow2_check_clean(&src);
    let names: Vec<String> = image_bitmaps(&src).into_iter().map(|b| b.0).collect();
    assert_eq!(names, ["c0", "c1"]);
}
