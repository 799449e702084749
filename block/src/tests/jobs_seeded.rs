//! Seeded runs: a mirror or a backup with a guest writing, random
//! granularity, speed and write sizes, pauses at random moments; the
//! invariants (mirror target = source at pivot, backup target = source at
//! start, nothing left open) must hold for every seed. A failure names
//! its seed.

use serde_json::json;

use super::harness::Qmp;
use super::jobs_util::*;
use crate::timer::Clock;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[(self.next() % v.len() as u64) as usize]
    }
}

fn one_run(seed: u64) {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut q = Qmp::new();
    let size = r.pick(&[MIB, 2 * MIB, 3 * MIB]);
    let src = mem_node(&mut q, "src", size, (seed as u8) | 1);
    let tgt = mem_node(&mut q, "tgt", size, 0);
    let drv = guest(&q, "drv", &src);
    let snapshot = mem_bytes(&src);
    let wlen = r.pick(&[512, 4 * KIB, 64 * KIB]);
    let writes = r.pick(&[20, 100, 300]) as u32;
    let w = start_writer(&q, &drv, snapshot.clone(), writes, wlen, r.next());
    let speed = r.pick(&[0, MIB, 8 * MIB]);
    let mirror = r.next().is_multiple_of(2);
    if mirror {
        let g = r.pick(&[4 * KIB, 64 * KIB, 256 * KIB]);
        q.ok(
            "blockdev-mirror",
            json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                   "granularity": g, "speed": speed, "buf-size": r.pick(&[g, 4 * g, 16 * MIB])}),
        );
    } else {
        q.ok(
            "blockdev-backup",
            json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "speed": speed}),
        );
    }
    // A pause and a resume at random moments.
    let pause_at = q.clock.now_ns() + r.next() % 500_000_000;
    run_until(&q, "pause moment", || {
        q.clock.now_ns() >= pause_at || status(&q, "j") != "running"
    });
    if status(&q, "j") == "running" {
        q.ok("job-pause", json!({"id": "j"}));
        run_until(&q, "paused", || status(&q, "j") == "paused");
        q.clock.advance(r.next() % 300_000_000);
        q.ok("job-resume", json!({"id": "j"}));
    }
    if mirror {
        run_until(&q, "ready", || status(&q, "j") == "ready");
        run_until(&q, "writer", || w.done.get() == writes);
        q.ok("job-complete", json!({"id": "j"}));
        run_until(&q, "pivot", || status(&q, "j") == "gone");
        assert_eq!(mem_bytes(&tgt), *w.model.borrow(), "seed {seed}");
        assert!(
            core::ptr::eq(&*drv.root_node().unwrap(), &*tgt),
            "seed {seed}"
        );
    } else {
        run_until(&q, "backup", || status(&q, "j") == "gone");
        run_until(&q, "writer", || w.done.get() == writes);
        assert_eq!(mem_bytes(&tgt), snapshot, "seed {seed}");
        assert_eq!(mem_bytes(&src), *w.model.borrow(), "seed {seed}");
    }
    let ev = q.events();
    assert!(
        event_trail(&ev).contains(&"BLOCK_JOB_COMPLETED".into()),
        "seed {seed}"
    );
    assert!(
        !q.node_names().iter().any(|n| n.starts_with('#')),
        "seed {seed}"
    );
    close_all_clean(&q);
}

#[test]
fn seeded_mirror_and_backup_runs() {
    for seed in 1..=24 {
        one_run(seed);
    }
}

/// Halts (close-all) at a random moment while a random job runs and the
/// guest writes: every node closes, and the source holds every write
/// the guest saw acknowledged (QEMU's close-all promise).
fn one_halt(seed: u64) {
    let mut r = Rng(seed.wrapping_mul(0xd1b5_4a32_d192_ed03) | 1);
    let mut q = Qmp::new();
    let kind = r.pick(&["mirror", "backup", "stream", "commit"]);
    let (node_under_guest, mem_src) = match kind {
        "mirror" | "backup" => {
            let src = mem_node(&mut q, "src", 2 * MIB, 7);
            mem_node(&mut q, "tgt", 2 * MIB, 0);
            (src.clone(), Some(src))
        }
        _ => {
            qcow2(&mut q, "base", "f0", 2 * MIB, None);
            io_write(&mut q, "base", 0, MIB, 0x0a);
            let top = qcow2(&mut q, "top", "f1", 2 * MIB, Some("base"));
            (top, None)
        }
    };
    let drv = guest(&q, "drv", &node_under_guest);
    let model = match &mem_src {
        Some(s) => mem_bytes(s),
        None => read_all(&q, &node_under_guest),
    };
    let w = start_writer(&q, &drv, model, 10_000, 4 * KIB, r.next());
    let speed = r.pick(&[MIB, 4 * MIB]);
    match kind {
        "mirror" => q.ok(
            "blockdev-mirror",
            json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "speed": speed}),
        ),
        "backup" => q.ok(
            "blockdev-backup",
            json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "speed": speed}),
        ),
        "stream" => q.ok(
            "block-stream",
            json!({"job-id": "j", "device": "top", "speed": speed}),
        ),
        _ => q.ok(
            "block-commit",
            json!({"job-id": "j", "device": "top", "base-node": "base", "speed": speed}),
        ),
    };
    let halt_at = q.clock.now_ns() + r.next() % 3_000_000_000;
    run_until(&q, "halt moment", || q.clock.now_ns() >= halt_at);
    let report = close_all_clean(&q);
    assert!(
        report.jobs_cancelled.is_empty() || report.jobs_cancelled == ["j"],
        "seed {seed}"
    );
    if let Some(src) = mem_src {
        let got = mem_bytes(&src);
        let want = w.model.borrow();
        let skip = w.inflight.get();
        for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
            let i = i as u64;
            if skip.is_some_and(|(o, l)| i >= o && i < o + l) {
                continue;
            }
            assert_eq!(a, b, "seed {seed} ({kind}): byte {i}");
        }
    }
}

#[test]
fn seeded_halts_during_jobs() {
    for seed in 1..=24 {
        one_halt(seed);
    }
}
