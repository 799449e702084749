//! `block-stream` and `block-commit` over qcow2 backing chains in memory:
//! base ← mid ← top, a guest writing to top.

use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;

use serde_json::json;

use super::harness::Qmp;
use super::jobs_util::*;
use crate::graph::node::Node;
use crate::job::RegistryJobs;
use crate::jobs::chain::backing;

const SIZE: u64 = 2 * MIB;

/// base: 0x0a over [0, 1 MiB); mid: 0x0b over [256 KiB, 512 KiB);
/// top: 0x0c over [768 KiB, 832 KiB). Returns (base, mid, top) and the
/// merged view.
fn chain3(q: &mut Qmp) -> (Rc<Node>, Rc<Node>, Rc<Node>, Vec<u8>) {
    let base = qcow2(q, "base", "f0", SIZE, None);
    io_write(q, "base", 0, MIB, 0x0a);
    let mid = qcow2(q, "mid", "f1", SIZE, Some("base"));
    io_write(q, "mid", 256 * KIB, 256 * KIB, 0x0b);
    let top = qcow2(q, "top", "f2", SIZE, Some("mid"));
    io_write(q, "top", 768 * KIB, 64 * KIB, 0x0c);
    let mut view = alloc::vec![0u8; SIZE as usize];
    view[..MIB as usize].fill(0x0a);
    view[256 * 1024..512 * 1024].fill(0x0b);
    view[768 * 1024..832 * 1024].fill(0x0c);
    assert_eq!(read_all(q, &top), view);
    q.events();
    (base, mid, top, view)
}

#[test]
fn stream_to_a_base_pulls_the_layers_above_it_while_the_guest_writes() {
    let mut q = Qmp::new();
    let (base, mid, top, view) = chain3(&mut q);
    let drv = guest(&q, "drv", &top);
    let w = start_writer(&q, &drv, view, 100, 4 * KIB, 21);
    q.ok(
        "block-stream",
        json!({"job-id": "s0", "device": "top", "base-node": "base", "speed": 4 * MIB}),
    );
    run_until(&q, "stream", || status(&q, "s0") == "gone");
    run_until(&q, "writer", || w.done.get() == 100);
    assert!(Rc::ptr_eq(&backing(&top).unwrap(), &base));
    // mid left the chain; the monitor still holds it.
    assert_eq!(mid.refcnt(), 1);
    assert_eq!(read_all(&q, &top), *w.model.borrow());
    let ev = q.events();
    assert!(event_trail(&ev).contains(&"BLOCK_JOB_COMPLETED".into()));
    assert_eq!(event(&ev, "BLOCK_JOB_COMPLETED")["type"], "stream");
    assert!(core::ptr::eq(&*drv.root_node().unwrap(), &*top));
    close_all_clean(&q);
}

#[test]
fn stream_of_the_whole_chain_drops_the_backing_file() {
    let mut q = Qmp::new();
    let (_base, _mid, top, view) = chain3(&mut q);
    q.ok("block-stream", json!({"device": "top", "job-id": "s0"}));
    run_until(&q, "stream", || status(&q, "s0") == "gone");
    assert!(backing(&top).is_none());
    assert_eq!(read_all(&q, &top), view);
    close_all_clean(&q);
}

#[test]
fn stream_refusals() {
    let mut q = Qmp::new();
    chain3(&mut q);
    assert_eq!(
        q.err(
            "block-stream",
            json!({"job-id": "s", "device": "top", "base": "x", "base-node": "base"})
        ),
        "'base' and 'base-node' cannot be specified at the same time"
    );
    assert_eq!(
        q.err(
            "block-stream",
            json!({"job-id": "s", "device": "mid", "base-node": "top"})
        ),
        "Node 'top' is not a backing image of 'mid'"
    );
    assert_eq!(
        q.err(
            "block-stream",
            json!({"job-id": "s", "device": "top", "base": "nope"})
        ),
        "Can't find 'nope' in the backing chain"
    );
    assert!(q.bl.registry().jobs().is_empty());
    close_all_clean(&q);
}

