//! `blockdev-backup` with dirty bitmaps (issue 15, point 5): QEMU's
//! argument checks, the bitmap busy while the job runs, incremental
//! backups that restore to the source, and the bitmap's final state per
//! `bitmap-mode` and outcome as in QEMU's iotest 257.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use serde_json::json;

use super::harness::Qmp;
use super::jobs_util::*;
use crate::graph::node::Node;
use crate::io::ReqFlags;

/// The dirty extents of bitmap `name` of `n`.
fn extents(n: &Node, name: &str) -> Vec<(u64, u64)> {
    let list = n.dirty_bitmaps();
    let b = &list.iter().find(|b| b.name == name).expect("bitmap").bitmap;
    let mut v = Vec::new();
    let mut at = 0;
    while let Some((o, l)) = b.next_dirty(at, u64::MAX) {
        v.push((o, l));
        at = o + l;
    }
    v
}

fn write(q: &Qmp, drv: &crate::graph::backend::Backend, off: u64, len: u64, byte: u8) {
    q.bl.wait(drv.write(off, vec![byte; len as usize], ReqFlags::NONE))
        .unwrap()
        .unwrap();
}

#[test]
fn bitmap_arguments_are_checked_as_qemu_does() {
    let mut q = Qmp::new();
    mem_node(&mut q, "src", MIB, 1);
    mem_node(&mut q, "tgt", MIB, 0);
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b0"}),
    );
    let cases = [
        (
            json!({"sync": "incremental"}),
            "must provide a valid bitmap name for 'bitmap' sync mode",
        ),
        (
            json!({"sync": "incremental", "bitmap": "b0", "bitmap-mode": "always"}),
            "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
        ),
        (
            json!({"sync": "bitmap", "bitmap": "b0"}),
            "Bitmap sync mode must be given when providing a bitmap",
        ),
        (
            json!({"sync": "full", "bitmap-mode": "always"}),
            "Cannot specify bitmap sync mode without a bitmap",
        ),
        (
            json!({"sync": "none", "bitmap": "b0", "bitmap-mode": "always"}),
            "sync mode 'none' does not produce meaningful bitmap outputs",
        ),
        (
            json!({"sync": "full", "bitmap": "b0", "bitmap-mode": "never"}),
            "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'",
        ),
        (
            json!({"sync": "bitmap", "bitmap": "nope", "bitmap-mode": "never"}),
            "Bitmap 'nope' could not be found",
        ),
    ];
    for (extra, text) in cases {
        let mut args = json!({"job-id": "j", "device": "src", "target": "tgt"});
        for (k, v) in extra.as_object().unwrap() {
            args[k] = v.clone();
        }
        assert_eq!(q.err("blockdev-backup", args.clone()), text, "{args}");
    }
    close_all_clean(&q);
}

/// A full backup that starts the bitmap, then two incrementals: the
/// full image with each incremental's chunks laid over it is the source
/// at the last one's start, byte for byte.
#[test]
fn a_full_and_two_incrementals_restore_the_source() {
    let mut q = Qmp::new();
    let src = mem_node(&mut q, "src", 4 * MIB, 3);
    let full = mem_node(&mut q, "full", 4 * MIB, 0);
    let inc1 = mem_node(&mut q, "inc1", 4 * MIB, 0);
    let inc2 = mem_node(&mut q, "inc2", 4 * MIB, 0);
    let drv = guest(&q, "drv", &src);
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "b0", "granularity": 65536}),
    );
    write(&q, &drv, 0, 4096, 0x01);
    // Full with the bitmap as output: afterwards it holds only what was
    // written during the job.
    q.ok(
        "blockdev-backup",
        json!({"job-id": "f", "device": "src", "target": "full", "sync": "full",
               "bitmap": "b0", "bitmap-mode": "on-success"}),
    );
    run_until(&q, "full", || status(&q, "f") == "gone");
    assert_eq!(extents(&src, "b0"), []);
    let mut restored = mem_bytes(&full);
    assert_eq!(restored, mem_bytes(&src));

    for (round, (inc, writes)) in [
        (&inc1, &[(100 * KIB, 8 * KIB), (3 * MIB, 1)][..]),
        (
            &inc2,
            &[(3 * MIB + 60 * KIB, 10 * KIB), (MIB, 64 * KIB)][..],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        for (i, &(off, len)) in writes.iter().enumerate() {
            write(&q, &drv, off, len, 0x40 + (round * 2 + i) as u8);
        }
        let dirty = extents(&src, "b0");
        let at_start = mem_bytes(&src);
        let id = alloc::format!("i{round}");
        q.ok(
            "blockdev-backup",
            json!({"job-id": id, "device": "src", "target": inc.name(),
                   "sync": "incremental", "bitmap": "b0", "speed": 64 * KIB}),
        );
        assert!(src.dirty_bitmaps()[0].busy);
        assert_eq!(
            q.err(
                "block-dirty-bitmap-clear",
                json!({"node": "src", "name": "b0"})
            ),
            "Bitmap 'b0' is currently in use by another operation and cannot be used"
        );
        // A write during the job: saved for this backup by the filter,
        // recorded for the next one.
        write(&q, &drv, 2 * MIB, 512, 0x77);
        run_until(&q, "incremental", || status(&q, &id) == "gone");
        assert_eq!(extents(&src, "b0"), [(2 * MIB, 64 * KIB)]);
        let got = mem_bytes(inc);
        for &(off, len) in &dirty {
            let r = off as usize..(off + len) as usize;
            restored[r.clone()].copy_from_slice(&got[r]);
        }
        assert_eq!(restored, at_start, "round {round}");
        // What the bitmap did not name was not copied.
        assert!(
            got[3 * MIB as usize - 4096..3 * MIB as usize]
                .iter()
                .all(|b| *b == 0)
        );
    }
    close_all_clean(&q);
}

