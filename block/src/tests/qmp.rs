//! QMP commands over the block layer: blockdev-add/del, bad input leaves
//! the graph unchanged, media, objects, queries, qemu-io.

use alloc::string::ToString;
use alloc::vec::Vec;

use serde_json::{Value, json};

use super::harness::Qmp;
use crate::graph::backend::BackendOptions;
use crate::graph::permission::Perm;

#[test]
fn blockdev_add_nested_definitions_and_references() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "null0", "size": 1048576, "read-zeroes": true}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "fmt", "file": {"driver": "null-co", "size": 65536}}),
    );
    q.ok("blockdev-add", json!({"driver": "raw", "node-name": "over-ref", "file": "null0", "offset": 512, "size": 1024}));
    assert_eq!(q.node_names(), ["null0", "#block000", "fmt", "over-ref"]);
    let reg = q.bl.registry().clone();
    let null0 = reg.find_node("null0").unwrap();
    assert_eq!(null0.refcnt(), 2, "monitor + over-ref's file edge");
    let implicit = reg.find_node("#block000").unwrap();
    assert_eq!(implicit.refcnt(), 1);
    assert!(!reg.is_monitor_owned(&implicit));
    assert_eq!(reg.monitor_nodes().len(), 3);
    let nodes = q.nodes();
    assert_eq!(nodes[0]["drv"], "null-co");
    assert_eq!(nodes[0]["file"], "null-co://");
    assert_eq!(nodes[0]["image"]["virtual-size"], 1048576);
    assert_eq!(
        nodes[2]["file"], "null-co://",
        "raw without options takes its file's name"
    );
    assert_eq!(nodes[3]["image"]["virtual-size"], 1024);
    assert!(nodes[3]["file"].as_str().unwrap().starts_with("json:{"));
    // Nested children inherit discard=unmap and read-only.
    q.ok("blockdev-add", json!({"driver": "raw", "node-name": "ro", "read-only": true, "file": {"driver": "null-co"}}));
    let child = reg.find_node("ro").unwrap().file().unwrap().node().clone();
    assert!(child.read_only() && child.options().discard_unmap);
}

