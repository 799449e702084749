//! quorum: voting, events, rewrite, fifo, permissions, and closing with
//! requests in flight (the 2015 bug).

use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use serde_json::json;

use super::harness::{Env, Qmp};
use super::mem::gate;
use crate::close_all::close_all;
use crate::graph::backend::BackendOptions;
use crate::graph::node::NodeState;
use crate::graph::permission::Perm;
use crate::io::ReqFlags;

fn three(q: &mut Qmp, extra: serde_json::Value) {
    let mut args = json!({"driver": "quorum", "node-name": "q", "vote-threshold": 2, "children": [
        {"driver": "mem", "label": "a", "node-name": "a", "size": 65536},
        {"driver": "mem", "label": "b", "node-name": "b", "size": 65536},
        {"driver": "mem", "label": "c", "node-name": "c", "size": 65536},
    ]});
    if let (Some(m), Some(e)) = (args.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            m.insert(k.clone(), v.clone());
        }
    }
    q.ok("blockdev-add", args);
}

fn corrupt(q: &Qmp, node: &str, offset: usize, byte: u8) {
    let n = q.bl.registry().find_node(node).unwrap();
    let m = Env::mem_driver(&n);
    m.data.borrow_mut()[offset..offset + 512].fill(byte);
}

fn quorum_events(q: &Qmp) -> Vec<serde_json::Value> {
    q.events()
        .into_iter()
        .filter(|(n, _)| n.starts_with("QUORUM"))
        .map(|(n, mut d)| {
            d["event"] = json!(n);
            d
        })
        .collect()
}

#[test]
fn writes_replicate_and_reads_outvote_a_corrupted_child() {
    let mut q = Qmp::new();
    three(&mut q, json!({}));
    assert!(q.io("q", "write -P 0x42 0 4k").starts_with("wrote"));
    for c in ["a", "b", "c"] {
        assert!(q.io(c, "read -P 0x42 0 4k").starts_with("read"), "{c}");
    }
    corrupt(&q, "b", 1024, 0xff);
    q.events();
    assert!(q.io("q", "read -P 0x42 0 4k").starts_with("read 4096/4096"));
    assert_eq!(
        quorum_events(&q),
        [
            json!({"event": "QUORUM_REPORT_BAD", "type": "read", "node-name": "b",
        "sector-num": 0, "sectors-count": 8})
        ]
    );
    // Without rewrite-corrupted the child stays corrupted.
    assert!(
        q.io("b", "read -P 0x42 0 4k")
            .starts_with("Pattern verification failed")
    );
}

#[test]
fn rewrite_corrupted_repairs_the_loser() {
    let mut q = Qmp::new();
    three(&mut q, json!({"rewrite-corrupted": true}));
    q.io("q", "write -P 0x42 0 4k");
    corrupt(&q, "c", 0, 0);
    assert!(q.io("q", "read -P 0x42 0 4k").starts_with("read"));
    assert!(q.io("c", "read -P 0x42 0 4k").starts_with("read 4096/4096"));
    // rewrite-corrupted takes WRITE on the children even for readers.
    let a = q.bl.registry().find_node("a").unwrap();
    assert!(a.parents()[0].perm().contains(Perm::WRITE));
}

#[test]
fn lost_vote_is_quorum_failure_and_eio() {
    let mut q = Qmp::new();
    three(&mut q, json!({}));
    q.io("q", "write -P 1 0 512");
    corrupt(&q, "b", 0, 2);
    corrupt(&q, "c", 0, 3);
    q.events();
    assert_eq!(
        q.io("q", "read 0 512"),
        "read failed: Input/output error\r\n"
    );
    let ev = quorum_events(&q);
    assert_eq!(
        ev,
        [json!({"event": "QUORUM_FAILURE", "reference": "q", "sector-num": 0, "sectors-count": 1})]
    );
}

#[test]
fn child_errors_are_reported_and_outvoted() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "quorum", "node-name": "q", "vote-threshold": 2, "children": [
            {"driver": "blkdebug", "node-name": "bad", "image": {"driver": "mem", "size": 4096},
             "inject-error": [{"iotype": ["read", "write"]}]},
            {"driver": "mem", "size": 4096, "node-name": "m1"},
            {"driver": "mem", "size": 4096, "node-name": "m2"},
        ]}),
    );
    assert!(q.io("q", "write -P 9 0 512").starts_with("wrote"));
    assert!(q.io("q", "read -P 9 0 512").starts_with("read"));
    let ev = quorum_events(&q);
    assert_eq!(ev.len(), 2);
    assert_eq!(
        ev[0],
        json!({"event": "QUORUM_REPORT_BAD", "type": "write", "node-name": "bad",
        "error": "Input/output error", "sector-num": 0, "sectors-count": 1})
    );
    assert_eq!(ev[1]["type"], "read");
    // FIFO reads skip the failing first child.
    q.ok(
        "blockdev-add",
        json!({"driver": "quorum", "node-name": "f", "vote-threshold": 1, "read-pattern": "fifo",
        "children": [{"driver": "blkdebug", "image": {"driver": "mem", "size": 4096},
        "inject-error": [{"iotype": ["read"]}]}, "m1"]}),
    );
    // m1 now has two quorum parents that share only reads: fine for readers.
    assert!(q.io("f", "read -P 9 0 512").starts_with("read"));
}

