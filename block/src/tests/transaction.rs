//! `transaction` (issue 15, point 2): all or nothing, QEMU's texts.

use alloc::string::String;
use alloc::vec::Vec;

use serde_json::{Value, json};

use super::harness::Qmp;
use super::jobs_util::*;
use crate::graph::node::Node;
use crate::io::ReqFlags;

/// The names of `n`'s bitmaps with (dirty bytes, enabled), oldest first.
fn state(n: &Node) -> Vec<(String, u64, bool)> {
    n.dirty_bitmaps()
        .iter()
        .map(|b| (b.name.clone(), b.bitmap.dirty_bytes(), b.enabled))
        .collect()
}

fn actions(abort: bool) -> Value {
    let mut a = json!([
        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "new"}},
        {"type": "block-dirty-bitmap-clear", "data": {"node": "src", "name": "b0"}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "src", "name": "b0"}},
        {"type": "block-dirty-bitmap-merge",
         "data": {"node": "src", "target": "b2", "bitmaps": ["b1"]}},
        {"type": "block-dirty-bitmap-remove", "data": {"node": "src", "name": "b1"}},
        {"type": "blockdev-backup",
         "data": {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}},
    ]);
    if abort {
        a.as_array_mut()
            .unwrap()
            .push(json!({"type": "abort", "data": {}}));
    }
    a
}

#[test]
fn all_or_nothing() {
    let mut q = Qmp::new();
    let src = mem_node(&mut q, "src", MIB, 4);
    let tgt = mem_node(&mut q, "tgt", MIB, 0);
    let drv = guest(&q, "drv", &src);
    for b in ["b0", "b1", "b2"] {
        q.ok(
            "block-dirty-bitmap-add",
            json!({"node": "src", "name": b, "granularity": 65536}),
        );
        q.bl.wait(drv.write(
            if b == "b2" { 0 } else { 512 * KIB },
            alloc::vec![1; 512],
            ReqFlags::NONE,
        ))
        .unwrap()
        .unwrap();
    }
    let before = state(&src);
    assert_eq!(
        q.err("transaction", json!({"actions": actions(true)})),
        "Transaction aborted using Abort action"
    );
    assert_eq!(state(&src), before);
    assert_eq!(status(&q, "j"), "gone");
    assert!(
        core::ptr::eq(&*drv.root_node().unwrap(), &*src),
        "no filter left"
    );
    assert!(mem_bytes(&tgt).iter().all(|b| *b == 0));
    let q_events = event_trail(&q.events());
    assert!(
        !q_events.iter().any(|e| e == "running"),
        "the job never ran: {q_events:?}"
    );

    q.ok("transaction", json!({"actions": actions(false)}));
    run_until(&q, "backup", || status(&q, "j") == "gone");
    assert_eq!(mem_bytes(&tgt), mem_bytes(&src));
    assert_eq!(
        state(&src),
        [
            (String::from("b0"), 0, false),
            (String::from("b2"), 2 * 65536, true),
            (String::from("new"), 0, true),
        ]
    );
    close_all_clean(&q);
}

#[test]
fn refusals_with_qemus_texts() {
    let mut q = Qmp::new();
    mem_node(&mut q, "src", MIB, 4);
    let one = |t: &str| json!({"actions": [{"type": t, "data": {}}]});
    assert_eq!(
        q.err("transaction", one("nope")),
        "Parameter 'type' does not accept value 'nope'"
    );
    assert_eq!(
        q.err("transaction", one("drive-backup")),
        "Action 'drive-backup' is not supported by blockhaus"
    );
    assert_eq!(
        q.err(
            "transaction",
            json!({"actions": [], "properties": {"completion-mode": "grouped"}})
        ),
        "completion-mode 'grouped' is not supported by blockhaus: it has no job transactions"
    );
    // A failing action reports its own error, and the ones before it are
    // undone.
    let e = q.err(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "a"}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "src", "name": "zz"}},
        ]}),
    );
    assert_eq!(e, "Dirty bitmap 'zz' not found");
    assert!(node(&q, "src").dirty_bitmaps().is_empty());
    q.ok("transaction", json!({"actions": []}));
    close_all_clean(&q);
}

#[test]
fn a_snapshot_is_undone_when_a_later_action_fails() {
    use super::qcow2::{image, open};
    let mut q = Qmp::new();
    image(&mut q, "f0", 4 * MIB, json!({}));
    image(&mut q, "f1", 4 * MIB, json!({"backing-file": "base"}));
    open(&mut q, "base", json!({"file": "f0"}));
    q.io("base", "write -P 0x12 0 128k");
    let base = node(&q, "base");
    let drv = guest(&q, "drv", &base);
    open(&mut q, "ovl", json!({"file": "f1", "backing": null}));
    let snap = json!({"type": "blockdev-snapshot", "data": {"node": "base", "overlay": "ovl"}});
    let e = q.err(
        "transaction",
        json!({"actions": [snap, {"type": "abort", "data": {}}]}),
    );
    assert_eq!(e, "Transaction aborted using Abort action");
    assert_eq!(drv.root_node().unwrap().name(), "base");
    assert!(node(&q, "ovl").child("backing").is_none());
    q.ok("transaction", json!({"actions": [snap]}));
    assert_eq!(drv.root_node().unwrap().name(), "ovl");
    assert!(q.io("ovl", "read -P 0x12 0 128k").starts_with("read"));
    close_all_clean(&q);
}