#[test]
fn blockdev_add_errors_are_qemus_and_change_nothing() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n"}),
    );
    let before = q.nodes();
    let cases: Vec<(Value, &str)> = alloc::vec![
        (json!({"node-name": "x"}), "Parameter 'driver' is missing"),
        (
            json!({"driver": "foo", "node-name": "x"}),
            "Parameter 'driver' does not accept value 'foo'"
        ),
        (
            json!({"driver": 7, "node-name": "x"}),
            "Invalid parameter type for 'driver', expected: string"
        ),
        (
            json!({"driver": "null-co"}),
            "'node-name' must be specified for the root node"
        ),
        (
            json!({"driver": "null-co", "node-name": "n"}),
            "Duplicate nodes with node-name='n'"
        ),
        (
            json!({"driver": "null-co", "node-name": "9x"}),
            "Invalid node-name: '9x'"
        ),
        (
            json!({"driver": "null-co", "node-name": "x", "bogus": 1}),
            "Parameter 'bogus' is unexpected"
        ),
        (
            json!({"driver": "null-co", "node-name": "x", "size": "big"}),
            "Invalid parameter type for 'size', expected: integer"
        ),
        (
            json!({"driver": "null-co", "node-name": "x", "read-only": "yes"}),
            "Invalid parameter type for 'read-only', expected: boolean"
        ),
        (
            json!({"driver": "null-co", "node-name": "x", "cache": {"direct": true, "x": 1}}),
            "Parameter 'cache.x' is unexpected"
        ),
        (
            json!({"driver": "null-co", "node-name": "x", "detect-zeroes": "maybe"}),
            "Parameter 'detect-zeroes' does not accept value 'maybe'"
        ),
        (
            json!({"driver": "null-co", "node-name": "x", "detect-zeroes": "unmap"}),
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
        ),
        (
            json!({"driver": "null-co", "node-name": "x", "force-share": true}),
            "force-share=on can only be used with read-only=on"
        ),
        (
            json!({"driver": "raw", "node-name": "x"}),
            "Parameter 'file' is missing"
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": 5}),
            "Invalid parameter type for 'file', expected: BlockdevRef"
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": "nope"}),
            "Cannot find device='nope' nor node-name='nope'"
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": {"size": 5}}),
            "Parameter 'file.driver' is missing"
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": {"driver": "null-co", "foo": 1}}),
            "Parameter 'file.foo' is unexpected"
        ),
        (
            json!({"driver": "raw", "node-name": "n", "file": {"driver": "null-co"}}),
            "Duplicate nodes with node-name='n'"
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": {"driver": "null-co", "size": 1024}, "offset": 2048}),
            "Offset (2048) cannot be greater than size of the containing file (1024)"
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": {"driver": "null-co", "size": 1024}, "size": 2048}),
            "The sum of offset (0) and size (2048) has to be smaller or equal to the  actual size of the containing file (1024)"
        ),
        (
            json!({"driver": "raw", "node-name": "x", "file": {"driver": "null-co", "size": 4096}, "size": 1000}),
            "Specified size is not multiple of 512"
        ),
        (
            json!({"driver": "quorum", "node-name": "x", "children": [], "vote-threshold": 1}),
            "Number of provided children must be 1 or more"
        ),
        (
            json!({"driver": "quorum", "node-name": "x", "children": ["n"], "vote-threshold": 2}),
            "threshold may not exceed children count"
        ),
        (
            json!({"driver": "quorum", "node-name": "x", "children": ["n"], "vote-threshold": 0}),
            "Parameter 'vote-threshold' expects a value >= 1"
        ),
        (
            json!({"driver": "quorum", "node-name": "x", "children": ["n"]}),
            "Parameter 'vote-threshold' is missing"
        ),
        (
            json!({"driver": "quorum", "node-name": "x", "children": [{"driver": "null-co", "x": 1}], "vote-threshold": 1}),
            "Parameter 'children[0].x' is unexpected"
        ),
        (
            json!({"driver": "throttle", "node-name": "x", "file": "n"}),
            "Parameter 'throttle-group' is missing"
        ),
        (
            json!({"driver": "throttle", "node-name": "x", "file": "n", "throttle-group": "tg"}),
            "Throttle group 'tg' does not exist"
        ),
        (
            json!({"driver": "blkdebug", "node-name": "x", "image": "n", "inject-error": [{"iotype": ["nope"]}]}),
            "Parameter 'inject-error[0].iotype[0]' does not accept value 'nope'"
        ),
    ];
    for (args, text) in cases {
        assert_eq!(q.err("blockdev-add", args.clone()), text, "{args}");
        assert_eq!(q.nodes(), before, "graph changed by {args}");
        assert_eq!(q.bl.registry().nodes().len(), 1, "{args}");
        assert_eq!(
            q.bl.registry().find_node("n").unwrap().refcnt(),
            1,
            "{args}"
        );
    }
    // Nested nodes opened before a later failure were closed again.
    assert!(q.log().is_empty());
}

#[test]
fn blockdev_del_refusals() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "base"}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "top", "file": "base"}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "inner", "file": {"driver": "null-co"}}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "exported"}),
    );
    let reg = q.bl.registry().clone();
    let b = reg
        .new_backend(
            BackendOptions {
                name: Some("exp".into()),
                ..Default::default()
            },
            Perm::CONSISTENT_READ,
            Perm::ALL,
        )
        .unwrap();
    b.insert(&reg.find_node("exported").unwrap()).unwrap();

    assert_eq!(
        q.err("blockdev-del", json!({"node-name": "nope"})),
        "Failed to find node with node-name='nope'"
    );
    assert_eq!(
        q.err("blockdev-del", json!({"node-name": "exported"})),
        "Node exported is in use"
    );
    assert_eq!(
        q.err("blockdev-del", json!({"node-name": "#block000"})),
        "Node #block000 is not owned by the monitor"
    );
    assert_eq!(
        q.err("blockdev-del", json!({"node-name": "base"})),
        "Block device base is in use"
    );
    assert_eq!(
        q.err("blockdev-del", json!({})),
        "Parameter 'node-name' is missing"
    );
    assert_eq!(
        q.err("blockdev-del", json!({"node-name": 1})),
        "Invalid parameter type for 'node-name', expected: string"
    );
    assert_eq!(
        q.err("blockdev-del", json!({"node-name": "top", "x": 1})),
        "Parameter 'x' is unexpected"
    );

    // Deleting top frees base for deletion; inner takes its implicit child along.
    q.ok("blockdev-del", json!({"node-name": "top"}));
    q.ok("blockdev-del", json!({"node-name": "base"}));
    q.ok("blockdev-del", json!({"node-name": "inner"}));
    assert_eq!(q.node_names(), ["exported"]);
}