#[test]
fn intermediate_commit_moves_mid_into_base() {
    let mut q = Qmp::new();
    let (base, mid, top, view) = chain3(&mut q);
    let drv = guest(&q, "drv", &top);
    let w = start_writer(&q, &drv, view, 50, 4 * KIB, 33);
    q.ok(
        "block-commit",
        json!({"job-id": "c0", "device": "top", "top-node": "mid", "base-node": "base"}),
    );
    run_until(&q, "commit", || status(&q, "c0") == "gone");
    run_until(&q, "writer", || w.done.get() == 50);
    assert!(Rc::ptr_eq(&backing(&top).unwrap(), &base));
    assert_eq!(mid.refcnt(), 1);
    assert_eq!(read_all(&q, &top), *w.model.borrow());
    let b = read_all(&q, &base);
    assert!(b[256 * 1024..512 * 1024].iter().all(|x| *x == 0x0b));
    assert_eq!(event(&q.events(), "BLOCK_JOB_COMPLETED")["type"], "commit");
    close_all_clean(&q);
}

#[test]
fn intermediate_commit_puts_its_filter_above_top_while_it_runs() {
    let mut q = Qmp::new();
    let (base, mid, top, _view) = chain3(&mut q);
    let _drv = guest(&q, "drv", &top);
    let named = |q: &mut Qmp| -> Vec<(String, String)> {
        let nodes = q.ok("query-named-block-nodes", json!({}));
        nodes
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["node-name"].as_str().unwrap().into(),
                    n["drv"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    q.ok(
        "block-commit",
        json!({"job-id": "c0", "device": "top", "top-node": "mid", "base-node": "base",
               "filter-node-name": "ct0", "speed": 64 * KIB}),
    );
    q.settle();
    assert!(named(&mut q).contains(&("ct0".into(), "commit_top".into())));
    // The overlay reads through the filter; the chain below is unchanged.
    let ct0 = node(&q, "ct0");
    assert!(Rc::ptr_eq(&backing(&top).unwrap(), &ct0));
    assert!(Rc::ptr_eq(&backing(&ct0).unwrap(), &mid));
    // A second job cannot take the name.
    assert_eq!(
        q.err(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "ct0"})
        ),
        "Duplicate nodes with node-name='ct0'"
    );
    run_until(&q, "commit", || status(&q, "c0") == "gone");
    assert!(!named(&mut q).iter().any(|(n, _)| n == "ct0"));
    assert!(Rc::ptr_eq(&backing(&top).unwrap(), &base));
    // Cancelled, the filter goes too and the chain stays as it was.
    let (_b, m2, t2, _) = {
        let b = qcow2(&mut q, "b2", "g0", SIZE, None);
        let m = qcow2(&mut q, "m2", "g1", SIZE, Some("b2"));
        io_write(&mut q, "m2", 0, MIB, 0x5a);
        let t = qcow2(&mut q, "t2", "g2", SIZE, Some("m2"));
        (b, m, t, ())
    };
    q.ok(
        "block-commit",
        json!({"job-id": "c1", "device": "t2", "top-node": "m2", "base-node": "b2",
               "filter-node-name": "ct1", "speed": 64 * KIB}),
    );
    q.settle();
    assert!(named(&mut q).iter().any(|(n, _)| n == "ct1"));
    q.ok("job-cancel", json!({"id": "c1"}));
    run_until(&q, "cancel", || status(&q, "c1") == "gone");
    assert!(!named(&mut q).iter().any(|(n, _)| n == "ct1"));
    assert!(Rc::ptr_eq(&backing(&t2).unwrap(), &m2));
    close_all_clean(&q);
}

