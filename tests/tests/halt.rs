//! Halt scenarios of issue 7: the appliance is stopped — by QMP `quit`, by
//! QEMU's `system_powerdown` (the ACPI power button) and by a fatal error
//! (a panic or a page fault inside a QMP command) — while jobs copy and
//! writers write, and afterwards the host checks that nothing was lost:
//! QEMU exits 0 (33 after a fatal error), every qcow2 image passes `qemu-img check` with no errors
//! and no leaks, every write the appliance acknowledged (plain, FUA, or
//! followed by a flush) is on the disk images where it belongs, and the
//! console's close-all report says every node was closed ("all N nodes
//! closed", nothing left open) and names every job that was still running
//! as cancelled.

use harness::host::{MIB, QemuIoSession, create, run};
use harness::qemu::FAILURE_EXIT_STATUS;
use harness::{Appliance, QemuConfig};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Halt {
    Quit,
    Powerdown,
    /// A fatal error: the appliance panics inside a QMP command
    /// (`x-blockhaus-panic`, there with `blockhaus.test-fault=panic-on-qmp`).
    Panic,
    /// A fatal error: a page fault inside a QMP command.
    PageFault,
}

/// The close-all report printed on the console, parsed.
#[derive(Debug)]
struct Report {
    jobs_cancelled: Vec<String>,
    /// Bytes the halt sequence wrote to the disks (metadata write-back,
    /// writes in flight).
    bytes_written: u64,
    /// Node names in closing order.
    closed: Vec<String>,
    /// N of "all N nodes closed".
    all_closed: usize,
    console: String,
}

