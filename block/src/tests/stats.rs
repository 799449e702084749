//! I/O statistics ([`crate::stats`]): what a backend counts, how
//! `query-blockstats` shows it, latency histograms and `BLOCK_IO_ERROR`.

use alloc::rc::Rc;
use alloc::vec;
use serde_json::{Value, json};

use super::harness::{Env, Qmp};
use super::mem::Gate;
use crate::graph::backend::{Backend, BackendOptions};
use crate::graph::permission::Perm;
use crate::io::{IoError, ReqFlags};
use crate::qmp::ErrorClass;

fn named_backend(q: &Qmp, name: &str, node: &str) -> Rc<Backend> {
    let reg = q.bl.registry();
    let b = reg
        .new_backend(
            BackendOptions {
                name: Some(name.into()),
                ..Default::default()
            },
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::ALL,
        )
        .unwrap();
    b.insert(&reg.find_node(node).unwrap()).unwrap();
    b
}

fn run<T>(q: &Qmp, f: impl core::future::Future<Output = T>) -> T {
    q.bl.wait(f).unwrap()
}

#[test]
fn a_backend_counts_bytes_ops_times_and_invalid_requests_as_qemu_does() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "mem", "node-name": "img", "size": 65536}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "fmt", "file": "img"}),
    );
    let b = named_backend(&q, "drv", "fmt");
    // An anonymous backend (qemu-io's, a job's) is not listed.
    let anon =
        q.bl.registry()
            .new_backend(BackendOptions::default(), Perm::CONSISTENT_READ, Perm::ALL)
            .unwrap();
    anon.insert(&q.bl.registry().find_node("img").unwrap())
        .unwrap();
    q.clock.advance(5_000);

    let before = q.ok("query-blockstats", json!({}));
    assert_eq!(before.as_array().unwrap().len(), 1, "{before}");
    let e = &before[0];
    assert_eq!(e["device"], "drv");
    assert_eq!(e["node-name"], "fmt");
    assert_eq!(e["parent"]["node-name"], "img");
    assert!(e.get("qdev").is_none());
    assert!(e.get("backing").is_none());
    assert!(e["stats"].get("idle_time_ns").is_none(), "no I/O yet: {e}");
    assert_eq!(e["stats"]["rd_operations"], 0);
    assert_eq!(e["stats"]["account_invalid"], true);
    assert_eq!(e["stats"]["account_failed"], true);
    assert_eq!(e["stats"]["timed_stats"], json!([]));

    q.ok(
        "block-latency-histogram-set",
        json!({"id": "drv", "boundaries": [10, 1000], "boundaries-flush": [5]}),
    );

    // A read held in flight for 500 ns.
    let img = q.bl.registry().find_node("img").unwrap();
    let gate = Gate::closed();
    *Env::mem_driver(&img).gate.borrow_mut() = Some(gate.clone());
    let b1 = b.clone();
    let read = q.bl.executor().spawn(async move { b1.read(0, 4096).await });
    q.settle();
    assert_eq!(gate.waiting(), 1);
    q.clock.advance(500);
    gate.open();
    q.settle();
    assert!(read.try_take().unwrap().is_ok());

    run(&q, b.write(4096, vec![1; 8192], ReqFlags::NONE)).unwrap();
    run(&q, b.write_zeroes(61440, 4096, ReqFlags::NONE)).unwrap();
    run(&q, b.discard(0, 1024)).unwrap();
    run(&q, b.flush()).unwrap();
    // Past the end: invalid, not failed.
    assert_eq!(run(&q, b.read(65536, 512)), Err(IoError::Eio));
    assert_eq!(
        run(&q, b.write(65000, vec![0; 1024], ReqFlags::NONE)),
        Err(IoError::Eio)
    );
    // The anonymous backend's traffic is its own.
    run(&q, anon.read(0, 512)).unwrap();
    q.clock.advance(7_000);

    let s = q.ok("query-blockstats", json!({}))[0]["stats"].clone();
    let expect = [
        ("rd_bytes", 4096),
        ("wr_bytes", 8192 + 4096),
        ("unmap_bytes", 1024),
        ("rd_operations", 1),
        ("wr_operations", 2),
        ("flush_operations", 1),
        ("unmap_operations", 1),
        ("rd_total_time_ns", 500),
        ("wr_total_time_ns", 0),
        ("failed_rd_operations", 0),
        ("failed_wr_operations", 0),
        ("invalid_rd_operations", 1),
        ("invalid_wr_operations", 1),
        ("invalid_flush_operations", 0),
        ("wr_highest_offset", 65536),
        ("rd_merged", 0),
        ("idle_time_ns", 7_000),
    ];
    for (k, v) in expect {
        assert_eq!(s[k], json!(v), "{k}: {s}");
    }
    assert_eq!(
        s["rd_latency_histogram"],
        json!({"boundaries": [10, 1000], "bins": [0, 1, 0]})
    );
    assert_eq!(
        s["wr_latency_histogram"],
        json!({"boundaries": [10, 1000], "bins": [2, 0, 0]})
    );
    assert_eq!(
        s["flush_latency_histogram"],
        json!({"boundaries": [5], "bins": [1, 0]})
    );
    // No lists at all removes the histograms.
    q.ok("block-latency-histogram-set", json!({"id": "drv"}));
    let s = q.ok("query-blockstats", json!({}))[0]["stats"].clone();
    assert!(s.get("rd_latency_histogram").is_none(), "{s}");

    // query-nodes: every node, counters zero but wr_highest_offset, the
    // data child nested as `parent`.
    let nodes = q.ok("query-blockstats", json!({"query-nodes": true}));
    let fmt = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "fmt")
        .unwrap();
    assert!(fmt.get("device").is_none());
    assert_eq!(fmt["stats"]["wr_highest_offset"], 65536);
    assert_eq!(fmt["stats"]["rd_bytes"], 0);
    assert_eq!(fmt["parent"]["node-name"], "img");
    assert_eq!(fmt["parent"]["stats"]["wr_highest_offset"], 65536);
    assert_eq!(q.events(), vec![], "no BLOCK_IO_ERROR for invalid requests");
}

