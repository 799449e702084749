//! Dirty bitmaps: the QMP commands with QEMU 7.2's checks and texts, the
//! write path marking enabled bitmaps, `dirty-bitmaps` in the queries, and
//! persistent bitmaps stored in a qcow2 image when its node closes.

use alloc::format;

use serde_json::{Value, json};

use super::harness::{Env, Qmp};
use super::qcow2::{check, image, node, open};
use crate::drivers::qcow2::header::Header;

const MIB: u64 = 1 << 20;

fn bitmaps(q: &Qmp, name: &str) -> Value {
    let nodes = q.nodes();
    let n = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == name))
        .cloned()
        .unwrap_or(Value::Null);
    n.get("dirty-bitmaps").cloned().unwrap_or(Value::Null)
}

fn null(q: &mut Qmp) {
    q.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "n0", "size": 8 * MIB, "discard": "unmap"}),
    );
}

#[test]
fn add_checks_arguments_like_qemu() {
    let mut q = Qmp::new();
    null(&mut q);
    let add = |g: Value| json!({"node": "n0", "name": "b", "granularity": g});
    assert_eq!(
        q.err("block-dirty-bitmap-add", add(json!(1000))),
        "Granularity must be power of 2 and at least 512"
    );
    assert_eq!(
        q.err("block-dirty-bitmap-add", add(json!(256))),
        "Granularity must be power of 2 and at least 512"
    );
    assert_eq!(
        q.err("block-dirty-bitmap-add", json!({"node": "n0", "name": ""})),
        "Bitmap name cannot be empty"
    );
    assert_eq!(
        q.err(
            "block-dirty-bitmap-add",
            json!({"node": "nope", "name": "b"})
        ),
        "Cannot find device='nope' nor node-name='nope'"
    );
    assert_eq!(
        q.err(
            "block-dirty-bitmap-add",
            json!({"node": "n0", "name": "b", "persistent": true})
        ),
        "Can't store persistent bitmaps to n0: Operation not supported"
    );
    q.ok("block-dirty-bitmap-add", json!({"node": "n0", "name": "b"}));
    assert_eq!(
        q.err("block-dirty-bitmap-add", json!({"node": "n0", "name": "b"})),
        "Bitmap already exists: b"
    );
    let long = "x".repeat(1024);
    assert_eq!(
        q.err(
            "block-dirty-bitmap-add",
            json!({"node": "n0", "name": long})
        ),
        format!("Bitmap name too long: {long}")
    );
    assert_eq!(
        bitmaps(&q, "n0"),
        json!([{"name": "b", "count": 0, "granularity": 65536, "recording": true,
                "busy": false, "persistent": false}])
    );
    for c in [
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
    ] {
        assert_eq!(
            q.err(c, json!({"node": "n0", "name": "c"})),
            "Dirty bitmap 'c' not found",
            "{c}"
        );
        assert_eq!(
            q.err(c, json!({"node": "zz", "name": "b"})),
            "Node 'zz' not found",
            "{c}"
        );
    }
}