impl Report {
    fn parse(console: &str) -> Report {
        let start = console
            .find("=== block layer closed ===")
            .unwrap_or_else(|| panic!("no close-all report:\n{console}"));
        let section = &console[start..];
        assert!(
            !console.contains("NODES LEFT OPEN") && !console.contains("close-all FAILED"),
            "close-all left nodes open:\n{console}"
        );
        let mut jobs = None;
        let mut closed = Vec::new();
        let mut all = None;
        for line in section.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("close-all: jobs cancelled: ") {
                jobs = Some(if rest == "none" {
                    Vec::new()
                } else {
                    rest.split(", ").map(String::from).collect()
                });
            } else if let Some(rest) = line.strip_prefix("close-all: closed node '") {
                closed.push(rest.split('\'').next().unwrap().to_string());
            } else if let Some(rest) = line.strip_prefix("close-all: all ") {
                all = rest
                    .strip_suffix(" nodes closed")
                    .and_then(|n| n.parse().ok());
                break;
            }
        }
        let all_closed = all.unwrap_or_else(|| panic!("no \"all N nodes closed\":\n{console}"));
        assert_eq!(all_closed, closed.len(), "{console}");
        // The halt sequence's summary: written bytes and elapsed time.
        let done = &section[section
            .find("=== halt sequence done ===")
            .unwrap_or_else(|| panic!("no halt sequence summary:\n{console}"))..];
        let bytes_written = done
            .lines()
            .find_map(|l| l.strip_prefix("bytes written to disks while halting: "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no bytes written line:\n{console}"));
        assert!(done.contains("halt sequence took "), "{console}");
        Report {
            jobs_cancelled: jobs.unwrap_or_else(|| panic!("no jobs line:\n{console}")),
            bytes_written,
            closed,
            all_closed,
            console: console.to_string(),
        }
    }

    fn pos(&self, node: &str) -> usize {
        self.closed
            .iter()
            .position(|n| n == node)
            .unwrap_or_else(|| panic!("node {node} not closed:\n{}", self.console))
    }

    /// `parent` closed before `child`.
    fn before(&self, parent: &str, child: &str) {
        assert!(
            self.pos(parent) < self.pos(child),
            "{parent} must close before {child}:\n{}",
            self.console
        );
    }
}

/// One acknowledged write, to be found on the host afterwards.
struct Write {
    pattern: u8,
    offset: u64,
    len: u64,
}

/// Writes through `node`: plain then flush, FUA, and plain (the halt path
/// flushes it); returns them for the host check.
fn writes(a: &mut Appliance, node: &str, list: &[(u8, u64, u64)]) -> Vec<Write> {
    let mut done = Vec::new();
    for (i, &(pattern, offset, len)) in list.iter().enumerate() {
        let fua = if i % 3 == 1 { "-f " } else { "" };
        let out = a.qemu_io(node, &format!("write {fua}-P {pattern:#x} {offset} {len}"));
        assert!(out.contains(&format!("wrote {len}/{len} bytes")), "{out}");
        if i % 3 == 0 {
            a.qemu_io(node, "flush");
        }
        done.push(Write {
            pattern,
            offset,
            len,
        });
    }
    done
}

/// Halts the appliance `how`, checks exit 0, the `SHUTDOWN` event's
/// reason and the close-all report; returns the report and every event
/// seen on the appliance's QMP.
fn halt(mut a: Appliance, how: Halt) -> (Report, Vec<Value>) {
    let reason = match how {
        Halt::Quit => {
            let r = a.qmp().execute("quit", Value::Null).unwrap();
            assert_eq!(r, json!({"return": {}}));
            "host-qmp-quit"
        }
        Halt::Powerdown => {
            a.qemu_monitor()
                .unwrap()
                .cmd("system_powerdown", Value::Null)
                .unwrap();
            "guest-shutdown"
        }
        Halt::Panic => {
            // No reply: the command never returns.
            a.qmp()
                .send_raw(b"{\"execute\": \"x-blockhaus-panic\"}\n")
                .unwrap();
            "guest-panic"
        }
        Halt::PageFault => {
            a.qmp()
                .send_raw(
                    b"{\"execute\": \"x-blockhaus-panic\", \"arguments\": {\"fault\": \"page-fault\"}}\n",
                )
                .unwrap();
            "guest-panic"
        }
    };
    // A QMP client reads while the appliance stops: everything it says
    // until the connection closes at poweroff.
    let q = a.qmp();
    q.set_timeout(Duration::from_secs(90)).unwrap();
    let mut events: Vec<Value> = q.events.drain(..).collect();
    while let Ok(v) = q.recv() {
        if v.get("event").is_some() {
            events.push(v);
        }
    }
    let status = a.wait_exit(Duration::from_secs(90));
    let console = a.console();
    let status = status.unwrap_or_else(|| panic!("QEMU did not exit:\n{console}"));
    // This client read everything: nothing may have been dropped for it.
    assert!(!console.contains("QMP client is not reading"), "{console}");
    if matches!(how, Halt::Panic | Halt::PageFault) {
        // The failure exit, after the whole sequence.
        assert_eq!(status.code(), Some(FAILURE_EXIT_STATUS), "{console}");
        let report = match how {
            Halt::Panic => "PANIC: ",
            _ => "EXCEPTION: vector 14 (#PF page fault)",
        };
        assert!(console.contains(report), "{console}");
        let panicked = events.iter().position(|e| e["event"] == "GUEST_PANICKED");
        let shutdown = events.iter().position(|e| e["event"] == "SHUTDOWN");
        assert!(panicked.is_some() && panicked < shutdown, "{events:?}");
        assert_eq!(events[panicked.unwrap()]["data"]["action"], "poweroff");
    } else {
        assert_eq!(status.code(), Some(0), "{console}");
    }
    let shutdown = events
        .iter()
        .find(|e| e["event"] == "SHUTDOWN")
        .unwrap_or_else(|| panic!("no SHUTDOWN event: {events:?}"));
    assert_eq!(shutdown["data"]["reason"], reason, "{shutdown}");
    assert!(console.contains(&format!("reason: {reason}")), "{console}");
    (Report::parse(&console), events)
}

/// Every job in `ids` was cancelled by the halt or had completed before.
fn jobs_accounted(report: &Report, events: &[Value], ids: &[&str]) {
    for id in ids {
        let completed = events
            .iter()
            .any(|e| e["event"] == "BLOCK_JOB_COMPLETED" && e["data"]["device"] == *id);
        assert!(
            report.jobs_cancelled.iter().any(|j| j == id) || completed,
            "job {id} neither cancelled nor completed:\n{}",
            report.console
        );
    }
}

fn node_count(a: &mut Appliance) -> usize {
    a.qmp()
        .cmd("query-named-block-nodes", json!({"flat": true}))
        .unwrap()
        .as_array()
        .unwrap()
        .len()
}

/// `qemu-io -f FMT` on a host image; panics on a failed command or a
/// pattern mismatch.
fn host_io(path: &Path, fmt: &str, cmds: &[String]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", fmt]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = run(cmd.arg(path));
    let lower = out.to_lowercase();
    assert!(
        !lower.contains("fail") && !lower.contains("error"),
        "qemu-io {cmds:?} on {}:\n{out}",
        path.display()
    );
}

fn present(path: &Path, fmt: &str, ws: &[Write]) {
    let reads: Vec<String> = ws
        .iter()
        .map(|w| format!("read -P {:#x} {} {}", w.pattern, w.offset, w.len))
        .collect();
    host_io(path, fmt, &reads);
}

/// `qemu-img check`: no errors and no leaks.
fn check_clean(path: &Path) {
    let out = run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path));
    assert!(
        out.contains("No errors were found on the image.") && !out.contains("leaked"),
        "qemu-img check {}:\n{out}",
        path.display()
    );
}

fn grow(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn qcow2(path: &Path, size: &str, backing: Option<&Path>) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if let Some(b) = backing {
        cmd.args(["-F", "qcow2", "-b"]).arg(b);
    }
    run(cmd.arg(path).arg(size));
}