#[test]
fn active_commit_becomes_ready_and_pivots_to_base() {
    let mut q = Qmp::new();
    let (base, _mid, top, view) = chain3(&mut q);
    let drv = guest(&q, "drv", &top);
    let w = start_writer(&q, &drv, view, 200, 4 * KIB, 44);
    q.ok(
        "block-commit",
        json!({"job-id": "c0", "device": "top", "base-node": "base"}),
    );
    assert_eq!(drv.root_node().unwrap().driver_name(), "commit_top");
    run_until(&q, "ready", || status(&q, "c0") == "ready");
    let ev = q.events();
    assert_eq!(event(&ev, "BLOCK_JOB_READY")["type"], "commit");
    run_until(&q, "writer", || w.done.get() == 200);
    q.ok("job-complete", json!({"id": "c0"}));
    run_until(&q, "pivot", || status(&q, "c0") == "gone");
    assert!(core::ptr::eq(&*drv.root_node().unwrap(), &*base));
    assert_eq!(read_all(&q, &base), *w.model.borrow());
    // top and mid still exist (monitor-owned), unused.
    assert_eq!(top.refcnt(), 1);
    close_all_clean(&q);
}

#[test]
fn active_commit_cancelled_leaves_top_in_place() {
    let mut q = Qmp::new();
    let (_base, _mid, top, _) = chain3(&mut q);
    let drv = guest(&q, "drv", &top);
    q.ok(
        "block-commit",
        json!({"job-id": "c0", "device": "top", "base-node": "base", "speed": MIB}),
    );
    q.settle();
    q.ok("job-cancel", json!({"id": "c0"}));
    run_until(&q, "cancel", || status(&q, "c0") == "gone");
    assert!(core::ptr::eq(&*drv.root_node().unwrap(), &*top));
    close_all_clean(&q);
}

#[test]
fn commit_into_a_read_only_base_is_refused_and_changes_nothing() {
    // QEMU refuses a base opened with read-only=on too (libvirt reopens it
    // read-write with blockdev-reopen first).
    let mut q = Qmp::new();
    let base = qcow2(&mut q, "base", "f0", SIZE, None);
    io_write(&mut q, "base", 0, MIB, 0x0a);
    q.ok("blockdev-del", json!({"node-name": "base"}));
    drop(base);
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "base", "file": "f0", "read-only": true}),
    );
    let mid = qcow2(&mut q, "mid", "f1", SIZE, Some("base"));
    io_write(&mut q, "mid", 0, 64 * KIB, 0x0b);
    let top = qcow2(&mut q, "top", "f2", SIZE, Some("mid"));
    for top_node in ["top", "mid"] {
        let e = q.err(
            "block-commit",
            json!({"job-id": "c", "device": "top", "top-node": top_node, "base-node": "base"}),
        );
        assert_eq!(e, "Block node is read-only", "{top_node}");
        assert!(q.bl.registry().jobs().is_empty(), "{top_node}");
        assert!(Rc::ptr_eq(&backing(&top).unwrap(), &mid));
        assert!(Rc::ptr_eq(&backing(&mid).unwrap(), &node(&q, "base")));
        let names: Vec<String> = q
            .ok("query-named-block-nodes", json!({}))
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node-name"].as_str().unwrap().into())
            .collect();
        assert_eq!(names.len(), 6, "{top_node}: {names:?}");
    }
    close_all_clean(&q);
}

#[test]
fn commit_refusals() {
    let mut q = Qmp::new();
    chain3(&mut q);
    assert_eq!(
        q.err(
            "block-commit",
            json!({"job-id": "c", "device": "top", "top-node": "top", "base-node": "top"})
        ),
        "cannot commit an image into itself"
    );
    mem_node(&mut q, "other", SIZE, 0);
    assert_eq!(
        q.err(
            "block-commit",
            json!({"job-id": "c", "device": "top", "top-node": "other"})
        ),
        "'other' is not in this backing file chain"
    );
    assert_eq!(
        q.err("block-commit", json!({"job-id": "c", "device": "mid"})),
        "Need a root block node"
    );
    let e = q
        .cmd("block-commit", json!({"job-id": "c", "device": "nope"}))
        .unwrap_err();
    assert_eq!(e.class, crate::qmp::ErrorClass::DeviceNotFound);
    assert_eq!(e.desc, "Device 'nope' not found");
    assert_eq!(
        q.err(
            "block-commit",
            json!({"job-id": "c", "device": "top", "top": "a", "top-node": "mid"})
        ),
        "'top-node' and 'top' are mutually exclusive"
    );
    assert_eq!(
        q.err(
            "block-commit",
            json!({"job-id": "c", "device": "top", "backing-file": "x"})
        ),
        "'backing-file' specified, but 'top' is the active layer"
    );
    assert_eq!(
        q.err(
            "block-commit",
            json!({"job-id": "c", "device": "top", "top-node": "base"})
        ),
        "cannot commit an image into itself"
    );
    assert!(q.bl.registry().jobs().is_empty());
    close_all_clean(&q);
}