#[test]
fn every_command_refuses_bad_arguments_without_changing_the_graph() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n"}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "quorum", "node-name": "q", "vote-threshold": 1,
        "children": [{"driver": "null-co"}]}),
    );
    q.ok(
        "object-add",
        json!({"qom-type": "throttle-group", "id": "tg"}),
    );
    let reg = q.bl.registry().clone();
    reg.new_backend(
        BackendOptions {
            name: Some("drv".into()),
            ..Default::default()
        },
        Perm::CONSISTENT_READ,
        Perm::ALL,
    )
    .unwrap();
    let before = (
        q.nodes(),
        crate::query::block_graph(&q.bl),
        reg.object_ids(),
    );
    let bad: Vec<(&str, Value)> = alloc::vec![
        ("blockdev-del", json!({})),
        ("blockdev-del", json!({"node-name": "n", "extra": true})),
        ("blockdev-del", json!({"node-name": ["n"]})),
        ("x-blockdev-change", json!({"child": "children.0"})),
        ("x-blockdev-change", json!({"parent": "q", "child": 0})),
        (
            "x-blockdev-change",
            json!({"parent": "q", "node": "n", "extra": 1})
        ),
        ("x-blockdev-change", json!({"parent": "q"})),
        (
            "x-blockdev-change",
            json!({"parent": "q", "child": "children.0", "node": "n"})
        ),
        ("x-blockdev-change", json!({"parent": "nope", "node": "n"})),
        (
            "x-blockdev-change",
            json!({"parent": "q", "child": "children.7"})
        ),
        (
            "x-blockdev-change",
            json!({"parent": "q", "child": "children.0"})
        ),
        ("x-blockdev-change", json!({"parent": "n", "node": "q"})),
        ("x-blockdev-change", json!({"parent": "q", "node": "ghost"})),
        ("block_resize", json!({"node-name": "n"})),
        ("block_resize", json!({"node-name": "n", "size": "1G"})),
        ("block_resize", json!({"node-name": "n", "size": 1, "x": 1})),
        ("block_resize", json!({"node-name": "ghost", "size": 1})),
        ("block_resize", json!({"node-name": "n", "size": -1})),
        ("blockdev-open-tray", json!({})),
        ("blockdev-open-tray", json!({"device": "drv", "id": "drv"})),
        ("blockdev-open-tray", json!({"id": "drv", "force": "yes"})),
        ("blockdev-close-tray", json!({"id": "drv", "x": 1})),
        ("blockdev-remove-medium", json!({})),
        ("blockdev-remove-medium", json!({"id": 3})),
        ("blockdev-insert-medium", json!({"id": "drv"})),
        (
            "blockdev-insert-medium",
            json!({"id": "drv", "node-name": "ghost"})
        ),
        (
            "blockdev-insert-medium",
            json!({"id": "drv", "node-name": "n", "x": 0})
        ),
        ("query-named-block-nodes", json!({"flat": "yes"})),
        ("query-named-block-nodes", json!({"x": 1})),
        ("query-block", json!({"x": 1})),
        ("x-debug-query-block-graph", json!({"x": 1})),
        ("object-add", json!({"id": "t2"})),
        ("object-add", json!({"qom-type": "iothread", "id": "t2"})),
        ("object-add", json!({"qom-type": "throttle-group"})),
        (
            "object-add",
            json!({"qom-type": "throttle-group", "id": "tg"})
        ),
        (
            "object-add",
            json!({"qom-type": "throttle-group", "id": "0bad"})
        ),
        (
            "object-add",
            json!({"qom-type": "throttle-group", "id": "t2", "limits": {"bps-total": "x"}})
        ),
        (
            "object-add",
            json!({"qom-type": "throttle-group", "id": "t2", "limits": {"nope": 1}})
        ),
        (
            "object-add",
            json!({"qom-type": "throttle-group", "id": "t2", "limits": {"bps-total": 1, "bps-read": 1}})
        ),
        (
            "object-add",
            json!({"qom-type": "throttle-group", "id": "t2", "limits": {"iops-total-max": 10}})
        ),
        (
            "object-add",
            json!({"qom-type": "throttle-group", "id": "t2", "extra": 1})
        ),
        ("object-del", json!({})),
        ("object-del", json!({"id": "ghost"})),
        ("human-monitor-command", json!({})),
        ("human-monitor-command", json!({"command-line": 5})),
        (
            "human-monitor-command",
            json!({"command-line": "qemu-io n \"read 0 512\"", "x": 1})
        ),
        ("query-jobs", json!({"x": 1})),
        ("job-cancel", json!({"id": "ghost"})),
        ("job-cancel", json!({})),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "z", "latency-ns": "1"})
        ),
    ];
    for (cmd, args) in bad {
        q.err(cmd, args.clone());
        let after = (
            q.nodes(),
            crate::query::block_graph(&q.bl),
            reg.object_ids(),
        );
        assert_eq!(after, before, "{cmd} {args} changed the graph");
    }
    // Unknown devices are DeviceNotFound, as in QEMU.
    let e = q
        .cmd("blockdev-open-tray", json!({"id": "ghost"}))
        .unwrap_err();
    assert_eq!(
        (e.class, e.desc.as_str()),
        (
            crate::qmp::ErrorClass::DeviceNotFound,
            "Device 'ghost' not found"
        )
    );
}