/// A raw disk with 0x11 in its first 32 MiB.
fn raw_disk(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    create(&p, size);
    host_io(&p, "raw", &["write -P 0x11 0 32M".into()]);
    p
}

fn cfg(disks: Vec<PathBuf>, append: &str) -> QemuConfig {
    QemuConfig {
        disks,
        append: format!("blockhaus.test-fault=panic-on-qmp {append}"),
        ..QemuConfig::default()
    }
}

/// `$scenario` as three tests: halted by `quit`, by the power button and
/// by a panic.
macro_rules! three_halts {
    ($scenario:ident: $quit:ident, $powerdown:ident, $panic:ident) => {
        #[test]
        fn $quit() {
            $scenario(Halt::Quit);
        }

        #[test]
        fn $powerdown() {
            $scenario(Halt::Powerdown);
        }

        #[test]
        fn $panic() {
            $scenario(Halt::Panic);
        }
    };
}

// ---- scenarios ----

/// A mirror throttled by its `speed` is copying when the halt comes; the
/// guest writes through the source. The job is cancelled, all four nodes
/// (the job's filter too) close, and every acknowledged write is on the
/// source image.
fn throttled_mirror(how: Halt) {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_disk(dir.path(), "src.img", 64 * MIB);
    let tgt = dir.path().join("tgt.img");
    create(&tgt, 64 * MIB);
    let mut a = Appliance::boot(&cfg(
        vec![src.clone(), tgt],
        "--blockdev driver=virtio-blk,node-name=src,serial=disk0 \
         --blockdev driver=virtio-blk,node-name=tgt,serial=disk1 \
         --blockdev raw,node-name=top,file=src",
    ));
    let job = json!({"job-id": "m0", "device": "top", "target": "tgt", "sync": "full",
                     "speed": MIB, "filter-node-name": "mt0"});
    a.qmp().cmd("blockdev-mirror", job).unwrap();
    let mut ws = writes(
        &mut a,
        "mt0",
        &[(0xa1, 5 * MIB, MIB), (0xa2, 9 * MIB + 512, 300_000)],
    );
    // Through the source node itself (the mirror tracks it too).
    ws.extend(writes(
        &mut a,
        "top",
        &[(0xa3, 20 * MIB, 256 << 10), (0xa4, 50 * MIB, MIB)],
    ));
    assert_eq!(node_count(&mut a), 4);
    let (report, events) = halt(a, how);
    assert_eq!(report.jobs_cancelled, ["m0"], "{}", report.console);
    jobs_accounted(&report, &events, &["m0"]);
    assert_eq!(report.all_closed, 4, "{}", report.console);
    report.before("top", "src");
    present(&src, "raw", &ws);
    host_io(
        &src,
        "raw",
        &["read -P 0x11 0 5M".into(), "read -P 0 32M 18M".into()],
    );
}

three_halts!(
    throttled_mirror:
    quit_during_a_mirror_throttled_by_its_speed,
    powerdown_during_a_mirror_throttled_by_its_speed,
    panic_during_a_mirror_throttled_by_its_speed
);

/// The mirror's source is a `throttle` filter node in a `throttle-group`
/// made with `object-add`: the copy is slow because the group limits it,
/// and guest writes share the group's budget.
fn mirror_through_a_throttle_group(how: Halt) {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_disk(dir.path(), "src.img", 64 * MIB);
    let tgt = dir.path().join("tgt.img");
    create(&tgt, 64 * MIB);
    let mut a = Appliance::boot(&cfg(
        vec![src.clone(), tgt],
        "--blockdev driver=virtio-blk,node-name=src,serial=disk0 \
         --blockdev driver=virtio-blk,node-name=tgt,serial=disk1",
    ));
    a.qmp()
        .cmd(
            "object-add",
            json!({"qom-type": "throttle-group", "id": "tg0", "limits": {"bps-total": 4 * MIB}}),
        )
        .unwrap();
    a.qmp()
        .cmd(
            "blockdev-add",
            json!({"driver": "throttle", "node-name": "thr", "file": "src", "throttle-group": "tg0"}),
        )
        .unwrap();
    let job = json!({"job-id": "m1", "device": "thr", "target": "tgt", "sync": "full",
                     "filter-node-name": "mt1"});
    a.qmp().cmd("blockdev-mirror", job).unwrap();
    let ws = writes(
        &mut a,
        "mt1",
        &[
            (0xb1, 2 * MIB, 64 << 10),
            (0xb2, 30 * MIB - 4096, 128 << 10),
            (0xb3, 60 * MIB, 64 << 10),
        ],
    );
    let jobs = a.qmp().cmd("query-block-jobs", Value::Null).unwrap();
    assert_eq!(jobs[0]["device"], "m1", "{jobs}");
    assert_eq!(node_count(&mut a), 4);
    let (report, events) = halt(a, how);
    jobs_accounted(&report, &events, &["m1"]);
    assert_eq!(report.jobs_cancelled, ["m1"], "{}", report.console);
    assert_eq!(report.all_closed, 4, "{}", report.console);
    report.before("thr", "src");
    present(&src, "raw", &ws);
    host_io(&src, "raw", &["read -P 0x11 0 2M".into()]);
}