#[test]
fn mirror_sync_top_copies_only_the_top_layer() {
    let mut q = Qmp::new();
    let (_base, _mid, top, view) = chain3(&mut q);
    let copy = qcow2(&mut q, "copy", "f3", SIZE, Some("mid"));
    let drv = guest(&q, "drv", &top);
    q.ok(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "top", "target": "copy", "sync": "top"}),
    );
    run_until(&q, "ready", || status(&q, "m0") == "ready");
    q.ok("job-complete", json!({"id": "m0"}));
    run_until(&q, "done", || status(&q, "m0") == "gone");
    assert!(core::ptr::eq(&*drv.root_node().unwrap(), &*copy));
    assert_eq!(read_all(&q, &copy), view);
    // Only the top layer's extent was copied into the copy itself.
    for (off, allocated) in [
        (0, false),
        (300 * KIB, false),
        (600 * KIB, false),
        (800 * KIB, true),
    ] {
        let c = copy.clone();
        let st =
            q.bl.wait(async move { c.block_status(off, 4 * KIB).await })
                .unwrap()
                .unwrap();
        assert_eq!(st.allocated, allocated, "at {off}");
    }
    close_all_clean(&q);
}

#[test]
fn close_all_during_stream_and_commit() {
    let mut q = Qmp::new();
    let (_base, _mid, top, view) = chain3(&mut q);
    let drv = guest(&q, "drv", &top);
    let _w = start_writer(&q, &drv, view, 1000, 4 * KIB, 8);
    q.ok(
        "block-stream",
        json!({"job-id": "s0", "device": "top", "base-node": "base", "speed": MIB}),
    );
    let b2 = qcow2(&mut q, "b2", "g0", SIZE, None);
    let t2 = qcow2(&mut q, "t2", "g1", SIZE, Some("b2"));
    io_write(&mut q, "t2", 0, MIB, 0x5a);
    let _g2 = guest(&q, "drv2", &t2);
    q.ok(
        "block-commit",
        json!({"job-id": "c0", "device": "t2", "base-node": "b2", "speed": MIB}),
    );
    let _ = b2;
    q.settle();
    let r = close_all_clean(&q);
    assert_eq!(r.jobs_cancelled, ["s0", "c0"]);
}

#[test]
fn commit_grows_a_smaller_base() {
    for active in [true, false] {
        let mut q = Qmp::new();
        let base = qcow2(&mut q, "base", "f0", MIB, None);
        io_write(&mut q, "base", 0, MIB, 0x0a);
        let mid = qcow2(&mut q, "mid", "f1", SIZE, Some("base"));
        io_write(&mut q, "mid", 3 * MIB / 2, 4 * KIB, 0x0b);
        let view = read_all(&q, &mid);
        let top = if active {
            // Active commit of mid into base.
            q.ok(
                "block-commit",
                json!({"job-id": "c0", "device": "mid", "base-node": "base"}),
            );
            run_until(&q, "ready", || status(&q, "c0") == "ready");
            q.ok("job-complete", json!({"id": "c0"}));
            None
        } else {
            // Intermediate commit of mid (below top) into base.
            let top = qcow2(&mut q, "top", "f2", SIZE, Some("mid"));
            q.ok(
                "block-commit",
                json!({"job-id": "c0", "device": "top", "top-node": "mid", "base-node": "base"}),
            );
            Some(top)
        };
        run_until(&q, "gone", || status(&q, "c0") == "gone");
        assert_eq!(base.get_length(), Ok(SIZE), "active {active}");
        assert_eq!(read_all(&q, &base), view, "active {active}");
        if let Some(top) = top {
            assert_eq!(read_all(&q, &top), view);
            assert!(Rc::ptr_eq(&backing(&top).unwrap(), &base));
        }
        close_all_clean(&q);
    }
}

