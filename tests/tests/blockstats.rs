//! `query-blockstats` of the booted appliance against what a real NBD
//! client did: qemu-io runs a known set of reads, writes, write-zeroes,
//! discards and flushes over NBD on an export, and the export's backend
//! counts exactly those bytes and operations. The operation counts are
//! taken from the same qemu-io run against the host NBD server of the
//! harness (which counts the requests it receives), since qemu-io adds
//! flushes of its own when it closes the image.

use std::process::Command;
use std::time::Duration;

use harness::host::{MIB, create};
use harness::nbd_server::NbdServer;
use harness::qemu::free_port;
use harness::{Appliance, QemuConfig};
use serde_json::{Value, json};

const KIB: u64 = 1024;

/// What qemu-io does, and the bytes each kind moves.
const CMDS: &[&str] = &[
    "write -P 0xab 0 64k",
    "write -P 0xcd 1M 128k",
    "read -P 0xab 0 64k",
    "read -P 0xcd 1M 4k",
    "flush",
    "discard 2M 64k",
    "write -z 3M 32k",
];
const RD_BYTES: u64 = 64 * KIB + 4 * KIB;
const WR_BYTES: u64 = 64 * KIB + 128 * KIB + 32 * KIB;
const UNMAP_BYTES: u64 = 64 * KIB;
const WR_HIGHEST: u64 = 3 * MIB + 32 * KIB;

fn qemu_io(uri: &str) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in CMDS {
        cmd.arg("-c").arg(c);
    }
    let o = cmd.arg(uri).output().expect("qemu-io runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success() && !text.contains("failed"), "{text}");
    text
}