three_halts!(
    mirror_through_a_throttle_group:
    quit_during_a_mirror_through_a_throttle_group,
    powerdown_during_a_mirror_through_a_throttle_group,
    panic_during_a_mirror_through_a_throttle_group
);

/// A throttled backup is running while the guest writes the source: the
/// source has the new data, and the qcow2 target has the old data of
/// every region the guest overwrote (copy-before-write) and is clean.
fn backup_running(how: Halt) {
    let dir = tempfile::tempdir().unwrap();
    let src = raw_disk(dir.path(), "src.img", 64 * MIB);
    let tgt = dir.path().join("tgt.qcow2");
    qcow2(&tgt, "64M", None);
    grow(&tgt, 72 * MIB);
    let mut a = Appliance::boot(&cfg(
        vec![src.clone(), tgt.clone()],
        "--blockdev driver=virtio-blk,node-name=src,serial=disk0 \
         --blockdev driver=virtio-blk,node-name=tgt-file,serial=disk1 \
         --blockdev qcow2,node-name=tgt,file=tgt-file \
         --blockdev raw,node-name=top,file=src",
    ));
    let job = json!({"job-id": "b0", "device": "src", "target": "tgt", "sync": "full",
                     "speed": MIB, "filter-node-name": "cbw0"});
    a.qmp().cmd("blockdev-backup", job).unwrap();
    let ws = writes(
        &mut a,
        "top",
        &[
            (0xc1, 8 * MIB, MIB),
            (0xc2, 12 * MIB + 4096, 200_000),
            (0xc3, 24 * MIB, 2 * MIB),
            (0xc4, 31 * MIB, 64 << 10),
        ],
    );
    assert_eq!(node_count(&mut a), 5);
    let (report, events) = halt(a, how);
    jobs_accounted(&report, &events, &["b0"]);
    assert_eq!(report.jobs_cancelled, ["b0"], "{}", report.console);
    assert_eq!(report.all_closed, 5, "{}", report.console);
    report.before("top", "src");
    report.before("tgt", "tgt-file");
    present(&src, "raw", &ws);
    check_clean(&tgt);
    // The point in time of the job's start, where the guest overwrote it.
    let old: Vec<Write> = ws
        .iter()
        .map(|w| Write {
            pattern: 0x11,
            offset: w.offset,
            len: w.len,
        })
        .collect();
    present(&tgt, "qcow2", &old);
}

three_halts!(
    backup_running:
    quit_during_a_backup,
    powerdown_during_a_backup,
    panic_during_a_backup
);

#[test]
fn page_fault_during_a_backup() {
    backup_running(Halt::PageFault);
}

/// An unthrottled mirror or backup onto a fresh qcow2 image is allocating
/// clusters as fast as it can when `quit` comes, at a different moment in
/// each round. The cancelled job abandons its reads, but the writes it has
/// in flight land: a qcow2 write cut short between its refcount update and
/// its L2 update would leave leaked clusters, so the image must be clean.
#[test]
fn quit_while_a_job_allocates_on_a_qcow2_target() {
    for (round, delay_ms) in [20u64, 50, 90, 140].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        create(&src, 256 * MIB);
        host_io(&src, "raw", &["write -P 0x5a 0 256M".into()]);
        let tgt = dir.path().join("tgt.qcow2");
        qcow2(&tgt, "256M", None);
        grow(&tgt, 272 * MIB);
        let mut a = Appliance::boot(&cfg(
            vec![src, tgt.clone()],
            "--blockdev driver=virtio-blk,node-name=src,serial=disk0 \
             --blockdev driver=virtio-blk,node-name=tgt-file,serial=disk1 \
             --blockdev qcow2,node-name=tgt,file=tgt-file",
        ));
        let cmd = ["blockdev-mirror", "blockdev-backup"][round % 2];
        let job = json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full"});
        a.qmp().cmd(cmd, job).unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let (report, events) = halt(a, Halt::Quit);
        jobs_accounted(&report, &events, &["j"]);
        // The job's filter node too, if it was still running.
        let filters = report.jobs_cancelled.len();
        assert_eq!(report.all_closed, 3 + filters, "{}", report.console);
        eprintln!("round {round}: quit after {delay_ms} ms, {filters} job(s) cancelled");
        check_clean(&tgt);
    }
}

