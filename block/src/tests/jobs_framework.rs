//! The job framework as the block jobs use it: manual finalize and
//! dismiss, cancel while pending, verbs refused in the wrong state, and a
//! mirror onto `null-co`.

use serde_json::json;

use super::harness::Qmp;
use super::jobs_util::*;
use crate::timer::Clock;

fn ready_mirror(q: &mut Qmp, extra: serde_json::Value) {
    mem_node(q, "src", MIB, 1);
    mem_node(q, "tgt", MIB, 0);
    let mut a = json!({"job-id": "m0", "device": "src", "target": "tgt", "sync": "full"});
    if let (Some(m), serde_json::Value::Object(e)) = (a.as_object_mut(), extra) {
        m.extend(e);
    }
    q.ok("blockdev-mirror", a);
    run_until(q, "ready", || status(q, "m0") == "ready");
    q.events();
}

#[test]
fn cancel_while_pending_aborts() {
    let mut q = Qmp::new();
    ready_mirror(&mut q, json!({"auto-finalize": false}));
    q.ok("block-job-complete", json!({"device": "m0"}));
    run_until(&q, "pending", || status(&q, "m0") == "pending");
    q.ok("job-cancel", json!({"id": "m0"}));
    run_until(&q, "gone", || status(&q, "m0") == "gone");
    assert_eq!(
        event_trail(&q.events()),
        [
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null"
        ]
    );
    // No pivot happened: the source is still where it was.
    assert_eq!(node(&q, "src").refcnt(), 1);
    assert_eq!(node(&q, "tgt").refcnt(), 1);
    close_all_clean(&q);
}

#[test]
fn block_job_finalize_and_dismiss() {
    let mut q = Qmp::new();
    ready_mirror(
        &mut q,
        json!({"auto-finalize": false, "auto-dismiss": false}),
    );
    q.ok("job-complete", json!({"id": "m0"}));
    run_until(&q, "pending", || status(&q, "m0") == "pending");
    q.ok("block-job-finalize", json!({"id": "m0"}));
    run_until(&q, "concluded", || status(&q, "m0") == "concluded");
    let bj = q.ok("query-block-jobs", json!({}));
    assert_eq!(bj[0]["status"], "concluded");
    assert_eq!(bj[0]["auto-dismiss"], false);
    q.ok("job-dismiss", json!({"id": "m0"}));
    assert_eq!(
        event_trail(&q.events()),
        [
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    close_all_clean(&q);
}

#[test]
fn verbs_refused_with_qemus_texts() {
    let mut q = Qmp::new();
    ready_mirror(&mut q, json!({}));
    q.ok("job-pause", json!({"id": "m0"}));
    run_until(&q, "standby", || status(&q, "m0") == "standby");
    assert_eq!(
        q.err("job-finalize", json!({"id": "m0"})),
        "Job 'm0' in state 'standby' cannot accept command verb 'finalize'"
    );
    assert_eq!(
        q.err("block-job-cancel", json!({"device": "m0"})),
        "The block job for device 'm0' is currently paused"
    );
    let bj = q.ok("query-block-jobs", json!({}));
    assert_eq!(bj[0]["paused"], true);
    assert_eq!(bj[0]["ready"], true);
    q.ok("job-resume", json!({"id": "m0"}));
    run_until(&q, "ready", || status(&q, "m0") == "ready");
    assert_eq!(
        q.err("job-dismiss", json!({"id": "m0"})),
        "Job 'm0' in state 'ready' cannot accept command verb 'dismiss'"
    );
    // The nodes of a job are busy for other jobs.
    assert_eq!(
        q.err(
            "blockdev-backup",
            json!({"job-id": "b0", "device": "tgt", "target": "src", "sync": "full"})
        ),
        "Node 'tgt' is busy: block device is in use by block job: mirror"
    );
    q.ok("block-job-cancel", json!({"device": "m0", "force": true}));
    run_until(&q, "gone", || status(&q, "m0") == "gone");
    assert!(event_trail(&q.events()).contains(&"BLOCK_JOB_CANCELLED".into()));
    close_all_clean(&q);
}

#[test]
fn complete_on_standby_pivots_after_resume() {
    let mut q = Qmp::new();
    ready_mirror(&mut q, json!({}));
    q.ok("job-pause", json!({"id": "m0"}));
    run_until(&q, "standby", || status(&q, "m0") == "standby");
    // QEMU 6.2+ accepts complete on standby; the job pivots once resumed.
    q.ok("job-complete", json!({"id": "m0"}));
    q.settle();
    assert_eq!(status(&q, "m0"), "standby");
    q.ok("job-resume", json!({"id": "m0"}));
    run_until(&q, "gone", || status(&q, "m0") == "gone");
    assert!(event_trail(&q.events()).contains(&"BLOCK_JOB_COMPLETED".into()));
    close_all_clean(&q);
}

#[test]
fn mirror_onto_null_co() {
    let mut q = Qmp::new();
    let src = mem_node(&mut q, "src", MIB, 3);
    q.ok(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "null", "size": MIB}),
    );
    let drv = guest(&q, "drv", &src);
    q.ok(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "src", "target": "null", "sync": "full", "speed": 4 * MIB}),
    );
    run_until(&q, "ready", || status(&q, "m0") == "ready");
    let ev = q.events();
    assert_eq!(event(&ev, "BLOCK_JOB_READY")["len"], MIB);
    q.ok("job-complete", json!({"id": "m0"}));
    run_until(&q, "gone", || status(&q, "m0") == "gone");
    assert_eq!(drv.root_node().unwrap().name(), "null");
    close_all_clean(&q);
}

