//! The job framework with a test job type.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::Cell;

use alloc::string::ToString;

use super::harness::Env;
use crate::graph::node::{Node, NodeState};
use crate::graph::permission::Perm;
use crate::io::{BoxFuture, ReqFlags};
use crate::job::{Job, JobDriver, JobError, JobFailure, JobOptions, JobStatus, RegistryJobs};

/// Writes one 512-byte block per millisecond through its backend, forever
/// or for `rounds` rounds.
pub struct TestJob {
    pub rounds: Option<u64>,
    pub done_rounds: Cell<u64>,
}

impl JobDriver for TestJob {
    fn job_type(&self) -> &str {
        "test"
    }
    fn run(self: Rc<Self>, job: Rc<Job>) -> BoxFuture<'static, Result<(), JobFailure>> {
        Box::pin(async move {
            let Some(b) = job.backends().first().cloned() else {
                return Err("no backend".into());
            };
            let mut i = 0u64;
            while !job.is_cancelled() {
                if self.rounds.is_some_and(|r| i >= r) {
                    break;
                }
                let off = (i * 512) % 4096;
                b.write(off, vec![i as u8; 512], ReqFlags::NONE)
                    .await
                    .map_err(|e| alloc::format!("{e}"))?;
                i += 1;
                self.done_rounds.set(i);
                job.set_progress(i, self.rounds.unwrap_or(0));
                job.sleep_ns(1_000_000).await;
            }
            Ok(())
        })
    }
}

pub fn start_test_job(env: &Env, id: &str, node: &Rc<Node>, rounds: Option<u64>) -> Rc<Job> {
    let drv = Rc::new(TestJob {
        rounds,
        done_rounds: Cell::new(0),
    });
    let job = env.reg.create_job(id, drv, JobOptions::default()).unwrap();
    job.add_backend(
        node,
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    )
    .unwrap();
    job.start();
    job
}

fn statuses(env: &Env) -> Vec<String> {
    env.events
        .drain()
        .into_iter()
        .map(|(n, d)| {
            if n == "JOB_STATUS_CHANGE" {
                d["status"].as_str().unwrap_or("?").into()
            } else {
                n
            }
        })
        .collect()
}

#[test]
fn cancelled_job_goes_through_aborting_and_releases_its_node() {
    let env = Env::new();
    let n = env.mem("n", 4096);
    env.reg.monitor_adopt(&n);
    let job = start_test_job(&env, "job0", &n, None);
    assert_eq!(n.refcnt(), 2);
    // Let it run a few rounds on simulated time.
    for _ in 0..5 {
        env.settle();
        env.tick(1_000_000);
    }
    assert_eq!(job.status(), JobStatus::Running);
    assert!(job.progress().0 >= 3);
    env.run(job.cancel_sync());
    assert_eq!(job.status(), JobStatus::Null);
    assert!(env.reg.jobs().is_empty());
    assert_eq!(n.refcnt(), 1);
    assert_eq!(
        statuses(&env),
        [
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null"
        ]
    );
    assert_eq!(n.state(), NodeState::Open);
}

#[test]
fn finished_job_goes_through_waiting_and_pending() {
    let env = Env::new();
    let n = env.mem("n", 4096);
    let job = start_test_job(&env, "j", &n, Some(2));
    env.run(async {
        job.sleep_ns(0).await;
    });
    while !matches!(job.status(), JobStatus::Null) {
        env.run(crate::exec::yield_now());
        env.tick(1_000_000);
    }
    assert_eq!(
        statuses(&env),
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
}

#[test]
fn verbs_follow_the_state_table() {
    let env = Env::new();
    let n = env.mem("n", 4096);
    let job = start_test_job(&env, "j", &n, None);
    env.settle();
    assert_eq!(
        job.complete().unwrap_err().to_string(),
        "Job 'j' in state 'running' cannot accept command verb 'complete'"
    );
    assert_eq!(job.resume().unwrap_err(), JobError::NotPaused);
    job.pause().unwrap();
    env.tick(1_000_000);
    env.settle();
    assert_eq!(job.status(), JobStatus::Paused);
    job.resume().unwrap();
    env.settle();
    assert_eq!(job.status(), JobStatus::Running);
    assert_eq!(
        job.dismiss().unwrap_err().to_string(),
        "Job 'j' in state 'running' cannot accept command verb 'dismiss'"
    );
    let e = env.reg.create_job(
        "j",
        Rc::new(TestJob {
            rounds: None,
            done_rounds: Cell::new(0),
        }),
        JobOptions::default(),
    );
    assert_eq!(e.err().unwrap().to_string(), "Job ID 'j' already in use");
    // A paused job is cancelled all the same.
    job.pause().unwrap();
    env.run(job.cancel_sync());
    assert!(env.reg.jobs().is_empty());
}

#[test]
fn cancelling_a_created_job_concludes_it_without_running() {
    let env = Env::new();
    let n = env.mem("n", 4096);
    let drv = Rc::new(TestJob {
        rounds: None,
        done_rounds: Cell::new(0),
    });
    let job = env
        .reg
        .create_job(
            "c",
            drv.clone(),
            JobOptions {
                auto_dismiss: false,
                speed: 0,
            },
        )
        .unwrap();
    job.add_backend(&n, Perm::WRITE, Perm::ALL).unwrap();
    job.cancel(false).unwrap();
    env.settle();
    assert_eq!(job.status(), JobStatus::Concluded);
    assert_eq!(drv.done_rounds.get(), 0);
    job.dismiss().unwrap();
    assert!(env.reg.jobs().is_empty());
    assert_eq!(n.refcnt(), 1);
}

#[test]
fn cancel_right_after_start_runs_the_job_once() {
    let env = Env::new();
    let n = env.mem("n", 4096);
    let job = start_test_job(&env, "j", &n, None);
    assert_eq!(job.status(), JobStatus::Created);
    job.cancel(false).unwrap();
    env.run(job.cancel_sync());
    assert_eq!(env.exec.task_count(), 0);
    assert_eq!(
        statuses(&env),
        [
            "created",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null"
        ]
    );
}