#[test]
fn writes_zeroes_and_discards_mark_enabled_bitmaps() {
    let mut q = Qmp::new();
    null(&mut q);
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "n0", "name": "a", "granularity": 4096}),
    );
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "n0", "name": "off", "disabled": true}),
    );
    q.io("n0", "write 0 1");
    q.io("n0", "write -z 1M 8k");
    q.io("n0", "discard 2M 4k");
    let list = bitmaps(&q, "n0");
    // Newest first, as QEMU lists them.
    assert_eq!(list[0]["name"], "off");
    assert_eq!(list[0]["count"], 0);
    assert_eq!(list[0]["recording"], false);
    assert_eq!(list[1]["count"], 4096 * 4);
    q.ok(
        "block-dirty-bitmap-enable",
        json!({"node": "n0", "name": "off"}),
    );
    q.io("n0", "write 4M 512");
    assert_eq!(bitmaps(&q, "n0")[0]["count"], 65536);
    q.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "n0", "name": "a"}),
    );
    q.io("n0", "write 5M 512");
    assert_eq!(bitmaps(&q, "n0")[1]["count"], 4096 * 5);
    assert_eq!(bitmaps(&q, "n0")[1]["recording"], false);
    // Merge: `a` (4 KiB) into `off` (64 KiB), then clear and remove.
    q.ok(
        "block-dirty-bitmap-merge",
        json!({"node": "n0", "target": "off", "bitmaps": ["a", {"node": "n0", "name": "a"}]}),
    );
    assert_eq!(bitmaps(&q, "n0")[0]["count"], 65536 * 5);
    assert_eq!(
        q.err(
            "block-dirty-bitmap-merge",
            json!({"node": "n0", "target": "off", "bitmaps": ["a", "x"]})
        ),
        "Dirty bitmap 'x' not found"
    );
    assert_eq!(bitmaps(&q, "n0")[0]["count"], 65536 * 5, "unchanged");
    let e = q
        .cmd(
            "block-dirty-bitmap-merge",
            json!({"node": "n0", "target": "off", "bitmaps": [3]}),
        )
        .unwrap_err();
    assert_eq!(
        e.desc,
        "Invalid parameter type for 'bitmaps[0]', expected: BlockDirtyBitmapOrStr"
    );
    q.ok(
        "block-dirty-bitmap-clear",
        json!({"node": "n0", "name": "off"}),
    );
    assert_eq!(bitmaps(&q, "n0")[0]["count"], 0);
    q.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "n0", "name": "off"}),
    );
    q.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "n0", "name": "a"}),
    );
    assert_eq!(bitmaps(&q, "n0"), Value::Null);
}

#[test]
fn busy_and_inconsistent_bitmaps_refuse_use() {
    let mut q = Qmp::new();
    null(&mut q);
    q.ok("block-dirty-bitmap-add", json!({"node": "n0", "name": "b"}));
    q.ok("block-dirty-bitmap-add", json!({"node": "n0", "name": "t"}));
    let n = q.bl.registry().find_node("n0").unwrap();
    n.dirty_bitmaps_mut()[0].busy = true;
    let busy = "Bitmap 'b' is currently in use by another operation and cannot be used";
    for c in [
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
    ] {
        assert_eq!(q.err(c, json!({"node": "n0", "name": "b"})), busy, "{c}");
    }
    assert_eq!(
        q.err(
            "block-dirty-bitmap-merge",
            json!({"node": "n0", "target": "t", "bitmaps": ["b"]})
        ),
        busy
    );
    n.dirty_bitmaps_mut()[0].busy = false;
    n.dirty_bitmaps_mut()[0].inconsistent = true;
    let bad = "Bitmap 'b' is inconsistent and cannot be used";
    for c in [
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
    ] {
        assert_eq!(q.err(c, json!({"node": "n0", "name": "b"})), bad, "{c}");
    }
    assert_eq!(bitmaps(&q, "n0")[1]["inconsistent"], true);
    q.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "n0", "name": "b"}),
    );
}

#[test]
fn persistent_bitmaps_are_stored_in_qcow2_at_close() {
    let mut q = Qmp::new();
    image(&mut q, "f", 16 * MIB, json!({}));
    open(&mut q, "q", json!({"file": "f"}));
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "p", "persistent": true, "granularity": 4096}),
    );
    q.ok("block-dirty-bitmap-add", json!({"node": "q", "name": "t"}));
    q.io("q", "write 0 10k");
    q.io("q", "write -z 8M 4k");
    q.ok("blockdev-del", json!({"node-name": "q"}));
    open(&mut q, "q", json!({"file": "f"}));
    assert!(check(&q, "q").is_clean(), "{:?}", check(&q, "q"));
    // Only the persistent one comes back, with what it recorded.
    assert_eq!(
        bitmaps(&q, "q"),
        json!([{"name": "p", "count": 4 * 4096, "granularity": 4096, "recording": true,
                "busy": false, "persistent": true}])
    );
    // The image has it, in use while open.
    let header = |q: &Qmp| {
        let data = Env::mem_driver(&node(q, "f")).data.borrow().clone();
        Header::parse(&data[..65536]).unwrap()
    };
    assert!(header(&q).has_bitmaps);
    // Removed, it leaves the image at once (not only at close).
    q.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "q", "name": "p"}),
    );
    assert!(!header(&q).has_bitmaps);
    assert_eq!(header(&q).autoclear, 0);
    assert!(check(&q, "q").is_clean(), "{:?}", check(&q, "q"));
    q.ok("blockdev-del", json!({"node-name": "q"}));
    open(&mut q, "q", json!({"file": "f"}));
    assert_eq!(bitmaps(&q, "q"), Value::Null);
    assert!(check(&q, "q").is_clean(), "{:?}", check(&q, "q"));
    assert!(node(&q, "q").dirty_bitmaps().is_empty());
}

