//! Trace events in the booted appliance: `trace-event-set-state` turns the
//! `nbd_*` points on over QMP, a real NBD client (qemu-io) reads, and the
//! points' lines appear on the console (COM1); turned off, the same read
//! prints none. The log level changes at run time over QMP too.

use std::process::Command;
use std::time::Duration;

use harness::host::{MIB, create};
use harness::qemu::free_port;
use harness::{Appliance, QemuConfig};
use serde_json::json;

fn read_over_nbd(port: u16) {
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0 64k 4k"])
        .arg(format!("nbd://127.0.0.1:{port}/disk"))
        .output()
        .expect("qemu-io runs");
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && !text.contains("failed"), "{text}");
}

/// Sets the log level; the appliance logs the change at `warn`, which
/// marks how far the console got.
fn mark(a: &mut Appliance, level: &str, marker: &str) -> usize {
    a.qmp()
        .cmd("x-blockhaus-set-loglevel", json!({"level": level}))
        .unwrap();
    a.wait_console(marker, Duration::from_secs(30)).unwrap();
    a.console().len()
}

#[test]
fn nbd_trace_points_print_on_the_console_only_while_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    create(&disk, 16 * MIB);
    let port = free_port();
    let cfg = QemuConfig {
        append: "loglevel=info --blockdev driver=virtio-blk,node-name=vblk,serial=disk0 \
                 --nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809 \
                 --export type=nbd,id=e0,node-name=vblk,name=disk,writable=on"
            .into(),
        disks: vec![disk],
        nbd_port: Some(port),
        ..QemuConfig::default()
    };
    let mut a = Appliance::boot(&cfg);
    let q = a.qmp();
    let states = q
        .cmd("trace-event-get-state", json!({"name": "nbd_*"}))
        .unwrap();
    let states = states.as_array().unwrap();
    assert!(states.len() >= 3, "{states:?}");
    assert!(
        states
            .iter()
            .all(|e| e["state"] == "disabled" && e["vcpu"] == false),
        "{states:?}"
    );
    assert!(states.iter().any(|e| e["name"] == "nbd_receive_request"));
    let err = q
        .cmd(
            "trace-event-set-state",
            json!({"name": "nbd_recieve", "enable": true}),
        )
        .unwrap_err();
    assert!(err.contains(r#"unknown event \"nbd_recieve\""#), "{err}");
    q.cmd(
        "trace-event-set-state",
        json!({"name": "nbd_*", "enable": true}),
    )
    .unwrap();
    let states = q
        .cmd("trace-event-get-state", json!({"name": "nbd_*"}))
        .unwrap();
    assert!(
        states
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["state"] == "enabled"),
        "{states}"
    );
    let on = a.console().len();

    read_over_nbd(port);
    a.wait_console(
        ":nbd_receive_request Got request: { .flags = 0x",
        Duration::from_secs(30),
    )
    .unwrap();
    let off = mark(&mut a, "warn", "loglevel info -> warn (QMP)");
    let console = a.console();
    let traced = &console[on..off];
    assert!(
        traced.contains(":nbd_negotiate_begin Beginning negotiation"),
        "{traced}"
    );
    assert!(
        traced.contains(":nbd_negotiate_success Negotiation succeeded: export 'disk'"),
        "{traced}"
    );
    assert!(
        traced
            .lines()
            .any(|l| l.contains(":nbd_receive_request Got request:")
                && l.contains("(read), from = 65536, len = 4096")),
        "{traced}"
    );
    // The read's reply: a data chunk with structured replies, else a
    // simple reply.
    assert!(
        traced
            .lines()
            .any(|l| (l.contains(":nbd_co_send_chunk_read ")
                && l.contains("offset = 65536, len = 4096"))
                || (l.contains(":nbd_co_send_simple_reply ")
                    && l.contains("type = read, len = 4096"))),
        "{traced}"
    );
    // Only the points asked for: the disk read under it printed nothing.
    assert!(!traced.contains(":virtio_blk_"), "{traced}");

    a.qmp()
        .cmd(
            "trace-event-set-state",
            json!({"name": "nbd_*", "enable": false}),
        )
        .unwrap();
    assert_eq!(
        a.qmp()
            .cmd("x-blockhaus-query-loglevel", json!({}))
            .unwrap(),
        json!({"level": "warn"})
    );
    read_over_nbd(port);
    let end = mark(&mut a, "info", "loglevel warn -> info (QMP)");
    let console = a.console();
    let after = &console[off..end];
    assert!(!after.contains(":nbd_"), "{after}");

    // The device and node points: a read reaches the virtio-blk queue, a
    // node opens and closes, frames cross virtio-net.
    a.qmp()
        .cmd(
            "trace-event-set-state",
            json!({"name": "virtio_*", "enable": true}),
        )
        .unwrap();
    a.qmp()
        .cmd(
            "trace-event-set-state",
            json!({"name": "bdrv_*", "enable": true}),
        )
        .unwrap();
    let start = a.console().len();
    read_over_nbd(port);
    a.qmp()
        .cmd(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "t0"}),
        )
        .unwrap();
    a.qmp()
        .cmd("blockdev-del", json!({"node-name": "t0"}))
        .unwrap();
    a.qmp()
        .cmd(
            "trace-event-set-state",
            json!({"name": "*", "enable": false}),
        )
        .unwrap();
    let end = mark(&mut a, "debug", "loglevel info -> debug (QMP)");
    let console = a.console();
    let traced = &console[start..end];
    for needle in [
        ":virtio_blk_handle_read ",
        "offset 65536 len 4096",
        ":virtio_blk_req_complete ",
        "status 0",
        ":virtio_net_rx frame len ",
        ":virtio_net_tx frame len ",
        ":bdrv_open_common bs t0 format_name \"null-co\"",
        ":bdrv_close bs t0 format_name \"null-co\"",
    ] {
        assert!(traced.contains(needle), "{needle}: {traced}");
    }
    assert!(!traced.contains(":nbd_"), "{traced}");
    a.quit();
}