#[test]
fn forced_cancel_abandons_requests_stuck_on_the_target() {
    for kind in ["mirror", "backup"] {
        let mut q = Qmp::new();
        mem_node(&mut q, "src", MIB, 1);
        q.ok(
            "blockdev-add",
            json!({"driver": "mem", "node-name": "tgt", "label": "tgt", "size": MIB, "gated": true}),
        );
        let cmd = if kind == "mirror" {
            "blockdev-mirror"
        } else {
            "blockdev-backup"
        };
        q.ok(
            cmd,
            json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}),
        );
        q.settle();
        assert!(super::mem::gate("tgt").waiting() > 0, "{kind}");
        let t0 = q.clock.now_ns();
        q.ok("job-cancel", json!({"id": "j"}));
        run_until(&q, "cancelled", || status(&q, "j") == "gone");
        assert!(
            event_trail(&q.events()).contains(&"BLOCK_JOB_CANCELLED".into()),
            "{kind}"
        );
        // Its writes had their grace period first.
        assert!(
            q.clock.now_ns() - t0 >= crate::jobs::copy::WRITE_GRACE_NS,
            "{kind}"
        );
        // The halt path closes everything although the target never answered.
        close_all_clean(&q);
    }
}

/// The job `kind` copying `src` to `tgt`, full.
fn start_copy(q: &mut Qmp, kind: &str) {
    let cmd = match kind {
        "mirror" => "blockdev-mirror",
        _ => "blockdev-backup",
    };
    q.ok(
        cmd,
        json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}),
    );
    q.settle();
}

#[test]
fn forced_cancel_lets_writes_in_flight_land() {
    // A qcow2 target whose file holds every request at a gate: a write
    // cut short between its refcount and L2 updates would leak clusters.
    for kind in ["mirror", "backup"] {
        let mut q = Qmp::new();
        mem_node(&mut q, "src", MIB, 1);
        q.ok(
            "blockdev-add",
            json!({"driver": "mem", "node-name": "tf", "label": "tf", "size": 64 * MIB, "gated": true}),
        );
        let gate = super::mem::gate("tf");
        gate.open();
        q.ok(
            "blockdev-create",
            json!({"job-id": "c", "options": {"driver": "qcow2", "file": "tf", "size": MIB}}),
        );
        run_until(&q, "create", || status(&q, "c") == "concluded");
        q.ok("job-dismiss", json!({"id": "c"}));
        q.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "tgt", "file": "tf"}),
        );
        gate.close();
        start_copy(&mut q, kind);
        assert!(gate.waiting() > 0, "{kind}");
        let t0 = q.clock.now_ns();
        q.ok("block-job-cancel", json!({"device": "j", "force": true}));
        q.settle();
        assert_ne!(status(&q, "j"), "gone", "{kind}: writes abandoned");
        gate.open();
        run_until(&q, "cancelled", || status(&q, "j") == "gone");
        assert_eq!(q.clock.now_ns(), t0, "{kind}: waited for a timer");
        assert!(
            event_trail(&q.events()).contains(&"BLOCK_JOB_CANCELLED".into()),
            "{kind}"
        );
        let r = super::qcow2::check(&q, "tgt");
        assert!(r.is_clean(), "{kind}: {r:?}");
        close_all_clean(&q);
    }
}

