//! The block commands through the real QMP session: bytes in, bytes out.

use alloc::string::String;
use alloc::vec::Vec;

use super::harness::Qmp;
use super::job::TestJob;
use crate::graph::permission::Perm;
use crate::job::{JobOptions, RegistryJobs};
use crate::qmp::{Action, Session, VersionInfo};

fn exchange(q: &mut Qmp, s: &mut Session, input: &str) -> (Action, Vec<String>) {
    let action = s.feed(input.as_bytes(), &q.d, &mut q.bl);
    let out = String::from_utf8(s.take_output()).unwrap_or_default();
    (
        action,
        out.split("\r\n")
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
    )
}

#[test]
fn commands_errors_and_events_on_the_wire() {
    let mut q = Qmp::new();
    let mut s = Session::new(VersionInfo::new(7, 2, 0));
    let _ = s.greeting();
    let (_, out) = exchange(&mut q, &mut s, r#"{"execute": "qmp_capabilities"}"#);
    assert_eq!(out, [r#"{"return": {}}"#]);
    let (_, out) = exchange(
        &mut q,
        &mut s,
        r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n", "size": 4096}, "id": 1}"#,
    );
    assert_eq!(out, [r#"{"return": {}, "id": 1}"#]);
    let (_, out) = exchange(
        &mut q,
        &mut s,
        r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n"}, "id": 2}"#,
    );
    assert_eq!(
        out,
        [
            r#"{"id": 2, "error": {"class": "GenericError", "desc": "Duplicate nodes with node-name='n'"}}"#
        ]
    );
    let (_, out) = exchange(
        &mut q,
        &mut s,
        r#"{"execute": "human-monitor-command", "arguments": {"command-line": "qemu-io n \"read -P 0 0 512\""}}"#,
    );
    assert_eq!(out.len(), 1);
    assert!(
        out[0].starts_with(r#"{"return": "read 512/512 bytes at offset 0\r\n512 bytes, 1 ops; "#),
        "{}",
        out[0]
    );

    // A job started on the side raises events; cancelling it through QMP
    // puts them on the wire before the command's reply.
    let reg = q.bl.registry().clone();
    let node = reg.find_node("n").unwrap();
    let job = reg
        .create_job(
            "j0",
            alloc::rc::Rc::new(TestJob {
                rounds: None,
                done_rounds: Default::default(),
            }),
            JobOptions::default(),
        )
        .unwrap();
    job.add_backend(&node, Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL)
        .unwrap();
    job.start();
    q.settle();
    let (_, out) = exchange(&mut q, &mut s, r#"{"execute": "query-jobs"}"#);
    assert!(
        out[0].contains(r#""event": "JOB_STATUS_CHANGE""#),
        "{out:?}"
    );
    assert!(
        out.last().unwrap().contains(r#""status": "running""#),
        "{out:?}"
    );
    let (_, out) = exchange(
        &mut q,
        &mut s,
        r#"{"execute": "job-cancel", "arguments": {"id": "j0"}}"#,
    );
    assert_eq!(out, [r#"{"return": {}}"#]);
    let closing = q.bl.close_all().unwrap().unwrap();
    assert_eq!(closing.monitor_refs_dropped, ["n"]);
    let (action, out) = exchange(&mut q, &mut s, r#"{"execute": "quit"}"#);
    assert_eq!(action, Action::Quit);
    assert!(
        out.iter().any(|l| l.contains("BLOCK_JOB_CANCELLED")),
        "{out:?}"
    );
    assert_eq!(out.last().map(String::as_str), Some(r#"{"return": {}}"#));
}