#[test]
fn a_failed_request_is_counted_and_raises_block_io_error() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "blkdebug", "node-name": "dbg",
               "image": {"driver": "mem", "node-name": "img", "size": 65536},
               "inject-error": [{"iotype": ["write"], "errno": 28, "once": true},
                                {"iotype": ["read"], "errno": 5, "once": true}]}),
    );
    let b = named_backend(&q, "drv", "dbg");
    assert_eq!(
        run(&q, b.write(0, vec![1; 512], ReqFlags::NONE)),
        Err(IoError::Enospc)
    );
    assert_eq!(run(&q, b.read(0, 512)), Err(IoError::Eio));
    run(&q, b.write(0, vec![1; 512], ReqFlags::NONE)).unwrap();
    let s = q.ok("query-blockstats", json!({}))[0].clone();
    assert_eq!(s["node-name"], "dbg");
    assert_eq!(s["parent"]["node-name"], "img", "blkdebug's image child");
    assert_eq!(s["stats"]["failed_wr_operations"], 1);
    assert_eq!(s["stats"]["failed_rd_operations"], 1);
    assert_eq!(s["stats"]["wr_operations"], 1);
    assert_eq!(s["stats"]["wr_bytes"], 512);
    assert_eq!(s["stats"]["rd_bytes"], 0);
    let events = q.events();
    assert_eq!(
        events,
        vec![
            (
                "BLOCK_IO_ERROR".into(),
                json!({"device": "drv", "node-name": "dbg", "operation": "write",
                       "action": "report", "nospace": true, "reason": "No space left on device"})
            ),
            (
                "BLOCK_IO_ERROR".into(),
                json!({"device": "drv", "node-name": "dbg", "operation": "read",
                       "action": "report", "nospace": false, "reason": "Input/output error"})
            ),
        ]
    );
}