/// base.qcow2 (0x11 in its first 16 MiB) ← [mid.qcow2 (0x33 at 6 MiB)] ←
/// top.qcow2 (0x22 at 1 MiB), each on its own virtio-blk disk with room
/// to grow.
fn chain(dir: &Path, with_mid: bool) -> (Vec<PathBuf>, QemuConfig) {
    let base = dir.join("base.qcow2");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    qcow2(&base, "64M", None);
    host_io(&base, "qcow2", &["write -P 0x11 0 16M".into()]);
    let mut files = vec![base.clone()];
    let under_top = if with_mid {
        qcow2(&mid, "64M", Some(&base));
        host_io(&mid, "qcow2", &["write -P 0x33 6M 1M".into()]);
        files.push(mid.clone());
        mid
    } else {
        base
    };
    qcow2(&top, "64M", Some(&under_top));
    host_io(&top, "qcow2", &["write -P 0x22 1M 1M".into()]);
    files.push(top);
    for f in &files {
        grow(f, 96 * MIB);
    }
    let append = if with_mid {
        "--blockdev driver=virtio-blk,node-name=d0,serial=disk0 \
         --blockdev driver=virtio-blk,node-name=d1,serial=disk1 \
         --blockdev driver=virtio-blk,node-name=d2,serial=disk2 \
         --blockdev qcow2,node-name=base,file=d0 \
         --blockdev qcow2,node-name=mid,file=d1,backing=base \
         --blockdev qcow2,node-name=top,file=d2,backing=mid"
    } else {
        "--blockdev driver=virtio-blk,node-name=d0,serial=disk0 \
         --blockdev driver=virtio-blk,node-name=d1,serial=disk1 \
         --blockdev qcow2,node-name=base,file=d0 \
         --blockdev qcow2,node-name=top,file=d1,backing=base"
    };
    (files.clone(), cfg(files, append))
}

/// What the guest sees through `top` after the writes `ws`, read on the
/// host through the chain.
fn chain_view(top: &Path, with_mid: bool, ws: &[Write]) {
    let mut reads = vec![
        "read -P 0x11 0 1M".to_string(),
        "read -P 0x22 1M 1M".into(),
        "read -P 0x11 2M 1M".into(),
        "read -P 0 48M 16M".into(),
    ];
    if with_mid {
        reads.push("read -P 0x33 6M 1M".into());
    }
    host_io(top, "qcow2", &reads);
    present(top, "qcow2", ws);
}

const CHAIN_WRITES: [(u8, u64, u64); 4] = [
    (0xd1, 3 * MIB, MIB),
    (0xd2, 10 * MIB + 512, 100_000),
    (0xd3, 20 * MIB, MIB),
    (0xd4, 40 * MIB, 64 << 10),
];

/// A throttled `block-stream` is pulling the base into the top while the
/// guest writes the top; both images are consistent afterwards and the
/// chain reads as the guest left it.
fn stream_running(how: Halt) {
    let dir = tempfile::tempdir().unwrap();
    let (files, cfg) = chain(dir.path(), false);
    let mut a = Appliance::boot(&cfg);
    a.qmp()
        .cmd(
            "block-stream",
            json!({"job-id": "s0", "device": "top", "speed": MIB, "filter-node-name": "sf0"}),
        )
        .unwrap();
    // Through the job's filter, where the stream moved the top's users
    // (it takes every write of the top, as QEMU's).
    let ws = writes(&mut a, "sf0", &CHAIN_WRITES);
    let (report, events) = halt(a, how);
    jobs_accounted(&report, &events, &["s0"]);
    assert_eq!(report.jobs_cancelled, ["s0"], "{}", report.console);
    assert_eq!(report.all_closed, 5, "{}", report.console);
    report.before("top", "base");
    report.before("base", "d0");
    check_clean(&files[0]);
    check_clean(&files[1]);
    chain_view(&files[1], false, &ws);
}

three_halts!(
    stream_running:
    quit_during_a_stream,
    powerdown_during_a_stream,
    panic_during_a_stream
);

/// A throttled active `block-commit` of the top into the base is running
/// while the guest writes the top.
fn active_commit_running(how: Halt) {
    let dir = tempfile::tempdir().unwrap();
    let (files, cfg) = chain(dir.path(), false);
    let mut a = Appliance::boot(&cfg);
    a.qemu_io("top", "write -P 0x44 16M 8M");
    a.qmp()
        .cmd(
            "block-commit",
            json!({"job-id": "c0", "device": "top", "speed": MIB, "filter-node-name": "ct0"}),
        )
        .unwrap();
    let ws = writes(&mut a, "top", &CHAIN_WRITES);
    assert_eq!(node_count(&mut a), 5);
    let (report, events) = halt(a, how);
    jobs_accounted(&report, &events, &["c0"]);
    assert_eq!(report.jobs_cancelled, ["c0"], "{}", report.console);
    assert_eq!(report.all_closed, 5, "{}", report.console);
    check_clean(&files[0]);
    check_clean(&files[1]);
    chain_view(&files[1], false, &ws);
    host_io(&files[1], "qcow2", &["read -P 0x44 21M 3M".into()]);
}

three_halts!(
    active_commit_running:
    quit_during_an_active_commit,
    powerdown_during_an_active_commit,
    panic_during_an_active_commit
);

