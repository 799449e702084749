//! null-co, raw, blkdebug, copy-on-read, throttle.

use alloc::rc::Rc;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

use serde_json::json;

use super::harness::{Env, Qmp};
use crate::graph::backend::BackendOptions;
use crate::graph::permission::Perm;
use crate::io::{IoError, ReqFlags};
use crate::timer::Clock;
use core::future::Future;

#[test]
fn null_co_reads_zeroes_and_reports_allocation() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "z", "read-zeroes": true, "size": 65536}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "null-aio", "node-name": "u", "size": 65536, "latency-ns": 10_000_000}),
    );
    assert_eq!(
        q.io("z", "map"),
        "64 KiB (0x10000) bytes     allocated at offset 0 bytes (0x0)\r\n"
    );
    assert_eq!(
        q.io("u", "map"),
        "64 KiB (0x10000) bytes not allocated at offset 0 bytes (0x0)\r\n"
    );
    assert!(q.io("z", "read -P 0 0 64k").starts_with("read 65536/65536"));
    // The latency is spent on the timers: 10 ms of simulated time.
    let t0 = q.clock.now_ns();
    let out = q.io("u", "write 0 512");
    assert_eq!(q.clock.now_ns() - t0, 10_000_000);
    assert!(out.contains("; 00.01 sec ("), "{out}");
    assert_eq!(q.nodes()[1]["drv"], "null-aio");
}

#[test]
fn raw_window_over_its_file() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "mem", "node-name": "disk", "label": "disk", "size": 8192}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "part", "file": "disk", "offset": 4096, "size": 2048}),
    );
    assert!(
        q.io("part", "write -P 0x11 0 2k")
            .starts_with("wrote 2048/2048")
    );
    assert!(
        q.io("disk", "read -P 0x11 4096 2048")
            .starts_with("read 2048/2048")
    );
    assert!(
        q.io("disk", "read -P 0 0 4096")
            .starts_with("read 4096/4096")
    );
    assert!(
        q.io("disk", "read -P 0 6144 2048")
            .starts_with("read 2048/2048")
    );
    assert_eq!(
        q.io("part", "write 1k 2k"),
        "write failed: Input/output error\r\n"
    );
    let part = q.bl.registry().find_node("part").unwrap();
    let p2 = part.clone();
    let r =
        q.bl.wait(async move { p2.write(1024, vec![1; 2048], ReqFlags::NONE).await })
            .unwrap();
    assert_eq!(r, Err(IoError::Enospc));
    assert_eq!(part.get_length(), Ok(2048));
    assert_eq!(
        q.err("block_resize", json!({"node-name": "part", "size": 4096})),
        "Image format driver does not support resize"
    );
}

#[test]
fn blkdebug_injects_by_operation_range_and_count() {
    let mut q = Qmp::new();
    q.ok(
        "blockdev-add",
        json!({"driver": "blkdebug", "node-name": "dbg",
        "image": {"driver": "mem", "label": "img", "size": 16384},
        "inject-error": [
            {"event": "read_aio", "iotype": ["read"], "sector": 8, "x-length": 4096, "x-after": 1},
            {"iotype": ["write"], "errno": 28, "once": true},
            {"iotype": ["flush"], "state": 2},
        ]}),
    );
    // Reads outside [4096, 8192) pass; inside, the first passes, then EIO.
    assert!(q.io("dbg", "read 0 4k").starts_with("read 4096/4096"));
    assert!(q.io("dbg", "read 4k 512").starts_with("read 512/512"));
    assert_eq!(
        q.io("dbg", "read 6k 4k"),
        "read failed: Input/output error\r\n"
    );
    assert_eq!(
        q.io("dbg", "read 7k 512"),
        "read failed: Input/output error\r\n"
    );
    assert!(q.io("dbg", "read 8k 512").starts_with("read 512/512"));
    // The write rule fires once with ENOSPC.
    assert_eq!(
        q.io("dbg", "write 0 512"),
        "write failed: No space left on device\r\n"
    );
    assert!(q.io("dbg", "write 0 512").starts_with("wrote 512/512"));
    // A rule for state 2 never fires: there is no set-state.
    assert_eq!(q.io("dbg", "flush"), "");
    let g = q.ok("x-debug-query-block-graph", json!({}));
    assert_eq!(g["edges"][0]["name"], "image");
}

#[test]
fn copy_on_read_populates_what_its_child_lacks() {
    let mut q = Qmp::new();
    q.ok("blockdev-add", json!({"driver": "mem", "node-name": "base", "label": "base", "size": 16384, "unallocated": true}));
    q.ok(
        "blockdev-add",
        json!({"driver": "copy-on-read", "node-name": "cor", "file": "base"}),
    );
    let edge = q.bl.registry().find_node("cor").unwrap().file().unwrap();
    assert!(edge.perm().contains(Perm::WRITE_UNCHANGED));
    assert_eq!(
        q.io("base", "map"),
        "16 KiB (0x4000) bytes not allocated at offset 0 bytes (0x0)\r\n"
    );
    assert!(q.io("cor", "read 4k 4k").starts_with("read 4096/4096"));
    assert_eq!(
        q.io("base", "map"),
        "4 KiB (0x1000) bytes not allocated at offset 0 bytes (0x0)\r\n\
         4 KiB (0x1000) bytes     allocated at offset 4 KiB (0x1000)\r\n\
         8 KiB (0x2000) bytes not allocated at offset 8 KiB (0x2000)\r\n"
    );
    assert!(q.io("cor", "write -P 7 12k 4k").starts_with("wrote"));
    assert!(q.io("base", "read -P 7 12k 4k").starts_with("read"));
}