#[test]
fn stream_takes_every_write_through_its_filter() {
    let mut q = Qmp::new();
    let (_base, _mid, top, _view) = chain3(&mut q);
    q.ok(
        "block-stream",
        json!({"job-id": "s0", "device": "top", "speed": MIB, "filter-node-name": "sf"}),
    );
    // A writer on the top itself could race the copies: blockhaus refuses
    // it (QEMU serialises such requests in the node). The filter node
    // takes writes.
    let e = q.io("top", "write 0 512");
    assert!(e.contains("Permission conflict on node 'top'"), "{e}");
    let e = q.io("sf", "write -P 0x7e 0 512");
    assert!(e.contains("wrote 512/512"), "{e}");
    run_until(&q, "stream", || status(&q, "s0") == "gone");
    assert!(read_all(&q, &top)[..512].iter().all(|b| *b == 0x7e));
    assert!(backing(&top).is_none());
    close_all_clean(&q);
}

/// A qcow2 image whose header names `backing` (a node-name) as its
/// backing file, opened over it.
fn qcow2_named(q: &mut Qmp, name: &str, file: &str, backing: &str) -> Rc<Node> {
    q.ok(
        "blockdev-add",
        json!({"driver": "mem", "node-name": file, "label": file, "size": 64 * MIB}),
    );
    q.ok(
        "blockdev-create",
        json!({"job-id": "create", "options": {"driver": "qcow2", "file": file, "size": SIZE,
               "backing-file": backing, "backing-fmt": "qcow2"}}),
    );
    run_until(q, "create", || status(q, "create") == "concluded");
    q.ok("job-dismiss", json!({"id": "create"}));
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": name, "file": file, "backing": backing}),
    );
    node(q, name)
}

fn header_backing(file: &Node) -> (Option<alloc::string::String>, Option<alloc::string::String>) {
    let b = mem_bytes(file);
    match crate::drivers::qcow2::header::Header::parse(&b[..65536]) {
        Ok(h) => (h.backing_file, h.backing_format),
        Err(e) => panic!("{e:?}"),
    }
}

#[test]
fn stream_and_commit_record_the_backing_file_in_the_header() {
    for case in [
        "stream-all",
        "stream-base",
        "stream-base-named",
        "commit-named",
    ] {
        let mut q = Qmp::new();
        qcow2(&mut q, "base", "f0", SIZE, None);
        io_write(&mut q, "base", 0, MIB, 0x0a);
        qcow2_named(&mut q, "mid", "f1", "base");
        io_write(&mut q, "mid", 0, 64 * KIB, 0x0b);
        let top = qcow2_named(&mut q, "top", "f2", "mid");
        let view = read_all(&q, &top);
        let f2 = node(&q, "f2");
        let args = match case {
            "stream-all" => json!({"job-id": "j", "device": "top"}),
            "stream-base" => json!({"job-id": "j", "device": "top", "base-node": "base"}),
            "stream-base-named" => json!({"job-id": "j", "device": "top", "base-node": "base",
                                          "backing-file": "base.qcow2"}),
            _ => json!({"job-id": "j", "device": "top", "top-node": "mid", "base-node": "base",
                        "backing-file": "base.qcow2"}),
        };
        let cmd = if case.starts_with("stream") {
            "block-stream"
        } else {
            "block-commit"
        };
        q.ok(cmd, args);
        run_until(&q, "job", || status(&q, "j") == "gone");
        assert_eq!(read_all(&q, &top), view, "{case}");
        close_all_clean(&q);
        let (name, fmt) = header_backing(&f2);
        match case {
            "stream-all" => assert_eq!((name, fmt), (None, None), "{case}"),
            "stream-base" => assert_eq!(name.as_deref(), Some("mid"), "{case}: unchanged"),
            _ => {
                assert_eq!(name.as_deref(), Some("base.qcow2"), "{case}");
                assert_eq!(fmt.as_deref(), Some("qcow2"), "{case}");
            }
        }
    }
}