#[test]
fn x_blockdev_change_adds_and_removes_quorum_children() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "quorum", "node-name": "q", "vote-threshold": 2,
        "children": [{"driver": "mem", "label": "a"}, {"driver": "mem", "label": "b"}]}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "mem", "node-name": "c", "label": "c"}),
    );
    q.ok("x-blockdev-change", json!({"parent": "q", "node": "c"}));
    let reg = q.bl.registry().clone();
    let qn = reg.find_node("q").unwrap();
    let names: Vec<_> = qn.children().iter().map(|c| c.name().to_string()).collect();
    assert_eq!(names, ["children.0", "children.1", "children.2"]);
    assert_eq!(reg.find_node("c").unwrap().refcnt(), 2);
    assert_eq!(
        q.err("x-blockdev-change", json!({"parent": "q", "node": "c"})),
        "The node c already has a parent"
    );
    assert_eq!(
        q.err(
            "x-blockdev-change",
            json!({"parent": "q", "child": "children.9"})
        ),
        "Node 'q' does not have child 'children.9'"
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n"}),
    );
    assert_eq!(
        q.err("x-blockdev-change", json!({"parent": "n", "node": "q"})),
        "The node n does not support adding a child"
    );
    assert_eq!(
        q.err("x-blockdev-change", json!({"parent": "n", "child": "x"})),
        "Node 'n' does not have child 'x'"
    );
    assert_eq!(
        q.err("x-blockdev-change", json!({"parent": "ghost", "node": "n"})),
        "Cannot find device='ghost' nor node-name='ghost'"
    );
    assert_eq!(
        q.err("x-blockdev-change", json!({"parent": "q"})),
        "Either child or node must be specified"
    );
    assert_eq!(
        q.err(
            "x-blockdev-change",
            json!({"parent": "q", "child": "a", "node": "b"})
        ),
        "The parameters child and node are in conflict"
    );
    // Remove the implicit child b: it closes; c stays (monitor-owned).
    q.ok(
        "x-blockdev-change",
        json!({"parent": "q", "child": "children.1"}),
    );
    assert!(q.log().contains(&"close b".to_string()));
    assert_eq!(
        q.err(
            "x-blockdev-change",
            json!({"parent": "q", "child": "children.0"})
        ),
        "The number of children cannot be lower than the vote threshold 2"
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "mem", "node-name": "d", "label": "d"}),
    );
    q.ok("x-blockdev-change", json!({"parent": "q", "node": "d"}));
    assert!(qn.child("children.3").is_some());
    // Removing the last index makes it free again (QEMU's next_child_index).
    q.ok(
        "x-blockdev-change",
        json!({"parent": "q", "child": "children.3"}),
    );
    q.ok("x-blockdev-change", json!({"parent": "q", "node": "d"}));
    assert!(qn.child("children.3").is_some());
    q.ok(
        "x-blockdev-change",
        json!({"parent": "q", "child": "children.2"}),
    );
    assert_eq!(reg.find_node("c").unwrap().refcnt(), 1);
    assert_eq!(reg.find_node("d").unwrap().refcnt(), 2);
}