#[test]
fn forced_cancel_abandons_reads_at_once() {
    for kind in ["mirror", "backup"] {
        let mut q = Qmp::new();
        q.ok(
            "blockdev-add",
            json!({"driver": "mem", "node-name": "src", "label": "src", "size": MIB, "gated": true}),
        );
        mem_node(&mut q, "tgt", MIB, 0);
        start_copy(&mut q, kind);
        assert!(super::mem::gate("src").waiting() > 0, "{kind}");
        let t0 = q.clock.now_ns();
        q.ok("block-job-cancel", json!({"device": "j", "force": true}));
        run_until(&q, "cancelled", || status(&q, "j") == "gone");
        assert_eq!(q.clock.now_ns(), t0, "{kind}: waited for a timer");
        close_all_clean(&q);
    }
}

#[test]
fn mirror_events_on_the_qmp_wire() {
    use crate::qmp::{Session, VersionInfo};
    let mut q = Qmp::new();
    let mut s = Session::new(VersionInfo::new(7, 2, 0));
    let mut feed = |q: &mut Qmp, input: &str| -> alloc::vec::Vec<alloc::string::String> {
        let _ = s.feed(input.as_bytes(), &q.d, &mut q.bl);
        let out = alloc::string::String::from_utf8(s.take_output()).unwrap_or_default();
        out.split("\r\n")
            .filter(|l| !l.is_empty())
            .map(alloc::string::String::from)
            .collect()
    };
    feed(&mut q, r#"{"execute": "qmp_capabilities"}"#);
    for n in ["src", "tgt"] {
        let cmd = alloc::format!(
            r#"{{"execute": "blockdev-add", "arguments": {{"driver": "null-co", "node-name": "{n}", "size": 1048576}}}}"#
        );
        assert_eq!(feed(&mut q, &cmd), [r#"{"return": {}}"#]);
    }
    let out = feed(
        &mut q,
        r#"{"execute": "blockdev-mirror", "arguments": {"job-id": "m0", "device": "src", "target": "tgt", "sync": "full"}}"#,
    );
    assert_eq!(
        out.last().map(alloc::string::String::as_str),
        Some(r#"{"return": {}}"#)
    );
    run_until(&q, "ready", || status(&q, "m0") == "ready");
    let out = feed(&mut q, r#"{"execute": "query-block-jobs"}"#);
    let ready = out
        .iter()
        .find(|l| l.contains(r#""event": "BLOCK_JOB_READY""#))
        .expect("BLOCK_JOB_READY on the wire");
    assert!(
        ready.contains(
            r#""data": {"device": "m0", "len": 1048576, "offset": 1048576, "speed": 0, "type": "mirror"}"#
        ),
        "{ready}"
    );
    assert!(ready.contains(r#""timestamp": {"seconds": "#), "{ready}");
    let out = feed(
        &mut q,
        r#"{"execute": "job-complete", "arguments": {"id": "m0"}}"#,
    );
    assert_eq!(out, [r#"{"return": {}}"#]);
    run_until(&q, "gone", || status(&q, "m0") == "gone");
    let out = feed(&mut q, r#"{"execute": "query-jobs"}"#);
    assert!(
        out.iter()
            .any(|l| l.contains(r#""event": "BLOCK_JOB_COMPLETED""#)),
        "{out:?}"
    );
    assert_eq!(
        out.last().map(alloc::string::String::as_str),
        Some(r#"{"return": []}"#)
    );
}

#[test]
fn enospc_policy_stops_on_enospc_with_io_status_nospace() {
    let mut q = Qmp::new();
    let src = mem_node(&mut q, "src", MIB, 4);
    let tgt = mem_node(&mut q, "tgt", MIB, 0);
    q.ok(
        "blockdev-add",
        json!({"driver": "blkdebug", "node-name": "tdbg", "image": "tgt",
               "inject-error": [{"event": "write_aio", "iotype": ["write"], "errno": 28,
                                 "sector": 1024, "once": true}]}),
    );
    q.ok(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "src", "target": "tdbg", "sync": "full",
               "on-target-error": "enospc"}),
    );
    run_until(&q, "stopped", || status(&q, "m0") == "paused");
    let bj = q.ok("query-block-jobs", json!({}));
    assert_eq!(bj[0]["io-status"], "nospace");
    assert_eq!(
        *event(&q.events(), "BLOCK_JOB_ERROR"),
        json!({"device": "m0", "operation": "write", "action": "stop"})
    );
    q.ok("job-resume", json!({"id": "m0"}));
    run_until(&q, "ready", || status(&q, "m0") == "ready");
    q.ok("job-complete", json!({"id": "m0"}));
    run_until(&q, "gone", || status(&q, "m0") == "gone");
    assert_eq!(mem_bytes(&tgt), mem_bytes(&src));
    close_all_clean(&q);
}