#[test]
fn block_latency_histogram_set_refuses_what_qemu_refuses() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "mem", "node-name": "img", "size": 4096}),
    );
    named_backend(&q, "drv", "img");
    let e = q
        .cmd("block-latency-histogram-set", json!({"id": "nope"}))
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::DeviceNotFound);
    assert_eq!(e.desc, "Device 'nope' not found");
    assert_eq!(
        q.err(
            "block-latency-histogram-set",
            json!({"id": "drv", "boundaries-write": [10, 10]})
        ),
        "Device 'drv' set write boundaries fail"
    );
    assert_eq!(
        q.err(
            "block-latency-histogram-set",
            json!({"id": "drv", "boundaries": [1.5]})
        ),
        "Parameter 'boundaries[0]' expects uint64"
    );
    // A node name is not a device.
    let e = q
        .cmd("block-latency-histogram-set", json!({"id": "img"}))
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::DeviceNotFound);
    let _: Value = q.ok("query-blockstats", json!({"query-nodes": false}));
}

#[test]
fn timed_stats_report_the_older_of_two_windows_half_an_interval_apart_as_qemu_does() {
    use crate::stats::{AcctType, BlockAcctStats};
    const S: u64 = 1_000_000_000;
    let stats = BlockAcctStats::default();
    stats.add_interval(10, 0);
    stats.add_interval(60, 0);
    let timed = |now: u64| stats.to_value(now)["timed_stats"].clone();
    // Newest interval first, all zero before any I/O.
    let t = timed(S);
    assert_eq!(t[0]["interval_length"], 60);
    assert_eq!(t[1]["interval_length"], 10);
    assert_eq!(t[1]["min_rd_latency_ns"], 0);
    assert_eq!(t[1]["avg_rd_queue_depth"], 0.0);

    stats.done(AcctType::Read, 512, true, S - 100, S);
    stats.done(AcctType::Read, 512, true, 2 * S - 300, 2 * S);
    stats.done(AcctType::Write, 512, true, 2 * S - 50, 2 * S);
    // A discard has no timed statistics.
    stats.done(AcctType::Unmap, 512, true, 2 * S - 9_000, 2 * S);
    let t = timed(3 * S);
    let ten = &t[1];
    assert_eq!(ten["min_rd_latency_ns"], 100);
    assert_eq!(ten["max_rd_latency_ns"], 300);
    assert_eq!(ten["avg_rd_latency_ns"], 200);
    assert_eq!(ten["avg_wr_latency_ns"], 50);
    assert_eq!(ten["max_flush_latency_ns"], 0);
    // 400 ns in flight over the 8 s since the older window began.
    assert_eq!(ten["avg_rd_queue_depth"], 400.0 / (8 * S) as f64);

    // At 6 s the first window starts afresh; the second still has both.
    let t = timed(6 * S);
    assert_eq!(t[1]["min_rd_latency_ns"], 100);
    assert_eq!(t[1]["max_rd_latency_ns"], 300);
    stats.done(AcctType::Read, 512, true, 7 * S - 1000, 7 * S);
    // At 11 s the second starts afresh: the first has only the last read.
    let t = timed(11 * S);
    assert_eq!(t[1]["min_rd_latency_ns"], 1000);
    assert_eq!(t[1]["max_rd_latency_ns"], 1000);
    assert_eq!(t[1]["avg_rd_latency_ns"], 1000);
    assert_eq!(t[1]["avg_wr_latency_ns"], 0);
    // The minute-long interval still has all three.
    assert_eq!(t[0]["min_rd_latency_ns"], 100);
    assert_eq!(t[0]["max_rd_latency_ns"], 1000);
    assert_eq!(t[0]["avg_rd_latency_ns"], (100 + 300 + 1000) / 3);
}