#[test]
fn block_resize_checks_permissions() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "mem", "node-name": "m", "size": 4096}),
    );
    q.ok("block_resize", json!({"node-name": "m", "size": 8192}));
    assert_eq!(
        q.bl.registry().find_node("m").unwrap().get_length(),
        Ok(8192)
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n"}),
    );
    assert_eq!(
        q.err("block_resize", json!({"node-name": "n", "size": 1})),
        "Image format driver does not support resize"
    );
    let reg = q.bl.registry().clone();
    let exp = reg
        .new_backend(
            BackendOptions {
                name: Some("exp".into()),
                ..Default::default()
            },
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::ALL.minus(Perm::RESIZE),
        )
        .unwrap();
    exp.insert(&reg.find_node("m").unwrap()).unwrap();
    assert_eq!(
        q.err("block_resize", json!({"node-name": "m", "size": 16384})),
        "Permission conflict on node 'm': permissions 'resize' are both required by an unnamed block device (uses node 'm' as 'root' child) and unshared by block device 'exp' (uses node 'm' as 'root' child)."
    );
    assert_eq!(
        q.err("block_resize", json!({"device": "exp", "size": -5})),
        "Parameter 'size' expects a >0 size"
    );
    assert_eq!(reg.backends().len(), 1, "the temporary backend is gone");
    assert_eq!(reg.find_node("m").unwrap().get_length(), Ok(8192));
}