/// A throttled intermediate `block-commit` (mid into base) under a top
/// the guest keeps writing.
fn intermediate_commit_running(how: Halt) {
    let dir = tempfile::tempdir().unwrap();
    let (files, cfg) = chain(dir.path(), true);
    let mut a = Appliance::boot(&cfg);
    a.qmp()
        .cmd(
            "block-commit",
            json!({"job-id": "c1", "device": "top", "top-node": "mid", "base-node": "base",
                   "speed": 256 << 10, "filter-node-name": "cf1"}),
        )
        .unwrap();
    let ws = writes(&mut a, "top", &CHAIN_WRITES);
    let (report, events) = halt(a, how);
    jobs_accounted(&report, &events, &["c1"]);
    assert_eq!(report.jobs_cancelled, ["c1"], "{}", report.console);
    // The job's commit_top filter (cf1) was between top and mid.
    assert_eq!(report.all_closed, 7, "{}", report.console);
    report.before("top", "mid");
    report.before("cf1", "mid");
    report.before("mid", "base");
    check_clean(&files[0]);
    check_clean(&files[1]);
    check_clean(&files[2]);
    chain_view(&files[2], true, &ws);
}

three_halts!(
    intermediate_commit_running:
    quit_during_an_intermediate_commit,
    powerdown_during_an_intermediate_commit,
    panic_during_an_intermediate_commit
);

/// QEMU iotest 117: a qcow2 node over a disk node that has other users
/// too — the monitor's reference, a read-only `raw` parent, and qemu-io
/// readers of the disk node — all in use at the halt. The qcow2 node
/// closes (and flushes its metadata) before the disk node under it.
fn iotest_117(how: Halt) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.qcow2");
    qcow2(&img, "64M", None);
    host_io(&img, "qcow2", &["write -P 0x11 0 1M".into()]);
    grow(&img, 80 * MIB);
    let mut a = Appliance::boot(&cfg(
        vec![img.clone()],
        "--blockdev driver=virtio-blk,node-name=file0,serial=disk0",
    ));
    a.qmp()
        .cmd(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "fmt0", "file": "file0"}),
        )
        .unwrap();
    a.qmp()
        .cmd(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "peek0", "file": "file0", "read-only": true}),
        )
        .unwrap();
    let mut ws = writes(
        &mut a,
        "fmt0",
        &[
            (0x22, MIB, 2 * MIB),
            (0x33, 3000, 5000),
            (0x44, 60 * MIB, 4 * MIB),
        ],
    );
    // The second users read the disk under the qcow2 node meanwhile.
    a.qemu_io("peek0", "read 0 64k");
    a.qemu_io("file0", "read 0 4k");
    ws.extend(writes(&mut a, "fmt0", &[(0x55, 10 * MIB, 100_000)]));
    // Last, a plain write into a new cluster: its L2 entry is only in the
    // qcow2 node's cache until the halt writes it back.
    let out = a.qemu_io("fmt0", "write -P 0x66 16M 64k");
    assert!(out.contains("wrote 65536/65536 bytes"), "{out}");
    ws.push(Write {
        pattern: 0x66,
        offset: 16 * MIB,
        len: 64 << 10,
    });
    let (report, events) = halt(a, how);
    jobs_accounted(&report, &events, &[]);
    assert!(report.jobs_cancelled.is_empty(), "{}", report.console);
    assert_eq!(report.all_closed, 3, "{}", report.console);
    assert!(report.bytes_written > 0, "{}", report.console);
    report.before("fmt0", "file0");
    report.before("peek0", "file0");
    check_clean(&img);
    present(&img, "qcow2", &ws);
    host_io(
        &img,
        "qcow2",
        &[
            "read -P 0x11 0 3000".into(),
            "read -P 0x11 8000 1040576".into(),
            "read -P 0 20M 40M".into(),
        ],
    );
}

three_halts!(
    iotest_117:
    quit_with_iotest_117_qcow2_over_a_shared_disk_node,
    powerdown_with_iotest_117_qcow2_over_a_shared_disk_node,
    panic_with_iotest_117_qcow2_over_a_shared_disk_node
);

