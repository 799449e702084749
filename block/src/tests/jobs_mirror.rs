//! `blockdev-mirror`: end to end with a guest writing, pivot, cancel in
//! each state, pause/resume, speed, sync modes, error policies, close-all.

use alloc::vec;

use serde_json::json;

use super::harness::Qmp;
use super::jobs_util::*;
use crate::io::ReqFlags;
use crate::job::RegistryJobs;

fn mirror_args(sync: &str) -> serde_json::Value {
    json!({"job-id": "m0", "device": "src", "target": "tgt", "sync": sync,
           "granularity": 65536, "buf-size": 262144})
}

#[test]
fn mirror_full_with_guest_writes_pivots_to_an_equal_target() {
    let mut q = Qmp::new();
    let src = mem_node(&mut q, "src", 4 * MIB, 3);
    let tgt = mem_node(&mut q, "tgt", 4 * MIB, 0);
    let drv = guest(&q, "drv", &src);
    q.ok("blockdev-mirror", mirror_args("full"));
    // A mirror_top filter now sits between the guest and the source.
    let top = drv.root_node().unwrap();
    assert_eq!(top.driver_name(), "mirror_top");
    assert!(top.has_implicit_name());
    // A writer on the source node itself (qemu-io on the node-name, as in
    // QEMU) is tracked by the source's write notifier.
    let e = q.io("src", "write -P 0x5a 0 512");
    assert!(e.contains("wrote 512/512"), "{e}");
    let w = start_writer(&q, &drv, mem_bytes(&src), 200, 4 * KIB, 11);
    run_until(&q, "ready", || status(&q, "m0") == "ready");
    assert!(
        w.done.get() < 200,
        "the guest still writes when the mirror is ready"
    );
    let info = q.ok("query-block-jobs", json!({}));
    assert_eq!(info[0]["type"], "mirror");
    assert_eq!(info[0]["ready"], true);
    assert_eq!(info[0]["io-status"], "ok");
    run_until(&q, "writer", || w.done.get() == 200);
    q.ok("job-complete", json!({"id": "m0"}));
    run_until(&q, "pivot", || status(&q, "m0") == "gone");
    // The guest now writes to the target, which holds everything it wrote.
    assert!(core::ptr::eq(&*drv.root_node().unwrap(), &*tgt));
    assert_eq!(mem_bytes(&tgt), *w.model.borrow());
    assert_eq!(mem_bytes(&src), *w.model.borrow());
    assert_eq!(src.refcnt(), 1);
    assert!(!q.node_names().iter().any(|n| n.starts_with('#')));
    let ev = q.events();
    assert_eq!(
        event_trail(&ev),
        [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    let ready = event(&ev, "BLOCK_JOB_READY");
    assert_eq!(ready["device"], "m0");
    assert_eq!(ready["type"], "mirror");
    assert_eq!(ready["len"], ready["offset"]);
    assert_eq!(ready["speed"], 0);
    let done = event(&ev, "BLOCK_JOB_COMPLETED");
    assert!(done.get("error").is_none());
    assert_eq!(done["len"], done["offset"]);
    // Writes after the pivot land on the target only.
    q.bl.wait(drv.write(0, vec![0xab; 512], ReqFlags::NONE))
        .unwrap()
        .unwrap();
    assert_eq!(mem_bytes(&tgt)[0], 0xab);
    assert_ne!(mem_bytes(&src)[0], 0xab);
    close_all_clean(&q);
}

#[test]
fn cancel_without_force_in_ready_completes_without_pivot() {
    let mut q = Qmp::new();
    let src = mem_node(&mut q, "src", MIB, 5);
    let tgt = mem_node(&mut q, "tgt", MIB, 0);
    let drv = guest(&q, "drv", &src);
    q.ok("blockdev-mirror", mirror_args("full"));
    run_until(&q, "ready", || status(&q, "m0") == "ready");
    q.bl.wait(drv.write(4096, vec![0x42; 4096], ReqFlags::NONE))
        .unwrap()
        .unwrap();
    q.ok("block-job-cancel", json!({"device": "m0"}));
    run_until(&q, "end", || status(&q, "m0") == "gone");
    assert!(core::ptr::eq(&*drv.root_node().unwrap(), &*src));
    let trail = event_trail(&q.events());
    assert!(trail.ends_with(&[
        "waiting".into(),
        "pending".into(),
        "BLOCK_JOB_COMPLETED".into(),
        "concluded".into(),
        "null".into()
    ]));
    assert_eq!(mem_bytes(&src)[4096], 0x42);
    let _ = tgt;
    assert_eq!(src.refcnt(), 2);
    close_all_clean(&q);
}

#[test]
fn forced_cancel_in_each_state_leaves_the_graph_as_it_was() {
    for when in ["created", "running", "paused", "ready", "standby"] {
        let mut q = Qmp::new();
        let src = mem_node(&mut q, "src", 2 * MIB, 9);
        let _tgt = mem_node(&mut q, "tgt", 2 * MIB, 0);
        let drv = guest(&q, "drv", &src);
        let mut args = mirror_args("full");
        args["speed"] = json!(MIB);
        q.ok("blockdev-mirror", args);
        match when {
            "created" => {}
            "running" => q.settle(),
            "paused" => {
                q.settle();
                q.ok("job-pause", json!({"id": "m0"}));
                run_until(&q, "paused", || status(&q, "m0") == "paused");
            }
            _ => {
                q.ok("block-job-set-speed", json!({"device": "m0", "speed": 0}));
                run_until(&q, "ready", || status(&q, "m0") == "ready");
                if when == "standby" {
                    q.ok("job-pause", json!({"id": "m0"}));
                    run_until(&q, "standby", || status(&q, "m0") == "standby");
                }
            }
        }
        assert_eq!(status(&q, "m0"), when);
        q.ok("job-cancel", json!({"id": "m0"}));
        run_until(&q, "cancelled", || status(&q, "m0") == "gone");
        let trail = event_trail(&q.events());
        assert!(
            trail.ends_with(&[
                "aborting".into(),
                "BLOCK_JOB_CANCELLED".into(),
                "concluded".into(),
                "null".into()
            ]),
            "{when}: {trail:?}"
        );
        assert!(core::ptr::eq(&*drv.root_node().unwrap(), &*src), "{when}");
        assert_eq!(src.refcnt(), 2, "{when}");
        assert!(!q.node_names().iter().any(|n| n.starts_with('#')), "{when}");
        close_all_clean(&q);
    }
}

#[test]
fn pause_stops_the_copy_and_resume_goes_on() {
    let mut q = Qmp::new();
    let _src = mem_node(&mut q, "src", 4 * MIB, 1);
    let _tgt = mem_node(&mut q, "tgt", 4 * MIB, 0);
    let mut args = mirror_args("full");
    args["speed"] = json!(MIB);
    q.ok("blockdev-mirror", args);
    run_until(&q, "some progress", || {
        q.bl.registry()
            .find_job("m0")
            .is_some_and(|j| j.progress().0 > 0)
    });
    q.ok("job-pause", json!({"id": "m0"}));
    assert_eq!(
        q.err("job-pause", json!({"id": "m0"})),
        "Job is already paused"
    );
    run_until(&q, "paused", || status(&q, "m0") == "paused");
    let before = q.ok("query-jobs", json!({}))[0]["current-progress"].clone();
    let bj = q.ok("query-block-jobs", json!({}));
    assert_eq!(bj[0]["paused"], true);
    q.clock.advance(10_000_000_000);
    q.bl.executor().timers().fire_expired(10_000_000_000);
    q.settle();
    assert_eq!(q.ok("query-jobs", json!({}))[0]["current-progress"], before);
    q.ok("job-resume", json!({"id": "m0"}));
    assert_eq!(
        q.err("job-resume", json!({"id": "m0"})),
        "Can't resume a job that was not paused"
    );
    run_until(&q, "ready", || status(&q, "m0") == "ready");
    let j = q.ok("query-jobs", json!({}));
    assert_eq!(j[0]["current-progress"], j[0]["total-progress"]);
    assert_eq!(j[0]["total-progress"], 4 * MIB);
    q.ok("job-complete", json!({"id": "m0"}));
    run_until(&q, "done", || status(&q, "m0") == "gone");
}

#[test]
fn speed_limits_the_copy_on_simulated_time() {
    let mut q = Qmp::new();
    let src = mem_node(&mut q, "src", 4 * MIB, 1);
    let tgt = mem_node(&mut q, "tgt", 4 * MIB, 0);
    let mut args = mirror_args("full");
    args["speed"] = json!(2 * MIB);
    q.ok("blockdev-mirror", args);
    let t0 = crate::timer::Clock::now_ns(&*q.clock);
    run_until(&q, "ready", || status(&q, "m0") == "ready");
    let t = crate::timer::Clock::now_ns(&*q.clock) - t0;
    // 4 MiB at 2 MiB/s: about 2 s (the first slice's burst is free).
    assert!((1_800_000_000..=2_200_000_000).contains(&t), "took {t} ns");
    assert_eq!(q.ok("query-block-jobs", json!({}))[0]["speed"], 2 * MIB);
    q.ok("job-complete", json!({"id": "m0"}));
    run_until(&q, "done", || status(&q, "m0") == "gone");
    assert_eq!(mem_bytes(&src), mem_bytes(&tgt));
    let e = q
        .cmd("block-job-set-speed", json!({"device": "m0", "speed": 1}))
        .unwrap_err();
    assert_eq!(e.desc, "Block job 'm0' not found");
}

#[test]
fn set_speed_changes_a_running_limit() {
    let mut q = Qmp::new();
    mem_node(&mut q, "src", 8 * MIB, 1);
    mem_node(&mut q, "tgt", 8 * MIB, 0);
    let mut args = mirror_args("full");
    args["speed"] = json!(MIB);
    q.ok("blockdev-mirror", args);
    assert_eq!(
        q.err("block-job-set-speed", json!({"device": "m0", "speed": -1})),
        "Invalid parameter 'speed'"
    );
    run_until(&q, "1 s", || {
        crate::timer::Clock::now_ns(&*q.clock) >= 1_000_000_000
    });
    q.ok("block-job-set-speed", json!({"device": "m0", "speed": 0}));
    run_until(&q, "ready", || status(&q, "m0") == "ready");
    assert!(crate::timer::Clock::now_ns(&*q.clock) < 1_500_000_000);
    q.ok("job-cancel", json!({"id": "m0"}));
    run_until(&q, "gone", || status(&q, "m0") == "gone");
}

#[test]
fn sync_top_copies_only_what_the_source_holds_and_none_only_new_writes() {
    for sync in ["top", "none"] {
        let mut q = Qmp::new();
        q.ok(
            "blockdev-add",
            json!({"driver": "mem", "node-name": "src", "label": "src", "size": MIB, "unallocated": true}),
        );
        let src = node(&q, "src");
        let tgt = mem_node(&mut q, "tgt", MIB, 0);
        Env_fill(&tgt, 0xee);
        io_write(&mut q, "src", 128 * KIB, 64 * KIB, 0x11);
        q.ok("blockdev-mirror", mirror_args(sync));
        run_until(&q, "ready", || status(&q, "m0") == "ready");
        // Writes straight to the source after the start are mirrored too.
        let e = q.io("src", "write -P 0x33 600k 4k");
        assert!(e.contains("wrote"), "{e}");
        let filter = src.parents().iter().find_map(|p| p.parent_node()).unwrap();
        let b = guest(&q, "g2", &filter);
        q.bl.wait(b.write(512 * KIB, vec![0x22; 4096], ReqFlags::NONE))
            .unwrap()
            .unwrap();
        q.ok("job-complete", json!({"id": "m0"}));
        run_until(&q, "done", || status(&q, "m0") == "gone");
        let t = mem_bytes(&tgt);
        let old = if sync == "top" { 0x11 } else { 0xee };
        assert!(
            t[128 * 1024..192 * 1024].iter().all(|b| *b == old),
            "{sync}"
        );
        assert!(
            t[512 * 1024..516 * 1024].iter().all(|b| *b == 0x22),
            "{sync}"
        );
        assert!(
            t[600 * 1024..604 * 1024].iter().all(|b| *b == 0x33),
            "{sync}"
        );
        // Without a backing file, top is full (as in QEMU): holes are
        // copied as zeroes. None copies only the new write.
        let hole = if sync == "top" { 0 } else { 0xee };
        assert!(t[..128 * 1024].iter().all(|b| *b == hole), "{sync}");
        // The guest backend pivoted to the target.
        assert!(core::ptr::eq(&*b.root_node().unwrap(), &*tgt));
        close_all_clean(&q);
    }
}

#[allow(non_snake_case)]
fn Env_fill(n: &crate::graph::node::Node, byte: u8) {
    super::harness::Env::mem_driver(n)
        .data
        .borrow_mut()
        .fill(byte);
}

#[test]
fn error_policies_report_ignore_stop() {
    for policy in ["report", "ignore", "stop"] {
        let mut q = Qmp::new();
        let _src = mem_node(&mut q, "src", MIB, 4);
        let tgt = mem_node(&mut q, "tgt", MIB, 0);
        q.ok(
            "blockdev-add",
            json!({"driver": "blkdebug", "node-name": "dbg", "image": "src",
                   "inject-error": [{"event": "read_aio", "iotype": ["read"], "errno": 5,
                                     "sector": 256, "once": true}]}),
        );
        q.ok(
            "blockdev-add",
            json!({"driver": "blkdebug", "node-name": "tdbg", "image": "tgt",
                   "inject-error": [{"event": "write_aio", "iotype": ["write"], "errno": 28,
                                     "sector": 1024, "once": true}]}),
        );
        q.ok(
            "blockdev-mirror",
            json!({"job-id": "m0", "device": "dbg", "target": "tdbg", "sync": "full",
                   "granularity": 65536, "on-source-error": policy, "on-target-error": policy}),
        );
        match policy {
            "report" => {
                run_until(&q, "failure", || status(&q, "m0") == "gone");
                let ev = q.events();
                let e = event(&ev, "BLOCK_JOB_ERROR");
                assert_eq!(
                    *e,
                    json!({"device": "m0", "operation": "read", "action": "report"})
                );
                let c = event(&ev, "BLOCK_JOB_COMPLETED");
                assert_eq!(c["error"], "Input/output error");
                assert!(event_trail(&ev).contains(&"aborting".into()));
            }
            "ignore" => {
                run_until(&q, "ready", || status(&q, "m0") == "ready");
                let ev = q.events();
                let errs: alloc::vec::Vec<_> =
                    ev.iter().filter(|(n, _)| n == "BLOCK_JOB_ERROR").collect();
                assert_eq!(errs.len(), 2);
                assert_eq!(errs[1].1["operation"], "write");
                assert_eq!(errs[1].1["action"], "ignore");
                q.ok("job-complete", json!({"id": "m0"}));
                run_until(&q, "done", || status(&q, "m0") == "gone");
                assert_eq!(mem_bytes(&tgt), mem_bytes(&node(&q, "src")));
            }
            _ => {
                run_until(&q, "stopped", || status(&q, "m0") == "paused");
                let bj = q.ok("query-block-jobs", json!({}));
                assert_eq!(bj[0]["io-status"], "failed");
                let mut errors = q.events();
                // Resume until both injected errors were met and retried.
                for _ in 0..4 {
                    if status(&q, "m0") == "paused" {
                        q.ok("block-job-resume", json!({"device": "m0"}));
                        assert_eq!(q.ok("query-block-jobs", json!({}))[0]["io-status"], "ok");
                    }
                    run_until(&q, "stopped or ready", || {
                        matches!(status(&q, "m0").as_str(), "paused" | "ready")
                    });
                    errors.extend(q.events());
                }
                assert_eq!(status(&q, "m0"), "ready");
                let errs: alloc::vec::Vec<_> = errors
                    .iter()
                    .filter(|(n, _)| n == "BLOCK_JOB_ERROR")
                    .map(|(_, d)| d.clone())
                    .collect();
                assert!(
                    errs.contains(&json!({"device": "m0", "operation": "read", "action": "stop"}))
                );
                assert!(
                    errs.contains(&json!({"device": "m0", "operation": "write", "action": "stop"}))
                );
                q.ok("job-complete", json!({"id": "m0"}));
                run_until(&q, "done", || status(&q, "m0") == "gone");
                assert_eq!(mem_bytes(&tgt), mem_bytes(&node(&q, "src")));
            }
        }
        close_all_clean(&q);
    }
}

#[test]
fn close_all_during_a_running_mirror_leaves_no_node_open() {
    let mut q = Qmp::new();
    let src = mem_node(&mut q, "src", 4 * MIB, 8);
    let _tgt = mem_node(&mut q, "tgt", 4 * MIB, 0);
    let drv = guest(&q, "drv", &src);
    let _w = start_writer(&q, &drv, mem_bytes(&src), 1000, 4 * KIB, 3);
    let mut args = mirror_args("full");
    args["speed"] = json!(MIB);
    q.ok("blockdev-mirror", args);
    run_until(&q, "copying", || {
        q.bl.registry()
            .find_job("m0")
            .is_some_and(|j| j.progress().0 > 0)
    });
    let r = close_all_clean(&q);
    assert_eq!(r.jobs_cancelled, ["m0"]);
    let closed: alloc::vec::Vec<_> = r.nodes_closed.iter().map(|c| c.name.as_str()).collect();
    assert!(
        closed.contains(&"src") && closed.contains(&"tgt"),
        "{closed:?}"
    );
    assert!(closed.iter().any(|n| n.starts_with('#')), "{closed:?}");
}

#[test]
fn qmp_shapes_and_refusals() {
    let mut q = Qmp::new();
    mem_node(&mut q, "src", MIB, 1);
    mem_node(&mut q, "tgt", MIB, 0);
    mem_node(&mut q, "small", 4096, 0);
    let e = |q: &mut Qmp, mut a: serde_json::Value, k: &str, v: serde_json::Value| {
        a[k] = v;
        q.err("blockdev-mirror", a)
    };
    let a = mirror_args("full");
    assert_eq!(
        e(&mut q, a.clone(), "granularity", json!(256)),
        "Parameter 'granularity' expects a value in range [512B, 64MB]"
    );
    assert_eq!(
        e(&mut q, a.clone(), "granularity", json!(3 * 4096)),
        "Parameter 'granularity' expects a power of 2"
    );
    assert_eq!(
        e(&mut q, a.clone(), "speed", json!(-1)),
        "Invalid parameter 'speed'"
    );
    assert_eq!(
        e(&mut q, a.clone(), "target", json!("nope")),
        "Cannot find device='nope' nor node-name='nope'"
    );
    assert_eq!(
        e(&mut q, a.clone(), "target", json!("small")),
        "Source and target image have different sizes"
    );
    assert_eq!(
        e(&mut q, a.clone(), "target", json!("src")),
        "Can't mirror node into itself"
    );
    assert_eq!(
        e(&mut q, a.clone(), "job-id", json!("0bad")),
        "Invalid job ID '0bad'"
    );
    let mut b = a.clone();
    b.as_object_mut().unwrap().remove("job-id");
    // QEMU names the job after the node's backend; a node without one
    // gives the empty id, which job_create refuses.
    assert_eq!(q.err("blockdev-mirror", b), "Invalid job ID ''");
    // Refusals changed nothing.
    assert!(q.bl.registry().jobs().is_empty());
    assert_eq!(node(&q, "src").refcnt(), 1);
    assert!(q.events().is_empty());

    // auto-finalize/auto-dismiss false: pending until job-finalize,
    // concluded until job-dismiss.
    let mut a = mirror_args("none");
    a["auto-finalize"] = json!(false);
    a["auto-dismiss"] = json!(false);
    q.ok("blockdev-mirror", a.clone());
    assert_eq!(q.err("blockdev-mirror", a), "Need a root block node");
    assert_eq!(
        q.err(
            "blockdev-backup",
            json!({"job-id": "m0", "device": "small", "target": "src", "sync": "full"})
        ),
        "Job ID 'm0' already in use"
    );
    run_until(&q, "ready", || status(&q, "m0") == "ready");
    assert_eq!(
        q.err("job-finalize", json!({"id": "m0"})),
        "Job 'm0' in state 'ready' cannot accept command verb 'finalize'"
    );
    let bj = q.ok("query-block-jobs", json!({}));
    assert_eq!(
        bj[0],
        json!({"type": "mirror", "device": "m0", "len": 0, "offset": 0, "busy": false,
               "paused": false, "speed": 0, "io-status": "ok", "ready": true,
               "status": "ready", "auto-finalize": false, "auto-dismiss": false})
    );
    q.ok("job-complete", json!({"id": "m0"}));
    run_until(&q, "pending", || status(&q, "m0") == "pending");
    let ev = q.events();
    assert_eq!(
        *event(&ev, "BLOCK_JOB_PENDING"),
        json!({"type": "mirror", "id": "m0"})
    );
    q.ok("job-finalize", json!({"id": "m0"}));
    run_until(&q, "concluded", || status(&q, "m0") == "concluded");
    assert_eq!(
        q.ok("query-jobs", json!({})),
        json!([{"id": "m0", "type": "mirror", "status": "concluded",
                "current-progress": 0, "total-progress": 0}])
    );
    assert_eq!(
        q.err("job-cancel", json!({"id": "m0"})),
        "Job 'm0' in state 'concluded' cannot accept command verb 'cancel'"
    );
    q.ok("block-job-dismiss", json!({"id": "m0"}));
    assert_eq!(status(&q, "m0"), "gone");
    assert_eq!(q.err("job-dismiss", json!({"id": "m0"})), "Job not found");
    let e = q
        .cmd("block-job-pause", json!({"device": "m0"}))
        .unwrap_err();
    assert_eq!(e.class, crate::qmp::ErrorClass::DeviceNotActive);
    assert_eq!(e.desc, "Block job 'm0' not found");
    close_all_clean(&q);
}