#[test]
fn medium_commands_on_named_backends() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n", "size": 1024}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "m", "size": 2048}),
    );
    let reg = q.bl.registry().clone();
    let drv = reg
        .new_backend(
            BackendOptions {
                name: Some("drv".into()),
                ..Default::default()
            },
            Perm::CONSISTENT_READ,
            Perm::ALL,
        )
        .unwrap();
    let cd = reg
        .new_backend(
            BackendOptions {
                name: Some("cd".into()),
                tray: true,
                ..Default::default()
            },
            Perm::CONSISTENT_READ,
            Perm::ALL,
        )
        .unwrap();
    q.ok(
        "blockdev-insert-medium",
        json!({"id": "drv", "node-name": "n"}),
    );
    assert_eq!(
        q.err(
            "blockdev-insert-medium",
            json!({"id": "drv", "node-name": "m"})
        ),
        "There already is a medium in device 'drv'"
    );
    assert_eq!(
        q.err(
            "blockdev-insert-medium",
            json!({"id": "cd", "node-name": "n"})
        ),
        "Node 'n' is already in use"
    );
    assert_eq!(
        q.err(
            "blockdev-insert-medium",
            json!({"id": "cd", "node-name": "m"})
        ),
        "Tray of device 'cd' is not open"
    );
    // Tray-less backends: the tray commands are no-ops.
    q.ok("blockdev-open-tray", json!({"id": "drv"}));
    assert!(!drv.is_tray_open());
    let blocks = q.ok("query-block", json!({}));
    assert_eq!(blocks[0]["device"], "drv");
    assert_eq!(blocks[0]["inserted"]["node-name"], "n");
    assert!(blocks[0].get("tray_open").is_none());
    assert_eq!(blocks[1]["tray_open"], false);
    q.ok("blockdev-remove-medium", json!({"id": "drv"}));
    assert_eq!(
        q.io("drv", "read 0 512"),
        "read failed: No medium found\r\n"
    );
    assert_eq!(reg.find_node("n").unwrap().refcnt(), 1);
    // With a tray: open, insert, close; events as QEMU's.
    q.ok("blockdev-open-tray", json!({"id": "cd"}));
    q.ok(
        "blockdev-insert-medium",
        json!({"id": "cd", "node-name": "m"}),
    );
    assert_eq!(q.io("cd", "read 0 512"), "read failed: No medium found\r\n");
    q.ok("blockdev-close-tray", json!({"device": "cd"}));
    assert!(
        q.io("cd", "read 0 512")
            .starts_with("read 512/512 bytes at offset 0\r\n")
    );
    assert_eq!(
        q.err("blockdev-remove-medium", json!({"id": "cd"})),
        "Tray of device 'cd' is not open"
    );
    q.ok("eject", json!({"id": "cd"}));
    assert!(cd.root().is_none());
    let ev: Vec<_> = q
        .events()
        .into_iter()
        .filter(|(n, _)| n == "DEVICE_TRAY_MOVED")
        .map(|(_, d)| d["tray-open"].clone())
        .collect();
    assert_eq!(ev, [json!(true), json!(false), json!(true)]);
}

#[test]
fn throttle_group_objects() {
    let mut q = Qmp::new();
    q.ok(
        "object-add",
        json!({"qom-type": "throttle-group", "id": "tg", "limits": {"iops-total": 100}}),
    );
    assert_eq!(
        q.err(
            "object-add",
            json!({"qom-type": "throttle-group", "id": "tg"})
        ),
        "attempt to add duplicate property 'tg' to object (type 'container')"
    );
    assert_eq!(
        q.err(
            "object-add",
            json!({"qom-type": "throttle-group", "id": "0x"})
        ),
        "Parameter 'id' expects an identifier"
    );
    assert_eq!(
        q.err("object-add", json!({"qom-type": "throttle-group", "id": "t", "limits": {"bps-total": 1, "bps-write": 1}})),
        "bps/iops/max total values and read/write values cannot be used at the same time"
    );
    q.ok("blockdev-add", json!({"driver": "throttle", "node-name": "t", "throttle-group": "tg", "file": {"driver": "null-co"}}));
    assert_eq!(
        q.err("object-del", json!({"id": "tg"})),
        "object 'tg' is in use, can not be deleted"
    );
    q.ok("blockdev-del", json!({"node-name": "t"}));
    q.ok("object-del", json!({"id": "tg"}));
    assert_eq!(
        q.err("object-del", json!({"id": "tg"})),
        "object 'tg' not found"
    );
}

#[test]
fn block_graph_lists_backends_jobs_nodes_and_edges() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "fmt", "file": {"driver": "null-co"}}),
    );
    let reg = q.bl.registry().clone();
    let drv = reg
        .new_backend(
            BackendOptions {
                name: Some("drv".into()),
                ..Default::default()
            },
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::ALL,
        )
        .unwrap();
    drv.insert(&reg.find_node("fmt").unwrap()).unwrap();
    let g = q.ok("x-debug-query-block-graph", json!({}));
    assert_eq!(
        g["nodes"][0],
        json!({"id": 1, "type": "block-backend", "name": "drv"})
    );
    assert_eq!(
        g["nodes"][1],
        json!({"id": 2, "type": "block-driver", "name": "#block000", "drv": "null-co", "refcount": 1})
    );
    assert_eq!(g["nodes"][2]["name"], "fmt");
    assert_eq!(g["nodes"][2]["refcount"], 2);
    assert_eq!(
        g["edges"][0],
        json!({"parent": 1, "child": 3, "name": "root", "perm": ["consistent-read", "write"],
        "shared-perm": ["consistent-read", "write", "write-unchanged", "resize"]})
    );
    // raw passes the writer's permissions down to its file.
    assert_eq!(g["edges"][1]["name"], "file");
    assert_eq!(g["edges"][1]["perm"], json!(["consistent-read", "write"]));
}