#[test]
fn the_default_granularity_follows_the_cluster_size() {
    let mut q = Qmp::new();
    for (file, cs, want) in [
        ("f1", 512, 4096),
        ("f2", 16384, 16384),
        ("f3", 1 << 21, 65536),
    ] {
        image(&mut q, file, 16 * MIB, json!({"cluster-size": cs}));
        let name = format!("q{file}");
        open(&mut q, &name, json!({"file": file}));
        q.ok("block-dirty-bitmap-add", json!({"node": name, "name": "b"}));
        assert_eq!(bitmaps(&q, &name)[0]["granularity"], want, "{cs}");
    }
}

#[test]
fn qcow2_v2_cannot_store_bitmaps() {
    let mut q = Qmp::new();
    image(&mut q, "f", 16 * MIB, json!({"version": "v2"}));
    open(&mut q, "q", json!({"file": "f"}));
    assert_eq!(
        q.err(
            "block-dirty-bitmap-add",
            json!({"node": "q", "name": "p", "persistent": true})
        ),
        "Can't make bitmap 'p' persistent in 'q': Cannot store dirty bitmaps in qcow2 v2 files"
    );
}

#[test]
fn a_resize_resizes_the_bitmaps() {
    let mut q = Qmp::new();
    super::qcow2::mem(&mut q, "m", 4 * MIB);
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "m", "name": "b", "granularity": 65536}),
    );
    q.io("m", "write 3M 1M");
    assert_eq!(bitmaps(&q, "m")[0]["count"], 1 << 20);
    q.ok("block_resize", json!({"node-name": "m", "size": 8 * MIB}));
    q.io("m", "write 7M 64k");
    assert_eq!(bitmaps(&q, "m")[0]["count"], (1 << 20) + 65536);
    q.ok("block_resize", json!({"node-name": "m", "size": 2 * MIB}));
    assert_eq!(bitmaps(&q, "m")[0]["count"], 0);
}

#[test]
fn a_qcow2_with_bitmaps_resizes_them_and_stores_the_new_size() {
    let mut q = Qmp::new();
    image(&mut q, "f", 4 * MIB, json!({}));
    open(&mut q, "q", json!({"file": "f"}));
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "p", "persistent": true}),
    );
    q.io("q", "write 0 4k");
    q.ok("blockdev-del", json!({"node-name": "q"}));
    open(&mut q, "q", json!({"file": "f"}));
    q.ok("block_resize", json!({"node-name": "q", "size": 12 * MIB}));
    q.io("q", "write 10M 4k");
    q.ok("blockdev-del", json!({"node-name": "q"}));
    open(&mut q, "q", json!({"file": "f"}));
    assert!(check(&q, "q").is_clean(), "{:?}", check(&q, "q"));
    assert_eq!(bitmaps(&q, "q")[0]["count"], 2 * 65536);
    // An inconsistent bitmap stops a resize (QEMU's check).
    node(&q, "q").dirty_bitmaps_mut()[0].inconsistent = true;
    assert_eq!(
        q.err("block_resize", json!({"node-name": "q", "size": 16 * MIB})),
        "Image format driver does not support resize"
    );
}