/// A quorum of three virtio-blk disks; one child is removed at runtime
/// with `x-blockdev-change` and the writes go on. The two remaining
/// children have every write; the removed one has the writes from before
/// its removal and, being a free node again, a write of its own.
fn quorum_child_removed(how: Halt) {
    let dir = tempfile::tempdir().unwrap();
    let disks: Vec<PathBuf> = (0..3)
        .map(|i| raw_disk(dir.path(), &format!("q{i}.img"), 32 * MIB))
        .collect();
    let mut a = Appliance::boot(&cfg(
        disks.clone(),
        "--blockdev driver=virtio-blk,node-name=d0,serial=disk0 \
         --blockdev driver=virtio-blk,node-name=d1,serial=disk1 \
         --blockdev driver=virtio-blk,node-name=d2,serial=disk2",
    ));
    a.qmp()
        .cmd(
            "blockdev-add",
            json!({"driver": "quorum", "node-name": "q0", "vote-threshold": 2,
                   "children": ["d0", "d1", "d2"]}),
        )
        .unwrap();
    let before = writes(
        &mut a,
        "q0",
        &[
            (0xe1, MIB, MIB),
            (0xe2, 4 * MIB + 512, 70_000),
            (0xe3, 8 * MIB, 4096),
        ],
    );
    a.qmp()
        .cmd(
            "x-blockdev-change",
            json!({"parent": "q0", "child": "children.2"}),
        )
        .unwrap();
    let after = writes(
        &mut a,
        "q0",
        &[
            (0xe4, 12 * MIB, MIB),
            (0xe5, 16 * MIB + 4096, 8192),
            (0xe6, 20 * MIB, 300_000),
        ],
    );
    a.qemu_io("q0", "read -P 0xe4 12M 1M");
    let own = writes(&mut a, "d2", &[(0xe7, 24 * MIB, MIB)]);
    let (report, events) = halt(a, how);
    jobs_accounted(&report, &events, &[]);
    assert_eq!(report.all_closed, 4, "{}", report.console);
    report.before("q0", "d0");
    report.before("q0", "d1");
    for d in &disks[..2] {
        present(d, "raw", &before);
        present(d, "raw", &after);
        host_io(d, "raw", &["read -P 0x11 24M 1M".into()]);
    }
    present(&disks[2], "raw", &before);
    present(&disks[2], "raw", &own);
    // Not a byte of the writes after the removal reached the removed child.
    host_io(
        &disks[2],
        "raw",
        &[
            "read -P 0x11 12M 1M".into(),
            "read -P 0x11 16M 16K".into(),
            "read -P 0x11 20M 1M".into(),
        ],
    );
}

three_halts!(
    quorum_child_removed:
    quit_with_a_quorum_child_removed_at_runtime,
    powerdown_with_a_quorum_child_removed_at_runtime,
    panic_with_a_quorum_child_removed_at_runtime
);

/// Eight NBD clients are writing, each its own region, when the halt
/// comes: the export closes first, and every write a client saw
/// acknowledged (plain or FUA) is on the disk image afterwards.
fn eight_nbd_clients_writing(how: Halt) {
    const CLIENTS: u64 = 8;
    const WRITES: u64 = 64;
    const CHUNK: u64 = 128 << 10;
    let dir = tempfile::tempdir().unwrap();
    let img = raw_disk(dir.path(), "disk.img", 64 * MIB);
    let port = harness::qemu::free_port();
    let mut c = cfg(
        vec![img.clone()],
        "--blockdev driver=virtio-blk,node-name=d0,serial=disk0 \
         --nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809 \
         --export type=nbd,id=e0,node-name=d0,name=disk,writable=on",
    );
    c.nbd_port = Some(port);
    let a = Appliance::boot(&c);
    let pattern = |client: u64, n: u64| 0x40 + (client * WRITES + n) as u8 % 0xb0;
    // Acknowledged writes, per client.
    let acks: std::sync::Arc<Vec<std::sync::atomic::AtomicU64>> =
        std::sync::Arc::new((0..CLIENTS).map(|_| Default::default()).collect());
    // Connected one after another (see `QemuIoSession`), then each sends
    // its writes and counts the acknowledgements as they come.
    let sessions: Vec<_> = (0..CLIENTS)
        .map(|_| QemuIoSession::open(&["-f", "raw"], &format!("nbd://127.0.0.1:{port}/disk"), 120))
        .collect();
    let clients: Vec<_> = (0..CLIENTS)
        .zip(sessions)
        .map(|(i, mut session)| {
            let acks = acks.clone();
            std::thread::spawn(move || {
                let cmds: Vec<String> = (0..WRITES)
                    .map(|n| {
                        let fua = if n % 2 == 1 { "-f " } else { "" };
                        let off = i * 8 * MIB + n * CHUNK;
                        format!("write {fua}-P {:#x} {off} {CHUNK}", pattern(i, n))
                    })
                    .collect();
                session.send(&cmds);
                session
                    .finish_streaming(|line| {
                        if line.contains("wrote ") {
                            acks[i as usize].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    })
                    .1
            })
        })
        .collect();
    // The halt comes once every client is under way.
    let start = std::time::Instant::now();
    while acks
        .iter()
        .any(|n| n.load(std::sync::atomic::Ordering::SeqCst) == 0)
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the clients never got going"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (report, _events) = halt(a, how);
    assert_eq!(report.all_closed, 1, "{}", report.console);
    assert!(
        report
            .console
            .lines()
            .any(|l| l.trim_end() == "exports closed: e0"),
        "{}",
        report.console
    );
    let mut acked = Vec::new();
    for (i, t) in clients.into_iter().enumerate() {
        let out = t.join().unwrap();
        for n in 0..WRITES {
            let off = i as u64 * 8 * MIB + n * CHUNK;
            if out.contains(&format!("wrote {CHUNK}/{CHUNK} bytes at offset {off}\n")) {
                acked.push(Write {
                    pattern: pattern(i as u64, n),
                    offset: off,
                    len: CHUNK,
                });
            }
        }
    }
    eprintln!(
        "{how:?}: {} of {} writes acknowledged before the halt",
        acked.len(),
        CLIENTS * WRITES
    );
    present(&img, "raw", &acked);
}

three_halts!(
    eight_nbd_clients_writing:
    quit_while_eight_nbd_clients_write,
    powerdown_while_eight_nbd_clients_write,
    panic_while_eight_nbd_clients_write
);

/// QEMU iotest 140 before the halt: a legacy `nbd-server-add` export on a
/// named backend (`--drive`) whose medium is then ejected, which deletes
/// the export. The halt still closes every node, the write made through
/// the export is on the disk, and a client gets no export afterwards.
fn ejected_under_an_export(how: Halt) {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_disk(dir.path(), "disk.img", 64 * MIB);
    let port = harness::qemu::free_port();
    let mut c = cfg(
        vec![img.clone()],
        "--blockdev driver=virtio-blk,node-name=d0,serial=disk0 --drive id=drv,node-name=d0 \
         --nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809",
    );
    c.nbd_port = Some(port);
    let mut a = Appliance::boot(&c);
    a.qmp()
        .cmd("nbd-server-add", json!({"device": "drv", "writable": true}))
        .unwrap();
    let uri = format!("nbd://127.0.0.1:{port}/drv");
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x77 1M 64k", "-c", "flush"])
        .arg(&uri));
    assert!(out.contains("wrote 65536/65536 bytes"), "{out}");
    a.qmp().cmd("eject", json!({"device": "drv"})).unwrap();
    let ev = a
        .qmp()
        .wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(20))
        .unwrap();
    assert_eq!(ev["data"]["id"], "drv");
    let gone = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read 0 512"])
        .arg(&uri)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("export 'drv' not present"),
        "{gone:?}"
    );
    let (report, _events) = halt(a, how);
    assert_eq!(report.all_closed, 1, "{}", report.console);
    assert!(
        report
            .console
            .lines()
            .any(|l| l.trim_end() == "exports closed: none"),
        "{}",
        report.console
    );
    present(
        &img,
        "raw",
        &[Write {
            pattern: 0x77,
            offset: MIB,
            len: 64 << 10,
        }],
    );
}