#[test]
fn query_blockstats_counts_what_an_nbd_client_did_byte_for_byte_and_op_for_op() {
    // What qemu-io sends, counted by a server on the host.
    let reference = NbdServer::start(vec![NbdServer::memory_export("disk", 16 * MIB)])
        .expect("host NBD server");
    qemu_io(&reference.uri("disk"));
    let sent = reference.wait_closes(1);
    assert_eq!(sent.op("read"), 2, "{sent:?}");
    assert_eq!(sent.op("trim"), 1, "{sent:?}");
    let writes = sent.op("write") + sent.op("write+fua") + sent.op("write-zeroes");
    assert_eq!(writes, 3, "{sent:?}");
    assert!(sent.op("flush") >= 1, "{sent:?}");

    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    create(&disk, 16 * MIB);
    let port = free_port();
    let cfg = QemuConfig {
        append: "--blockdev driver=virtio-blk,node-name=vblk,serial=disk0 \
                 --nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809 \
                 --export type=nbd,id=e0,node-name=vblk,name=disk,writable=on,\
                 x-stats-intervals.0=3600"
            .into(),
        disks: vec![disk],
        nbd_port: Some(port),
        ..QemuConfig::default()
    };
    let mut a = Appliance::boot(&cfg);
    let before = a.qmp().cmd("query-blockstats", json!({})).unwrap();
    assert_eq!(before[0]["qdev"], "e0", "{before}");
    assert!(
        before[0]["stats"].get("idle_time_ns").is_none(),
        "no I/O yet: {before}"
    );
    a.qmp()
        .cmd(
            "block-latency-histogram-set",
            json!({"id": "e0", "boundaries": [1000, 1000000000]}),
        )
        .unwrap();

    qemu_io(&format!("nbd://127.0.0.1:{port}/disk"));
    // The client has gone; its last requests were answered before it
    // closed, so they are all counted by now.
    let stats = a.qmp().cmd("query-blockstats", json!({})).unwrap();
    let list = stats.as_array().unwrap();
    assert_eq!(list.len(), 1, "{stats}");
    let e = &list[0];
    assert_eq!(e["device"], "");
    assert_eq!(e["qdev"], "e0");
    assert_eq!(e["node-name"], "vblk");
    let s = &e["stats"];
    let expect = [
        ("rd_bytes", RD_BYTES),
        ("wr_bytes", WR_BYTES),
        ("unmap_bytes", UNMAP_BYTES),
        ("rd_operations", sent.op("read") as u64),
        ("wr_operations", writes as u64),
        ("flush_operations", sent.op("flush") as u64),
        ("unmap_operations", sent.op("trim") as u64),
        ("wr_highest_offset", WR_HIGHEST),
        ("failed_rd_operations", 0),
        ("failed_wr_operations", 0),
        ("failed_flush_operations", 0),
        ("failed_unmap_operations", 0),
        ("invalid_rd_operations", 0),
        ("invalid_wr_operations", 0),
        ("invalid_flush_operations", 0),
        ("invalid_unmap_operations", 0),
        ("rd_merged", 0),
        ("wr_merged", 0),
        ("unmap_merged", 0),
    ];
    for (k, v) in expect {
        assert_eq!(s[k], json!(v), "{k}: {e}");
    }
    assert!(s["idle_time_ns"].is_u64(), "{e}");
    assert_eq!(s["account_invalid"], true);
    assert_eq!(s["account_failed"], true);
    // The hour-long interval's older window began half an hour before
    // boot: it holds every request, so its means are the totals' means.
    let timed = s["timed_stats"].as_array().unwrap();
    assert_eq!(timed.len(), 1, "{e}");
    let t = &timed[0];
    assert_eq!(t["interval_length"], 3600, "{e}");
    for (kind, total, ops) in [
        ("rd", "rd_total_time_ns", "rd_operations"),
        ("wr", "wr_total_time_ns", "wr_operations"),
        ("flush", "flush_total_time_ns", "flush_operations"),
    ] {
        let n = |v: &serde_json::Value| v.as_u64().unwrap();
        let (min, avg, max) = (
            n(&t[format!("min_{kind}_latency_ns")]),
            n(&t[format!("avg_{kind}_latency_ns")]),
            n(&t[format!("max_{kind}_latency_ns")]),
        );
        assert_eq!(avg, n(&s[total]) / n(&s[ops]), "{kind}: {e}");
        assert!(min <= avg && avg <= max && max > 0, "{kind}: {e}");
    }
    assert!(t["avg_rd_queue_depth"].as_f64().unwrap() > 0.0, "{e}");
    // Every read landed in some bin of the histogram.
    let bins: u64 = s["rd_latency_histogram"]["bins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .sum();
    assert_eq!(bins, sent.op("read") as u64, "{e}");

    // Per node: the disk node keeps the highest write offset.
    let nodes = a
        .qmp()
        .cmd("query-blockstats", json!({"query-nodes": true}))
        .unwrap();
    let vblk = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "vblk")
        .unwrap_or_else(|| panic!("{nodes}"));
    assert_eq!(vblk["stats"]["wr_highest_offset"], json!(WR_HIGHEST));
    assert_eq!(vblk["stats"]["wr_bytes"], json!(0));
    a.quit();
}

#[test]
fn a_failed_request_over_nbd_raises_block_io_error() {
    let port = free_port();
    let cfg = QemuConfig {
        append: "--nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809".into(),
        nbd_port: Some(port),
        ..QemuConfig::default()
    };
    let mut a = Appliance::boot(&cfg);
    a.qmp()
        .cmd(
            "blockdev-add",
            json!({"driver": "blkdebug", "node-name": "dbg",
                   "image": {"driver": "null-co", "node-name": "null", "size": 1048576},
                   "inject-error": [{"iotype": ["write"], "errno": 28}]}),
        )
        .unwrap();
    a.qmp()
        .cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e1", "node-name": "dbg", "writable": true}),
        )
        .unwrap();
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(format!("nbd://127.0.0.1:{port}/dbg"))
        .output()
        .expect("qemu-io runs");
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(text.contains("No space left on device"), "{text}");
    let ev = a
        .qmp()
        .wait_event("BLOCK_IO_ERROR", Duration::from_secs(10))
        .expect("BLOCK_IO_ERROR");
    assert_eq!(
        ev["data"],
        json!({"device": "", "node-name": "dbg", "operation": "write", "action": "report",
               "nospace": true, "reason": "No space left on device"}),
        "{ev}"
    );
    let stats: Value = a.qmp().cmd("query-blockstats", json!({})).unwrap();
    assert_eq!(stats[0]["qdev"], "e1");
    assert_eq!(stats[0]["stats"]["failed_wr_operations"], 1, "{stats}");
    assert_eq!(stats[0]["stats"]["wr_bytes"], 0);
    a.quit();
}