#[test]
fn qemu_io_reads_writes_maps() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "mem", "node-name": "disk", "size": 131072, "discard": "unmap"}),
    );
    let out = q.io("disk", "write -P 0x5a 0 64k");
    assert_eq!(
        out,
        "wrote 65536/65536 bytes at offset 0\r\n64 KiB, 1 ops; 00.00 sec (inf EiB/sec and inf ops/sec)\r\n"
    );
    assert!(
        q.io("disk", "read -P 0x5a 0 64k")
            .starts_with("read 65536/65536 bytes at offset 0\r\n")
    );
    assert!(
        q.io("disk", "read -P 0x5b 0 512")
            .starts_with("Pattern verification failed at offset 0, 512 bytes\r\nread 512/512")
    );
    assert_eq!(q.io("disk", "read -q -P 0 64k 64k"), "");
    assert!(
        q.io("disk", "write -z -u 0 4k")
            .starts_with("wrote 4096/4096 bytes at offset 0\r\n")
    );
    assert!(
        q.io("disk", "discard 8k 4k")
            .starts_with("discard 4096/4096 bytes at offset 8192\r\n")
    );
    assert_eq!(q.io("disk", "flush"), "");
    assert_eq!(
        q.io("disk", "map"),
        "4 KiB (0x1000) bytes not allocated at offset 0 bytes (0x0)\r\n\
         4 KiB (0x1000) bytes     allocated at offset 4 KiB (0x1000)\r\n\
         4 KiB (0x1000) bytes not allocated at offset 8 KiB (0x2000)\r\n\
         116 KiB (0x1d000) bytes     allocated at offset 12 KiB (0x3000)\r\n"
    );
    assert_eq!(
        q.io("disk", "read 128k 512"),
        "read failed: Input/output error\r\n"
    );
    assert_eq!(
        q.io("disk", "write -z -P 1 0 512"),
        "-z and -P cannot be specified at the same time\r\n"
    );
    assert_eq!(
        q.io("disk", "write -u 0 512"),
        "-u requires -z to be specified\r\n"
    );
    assert_eq!(
        q.io("disk", "write -P 300 0 512"),
        "300 is not a valid pattern byte\r\n"
    );
    assert_eq!(
        q.io("disk", "read 0 x1"),
        "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- x1\r\n"
    );
    assert_eq!(
        q.io("disk", "read 0"),
        "bad argument count 1 to read, expected at least 2 arguments\r\n"
    );
    assert_eq!(q.io("disk", "frob"), "command \"frob\" not found\r\n");
    assert_eq!(
        q.io("ghost", "read 0 1"),
        "Error: Cannot find device='' nor node-name='ghost'\r\n"
    );
    let out = q.ok(
        "human-monitor-command",
        json!({"command-line": "info block"}),
    );
    assert_eq!(out, "unknown command: 'info'\r\n");
    // The temporary backends are gone again.
    assert!(q.bl.registry().backends().is_empty());
    // A read-only node refuses writes via the permission system.
    q.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "ro", "read-only": true}),
    );
    assert_eq!(q.io("ro", "write 0 512"), "Block node is read-only\r\n");
}

#[test]
fn quit_path_close_all_through_the_layer() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "fmt", "file": {"driver": "mem", "label": "disk"}}),
    );
    q.io("fmt", "write -P 1 0 4k");
    let report = q.bl.close_all().unwrap().unwrap();
    let names: Vec<_> = report
        .nodes_closed
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["fmt", "#block000"]);
    assert_eq!(q.log(), ["flush disk", "close disk"]);
    assert!(q.nodes().as_array().unwrap().is_empty());
}