#[test]
fn writes_fail_below_the_threshold() {
    let mut q = Qmp::new();
    q.ok("blockdev-add", json!({"driver": "quorum", "node-name": "q", "vote-threshold": 2, "children": [
        {"driver": "blkdebug", "image": {"driver": "mem", "size": 4096}, "inject-error": [{"iotype": ["write", "flush"], "errno": 28}]},
        {"driver": "blkdebug", "image": {"driver": "mem", "size": 4096}, "inject-error": [{"iotype": ["write", "flush"], "errno": 28}]},
        {"driver": "mem", "size": 4096},
    ]}));
    assert_eq!(
        q.io("q", "write 0 512"),
        "write failed: No space left on device\r\n"
    );
    let names: Vec<String> = quorum_events(&q)
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        names,
        ["QUORUM_REPORT_BAD", "QUORUM_REPORT_BAD", "QUORUM_FAILURE"]
    );
}

#[test]
fn children_are_not_shared_with_writers() {
    let mut q = Qmp::new();
    three(&mut q, json!({}));
    let reg = q.bl.registry().clone();
    let b = reg
        .new_backend(
            BackendOptions::default(),
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::ALL,
        )
        .unwrap();
    let e = b.insert(&reg.find_node("a").unwrap()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Permission conflict on node 'a': permissions 'write' are both required by an unnamed block device \
         (uses node 'a' as 'root' child) and unshared by node 'q' (uses node 'a' as 'children.0' child)."
    );
}

#[test]
fn close_with_requests_in_flight_never_reaches_a_closing_child() {
    // The 2015 bug: closing quorum unreferenced its children one by one, and
    // a nested drain walked the children list into a freed child.
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "quorum", "node-name": "q", "vote-threshold": 2, "children": [
            {"driver": "mem", "label": "a", "gated": true},
            {"driver": "mem", "label": "b", "gated": true},
            {"driver": "mem", "label": "c", "gated": true},
        ]}),
    );
    let reg = q.bl.registry().clone();
    let qn = reg.find_node("q").unwrap();
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
    drv.insert(&qn).unwrap();
    // During every child's close, walk the whole graph the way the nested
    // drain did, touching every node reachable from every open node.
    let log = q.log.clone();
    for c in qn.children() {
        let reg = Rc::downgrade(&reg);
        let log = log.clone();
        let me = c.node().name().to_string();
        *Env::mem_driver(c.node()).on_close.borrow_mut() =
            Some(alloc::boxed::Box::new(move || {
                let Some(reg) = reg.upgrade() else { return };
                for n in reg.nodes() {
                    for e in n.children() {
                        let child = e.node();
                        if child.name() == me || child.state() != NodeState::Open {
                            log.borrow_mut().push(format!(
                                "REACHED closing {} via {}",
                                child.name(),
                                n.name()
                            ));
                        }
                        let _ = child.get_length();
                    }
                }
            }));
    }
    // Requests in flight on every child.
    let mut io = Vec::new();
    for i in 0..4u64 {
        let b = drv.clone();
        io.push(
            reg.executor()
                .spawn(async move { b.write(i * 512, vec![i as u8; 512], ReqFlags::NONE).await }),
        );
        let b = drv.clone();
        io.push(
            reg.executor()
                .spawn(async move { b.read(i * 512, 512).await.map(|_| ()) }),
        );
    }
    q.settle();
    assert_eq!(qn.in_flight(), 8);
    let r2 = reg.clone();
    let closing = reg.executor().spawn(async move { close_all(&r2).await });
    q.settle();
    assert!(!closing.is_finished(), "close-all waits for the requests");
    for g in ["a", "b", "c"] {
        gate(g).open();
    }
    q.settle();
    for h in io {
        assert_eq!(h.try_take(), Some(Ok(())));
    }
    let report = closing.try_take().unwrap().unwrap();
    let order: Vec<_> = report
        .nodes_closed
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(order, ["q", "#block002", "#block001", "#block000"]);
    let log = q.log();
    assert!(
        log.iter()
            .all(|l| !l.starts_with("REACHED") && !l.starts_with("USE-AFTER-CLOSE")),
        "{log:?}"
    );
    assert_eq!(log.iter().filter(|l| l.starts_with("close")).count(), 3);
    assert!(reg.nodes().is_empty());
}

#[test]
fn removing_a_child_waits_for_requests_in_flight() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "quorum", "node-name": "q", "vote-threshold": 1, "children": [
            {"driver": "mem", "label": "a", "gated": true},
            {"driver": "mem", "label": "b", "gated": true},
            {"driver": "mem", "label": "c", "gated": true},
        ]}),
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
    drv.insert(&reg.find_node("q").unwrap()).unwrap();
    let mut reads = Vec::new();
    for i in 0..4u64 {
        let b = drv.clone();
        reads.push(
            reg.executor()
                .spawn(async move { b.read(i * 512, 512).await }),
        );
    }
    q.settle();
    // The devices complete 1 ms from now.
    let (clock, timers) = (reg.clock(), reg.executor().timers().clone());
    reg.executor().spawn(async move {
        let deadline = clock.now_ns() + 1_000_000;
        timers.sleep_until(clock, deadline).await;
        for g in ["a", "b", "c"] {
            gate(g).open();
        }
    });
    q.ok(
        "x-blockdev-change",
        json!({"parent": "q", "child": "children.2"}),
    );
    for r in reads {
        assert!(r.try_take().is_some_and(|r| r.is_ok()));
    }
    let log = q.log();
    assert!(log.contains(&"close c".to_string()));
    assert!(
        log.iter().all(|l| !l.starts_with("USE-AFTER-CLOSE")),
        "{log:?}"
    );
    assert!(q.io("drv", "read 0 512").starts_with("read 512/512"));
}
