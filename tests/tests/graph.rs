//! The block graph in the booted appliance: `--blockdev` on the kernel
//! command line and QMP build it, qemu-io touches data through it, and the
//! halt path closes every node by refcount.

use harness::qemu::FAILURE_EXIT_STATUS;
use harness::{Appliance, QemuConfig};
use serde_json::{Value, json};
use std::time::Duration;

fn node_names(a: &mut Appliance) -> Vec<String> {
    let nodes = a
        .qmp()
        .cmd("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let mut names: Vec<String> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn boot_options_and_qmp_build_a_graph_that_quit_closes_completely() {
    let cfg = QemuConfig::default().append(
        r#"--blockdev null-co,node-name=null0,size=67108864,read-zeroes=on --blockdev {"driver": "raw", "node-name": "fmt0", "file": "null0", "offset": 1048576}"#,
    );
    let mut a = Appliance::boot(&cfg);
    assert_eq!(node_names(&mut a), ["fmt0", "null0"]);

    // A nested definition through QMP: quorum over three null-co children.
    a.qmp()
        .cmd(
            "blockdev-add",
            json!({"driver": "quorum", "node-name": "q0", "vote-threshold": 2, "children": [
                {"driver": "null-co", "node-name": "c0", "read-zeroes": true},
                {"driver": "null-co", "node-name": "c1", "read-zeroes": true},
                {"driver": "null-co", "node-name": "c2", "read-zeroes": true}]}),
        )
        .unwrap();
    assert_eq!(
        node_names(&mut a),
        ["c0", "c1", "c2", "fmt0", "null0", "q0"]
    );

    // raw's offset shrinks the visible size.
    let nodes = a.qmp().cmd("query-named-block-nodes", Value::Null).unwrap();
    let fmt0 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "fmt0")
        .unwrap()
        .clone();
    assert_eq!(
        fmt0["image"]["virtual-size"],
        json!(67108864 - 1048576),
        "{fmt0}"
    );

    // QEMU's refusals.
    let r = a
        .qmp()
        .execute("blockdev-del", json!({"node-name": "null0"}))
        .unwrap();
    assert_eq!(r["error"]["desc"], "Block device null0 is in use", "{r}");
    let r = a
        .qmp()
        .execute("blockdev-del", json!({"node-name": "c0"}))
        .unwrap();
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    let r = a
        .qmp()
        .execute(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "q0"}),
        )
        .unwrap();
    assert_eq!(
        r["error"]["desc"], "Duplicate nodes with node-name='q0'",
        "{r}"
    );
    let r = a
        .qmp()
        .execute(
            "blockdev-add",
            json!({"driver": "no-such-driver", "node-name": "x"}),
        )
        .unwrap();
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert_eq!(
        node_names(&mut a),
        ["c0", "c1", "c2", "fmt0", "null0", "q0"],
        "refused commands change nothing"
    );

    // Data through the graph with qemu-io.
    let out = a.qemu_io_output("q0", "read -P 0 0 64k");
    assert!(out.contains("read 65536/65536 bytes at offset 0"), "{out}");
    let out = a.qemu_io_output("fmt0", "write -P 0xab 4096 8192");
    assert!(
        out.contains("wrote 8192/8192 bytes at offset 4096"),
        "{out}"
    );
    let out = a.qemu_io_output("fmt0", "read 67108864 512");
    assert!(
        out.to_lowercase().contains("error") || out.contains("Input/output"),
        "read past the end must fail: {out}"
    );

    // blockdev-del of an unused monitor-owned node works.
    a.qmp()
        .cmd(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "spare"}),
        )
        .unwrap();
    a.qmp()
        .cmd("blockdev-del", json!({"node-name": "spare"}))
        .unwrap();

    let r = a.qmp().execute("quit", Value::Null).unwrap();
    assert_eq!(r, json!({"return": {}}));
    let status = a.wait_exit(Duration::from_secs(30)).expect("QEMU exits");
    let console = a.console();
    assert_eq!(status.code(), Some(0), "{console}");
    assert!(console.contains("=== block layer closed ==="), "{console}");
    for node in ["q0", "c0", "c1", "c2", "fmt0", "null0"] {
        assert!(
            console.contains(node),
            "close-all report must name {node}:\n{console}"
        );
    }
    assert!(console.contains("all 6 nodes closed"), "{console}");
    // Parents close before their children.
    let pos = |n: &str| {
        console
            .find(&format!("closed node '{n}'"))
            .unwrap_or_else(|| panic!("no \"closed node '{n}'\":\n{console}"))
    };
    assert!(
        pos("fmt0") < pos("null0"),
        "format node before its file:\n{console}"
    );
    assert!(
        pos("q0") < pos("c0"),
        "quorum before its children:\n{console}"
    );
}

#[test]
fn a_bad_blockdev_option_stops_the_appliance_with_a_clear_error() {
    let image = harness::image::for_tests();
    let cfg = QemuConfig::default()
        .append("--blockdev null-co,node-name=ok0 --blockdev null-co,node-name=bad,bogus=1");
    let mut a = Appliance::start(&image, &cfg).unwrap();
    let status = a.wait_exit(Duration::from_secs(30)).expect("QEMU exits");
    let console = a.console();
    assert_eq!(status.code(), Some(FAILURE_EXIT_STATUS), "{console}");
    assert!(
        console.contains("Parameter 'bogus' is unexpected"),
        "{console}"
    );
    // What was opened before the bad option is closed, not leaked.
    assert!(console.contains("=== block layer closed ==="), "{console}");
    assert!(console.contains("all 1 nodes closed"), "{console}");
    assert!(
        console.contains("reason: host-error (bad boot option)"),
        "{console}"
    );
}

#[test]
fn a_node_whose_flush_fails_is_named_at_halt_and_the_sequence_finishes() {
    let cfg = QemuConfig::default().append(
        r#"--blockdev {"driver": "blkdebug", "node-name": "bad", "image": {"driver": "null-co", "node-name": "under"}, "inject-error": [{"event": "none", "iotype": ["flush"], "errno": 5}]} --blockdev null-co,node-name=good"#,
    );
    let mut a = Appliance::boot(&cfg);
    // Unflushed data, so closing must flush (QEMU skips clean nodes).
    a.qemu_io("bad", "write -P 0x5 0 4k");
    a.qemu_io("good", "write -P 0x6 0 4k");
    // A second quit right behind the first is dropped, not run twice.
    a.qmp()
        .send_raw(b"{\"execute\": \"quit\", \"id\": 1}\n{\"execute\": \"quit\", \"id\": 2}\n")
        .unwrap();
    let r = a.qmp().recv_reply().unwrap();
    assert_eq!(r, json!({"return": {}, "id": 1}));
    let status = a.wait_exit(Duration::from_secs(30)).expect("QEMU exits");
    let console = a.console();
    assert_eq!(status.code(), Some(0), "{console}");
    let bad = console
        .lines()
        .find(|l| l.contains("closed node 'bad'"))
        .unwrap_or_else(|| panic!("no line for 'bad':\n{console}"));
    assert!(
        bad.to_lowercase().contains("flush failed") || bad.contains("Input/output error"),
        "{bad}"
    );
    assert!(console.contains("closed node 'good'"), "{console}");
    assert!(console.contains("all 3 nodes closed"), "{console}");
    assert_eq!(
        console.matches("=== blockhaus halt report ===").count(),
        1,
        "{console}"
    );
}
