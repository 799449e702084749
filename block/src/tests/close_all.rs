//! The close-all sequence.

use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

use super::harness::Env;
use super::job::start_test_job;
use crate::close_all::close_all;
use crate::graph::backend::BackendOptions;
use crate::graph::permission::Perm;
use crate::graph::registry::FlushOutcome;
use crate::io::{IoError, ReqFlags};
use crate::job::RegistryJobs;

#[test]
fn closes_format_before_its_file_and_flushes_it() {
    let env = Env::new();
    let file = env.mem("file", 4096);
    let fmt = env.fmt("fmt", &file).unwrap();
    env.reg.monitor_adopt(&fmt);
    let drv = env
        .reg
        .new_backend(
            BackendOptions {
                name: Some("drv".into()),
                ..Default::default()
            },
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::ALL,
        )
        .unwrap();
    drv.insert(&fmt).unwrap();
    env.run(drv.write(0, vec![0xcd; 512], ReqFlags::NONE))
        .unwrap();

    let report = env.run(close_all(&env.reg)).unwrap();
    assert_eq!(report.backends_ejected, ["drv"]);
    assert_eq!(report.monitor_refs_dropped, ["fmt"]);
    let order: Vec<_> = report
        .nodes_closed
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(order, ["fmt", "file"]);
    assert_eq!(report.nodes_closed[0].flush, FlushOutcome::Flushed);
    // The recording drivers prove it: fmt flushed and closed while its file
    // was still open, then the file closed.
    assert_eq!(
        env.log(),
        [
            "flush fmt",
            "flush file",
            "close fmt (file open: true)",
            "close file"
        ]
    );
    assert!(env.reg.nodes().is_empty());
    // The backend itself survives, empty.
    assert_eq!(env.run(drv.read(0, 1)), Err(IoError::Enomedium));
    let text = report.to_string();
    assert!(
        text.contains("closed node 'fmt' (recfmt): flushed"),
        "{text}"
    );
    assert!(text.ends_with("close-all: all 2 nodes closed"), "{text}");
}

#[test]
fn cancels_a_running_job_first() {
    let env = Env::new();
    let file = env.mem("file", 4096);
    let fmt = env.fmt("fmt", &file).unwrap();
    env.reg.monitor_adopt(&fmt);
    let job = start_test_job(&env, "job0", &fmt, None);
    for _ in 0..3 {
        env.tick(1_000_000);
    }
    assert!(job.progress().0 >= 2);
    let report = env.run(close_all(&env.reg)).unwrap();
    assert_eq!(report.jobs_cancelled, ["job0"]);
    assert!(env.reg.jobs().is_empty());
    let names: Vec<_> = env.events.drain().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"BLOCK_JOB_CANCELLED".to_string()));
    // The job's writes made fmt dirty; it was flushed when it closed, after
    // the job had let go of it.
    assert_eq!(report.nodes_closed[0].name, "fmt");
    assert_eq!(report.nodes_closed[0].flush, FlushOutcome::Flushed);
    assert!(env.log().iter().all(|l| !l.starts_with("USE-AFTER-CLOSE")));
    assert!(env.reg.nodes().is_empty());
}

#[test]
fn leaked_reference_fails_the_assertion() {
    let env = Env::new();
    let a = env.mem("a", 512);
    env.reg.monitor_adopt(&a);
    let leak = env.mem("leak", 512);
    env.reg.monitor_adopt(&leak);
    leak.ref_(); // a reference nobody will ever drop
    let err = env.run(close_all(&env.reg)).unwrap_err();
    assert_eq!(err.report.leaked, [("leak".to_string(), 1)]);
    assert_eq!(err.to_string(), "close-all left 1 node(s) open: leak");
    assert!(
        err.report
            .to_string()
            .ends_with("close-all: NODES LEFT OPEN: 'leak' (refcount 1)")
    );
    assert_eq!(err.report.nodes_closed.len(), 1);
}

#[test]
fn waits_for_requests_in_flight_and_quiesces_new_ones() {
    let env = Env::new();
    let n = env.mem("n", 4096);
    env.reg.monitor_adopt(&n);
    let gate = super::mem::Gate::closed();
    *Env::mem_driver(&n).gate.borrow_mut() = Some(gate.clone());
    let b = env
        .reg
        .new_backend(
            BackendOptions::default(),
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::ALL,
        )
        .unwrap();
    b.insert(&n).unwrap();
    let b1 = b.clone();
    let w = env
        .exec
        .spawn(async move { b1.write(0, vec![1; 512], ReqFlags::NONE).await });
    env.settle();
    let reg = env.reg.clone();
    let ca = env.exec.spawn(async move { close_all(&reg).await });
    env.settle();
    assert!(!ca.is_finished());
    let b2 = b.clone();
    let late = env.exec.spawn(async move { b2.read(0, 1).await });
    env.settle();
    gate.open();
    env.settle();
    assert_eq!(w.try_take(), Some(Ok(())));
    let report = ca.try_take().unwrap().unwrap();
    assert_eq!(report.nodes_closed[0].flush, FlushOutcome::Flushed);
    assert_eq!(late.try_take(), Some(Err(IoError::Enomedium)));
    assert!(report.backends_ejected[0].contains("unnamed"));
}
