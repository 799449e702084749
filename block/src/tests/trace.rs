//! Trace events: the registry's wildcards, states and QEMU's errors, the
//! QMP commands, and what an enabled point prints.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::sync::atomic::AtomicBool;

use serde_json::json;

use super::harness::Qmp;
use crate::trace::{Registry, TraceState, glob};

const NAMES: [&str; 4] = ["nbd_a", "nbd_b", "nbdx", "job_a"];

fn states() -> [AtomicBool; 4] {
    [const { AtomicBool::new(false) }; 4]
}

fn names_states(r: &Registry<'_>, pattern: &str) -> Vec<(String, TraceState)> {
    r.get_state(pattern, None)
        .unwrap()
        .into_iter()
        .map(|e| (e.name.to_string(), e.state))
        .collect()
}

#[test]
fn glob_is_glibs_simple_pattern() {
    for (p, s, m) in [
        ("nbd_*", "nbd_receive_request", true),
        ("nbd_*", "nbd_", true),
        ("nbd_*", "nbdx", false),
        ("*", "", true),
        ("*request", "nbd_receive_request", true),
        ("*_co_*_read", "nbd_co_send_chunk_read", true),
        ("*_co_*_read", "nbd_co_send_chunk_read_hole", false),
        ("nbd_?", "nbd_a", true),
        ("nbd_?", "nbd_ab", false),
        ("a*b*c", "aXbYbZc", true),
        ("a*b*c", "aXbYbZ", false),
        ("exact", "exact", true),
        ("exact", "exactly", false),
    ] {
        assert_eq!(glob(p, s), m, "{p} ~ {s}");
    }
}

#[test]
fn set_and_get_by_name_and_by_pattern() {
    let st = states();
    let r = Registry::new(&NAMES, &[true; 4], &st);
    use TraceState::{Disabled, Enabled};
    assert_eq!(r.set_state("nbd_*", true, false, None).unwrap(), 2);
    // QEMU's order: the reverse of declaration.
    assert_eq!(
        names_states(&r, "*"),
        [
            ("job_a".into(), Disabled),
            ("nbdx".into(), Disabled),
            ("nbd_b".into(), Enabled),
            ("nbd_a".into(), Enabled)
        ]
    );
    r.set_state("nbd_b", false, false, None).unwrap();
    assert_eq!(names_states(&r, "nbd_b"), [("nbd_b".into(), Disabled)]);
    assert_eq!(names_states(&r, "nbd_a"), [("nbd_a".into(), Enabled)]);
    // A pattern that matches nothing is no error.
    assert!(names_states(&r, "virtio_*").is_empty());
    assert_eq!(r.set_state("virtio_*", true, false, None).unwrap(), 0);
}

#[test]
fn errors_are_qemus() {
    let st = states();
    let r = Registry::new(&NAMES, &[true, true, false, true], &st);
    let err = |res: Result<usize, crate::qmp::QmpError>| res.unwrap_err().desc.to_string();
    assert_eq!(
        err(r.set_state("nope", true, false, None)),
        "unknown event \"nope\""
    );
    // `?` alone does not make a pattern (QEMU looks for `*`).
    assert_eq!(
        err(r.set_state("nbd_?", true, false, None)),
        "unknown event \"nbd_?\""
    );
    assert_eq!(
        err(r.set_state("nbdx", true, false, None)),
        "event \"nbdx\" is disabled"
    );
    assert_eq!(
        err(r.set_state("nbd*", true, false, None)),
        "event \"nbdx\" is disabled"
    );
    assert_eq!(
        err(r.set_state("nbd_a", true, false, Some(0))),
        "event \"nbd_a\" is not vCPU-specific"
    );
    assert_eq!(
        err(r.set_state("nbd_a", true, false, Some(1))),
        "invalid vCPU index 1"
    );
    assert_eq!(
        err(r.set_state("nbd_a", true, false, Some(-1))),
        "invalid vCPU index 4294967295"
    );
    // Nothing was changed by a failed call.
    assert!(
        names_states(&r, "*")
            .iter()
            .all(|(_, s)| *s != TraceState::Enabled)
    );
    // ignore-unavailable skips the unavailable point and sets the rest.
    assert_eq!(r.set_state("nbd*", true, true, None).unwrap(), 2);
    assert_eq!(
        names_states(&r, "nbd*"),
        [
            ("nbdx".into(), TraceState::Unavailable),
            ("nbd_b".into(), TraceState::Enabled),
            ("nbd_a".into(), TraceState::Enabled)
        ]
    );
    // A pattern with a vCPU: no point is vCPU-specific, nothing matches.
    assert!(r.get_state("*", Some(0)).unwrap().is_empty());
    assert_eq!(r.set_state("*", false, true, Some(0)).unwrap(), 0);
    assert_eq!(
        r.get_state("nope", None).unwrap_err().desc,
        "unknown event \"nope\""
    );
}

