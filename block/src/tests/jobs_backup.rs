//! `blockdev-backup`: the target is the source at job start while the
//! guest writes; sync modes; cancel; error policies; close-all.

use alloc::vec;

use serde_json::json;

use super::harness::Qmp;
use super::jobs_util::*;
use crate::io::{IoError, ReqFlags};
use crate::job::RegistryJobs;

#[test]
fn backup_full_is_the_point_in_time_while_the_guest_writes() {
    let mut q = Qmp::new();
    let src = mem_node(&mut q, "src", 4 * MIB, 6);
    let tgt = mem_node(&mut q, "tgt", 4 * MIB, 0);
    let drv = guest(&q, "drv", &src);
    let snapshot = mem_bytes(&src);
    q.ok(
        "blockdev-backup",
        json!({"job-id": "b0", "device": "src", "target": "tgt", "sync": "full", "speed": 2 * MIB}),
    );
    assert_eq!(drv.root_node().unwrap().driver_name(), "copy-before-write");
    let w = start_writer(&q, &drv, snapshot.clone(), 300, 4 * KIB, 5);
    run_until(&q, "backup", || status(&q, "b0") == "gone");
    assert!(w.done.get() > 100, "the guest wrote during the backup");
    run_until(&q, "writer", || w.done.get() == 300);
    assert_eq!(mem_bytes(&tgt), snapshot);
    assert_eq!(mem_bytes(&src), *w.model.borrow());
    assert!(core::ptr::eq(&*drv.root_node().unwrap(), &*src));
    assert_eq!(src.refcnt(), 2);
    let ev = q.events();
    assert_eq!(
        event_trail(&ev),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    let c = event(&ev, "BLOCK_JOB_COMPLETED");
    assert_eq!(c["type"], "backup");
    assert_eq!(c["len"], 4 * MIB);
    assert_eq!(c["offset"], 4 * MIB);
    close_all_clean(&q);
}

#[test]
fn sync_top_copies_the_top_layer_and_none_saves_only_overwritten_data() {
    for sync in ["top", "none"] {
        let mut q = Qmp::new();
        q.ok(
            "blockdev-add",
            json!({"driver": "mem", "node-name": "src", "label": "src", "size": MIB, "unallocated": true}),
        );
        let src = node(&q, "src");
        let tgt = mem_node(&mut q, "tgt", MIB, 0);
        super::harness::Env::mem_driver(&tgt)
            .data
            .borrow_mut()
            .fill(0xee);
        io_write(&mut q, "src", 128 * KIB, 128 * KIB, 0x11);
        let drv = guest(&q, "drv", &src);
        q.ok(
            "blockdev-backup",
            json!({"job-id": "b0", "device": "src", "target": "tgt", "sync": sync}),
        );
        // Overwrite allocated data and write where nothing was.
        q.bl.wait(drv.write(128 * 1024, vec![0x22; 4096], ReqFlags::NONE))
            .unwrap()
            .unwrap();
        q.bl.wait(drv.write(512 * 1024, vec![0x33; 4096], ReqFlags::NONE))
            .unwrap()
            .unwrap();
        if sync == "none" {
            q.settle();
            assert_eq!(status(&q, "b0"), "running");
            q.ok("job-cancel", json!({"id": "b0"}));
            run_until(&q, "cancel", || status(&q, "b0") == "gone");
            assert!(event_trail(&q.events()).contains(&"BLOCK_JOB_CANCELLED".into()));
        } else {
            run_until(&q, "backup", || status(&q, "b0") == "gone");
        }
        let t = mem_bytes(&tgt);
        // The old data of the overwritten cluster is in the target.
        assert!(
            t[128 * 1024..132 * 1024].iter().all(|b| *b == 0x11),
            "{sync}"
        );
        // With top, the rest of what the source held; with none, not.
        let rest = if sync == "top" { 0x11 } else { 0xee };
        assert!(
            t[192 * 1024..256 * 1024].iter().all(|b| *b == rest),
            "{sync}"
        );
        // Unallocated source data: skipped by top; none saves what was
        // there (zeroes) before the guest overwrote it.
        let unalloc = if sync == "top" { 0xee } else { 0 };
        assert!(
            t[512 * 1024..516 * 1024].iter().all(|b| *b == unalloc),
            "{sync}"
        );
        assert!(t[..128 * 1024].iter().all(|b| *b == 0xee), "{sync}");
        assert!(core::ptr::eq(&*drv.root_node().unwrap(), &*src));
        close_all_clean(&q);
    }
}

#[test]
fn cancel_and_pause_mid_copy() {
    let mut q = Qmp::new();
    let src = mem_node(&mut q, "src", 4 * MIB, 2);
    let _tgt = mem_node(&mut q, "tgt", 4 * MIB, 0);
    let drv = guest(&q, "drv", &src);
    q.ok(
        "blockdev-backup",
        json!({"job-id": "b0", "device": "src", "target": "tgt", "sync": "full", "speed": MIB}),
    );
    run_until(&q, "progress", || {
        q.bl.registry()
            .find_job("b0")
            .is_some_and(|j| j.progress().0 > 0)
    });
    q.ok("block-job-pause", json!({"device": "b0"}));
    run_until(&q, "paused", || status(&q, "b0") == "paused");
    // The guest still writes while the job is paused.
    q.bl.wait(drv.write(3 * MIB, vec![1; 4096], ReqFlags::NONE))
        .unwrap()
        .unwrap();
    q.ok("block-job-resume", json!({"device": "b0"}));
    q.settle();
    assert_eq!(status(&q, "b0"), "running");
    q.ok("block-job-cancel", json!({"device": "b0"}));
    run_until(&q, "cancel", || status(&q, "b0") == "gone");
    assert!(event_trail(&q.events()).ends_with(&[
        "aborting".into(),
        "BLOCK_JOB_CANCELLED".into(),
        "concluded".into(),
        "null".into()
    ]));
    assert!(core::ptr::eq(&*drv.root_node().unwrap(), &*src));
    assert!(!q.node_names().iter().any(|n| n.starts_with('#')));
    close_all_clean(&q);
}

#[test]
fn target_errors_fail_the_job_or_the_guest_write() {
    let mut q = Qmp::new();
    let src = mem_node(&mut q, "src", MIB, 2);
    mem_node(&mut q, "tgt", MIB, 0);
    q.ok(
        "blockdev-add",
        json!({"driver": "blkdebug", "node-name": "tdbg", "image": "tgt",
               "inject-error": [{"event": "write_aio", "iotype": ["write"], "errno": 5,
                                 "sector": 1536, "x-length": 65536}]}),
    );
    let drv = guest(&q, "drv", &src);
    q.ok(
        "blockdev-backup",
        json!({"job-id": "b0", "device": "src", "target": "tdbg", "sync": "full",
               "on-target-error": "stop", "filter-node-name": "cbw"}),
    );
    assert_eq!(drv.root_node().unwrap().name(), "cbw");
    // A guest write over a chunk that cannot be saved fails (QEMU's
    // on-cbw-error=break-guest-write) and changes nothing.
    let r =
        q.bl.wait(drv.write(768 * 1024, vec![9; 512], ReqFlags::NONE))
            .unwrap();
    assert_eq!(r, Err(IoError::Eio));
    run_until(&q, "stopped", || status(&q, "b0") == "paused");
    let ev = q.events();
    assert_eq!(
        *event(&ev, "BLOCK_JOB_ERROR"),
        json!({"device": "b0", "operation": "write", "action": "stop"})
    );
    assert_eq!(
        q.ok("query-block-jobs", json!({}))[0]["io-status"],
        "failed"
    );
    q.ok("job-cancel", json!({"id": "b0"}));
    run_until(&q, "cancel", || status(&q, "b0") == "gone");
    // The filter is gone: the guest writes anywhere again.
    q.bl.wait(drv.write(768 * 1024, vec![9; 512], ReqFlags::NONE))
        .unwrap()
        .unwrap();
    assert_eq!(
        q.err(
            "blockdev-backup",
            json!({"job-id": "b1", "device": "src", "target": "src", "sync": "full"})
        ),
        "Source and target cannot be the same"
    );
    assert_eq!(
        q.err(
            "blockdev-backup",
            json!({"job-id": "b1", "device": "src", "target": "tgt", "sync": "bitmap"})
        ),
        "must provide a valid bitmap name for 'bitmap' sync mode"
    );
    close_all_clean(&q);
}

#[test]
fn close_all_during_a_backup_leaves_no_node_open() {
    let mut q = Qmp::new();
    let src = mem_node(&mut q, "src", 4 * MIB, 2);
    mem_node(&mut q, "tgt", 4 * MIB, 0);
    let drv = guest(&q, "drv", &src);
    let _w = start_writer(&q, &drv, mem_bytes(&src), 1000, 4 * KIB, 9);
    q.ok(
        "blockdev-backup",
        json!({"job-id": "b0", "device": "src", "target": "tgt", "sync": "full", "speed": MIB}),
    );
    run_until(&q, "progress", || {
        q.bl.registry()
            .find_job("b0")
            .is_some_and(|j| j.progress().0 > 0)
    });
    let r = close_all_clean(&q);
    assert_eq!(r.jobs_cancelled, ["b0"]);
}

#[test]
fn ignored_read_errors_are_retried() {
    let mut q = Qmp::new();
    let src = mem_node(&mut q, "src", MIB, 5);
    let tgt = mem_node(&mut q, "tgt", MIB, 0);
    q.ok(
        "blockdev-add",
        json!({"driver": "blkdebug", "node-name": "dbg", "image": "src",
               "inject-error": [{"event": "read_aio", "iotype": ["read"], "errno": 5,
                                 "sector": 100, "once": true}]}),
    );
    q.ok(
        "blockdev-backup",
        json!({"job-id": "b0", "device": "dbg", "target": "tgt", "sync": "full",
               "on-source-error": "ignore"}),
    );
    run_until(&q, "backup", || status(&q, "b0") == "gone");
    let ev = q.events();
    assert_eq!(
        *event(&ev, "BLOCK_JOB_ERROR"),
        json!({"device": "b0", "operation": "read", "action": "ignore"})
    );
    assert!(event(&ev, "BLOCK_JOB_COMPLETED").get("error").is_none());
    assert_eq!(mem_bytes(&tgt), mem_bytes(&src));
    close_all_clean(&q);
}

#[test]
fn a_large_guest_write_is_saved_chunk_by_chunk() {
    let mut q = Qmp::new();
    let src = mem_node(&mut q, "src", 8 * MIB, 3);
    let tgt = mem_node(&mut q, "tgt", 8 * MIB, 0);
    let drv = guest(&q, "drv", &src);
    let before = mem_bytes(&src);
    q.ok(
        "blockdev-backup",
        json!({"job-id": "b0", "device": "src", "target": "tgt", "sync": "full", "speed": MIB}),
    );
    q.bl.wait(drv.write(MIB + 512, vec![0x61; 5 * MIB as usize], ReqFlags::NONE))
        .unwrap()
        .unwrap();
    run_until(&q, "backup", || status(&q, "b0") == "gone");
    assert_eq!(mem_bytes(&tgt), before);
    assert!(
        mem_bytes(&src)[MIB as usize + 512..6 * MIB as usize + 512]
            .iter()
            .all(|b| *b == 0x61)
    );
    close_all_clean(&q);
}