/// iotest 257's matrix: `bitmap-mode` × outcome. The bitmap marks `A`
/// (64 KiB at 0, the 64 KiB at 512 KiB that the target cannot take);
/// `B` is written while the job runs.
#[test]
fn the_bitmap_after_success_failure_and_cancel_per_mode() {
    const A0: (u64, u64) = (0, 64 * KIB);
    const A1: (u64, u64) = (512 * KIB, 64 * KIB);
    const B: (u64, u64) = (MIB, 64 * KIB);
    for mode in ["on-success", "never", "always"] {
        for outcome in ["success", "failure", "cancel"] {
            let mut q = Qmp::new();
            let src = mem_node(&mut q, "src", 2 * MIB, 5);
            mem_node(&mut q, "tgt", 2 * MIB, 0);
            let mut args = json!({"job-id": "j", "device": "src", "target": "tgt",
                                  "sync": "bitmap", "bitmap": "b0", "bitmap-mode": mode,
                                  "speed": 64 * KIB});
            if outcome != "success" {
                // Writes to A1 fail; `failure` reports, `cancel` stops
                // and is cancelled there.
                q.ok(
                    "blockdev-add",
                    json!({"driver": "blkdebug", "node-name": "tdbg", "image": "tgt",
                           "inject-error": [{"event": "write_aio", "iotype": ["write"],
                                             "errno": 5, "sector": 1024,
                                             "x-length": 65536}]}),
                );
                args["target"] = "tdbg".into();
                args["on-target-error"] = if outcome == "failure" {
                    "report"
                } else {
                    "stop"
                }
                .into();
            }
            let drv = guest(&q, "drv", &src);
            q.ok(
                "block-dirty-bitmap-add",
                json!({"node": "src", "name": "b0", "granularity": 65536}),
            );
            write(&q, &drv, A0.0, 4096, 1);
            write(&q, &drv, A1.0, 4096, 2);
            q.ok("blockdev-backup", args);
            write(&q, &drv, B.0, 4096, 3);
            let label = alloc::format!("{mode}/{outcome}");
            if outcome == "cancel" {
                run_until(&q, "stopped", || status(&q, "j") == "paused");
                q.ok("job-cancel", json!({"id": "j"}));
            }
            run_until(&q, &label, || status(&q, "j") == "gone");
            let got = extents(&src, "b0");
            let expect: Vec<(u64, u64)> = match (mode, outcome) {
                ("on-success" | "always", "success") => vec![B],
                // Failed or cancelled and synced anyway: the writes made
                // meanwhile and what was not copied (A1, never A0).
                ("always", _) => vec![A1, B],
                _ => vec![A0, A1, B],
            };
            assert_eq!(got, expect, "{label}");
            assert!(!src.dirty_bitmaps()[0].busy, "{label}");
            assert!(src.dirty_bitmaps()[0].successor.is_none(), "{label}");
            let ev: Vec<String> = event_trail(&q.events());
            let ended = if outcome == "cancel" {
                "BLOCK_JOB_CANCELLED"
            } else {
                "BLOCK_JOB_COMPLETED"
            };
            assert!(ev.iter().any(|e| e == ended), "{label}: {ev:?}");
            close_all_clean(&q);
        }
    }
}

/// Image fleecing (QEMU's image-fleecing test): a `sync=none` backup into
/// an overlay whose backing file is the source itself. The guest keeps
/// writing the source (the job's target edge shares writes, as QEMU's
/// copy-before-write target does), and the overlay shows the source as it
/// was when the job started.
#[test]
fn fleecing_into_an_overlay_of_the_source() {
    use super::qcow2::{image, open};
    let mut q = Qmp::new();
    image(&mut q, "f0", 2 * MIB, json!({}));
    open(&mut q, "src", json!({"file": "f0"}));
    q.io("src", "write -P 0x21 0 1M");
    image(&mut q, "f1", 2 * MIB, json!({}));
    open(&mut q, "fleece", json!({"file": "f1", "backing": "src"}));
    let src = node(&q, "src");
    let drv = guest(&q, "drv", &src);
    q.ok(
        "blockdev-backup",
        json!({"job-id": "j", "device": "src", "target": "fleece", "sync": "none"}),
    );
    write(&q, &drv, 64 * KIB, 4096, 0x99);
    write(&q, &drv, MIB + 4096, 4096, 0x98);
    assert!(q.io("fleece", "read -P 0x21 0 1M").starts_with("read"));
    assert!(q.io("fleece", "read -P 0 1M 1M").starts_with("read"));
    assert!(q.io("src", "read -P 0x99 64k 4k").starts_with("read"));
    q.ok("job-cancel", json!({"id": "j"}));
    run_until(&q, "cancel", || status(&q, "j") == "gone");
    close_all_clean(&q);
}