static LINES: spin::Mutex<Vec<String>> = spin::Mutex::new(Vec::new());

fn collect(name: &'static str, args: core::fmt::Arguments<'_>) {
    LINES.lock().push(alloc::format!("{name} {args}"));
}

#[test]
fn qmp_commands_switch_the_appliances_points_and_only_enabled_ones_print() {
    crate::trace::set_sink(collect);
    let mut q = Qmp::new();
    let all = q.ok("trace-event-get-state", json!({"name": "*"}));
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), crate::trace::COUNT);
    for prefix in [
        "nbd_",
        "virtio_blk_",
        "virtio_scsi_",
        "virtio_net_",
        "job_",
        "bdrv_",
    ] {
        assert!(
            all.iter()
                .any(|e| e["name"].as_str().unwrap().starts_with(prefix)),
            "{prefix}"
        );
    }
    assert_eq!(
        q.ok("trace-event-get-state", json!({"name": "bdrv_close"})),
        json!([{"name": "bdrv_close", "state": "disabled", "vcpu": false}])
    );
    // Off: nothing printed.
    crate::trace!(bdrv_close, "bs {}", "off-probe");
    q.ok(
        "trace-event-set-state",
        json!({"name": "bdrv_clo*", "enable": true}),
    );
    assert_eq!(
        q.ok("trace-event-get-state", json!({"name": "bdrv_close"}))[0]["state"],
        "enabled"
    );
    crate::trace!(bdrv_close, "bs {}", "on-probe");
    q.ok(
        "trace-event-set-state",
        json!({"name": "bdrv_close", "enable": false}),
    );
    crate::trace!(bdrv_close, "bs {}", "off-again-probe");
    let lines = LINES.lock().clone();
    assert!(
        lines.contains(&"bdrv_close bs on-probe".to_string()),
        "{lines:?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("off-probe") || l.contains("off-again"))
    );
    assert_eq!(
        q.err(
            "trace-event-set-state",
            json!({"name": "no_such", "enable": true})
        ),
        "unknown event \"no_such\""
    );
    assert_eq!(
        q.err("trace-event-set-state", json!({"name": "bdrv_close"})),
        "Parameter 'enable' is missing"
    );
}

#[test]
fn loglevel_is_settable_at_run_time() {
    let mut q = Qmp::new();
    let before = log::max_level();
    q.ok("x-blockhaus-set-loglevel", json!({"level": "debug"}));
    assert_eq!(log::max_level(), log::LevelFilter::Debug);
    assert_eq!(
        q.ok("x-blockhaus-query-loglevel", json!({})),
        json!({"level": "debug"})
    );
    assert_eq!(
        q.err("x-blockhaus-set-loglevel", json!({"level": "loud"})),
        "Parameter 'level' does not accept value 'loud'"
    );
    assert_eq!(log::max_level(), log::LevelFilter::Debug);
    log::set_max_level(before);
}

#[test]
fn job_points_trace_transitions_verbs_and_completion() {
    use super::jobs_util::{MIB, mem_node, run_until, status};
    crate::trace::set_sink(collect);
    let mut q = Qmp::new();
    mem_node(&mut q, "tsrc", MIB, 3);
    mem_node(&mut q, "ttgt", MIB, 0);
    q.ok(
        "trace-event-set-state",
        json!({"name": "job_*", "enable": true}),
    );
    q.ok(
        "blockdev-backup",
        json!({"job-id": "trace-b0", "device": "tsrc", "target": "ttgt", "sync": "full", "auto-dismiss": false}),
    );
    run_until(&q, "backup", || status(&q, "trace-b0") == "concluded");
    q.ok("job-dismiss", json!({"id": "trace-b0"}));
    q.ok(
        "trace-event-set-state",
        json!({"name": "job_*", "enable": false}),
    );
    let lines: Vec<String> = LINES
        .lock()
        .iter()
        .filter(|l| l.contains("trace-b0"))
        .cloned()
        .collect();
    for want in [
        "job_state_transition job trace-b0 attempting allowed transition (created-->running)",
        "job_completed job trace-b0 ret 0",
        "job_state_transition job trace-b0 attempting allowed transition (pending-->concluded)",
        "job_apply_verb job trace-b0 in state concluded; applying verb dismiss (allowed)",
    ] {
        assert!(lines.iter().any(|l| l == want), "{want}: {lines:?}");
    }
}