three_halts!(
    ejected_under_an_export:
    quit_after_iotest_140_eject_under_an_export,
    powerdown_after_iotest_140_eject_under_an_export,
    panic_after_iotest_140_eject_under_an_export
);

/// A node left open by close-all (a leaked reference, provoked by the
/// `leak-node-ref` test fault) is the failure exit, after `SHUTDOWN` and
/// the close-all report naming it: QEMU asserts there, and a supervisor
/// must see it.
#[test]
fn a_node_left_open_at_halt_is_the_failure_exit() {
    let cfg = QemuConfig::default().append(
        "--blockdev driver=null-co,node-name=n0,size=1048576 \
         --blockdev driver=null-co,node-name=n1 blockhaus.test-fault=leak-node-ref",
    );
    let mut a = Appliance::boot(&cfg);
    let reply = a.qmp().execute("quit", Value::Null).expect("quit reply");
    assert_eq!(reply, json!({"return": {}}));
    let q = a.qmp();
    q.set_timeout(Duration::from_secs(60)).unwrap();
    let mut events: Vec<Value> = q.events.drain(..).collect();
    while let Ok(v) = q.recv() {
        if v.get("event").is_some() {
            events.push(v);
        }
    }
    let status = a.wait_exit(Duration::from_secs(60));
    let console = a.console();
    let status = status.unwrap_or_else(|| panic!("QEMU did not exit:\n{console}"));
    assert_eq!(status.code(), Some(FAILURE_EXIT_STATUS), "{console}");
    assert!(
        console.contains("test fault: one reference to node 'n0' leaked"),
        "{console}"
    );
    assert!(
        console.contains("close-all: NODES LEFT OPEN: 'n0' (refcount 1)"),
        "{console}"
    );
    assert!(console.contains("close-all FAILED"), "{console}");
    assert!(
        console.contains("exit: failure (isa-debug-exit code 0x10): close-all left nodes open"),
        "{console}"
    );
    // The other node still closed by its refcount.
    assert!(console.contains("closed node 'n1' (null-co)"), "{console}");
    let shutdown = events
        .iter()
        .find(|e| e["event"] == "SHUTDOWN")
        .unwrap_or_else(|| panic!("no SHUTDOWN event: {events:?}"));
    assert_eq!(shutdown["data"]["reason"], "host-qmp-quit", "{shutdown}");
}