#[test]
fn throttle_holds_requests_to_the_group_limits() {
    let mut q = Qmp::new();
    q.ok(
        "object-add",
        json!({"qom-type": "throttle-group", "id": "bw", "limits": {"bps-total": 1048576}}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "throttle", "node-name": "t", "throttle-group": "bw",
        "file": {"driver": "null-co"}}),
    );
    let t0 = q.clock.now_ns();
    q.io("t", "write 0 512k");
    assert_eq!(q.clock.now_ns(), t0, "the first request fits the bucket");
    let out = q.io("t", "write 0 512k");
    // 512 KiB over the 1/10 s bucket at 1 MiB/s: about 0.4 s of waiting.
    let waited = q.clock.now_ns() - t0;
    assert!((390_000_000..=410_000_000).contains(&waited), "{waited}");
    assert!(out.contains("00.40 sec"), "{out}");
}

#[test]
fn throttle_group_is_shared_between_nodes() {
    let mut q = Qmp::new();
    q.ok(
        "object-add",
        json!({"qom-type": "throttle-group", "id": "tg", "limits": {"iops-total": 10}}),
    );
    for t in ["t1", "t2"] {
        q.ok(
            "blockdev-add",
            json!({"driver": "throttle", "node-name": t, "throttle-group": "tg",
            "file": {"driver": "null-co"}}),
        );
    }
    let reg = q.bl.registry().clone();
    let mut handles = Vec::new();
    for t in ["t1", "t2"] {
        let b = reg
            .new_backend(BackendOptions::default(), Perm::CONSISTENT_READ, Perm::ALL)
            .unwrap();
        b.insert(&reg.find_node(t).unwrap()).unwrap();
        for _ in 0..6 {
            let b = b.clone();
            handles.push(reg.executor().spawn(async move { b.read(0, 512).await }));
        }
    }
    let t0 = q.clock.now_ns();
    let hs = handles;
    q.bl.wait(async move {
        for h in hs {
            assert!(h.await.is_ok());
        }
    })
    .unwrap();
    // 12 operations at 10 IOPS with a bucket of one: ~1 s for both nodes
    // together (separate groups would take half).
    let took = q.clock.now_ns() - t0;
    assert!((950_000_000..=1_050_000_000).contains(&took), "{took}");
}

#[test]
fn a_protocol_driver_plugs_in_from_outside_through_add_node() {
    // What the kernel does with a probed virtio disk.
    let q = Qmp::new();
    let env = Env::new();
    let drv = super::mem::Mem::new("vda", 4096, &env.log);
    let node =
        q.bl.add_node("vda", alloc::boxed::Box::new(drv), Default::default())
            .unwrap();
    assert!(q.bl.registry().is_monitor_owned(&node));
    assert_eq!(q.nodes()[0]["file"], "mem://vda");
    assert_eq!(
        q.bl.add_node(
            "vda",
            alloc::boxed::Box::new(super::mem::Mem::new("x", 1, &env.log)),
            Default::default()
        )
        .unwrap_err()
        .desc,
        "Duplicate nodes with node-name='vda'"
    );
    let _ = Rc::strong_count(&node).to_string();
}

#[test]
fn dropped_throttled_request_does_not_stall_the_group() {
    use crate::drivers::throttle_group::{ThrottleConfig, ThrottleGroup};
    let env = Env::new();
    let mut cfg = ThrottleConfig::default();
    cfg.buckets[3].avg = 10; // iops-total
    let g = Rc::new(ThrottleGroup::new(
        "g",
        cfg,
        env.clock.clone(),
        env.exec.timers().clone(),
    ));
    // Two requests go at once, the third must wait 100 ms, the fourth behind it.
    for _ in 0..2 {
        env.run(g.intercept(false, 512));
    }
    let g3 = g.clone();
    let third = env
        .exec
        .spawn(async move { g3.intercept(false, 512).await });
    let g4 = g.clone();
    let fourth = env
        .exec
        .spawn(async move { g4.intercept(false, 512).await });
    env.settle();
    assert!(!third.is_finished() && !fourth.is_finished());
    // Abandon the third (its task is dropped with the handle's executor slot
    // gone): simulate by dropping the future directly.
    let mut f = alloc::boxed::Box::pin(g.intercept(false, 512));
    let w = crate::exec::noop_waker();
    let mut cx = core::task::Context::from_waker(&w);
    assert!(f.as_mut().poll(&mut cx).is_pending());
    drop(f);
    env.tick(100_000_001);
    env.tick(100_000_001);
    assert!(third.is_finished() && fourth.is_finished());
    // And later requests still get their turn.
    env.tick(200_000_000);
    env.run(g.intercept(false, 512));
}
